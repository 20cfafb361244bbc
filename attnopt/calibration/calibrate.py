"""`attnopt.calibrate`: choose per-site, per-head parameters under an error budget -> a Plan.

1. Run the model on the example batches with every site rewritten into a probe that keeps its
   inputs (q, k, v, masks) while returning the rewritten output.
2. For every site and head, search the configured sparse method's parameters for the most
   sparsity whose rel-L1 (against float64 dense attention, on all the batches) stays under the
   budget (times a safety margin, so held-out inputs of the same kind stay under it too).
3. Return a Plan (versioned JSON, no pickle); `options={"plan": plan_or_path}` applies it.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Iterable, Mapping

import torch

from . import linear_formats as MP
from .site_search import SiteSearch, search_site
from ..compiler import AttnoptBackend
from ..config import normalize_options
from ..ops import probe
from ..plan import Plan
from ..progress import Progress

_IDS = itertools.count()


def _linear_errors(x: torch.Tensor, w: torch.Tensor, fmts) -> dict[str, float]:
    """rel-L1 of each format's linear on captured rows x against float64 x W^T."""
    from ..metrics import compare
    from ..ops import linear_ref as L

    ref = x.double() @ w.double().T
    out = {"none": compare(torch.nn.functional.linear(x, w.to(x.dtype)), ref)["rel_l1"]}
    for fmt in fmts:
        if fmt in ("w8a8", "fp8"):
            wq, ws = L.quantize_weight(w, "int8" if fmt == "w8a8" else "fp8")
            y = L.linear_w8a8_ref(x, wq, ws, None, "int8" if fmt == "w8a8" else "fp8", small_m=0)
        else:
            pk, sc, zr = L.quantize_weight_int4(w)
            y = L.linear_w4a16_ref(x, pk, sc, zr, None)
        out[fmt] = compare(y, ref)["rel_l1"]
    return out


def calibrate(model, example_batches: Iterable, options: Mapping | None = None, budget: Mapping | None = None,
              *, margin: float = 0.8, mixed_precision: bool = False, second_stage: bool = True,
              progress: bool = False) -> Plan:
    """Calibrate attnopt on example batches and return a Plan.

    - attention.sparsity set: per-site, per-head sparse parameters keeping each site's rel-L1
      (against float64 dense attention) under `budget["rel_l1"] * margin`. With second_stage
      (sparge, xattention) a per-head lambda too, where it skips tiles within the budget;
      second_stage=False keeps the configured pv_threshold instead.
    - linear.smooth set: each linear's per-channel max |activation| (SmoothQuant's statistic).
    - mixed_precision: each linear's format (none / fp8 / w8a8 / w4a16, those the target arch
      runs), chosen from each (linear, format)'s measured effect on the model's output to save
      the most estimated time while the model's output rel-L1 (all chosen linears quantized at
      once, measured) stays under `budget["model_rel_l1"] * margin` (default 0.05);
      `budget["linear_rel_l1"]`, if given, also caps each linear's own output error.

    `example_batches`: an iterable of input tuples (or kwargs dicts) for `model`.
    """
    bar = Progress("calibrate: capture", enabled=None if progress else False)  # on a terminal only
    user = dict(options or {})
    user.pop("plan", None)  # a new plan is being made: the old one must not steer the search
    opts = normalize_options(user)
    budget = {"rel_l1": 0.05, "model_rel_l1": 0.05, "linear_rel_l1": None, **dict(budget or {})}
    example_batches = [b if isinstance(b, (Mapping, tuple, list)) else (b,) for b in example_batches]
    target = float(budget["rel_l1"]) * margin
    sp = opts.attention.sparsity
    want_linear = opts.linear.smooth is not None or mixed_precision
    if sp is None and not want_linear:
        raise ValueError("nothing to calibrate: set attention.sparsity (e.g. {'method': 'sparge'}), "
                         "linear.smooth, or mixed_precision=True")
    capture_opts = dataclasses.replace(  # statistics of the original linears; CPU sites too (on_cpu)
        opts, on_cpu="emulate", linear=dataclasses.replace(opts.linear, quant="none", smooth=None),
        attention=opts.attention if sp is not None else dataclasses.replace(opts.attention, enabled=False))
    sink = f"calib{next(_IDS)}"
    be = AttnoptBackend(capture_opts, probe_sink=sink, inductor_config={"fx_graph_cache": False})
    be.ctx.capture_linears = want_linear
    be.ctx.announce_cpu = False  # calibration is meant to measure, not to run fast
    captured: dict[str, list] = {}

    def capture(key: str, call: dict) -> None:
        captured.setdefault(key, []).append({k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
                                             for k, v in call.items()})

    probe.register_sink(sink, lambda key, metrics: None)
    probe.register_capture(sink, capture)
    try:
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=be)
        with torch.no_grad(), torch._functorch.config.patch(enable_autograd_cache=False):
            bar.note("compiling", total=len(example_batches))
            for i, batch in enumerate(example_batches):
                bar.note(f"batch {i + 1}")
                if isinstance(batch, Mapping):
                    compiled(**batch)
                else:
                    compiled(*batch)
                bar.step()
    finally:
        probe.unregister_sink(sink)
        torch._dynamo.reset()
        bar.close()
    recs = {r.key: r for r in be.recorder.sites()}
    plan = Plan(meta={"method": sp.method if sp else None, "budget": budget, "margin": margin,
                      "mixed_precision": mixed_precision, "options": opts.to_dict()})
    attention_keys = [k for k, calls in captured.items() if calls[0].get("kind") != "linear"]
    bar = Progress("calibrate: search", total=len(attention_keys), enabled=None if progress else False)
    for key, calls in captured.items():
        if calls[0].get("kind") == "linear":
            absmax = torch.stack([c["absmax"] for c in calls]).amax(dim=0)
            plan.sites[key] = {"kind": "linear", "act_absmax": absmax.tolist()}
            continue
        d = recs[key].details
        search = SiteSearch(key, calls, d["quant"], d["pv"], d["smooth_k"], d["arch"])
        bar.note(f"searching {key} ({search.heads} heads)")
        plan.sites[key] = search_site(search, sp, target, second_stage)
        bar.step()
    bar.close()
    if mixed_precision:
        with Progress("calibrate: mixed precision", enabled=None if progress else False) as bar:
            _mixed_precision(model, example_batches, plan, captured, budget, margin, opts, bar.note)
    return plan


