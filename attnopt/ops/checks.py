"""Operand checks shared by the attention ops' fake and real implementations.

The fake implementations run when a pass inserts an op into a graph: checking there what the
kernels assume (K/V batch and heads against Q, head dims, mask broadcast, dtypes) makes a wrong
rewrite fail at compile time, where the pass can keep the site as it was, instead of computing
garbage at run time. Symbolic sizes are only rejected when provably wrong (no guards are added).
"""

from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true


class OperandError(ValueError):
    """The operands of an attnopt attention op do not fit together."""


def _provably(cond) -> bool:
    return bool(cond) if isinstance(cond, bool) else bool(statically_known_true(cond))


def _differ(a, b) -> bool:
    return _provably(a != b)


def check_attention_operands(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             attn_bias: torch.Tensor | None, keep_mask: torch.Tensor | None) -> None:
    """Raise OperandError unless q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] and the
    masks (broadcastable to [B, Hq, Nq, Nk]) fit the kernels' assumptions."""
    def fail(msg: str):
        raise OperandError(f"{op}: {msg} (q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)})")

    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        fail("q, k and v must be 4-D [batch, heads, tokens, features]")
    if not (q.dtype == k.dtype == v.dtype):
        fail(f"q/k/v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if not q.dtype.is_floating_point:
        fail(f"dtype {q.dtype} is not a floating type")
    if _differ(k.shape[0], q.shape[0]) or _differ(v.shape[0], q.shape[0]):
        fail("k/v batch differs from q's")
    if _differ(k.shape[1], v.shape[1]):
        fail("k and v have different head counts")
    hq, hkv = q.shape[1], k.shape[1]
    if _provably(hkv == 0) or (isinstance(hq, int) and isinstance(hkv, int) and hkv and hq % hkv):
        fail(f"{hq} query heads are not a multiple of {hkv} kv heads")
    if _differ(k.shape[3], q.shape[3]):
        fail("q and k head dims differ")
    if _differ(k.shape[2], v.shape[2]):
        fail("k and v token counts differ")
    target = (q.shape[0], hq, q.shape[2], k.shape[2])
    for name, m in (("attn_bias", attn_bias), ("keep_mask", keep_mask)):
        if m is None:
            continue
        if name == "keep_mask" and m.dtype != torch.bool:
            fail(f"keep_mask must be bool, not {m.dtype}")
        if name == "attn_bias" and m.dtype.is_complex:  # bool / int biases add as numbers (as eager)
            fail(f"attn_bias must be real, not {m.dtype}")
        if m.dim() > 4:
            fail(f"{name} has {m.dim()} dims (at most 4)")
        for got, want in zip(reversed(m.shape), reversed(target)):
            if _differ(got, 1) and _differ(got, want):
                fail(f"{name} of shape {tuple(m.shape)} does not broadcast to {tuple(target)}")
