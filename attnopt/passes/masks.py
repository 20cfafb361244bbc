"""Recognize attention masks built inside the graph.

A mask that is only a function of the query / key positions (iota comparisons, tril / triu) can
be replaced by the kernel's causal rule, which skips the tiles above the diagonal and reads no
mask memory. Everything else (padding masks indexed from an input, masks read from buffers)
stays a tensor the kernel reads. Both come out of `split_keep`, which decomposes a boolean
"keep" mask into a conjunction of a causal rule and residual tensors.

Index expressions are affine in the positions: `coef[axis] * index + const`, with axes counted
from the right of the (right-aligned, broadcast) mask: axis 0 is the key j, axis 1 the query i.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .graph_utils import aten, is_call, known_one, prims, scalar_value, shape
from .layout import INT64_MAX

# A finite fill value counts as masking when exp(fill - m) underflows for any sane logit m.
MASK_FILL_MAX = -1e4

_LE = (aten.le.Tensor, aten.le.Scalar)
_LT = (aten.lt.Tensor, aten.lt.Scalar)
_GE = (aten.ge.Tensor, aten.ge.Scalar)
_GT = (aten.gt.Tensor, aten.gt.Scalar)
_AND = (aten.bitwise_and.Tensor, aten.logical_and.default, aten.mul.Tensor)
_NOT = (aten.bitwise_not.default, aten.logical_not.default)
_PASS = (aten.clone.default, aten.alias.default, prims.convert_element_type.default)


@dataclass(frozen=True)
class Affine:
    coef: tuple  # ((axis, coefficient), ...) sorted, nonzero only
    const: int

    @staticmethod
    def make(coef: dict, const: int) -> "Affine":
        return Affine(tuple(sorted((a, c) for a, c in coef.items() if c)), const)

    def __add__(self, o: "Affine") -> "Affine":
        d = dict(self.coef)
        for a, c in o.coef:
            d[a] = d.get(a, 0) + c
        return Affine.make(d, self.const + o.const)

    def scale(self, k: int) -> "Affine":
        return Affine.make({a: c * k for a, c in self.coef}, self.const * k)

    def shift_axes(self, fn) -> "Affine | None":
        d = {}
        for a, c in self.coef:
            na = fn(a)
            if na is None:
                return None
            d[na] = c
        return Affine.make(d, self.const)


def _const(x) -> int | None:
    if isinstance(x, bool):
        return int(x)
    if isinstance(x, int):
        return x
    v = scalar_value(x)
    return int(v) if v is not None and v == int(v) else None


def _rank(n: fx.Node) -> int:
    return len(shape(n))


def _broadcast_preserving(op: fx.Node) -> bool:
    """op's output equals its input broadcast under right alignment (axes keep their meaning)."""
    src = op.args[0]
    i, o = list(shape(src)), list(shape(op))
    # drop size-1 dims on the left of the input; they carry no axis
    while i and known_one(i[0]):
        i.pop(0)
    if len(i) > len(o):
        return False
    for a, b in zip(reversed(i), reversed(o)):
        if not (known_one(a) or a is b or (isinstance(a, int) and isinstance(b, int) and a == b)):
            from .graph_utils import known_eq

            if not known_eq(a, b):
                return False
    return True


