"""Shared test helpers."""

import torch
import torch.nn.functional as F

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


def dynamo_graph(model, *inputs):
    """(graph module, example inputs): the one graph Dynamo hands a backend for model(*inputs),
    parameters lifted to inputs, as the linear pass sees it."""
    graphs = []
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=lambda gm, ex: graphs.append((gm, ex)) or gm)(*inputs)
    assert len(graphs) == 1, f"{len(graphs)} graphs"
    return graphs[0]


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


def attend_with_keep(q, k, v, keep, apply: str, additive_fill: float = float("-inf")):
    """Attention under a bool keep mask, applied the ways models apply one: as SDPA's bool mask
    ("sdpa_bool") or additive mask ("sdpa_additive", `additive_fill` where dropped), or by hand
    with `where(keep, s, finfo.min)` ("where") or `masked_fill(~keep, -inf)` ("masked_fill")."""
    if apply == "sdpa_bool":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    if apply == "sdpa_additive":
        mask = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, additive_fill)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if apply == "where":
        s = torch.where(keep, s, torch.finfo(s.dtype).min)
    else:
        s = s.masked_fill(~keep, float("-inf"))
    return s.softmax(-1) @ v
