"""Per-site timing for `attnopt.inspect`: the original and the rewritten op on the site's own inputs.

The probe at each rewritten site hands over two argument-less calls on the tensors the model
gave it: the original (torch SDPA in the inputs' dtype, masks built beforehand; F.linear for a
linear site) and the rewritten op (`attnopt::attention`, `attnopt::sparse_attention` or the
linear GEMM op, called as an op, as eager code would). Each is warmed once, then the two are run
alternately, so that drift (clock boost, a busy neighbour) hits both alike, and each time is the
median of its runs. A site whose calls are slow stops early once `budget_s` is spent (each is
still run at least once), so a large model on a CPU is not slowed many times over. On CUDA each
call is bracketed by synchronizations, so the time is the kernels' wall time.

What this time is not: the compiled model's time at that site. Inductor may fuse the original
site's neighbours (or, on CUDA, inline the rewritten op's kernels) differently; the numbers
compare the two ops on equal terms, which is what says whether the rewrite pays off there.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

WHAT = ("milliseconds, median of runs of each on the site's captured inputs, run alternately after one "
        "warm-up call each: original = torch SDPA (masks pre-built) or F.linear in the inputs' dtype; "
        "rewritten = the attnopt op the site runs, called eagerly")


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed(fn: Callable) -> float:
    """Seconds of one call, device work included."""
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


def time_pair(original: Callable, rewritten: Callable, runs: int = 5, budget_s: float = 2.0) -> dict:
    """{'original_ms', 'rewritten_ms', 'speedup', 'runs'}: medians over up to `runs` alternating
    runs of each (at least one; fewer once `budget_s` is spent). speedup > 1: the rewrite is faster."""
    _timed(original)
    _timed(rewritten)
    orig, new = [], []
    start = time.perf_counter()
    for _ in range(max(1, runs)):
        orig.append(_timed(original))
        new.append(_timed(rewritten))
        if time.perf_counter() - start > budget_s:
            break
    o, r = statistics.median(orig) * 1e3, statistics.median(new) * 1e3
    return {"original_ms": o, "rewritten_ms": r, "speedup": o / r if r > 0 else None, "runs": len(orig)}
