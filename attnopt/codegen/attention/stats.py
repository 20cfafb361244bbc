"""The attention operands' token statistics, in one pass over K and V (the op's first launch).

They are reductions over every key, so they must finish before anything is quantized: K's
per-channel token mean (K smoothing), V's per-channel token mean and the scale that maps
max |V - mean| to the 8 / 4-bit range (FP8 / NVFP4 P.V, and the finite-fill rows' mean of V),
and, read on the way, which key rows hold a NaN or an Inf in K or in V (the rows they poison,
attention_ref.poisoned_rows). Every non-finite value counts as 0, as in attention_ref.

The largest |V - mean| is max(max V - mean, mean - min V): rounding is monotone, so this is
exactly attention_ref's amax(|V - mean|) and V is read once.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _kv_stats_kernel(
    K, stride_kb, stride_kh, stride_kn, stride_kd,
    V, stride_vb, stride_vh, stride_vn, stride_vd,
    KMEAN, stride_kmb, stride_kmh,
    VMEAN, VSCALE, stride_vcb, stride_vch,
    BAD, stride_badb, stride_badh,
    N, D, DV, v_qmax,
    K_MEAN: tl.constexpr, V_MEAN: tl.constexpr, V_SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One program: every key of one (batch, kv head), BLOCK_N rows at a time. KMEAN gets K's
    token mean (zeros without K_MEAN: the unsmoothed K's correction term reads it); BAD gets 1
    for each key whose K or V row holds a non-finite value."""
    h = tl.program_id(0)
    b = tl.program_id(1)
    offs_n = tl.arange(0, BLOCK_N)
    cd = tl.arange(0, BLOCK_D)
    cdv = tl.arange(0, BLOCK_DV)
    dmask = cd < D
    dvmask = cdv < DV
    K_ptrs = K + b * stride_kb + h * stride_kh + cd[None, :] * stride_kd
    V_ptrs = V + b * stride_vb + h * stride_vh + cdv[None, :] * stride_vd
    BAD_ptrs = BAD + b * stride_badb + h * stride_badh
    ksum = tl.zeros([BLOCK_D], dtype=tl.float32)
    vsum = tl.zeros([BLOCK_DV], dtype=tl.float32)
    vmax = tl.full([BLOCK_DV], float("-inf"), dtype=tl.float32)
    vmin = tl.full([BLOCK_DV], float("inf"), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + offs_n
        rmask = rows < N
        k = tl.load(K_ptrs + rows[:, None] * stride_kn, mask=rmask[:, None] & dmask[None, :], other=0.0)
        k = k.to(tl.float32)
        kfin = (k == k) & (tl.abs(k) != float("inf"))
        v = tl.load(V_ptrs + rows[:, None] * stride_vn, mask=rmask[:, None] & dvmask[None, :], other=0.0)
        v = v.to(tl.float32)
        vfin = (v == v) & (tl.abs(v) != float("inf"))
        bad = tl.maximum(tl.max(tl.where(kfin, 0, 1), axis=1), tl.max(tl.where(vfin, 0, 1), axis=1))
        tl.store(BAD_ptrs + rows, bad.to(tl.uint8), mask=rmask)
        if K_MEAN:
            ksum += tl.sum(tl.where(kfin, k, 0.0), axis=0)
        if V_MEAN:
            v = tl.where(vfin, v, 0.0)
            vsum += tl.sum(v, axis=0)
            if V_SCALE:
                vmax = tl.maximum(vmax, tl.max(tl.where(rmask[:, None], v, float("-inf")), axis=0))
                vmin = tl.minimum(vmin, tl.min(tl.where(rmask[:, None], v, float("inf")), axis=0))
    count = tl.maximum(N, 1).to(tl.float32)
    tl.store(KMEAN + b * stride_kmb + h * stride_kmh + cd, ksum / count, mask=dmask)
    if V_MEAN:
        vmean = vsum / count
        tl.store(VMEAN + b * stride_vcb + h * stride_vch + cdv, vmean, mask=dvmask)
        if V_SCALE:
            amax = tl.maximum(vmax - vmean, vmean - vmin)
            tl.store(VSCALE + b * stride_vcb + h * stride_vch + cdv, tl.where(amax > 0, amax / v_qmax, 1.0),
                     mask=dvmask)


def stats_block_n(block_d: int, block_dv: int) -> int:
    """Rows per step: about 8K fp32 values of K and V in flight per program."""
    return max(8, min(64, 8192 // (block_d + block_dv)))
