"""Norms of a training graph that feed only training linears: found here, rewritten into
`attnopt::norm_train` by linear_rewrite.py (which keeps their input for backward in 8 bits;
ops/norm_train.py says why).

The linear pass's training step (linear_pipeline.py runs it when linear.training is set and the
graph will be differentiated). Matched: `F.layer_norm` / `torch.layer_norm` and `F.rms_norm` /
`torch.rms_norm` (nn.LayerNorm, nn.RMSNorm) over the last dim with a 1-D parameter gain, whose
every value use is a linear rewritten into the training op (smooth_match's norm -> linears
groups). HF's hand-written RMSNorm (`weight * x * rsqrt(...)`) stays as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..report import SiteRecord
from .graph_utils import example_value, module_class, source_line
from .linear_match import MatchedLinears, training_format
from .smooth_match import SmoothGroup, smooth_groups

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
    if n.target in _LAYER_NORMS:
        eps = _arg(n, 4, "eps", 1e-5)
        return x, _arg(n, 2, "weight"), _arg(n, 3, "bias"), eps, "layer"
    eps = _arg(n, 3, "eps")
    return x, _arg(n, 2, "weight"), None, torch.finfo(xe.dtype).eps if eps is None else eps, "rms"


def find_train_norms(m: MatchedLinears) -> list[TrainNorm]:
    """The norms whose every value use is a linear rewritten into the training op."""
    sites = [s for s in m.sites if training_format(m.formats[s.key])]
    out = []
    for g in smooth_groups(sites, m.params):
        if g.kind not in ("rmsnorm", "layernorm") or g.producer.target not in _LAYER_NORMS + _RMS_NORMS:
            continue
        ops = _operands(g.producer)
        if ops is None or not isinstance(ops[3], (int, float)):
            continue
        x, w, b, eps, kind = ops
        out.append(TrainNorm(g.producer, x, w, b, float(eps), kind, _record(g, kind)))
    return out


def _record(g: SmoothGroup, kind: str) -> SiteRecord:
    return SiteRecord(kind="norm", module=g.module, key=f"{g.module}:train", status="skipped",
                      pattern=f"{kind}norm -> {len(g.consumers)} training linear(s)", source=source_line(g.producer),
                      module_type=module_class(g.producer), details={"consumers": [c.key for c in g.consumers]})
