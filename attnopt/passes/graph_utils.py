"""Small helpers over the FX graphs shared by the passes: Inductor's aten-level graph (meta['val'])
and Dynamo's graph, which the linear passes read (meta['example_value'])."""

from __future__ import annotations

import copy
import math
import operator
import re
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten
prims = torch.ops.prims

# the traced callable's local: L['self'], or L['args'][0] when a decorator passes the module on
_ROOT = re.compile(r"^L(?:\[[^\]]+\])+\.?")


def val(node: Any):
    """The FakeTensor (or SymInt) a node produces, if the graph recorded it."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def shape(node: fx.Node) -> tuple:
    return tuple(node.meta["val"].shape)


def example_value(node: fx.Node):
    """The value Dynamo recorded for a node of its own graph (before Inductor: no meta['val'])."""
    return node.meta.get("example_value")


def example_shape(n) -> tuple:
    """The example value's shape; () for anything that is not one tensor (split's tuple, SymInts)."""
    ev = example_value(n) if isinstance(n, fx.Node) else None
    return tuple(ev.shape) if isinstance(ev, torch.Tensor) else ()


def attr_of(gm: torch.nn.Module, target: str):
    """What a get_attr node's dotted `target` names on `gm` (None if any part is missing)."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of Dynamo's graph that AOT autograd still accepts: node metas (shallow) and the
    placeholders' `_dynamo_source`, which deepcopy alone drops."""
    new = copy.deepcopy(graph)
    for old_n, new_n in zip(graph.nodes, new.nodes):
        if hasattr(old_n, "_dynamo_source"):
            new_n._dynamo_source = old_n._dynamo_source
    return new


