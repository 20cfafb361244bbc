"""attnopt's passes, the order they run in (PASS_ORDER), and the state they share (PassContext).

Every pass runs in the backend, before AOTAutograd (docs/design.md#how-a-graph-flows): the
linear pass on Dynamo's graph, the attention pass on the aten graph traced from it. Inductor's
caches key on the rewritten graph plus `CacheKeyPass`'s uuid (attnopt's source, options,
torch / triton versions, arch, switches), so they stay on and never serve a graph compiled under
other options or code.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import time
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from .. import switches
from ..codegen.arch import ARCHS, ArchSpec, detect_arch
from ..config import Options
from ..logs import log
from ..report import Recorder, SiteRecord
from .attention_match import find_attention_sites
from .graph_snapshot import snapshot
from ..logs import trace_sites
from .attention_rewrite import Reject, decide, rewrite, site_flops
from .schedule_rewrite import ScheduledSite, scheduled, site_schedule, step_input, variant_index
from .aten_capture import CaptureError, might_hold_attention, needs_autograd, own_backward_region, trace_to_aten
from .grad_flow import GradFlow
from .linear_pipeline import run_linear_pass
from . import capture_cache, on_cpu



@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """Hash of every .py file of the attnopt package: a code change invalidates cached graphs."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = []
    for d, _, files in os.walk(root):
        paths += [os.path.join(d, f) for f in files if f.endswith(".py")]
    return get_hash_for_files(tuple(sorted(paths))).hex()


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"


@dataclass
class PassContext:
    """State shared by the passes of one backend: options, where records go, probe wiring."""

    options: Options
    recorder: Recorder = field(default_factory=Recorder)
    probe_sink: str | None = None  # set by attnopt.inspect: rewritten sites measure themselves
    inline: str | None = None  # "auto" (CUDA only) | "always" | "never"; None: the ATTNOPT_INLINE switch
    capture_graphs: bool = False  # keep before/after snapshots of each graph (the HTML view)
    capture_linears: bool = False  # calibration: every selected linear becomes a probe
    announce_cpu: bool = True  # warn (once per process) when a CPU site is rewritten; inspect's report says it instead
    current_graph: int | None = None  # recorder index of the graph being compiled
    # sites whose rewrite hit an internal error (key -> error): kept as they were from then on
    internal_errors: dict[str, str] = field(default_factory=dict)

    def inline_mode(self) -> str:
        return self.inline or switches.inline_mode()

    def arch_key(self) -> str:
        opt = self.options.arch
        if opt != "auto":
            return opt
        return detect_arch("cuda" if torch.cuda.is_available() else "cpu")

    def arch_for_graph(self, graph: fx.Graph) -> ArchSpec:
        opt = self.options.arch
        if opt != "auto":
            return ARCHS[opt]
        for n in graph.nodes:
            v = n.meta.get("val")
            if n.op == "placeholder" and isinstance(v, torch.Tensor):
                if v.device.type == "cuda":
                    return ARCHS[detect_arch(v.device)]
        return ARCHS[detect_arch("cpu")]

    def uuid(self, pass_name: str) -> str:
        h = hashlib.sha256()
        for part in (pass_name, source_hash(), self.options.to_json(), torch.__version__, _triton_version(),
                     self.arch_key(), self.probe_sink or "", self.inline_mode(), switches.state(),
                     str(self.capture_linears), *sorted(self.internal_errors)):
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()


def _shape_list(node: fx.Node) -> list:
    v = node.meta.get("val")
    return [int(s) if isinstance(s, int) else str(s) for s in v.shape] if isinstance(v, torch.Tensor) else []


def _size(x):
    return int(x) if isinstance(x, int) else str(x)


def _logical_shape(op) -> list:
    """An operand as the kernel reads it, whatever the graph's layout: its batch dims, then tokens,
    then features (size-1 dims have no atoms; broadcast ones, such as GQA's repeat, are left out)."""
    batch = [_size(a.size) for a in op.batch if not a.broadcast]
    return batch + [_size(a.size) for a in op.rows] + [_size(a.size) for a in op.cols]


