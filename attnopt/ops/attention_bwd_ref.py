"""Pure-PyTorch reference of attnopt's attention backward (the arithmetic:
docs/algorithms.md#attention-backward).

The CPU path of `torch.ops.attnopt.attention_backward` and the ground truth the Triton backward
kernels (codegen/attention/backward.py) are tested against. Both modes recompute P from the
forward's saved log-sum-exp (FlashAttention-2): delta = rowsum(dO * O), dP = dO V^T,
dS = P * (dP - delta), dV = P^T dO, dQ = scale * dS K, dK = scale * dS^T Q.

- "exact": straight-through over the quantized forward. Q, K, V, dO, P and dS enter the matmuls
  in 16 bits (the model's dtype; bf16 for fp32 models), fp32 accumulation; the logits are the
  unquantized scale * Q K^T, P = exp(logits - lse) with the forward's lse.
- "int8" (SageBwd): six of the seven attention matmuls in INT8 with per-block scales, dP = dO V^T
  in 16 bits. Q K^T is recomputed with the forward's grid (Q per 32 rows with scale * log2(e)
  folded, K smoothed and per 64 rows; no Q smoothing); dV = P^T dO with P per (64-query tile,
  key) and dO per 64-row block; dK = dS^T Q with dS per (64-query tile, key) and Q per 64-row
  block; dQ = dS K with dS per (query, 64-key tile) and the forward's smoothed INT8 K. A scale
  shared along a matmul's reduction dimension factors out of the integer sum, so every choice
  here is one a tensor-core kernel can run (the kernels' tiles are BWD_BM x BWD_BN).

Both modes multiply dS by K minus its token mean in dQ: rowsum(dS) is 0, so K's mean adds
nothing but the forward's error in O and the LSE, amplified (soft-capping breaks the identity:
there rowsum(dS) * mean(K) is added in fp32).

Tensors: q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv], out / grad_out [B, Hq, Nq, Dv],
lse [B, Hq, Nq] (natural log, as the forward returns it). GQA: dk / dv sum over the query heads
of each kv head. Masks as attention_ref: positions masked by keep_mask / causal take the
logit `masked_value` (as the forward held it: with K smoothing's row shift when its LSE carries
it, which `quant` says) and get no gradient; a row whose lse is -inf (no kept key) gets zero
gradients, a row with no kept key under a finite fill gives dV its dO / Nk. The additive mask gets no gradient. softcap > 0: dS is multiplied by the tanh's
derivative 1 - (capped / softcap)^2. Non-finite inputs propagate (no poisoned-row bookkeeping).
"""

from __future__ import annotations

import math

import torch

from .attention_ref import (INT8_MAX, LOG2E, _full_mask, _log2_logit, causal_keep, pv_dtype_for,
                            quantized_operands, sane_bias, softcap_row_shift)

MODES = ("exact", "int8")

# the backward tiles: query rows and keys per tile; the INT8 scale blocks follow them
BWD_BM = 64
BWD_BN = 64


