"""Quantize the matched linears' weights and rewrite the graph into attnopt's linear ops.

The linear pass's last step (linear_pipeline.py runs the steps), in two phases so that a failure
never leaves a half-folded model:

1. `quantize_weights` computes every quantized tensor first (once, at compile time, from the
   weights with the SmoothQuant scales folded in). A fold with a member that fails to quantize is
   undone, and its members are quantized again without the scales.
2. `rewrite_all_or_nothing` then edits the graph: the folded norm gains and the quantized weights
   become constants of the graph module, each linear becomes `attnopt::linear_8bit` /
   `attnopt::linear_w4a16` / `attnopt::linear_w4a8` / `attnopt::linear_nvfp4` (or `aten::linear` on
   smoothed weights, or inspect's probe; in a training graph `attnopt::linear_train`, reading the
   weight parameter itself). If any edit fails the graph is restored as Dynamo gave it and the
   added constants unregistered.

Baked-weight bookkeeping: the parameters whose values the graph now holds copies of go to
gm.meta[BAKED_META_KEY]; the backend checks them on every call, since the graph would not see
later changes to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from ..codegen.arch import FUSED_QUANT_MAX_M, ArchSpec
from ..logs import log
from ..ops import linear_ref as L
from ..report import SiteRecord
from .graph_utils import copy_graph, example_shape, example_value
from .linear_match import LinearSite, MatchedLinears, training_format
from .smoothquant import Fold, folded_norm_params, folded_tensors

BAKED_META_KEY = "attnopt_baked_params"  # gm.meta entry read by the backend (stale-weight check)
_8BIT = ("w8a8", "fp8")
_OP_NAMES = {"w8a8": "attnopt::linear_8bit", "fp8": "attnopt::linear_8bit", "w4a16": "attnopt::linear_w4a16",
             "w4a8": "attnopt::linear_w4a8", "nvfp4": "attnopt::linear_nvfp4"}


# --------------------------------------------------------------------------- weight quantization

@dataclass
class _Prepared:
    """Everything one site's rewrite needs, computed before the graph is touched."""

    site: LinearSite
    fmt: str
    w: torch.Tensor  # [N, K], smoothed when changed
    changed: bool
    bias: torch.Tensor | None  # a folded bias, or None (the site's own bias node stays)
    q: tuple | None  # quantized weight tensors
    x_scale: torch.Tensor | None = None  # AWQ: 1 / s in x's dtype, multiplied into x in the graph
    awq_alpha: float | None = None
    smoothed: bool | None = None  # with AWQ on x: whether SmoothQuant changed W too (else: changed)


def _quantize(site: LinearSite, fmt: str, w: torch.Tensor, changed: bool, bias) -> _Prepared:
    q = L.quantize_format(w, fmt) if fmt in _OP_NAMES else None
    return _Prepared(site, fmt, w, changed, bias, q)


def _x_dtype(site: LinearSite, w: torch.Tensor) -> torch.dtype:
    x = example_value(site.x)
    return x.dtype if isinstance(x, torch.Tensor) and x.dtype.is_floating_point else w.dtype


def _with_awq(p: _Prepared, entry: dict | None) -> _Prepared:
    """A w4a16 / w4a8 site with AWQ scales in the plan: quantize W s instead of W, and x reads x / s.
    1 / s is rounded to x's dtype first and W divided by exactly that, so the only new rounding
    is the one of x / s (and W s to W's dtype before 4 bits)."""
    if entry is None or p.fmt not in L.AWQ_FORMATS:
        return p
    k = p.w.shape[1]
    if len(entry["scales"]) != k:
        log.warning("attnopt: AWQ scales of %s have %d channels, the weight %d: not applied",
                    p.site.key, len(entry["scales"]), k)
        return p
    inv = (1.0 / torch.tensor(entry["scales"], dtype=torch.float64)).to(_x_dtype(p.site, p.w))
    w = (p.w.double() / inv.double()[None, :].to(p.w.device)).to(p.w.dtype)
    q = _quantize(p.site, p.fmt, w, True, p.bias)
    q.x_scale, q.awq_alpha, q.smoothed = inv.to(p.w.device), float(entry["alpha"]), p.changed
    return q


