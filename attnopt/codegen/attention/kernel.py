"""Where the INT8 (and FP8) attention kernel is: one Triton kernel family, every variant, dense
and block-sparse.

`_attn_step` is the one online-softmax step all variants share (exp2 domain: Q carries
scale*log2(e)); `_attn_range` runs it over a range of key tiles (dense: key offsets; sparse: LUT
entries); `_attn_fwd` is the outer kernel: operand setup, two ranges (tiles wholly visible
without element masks, then the causal-diagonal / tail tiles with them), the epilogue.
Variants are constexpr switches, chosen per architecture in codegen/arch.py:

  QK_FMT   0: INT8 QK^T (int32 accumulate)   1: FP8 e4m3 QK^T   2: 16-bit QK^T (quant "none")
           3: NVFP4 QK^T (e2m1 packed along D, e4m3 scales per 16 channels; tl.dot_scaled)
  PV_FP8   1:     P scaled to [0, 448] and V per-channel scaled, both e4m3; each tile's product
                  lands in a fresh fp32 tile added to the fp32 output (two-level accumulation)
           2:     as 1, but each tile's product accumulates in fp16 (SageAttention2++: twice the
                  MMA rate on sm89 / sm120), then goes up to fp32 for the cross-tile sum; V is
                  scaled to [-V_ACC16_MAX, V_ACC16_MAX] so 448 * V_ACC16_MAX * BLOCK_N <= 65504
  PV_FP4   True:  P scaled by 448 * 6 per row, then NVFP4 with e4m3 scales per 16 keys; V per-
                  channel scaled, NVFP4 along keys; two-level accumulation as for FP8
           (neither: P and V in 16 bits, fp32 accumulate)
  USE_TMA  Q/K/V tiles through tensor descriptors (TMA on sm90+; 4-D, so a tile past the end of
           one head reads zeros, and an unpadded head dim is zero-filled too; not with NVFP4)
  SOFTCAP  logit soft-capping (Gemma 2, Grok): after QK^T, logits (log2 units, K smoothing's
           per-row shift added back first: tanh is not shift-invariant) become
           CAP2 * tanh(s / CAP2) with CAP2 = softcap * log2(e), before bias and masks
  ROW_DOT  QKM holds each Q row's dot with K's mean (quantize kernel): K smoothing shifted the
           row's logits by -qk_scale times it; SOFTCAP adds that back before tanh, else HAS_LSE
           adds sm_scale times it to the LSE in the epilogue
  SPARSE   visit only the kv-blocks a predictor kept (a LUT per q-block: full tiles, then those
           needing element masks); HAS_LAMBDA adds the second stage (skip exp and P.V of tiles
           whose row maxima trail the running maxima by more than lambda)

Masks follow attention_ref's semantics exactly: bias added, keep-mask / causal positions take
FILL (log2 units), keys past the end never count, rows with no kept key give 0 (FILL = -inf)
or the plain mean of V (finite FILL, as eager softmax over equal logits).

Non-finite inputs (attention_ref.poisoned_rows): operands arrive with them zeroed (quantize
kernels; the 16-bit Q / K / V are zeroed on load), a NaN / +inf bias counts as 0, BAD flags
each key whose K or V row held one (statistics kernel), BADQ each quantized query row (quantize
kernel; a 16-bit Q tile is checked here). A row that attends such a key unmasked (or a NaN /
+inf bias) is stored as NaN; every other row is computed as if the values were 0.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..casts import dot_8_16bit, dot_e4m3_acc16, store_cast, to_16bit, to_e4m3
from ..microscaling import fp4_dot, quantize_groups


@triton.jit
def _load_k(K_src, b, hk, start_n, stride_kn, kvalid, dvalid,
            QK_FMT: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr, USE_TMA: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """K^T tile [BLOCK_D, BLOCK_N] ([BLOCK_D / 2, BLOCK_N] packed for NVFP4). One exit (see _load_v)."""
    if USE_TMA:
        k = tl.reshape(K_src.load([b, hk, start_n, 0]), [BLOCK_N, BLOCK_D]).T
    elif QK_FMT == 2 and not EVEN_D:  # the caller's K, head dim not padded
        k = tl.load(K_src + start_n * stride_kn, mask=dvalid[:, None] & kvalid[None, :], other=0)
    elif MASKED:
        k = tl.load(K_src + start_n * stride_kn, mask=kvalid[None, :], other=0.0 if QK_FMT == 1 else 0)
    else:
        k = tl.load(K_src + start_n * stride_kn)
    return k


@triton.jit
def _load_v(V_src, b, hk, start_n, stride_vn, kvalid, dvvalid,
            PV_FP8: tl.constexpr, PV_FP4: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr, USE_TMA: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr):
    """V tile [BLOCK_N, BLOCK_DV] (e4m3 and NVFP4 V are stored transposed, keys contiguous; NVFP4
    codes come packed, [BLOCK_N / 2, BLOCK_DV]). One exit: compiled Triton wants every return of a
    function to have one type, constexpr branches included."""
    if USE_TMA:
        if PV_FP8:
            v = tl.reshape(V_src.load([b, hk, 0, start_n]), [BLOCK_DV, BLOCK_N]).T
        else:
            v = tl.reshape(V_src.load([b, hk, start_n, 0]), [BLOCK_N, BLOCK_DV])
    elif PV_FP4:  # storage is zero-padded past Nk
        v = tl.load(V_src + start_n // 2)
    elif PV_FP8:
        if MASKED:
            v = tl.load(V_src + start_n, mask=kvalid[:, None], other=0.0)
        else:
            v = tl.load(V_src + start_n)
    elif not EVEN_D:
        v = tl.load(V_src + start_n * stride_vn, mask=kvalid[:, None] & dvvalid[None, :], other=0.0)
    elif MASKED:
        v = tl.load(V_src + start_n * stride_vn, mask=kvalid[:, None], other=0.0)
    else:
        v = tl.load(V_src + start_n * stride_vn)
    if not (PV_FP8 or PV_FP4):
        # a non-finite value would turn 0 * v into NaN for rows that never see it: zero it here,
        # the op marks the rows that do depend on it afterwards
        v = tl.where((v == v) & (tl.abs(v.to(tl.float32)) != float("inf")), v, 0.0)
    return v


@triton.jit
def _tanh(x):
    """tanh through exp2 of -2|x| (never overflows; tl.math has no tanh on every backend)."""
    e = tl.math.exp2(-2.8853900817779268 * tl.abs(x))  # exp(-2|x|)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _attn_step(
    acc, l_i, m_i, bad_i, q, qs, qbar, qg, qkm, CAP2,
    K_src, KS_ptrs, K16_ptrs, KG_ptrs, kmean, V_src, VG_ptrs, BIAS_ptrs, KEEP_ptrs, BAD_ptrs,
    b, hk, start_n, offs_m, offs_n, mvalid, dvalid, dvvalid, Nk, causal_offset, FILL, lam,
    stride_kn, stride_k16n, stride_kgn, stride_vn, stride_biasn, stride_keepn,
    QK_FMT: tl.constexpr, PV_FP8: tl.constexpr, PV_FP4: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr, SMOOTH_Q: tl.constexpr, EVEN_D: tl.constexpr,
    USE_TMA: tl.constexpr, HAS_LAMBDA: tl.constexpr, K_GRAN: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PV_DTYPE: tl.constexpr, EMULATE: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    cols = start_n + offs_n
    kvalid = cols < Nk
    k = _load_k(K_src, b, hk, start_n, stride_kn, kvalid, dvalid, QK_FMT, MASKED, EVEN_D, USE_TMA,
                BLOCK_N, BLOCK_D)
    if QK_FMT == 2:  # the caller's K: a non-finite value counts as 0 (its rows are marked by `hit`)
        k = tl.where((k == k) & (tl.abs(k.to(tl.float32)) != float("inf")), k, 0.0)
    # hit: (row, key) pairs attended unmasked whose key / value row holds a non-finite value
    hit = tl.load(BAD_ptrs + cols, mask=kvalid, other=0)[None, :] != 0
    if QK_FMT == 0:
        s = tl.dot(q, k).to(tl.float32)
    elif QK_FMT == 3:  # K's group scales [BLOCK_N, BLOCK_D / 16]; masked keys get scale 0
        kg = tl.load(KG_ptrs + start_n * stride_kgn, mask=kvalid[:, None], other=0.0)
        s = fp4_dot(q, qg, k, kg, BLOCK_M, BLOCK_D, BLOCK_N, EMULATE)
    else:
        s = dot_8_16bit(q, k, EMULATE)
    if QK_FMT != 2:
        ks = tl.load(KS_ptrs + cols // K_GRAN, mask=kvalid, other=1.0)
        s = s * qs[:, None] * ks[None, :]
    else:
        s = s * qs  # 16-bit QK^T: qs is scale * log2(e)
    if SMOOTH_Q:  # qbar_b . (K - kmean), in fp32, added before softmax (it does not cancel)
        k16 = tl.load(K16_ptrs + start_n * stride_k16n, mask=dvalid[:, None] & kvalid[None, :],
                      other=0.0).to(tl.float32)
        k16 = tl.where(dvalid[:, None] & (k16 == k16) & (tl.abs(k16) != float("inf")), k16 - kmean[:, None], 0.0)
        s += tl.dot(qbar, k16, input_precision="ieee")
    if SOFTCAP:  # tanh is not shift-invariant: K smoothing's row shift goes back in first
        s = CAP2 * _tanh((s + qkm[:, None]) / CAP2)
    if HAS_BIAS:
        bias = tl.load(BIAS_ptrs + start_n * stride_biasn, mask=mvalid[:, None] & kvalid[None, :],
                       other=0.0).to(tl.float32)
        bias_bad = (bias != bias) | (bias == float("inf"))  # counts as 0; poisons its row if attended
        b2 = tl.where(bias_bad, 0.0, bias * 1.4426950408889634)
        b2 = tl.where(bias == float("-inf"), b2, tl.maximum(b2, -3.4028234663852886e38))
        s += b2
        hit = (hit | bias_bad) & (bias != float("-inf"))
    if HAS_KEEP:
        keep = tl.load(KEEP_ptrs + start_n * stride_keepn, mask=mvalid[:, None] & kvalid[None, :], other=1)
        s = tl.where(keep != 0, s, FILL)
        hit = hit & (keep != 0)
    if MASKED:
        if IS_CAUSAL:
            s = tl.where(cols[None, :] <= offs_m[:, None] + causal_offset, s, FILL)
            hit = hit & (cols[None, :] <= offs_m[:, None] + causal_offset)
        s = tl.where(kvalid[None, :], s, float("-inf"))
    bad_i = tl.maximum(bad_i, tl.max(hit.to(tl.int32), 1))
    m_tile = tl.max(s, 1)
    if HAS_LAMBDA:  # second stage: skip exp and P.V when every row's max trails its running max
        go = tl.max(tl.where(mvalid, m_tile - m_i, float("-inf")), 0) >= -lam  # rows past Nq never vote
    else:
        go = True
    if go:
        m_new = tl.maximum(m_i, m_tile)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = _load_v(V_src, b, hk, start_n, stride_vn, kvalid, dvvalid, PV_FP8, PV_FP4, MASKED, EVEN_D, USE_TMA,
                    BLOCK_N, BLOCK_DV)
        if PV_FP4:  # P~ = P * 448 * 6: a group holding the row max gets e4m3 scale 448
            pq, pg = quantize_groups(p * 2688.0, BLOCK_M, BLOCK_N, EMULATE)
            vg = tl.load(VG_ptrs + start_n // 16)
            acc += fp4_dot(pq, pg, v, vg, BLOCK_M, BLOCK_N, BLOCK_DV, EMULATE)  # fresh fp32 tile, then added
        elif PV_FP8 == 2:  # fp16 tile sum (no overflow: BLOCK_N <= 64, |V~| <= 2.25), then fp32
            tl.static_assert(BLOCK_N <= 64, "fp8_acc16 P.V: the fp16 tile sum bound needs BLOCK_N <= 64")
            acc += dot_e4m3_acc16(to_e4m3(p * 448.0, EMULATE), v, EMULATE)
        elif PV_FP8:
            acc += dot_8_16bit(to_e4m3(p * 448.0, EMULATE), v, EMULATE)  # fresh fp32 tile, then added
        else:
            acc = tl.dot(to_16bit(p, PV_DTYPE, EMULATE), to_16bit(v, PV_DTYPE, EMULATE), acc)
        m_i = m_new
    return acc, l_i, m_i, bad_i


@triton.jit
def _attn_range(
    acc, l_i, m_i, bad_i, q, qs, qbar, qg, qkm, CAP2,
    K_src, KS_ptrs, K16_ptrs, KG_ptrs, kmean, V_src, VG_ptrs, BIAS_ptrs, KEEP_ptrs, BAD_ptrs,
    b, hk, lo, hi, lut, offs_m, offs_n, mvalid, dvalid, dvvalid, Nk, causal_offset, FILL, lam,
    stride_kn, stride_k16n, stride_kgn, stride_vn, stride_biasn, stride_keepn,
    QK_FMT: tl.constexpr, PV_FP8: tl.constexpr, PV_FP4: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr, SMOOTH_Q: tl.constexpr, EVEN_D: tl.constexpr,
    USE_TMA: tl.constexpr, HAS_LAMBDA: tl.constexpr, K_GRAN: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PV_DTYPE: tl.constexpr, EMULATE: tl.constexpr,
    SOFTCAP: tl.constexpr, SPARSE: tl.constexpr,
):
    """`_attn_step` over a range of key tiles, all with or all without element masks (MASKED).
    Dense: [lo, hi) are key offsets, stepped by BLOCK_N. SPARSE: [lo, hi) index the q-block's LUT
    row (`lut`), whose entries are the kv-block numbers to visit."""
    for t in range(lo, hi, 1 if SPARSE else BLOCK_N):
        if SPARSE:
            start_n = tl.load(lut + t) * BLOCK_N
        else:
            start_n = t
        acc, l_i, m_i, bad_i = _attn_step(
            acc, l_i, m_i, bad_i, q, qs, qbar, qg, qkm, CAP2, K_src, KS_ptrs, K16_ptrs, KG_ptrs, kmean, V_src,
            VG_ptrs, BIAS_ptrs, KEEP_ptrs, BAD_ptrs,
            b, hk, start_n, offs_m, offs_n, mvalid, dvalid, dvvalid, Nk, causal_offset, FILL, lam,
            stride_kn, stride_k16n, stride_kgn, stride_vn, stride_biasn, stride_keepn,
            QK_FMT, PV_FP8, PV_FP4, BLOCK_M, MASKED, IS_CAUSAL, HAS_BIAS, HAS_KEEP, SMOOTH_Q, EVEN_D, USE_TMA, HAS_LAMBDA,
            K_GRAN, BLOCK_N, BLOCK_D, BLOCK_DV, PV_DTYPE, EMULATE, SOFTCAP)
    return acc, l_i, m_i, bad_i


@triton.jit
def _attn_fwd(
    Q, stride_qb, stride_qh, stride_qm, stride_qd,
    QS, stride_qsb, stride_qsh,
    QBAR, stride_qbb, stride_qbh, stride_qbn,
    K, stride_kb, stride_kh, stride_kn, stride_kd,
    KS, stride_ksb, stride_ksh,
    K16, stride_k16b, stride_k16h, stride_k16n, stride_k16d,
    KMEAN, stride_kmb, stride_kmh,
    V, stride_vb, stride_vh, stride_vn, stride_vd,
    QG, stride_qgb, stride_qgh, stride_qgn,
    KG, stride_kgb, stride_kgh, stride_kgn,
    VG, stride_vgb, stride_vgh, stride_vgd,
    VSC, VMEAN, VALL, stride_vcb, stride_vch,
    BAD, stride_badb, stride_badh, BADQ, stride_bqb, stride_bqh,
    BIAS, stride_biasb, stride_biash, stride_biasm, stride_biasn,
    KEEP, stride_keepb, stride_keeph, stride_keepm, stride_keepn,
    OUT, stride_ob, stride_oh, stride_om, stride_od,
    LSE, stride_lb, stride_lh,
    LUT, stride_lutb, stride_luth, stride_lutr,
    CNT, stride_cntb, stride_cnth, stride_cntr,
    LAM,
    GATE, GATE_ID,
    QKM, stride_qkmb, stride_qkmh, CAP2,
    NB, HQ, HKV, NPAD,
    Nq, Nk, DQK, DV, GROUP, causal_offset, FILL, qk_scale, sm_scale, N_BUCKET,
    QK_FMT: tl.constexpr, PV_FP8: tl.constexpr, PV_FP4: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_KEEP: tl.constexpr, FINITE_FILL: tl.constexpr, SMOOTH_Q: tl.constexpr, EVEN_D: tl.constexpr,
    HAS_LSE: tl.constexpr, USE_TMA: tl.constexpr, SPARSE: tl.constexpr, SPARSE_BQ: tl.constexpr,
    HAS_LAMBDA: tl.constexpr,
    Q_GRAN: tl.constexpr, K_GRAN: tl.constexpr, PV_DTYPE: tl.constexpr, EMULATE: tl.constexpr,
    SOFTCAP: tl.constexpr, ROW_DOT: tl.constexpr, HAS_GATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One program: BLOCK_M query rows of one (batch, query head) against all its keys.
    HAS_GATE: a scheduled site's variant, run only when GATE holds GATE_ID (else exit at once)."""
    if HAS_GATE:
        if tl.load(GATE) != GATE_ID:
            return
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    hk = h // GROUP  # GQA: query head h reads kv head h // (Hq / Hkv), nothing repeated
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mvalid = offs_m < Nq
    dvalid = offs_d < DQK
    dvvalid = offs_dv < DV

    # Q tile and its per-row scales, loaded once
    qg = 0.0  # NVFP4 group scales of Q
    if USE_TMA:
        q_desc = tl.make_tensor_descriptor(Q, shape=[NB, HQ, Nq, DQK if QK_FMT == 2 else BLOCK_D],
                                           strides=[stride_qb, stride_qh, stride_qm, 1],
                                           block_shape=[1, 1, BLOCK_M, BLOCK_D])
        q = tl.reshape(q_desc.load([b, h, m0, 0]), [BLOCK_M, BLOCK_D])
    elif QK_FMT == 3:  # packed codes [BLOCK_M, BLOCK_D / 2] and group scales [BLOCK_M, BLOCK_D / 16]
        offs_dp = tl.arange(0, BLOCK_D // 2)
        offs_g = tl.arange(0, BLOCK_D // 16)
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_dp[None, :],
                    mask=mvalid[:, None], other=0)
        qg = tl.load(QG + b * stride_qgb + h * stride_qgh + offs_m[:, None] * stride_qgn + offs_g[None, :],
                     mask=mvalid[:, None], other=0.0)
    else:
        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
        if QK_FMT == 2:  # the caller's Q
            q = tl.load(q_ptrs, mask=mvalid[:, None] & dvalid[None, :], other=0.0)
        else:
            q = tl.load(q_ptrs, mask=mvalid[:, None], other=0.0 if QK_FMT == 1 else 0)
    if QK_FMT == 2:  # the caller's Q: a non-finite value counts as 0 and marks its row
        q_fin = (q == q) & (tl.abs(q.to(tl.float32)) != float("inf"))
        bad_i = tl.max(tl.where(q_fin, 0, 1), 1)
        q = tl.where(q_fin, q, 0.0)
        qs = qk_scale
    else:  # the quantize kernel marked Q's rows
        bad_i = tl.load(BADQ + b * stride_bqb + h * stride_bqh + offs_m, mask=mvalid, other=0).to(tl.int32)
        qs = tl.load(QS + b * stride_qsb + h * stride_qsh + offs_m // Q_GRAN, mask=mvalid, other=1.0)
    qbar = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    kmean = tl.zeros([BLOCK_D], dtype=tl.float32)
    qkm = tl.zeros([BLOCK_M], dtype=tl.float32)
    if ROW_DOT:  # per row: q . mean(K) (fp32, from the quantize kernel); K smoothing took
        qkm = tl.load(QKM + b * stride_qkmb + h * stride_qkmh + offs_m, mask=mvalid, other=0.0)  # scale * it off
    if SMOOTH_Q:
        qbar = tl.load(QBAR + b * stride_qbb + h * stride_qbh + (offs_m // Q_GRAN)[:, None] * stride_qbn
                       + offs_d[None, :], mask=mvalid[:, None], other=0.0)
        kmean = tl.load(KMEAN + b * stride_kmb + hk * stride_kmh + offs_d, mask=dvalid, other=0.0)

    if USE_TMA:
        K_src = tl.make_tensor_descriptor(K, shape=[NB, HKV, Nk, DQK if QK_FMT == 2 else BLOCK_D],
                                          strides=[stride_kb, stride_kh, stride_kn, 1],
                                          block_shape=[1, 1, BLOCK_N, BLOCK_D])
        if PV_FP8:
            V_src = tl.make_tensor_descriptor(V, shape=[NB, HKV, BLOCK_DV, NPAD],
                                              strides=[stride_vb, stride_vh, stride_vd, 1],
                                              block_shape=[1, 1, BLOCK_DV, BLOCK_N])
        else:
            V_src = tl.make_tensor_descriptor(V, shape=[NB, HKV, Nk, DV], strides=[stride_vb, stride_vh, stride_vn, 1],
                                              block_shape=[1, 1, BLOCK_N, BLOCK_DV])
    else:  # K^T tile pointers [BLOCK_D, BLOCK_N]: head dim contiguous (K-major for the 8-bit dot)
        if QK_FMT == 3:  # packed along the head dim: [BLOCK_D / 2, BLOCK_N] bytes
            K_src = K + b * stride_kb + hk * stride_kh + offs_n[None, :] * stride_kn + tl.arange(0, BLOCK_D // 2)[:, None]
        else:
            K_src = K + b * stride_kb + hk * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
        if PV_FP4:  # transposed NVFP4 V: codes [BLOCK_DV, Npad / 2], keys packed and contiguous
            V_src = V + b * stride_vb + hk * stride_vh + offs_dv[None, :] * stride_vd + tl.arange(0, BLOCK_N // 2)[:, None]
        elif PV_FP8:  # transposed e4m3 V [BLOCK_DV, Npad]: keys contiguous
            V_src = V + b * stride_vb + hk * stride_vh + offs_dv[None, :] * stride_vd + offs_n[:, None]
        else:
            V_src = V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    KS_ptrs = KS + b * stride_ksb + hk * stride_ksh
    KG_ptrs = KG + b * stride_kgb + hk * stride_kgh + offs_n[:, None] * stride_kgn + tl.arange(0, BLOCK_D // 16)[None, :]
    VG_ptrs = VG + b * stride_vgb + hk * stride_vgh + offs_dv[:, None] * stride_vgd + tl.arange(0, BLOCK_N // 16)[None, :]
    K16_ptrs = K16 + b * stride_k16b + hk * stride_k16h + offs_n[None, :] * stride_k16n + offs_d[:, None] * stride_k16d
    BIAS_ptrs = BIAS + b * stride_biasb + h * stride_biash + offs_m[:, None] * stride_biasm + offs_n[None, :] * stride_biasn
    BAD_ptrs = BAD + b * stride_badb + hk * stride_badh
    KEEP_ptrs = KEEP + b * stride_keepb + h * stride_keeph + offs_m[:, None] * stride_keepm + offs_n[None, :] * stride_keepn

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # bad_i (set above from the query row; the steps add the keys attended): 1 = output row is NaN

    lam = 0.0
    if HAS_LAMBDA:
        lam = tl.load(LAM + h)
    # Two ranges of key tiles: first those needing no element masks, then those that do
    if SPARSE:  # only the kv-blocks the predictor kept: LUT entries [0, n_full) full, then masked ones
        row = m0 // SPARSE_BQ
        split = tl.load(CNT + b * stride_cntb + h * stride_cnth + row * stride_cntr)
        end = tl.load(CNT + b * stride_cntb + h * stride_cnth + row * stride_cntr + 1)
        lut = LUT + b * stride_lutb + h * stride_luth + row * stride_lutr
    else:
        # Key range: all keys, or (causal) up to the last row's diagonal. Tiles below `split`
        # are visible to every row and inside Nk: no element masks there.
        nk_full = (Nk // BLOCK_N) * BLOCK_N
        if IS_CAUSAL:
            end = tl.minimum(tl.maximum(m0 + BLOCK_M + causal_offset, 0), Nk)
            split = tl.minimum((tl.maximum(m0 + causal_offset + 1, 0) // BLOCK_N) * BLOCK_N, nk_full)
            split = tl.minimum(split, end)
        else:
            end = Nk
            split = nk_full
        lut = LUT  # not read
    qkm2 = qkm * qk_scale  # the shift in log2 units (attention_ref.softcap_row_shift)
    acc, l_i, m_i, bad_i = _attn_range(
        acc, l_i, m_i, bad_i, q, qs, qbar, qg, qkm2, CAP2, K_src, KS_ptrs, K16_ptrs, KG_ptrs, kmean, V_src,
        VG_ptrs, BIAS_ptrs, KEEP_ptrs, BAD_ptrs,
        b, hk, 0, split, lut, offs_m, offs_n, mvalid, dvalid, dvvalid, Nk, causal_offset, FILL, lam,
        stride_kn, stride_k16n, stride_kgn, stride_vn, stride_biasn, stride_keepn,
        QK_FMT, PV_FP8, PV_FP4, BLOCK_M, False, IS_CAUSAL, HAS_BIAS, HAS_KEEP, SMOOTH_Q, EVEN_D, USE_TMA, HAS_LAMBDA,
        K_GRAN, BLOCK_N, BLOCK_D, BLOCK_DV, PV_DTYPE, EMULATE, SOFTCAP, SPARSE)
    acc, l_i, m_i, bad_i = _attn_range(
        acc, l_i, m_i, bad_i, q, qs, qbar, qg, qkm2, CAP2, K_src, KS_ptrs, K16_ptrs, KG_ptrs, kmean, V_src,
        VG_ptrs, BIAS_ptrs, KEEP_ptrs, BAD_ptrs,
        b, hk, split, end, lut, offs_m, offs_n, mvalid, dvalid, dvvalid, Nk, causal_offset, FILL, lam,
        stride_kn, stride_k16n, stride_kgn, stride_vn, stride_biasn, stride_keepn,
        QK_FMT, PV_FP8, PV_FP4, BLOCK_M, True, IS_CAUSAL, HAS_BIAS, HAS_KEEP, SMOOTH_Q, EVEN_D, USE_TMA, HAS_LAMBDA,
        K_GRAN, BLOCK_N, BLOCK_D, BLOCK_DV, PV_DTYPE, EMULATE, SOFTCAP, SPARSE)

    # epilogue
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    if PV_FP8 or PV_FP4:
        vsc = tl.load(VSC + b * stride_vcb + hk * stride_vch + offs_dv, mask=dvvalid, other=0.0)
        vmean = tl.load(VMEAN + b * stride_vcb + hk * stride_vch + offs_dv, mask=dvvalid, other=0.0)
        o = o * (vsc / (2688.0 if PV_FP4 else 448.0))[None, :] + vmean[None, :]
    lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453  # natural log, before K-smoothing's shift
    if FINITE_FILL:  # no kept key: eager softmax over equal (finite) logits is uniform over all keys
        vall = tl.load(VALL + b * stride_vcb + hk * stride_vch + offs_dv, mask=dvvalid, other=0.0)
        no_key = m_i <= FILL
        o = tl.where(no_key[:, None], vall[None, :], o)
        lse = tl.where(no_key, FILL * 0.6931471805599453 + tl.math.log(Nk.to(tl.float32)), lse)
    else:
        no_key = m_i == float("-inf")
        o = tl.where(no_key[:, None], 0.0, o)
        lse = tl.where(no_key, float("-inf"), lse)
    if ROW_DOT and not SOFTCAP:  # undo K smoothing's shift of the row's logits (-inf stays -inf);
        lse = lse + qkm * sm_scale  # soft-capped logits had it added back before tanh
    o = tl.where(bad_i[:, None] != 0, float("nan"), o)
    lse = tl.where(bad_i != 0, float("nan"), lse)
    out_ptrs = OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
    tl.store(out_ptrs, store_cast(o, OUT.dtype.element_ty, EMULATE), mask=mvalid[:, None] & dvvalid[None, :])
    if HAS_LSE:
        tl.store(LSE + b * stride_lb + h * stride_lh + offs_m, lse, mask=mvalid)
