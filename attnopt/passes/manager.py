"""attnopt's passes as Inductor custom graph passes, and the order they run in.

Each pass is a `CustomGraphPass` whose uuid hashes attnopt's own source, the normalized options,
torch / triton versions and the target arch, so Inductor's FX graph cache stays on and never
serves a graph compiled under other options (torch-hooks.md).
"""

from __future__ import annotations

import functools
import hashlib
import os
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
from . import site_cache
from .graph_snapshot import snapshot
from ..logs import trace_sites
from .attention_rewrite import Reject, decide, rewrite, site_flops
from .inline_ops import inline_op
from .linear_pipeline import run_linear_pass



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
    current_graph: int | None = None  # recorder index of the graph being compiled
    # sites whose rewrite hit an internal error (key -> error): kept as they were from then on
    internal_errors: dict[str, str] = field(default_factory=dict)

    def inline_mode(self) -> str:
        return self.inline or switches.inline_mode()

    def arch_key(self) -> str:
        opt = self.options["arch"]
        if opt != "auto":
            return opt
        return detect_arch("cuda" if torch.cuda.is_available() else "cpu")

    def arch_for_graph(self, graph: fx.Graph) -> ArchSpec:
        opt = self.options["arch"]
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


class SiteInternalError(RuntimeError):
    """A rewrite failed with an internal error. Raised out of the pass so the compile is abandoned
    before Inductor or AOTAutograd can cache a graph that silently lacks the rewrite; the backend
    compiles the frame again with those caches off and the failed sites left as they were."""

    def __init__(self, errors: dict[str, str]):
        self.errors = dict(errors)
        super().__init__("attnopt: internal error while rewriting " + "; ".join(f"{k}: {e}" for k, e in errors.items()))


class AttnoptWarning(UserWarning):
    """Something attnopt could not do, which the user should know about (the message says what)."""


def _is_training_graph(graph: fx.Graph) -> bool:
    return any(n.op == "placeholder" and n.name.startswith("tangents") for n in graph.nodes)


class AttentionPass(CustomGraphPass):
    """Capture every attention (SDPA and hand-written) and rewrite it into attnopt's op.

    Runs as Inductor's `joint_custom_pre_pass`: after decomposition, before Inductor's own SDPA
    fusion and before the SDPA calls are lowered to opaque extern kernels.
    """

    name = "attention"

    def __init__(self, ctx: PassContext):
        self.ctx = ctx

    def uuid(self) -> str:
        """The context's uuid, plus the keys other frames took: they decide this graph's keys."""
        base = self.ctx.uuid(self.name)
        taken = self.ctx.recorder.keys_of_other_frames(self.ctx.current_graph)
        if not taken:
            return base
        return hashlib.sha256("\0".join([base, *taken]).encode()).hexdigest()

    def __call__(self, graph: fx.Graph) -> None:
        t0 = time.perf_counter()
        ctx = self.ctx
        gi = ctx.current_graph if ctx.current_graph is not None else ctx.recorder.new_graph()
        spec = ctx.arch_for_graph(graph)
        training = _is_training_graph(graph)
        per_module: dict[str, int] = {}
        changed = False
        to_inline: list[fx.Node] = []
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
        inline = ctx.inline_mode()
        for site, key in zip(sites, keys):
            rec = SiteRecord(kind="attention", module=site.module, key=key, status="skipped",
                             pattern=site.pattern, source=site.source, module_type=site.module_type)
            try:
                _describe(rec, site)
                if key in ctx.internal_errors:  # failed in an earlier try: left as it was
                    raise Reject(f"internal error while rewriting (left as it was): {ctx.internal_errors[key]}")
                params = decide(site, ctx.options, spec, training, key)
                probe = f"{ctx.probe_sink}/{key}" if ctx.probe_sink else None
                op = rewrite(graph, site, params, probe, tag=key)
                changed = True
                dev = op.args[0].meta["val"].device.type
                if probe is None and (inline == "always" or (inline == "auto" and dev == "cuda")):
                    to_inline.append(op)
                rec.status = "rewritten"
                rec.op = "attnopt::sparse_attention" if params.sparsity else "attnopt::attention"
                rec.kernel = params.kernel
                if params.note:  # planned / configured sparse parameters set aside here, and why
                    rec.reason = params.note
                q4, k4 = op.args[0].meta["val"], op.args[1].meta["val"]
                if params.sparsity:
                    rec.details["sparse_method"] = params.sparsity["method"]
                rec.details.update(quant=params.quant, pv=params.pv, smooth_k=params.smooth_k,
                                   smooth_q=params.smooth_q, arch=params.arch, q_heads=q4.shape[1],
                                   kv_heads=k4.shape[1],
                                   mask=("causal" if op.args[6] else "") + ("+bias" if op.args[3] is not None else "")
                                   + ("+keep" if op.args[4] is not None else ""))
            except Reject as e:
                rec.reason = str(e)
            except Exception as e:  # never break the user's compile: leave the site as it was
                log.debug("attnopt: could not rewrite attention at %s", key, exc_info=True)
                failed[key] = f"{type(e).__name__}: {e}"
                rec.reason = f"internal error while rewriting (left as it was): {failed[key]}"
            ctx.recorder.add_site(gi, rec)
            records.append(rec)
            log.info("attention site %s: %s (%s)", key, rec.status, rec.reason or rec.kernel)
        if failed:  # abandon this compile before anything can cache it (see SiteInternalError)
            _warn_internal(failed)
            ctx.internal_errors.update(failed)
            ctx.recorder.add_pass_time(gi, self.name, time.perf_counter() - t0)
            raise SiteInternalError(failed)
        for op in to_inline:
            inline_op(graph, op)
        if changed:
            graph.eliminate_dead_code()
            graph.lint()
        ctx.recorder.add_pass_time(gi, self.name, time.perf_counter() - t0)
        if ctx.capture_graphs:
            ctx.recorder.set_snapshot(gi, "after", snapshot(graph))
        trace_sites(gi, records)
        _keep_for_cache_hits(ctx, gi, records)


