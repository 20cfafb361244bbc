"""Follow a tensor back through pure layout ops to the tensor its elements come from.

Attention operands reach a matmul through chains of view / permute / expand / clone (matmul's
own decomposition, einsum, repeat_kv, head split). To call one fused op we need the operands as
[B, H, N, D] views of their sources, with no copies, and we need to know when a head dim was
broadcast (repeat_kv / repeat_interleave GQA) so the kernel can map heads instead of reading
repeated K/V.

Each dim of a traced tensor is described by a list of atoms: pieces of source dims (or
broadcast dims made by expand), in row-major order. Size-1 pieces are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch.fx as fx

from .graph_utils import aten, is_call, known_eq, known_one, prod, shape

INT64_MAX = 9223372036854775807


@dataclass(frozen=True)
class Atom:
    src: Optional[int]  # source dim, or None for a dim broadcast by expand
    size: object  # int | SymInt
    stride: object = 1  # index step inside the source dim (1 and full size = the whole dim)

    @property
    def broadcast(self) -> bool:
        return self.src is None


Dims = list  # list[list[Atom]]


@dataclass
class Traced:
    """`node`'s dims expressed in atoms of `src`'s dims."""

    src: fx.Node
    dims: Dims

    def whole(self, atom: Atom) -> bool:
        return (not atom.broadcast and known_one(atom.stride)
                and known_eq(atom.size, shape(self.src)[atom.src]))


_IDENTITY_OPS = (aten.clone.default, aten.alias.default)
_LAYOUT_OPS = (
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default,
    aten.transpose.int, aten.t.default, aten.expand.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.slice.Tensor,
) + _IDENTITY_OPS


def is_layout_op(node) -> bool:
    return is_call(node, *_LAYOUT_OPS) and isinstance(node.args[0], fx.Node)


def initial_dims(node: fx.Node) -> Dims:
    return [[] if known_one(s) else [Atom(d, s)] for d, s in enumerate(shape(node))]


def _regroup(atoms: list[Atom], new_shape, allow_split: bool) -> Dims | None:
    atoms = list(atoms)
    out: Dims = []
    for s in new_shape:
        if known_one(s):
            out.append([])
            continue
        group, acc = [], 1
        while not known_eq(acc, s):
            if not atoms:
                return None
            a = atoms.pop(0)
            nxt = acc * a.size
            if known_eq(nxt, s) or not _known_gt(nxt, s):
                group.append(a)
                acc = nxt
                continue
            # a straddles the boundary: split it into (outer f, inner r) if allowed
            if not (allow_split or a.broadcast):
                return None
            f = s // acc
            if not known_eq(f * acc, s):
                return None
            r = a.size // f
            if not known_eq(r * f, a.size):
                return None
            group.append(replace(a, size=f, stride=a.stride * r))
            atoms.insert(0, replace(a, size=r))
            acc = s
        out.append(group)
    return out if not atoms else None


def _known_gt(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a > b
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(a > b))


def propagate(dims: Dims, op: fx.Node, allow_split: bool = False) -> Dims | None:
    """dims of op's input -> dims of op's output, or None when not expressible."""
    t = op.target
    nd = len(dims)
    if t in _IDENTITY_OPS:
        return dims
    if t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        flat = [a for d in dims for a in d]
        return _regroup(flat, shape(op), allow_split)
    if t is aten.permute.default:
        perm = [p % nd for p in op.args[1]]
        return [dims[p] for p in perm]
    if t is aten.transpose.int:
        d0, d1 = op.args[1] % nd, op.args[2] % nd
        out = list(dims)
        out[d0], out[d1] = out[d1], out[d0]
        return out
    if t is aten.t.default:
        return list(reversed(dims)) if nd == 2 else dims
    if t is aten.unsqueeze.default:
        d = op.args[1] % (nd + 1)
        return dims[:d] + [[]] + dims[d:]
    if t in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
        in_shape = shape(op.args[0])
        if t is aten.squeeze.default:
            drop = {i for i, s in enumerate(in_shape) if known_one(s)}
        else:
            ds = op.args[1] if t is aten.squeeze.dims else [op.args[1]]
            drop = {d % nd for d in ds if known_one(in_shape[d % nd])}
        return [d for i, d in enumerate(dims) if i not in drop]
    if t is aten.expand.default:
        new = shape(op)
        lead = len(new) - nd
        out = [[] if known_one(s) else [Atom(None, s)] for s in new[:lead]]
        in_shape = shape(op.args[0])
        for i, d in enumerate(dims):
            s = new[lead + i]
            if known_one(in_shape[i]) and not known_one(s):
                out.append([Atom(None, s)])
            else:
                out.append(d)
        return out
    if t is aten.slice.Tensor:
        args = list(op.args) + [None] * (5 - len(op.args))
        dim, start, end, step = args[1] or 0, args[2] or 0, args[3], args[4] or 1
        size = shape(op.args[0])[dim % nd]
        full_end = end is None or (isinstance(end, int) and end >= INT64_MAX // 2) or (
            not isinstance(end, fx.Node) and known_eq(end, size))
        if isinstance(start, int) and start == 0 and step == 1 and full_end:
            return dims
        return None
    return None


def trace(node: fx.Node, accept: Callable[[Traced], bool] | None = None) -> Traced:
    """The earliest source of `node` reachable through layout ops that `accept` takes.

    Falls back to `node` itself (always expressible). `accept` sees a candidate and can reject
    it (e.g. when a token dim is made of two source dims).
    """
    chain = []
    cur = node
    while is_layout_op(cur):
        chain.append(cur)
        cur = cur.args[0]
    chain.reverse()  # chain[0] consumes `cur`
    sources = [cur] + chain
    for i, src in enumerate(sources):
        dims = initial_dims(src)
        for op in chain[i:]:
            dims = propagate(dims, op)
            if dims is None:
                break
        if dims is None:
            continue
        cand = Traced(src, dims)
        if all(cand.whole(a) or a.broadcast for d in dims for a in d) and (accept is None or accept(cand)):
            return cand
    return Traced(node, initial_dims(node))


def trace_to(node: fx.Node, target: fx.Node, through: frozenset = frozenset(),
             through_input: Callable | None = None) -> Dims | None:
    """`node`'s dims in atoms of `target`, which must lie on its layout-op chain (splits allowed).
    Nodes in `through` (elementwise ops that keep their input's shape) are stepped over, to
    `through_input(node)` (default: their first argument)."""
    chain = []
    cur = node
    while cur is not target:
        if cur in through:
            cur = through_input(cur) if through_input is not None else cur.args[0]
            continue
        if not is_layout_op(cur):
            return None
        chain.append(cur)
        cur = cur.args[0]
    dims = initial_dims(target)
    for op in reversed(chain):
        dims = propagate(dims, op, allow_split=True)
        if dims is None:
            return None
    return dims


def covers_in_order(atoms: list[Atom], src_dim: int, size) -> bool:
    """atoms enumerate source dim `src_dim` (of `size`) exactly, outermost first."""
    if not atoms or any(a.src != src_dim for a in atoms):
        return False
    if not known_one(atoms[-1].stride):
        return False
    for outer, inner in zip(atoms, atoms[1:]):
        if not known_eq(outer.stride, inner.stride * inner.size):
            return False
    return known_eq(prod(a.size for a in atoms), size)


def dims_size(dims: list[Atom]):
    return prod(a.size for a in dims)


