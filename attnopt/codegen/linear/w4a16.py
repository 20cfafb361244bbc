"""Where the W4A16 linear kernel is: int4 weights (groups of 128 along K, asymmetric), two per
byte, dequantized in registers inside the GEMM; 16-bit activations (fp16 or bf16) and fp32
accumulation. One kernel for every M; small M (decode) takes BLOCK_M = 16 and splits K across
programs so that a single row still fills the GPU. The arithmetic is ops/linear_ref's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .. import casts
from ..casts import store_cast, to_16bit


@triton.jit
def _w4a16_kernel(X, stride_xm, stride_xk, PK, stride_pn, stride_pk, S, Z, stride_sn, stride_sg, OUT, stride_os,
                  stride_om, BIAS, M, N, K, K_PER_SPLIT, GROUP: tl.constexpr, ACT: tl.constexpr, EMULATE: tl.constexpr,
                  EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """EPILOGUE (one K split): bias added and the result stored in OUT's dtype; otherwise each
    split stores its fp32 partial sum, which the host adds up."""
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
    if EPILOGUE:
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        out = store_cast(acc, OUT.dtype.element_ty, EMULATE)
    else:
        out = acc
    tl.store(OUT + split * stride_os + offs_m[:, None] * stride_om + offs_n[None, :], out,
             mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


def linear_w4a16_triton(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                        bias: torch.Tensor | None, group: int = 128) -> torch.Tensor:
    shape = x.shape
    k = shape[-1]
    x2 = x.reshape(-1, k)
    m, n = x2.shape[0], packed.shape[0]
    if m == 0:
        return x.new_empty(*shape[:-1], n)
    block_k = min(group, 64)
    small = m <= 16
    block_m, block_n = (16, 64) if small else (64, 64)
    splits = max(1, min(16, k // (4 * block_k))) if small else 1
    per_split = triton.cdiv(triton.cdiv(k, splits), group) * group  # a split never cuts a group
    splits = triton.cdiv(k, per_split)
    direct = splits == 1
    part = torch.empty(splits, m, n, dtype=x.dtype if direct else torch.float32, device=x.device)
    act = tl.float16 if x.dtype == torch.float16 else tl.bfloat16
    wrap_triton(_w4a16_kernel)[(triton.cdiv(m, block_m), triton.cdiv(n, block_n), splits)](
        x2, x2.stride(0), x2.stride(1), packed, packed.stride(0), packed.stride(1), scale, zero, scale.stride(0),
        scale.stride(1), part, part.stride(0), part.stride(1), bias if bias is not None else scale,
        m, n, k, per_split, GROUP=group, ACT=act, EMULATE=casts.EMULATE, EPILOGUE=direct,
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    if direct:
        return part[0].reshape(*shape[:-1], n)
    y = part.sum(dim=0)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], n)
