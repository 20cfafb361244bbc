"""Reference decode attention over the quantized storage: the Triton kernel's arithmetic in torch.

A few query tokens (one for decode, a few for speculative verification) against one layer's
QuantizedKV. Split-KV like the kernel: chunks of quantized tokens, then the 16-bit ring, each
with its own running max / sum / P.V in fp32 (exp2 domain), combined at the end. Only one chunk
is dequantized at a time, so memory stays at one chunk whatever the cache length.

Which key t a query row sees (row of query i of `nq`, per batch row b with `lengths[b]` tokens):
t < lengths[b], t <= lengths[b] - nq + i (causal), and key_valid[b, t] where given (padding).
Keys older than the last `residual` are read quantized, the rest from the ring. GQA: the query
heads of one KV head are rows of one matrix against that head's K / V (no copies).

Per-head windows (`window` [Hq] tokens, `sinks`): query head h at position p also needs
p - t < window[h] or t < sinks. Windowed storage (kv.keep, storage.py) maps token t to its slot;
only the sink tokens and the span the widest window reaches are read.
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


def _slot(t, keep):
    if keep is None:
        return t
    sinks, span = keep
    return torch.where(t < sinks, t, sinks + (t - sinks) % span)


def _quant_ranges(keep, lengths, quant_end, nq, window, sinks, g):
    """Group-aligned token ranges [a, b) of the quantized storage to read: all of it, or
    (windows) the sink groups and what the widest window reaches from the earliest query."""
    if window is None:
        if keep is not None:
            raise ValueError("windowed KV storage needs the heads' windows to be read")
        return [(0, quant_end)]
    head = keep[0] if keep is not None else -(-sinks // g) * g
    lo = max(0, int(lengths.min()) - nq - int(window.max()) + 1) // g * g
    if lo <= head:
        return [(0, quant_end)]
    return [(0, min(head, quant_end)), (lo, quant_end)]


def decode_attention_ref(q, kv, lengths, key_valid=None, scale=None, draft=False, chunk=CHUNK,
                         window=None, sinks=0):
    """q [B, Hq, nq, D] against `kv` (QuantizedKV-like: kv.layout, the PLANES tensors and
    kv.keep, None unless windowed); lengths [B] tokens per row; key_valid [B, >= max length]
    bool or None; window [Hq] int or None, sinks: per-head windows. -> [B, Hq, nq, D]."""
    lay: KVLayout = kv.layout
    b, hq, nq, d = q.shape
    hkv, r = kv.ring_k.shape[1], lay.residual
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qs = _rows(q.float() * (scale * LOG2E), hkv)
    m_rows = qs.shape[2]
    query = (torch.arange(m_rows, device=q.device) % nq)[None, None, :, None]
    lengths = lengths.to(q.device).long().view(b, 1, 1, 1)
    keep = getattr(kv, "keep", None)
    if window is not None:  # [Hq] -> per row [1, Hkv, M, 1] (row j * nq + i: head j of the group)
        window = window.to(q.device).long()
        win_rows = window.view(hkv, hq // hkv).repeat_interleave(nq, 1).view(1, hkv, m_rows, 1)

    def visible(t):  # t [n] or [B, 1, 1, n] token indices -> [B, 1 | Hkv, M, n]
        t = t.view(1, 1, 1, -1) if t.dim() == 1 else t
        pos = lengths - nq + query
        ok = (t >= 0) & (t < lengths) & (t <= pos)
        if window is not None:
            ok = ok & ((t < sinks) | (pos - t < win_rows))
        if key_valid is not None:
            kvb = key_valid.to(q.device).bool()
            idx = t.clamp(0, kvb.shape[1] - 1).expand(b, 1, 1, -1).reshape(b, -1)
            ok = ok & kvb.gather(1, idx).view(b, 1, 1, -1)
        return ok

    parts = []
    quant_end = int((lengths - r).clamp(min=0).max())
    ranges = _quant_ranges(keep, lengths, quant_end, nq, window, sinks, lay.group)
    chunks = [(c0, min(c0 + chunk, c_end)) for c_start, c_end in ranges for c0 in range(c_start, c_end, chunk)]
    for c0, c1 in chunks:
        g0, g1 = c0 // lay.group, -(-c1 // lay.group)
        t = torch.arange(g0 * lay.group, g1 * lay.group, device=q.device)
        at, gs = _slot(t, keep), _slot(t[:: lay.group], keep) // lay.group
        k = dequantize_k(kv.k_codes[:, :, at], None if kv.k_low is None else kv.k_low[:, :, at],
                         kv.k_scale[:, :, gs], kv.k_zero[:, :, gs], lay, draft)
        v = dequantize_v(kv.v_codes[:, :, at], None if kv.v_low is None else kv.v_low[:, :, at],
                         kv.v_scale[:, :, at], kv.v_zero[:, :, at], lay, draft)
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
