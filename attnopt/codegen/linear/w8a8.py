"""Where the INT8 / FP8 linear kernels are: W8A8 and FP8 GEMMs and their small-M path.

- `_gemm_8bit_kernel`: 8-bit x 8-bit dot, int32 (INT8) or fp32 (FP8) accumulation, epilogue
  `acc * s_x * s_w + bias` cast to the output dtype, grouped tile order for L2 reuse. Weights are
  stored [N, K] (K contiguous): the K-major layout 8-bit tensor-core operands want. The
  activation is quantized per token either in the GEMM's prologue (QUANT_A: a first sweep over
  K for each row's max |x|, then the dot sweep rounds x on the fly) or beforehand by
  `_quant_act_kernel` (one read of x, one write of 8-bit x and its row scales). Same rounding
  either way (`_row_scale`, `_round_8bit`), ops/linear_ref's.
- `_wonly_kernel`: small M (decode, conditioning): the activation stays 16-bit, the weight is
  dequantized in registers, K split across programs so a few rows still fill the GPU; the
  partial sums are added up in the kernel (splitk.py), bias and cast included: one launch.

Which quantization a GEMM-path call takes (`fuse_quantize`): the prologue costs each program an
extra sweep over its rows of x in 16 bits, and x is read again by every column tile (once per
N-tile: N / BLOCK_N times, from L2 after the first), besides rounding it again per column tile
on the CUDA cores. The pre-kernel costs a launch (a few microseconds of latency, and a
dependency the GEMM waits on) plus M x K x 3 bytes through HBM, after which the GEMM reads 8-bit x
once per N-tile. For M up to FUSED_QUANT_MAX_M rows the GEMM is bound by streaming the N x K
weight, x is a few hundred KB that stays in L2 and the rounding hides under the weight loads:
one launch wins. For prefill-sized M the GEMM is bound by tensor-core math and rounding x
N / BLOCK_N times over would compete with it: quantizing once first wins. (A model of the
GPU, not a measurement: no GPU was at hand when this was chosen.)
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .. import casts
from ..arch import ARCHS, FUSED_QUANT_MAX_M, GemmTile, autotune_bucket
from ..casts import to_16bit, to_e4m3
from ...switches import interpreted
from .tiles import grouped_tile
from .splitk import publish_partial, split_count, store_output, sum_partials, tile_counters

@triton.jit
def _row_scale(amax, FMT: tl.constexpr):
    """Per-token scale from a row's max |x|: max / 127 (INT8) or / 448 (e4m3); 1 for a zero row."""
    if FMT == 0:
        scale = amax / 127.0
    else:
        scale = amax / 448.0
    return tl.where(scale > 0, scale, 1.0)


@triton.jit
def _round_8bit(x, scale, FMT: tl.constexpr, EMULATE: tl.constexpr):
    """fp32 x / scale onto the 8-bit grid: INT8 rounds half away from zero, e4m3 to nearest even."""
    y = x / scale
    if FMT == 0:
        q = tl.minimum(tl.maximum(tl.where(y >= 0, y + 0.5, y - 0.5), -127.0), 127.0).to(tl.int8)
    else:
        q = to_e4m3(tl.minimum(tl.maximum(y, -448.0), 448.0), EMULATE)
    return q


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
    scale = _row_scale(tl.max(amax, 0), FMT)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        if BLOCK_K < K:  # several blocks: read this one again
            x = tl.load(X + row * stride_xm + kk * stride_xk, mask=kk < K, other=0.0).to(tl.float32)
        tl.store(XQ + row * stride_qm + kk, _round_8bit(x, scale, FMT, EMULATE), mask=kk < K)
    tl.store(XS + row, scale)


