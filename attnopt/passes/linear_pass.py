"""Where linears are matched and rewritten: quantized weights (once, at compile time), SmoothQuant
scales folded into the preceding norm or linear, and the linear becomes an attnopt GEMM op.

This pass runs on Dynamo's graph, before Inductor: there the weights are real parameters
(Dynamo hands the backend its example inputs), so they can be quantized and smoothed once and
stored as constants of the graph module; Inductor's freezing, which would expose them later,
cannot be switched on from a backend (Dynamo reads that flag while tracing). Matched forms:
`F.linear` / `nn.Linear`, `torch.addmm(bias, x, W)` (HF's Conv1D, W stored [in, out]).
"""

from __future__ import annotations

import fnmatch
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from ..codegen.arch import ArchSpec
from ..logs import log
from ..ops import linear_ref as L
from ..report import SiteRecord
from .graph_utils import module_class, module_path, source_line

LINEAR_FNS = (torch._C._nn.linear, torch.nn.functional.linear)
_CASTS = ("to", "float", "half", "bfloat16", "type_as")


@dataclass
class LinearSite:
    node: fx.Node
    x: fx.Node
    weight: fx.Node  # placeholder of the parameter
    bias: fx.Node | None
    transposed: bool  # weight stored [in, out] (Conv1D / addmm form)
    module: str
    key: str = ""


@dataclass
class SmoothGroup:
    """A producer (norm or linear) whose output feeds only these linears: one shared scale."""

    kind: str  # "rmsnorm" | "layernorm" | "linear"
    producer: fx.Node
    consumers: list = field(default_factory=list)  # LinearSite
    module: str = ""


def _example(node: fx.Node):
    return node.meta.get("example_value")


def _params(gm: fx.GraphModule, example_inputs) -> dict[fx.Node, torch.Tensor]:
    """Placeholder -> real parameter tensor (Dynamo lifts parameters to graph inputs)."""
    out = {}
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for n, t in zip(phs, example_inputs):
        if isinstance(t, torch.nn.Parameter) or (isinstance(t, torch.Tensor) and "_parameters_" in n.name):
            out[n] = t
    return out


def find_linears(gm: fx.GraphModule, params: dict) -> list[LinearSite]:
    sites = []
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        site = None
        if n.target in LINEAR_FNS:
            x, w = n.args[0], n.args[1]
            b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
            if w in params and params[w].dim() == 2:
                site = LinearSite(n, x, w, b, False, module_path(n))
        elif n.target is torch.addmm and len(n.args) >= 3 and not n.kwargs:
            b, x, w = n.args[:3]
            if w in params and params[w].dim() == 2 and (b is None or b in params):
                site = LinearSite(n, x, w, b, True, module_path(n))
        if site is not None:
            idx = counts[site.module] = counts.get(site.module, -1) + 1
            site.key = site.module if idx == 0 else f"{site.module}#{idx}"
            sites.append(site)
    return sites


def _through_casts(n):
    """Skip dtype casts (x.to(dtype), .float(), ...) between a producer and its consumers."""
    while isinstance(n, fx.Node) and n.op == "call_method" and n.target in _CASTS:
        n = n.args[0]
    return n


def _norm_kind(n: fx.Node, params: dict) -> tuple[str, fx.Node, fx.Node | None] | None:
    """(kind, gamma placeholder, beta placeholder) when n is a norm's output with a parameter."""
    if n.op == "call_function" and n.target is torch.nn.functional.layer_norm:
        w = n.args[2] if len(n.args) > 2 else n.kwargs.get("weight")
        b = n.args[3] if len(n.args) > 3 else n.kwargs.get("bias")
        if w in params:
            return "layernorm", w, (b if b in params else None)
    if n.op == "call_function" and n.target is torch.nn.functional.rms_norm:
        w = n.args[2] if len(n.args) > 2 else n.kwargs.get("weight")
        if w in params:
            return "rmsnorm", w, None
    if n.op == "call_function" and n.target in (operator.mul, torch.mul):  # HF: weight * x_normed
        a, b = n.args[:2]
        for w, other in ((a, b), (b, a)):
            if w in params and params[w].dim() == 1 and _is_rms_normalized(other):
                return "rmsnorm", w, None
    return None


