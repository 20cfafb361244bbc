"""Predictor kernels: the data-dependent part of SpargeAttn and XAttention on the GPU.

- `_pool_kernel`: each block's mean and self-similarity (mean pairwise cosine of its tokens,
  from the norm of the sum of unit vectors: O(n d) per block).
- `_xattn_kernel`: antidiagonal-strided scores At = Qt Kt^T * scale / S (a 1/S-cost preview of
  QK^T), row softmax, summed over each (q-block, kv-block) tile. Two passes over the reduced
  columns: row max and sum first, then the normalized block sums.

Selection (sort, cumulative mass) stays in torch and is shared with ops/sparse_ref (select_sparge,
select_xattention): it works on [nqb, nkb] per head, tiny next to attention. The arithmetic is
ops/sparse_ref's, which the tests compare against; like it, both kernels read a non-finite Q / K
value as 0 (one bad token must not change another block's pooled statistics or scores).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ...ops.attention_ref import finite_or_zero
from ...ops.sparse_ref import BK, BQ, n_blocks, select_sparge, select_xattention, sparge_grid


@triton.jit
def _pool_kernel(X, stride_xb, stride_xh, stride_xn, stride_xd, MEAN, stride_mb, stride_mh,
                 POOL, stride_pb, stride_ph, stride_pn, SIM, stride_sb, stride_sh,
                 N, D, BLK: tl.constexpr, BLOCK_D: tl.constexpr, SUB_MEAN: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    rows = pid * BLK + tl.arange(0, BLK)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < N
    mask = rmask[:, None] & (cols < D)[None, :]
    x = tl.load(X + b * stride_xb + h * stride_xh + rows[:, None] * stride_xn + cols[None, :] * stride_xd,
                mask=mask, other=0.0).to(tl.float32)
    x = tl.where((x == x) & (tl.abs(x) != float("inf")), x, 0.0)  # non-finite -> 0, as the reference
    if SUB_MEAN:
        mu = tl.load(MEAN + b * stride_mb + h * stride_mh + cols, mask=cols < D, other=0.0)
        x = tl.where(mask, x - mu[None, :], 0.0)
    count = tl.minimum(N - pid * BLK, BLK).to(tl.float32)
    tl.store(POOL + b * stride_pb + h * stride_ph + pid * stride_pn + cols, tl.sum(x, 0) / count, mask=cols < D)
    norm = tl.sqrt(tl.sum(x * x, 1))
    unit = x / tl.maximum(norm, 1e-12)[:, None]
    s = tl.sum(unit, 0)
    sim = (tl.sum(s * s, 0) - count) / tl.maximum(count * (count - 1.0), 1.0)
    sim = tl.where(count > 1.0, sim, 1.0)
    tl.store(SIM + b * stride_sb + h * stride_sh + pid, sim)


def pool_blocks(x: torch.Tensor, blk: int, mean: torch.Tensor | None = None):
    """x [B, H, N, D] -> (block means [B, H, nb, D] fp32, self-similarity [B, H, nb] fp32)."""
    b, h, n, d = x.shape
    nb = n_blocks(n, blk)
    pool = torch.empty(b, h, nb, d, dtype=torch.float32, device=x.device)
    sim = torch.empty(b, h, nb, dtype=torch.float32, device=x.device)
    m = mean if mean is not None else sim
    ms = (m.stride(0), m.stride(1)) if mean is not None else (0, 0)
    wrap_triton(_pool_kernel)[(nb, h, b)](
        x, *x.stride(), m, *ms, pool, pool.stride(0), pool.stride(1), pool.stride(2), sim, sim.stride(0),
        sim.stride(1), n, d, BLK=blk, BLOCK_D=max(16, triton.next_power_of_2(d)), SUB_MEAN=mean is not None)
    return pool, sim


def predict_sparge_triton(q, k, scale: float, tau, theta, topk=None, sink: bool = True, is_causal: bool = False,
                          causal_offset: int = 0) -> torch.Tensor:
    """predict_sparge with the pooling on the GPU (same arithmetic as ops/sparse_ref)."""
    b, hq, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    dev = q.device
    qhat, qsim = pool_blocks(q, BQ)
    khat, ksim = pool_blocks(k, BK, mean=finite_or_zero(k).mean(dim=-2).contiguous())
    g = hq // hkv
    khat, ksim = khat.repeat_interleave(g, 1), ksim.repeat_interleave(g, 1)
    valid, diag = sparge_grid(nq, nk, is_causal, causal_offset, dev)
    return select_sparge(qhat, qsim, khat, ksim, scale, tau, theta, topk, sink, valid, diag)


@triton.jit
def _xattn_block(Q, K, b, h, hk, i0, c0, stride_qb, stride_qh, stride_qn, stride_qd,
                 stride_kb, stride_kh, stride_kn, stride_kd, Nq, Nk, D, scale,
                 S: tl.constexpr, TQ: tl.constexpr, TK: tl.constexpr, BLOCK_D: tl.constexpr,
                 IS_CAUSAL: tl.constexpr, causal_offset):
    """At[i0:i0+TQ, c0:c0+TK] (reduced coordinates), masked, in fp32."""
    ri = i0 + tl.arange(0, TQ)
    rc = c0 + tl.arange(0, TK)
    dd = tl.arange(0, BLOCK_D)
    acc = tl.zeros([TQ, TK], dtype=tl.float32)
    for j in range(S):  # Qt[i] = concat_j Q[S i + S-1-j]; Kt[m] = concat_j K[S m + j]
        qi = ri * S + (S - 1 - j)
        kj = rc * S + j
        qt = tl.load(Q + b * stride_qb + h * stride_qh + qi[:, None] * stride_qn + dd[None, :] * stride_qd,
                     mask=(qi < Nq)[:, None] & (dd < D)[None, :], other=0.0).to(tl.float32)
        kt = tl.load(K + b * stride_kb + hk * stride_kh + kj[None, :] * stride_kn + dd[:, None] * stride_kd,
                     mask=(kj < Nk)[None, :] & (dd < D)[:, None], other=0.0).to(tl.float32)
        qt = tl.where((qt == qt) & (tl.abs(qt) != float("inf")), qt, 0.0)  # non-finite -> 0, as the reference
        kt = tl.where((kt == kt) & (tl.abs(kt) != float("inf")), kt, 0.0)
        acc += tl.dot(qt, kt, input_precision="ieee")
    at = acc * scale
    valid = (rc * S < Nk)[None, :] & (ri * S < Nq)[:, None]
    if IS_CAUSAL:
        valid = valid & (rc[None, :] * S <= ri[:, None] * S + (S - 1) + causal_offset)
    return tl.where(valid, at, float("-inf"))


@triton.jit
def _xattn_kernel(Q, K, OUT, stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn,
                  stride_kd, stride_ob, stride_oh, stride_or, Nq, Nk, D, GROUP, NKR, NKB, scale, causal_offset,
                  S: tl.constexpr, TQ: tl.constexpr, TK: tl.constexpr, BLOCK_D: tl.constexpr,
                  RQ: tl.constexpr, RK: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """One program: TQ reduced rows (TQ // RQ q-blocks). Pass 1: row max / sum of exp. Pass 2:
    normalized probabilities summed per (q-block, kv-block) and stored."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    hk = h // GROUP
    i0 = pid * TQ
    m = tl.full([TQ], float("-inf"), dtype=tl.float32)
    l = tl.zeros([TQ], dtype=tl.float32)
    for c0 in range(0, NKR, TK):
        at = _xattn_block(Q, K, b, h, hk, i0, c0, stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh,
                          stride_kn, stride_kd, Nq, Nk, D, scale, S, TQ, TK, BLOCK_D, IS_CAUSAL, causal_offset)
        m_new = tl.maximum(m, tl.max(at, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(at - m_safe[:, None]), 1)
        m = m_new
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l_safe = tl.where(l > 0, l, 1.0)
    for c0 in range(0, NKR, TK):
        at = _xattn_block(Q, K, b, h, hk, i0, c0, stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh,
                          stride_kn, stride_kd, Nq, Nk, D, scale, S, TQ, TK, BLOCK_D, IS_CAUSAL, causal_offset)
        p = tl.exp(at - m_safe[:, None]) / l_safe[:, None]  # [TQ, TK]
        blk = tl.sum(tl.reshape(p, [TQ // RQ, RQ, TK // RK, RK]), axis=3)  # sum keys of each kv-block
        blk = tl.sum(blk, axis=1)  # and rows of each q-block: [TQ // RQ, TK // RK]
        qb = pid * (TQ // RQ) + tl.arange(0, TQ // RQ)
        kb = c0 // RK + tl.arange(0, TK // RK)
        tl.store(OUT + b * stride_ob + h * stride_oh + qb[:, None] * stride_or + kb[None, :], blk,
                 mask=(kb < NKB)[None, :])


def xattention_scores_triton(q, k, scale: float, stride: int, is_causal: bool = False, causal_offset: int = 0):
    """[B, H, nqb, nkb] block scores (ops/sparse_ref.xattention_scores) computed on the device."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    s = stride
    rq, rk = BQ // s, BK // s
    tq = max(16, rq)  # a dot needs >= 16 rows: small strides' q-blocks go several to a program
    tk = max(64, rk)
    nqb, nkb = n_blocks(nq, BQ), n_blocks(nk, BK)
    nqb_pad = triton.cdiv(nqb * rq, tq) * (tq // rq)
    out = torch.zeros(b, hq, nqb_pad, triton.cdiv(nkb * rk, tk) * (tk // rk), dtype=torch.float32, device=q.device)
    wrap_triton(_xattn_kernel)[(triton.cdiv(nqb * rq, tq), hq, b)](
        q, k, out, *q.stride(), *k.stride(), out.stride(0), out.stride(1), out.stride(2),
        nq, nk, d, hq // hkv, n_blocks(nk, s), nkb, scale / s, causal_offset,
        S=s, TQ=tq, TK=tk, BLOCK_D=max(16, triton.next_power_of_2(d)), RQ=rq, RK=rk, IS_CAUSAL=is_causal)
    return out[:, :, :nqb, :nkb]


def predict_xattention_triton(q, k, scale: float, stride: int, tau, is_causal: bool = False,
                              causal_offset: int = 0) -> torch.Tensor:
    """predict_xattention with the block scores computed on the device."""
    scores = xattention_scores_triton(q, k, scale, stride, is_causal, causal_offset)
    valid, diag = sparge_grid(q.shape[2], k.shape[2], is_causal, causal_offset, q.device)
    return select_xattention(scores, tau, valid, diag)
