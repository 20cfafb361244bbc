"""smoothquant: the scales (the SmoothQuant formula), the folded tensors (the float model is
unchanged in float64) and which groups may fold, with the reason for those that may not."""

import pytest
import torch

from attnopt.codegen.arch import ARCHS
from attnopt.config import normalize_options
from attnopt.passes.linear_match import LinearSite, match_linears
from attnopt.passes.smooth_match import SmoothGroup, smooth_groups
from attnopt.passes.smoothquant import (accept_groups, folded_norm_params, folded_tensors, planned_act_absmax,
                                        smooth_scales)

from helpers import dynamo_graph
from test_smooth_match import Attention, Block


def _consumer(key):
    return LinearSite(node=None, x=None, weight=None, bias=None, transposed=False, module=key, key=key)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8])
def test_scales_are_the_smoothquant_formula(alpha):
    """s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha) over both consumers, clamped at 1e-5."""
    k = 12
    weights = {"a": torch.randn(5, k), "b": torch.randn(7, k).bfloat16()}
    weights["a"][:, 3] = 0  # clamped: an all-zero weight column
    stats = {"a": (torch.rand(k) * 4).tolist(), "b": (torch.rand(k) * 4).tolist()}
    stats["a"][5] = stats["b"][5] = 0.0
    s = smooth_scales(SmoothGroup("layernorm", None, [_consumer("a"), _consumer("b")]), weights, stats, alpha)
    for j in range(k):
        a = max(max(stats["a"][j], stats["b"][j]), 1e-5)
        w = max(float(weights["a"][:, j].double().abs().max()), float(weights["b"][:, j].double().abs().max()), 1e-5)
        assert s.dtype == torch.float64 and float(s[j]) == pytest.approx(max(a ** alpha / w ** (1 - alpha), 1e-5),
                                                                         rel=1e-12)
    assert smooth_scales(SmoothGroup("layernorm", None, [_consumer("a"), _consumer("c")]), weights, stats, alpha) is None


def test_scales_through_a_channel_map_take_the_max_over_the_channels_reading_a_producer_channel():
    cmap = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 4, 5])  # o channel -> v channel (heads repeated)
    weights, stats = {"o": torch.randn(6, 10)}, {"o": (torch.rand(10) * 3).tolist()}
    group = SmoothGroup("attention-v", None, [_consumer("o")], channel_map=cmap)
    s = smooth_scales(group, weights, stats, 0.5)
    assert s.shape == (6,)
    for p in range(6):
        cols = (cmap == p).nonzero().flatten().tolist()
        a = max(stats["o"][c] for c in cols)
        w = max(float(weights["o"][:, c].double().abs().max()) for c in cols)
        assert float(s[p]) == pytest.approx(a ** 0.5 / w ** 0.5, rel=1e-12)


def _matched(model, inputs, linear_opts, plan=None):
    gm, ex = dynamo_graph(model, *inputs)
    opts = normalize_options({"linear": {"quant": "none", "smooth": {"alpha": 0.5}, **linear_opts}, "plan": plan})
    with torch.no_grad():
        m = match_linears(gm, ex, opts, ARCHS["cpu"])
    return m, smooth_groups(m.sites, m.params), opts


def _random_stats(m, spread=8.0):
    """Activation maxima with outlier channels: scales far from 1."""
    return {s.key: (torch.rand(m.weights[s.key].shape[1]) ** 4 * spread + 0.01).tolist() for s in m.sites}


def _write_folds(m, folds):
    """Put the folded tensors into the model's own parameters (the graph's inputs are them)."""
    new_w, new_b = folded_tensors(folds, m.weights, m.params)
    by_key = {s.key: s for s in m.sites}
    with torch.no_grad():
        for key, w in new_w.items():
            site = by_key[key]
            m.params[site.weight].copy_(w.t() if site.transposed else w)
        for key, b in new_b.items():
            m.params[by_key[key].bias].copy_(b)
        for f in folds:
            if f.group.kind in ("rmsnorm", "layernorm"):
                for node, _, value in folded_norm_params(f, m.params):
                    m.params[node].copy_(value)
    return new_w


@pytest.mark.parametrize("make,inputs,n_groups", [
    (Block, lambda: (torch.randn(2, 7, 32, dtype=torch.float64),), 4),
    (Attention, lambda: (torch.randn(2, 9, 32, dtype=torch.float64),), 1),
])
def test_folding_leaves_the_float_model_unchanged_in_fp64(make, inputs, n_groups):
    """Norm gains (and LayerNorm's bias), up / v_proj rows and biases divided by s, the consumers'
    columns multiplied by it: the float64 model computes the same function (to rounding)."""
    model = make().double().eval()
    xs = inputs()
    with torch.no_grad():
        ref = model(*xs)
    m, groups, _ = _matched(model, xs, {})
    folds, records = accept_groups(groups, m, _random_stats(m), 0.5)
    assert len(folds) == len(records) == n_groups and all(r.reason is None for r in records), records
    for f in folds:
        assert float(f.s.max() / f.s.min()) > 2  # the test folds scales that matter
    first = folds[0].group.consumers[0]
    per_input = folds[0].s if folds[0].group.channel_map is None else folds[0].s[folds[0].group.channel_map]
    expected_first = m.weights[first.key].double() * per_input[None, :]  # SmoothQuant: W' = W diag(s)
    new_w = _write_folds(m, folds)
    torch.testing.assert_close(new_w[first.key], expected_first, rtol=1e-15, atol=0)
    with torch.no_grad():
        out = model(*xs)
    assert (out - ref).abs().max() <= 1e-10 * ref.abs().max()


def test_groups_that_cannot_fold_say_why():
    model = Block().eval()
    x = torch.randn(2, 7, 32)
    m, groups, _ = _matched(model, (x,), {"exclude": ["k", "up"]})
    _, records = accept_groups(groups, m, _random_stats(m), 0.5)
    why = {r.key: r.reason for r in records}
    assert why == {
        "ln:smooth": "a consumer of this output is not rewritten: k (module 'k' excluded by 'k')",
        ":smooth": "a consumer of this output is not rewritten: up (module 'up' excluded by 'up')",
        "up:smooth": ("the producer linear up is not rewritten (module 'up' excluded by 'up'): its output "
                      "channels could not be divided by the scales"),
        "c:smooth": None,
    }
    plan = {"schema_version": 1, "sites": {"q": {"kind": "linear", "act_absmax": [1.0] * 32}}}
    m, groups, opts = _matched(model, (x,), {}, plan)
    assert {k: list(v) for k, v in planned_act_absmax(opts).items()} == {"q": [1.0] * 32}
    folds, records = accept_groups(groups, m, planned_act_absmax(opts), 0.5)
    assert folds == [] and all("no activation statistics" in r.reason for r in records)
    m, groups, _ = _matched(Attention(), (torch.randn(2, 9, 32), torch.randn(2, 2, 3, 8)), {})
    folds, (record,) = accept_groups(groups, m, _random_stats(m), 0.5)
    assert folds == [] and record.reason.startswith("V path: ") and record.pattern == "attention-v -> no linear(s)"
