"""A draft model with W4A16 decoder linears that shares everything else with the target model.

QuantSpec's draft also reads 4-bit weights: each nn.Linear inside the decoder layers becomes a
W4Linear (weights as attnopt's w4a16 linear stores them: int4, groups of 128 along K) calling
torch.ops.attnopt.linear_w4a16 (the Triton GEMM on CUDA, its reference elsewhere). Embeddings,
norms and the LM head are the target's own tensors (shared, not copied); the 4-bit weights are
extra memory (about a quarter of the 16-bit decoder weights).
"""

from __future__ import annotations

import copy

import torch


class W4Linear(torch.nn.Module):
    """nn.Linear's forward on int4 weights (packed, scale, zero) through attnopt::linear_w4a16."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        from ..codegen.arch import detect_arch
        from ..ops.linear_ref import W4_GROUP, quantize_weight_int4

        packed, scale, zero = quantize_weight_int4(linear.weight.detach())
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.bias, self.group = linear.bias, W4_GROUP
        self.arch = detect_arch(linear.weight.device)

    def forward(self, x):
        from ..ops.linear import linear_w4a16

        return linear_w4a16(x, self.packed, self.scale, self.zero, self.bias, self.group, self.arch, "auto")


def w4_draft(model: torch.nn.Module, layers: str = "model.layers") -> torch.nn.Module:
    """A copy of `model` whose modules under `layers` have W4Linear for nn.Linear; parameters and
    buffers are shared with `model` (the copy holds only the module objects and the int4 weights)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    draft = copy.deepcopy(model, memo)
    root = draft.get_submodule(layers)
    for name, mod in list(root.named_modules()):
        if isinstance(mod, torch.nn.Linear):
            parent, _, leaf = name.rpartition(".")
            setattr(root.get_submodule(parent) if parent else root, leaf, W4Linear(mod))
    return draft
