"""Spend one model-output error budget across every site: the greedy allocation and its check.

Each site offers candidates (candidates[0] is the site as it was: error 0). A candidate carries
an estimated time (cost_model.py) and a predicted model-output error when it alone is applied
(its sensitivity). Independent errors add in quadrature, so the allocation repeatedly takes the
move that saves the most estimated time per unit of added squared error while the root of the
summed squares stays within the target. Sites' errors need not be independent (the issue that
made this module: sparse sites' errors added up), so the chosen plan is then measured end to end
and the target rescaled by budget / measured until the measured error (with the spread across
batches, `upper`) fits the budget with as little left over as a few steps find.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field


# a move must save this share of its site's original time to spend any error (a launch-bound
# site gains nothing from a format or sparsity the cost model prices as a rounding error)
MIN_SAVING = 0.02


@dataclass
class Candidate:
    """One choice at one site."""

    label: str
    choice: object  # what evaluate.ModelRunner runs: an attention choice dict or a linear format
    time: float  # estimated seconds per model run at this site
    site_error: float = 0.0  # the site's own output rel-L1 (against float64)
    model_error: float = 0.0  # predicted model-output rel-L1 with only this candidate applied
    entry: dict = field(default_factory=dict)  # the plan entry it writes
    measured: bool = False  # model_error was measured end to end (not predicted from a ratio)


@dataclass
class Site:
    key: str
    kind: str  # "attention" | "linear"
    candidates: list[Candidate]  # [0]: the site as it was
    seconds: float = 0.0  # calibration time spent on this site


# one-sided 90% Student t quantiles by degrees of freedom (beyond the table: 1.3, near normal)
_T90 = {1: 3.078, 2: 1.886, 3: 1.638, 4: 1.533, 5: 1.476, 6: 1.440, 7: 1.415, 8: 1.397, 9: 1.383, 10: 1.372}


def upper(errors: Sequence[float]) -> float:
    """The model error a new batch of the same kind should stay under, from the calibration
    batches' spread: the one-sided 90% prediction bound mean + t * sd * sqrt(1 + 1/k) for k
    batches, and at least 1.1x the largest; with one batch (no spread to measure), 1.25x it."""
    errs = [float(e) for e in errors]
    if not errs:
        return 0.0
    k = len(errs)
    if k == 1:
        return errs[0] * 1.25
    mean = sum(errs) / k
    sd = math.sqrt(sum((e - mean) ** 2 for e in errs) / (k - 1))
    return max(1.1 * max(errs), mean + _T90.get(k - 1, 1.3) * sd * math.sqrt(1 + 1 / k))


def allocate(sites: Sequence[Site], target: float) -> dict[str, int]:
    """Greedy: per site a candidate index, the root of the summed squared predicted errors
    within `target`, taking the most time saved per unit of added squared error first (moves
    saving under MIN_SAVING of the site's original time are not worth any error)."""
    pick = {s.key: 0 for s in sites}
    spent, allowed = 0.0, target * target
    while True:
        best, best_ratio = None, 0.0
        for s in sites:
            cur = s.candidates[pick[s.key]]
            for i, c in enumerate(s.candidates):
                gain = cur.time - c.time
                if gain <= MIN_SAVING * s.candidates[0].time:
                    continue
                added = c.model_error ** 2 - cur.model_error ** 2
                if spent + added > allowed:
                    continue
                ratio = gain / max(added, 1e-12)
                if ratio > best_ratio:
                    best, best_ratio = (s.key, i, added), ratio
        if best is None:
            return pick
        key, i, added = best
        pick[key] = i
        spent += added


def predicted(sites: Sequence[Site], pick: Mapping[str, int]) -> float:
    return math.sqrt(sum(s.candidates[pick[s.key]].model_error ** 2 for s in sites))


def total_time(sites: Sequence[Site], pick: Mapping[str, int]) -> float:
    return sum(s.candidates[pick[s.key]].time for s in sites)


def choices(sites: Sequence[Site], pick: Mapping[str, int]) -> dict[str, object]:
    return {s.key: s.candidates[pick[s.key]].choice for s in sites}


@dataclass
class Checked:
    """One allocation measured end to end."""

    pick: dict[str, int]
    target: float
    predicted: float
    errors: list[float]  # per calibration batch
    upper: float
    time: float


def fit(sites: Sequence[Site], budget: float, measure: Callable[[dict], list[float]], steps: int = 5,
        say: Callable[[str], None] = lambda m: None) -> tuple[Checked | None, list[Checked]]:
    """Allocate under `budget`, measure, rescale the target by budget / upper, repeat.
    -> (the fastest allocation whose `upper` fits the budget, or None; every allocation tried)."""
    tried: list[Checked] = []
    target, seen = budget, {}
    for _ in range(steps):
        pick = allocate(sites, target)
        sig = tuple(sorted(pick.items()))
        if sig in seen:
            chk = seen[sig]
        else:
            errs = measure(choices(sites, pick))
            chk = Checked(pick, target, predicted(sites, pick), errs, upper(errs), total_time(sites, pick))
            seen[sig] = chk
            tried.append(chk)
            say(f"target {target:.4f}: predicted {chk.predicted:.4f}, measured {chk.upper:.4f}")
        if chk.upper <= budget and chk.upper >= 0.8 * budget:
            break
        ratio = budget / max(chk.upper, 1e-12)
        target *= min(2.0, max(0.25, ratio * (0.95 if chk.upper > budget else 1.0)))
    ok = [c for c in tried if c.upper <= budget]
    return (min(ok, key=lambda c: c.time) if ok else None), tried
