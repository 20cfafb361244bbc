"""linear_rewrite: weights quantized once into graph constants, each linear replaced by attnopt's
op (or aten's linear on smoothed weights), the baked parameters listed, all or nothing."""

import copy

import pytest
import torch
import torch.nn as nn

import attnopt  # noqa: F401  (registers the attnopt ops the rewritten graph calls)
from attnopt.codegen.arch import ARCHS
from attnopt.config import normalize_options
from attnopt.ops import linear_ref as L
from attnopt.passes import linear_rewrite
from attnopt.passes.linear_match import LINEAR_FNS, match_linears
from attnopt.passes.linear_pipeline import run_linear_pass
from attnopt.passes.linear_rewrite import BAKED_META_KEY, quantize_weights, rewrite_all_or_nothing
from attnopt.passes.smooth_match import smooth_groups
from attnopt.passes.smoothquant import accept_groups

from helpers import dynamo_graph, rel_l1
from test_smooth_match import Block

OPS = {"w8a8": torch.ops.attnopt.linear_8bit.default, "w4a16": torch.ops.attnopt.linear_w4a16.default}
OP_NAMES = {"w8a8": "attnopt::linear_8bit", "w4a16": "attnopt::linear_w4a16"}


class LinearAndConv1D(nn.Module):
    """nn.Linear (W [out, in]), ReLU, then HF Conv1D's addmm (W [in, out])."""

    def __init__(self, act=True):
        super().__init__()
        self.lin = nn.Linear(64, 48)
        self.w_kn = nn.Parameter(torch.randn(48, 40) / 7)
        self.b = nn.Parameter(torch.randn(40))
        self.act = act

    def forward(self, x):
        h = self.lin(x)
        return torch.addmm(self.b, torch.relu(h) if self.act else h, self.w_kn)


def _rewrite(gm, ex, opts, fold_stats=None):
    """The pass's steps on one graph: match, fold (with these statistics), quantize, rewrite."""
    opts = normalize_options(opts)
    with torch.no_grad():
        m = match_linears(gm, ex, opts, ARCHS["cpu"])
        groups = smooth_groups(m.sites, m.params) if fold_stats is not None else []
        folds, norm_records = accept_groups(groups, m, fold_stats or {}, 0.5)
        prepared, folds = quantize_weights(m, folds)
        rewrite_all_or_nothing(gm, m, folds, prepared, norm_records, opts, ARCHS["cpu"], None, False)
    return m, folds, norm_records


def _consts(gm, node):
    return [getattr(gm, a.target) if isinstance(a, torch.fx.Node) and a.op == "get_attr" else a for a in node.args]


@pytest.mark.parametrize("act", [True, False], ids=["relu-between", "linear-feeds-linear"])
@pytest.mark.parametrize("fmt", ["w8a8", "w4a16"])
def test_each_linear_becomes_the_op_on_its_quantized_weight(fmt, act):
    """Also when one linear feeds the next directly (LoRA's down then up projection): the second
    op reads the first op's output, so no float linear stays behind a 'rewritten' record."""
    model = LinearAndConv1D(act).eval()
    x = torch.randn(33, 64).bfloat16() if fmt == "w4a16" else torch.randn(33, 64)
    model = model.to(x.dtype)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
    gm, ex = dynamo_graph(model, x)
    m, _, _ = _rewrite(gm, ex, {"linear": {"quant": fmt}})
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert not any(n.target in LINEAR_FNS or n.target is torch.addmm for n in calls)
    ops = [n for n in calls if n.target is OPS[fmt]]
    expected_nk = [model.lin.weight, model.w_kn.t()]  # [N, K] whichever way the weight is stored
    assert len(ops) == 2
    for op, w in zip(ops, expected_nk):
        args = _consts(gm, op)
        want = L.quantize_weight(w, "int8") if fmt == "w8a8" else L.quantize_weight_int4(w)
        for got, exp in zip(args[1:1 + len(want)], want):
            assert torch.equal(got, exp)
        if fmt == "w8a8":  # per output channel: within half a step of the float weight
            wq, ws = args[1:3]
            assert ((wq.float() * ws[:, None] - w.float()).abs() <= ws[:, None] / 2 + 1e-6).all()
    with torch.no_grad():
        assert rel_l1(gm(*ex)[0], ref) <= (0.02 if fmt == "w8a8" else 0.12)
    for key, w in zip(["lin", ""], expected_nk):
        rec = m.records[key]
        n, k = w.shape
        # 8-bit: a byte per weight and an fp32 scale per row; int4: K padded to one group of 128,
        # half a byte per weight and an fp32 scale and zero per row
        after = n * k + 4 * n if fmt == "w8a8" else n * 128 // 2 + 8 * n
        assert (rec.status, rec.op) == ("rewritten", OP_NAMES[fmt])
        assert rec.details["weight_bytes_before"] == n * k * w.element_size()
        assert rec.details["weight_bytes_after"] == after and (rec.details["m"], rec.details["path"]) == (33, "gemm")
    baked = gm.meta[BAKED_META_KEY]  # (graph input index, the parameter itself, what it is)
    assert [id(t) for _, t, _ in baked] == [id(model.lin.weight), id(model.w_kn)]
    assert all(ex[i] is t for i, t, _ in baked)
    assert [what.split(" (")[0] for _, _, what in baked] == ["weight of lin", "weight of <top>"]


