"""A one-line progress bar on stderr for long work (inspect, calibrate, the benchmarks).

It draws only when its stream is a terminal (a log file or a CI job gets nothing) and says what
runs, step i of n, the current item (a site, a model), the time elapsed and, from the second step
on, an estimate of the time left (at the pace since the first step: a compile or warm-up before
it does not count). A new item is drawn at once; steps at most ten times a second.
`ATTNOPT_PROGRESS=0` turns it off; `=1` forces it on (a terminal that does not say it is).

    with Progress("calibrate", total=len(sites)) as bar:
        for key in sites:
            bar.note(key)      # now working on `key`
            ...
            bar.step()         # one more done
    for name in track(models, "models"):
        ...
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def _fmt_time(s: float) -> str:
    s = int(s + 0.5)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """Step i of n (n may be unknown) with the current item, elapsed time and time left."""

    def __init__(self, desc: str, total: int | None = None, stream: TextIO | None = None,
                 enabled: bool | None = None, interval: float = 0.1):
        self.desc, self.total = desc, total
        self.stream = stream if stream is not None else sys.stderr
        env = os.environ.get("ATTNOPT_PROGRESS", "")
        if enabled is None:
            enabled = env == "1" or (env != "0" and _is_terminal(self.stream))
        self.enabled = enabled
        self.done, self.item, self.interval = 0, "", interval
        self.t0 = time.monotonic()
        self._last_draw = -1.0
        self._drawn = False
        self._first: tuple[float, int] | None = None  # (time, steps done) at the first step

    def line(self, width: int = 100) -> str:
        """The text drawn: 'inspect [####------] 2/5 layers.1.attn#0  3s elapsed, ~5s left'."""
        elapsed = time.monotonic() - self.t0
        if self.total:
            filled = min(10, int(10 * self.done / self.total))
            count = f"[{'#' * filled}{'-' * (10 - filled)}] {self.done}/{self.total}"
        else:
            count = f"{self.done} done"
        left = ""
        if self.total and self._first is not None and 1 < self.done < self.total:
            # the pace since the first step: what came before it (a compile, a warm-up) is not a step
            per_step = (time.monotonic() - self._first[0]) / (self.done - self._first[1])
            left = f", ~{_fmt_time(per_step * (self.total - self.done))} left"
        tail = f"  {_fmt_time(elapsed)} elapsed{left}"
        head = f"[attnopt] {self.desc} {count} "
        room = max(0, width - len(head) - len(tail))
        item = self.item if len(self.item) <= room else ("…" + self.item[len(self.item) - room + 1:] if room else "")
        return head + item + tail

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < self.interval:
            return
        self._last_draw = now
        width = shutil.get_terminal_size((100, 20)).columns - 1
        self.stream.write("\r" + self.line(width) + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def step(self, item: str = "", n: int = 1) -> None:
        """`n` more steps done; `item` is what runs now (shown until the next call)."""
        self.done += n
        if self._first is None:
            self._first = (time.monotonic(), self.done)
        if item:
            self.item = item
        self._draw(force=self.total is not None and self.done >= self.total)

    def note(self, item: str, total: int | None = None) -> None:
        """Show `item` (and a new total, once known) without counting a step."""
        self.item = item
        if total is not None:
            self.total = total
        self._draw(force=True)  # a new item or phase: rare, always shown

    def write(self, text: str, file: TextIO | None = None) -> None:
        """Print a line (to stdout by default) above the bar: the bar is cleared, then drawn again."""
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        print(text, file=file if file is not None else sys.stdout, flush=True)
        if self._drawn:
            self._draw(force=True)

    def close(self) -> None:
        """The final state drawn and the line ended, so what is printed next starts clean."""
        if self.enabled and (self._drawn or self.done):
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()
        self.enabled = False

    def __enter__(self) -> "Progress":
        self._draw(force=True)
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(items: Iterable[T], desc: str, total: int | None = None, label=str, **kw) -> Iterator[T]:
    """Yield from `items` under a Progress bar; `label(item)` names the item that runs."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(desc, total=total, **kw) as bar:
        for x in items:
            bar.note(label(x))
            yield x
            bar.step()
