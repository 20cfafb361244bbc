"""The quantized KV cache's storage layout and its arithmetic (the reference the kernels match).

Per layer, for K and V each (B batch, H kv heads, T token slots, D head dim, G = group):

  codes  uint8 [B, H, T, D]     "int8": one 8-bit code per element
         uint8 [B, H, T, D/2]   "int4": two 4-bit codes per byte (channel 2j low nibble, 2j+1 high)
         "int4+int8" (hierarchical, QuantSpec): the 8-bit code's upper nibbles, packed as "int4"
  low    uint8 [B, H, T, D/2]   "int4+int8" only: the 8-bit code's lower nibbles, packed alike.
                                A draft reads `codes` alone (half the bytes), the target both.
  scale, zero  fp16: K per channel over groups of G tokens [B, H, T/G, D] (keys' outlier channels
               get their own range), V per token over groups of G channels [B, H, T, D/G].

x ~= zero + scale * code, asymmetric min-max codes in [0, levels]: 255 ("int8", "int4+int8") or
15 ("int4"). A draft read of "int4+int8" takes code = 16 * hi + 7.5, the middle of the 16 codes
the upper nibble stands for. Scale and zero are rounded to fp16 before the codes are computed,
so the stored pair is exactly the one the codes were made with. The arithmetic, and where it
differs from KIVI / QuantSpec: docs/algorithms.md#quantized-kv-cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FORMATS = ("int8", "int4", "int4+int8")
LEVELS = {"int8": 255, "int4": 15, "int4+int8": 255}
GROUPS = (32, 64, 128)
SCALE_DTYPE = torch.float16


@dataclass(frozen=True)
class KVLayout:
    """How one cache stores K and V: `quant` format, `group` size, 16-bit `residual` tokens."""

    quant: str = "int8"
    group: int = 64
    residual: int = 128

    def __post_init__(self):
        if self.quant not in FORMATS:
            raise ValueError(f"quant must be one of {FORMATS}, got {self.quant!r}")
        if self.group not in GROUPS:
            raise ValueError(f"group must be one of {GROUPS}, got {self.group!r}")
        if self.residual < self.group or self.residual % self.group:
            raise ValueError(f"residual must be a positive multiple of group={self.group}, got {self.residual!r}")

    @property
    def levels(self) -> int:
        return LEVELS[self.quant]

    @property
    def packed(self) -> bool:
        """Two codes per byte ("int4", and both nibble planes of "int4+int8")."""
        return self.quant != "int8"

    @property
    def has_low(self) -> bool:
        return self.quant == "int4+int8"

    def slots(self, max_len: int) -> int:
        """Token slots of the quantized storage: whole groups, plus one spare group (an append
        rewrites every group it touches, the one after its last token included)."""
        return -(-max_len // self.group) * self.group + self.group

    def code_dim(self, head_dim: int) -> int:
        return head_dim // 2 if self.packed else head_dim

    def check_head_dim(self, head_dim: int) -> None:
        if head_dim % self.group:
            raise ValueError(f"head dim {head_dim} is not a multiple of group={self.group} (V's channel groups)")

    def nbytes(self, batch: int, heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
               slots: int | None = None) -> int:
        """Bytes of one layer's K and V storage (codes, low nibbles, scales, zeros, 16-bit ring);
        `slots` token slots where the storage is windowed (storage.windowed_slots)."""
        t, g = self.slots(max_len) if slots is None else slots, self.group
        codes = batch * heads * t * self.code_dim(head_dim) * (2 if self.has_low else 1)
        scales = batch * heads * (t // g * head_dim + t * head_dim // g) * 2 * SCALE_DTYPE.itemsize
        ring = 2 * batch * heads * self.residual * head_dim * torch.empty((), dtype=dtype).element_size()
        return 2 * codes + scales + ring


def min_max_codes(x: torch.Tensor, dim: int, levels: int, valid: torch.Tensor | None = None):
    """Codes (float, integral values in [0, levels]) and fp16 (scale, zero) of `x` per slice
    along `dim` (the group axis, kept as size 1). Invalid elements (valid False) count for
    neither min nor max; a group with none gets scale 1, zero 0."""
    x = x.float()
    lo = x if valid is None else torch.where(valid, x, torch.inf)
    hi = x if valid is None else torch.where(valid, x, -torch.inf)
    mn, mx = lo.amin(dim, keepdim=True), hi.amax(dim, keepdim=True)
    empty = ~torch.isfinite(mn)
    mn, mx = torch.where(empty, 0.0, mn), torch.where(empty, 0.0, mx)
    scale = ((mx - mn) / levels).to(SCALE_DTYPE)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = mn.to(SCALE_DTYPE)
    codes = torch.round((x - zero.float()) / scale.float()).clamp_(0, levels)
    if valid is not None:
        codes = torch.where(valid, codes, 0.0)
    return codes, scale, zero


def pack(codes: torch.Tensor, layout: KVLayout) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Integral float codes [..., D] -> (codes plane, low plane or None) as stored."""
    c = codes.to(torch.uint8)
    if layout.quant == "int8":
        return c, None
    if layout.quant == "int4":
        return c[..., 0::2] | (c[..., 1::2] << 4), None
    hi, lo = c >> 4, c & 15
    return hi[..., 0::2] | (hi[..., 1::2] << 4), lo[..., 0::2] | (lo[..., 1::2] << 4)


