"""`attnopt.calibrate`: per-site choices under one budget on the model's output -> a Plan.

1. Capture (capture.py): the model runs once on the calibration batches, compiled with a probe at
   every site that keeps the site's inputs.
2. Candidates per site: attention keeps its original form, runs dense in a quantized format, or
   runs a sparse method whose per-head parameters are searched (site_search.py) at a ladder of
   site-error targets; a linear keeps 16 bits or takes one of the arch's formats. Each has an
   estimated time (cost_model.py) and its site's own error against float64.
3. Sensitivity: the model re-runs (no recompile: evaluate.py) with one anchor candidate per site
   and kind applied, which turns each candidate's site error into a predicted model-output error.
4. Allocation (planner.py): the fastest set of candidates whose predicted error fits
   `budget["model_rel_l1"]`, measured end to end on the calibration batches and rescaled until
   the measured error, with the spread across batches, fits; `holdout` batches are then measured
   and the plan tightened while they fail.
5. The Plan (versioned JSON): per-site entries, the predicted and measured errors, the
   speed-versus-error front explored (front.py), and what calibration cost.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterable, Mapping

import torch

from . import planner as P
from .awq import awq_search
from .capture import Captured, capture
from .cost_model import CostModel, attention_phases, linear_phases
from .evaluate import ORIGINAL, ModelRunner
from .front import make_front, write_png
from .linear_formats import linear_errors
from .site_search import SiteSearch, search_site
from ..codegen.arch import ARCHS, resolve_pv
from ..config import normalize_options
from ..ops import linear_ref as L
from ..plan import Plan
from ..progress import Progress

SEARCHES = ("sparsity", "all")
# sparge / xattention on causal sites are also searched with local_keys this large (at the larger
# target only): local heads need the kv-block before each q-block, which block scores rank low
LOCAL_KEYS = 64
MAX_SITE_ERROR = 0.5  # no sparse search aims past this site rel-L1, however damped the site is
ALL_METHODS = ("sparge", "xattention", "window")  # methods search="all" tries (no user input needed)
DENSE_FORMATS = (("int8", "fp16"), ("int8", "fp8"), ("fp8", "fp8"), ("fp4", "fp4"))


def calibrate(model, example_batches: Iterable, options: Mapping | None = None, budget: Mapping | None = None,
              *, search: str = "sparsity", holdout=None, margin: float = 0.8, mixed_precision: bool = False,
              second_stage: bool = True, cost: str | None = None, cache_dir: str | None = None,
              plot: str | None = None, max_rows: int = 2048, progress: bool = False, awq: bool = False) -> Plan:
    """Calibrate attnopt on example batches and return a Plan.

    budget:
    - "model_rel_l1" (default 0.05): the model's output (every floating tensor it returns) may
      differ from the unmodified model's by this rel-L1, for everything calibrated together,
      checked end to end on the batches with their spread (planner.upper).
    - "rel_l1" (optional): a cap on each attention site's own rel-L1 against float64 attention
      (times `margin`); "linear_rel_l1" (optional): the same for each linear.
    search:
    - "sparsity" (default): attention sites choose between their original form, the configured
      format dense, and the configured sparse method (attention.sparsity) at searched per-head
      parameters; with mixed_precision=True linears choose among the arch's formats too.
    - "all": attention sites also choose among every format the target arch runs and the sparse
      methods sparge / xattention / window (plus the configured one); linears among their formats.
    holdout: a batch (or list of batches) never used for choosing; measured, and the plan
    tightened while its error is over budget.
    cost: a GPU benchmark results JSON whose measured times replace the analytical cost model.
    max_rows: query rows per call the attention search measures against float64 attention; longer
    calls are measured on evenly spaced 128-row blocks adding up to about this many (memory stays
    bounded at long sequence lengths; the end-to-end checks still run whole batches).
    plot: a path: the speed-versus-error front (plan.meta["front"]) drawn there as a PNG.
    cache_dir: where captured site inputs are kept (default ~/.cache/attnopt/calibration), keyed
    by model weights, batches and options: another budget or method does not re-run the capture.
    linear.smooth set: each linear's per-channel max |activation| (SmoothQuant's statistic).
    awq: every linear whose planned format is w4a16 or w4a8 (the plan's choice, else
    linear.quant) gets AWQ's per-input-channel scales searched on its captured rows for that
    format (calibration/awq.py), stored
    as the site's "awq" entry and applied when the plan is compiled.

    `example_batches`: an iterable of input tuples (or kwargs dicts) for `model`; sequence
    lengths may differ between batches.
    """
    t_start = time.perf_counter()
    if search not in SEARCHES:
        from ..config import ConfigError

        raise ConfigError("calibrate.search", search, " | ".join(repr(s) for s in SEARCHES))
    user = dict(options or {})
    user.pop("plan", None)  # a new plan is being made: the old one must not steer the search
    opts = normalize_options(user)
    budget = _checked_budget(budget)
    batches = [b if isinstance(b, (Mapping, tuple, list)) else (b,) for b in example_batches]
    held = [] if holdout is None else [b if isinstance(b, (Mapping, tuple, list)) else (b,)
                                       for b in (holdout if isinstance(holdout, list) else [holdout])]
    sp = opts.attention.sparsity
    attention = sp is not None or search == "all"
    formats = mixed_precision or search == "all"
    if not attention and not formats and opts.linear.smooth is None and not awq:
        raise ValueError("nothing to calibrate: set attention.sparsity (e.g. {'method': 'sparge'}), "
                         "linear.smooth, awq=True, mixed_precision=True or search='all'")
    def bar(stage: str, total: int | None = None) -> Progress:  # on a terminal only, unless progress=True
        return Progress(f"calibrate: {stage}", total=total, enabled=None if progress else False)

    with bar("capture", len(batches)) as say:
        cap = capture(model, batches, opts, attention=attention, linears=formats or awq or opts.linear.smooth is not None,
                      cache_dir=cache_dir, say=say)
    plan = _plan(model, batches, held, opts, budget, cap, search, margin, formats, second_stage, cost, bar, max_rows)
    if awq:
        _add_awq(plan, cap, opts)
    plan.meta["calibration"]["seconds"] = time.perf_counter() - t_start
    if plot is not None and "front" in plan.meta:
        write_png(plan.meta["front"], plot)
    return plan


def _add_awq(plan: Plan, cap: Captured, opts) -> None:
    """AWQ scales for each captured linear the plan leaves in w4a16 / w4a8, searched on its rows
    for its format. Linears reading the same tensor in the same format (q / k / v after one norm:
    their per-channel max |x| are equal to the bit) are searched together, on their stacked
    outputs, and share the scales: the compile can then fold 1 / s into that norm instead of
    scaling x."""
    by_input: dict[tuple, list[str]] = {}
    for key, calls in cap.calls.items():
        entry = plan.sites.get(key)
        if calls[0].get("kind") != "linear" or entry is None or key not in cap.weights:
            continue
        fmt = entry.get("quant", opts.linear.quant)
        if fmt not in L.AWQ_FORMATS:
            continue
        absmax = torch.stack([c["absmax"] for c in calls]).amax(dim=0)
        by_input.setdefault((fmt, absmax.shape[0], absmax.cpu().numpy().tobytes()), []).append(key)
    done = {}
    for (fmt, *_), keys in by_input.items():
        calls = cap.calls[keys[0]]
        x = torch.cat([c["x"].reshape(-1, c["x"].shape[-1]) for c in calls])
        w = torch.cat([cap.weights[k][0].to(x.device) for k in keys])
        choice = awq_search(x, w, fmt=fmt)
        for k in keys:
            plan.sites[k]["awq"] = choice.entry()
            done[k] = {"format": fmt, "alpha": choice.alpha, "rtn_rel_l1": choice.rtn_rel_l1,
                       "awq_rel_l1": choice.awq_rel_l1, "searched_with": keys}
    plan.meta["awq"] = {"sites": done, "grid": "alpha 0..1 step 0.05",
                        "error": "rel-L1 on the captured rows (of the stacked outputs when searched together)"}


BUDGET_KEYS = {"model_rel_l1": 0.05, "rel_l1": None, "linear_rel_l1": None}


def _checked_budget(budget: Mapping | None) -> dict:
    """The budget with its defaults; an unknown key or a value that is not a positive number
    raises ConfigError naming it."""
    from ..config import ConfigError

    out = dict(BUDGET_KEYS)
    for key, val in dict(budget or {}).items():
        if key not in BUDGET_KEYS:
            raise ConfigError(f"budget.{key}", val, " | ".join(BUDGET_KEYS))
        ok = isinstance(val, (int, float)) and not isinstance(val, bool) and 0 < val < float("inf")
        if not ok and not (val is None and key != "model_rel_l1"):
            raise ConfigError(f"budget.{key}", val, "a number > 0" + ("" if key == "model_rel_l1" else " or None"))
        out[key] = val
    return out


def _plan(model, batches, held, opts, budget, cap: Captured, search, margin, formats, second_stage, cost,
          bar, max_rows) -> Plan:
    model_budget = float(budget["model_rel_l1"])
    site_cap = float(budget["rel_l1"]) * margin if budget["rel_l1"] is not None else float("inf")
    lin_cap = float(budget["linear_rel_l1"]) * margin if budget["linear_rel_l1"] is not None else float("inf")
    runner = ModelRunner(model, cap.compiled, cap.sink, cap.sites, small_m=int(opts.linear.min_m) - 1)
    plan = Plan(meta={"search": search, "budget": budget, "margin": margin, "mixed_precision": formats,
                      "options": opts.to_dict(), "calibration": {"site_seconds": {}, "captured_from_cache":
                                                                 cap.from_cache}})
    sites: list[P.Site] = []
    n_attention = sum(1 for c in cap.calls.values() if c[0].get("kind") != "linear")
    with bar("search", len(cap.calls)) as say:
        for key, calls in cap.calls.items():
            t0 = time.perf_counter()
            if calls[0].get("kind") == "linear":
                absmax = torch.stack([c["absmax"] for c in calls]).amax(dim=0)
                plan.sites[key] = {"kind": "linear", "act_absmax": absmax.tolist()}
                if formats and key in cap.weights:
                    say.note(f"formats of {key}")
                    sites.append(_linear_site(key, calls, cap, opts, lin_cap, search, cost))
            else:
                say.note(f"searching {key} ({calls[0]['q'].shape[1]} heads)")
                sites.append(_attention_site(key, calls, cap.sites[key], opts, model_budget, site_cap,
                                             search, second_stage, cost, max_rows, runner, batches, n_attention))
            plan.meta["calibration"]["site_seconds"][key] = time.perf_counter() - t0
            say.step()
    if not sites:
        runner.close()
        return plan
    with bar("sensitivity", len(sites)) as say:
        _sensitivities(sites, runner, batches, say)
    say = bar("budget check")
    chosen, tried = _fit(sites, runner, batches, model_budget, say)
    checked = {"budget": model_budget, "tightened": 0}
    while held and chosen is not None:  # held-out batches: tighten while they fail
        errs = runner.errors(P.choices(sites, chosen.pick), held)
        checked.update(errors=errs, passed=max(errs) <= model_budget)
        if checked["passed"] or checked["tightened"] >= 3:
            break
        checked["tightened"] += 1
        scale = 0.9 * model_budget / max(max(errs), 1e-12)
        chosen, more = _fit(sites, runner, batches, chosen.upper * scale, say)
        tried += more
    runner.close()
    say.close()
    if chosen is None:  # nothing measured fits: every site as it was (exactly the model: error 0)
        chosen = P.Checked({s.key: 0 for s in sites}, 0.0, 0.0, [0.0] * len(batches), 0.0,
                           P.total_time(sites, {s.key: 0 for s in sites}))
        if held:
            checked.update(errors=[0.0] * len(held), passed=True)
    for s in sites:
        c = s.candidates[chosen.pick[s.key]]
        plan.sites[s.key] = {**plan.sites.get(s.key, {}), **c.entry}
        if s.kind == "linear":
            plan.sites[s.key].update(error={"rel_l1": s.own_error}, sensitivity={"model_rel_l1": {
                x.label: x.model_error for x in s.candidates[1:]}})
    plan.meta["model_error"] = {"budget": model_budget, "predicted": chosen.predicted, "measured": chosen.errors,
                                "upper": chosen.upper, "rule": "one-sided 90% prediction bound over the calibration "
                                "batches: max(1.1 x largest, mean + t sd sqrt(1 + 1/k)); one batch: 1.25x"}
    if held:
        plan.meta["model_error"]["holdout"] = checked
    if formats:  # the linear part, as mixed_precision=True reported it before
        plan.meta["mixed_precision"] = {"budget": model_budget, "predicted_rel_l1": chosen.predicted,
                                        "measured_rel_l1": max(chosen.errors) if chosen.errors else 0.0}
    plan.meta["front"] = _front(sites, tried, chosen, model_budget, cap.arch, cost)
    plan.meta["calibration"]["model_runs"] = runner.runs
    return plan


def _fit(sites, runner, batches, budget, say):
    return P.fit(sites, budget, lambda ch: runner.errors(ch, batches), say=say.note)


def _sensitivities(sites: list[P.Site], runner: ModelRunner, batches, say) -> None:
    """Each candidate's predicted model error. Linears: measured per format (one run each).
    Attention: per kind (dense formats, sparse), the candidate with the largest site error is
    measured; the model error / site error ratio it shows scales that kind's other candidates."""
    for s in sites:
        say.note(s.key)
        say.step()
        if s.kind == "linear":
            for c in s.candidates[1:]:
                c.model_error = max(runner.errors({s.key: c.choice}, batches))
            continue
        for kind in ("dense", "sparse"):
            group = [c for c in s.candidates[1:] if c.entry.get("dense", False) == (kind == "dense")]
            if not group:
                continue
            anchor = max(group, key=lambda c: c.site_error)
            if not anchor.measured:
                anchor.model_error, anchor.measured = max(runner.errors({s.key: anchor.choice}, batches)), True
            ratio = anchor.model_error / anchor.site_error if anchor.site_error > 0 else 0.0
            for c in group:
                if not c.measured:
                    c.model_error = ratio * c.site_error


