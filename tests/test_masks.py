"""passes/masks.py on small hand-built FX graphs (make_fx: aten ops with fake values in meta)."""

import math

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from attnopt.passes.masks import Affine, Pred, affine_of, read_additive, split_keep

N = 8
aten = torch.ops.aten


def _graph(fn, *inputs):
    return make_fx(fn)(*inputs)


def _out(gm):
    """The node the graph returns."""
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    return out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]


def _pos():
    """Query positions i [N, 1] and key positions j [1, N]."""
    return torch.arange(N).view(N, 1), torch.arange(N).view(1, N)


# ------------------------------------------------------------------ affine index expressions

def test_affine_arithmetic_and_axes():
    i, j = Affine.make({1: 1}, 0), Affine.make({0: 1}, 0)
    e = j + i.scale(-1) + Affine.make({}, -2)
    assert e == Affine.make({0: 1, 1: -1}, -2)
    assert Affine.make({0: 0, 1: 3}, 1).coef == ((1, 3),)  # zero coefficients dropped
    assert e.shift_axes(lambda a: a + 1) == Affine.make({1: 1, 2: -1}, -2)
    assert e.shift_axes(lambda a: None if a == 1 else a) is None


def test_affine_of_positions():
    def f():
        i = torch.arange(N).view(N, 1) * 2 + 3  # axis 1 (the query, second from the right)
        j = torch.arange(N).unsqueeze(0) - 1  # axis 0 (the key)
        return i + j

    out = _out(_graph(f))
    assert affine_of(out) == Affine.make({0: 1, 1: 2}, 2)


def test_affine_of_slices_shift_the_constant():
    def f():
        return torch.arange(2 * N)[N // 2:], torch.arange(2 * N)[-N:]

    gm = _graph(f)
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    pos, neg = out.args[0]
    assert affine_of(pos) == Affine.make({0: 1}, N // 2)
    assert affine_of(neg) == Affine.make({0: 1}, N)  # x[-N:] of 2N starts at N


def test_affine_of_non_positions_is_none():
    gm = _graph(lambda x: x + 1, torch.arange(N))
    (ph,) = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert affine_of(ph) is None  # an input's values are not a function of positions
    assert affine_of(_out(gm)) is None


def test_pred_negate_and_causal_offset():
    p = Pred(Affine.make({0: 1, 1: -1}, -3))  # j - i - 3 <= 0: j <= i + 3
    assert p.causal_offset() == 3
    assert p.negate().negate() == p
    assert p.negate().causal_offset() is None  # j > i + 3 is no causal rule
    assert Pred(Affine.make({0: -1, 1: 1}, 0)).causal_offset() is None  # i <= j: anti-causal


# ------------------------------------------------------------------ keep masks

FORMS = {
    "le": (lambda i, j: j <= i, 0),
    "ge": (lambda i, j: i >= j, 0),
    "lt": (lambda i, j: j < i + 1, 0),
    "gt_offset": (lambda i, j: i + 3 > j, 2),
    "offset": (lambda i, j: j <= i + 4, 4),
    "negative": (lambda i, j: j - i <= -2, -2),
    "and_twice": (lambda i, j: (j <= i) & (j <= i + 2), 0),  # the tighter rule wins
    "not_gt": (lambda i, j: ~(j > i), 0),
    "eq_zero": (lambda i, j: (j > i + 1) == 0, 1),
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_split_keep_reads_causal_rules(form):
    build, offset = FORMS[form]
    gm = _graph(lambda: build(*_pos()))
    km = split_keep(_out(gm))
    assert km.causal_offset == offset and km.residual == []
    # the rule is what the graph computes
    assert torch.equal(gm(), torch.ones(N, N, dtype=torch.bool).tril(offset))


def test_split_keep_keeps_a_padding_mask_as_residual():
    pad = torch.rand(1, N) > 0.3

    def f(p):
        i, j = _pos()
        return (j <= i) & p

    gm = _graph(f, pad)
    km = split_keep(_out(gm))
    (ph,) = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert km.causal_offset == 0
    assert km.residual == [(ph, False)]


def test_split_keep_leaves_an_anti_causal_mask_whole():
    gm = _graph(lambda: (lambda i, j: i <= j)(*_pos()))
    out = _out(gm)
    km = split_keep(out)
    assert km.causal_offset is None and km.residual == [(out, False)]


def test_split_keep_negated():
    gm = _graph(lambda: (lambda i, j: j > i)(*_pos()))  # a "mask out" mask above the diagonal
    assert split_keep(_out(gm), negated=True).causal_offset == 0
    gm = _graph(lambda p: (lambda i, j: (j > i) & p)(*_pos()), torch.ones(1, N, dtype=torch.bool))
    km = split_keep(_out(gm), negated=True)  # not(a and b) is no conjunction: kept whole
    assert km.causal_offset is None and km.residual == [(_out(gm), True)]


def test_split_keep_of_an_input_is_the_input():
    gm = _graph(lambda m: m.clone(), torch.ones(N, N, dtype=torch.bool))
    (ph,) = [n for n in gm.graph.nodes if n.op == "placeholder"]
    km = split_keep(_out(gm))
    assert km.causal_offset is None and len(km.residual) == 1 and km.residual[0][1] is False


# ------------------------------------------------------------------ additive masks

def _where(keep_first: bool, fill: float):
    def f():
        i, j = _pos()
        keep = j <= i
        return torch.where(keep, 0.0, fill) if keep_first else torch.where(~keep, fill, 0.0)
    return _graph(f)


@pytest.mark.parametrize("fill", [-math.inf, -1e9, -1e4, torch.finfo(torch.float32).min])
def test_read_additive_reads_where_keep_zero_fill(fill):
    gm = _where(True, fill)
    am = read_additive(_out(gm))
    assert am.bias is None and am.fill == fill and not am.keep_negated
    assert am.keep.target is aten.le.Tensor


def test_read_additive_negated_keep():
    gm = _graph(lambda: (lambda i, j: torch.where(j > i, -math.inf, 0.0))(*_pos()))
    am = read_additive(_out(gm))
    assert am.bias is None and am.keep_negated and am.fill == -math.inf
    assert am.keep.target is aten.gt.Tensor


@pytest.mark.parametrize("fill", [-1.0, -100.0])
def test_read_additive_small_fill_is_a_bias(fill):
    """A fill that does not underflow exp is a real bias, not masking."""
    out = _out(_where(True, fill))
    assert read_additive(out).bias is out and read_additive(out).keep is None


def test_read_additive_plain_tensor_is_a_bias():
    gm = _graph(lambda b: b * 2, torch.randn(N, N))
    out = _out(gm)
    am = read_additive(out)
    assert am.bias is out and am.keep is None
