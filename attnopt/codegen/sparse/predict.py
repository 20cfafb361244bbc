"""Predictor kernels: SpargeAttn, XAttention and Sparse VideoGen, each ONE launch that goes from
Q / K (/ V) straight to the lookup table and counts the block-sparse attention kernel reads.

- `_sparge_lut_kernel` (one program per query head and batch): the K mean, each K block's pooled
  mean and self-similarity (kept in a scratch buffer), then per q-block its pooled mean, the
  pooled logits against every K block, softmax, the mass / top-k selection and the LUT row.
- `_xattn_lut_kernel` (one program per q-block group, head, batch): antidiagonal-strided scores
  At = Qt Kt^T * scale / S, their row softmax summed per (q-block, kv-block) tile, then the
  selection and LUT rows. The At dots run on tensor cores in the inputs' own precision (fp16 /
  bf16 operands, fp32 accumulation: the inputs' values and their products are exact, so only the
  summation order differs from an fp32 matmul). Two passes over the At tiles (row max and sum,
  then the normalized block sums): each costs 1/S of QK^T's FLOPs; one pass would instead keep
  every row's per-kv-block partial sums, nq nk / (64 S) floats per head (4 GB for 32 heads at
  128k tokens), so the recompute is the cheaper side.
- `_vsa_lut_kernel` (one program per query head and batch): VSA's coarse stage, the mean of each
  key tile (kept in a scratch buffer), then per q-block its mean, the pooled logits against
  every tile, their softmax, the top-k tiles (besides the diagonal ones) and the LUT row of the
  kept tiles' kv-blocks.
- `_svg_lut_kernel` (one program per head): dense, spatial-masked and temporal-masked attention
  of a few sampled query rows, over every batch; the pattern that errs less is chosen and its
  (cached, precomputed) LUT copied into the head's rows.

Selection and LUT writing: codegen/sparse/select.py, by ops/sparse_ref's rules, which the tests
compare against. Like the reference, the kernels read a non-finite Q / K / V value as 0.
Scratch buffers are per program and come from torch.empty (nothing is filled on the host).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ...ops.sparse_ref import BK, BQ, lut_to_block_mask, n_blocks, per_head
from ..casts import EMULATE, dot_8_16bit, to_16bit
from .select import block_row_grid, keep_by_mass, keep_top, write_lut_row

POOL_ROWS = 32  # rows of a block pooled at a time (registers)


@triton.jit
def _finite(x):
    return tl.where((x == x) & (tl.abs(x) != float("inf")), x, 0.0)


@triton.jit
def _dot_in(a, b, IEEE: tl.constexpr, EMULATE: tl.constexpr):
    """a @ b in the operands' precision: 16-bit on tensor cores, fp32 inputs in fp32."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return dot_8_16bit(a, b, EMULATE)


@triton.jit
def _pool_block(X, stride_n, stride_d, n0, N, D, mu, BLK: tl.constexpr, SUB: tl.constexpr,
                BLOCK_D: tl.constexpr, SUB_MEAN: tl.constexpr):
    """Rows [n0, n0 + BLK) of X (each minus `mu` when SUB_MEAN): their mean [BLOCK_D] and mean
    pairwise cosine (|sum of unit vectors|^2 - n) / (n (n - 1)), as sparse_ref._pool."""
    cols = tl.arange(0, BLOCK_D)
    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    units = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, BLK, SUB):
        rows = n0 + s0 + tl.arange(0, SUB)
        mask = (rows < N)[:, None] & (cols < D)[None, :]
        x = _finite(tl.load(X + rows[:, None] * stride_n + cols[None, :] * stride_d, mask=mask,
                            other=0.0).to(tl.float32))
        if SUB_MEAN:
            x = tl.where(mask, x - mu[None, :], 0.0)
        total += tl.sum(x, 0)
        norm = tl.sqrt(tl.sum(x * x, 1))
        units += tl.sum(x / tl.maximum(norm, 1e-12)[:, None], 0)
    count = tl.minimum(N - n0, BLK).to(tl.float32)
    sim = (tl.sum(units * units, 0) - count) / tl.maximum(count * (count - 1.0), 1.0)
    return total / count, tl.where(count > 1.0, sim, 1.0)


# ------------------------------------------------------------------------------ SpargeAttn

