"""Human-readable names of the attention kernel variant a site runs (the report's `kernel`)."""

from __future__ import annotations

from ..arch import ArchSpec


def variant_name(quant: str, pv: str) -> str:
    qk = {"int8": "int8qk", "fp8": "fp8qk", "fp4": "fp4qk", "none": "f16qk"}[quant]
    return f"{qk}-{ {'fp8': 'fp8pv', 'fp4': 'fp4pv', 'fp8_acc16': 'fp8pv-acc16'}.get(pv, 'f16pv') }"


def describe_attention_kernel(spec: ArchSpec, quant: str, pv: str, head_dim: int, device_type: str) -> str:
    """e.g. 'triton/sm90/int8qk-fp8pv/BM128-BN128-w8-s2+tma' or 'reference/int8qk-f16pv'."""
    from ...switches import impl

    v = variant_name(quant, pv)
    forced = impl()
    if forced == "reference" or (forced == "auto" and (spec.name == "cpu" or device_type != "cuda")):
        return f"reference/{v}" + ("" if spec.name == "cpu" else f"@{spec.name}")
    tile = spec.default_tile(head_dim, quant, pv)
    if device_type != "cuda":  # ATTNOPT_IMPL=triton: the kernels under Triton's interpreter, one tile
        return f"triton-interpreter/{spec.name}/{v}/{tile}"
    tma = spec.tma and "fp4" not in (quant, pv)  # NVFP4 operands load without tensor descriptors
    return f"triton/{spec.name}/{v}/{tile}" + ("+tma" if tma else "") + " (autotuned)"