def _nibbles(p: torch.Tensor) -> torch.Tensor:
    """Packed bytes [..., D/2] -> their nibbles [..., D] (channel 2j low, 2j+1 high), as float."""
    return torch.stack((p & 15, p >> 4), -1).flatten(-2).float()


def unpack(codes: torch.Tensor, low: torch.Tensor | None, layout: KVLayout, draft: bool = False) -> torch.Tensor:
    """Stored planes -> float codes [..., D]; `draft` reads only the upper nibbles of "int4+int8"."""
    if layout.quant == "int8":
        return codes.float()
    if layout.quant == "int4":
        return _nibbles(codes)
    if draft:
        return _nibbles(codes) * 16 + 7.5
    return _nibbles(codes) * 16 + _nibbles(low)


def quantize_k(k: torch.Tensor, layout: KVLayout, valid: torch.Tensor | None = None):
    """K [B, H, n, D] (n a multiple of group) -> (codes, low, scale, zero): per channel over
    groups of `group` tokens; `valid` [n] bool marks the tokens that exist."""
    b, h, n, d = k.shape
    g = layout.group
    vg = None if valid is None else valid.view(1, 1, n // g, g, 1)
    codes, scale, zero = min_max_codes(k.reshape(b, h, n // g, g, d), 3, layout.levels, vg)
    return (*pack(codes.reshape(b, h, n, d), layout), scale.squeeze(3), zero.squeeze(3))


def quantize_v(v: torch.Tensor, layout: KVLayout):
    """V [B, H, n, D] -> (codes, low, scale, zero): per token over groups of `group` channels."""
    b, h, n, d = v.shape
    g = layout.group
    codes, scale, zero = min_max_codes(v.reshape(b, h, n, d // g, g), 4, layout.levels)
    return (*pack(codes.reshape(b, h, n, d), layout), scale.squeeze(4), zero.squeeze(4))


def dequantize_k(codes, low, scale, zero, layout: KVLayout, draft: bool = False) -> torch.Tensor:
    """Stored K [B, H, n, *] with scale / zero [B, H, n/group, D] -> float32 [B, H, n, D]."""
    c = unpack(codes, low, layout, draft)
    g = layout.group
    return c * scale.float().repeat_interleave(g, 2) + zero.float().repeat_interleave(g, 2)


def dequantize_v(codes, low, scale, zero, layout: KVLayout, draft: bool = False) -> torch.Tensor:
    """Stored V [B, H, n, *] with scale / zero [B, H, n, D/group] -> float32 [B, H, n, D]."""
    c = unpack(codes, low, layout, draft)
    g = layout.group
    return c * scale.float().repeat_interleave(g, 3) + zero.float().repeat_interleave(g, 3)