def _describe(rec: SiteRecord, site) -> None:
    """Shapes, dtype, FLOPs and mask structure of a candidate, whatever its fate."""
    rec.details = {"scale": site.scale, "causal_offset": site.keep.causal_offset,
                   "keep_masks": len(site.keep.residual), "bias_terms": len(site.bias), "masked_value": site.fill,
                   "softcap": site.softcap or None}
    if site.q is None:
        return
    rec.flops = site_flops(site)
    rec.shapes = {"q": _logical_shape(site.q), "k": _logical_shape(site.k), "v": _logical_shape(site.v),
                  "out": _shape_list(site.anchor)}
    rec.details["layout"] = "q/k/v: [batch..., heads, tokens, features]; size-1 dims and GQA's repeat left out"
    rec.dtype = str(site.q.traced.src.meta["val"].dtype).replace("torch.", "")
    rec.details["device"] = site.q.traced.src.meta["val"].device.type


class SiteInternalError(RuntimeError):
    """A rewrite failed with an internal error. Raised out of the pass so the compile is abandoned
    before Inductor or AOTAutograd can cache a graph that silently lacks the rewrite; the backend
    compiles the frame again with those caches off and the failed sites left as they were."""

    def __init__(self, errors: dict[str, str]):
        self.errors = dict(errors)
        super().__init__("attnopt: internal error while rewriting " + "; ".join(f"{k}: {e}" for k, e in errors.items()))


class AttnoptWarning(UserWarning):
    """Something attnopt could not do, which the user should know about (the message says what)."""