def is_call(node: Any, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def known_eq(a, b) -> bool:
    """a == b provably, without adding a guard (works for ints and SymInts)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return bool(statically_known_true(a == b))


def static_int(a) -> int:
    """An int for a size that must be static for a kernel (head dim / head count).

    Symbolic ones (dynamic=True makes every dim symbolic) are specialized with a guard: they do
    not change between calls, and a change recompiles instead of running wrong.
    """
    if isinstance(a, int):
        return a
    return int(a)


def hint_int(a) -> int | None:
    """The example value of a size, for reports only: never installs a guard."""
    if isinstance(a, int):
        return a
    if isinstance(a, torch.SymInt):
        try:
            return int(a.node.hint) if a.node.hint is not None else None
        except (TypeError, ValueError):
            return None
    return None


def known_one(a) -> bool:
    return known_eq(a, 1)


def prod(xs: Iterable):
    out = 1
    for x in xs:
        out = out * x
    return out


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost user module that produced `node` ('' for top level).

    Dynamo records `L['self'].model.layers.0.self_attn` (or `L['args'][0].model...` under
    transformers' forward decorators); the user's own path drops the root.
    """
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = _ROOT.sub("", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)  # layers[0] -> layers.0
    path = re.sub(r"\[['\"]([^'\"]+)['\"]\]", r".\1", path)  # ['key'] -> .key
    # Dynamo sometimes spells attribute access through the module's dicts
    path = re.sub(r"(^|\.)(__dict__|_modules)(?=\.|$)", "", path)
    return path.lstrip(".")


def module_class(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    t = list(stack.values())[-1][1]
    return getattr(t, "__name__", str(t)).rsplit(".", 1)[-1].strip("'>")


def source_line(node: fx.Node) -> str:
    """'file.py:123 code' of the user's line that produced the node, when recorded."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in [^\n]*\n\s*([^\n]*)', trace)
    if not frames:
        return ""
    fname, line, code = frames[-1]
    return f"{fname}:{line} {code.strip()}"


def scalar_value(x: Any, depth: int = 0) -> float | None:
    """A Python number, or a node computing a constant 0-d tensor / symbolic scalar -> its float.

    Symbolic scalars (head_dim ** -0.5 under dynamic=True) are specialized with a guard.
    """
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if not isinstance(x, fx.Node) or depth > 12:
        return None
    v = x.meta.get("val")
    if isinstance(v, (torch.SymFloat, torch.SymInt)):
        return float(v)
    if x.op == "get_attr":  # a tensor constant folded into the graph
        owner = x.graph.owning_module
        t = getattr(owner, x.target, None) if owner is not None else None
        if isinstance(t, torch.Tensor) and t.numel() == 1 and not isinstance(
                t, torch._subclasses.FakeTensor) and t.is_floating_point():
            from torch._subclasses.fake_tensor import unset_fake_temporarily

            with unset_fake_temporarily():
                return float(t.item())
        return None
    if x.op != "call_function" or not isinstance(v, torch.Tensor) or v.dim() != 0:
        return None
    a = [scalar_value(y, depth + 1) if isinstance(y, fx.Node) else _num(y) for y in x.args]
    t = x.target
    if t is aten.full.default:
        return _num(x.args[1])
    if t is aten.scalar_tensor.default:
        return a[0]
    if t in (prims.convert_element_type.default, aten.clone.default, aten.alias.default,
             aten.lift_fresh_copy.default, aten._to_copy.default):
        return a[0]
    if t is aten.full_like.default:
        return _num(x.args[1])
    if any(y is None for y in a[:2]) or len(a) < 1:
        return None
    ops = {
        aten.pow.Tensor_Tensor: lambda p, q: p ** q, aten.pow.Tensor_Scalar: lambda p, q: p ** q,
        aten.mul.Tensor: lambda p, q: p * q, aten.div.Tensor: lambda p, q: p / q,
        aten.add.Tensor: lambda p, q: p + q, aten.sub.Tensor: lambda p, q: p - q,
    }
    unary = {aten.sqrt.default: math.sqrt, aten.rsqrt.default: lambda p: 1 / math.sqrt(p),
             aten.reciprocal.default: lambda p: 1 / p, aten.neg.default: lambda p: -p}
    try:
        if t in ops and len(a) >= 2:
            return float(ops[t](a[0], a[1]))
        if t in unary:
            return float(unary[t](a[0]))
    except (ZeroDivisionError, ValueError, OverflowError):
        return None
    return None


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def users_except(node: fx.Node, allowed: set[fx.Node]) -> list[fx.Node]:
    return [u for u in node.users if u not in allowed]


def fake_mode_of(graph: fx.Graph):
    vals = [n.meta.get("val") for n in graph.nodes if n.op == "placeholder"]
    return detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])


class GraphBuilder:
    """Inserts call_function nodes before an anchor, filling meta['val'] by running the op on the
    fake inputs (later passes and Inductor read it) and copying the anchor's source metadata."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node):
        self.graph, self.anchor = graph, anchor
        self.fake_mode = fake_mode_of(graph)
        self.created: list[fx.Node] = []

    def call(self, target, *args, **kwargs) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, args, kwargs)
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "seq_nr"):
            if key in self.anchor.meta:
                node.meta[key] = self.anchor.meta[key]
        fake_args, fake_kwargs = torch.fx.node.map_arg((args, kwargs), lambda n: n.meta["val"])
        try:
            if self.fake_mode is not None:
                with self.fake_mode:
                    node.meta["val"] = target(*fake_args, **fake_kwargs)
            else:
                node.meta["val"] = target(*fake_args, **fake_kwargs)
        except Exception:
            self.graph.erase_node(node)  # a node whose op fails must not stay in the graph
            raise
        self.created.append(node)
        return node

    def dim(self, x: fx.Node, d: int):
        """Size of x along d, as an int or (symbolic) a sym_size node usable as a graph arg."""
        s = x.meta["val"].shape[d]
        if isinstance(s, int):
            return s
        if isinstance(s, torch.SymInt) and s.node.maybe_as_int() is not None:
            return s.node.maybe_as_int()
        return self.call(aten.sym_size.int, x, d)

    def mul(self, a, b):
        if isinstance(a, int) and isinstance(b, int):
            return a * b
        if isinstance(a, int) and a == 1:
            return b
        if isinstance(b, int) and b == 1:
            return a
        return self.call(operator.mul, a, b)

    def permute(self, x: fx.Node, dims) -> fx.Node:
        dims = list(dims)
        return x if dims == list(range(len(dims))) else self.call(aten.permute.default, x, dims)

    def reshape(self, x: fx.Node, sizes) -> fx.Node:
        """Reshape to `sizes` (ints, -1, or sym_size nodes from `dim`/`mul`)."""
        sizes = list(sizes)
        cur = list(x.meta["val"].shape)
        want = [s.meta["val"] if isinstance(s, fx.Node) else s for s in sizes]
        if len(cur) == len(want) and all(not (isinstance(w, int) and w == -1) and known_eq(a, w) for a, w in zip(cur, want)):
            return x
        return self.call(aten.reshape.default, x, sizes)

    def getitem(self, x: fx.Node, i: int) -> fx.Node:
        return self.call(operator.getitem, x, i)


NEG_INF = -math.inf