# ------------------------------------------------------------------------------ attention


def _shape(call: Mapping) -> tuple:
    q, k = call["q"], call["k"]
    return (q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3], bool(call["is_causal"]))


def _attention_site(key, calls, site, opts, model_budget, site_cap, search, second_stage, cost, max_rows,
                    runner: ModelRunner, batches, n_attention: int) -> P.Site:
    """The site's candidates. The sparse searches aim at site errors that reach the model's
    output as the whole budget, and as a 1/sqrt(n) and a 1/n share of it (n attention sites
    adding in quadrature, or linearly): how a site error reaches the output is measured first,
    on the dense candidate."""
    arch = site["arch"]
    cm = CostModel(arch, measured=cost)
    shapes = [_shape(c) for c in calls]
    n = len(calls)

    def kernel_only(s, quant, pv, kept=1.0):
        """The attention kernel's tensor-core time: what formats and skipped blocks cut."""
        (ph,) = [p for p in attention_phases(arch, *s, quant=quant, pv=pv, kept=kept) if p.name == "attention"]
        return ph.compute_s

    # search="sparsity" honours the configured rewrite: candidates are ranked by the attention
    # kernel's tensor-core work (formats and skipped blocks); memory traffic and the launches
    # around it (statistics, quantize, predictor) are weighed by search="all", which may find a
    # short site faster left as it was
    def t_original():
        if search != "all":
            return sum(kernel_only(s, "none", "fp16") for s in shapes) / n
        return sum(cm.original_attention_time(*s) for s in shapes) / n

    def t_run(quant, pv, kept=1.0, method=None):
        if search != "all":
            return sum(kernel_only(s, quant, pv, kept) for s in shapes) / n
        return sum(cm.attention_time(*s, quant=quant, pv=pv, kept=kept, method=method) for s in shapes) / n

    def site_error(choice) -> float:
        return search_obj.site_error(choice, site)

    cands = [P.Candidate("original", ORIGINAL, t_original(), entry={"kind": "attention", "original": True})]
    spec = ARCHS[arch]
    a = opts.attention
    base_q = a.quant if a.quant != "none" or search != "all" else "int8"
    base_pv = resolve_pv(a.pv, base_q, spec)
    search_obj = SiteSearch(key, calls, base_q, base_pv, bool(site["smooth_k"]), arch, max_rows=max_rows)
    formats = [(base_q, base_pv)]
    if search == "all":
        formats += [f for f in DENSE_FORMATS if f not in formats and spec.supports(*f) is None]
    for quant, pv in formats:
        if quant == "none" and pv == "fp16":
            continue
        choice = {"quant": quant, "pv": pv, "sparsity": None}
        err = site_error(choice)
        if err <= site_cap:
            cands.append(P.Candidate(f"{quant}/{pv}", choice, t_run(quant, pv), err,
                                     entry={"kind": "attention", "dense": True, "quant": quant, "pv": pv,
                                            "error": {"rel_l1": err}}))
    methods = []
    if a.sparsity is not None:
        methods.append(a.sparsity)
    if search == "all":
        methods += [normalize_options({"attention": {"sparsity": {"method": m}}}).attention.sparsity
                    for m in ALL_METHODS if a.sparsity is None or m != a.sparsity.method]
    dense = cands[1] if len(cands) > 1 else None
    amp = 1.0
    if dense is not None and dense.site_error > 0:
        dense.model_error, dense.measured = max(runner.errors({key: dense.choice}, batches)), True
        amp = max(dense.model_error / dense.site_error, 0.05)
    targets = sorted({min(site_cap, MAX_SITE_ERROR, model_budget / amp * f) for f in (1.0, n_attention ** -0.5, 1.0 / n_attention)})
    if any(bool(c["is_causal"]) for c in calls):  # local heads' first rows need the keys just before
        methods += [dataclasses.replace(sp, local_keys=LOCAL_KEYS) for sp in list(methods)
                    if getattr(sp, "local_keys", None) == 0]
    seen = set()
    for sp in methods:
        for target in (targets if getattr(sp, "local_keys", 0) != LOCAL_KEYS else targets[-1:]):
            entry = search_site(search_obj, sp, target, second_stage)
            if entry.get("dense"):
                continue
            sig = repr(entry["sparsity"])
            if sig in seen:
                if max(entry["error"]["rel_l1"]) < 0.5 * target:
                    break  # saturated: the same parameters however much room there is
                continue
            seen.add(sig)
            choice = {"quant": base_q, "pv": base_pv, "sparsity": entry["sparsity"]}
            err = site_error(choice)
            if err > site_cap:
                continue
            if err < 0.5 * target and target > targets[0]:
                saturated = True  # the search had room it could not use: larger targets find no more
            else:
                saturated = False
            stats = entry.get("stats", {})
            heads = len(stats.get("sparsity", [])) or 1
            skipped = [1 - (1 - s) * (1 - p) for s, p in zip(stats.get("sparsity", [0.0]),
                                                            stats.get("pv_skipped", [0.0] * heads))]
            kept = 1 - sum(skipped) / len(skipped)
            label = f"{sp.method}{'+local' if getattr(sp, 'local_keys', 0) else ''}@{target:.3g}"
            cands.append(P.Candidate(label, choice, t_run(base_q, base_pv, kept, sp.method), err,
                                     entry={**entry, "quant": base_q, "pv": base_pv,
                                            "error": {**entry["error"], "site_rel_l1": err}}))
            if saturated:
                break
    return P.Site(key, "attention", cands)