def _is_rms_normalized(n) -> bool:
    """x * rsqrt(mean(x^2) + eps), possibly cast: the hand-written RMSNorm body."""
    n = _through_casts(n)
    if not (isinstance(n, fx.Node) and n.op == "call_function" and n.target in (operator.mul, torch.mul)):
        return False
    return any(isinstance(a, fx.Node) and a.op == "call_function" and a.target is torch.rsqrt for a in n.args)


def smooth_groups(sites: list[LinearSite], params: dict) -> list[SmoothGroup]:
    """Norm -> linears groups (every consumer of the norm a matched linear), and up -> down through
    SwiGLU (silu(gate) * up feeding only down)."""
    by_x: dict[fx.Node, list] = {}
    by_node = {s.node: s for s in sites}
    for s in sites:
        by_x.setdefault(_through_casts(s.x), []).append(s)
    groups = []
    for prod, consumers in by_x.items():
        kind = _norm_kind(prod, params)
        users = list(prod.users)
        if kind is None or any(u not in {c.node for c in consumers} and not _only_feeds(u, consumers) for u in users):
            continue
        groups.append(SmoothGroup(kind[0], prod, consumers, module_path(prod)))
    for s in sites:  # up -> down: down's input is silu(gate) * up, and nothing else reads it
        x = _through_casts(s.x)
        if not (x.op == "call_function" and x.target in (operator.mul, torch.mul) and len(x.users) == 1):
            continue
        for a, other in ((x.args[0], x.args[1]), (x.args[1], x.args[0])):
            if isinstance(a, fx.Node) and a in by_node and len(a.users) == 1 and _is_act(other):
                groups.append(SmoothGroup("linear", a, [s], module_path(a)))
                break
    return groups


def _only_feeds(u: fx.Node, consumers) -> bool:
    """u is a dtype cast whose users are all among the consumers."""
    return (u.op == "call_method" and u.target in _CASTS
            and all(v in {c.node for c in consumers} for v in u.users))


def _is_act(n) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in (
        torch.nn.functional.silu, torch.nn.functional.gelu, torch.nn.functional.relu)


def _selected(path: str, opts) -> str | None:
    lin = opts["linear"]
    p = path or "<top>"
    if not any(fnmatch.fnmatchcase(p, g) for g in lin["include"]):
        return f"module {p!r} not matched by include {lin['include']}"
    hit = next((g for g in lin["exclude"] if fnmatch.fnmatchcase(p, g)), None)
    return f"module {p!r} excluded by {hit!r}" if hit else None


def _weight_nk(site: LinearSite, w: torch.Tensor) -> torch.Tensor:
    return w.t() if site.transposed else w


class LinearRewriter:
    """Applies decisions to the graph: constants registered on the module, op calls inserted."""

    def __init__(self, gm: fx.GraphModule, example_inputs):
        self.gm = gm
        self.fake_mode = detect_fake_mode([_example(n) for n in gm.graph.nodes if _example(n) is not None])
        self.count = 0

    def const(self, t: torch.Tensor, before: fx.Node, name: str) -> fx.Node:
        attr = f"_attnopt_{name}_{self.count}"
        self.count += 1
        self.gm.register_buffer(attr, t.detach().contiguous())
        sources = getattr(self.gm, "_param_name_to_source", None)
        if sources is not None:  # AOT expects every buffer of a Dynamo graph to have a source
            from torch._dynamo.source import ConstantSource

            sources[attr] = ConstantSource(f"attnopt_const_{attr}")
        with self.gm.graph.inserting_before(before):
            node = self.gm.graph.get_attr(attr)
        if self.fake_mode is not None:
            node.meta["example_value"] = self.fake_mode.from_tensor(getattr(self.gm, attr), static_shapes=True)
        return node

    def call(self, target, args, anchor: fx.Node) -> fx.Node:
        with self.gm.graph.inserting_before(anchor):
            node = self.gm.graph.call_function(target, tuple(args))
        for k in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if k in anchor.meta:
                node.meta[k] = anchor.meta[k]
        if "example_value" in anchor.meta:
            node.meta["example_value"] = anchor.meta["example_value"]
        return node


def _smooth_scales(group: SmoothGroup, weights: dict, stats: dict, alpha: float) -> torch.Tensor | None:
    """s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha) over every consumer, clamped >= 1e-5."""
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
    s = amax.clamp_min(1e-5) ** alpha / wmax.clamp_min(1e-5) ** (1 - alpha)
    return s.clamp_min(1e-5)