def _linear_modules(model) -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    """module path -> (module, weight [N, K]) of every Linear (and HF Conv1D) in the model."""
    out = {}
    for name, m in model.named_modules() if isinstance(model, torch.nn.Module) else ():
        w = getattr(m, "weight", None)
        if isinstance(m, torch.nn.Linear):
            out[name] = (m, w.detach())
        elif type(m).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2:
            out[name] = (m, w.detach().t())
    return out


def _mixed_precision(model, batches, plan: Plan, captured: dict, budget: Mapping, margin: float, opts, say) -> None:
    """Each captured linear's format, chosen by its measured effect on the model's output
    (calibration/linear_formats.py); written into the plan's linear entries."""
    from ..codegen.arch import ARCHS, detect_arch

    modules = _linear_modules(model)
    linears = {}
    for key, calls in captured.items():
        if calls[0].get("kind") != "linear" or key not in modules:
            continue
        module, w = modules[key]
        x = torch.cat([c["x"].reshape(-1, c["x"].shape[-1]) for c in calls])
        arch = opts.arch if opts.arch != "auto" else detect_arch(x.device)
        fmts = [f for f in ("fp8", "w8a8", "w4a16") if f in ARCHS[arch].linear_formats]
        rows = max(c["x"].reshape(-1, c["x"].shape[-1]).shape[0] for c in calls)
        lin = MP.Linear(key, module, w.to(x.device), rows, float(x.shape[0] * w.shape[0] * w.shape[1]))
        lin.own_error = _linear_errors(x, lin.weight, fmts)
        linears[key] = lin
    if not linears:
        return
    cap = budget.get("linear_rel_l1")
    cap = float(cap) * margin if cap is not None else float("inf")
    choice, meta = MP.choose_formats(model, batches, linears, fmts, float(budget["model_rel_l1"]) * margin, cap,
                                     small_m=int(opts.linear.min_m) - 1, say=say)
    for key, fmt in choice.items():
        lin = linears[key]
        plan.sites[key].update(quant=fmt, error={"rel_l1": lin.own_error},
                               sensitivity={"model_rel_l1": lin.sensitivity})
    plan.meta["mixed_precision"] = meta
