"""passes/layout.py on small hand-built FX graphs (make_fx: aten ops with fake values in meta)."""

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from attnopt.passes.layout import (Atom, covers_in_order, dims_size, initial_dims, is_layout_op, propagate,
                                   trace, trace_to)

aten = torch.ops.aten
B, N, H, D = 2, 5, 4, 8


def _graph(fn, *inputs):
    gm = make_fx(fn)(*inputs)
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    return gm, phs, out.args[0]


def test_initial_dims_drop_size_one():
    _, (x,), _ = _graph(lambda x: x + 1, torch.randn(B, 1, N))
    assert initial_dims(x) == [[Atom(0, B)], [], [Atom(2, N)]]


def test_head_split_is_traced_to_the_split_and_expressed_in_the_projection():
    """[B, N, H*D] -view-> [B, N, H, D] -transpose-> [B, H, N, D]: `trace` stops at the view (its
    dims are whole dims of the view); `trace_to` splits the projection's H*D dim into heads and
    channels."""
    gm, (x,), out = _graph(lambda x: x.view(B, N, H, D).transpose(1, 2), torch.randn(B, N, H * D))
    t = trace(out)
    assert t.src.target is aten.view.default and t.src.args[0] is x
    assert t.dims == [[Atom(0, B)], [Atom(2, H)], [Atom(1, N)], [Atom(3, D)]]
    dims = trace_to(out, x)
    assert dims == [[Atom(0, B)], [Atom(2, H, D)], [Atom(1, N)], [Atom(2, D)]]
    assert covers_in_order(dims[1] + dims[3], 2, H * D)  # heads then channels: the whole dim


def test_repeat_kv_is_a_broadcast_head_dim():
    """GQA's repeat_kv: expand a new dim and fold it into heads; the kernel maps heads instead."""
    hkv, g = 2, 3

    def repeat_kv(k):
        return k[:, :, None].expand(B, hkv, g, N, D).reshape(B, hkv * g, N, D)

    gm, (k,), out = _graph(repeat_kv, torch.randn(B, hkv, N, D))
    t = trace(out)
    assert t.src is k
    assert t.dims[1] == [Atom(1, hkv), Atom(None, g)]
    assert t.dims[1][1].broadcast and not t.dims[1][0].broadcast
    assert dims_size(t.dims[1]) == hkv * g


def test_permute_and_clone_are_followed():
    gm, (x,), out = _graph(lambda x: x.permute(0, 2, 1, 3).clone(), torch.randn(B, N, H, D))
    t = trace(out)
    assert t.src is x and [d[0].src for d in t.dims] == [0, 2, 1, 3]


def test_partial_slice_stops_the_trace():
    """x[:, :3] reads part of a dim: the slice itself is the earliest whole source."""
    gm, (x,), out = _graph(lambda x: x[:, :3].transpose(1, 2), torch.randn(B, N, D))
    t = trace(out)
    assert t.src is not x and t.src.target is aten.slice.Tensor
    full = _graph(lambda x: x[:, :].transpose(1, 2), torch.randn(B, N, D))
    assert trace(full[2]).src is full[1][0]  # a full slice is a no-op


def test_accept_can_reject_a_source():
    gm, (x,), out = _graph(lambda x: x.permute(0, 2, 1, 3).clone(), torch.randn(B, N, H, D))
    seen = []
    t = trace(out, accept=lambda cand: seen.append(cand.src) or cand.src is not x)
    assert seen[0] is x and t.src is not x


def test_view_that_splits_a_dim_needs_allow_split():
    """[B, N*2, D] -> [B, N, 2*D]: tokens split across the boundary; only trace_to (splits allowed)
    expresses it."""
    gm, (x,), out = _graph(lambda x: x.view(B, N, 2 * D), torch.randn(B, 2 * N, D))
    view = out
    assert propagate(initial_dims(x), view) is None
    dims = propagate(initial_dims(x), view, allow_split=True)
    assert dims == [[Atom(0, B)], [Atom(1, N, 2)], [Atom(1, 2), Atom(2, D)]]
    assert trace_to(view, x) == dims
    assert trace(view).src is view  # trace does not split


def test_trace_to_steps_over_elementwise_ops():
    gm, (x,), out = _graph(lambda x: (x.transpose(1, 2) * 2).reshape(B, H, N * D), torch.randn(B, N, H, D))
    (mul,) = [n for n in gm.graph.nodes if n.target is aten.mul.Tensor]
    assert trace_to(out, x) is None  # the multiply is no layout op
    dims = trace_to(out, x, through=frozenset({mul}))
    assert dims == [[Atom(0, B)], [Atom(2, H)], [Atom(1, N), Atom(3, D)]]


def test_is_layout_op():
    gm, (x,), out = _graph(lambda x: x.transpose(0, 1).exp(), torch.randn(N, D))
    ops = {n.target: n for n in gm.graph.nodes if n.op == "call_function"}
    assert is_layout_op(ops[aten.transpose.int])
    assert not is_layout_op(ops[aten.exp.default])
    assert not is_layout_op(x)


def test_covers_in_order():
    assert covers_in_order([Atom(2, H, D), Atom(2, D)], 2, H * D)
    assert not covers_in_order([Atom(2, D), Atom(2, H, D)], 2, H * D)  # inner first
    assert not covers_in_order([Atom(2, H, D)], 2, H * D)  # channels missing
    assert not covers_in_order([Atom(1, N)], 2, N)  # another dim
    assert not covers_in_order([], 2, 1)
