"""`attnopt.calibrate`: choose per-site, per-head parameters under an error budget -> a Plan.

1. Run the model on the example batches with every site rewritten into a probe that keeps its
   inputs (q, k, v, masks) while returning the rewritten output.
2. For every site and head, search the configured sparse method's parameters for the most
   sparsity whose rel-L1 (against float64 dense attention, on all the batches) stays under the
   budget (times a safety margin, so held-out inputs of the same kind stay under it too).
   A head that cannot meet it, or gains under 10% (blocks skipped, and tiles the second stage
   skips), stays dense.
3. Return a Plan (versioned JSON, no pickle); `options={"plan": plan_or_path}` applies it.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Iterable, Mapping

import torch

from . import mixed_precision as MP
from .compiler import AttnoptBackend
from .config import SparsityOptions, normalize_options
from .ops import probe
from .ops import sparse_ref as R
from .ops.attention_ref import attention_exact
from .ops.sparse import block_sparsity, predict_block_mask, pv_thresholds
from .plan import Plan
from .progress import Progress

_IDS = itertools.count()
MIN_GAIN = 0.1  # heads sparser than this are not worth a sparse kernel (SpargeAttn's rule)
THETAS = (0.1, 0.3, 0.5)  # Sparge's self-similarity thresholds, searched per head
# second-stage lambda range (log2 units): at 2 a skipped tile's entries are all under 1/4 of the
# running max; at 24 under 2^-24 (nothing skipped matters)
LAMBDA_RANGE = (2.0, 24.0)


def _per_head_rel_l1(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """[B, H, N, D] -> rel-L1 per head [H] (sums over batch, tokens and channels)."""
    o, r = out.double(), ref.double()
    return (o - r).abs().sum(dim=(0, 2, 3)), r.abs().sum(dim=(0, 2, 3))


class SiteSearch:
    """One site's captured inputs, and its error / sparsity under candidate parameters."""

    def __init__(self, key: str, calls: list[dict], quant: str, pv: str, smooth_k: bool, arch: str):
        self.key, self.calls = key, calls
        self.quant, self.pv, self.smooth_k, self.arch = quant, pv, smooth_k, arch
        self.heads = calls[0]["q"].shape[1]
        self.refs = [attention_exact(c["q"], c["k"], c["v"], c["attn_bias"], c["keep_mask"], c["masked_value"],
                                     c["is_causal"], c["causal_offset"], c["scale"], softcap=c.get("softcap", 0.0))
                     for c in calls]

    def evaluate(self, params: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(rel-L1 [H], block sparsity [H]) of the rewritten site under `params`."""
        num = den = 0
        sparsity = torch.zeros(self.heads, dtype=torch.float64)
        for c, ref in zip(self.calls, self.refs):
            use_triton = c["q"].device.type == "cuda" and self.arch != "cpu"
            keep = predict_block_mask(c["q"], c["k"], c["v"], params, c["scale"], c["is_causal"],
                                      c["causal_offset"], use_triton)
            out = _run(c, keep, self.quant, self.pv, self.smooth_k, self.arch,
                       pv_thresholds(params, self.heads, c["q"].device))
            n, d = _per_head_rel_l1(out, ref)
            num, den = num + n, den + d
            nq, nk = c["q"].shape[2], c["k"].shape[2]
            for h in range(self.heads):
                sparsity[h] += block_sparsity(keep[:, h:h + 1], nq, nk, c["is_causal"], c["causal_offset"])
        return (num / den.clamp_min(1e-30)).float(), (sparsity / len(self.calls)).float()

    def skipped_share(self, params: dict) -> list[float]:
        """Per head, the share of visited tiles the second stage skips under `params` (measured
        with the reference, which counts them; the kernel does not)."""
        visited, skipped = [0] * self.heads, [0] * self.heads
        for c in self.calls:
            keep = predict_block_mask(c["q"], c["k"], c["v"], params, c["scale"], c["is_causal"], c["causal_offset"],
                                      False)
            stats = {}
            R.sparse_attention_reference(c["q"], c["k"], c["v"], keep, c["attn_bias"], c["keep_mask"],
                                         c["masked_value"], c["is_causal"], c["causal_offset"], c["scale"], self.quant,
                                         self.pv, self.smooth_k, pv_threshold=pv_thresholds(params, self.heads,
                                                                                            c["q"].device),
                                         stats=stats, softcap=c.get("softcap", 0.0))
            visited = [a + b for a, b in zip(visited, stats["visited"])]
            skipped = [a + b for a, b in zip(skipped, stats["skipped"])]
        return [s / max(v, 1) for s, v in zip(skipped, visited)]


def _run(c: dict, keep, quant, pv, smooth_k, arch, lam_t):
    if c["q"].device.type == "cuda" and arch != "cpu":
        from .codegen.attention.launch import attention_triton

        lut, counts = R.block_mask_to_lut(keep, c["q"].shape[2], c["k"].shape[2], c["is_causal"], c["causal_offset"])
        return attention_triton(c["q"], c["k"], c["v"], c["attn_bias"], c["keep_mask"], c["masked_value"],
                                c["is_causal"], c["causal_offset"], c["scale"], quant, pv, smooth_k, False, arch,
                                lut=lut, counts=counts, pv_threshold=lam_t, softcap=c.get("softcap", 0.0))
    return R.sparse_attention_reference(c["q"], c["k"], c["v"], keep, c["attn_bias"], c["keep_mask"],
                                        c["masked_value"], c["is_causal"], c["causal_offset"], c["scale"], quant, pv,
                                        smooth_k, pv_threshold=lam_t, softcap=c.get("softcap", 0.0))


def _bisect(search: SiteSearch, make, lo: float, hi: float, target: float, steps: int = 7):
    """Per head, the smallest x in [lo, hi] with error <= target (x larger = denser).
    Returns (x [H], ok [H], error [H], sparsity [H])."""
    h = search.heads
    lo_t, hi_t = torch.full((h,), lo), torch.full((h,), hi)
    err_hi, sp_hi = search.evaluate(make(hi_t))
    ok = err_hi <= target
    for _ in range(steps):
        mid = (lo_t + hi_t) / 2
        err, sp = search.evaluate(make(mid))
        good = err <= target
        hi_t = torch.where(good & ok, mid, hi_t)
        lo_t = torch.where(good & ok, lo_t, mid)
        err_hi = torch.where(good & ok, err, err_hi)
        sp_hi = torch.where(good & ok, sp, sp_hi)
    return hi_t, ok, err_hi, sp_hi


def search_site(search: SiteSearch, sp: SparsityOptions, target: float, second_stage: bool = True) -> dict:
    """The calibrated plan entry of one site for method sp.method: per head, the sparsest
    parameters under the budget: for Sparge a grid over theta, the sparsest tau or topk, then the
    smallest second-stage lambda keeping the error there (docs/algorithms.md#sparse-attention-search)."""
    method = sp.method
    base = sp.to_dict()  # the configured parameters, plain (lists), "method" included
    h = search.heads
    staged = method in ("sparge", "xattention")
    if staged and second_stage:
        base["pv_threshold"] = None  # blocks first, on their own; lambda spends what budget is left
    stats = {}
    if method == "sparge":
        params, ok = _search_sparge(search, base, target)
    elif method == "xattention":
        x, ok, _, _ = _bisect(search, lambda t: {**base, "tau": t.tolist()}, 0.05, 1.0, target)
        params = {**base, "tau": x.tolist()}
    elif method == "window":
        n = max(c["k"].shape[2] for c in search.calls)
        # window as a fraction of the key length: smallest that meets the budget
        x, ok, err, spars = _bisect(search, lambda f: {**base, "window": [max(1, int(v * n)) for v in f.tolist()]},
                                    1.0 / max(n, 1), 1.0, target)
        params = {**base, "window": [max(1, int(v * n)) for v in x.tolist()]}
    else:  # radial / block / svg: nothing per head to tune; measure and keep failing heads dense
        params = dict(base)
        err, spars = search.evaluate(params)
        ok = err <= target
    if staged and second_stage:
        params, stats = _search_lambda(search, params, ok, target)
    err, spars = search.evaluate(params)  # the final choice, all heads together
    # the gain counts both stages: tiles the second stage skips save their exp and P.V too
    gain = 1 - (1 - spars) * (1 - torch.tensor(stats.get("pv_skipped", [0.0] * h)))
    dense = [i for i in range(h) if not bool(ok[i]) or float(gain[i]) < MIN_GAIN or float(err[i]) > target]
    entry = {"kind": "attention", "error": {"rel_l1": err.tolist()}, "stats": {"sparsity": spars.tolist(), **stats}}
    if len(dense) == h:
        entry["dense"] = True
    else:
        entry["sparsity"] = {**params, "dense_heads": dense}
        if isinstance(params.get("pv_threshold"), list):  # a dense head skips nothing
            entry["sparsity"]["pv_threshold"] = [None if i in dense else x
                                                 for i, x in enumerate(params["pv_threshold"])]
    return entry


def _search_sparge(search: SiteSearch, base: dict, target: float) -> tuple[dict, torch.Tensor]:
    """Per head and for each theta of THETAS, the sparsest tau (or topk, when the config uses
    topk) under target; each head keeps its sparsest passing theta. -> (params, ok [H])."""
    knob = "topk" if base.get("topk") is not None else "tau"
    best = None
    thetas = _thetas_to_try(search)
    for i, theta in enumerate(thetas):
        x, ok, _, spars = _bisect(search, lambda v, theta=theta: {**base, "theta": theta, knob: v.tolist()},
                                  0.05, 1.0, target)
        pick = torch.full_like(x, i)
        if best is None:
            best = [x, ok, spars, pick]
        else:  # per head, the sparser passing choice
            better = ok & (~best[1] | (spars > best[2]))
            best = [torch.where(better, new, old) for new, old in zip((x, ok, spars, pick), best)]
    x, ok, _, pick = best
    return {**base, knob: x.tolist(), "theta": [thetas[int(i)] for i in pick.tolist()]}, ok


def _thetas_to_try(search: SiteSearch) -> list[float]:
    """THETAS that can change the outcome: one per distinct set of non-self-similar blocks (the
    others predict the same masks), and none past the first that marks a whole side of the site
    non-similar (every block kept: no sparsity to find)."""
    sims = [R.sparge_similarities(c["q"], c["k"]) for c in search.calls]
    out, seen = [], set()
    for theta in THETAS:
        rough = tuple(tuple((x < theta).flatten().tolist()) for pair in sims for x in pair)
        everything = all(bool((qs < theta).all() or (ks < theta).all()) for qs, ks in sims)
        if rough not in seen and not (out and everything):
            out.append(theta)
        seen.add(rough)
    return out


def _search_lambda(search: SiteSearch, params: dict, ok: torch.Tensor, target: float) -> tuple[dict, dict]:
    """Per head, the smallest second-stage lambda in LAMBDA_RANGE keeping the error under target.
    A head whose lambda skips no tile of the calibration inputs gets none: nothing shows it safe
    on other inputs, and the test costs the kernel a reduction per tile. Heads that skip nothing
    even at the smallest lambda are left out of the search (one pass instead of a bisection).
    -> (params with pv_threshold, {"pv_skipped": share of visited tiles skipped [H]})."""
    h = search.heads

    def make(x, heads):
        return {**params, "pv_threshold": [float(v) if o else None for v, o in zip(x.tolist(), heads)]}

    lowest = search.skipped_share(make(torch.full((h,), LAMBDA_RANGE[0]), ok.tolist()))
    heads = [bool(o) and s > 0 for o, s in zip(ok.tolist(), lowest)]
    if not any(heads):
        return {**params, "pv_threshold": None}, {"pv_skipped": [0.0] * h}
    lam, lam_ok, _, _ = _bisect(search, lambda x: make(x, heads), *LAMBDA_RANGE, target, steps=5)
    trial = make(lam, [a and bool(b) for a, b in zip(heads, lam_ok.tolist())])
    skipped = search.skipped_share(trial)
    chosen = [v if v is not None and s > 0 else None for v, s in zip(trial["pv_threshold"], skipped)]
    shares = [s if v is not None else 0.0 for v, s in zip(chosen, skipped)]
    return {**params, "pv_threshold": chosen if any(v is not None for v in chosen) else None}, {"pv_skipped": shares}


def _linear_errors(x: torch.Tensor, w: torch.Tensor, fmts) -> dict[str, float]:
    """rel-L1 of each format's linear on captured rows x against float64 x W^T."""
    from .metrics import compare
    from .ops import linear_ref as L

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
    (attnopt/mixed_precision.py); written into the plan's linear entries."""
    from .codegen.arch import ARCHS, detect_arch

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