@triton.jit
def _sparge_lut_kernel(Q, stride_qb, stride_qh, stride_qn, stride_qd, K, stride_kb, stride_kh, stride_kn, stride_kd,
                       KH, KS, SC, TAU, THETA, TOPK, DENSE,
                       LUT, stride_lb, stride_lh, stride_lr, CNT, stride_cb, stride_ch, stride_cr,
                       Nq, Nk, D, GROUP, scale, causal_offset, local,
                       SINK: tl.constexpr, USE_TOPK: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DIAG: tl.constexpr,
                       BQ_C: tl.constexpr, BK_C: tl.constexpr, SUB: tl.constexpr, BLOCK_D: tl.constexpr,
                       NKB_P2: tl.constexpr, KCH: tl.constexpr):
    h = tl.program_id(0)
    b = tl.program_id(1)
    hs = tl.num_programs(0)
    hk = h // GROUP
    nqb = (Nq + BQ_C - 1) // BQ_C
    nkb = (Nk + BK_C - 1) // BK_C
    dcols = tl.arange(0, BLOCK_D)
    cols = tl.arange(0, NKB_P2)
    Kp = K + b * stride_kb + hk * stride_kh
    # this program's scratch: pooled K blocks [NKB_P2, BLOCK_D], their similarities, one logits row
    kh_base = KH + (b * hs + h) * NKB_P2 * BLOCK_D
    ks_base = KS + (b * hs + h) * NKB_P2
    sc_base = SC + (b * hs + h) * NKB_P2
    # K's mean over every key (sparge centers K before pooling)
    ksum = tl.zeros([BLOCK_D], dtype=tl.float32)
    for n0 in range(0, Nk, SUB):
        rows = n0 + tl.arange(0, SUB)
        x = tl.load(Kp + rows[:, None] * stride_kn + dcols[None, :] * stride_kd,
                    mask=(rows < Nk)[:, None] & (dcols < D)[None, :], other=0.0).to(tl.float32)
        ksum += tl.sum(_finite(x), 0)
    kmean = ksum / Nk
    for c in range(0, nkb):
        khat, ksim = _pool_block(Kp, stride_kn, stride_kd, c * BK_C, Nk, D, kmean, BK_C, SUB, BLOCK_D, True)
        tl.store(kh_base + c * BLOCK_D + dcols, khat)
        tl.store(ks_base + c, ksim)
    tl.debug_barrier()
    theta = tl.load(THETA + h)
    tau = tl.load(TAU + h)
    topk = tl.load(TOPK + h)
    dense = tl.load(DENSE + h) != 0
    ksims = tl.load(ks_base + cols, mask=cols < nkb, other=1.0)
    Qp = Q + b * stride_qb + h * stride_qh
    for r in range(0, nqb):
        qhat, qsim = _pool_block(Qp, stride_qn, stride_qd, r * BQ_C, Nq, D, kmean, BQ_C, SUB, BLOCK_D, False)
        for c0 in range(0, NKB_P2, KCH):  # pooled logits, KCH kv-blocks at a time (fp32, as the reference)
            kc = c0 + tl.arange(0, KCH)
            kh = tl.load(kh_base + kc[:, None] * BLOCK_D + dcols[None, :], mask=(kc < nkb)[:, None], other=0.0)
            tl.store(sc_base + kc, tl.sum(qhat[None, :] * kh, 1) * scale)
        tl.debug_barrier()
        logits = tl.load(sc_base + cols)
        tl.debug_barrier()  # the next row overwrites the scratch row
        valid, diag, full = block_row_grid(r, Nq, Nk, causal_offset, cols, IS_CAUSAL, HAS_DIAG, BQ_C, BK_C, local)
        k_rough = (ksims < theta) & valid  # the pooled mean does not represent the block: kept
        cand = valid & ~k_rough
        logits = tl.where(cand, logits, float("-inf"))
        mx = tl.max(logits, 0)
        e = tl.where(cand, tl.exp(logits - tl.where(mx == float("-inf"), 0.0, mx)), 0.0)
        p = e / tl.maximum(tl.sum(e, 0), 1e-38)
        keep = keep_by_mass(p, cand, cand & (cols < 0), tau, topk, cols, USE_TOPK, NKB_P2)
        keep = keep | k_rough | diag
        keep = tl.where(qsim < theta, valid, keep)  # a q-block its mean does not represent: every block
        if SINK:
            keep = keep | (valid & (cols == 0))
        keep = tl.where(dense, valid, keep)
        write_lut_row(keep, full, cols, nkb, LUT + b * stride_lb + h * stride_lh + r * stride_lr,
                      CNT + b * stride_cb + h * stride_ch + r * stride_cr)


