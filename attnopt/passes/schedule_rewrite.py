"""A scheduled attention site in a compiled graph: one op call per variant, picked at run time.

A site whose module path matches `attention.schedule` entries (its plan entry's own `schedule`
first, then the section's) gets one variant per distinct choice: variant 0 is what the site runs
without a step (the section's options and its plan entry), the others what the entries' `use`
give. The step is runtime data: the graph takes one more input, the step tensor of its device
(`attnopt.schedule.step_tensor`, [step, total] in float64, written in place by `attnopt.step`),
and computes from it, on the device, the index of the variant in force (`variant_index`). Each
variant's op gets that index as its `gate` and runs only when it holds its own id; the outputs
are combined with `torch.where` on the index, so an unselected variant's unwritten output never
reaches the result. Nothing about the step is baked into the graph: one compile serves every
step, and a CUDA graph replays the same kernels whatever the step.

A variant that cannot run at the site (a format the arch lacks, parameters that do not fit)
rejects the whole site with the entry and the reason: running another choice than the one the
schedule names would be silent. 16-bit dense attention (quant 'none', no sparsity) is a valid
variant here (attnopt's own 16-bit kernel), so "dense for the first 25% of steps" works; a site
all of whose variants are 16-bit dense is left as it was, as without a schedule.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..config import ConfigError
from ..schedule import site_entries
from .attention_match import AttentionSite
from .attention_rewrite import Reject, SiteParams, decide
from .graph_utils import GraphBuilder, aten, fake_mode_of

STEP_INPUT_KEY = "attnopt_step_device"  # meta of the placeholders the backend feeds the step tensors


@dataclass
class ScheduledSite:
    """What a scheduled site runs: `params[v]` is variant v's (v = 0: no entry in force); `ranges`
    lists (steps, variant) in the order entries are tried (the first that holds the step wins)."""

    params: list[SiteParams]
    ranges: list[tuple[list, int]]
    entries: list[dict] = field(default_factory=list)  # per matching entry: its source, range, variant

    def describe(self) -> list[dict]:
        """The variants, for the site's record."""
        return [{"variant": v, "quant": p.quant, "pv": p.pv, "smooth_k": p.smooth_k, "smooth_q": p.smooth_q,
                 "sparsity": p.sparsity["method"] if p.sparsity else None, "kernel": p.kernel}
                for v, p in enumerate(self.params)]


def site_schedule(opts, key: str, module: str) -> list[tuple[str, dict]]:
    """(where it comes from, entry) for each schedule entry matching the site, in the order they
    are tried: the site's plan entry's own schedule, then the section's."""
    out = []
    entry = opts.plan.site(key) if opts.plan is not None else None
    if entry is not None and entry.get("kind") == "attention":
        own = entry.get("schedule") or []
        out += [(f"plan {key!r} schedule[{n}]", own[n]) for n in site_entries(own, module)]
    sched = opts.attention.schedule
    out += [(f"attention.schedule[{n}]", sched[n]) for n in site_entries(sched, module)]
    return out


def _same(p: SiteParams) -> tuple:
    return (p.quant, p.pv, p.smooth_k, p.smooth_q, json.dumps(p.sparsity, sort_keys=True), p.kernel)


def _plain(p: SiteParams) -> bool:
    return p.quant == "none" and p.sparsity is None


def scheduled(site: AttentionSite, opts, spec, key: str, grad=None) -> ScheduledSite | None:
    """The site's variants, or None when no schedule entry changes what it runs (then it is built
    as without a schedule). Raises Reject as `decide` does, naming the entry at fault."""
    matching = site_schedule(opts, key, site.module)
    if not matching:
        return None
    base = decide(site, opts, spec, False, key, grad, plain_ok=True)
    params, ids, ranges, entries = [base], {_same(base): 0}, [], []
    for where, entry in matching:
        try:
            p = decide(site, opts, spec, False, key, grad, use=entry["use"], plain_ok=True)
        except (Reject, ConfigError) as e:  # ConfigError: a plan entry's use the section's options refuse
            raise Reject(f"{where} (steps {entry['steps']}, use {entry['use']}): {e}") from None
        v = ids.setdefault(_same(p), len(params))
        if v == len(params):
            params.append(p)
        ranges.append((list(entry["steps"]), v))
        entries.append({"entry": where, "steps": list(entry["steps"]), "variant": v})
    if all(_plain(p) for p in params):
        raise Reject("attention.quant is 'none' and no sparsity is configured, at every step of its schedule: "
                     "nothing to change")
    if len(params) == 1:
        return None
    return ScheduledSite(params, ranges, entries)


def step_input(graph: fx.Graph, device: torch.device) -> fx.Node:
    """The graph's placeholder for the step tensor of `device`, added after its other inputs
    (once per device; the backend appends the tensors in placeholder order)."""
    device = torch.device(device)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for n in placeholders:
        if n.meta.get(STEP_INPUT_KEY) == device:
            return n
    fake_mode = fake_mode_of(graph)
    with graph.inserting_after(placeholders[-1]):
        node = graph.placeholder(f"attnopt_step_{device.type}{device.index if device.index is not None else ''}")
    if fake_mode is not None:
        with fake_mode:
            node.meta["val"] = torch.empty(2, dtype=torch.float64, device=device)
    else:
        node.meta["val"] = torch.empty(2, dtype=torch.float64, device="meta")
    node.meta[STEP_INPUT_KEY] = device
    return node


def step_devices(graph: fx.Graph) -> list[torch.device]:
    """The devices whose step tensors the graph takes, in placeholder order (last inputs)."""
    return [n.meta[STEP_INPUT_KEY] for n in graph.nodes if n.op == "placeholder" and STEP_INPUT_KEY in n.meta]


def variant_index(b: GraphBuilder, step: fx.Node, ranges: list[tuple[list, int]]) -> fx.Node:
    """An int32 scalar tensor on the step's device: the variant of the first range holding the
    step, else 0. The same test as attnopt.schedule.step_in, in float64 on the device: integer
    ranges compare the step index, others step / total (one IEEE division, as Python's).
    Outside any step block the tensor holds (-1, 0): the index is -1 and the fraction -inf, so
    no range (lo >= 0) holds it and variant 0 runs."""
    dev = step.meta["val"].device
    i = b.call(aten.select.int, step, 0, 0)
    frac = b.call(aten.div.Tensor, i, b.call(aten.select.int, step, 0, 1))
    idx = b.call(aten.scalar_tensor.default, 0, dtype=torch.int32, device=dev)
    for steps, v in reversed(ranges):  # the first range that holds the step is applied last
        lo, hi = steps
        x = i if isinstance(lo, int) and isinstance(hi, int) else frac
        inside = b.call(aten.logical_and.default, b.call(aten.ge.Scalar, x, lo), b.call(aten.lt.Scalar, x, hi))
        idx = b.call(aten.where.self, inside, b.call(aten.scalar_tensor.default, v, dtype=torch.int32, device=dev),
                     idx)
    return idx
