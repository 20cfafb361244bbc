"""Where linears are matched on Dynamo's graph, and which of them may be rewritten.

This is the linear pass's first step (linear_pipeline.py runs the steps). It only reads the graph
and the parameters: `match_linears` returns every linear site with its record, its weight as
[N, K] and its format, or the reason it is left alone (include / exclude, weights that require
grad, a format the target arch lacks, a weight dtype that does not quantize).

Training graphs (AOTAutograd will differentiate them: `aten_capture.needs_autograd`) with
`linear.training` 'int8' / 'fp8' give every selected linear the format 'train-int8' /
'train-fp8' (the training op, linear_rewrite.py), whatever `linear.quant` and the plan say;
with 'off' their linears are left alone, as before.

Matched forms (W a 2-D parameter, lifted to a graph input or a get_attr):
`F.linear(x, W[, b])` / `nn.Linear`; `torch.addmm(b, x, W)` (HF's Conv1D, W stored [in, out]) and
`addmm(b, x, W.t())`; `torch.mm(x, W)` / `mm(x, W.t())`; `x @ W`, `x @ W.t()` / `torch.matmul`.
`.t()`, `.T`, `.mT`, `transpose(0, 1)`, `permute(1, 0)` are all read as the transpose.
"""

from __future__ import annotations

import fnmatch
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..codegen.arch import ArchSpec, linear_needs
from ..report import SiteRecord
from . import on_cpu
from .aten_capture import needs_autograd
from .graph_utils import attr_of, example_shape, example_value, module_class, module_path, source_line

LINEAR_FNS = (torch._C._nn.linear, torch.nn.functional.linear)
MATMUL_FNS = (torch.matmul, operator.matmul)
_QUANTIZABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class LinearSite:
    """One linear of the graph: its call, input, weight parameter and how it is stored, bias, the
    module it belongs to, and the key its record goes by."""

    node: fx.Node
    x: fx.Node
    weight: fx.Node  # the parameter's node (placeholder or get_attr)
    bias: fx.Node | None
    transposed: bool  # weight stored [in, out] (Conv1D, mm(x, W))
    module: str
    key: str = ""
    pattern: str = "linear"


@dataclass
class MatchedLinears:
    """The linear sites of one graph and what was decided for each, before anything is edited."""

    params: dict[fx.Node, torch.Tensor]  # parameter node -> its real tensor
    index: dict[fx.Node, int]  # placeholder -> its position among the graph's inputs
    sites: list[LinearSite]
    records: dict[str, SiteRecord]  # key -> the site's record (the reason, when left alone)
    weights: dict[str, torch.Tensor]  # key -> the weight as [N, K]
    formats: dict[str, str | None]  # key -> format ('none': rewrite only if smoothed / captured), None: left alone
    training: bool = False  # the graph will be differentiated: formats are 'train-*' or None, nothing is baked


def find_parameters(gm: fx.GraphModule, example_inputs) -> tuple[dict[fx.Node, torch.Tensor], dict[fx.Node, int]]:
    """(parameter node -> real tensor, placeholder -> its position among the graph's inputs).
    Dynamo lifts parameters to graph inputs; without inlining they stay get_attr nodes."""
    out, index = {}, {}
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, (n, t) in enumerate(zip(phs, example_inputs)):
        index[n] = i
        if isinstance(t, torch.nn.Parameter) or (isinstance(t, torch.Tensor) and "_parameters_" in n.name):
            out[n] = t
    for n in gm.graph.nodes:
        if n.op == "get_attr" and isinstance(attr_of(gm, n.target), torch.nn.Parameter):
            out[n] = attr_of(gm, n.target)
    return out, index


# ------------------------------------------------------------------------------------ capture

def is_transpose(n: fx.Node) -> bool:
    return (n.op == "call_method" and n.target == "transpose") or (n.op == "call_function"
                                                                  and n.target is torch.transpose)


def _transpose_source(n) -> fx.Node | None:
    """W for a node computing W's 2-D transpose (W.t(), W.T, W.mT, transpose, permute(1, 0))."""
    if not isinstance(n, fx.Node) or n.kwargs:
        return None
    a = n.args
    if n.op == "call_method" and n.target == "t" and len(a) == 1:
        return a[0]
    if n.op == "call_function" and n.target is torch.t and len(a) == 1:
        return a[0]
    if n.op == "call_function" and n.target is getattr and len(a) == 2 and a[1] in ("T", "mT"):
        return a[0]
    if is_transpose(n) and len(a) == 3 and all(isinstance(d, int) for d in a[1:]) and {a[1] % 2, a[2] % 2} == {0, 1}:
        return a[0]
    if n.op == "call_method" and n.target == "permute":
        dims = tuple(a[1]) if len(a) == 2 and isinstance(a[1], (tuple, list)) else tuple(a[1:])
        if dims in ((1, 0), (-1, -2), (1, -2), (-1, 0)):
            return a[0]
    return None


