"""Where the W4A16 linear kernel is: int4 weights (groups of 128 along K, asymmetric), two per
byte, dequantized in registers inside the GEMM; 16-bit activations (fp16 or bf16) and fp32
accumulation. One kernel and one launch for every M: small M (decode, M <= 16) takes the arch
table's decode tiles (BLOCK_M 16) and splits K across programs so that a single row still
fills the GPU, the last split of each tile adding the partials up in the kernel (splitk.py).
On a GPU the tiles are autotuned over the arch table's list for the M regime; under the
interpreter and on CPU tensors (compile checks) the list's first runs. The arithmetic is
ops/linear_ref's.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .. import casts
from ..arch import ARCHS, GemmTile, autotune_bucket
from ..casts import to_16bit
from ...switches import interpreted
from .splitk import publish_partial, split_count, store_output, sum_partials, tile_counters

SMALL_M = 16  # rows up to which K is split (decode)


@triton.jit
def _w4a16_kernel(X, stride_xm, stride_xk, PK, stride_pn, stride_pk, S, Z, stride_sn, stride_sg, OUT, stride_om,
                  stride_on, P, stride_ps, stride_pm, CNT, BIAS, M, N, K, K_PER_SPLIT, SPLITS, M_BUCKET,
                  GROUP: tl.constexpr, ACT: tl.constexpr, EMULATE: tl.constexpr, SPLIT: tl.constexpr,
                  HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One K split of one output tile. Without SPLIT the tile is stored with its bias; with it
    each split stores its fp32 partial and the last to finish adds them up (splitk.py).
    BLOCK_K divides GROUP, so one block reads one group's scale and zero."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.arange(0, BLOCK_K // 2)  # bytes: two weights each, low nibble first
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = split * K_PER_SPLIT
    for k0 in range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=(offs_m < M)[:, None] & (kk < K)[None, :], other=0.0)
        pb = tl.load(PK + offs_n[:, None] * stride_pn + (k0 // 2 + offs_b)[None, :] * stride_pk,
                     mask=(offs_n < N)[:, None], other=0).to(tl.int32)
        q = tl.reshape(tl.join(pb & 15, pb >> 4), [BLOCK_N, BLOCK_K]).to(tl.float32)  # [BLOCK_N, BLOCK_K]
        g = k0 // GROUP
        s = tl.load(S + offs_n * stride_sn + g * stride_sg, mask=offs_n < N, other=0.0)
        z = tl.load(Z + offs_n * stride_sn + g * stride_sg, mask=offs_n < N, other=0.0)
        w = to_16bit((q - z[:, None]) * s[:, None], ACT, EMULATE)
        acc = tl.dot(to_16bit(x, ACT, EMULATE), tl.trans(w), acc)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    out_ptrs = OUT + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    if SPLIT:
        part = P + offs_m[:, None] * stride_pm + offs_n[None, :]
        counter = CNT + pid_m * tl.num_programs(1) + pid_n
        if publish_partial(acc, part + split * stride_ps, mask, counter) == SPLITS - 1:
            acc = sum_partials(part, stride_ps, mask, SPLITS, counter, BLOCK_M, BLOCK_N)
            store_output(acc, out_ptrs, mask, BIAS, offs_n, N, HAS_BIAS, EMULATE)
    else:
        store_output(acc, out_ptrs, mask, BIAS, offs_n, N, HAS_BIAS, EMULATE)


def w4a16_tiles(arch: str, m: int) -> tuple[GemmTile, ...]:
    """The arch table's W4A16 tiles for this M: decode tiles (BLOCK_M 16) up to SMALL_M rows."""
    spec = ARCHS[arch]
    return spec.w4_decode_tiles if m <= SMALL_M else spec.w4_tiles


@functools.lru_cache(maxsize=None)
def autotuned_w4a16(arch: str, decode: bool):
    """_w4a16_kernel autotuned over the arch table's tiles for one M regime, per M bucket."""
    tiles = w4a16_tiles(arch, 1 if decode else SMALL_M + 1)
    configs = [triton.Config({"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "BLOCK_K": t.block_k},
                             num_warps=t.warps, num_stages=t.stages) for t in tiles]
    return triton.autotune(configs=configs, key=["M_BUCKET", "N", "K", "SPLITS", "GROUP", "ACT", "HAS_BIAS"])(
        _w4a16_kernel)


def linear_w4a16_triton(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                        bias: torch.Tensor | None, group: int = 128, arch: str = "cpu",
                        tile: GemmTile | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x dequant(W)^T + b in one launch; `tile` forces a config (else autotuned on a GPU,
    the table's first elsewhere); `out` [M, N] lets tests pass a poisoned buffer."""
    shape = x.shape
    k = shape[-1]
    x2 = x.reshape(-1, k)
    m, n = x2.shape[0], packed.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*shape[:-1], n)
    decode = m <= SMALL_M
    tiles = w4a16_tiles(arch, m)
    if tile is None and (interpreted() or x.device.type != "cuda"):
        tile = tiles[0]
    # the split count is fixed per shape (not per tile): a split never cuts a group
    splits, per_split = split_count(k, tiles[0].block_k, group) if decode else (1, k)
    if splits > 1:
        part = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
        smallest = (tile,) if tile is not None else tiles
        counters = tile_counters(x2, max(triton.cdiv(m, t.block_m) * triton.cdiv(n, t.block_n) for t in smallest))
    else:
        part, counters = out, out  # unused
    act = tl.float16 if x.dtype == torch.float16 else tl.bfloat16
    args = (x2, x2.stride(0), x2.stride(1), packed, packed.stride(0), packed.stride(1), scale, zero, scale.stride(0),
            scale.stride(1), out, out.stride(0), out.stride(1), part, part.stride(0), part.stride(1), counters,
            bias if bias is not None else scale, m, n, k, per_split, splits, autotune_bucket(m))
    consts = dict(GROUP=group, ACT=act, EMULATE=casts.EMULATE, SPLIT=splits > 1, HAS_BIAS=bias is not None)
    if tile is None:
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]), splits)

        wrap_triton(autotuned_w4a16(arch, decode))[grid](*args, **consts)
    else:
        if group % tile.block_k:
            raise ValueError(f"W4A16 BLOCK_K {tile.block_k} must divide the group ({group})")
        grid = (triton.cdiv(m, tile.block_m), triton.cdiv(n, tile.block_n), splits)
        wrap_triton(_w4a16_kernel)[grid](*args, **consts, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
                                         BLOCK_K=tile.block_k, num_warps=tile.warps, num_stages=tile.stages)
    return out.reshape(*shape[:-1], n)
