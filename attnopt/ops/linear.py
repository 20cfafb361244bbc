"""`torch.ops.attnopt.linear_8bit` / `linear_w4a16` / `linear_w4a8` / `linear_nvfp4`: the ops quantized
linear sites become, and the probe `attnopt.inspect` / `attnopt.calibrate` put there instead.

Weights arrive already quantized (once, at compile time). On CUDA the body launches the Triton
GEMMs (inlined by Inductor); elsewhere it is the pure-PyTorch reference arithmetic.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..metrics import compare
from . import linear_ref as L
from .linear_nvfp4_ref import linear_nvfp4_ref
from .probe import _CAPTURES, _OVERRIDES, _SINKS, _TIMERS, linear_grad_format


from ..switches import use_triton as _triton


@torch.library.triton_op("attnopt::linear_8bit", mutates_args=())
def linear_8bit(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, bias: Optional[torch.Tensor], fmt: str,
                small_m: int, arch: str, impl: str) -> torch.Tensor:
    """x [..., K] @ W^T + b, W [N, K] 8-bit per output channel (fmt 'int8' | 'fp8')."""
    if _triton(x, arch, impl):
        from ..codegen.linear.w8a8 import linear_8bit_triton

        return linear_8bit_triton(x, wq, ws, bias, fmt, arch, small_m)
    return L.linear_w8a8_ref(x, wq, ws, bias, fmt, small_m)


@linear_8bit.register_fake
def _(x, wq, ws, bias, fmt, small_m, arch, impl):
    return x.new_empty(*x.shape[:-1], wq.shape[0])


@torch.library.triton_op("attnopt::linear_w4a16", mutates_args=())
def linear_w4a16(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 bias: Optional[torch.Tensor], group: int, arch: str, impl: str) -> torch.Tensor:
    """x [..., K] @ dequant(W)^T + b, W int4 in groups of `group` along K, two per byte."""
    if _triton(x, arch, impl):
        from ..codegen.linear.w4a16 import linear_w4a16_triton

        return linear_w4a16_triton(x, packed, scale, zero, bias, group, arch)
    return L.linear_w4a16_ref(x, packed, scale, zero, bias, group)


@linear_w4a16.register_fake
def _(x, packed, scale, zero, bias, group, arch, impl):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


@torch.library.triton_op("attnopt::linear_w4a8", mutates_args=())
def linear_w4a8(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                group: int, arch: str, impl: str) -> torch.Tensor:
    """x [..., K] @ W^T + b, W symmetric int4 in groups of `group` along K (two per byte), x INT8
    per token (quantized here, at run time)."""
    if _triton(x, arch, impl):
        from ..codegen.linear.w4a8 import linear_w4a8_triton

        return linear_w4a8_triton(x, packed, scale, bias, group, arch)
    return L.linear_w4a8_ref(x, packed, scale, bias, group)


@linear_w4a8.register_fake
def _(x, packed, scale, bias, group, arch, impl):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


@torch.library.triton_op("attnopt::linear_nvfp4", mutates_args=())
def linear_nvfp4(x: torch.Tensor, packed: torch.Tensor, gscale: torch.Tensor, outer: torch.Tensor,
                 bias: Optional[torch.Tensor], arch: str, impl: str) -> torch.Tensor:
    """x [..., K] @ W^T + b, W and (per call, per token) x in NVFP4 (ops/linear_nvfp4_ref.py)."""
    if _triton(x, arch, impl):
        from ..codegen.linear.nvfp4 import linear_nvfp4_triton

        return linear_nvfp4_triton(x, packed, gscale, outer, bias, arch)
    return linear_nvfp4_ref(x, packed, gscale, outer, bias)


@linear_nvfp4.register_fake
def _(x, packed, gscale, outer, bias, arch, impl):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


_CAPTURE_ROWS = 4096  # rows of activations kept per site per call for calibration


@torch.library.custom_op("attnopt::linear_probe", mutates_args=())
def linear_probe(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], q0: torch.Tensor,
                 q1: torch.Tensor, q2: Optional[torch.Tensor], fmt: str, small_m: int, arch: str,
                 probe_key: str) -> torch.Tensor:
    """The quantized linear (or, fmt 'none', the original) plus, on the side, its error against
    float64 x W^T + b, and (calibration) per-input-channel max |x| and a sample of rows.
    weight is the original [N, K]; (q0, q1, q2) = (wq, ws, -), (packed, scale, zero) (w4a16),
    (packed, scale, -) (w4a8) or (packed, group scales, outer scales) (nvfp4)."""
    def original():
        return torch.nn.functional.linear(x, weight, bias)

    def rewritten():
        if fmt in ("w8a8", "fp8"):
            return linear_8bit(x, q0, q1, bias, "int8" if fmt == "w8a8" else "fp8", small_m, arch, "auto")
        if fmt == "w4a16":
            return linear_w4a16(x, q0, q1, q2, bias, L.W4_GROUP, arch, "auto")
        if fmt == "w4a8":
            return linear_w4a8(x, q0, q1, bias, L.W4A8_GROUP, arch, "auto")
        if fmt == "nvfp4":
            return linear_nvfp4(x, q0, q1, q2, bias, arch, "auto")
        return original()

    sink_id, _, key = probe_key.partition("/")
    override = _OVERRIDES.get(sink_id)
    if override is not None:
        out = override(key, {"kind": "linear", "x": x, "weight": weight, "bias": bias})
        if out is not None:
            return out
    out = rewritten()
    capture: Callable | None = _CAPTURES.get(sink_id)
    if capture is not None:
        x2 = x.detach().reshape(-1, x.shape[-1])
        idx = torch.randperm(x2.shape[0], device=x.device)[:_CAPTURE_ROWS] if x2.shape[0] > _CAPTURE_ROWS else None
        capture(key, {"kind": "linear", "absmax": x2.abs().amax(dim=0).float(), "rows": x2.shape[0],
                      "x": (x2 if idx is None else x2[idx]).clone()})
    sink = _SINKS.get(sink_id)
    if sink is not None:
        with torch.no_grad():
            ref = x.double() @ weight.double().T + (bias.double() if bias is not None else 0)
            m = compare(out, ref)
        training = linear_grad_format(sink_id)
        if training:
            from .grad_check import linear_grad_error

            m["grad"] = linear_grad_error(x, weight, bias, training, arch)
        sink(key, m)
    timer: Callable | None = _TIMERS.get(sink_id)
    if timer is not None and fmt != "none":
        with torch.no_grad():
            timer(key, original, rewritten)
    return out.clone() if out is x else out


@linear_probe.register_fake
def _(x, weight, bias, q0, q1, q2, fmt, small_m, arch, probe_key):
    return x.new_empty(*x.shape[:-1], weight.shape[0])
