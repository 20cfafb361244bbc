"""AWQ scales (from the plan) folded into the op before the linears, where one can take them.

A plan's w4a16 / w4a8 linear may hold AWQ scales s (calibration/awq.py): the compile quantizes
W s and the linear must read x / s. When the linears reading a norm's output (or a down_proj reading
act(gate) * up) all hold the same scales, that division folds into the norm's gain and bias
(or up's rows) exactly as a SmoothQuant group does (smoothquant.Fold, the same folded
tensors), so nothing is added at run time. Every other AWQ linear gets x * (1 / s) in the graph
(linear_rewrite.py). A group SmoothQuant already folds keeps its SmoothQuant scales; its AWQ
linears then scale x.
"""

from __future__ import annotations

import torch

from ..ops import linear_ref as L
from .linear_match import MatchedLinears
from .smooth_match import SmoothGroup
from .smoothquant import Fold, group_record, member_reason

_FOLDABLE = ("rmsnorm", "layernorm", "linear")  # attention-v: per-head maps, not folded here


def _shared_scales(g: SmoothGroup, m: MatchedLinears, awq: dict) -> dict | None:
    """The AWQ entry every consumer of g holds (all w4a16 / w4a8, same scales, one per channel),
    or None."""
    entries = [awq.get(c.key) for c in g.consumers]
    if not entries or any(e is None for e in entries) or any(m.formats.get(c.key) not in L.AWQ_FORMATS
                                                             for c in g.consumers):
        return None
    if any(e["scales"] != entries[0]["scales"] for e in entries[1:]):
        return None
    if len(entries[0]["scales"]) != m.weights[g.consumers[0].key].shape[1]:
        return None
    return entries[0]


def awq_folds(groups: list[SmoothGroup], m: MatchedLinears, awq: dict, smooth_folds: list[Fold],
              records: dict) -> list[Fold]:
    """Folds for the groups whose consumers share AWQ scales and that SmoothQuant does not fold.
    `records`: group producer -> its record from SmoothQuant's accept_groups, reused when present."""
    taken = {f.group.producer for f in smooth_folds}
    used = {c.key for f in smooth_folds for c in f.group.consumers}
    by_node = {s.node: s for s in m.sites}
    out = []
    for g in groups:
        if g.kind not in _FOLDABLE or g.producer in taken or any(c.key in used for c in g.consumers):
            continue
        entry = _shared_scales(g, m, awq)
        prod = by_node.get(g.producer) if g.kind == "linear" else None
        if entry is None or member_reason(g, prod, m) is not None:
            continue
        rec = records.get(g.producer) or group_record(g)
        rec.reason = None
        rec.key = f"{g.module}:awq" if g.producer not in records else rec.key
        s = torch.tensor(entry["scales"], dtype=torch.float64)
        out.append(Fold(g, s, rec, prod, awq_alpha=float(entry["alpha"])))
        taken.add(g.producer)
        used.update(c.key for c in g.consumers)
    return out