def _undo_folds(broken: list[Fold], folds: list[Fold], errors: dict) -> list[LinearSite]:
    """Drop the folds with a member that failed (their records say why); their members, to be
    quantized again without the scales."""
    todo: list[LinearSite] = []
    for f in broken:
        folds.remove(f)
        key = next(m.key for m in f.members() if m.key in errors)
        f.record.reason = f"rewriting {key} failed ({errors[key]!r}): the fold was undone"
        todo += [m for m in f.members() if m.key not in [t.key for t in todo]]
    return todo


def quantize_weights(m: MatchedLinears, folds: list[Fold], awq: dict | None = None) -> tuple[dict[str, _Prepared], list[Fold]]:
    """Quantize every rewritten site; a group with a member that fails is undone (its members
    quantized again without the scales), so no fold is ever half applied. `awq`: key -> the
    plan's AWQ entry, applied to w4a16 / w4a8 sites on top of any SmoothQuant fold."""
    awq = awq or {}
    folds = list(folds)
    prepared: dict[str, _Prepared] = {}
    errors: dict[str, Exception] = {}
    todo = [s for s in m.sites if m.formats[s.key] is not None]
    while True:
        new_w, new_b = folded_tensors(folds, m.weights, m.params)
        for s in todo:
            try:
                w = new_w.get(s.key, m.weights[s.key])
                prepared[s.key] = _with_awq(_quantize(s, m.formats[s.key], w, s.key in new_w, new_b.get(s.key)),
                                            awq.get(s.key))
                errors.pop(s.key, None)
            except Exception as e:  # leave the site as it was
                log.warning("attnopt: could not quantize linear %s: %r", s.key, e, exc_info=True)
                prepared.pop(s.key, None)
                errors[s.key] = e
        broken = [f for f in folds if any(mb.key in errors for mb in f.members())]
        if not broken:
            break
        todo = _undo_folds(broken, folds, errors)
    for key, e in errors.items():
        m.records[key].reason = f"internal error while rewriting: {e!r}"
    return prepared, folds


# ---------------------------------------------------------------------------------- graph edits

def _drop_buffers_since(gm: fx.GraphModule, before: set) -> None:
    """Unregister the quantized copies a failed rewrite added: AOT would lift every buffer as a
    graph input and keep them alive with the compiled graph."""
    sources = getattr(gm, "_param_name_to_source", None)
    for name in set(dict(gm.named_buffers(recurse=False))) - before:
        delattr(gm, name)
        if sources is not None:
            sources.pop(name, None)


LINEAR_BUFFER_PREFIX = "_attnopt_"  # the graph-module buffers this pass adds (quantized weights, scales)