def _lut_buffers(b, h, nq, nk, device):
    nqb, nkb = n_blocks(nq, BQ), n_blocks(nk, BK)
    return (torch.empty(b, h, nqb, nkb, dtype=torch.int32, device=device),
            torch.empty(b, h, nqb, 2, dtype=torch.int32, device=device))


def _nkb_p2(nk):
    return max(16, triton.next_power_of_2(n_blocks(nk, BK)))


def _has_diag(nq, nk, is_causal):
    return bool(is_causal or nq == nk)


def sparge_lut_triton(q, k, scale: float, tau, theta, topk, dense, sink: bool, is_causal: bool, causal_offset: int,
                      local: int = 0):
    """SpargeAttn's prediction as (lut [B, Hq, nqb, nkb], counts [B, Hq, nqb, 2]) int32, one launch.
    tau, topk: float64 [Hq] (topk None: the tau rule); theta: float32 [Hq]; dense: int8 [Hq];
    local: keys before each q-block kept with its diagonal (sparse_ref.diagonal_blocks)."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    p2 = _nkb_p2(nk)
    block_d = max(16, triton.next_power_of_2(d))
    kh = torch.empty(b * hq * p2 * block_d, dtype=torch.float32, device=q.device)
    ks = torch.empty(b * hq * p2, dtype=torch.float32, device=q.device)
    sc = torch.empty(b * hq * p2, dtype=torch.float32, device=q.device)
    lut, counts = _lut_buffers(b, hq, nq, nk, q.device)
    wrap_triton(_sparge_lut_kernel)[(hq, b)](
        q, *q.stride(), k, *k.stride(), kh, ks, sc, tau, theta, tau if topk is None else topk, dense,
        lut, *lut.stride()[:3], counts, *counts.stride()[:3], nq, nk, d, hq // hkv, float(scale), int(causal_offset),
        int(local), SINK=bool(sink), USE_TOPK=topk is not None, IS_CAUSAL=bool(is_causal), HAS_DIAG=_has_diag(nq, nk, is_causal),
        BQ_C=BQ, BK_C=BK, SUB=POOL_ROWS, BLOCK_D=block_d, NKB_P2=p2, KCH=min(p2, 64))
    return lut, counts


def _heads(x, h, device, dtype):
    return per_head(x, h, device, dtype).contiguous()


def _no_dense(h, device):
    return torch.zeros(h, dtype=torch.int8, device=device)


def predict_sparge_triton(q, k, scale: float, tau, theta, topk=None, sink: bool = True, is_causal: bool = False,
                          causal_offset: int = 0, local: int = 0) -> torch.Tensor:
    """predict_sparge's block mask [B, Hq, nqb, nkb], read back from the kernel's LUT (tests)."""
    hq, dev = q.shape[1], q.device
    lut, counts = sparge_lut_triton(q, k, scale, _heads(tau, hq, dev, torch.float64),
                                    _heads(theta, hq, dev, torch.float32),
                                    None if topk is None else _heads(topk, hq, dev, torch.float64),
                                    _no_dense(hq, dev), sink, is_causal, causal_offset, local)
    return lut_to_block_mask(lut, counts)


# ------------------------------------------------------------------------------ VSA

@triton.jit
def _vsa_lut_kernel(Q, stride_qb, stride_qh, stride_qn, stride_qd, K, stride_kb, stride_kh, stride_kn, stride_kd,
                    KH, SC, KT, TOPK, DENSE,
                    LUT, stride_lb, stride_lh, stride_lr, CNT, stride_cb, stride_ch, stride_cr,
                    Nq, Nk, D, GROUP, scale, causal_offset,
                    IS_CAUSAL: tl.constexpr, HAS_DIAG: tl.constexpr, BQ_C: tl.constexpr, BK_C: tl.constexpr,
                    TILE: tl.constexpr, SUB: tl.constexpr, BLOCK_D: tl.constexpr, NKT_P2: tl.constexpr,
                    NKB_P2: tl.constexpr, KCH: tl.constexpr):
    h = tl.program_id(0)
    b = tl.program_id(1)
    hs = tl.num_programs(0)
    hk = h // GROUP
    nqb = (Nq + BQ_C - 1) // BQ_C
    nkb = (Nk + BK_C - 1) // BK_C
    nkt = (Nk + TILE - 1) // TILE
    dcols = tl.arange(0, BLOCK_D)
    tcols = tl.arange(0, NKT_P2)
    bcols = tl.arange(0, NKB_P2)
    zero = tl.zeros([BLOCK_D], dtype=tl.float32)
    # this program's scratch: pooled key tiles [NKT_P2, BLOCK_D], one logits row, one kept-tiles row
    kh_base = KH + (b * hs + h) * NKT_P2 * BLOCK_D
    sc_base = SC + (b * hs + h) * NKT_P2
    kt_base = KT + (b * hs + h) * NKT_P2
    Kp = K + b * stride_kb + hk * stride_kh
    for t in range(0, nkt):
        khat, _ = _pool_block(Kp, stride_kn, stride_kd, t * TILE, Nk, D, zero, TILE, SUB, BLOCK_D, False)
        tl.store(kh_base + t * BLOCK_D + dcols, khat)
    tl.debug_barrier()
    topk = tl.load(TOPK + h)
    dense = tl.load(DENSE + h) != 0
    Qp = Q + b * stride_qb + h * stride_qh
    for r in range(0, nqb):
        qhat, _ = _pool_block(Qp, stride_qn, stride_qd, r * BQ_C, Nq, D, zero, BQ_C, SUB, BLOCK_D, False)
        for c0 in range(0, NKT_P2, KCH):  # pooled logits, KCH tiles at a time (fp32, as the reference)
            kc = c0 + tl.arange(0, KCH)
            kh = tl.load(kh_base + kc[:, None] * BLOCK_D + dcols[None, :], mask=(kc < nkt)[:, None], other=0.0)
            tl.store(sc_base + kc, tl.sum(qhat[None, :] * kh, 1) * scale)
        tl.debug_barrier()
        logits = tl.load(sc_base + tcols)
        # the tile grid: visible / diagonal when one of the tile's kv-blocks is (sparse_ref.vsa_grid)
        first_row = r * BQ_C
        last_row = tl.minimum(r * BQ_C + BQ_C - 1, tl.maximum(Nq - 1, 0))
        t0 = tcols * TILE
        valid = tcols < nkt
        off = 0
        if IS_CAUSAL:
            valid = valid & (t0 <= last_row + causal_offset)
            off = causal_offset
        if HAS_DIAG:
            t_end = tl.minimum(t0 + TILE, nkb * BK_C) - 1
            diag = valid & (t0 <= last_row + off) & (t_end >= first_row + off)
        else:
            diag = valid & (tcols < 0)
        logits = tl.where(valid, logits, float("-inf"))
        mx = tl.max(logits, 0)
        e = tl.where(valid, tl.exp(logits - tl.where(mx == float("-inf"), 0.0, mx)), 0.0)
        p = e / tl.maximum(tl.sum(e, 0), 1e-38)
        cand = valid & ~diag
        share = tl.sum(cand.to(tl.int32), 0).to(tl.float64) * topk
        up = share.to(tl.int32)
        up = tl.where(up.to(tl.float64) < share, up + 1, up)  # ceil, in float64 as the reference
        want = tl.maximum(tl.where(topk < 0, (-topk).to(tl.int32), up), 1)
        keep = keep_top(p, cand, want, tcols, NKT_P2) | diag
        tl.store(kt_base + tcols, keep.to(tl.int32))
        tl.debug_barrier()
        bvalid, _, full = block_row_grid(r, Nq, Nk, causal_offset, bcols, IS_CAUSAL, False, BQ_C, BK_C, 0)
        kept = tl.load(kt_base + (bcols * BK_C) // TILE, mask=bcols < nkb, other=0) != 0
        kept = tl.where(dense, bvalid, kept & bvalid)
        tl.debug_barrier()  # the next row overwrites the scratch rows
        write_lut_row(kept, full, bcols, nkb, LUT + b * stride_lb + h * stride_lh + r * stride_lr,
                      CNT + b * stride_cb + h * stride_ch + r * stride_cr)


def vsa_lut_triton(q, k, scale: float, tile: int, topk, dense, is_causal: bool, causal_offset: int,
                   diagonal: bool = True):
    """VSA's selection as (lut [B, Hq, nqb, nkb], counts [B, Hq, nqb, 2]) int32, one launch.
    topk: float64 [Hq] in sparse_ref.vsa_topk's form (share, or -count); dense: int8 [Hq]."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    tile = int(tile)
    if tile % BK:
        raise ValueError(f"VSA tile {tile} is not a multiple of the kv-block {BK}")
    nkt = n_blocks(nk, tile)
    tp2 = max(16, triton.next_power_of_2(nkt))
    block_d = max(16, triton.next_power_of_2(d))
    kh = torch.empty(b * hq * tp2 * block_d, dtype=torch.float32, device=q.device)
    sc = torch.empty(b * hq * tp2, dtype=torch.float32, device=q.device)
    kt = torch.empty(b * hq * tp2, dtype=torch.int32, device=q.device)
    lut, counts = _lut_buffers(b, hq, nq, nk, q.device)
    has_diag = bool(is_causal or (diagonal and nq == nk))
    wrap_triton(_vsa_lut_kernel)[(hq, b)](
        q, *q.stride(), k, *k.stride(), kh, sc, kt, topk, dense, lut, *lut.stride()[:3], counts,
        *counts.stride()[:3], nq, nk, d, hq // hkv, float(scale), int(causal_offset),
        IS_CAUSAL=bool(is_causal), HAS_DIAG=has_diag, BQ_C=BQ, BK_C=BK, TILE=tile, SUB=POOL_ROWS, BLOCK_D=block_d,
        NKT_P2=tp2, NKB_P2=_nkb_p2(nk), KCH=min(tp2, 64))
    return lut, counts