def affine_of(node, depth: int = 0) -> Affine | None:
    """Integer tensor node -> affine function of positions, or None."""
    if isinstance(node, fx.Node) and not isinstance(node.meta.get("val"), torch.Tensor):
        return None
    if not isinstance(node, fx.Node) or len(shape(node)) == 0:
        c = _const(node)
        return Affine.make({}, c) if c is not None else None
    if node.op != "call_function" or depth > 24:
        return None
    t = node.target
    if t is prims.iota.default:
        length = node.args[0]
        start, step = node.kwargs.get("start", 0), node.kwargs.get("step", 1)
        if not (isinstance(start, int) and isinstance(step, int)):
            return None
        return Affine.make({0: step} if not known_one(length) else {}, start)
    if t in (aten.arange.default, aten.arange.start, aten.arange.start_step):
        a = list(node.args)
        start, step = (0, 1) if t is aten.arange.default else (a[0], a[2] if len(a) > 2 else 1)
        if not (isinstance(start, int) and isinstance(step, int)):
            return None
        return Affine.make({0: step}, start)
    if t in (aten.add.Tensor, aten.sub.Tensor, aten.add.Scalar, aten.sub.Scalar):
        if node.kwargs.get("alpha", 1) != 1:
            return None
        a, b = affine_of(node.args[0], depth + 1), affine_of(node.args[1], depth + 1)
        if a is None or b is None:
            return None
        return a + (b if t in (aten.add.Tensor, aten.add.Scalar) else b.scale(-1))
    if t in (aten.mul.Tensor, aten.mul.Scalar):
        a, b = node.args
        ka, kb = _const(a), _const(b)
        if kb is not None and not (isinstance(b, fx.Node) and len(shape(b))):
            e = affine_of(a, depth + 1)
            return e.scale(kb) if e is not None else None
        if ka is not None and not (isinstance(a, fx.Node) and len(shape(a))):
            e = affine_of(b, depth + 1)
            return e.scale(ka) if e is not None else None
        return None
    if t in _PASS or t is aten.expand.default:
        return affine_of(node.args[0], depth + 1) if _broadcast_preserving(node) or t in _PASS else None
    if t is aten.unsqueeze.default:
        src = node.args[0]
        e = affine_of(src, depth + 1)
        if e is None:
            return None
        r = _rank(src)
        d = node.args[1] % (r + 1)
        # an input dim p keeps its right-aligned axis iff it sits right of the new dim
        return e.shift_axes(lambda a: a + 1 if (r - 1 - a) < d else a)
    if t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.squeeze.dim,
             aten.squeeze.default, aten.squeeze.dims):
        src = node.args[0]
        e = affine_of(src, depth + 1)
        if e is None:
            return None
        return _remap_size1_view(e, shape(src), shape(node))
    if t is aten.slice.Tensor:
        src = node.args[0]
        e = affine_of(src, depth + 1)
        if e is None:
            return None
        args = list(node.args) + [None] * (5 - len(node.args))
        dim, start, step = args[1] or 0, args[2] or 0, args[4] or 1  # the end bound does not move values
        if step != 1 or not isinstance(start, int):
            return None
        r = _rank(src)
        if start < 0:  # counts from the end (x[-q:]): the first element kept is size + start
            size = shape(src)[dim % r]
            if not isinstance(size, int):
                return None  # a symbolic size: the mask stays a tensor the kernel reads
            start = max(size + start, 0)
        axis = r - 1 - (dim % r)
        k = dict(e.coef).get(axis, 0)
        return Affine.make(dict(e.coef), e.const + k * start)
    return None


def _remap_size1_view(e: Affine, in_shape, out_shape) -> Affine | None:
    """A view that only adds / removes size-1 dims: carry each axis to its new position."""
    ins = [i for i, s in enumerate(in_shape) if not known_one(s)]
    outs = [i for i, s in enumerate(out_shape) if not known_one(s)]
    if len(ins) != len(outs):
        return None
    from .graph_utils import known_eq

    if not all(known_eq(in_shape[a], out_shape[b]) for a, b in zip(ins, outs)):
        return None
    ri, ro = len(in_shape), len(out_shape)
    mapping = {ri - 1 - a: ro - 1 - b for a, b in zip(ins, outs)}
    return e.shift_axes(mapping.get)


# ------------------------------------------------------------------------------ predicates


@dataclass(frozen=True)
class Pred:
    """`expr <= 0` over positions."""

    expr: Affine

    def negate(self) -> "Pred":
        return Pred(self.expr.scale(-1) + Affine.make({}, 1))  # not(e <= 0) == (1 - e <= 0)

    def causal_offset(self) -> int | None:
        """j - i - c <= 0, i.e. keep key j for query i iff j <= i + c -> c."""
        if dict(self.expr.coef) == {0: 1, 1: -1}:
            return -self.expr.const
        return None


@dataclass
class Conjunct:
    pred: Pred | None  # structural, or None when only `node` describes it
    node: fx.Node | None  # a graph node computing this conjunct (broadcast right-aligned)


def _cmp(node: fx.Node) -> Pred | None:
    a, b = affine_of(node.args[0]), affine_of(node.args[1])
    if a is None or b is None:
        return None
    t = node.target
    if t in _LE:
        return Pred(a + b.scale(-1))
    if t in _LT:
        return Pred(a + b.scale(-1) + Affine.make({}, 1))
    if t in _GE:
        return Pred(b + a.scale(-1))
    if t in _GT:
        return Pred(b + a.scale(-1) + Affine.make({}, 1))
    return None