def run_linear_pass(gm: fx.GraphModule, example_inputs, opts, spec: ArchSpec, probe_sink: str | None = None,
                    capture_all: bool = False) -> list[SiteRecord]:
    """Rewrite the linears of Dynamo's graph in place; return one record per candidate site."""
    lin = opts["linear"]
    plan_sites = (opts["plan"] or {}).get("sites", {})
    params = _params(gm, example_inputs)
    sites = find_linears(gm, params)
    if not sites:
        return []
    records = {s.key: SiteRecord(kind="linear", module=s.module, key=s.key, status="skipped",
                                 pattern="addmm (Conv1D)" if s.transposed else "linear", source=source_line(s.node),
                                 module_type=module_class(s.node)) for s in sites}
    weights = {s.key: _weight_nk(s, params[s.weight]).detach() for s in sites}
    fmt_of = {}
    grad = torch.is_grad_enabled()
    for s in sites:
        rec = records[s.key]
        w = weights[s.key]
        xe = _example(s.x)
        rec.shapes = {"x": [int(d) if isinstance(d, int) else str(d) for d in xe.shape] if xe is not None else [],
                      "w": list(w.shape)}
        rec.dtype = str(w.dtype).replace("torch.", "")
        fmt = plan_sites.get(s.key, {}).get("quant", lin["quant"]) if plan_sites.get(s.key, {}).get(
            "kind") == "linear" else lin["quant"]
        reason = _selected(s.module, opts)
        if reason is None and grad and params[s.weight].requires_grad:
            reason = "weights require grad (training): quantized weights would not get gradients"
        if reason is None and fmt != "none" and fmt not in spec.linear_formats:
            reason = f"linear format {fmt!r} needs sm89+ (target is {spec.name})"
        if reason is None and fmt != "none" and w.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            reason = f"weight dtype {w.dtype} (fp16 / bf16 / fp32 quantize)"
        if reason:
            rec.reason = reason
            fmt = None
        elif fmt == "none" and not (capture_all or lin["smooth"]):
            rec.reason = "linear.quant is 'none'"
            fmt = None
        fmt_of[s.key] = fmt
    # SmoothQuant: fold scales into producers (exact), before quantizing the weights
    folded_producers: dict[fx.Node, torch.Tensor] = {}
    stats = {k: v.get("act_absmax") for k, v in plan_sites.items() if v.get("kind") == "linear"}
    groups = smooth_groups(sites, params) if lin["smooth"] is not None else []
    norm_records = []
    for g in groups:
        ok = all(fmt_of.get(c.key) is not None for c in g.consumers)
        nrec = SiteRecord(kind="norm", module=g.module, key=f"{g.module}:smooth", status="skipped",
                          pattern=f"{g.kind} -> {len(g.consumers)} linear(s)", source=source_line(g.producer),
                          details={"consumers": [c.key for c in g.consumers]})
        norm_records.append(nrec)
        if not ok:
            nrec.reason = "a consumer of this output is not rewritten"
            continue
        s = _smooth_scales(g, weights, stats, float(lin["smooth"]["alpha"]))
        if s is None:
            nrec.reason = "no activation statistics in the plan (run attnopt.calibrate with linear.smooth)"
            continue
        for c in g.consumers:
            weights[c.key] = (weights[c.key].double() * s[None, :]).to(weights[c.key].dtype)
        folded_producers[g.producer] = s
        nrec.status = "rewritten"
        nrec.details.update(alpha=lin["smooth"]["alpha"], scale_min=float(s.min()), scale_max=float(s.max()))
    rw = LinearRewriter(gm, example_inputs)
    for g in groups:
        if g.producer in folded_producers:
            _fold_into_producer(rw, g, params, folded_producers[g.producer], sites, weights)
    for s in sites:
        fmt = fmt_of[s.key]
        rec = records[s.key]
        if fmt is None:
            continue
        w = weights[s.key]
        changed_w = not torch.equal(w, _weight_nk(s, params[s.weight]))
        try:
            _rewrite_linear(rw, s, w, fmt, lin["min_m"] - 1, spec, probe_sink, changed_w, rec)
        except Exception as e:  # leave the site as it was
            log.warning("attnopt: could not rewrite linear %s: %r", s.key, e, exc_info=True)
            rec.reason = f"internal error while rewriting: {e!r}"
            continue
        log.info("linear site %s: %s (%s)", s.key, rec.status, rec.reason or rec.kernel)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return list(records.values()) + norm_records