def predict_vsa_triton(q, k, scale: float, tile: int, topk, is_causal: bool = False, causal_offset: int = 0,
                       diagonal: bool = True) -> torch.Tensor:
    """predict_vsa's block mask [B, Hq, nqb, nkb], read back from the kernel's LUT (tests)."""
    from ...ops.sparse_ref import vsa_topk

    hq, dev = q.shape[1], q.device
    lut, counts = vsa_lut_triton(q, k, scale, tile, vsa_topk(topk, hq, dev), _no_dense(hq, dev), is_causal,
                                 causal_offset, diagonal)
    return lut_to_block_mask(lut, counts)


# ------------------------------------------------------------------------------ XAttention

@triton.jit
def _xattn_block(Q, K, b, h, hk, i0, c0, stride_qb, stride_qh, stride_qn, stride_qd,
                 stride_kb, stride_kh, stride_kn, stride_kd, Nq, Nk, D, scale,
                 S: tl.constexpr, TQ: tl.constexpr, TK: tl.constexpr, BLOCK_D: tl.constexpr,
                 IS_CAUSAL: tl.constexpr, causal_offset, IEEE: tl.constexpr, EMULATE: tl.constexpr):
    """At[i0:i0+TQ, c0:c0+TK] (reduced coordinates), masked, accumulated in fp32."""
    ri = i0 + tl.arange(0, TQ)
    rc = c0 + tl.arange(0, TK)
    dd = tl.arange(0, BLOCK_D)
    acc = tl.zeros([TQ, TK], dtype=tl.float32)
    for j in range(S):  # Qt[i] = concat_j Q[S i + S-1-j]; Kt[m] = concat_j K[S m + j]
        qi = ri * S + (S - 1 - j)
        kj = rc * S + j
        qt = tl.load(Q + b * stride_qb + h * stride_qh + qi[:, None] * stride_qn + dd[None, :] * stride_qd,
                     mask=(qi < Nq)[:, None] & (dd < D)[None, :], other=0.0)
        kt = tl.load(K + b * stride_kb + hk * stride_kh + kj[None, :] * stride_kn + dd[:, None] * stride_kd,
                     mask=(kj < Nk)[None, :] & (dd < D)[:, None], other=0.0)
        if EMULATE:  # the interpreter has no bf16 arithmetic: exact fp32 copies of the values
            qt, kt = qt.to(tl.float32), kt.to(tl.float32)
        acc += _dot_in(_finite(qt), _finite(kt), IEEE, EMULATE)  # non-finite -> 0, as the reference
    at = acc * scale
    valid = (rc * S < Nk)[None, :] & (ri * S < Nq)[:, None]
    if IS_CAUSAL:
        valid = valid & (rc[None, :] * S <= ri[:, None] * S + (S - 1) + causal_offset)
    return tl.where(valid, at, float("-inf"))


