"""Shared test helpers."""

import torch

import attnopt
from attnopt.metrics import compare

# Rewrite every site the tests build, however short (the default skips short sequences).
ALL_SITES = {"attention": {"min_seq_len": 0}}


def rel_l1(a, b) -> float:
    return compare(a, b)["rel_l1"]


def inspect(model, *inputs, options=None, **kw):
    opts = dict(ALL_SITES)
    for k, v in (options or {}).items():
        opts[k] = {**opts.get(k, {}), **v} if isinstance(v, dict) else v
    return attnopt.inspect(model, *inputs, options=opts, **kw)


def randn(*shape, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape) * scale).to(dtype)


def cuda_peak_bytes(fn) -> int:
    """Peak CUDA memory `fn` allocates above what was allocated before it (run it once first,
    so compilation and caches are not counted)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base
