"""Pure-PyTorch reference of the NVFP4 linear (`linear.quant = "nvfp4"`, W4A4, sm100+): the CPU
path of `attnopt::linear_nvfp4` and what its Triton GEMM is tested against.

Both operands are NVFP4 as ops/nvfp4.py defines it (e2m1 values, an e4m3 scale per 16
consecutive elements along K, an fp32 outer scale):
- the weight [N, K] once, at compile time, with one outer scale per output channel;
- the activation [M, K] per call, with one outer scale per token (row).
Per row rather than one per tensor: a per-tensor scale of the activation would need its max over
every row before any row is quantized (another read of x and a reduction across the grid, or a
calibrated static scale); per row, the quantizer handles each row alone in one pass, and the
epilogue multiplies one fp32 per row, as W8A8's per-token scale does. Accuracy is the same
(measured rel-L1 0.134 either way, rows spanning 1e-4..1: the e4m3 group scales' 17 binades
cover that); rows further apart would push a per-tensor scale's small rows into e4m3's
subnormals. K is padded with zeros to a multiple of 16.

y = (dec(x) . dec(W)^T) * s_x[:, None] * s_w[None, :] + b, where dec() is the e2m1 value times
its group scale: the products are exact, the sum is fp32 on the GPU (float64 here).
"""

from __future__ import annotations

import torch

from . import nvfp4

GROUP = nvfp4.GROUP


def quantize_nvfp4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [R, K] -> (packed [R, Kp / 2] uint8, group scales [R, Kp / 16] e4m3, outer [R] fp32),
    Kp = K rounded up to 16 (zeros). The weight's (compile time) and the activation's rounding."""
    codes, gscale, outer = nvfp4.quantize_rows(x.float(), 1)
    return nvfp4.pack(codes).contiguous(), gscale.contiguous(), outer.contiguous()


def quantize_weight_nvfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> NVFP4 (packed, group scales, per output channel outer scale). Compile time only."""
    return quantize_nvfp4(w)


def local_values(packed: torch.Tensor, gscale: torch.Tensor) -> torch.Tensor:
    """[R, Kp / 2] packed codes and [R, Kp / 16] group scales -> [R, Kp] fp32 (outer scale not applied)."""
    return nvfp4.e2m1_decode(nvfp4.unpack(packed)) * gscale.float().repeat_interleave(GROUP, dim=-1)


def linear_nvfp4_ref(x: torch.Tensor, packed: torch.Tensor, gscale: torch.Tensor, outer: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """y = x W^T + b with W in NVFP4 and x quantized to NVFP4 per token."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xp, xg, xo = quantize_nvfp4(x2)
    kp = packed.shape[1] * 2
    if xp.shape[1] * 2 != kp:
        raise ValueError(f"x has {shape[-1]} inputs, the NVFP4 weight {kp} (padded to 16)")
    y = (local_values(xp, xg).double() @ local_values(packed, gscale).double().T) * xo.double()[:, None] \
        * outer.double()[None, :]
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype).reshape(*shape[:-1], packed.shape[0])


def weight_bytes(n: int, k: int) -> int:
    """Bytes of one NVFP4 weight: 4 bits per element, an e4m3 scale per 16, an fp32 per row."""
    kp = -(-k // GROUP) * GROUP
    return n * kp // 2 + n * kp // GROUP + 4 * n