class AttentionPass:
    """Capture every attention (SDPA and hand-written) and rewrite it into attnopt's op.

    Runs on the aten graph `aten_capture.trace_to_aten` made from Dynamo's graph: the forward
    graph AOTAutograd would trace, with Inductor's decompositions applied, before Inductor's own
    SDPA fusion and before SDPA calls become opaque extern kernels. Returns whether it rewrote
    anything. A site whose rewrite hits an internal error makes it raise SiteInternalError (the
    caller traces again and leaves that site as it was).
    """

    name = "attention"

    def __init__(self, ctx: PassContext, training: bool = False, grad: GradFlow | None = None,
                 step_inputs: bool = False):
        self.ctx = ctx
        self.training = training  # the graph will be differentiated (AOTAutograd's own test)
        self.grad = grad  # which values need a gradient; None in a joint graph (autograd already traced)
        self.step_inputs = step_inputs  # the backend feeds step tensors (scheduled sites may add inputs)

    def _schedule(self, site, key: str, spec: ArchSpec, probe: str | None) -> tuple[ScheduledSite | None, str | None]:
        """(the site's schedule variants or None, why they are not applied here or None). Under
        inspect's probes the variants are still decided, for the report, but not built."""
        if not site_schedule(self.ctx.options, key, site.module):
            return None, None
        why = ("a graph that needs grad" if self.training else "attnopt.inspect's measuring probes" if probe
               else "the joint-graph fallback (no step input)" if not self.step_inputs else None)
        if not why:
            return scheduled(site, self.ctx.options, spec, key, self.grad), None
        note = f"attention.schedule not applied in {why}: the section's options at every step"
        sched = None
        if probe and not self.training:  # inspect: the report still lists the variants a compile would run
            try:
                sched = scheduled(site, self.ctx.options, spec, key, self.grad)
            except Reject as e:
                return None, note + f" (compiled, the site would be left as it was: {e})"
            if sched is None:  # its entries change nothing here
                return None, None
        return sched, note

    def __call__(self, graph: fx.Graph) -> bool:
        t0 = time.perf_counter()
        ctx = self.ctx
        gi = ctx.current_graph if ctx.current_graph is not None else ctx.recorder.new_graph()
        spec = ctx.arch_for_graph(graph)
        per_module: dict[str, int] = {}
        changed = False
        records: list[SiteRecord] = []
        sites = find_attention_sites(graph)
        keys = []
        for site in sites:
            idx = per_module[site.module] = per_module.get(site.module, -1) + 1
            keys.append(ctx.recorder.claim(gi, f"{site.module}#{idx}"))
        if ctx.capture_graphs:
            owner = {n: key for site, key in zip(sites, keys) for n in site.internal}
            ctx.recorder.set_snapshot(gi, "before", snapshot(graph, owner))
        failed: dict[str, str] = {}
        for site, key in zip(sites, keys):
            rec = SiteRecord(kind="attention", module=site.module, key=key, status="skipped",
                             pattern=site.pattern, source=site.source, module_type=site.module_type)
            try:
                _describe(rec, site)
                if key in ctx.internal_errors:  # failed in an earlier try: left as it was
                    raise Reject(f"internal error while rewriting (left as it was): {ctx.internal_errors[key]}")
                probe = f"{ctx.probe_sink}/{key}" if ctx.probe_sink else None
                sched, why_not = self._schedule(site, key, spec, probe)
                applied = sched is not None and why_not is None
                params = sched.params[0] if applied else decide(site, ctx.options, spec, self.training, key, self.grad)
                if applied:
                    op = rewrite(graph, site, params, tag=key, variants=sched.params,
                                 gate=lambda b, s=sched, d=site.q.traced.src.meta["val"].device:
                                 variant_index(b, step_input(graph, d), s.ranges))
                else:
                    op = rewrite(graph, site, params, probe, tag=key)
                changed = True
                rec.status = "rewritten"
                rec.op = {(True, True): "attnopt::sparse_attention_train", (True, False): "attnopt::attention_train",
                          (False, True): "attnopt::sparse_attention", (False, False): "attnopt::attention"}[
                    (bool(params.backward), bool(params.sparsity))]
                rec.kernel = params.kernel
                if params.note:  # planned / configured sparse parameters set aside here, and why
                    rec.reason = params.note
                if why_not:
                    rec.reason = (rec.reason + "; " if rec.reason else "") + why_not
                if sched:  # also when not applied here (inspect's probes): the variants a compile would run
                    rec.details["schedule"] = {"variants": sched.describe(), "entries": sched.entries,
                                               "applied": applied}
                if applied:
                    rec.kernel = " | ".join(f"v{v}: {p.kernel}" for v, p in enumerate(sched.params))
                    ops = sorted({"attnopt::sparse_attention" if p.sparsity else "attnopt::attention"
                                  for p in sched.params})
                    rec.op = " + ".join(ops) + " (scheduled)"
                if params.backward:
                    rec.details["backward"] = params.backward
                q4, k4 = op.args[0].meta["val"], op.args[1].meta["val"]
                if params.sparsity:
                    rec.details["sparse_method"] = params.sparsity["method"]
                rec.details.update(quant=params.quant, pv=params.pv, smooth_k=params.smooth_k,
                                   smooth_q=params.smooth_q, arch=params.arch, q_heads=q4.shape[1],
                                   kv_heads=k4.shape[1],
                                   mask=_mask_words(op))
                if ctx.announce_cpu:
                    on_cpu.announce(q4.device.type)
            except Reject as e:
                rec.reason = str(e)
            except Exception as e:  # never break the user's compile: leave the site as it was
                log.debug("attnopt: could not rewrite attention at %s", key, exc_info=True)
                failed[key] = f"{type(e).__name__}: {e}"
                rec.reason = f"internal error while rewriting (left as it was): {failed[key]}"
            ctx.recorder.add_site(gi, rec)
            records.append(rec)
            log.info("attention site %s: %s (%s)", key, rec.status, rec.reason or rec.kernel)
        ctx.recorder.add_pass_time(gi, self.name, time.perf_counter() - t0)
        if failed:  # the graph may be half rewritten: the caller starts again from Dynamo's graph
            _warn_internal(failed)
            ctx.internal_errors.update(failed)
            raise SiteInternalError(failed)
        if changed:
            graph.eliminate_dead_code()
            graph.lint()
        if ctx.capture_graphs:
            ctx.recorder.set_snapshot(gi, "after", snapshot(graph))
        trace_sites(gi, records)
        return changed


