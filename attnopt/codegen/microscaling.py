"""NVFP4 in Triton: e2m1 codes, nibble packing, group-16 e4m3 scales and the scaled dot.

The arithmetic is attnopt/ops/nvfp4.py's. `fp4_dot` is `tl.dot_scaled` with "e2m1" operands and
e4m3 group scales, which Blackwell (sm100 / sm120) runs natively. Triton's interpreter decodes
every scale operand as e8m0 (a power of two), so under EMULATE the operands are decoded here and
multiplied in fp32 instead: the tests then check the same values the hardware multiplies, and a
separate test checks, with power-of-two scales that both decodings agree on, that these packed
operands mean the same to `tl.dot_scaled`.
"""

import triton
import triton.language as tl

from .casts import to_e4m3


@triton.jit
def e2m1_codes(y):
    """fp32 (already divided by its group scale) -> uint8 e2m1 codes, nearest, ties to even."""
    a = tl.abs(y)
    idx = ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
           + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32)
           + (a > 5.0).to(tl.int32))
    idx = tl.where((y < 0) & (idx > 0), idx + 8, idx)
    return idx.to(tl.uint8)


@triton.jit
def e2m1_values(codes):
    """uint8 codes -> fp32 values (0, 0.5, 1, 1.5, 2, 3, 4, 6 and negatives)."""
    c = codes.to(tl.int32)
    mag = c & 7
    big = tl.math.exp2(((mag >> 1) - 1).to(tl.float32)) * (1.0 + 0.5 * (mag & 1).to(tl.float32))
    v = tl.where(mag < 2, mag.to(tl.float32) * 0.5, big)
    return tl.where((c & 8) != 0, -v, v)


@triton.jit
def pack_rows(codes, M: tl.constexpr, K: tl.constexpr):
    """[M, K] codes -> [M, K / 2] bytes, even element in the low nibble (K-packed lhs)."""
    even, odd = tl.split(tl.reshape(codes, [M, K // 2, 2]))
    return even | (odd << 4)


@triton.jit
def _expand_groups(s, M: tl.constexpr, K: tl.constexpr):
    """[M, K / 16] -> [M, K], each scale repeated over its group."""
    return tl.reshape(tl.broadcast_to(tl.expand_dims(s, 2), [M, K // 16, 16]), [M, K])


@triton.jit
def quantize_groups(x, M: tl.constexpr, K: tl.constexpr, EMULATE: tl.constexpr):
    """x [M, K] fp32 (outer scale already divided out) -> (packed [M, K / 2] uint8 codes,
    e4m3 scales [M, K / 16]) for groups of 16 along K."""
    amax = tl.max(tl.reshape(tl.abs(x), [M, K // 16, 16]), 2)
    gs = to_e4m3(tl.minimum(amax / 6.0, 448.0), EMULATE)
    g = _expand_groups(gs.to(tl.float32), M, K)
    y = tl.where(g > 0, x / tl.where(g > 0, g, 1.0), 0.0)
    return pack_rows(e2m1_codes(y), M, K), gs


@triton.jit
def _unpack_lhs(a, sc, M: tl.constexpr, K: tl.constexpr):
    """[M, K / 2] bytes and [M, K / 16] scales -> [M, K] fp32 values."""
    codes = tl.reshape(tl.join(a & 15, a >> 4), [M, K])
    return e2m1_values(codes) * _expand_groups(sc.to(tl.float32), M, K)


@triton.jit
def _unpack_rhs(b, sc, K: tl.constexpr, N: tl.constexpr):
    """[K / 2, N] bytes (packed along K) and [N, K / 16] scales -> [K, N] fp32 values."""
    codes = tl.reshape(tl.permute(tl.join(b & 15, b >> 4), (0, 2, 1)), [K, N])
    return e2m1_values(codes) * tl.trans(_expand_groups(sc.to(tl.float32), N, K))


@triton.jit
def fp4_dot(a, a_scale, b, b_scale, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr,
            EMULATE: tl.constexpr):
    """[M, K] x [K, N] in NVFP4 -> fp32 [M, N]: a [M, K / 2] packed along K with scales
    [M, K / 16]; b [K / 2, N] packed along K with scales [N, K / 16] (tl.dot_scaled's layout)."""
    if EMULATE:
        return tl.dot(_unpack_lhs(a, a_scale, M, K), _unpack_rhs(b, b_scale, K, N), input_precision="ieee")
    return tl.dot_scaled(a, a_scale, "e2m1", b, b_scale, "e2m1")
