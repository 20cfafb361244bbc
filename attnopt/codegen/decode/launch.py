"""Host side of the decode kernels: how many splits, the fp32 partials, two launches."""

from __future__ import annotations

import math

import torch
import triton

from ...decode.decode_ref import LOG2E
from ...decode.kv_quant import KVLayout
from ...switches import interpreted
from .kernel import _kv_decode_combine, _kv_decode_split

FMT = {"int8": 0, "int4": 1, "int4+int8": 2}
TARGET_PROGRAMS = 512  # about four waves of an H100's 132 SMs
MAX_ROWS = 32  # query rows (query heads of a KV head x query tokens) per tile, as long as one token fits


def num_splits(batch_heads: int, slots: int, group: int, most: int = TARGET_PROGRAMS) -> int:
    """Splits of the quantized tokens per (batch, kv head): enough programs to fill the GPU, at
    most one per group (and at most `most`). From static shapes only, so a compiled step launches
    the same grid."""
    return max(1, min(slots // group, -(-TARGET_PROGRAMS // batch_heads), most))


def kv_decode_triton(q, kv, lengths, key_valid=None, scale=None, draft=False, splits=None):
    """decode_attention_ref's result from the Triton kernels (same arguments). Many query tokens
    (a chunked prefill) go a few per launch, so a tile keeps at most MAX_ROWS rows."""
    lay: KVLayout = kv.layout
    b, hq, nq, d = q.shape
    hkv = kv.ring_k.shape[1]
    gq = hq // hkv
    block_d = max(16, triton.next_power_of_2(d))  # channels past the head dim load as 0
    if splits is None:  # the interpreter runs programs one by one: two splits show the combine just as well
        splits = num_splits(b * hkv, kv.k_codes.shape[2], lay.group, 2 if interpreted() else TARGET_PROGRAMS)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    fmt = FMT[lay.quant] + (1 if draft and lay.has_low else 0)
    out = torch.empty_like(q)
    lengths = lengths.to(device=q.device, dtype=torch.int32).contiguous()
    valid = key_valid.to(device=q.device, dtype=torch.uint8).contiguous() if key_valid is not None else lengths
    k_low = kv.k_low if kv.k_low is not None else kv.k_codes
    v_low = kv.v_low if kv.v_low is not None else kv.v_codes
    for x in (kv.k_codes, kv.v_codes, kv.k_scale, kv.v_scale, kv.ring_k, kv.ring_v, q):
        assert x.stride(-1) == 1, "decode kernel: the last dim must be contiguous"
    assert kv.k_codes.stride() == kv.v_codes.stride() == k_low.stride() == v_low.stride()
    assert kv.k_scale.stride() == kv.k_zero.stride() and kv.v_scale.stride() == kv.v_zero.stride()
    assert kv.ring_k.stride() == kv.ring_v.stride()
    per_launch = max(1, MAX_ROWS // gq)
    for q0 in range(0, nq, per_launch):
        n = min(per_launch, nq - q0)
        qc, oc = q[:, :, q0:q0 + n], out[:, :, q0:q0 + n]
        block_m = max(16, triton.next_power_of_2(gq * n))
        parts = b * hkv * (splits + 1) * block_m
        op = torch.empty(parts * block_d, dtype=torch.float32, device=q.device)
        mp = torch.empty(parts, dtype=torch.float32, device=q.device)
        lp = torch.empty(parts, dtype=torch.float32, device=q.device)
        _kv_decode_split[(b * hkv, splits + 1)](
            qc, kv.k_codes, k_low, kv.k_scale, kv.k_zero, kv.v_codes, v_low, kv.v_scale, kv.v_zero,
            kv.ring_k, kv.ring_v, lengths, valid, op, mp, lp,
            *qc.stride()[:3], *kv.k_codes.stride()[:3], *kv.k_scale.stride()[:3], *kv.v_scale.stride()[:3],
            *kv.ring_k.stride()[:3], valid.stride(0) if key_valid is not None else 0, scale * LOG2E,
            nq - q0 - n, HKV=hkv, GQ=gq, NQ=n, D=d, G=lay.group, R=lay.residual, SPLITS=splits, FMT=fmt,
            HAS_VALID=key_valid is not None, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4)
        _kv_decode_combine[(b * hkv,)](op, mp, lp, oc, *oc.stride()[:3], HKV=hkv, GQ=gq, NQ=n, D=d,
                                       SPLITS=splits, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4)
    return out