def _mask_words(op: fx.Node) -> str:
    """The op's masks for the report: 'causal', '+bias', '+keep'."""
    if op.target is torch.ops.attnopt.sparse_attention_train.default:  # (q, k, v, is_causal, ...): no masks
        return "causal" if op.args[3] else ""
    return ("causal" if op.args[6] else "") + ("+bias" if op.args[3] is not None else "") \
        + ("+keep" if op.args[4] is not None else "")


def _warn_internal(failed: dict[str, str]) -> None:
    import warnings

    for key, err in failed.items():
        warnings.warn(f"attnopt: attention site {key} is left as it was after an internal error while rewriting "
                      f"it ({err}); the rest of the graph is rewritten and compiled as usual. Please report it "
                      "(TORCH_LOGS=+attnopt shows the traceback).", AttnoptWarning, stacklevel=2)


class CacheKeyPass(CustomGraphPass):
    """Does nothing to the graph. Its uuid puts attnopt's state (source, options, versions, arch,
    switches) into the keys of Inductor's FX graph cache and AOTAutograd's cache: the graph they
    key on already holds attnopt's ops and their arguments, but what those ops trace into (kernel
    source, the inline mode) is decided inside AOTAutograd, after a cache lookup."""

    def __init__(self, ctx: PassContext):
        self.ctx = ctx

    def __call__(self, graph: fx.Graph) -> None:
        return None

    def uuid(self) -> str:
        return self.ctx.uuid("attnopt")


def needs_linear_pass(ctx: PassContext, example_inputs=None) -> bool:
    """Whether the linear pass has anything to do: a format, smoothing, a plan, calibration, or
    (given the graph's inputs) a training graph with linear.training set."""
    lin, plan = ctx.options.linear, ctx.options.plan
    planned = plan is not None and any(v.get("kind") == "linear" and v.get("quant", "none") != "none"
                                       for v in plan.sites.values())
    training = lin.training != "off" and example_inputs is not None and needs_autograd(example_inputs)
    return lin.quant != "none" or lin.smooth is not None or planned or ctx.capture_linears or training