@triton.jit
def _gemm_8bit_kernel(A, stride_am, stride_ak, B, stride_bn, stride_bk, C, stride_cm, stride_cn,
                      AS, BS, BIAS, M, N, K, M_BUCKET,
                      FMT: tl.constexpr, HAS_BIAS: tl.constexpr, EMULATE: tl.constexpr, QUANT_A: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """QUANT_A: A is the 16-bit activation, quantized per row here (AS unused); otherwise A is
    the 8-bit activation and AS its row scales."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk  # [BLOCK_K, BLOCK_N], K-major
    if QUANT_A:  # prologue: each row's max |x| over K
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(a_ptrs + k0 * stride_ak, mask=(offs_m < M)[:, None] & ((k0 + offs_k) < K)[None, :],
                        other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), 1))
        a_s = _row_scale(amax, FMT)
    else:
        a_s = tl.load(AS + offs_m, mask=offs_m < M, other=0.0)
    if FMT == 0:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + offs_k) < K
        if QUANT_A:
            x = tl.load(a_ptrs, mask=(offs_m < M)[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            a = _round_8bit(x, a_s[:, None], FMT, EMULATE)
        else:
            a = tl.load(a_ptrs, mask=(offs_m < M)[:, None] & kmask[None, :], other=0.0 if FMT == 1 else 0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & (offs_n < N)[None, :], other=0.0 if FMT == 1 else 0)
        acc += tl.dot(a, b)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    b_s = tl.load(BS + offs_n, mask=offs_n < N, other=0.0)
    out = acc.to(tl.float32) * a_s[:, None] * b_s[None, :]
    store_output(out, C + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
                 (offs_m < M)[:, None] & (offs_n < N)[None, :], BIAS, offs_n, N, HAS_BIAS, EMULATE)


@triton.jit
def _wonly_kernel(X, stride_xm, stride_xk, W, stride_wn, stride_wk, WS, BIAS, OUT, stride_om, stride_on,
                  P, stride_ps, stride_pm, CNT, M, N, K, K_PER_SPLIT, SPLITS,
                  ACT: tl.constexpr, EMULATE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Small M: x (16-bit) times the dequantized 8-bit weight over one K split; with SPLIT the
    last split of a tile to finish adds the partials up (splitk.py) and stores the output."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
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
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    out_ptrs = OUT + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    if SPLIT:
        part = P + offs_m[:, None] * stride_pm + offs_n[None, :]
        counter = CNT + pid_m * tl.num_programs(0) + pid_n
        if publish_partial(acc, part + split * stride_ps, mask, counter) == SPLITS - 1:
            acc = sum_partials(part, stride_ps, mask, SPLITS, counter, BLOCK_M, BLOCK_N)
            store_output(acc, out_ptrs, mask, BIAS, offs_n, N, HAS_BIAS, EMULATE)
    else:
        store_output(acc, out_ptrs, mask, BIAS, offs_n, N, HAS_BIAS, EMULATE)


def _act_dtype(x: torch.Tensor):
    return tl.float16 if x.dtype == torch.float16 else tl.bfloat16


@functools.lru_cache(maxsize=None)
def autotuned_gemm(arch: str):
    """_gemm_8bit_kernel autotuned over the arch table's GEMM tiles, per power-of-two M bucket."""
    configs = [triton.Config({"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "BLOCK_K": t.block_k, "GROUP_M": t.group_m},
                             num_warps=t.warps, num_stages=t.stages) for t in ARCHS[arch].gemm_tiles]
    return triton.autotune(configs=configs, key=["M_BUCKET", "N", "K", "FMT", "HAS_BIAS", "QUANT_A"])(_gemm_8bit_kernel)


def fuse_quantize(m: int) -> bool:
    """Quantize the activation in the GEMM's prologue (one launch) rather than in a pre-kernel:
    for up to FUSED_QUANT_MAX_M rows (the module docstring says why)."""
    return m <= FUSED_QUANT_MAX_M


def linear_8bit_triton(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None, fmt: str,
                       arch: str, small_m: int = 16, tile: GemmTile | None = None, fuse: bool | None = None,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b, W 8-bit per channel; x quantized per token unless M <= small_m (then the
    weight-only split-K path). One launch, or two for M > FUSED_QUANT_MAX_M (`fuse` forces the
    choice); the only aten work is allocating (and, for x that cannot be viewed as rows, a copy
    by reshape). On a GPU the GEMM is autotuned over the arch's tiles unless `tile` forces one;
    on CPU tensors (compile checks) it runs `tile` or the table's first; the interpreter runs a
    small fixed tile (speed). `out` [M, N] lets tests pass a poisoned buffer."""
    shape = x.shape
    k = shape[-1]
    x2 = x.reshape(-1, k)
    m, n = x2.shape[0], wq.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*shape[:-1], n)
    if m <= small_m:
        return _weight_only(x2, wq, ws, bias, out).reshape(*shape[:-1], n)
    fmt_id = 0 if fmt == "int8" else 1
    fused = fuse_quantize(m) if fuse is None else fuse
    if fused:
        a, a_scales = x2, ws  # the GEMM quantizes x itself (a_scales unused)
    else:
        a = torch.empty(m, k, dtype=torch.int8 if fmt == "int8" else torch.float8_e4m3fn, device=x.device)
        a_scales = torch.empty(m, dtype=torch.float32, device=x.device)
        block_k = min(8192, triton.next_power_of_2(k))
        wrap_triton(_quant_act_kernel)[(m,)](x2, x2.stride(0), x2.stride(1), a, a.stride(0), a_scales, k,
                                             BLOCK_K=block_k, FMT=fmt_id, EMULATE=casts.EMULATE,
                                             num_warps=4 if block_k <= 2048 else 8)
    args = (a, a.stride(0), a.stride(1), wq, wq.stride(0), wq.stride(1), out, out.stride(0), out.stride(1),
            a_scales, ws, bias if bias is not None else ws, m, n, k, autotune_bucket(m))
    consts = dict(FMT=fmt_id, HAS_BIAS=bias is not None, EMULATE=casts.EMULATE, QUANT_A=fused)
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


WONLY_BLOCK_M, WONLY_BLOCK_N, WONLY_BLOCK_K = 16, 64, 64


def _weight_only(x2, wq, ws, bias, out):
    """One launch: split-K partials reduced in the kernel by each tile's last split (splitk.py)."""
    m, k = x2.shape
    n = wq.shape[0]
    splits, per_split = split_count(k, WONLY_BLOCK_K, WONLY_BLOCK_K)
    grid = (triton.cdiv(n, WONLY_BLOCK_N), splits, triton.cdiv(m, WONLY_BLOCK_M))
    if splits > 1:
        part = torch.empty(splits, m, n, dtype=torch.float32, device=x2.device)
        counters = tile_counters(x2, grid[0] * grid[2])
    else:
        part, counters = out, out  # unused
    wrap_triton(_wonly_kernel)[grid](
        x2, x2.stride(0), x2.stride(1), wq, wq.stride(0), wq.stride(1), ws, bias if bias is not None else ws,
        out, out.stride(0), out.stride(1), part, part.stride(0), part.stride(1), counters, m, n, k, per_split, splits,
        ACT=_act_dtype(x2), EMULATE=casts.EMULATE, HAS_BIAS=bias is not None, SPLIT=splits > 1,
        BLOCK_M=WONLY_BLOCK_M, BLOCK_N=WONLY_BLOCK_N, BLOCK_K=WONLY_BLOCK_K)
    return out