def test_smoothed_weights_without_quantization_stay_aten_linears_on_folded_constants():
    """quant 'none' with SmoothQuant: gamma / s into the norm, W diag(s) into aten's linear; the
    float64 graph computes what the model does."""
    model = Block().double().eval()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
    gm, ex = dynamo_graph(model, x)
    stats = {name: (torch.rand(mod.in_features) * 6 + 0.1).tolist() for name, mod in model.named_modules()
             if isinstance(mod, nn.Linear)}
    m, folds, norm_records = _rewrite(gm, ex, {"linear": {"quant": "none", "smooth": {"alpha": 0.5}}}, stats)
    assert {r.key for r in norm_records if r.status == "rewritten"} == {"ln:smooth", ":smooth", "up:smooth", "c:smooth"}
    rewritten = {k for k, r in m.records.items() if r.status == "rewritten"}
    assert rewritten == {"q", "k", "gate", "up", "down", "c", "e"}
    assert all(m.records[k].op == "aten::linear (smoothed weights)" for k in rewritten)
    (ln,) = [n for n in gm.graph.nodes if n.target is torch.nn.functional.layer_norm and n.args[2].op == "get_attr"]
    ln_fold = next(f for f in folds if f.record.key == "ln:smooth")
    assert torch.equal(getattr(gm, ln.args[2].target), model.ln.weight / ln_fold.s)
    assert torch.equal(getattr(gm, ln.args[3].target), model.ln.bias / ln_fold.s)
    with torch.no_grad():
        assert (gm(*ex)[0] - ref).abs().max() <= 1e-10 * ref.abs().max()
    baked = [what.split(" (")[0] for _, _, what in gm.meta[BAKED_META_KEY]]
    assert {"weight of ln", "bias of ln", "weight of <top>", "weight of q", "bias of up"} <= set(baked), baked


def test_a_member_that_fails_to_quantize_undoes_its_fold(monkeypatch):
    """up -> down cannot fold if down fails: up is quantized again without the scales."""
    model = Block().eval()
    gm, ex = dynamo_graph(model, torch.randn(2, 7, 32))
    real = L.quantize_weight

    def failing(w, fmt):  # down, b and e: [32, 48]
        if w.shape == (32, 48):
            raise RuntimeError("planted")
        return real(w, fmt)

    monkeypatch.setattr(L, "quantize_weight", failing)
    opts = normalize_options({"linear": {"quant": "w8a8", "smooth": {"alpha": 0.5}}})
    stats = {name: [1.0] * mod.in_features for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    with torch.no_grad():
        m = match_linears(gm, ex, opts, ARCHS["cpu"])
        folds, records = accept_groups(smooth_groups(m.sites, m.params), m, stats, 0.5)
        prepared, kept = quantize_weights(m, folds)
    why = {r.key: r.reason for r in records}
    assert {f.record.key for f in kept} == {"ln:smooth", ":smooth"}  # up -> down and c -> e lost a member
    assert why["up:smooth"] == "rewriting down failed (RuntimeError('planted')): the fold was undone"
    assert why["c:smooth"] == "rewriting e failed (RuntimeError('planted')): the fold was undone"
    for key in ("down", "b", "e"):
        assert key not in prepared and m.records[key].reason == "internal error while rewriting: RuntimeError('planted')"
    rms = next(f for f in kept if f.record.key == ":smooth")  # up keeps the RMSNorm group's column scales only
    assert torch.equal(prepared["up"].w, (m.weights["up"].double() * rms.s[None, :]).float())
    assert not prepared["c"].changed and torch.equal(prepared["c"].w, m.weights["c"])


def test_failed_graph_edit_leaves_no_quantized_copies(monkeypatch):
    """A rewrite that fails half way restores Dynamo's graph and unregisters the constants it had
    added, which AOT would otherwise lift as inputs and keep alive with the compiled graph."""
    model = Block().eval()
    x = torch.randn(2, 24, 32)
    gm, ex = dynamo_graph(model, x)
    before = set(dict(gm.named_buffers()))
    real = linear_rewrite._edit_graph

    def half_then_fail(*args, **kw):
        real(*args, **kw)
        raise RuntimeError("planted failure after the edits")

    monkeypatch.setattr(linear_rewrite, "_edit_graph", half_then_fail)
    with torch.no_grad():
        recs = run_linear_pass(gm, ex, normalize_options({"linear": {"quant": "w8a8"}}), ARCHS["cpu"])
    assert len(recs) == 10 and all(r.status == "skipped" and "planted" in r.reason for r in recs)
    assert set(dict(gm.named_buffers())) == before and gm.meta[BAKED_META_KEY] == []
    with torch.no_grad():
        assert torch.equal(gm(*ex)[0], model(x))
