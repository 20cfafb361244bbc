"""Norms of a training graph that feed only training linears: found here, rewritten into
`attnopt::norm_train` by linear_rewrite.py (which keeps their input for backward in 8 bits;
ops/norm_train.py says why).

The linear pass's training step (linear_pipeline.py runs it when linear.training is set and the
graph will be differentiated). Matched: `F.layer_norm` / `torch.layer_norm` and `F.rms_norm` /
`torch.rms_norm` (nn.LayerNorm, nn.RMSNorm) over the last dim with a 1-D parameter gain, and HF's
hand-written RMSNorm (`weight * (x.float() * rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(dtype)`,
Llama / Qwen / Mistral), whose every value use is a linear rewritten into the training op
(smooth_match's norm -> linears groups). norm_train rounds once, from fp32, where HF's form
rounds the normalized x to the model's dtype before the gain: a difference of one rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import operator

import torch
import torch.fx as fx

from ..report import SiteRecord
from .graph_utils import example_value, module_class, source_line
from .linear_match import MatchedLinears, training_format
from .smooth_match import SmoothGroup, norm_params, smooth_groups

_LAYER_NORMS = (torch.nn.functional.layer_norm, torch.layer_norm)
_RMS_NORMS = (torch.nn.functional.rms_norm, torch.rms_norm)


@dataclass
class TrainNorm:
    """One norm to rewrite: its call node, operands, eps and kind ('rms' | 'layer'), its record."""

    node: fx.Node
    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    eps: float
    kind: str
    record: SiteRecord


def _arg(n: fx.Node, i: int, name: str, default=None):
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


def _operands(n: fx.Node):
    """(x, weight, bias, eps, kind) of a last-dim norm call, or None."""
    x = n.args[0] if n.args else n.kwargs.get("input")
    xe = example_value(x) if isinstance(x, fx.Node) else None
    if not isinstance(xe, torch.Tensor) or xe.dim() < 1:
        return None
    shape = _arg(n, 1, "normalized_shape")
    shape = (shape,) if isinstance(shape, int) else tuple(shape) if isinstance(shape, (list, tuple)) else None
    if shape is None or len(shape) != 1 or shape[0] != xe.shape[-1]:
        return None
    out = example_value(n)
    if not isinstance(out, torch.Tensor) or out.dtype != xe.dtype:  # autocast's fp32 norm of a bf16 x
        return None
    if n.target in _LAYER_NORMS:
        eps = _arg(n, 4, "eps", 1e-5)
        return x, _arg(n, 2, "weight"), _arg(n, 3, "bias"), eps, "layer"
    eps = _arg(n, 3, "eps")
    return x, _arg(n, 2, "weight"), None, torch.finfo(xe.dtype).eps if eps is None else eps, "rms"


def _call(n, *targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def _method(n, name: str) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_method" and n.target == name


def _through_to(n):
    """The tensor under `.to(dtype)` / `.float()` casts."""
    while (_method(n, "to") and len(n.args) == 2 and isinstance(n.args[1], torch.dtype) and not n.kwargs) or (
            _method(n, "float") and len(n.args) == 1):
        n = n.args[0]
    return n


def _hf_rms_operands(n: fx.Node, params: dict):
    """(x, weight, None, eps, 'rms') of HF's hand-written RMSNorm ending at `n` (weight * normed),
    or None: every step checked, mean over the last dim kept, eps a number, the output in x's dtype."""
    found = norm_params(n, params)
    if found is None or found[0] != "rmsnorm" or not _call(n, operator.mul, torch.mul):
        return None
    w = found[1]
    normed = _through_to(n.args[1] if n.args[0] is w else n.args[0])
    if not _call(normed, operator.mul, torch.mul) or len(normed.args) != 2:
        return None
    a, b = normed.args
    xf, rs = (a, b) if _call(b, torch.rsqrt) else (b, a)
    if not _call(rs, torch.rsqrt) or not _call(rs.args[0], operator.add, torch.add) or len(rs.args[0].args) != 2:
        return None
    var, eps = rs.args[0].args
    if isinstance(var, (int, float)):
        var, eps = eps, var
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not _method(var, "mean"):
        return None
    dims = var.args[1] if len(var.args) > 1 else var.kwargs.get("dim")
    if dims not in (-1, [-1], (-1,)) or var.kwargs.get("keepdim") is not True:
        return None
    sq = var.args[0]
    if not (_method(sq, "pow") and sq.args[0] is xf and sq.args[1:] == (2,)):
        return None
    x = _through_to(xf)
    xe, out = example_value(x), example_value(n)
    if not (isinstance(xe, torch.Tensor) and isinstance(out, torch.Tensor) and xe.dtype == out.dtype):
        return None
    return x, w, None, float(eps), "rms"


def find_train_norms(m: MatchedLinears) -> list[TrainNorm]:
    """The norms whose every value use is a linear rewritten into the training op."""
    sites = [s for s in m.sites if training_format(m.formats[s.key])]
    out = []
    for g in smooth_groups(sites, m.params):
        if g.kind not in ("rmsnorm", "layernorm"):
            continue
        if g.producer.target in _LAYER_NORMS + _RMS_NORMS:
            ops = _operands(g.producer)
        else:
            ops = _hf_rms_operands(g.producer, m.params)
        if ops is None or not isinstance(ops[3], (int, float)):
            continue
        x, w, b, eps, kind = ops
        out.append(TrainNorm(g.producer, x, w, b, float(eps), kind, _record(g, kind)))
    return out


def _record(g: SmoothGroup, kind: str) -> SiteRecord:
    return SiteRecord(kind="norm", module=g.module, key=f"{g.module}:train", status="skipped",
                      pattern=f"{kind}norm -> {len(g.consumers)} training linear(s)", source=source_line(g.producer),
                      module_type=module_class(g.producer), details={"consumers": [c.key for c in g.consumers]})
