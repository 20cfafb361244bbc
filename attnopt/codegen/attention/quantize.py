"""Quantize kernels for attention: Q and K to per-block INT8 / FP8 / NVFP4, V to per-channel FP8
or NVFP4, all three in one launch (`quantize_qkv`, after `kv_stats`: the op's second launch).

Q: `scale * log2(e)` folded in (the attention kernel works in the exp2 domain), optionally each
block's mean subtracted (Q smoothing; the means are written out for the kernel's correction
term), its non-finite rows flagged and (soft-capping, LSE) each row's dot with K's mean stored.
K: its token mean subtracted first (K smoothing, exact under softmax). Outputs are padded
to BLOCK_D columns with zeros, head dim contiguous (K-major for the QK^T dot), and never alias
the caller's tensors. The arithmetic is exactly attention_ref.quantize_rows (INT8 / FP8) and
nvfp4.quantize_rows (NVFP4: packed e2m1 codes [.., N, BLOCK_D / 2] and e4m3 group scales
[.., N, BLOCK_D / 16] beside the per-block fp32 scale); the means and V's scales come from
stats.py, which sums in another order than torch (the last bit of a mean may differ).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ...ops.attention_ref import FP8_MAX, K_GRAN, LOG2E, Q_GRAN
from ...ops.nvfp4 import P_SCALE
from .. import casts
from ..casts import to_e4m3
from ..microscaling import quantize_groups
from ..linear.splitk import tile_counters
from .stats import _kv_stats_kernel, stats_block_n, stats_chunks

FMT_INT8, FMT_FP8, FMT_FP4 = 0, 1, 2
FORMATS = {"int8": FMT_INT8, "fp8": FMT_FP8, "fp4": FMT_FP4}
QK_FORMATS_Q = {**FORMATS, "none": 3}  # the fused kernel's QK_FMT (3: Q and K stay 16-bit)
V_PAD = 128  # token padding of the transposed FP8 V (covers every BLOCK_N; 16-byte aligned rows)
V_BLOCK_N = 64  # keys per V program of the quantize launch


@triton.jit
def _quant_rows(
    X, stride_xb, stride_xh, stride_xn, stride_xd,
    MEAN, stride_mb, stride_mh, stride_md,
    XQ, stride_qb, stride_qh, stride_qn,
    XS, stride_sb, stride_sh,
    XBAR, stride_bb, stride_bh, stride_bn,
    XG, stride_gb, stride_gh, stride_gn,
    BAD, stride_fb, stride_fh,
    DOT, stride_db, stride_dh,
    pid_n, h, b, hm, N, D, mult,
    GRAN: tl.constexpr, BLOCK_D: tl.constexpr, FMT: tl.constexpr,
    SUB_MEAN: tl.constexpr, BLOCK_MEAN: tl.constexpr, HAS_BAD: tl.constexpr, ROW_DOT: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """GRAN rows of one (batch, head) [GRAN, D] -> int8/fp8 + one scale, or (NVFP4) packed e2m1 +
    e4m3 group scales + one fp32 scale. A non-finite value counts as 0 everywhere (scale, block
    mean, codes); with HAS_BAD, BAD gets 1 for each row that held one. MEAN is read at head `hm`
    (GQA: a query head's kv head): SUB_MEAN subtracts it (K smoothing); ROW_DOT stores each row's
    fp32 dot with it in DOT (Q: the logit shift K smoothing makes, for soft-capping and the LSE)."""
    rows = pid_n * GRAN + tl.arange(0, GRAN)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < N
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(X + b * stride_xb + h * stride_xh + rows[:, None] * stride_xn + cols[None, :] * stride_xd,
                mask=mask, other=0.0).to(tl.float32)
    finite = (x == x) & (tl.abs(x) != float("inf"))
    x = tl.where(finite, x, 0.0)  # non-finite -> 0: scales stay sane
    if HAS_BAD:
        tl.store(BAD + b * stride_fb + h * stride_fh + rows, tl.max(tl.where(finite, 0, 1), axis=1).to(tl.uint8),
                 mask=rmask)
    if SUB_MEAN or ROW_DOT:
        mean = tl.load(MEAN + b * stride_mb + hm * stride_mh + cols * stride_md, mask=cmask, other=0.0)
        if ROW_DOT:
            tl.store(DOT + b * stride_db + h * stride_dh + rows, tl.sum(x * mean[None, :], axis=1), mask=rmask)
        if SUB_MEAN:  # K smoothing: the token mean of this (batch, head), per channel
            x = tl.where(mask, x - mean[None, :], 0.0)
    x = x * mult
    if BLOCK_MEAN:  # Q smoothing: this block's own mean, kept for the kernel's correction term
        count = tl.minimum(N - pid_n * GRAN, GRAN).to(tl.float32)
        xbar = tl.sum(x, axis=0) / count
        tl.store(XBAR + b * stride_bb + h * stride_bh + pid_n * stride_bn + cols, xbar)
        x = tl.where(mask, x - xbar[None, :], 0.0)
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    if FMT == 0:
        scale = amax / 127.0
    elif FMT == 1:
        scale = amax / 448.0
    else:
        scale = amax / 2688.0  # the block's largest group scale lands on e4m3's 448
    scale = tl.where(scale > 0, scale, 1.0)
    y = x / scale
    if FMT == 2:
        packed, gs = quantize_groups(y, GRAN, BLOCK_D, EMULATE)
        pcols = tl.arange(0, BLOCK_D // 2)
        gcols = tl.arange(0, BLOCK_D // 16)
        tl.store(XQ + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + pcols[None, :], packed,
                 mask=rmask[:, None])
        tl.store(XG + b * stride_gb + h * stride_gh + rows[:, None] * stride_gn + gcols[None, :], gs,
                 mask=rmask[:, None])
    elif FMT == 0:  # round half away from zero, as the reference
        y = tl.where(y >= 0, y + 0.5, y - 0.5)
        y = tl.minimum(tl.maximum(y, -127.0), 127.0)
        yq = y.to(tl.int8)
    else:
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
        yq = to_e4m3(y, EMULATE)
    if FMT != 2:
        tl.store(XQ + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + cols[None, :], yq,
                 mask=rmask[:, None])
    tl.store(XS + b * stride_sb + h * stride_sh + pid_n, scale)


@triton.jit
def _quant_rows_kernel(
    X, stride_xb, stride_xh, stride_xn, stride_xd,
    MEAN, stride_mb, stride_mh, stride_md,
    XQ, stride_qb, stride_qh, stride_qn,
    XS, stride_sb, stride_sh,
    XBAR, stride_bb, stride_bh, stride_bn,
    XG, stride_gb, stride_gh, stride_gn,
    BAD, stride_fb, stride_fh,
    N, D, mult,
    GRAN: tl.constexpr, BLOCK_D: tl.constexpr, FMT: tl.constexpr,
    SUB_MEAN: tl.constexpr, BLOCK_MEAN: tl.constexpr, HAS_BAD: tl.constexpr, EMULATE: tl.constexpr,
):
    """One program: `_quant_rows` for GRAN rows of one (batch, head) (one tensor on its own)."""
    h = tl.program_id(1)
    _quant_rows(X, stride_xb, stride_xh, stride_xn, stride_xd, MEAN, stride_mb, stride_mh, stride_md,
                XQ, stride_qb, stride_qh, stride_qn, XS, stride_sb, stride_sh, XBAR, stride_bb, stride_bh, stride_bn,
                XG, stride_gb, stride_gh, stride_gn, BAD, stride_fb, stride_fh, XS, 0, 0,
                tl.program_id(0), h, tl.program_id(2), h, N, D, mult,
                GRAN, BLOCK_D, FMT, SUB_MEAN, BLOCK_MEAN, HAS_BAD, False, EMULATE)


@triton.jit
def _quant_v(
    V, stride_vb, stride_vh, stride_vn, stride_vd,
    VMEAN, VSCALE, stride_cb, stride_ch,
    VQ, stride_qb, stride_qh, stride_qd,
    VG, stride_gb, stride_gh, stride_gd,
    pid_n, h, b, N, D,
    FP4: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EMULATE: tl.constexpr,
):
    """BLOCK_N keys of one (batch, head): (V - mean) / per-channel scale, stored transposed (keys
    contiguous: the K-major layout an 8-bit or 4-bit P.V dot wants for its second operand); tail
    keys are zeros. FP8: e4m3 [D, Npad]. FP4 (NVFP4, groups of 16 keys, P.V's reduction dim):
    codes [D, Npad / 2], keys packed, and e4m3 group scales [D, Npad / 16] in VG."""
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    mask = (rows < N)[:, None] & cmask[None, :]
    v = tl.load(V + b * stride_vb + h * stride_vh + rows[:, None] * stride_vn + cols[None, :] * stride_vd,
                mask=mask, other=0.0).to(tl.float32)
    v = tl.where((v == v) & (tl.abs(v) != float("inf")), v, 0.0)
    mean = tl.load(VMEAN + b * stride_cb + h * stride_ch + cols, mask=cmask, other=0.0)
    scale = tl.load(VSCALE + b * stride_cb + h * stride_ch + cols, mask=cmask, other=1.0)
    y = tl.where(mask, (v - mean[None, :]) / scale[None, :], 0.0)
    if FP4:
        packed, gs = quantize_groups(tl.trans(y), BLOCK_D, BLOCK_N, EMULATE)
        pk = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        gk = pid_n * (BLOCK_N // 16) + tl.arange(0, BLOCK_N // 16)
        tl.store(VQ + b * stride_qb + h * stride_qh + cols[:, None] * stride_qd + pk[None, :], packed)
        tl.store(VG + b * stride_gb + h * stride_gh + cols[:, None] * stride_gd + gk[None, :], gs)
    else:
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
        tl.store(VQ + b * stride_qb + h * stride_qh + cols[None, :] * stride_qd + rows[:, None],
                 to_e4m3(y, EMULATE))


@triton.jit
def _quant_qkv_kernel(
    Q, stride_qb, stride_qh, stride_qn, stride_qd,
    QQ, stride_qqb, stride_qqh, stride_qqn,
    QS, stride_qsb, stride_qsh,
    QBAR, stride_qbb, stride_qbh, stride_qbn,
    QG, stride_qgb, stride_qgh, stride_qgn,
    BADQ, stride_bqb, stride_bqh,
    QKM, stride_qkmb, stride_qkmh,
    K, stride_kb, stride_kh, stride_kn, stride_kd,
    KQ, stride_kqb, stride_kqh, stride_kqn,
    KS, stride_ksb, stride_ksh,
    KG, stride_kgb, stride_kgh, stride_kgn,
    KMEAN, stride_kmb, stride_kmh,
    V, stride_vb, stride_vh, stride_vn, stride_vd,
    VMEAN, VSCALE, stride_vcb, stride_vch,
    VQ, stride_vqb, stride_vqh, stride_vqd,
    VG, stride_vgb, stride_vgh, stride_vgd,
    NQP, NKP, NBQ, NBK, NBV, GROUP, NQ, NK, D, DV, q_mult, GATE, GATE_ID,
    QK_FMT: tl.constexpr, V_FMT: tl.constexpr, SMOOTH_K: tl.constexpr, SMOOTH_Q: tl.constexpr,
    ROW_DOT: tl.constexpr, Q_GRAN: tl.constexpr, K_GRAN: tl.constexpr, V_BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, EMULATE: tl.constexpr, HAS_GATE: tl.constexpr,
):
    """Q, K and V quantized in one launch (the op's second): programs [0, NQP) take Q blocks
    (NBQ per query head), [NQP, NQP + NKP) K blocks (NBK per kv head), the rest V blocks (NBV per
    kv head, V_FMT 1: FP8, 2: NVFP4; 0: V stays 16-bit and has none). QK_FMT 3 ("none"): Q and
    K stay 16-bit and have no programs (NQP = NKP = 0). K's mean and V's mean and scale come from
    the statistics kernel; BADQ gets Q's non-finite rows (K's and V's came with the statistics).
    HAS_GATE: a scheduled site's variant, run only when GATE holds GATE_ID (else exit at once)."""
    if HAS_GATE:
        if tl.load(GATE) != GATE_ID:
            return
    pid = tl.program_id(0)
    b = tl.program_id(1)
    if pid < NQP:
        if QK_FMT != 3:
            h = pid // NBQ
            _quant_rows(Q, stride_qb, stride_qh, stride_qn, stride_qd, KMEAN, stride_kmb, stride_kmh, 1,
                        QQ, stride_qqb, stride_qqh, stride_qqn, QS, stride_qsb, stride_qsh,
                        QBAR, stride_qbb, stride_qbh, stride_qbn, QG, stride_qgb, stride_qgh, stride_qgn,
                        BADQ, stride_bqb, stride_bqh, QKM, stride_qkmb, stride_qkmh,
                        pid % NBQ, h, b, h // GROUP, NQ, D, q_mult,
                        Q_GRAN, BLOCK_D, QK_FMT, False, SMOOTH_Q, True, ROW_DOT, EMULATE)
    elif pid < NQP + NKP:
        if QK_FMT != 3:
            pk = pid - NQP
            h = pk // NBK
            _quant_rows(K, stride_kb, stride_kh, stride_kn, stride_kd, KMEAN, stride_kmb, stride_kmh, 1,
                        KQ, stride_kqb, stride_kqh, stride_kqn, KS, stride_ksb, stride_ksh,
                        KS, 0, 0, 0, KG, stride_kgb, stride_kgh, stride_kgn,
                        KS, 0, 0, KS, 0, 0,
                        pk % NBK, h, b, h, NK, D, 1.0,
                        K_GRAN, BLOCK_D, QK_FMT, SMOOTH_K, False, False, False, EMULATE)
    else:
        if V_FMT != 0:
            pv = pid - NQP - NKP
            _quant_v(V, stride_vb, stride_vh, stride_vn, stride_vd, VMEAN, VSCALE, stride_vcb, stride_vch,
                     VQ, stride_vqb, stride_vqh, stride_vqd, VG, stride_vgb, stride_vgh, stride_vgd,
                     pv % NBV, pv // NBV, b, NK, DV, V_FMT == 2, V_BLOCK_N, BLOCK_DV, EMULATE)


def padded_head_dim(d: int) -> int:
    """Head dims are padded (with zeros) to a power of two >= 32: 8-bit dots need K >= 32."""
    return max(32, triton.next_power_of_2(d))


def fp4_head_dim(d: int) -> int:
    """NVFP4 operands: head dims padded to a power of two >= 64 (one scaled-MMA K step)."""
    return max(64, padded_head_dim(d))


def quantize_rows_triton(x: torch.Tensor, gran: int, fmt: str, mult: float = 1.0,
                         mean: torch.Tensor | None = None, block_mean: bool = False,
                         bad: torch.Tensor | None = None):
    """x [B, H, N, D] -> (xq [B, H, N, BLOCK_D], scales [B, H, nb] fp32, block means or None);
    for "fp4", xq is (packed codes [B, H, N, BLOCK_D / 2], e4m3 group scales [B, H, N, BLOCK_D / 16]).
    `bad` (uint8 [B, H, N], optional) receives 1 for each row of x holding a NaN or an Inf."""
    b, h, n, d = x.shape
    bd = fp4_head_dim(d) if fmt == "fp4" else padded_head_dim(d)
    nb = triton.cdiv(n, gran)
    if fmt == "fp4":
        xq = torch.empty(b, h, n, bd // 2, dtype=torch.uint8, device=x.device)
        xg = torch.empty(b, h, n, bd // 16, dtype=torch.float8_e4m3fn, device=x.device)
    else:
        dtype = torch.int8 if fmt == "int8" else torch.float8_e4m3fn
        xq = torch.empty(b, h, n, bd, dtype=dtype, device=x.device)
        xg = xq
    xs = torch.empty(b, h, nb, dtype=torch.float32, device=x.device)
    xbar = torch.empty(b, h, nb, bd, dtype=torch.float32, device=x.device) if block_mean else xs
    m = mean if mean is not None else xs
    m_strides = (m.stride(0), m.stride(1), m.stride(-1)) if mean is not None else (0, 0, 0)
    bar_strides = (xbar.stride(0), xbar.stride(1), xbar.stride(2)) if block_mean else (0, 0, 0)
    wrap_triton(_quant_rows_kernel)[(nb, h, b)](
        x, *x.stride(),
        m, *m_strides,
        xq, xq.stride(0), xq.stride(1), xq.stride(2),
        xs, xs.stride(0), xs.stride(1),
        xbar, *bar_strides,
        xg, xg.stride(0), xg.stride(1), xg.stride(2),
        bad if bad is not None else xs, *((bad.stride(0), bad.stride(1)) if bad is not None else (0, 0)),
        n, d, float(mult),
        GRAN=gran, BLOCK_D=bd, FMT=FORMATS[fmt],
        SUB_MEAN=mean is not None, BLOCK_MEAN=block_mean, HAS_BAD=bad is not None, EMULATE=casts.EMULATE,
    )
    return (xq, xg) if fmt == "fp4" else xq, xs, (xbar if block_mean else None)


class Quantized(NamedTuple):
    """What the attention kernel reads of Q, K and V. Absent pieces are None: the 16-bit Q / K of
    quant "none" are the caller's tensors (q, k) with no scales; 16-bit V is the caller's (v)."""

    q: torch.Tensor
    qs: torch.Tensor | None  # per-block scales [B, Hq, nbq]
    qbar: torch.Tensor | None  # Q smoothing's block means [B, Hq, nbq, BLOCK_D]
    qg: torch.Tensor | None  # NVFP4 group scales
    bad_q: torch.Tensor | None  # uint8 [B, Hq, Nq]: rows of Q holding a non-finite value
    qkm: torch.Tensor | None  # fp32 [B, Hq, Nq]: each Q row . mean(K) (the logit shift K smoothing makes)
    k: torch.Tensor
    ks: torch.Tensor | None
    kg: torch.Tensor | None
    v: torch.Tensor
    vg: torch.Tensor | None


def kv_stats(k: torch.Tensor, v: torch.Tensor, k_mean: bool, v_mean: bool, v_qmax: float | None,
             gate: torch.Tensor | None = None, gate_id: int = 0):
    """One launch over K and V -> (kmean [B, Hkv, D] (zeros without `k_mean`), vmean [B, Hkv, Dv]
    or None, vscale [B, Hkv, Dv] (max |V - mean| / v_qmax) or None, bad_kv uint8 [B, Hkv, Nk]).
    Each non-finite value counts as 0; bad_kv flags the keys whose K or V row holds one. Long
    keys run as several chunks per (batch, kv head), merged in the launch (stats.py). `gate`:
    the launch runs only when it holds `gate_id` (launch.attention_triton)."""
    b, h, n, d = k.shape
    dv = v.shape[3]
    v_mean = v_mean or v_qmax is not None
    kmean = torch.empty(b, h, d, dtype=torch.float32, device=k.device)
    vmean = torch.empty(b, h, dv, dtype=torch.float32, device=k.device) if v_mean else None
    vscale = torch.empty(b, h, dv, dtype=torch.float32, device=k.device) if v_qmax is not None else None
    bad_kv = torch.empty(b, h, n, dtype=torch.uint8, device=k.device)
    vc = vmean if vmean is not None else kmean
    bd, bdv = padded_head_dim(d), padded_head_dim(dv)
    block_n = stats_block_n(bd, bdv)
    chunks, chunk_len = stats_chunks(n, block_n)
    if chunks > 1:  # each chunk's partials (stats.py) and a ticket counter per (batch, kv head)
        part = torch.empty(b * h * chunks * (bd + 3 * bdv), dtype=torch.float32, device=k.device)
        counters = tile_counters(k, b * h)
    else:
        part = counters = kmean  # unused
    wrap_triton(_kv_stats_kernel)[(chunks, h, b)](
        k, *k.stride(), v, *v.stride(),
        kmean, kmean.stride(0), kmean.stride(1),
        vc, vscale if vscale is not None else vc, vc.stride(0), vc.stride(1),
        bad_kv, bad_kv.stride(0), bad_kv.stride(1),
        part, counters,
        n, d, dv, float(v_qmax or 1.0), chunk_len, chunks, gate if gate is not None else kmean, int(gate_id),
        K_MEAN=bool(k_mean), V_MEAN=bool(v_mean), V_SCALE=v_qmax is not None, CHUNKED=chunks > 1,
        BLOCK_N=block_n, BLOCK_D=bd, BLOCK_DV=bdv, HAS_GATE=gate is not None,
    )
    return kmean, vmean, vscale, bad_kv


def _strides(t: torch.Tensor | None, n: int) -> tuple:
    return tuple(t.stride()[:n]) if t is not None else (0,) * n


def quantize_qkv(q, k, v, kmean, vmean, vscale, scale: float, quant: str, pv: str, smooth_k: bool,
                 smooth_q: bool, row_dot: bool, block_d: int, block_dv: int, gate: torch.Tensor | None = None,
                 gate_id: int = 0) -> Quantized:
    """Q (scale * log2(e) folded, optionally block-smoothed, its non-finite rows flagged and, with
    `row_dot`, each row's dot with K's mean), K (mean-smoothed) and, for FP8 / NVFP4 P.V, V
    (smoothed, per-channel scaled, transposed) in one launch; none when nothing is quantized.
    kmean / vmean / vscale come from `kv_stats`; `gate` as there."""
    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    dev = q.device
    quantize_qk = quant != "none"
    smooth_q = smooth_q and quantize_qk
    row_dot = row_dot and quantize_qk
    qq = qs = qbar = qg = bad_q = qkm = kq = ks = kg = vq = vg = None
    nbq = triton.cdiv(nq, Q_GRAN) if quantize_qk else 0
    nbk = triton.cdiv(nk, K_GRAN) if quantize_qk else 0
    if quantize_qk:
        for_q = (b, hq, nq)
        for_k = (b, hkv, nk)
        if quant == "fp4":
            qq = torch.empty(*for_q, block_d // 2, dtype=torch.uint8, device=dev)
            qg = torch.empty(*for_q, block_d // 16, dtype=torch.float8_e4m3fn, device=dev)
            kq = torch.empty(*for_k, block_d // 2, dtype=torch.uint8, device=dev)
            kg = torch.empty(*for_k, block_d // 16, dtype=torch.float8_e4m3fn, device=dev)
        else:
            dtype = torch.int8 if quant == "int8" else torch.float8_e4m3fn
            qq = torch.empty(*for_q, block_d, dtype=dtype, device=dev)
            kq = torch.empty(*for_k, block_d, dtype=dtype, device=dev)
        qs = torch.empty(b, hq, nbq, dtype=torch.float32, device=dev)
        ks = torch.empty(b, hkv, nbk, dtype=torch.float32, device=dev)
        qbar = torch.empty(b, hq, nbq, block_d, dtype=torch.float32, device=dev) if smooth_q else None
        bad_q = torch.empty(b, hq, nq, dtype=torch.uint8, device=dev)
        qkm = torch.empty(b, hq, nq, dtype=torch.float32, device=dev) if row_dot else None
    npad = triton.cdiv(max(nk, 1), V_PAD) * V_PAD
    nbv = npad // V_BLOCK_N if pv in ("fp8", "fp4") else 0
    if pv == "fp8":
        vq = torch.empty(b, hkv, block_dv, npad, dtype=torch.float8_e4m3fn, device=dev)
    elif pv == "fp4":
        vq = torch.empty(b, hkv, block_dv, npad // 2, dtype=torch.uint8, device=dev)
        vg = torch.empty(b, hkv, block_dv, npad // 16, dtype=torch.float8_e4m3fn, device=dev)
    out = Quantized(qq if quantize_qk else q, qs, qbar, qg, bad_q, qkm, kq if quantize_qk else k, ks, kg,
                    vq if vq is not None else v, vg)
    nqp, nkp, nvp = nbq * hq, nbk * hkv, nbv * hkv
    if nqp + nkp + nvp == 0:
        return out
    any_ = qs if qs is not None else vq  # placeholder for pointers a variant never reads
    vc = vmean if vmean is not None else any_

    def ptr(t):
        return t if t is not None else any_

    wrap_triton(_quant_qkv_kernel)[(nqp + nkp + nvp, b)](
        q, *q.stride(),
        ptr(qq), *_strides(qq, 3), ptr(qs), *_strides(qs, 2), ptr(qbar), *_strides(qbar, 3),
        ptr(qg), *_strides(qg, 3), ptr(bad_q), *_strides(bad_q, 2), ptr(qkm), *_strides(qkm, 2),
        k, *k.stride(),
        ptr(kq), *_strides(kq, 3), ptr(ks), *_strides(ks, 2), ptr(kg), *_strides(kg, 3),
        kmean, kmean.stride(0), kmean.stride(1),
        v, *v.stride(),
        vc, ptr(vscale), vc.stride(0), vc.stride(1),
        ptr(vq), *_strides(vq, 3), ptr(vg), *_strides(vg, 3),
        nqp, nkp, nbq, nbk, nbv, hq // hkv, nq, nk, d, dv, float(scale * LOG2E),
        gate if gate is not None else kmean, int(gate_id),
        QK_FMT=QK_FORMATS_Q[quant], V_FMT={"fp8": 1, "fp4": 2}.get(pv, 0), SMOOTH_K=bool(smooth_k),
        SMOOTH_Q=smooth_q, ROW_DOT=row_dot, Q_GRAN=Q_GRAN, K_GRAN=K_GRAN, V_BLOCK_N=V_BLOCK_N,
        BLOCK_D=block_d, BLOCK_DV=block_dv, EMULATE=casts.EMULATE, HAS_GATE=gate is not None,
    )
    return out


def quantize_v_fp8(v: torch.Tensor):
    """V [B, H, N, Dv] -> (vq [B, H, BLOCK_DV, Npad] e4m3, scale [B, H, Dv], mean [B, H, Dv]):
    V's part of the op's statistics and quantize launches, on its own (tests)."""
    _, vmean, vscale, _ = kv_stats(v, v, False, True, FP8_MAX)
    d = padded_head_dim(v.shape[-1])
    qv = quantize_qkv(v, v, v, vmean, vmean, vscale, 1.0, "none", "fp8", False, False, False, d, d)
    return qv.v, vscale, vmean


def quantize_v_fp4(v: torch.Tensor, block_dv: int):
    """V [B, H, N, Dv] -> (codes [B, H, block_dv, Npad / 2] uint8, e4m3 group scales
    [B, H, block_dv, Npad / 16], per-channel scale [B, H, Dv], mean [B, H, Dv]) (tests)."""
    _, vmean, vscale, _ = kv_stats(v, v, False, True, P_SCALE)
    d = padded_head_dim(v.shape[-1])
    qv = quantize_qkv(v, v, v, vmean, vmean, vscale, 1.0, "none", "fp4", False, False, False, d, block_dv)
    return qv.v, qv.vg, vscale, vmean
