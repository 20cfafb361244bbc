"""NVFP4 microscaling arithmetic (docs/algorithms.md#nvfp4-microscaling): the reference of the FP4
attention variant.

A quantized tensor keeps three numbers per element's worth of scale:
- an fp32 outer scale per block of rows (applied outside the dot, like the INT8 block scales),
  chosen so the largest group scale of the block lands on e4m3's top, 448;
- an e4m3 scale per group of 16 consecutive elements along the reduction dim (the dot's K);
- the element itself in e2m1 (values 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives), rounded to
  nearest with ties to even, as the hardware's conversions do.

Codes are the e2m1 bit patterns (sign bit 3, magnitude index bits 0-2); two codes pack into a
byte, the even element in the low nibble, which is what `tl.dot_scaled` reads for "e2m1".
"""

from __future__ import annotations

import torch

GROUP = 16  # elements per e4m3 group scale (NVFP4)
E2M1_MAX = 6.0
E4M3_MAX = 448.0
P_SCALE = E2M1_MAX * E4M3_MAX  # P~ = P * 2688: a group holding the row maximum gets scale 448

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def e2m1_index(a: torch.Tensor) -> torch.Tensor:
    """|y| (fp32) -> magnitude index 0..7 of the nearest e2m1 value, ties to the even index.

    The midpoints 0.25, 0.75, ..., 5 each go to the neighbour with an even mantissa: strict
    comparisons where the lower neighbour is even, >= where the upper one is."""
    return ((a > 0.25).int() + (a >= 0.75).int() + (a > 1.25).int() + (a >= 1.75).int()
            + (a > 2.5).int() + (a >= 3.5).int() + (a > 5.0).int())


def e2m1_codes(y: torch.Tensor) -> torch.Tensor:
    """y (already divided by its group scale) -> uint8 e2m1 codes 0..15 (saturating at +-6)."""
    idx = e2m1_index(y.abs())
    return (idx + 8 * ((y < 0) & (idx > 0)).int()).to(torch.uint8)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 -> fp32 values."""
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    c = codes.long()
    v = lut[c & 7]
    return torch.where((c & 8) != 0, -v, v)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] codes (K even) -> [..., K / 2] bytes, the even element in the low nibble."""
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """[..., K / 2] bytes -> [..., K] codes."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def _pad_to(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    n = x.shape[dim]
    pad = -n % multiple
    if not pad:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat((x, x.new_zeros(shape)), dim=dim)


def group_quantize(x: torch.Tensor, outer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., R, K] (fp32, K a multiple of 16) over its per-row outer scale `outer` [..., R] ->
    (codes [..., R, K] uint8, group scales [..., R, K / 16] float8_e4m3fn)."""
    local = x / outer[..., None]
    groups = local.reshape(*local.shape[:-1], -1, GROUP)
    gscale = (groups.abs().amax(dim=-1) / E2M1_MAX).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    g = gscale.float()[..., None]
    y = torch.where(g > 0, groups / torch.where(g > 0, g, torch.ones_like(g)), torch.zeros_like(groups))
    return e2m1_codes(y).reshape(local.shape), gscale


def dequantize(codes: torch.Tensor, gscale: torch.Tensor, outer: torch.Tensor) -> torch.Tensor:
    """Inverse of group_quantize (without the rounding): [..., R, K] fp32."""
    g = gscale.float().repeat_interleave(GROUP, dim=-1)
    return e2m1_decode(codes) * g * outer[..., None]


def quantize_rows(x: torch.Tensor, gran: int):
    """x [..., N, D] fp32, groups along D, one outer scale per block of `gran` rows ->
    (codes [..., N, Dp], group scales [..., N, Dp / 16], outer [..., ceil(N / gran)]), Dp = D
    padded to a multiple of 16 with zeros. A block of zeros gets outer scale 1."""
    xp = _pad_to(x, -1, GROUP)
    n = x.shape[-2]
    nb = -(-n // gran)
    blocks = _pad_to(xp, -2, gran).reshape(*xp.shape[:-2], nb, gran, xp.shape[-1])
    amax = blocks.abs().amax(dim=(-1, -2))
    outer = torch.where(amax > 0, amax / P_SCALE, torch.ones_like(amax))
    codes, gscale = group_quantize(xp, outer.repeat_interleave(gran, dim=-1)[..., :n])
    return codes, gscale, outer


def fake_quantize_rows(x: torch.Tensor, gran: int) -> torch.Tensor:
    """x [..., N, D] -> its NVFP4 value (groups along D, outer scale per `gran` rows), fp32."""
    codes, gscale, outer = quantize_rows(x, gran)
    n, d = x.shape[-2], x.shape[-1]
    return dequantize(codes, gscale, outer.repeat_interleave(gran, dim=-1)[..., :n])[..., :d]


def quantize_p(p: torch.Tensor) -> torch.Tensor:
    """Softmax numerators p [..., Nk] in [0, 1] -> their two-level FP4 value, scaled by P_SCALE
    (the row scale; divided out with the row sum). Groups of 16 keys from key 0."""
    pp = _pad_to(p * P_SCALE, -1, GROUP)
    codes, gscale = group_quantize(pp, torch.ones(pp.shape[:-1], dtype=pp.dtype, device=pp.device))
    return dequantize(codes, gscale, torch.ones(pp.shape[:-1], dtype=pp.dtype, device=pp.device))[..., :p.shape[-1]]


def quantize_v(v: torch.Tensor):
    """V [..., Nk, Dv] fp32, already smoothed (mean subtracted) -> its FP4 value without the
    per-channel outer scale ([..., Nk, Dv], groups of 16 keys per channel) and that scale
    [..., 1, Dv]: P.V multiplies the scale back in after the dot."""
    vt = v.transpose(-1, -2)  # [..., Dv, Nk]: the reduction dim (keys) last
    amax = vt.abs().amax(dim=-1)
    outer = torch.where(amax > 0, amax / P_SCALE, torch.ones_like(amax))
    codes, gscale = group_quantize(_pad_to(vt, -1, GROUP), outer)
    one = torch.ones_like(outer)
    local = dequantize(codes, gscale, one)[..., :v.shape[-2]]
    return local.transpose(-1, -2), outer[..., None, :]
