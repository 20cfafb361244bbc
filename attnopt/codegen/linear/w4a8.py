"""Where the W4A8 linear kernel is (ViDiT-Q's format): int4 weights in symmetric groups along K,
per-token INT8 activations, int8 x int8 tensor-core dots.

The GEMM steps K one weight group at a time (BLOCK_K = the group): it unpacks the group's int4
weights in registers (two per byte, stored + 8), runs one int8 x int8 dot with int32
accumulation, converts that exact partial sum to fp32 and multiplies it by the group's
per-channel scale, adding it to an fp32 accumulator; the epilogue multiplies by the token's
scale and adds the bias. The activation is quantized per token as W8A8's is (w8a8.py's
`_row_scale` / `_round_8bit`, and its `fuse_quantize` choice): up to FUSED_QUANT_MAX_M rows in
the GEMM's prologue (one launch: a first sweep over K for each row's max |x|, then x rounded
on the fly), beyond by `_quant_act_kernel` first (two launches). The arithmetic is
ops/linear_ref.linear_w4a8_ref's, summed in the same order. Every M takes this GEMM (no
weight-only small-M path, no split K); M <= 16 takes the arch table's 16-row tiles. On a GPU
the tiles are autotuned over the table's list for the M regime; under the interpreter and on
CPU tensors (compile checks) the list's first runs. No GPU has run or timed it yet.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .. import casts
from ..arch import ARCHS, GemmTile, autotune_bucket
from ...switches import interpreted
from .splitk import store_output
from .tiles import grouped_tile
from .w8a8 import _quant_act_kernel, _round_8bit, _row_scale, fuse_quantize

SMALL_M = 16  # rows up to which the decode tiles (BLOCK_M 16) run


@triton.jit
def _w4a8_kernel(A, stride_am, stride_ak, AS, PK, stride_pn, stride_pk, S, stride_sn, stride_sg, OUT, stride_om,
                 stride_on, BIAS, M, N, K, M_BUCKET, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                 EMULATE: tl.constexpr, QUANT_A: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """One output tile: PK the packed weight [N, Kp / 2], S the group scales [N, G]. QUANT_A: A
    is the 16-bit activation, quantized per row here (AS unused); otherwise A is int8 [M, K]
    with row scales AS."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.arange(0, GROUP // 2)  # bytes of one group: two weights each, low nibble first
    if QUANT_A:  # prologue: each row's max |x| over K
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, GROUP):
            kk = k0 + tl.arange(0, GROUP)
            x = tl.load(A + offs_m[:, None] * stride_am + kk[None, :] * stride_ak,
                        mask=(offs_m < M)[:, None] & (kk < K)[None, :], other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), 1))
        a_s = _row_scale(amax, 0)
    else:
        a_s = tl.load(AS + offs_m, mask=offs_m < M, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, GROUP):
        kk = k0 + tl.arange(0, GROUP)
        a_ptrs = A + offs_m[:, None] * stride_am + kk[None, :] * stride_ak
        a_mask = (offs_m < M)[:, None] & (kk < K)[None, :]
        if QUANT_A:
            a = _round_8bit(tl.load(a_ptrs, mask=a_mask, other=0.0).to(tl.float32), a_s[:, None], 0, EMULATE)
        else:
            a = tl.load(a_ptrs, mask=a_mask, other=0)
        pb = tl.load(PK + offs_n[:, None] * stride_pn + (k0 // 2 + offs_b)[None, :] * stride_pk,
                     mask=(offs_n < N)[:, None], other=0x88).to(tl.int32)  # masked rows: both nibbles 0
        q = (tl.reshape(tl.join(pb & 15, pb >> 4), [BLOCK_N, GROUP]) - 8).to(tl.int8)
        part = tl.dot(a, tl.trans(q))  # int32, exact
        s = tl.load(S + offs_n * stride_sn + (k0 // GROUP) * stride_sg, mask=offs_n < N, other=0.0)
        acc += part.to(tl.float32) * s[None, :]
    store_output(acc * a_s[:, None], OUT + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
                 (offs_m < M)[:, None] & (offs_n < N)[None, :], BIAS, offs_n, N, HAS_BIAS, EMULATE)


def w4a8_tiles(arch: str, m: int) -> tuple[GemmTile, ...]:
    """The arch table's W4A8 tiles for this M (block_k is unused: a K step is one group)."""
    spec = ARCHS[arch]
    return spec.w4a8_decode_tiles if m <= SMALL_M else spec.w4a8_tiles


@functools.lru_cache(maxsize=None)
def autotuned_w4a8(arch: str, decode: bool):
    """_w4a8_kernel autotuned over the arch table's tiles for one M regime, per M bucket."""
    configs = [triton.Config({"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "GROUP_M": t.group_m},
                             num_warps=t.warps, num_stages=t.stages)
               for t in w4a8_tiles(arch, 1 if decode else SMALL_M + 1)]
    return triton.autotune(configs=configs, key=["M_BUCKET", "N", "K", "GROUP", "HAS_BIAS", "QUANT_A"])(_w4a8_kernel)


def quantize_activation(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] 16-bit -> (int8 [M, K], fp32 row scales [M]) in one launch (W8A8's rounding)."""
    m, k = x2.shape
    a = torch.empty(m, k, dtype=torch.int8, device=x2.device)
    scales = torch.empty(m, dtype=torch.float32, device=x2.device)
    block_k = min(8192, triton.next_power_of_2(k))
    wrap_triton(_quant_act_kernel)[(m,)](x2, x2.stride(0), x2.stride(1), a, a.stride(0), scales, k,
                                         BLOCK_K=block_k, FMT=0, EMULATE=casts.EMULATE,
                                         num_warps=4 if block_k <= 2048 else 8)
    return a, scales


def linear_w4a8_triton(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                       group: int = 128, arch: str = "cpu", tile: GemmTile | None = None, fuse: bool | None = None,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b, W int4 in groups of `group` along K, x INT8 per token: one launch up to
    FUSED_QUANT_MAX_M rows, two beyond (`fuse` forces the choice); `tile` forces a config (else
    autotuned on a GPU, the table's first elsewhere); `out` [M, N] lets tests pass a poisoned
    buffer."""
    shape = x.shape
    k = shape[-1]
    x2 = x.reshape(-1, k)
    m, n = x2.shape[0], packed.shape[0]
    if packed.shape[1] * 2 != scale.shape[1] * group or scale.shape[1] * group < k:
        raise ValueError(f"W4A8 weight: {packed.shape[1] * 2} packed inputs, {scale.shape[1]} groups of {group}, "
                         f"K {k}")
    if group < 16 or group & (group - 1):
        raise ValueError(f"W4A8 group {group}: a power of two >= 16 (one int8 dot step)")
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*shape[:-1], n)
    fused = fuse_quantize(m) if fuse is None else fuse
    a, a_scales = (x2, scale) if fused else quantize_activation(x2)  # fused: the GEMM quantizes x
    tiles = w4a8_tiles(arch, m)
    if tile is None and (interpreted() or x.device.type != "cuda"):
        tile = tiles[0]
    args = (a, a.stride(0), a.stride(1), a_scales, packed, packed.stride(0), packed.stride(1), scale, scale.stride(0),
            scale.stride(1), out, out.stride(0), out.stride(1), bias if bias is not None else scale, m, n, k,
            autotune_bucket(m))
    consts = dict(GROUP=group, HAS_BIAS=bias is not None, EMULATE=casts.EMULATE, QUANT_A=fused)
    if tile is None:
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        wrap_triton(autotuned_w4a8(arch, m <= SMALL_M))[grid](*args, **consts)
    else:
        grid = (triton.cdiv(m, tile.block_m) * triton.cdiv(n, tile.block_n),)
        wrap_triton(_w4a8_kernel)[grid](*args, **consts, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
                                        GROUP_M=tile.group_m, num_warps=tile.warps, num_stages=tile.stages)
    return out.reshape(*shape[:-1], n)