def fake_int8(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """x rounded onto an INT8 grid whose scale (amax / 127) is shared over `dims`, dequantized.
    Rounds half away from zero as attention_ref.quantize_rows; an all-zero group gets scale 1."""
    amax = x.abs().amax(dim=dims, keepdim=True)
    s = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    y = x / s
    y = torch.trunc(y + 0.5 * torch.sign(y)).clamp_(-INT8_MAX, INT8_MAX)
    return y * s


def _tiled(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Zero-pad `dim` of x to a multiple of `size` and split it into (n_tiles, size)."""
    n = x.shape[dim]
    pad = -n % size
    if pad:
        widths = [0, 0] * (x.dim() - 1 - (dim % x.dim())) + [0, pad]
        x = torch.nn.functional.pad(x, widths)
    shape = list(x.shape)
    shape[dim:dim + 1] = [shape[dim] // size, size]
    return x.reshape(shape)


def _untiled(x: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim:dim + 2] = [shape[dim] * shape[dim + 1]]
    return x.reshape(shape).narrow(dim, 0, n)


def _q_tiles_int8(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """x [B, H, Nq, X] -> x fake-quantized in 64-query tiles, the scale shared over `dims` of the
    tiled view [B, H, nbm, BWD_BM, X] (-2: over the tile's rows; (-2, -1): one per tile)."""
    n = x.shape[2]
    return _untiled(fake_int8(_tiled(x, 2, BWD_BM), dims), 2, n)


def keep_positions(b, hq, nq, nk, keep_mask, is_causal, causal_offset, device) -> torch.Tensor:
    """[B, Hq, Nq, Nk] bool: the positions whose logit is the score (not masked_value)."""
    keep = torch.ones(nq, nk, dtype=torch.bool, device=device)
    if is_causal:
        keep = causal_keep(nq, nk, int(causal_offset), device)
    keep = keep.expand(b, hq, nq, nk)
    if keep_mask is not None:
        keep = keep & _full_mask(keep_mask, b, hq, nq, nk)
    return keep


def attention_backward_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    attn_bias: torch.Tensor | None = None,
    keep_mask: torch.Tensor | None = None,
    masked_value: float = -math.inf,
    is_causal: bool = False,
    causal_offset: int = 0,
    scale: float | None = None,
    smooth_k: bool = True,
    softcap: float = 0.0,
    mode: str = "int8",
    quant: str = "int8",
):
    """(dq, dk, dv) in q's, k's and v's dtypes; see the module docstring for the arithmetic.
    `quant` is the forward's Q.K format: whether its LSE carries K smoothing's row shift, which
    matters for rows with no kept key under a finite `masked_value` (P is 1 / Nk there)."""
    if mode not in MODES:
        raise ValueError(f"attention backward mode must be one of {MODES}, got {mode!r}")
    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    if hq % hkv:
        raise ValueError(f"query heads {hq} not a multiple of kv heads {hkv}")
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if q.numel() == 0 or k.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    p16 = pv_dtype_for(q.dtype)

    def heads(t):  # kv head -> its query heads
        return t.repeat_interleave(g, dim=1) if g > 1 else t

    # logits in log2 units: the true ones (K smoothing's row shift q . mean(K) added back)
    kmean = k.float().mean(dim=-2, keepdim=True)
    shift = softcap_row_shift(q.float(), kmean, scale)[..., None]
    if mode == "exact":
        q16, k16 = q.to(p16).float(), k.to(p16).float()
        s = torch.matmul(q16, heads(k16).transpose(-1, -2)) * (scale * LOG2E)
        k_dq = (k.float() - kmean).to(p16).float()
    else:
        ops = quantized_operands(q, k, v, scale, "int8", "fp16", smooth_k, False)
        s = torch.matmul(ops.q, heads(ops.k).transpose(-1, -2))
        if smooth_k:
            s = s + shift
        else:
            kmean = torch.zeros_like(kmean)
        k_dq = ops.k
    cap_grad = None
    if softcap:
        c2 = softcap * LOG2E
        s = torch.tanh(s / c2) * c2
        cap_grad = 1.0 - (s / c2) ** 2
    if attn_bias is not None:
        s = s + _log2_logit(sane_bias(_full_mask(attn_bias, b, hq, nq, nk)))
    keep = keep_positions(b, hq, nq, nk, keep_mask, is_causal, causal_offset, q.device)
    # masked logits as the forward held them: its LSE carries K smoothing's shift unless capped
    fill = _log2_logit(float(masked_value))
    fwd_shift = smooth_k and quant != "none" and not softcap
    fill = torch.full_like(s, fill) + (shift if fwd_shift and math.isfinite(fill) else 0.0)
    s = torch.where(keep, s, fill)
    lse2 = lse.float()[..., None] * LOG2E
    no_key = torch.isneginf(lse2)
    p = torch.where(no_key, torch.zeros_like(s), torch.exp2(s - torch.where(no_key, 0.0, lse2)))

    do16 = grad_out.to(p16).float()
    delta = (grad_out.float() * out.float()).sum(dim=-1, keepdim=True)
    dp = torch.matmul(do16, heads(v.to(p16).float()).transpose(-1, -2))
    ds = torch.where(keep, p * (dp - delta), torch.zeros_like(p))
    if cap_grad is not None:
        ds = ds * cap_grad

    if mode == "exact":
        dv_h = torch.matmul(p.to(p16).float().transpose(-1, -2), do16)
        ds16 = ds.to(p16).float()
        dq = torch.matmul(ds16, heads(k_dq))
        dk_h = torch.matmul(ds16.transpose(-1, -2), q16) * scale
    else:
        p_q = _q_tiles_int8(p, (-2,))  # per (query tile, key)
        do_q = _q_tiles_int8(grad_out.float(), (-2, -1))  # per query tile
        dv_h = torch.matmul(p_q.transpose(-1, -2), do_q)
        ds_k = _q_tiles_int8(ds, (-2,))
        q_q = _q_tiles_int8(q.float(), (-2, -1))
        dk_h = torch.matmul(ds_k.transpose(-1, -2), q_q) * scale
        ds_q = _untiled(fake_int8(_tiled(ds, 3, BWD_BN), (-1,)), 3, nk)  # per (query, key tile)
        dq = torch.matmul(ds_q, heads(k_dq))
    # dQ's K is smoothed: K's mean would meet rowsum(dS), which is 0 (P sums to 1, delta is
    # rowsum(P dP)), so it is left out, and with it the forward's and dS's rounding errors it
    # would amplify; soft-capping's derivative breaks the identity, so there it is added in fp32
    if cap_grad is not None:
        dq = dq + ds.sum(dim=-1, keepdim=True) * heads(kmean)
    dq = dq * scale
    dk = dk_h.reshape(b, hkv, g, nk, d).sum(dim=2)
    dv_ = dv_h.reshape(b, hkv, g, nk, dv).sum(dim=2)
    return dq.to(q.dtype), dk.to(k.dtype), dv_.to(v.dtype)