# ------------------------------------------------------------------------------ linears


def _linear_site(key, calls, cap: Captured, opts, lin_cap, search, cost) -> P.Site:
    w, _bias = cap.weights[key]
    arch = cap.arch
    cm = CostModel(arch, measured=cost)
    fmts = [f for f in ("fp8", "w8a8", "w4a16", "w4a8", "nvfp4") if f in ARCHS[arch].linear_formats]
    x = torch.cat([c["x"].reshape(-1, c["x"].shape[-1]) for c in calls])
    own = linear_errors(x, w.to(x.device), fmts)
    rows = [int(c.get("rows", c["x"].reshape(-1, c["x"].shape[-1]).shape[0])) for c in calls]
    n_out, k_in = w.shape

    def gemm_only(m, fmt):
        (ph,) = [p for p in linear_phases(arch, m, n_out, k_in, fmt) if p.name == "gemm"]
        return max(ph.compute_s, ph.memory_s)

    def t(fmt):  # as for attention: search="all" weighs the launches around the GEMM too
        if search != "all":
            return sum(gemm_only(m, fmt) for m in rows) / len(rows)
        return sum(cm.linear_time(m, n_out, k_in, fmt) for m in rows) / len(rows)

    cands = [P.Candidate("none", "none", t("none"), own["none"], entry={"kind": "linear", "quant": "none"})]
    for fmt in fmts:
        if own[fmt] <= lin_cap:
            cands.append(P.Candidate(fmt, fmt, t(fmt), own[fmt], entry={"kind": "linear", "quant": fmt}))
    site = P.Site(key, "linear", cands)
    site.own_error = own
    return site


