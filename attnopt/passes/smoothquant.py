"""SmoothQuant: the per-channel scales of each group, which groups fold, and the folded tensors.

The linear pass's middle step (linear_pipeline.py runs the steps). For a group of smooth_match.py
(a producer whose output channels feed only some linears) with scales s, each consumer's weight
columns are multiplied by s and the producer's output channels divided by it: a norm's gain (and
bias), or an up / v_proj linear's rows (and bias). In exact arithmetic the model is unchanged;
the consumers' activations lose their outlier channels, which is what makes 8-bit activations work.

Only computes: scales and folded tensors in float64 from the original weights, rounded once to
the weights' dtype. A group folds only when every member linear is rewritten and the plan has
activation statistics for its consumers; a group that does not gets its reason in its record.
linear_rewrite.py puts the folded tensors into the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..report import SiteRecord
from .graph_utils import module_class, source_line
from .linear_match import LinearSite, MatchedLinears, planned_sites
from .smooth_match import SmoothGroup, norm_params


@dataclass
class Fold:
    """A group that will be folded, with its scales (one per producer channel)."""

    group: SmoothGroup
    s: torch.Tensor
    record: SiteRecord
    producer_site: LinearSite | None
    awq_alpha: float | None = None  # an AWQ fold (awq_fold.py): s is the plan's AWQ scales

    def members(self) -> list[LinearSite]:
        return list(self.group.consumers) + ([self.producer_site] if self.producer_site else [])


def planned_act_absmax(opts) -> dict:
    """key -> max |x| per input channel of each linear, as calibration stored it in the plan."""
    return {k: v.get("act_absmax") for k, v in planned_sites(opts).items() if v.get("kind") == "linear"}


def smooth_scales(group: SmoothGroup, weights: dict, stats: dict, alpha: float) -> torch.Tensor | None:
    """s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha) over every consumer, clamped >= 1e-5; with a
    channel map (v -> o), per producer channel over the consumer channels that read it."""
    amax = None
    for c in group.consumers:
        a = stats.get(c.key)
        if a is None:
            return None
        a = torch.as_tensor(a, dtype=torch.float64)
        amax = a if amax is None else torch.maximum(amax, a)
    wmax = None
    for c in group.consumers:
        w = weights[c.key].double().abs().amax(dim=0)
        wmax = w if wmax is None else torch.maximum(wmax, w)
    if group.channel_map is not None:
        n = int(group.channel_map.max()) + 1
        amax = torch.zeros(n, dtype=torch.float64).scatter_reduce(0, group.channel_map, amax, "amax")
        wmax = torch.zeros(n, dtype=torch.float64).scatter_reduce(0, group.channel_map, wmax, "amax")
    s = amax.clamp_min(1e-5) ** alpha / wmax.clamp_min(1e-5) ** (1 - alpha)
    return s.clamp_min(1e-5)


def group_record(g: SmoothGroup) -> SiteRecord:
    """A group's record ('norm' kind, key '<producer module>:smooth'): skipped until folded."""
    return SiteRecord(kind="norm", module=g.module, key=f"{g.module}:smooth", status="skipped",
                      pattern=f"{g.kind} -> {len(g.consumers) or 'no'} linear(s)", source=source_line(g.producer),
                      module_type=module_class(g.producer), details={"consumers": [c.key for c in g.consumers]})


def member_reason(g: SmoothGroup, producer: LinearSite | None, m: MatchedLinears) -> str | None:
    """Why the group cannot fold because of its members, or None: every consumer must be
    rewritten, and a producer linear too (its output channels are divided by the scales)."""
    if g.skip_reason:
        return g.skip_reason
    bad = [c.key for c in g.consumers if m.formats.get(c.key) is None]
    if bad:
        return f"a consumer of this output is not rewritten: {bad[0]} ({m.records[bad[0]].reason})"
    if producer is not None and m.formats.get(producer.key) is None:
        return (f"the producer linear {producer.key} is not rewritten ({m.records[producer.key].reason}): "
                "its output channels could not be divided by the scales")
    return None


def accept_groups(groups: list[SmoothGroup], m: MatchedLinears, stats: dict,
                  alpha: float) -> tuple[list[Fold], list[SiteRecord]]:
    """(the groups that may fold, one record per group): every consumer rewritten, a producer
    linear rewritten too, statistics present, no site in two groups of the same role."""
    by_node = {s.node: s for s in m.sites}
    folds, recs = [], []
    as_consumer, as_producer = set(), set()
    for g in groups:
        rec = group_record(g)
        recs.append(rec)
        prod = by_node.get(g.producer) if g.kind in ("linear", "attention-v") else None
        reason = member_reason(g, prod, m)
        if reason is None and (any(c.key in as_consumer for c in g.consumers) or g.producer in as_producer):
            reason = "overlaps another smoothing group"
        s = smooth_scales(g, m.weights, stats, alpha) if reason is None else None
        if reason is None and s is None:
            reason = "no activation statistics in the plan (run attnopt.calibrate with linear.smooth)"
        if reason:
            rec.reason = reason
            continue
        as_consumer.update(c.key for c in g.consumers)
        as_producer.add(g.producer)
        folds.append(Fold(g, s, rec, prod))
    return folds, recs


def folded_tensors(folds: list[Fold], weights: dict, params: dict) -> tuple[dict, dict]:
    """(key -> weight [N, K] with the scales folded in, key -> new bias) for the folds' linears:
    computed in float64 from the originals and rounded once."""
    w64: dict[str, torch.Tensor] = {}
    b64: dict[str, tuple[torch.Tensor, torch.dtype]] = {}
    for f in folds:
        per_input = f.s if f.group.channel_map is None else f.s[f.group.channel_map]
        for c in f.group.consumers:
            w64[c.key] = w64.get(c.key, weights[c.key].double()) * per_input[None, :]
        p = f.producer_site
        if p is not None:
            w64[p.key] = w64.get(p.key, weights[p.key].double()) / f.s[:, None]
            if p.bias is not None:
                b64[p.key] = (params[p.bias].double() / f.s, params[p.bias].dtype)
    new_w = {k: v.to(weights[k].dtype) for k, v in w64.items()}
    new_b = {k: v.to(dt) for k, (v, dt) in b64.items()}
    return new_w, new_b


def folded_norm_params(f: Fold, params: dict) -> list[tuple[fx.Node, str, torch.Tensor]]:
    """[(parameter node, 'weight' | 'bias', its value / s)] for a norm group: gamma' = gamma / s
    (and beta' = beta / s)."""
    _, gamma, beta = norm_params(f.group.producer, params)
    return [(ph, role, (params[ph].double() / f.s).to(params[ph].dtype))
            for ph, role in ((gamma, "weight"), (beta, "bias")) if ph is not None]
