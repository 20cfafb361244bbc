"""The attention operands' token statistics, in one pass over K and V (the op's first launch).

They are reductions over every key, so they must finish before anything is quantized: K's
per-channel token mean (K smoothing), V's per-channel token mean and the scale that maps
max |V - mean| to the 8 / 4-bit range (FP8 / NVFP4 P.V, and the finite-fill rows' mean of V),
and, read on the way, which key rows hold a NaN or an Inf in K or in V (the rows they poison,
attention_ref.poisoned_rows). Every non-finite value counts as 0, as in attention_ref.

The largest |V - mean| is max(max V - mean, mean - min V): rounding is monotone, so this is
exactly attention_ref's amax(|V - mean|) and V is read once.

Long keys are split into chunks (grid: chunks x kv heads x batch): with few kv heads one program
per head would stream megabytes each on a handful of SMs. Each chunk stores its fp32 partials
(sum of K, sum / max / min of V per channel), takes a ticket from its (batch, kv head)'s counter
(linear/splitk.py's self-resetting counters), and the last one merges the partials in chunk
order 0, 1, ..., so the result is the same bits whichever program finishes last. Up to
`STATS_CHUNK` keys stay one program, exactly as without chunks.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..linear.splitk import reset_counter, take_ticket

STATS_CHUNK = 2048  # keys per program at least: up to this many, one program per (batch, kv head)
MAX_CHUNKS = 32  # beyond STATS_CHUNK * MAX_CHUNKS keys the chunks grow instead


@triton.jit
def _kv_stats_kernel(
    K, stride_kb, stride_kh, stride_kn, stride_kd,
    V, stride_vb, stride_vh, stride_vn, stride_vd,
    KMEAN, stride_kmb, stride_kmh,
    VMEAN, VSCALE, stride_vcb, stride_vch,
    BAD, stride_badb, stride_badh,
    PART, CNT,
    N, D, DV, v_qmax, chunk_len, chunks, GATE, GATE_ID,
    K_MEAN: tl.constexpr, V_MEAN: tl.constexpr, V_SCALE: tl.constexpr, CHUNKED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_GATE: tl.constexpr,
):
    """One program: `chunk_len` keys (all of them without CHUNKED) of one (batch, kv head),
    BLOCK_N rows at a time. KMEAN gets K's token mean (zeros without K_MEAN: the unsmoothed K's
    correction term reads it); BAD gets 1 for each key whose K or V row holds a non-finite value.
    CHUNKED: PART holds each chunk's record [sum K | sum V | max V | min V] (fp32, BLOCK_D +
    3 BLOCK_DV wide, per (batch, kv head, chunk)); CNT one ticket counter per (batch, kv head).
    HAS_GATE: a scheduled site's variant: every program exits at once unless GATE holds GATE_ID
    (no ticket is taken then, so the counters stay as they were)."""
    if HAS_GATE:
        if tl.load(GATE) != GATE_ID:
            return
    c = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    H = tl.num_programs(1)
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
    start = c * chunk_len
    end = tl.minimum(start + chunk_len, N)
    for n0 in range(start, end, BLOCK_N):
        rows = n0 + offs_n
        rmask = rows < end
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
    last = True
    if CHUNKED:
        # this chunk's record, then a ticket; the (batch, kv head)'s last chunk merges them all
        RECORD: tl.constexpr = BLOCK_D + 3 * BLOCK_DV
        first = PART + (b * H + h).to(tl.int64) * chunks * RECORD
        mine = first + c * RECORD
        if K_MEAN:
            tl.store(mine + cd, ksum)
        if V_MEAN:
            tl.store(mine + BLOCK_D + cdv, vsum)
            if V_SCALE:
                tl.store(mine + BLOCK_D + BLOCK_DV + cdv, vmax)
                tl.store(mine + BLOCK_D + 2 * BLOCK_DV + cdv, vmin)
        counter = CNT + b * H + h
        last = take_ticket(counter) == chunks - 1
        if last:
            ksum = tl.zeros([BLOCK_D], dtype=tl.float32)
            vsum = tl.zeros([BLOCK_DV], dtype=tl.float32)
            vmax = tl.full([BLOCK_DV], float("-inf"), dtype=tl.float32)
            vmin = tl.full([BLOCK_DV], float("inf"), dtype=tl.float32)
            for i in range(0, chunks):  # chunk order, whichever program merges (.cg: from L2)
                rec = first + i * RECORD
                if K_MEAN:
                    ksum += tl.load(rec + cd, cache_modifier=".cg")
                if V_MEAN:
                    vsum += tl.load(rec + BLOCK_D + cdv, cache_modifier=".cg")
                    if V_SCALE:
                        vmax = tl.maximum(vmax, tl.load(rec + BLOCK_D + BLOCK_DV + cdv, cache_modifier=".cg"))
                        vmin = tl.minimum(vmin, tl.load(rec + BLOCK_D + 2 * BLOCK_DV + cdv, cache_modifier=".cg"))
            reset_counter(counter)
    if last:
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


def stats_chunks(n: int, block_n: int) -> tuple[int, int]:
    """(chunks, keys per chunk) for `n` keys: STATS_CHUNK keys a chunk (a multiple of block_n),
    at most MAX_CHUNKS chunks; one chunk of all keys when n <= STATS_CHUNK."""
    if n <= STATS_CHUNK:
        return 1, max(n, 1)
    per_chunk = triton.cdiv(max(STATS_CHUNK, triton.cdiv(n, MAX_CHUNKS)), block_n) * block_n
    return triton.cdiv(n, per_chunk), per_chunk