class LinearRewriter:
    """Applies decisions to the graph: constants registered on the module, op calls inserted."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.fake_mode = detect_fake_mode([example_value(n) for n in gm.graph.nodes if example_value(n) is not None])
        self.count = 0
        # linear node -> the call that replaced it: a site whose x is an earlier site's output
        # (b(a(x)), LoRA's down/up) must read the replacement, or the old linear stays alive
        self.replaced: dict[fx.Node, fx.Node] = {}

    def const(self, t: torch.Tensor, before: fx.Node, name: str) -> fx.Node:
        attr = f"{LINEAR_BUFFER_PREFIX}{name}_{self.count}"
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
        args = tuple(self.replaced.get(a, a) if isinstance(a, fx.Node) else a for a in args)
        with self.gm.graph.inserting_before(anchor):
            node = self.gm.graph.call_function(target, args)
        for k in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if k in anchor.meta:
                node.meta[k] = anchor.meta[k]
        if "example_value" in anchor.meta:
            node.meta["example_value"] = anchor.meta["example_value"]
        return node


class _Baked:
    """Parameters whose values were copied into the compiled graph (quantized, smoothed or
    folded): the backend checks them on every call, since later changes would not be seen."""

    def __init__(self, index: dict, params: dict):
        self.index, self.params = index, params
        self.items: dict[int, tuple[int | None, torch.Tensor, str]] = {}

    def add(self, node: fx.Node | None, role: str, module: str) -> None:
        if node is None or node not in self.params:
            return
        t = self.params[node]
        self.items.setdefault(id(t), (self.index.get(node), t, f"{role} of {module or '<top>'} ({node.name})"))


def _fold_norm(rw: LinearRewriter, f: Fold, params: dict, baked: _Baked) -> None:
    """The norm reads gamma / s (and beta / s) as constants of the graph."""
    node = f.group.producer
    for ph, role, new in folded_norm_params(f, params):
        node.replace_input_with(ph, rw.const(new, node, "smooth_norm"))
        baked.add(ph, role, f.group.module)


def _static_m(x: fx.Node) -> int | None:
    """Rows of the GEMM (product of x's leading dims) when every one is static."""
    shp = example_shape(x)
    if not shp or not all(isinstance(d, int) for d in shp[:-1]):
        return None
    m = 1
    for d in shp[:-1]:
        m *= d
    return m


def _path_note(fmt: str, m: int | None, small_m: int) -> tuple[str, str]:
    """(path, words) for what runs at this site's M: the small-M paths of linear_8bit (weight-only
    split-K GEMV below min_m), linear_w4a16 (split-K with BLOCK_M 16 at M <= 16) and linear_w4a8
    (one GEMM for every M, x quantized per token in its prologue up to FUSED_QUANT_MAX_M rows)."""
    if fmt in _8BIT:
        act = "INT8" if fmt == "w8a8" else "FP8"
        if m is None:
            return "dynamic", (f"M known at run time: M<={small_m} weight-only split-K GEMV (16-bit x), "
                               f"else per-token {act} GEMM (x quantized in its prologue up to M={FUSED_QUANT_MAX_M})")
        if m <= small_m:
            return "small-m", f"M={m}<={small_m}: weight-only split-K GEMV, activations stay 16-bit"
        where = "in the GEMM's prologue (one launch)" if m <= FUSED_QUANT_MAX_M else "by a pre-kernel"
        return "gemm", f"M={m}: per-token {act} activations quantized {where}, 8-bit GEMM"
    if fmt == "w4a16":
        if m is None:
            return "dynamic", "M known at run time: M<=16 split-K (BLOCK_M 16), else tiled GEMM"
        if m <= 16:
            return "small-m", f"M={m}<=16: split-K GEMV (BLOCK_M 16), int4 dequantized in registers"
        return "gemm", f"M={m}: tiled GEMM, int4 dequantized in registers"
    if fmt == "w4a8":
        words = ("int4 weights unpacked in registers, int8 dot per 128-wide group (int32), group scales "
                 "applied in fp32")
        if m is None:
            return "dynamic", (f"M known at run time: per-token INT8 activations (quantized in the GEMM's "
                               f"prologue up to M={FUSED_QUANT_MAX_M}), {words}")
        where = "in the GEMM's prologue (one launch)" if m <= FUSED_QUANT_MAX_M else "by a pre-kernel"
        return "gemm", f"M={m}: per-token INT8 activations quantized {where}, {words}"
    if fmt == "nvfp4":
        rows = "M known at run time" if m is None else f"M={m}"
        return ("dynamic" if m is None else "gemm"), (f"{rows}: per-token NVFP4 activations quantized by a "
                                                      "pre-kernel, block-scaled FP4 GEMM (every M)")
    return "none", "unquantized"


def _bias_node(rw: LinearRewriter, p: _Prepared, baked: _Baked):
    """The bias the new op reads: the site's own, or its folded copy as a constant."""
    s = p.site
    if p.bias is None:
        return s.bias
    bias = rw.const(p.bias, s.node, "smooth_bias")
    baked.add(s.bias, "bias", s.module)
    return bias


def _quantized_weight_nodes(rw: LinearRewriter, p: _Prepared) -> tuple | None:
    """The quantized weight's constants (8-bit: values, scales, None; W4A16: packed, scales,
    zeros; W4A8: packed, scales, None; NVFP4: packed, group scales, outer scales), or None for
    'none' (smoothed weights only, or a calibration capture)."""
    if p.fmt in _8BIT:
        return rw.const(p.q[0], p.site.node, "wq"), rw.const(p.q[1], p.site.node, "ws"), None
    if p.fmt == "w4a16":
        return tuple(rw.const(t, p.site.node, nm) for t, nm in zip(p.q, ("w4", "w4s", "w4z")))
    if p.fmt == "w4a8":
        return rw.const(p.q[0], p.site.node, "w4a8"), rw.const(p.q[1], p.site.node, "w4a8s"), None
    if p.fmt == "nvfp4":
        return tuple(rw.const(t, p.site.node, nm) for t, nm in zip(p.q, ("fp4", "fp4g", "fp4s")))
    return None


def _x_node(rw: LinearRewriter, p: _Prepared) -> fx.Node:
    """What the op reads as x: the site's input, or x * (1 / s) for AWQ scales (one elementwise
    multiply in the graph, which Inductor fuses into the op producing x)."""
    s = p.site
    if p.x_scale is None:
        return s.x
    node = rw.call(torch.mul, [s.x, rw.const(p.x_scale, s.node, "awq_inv")], s.node)
    xe = example_value(s.x)
    if isinstance(xe, torch.Tensor):
        node.meta["example_value"] = xe
    else:
        node.meta.pop("example_value", None)
    return node


def _probe_call(rw: LinearRewriter, p: _Prepared, bias, q, small_m: int, spec: ArchSpec, probe_sink: str) -> fx.Node:
    """inspect's linear_probe: runs the rewritten op and measures it against the float weight."""
    s = p.site
    if p.changed:
        w_node = rw.const(p.w, s.node, "wref")
    else:
        w_node = rw.call(torch.t, [s.weight], s.node) if s.transposed else s.weight
    args = [_x_node(rw, p), w_node, bias, q[0] if q else w_node, q[1] if q else w_node, q[2] if q else None,
            p.fmt if q else "none", small_m, spec.name, f"{probe_sink}/{s.key}"]
    return rw.call(torch.ops.attnopt.linear_probe.default, args, s.node)


def autocast_dtype(site: LinearSite) -> torch.dtype | None:
    """The 16-bit dtype the linear computes in when it differs from its input's (an autocast
    region: Dynamo's example output is bf16 / fp16 for fp32 x), else None."""
    out, xe = example_value(site.node), example_value(site.x)
    if isinstance(out, torch.Tensor) and isinstance(xe, torch.Tensor) and out.dtype != xe.dtype and \
            out.dtype in (torch.float16, torch.bfloat16):
        return out.dtype
    return None


def _train_call(rw: LinearRewriter, p: _Prepared, fmt: str, spec: ArchSpec) -> fx.Node:
    """attnopt::linear_train on the weight parameter as [N, K] (a transpose view for Conv1D's [K, N]).
    Under autocast x is cast to the region's dtype, as autocast would (the output then has it);
    the weight is quantized from the fp32 master itself, which backward keeps instead of a copy."""
    s = p.site
    w_node = rw.call(torch.t, [s.weight], s.node) if s.transposed else s.weight
    x = s.x
    cast = autocast_dtype(s)
    if cast is not None:
        x = rw.call(torch.Tensor.to, [s.x, cast], s.node)
        x.meta.pop("example_value", None)  # the anchor's (the linear's output) does not describe it
    return rw.call(torch.ops.attnopt.linear_train.default, [x, w_node, s.bias, fmt, spec.name, "auto"], s.node)


TRAIN_FORMATS = {  # linear.training -> (forward operands, backward operands, what backward keeps of x)
    "int8": ("int8 x int8", "dY int8; W int8; X int8 (saved)", "int8"),
    "fp8": ("e4m3 x e4m3", "dY e5m2; W e4m3; X e4m3 (saved)", "e4m3"),
}


def _record_training(rec: SiteRecord, p: _Prepared, fmt: str, spec: ArchSpec) -> None:
    """The record of a linear turned into the training op: its formats forward and backward."""
    fwd, bwd, saved = TRAIN_FORMATS[fmt]
    rec.status = "rewritten"
    rec.op = "attnopt::linear_train"
    where = "reference" if spec.name == "cpu" else f"triton/{spec.name}"
    rec.kernel = (f"{where}/train-{fmt}: training, 32x32 blocks; forward {fwd}, backward {bwd}; "
                  f"keeps x as {saved} + block scales for backward")
    rec.details.update(format=f"train-{fmt}", forward_format=fwd, backward_format=bwd, saved_activation=saved,
                       block=[32, 32], m=_static_m(p.site.x))
    cast = autocast_dtype(p.site)
    if cast is not None:
        rec.details["autocast"] = str(cast).replace("torch.", "")


def _rewrite_train_norm(rw: LinearRewriter, tn, fmt: str, spec: ArchSpec) -> None:
    """A norm feeding only training linears (train_norms.TrainNorm) becomes attnopt::norm_train."""
    new = rw.call(torch.ops.attnopt.norm_train.default,
                  [tn.x, tn.weight, tn.bias, tn.eps, tn.kind, fmt, spec.name, "auto"], tn.node)
    tn.node.replace_all_uses_with(new)
    saved = TRAIN_FORMATS[fmt][2]
    rec = tn.record
    rec.status, rec.op = "rewritten", "attnopt::norm_train"
    where = "reference" if spec.name == "cpu" else f"triton/{spec.name}"
    rec.kernel = (f"{where}/train-{fmt}: {tn.kind}norm computed from the exact input; keeps x as {saved} per "
                  "32x32 block + row statistics for backward")
    rec.details.update(format=f"train-{fmt}", forward_format="16-bit (exact input)",
                       backward_format=f"x {saved} per 32x32 block (dequantized)", saved_activation=saved)


def _op_call(rw: LinearRewriter, p: _Prepared, bias, q, small_m: int, spec: ArchSpec) -> fx.Node:
    """The call replacing the linear: attnopt's GEMM for the format, or aten's on smoothed weights."""
    s, x = p.site, _x_node(rw, p)
    if q is None:
        return rw.call(torch._C._nn.linear, [x, rw.const(p.w, s.node, "wsmooth"), bias], s.node)
    if p.fmt == "w4a16":
        return rw.call(torch.ops.attnopt.linear_w4a16.default, [x, *q, bias, L.W4_GROUP, spec.name, "auto"], s.node)
    if p.fmt == "w4a8":
        return rw.call(torch.ops.attnopt.linear_w4a8.default, [x, q[0], q[1], bias, L.W4A8_GROUP, spec.name, "auto"],
                       s.node)
    if p.fmt == "nvfp4":
        return rw.call(torch.ops.attnopt.linear_nvfp4.default, [x, *q, bias, spec.name, "auto"], s.node)
    return rw.call(torch.ops.attnopt.linear_8bit.default, [x, q[0], q[1], bias, "int8" if p.fmt == "w8a8" else "fp8",
                                                           small_m, spec.name, "auto"], s.node)


def _record_rewrite(rec: SiteRecord, p: _Prepared, small_m: int, spec: ArchSpec) -> None:
    """The record of a rewritten site: its op, the kernel path at its M, the weight bytes saved."""
    fmt, (n, k) = p.fmt, p.w.shape
    rec.status = "rewritten"
    before, after = L.weight_bytes(fmt, n, k, p.w.element_size())
    rec.op = _OP_NAMES.get(fmt, "aten::linear (smoothed weights)")
    m = _static_m(p.site.x)
    path, words = _path_note(fmt, m, small_m)
    where = "reference" if spec.name == "cpu" else f"triton/{spec.name}"
    rec.kernel = f"{where}/{fmt}: {words}" if fmt != "none" else "smoothed weights, unquantized"
    rec.details.update(format=fmt, weight_bytes_before=before, weight_bytes_after=after,
                       smoothed=p.changed if p.smoothed is None else p.smoothed, m=m, path=path)
    if p.awq_alpha is not None:
        rec.details.update(awq_alpha=p.awq_alpha, awq="W s quantized, x multiplied by 1 / s in the graph")


def _rewrite_linear(rw: LinearRewriter, p: _Prepared, small_m: int, spec: ArchSpec, probe_sink: str | None,
                    rec: SiteRecord, capture_all: bool, baked: _Baked) -> None:
    s = p.site
    train = training_format(p.fmt)
    if train is not None:  # weights stay parameters: nothing baked, quantized on every call
        new = _train_call(rw, p, train, spec)
        s.node.replace_all_uses_with(new)
        rw.replaced[s.node] = new
        _record_training(rec, p, train, spec)
        return
    if p.fmt == "none" and not p.changed and not (probe_sink is not None and capture_all):
        rec.reason = "linear.quant is 'none' (no smoothing scales folded here)"
        return
    bias = _bias_node(rw, p, baked)
    q = _quantized_weight_nodes(rw, p)
    if q is not None or p.changed:
        baked.add(s.weight, "weight", s.module)
    if probe_sink is not None:
        new = _probe_call(rw, p, bias, q, small_m, spec, probe_sink)
    else:
        new = _op_call(rw, p, bias, q, small_m, spec)
    s.node.replace_all_uses_with(new)
    rw.replaced[s.node] = new
    if q is None and not p.changed:  # a calibration capture of an unchanged linear
        rec.reason = "linear.quant is 'none' (statistics captured)"
        return
    _record_rewrite(rec, p, small_m, spec)


def _edit_graph(gm, folds, prepared, records, params, lin, spec, probe_sink, capture_all, baked,
                train_norms=()) -> None:
    """Fold the norms' scales, then replace every prepared linear (and, in a training graph, the
    norms that feed only training linears)."""
    rw = LinearRewriter(gm)
    for f in folds:
        if f.group.kind in ("rmsnorm", "layernorm"):
            _fold_norm(rw, f, params, baked)
        f.record.status = "rewritten"
        f.record.details.update(alpha=lin.smooth.alpha if f.awq_alpha is None else f.awq_alpha,
                                scales="smoothquant" if f.awq_alpha is None else "awq",
                                scale_min=float(f.s.min()), scale_max=float(f.s.max()))
    for key, p in prepared.items():
        _rewrite_linear(rw, p, lin.min_m - 1, spec, probe_sink, records[key], capture_all, baked)
        log.info("linear site %s: %s (%s)", key, records[key].status, records[key].reason or records[key].kernel)
    for tn in train_norms:
        _rewrite_train_norm(rw, tn, lin.training, spec)


def rewrite_all_or_nothing(gm: fx.GraphModule, m: MatchedLinears, folds: list[Fold], prepared: dict,
                           norm_records: list[SiteRecord], opts, spec: ArchSpec, probe_sink: str | None,
                           capture_all: bool, train_norms=()) -> None:
    """Edit the graph in place, or on any failure restore Dynamo's graph and mark every record
    skipped with the error; then recompile it and store the baked parameters in gm.meta."""
    backup = copy_graph(gm.graph)
    buffers_before = set(dict(gm.named_buffers(recurse=False)))
    baked = _Baked(m.index, m.params)
    try:
        _edit_graph(gm, folds, prepared, m.records, m.params, opts.linear, spec, probe_sink, capture_all, baked,
                    train_norms)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
    except Exception as e:  # all or nothing: the graph as Dynamo gave it
        log.warning("attnopt: linear pass failed, graph left unchanged: %r", e, exc_info=True)
        gm.graph = backup
        _drop_buffers_since(gm, buffers_before)
        baked.items.clear()
        for rec in list(m.records.values()) + norm_records:
            rec.status, rec.op, rec.kernel = "skipped", None, None
            rec.reason = f"internal error while rewriting the graph (left unchanged): {e!r}"
    gm.recompile()
    gm.meta[BAKED_META_KEY] = list(baked.items.values())