def _weight_operand(n, params: dict) -> tuple[fx.Node, bool] | None:
    """(parameter node, stored [in, out]) when mm's second operand is W [K, N] or W.t() of W [N, K]."""
    if n in params and params[n].dim() == 2:
        return n, True
    src = _transpose_source(n)
    if src in params and params[src].dim() == 2:
        return src, False
    return None


def _match_linear(n: fx.Node, params: dict) -> LinearSite | None:
    """The LinearSite for one call node, or None (the weight must be a 2-D parameter)."""
    if n.target in LINEAR_FNS:
        x, w = n.args[0], n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
        b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        if w in params and params[w].dim() == 2:
            return LinearSite(n, x, w, b, False, module_path(n))
        return None
    if n.kwargs:  # addmm's beta / alpha, matmul's out=
        return None
    if n.target is torch.addmm and len(n.args) == 3:
        b, x, wop = n.args
        wo = _weight_operand(wop, params)
        if wo and (b is None or (b in params and params[b].dim() == 1)):
            return LinearSite(n, x, wo[0], b, wo[1], module_path(n),
                              pattern="addmm (Conv1D)" if wo[1] else "addmm (x, W^T)")
        return None
    if (n.target is torch.mm or n.target in MATMUL_FNS) and len(n.args) == 2:
        x, wop = n.args
        wo = _weight_operand(wop, params)
        if wo and isinstance(x, fx.Node) and x not in params and len(example_shape(x)) >= 1:
            name = "mm" if n.target is torch.mm else "matmul"
            return LinearSite(n, x, wo[0], None, wo[1], module_path(n),
                              pattern=f"{name} (x, W)" if wo[1] else f"{name} (x, W^T)")
    return None


def find_linears(gm: fx.GraphModule, params: dict) -> list[LinearSite]:
    """Every linear of the graph in graph order, keyed by module path ('#1', '#2'... on repeats)."""
    sites = []
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        site = _match_linear(n, params)
        if site is not None:
            idx = counts[site.module] = counts.get(site.module, -1) + 1
            site.key = site.module if idx == 0 else f"{site.module}#{idx}"
            sites.append(site)
    return sites


def weight_nk(site: LinearSite, w: torch.Tensor) -> torch.Tensor:
    """The site's weight as [N, K] (out, in), whichever way it is stored."""
    return w.t() if site.transposed else w


# ------------------------------------------------------------------------------------ decisions

def _skipped_record(s: LinearSite) -> SiteRecord:
    """A site's record before any decision: skipped until a step says otherwise."""
    return SiteRecord(kind="linear", module=s.module, key=s.key, status="skipped", pattern=s.pattern,
                      source=source_line(s.node), module_type=module_class(s.node))


def _record_shapes(rec: SiteRecord, s: LinearSite, w: torch.Tensor) -> None:
    xe = example_value(s.x)
    rec.shapes = {"x": [int(d) if isinstance(d, int) else str(d) for d in xe.shape]
                  if isinstance(xe, torch.Tensor) else [], "w": list(w.shape)}
    rec.dtype = str(w.dtype).replace("torch.", "")
    rec.details["device"] = (xe if isinstance(xe, torch.Tensor) else w).device.type


def planned_sites(opts) -> dict:
    """The plan's per-site entries (key -> entry), {} without a plan."""
    return opts.plan.sites if opts.plan is not None else {}


def _planned_format(key: str, lin, plan_sites: dict) -> str:
    """The plan's format for this site when it has one, else linear.quant."""
    entry = plan_sites.get(key, {})
    return entry.get("quant", lin.quant) if entry.get("kind") == "linear" else lin.quant


def _selection_reason(path: str, opts) -> str | None:
    """Why linear.include / linear.exclude leave this module alone, or None."""
    lin = opts.linear
    p = path or "<top>"
    if not any(fnmatch.fnmatchcase(p, g) for g in lin.include):
        return f"module {p!r} not matched by include {list(lin.include)}"
    hit = next((g for g in lin.exclude if fnmatch.fnmatchcase(p, g)), None)
    return f"module {p!r} excluded by {hit!r}" if hit else None