def _warn_internal(failed: dict[str, str]) -> None:
    import warnings

    for key, err in failed.items():
        warnings.warn(f"attnopt: attention site {key} is left as it was after an internal error while rewriting "
                      f"it ({err}); the graph is compiled again without Inductor's and AOTAutograd's caches, so "
                      "the unrewritten graph is never cached. Please report it (TORCH_LOGS=+attnopt shows the "
                      "traceback).", AttnoptWarning, stacklevel=2)


def _keep_for_cache_hits(ctx: PassContext, gi: int, records: list) -> None:
    """Save the records where a later compile served from Inductor's cache will find them."""
    path = ctx.recorder.cache_path(gi)
    if path is not None and site_cache.caching_enabled():
        site_cache.save(path, records)


def _expect_cache_hit(ctx: PassContext, gm: fx.GraphModule, example_inputs) -> None:
    """Before compile_fx: find the records this graph had last time, in case the pass won't run."""
    gi = ctx.current_graph
    if gi is None:
        return
    path = site_cache.path_for(site_cache.graph_hash(AttentionPass(ctx).uuid(), gm, example_inputs))
    ctx.recorder.expect_cached(gi, path, site_cache.load(path, SiteRecord.from_dict), site_cache.hits())
    site_cache.watch(ctx.recorder)


# Where a pass runs: BEFORE_COMPILE_FX on Dynamo's graph, before compile_fx (run_pre_inductor),
# where parameters are still real tensors; otherwise the Inductor config slot it is installed in
# (config_patches).
BEFORE_COMPILE_FX = "before compile_fx"

# Every pass, in the order it runs: (where, its steps, what runs it). One table, one place.
PASS_ORDER: tuple[tuple[str, str, object], ...] = (
    (BEFORE_COMPILE_FX, "linear match -> smoothquant -> linear rewrite", run_linear_pass),
    ("joint_custom_pre_pass", "attention match -> attention rewrite", AttentionPass),
)


def needs_linear_pass(ctx: PassContext) -> bool:
    lin = ctx.options["linear"]
    plan = ctx.options["plan"] or {}
    planned = any(v.get("kind") == "linear" and v.get("quant", "none") != "none" for v in plan.get("sites", {}).values())
    return lin["quant"] != "none" or lin["smooth"] is not None or planned or ctx.capture_linears


def run_pre_inductor(ctx: PassContext, gm: fx.GraphModule, example_inputs) -> None:
    """The BEFORE_COMPILE_FX passes of PASS_ORDER: they need real parameter values."""
    if not needs_linear_pass(ctx):
        _expect_cache_hit(ctx, gm, example_inputs)
        return
    t0 = time.perf_counter()
    dev = next((t.device for t in example_inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
    opt = ctx.options["arch"]
    spec = ARCHS[opt] if opt != "auto" else ARCHS[detect_arch(dev)]
    for rec in run_linear_pass(gm, example_inputs, ctx.options, spec, ctx.probe_sink, ctx.capture_linears):
        ctx.recorder.add_site(ctx.current_graph, rec)
    ctx.recorder.add_pass_time(ctx.current_graph, "linear", time.perf_counter() - t0)
    _expect_cache_hit(ctx, gm, example_inputs)


def config_patches(ctx: PassContext) -> dict:
    """Inductor config patches installing attnopt's passes for one compile."""
    return {where: cls(ctx) for where, _, cls in PASS_ORDER if where != BEFORE_COMPILE_FX}
