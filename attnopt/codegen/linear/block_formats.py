"""The 8-bit training linear's number formats and block size, shared by its kernels
(block_gemm.py) and its reference (ops/linear_train_ref.py); no Triton here."""

from __future__ import annotations

import torch

BLOCK = 32  # side of the square quantization block (Jetfire's per-block quantization)
QMAX = {"int8": 127.0, "e4m3": 448.0, "e5m2": 57344.0}  # the largest value each format holds
DTYPES = {"int8": torch.int8, "e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FORMATS = ("int8", "fp8")  # linear.training's formats (besides 'off')


def operand_formats(fmt: str) -> tuple[str, str]:
    """(activations and weights, gradients): 'int8' -> (int8, int8), 'fp8' -> (e4m3, e5m2)."""
    if fmt == "int8":
        return "int8", "int8"
    if fmt == "fp8":
        return "e4m3", "e5m2"
    raise ValueError(f"linear training format {fmt!r} (expected one of {FORMATS})")


def n_blocks(n):
    """Blocks covering n elements (n may be a SymInt)."""
    return (n + BLOCK - 1) // BLOCK
