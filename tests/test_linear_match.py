"""linear_match: which calls of Dynamo's graph are linears, their weights as [N, K], and the
per-site decisions (include / exclude, formats, why a site is left alone)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from attnopt.codegen.arch import ARCHS
from attnopt.config import normalize_options
from attnopt.passes.linear_match import find_linears, find_parameters, match_linears, weight_nk

from helpers import dynamo_graph


class Forms(nn.Module):
    """Every written form of a linear, on W [out, in] and W [in, out]."""

    def __init__(self, k=24, n=16):
        super().__init__()
        self.lin = nn.Linear(k, n)
        self.w_nk = nn.Parameter(torch.randn(n, k))
        self.w_kn = nn.Parameter(torch.randn(k, n))
        self.b = nn.Parameter(torch.randn(n))

    def forward(self, x2, x3):
        return (self.lin(x3), F.linear(x3, self.w_nk, self.b), torch.addmm(self.b, x2, self.w_kn),
                torch.addmm(self.b, x2, self.w_nk.t()), torch.mm(x2, self.w_kn), torch.mm(x2, self.w_nk.T),
                x3 @ self.w_nk.mT, torch.matmul(x3, self.w_nk.permute(1, 0)), x3 @ self.w_nk.transpose(0, 1),
                x3 @ self.w_kn)


def test_every_form_is_a_linear_with_its_weight_as_nk():
    """Each site, computed as F.linear(x, weight_nk(W), b) in float64, gives the model's output."""
    model = Forms().double()
    inputs = (torch.randn(5, 24, dtype=torch.float64), torch.randn(2, 3, 24, dtype=torch.float64))
    gm, ex = dynamo_graph(model, *inputs)
    params, index = find_parameters(gm, ex)
    sites = find_linears(gm, params)
    assert [(s.key, s.pattern) for s in sites] == [
        ("lin", "linear"), ("", "linear"), ("#1", "addmm (Conv1D)"), ("#2", "addmm (x, W^T)"), ("#3", "mm (x, W)"),
        ("#4", "mm (x, W^T)"), ("#5", "matmul (x, W^T)"), ("#6", "matmul (x, W^T)"), ("#7", "matmul (x, W^T)"),
        ("#8", "matmul (x, W)")]
    with torch.no_grad():
        outs = model(*inputs)
        for s, out in zip(sites, outs):
            w = weight_nk(s, params[s.weight])
            assert w.shape == (16, 24)
            b = params[s.bias] if s.bias is not None else None
            torch.testing.assert_close(F.linear(ex[index[s.x]], w, b), out, rtol=1e-12, atol=1e-12)


class NotLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.w3 = nn.Parameter(torch.randn(2, 8, 8))
        self.register_buffer("buf", torch.randn(8, 8))
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x, y):
        return (x @ y, x @ self.w3, x @ self.buf, torch.addmm(x[0], x, self.w, beta=0.5), self.w @ self.w,
                torch.mm(self.w, x.t()))


def test_products_without_a_2d_parameter_weight_are_not_linears():
    """Two activations, a 3-D parameter, a buffer, addmm's beta, a parameter times a parameter, and
    the parameter as the first operand."""
    gm, ex = dynamo_graph(NotLinears(), torch.randn(5, 8), torch.randn(8, 8))
    params, _ = find_parameters(gm, ex)
    assert find_linears(gm, params) == []


class Blocks(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(d, d), "up": nn.Linear(d, d)}) for _ in range(2))
        self.lm_head = nn.Linear(d, 8)

    def forward(self, x):
        for b in self.blocks:
            x = b["up"](b["q"](x))
        return self.lm_head(x)


def _decisions(model, x, opts, arch="cpu", grad=False):
    gm, ex = dynamo_graph(model, x)
    with torch.set_grad_enabled(grad):
        m = match_linears(gm, ex, normalize_options(opts), ARCHS[arch])
    return {k: (m.formats[k], m.records[k].reason) for k in m.records}, m


def test_include_exclude_and_plan_formats():
    model = Blocks().eval()
    x = torch.randn(2, 5, 32)
    plan = {"schema_version": 1, "sites": {"blocks.1.q": {"kind": "linear", "quant": "w4a16"}}}
    got, m = _decisions(model, x, {"linear": {"quant": "w8a8", "include": ["blocks.*"], "exclude": ["*.up"]},
                                   "plan": plan})
    assert got == {
        "blocks.0.q": ("w8a8", None),
        "blocks.0.up": (None, "module 'blocks.0.up' excluded by '*.up'"),
        "blocks.1.q": ("w4a16", None),
        "blocks.1.up": (None, "module 'blocks.1.up' excluded by '*.up'"),
        "lm_head": (None, "module 'lm_head' not matched by include ['blocks.*']"),
    }
    for s in m.sites:
        assert torch.equal(m.weights[s.key], model.get_submodule(s.key).weight)
        assert m.records[s.key].shapes == {"x": [2, 5, 32], "w": list(m.params[s.weight].shape)}
        assert m.records[s.key].status == "skipped"  # until the rewrite says otherwise


def test_reasons_a_site_is_left_alone():
    model = Blocks().eval()
    x = torch.randn(2, 5, 32)
    got, _ = _decisions(model, x, {"linear": {"quant": "fp8"}}, arch="sm80")
    assert got["blocks.0.q"] == (None, "linear format 'fp8' needs sm89+ (target is sm80)")
    assert got["lm_head"] == (None, "module 'lm_head' excluded by 'lm_head'")
    got, _ = _decisions(model, x, {"linear": {"quant": "w8a8"}}, grad=True)
    assert got["blocks.0.q"][0] is None and "weights require grad" in got["blocks.0.q"][1]
    got, _ = _decisions(Blocks().eval().double(), x.double(), {"linear": {"quant": "w8a8"}})
    assert got["blocks.0.q"] == (None, "weight dtype torch.float64 (fp16 / bf16 / fp32 quantize)")
    got, _ = _decisions(model, x, {"linear": {"quant": "none"}})
    assert got["blocks.0.q"] == (None, "linear.quant is 'none'")
    got, _ = _decisions(model, x, {"linear": {"quant": "none", "smooth": {"alpha": 0.5}}})
    assert got["blocks.0.q"] == ("none", None)  # rewritten only if a smoothing group folds into it
