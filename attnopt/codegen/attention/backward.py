"""Triton kernels of the attention backward (FlashAttention-2 structure), both modes of
ops/attention_bwd_ref.py, which they equal up to fp32 summation order:

  _bwd_preprocess   delta = rowsum(dO * O) per query row
  _attn_bwd         DQ_PASS False: one program per (key tile, kv head, batch) walks the query
                    tiles of every query head of its GQA group and writes dK, dV;
                    DQ_PASS True: one program per (query tile, query head, batch) walks the key
                    tiles and writes dQ. No atomics: every gradient element is written by one
                    program, in a fixed order, so results are deterministic.

`_bwd_tile` is the step both passes share: recompute the logits of one BLOCK_M x BLOCK_N tile
(INT8 Q K^T with K smoothing, or 16-bit), the masks, P from the saved LSE, dP = dO V^T in 16
bits and dS = P * (dP - delta). `_bwd_range` runs it over a range of tiles and accumulates the
pass's gradients; with SPARSE its range indexes a LUT row of tile numbers instead: block-sparse
training. The dQ pass takes the sparse forward's LUT as it is (q-block of SPARSE_BQ rows ->
kv-blocks of BLOCK_N keys), the dK/dV pass its transpose (kv-block -> 64-row query tiles,
`transpose_lut`). Skipped blocks contribute nothing (as the sparse forward: -inf logits).

Tiles are BWD_BM x BWD_BN (64 x 64): the INT8 scale blocks of P, dO, dS and Q along the
queries and of dS along the keys are these tiles (attention_bwd_ref), and the key tile is the
forward's K_GRAN, so one K scale covers it.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ...ops.attention_bwd_ref import BWD_BM, BWD_BN
from ...ops.attention_ref import K_GRAN, LOG2E, Q_GRAN, _log2_logit
from ...ops.sparse_ref import BK as SPARSE_BK
from ...ops.sparse_ref import BQ as SPARSE_BQ
from ...ops.sparse_ref import lut_to_block_mask
from .. import casts
from ..casts import dot_8_16bit, store_cast, to_16bit
from .kernel import _tanh
from .quantize import kv_stats, padded_head_dim, quantize_qkv

assert BWD_BN == K_GRAN, "the dQ pass reads one K scale per key tile"
assert BWD_BN == SPARSE_BK and SPARSE_BQ % BWD_BM == 0, "sparse blocks are whole backward tiles"


@triton.jit
def _bwd_preprocess(
    O, stride_ob, stride_oh, stride_om, stride_od,
    DO, stride_dob, stride_doh, stride_dom, stride_dod,
    DELTA, stride_deb, stride_deh,
    Nq, DV,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """delta[b, h, i] = sum_d dO[i, d] * O[i, d] in fp32 (O as the forward stored it)."""
    m0 = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2)
    rows = m0 + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_DV)
    mask = (rows < Nq)[:, None] & (cols < DV)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + cols[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom + cols[None, :] * stride_dod,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + b * stride_deb + h * stride_deh + rows, tl.sum(o * do, 1), mask=rows < Nq)


@triton.jit
def _int8(x, amax):
    """x -> (int8 codes, scale) on the grid amax / 127 (amax broadcasts against x); rounds half
    away from zero as attention_ref.quantize_rows; an all-zero group gets scale 1."""
    s = tl.where(amax > 0, amax / 127.0, 1.0)
    y = x / s
    y = tl.where(y >= 0, y + 0.5, y - 0.5)
    y = tl.minimum(tl.maximum(y, -127.0), 127.0)
    return y.to(tl.int8), s


@triton.jit
def _load_rows(X, b, h, rows, cols, Nrows, NCOLS, stride_b, stride_h, stride_n, stride_d):
    """A [rows, cols] tile of a [B, H, N, D] tensor, zeros outside, in its own dtype."""
    mask = (rows < Nrows)[:, None] & (cols < NCOLS)[None, :]
    return tl.load(X + b * stride_b + h * stride_h + rows[:, None] * stride_n + cols[None, :] * stride_d,
                   mask=mask, other=0.0)


@triton.jit
def _q_side(
    Q, stride_qb, stride_qh, stride_qm, stride_qd,
    QQ, stride_qqb, stride_qqh, stride_qqm,
    QS, stride_qsb, stride_qsh,
    DO, stride_dob, stride_doh, stride_dom, stride_dod,
    LSE, stride_lb, stride_lh,
    DELTA, stride_deb, stride_deh,
    b, h, rows, offs_d, offs_dv, kmean, Nq, DQK, DV, qk_scale,
    INT8: tl.constexpr, Q_GRAN: tl.constexpr, PV_DTYPE: tl.constexpr, EMULATE: tl.constexpr,
):
    """One query tile's operands: Q for the logits (INT8 codes, or 16-bit), its row scales (the
    16-bit path: qk_scale), K smoothing's row shift q . mean(K) (log2 units), LSE (log2 units),
    delta, dO (fp32) and Q itself in fp32 (dK's operand)."""
    rvalid = rows < Nq
    q = _load_rows(Q, b, h, rows, offs_d, Nq, DQK, stride_qb, stride_qh, stride_qm, stride_qd).to(tl.float32)
    if INT8:
        qs_op = tl.load(QQ + b * stride_qqb + h * stride_qqh + rows[:, None] * stride_qqm + offs_d[None, :],
                        mask=rvalid[:, None], other=0)
        qs = tl.load(QS + b * stride_qsb + h * stride_qsh + rows // Q_GRAN, mask=rvalid, other=1.0)
    else:
        qs_op = to_16bit(q, PV_DTYPE, EMULATE)
        qs = rows * 0.0 + qk_scale
    qkm2 = tl.sum(q * kmean[None, :], 1) * qk_scale
    l2 = tl.load(LSE + b * stride_lb + h * stride_lh + rows, mask=rvalid, other=float("-inf")) * 1.4426950408889634
    delta = tl.load(DELTA + b * stride_deb + h * stride_deh + rows, mask=rvalid, other=0.0)
    do = _load_rows(DO, b, h, rows, offs_dv, Nq, DV, stride_dob, stride_doh, stride_dom, stride_dod).to(tl.float32)
    return q, qs_op, qs, qkm2, l2, delta, do


@triton.jit
def _k_side(
    K, stride_kb, stride_kh, stride_kn, stride_kd,
    KQ, stride_kqb, stride_kqh, stride_kqn,
    KS, stride_ksb, stride_ksh,
    KMEAN, stride_kmb, stride_kmh,
    V, stride_vb, stride_vh, stride_vn, stride_vd,
    b, hk, cols, offs_d, offs_dv, Nk, DQK, DV,
    INT8: tl.constexpr, K_GRAN: tl.constexpr, PV_DTYPE: tl.constexpr, EMULATE: tl.constexpr,
):
    """One key tile's operands: K for the logits and for dQ (INT8 smoothed codes, or 16-bit: the
    caller's K for the logits, K minus its mean for dQ), the per-key K scale, V in 16 bits."""
    cvalid = cols < Nk
    if INT8:
        k_op = tl.load(KQ + b * stride_kqb + hk * stride_kqh + cols[:, None] * stride_kqn + offs_d[None, :],
                       mask=cvalid[:, None], other=0)
        k_dq = k_op
        ks = tl.load(KS + b * stride_ksb + hk * stride_ksh + cols // K_GRAN, mask=cvalid, other=0.0)
    else:
        kf = _load_rows(K, b, hk, cols, offs_d, Nk, DQK, stride_kb, stride_kh, stride_kn, stride_kd).to(tl.float32)
        k_op = to_16bit(kf, PV_DTYPE, EMULATE)
        kmean = tl.load(KMEAN + b * stride_kmb + hk * stride_kmh + offs_d, mask=offs_d < DQK, other=0.0)
        k_dq = to_16bit(tl.where(cvalid[:, None], kf - kmean[None, :], 0.0), PV_DTYPE, EMULATE)
        ks = cols * 0.0 + 1.0
    v = to_16bit(_load_rows(V, b, hk, cols, offs_dv, Nk, DV, stride_vb, stride_vh, stride_vn, stride_vd),
                 PV_DTYPE, EMULATE)
    return k_op, k_dq, ks, v


@triton.jit
def _bwd_tile(
    qs_op, qs, qkm2, l2, delta, do, k_op, ks, v,
    BIAS, stride_biasb, stride_biash, stride_biasm, stride_biasn,
    KEEP, stride_keepb, stride_keeph, stride_keepm, stride_keepn,
    b, h, rows, cols, Nq, Nk, causal_offset, FILL, CAP2,
    INT8: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr,
    SHIFT: tl.constexpr, FWD_SHIFT: tl.constexpr, SOFTCAP: tl.constexpr, PV_DTYPE: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """P and dS (natural-log units, fp32) of one [BLOCK_M, BLOCK_N] tile: the logits (log2
    units) recomputed as the forward holds them, soft-capped, biased and masked as
    attention_ref's, P = exp2(logits - lse), dP = dO V^T in 16 bits, dS = P * (dP - delta) with
    no gradient at masked positions (and the tanh's derivative under soft-capping)."""
    valid = (rows < Nq)[:, None] & (cols < Nk)[None, :]
    if INT8:
        s = tl.dot(qs_op, tl.trans(k_op)).to(tl.float32) * qs[:, None] * ks[None, :]
    else:
        s = dot_8_16bit(qs_op, tl.trans(k_op), EMULATE) * qs[:, None]
    if SHIFT:  # K smoothing took q . mean(K) off each row's logits; the LSE includes it
        s = s + qkm2[:, None]
    cap_grad = 1.0
    if SOFTCAP:
        s = CAP2 * _tanh(s / CAP2)
        cap_grad = 1.0 - (s / CAP2) * (s / CAP2)
    if HAS_BIAS:
        bias = tl.load(BIAS + b * stride_biasb + h * stride_biash + rows[:, None] * stride_biasm
                       + cols[None, :] * stride_biasn, mask=valid, other=0.0).to(tl.float32)
        b2 = tl.where((bias != bias) | (bias == float("inf")), 0.0, bias * 1.4426950408889634)
        b2 = tl.where(bias == float("-inf"), b2, tl.maximum(b2, -3.4028234663852886e38))
        s += b2
    keep = valid
    if IS_CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None] + causal_offset)
    if HAS_KEEP:
        km = tl.load(KEEP + b * stride_keepb + h * stride_keeph + rows[:, None] * stride_keepm
                     + cols[None, :] * stride_keepn, mask=valid, other=1)
        keep = keep & (km != 0)
    if FWD_SHIFT:  # masked logits as the forward held them (its LSE carries the shift)
        s = tl.where(keep, s, FILL + qkm2[:, None])
    else:
        s = tl.where(keep, s, FILL)
    live = valid & (l2 != float("-inf"))[:, None]
    p = tl.where(live, tl.math.exp2(s - tl.where(l2 == float("-inf"), 0.0, l2)[:, None]), 0.0)
    dp = dot_8_16bit(to_16bit(do, PV_DTYPE, EMULATE), tl.trans(v), EMULATE)
    ds = tl.where(keep, p * (dp - delta[:, None]), 0.0) * cap_grad
    return p, ds


@triton.jit
def _bwd_range(
    acc_a, acc_b, lo, hi, lut, fixed,
    Q, stride_qb, stride_qh, stride_qm, stride_qd,
    QQ, stride_qqb, stride_qqh, stride_qqm,
    QS, stride_qsb, stride_qsh,
    K, stride_kb, stride_kh, stride_kn, stride_kd,
    KQ, stride_kqb, stride_kqh, stride_kqn,
    KS, stride_ksb, stride_ksh,
    KMEAN, stride_kmb, stride_kmh,
    V, stride_vb, stride_vh, stride_vn, stride_vd,
    DO, stride_dob, stride_doh, stride_dom, stride_dod,
    LSE, stride_lb, stride_lh,
    DELTA, stride_deb, stride_deh,
    BIAS, stride_biasb, stride_biash, stride_biasm, stride_biasn,
    KEEP, stride_keepb, stride_keeph, stride_keepm, stride_keepn,
    b, h, hk, Nq, Nk, DQK, DV, causal_offset, FILL, qk_scale, CAP2,
    DQ_PASS: tl.constexpr, SPARSE: tl.constexpr,
    INT8: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr,
    SHIFT: tl.constexpr, FWD_SHIFT: tl.constexpr, SOFTCAP: tl.constexpr, DQ_KMEAN: tl.constexpr,
    Q_GRAN: tl.constexpr, K_GRAN: tl.constexpr, PV_DTYPE: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """`_bwd_tile` over tiles [lo, hi) of the moving side, accumulating the pass's gradients.

    DQ_PASS: `fixed` is the query tile's first row (its operands loaded once); the tiles are key
    offsets (step BLOCK_N) and acc_a is dQ (acc_b unused). Else `fixed` is the key tile's first
    key; the tiles are query offsets (step BLOCK_M) and acc_a, acc_b are dK, dV. SPARSE: [lo, hi) index `lut`, whose
    entries are tile numbers (the block-sparse hook; no launcher passes one yet)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kmean = tl.load(KMEAN + b * stride_kmb + hk * stride_kmh + offs_d, mask=offs_d < DQK, other=0.0)
    step = 1 if SPARSE else (BLOCK_N if DQ_PASS else BLOCK_M)
    if DQ_PASS:
        rows = fixed + offs_m
        q, qs_op, qs, qkm2, l2, delta, do = _q_side(
            Q, stride_qb, stride_qh, stride_qm, stride_qd, QQ, stride_qqb, stride_qqh, stride_qqm,
            QS, stride_qsb, stride_qsh, DO, stride_dob, stride_doh, stride_dom,
            stride_dod, LSE, stride_lb, stride_lh, DELTA, stride_deb, stride_deh,
            b, h, rows, offs_d, offs_dv, kmean, Nq, DQK, DV, qk_scale, INT8, Q_GRAN, PV_DTYPE, EMULATE)
    else:
        cols = fixed + offs_n
        k_op, k_dq, ks, v = _k_side(
            K, stride_kb, stride_kh, stride_kn, stride_kd, KQ, stride_kqb, stride_kqh, stride_kqn,
            KS, stride_ksb, stride_ksh, KMEAN, stride_kmb, stride_kmh, V, stride_vb, stride_vh, stride_vn, stride_vd,
            b, hk, cols, offs_d, offs_dv, Nk, DQK, DV, INT8, K_GRAN, PV_DTYPE, EMULATE)
    for t in range(lo, hi, step):
        if SPARSE:
            start = tl.load(lut + t) * (BLOCK_N if DQ_PASS else BLOCK_M)
        else:
            start = t
        if DQ_PASS:
            cols = start + offs_n
            k_op, k_dq, ks, v = _k_side(
                K, stride_kb, stride_kh, stride_kn, stride_kd, KQ, stride_kqb, stride_kqh, stride_kqn,
                KS, stride_ksb, stride_ksh, KMEAN, stride_kmb, stride_kmh, V, stride_vb, stride_vh, stride_vn,
                stride_vd, b, hk, cols, offs_d, offs_dv, Nk, DQK, DV, INT8, K_GRAN, PV_DTYPE, EMULATE)
        else:
            rows = start + offs_m
            q, qs_op, qs, qkm2, l2, delta, do = _q_side(
                Q, stride_qb, stride_qh, stride_qm, stride_qd, QQ, stride_qqb, stride_qqh, stride_qqm,
                QS, stride_qsb, stride_qsh, DO, stride_dob, stride_doh, stride_dom,
                stride_dod, LSE, stride_lb, stride_lh, DELTA, stride_deb, stride_deh,
                b, h, rows, offs_d, offs_dv, kmean, Nq, DQK, DV, qk_scale, INT8, Q_GRAN, PV_DTYPE, EMULATE)
        p, ds = _bwd_tile(
            qs_op, qs, qkm2, l2, delta, do, k_op, ks, v,
            BIAS, stride_biasb, stride_biash, stride_biasm, stride_biasn,
            KEEP, stride_keepb, stride_keeph, stride_keepm, stride_keepn,
            b, h, rows, cols, Nq, Nk, causal_offset, FILL, CAP2,
            INT8, IS_CAUSAL, HAS_BIAS, HAS_KEEP, SHIFT, FWD_SHIFT, SOFTCAP, PV_DTYPE, EMULATE)
        if DQ_PASS:  # dQ += dS K (K smoothed: rowsum(dS) is 0, so K's mean adds nothing ...
            if DQ_KMEAN:  # ... but under soft-capping; acc_b [BLOCK_M, 1] sums dS for it
                acc_b += tl.sum(ds, 1)[:, None]
            if INT8:  # dS per (row, key tile); K's one scale per key tile
                dsq, dss = _int8(ds, tl.max(tl.abs(ds), 1)[:, None])
                acc_a += tl.dot(dsq, k_dq).to(tl.float32) * dss * tl.max(ks, 0)
            else:
                acc_a += dot_8_16bit(to_16bit(ds, PV_DTYPE, EMULATE), k_dq, EMULATE)
        else:  # dV += P^T dO, dK += dS^T Q
            if INT8:  # P and dS per (query tile, key); dO and Q per query tile
                pq, ps = _int8(p, tl.max(p, 0)[None, :])
                doq, dos = _int8(do, tl.max(tl.max(tl.abs(do), 1), 0))
                acc_b += tl.dot(tl.trans(pq), doq).to(tl.float32) * tl.trans(ps) * dos
                dsq, dss = _int8(ds, tl.max(tl.abs(ds), 0)[None, :])
                qq, qsc = _int8(q, tl.max(tl.max(tl.abs(q), 1), 0))
                acc_a += tl.dot(tl.trans(dsq), qq).to(tl.float32) * tl.trans(dss) * qsc
            else:
                acc_b += dot_8_16bit(tl.trans(to_16bit(p, PV_DTYPE, EMULATE)), to_16bit(do, PV_DTYPE, EMULATE), EMULATE)
                acc_a += dot_8_16bit(tl.trans(to_16bit(ds, PV_DTYPE, EMULATE)), to_16bit(q, PV_DTYPE, EMULATE), EMULATE)
    return acc_a, acc_b


@triton.jit
def _attn_bwd(
    Q, stride_qb, stride_qh, stride_qm, stride_qd,
    QQ, stride_qqb, stride_qqh, stride_qqm,
    QS, stride_qsb, stride_qsh,
    K, stride_kb, stride_kh, stride_kn, stride_kd,
    KQ, stride_kqb, stride_kqh, stride_kqn,
    KS, stride_ksb, stride_ksh,
    KMEAN, stride_kmb, stride_kmh,
    V, stride_vb, stride_vh, stride_vn, stride_vd,
    DO, stride_dob, stride_doh, stride_dom, stride_dod,
    LSE, stride_lb, stride_lh,
    DELTA, stride_deb, stride_deh,
    BIAS, stride_biasb, stride_biash, stride_biasm, stride_biasn,
    KEEP, stride_keepb, stride_keeph, stride_keepm, stride_keepn,
    DA, stride_dab, stride_dah, stride_dan, stride_dad,
    DB, stride_dbb, stride_dbh, stride_dbn, stride_dbd,
    LUT, stride_lutb, stride_luth, stride_lutr,
    CNT, stride_cntb, stride_cnth, stride_cntr,
    Nq, Nk, DQK, DV, GROUP, causal_offset, FILL, qk_scale, sm_scale, CAP2,
    DQ_PASS: tl.constexpr, SPARSE: tl.constexpr, SPARSE_BQ: tl.constexpr, INT8: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_KEEP: tl.constexpr, SHIFT: tl.constexpr, FWD_SHIFT: tl.constexpr, SOFTCAP: tl.constexpr,
    DQ_KMEAN: tl.constexpr, FINITE_FILL: tl.constexpr, Q_GRAN: tl.constexpr, K_GRAN: tl.constexpr, PV_DTYPE: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """DQ_PASS: program (query tile, query head, batch) -> DA = dQ. Else program (key tile, kv
    head, batch) -> DA = dK, DB = dV, summed over the GQA group's query heads. SPARSE: the tiles
    visited are listed in LUT rows (entries [0, CNT[..., 1])): the dQ pass reads row
    `m0 // SPARSE_BQ` of the sparse forward's LUT (kv-block numbers), the dK/dV pass the row of
    its key tile in the transposed LUT (query-tile numbers), per query head."""
    pid = tl.program_id(0)
    hh = tl.program_id(1)
    b = tl.program_id(2)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    if DQ_PASS:
        m0 = pid * BLOCK_M
        h = hh
        hk = hh // GROUP
        if SPARSE:
            row = m0 // SPARSE_BQ
            lut = LUT + b * stride_lutb + h * stride_luth + row * stride_lutr
            hi = tl.load(CNT + b * stride_cntb + h * stride_cnth + row * stride_cntr + 1)
        else:
            lut = LUT  # not read
            hi = Nk
            if IS_CAUSAL:  # keys past the tile's last row's diagonal are masked for every row
                hi = tl.minimum(tl.maximum(m0 + BLOCK_M + causal_offset, 0), Nk)
        acc, rowsum_ds = _bwd_range(
            tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), tl.zeros([BLOCK_M, 1], dtype=tl.float32), 0, hi, lut, m0,
            Q, stride_qb, stride_qh, stride_qm, stride_qd, QQ, stride_qqb, stride_qqh, stride_qqm,
            QS, stride_qsb, stride_qsh, K, stride_kb, stride_kh, stride_kn, stride_kd, KQ, stride_kqb, stride_kqh, stride_kqn,
            KS, stride_ksb, stride_ksh, KMEAN, stride_kmb, stride_kmh,
            V, stride_vb, stride_vh, stride_vn, stride_vd, DO, stride_dob, stride_doh, stride_dom, stride_dod,
            LSE, stride_lb, stride_lh, DELTA, stride_deb, stride_deh,
            BIAS, stride_biasb, stride_biash, stride_biasm, stride_biasn,
            KEEP, stride_keepb, stride_keeph, stride_keepm, stride_keepn,
            b, h, hk, Nq, Nk, DQK, DV, causal_offset, FILL, qk_scale, CAP2,
            True, SPARSE, INT8, IS_CAUSAL, HAS_BIAS, HAS_KEEP, SHIFT, FWD_SHIFT, SOFTCAP, DQ_KMEAN, Q_GRAN, K_GRAN, PV_DTYPE,
            EMULATE, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV)
        if DQ_KMEAN:
            kmean = tl.load(KMEAN + b * stride_kmb + hk * stride_kmh + offs_d, mask=offs_d < DQK, other=0.0)
            acc += rowsum_ds * kmean[None, :]
        rows = m0 + tl.arange(0, BLOCK_M)
        tl.store(DA + b * stride_dab + h * stride_dah + rows[:, None] * stride_dan + offs_d[None, :] * stride_dad,
                 store_cast(acc * sm_scale, DA.dtype.element_ty, EMULATE),
                 mask=(rows < Nq)[:, None] & (offs_d < DQK)[None, :])
    else:
        n0 = pid * BLOCK_N
        hk = hh
        lo = 0
        # query tiles wholly above this key tile's first diagonal see none of it, unless a finite
        # fill makes a row with no kept key attend uniformly to every key (its dV is dO / Nk)
        if IS_CAUSAL and not FINITE_FILL:
            lo = (tl.maximum(n0 - causal_offset, 0) // BLOCK_M) * BLOCK_M
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
        for g in range(0, GROUP):  # GQA: the group's query heads, K and V read in place
            h = hk * GROUP + g
            if SPARSE:
                lut = LUT + b * stride_lutb + h * stride_luth + pid * stride_lutr
                lo_g = 0
                hi_g = tl.load(CNT + b * stride_cntb + h * stride_cnth + pid * stride_cntr + 1)
            else:
                lut = LUT  # not read
                lo_g = lo
                hi_g = Nq
            dk, dv = _bwd_range(
                dk, dv, lo_g, hi_g, lut, n0,
                Q, stride_qb, stride_qh, stride_qm, stride_qd, QQ, stride_qqb, stride_qqh, stride_qqm,
                QS, stride_qsb, stride_qsh, K, stride_kb, stride_kh, stride_kn, stride_kd, KQ, stride_kqb, stride_kqh, stride_kqn,
                KS, stride_ksb, stride_ksh, KMEAN, stride_kmb, stride_kmh,
                V, stride_vb, stride_vh, stride_vn, stride_vd, DO, stride_dob, stride_doh, stride_dom, stride_dod,
                LSE, stride_lb, stride_lh, DELTA, stride_deb, stride_deh,
                BIAS, stride_biasb, stride_biash, stride_biasm, stride_biasn,
                KEEP, stride_keepb, stride_keeph, stride_keepm, stride_keepn,
                b, h, hk, Nq, Nk, DQK, DV, causal_offset, FILL, qk_scale, CAP2,
                False, SPARSE, INT8, IS_CAUSAL, HAS_BIAS, HAS_KEEP, SHIFT, FWD_SHIFT, SOFTCAP, DQ_KMEAN, Q_GRAN, K_GRAN,
                PV_DTYPE, EMULATE, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV)
        cols = n0 + tl.arange(0, BLOCK_N)
        cvalid = cols < Nk
        tl.store(DA + b * stride_dab + hk * stride_dah + cols[:, None] * stride_dan + offs_d[None, :] * stride_dad,
                 store_cast(dk * sm_scale, DA.dtype.element_ty, EMULATE),
                 mask=cvalid[:, None] & (offs_d < DQK)[None, :])
        tl.store(DB + b * stride_dbb + hk * stride_dbh + cols[:, None] * stride_dbn + offs_dv[None, :] * stride_dbd,
                 store_cast(dv, DB.dtype.element_ty, EMULATE), mask=cvalid[:, None] & (offs_dv < DV)[None, :])


def transpose_lut(lut: torch.Tensor, counts: torch.Tensor, nq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse forward's (lut, counts) [B, H, nqb, nkb], [B, H, nqb, 2] (q-block -> kv-blocks,
    ops/sparse_ref.block_mask_to_lut) -> the dK/dV pass's: kv-block -> the BWD_BM-row query tiles
    that visit it, ascending, (lut_t int32 [B, H, nkb, nqt], counts_t int32 [B, H, nkb, 2])."""
    keep = lut_to_block_mask(lut, counts)  # [B, H, nqb, nkb]
    nqt = triton.cdiv(nq, BWD_BM)
    keep_t = keep.transpose(-1, -2).repeat_interleave(SPARSE_BQ // BWD_BM, dim=-1)[..., :nqt]
    col = torch.arange(nqt, device=lut.device)
    lut_t = torch.where(keep_t, col, col + nqt).argsort(dim=-1).to(torch.int32)
    n = keep_t.sum(dim=-1, dtype=torch.int32)
    return lut_t.contiguous(), torch.stack([n, n], dim=-1).contiguous()


def _mask4d(m, b, h, nq, nk):
    if m is None:
        return None
    while m.dim() < 4:
        m = m.unsqueeze(0)
    m = m.expand(b, h, nq, nk)  # broadcast dims get stride 0: nothing is copied
    return m.view(torch.uint8) if m.dtype == torch.bool else m


def _pv_dtype(dtype: torch.dtype):
    return tl.float16 if dtype == torch.float16 else tl.bfloat16


def attention_backward_triton(q, k, v, out, lse, grad_out, attn_bias, keep_mask, masked_value, is_causal,
                              causal_offset, scale, smooth_k, softcap, mode, quant: str = "int8",
                              lut: torch.Tensor | None = None, counts: torch.Tensor | None = None,
                              warps: int | None = None, stages: int = 1):
    """(dq, dk, dv): the op's CUDA backward (and, under TRITON_INTERPRET, a CPU one). Launches:
    for "int8" the forward's K statistics and Q / K quantization (quantize.py), then delta, then
    the dK/dV pass and the dQ pass. With the sparse forward's `lut` and `counts` only its kept
    blocks are visited (each pass's LUT, per query head). Tiles are BWD_BM x BWD_BN; `warps` defaults to 8
    (4 warps spill registers: ptxas, compile_check on sm80 / sm90)."""
    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv_ = torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv_.zero_()
    int8 = mode == "int8"
    block_d, block_dv = padded_head_dim(d), padded_head_dim(dv)
    if warps is None:
        warps = 8
    softcap = float(softcap or 0.0)
    fill = _log2_logit(float(masked_value))
    kmean, _, _, _ = kv_stats(k, v, True, False, None)  # K's mean: the row shift, dQ's smoothed K
    if int8:
        ops = quantize_qkv(q, k, v, kmean, None, None, scale, "int8", "fp16", bool(smooth_k), False, False,
                           block_d, block_dv)
        qq, qs, kq, ks = ops.q, ops.qs, ops.k, ops.ks
    else:
        qq = qs = kq = ks = kmean  # not read
    delta = torch.empty(b, hq, nq, dtype=torch.float32, device=q.device)
    wrap_triton(_bwd_preprocess)[(triton.cdiv(nq, BWD_BM), hq, b)](
        out, *out.stride(), grad_out, *grad_out.stride(), delta, delta.stride(0), delta.stride(1),
        nq, dv, BLOCK_M=BWD_BM, BLOCK_DV=block_dv)
    bias = _mask4d(attn_bias, b, hq, nq, nk)
    keep = _mask4d(keep_mask, b, hq, nq, nk)

    def s3(t):
        return (t.stride(0), t.stride(1), t.stride(2)) if t is not kmean else (0, 0, 0)

    def s2(t):
        return (t.stride(0), t.stride(1))

    common = (
        q, *q.stride(), qq, *s3(qq), qs, *s2(qs),
        k, *k.stride(), kq, *s3(kq), ks, *s2(ks), kmean, *s2(kmean),
        v, *v.stride(), grad_out, *grad_out.stride(), lse, *s2(lse), delta, *s2(delta),
        bias if bias is not None else delta, *(bias.stride() if bias is not None else (0, 0, 0, 0)),
        keep if keep is not None else delta, *(keep.stride() if keep is not None else (0, 0, 0, 0)),
    )
    scalars = (nq, nk, d, dv, hq // hkv, int(causal_offset), fill, scale * LOG2E, scale,
               softcap * LOG2E if softcap else 1.0)
    consts = dict(INT8=int8, IS_CAUSAL=bool(is_causal), HAS_BIAS=bias is not None, HAS_KEEP=keep is not None,
                  SHIFT=int8 and bool(smooth_k), SOFTCAP=bool(softcap),
                  FWD_SHIFT=bool(smooth_k) and quant != "none" and not softcap and math.isfinite(fill),
                  DQ_KMEAN=bool(softcap) and (bool(smooth_k) or not int8), FINITE_FILL=math.isfinite(float(masked_value)),
                  Q_GRAN=Q_GRAN, K_GRAN=K_GRAN, PV_DTYPE=_pv_dtype(q.dtype),
                  EMULATE=casts.EMULATE, BLOCK_M=BWD_BM, BLOCK_N=BWD_BN, BLOCK_D=block_d, BLOCK_DV=block_dv,
                  num_warps=warps, num_stages=stages)
    sparse = lut is not None
    if sparse:
        lut, counts = (t.expand(b, hq, *t.shape[2:]) for t in (lut, counts))
        lut_t, counts_t = transpose_lut(lut, counts, nq)
    else:
        lut = counts = lut_t = counts_t = delta  # not read

    def s3l(t):
        return tuple(t.stride()[:3]) if sparse else (0, 0, 0)

    consts.update(SPARSE=sparse, SPARSE_BQ=SPARSE_BQ)
    wrap_triton(_attn_bwd)[(triton.cdiv(nk, BWD_BN), hkv, b)](
        *common, dk, *dk.stride(), dv_, *dv_.stride(), lut_t, *s3l(lut_t), counts_t, *s3l(counts_t), *scalars,
        DQ_PASS=False, **consts)
    wrap_triton(_attn_bwd)[(triton.cdiv(nq, BWD_BM), hq, b)](
        *common, dq, *dq.stride(), dq, *dq.stride(), lut, *s3l(lut), counts, *s3l(counts), *scalars,
        DQ_PASS=True, **consts)
    return dq, dk, dv_