def run_linear(ctx: PassContext, gm: fx.GraphModule, example_inputs) -> None:
    """Linear sites, on Dynamo's graph (where parameters are the module's real tensors)."""
    if not needs_linear_pass(ctx, example_inputs):
        return
    t0 = time.perf_counter()
    dev = next((t.device for t in example_inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
    opt = ctx.options.arch
    spec = ARCHS[opt] if opt != "auto" else ARCHS[detect_arch(dev)]
    for rec in run_linear_pass(gm, example_inputs, ctx.options, spec, ctx.probe_sink, ctx.capture_linears):
        ctx.recorder.add_site(ctx.current_graph, rec)
        if ctx.announce_cpu and rec.status == "rewritten":
            on_cpu.announce(rec.details.get("device", ""))
    ctx.recorder.add_pass_time(ctx.current_graph, "linear", time.perf_counter() - t0)


def has_subclass_inputs(example_inputs) -> bool:
    """Tensor-subclass inputs (DTensor under tensor parallel): AOTAutograd desugars them into their
    inner tensors before tracing, which changes the graph's signature, so an aten graph traced here
    could not stand in for Dynamo's. Such graphs take JointGraphFallback."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    return any(is_traceable_wrapper_subclass(x) for x in example_inputs if isinstance(x, torch.Tensor))


class JointGraphFallback(CustomGraphPass):
    """The attention pass inside Inductor (`joint_custom_pre_pass`), for graphs with tensor-subclass
    inputs only (see has_subclass_inputs): it rewrites the desugared graph AOTAutograd traced. The
    ops it inserts come after AOT, so they stay extern calls (their Python body launches the
    kernels) and a graph that needs grad keeps its sites. Its compiles skip Inductor's and AOT's
    caches: a cache hit would skip the pass, and with it the site records."""

    def __init__(self, ctx: PassContext):
        self.ctx = ctx

    def __call__(self, graph: fx.Graph) -> None:
        training = any(n.op == "placeholder" and n.name.startswith("tangents") for n in graph.nodes)
        AttentionPass(self.ctx, training=training)(graph)  # SiteInternalError: the backend retries

    def uuid(self) -> str:
        return self.ctx.uuid("attnopt-joint-fallback")


def run_attention(ctx: PassContext, gm: fx.GraphModule, example_inputs, cache: bool = False) -> fx.GraphModule:
    """Attention sites, on the aten graph traced from Dynamo's graph. Returns the graph to hand to
    compile_fx: the rewritten aten graph, or Dynamo's own graph when nothing was rewritten (then
    Inductor sees exactly what it would without attnopt) or when the graph takes
    JointGraphFallback. With `cache` (capture_cache.enabled), a graph traced and rewritten
    before, by this code under these options, is rebuilt from disk instead of traced again."""
    gi = ctx.current_graph
    training = needs_autograd(example_inputs)
    if training and (region := own_backward_region(gm)) is not None:
        ctx.recorder.add_note(gi, f"attention not captured: the graph needs grad and holds {region}, whose own "
                                  "backward a trace below autograd would lose (attention inside such a region, "
                                  "e.g. under activation checkpointing, is not rewritten)")
        return gm
    if not might_hold_attention(gm) or has_subclass_inputs(example_inputs):
        return gm
    if not cache:
        return _capture_and_rewrite(ctx, gi, gm, example_inputs, training)[0]
    t0 = time.perf_counter()
    try:
        k = capture_cache.key(ctx, gm, example_inputs, training)
    except Exception as e:  # noqa: BLE001 - Uncacheable, or anything odd: trace as without the cache
        log.debug("attnopt: graph %s not keyed for the capture cache: %s", gi, e)
        return _capture_and_rewrite(ctx, gi, gm, example_inputs, training)[0]
    entry = capture_cache.load(k)
    out = _replay(ctx, gi, entry, gm) if entry is not None else None
    ctx.recorder.add_pass_time(gi, "capture", time.perf_counter() - t0)  # the key, the lookup, a rebuild
    if out is not None:
        ctx.recorder.set_captured(gi, "cache")
        return out
    g = ctx.recorder.graphs[gi]
    n_sites, n_notes = len(g["sites"]), len(g.get("notes", []))
    env_before = capture_cache.shape_env_state(example_inputs)
    out, traced = _capture_and_rewrite(ctx, gi, gm, example_inputs, training)
    if (traced and not ctx.internal_errors and env_before is not None
            and capture_cache.shape_env_state(example_inputs) == env_before):
        records = [r for r in g["sites"][n_sites:] if r.kind == "attention"]
        try:
            entry = capture_cache.Entry(nodes=None) if out is gm else capture_cache.write_graph(out, gm)
            entry.records = capture_cache.record_dicts(records)
            entry.notes = list(g.get("notes", [])[n_notes:])
            capture_cache.store(k, entry)
        except Exception as e:  # noqa: BLE001 - Uncacheable, or anything odd: only the next trace pays
            log.debug("attnopt: graph %s not kept in the capture cache: %s", gi, e)
    return out


def _capture_and_rewrite(ctx: PassContext, gi: int, gm: fx.GraphModule, example_inputs,
                         training: bool) -> tuple[fx.GraphModule, bool]:
    """(the graph for compile_fx, whether it came from a successful trace)."""
    for _ in range(64):  # each retry leaves at least one more site as it was
        t0 = time.perf_counter()
        try:
            aten = trace_to_aten(gm, example_inputs, training=training)
        except CaptureError as e:
            ctx.recorder.add_note(gi, f"attention not captured: Dynamo's graph could not be traced to aten ({e})")
            log.warning("attnopt: graph %s left to Inductor as it was: could not trace it to aten (%s)", gi, e)
            return gm, False
        finally:
            ctx.recorder.add_pass_time(gi, "capture", time.perf_counter() - t0)
        try:
            grad = GradFlow(aten.graph, example_inputs) if training else None
            changed = AttentionPass(ctx, training=training, grad=grad, step_inputs=True)(aten.graph)
        except SiteInternalError:
            ctx.recorder.drop_sites(gi, kind="attention")
            continue
        ctx.recorder.set_captured(gi, "traced")
        if not changed:
            return gm, True
        used = {n.target for n in aten.graph.nodes if n.op == "get_attr"}
        for name in [b for b in aten._buffers if b not in used]:  # constants the rewrite left unread
            del aten._buffers[name]
        aten.recompile()
        return aten, True
    raise RuntimeError("attnopt: internal errors kept recurring while rewriting this graph")


def _replay(ctx: PassContext, gi: int, entry, gm: fx.GraphModule) -> fx.GraphModule | None:
    """A capture-cache entry applied to this compile: its records under the keys this recorder
    gives them (None, a miss, if a key now comes out otherwise: the graph's ops carry their key),
    and its graph rebuilt over this compile's constants."""
    try:  # an entry that reads as JSON but not as a graph and records is a miss, never a failure
        records = capture_cache.records_from(entry.records)
        for r in records:
            if ctx.recorder.claim(gi, re.sub(r"@g\d+$", "", r.key)) != r.key:
                return None
        out = gm if entry.nodes is None else capture_cache.rebuild(entry, gm)
    except Exception as e:  # noqa: BLE001
        log.warning("attnopt: capture-cache entry for graph %s not usable, tracing instead (%s)", gi, e)
        return None
    for r in records:
        ctx.recorder.add_site(gi, r)
        log.info("attention site %s: %s (%s)", r.key, r.status, r.reason or r.kernel)
        if ctx.announce_cpu and r.status == "rewritten":
            on_cpu.announce(r.details.get("device", ""))
    for note in entry.notes:
        ctx.recorder.add_note(gi, note)
    trace_sites(gi, records)
    return out


# Where a pass runs. Everything attnopt rewrites, it rewrites in the backend before AOTAutograd
# (docs/design.md#how-a-graph-flows); Inductor runs only CacheKeyPass, which edits nothing.
DYNAMO_GRAPH = "backend, on Dynamo's graph"  # parameters are real tensors there
ATEN_GRAPH = "backend, on the aten graph traced from it"

# Every pass, in the order it runs on each graph Dynamo hands the backend: (where, its steps,
# what runs it). Graphs with tensor-subclass inputs skip capture and attention here and take
# JointGraphFallback in CacheKeyPass's slot instead.
PASS_ORDER: tuple[tuple[str, str, object], ...] = (
    (DYNAMO_GRAPH, "linear match -> smoothquant -> linear rewrite", run_linear),
    (DYNAMO_GRAPH, "capture: trace to the aten graph AOTAutograd would build (warm: capture_cache rebuilds it)",
     trace_to_aten),
    (ATEN_GRAPH, "attention match -> attention rewrite", AttentionPass),
    ("joint_custom_pre_pass", "attnopt's state into Inductor's and AOTAutograd's cache keys", CacheKeyPass),
)


def config_patches(ctx: PassContext, example_inputs) -> dict:
    """Inductor config patches for one compile: attnopt's state into its cache keys, or, for a
    graph with tensor-subclass inputs, the fallback attention pass with the caches off."""
    if has_subclass_inputs(example_inputs) and ctx.options.attention.enabled:
        return {"joint_custom_pre_pass": JointGraphFallback(ctx), "fx_graph_cache": False}
    return {"joint_custom_pre_pass": CacheKeyPass(ctx)}
