"""Reference decode attention over the quantized storage: the Triton kernel's arithmetic in torch.

A few query tokens (one for decode, a few for speculative verification) against one layer's
QuantizedKV. Split-KV like the kernel: chunks of quantized tokens, then the 16-bit ring, each
with its own running max / sum / P.V in fp32 (exp2 domain), combined at the end. Only one chunk
is dequantized at a time, so memory stays at one chunk whatever the cache length.

Which key t a query row sees (row of query i of `nq`, per batch row b with `lengths[b]` tokens):
t < lengths[b], t <= lengths[b] - nq + i (causal), and key_valid[b, t] where given (padding).
Keys older than the last `residual` are read quantized, the rest from the ring. GQA: the query
heads of one KV head are rows of one matrix against that head's K / V (no copies).
"""

from __future__ import annotations

import math

import torch

from .kv_quant import KVLayout, dequantize_k, dequantize_v

LOG2E = 1.4426950408889634
CHUNK = 1024


def _rows(q: torch.Tensor, heads_kv: int) -> torch.Tensor:
    """q [B, Hq, nq, D] -> [B, Hkv, (Hq / Hkv) * nq, D] (row j * nq + i: head j of the group, query i)."""
    b, hq, nq, d = q.shape
    return q.reshape(b, heads_kv, (hq // heads_kv) * nq, d)


def _partial(qs, k, v, ok):
    """One split's (max, sum, P.V) for rows qs [B, H, M, D] over keys k / v [B, H, n, D], `ok` [B, 1|H, M, n]."""
    s = torch.where(ok, qs @ k.transpose(-1, -2), -torch.inf)
    m = s.amax(-1)
    m_use = torch.where(torch.isinf(m), 0.0, m)
    p = torch.exp2(s - m_use[..., None])
    return m, p.sum(-1), p @ v


def decode_attention_ref(q, kv, lengths, key_valid=None, scale=None, draft=False, chunk=CHUNK):
    """q [B, Hq, nq, D] against `kv` (QuantizedKV-like: kv.layout and the PLANES tensors);
    lengths [B] tokens per row; key_valid [B, >= max length] bool or None. -> [B, Hq, nq, D]."""
    lay: KVLayout = kv.layout
    b, hq, nq, d = q.shape
    hkv, r = kv.ring_k.shape[1], lay.residual
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qs = _rows(q.float() * (scale * LOG2E), hkv)
    m_rows = qs.shape[2]
    query = (torch.arange(m_rows, device=q.device) % nq)[None, None, :, None]
    lengths = lengths.to(q.device).long().view(b, 1, 1, 1)

    def visible(t):  # t [n] or [B, 1, 1, n] token indices -> [B, 1, M, n]
        t = t.view(1, 1, 1, -1) if t.dim() == 1 else t
        ok = (t >= 0) & (t < lengths) & (t <= lengths - nq + query)
        if key_valid is not None:
            kvb = key_valid.to(q.device).bool()
            idx = t.clamp(0, kvb.shape[1] - 1).expand(b, 1, 1, -1).reshape(b, -1)
            ok = ok & kvb.gather(1, idx).view(b, 1, 1, -1)
        return ok

    parts = []
    quant_end = int((lengths - r).clamp(min=0).max())
    for c0 in range(0, quant_end, chunk):
        c1 = min(c0 + chunk, quant_end)
        g0, g1 = c0 // lay.group, -(-c1 // lay.group)
        t = torch.arange(g0 * lay.group, g1 * lay.group, device=q.device)
        k = dequantize_k(kv.k_codes[:, :, t], None if kv.k_low is None else kv.k_low[:, :, t],
                         kv.k_scale[:, :, g0:g1], kv.k_zero[:, :, g0:g1], lay, draft)
        v = dequantize_v(kv.v_codes[:, :, t], None if kv.v_low is None else kv.v_low[:, :, t],
                         kv.v_scale[:, :, t], kv.v_zero[:, :, t], lay, draft)
        ok = visible(t) & (t.view(1, 1, 1, -1) < lengths - r)
        parts.append(_partial(qs, k, v, ok))
    slot = torch.arange(r, device=q.device).view(1, 1, 1, -1)
    t_ring = lengths - 1 - torch.remainder(lengths - 1 - slot, r)  # the token each ring slot holds
    parts.append(_partial(qs, kv.ring_k.float(), kv.ring_v.float(), visible(t_ring)))

    m_all = torch.stack([p[0] for p in parts])
    top = m_all.amax(0)
    top = torch.where(torch.isinf(top), 0.0, top)
    w = torch.exp2(m_all - top)  # -inf (no key in that split) -> 0
    den = (w * torch.stack([p[1] for p in parts])).sum(0)
    num = (w[..., None] * torch.stack([p[2] for p in parts])).sum(0)
    out = torch.where(den[..., None] > 0, num / den.clamp(min=1e-30)[..., None], 0.0)
    return out.reshape(b, hq, nq, d).to(q.dtype)