def conjuncts(node, depth: int = 0) -> list[Conjunct] | None:
    """Decompose a bool node into conjuncts; [] means always true; None: not a bool tensor graph."""
    if isinstance(node, bool):
        return [] if node else None
    if not isinstance(node, fx.Node):
        return None
    if depth > 32:
        return [Conjunct(None, node)]
    t = node.target
    if node.op == "call_function":
        if t is aten.full.default and node.args[1] is True:
            return []
        if t in _LE + _LT + _GE + _GT:
            p = _cmp(node)
            return [Conjunct(p, node)]
        if t in _AND:
            a, b = conjuncts(node.args[0], depth + 1), conjuncts(node.args[1], depth + 1)
            if a is None or b is None:
                return [Conjunct(None, node)]
            return _rehome(a + b, node)
        if t in _NOT or (t in (aten.eq.Scalar, aten.eq.Tensor) and _const(node.args[1]) == 0):
            inner = conjuncts(node.args[0], depth + 1)
            if inner is not None and len(inner) == 1 and inner[0].pred is not None:
                return [Conjunct(inner[0].pred.negate(), node)]
            return [Conjunct(None, node)]
        if (t in _PASS or t in (aten.expand.default, aten.unsqueeze.default, aten.view.default,
                                aten.reshape.default, aten.slice.Tensor)) and _broadcast_preserving(node):
            if t is aten.slice.Tensor and not _full_slice(node):
                return [Conjunct(None, node)]
            inner = conjuncts(node.args[0], depth + 1)
            if inner is None:
                return [Conjunct(None, node)]
            return _rehome(inner, node)
    return [Conjunct(None, node)]


def _full_slice(node: fx.Node) -> bool:
    args = list(node.args) + [None] * (5 - len(node.args))
    start, end, step = args[2] or 0, args[3], args[4] or 1
    return start == 0 and step == 1 and (end is None or (isinstance(end, int) and end >= INT64_MAX // 2)
                                         or end == shape(node.args[0])[args[1] or 0])


def _rehome(parts: list[Conjunct], node: fx.Node) -> list[Conjunct]:
    """A lone conjunct is exactly `node`; several keep their own (broadcast-compatible) nodes."""
    if len(parts) == 1:
        return [Conjunct(parts[0].pred, node)]
    return parts


@dataclass
class KeepMask:
    """keep = causal rule (if causal_offset is not None) AND every residual tensor.

    Residuals are (node, negated) pairs: negated ones keep where the node is False.
    """

    causal_offset: int | None = None
    residual: list = field(default_factory=list)


def split_keep(node: fx.Node, negated: bool = False) -> KeepMask:
    """Split a keep mask (or, negated, a "mask out" mask) into causal rule + residual tensors."""
    parts = conjuncts(node)
    whole = KeepMask(None, [(node, negated)])
    if parts is None:
        return whole
    if negated:  # not(a and b) is no conjunction: only a lone structural predicate negates
        if len(parts) == 1 and parts[0].pred is not None:
            off = parts[0].pred.negate().causal_offset()
            if off is not None:
                return KeepMask(off, [])
        return whole
    out = KeepMask()
    for c in parts:
        off = c.pred.causal_offset() if c.pred is not None else None
        if off is not None:
            out.causal_offset = off if out.causal_offset is None else min(out.causal_offset, off)
        elif c.node is not None:
            out.residual.append((c.node, False))
        else:
            return whole
    return out


@dataclass
class AdditiveMask:
    """An additive float mask read as `keep` + fill value, or left as a plain bias."""

    keep: fx.Node | None = None  # bool node
    keep_negated: bool = False  # True: the node marks positions to drop
    fill: float = -math.inf
    bias: fx.Node | None = None


def read_additive(node: fx.Node) -> AdditiveMask:
    """where(keep, 0, NEG) (NEG <= -1e4 or -inf) -> keep + fill; anything else -> bias."""
    cur = node
    while is_call(cur, *_PASS, aten.expand.default, aten.slice.Tensor) and (
            not is_call(cur, aten.slice.Tensor) or _full_slice(cur)):
        cur = cur.args[0]
    if is_call(cur, aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar):
        cond, a, b = cur.args
        va, vb = scalar_value(a), scalar_value(b)
        if va == 0.0 and vb is not None and vb <= MASK_FILL_MAX:
            return AdditiveMask(keep=cond, fill=vb)
        if vb == 0.0 and va is not None and va <= MASK_FILL_MAX:
            return AdditiveMask(keep=cond, keep_negated=True, fill=va)
    return AdditiveMask(bias=node)
