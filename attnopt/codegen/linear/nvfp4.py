"""Where the NVFP4 linear kernels are (`linear.quant = "nvfp4"`, W4A4, sm100 / sm120): the
activation quantizer and the block-scaled FP4 GEMM. The arithmetic is ops/linear_nvfp4_ref's.

- `_quant_act_nvfp4_kernel`: BLOCK_R rows per program; a first sweep over K for each row's max
  |x| (its outer scale, max / 2688, so the row's largest group scale lands on e4m3's 448), then
  a second that rounds x / outer to e2m1 codes (two per byte) with an e4m3 scale per 16, K padded
  with zeros to the weight's multiple of 16 (microscaling.quantize_groups: the attention's NVFP4
  rounding).
- `_nvfp4_gemm_kernel`: packed x [M, Kp / 2] times the packed weight [N, Kp / 2] (both K
  contiguous) with `tl.dot_scaled(..., "e2m1", ...)` and their e4m3 group scales
  (microscaling.fp4_dot; under the interpreter the operands are decoded and multiplied in fp32),
  fp32 accumulation, epilogue `acc * s_x[:, None] * s_w[None, :] + bias` cast to x's dtype,
  grouped tile order.

Two launches per call (quantize, then GEMM); the quantizer is not fused into the GEMM's prologue,
and every M takes the one GEMM (no split-K small-M path). One fixed tile, not autotuned: no
sm100 / sm120 GPU has timed this kernel yet, so nothing here claims a speed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .. import casts
from ..arch import GemmTile
from ..microscaling import fp4_dot, quantize_groups
from ...ops.linear_nvfp4_ref import GROUP
from ...switches import interpreted
from .splitk import store_output
from .tiles import grouped_tile

# K is 128 deep per step (two 64-deep scaled-MMA steps); a stage holds 2 x 128 x 64 packed bytes
# plus 2 x 128 x 8 scales (18 KB), so three stages fit the consumer parts' ~100 KB too. BLOCK_M
# stays 128 even for decode: compiled for sm100 (compile_check), 128 rows lower to tcgen05's
# kind::mxf4nvf4.block_scale.block16, while 64 rows fall back to an upcast kind::f16 MMA and 16
# rows to bf16 mma.sync.
NVFP4_TILE = GemmTile(128, 128, 128, 8, 3)
_INTERPRETER_TILE = GemmTile(32, 32, 64, 4, 1)  # speed under the interpreter
QUANT_ROWS = 16  # rows per quantizer program


@triton.jit
def _quant_act_nvfp4_kernel(X, stride_xm, stride_xk, XQ, stride_qm, XG, stride_gm, XO, M, K, KP,
                            BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, EMULATE: tl.constexpr):
    """x [M, K] (16- or 32-bit) -> packed codes [M, KP / 2], e4m3 group scales [M, KP / 16] and
    per-row outer scales [M]; columns K..KP are zeros."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rvalid = rows < M
    amax = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + rows[:, None] * stride_xm + kk[None, :] * stride_xk, mask=rvalid[:, None] & (kk < K)[None, :],
                    other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), 1))
    outer = tl.where(amax > 0, amax / 2688.0, 1.0)
    for k0 in range(0, KP, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + rows[:, None] * stride_xm + kk[None, :] * stride_xk, mask=rvalid[:, None] & (kk < K)[None, :],
                    other=0.0).to(tl.float32)
        packed, gs = quantize_groups(x / outer[:, None], BLOCK_R, BLOCK_K, EMULATE)
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        kg = k0 // 16 + tl.arange(0, BLOCK_K // 16)
        tl.store(XQ + rows[:, None] * stride_qm + kb[None, :], packed, mask=rvalid[:, None] & (kb < KP // 2)[None, :])
        tl.store(XG + rows[:, None] * stride_gm + kg[None, :], gs, mask=rvalid[:, None] & (kg < KP // 16)[None, :])
    tl.store(XO + rows, outer, mask=rvalid)


@triton.jit
def _nvfp4_gemm_kernel(A, stride_am, AG, stride_agm, AO, B, stride_bn, BG, stride_bgn, BO, C, stride_cm, stride_cn,
                       BIAS, M, N, KP, HAS_BIAS: tl.constexpr, EMULATE: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C = (A . B^T) * AO[:, None] * BO[None, :] + bias, A and B NVFP4 packed along K (KP deep,
    a multiple of 16; a partial last K block reads zero codes and scales)."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mvalid, nvalid = offs_m < M, offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, KP, BLOCK_K):
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        kg = k0 // 16 + tl.arange(0, BLOCK_K // 16)
        bvalid, gvalid = kb < KP // 2, kg < KP // 16
        a = tl.load(A + offs_m[:, None] * stride_am + kb[None, :], mask=mvalid[:, None] & bvalid[None, :], other=0)
        a_s = tl.load(AG + offs_m[:, None] * stride_agm + kg[None, :], mask=mvalid[:, None] & gvalid[None, :],
                      other=0.0)
        b = tl.load(B + offs_n[None, :] * stride_bn + kb[:, None], mask=bvalid[:, None] & nvalid[None, :], other=0)
        b_s = tl.load(BG + offs_n[:, None] * stride_bgn + kg[None, :], mask=nvalid[:, None] & gvalid[None, :],
                      other=0.0)
        acc += fp4_dot(a, a_s, b, b_s, BLOCK_M, BLOCK_K, BLOCK_N, EMULATE)
    a_o = tl.load(AO + offs_m, mask=mvalid, other=0.0)
    b_o = tl.load(BO + offs_n, mask=nvalid, other=0.0)
    out = acc * a_o[:, None] * b_o[None, :]
    store_output(out, C + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
                 mvalid[:, None] & nvalid[None, :], BIAS, offs_n, N, HAS_BIAS, EMULATE)


def quantize_act_nvfp4_triton(x2: torch.Tensor, kp: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] -> (packed [M, kp / 2] uint8, group scales [M, kp / 16] e4m3, outer [M] fp32)."""
    m, k = x2.shape
    xq = torch.empty(m, kp // 2, dtype=torch.uint8, device=x2.device)
    xg = torch.empty(m, kp // GROUP, dtype=torch.float8_e4m3fn, device=x2.device)
    xo = torch.empty(m, dtype=torch.float32, device=x2.device)
    block_k = max(GROUP, min(256, triton.next_power_of_2(kp)))
    wrap_triton(_quant_act_nvfp4_kernel)[(triton.cdiv(m, QUANT_ROWS),)](
        x2, x2.stride(0), x2.stride(1), xq, xq.stride(0), xg, xg.stride(0), xo, m, k, kp,
        BLOCK_R=QUANT_ROWS, BLOCK_K=block_k, EMULATE=casts.EMULATE, num_warps=4)
    return xq, xg, xo


def linear_nvfp4_triton(x: torch.Tensor, packed: torch.Tensor, gscale: torch.Tensor, outer: torch.Tensor,
                        bias: torch.Tensor | None, arch: str = "cpu", tile: GemmTile | None = None,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b with W NVFP4 (ops/linear_nvfp4_ref.quantize_weight_nvfp4) and x quantized per
    token to NVFP4 by the pre-kernel. `tile` forces a GEMM config (else NVFP4_TILE; the
    interpreter runs a small one); `out` [M, N] lets tests pass a poisoned buffer. `arch` is
    the target's row (the ops pass it; one tile serves sm100 and sm120 today)."""
    shape = x.shape
    k = shape[-1]
    x2 = x.reshape(-1, k)
    m, n, kp = x2.shape[0], packed.shape[0], packed.shape[1] * 2
    if -(-k // GROUP) * GROUP != kp:
        raise ValueError(f"x has {k} inputs, the NVFP4 weight {kp} (K padded to a multiple of {GROUP})")
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*shape[:-1], n)
    xq, xg, xo = quantize_act_nvfp4_triton(x2, kp)
    if interpreted():
        tile = _INTERPRETER_TILE
    elif tile is None:
        tile = NVFP4_TILE
    grid = (triton.cdiv(m, tile.block_m) * triton.cdiv(n, tile.block_n),)
    wrap_triton(_nvfp4_gemm_kernel)[grid](
        xq, xq.stride(0), xg, xg.stride(0), xo, packed, packed.stride(0), gscale, gscale.stride(0), outer,
        out, out.stride(0), out.stride(1), bias if bias is not None else outer, m, n, kp,
        HAS_BIAS=bias is not None, EMULATE=casts.EMULATE, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
        BLOCK_K=tile.block_k, GROUP_M=tile.group_m, num_warps=tile.warps, num_stages=tile.stages)
    return out.reshape(*shape[:-1], n)