@triton.jit
def _xattn_lut_kernel(Q, K, SC, TAU, DENSE, stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh,
                      stride_kn, stride_kd, stride_sb, stride_sh, stride_sr,
                      LUT, stride_lb, stride_lh, stride_lr, CNT, stride_cb, stride_ch, stride_cr,
                      Nq, Nk, D, GROUP, NKR, scale, causal_offset, local,
                      S: tl.constexpr, TQ: tl.constexpr, TK: tl.constexpr, BLOCK_D: tl.constexpr,
                      RQ: tl.constexpr, RK: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DIAG: tl.constexpr,
                      NKB_P2: tl.constexpr, IEEE: tl.constexpr, EMULATE: tl.constexpr):
    """One program: TQ reduced rows (TQ // RQ q-blocks). Pass 1: row max / sum of exp. Pass 2:
    normalized probabilities summed per (q-block, kv-block) into this program's scratch rows.
    Then each q-block's row: XAttention's selection and its LUT row."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    hk = h // GROUP
    i0 = pid * TQ
    nqb = (Nq + RQ * S - 1) // (RQ * S)
    nkb = (Nk + RK * S - 1) // (RK * S)
    m = tl.full([TQ], float("-inf"), dtype=tl.float32)
    l = tl.zeros([TQ], dtype=tl.float32)
    for c0 in range(0, NKR, TK):
        at = _xattn_block(Q, K, b, h, hk, i0, c0, stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh,
                          stride_kn, stride_kd, Nq, Nk, D, scale, S, TQ, TK, BLOCK_D, IS_CAUSAL, causal_offset,
                          IEEE, EMULATE)
        m_new = tl.maximum(m, tl.max(at, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(at - m_safe[:, None]), 1)
        m = m_new
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l_safe = tl.where(l > 0, l, 1.0)
    sc = SC + b * stride_sb + h * stride_sh
    for c0 in range(0, NKR, TK):
        at = _xattn_block(Q, K, b, h, hk, i0, c0, stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh,
                          stride_kn, stride_kd, Nq, Nk, D, scale, S, TQ, TK, BLOCK_D, IS_CAUSAL, causal_offset,
                          IEEE, EMULATE)
        p = tl.exp(at - m_safe[:, None]) / l_safe[:, None]  # [TQ, TK]
        blk = tl.sum(tl.reshape(p, [TQ // RQ, RQ, TK // RK, RK]), axis=3)  # sum keys of each kv-block
        blk = tl.sum(blk, axis=1)  # and rows of each q-block: [TQ // RQ, TK // RK]
        qb = pid * (TQ // RQ) + tl.arange(0, TQ // RQ)
        kb = c0 // RK + tl.arange(0, TK // RK)
        tl.store(sc + qb[:, None] * stride_sr + kb[None, :], blk, mask=(kb < nkb)[None, :])
    tl.debug_barrier()
    tau = tl.load(TAU + h)
    dense = tl.load(DENSE + h) != 0
    cols = tl.arange(0, NKB_P2)
    for t in range(TQ // RQ):
        r = pid * (TQ // RQ) + t
        if r < nqb:
            s = tl.load(sc + r * stride_sr + cols, mask=cols < nkb, other=0.0)
            valid, diag, full = block_row_grid(r, Nq, Nk, causal_offset, cols, IS_CAUSAL, HAS_DIAG, RQ * S, RK * S,
                                               local)
            keep = keep_by_mass(s, valid, diag | (cols == 0), tau, tau, cols, False, NKB_P2)
            keep = tl.where(dense, valid, keep)
            write_lut_row(keep, full, cols, nkb, LUT + b * stride_lb + h * stride_lh + r * stride_lr,
                          CNT + b * stride_cb + h * stride_ch + r * stride_cr)


def xattention_lut_triton(q, k, scale: float, stride: int, tau, dense, is_causal: bool = False,
                          causal_offset: int = 0, scores_out: list | None = None, local: int = 0):
    """XAttention's prediction as (lut, counts), one launch. tau: float64 [Hq]; dense: int8 [Hq].
    `scores_out` (tests): receives the block scores [B, Hq, nqb, nkb] the selection read."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    s = int(stride)
    rq, rk = BQ // s, BK // s
    tq = max(16, rq)  # a dot needs >= 16 rows: small strides' q-blocks go several to a program
    tk = max(64, rk)
    nqb = n_blocks(nq, BQ)
    progs = triton.cdiv(nqb * rq, tq)
    p2 = _nkb_p2(nk)
    sc = torch.empty(b, hq, progs * (tq // rq), max(p2, triton.cdiv(n_blocks(nk, BK) * rk, tk) * (tk // rk)),
                     dtype=torch.float32, device=q.device)
    lut, counts = _lut_buffers(b, hq, nq, nk, q.device)
    wrap_triton(_xattn_lut_kernel)[(progs, hq, b)](
        q, k, sc, tau, dense, *q.stride(), *k.stride(), sc.stride(0), sc.stride(1), sc.stride(2),
        lut, *lut.stride()[:3], counts, *counts.stride()[:3],
        nq, nk, d, hq // hkv, n_blocks(nk, s), float(scale) / s, int(causal_offset), int(local),
        S=s, TQ=tq, TK=tk, BLOCK_D=max(16, triton.next_power_of_2(d)), RQ=rq, RK=rk, IS_CAUSAL=bool(is_causal),
        HAS_DIAG=_has_diag(nq, nk, is_causal), NKB_P2=p2, IEEE=q.dtype == torch.float32, EMULATE=EMULATE)
    if scores_out is not None:
        scores_out.append(sc[:, :, :nqb, :n_blocks(nk, BK)])
    return lut, counts


def xattention_scores_triton(q, k, scale: float, stride: int, is_causal: bool = False, causal_offset: int = 0):
    """[B, H, nqb, nkb] block scores (ops/sparse_ref.xattention_scores) as the kernel computes them."""
    out = []
    hq, dev = q.shape[1], q.device
    xattention_lut_triton(q, k, scale, stride, _heads(0.9, hq, dev, torch.float64), _no_dense(hq, dev), is_causal,
                          causal_offset, scores_out=out)
    return out[0]


def predict_xattention_triton(q, k, scale: float, stride: int, tau, is_causal: bool = False,
                              causal_offset: int = 0, local: int = 0) -> torch.Tensor:
    """predict_xattention's block mask, read back from the kernel's LUT (tests)."""
    hq, dev = q.shape[1], q.device
    lut, counts = xattention_lut_triton(q, k, scale, stride, _heads(tau, hq, dev, torch.float64),
                                        _no_dense(hq, dev), is_causal, causal_offset, local=local)
    return lut_to_block_mask(lut, counts)


# ------------------------------------------------------------------------------ Sparse VideoGen

@triton.jit
def _svg_acc(s, ok, m, l, acc, v, PV_DTYPE: tl.constexpr, IEEE: tl.constexpr, EMULATE: tl.constexpr):
    """One online-softmax step of the keys `ok` of logits tile s."""
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.where(ok, tl.exp(s - m_safe[:, None]), 0.0)
    alpha = tl.exp(m - m_safe)
    acc = acc * alpha[:, None] + _dot_in(to_16bit(p, PV_DTYPE, EMULATE) if not IEEE else p, v, IEEE, EMULATE)
    return m_new, l * alpha + tl.sum(p, 1), acc


@triton.jit
def _svg_lut_kernel(Q, stride_qb, stride_qh, stride_qn, stride_qd, K, stride_kb, stride_kh, stride_kn, stride_kd,
                    V, stride_vb, stride_vh, stride_vn, stride_vd, ROWS, n_rows, PL, PC, DENSE, CHOICE,
                    LUT, stride_lh, CNT, stride_ch, B, Nq, Nk, nkb, D, DV, GROUP, scale, causal_offset,
                    s_frame, prefix, spatial_frames, temporal_tokens,
                    IS_CAUSAL: tl.constexpr, BQ_C: tl.constexpr, R_P2: tl.constexpr, BN: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_DV: tl.constexpr, NKB_P2: tl.constexpr, PV_DTYPE: tl.constexpr, IEEE: tl.constexpr,
                    EMULATE: tl.constexpr):
    h = tl.program_id(0)
    hk = h // GROUP
    ri = tl.arange(0, R_P2)
    rvalid = ri < n_rows
    rows = tl.load(ROWS + ri, mask=rvalid, other=0)
    dd = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    ip = tl.maximum(rows - prefix, 0)
    fi, pi = ip // s_frame, ip % s_frame
    err_s = 0.0
    err_t = 0.0
    for b in range(0, B):
        q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + dd[None, :] * stride_qd,
                    mask=rvalid[:, None] & (dd < D)[None, :], other=0.0)
        if EMULATE:
            q = q.to(tl.float32)
        q = _finite(q)
        md = tl.full([R_P2], float("-inf"), dtype=tl.float32)
        ms, mt = md, md
        ld = tl.zeros([R_P2], dtype=tl.float32)
        ls, lt = ld, ld
        ad = tl.zeros([R_P2, BLOCK_DV], dtype=tl.float32)
        as_, at = ad, ad
        for n0 in range(0, Nk, BN):
            j = n0 + tl.arange(0, BN)
            jin = j < Nk
            k = tl.load(K + b * stride_kb + hk * stride_kh + j[None, :] * stride_kn + dd[:, None] * stride_kd,
                        mask=jin[None, :] & (dd < D)[:, None], other=0.0)
            v = tl.load(V + b * stride_vb + hk * stride_vh + j[:, None] * stride_vn + dv[None, :] * stride_vd,
                        mask=jin[:, None] & (dv < DV)[None, :], other=0.0)
            if EMULATE:
                k, v = k.to(tl.float32), v.to(tl.float32)
            s = _dot_in(q, _finite(k), IEEE, EMULATE) * scale
            v = _finite(v)
            allowed = jin[None, :] & rvalid[:, None]
            if IS_CAUSAL:
                allowed = allowed & (j[None, :] <= rows[:, None] + causal_offset)
            jp = tl.maximum(j - prefix, 0)
            text = (rows[:, None] < prefix) | (j[None, :] < prefix)
            spatial = text | (tl.abs(fi[:, None] - (jp // s_frame)[None, :]) <= spatial_frames)
            temporal = text | (tl.abs(pi[:, None] - (jp % s_frame)[None, :]) * 2 < temporal_tokens)
            md, ld, ad = _svg_acc(s, allowed, md, ld, ad, v, PV_DTYPE, IEEE, EMULATE)
            ms, ls, as_ = _svg_acc(s, allowed & spatial, ms, ls, as_, v, PV_DTYPE, IEEE, EMULATE)
            mt, lt, at = _svg_acc(s, allowed & temporal, mt, lt, at, v, PV_DTYPE, IEEE, EMULATE)
        od = ad / tl.where(ld > 0, ld, 1.0)[:, None]
        os_ = as_ / tl.where(ls > 0, ls, 1.0)[:, None]
        ot = at / tl.where(lt > 0, lt, 1.0)[:, None]
        keep = rvalid[:, None] & (dv < DV)[None, :]
        err_s += tl.sum(tl.sum(tl.where(keep, tl.abs(os_ - od), 0.0), 1), 0)
        err_t += tl.sum(tl.sum(tl.where(keep, tl.abs(ot - od), 0.0), 1), 0)
    pattern = tl.where(err_t < err_s, 1, 0)
    tl.store(CHOICE + h, pattern)
    pattern = tl.where(tl.load(DENSE + h) != 0, 2, pattern)  # [spatial, temporal, every block]
    nqb = (Nq + BQ_C - 1) // BQ_C
    c = tl.arange(0, NKB_P2)
    c2 = tl.arange(0, 2)
    for r in range(0, nqb):  # copy the chosen pattern's LUT rows (B shares them: stride 0)
        row = tl.load(PL + (pattern * nqb + r) * nkb + c, mask=c < nkb, other=0)
        tl.store(LUT + h * stride_lh + r * nkb + c, row, mask=c < nkb)
        tl.store(CNT + h * stride_ch + r * 2 + c2, tl.load(PC + (pattern * nqb + r) * 2 + c2))


def svg_lut_triton(q, k, v, scale: float, params, rows, pattern_lut, pattern_counts, dense, is_causal: bool,
                   causal_offset: int, choice_out: torch.Tensor | None = None):
    """Sparse VideoGen's per-head choice as (lut [B, Hq, nqb, nkb], counts), one launch.
    rows: int32 sampled query rows; pattern_lut [3, nqb, nkb] / pattern_counts [3, nqb, 2]: the
    spatial, temporal and all-blocks LUTs (static, cached by the caller); dense: int8 [Hq]."""
    b, hq, nq, d = q.shape
    hkv, nk, dvd = k.shape[1], k.shape[2], v.shape[3]
    nqb, nkb = n_blocks(nq, BQ), n_blocks(nk, BK)
    lut = torch.empty(1, hq, nqb, nkb, dtype=torch.int32, device=q.device)
    counts = torch.empty(1, hq, nqb, 2, dtype=torch.int32, device=q.device)
    choice = choice_out if choice_out is not None else torch.empty(hq, dtype=torch.int32, device=q.device)
    pv_dtype = tl.float16 if v.dtype == torch.float16 else tl.bfloat16
    wrap_triton(_svg_lut_kernel)[(hq,)](
        q, *q.stride(), k, *k.stride(), v, *v.stride(), rows, rows.shape[0], pattern_lut, pattern_counts, dense,
        choice, lut, lut.stride(1), counts, counts.stride(1), b, nq, nk, nkb, d, dvd, hq // hkv, float(scale),
        int(causal_offset), int(params["frame_tokens"]), int(params["prefix_tokens"]),
        int(params["spatial_frames"]), int(params["temporal_tokens"]),
        IS_CAUSAL=bool(is_causal), BQ_C=BQ, R_P2=max(16, triton.next_power_of_2(rows.shape[0])), BN=64,
        BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_DV=max(16, triton.next_power_of_2(dvd)), NKB_P2=_nkb_p2(nk),
        PV_DTYPE=pv_dtype, IEEE=q.dtype == torch.float32, EMULATE=EMULATE)
    return lut.expand(b, -1, -1, -1), counts.expand(b, -1, -1, -1)
