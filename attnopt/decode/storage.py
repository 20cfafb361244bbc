"""One layer's quantized K / V storage (layout in kv_quant) and how new tokens are written to it.

Static shapes: every buffer is allocated for `max_len` tokens once, and `append` writes with
index ops only (no branch on the current length, which is a tensor), so a compiled decode step
is one graph whatever the length.

Every token is written to the quantized storage, and the most recent `residual` tokens are also
kept in a 16-bit ring (slot = token % residual). K is quantized per channel over groups of
`group` tokens, so a group's scale is final only when its last token arrives: each append
re-quantizes every group it touches from the ring (earlier tokens of the group) and the new
tokens. Readers take tokens older than the last `residual` from the quantized storage (their
groups are complete, since residual >= group) and the rest from the ring.

Positions are token slots from 0. Readers take which keys a row has from a per-row key mask
(left padding) and the row's length.

Windowed storage (`keep`, per-head windows: MoA-style plans): only the first `sink_slots`
tokens and a ring of `span_slots` slots behind them are allocated; token t >= sink_slots lives
in slot sink_slots + (t - sink_slots) % span_slots. Both are multiples of `group`, so a K group
stays contiguous. An append writes the groups it touches plus one spare group past its last
token, so span_slots = kept tokens + 2 groups: the ring never overwrites a token the window
still needs (windowed_slots). Eager only (the split of long appends reads the length).
"""

from __future__ import annotations

import torch

from .. import switches
from .kv_quant import SCALE_DTYPE, KVLayout, quantize_k, quantize_v

PLANES = ("k_codes", "k_low", "k_scale", "k_zero", "v_codes", "v_low", "v_scale", "v_zero", "ring_k", "ring_v")


class QuantizedKV:
    """The buffers of one layer: see PLANES (k_low / v_low are None unless "int4+int8")."""

    def __init__(self, layout: KVLayout, batch: int, heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device, keep: tuple[int, int] | None = None):
        layout.check_head_dim(head_dim)
        self.layout, self.max_len, self.head_dim = layout, max_len, head_dim
        g, cd = layout.group, layout.code_dim(head_dim)
        self.keep = keep if keep is not None and sum(keep) < layout.slots(max_len) else None
        t = layout.slots(max_len) if self.keep is None else sum(self.keep)

        def u8(*shape):
            return torch.zeros(shape, dtype=torch.uint8, device=device)

        def half(*shape):
            return torch.zeros(shape, dtype=SCALE_DTYPE, device=device)

        self.k_codes, self.v_codes = u8(batch, heads, t, cd), u8(batch, heads, t, cd)
        self.k_low = u8(batch, heads, t, cd) if layout.has_low else None
        self.v_low = u8(batch, heads, t, cd) if layout.has_low else None
        self.k_scale, self.k_zero = half(batch, heads, t // g, head_dim), half(batch, heads, t // g, head_dim)
        self.v_scale, self.v_zero = half(batch, heads, t, head_dim // g), half(batch, heads, t, head_dim // g)
        self.ring_k = torch.zeros(batch, heads, layout.residual, head_dim, dtype=dtype, device=device)
        self.ring_v = torch.zeros_like(self.ring_k)

    def tensors(self) -> list[torch.Tensor]:
        return [x for x in (getattr(self, n) for n in PLANES) if x is not None]

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in self.tensors())

    def zero_(self) -> None:
        for x in self.tensors():
            x.zero_()

    def slot(self, t: torch.Tensor) -> torch.Tensor:
        """Storage slot of token t (itself unless windowed)."""
        if self.keep is None:
            return t
        sinks, span = self.keep
        return torch.where(t < sinks, t, sinks + (t - sinks) % span)

    def append(self, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor) -> None:
        """Write k, v [B, H, n, D] at token slots start .. start+n-1 (`start` a 0-dim int tensor).
        One token, eager, where the ops launch Triton kernels: one fused kernel does it all
        (codegen/decode/append.py); compiled, Inductor fuses the ops below."""
        if self.keep is not None:
            return self._append_windowed(k, v, int(start))
        if k.shape[2] == 1 and not torch.compiler.is_compiling() and switches.use_triton(k, "auto", "auto"):
            from ..codegen.decode.append import append_one_triton

            return append_one_triton(self, k, v, start)
        self._write(k, v, start)

    def _write(self, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor) -> None:
        """append() in torch ops: re-quantize every group the new tokens touch."""
        lay = self.layout
        n, g, r = k.shape[2], lay.group, lay.residual
        dev = k.device
        groups = (n - 1) // g + 2  # every group tokens start..start+n-1 touch, and at most one more
        first = start // g * g
        tok = first + torch.arange(groups * g, device=dev)
        old, new = tok < start, (tok >= start) & (tok < start + n)
        pick = (tok - start).clamp(0, n - 1)
        # the group's earlier tokens come from the ring: read it before the new tokens overwrite it
        src_k = torch.where(old[:, None], self.ring_k.index_select(2, tok % r), k.index_select(2, pick))
        src_v = torch.where(old[:, None], self.ring_v.index_select(2, tok % r), v.index_select(2, pick))
        valid = old | new
        src_k = torch.where(valid[:, None], src_k, 0)
        src_v = torch.where(valid[:, None], src_v, 0)

        keep = min(n, r)
        ring_at = (start + torch.arange(n - keep, n, device=dev)) % r
        self.ring_k.index_copy_(2, ring_at, k[:, :, n - keep:].to(self.ring_k.dtype))
        self.ring_v.index_copy_(2, ring_at, v[:, :, n - keep:].to(self.ring_v.dtype))

        kc, kl, ks, kz = quantize_k(src_k, lay, valid)
        vc, vl, vs, vz = quantize_v(src_v, lay)
        grp = start // g + torch.arange(groups, device=dev)
        tok, grp = self.slot(tok), self.slot(grp * g) // g
        self.k_codes.index_copy_(2, tok, kc)
        self.v_codes.index_copy_(2, tok, vc)
        if lay.has_low:
            self.k_low.index_copy_(2, tok, kl)
            self.v_low.index_copy_(2, tok, vl)
        self.k_scale.index_copy_(2, grp, ks)
        self.k_zero.index_copy_(2, grp, kz)
        self.v_scale.index_copy_(2, tok, vs)
        self.v_zero.index_copy_(2, tok, vz)

    def _append_windowed(self, k, v, start: int) -> None:
        """The sink tokens, then only the tokens a window can still see (from a group boundary,
        so no group needs tokens that were skipped)."""
        sinks, span = self.keep
        g, n = self.layout.group, k.shape[2]
        if start < sinks:
            m = min(n, sinks - start)
            self._write(k[:, :, :m], v[:, :, :m], torch.tensor(start, device=k.device))
        end = start + n
        if end > sinks:
            first = max(start, sinks)
            tail = max(first, (end - (span - 2 * g)) // g * g)
            self._write(k[:, :, tail - start:], v[:, :, tail - start:], torch.tensor(tail, device=k.device))


def windowed_slots(layout: KVLayout, sinks: int, window: int, queries: int) -> tuple[int, int]:
    """(sink_slots, span_slots) for `sinks` leading tokens and windows up to `window` tokens seen
    by up to `queries` query tokens per step: whole groups, the kept span at least the 16-bit
    ring (tokens the ring holds are also stored quantized), plus two groups an append writes
    ahead of the window."""
    g = layout.group
    kept = max(window + queries, layout.residual)
    return -(-sinks // g) * g, (-(-kept // g) + 2) * g
