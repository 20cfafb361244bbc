"""Step schedules for diffusion: which attention options hold at which denoising step.

`attention.schedule` lists entries `{"steps": [lo, hi], "include": globs, "use": {...}}`. The
first entry whose half-open step range holds the current step and whose globs match the site's
module path wins; the section's own options hold elsewhere, and whenever no step is set.

The current step is runtime data. `with attnopt.step(i, total):` writes it into one small tensor
per device, updated in place. Compiled graphs take that tensor as an input and pick the variant
on the device. So one compiled model serves every step without recompiling, CUDA graph replays
included. Eager callers (the diffusers backend) read `current_step()` instead.
"""

from __future__ import annotations

import contextlib
import fnmatch
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

NO_STEP = (-1, 0)  # what the step tensors hold outside any `step(...)` block: no entry matches

_lock = threading.Lock()
_current: tuple[int, int] | None = None
_tensors: dict[torch.device, torch.Tensor] = {}
_listeners: list[Callable[[int, int], None]] = []


def current_step() -> tuple[int, int] | None:
    """(step index, total steps) of the innermost `step(...)` block, or None outside one."""
    return _current


def step_tensor(device: torch.device | str) -> torch.Tensor:
    """The float64 tensor [step index, total steps] on `device` that compiled graphs read; the
    same tensor for the life of the process (CUDA graphs keep its address), written in place."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with _lock:
        t = _tensors.get(device)
        if t is None:
            t = torch.tensor(_current or NO_STEP, dtype=torch.float64, device=device)
            _tensors[device] = t
        return t


def add_step_listener(fn: Callable[[int, int], None]) -> Callable[[], None]:
    """Call `fn(i, total)` whenever a `step(...)` block starts (per-site state such as SVG2's
    centroids resets on step 0); returns a function that removes it."""
    with _lock:
        _listeners.append(fn)

    def remove() -> None:
        with _lock:
            if fn in _listeners:
                _listeners.remove(fn)

    return remove


def _write(value: tuple[int, int] | None) -> None:
    """Set the step and write it into every device's tensor. On CUDA the write is fenced by a
    device-wide synchronize on both sides: a model running on another stream than the current
    one would otherwise read the new value before its earlier kernels are done, or the old one
    after (one sync pair per denoising step; nothing syncs on the CPU)."""
    global _current
    with _lock:
        _current = value
        vals = torch.tensor(value or NO_STEP, dtype=torch.float64)
        for t in _tensors.values():
            fence = t.is_cuda and not torch.cuda.is_current_stream_capturing()
            if fence:
                torch.cuda.synchronize(t.device)
            t.copy_(vals, non_blocking=False)
            if fence:
                torch.cuda.synchronize(t.device)


@contextlib.contextmanager
def step(i: int, total: int) -> Iterator[None]:
    """Run the block as denoising step `i` of `total` (0 <= i < total): schedule entries are
    matched against it. Blocks nest; leaving one restores the step around it."""
    for name, v in (("i", i), ("total", total)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"attnopt.step: {name} must be an int, got {v!r}")
    if not 0 <= i < total:
        raise ValueError(f"attnopt.step: need 0 <= i < total, got i={i}, total={total}")
    before = _current
    _write((i, total))
    for fn in list(_listeners):
        fn(i, total)
    try:
        yield
    finally:
        _write(before)


def step_in(steps: Sequence, i: int, total: int) -> bool:
    """Whether step `i` of `total` lies in an entry's half-open range: integers are step indices
    (lo <= i < hi), other numbers fractions of the run (lo <= i / total < hi)."""
    lo, hi = steps
    if isinstance(lo, int) and isinstance(hi, int):
        return lo <= i < hi
    return lo <= i / total < hi


def entry_index(schedule: Sequence[Mapping], module_path: str, step_now: tuple[int, int] | None) -> int | None:
    """Index of the first entry matching the site and the step, or None (the section's options)."""
    if step_now is None:
        return None
    i, total = step_now
    p = module_path or "<top>"
    for n, entry in enumerate(schedule):
        if any(fnmatch.fnmatchcase(p, g) for g in entry["include"]) and step_in(entry["steps"], i, total):
            return n
    return None


def site_entries(schedule: Sequence[Mapping], module_path: str) -> list[int]:
    """Indices of the entries whose globs match a site (the variants a compiled site needs)."""
    p = module_path or "<top>"
    return [n for n, e in enumerate(schedule) if any(fnmatch.fnmatchcase(p, g) for g in e["include"])]


def apply_use(attention_options: Any, use: Mapping) -> Any:
    """The attention options with an entry's `use` merged over them (validated: a merged set
    that the options would refuse raises ConfigError)."""
    from .config import AttentionOptions

    merged = {**attention_options.to_dict(), **{k: v for k, v in use.items()}, "schedule": []}
    return AttentionOptions.from_dict(merged)


def options_at(attention_options: Any, module_path: str, step_now: tuple[int, int] | None = None) -> Any:
    """The attention options in force at a site at a step (default: the current step)."""
    if step_now is None:
        step_now = current_step()
    n = entry_index(attention_options.schedule, module_path, step_now)
    if n is None:
        return attention_options
    return apply_use(attention_options, attention_options.schedule[n]["use"])
