"""Accuracy metrics, always computed in float64 against a float64 reference.

rel-L1 is primary: a per-row scale error hides from cosine (docs/algorithms.md#accuracy-metrics).
"""

from __future__ import annotations

import math

import torch


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """{rel_l1, cos, max_abs, rmse} of `out` against `ref` (NaN where a side is not finite)."""
    o = out.detach().to(torch.float64).flatten().cpu()
    r = ref.detach().to(torch.float64).flatten().cpu()
    if o.numel() == 0:
        return {"rel_l1": 0.0, "cos": 1.0, "max_abs": 0.0, "rmse": 0.0}
    if not (torch.isfinite(o).all() and torch.isfinite(r).all()):
        same_nonfinite = bool(((~torch.isfinite(o)) == (~torch.isfinite(r))).all())
        fin = torch.isfinite(o) & torch.isfinite(r)
        res = compare(o[fin], r[fin]) if fin.any() else {"rel_l1": 0.0, "cos": 1.0, "max_abs": 0.0, "rmse": 0.0}
        if not same_nonfinite:
            res = {k: math.nan for k in res}
        return res
    diff = (o - r).abs()
    denom = r.abs().sum().item()
    rel_l1 = diff.sum().item() / denom if denom > 0 else (0.0 if diff.sum().item() == 0 else math.inf)
    no, nr = o.norm().item(), r.norm().item()
    cos = (o @ r).item() / (no * nr) if no > 0 and nr > 0 else (1.0 if no == nr else 0.0)
    return {"rel_l1": rel_l1, "cos": cos, "max_abs": diff.max().item(),
            "rmse": math.sqrt((diff * diff).mean().item())}


def flatten_outputs(x) -> list[torch.Tensor]:
    """Float tensors of a model output (tensor, tuple/list, dict, HF ModelOutput), in order."""
    out = []
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() or x.is_complex():
            out.append(x)
    elif isinstance(x, dict) or hasattr(x, "to_tuple"):
        for v in (x.values() if isinstance(x, dict) else x.to_tuple()):
            out.extend(flatten_outputs(v))
    elif isinstance(x, (list, tuple)):
        for v in x:
            out.extend(flatten_outputs(v))
    return out


def compare_outputs(out, ref) -> dict:
    """End-to-end comparison of two model outputs: the first float tensor is primary."""
    a, b = flatten_outputs(out), flatten_outputs(ref)
    if not a or len(a) != len(b):
        return {"rel_l1": math.nan, "cos": math.nan, "max_abs": math.nan, "rmse": math.nan, "outputs": 0}
    per = [compare(x, y) for x, y in zip(a, b) if x.shape == y.shape]
    res = dict(per[0]) if per else {"rel_l1": math.nan, "cos": math.nan}
    res["outputs"] = len(per)
    res["worst_rel_l1"] = max((p["rel_l1"] for p in per), default=math.nan)
    return res


def saved_for_backward(fn, params=()) -> dict:
    """Bytes autograd keeps for backward while `fn()` runs (its forward), counted with
    `torch.autograd.graph.saved_tensors_hooks`: each distinct storage once (views and tensors saved
    twice share one), whole storages (a saved view keeps its whole base alive). Returns {"bytes",
    "tensors", "param_bytes": the part held by `params` (alive anyway as the model's own weights),
    "activation_bytes": the rest, "out": fn's result (whose graph holds the saved tensors)}."""
    storages: dict[int, int] = {}
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}

    def pack(t):
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    total = sum(storages.values())
    held = sum(n for ptr, n in storages.items() if ptr in param_ptrs)
    return {"bytes": total, "tensors": len(storages), "param_bytes": held, "activation_bytes": total - held,
            "out": out}
