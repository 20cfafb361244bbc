"""`torch.ops.attnopt.kv_decode`: decode attention over one layer's quantized storage, one op.

An opaque custom op, so torch.compile keeps it as one call in a decode step's graph (its body
reads `lengths`, a tensor, to size the reference's loop). The body launches the Triton split-KV
kernels on CUDA (codegen/decode) and runs decode_ref elsewhere; ATTNOPT_IMPL / `impl` force
either, as for the other ops (switches.py). Per-head windows (`window`, `sinks`, windowed
storage `keep`) run the reference on every device: the Triton kernel has no per-head window yet.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from .. import switches
from .decode_ref import decode_attention_ref
from .kv_quant import KVLayout


def _storage(quant, group, k_codes, k_low, k_scale, k_zero, v_codes, v_low, v_scale, v_zero, ring_k, ring_v,
             keep=None):
    layout = KVLayout(quant, group, ring_k.shape[2])
    return SimpleNamespace(layout=layout, k_codes=k_codes, k_low=k_low, k_scale=k_scale, k_zero=k_zero,
                           v_codes=v_codes, v_low=v_low, v_scale=v_scale, v_zero=v_zero, ring_k=ring_k, ring_v=ring_v,
                           keep=keep)


@torch.library.custom_op("attnopt::kv_decode", mutates_args=())
def kv_decode(q: torch.Tensor, k_codes: torch.Tensor, k_low: torch.Tensor | None, k_scale: torch.Tensor,
              k_zero: torch.Tensor, v_codes: torch.Tensor, v_low: torch.Tensor | None, v_scale: torch.Tensor,
              v_zero: torch.Tensor, ring_k: torch.Tensor, ring_v: torch.Tensor, lengths: torch.Tensor,
              key_valid: torch.Tensor | None, quant: str, group: int, scale: float, draft: bool,
              impl: str = "auto", window: torch.Tensor | None = None, sinks: int = 0, sink_slots: int = 0,
              span_slots: int = 0) -> torch.Tensor:
    keep = (sink_slots, span_slots) if span_slots else None
    kv = _storage(quant, group, k_codes, k_low, k_scale, k_zero, v_codes, v_low, v_scale, v_zero, ring_k, ring_v,
                  keep)
    if window is not None:
        return decode_attention_ref(q, kv, lengths, key_valid, scale, draft, window=window, sinks=sinks)
    if switches.use_triton(q, "auto", impl):
        from ..codegen.decode.launch import kv_decode_triton

        return kv_decode_triton(q, kv, lengths, key_valid, scale, draft)
    return decode_attention_ref(q, kv, lengths, key_valid, scale, draft)


@kv_decode.register_fake
def _kv_decode_fake(q, k_codes, k_low, k_scale, k_zero, v_codes, v_low, v_scale, v_zero, ring_k, ring_v, lengths,
                    key_valid, quant, group, scale, draft, impl="auto", window=None, sinks=0, sink_slots=0,
                    span_slots=0):
    return torch.empty_like(q)


def decode_attention(q, kv, lengths, key_valid=None, scale=None, draft=False, impl="auto", window=None, sinks=0):
    """q [B, Hq, nq, D] against a QuantizedKV (storage.py) -> [B, Hq, nq, D] (see decode_ref);
    window [Hq] int tensor / sinks: per-head windows."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    keep = getattr(kv, "keep", None) or (0, 0)
    return kv_decode(q, kv.k_codes, kv.k_low, kv.k_scale, kv.k_zero, kv.v_codes, kv.v_low, kv.v_scale, kv.v_zero,
                     kv.ring_k, kv.ring_v, lengths, key_valid, kv.layout.quant, kv.layout.group, scale, draft, impl,
                     window, int(sinks), int(keep[0]), int(keep[1]))