def _front(sites, tried, chosen, budget, arch, cost) -> dict:
    """The speed-versus-error points explored: every measured allocation, and allocations at
    other targets (predicted only)."""
    baseline = P.total_time(sites, {s.key: 0 for s in sites})
    points, seen = [], set()
    for c in tried:
        sig = tuple(sorted(c.pick.items()))
        seen.add(sig)
        points.append({"time": c.time, "error": c.predicted, "measured_error": c.upper,
                       "chosen": c.pick == chosen.pick, "label": _describe(sites, c.pick)})
    for f in (0.0, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0):  # 0: every site as it was
        pick = P.allocate(sites, budget * f)
        sig = tuple(sorted(pick.items()))
        if sig in seen:
            continue
        seen.add(sig)
        points.append({"time": P.total_time(sites, pick), "error": P.predicted(sites, pick), "measured_error": None,
                       "chosen": False, "label": _describe(sites, pick)})
    return make_front(arch, CostModel(arch, measured=cost).source, baseline, sorted(points, key=lambda p: p["error"]),
                      budget)


def _describe(sites, pick) -> str:
    counts: dict[str, int] = {}
    for s in sites:
        label = s.candidates[pick[s.key]].label.split("@")[0]
        if label not in ("original", "none"):
            counts[label] = counts.get(label, 0) + 1
    return ", ".join(f"{n}x {k}" for k, n in sorted(counts.items())) or "unchanged"
