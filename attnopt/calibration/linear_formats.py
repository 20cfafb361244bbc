"""Mixed-precision linears: each linear's format chosen from its measured effect on the model.

A linear's own output error says little about what it does to the model's output (a small error
in a layer the residual stream amplifies matters more than a large one in a layer it washes
out). So each candidate (linear, format) is measured end to end: the model runs on the
calibration batches with only that linear quantized, through the reference arithmetic of the
op the compiled model will run, and the output's rel-L1 against the unquantized model is that
pair's sensitivity. Independent rounding errors add in quadrature, so a greedy allocation takes
the formats that save the most estimated time per unit of added squared sensitivity, keeping
the root of the summed squares under the model budget; the final choice is then measured with
every chosen linear quantized at once, and the allocation tightened while that is over budget.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from ..metrics import compare_outputs
from ..ops import linear_ref as L

# relative time of a linear per format (1 = the 16-bit GEMM): large M is compute-bound, small M
# (decode) memory-bound. Used to pick the cheapest formats that stay under the error budget.
LINEAR_COST = {"prefill": {"none": 1.0, "fp8": 0.5, "w8a8": 0.55, "w4a16": 0.8},
               "decode": {"none": 1.0, "fp8": 0.6, "w8a8": 0.6, "w4a16": 0.35}}


@dataclass
class Linear:
    """One candidate linear: its module, weight [N, K] and how much work it does per call."""

    key: str
    module: torch.nn.Module
    weight: torch.Tensor
    rows: int  # largest M seen in calibration
    calls_flops: float  # sum over calls of M * N * K
    own_error: dict = field(default_factory=dict)  # format -> rel-L1 of this linear's output alone
    sensitivity: dict = field(default_factory=dict)  # format -> model output rel-L1, this linear alone

    @property
    def regime(self) -> str:
        return "decode" if self.rows <= 16 else "prefill"

    def cost(self, fmt: str) -> float:
        return self.calls_flops * LINEAR_COST[self.regime][fmt]


def _quantized_linear(lin: Linear, fmt: str, small_m: int) -> Callable:
    """x -> x W^T + b in `fmt`, the reference arithmetic of attnopt's linear ops (weights once)."""
    bias = getattr(lin.module, "bias", None)
    if fmt in ("w8a8", "fp8"):
        wq, ws = L.quantize_weight(lin.weight, "int8" if fmt == "w8a8" else "fp8")
        return lambda x: L.linear_w8a8_ref(x, wq, ws, bias, "int8" if fmt == "w8a8" else "fp8", small_m=small_m)
    pk, sc, zr = L.quantize_weight_int4(lin.weight)
    return lambda x: L.linear_w4a16_ref(x, pk, sc, zr, bias)


@contextlib.contextmanager
def quantized(choice: Mapping[str, str], linears: Mapping[str, Linear], small_m: int):
    """Run the model with the linears of `choice` (key -> format) replaced by their quantized
    arithmetic, through forward hooks (the model's code is not touched)."""
    handles = []
    try:
        for key, fmt in choice.items():
            if fmt == "none":
                continue
            f = _quantized_linear(linears[key], fmt, small_m)
            handles.append(linears[key].module.register_forward_hook(lambda m, args, out, f=f: f(args[0])))
        yield
    finally:
        for h in handles:
            h.remove()


def _run_all(model, batches) -> list:
    with torch.no_grad():
        return [model(**b) if isinstance(b, Mapping) else model(*b) for b in batches]


def _model_error(model, batches, refs) -> float:
    """Mean over batches of the model output's rel-L1 against the unquantized outputs."""
    outs = _run_all(model, batches)
    return sum(compare_outputs(o, r)["rel_l1"] for o, r in zip(outs, refs)) / max(1, len(refs))


def measure_sensitivity(model, batches, linears: Mapping[str, Linear], fmts, small_m: int,
                        say: Callable = lambda m: None) -> list:
    """Fill each linear's `sensitivity` (format -> model rel-L1 with it alone quantized)."""
    refs = _run_all(model, batches)
    for lin in linears.values():
        say(f"sensitivity of {lin.key}")
        for fmt in fmts:
            with quantized({lin.key: fmt}, linears, small_m):
                lin.sensitivity[fmt] = _model_error(model, batches, refs)
    return refs


def allocate(linears: Mapping[str, Linear], fmts, budget: float, layer_cap: float) -> dict[str, str]:
    """Greedy: repeatedly take the (linear, format) move that saves the most estimated time per
    unit of added squared sensitivity, while the root of the summed squares stays within
    `budget`. A format whose own-output error exceeds `layer_cap` is never taken."""
    choice = {k: "none" for k in linears}
    spent, allowed = 0.0, budget * budget
    while True:
        best, best_ratio = None, 0.0
        for key, lin in linears.items():
            cur = choice[key]
            for fmt in fmts:
                gain = lin.cost(cur) - lin.cost(fmt)
                if gain <= 0 or lin.own_error.get(fmt, float("inf")) > layer_cap:
                    continue
                added = lin.sensitivity[fmt] ** 2 - lin.sensitivity.get(cur, 0.0) ** 2
                if spent + added > allowed:
                    continue
                ratio = gain / max(added, 1e-9)
                if ratio > best_ratio:
                    best, best_ratio = (key, fmt, added), ratio
        if best is None:
            return choice
        key, fmt, added = best
        choice[key] = fmt
        spent += added


def choose_formats(model, batches, linears: Mapping[str, Linear], fmts, budget: float, layer_cap: float,
                   small_m: int, say: Callable = lambda m: None) -> tuple[dict[str, str], dict]:
    """Formats per linear under a model-output budget, and what was predicted and measured."""
    batches = list(batches)
    refs = measure_sensitivity(model, batches, linears, fmts, small_m, say)
    target = budget
    for _ in range(6):  # sensitivities do not add exactly: tighten until the joint run fits
        choice = allocate(linears, fmts, target, layer_cap)
        with quantized(choice, linears, small_m):
            measured = _model_error(model, batches, refs)
        if measured <= budget:
            break
        target *= 0.7
    else:
        choice = {k: "none" for k in linears}
        measured = 0.0
    predicted = sum(linears[k].sensitivity.get(f, 0.0) ** 2 for k, f in choice.items() if f != "none") ** 0.5
    return choice, {"budget": budget, "predicted_rel_l1": predicted, "measured_rel_l1": measured}