def _grad_reason(weight: torch.Tensor, grad: bool) -> str | None:
    if grad and weight.requires_grad:
        return ("weights require grad (a training graph, or inference outside torch.no_grad() / "
                "torch.inference_mode()): quantized weights would not get gradients; linear.training "
                "'int8' / 'fp8' rewrites training graphs")
    return None


TRAIN_PREFIX = "train-"  # formats of the training op: 'train-int8', 'train-fp8'
_TRAIN_NEEDS = {"int8": "w8a8", "fp8": "fp8"}  # the inference format whose arch support it shares


def training_format(fmt: str | None) -> str | None:
    """'int8' / 'fp8' for a training op's format, else None."""
    return fmt[len(TRAIN_PREFIX):] if fmt and fmt.startswith(TRAIN_PREFIX) else None


def _training_reason(fmt: str, w: torch.Tensor, spec: ArchSpec) -> str | None:
    """Why the training op in `fmt` cannot run this weight on the target arch, or None."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(w):
        return f"weight is a {type(w).__name__} (tensor parallel): the training op takes plain tensors"
    if _TRAIN_NEEDS[fmt] not in spec.linear_formats:
        return f"linear.training {fmt!r} needs sm89+ (target is {spec.name})"
    if w.dtype not in _QUANTIZABLE_DTYPES:
        return f"weight dtype {w.dtype} (fp16 / bf16 / fp32 quantize)"
    return None


def _format_reason(fmt: str, w: torch.Tensor, spec: ArchSpec) -> str | None:
    """Why `fmt` cannot quantize this weight on the target arch, or None."""
    if fmt == "none":
        return None
    if fmt not in spec.linear_formats:
        return f"linear format {fmt!r} needs {linear_needs(fmt)} (target is {spec.name})"
    if w.dtype not in _QUANTIZABLE_DTYPES:
        return f"weight dtype {w.dtype} (fp16 / bf16 / fp32 quantize)"
    return None


def _choose_training_formats(sites, records, weights, opts, spec) -> dict:
    """A training graph: key -> 'train-<linear.training>' or None (the reason in its record)."""
    formats = {}
    for s in sites:
        rec, w = records[s.key], weights[s.key]
        _record_shapes(rec, s, w)
        reason = (_selection_reason(s.module, opts) or _training_reason(opts.linear.training, w, spec)
                  or on_cpu.skip_reason(rec.details["device"], opts))
        rec.reason = reason
        formats[s.key] = None if reason else TRAIN_PREFIX + opts.linear.training
    return formats


def _choose_formats(sites, records, params, weights, opts, spec, plan_sites, capture_all) -> dict:
    """key -> format ('none' = rewrite only if smoothed / captured) or None (left as it is, the
    reason in its record)."""
    lin = opts.linear
    grad = torch.is_grad_enabled()
    formats = {}
    for s in sites:
        rec, w = records[s.key], weights[s.key]
        _record_shapes(rec, s, w)
        fmt = _planned_format(s.key, lin, plan_sites)
        reason = (_selection_reason(s.module, opts) or _grad_reason(params[s.weight], grad)
                  or _format_reason(fmt, w, spec))
        if reason:
            rec.reason = reason
            fmt = None
        elif fmt == "none" and not (capture_all or lin.smooth):
            rec.reason = "linear.quant is 'none'"
            fmt = None
        elif on_cpu.skip_reason(rec.details["device"], opts):
            rec.reason = on_cpu.skip_reason(rec.details["device"], opts)
            fmt = None
        formats[s.key] = fmt
    return formats


def match_linears(gm: fx.GraphModule, example_inputs, opts, spec: ArchSpec,
                  capture_all: bool = False) -> MatchedLinears | None:
    """Every linear of Dynamo's graph with its decision; None when the graph has none."""
    params, index = find_parameters(gm, example_inputs)
    sites = find_linears(gm, params)
    if not sites:
        return None
    records = {s.key: _skipped_record(s) for s in sites}
    weights = {s.key: weight_nk(s, params[s.weight]).detach() for s in sites}
    training = opts.linear.training != "off" and needs_autograd(example_inputs) and not capture_all
    if training:
        formats = _choose_training_formats(sites, records, weights, opts, spec)
    else:
        formats = _choose_formats(sites, records, params, weights, opts, spec, planned_sites(opts), capture_all)
    return MatchedLinears(params, index, sites, records, weights, formats, training)
