"""Where the INT8 / FP8 linear kernels are: W8A8 and FP8 GEMMs and their small-M path.

- `_quant_act_kernel`: per-token activation quantization (the fused pre-kernel: one read of x,
  one write of 8-bit x and its row scales).
- `_gemm_8bit_kernel`: 8-bit x 8-bit dot, int32 (INT8) or fp32 (FP8) accumulation, epilogue
  `acc * s_x * s_w + bias` cast to the output dtype, grouped tile order for L2 reuse. Weights are
  stored [N, K] (K contiguous): the K-major layout 8-bit tensor-core operands want.
- `_wonly_kernel`: small M (decode, conditioning): the activation stays 16-bit, the weight is
  dequantized in registers, K split across programs so a few rows still fill the GPU.
The arithmetic is ops/linear_ref's.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .. import casts
from ..arch import ARCHS, GemmTile, autotune_bucket
from ..casts import store_cast, to_16bit, to_e4m3
from ...switches import interpreted


@triton.jit
def _quant_act_kernel(X, stride_xm, stride_xk, XQ, stride_qm, XS, K,
                      BLOCK_K: tl.constexpr, FMT: tl.constexpr, EMULATE: tl.constexpr):
    """One program per row: max |x| over K, then x / scale rounded to 8 bits. When the row fits
    one block (BLOCK_K >= K, up to 8192) it is read once and kept in registers."""
    row = tl.program_id(0)
    kk = tl.arange(0, BLOCK_K)
    x = tl.load(X + row * stride_xm + kk * stride_xk, mask=kk < K, other=0.0).to(tl.float32)
    amax = tl.abs(x)
    for k0 in range(BLOCK_K, K, BLOCK_K):  # rows longer than one block: the rest of the max
        kk = k0 + tl.arange(0, BLOCK_K)
        amax = tl.maximum(amax, tl.abs(tl.load(X + row * stride_xm + kk * stride_xk, mask=kk < K,
                                               other=0.0).to(tl.float32)))
    m = tl.max(amax, 0)
    if FMT == 0:
        scale = m / 127.0
    else:
        scale = m / 448.0
    scale = tl.where(scale > 0, scale, 1.0)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        if BLOCK_K < K:  # several blocks: read this one again
            x = tl.load(X + row * stride_xm + kk * stride_xk, mask=kk < K, other=0.0).to(tl.float32)
        y = x / scale
        if FMT == 0:
            y = tl.minimum(tl.maximum(tl.where(y >= 0, y + 0.5, y - 0.5), -127.0), 127.0)
            tl.store(XQ + row * stride_qm + kk, y.to(tl.int8), mask=kk < K)
        else:
            y = tl.minimum(tl.maximum(y, -448.0), 448.0)
            tl.store(XQ + row * stride_qm + kk, to_e4m3(y, EMULATE), mask=kk < K)
    tl.store(XS + row, scale)


@triton.jit
def _gemm_8bit_kernel(A, stride_am, stride_ak, B, stride_bn, stride_bk, C, stride_cm, stride_cn,
                      AS, BS, BIAS, M, N, K, M_BUCKET,
                      FMT: tl.constexpr, HAS_BIAS: tl.constexpr, EMULATE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)  # grouped order: a band of GROUP_M row-tiles walks all columns
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % size_m)
    pid_n = (pid % (GROUP_M * num_n)) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk  # [BLOCK_K, BLOCK_N], K-major
    if FMT == 0:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=(offs_m < M)[:, None] & kmask[None, :], other=0.0 if FMT == 1 else 0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & (offs_n < N)[None, :], other=0.0 if FMT == 1 else 0)
        acc += tl.dot(a, b)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    a_s = tl.load(AS + offs_m, mask=offs_m < M, other=0.0)
    b_s = tl.load(BS + offs_n, mask=offs_n < N, other=0.0)
    out = acc.to(tl.float32) * a_s[:, None] * b_s[None, :]
    if HAS_BIAS:
        out += tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(C + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, store_cast(out, C.dtype.element_ty, EMULATE),
             mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit
def _wonly_kernel(X, stride_xm, stride_xk, W, stride_wn, stride_wk, WS, P, stride_ps, stride_pm, M, N, K,
                  K_PER_SPLIT, ACT: tl.constexpr, EMULATE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Small M: partial sums of x (16-bit) and the dequantized 8-bit weight over one K split."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ws = tl.load(WS + offs_n, mask=offs_n < N, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = split * K_PER_SPLIT
    for k0 in range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=(offs_m < M)[:, None] & (kk < K)[None, :], other=0.0)
        w = tl.load(W + offs_n[None, :] * stride_wn + kk[:, None] * stride_wk,
                    mask=(kk < K)[:, None] & (offs_n < N)[None, :], other=0.0).to(tl.float32)
        w = to_16bit(w * ws[None, :], ACT, EMULATE)  # dequantized to the activation's dtype
        acc = tl.dot(to_16bit(x, ACT, EMULATE), w, acc)
    tl.store(P + split * stride_ps + offs_m[:, None] * stride_pm + offs_n[None, :], acc,
             mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


def _act_dtype(x: torch.Tensor):
    return tl.float16 if x.dtype == torch.float16 else tl.bfloat16


@functools.lru_cache(maxsize=None)
def autotuned_gemm(arch: str):
    """_gemm_8bit_kernel autotuned over the arch table's GEMM tiles, per power-of-two M bucket."""
    configs = [triton.Config({"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "BLOCK_K": t.block_k, "GROUP_M": t.group_m},
                             num_warps=t.warps, num_stages=t.stages) for t in ARCHS[arch].gemm_tiles]
    return triton.autotune(configs=configs, key=["M_BUCKET", "N", "K", "FMT", "HAS_BIAS"])(_gemm_8bit_kernel)


def linear_8bit_triton(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None, fmt: str,
                       arch: str, small_m: int = 16, tile: GemmTile | None = None) -> torch.Tensor:
    """y = x W^T + b, W 8-bit per channel; x quantized per token unless M <= small_m. On a GPU
    the GEMM is autotuned over the arch's tiles unless `tile` forces one; on CPU tensors
    (compile checks) it runs `tile` or the table's first; the interpreter runs a small fixed
    tile (speed)."""
    shape = x.shape
    k = shape[-1]
    x2 = x.reshape(-1, k)
    m, n = x2.shape[0], wq.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*shape[:-1], n)
    if m <= small_m:
        return _weight_only(x2, wq, ws, bias, out).reshape(*shape[:-1], n)
    dtype = torch.int8 if fmt == "int8" else torch.float8_e4m3fn
    xq = torch.empty(m, k, dtype=dtype, device=x.device)
    xs = torch.empty(m, dtype=torch.float32, device=x.device)
    block_k = min(8192, triton.next_power_of_2(k))
    wrap_triton(_quant_act_kernel)[(m,)](x2, x2.stride(0), x2.stride(1), xq, xq.stride(0), xs, k, BLOCK_K=block_k,
                                         FMT=0 if fmt == "int8" else 1, EMULATE=casts.EMULATE,
                                         num_warps=4 if block_k <= 2048 else 8)
    args = (xq, xq.stride(0), xq.stride(1), wq, wq.stride(0), wq.stride(1), out, out.stride(0), out.stride(1),
            xs, ws, bias if bias is not None else ws, m, n, k, autotune_bucket(m))
    consts = dict(FMT=0 if fmt == "int8" else 1, HAS_BIAS=bias is not None, EMULATE=casts.EMULATE)
    if interpreted():
        tile = GemmTile(32, 32, 32, 4, 1)
    elif tile is None and x.device.type != "cuda":
        tile = ARCHS[arch].gemm_tiles[0]
    if tile is None:
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        wrap_triton(autotuned_gemm(arch))[grid](*args, **consts)
    else:
        grid = (triton.cdiv(m, tile.block_m) * triton.cdiv(n, tile.block_n),)
        wrap_triton(_gemm_8bit_kernel)[grid](*args, **consts, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
                                             BLOCK_K=tile.block_k, GROUP_M=tile.group_m, num_warps=tile.warps,
                                             num_stages=tile.stages)
    return out.reshape(*shape[:-1], n)


def _weight_only(x2, wq, ws, bias, out):
    m, k = x2.shape
    n = wq.shape[0]
    block_n, block_k = 64, 64
    splits = max(1, min(16, k // (4 * block_k)))
    per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    splits = triton.cdiv(k, per_split)
    part = torch.empty(splits, m, n, dtype=torch.float32, device=x2.device)
    wrap_triton(_wonly_kernel)[(triton.cdiv(n, block_n), splits, triton.cdiv(m, 16))](
        x2, x2.stride(0), x2.stride(1), wq, wq.stride(0), wq.stride(1), ws, part, part.stride(0), part.stride(1),
        m, n, k, per_split, ACT=_act_dtype(x2), EMULATE=casts.EMULATE, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k)
    y = part.sum(dim=0)
    if bias is not None:
        y = y + bias.float()
    out.copy_(y)
    return out
