"""Shared benchmark plumbing: environment facts, result files, a time limit, the GPU check."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time

import torch

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - missing, or failing to import beside this torch (timm's torchvision)
        return None


def env(short: bool = False) -> dict:
    """The device and library versions a result was measured with (short: what a table row names)."""
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor() or "cpu")
    facts = {"device": dev, "torch": torch.__version__, "triton": _version("triton")}
    if short:
        return facts
    cap = list(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None
    return {**facts, "cuda": torch.cuda.is_available(), "cuda_version": torch.version.cuda, "capability": cap,
            "transformers": _version("transformers"),
            "diffusers": _version("diffusers"), "cpu_count": os.cpu_count(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def write_text(path: str, text: str) -> None:
    """Replace a file whole (temporary file + rename): a run killed mid-write leaves the old one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write(name: str, rows: list, extra: dict | None = None, out_dir: str | None = None) -> str:
    """Write rows (with the environment) as JSON under out_dir (default RESULTS); returns the path."""
    out_dir = out_dir or RESULTS
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    write_text(path, json.dumps({"env": env(), **(extra or {}), "rows": rows}, indent=1))
    return path


def require_cuda(script: str) -> None:
    """Exit with one clear line (status 1) where there is no CUDA GPU, instead of a traceback."""
    if torch.cuda.is_available():
        return
    build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
    sys.exit(f"{script}: needs a CUDA GPU, and torch.cuda.is_available() is False here ({build}). "
             f"Run it on a GPU machine (bash benchmarks/gpu_session.sh runs every benchmark); "
             f"--help lists its options.")


class TimeLimit:
    """Stop starting new work in time: `allows()` is False once the longest item so far would no
    longer fit in the `seconds` left (None: no limit). A benchmark that checks it before each item
    ends with its table and JSON written instead of being killed by the session's timeout."""

    def __init__(self, seconds: float | None, margin: float = 5.0):
        self.seconds, self.margin = seconds, margin
        self.start = time.perf_counter()
        self.longest = 0.0
        self.stopped = False

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self) -> bool:
        if self.seconds is None:
            return True
        ok = self.elapsed() + self.longest * 1.2 + self.margin < self.seconds
        if not ok and not self.stopped:
            self.stopped = True
            print(f"time limit: stopping after {self.elapsed():.0f}s of {self.seconds:.0f}s "
                  f"(the next item takes up to {self.longest:.0f}s)", file=sys.stderr)
        return ok

    def item(self):
        """Context manager: measures one item, so `allows()` knows how long the next may take."""
        limit = self

        class _Item:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                limit.longest = max(limit.longest, time.perf_counter() - self.t0)
                return False

        return _Item()


def add_time_limit(ap) -> None:
    """--time-limit SECONDS (gpu_session.sh passes each step's own)."""
    ap.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                    help="start no new configuration once the longest so far would not fit in what is left "
                         "(results so far are written)")
