"""Fused quantize kernels for attention: Q and K to per-block INT8 / FP8 / NVFP4, V to
per-channel FP8 or NVFP4.

Q: `scale * log2(e)` folded in (the attention kernel works in the exp2 domain), optionally each
block's mean subtracted (Q smoothing; the means are written out for the kernel's correction
term). K: its token mean subtracted first (K smoothing, exact under softmax). Outputs are padded
to BLOCK_D columns with zeros, head dim contiguous (K-major for the QK^T dot), and never alias
the caller's tensors. The arithmetic is exactly attention_ref.quantize_rows (INT8 / FP8) and
nvfp4.quantize_rows (NVFP4: packed e2m1 codes [.., N, BLOCK_D / 2] and e4m3 group scales
[.., N, BLOCK_D / 16] beside the per-block fp32 scale).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ...ops.attention_ref import FP8_MAX, K_GRAN, LOG2E, Q_GRAN, finite_or_zero
from ...ops.nvfp4 import P_SCALE
from .. import casts
from ..casts import to_e4m3
from ..microscaling import quantize_groups

FMT_INT8, FMT_FP8, FMT_FP4 = 0, 1, 2
FORMATS = {"int8": FMT_INT8, "fp8": FMT_FP8, "fp4": FMT_FP4}
V_PAD = 128  # token padding of the transposed FP8 V (covers every BLOCK_N; 16-byte aligned rows)


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
    """One program quantizes GRAN rows of one (batch, head): [GRAN, D] -> int8/fp8 + one scale,
    or (NVFP4) packed e2m1 + e4m3 group scales + one fp32 scale. A non-finite value counts as 0
    everywhere (scale, block mean, codes); with HAS_BAD, BAD gets 1 for each row that held one."""
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
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
    if SUB_MEAN:  # K smoothing: the token mean of this (batch, head), per channel
        mean = tl.load(MEAN + b * stride_mb + h * stride_mh + cols * stride_md, mask=cmask, other=0.0)
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
def _quant_v_kernel(
    V, stride_vb, stride_vh, stride_vn, stride_vd,
    VMEAN, VSCALE, stride_cb, stride_ch,
    VQ, stride_qb, stride_qh, stride_qd,
    VG, stride_gb, stride_gh, stride_gd,
    N, D,
    FP4: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EMULATE: tl.constexpr,
):
    """(V - mean) / per-channel scale, stored transposed (keys contiguous: the K-major layout an
    8-bit or 4-bit P.V dot wants for its second operand); tail keys are zeros. FP8: e4m3
    [D, Npad]. FP4 (NVFP4, groups of 16 keys, P.V's reduction dim): codes [D, Npad / 2], keys
    packed, and e4m3 group scales [D, Npad / 16] in VG."""
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
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


def quantize_qk(q, k, scale: float, fmt: str, smooth_k: bool, smooth_q: bool, bad_q=None, bad_k=None):
    """Q with scale*log2(e) folded (and optionally block-smoothed), K mean-smoothed; per block.
    K's token mean, the scales and Q's block means count a non-finite value as 0; bad_q / bad_k
    (uint8 [B, H, N], optional) receive the rows that held one."""
    kmean = finite_or_zero(k).mean(dim=-2) if smooth_k else None  # [B, Hkv, D]
    qq, qs, qbar = quantize_rows_triton(q, Q_GRAN, fmt, mult=scale * LOG2E, block_mean=smooth_q, bad=bad_q)
    kq, ks, _ = quantize_rows_triton(k, K_GRAN, fmt, mean=kmean, bad=bad_k)
    return qq, qs, qbar, kq, ks, kmean


def _v_mean_scale(v: torch.Tensor, qmax: float):
    """V's per-channel token mean and the scale of (V - mean) that maps its max to qmax."""
    vf = finite_or_zero(v)
    vmean = vf.mean(dim=-2)
    amax = (vf - vmean[:, :, None, :]).abs().amax(dim=-2)
    vscale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax)).contiguous()
    return vmean.contiguous(), vscale


def quantize_v_fp8(v: torch.Tensor):
    """V [B, H, N, Dv] -> (vq [B, H, BLOCK_DV, Npad] e4m3, scale [B, H, Dv], mean [B, H, Dv])."""
    b, h, n, d = v.shape
    vmean, vscale = _v_mean_scale(v, FP8_MAX)
    bd = padded_head_dim(d)
    npad = triton.cdiv(max(n, 1), V_PAD) * V_PAD
    vq = torch.empty(b, h, bd, npad, dtype=torch.float8_e4m3fn, device=v.device)
    block_n = 64
    wrap_triton(_quant_v_kernel)[(triton.cdiv(npad, block_n), h, b)](
        v, *v.stride(),
        vmean, vscale, vmean.stride(0), vmean.stride(1),
        vq, vq.stride(0), vq.stride(1), vq.stride(2),
        vq, 0, 0, 0,
        n, d, FP4=False, BLOCK_N=block_n, BLOCK_D=bd, EMULATE=casts.EMULATE,
    )
    return vq, vscale, vmean



def quantize_v_fp4(v: torch.Tensor, block_dv: int):
    """V [B, H, N, Dv] -> (codes [B, H, block_dv, Npad / 2] uint8, e4m3 group scales
    [B, H, block_dv, Npad / 16], per-channel scale [B, H, Dv], mean [B, H, Dv])."""
    b, h, n, d = v.shape
    vmean, vscale = _v_mean_scale(v, P_SCALE)
    npad = triton.cdiv(max(n, 1), V_PAD) * V_PAD
    vq = torch.empty(b, h, block_dv, npad // 2, dtype=torch.uint8, device=v.device)
    vg = torch.empty(b, h, block_dv, npad // 16, dtype=torch.float8_e4m3fn, device=v.device)
    block_n = 64
    wrap_triton(_quant_v_kernel)[(triton.cdiv(npad, block_n), h, b)](
        v, *v.stride(),
        vmean, vscale, vmean.stride(0), vmean.stride(1),
        vq, vq.stride(0), vq.stride(1), vq.stride(2),
        vg, vg.stride(0), vg.stride(1), vg.stride(2),
        n, d, FP4=True, BLOCK_N=block_n, BLOCK_D=block_dv, EMULATE=casts.EMULATE,
    )
    return vq, vg, vscale, vmean
