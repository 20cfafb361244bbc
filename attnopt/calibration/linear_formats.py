"""Each linear's candidate formats: its own output error per format, and where its weight lives.

A linear's own output error says little about what it does to the model's output (a small error
in a layer the residual stream amplifies matters more than a large one in a layer it washes
out), so calibration measures each (linear, format)'s effect on the model's output too
(calibrate._sensitivities); the own error here is the optional per-linear cap
(`budget["linear_rel_l1"]`) and what the plan reports.
"""

from __future__ import annotations

import torch

from ..metrics import compare
from ..ops import linear_ref as L


def linear_errors(x: torch.Tensor, w: torch.Tensor, fmts) -> dict[str, float]:
    """rel-L1 of each format's linear on captured rows x [M, K] against float64 x W^T
    ("none": the 16-bit linear itself)."""
    ref = x.double() @ w.double().T
    out = {"none": compare(torch.nn.functional.linear(x, w.to(x.dtype)), ref)["rel_l1"]}
    for fmt in fmts:
        out[fmt] = compare(L.format_output(x, L.quantize_format(w, fmt), None, fmt, small_m=0), ref)["rel_l1"]
    return out


def linear_modules(model) -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    """module path -> (module, weight [N, K]) of every Linear (and HF Conv1D) in the model: the
    key a linear site has in a plan."""
    out = {}
    for name, m in model.named_modules() if isinstance(model, torch.nn.Module) else ():
        w = getattr(m, "weight", None)
        if isinstance(m, torch.nn.Linear):
            out[name] = (m, w.detach())
        elif type(m).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2:
            out[name] = (m, w.detach().t())
    return out