def _fold_into_producer(rw: LinearRewriter, g: SmoothGroup, params: dict, s: torch.Tensor, sites, weights) -> None:
    """Divide the producer's output channels by s: gamma (and beta) of a norm, or the rows of the
    up projection (its bias too). The consumers' weights were multiplied by s already."""
    node = g.producer
    if g.kind in ("rmsnorm", "layernorm"):
        kind, gamma, beta = _norm_kind(node, params)
        for ph in (gamma, beta):
            if ph is None:
                continue
            new = (params[ph].double() / s).to(params[ph].dtype)
            c = rw.const(new, node, "smooth_norm")
            node.replace_input_with(ph, c)
        return
    up = next(x for x in sites if x.node is node)  # linear -> linear: rows of the producer's weight
    weights[up.key] = (weights[up.key].double() / s[:, None]).to(weights[up.key].dtype)
    if up.bias is not None:
        new_b = (params[up.bias].double() / s).to(params[up.bias].dtype)
        c = rw.const(new_b, node, "smooth_bias")
        node.replace_input_with(up.bias, c)
        up.bias = c


def _rewrite_linear(rw: LinearRewriter, s: LinearSite, w: torch.Tensor, fmt: str, small_m: int, spec: ArchSpec,
                    probe_sink: str | None, changed_w: bool, rec: SiteRecord) -> None:
    n, k = w.shape
    bias = s.bias
    orig_bytes = w.element_size()
    if fmt in ("w8a8", "fp8"):
        wq, ws = L.quantize_weight(w, "int8" if fmt == "w8a8" else "fp8")
        q = (rw.const(wq, s.node, "wq"), rw.const(ws, s.node, "ws"), None)
    elif fmt == "w4a16":
        pk, sc, zr = L.quantize_weight_int4(w)
        q = (rw.const(pk, s.node, "w4"), rw.const(sc, s.node, "w4s"), rw.const(zr, s.node, "w4z"))
    else:  # "none": smoothing only (or calibration capture)
        q = None
    x = s.x
    if probe_sink is not None:
        w_node = rw.const(w, s.node, "wref") if changed_w else s.weight
        if s.transposed and not changed_w:
            w_node = rw.call(torch.t, [s.weight], s.node)
        dummy = w_node
        args = [x, w_node, bias, q[0] if q else dummy, q[1] if q else dummy, q[2] if q else None,
                fmt if q else "none", small_m, spec.name, f"{probe_sink}/{s.key}"]
        new = rw.call(torch.ops.attnopt.linear_probe.default, args, s.node)
    elif q is None:
        wn = rw.const(w, s.node, "wsmooth")
        new = rw.call(torch._C._nn.linear, [x, wn, bias], s.node)
    elif fmt == "w4a16":
        new = rw.call(torch.ops.attnopt.linear_w4a16.default, [x, q[0], q[1], q[2], bias, L.W4_GROUP, spec.name,
                                                               "auto"], s.node)
    else:
        new = rw.call(torch.ops.attnopt.linear_8bit.default, [x, q[0], q[1], bias,
                                                              "int8" if fmt == "w8a8" else "fp8", small_m,
                                                              spec.name, "auto"], s.node)
    s.node.replace_all_uses_with(new)
    if q is None and not changed_w:  # a calibration capture of an unchanged linear
        rec.reason = "linear.quant is 'none' (statistics captured)"
        return
    rec.status = "rewritten"
    before, after = L.weight_bytes(fmt, n, k, orig_bytes)
    rec.op = {"w8a8": "attnopt::linear_8bit", "fp8": "attnopt::linear_8bit", "w4a16": "attnopt::linear_w4a16"}.get(
        fmt, "aten::linear (smoothed weights)")
    where = "reference" if spec.name == "cpu" else f"triton/{spec.name}"
    rec.kernel = f"{where}/{fmt}" + (f" (M<={small_m}: weight-only)" if fmt in ("w8a8", "fp8") else "")
    rec.details.update(format=fmt, weight_bytes_before=before, weight_bytes_after=after, smoothed=changed_w)
    if fmt == "none":
        rec.kernel = "smoothed weights, unquantized"
