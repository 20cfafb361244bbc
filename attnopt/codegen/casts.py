"""Casts to 8- and 16-bit formats, shared by the kernel families.

On a GPU these are the hardware's round-to-nearest conversions. Triton's CPU interpreter gets
some wrong: float -> e4m3 misses the carry into the exponent (125.75 -> 64, not 128), and bf16
has no numpy type, so its arithmetic, dots and fp32 -> bf16 stores are garbage or truncated.
Under TRITON_INTERPRET (EMULATE) values are rounded onto the target grid in fp32 first and bf16
operands stay fp32 (exactly representable values): the tests then check the same arithmetic
the GPU runs. EMULATE is a constexpr argument, so GPU code never pays for it.
"""

import triton
import triton.language as tl

from ..switches import interpreted

EMULATE = interpreted()  # fixed at import, as triton.jit decides interpretation then


@triton.jit
def to_e4m3(x, EMULATE: tl.constexpr):
    """fp32 within [-448, 448] -> float8e4nv, rounding to nearest, ties to even (as the hardware)."""
    if EMULATE:
        ax = tl.abs(x)
        e = tl.floor(tl.log2(tl.maximum(ax, 1e-30)))
        e = tl.maximum(e, -6.0)  # subnormals: fixed step 2**-9
        step = tl.exp2(e - 3.0)
        u = ax / step  # exact: step is a power of two
        f = tl.floor(u)
        half = u - f
        odd = f - 2.0 * tl.floor(f * 0.5)
        r = tl.where((half > 0.5) | ((half == 0.5) & (odd == 1.0)), f + 1.0, f) * step  # ties to even
        r = tl.minimum(r, 448.0)
        x = tl.where(x < 0, -r, r)
    return x.to(tl.float8e4nv)


@triton.jit
def to_e5m2(x, EMULATE: tl.constexpr):
    """fp32 within [-57344, 57344] -> float8e5, rounding to nearest, ties to even (as the hardware).
    Under the interpreter the value is put on the e5m2 grid in fp32 first, as to_e4m3 does."""
    if EMULATE:
        ax = tl.abs(x)
        e = tl.floor(tl.log2(tl.maximum(ax, 1e-30)))
        e = tl.maximum(e, -14.0)  # subnormals: fixed step 2**-16
        step = tl.exp2(e - 2.0)
        u = ax / step
        f = tl.floor(u)
        half = u - f
        odd = f - 2.0 * tl.floor(f * 0.5)
        r = tl.where((half > 0.5) | ((half == 0.5) & (odd == 1.0)), f + 1.0, f) * step
        r = tl.minimum(r, 57344.0)
        x = tl.where(x < 0, -r, r)
    return x.to(tl.float8e5)


@triton.jit
def round_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), kept in fp32."""
    b = x.to(tl.int32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
    return b.to(tl.float32, bitcast=True)


@triton.jit
def to_16bit(x, DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """x -> DTYPE (fp16 / bf16) for a dot or a store; bf16 stays an exact fp32 under EMULATE."""
    if EMULATE and DTYPE == tl.bfloat16:
        return round_bf16(x.to(tl.float32))
    return x.to(DTYPE)


@triton.jit
def store_cast(x, DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """fp32 -> DTYPE for a store, rounding to nearest even under the interpreter too."""
    if EMULATE and DTYPE == tl.bfloat16:
        x = round_bf16(x)
    return x.to(DTYPE)


@triton.jit
def dot_8_16bit(a, b, EMULATE: tl.constexpr):
    """fp32-accumulated dot of fp8 / 16-bit tiles. The interpreter has no numpy type for bf16 or
    e4m3 (bf16 dots come out garbage, fp8 ones accumulate in fp16): under EMULATE the operands go
    up to fp32, where every such value and every product is exact, as the tensor cores compute."""
    if EMULATE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def dot_e4m3_acc16(a, b, EMULATE: tl.constexpr):
    """e4m3 dot accumulated in fp16 (the m16n8k32 ...f16.e4m3.e4m3.f16 MMA, twice the fp32-
    accumulating one's rate on sm89 / sm120), returned as fp32 for the caller's fp32 sum. Under
    EMULATE the exact fp32 dot is rounded to fp16 once (the hardware rounds after each 32-key
    step: the same fp16 grid, at most a few fp16 ulps apart)."""
    if EMULATE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee").to(tl.float16).to(tl.float32)
    return tl.dot(a, b, out_dtype=tl.float16).to(tl.float32)
