"""smooth_match: which producers (norms, up projections, v_proj through the attention) feed only
linears, so that a SmoothQuant scale can be folded into them."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from attnopt.passes.linear_match import find_linears, find_parameters
from attnopt.passes.smooth_match import smooth_groups

from helpers import dynamo_graph


class Block(nn.Module):
    """LayerNorm -> q, k; a LayerNorm also read by the residual; hand-written RMSNorm -> SwiGLU;
    a ReLU chain (foldable) and a GELU chain (not: gelu(x / s) != gelu(x) / s)."""

    def __init__(self, d=32, f=48):
        super().__init__()
        self.ln, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.p = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.rms_w = nn.Parameter(torch.rand(d) + 0.5)
        self.gate, self.up, self.down = nn.Linear(d, f, bias=False), nn.Linear(d, f), nn.Linear(f, d)
        self.a, self.b, self.c, self.e = nn.Linear(d, f), nn.Linear(f, d), nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x):
        h = self.ln(x)
        x = x + self.q(h) * self.k(h)
        h2 = self.ln2(x)
        x = h2 + self.p(h2)
        r = self.rms_w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        x = x + self.down(F.silu(self.gate(r)) * self.up(r))
        return self.b(F.gelu(self.a(x))) + self.e(torch.relu(self.c(x)))


def _groups(model, *inputs):
    gm, ex = dynamo_graph(model, *inputs)
    params, _ = find_parameters(gm, ex)
    sites = find_linears(gm, params)
    return smooth_groups(sites, params)


def test_norms_and_up_projections_that_feed_only_linears():
    groups = _groups(Block(), torch.randn(2, 7, 32))
    got = {(g.kind, g.module, tuple(c.key for c in g.consumers), g.skip_reason) for g in groups}
    assert got == {("layernorm", "ln", ("q", "k"), None), ("rmsnorm", "", ("gate", "up"), None),
                   ("linear", "up", ("down",), None), ("linear", "c", ("e",), None)}


class Attention(nn.Module):
    """GQA attention: v_proj -> head split -> SDPA (enable_gqa) -> head merge -> o_proj; with a
    cache, V is concatenated with past values first."""

    def __init__(self, d=32, hq=4, hkv=2):
        super().__init__()
        self.hq, self.hkv, self.dh = hq, hkv, d // hq
        self.q, self.o = nn.Linear(d, d), nn.Linear(d, d)
        self.k, self.v = nn.Linear(d, hkv * self.dh), nn.Linear(d, hkv * self.dh)

    def forward(self, x, cache=None):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.hq, self.dh).transpose(1, 2)
        k = self.k(x).view(b, n, self.hkv, self.dh).transpose(1, 2)
        v = self.v(x).view(b, n, self.hkv, self.dh).transpose(1, 2)
        if cache is not None:
            k, v = torch.cat([cache, k], dim=2), torch.cat([cache, v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


def test_v_proj_to_o_proj_through_gqa_attention_maps_every_o_channel_to_its_v_channel():
    model = Attention()
    (g,) = _groups(model, torch.randn(2, 9, 32))
    assert (g.kind, g.module, [c.key for c in g.consumers], g.skip_reason) == ("attention-v", "v", ["o"], None)
    rep = model.hq // model.hkv  # query head h reads kv head h // rep
    expected = torch.arange(model.hkv * model.dh).view(model.hkv, model.dh).repeat_interleave(rep, 0).flatten()
    assert torch.equal(g.channel_map, expected)


def test_v_into_a_kv_cache_is_a_skipped_candidate():
    (g,) = _groups(Attention(), torch.randn(2, 9, 32), torch.randn(2, 2, 3, 8))
    assert g.kind == "attention-v" and g.consumers == [] and "KV cache" in g.skip_reason, g.skip_reason
