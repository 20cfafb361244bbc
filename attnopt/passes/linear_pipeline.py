"""The linear pass: linear match -> smoothquant -> AWQ folds (a plan's AWQ scales, awq_fold.py)
-> linear rewrite, on Dynamo's graph (training graphs: linear match -> training norms -> linear
rewrite).

It runs before Inductor (manager.py lists where every pass runs): there the weights are real
parameters (Dynamo hands the backend its example inputs), so they can be quantized and smoothed
once and stored as constants of the graph module (in training graphs, with linear.training set,
nothing is baked: each linear becomes the training op, which quantizes its weight on every call,
and no SmoothQuant scales are folded); Inductor's freezing, which would expose them
later, cannot be switched on from a backend (Dynamo reads that flag while tracing).

Every decision and every quantized tensor is computed before the graph is edited, and the edit is
all or nothing (linear_rewrite.py), so a failure never leaves a half-folded model.
"""

from __future__ import annotations

import torch.fx as fx

from ..codegen.arch import ArchSpec
from ..report import SiteRecord
from .awq_fold import awq_folds
from .linear_match import match_linears, planned_sites
from .linear_rewrite import quantize_weights, rewrite_all_or_nothing
from .smooth_match import smooth_groups
from .smoothquant import accept_groups, planned_act_absmax
from .train_norms import find_train_norms


def run_linear_pass(gm: fx.GraphModule, example_inputs, opts, spec: ArchSpec, probe_sink: str | None = None,
                    capture_all: bool = False) -> list[SiteRecord]:
    """Rewrite the linears of Dynamo's graph in place; return one record per candidate site (the
    linears, then the smoothing groups). The parameters whose values the graph now holds copies
    of go to gm.meta[linear_rewrite.BAKED_META_KEY]."""
    matched = match_linears(gm, example_inputs, opts, spec, capture_all)
    if matched is None:
        return []
    smooth = opts.linear.smooth if not matched.training else None  # training graphs fold nothing
    groups = smooth_groups(matched.sites, matched.params) if smooth is not None else []
    alpha = float(smooth.alpha) if smooth is not None else 0.0
    folds, norm_records = accept_groups(groups, matched, planned_act_absmax(opts), alpha)
    awq = {} if matched.training else {k: v["awq"] for k, v in planned_sites(opts).items()
                                       if v.get("kind") == "linear" and "awq" in v}
    if awq:  # AWQ scales fold into a norm / up_proj where every consumer shares them, else x * (1 / s)
        found = groups if smooth is not None else smooth_groups(matched.sites, matched.params)
        more = awq_folds(found, matched, awq, folds, {g.producer: r for g, r in zip(groups, norm_records)})
        norm_records += [f.record for f in more if all(f.record is not r for r in norm_records)]
        folds += more
        awq = {k: v for k, v in awq.items() if not any(c.key == k for f in more for c in f.group.consumers)}
    prepared, folds = quantize_weights(matched, folds, awq)
    train_norms = find_train_norms(matched) if matched.training else []
    norm_records += [tn.record for tn in train_norms]
    rewrite_all_or_nothing(gm, matched, folds, prepared, norm_records, opts, spec, probe_sink, capture_all,
                           train_norms)
    return list(matched.records.values()) + norm_records
