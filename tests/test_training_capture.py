"""Graphs that need grad: attention sites become `attnopt::attention_train` (attnopt's own backward)
through the capture before AOTAutograd; what must stay as it was does, with its reason."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

import attnopt
from attnopt.passes.attention_rewrite import REQUIRES_GRAD
from helpers import rel_l1

OPTS = {"attention": {"min_seq_len": 0}}


class Attn(torch.nn.Module):
    """qkv projection, SDPA (or the hand-written form), output projection; optional learnable bias
    or additive mask, causal, GQA (kv_heads < heads)."""

    def __init__(self, dim=64, heads=4, kv_heads=4, manual=False, causal=False, learn_bias_len=0):
        super().__init__()
        self.h, self.kvh, self.d = heads, kv_heads, dim // heads
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * self.d)
        self.o = torch.nn.Linear(dim, dim)
        self.manual, self.causal = manual, causal
        self.bias = torch.nn.Parameter(torch.randn(heads, learn_bias_len, learn_bias_len)) if learn_bias_len else None

    def forward(self, x, mask=None):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.h, self.d).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.kvh, self.d).permute(2, 0, 3, 1, 4)
        if self.bias is not None:
            mask = self.bias
        if self.manual:
            s = q @ k.transpose(-1, -2) * self.d ** -0.5
            if mask is not None:
                s = s + mask
            y = s.softmax(-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal,
                                               enable_gqa=self.kvh != self.h)
        return self.o(y.transpose(1, 2).reshape(b, n, -1))


def _grads(model, x, mask=None):
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = model(x, mask)
    g = torch.Generator().manual_seed(123)  # the same upstream gradient in every dtype
    out.backward(torch.randn(out.shape, generator=g).to(out.dtype))
    return out.detach(), x.grad, {n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters()}


def _compiled(model, opts=OPTS, **kw):
    be = attnopt.backend(opts, inductor_config={"fx_graph_cache": False})
    torch._dynamo.reset()
    return torch.compile(model, backend=be, **kw), be


def test_backward_off_keeps_training_sites_with_the_reason():
    model = Attn().bfloat16()
    f, be = _compiled(model, {"attention": {"min_seq_len": 0, "backward": "off"}})
    f(torch.randn(2, 40, 64, dtype=torch.bfloat16)).sum().backward()
    (s,) = be.recorder.sites()
    assert s.status == "skipped" and s.reason == REQUIRES_GRAD


def test_a_learnable_bias_keeps_its_attention_and_gets_its_gradient():
    torch.manual_seed(0)
    model = Attn(learn_bias_len=40).bfloat16()
    x = torch.randn(2, 40, 64, dtype=torch.bfloat16)
    f, be = _compiled(model)
    _, _, got = _grads(f, x)
    _, _, want = _grads(model, x)
    (s,) = be.recorder.sites()
    assert s.status == "skipped" and "learnable bias" in s.reason, s.reason
    assert got["bias"] is not None and rel_l1(got["bias"].float(), want["bias"].float()) < 0.02


def test_a_checkpointed_region_is_left_as_it_was_with_a_note():
    torch.manual_seed(0)
    inner = Attn().bfloat16()

    class Ckpt(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x, mask=None):
            return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=False)

    model = Ckpt()
    x = torch.randn(2, 40, 64, dtype=torch.bfloat16)
    f, be = _compiled(model)
    _, gx, _ = _grads(f, x)
    _, want, _ = _grads(model, x)
    assert rel_l1(gx.float(), want.float()) < 0.02
    assert not [s for s in be.recorder.sites() if s.status == "rewritten"]
    notes = " ".join(str(n) for g in be.recorder.graphs for n in g.get("notes", []))
    assert "checkpoint" in notes, be.recorder.graphs


# ----------------------------------------------------------------------------- rewritten sites


def _float64_grads(model, x, mask=None):
    m64 = copy.deepcopy(model).double()
    return _grads(m64, x.double(), None if mask is None else mask.double())


@pytest.mark.parametrize("backward", ["int8", "exact"])
@pytest.mark.parametrize("form", ["sdpa-causal-gqa", "manual-mask"])
def test_training_sites_are_rewritten_and_their_gradients_track_float64(backward, form):
    torch.manual_seed(0)
    n = 77
    if form == "sdpa-causal-gqa":
        model, mask = Attn(kv_heads=2, causal=True).bfloat16(), None
    else:
        model, mask = Attn(manual=True).bfloat16(), torch.randn(1, 1, n, n, dtype=torch.bfloat16)
    x = torch.randn(2, n, 64, dtype=torch.bfloat16)
    f, be = _compiled(model, {"attention": {"min_seq_len": 0, "backward": backward}}, fullgraph=True)
    out, gx, gp = _grads(f, x, mask)
    out64, gx64, gp64 = _float64_grads(model, x, mask)
    (s,) = be.recorder.sites()
    assert s.status == "rewritten" and s.op == "attnopt::attention_train", s.reason
    assert s.details["backward"] == backward
    tol = 0.05 if backward == "int8" else 0.03
    assert rel_l1(out.double(), out64) < 0.03
    assert rel_l1(gx.double(), gx64) < tol
    for name in ("q.weight", "kv.weight"):
        assert rel_l1(gp[name].double(), gp64[name]) < tol, name


def test_one_training_trace_serves_every_length():
    """Dynamic shapes as in inference: lengths 77 / 200 / 333 compile once (after the first)."""
    torch.manual_seed(0)
    model = Attn(causal=True).bfloat16()
    f, be = _compiled(model, dynamic=True)
    for n in (77, 200, 333):
        x = torch.randn(1, n, 64, dtype=torch.bfloat16)
        _, gx, _ = _grads(f, x)
        assert torch.isfinite(gx).all()
    assert len(be.recorder.graphs) == 1
    assert all(s.status == "rewritten" for s in be.recorder.sites())


def test_inspect_grad_reports_each_sites_backward_and_gradient_error():
    from attnopt.inspection.table import render_table

    torch.manual_seed(0)
    model = Attn(kv_heads=2, causal=True).bfloat16().eval()
    x = torch.randn(1, 77, 64, dtype=torch.bfloat16)
    rep = attnopt.inspect(model, x, options=OPTS, grad=True, timing_runs=0)
    (s,) = [s for s in rep.sites if s.kind == "attention"]
    g = s.error["grad"]
    assert g["backward"] == "int8" and max(g["dq"], g["dk"], g["dv"]) < 0.05 and g["cos_min"] > 0.99, g
    assert "backward int8, dQ" in render_table(rep, width=160)
    rep = attnopt.inspect(model, x, options={"attention": {"min_seq_len": 0, "backward": "off"}}, grad=True,
                          timing_runs=0)
    assert "grad" not in rep.sites[0].error


def test_a_sparse_site_trains_through_the_block_sparse_op():
    """sparsity (vsa here) in a graph that needs grad: attnopt::sparse_attention_train, gradients
    those of attention over the kept blocks (compared with dense float64: the skipped blocks of a
    local causal pattern carry little mass, so they stay close)."""
    torch.manual_seed(0)
    n = 512
    model = Attn(causal=True).bfloat16()
    x = torch.randn(1, n, 64, dtype=torch.bfloat16)
    opts = {"attention": {"min_seq_len": 0, "sparsity": {"method": "vsa", "topk": 1.0}}}
    f, be = _compiled(model, opts, fullgraph=True)
    out, gx, _ = _grads(f, x)
    out64, gx64, _ = _float64_grads(model, x)
    (s,) = be.recorder.sites()
    assert s.status == "rewritten" and s.op == "attnopt::sparse_attention_train", s.reason
    assert s.details["backward"] == "exact" and s.details["sparse_method"] == "vsa"
    assert rel_l1(out.double(), out64) < 0.03 and rel_l1(gx.double(), gx64) < 0.03


def test_a_sparse_site_with_a_padding_mask_trains_dense_with_a_note():
    torch.manual_seed(0)
    model = Attn(manual=True).bfloat16()
    n = 256
    mask = torch.zeros(1, 1, n, n, dtype=torch.bfloat16)
    mask[..., -7:] = float("-inf")
    opts = {"attention": {"min_seq_len": 0, "sparsity": {"method": "sparge"}}}
    f, be = _compiled(model, opts)
    _grads(f, torch.randn(1, n, 64, dtype=torch.bfloat16), mask)
    (s,) = be.recorder.sites()
    assert s.status == "rewritten" and s.op == "attnopt::attention_train"
    assert "dense in this graph that needs grad" in s.reason, s.reason


@pytest.mark.parametrize("sparse", [False, True])
def test_training_bodies_traced_into_the_joint_graph_as_on_cuda(sparse):
    """Inline mode 'always' (what CUDA takes): AOTAutograd traces the training ops' forward and
    backward bodies into the joint graph instead of keeping the calls; gradients unchanged."""
    torch.manual_seed(0)
    model = Attn(causal=True).bfloat16()
    x = torch.randn(1, 256, 64, dtype=torch.bfloat16)
    att = {"min_seq_len": 0, "backward": "exact"}
    if sparse:
        att["sparsity"] = {"method": "vsa", "topk": 0.5}
    grads = {}
    for inline in ("never", "always"):
        be = attnopt.backend({"attention": att}, inductor_config={"fx_graph_cache": False})
        be.ctx.inline = inline
        torch._dynamo.reset()
        seen = []
        from torch._inductor import config as inductor_config

        def spy(graph):
            seen.extend(str(n.target) for n in graph.nodes if n.op == "call_function")

        with inductor_config.patch(post_grad_custom_pre_pass=spy):
            _, grads[inline], _ = _grads(torch.compile(model, backend=be), x)
        calls = [t for t in seen if t.startswith("attnopt.")]
        if inline == "always":
            assert not calls, calls  # every attnopt op traced into its body
        else:
            assert any("backward" in t for t in calls), calls
    assert rel_l1(grads["always"].float(), grads["never"].float()) < 0.01


def test_inspect_grad_reports_training_linears_too():
    from attnopt.inspection.table import render_table

    torch.manual_seed(0)
    model = Attn().bfloat16().eval()
    x = torch.randn(1, 77, 64, dtype=torch.bfloat16)
    rep = attnopt.inspect(model, x, options={"attention": {"min_seq_len": 0}, "linear": {"training": "int8"}},
                          grad=True, timing_runs=0)
    lin = {s.module: s.error["grad"] for s in rep.sites if s.kind == "linear"}
    assert set(lin) == {"q", "kv", "o"}, [(s.key, s.reason) for s in rep.sites]
    for g in lin.values():
        assert g["training"] == "int8" and max(g["y"], g["dx"], g["dw"]) < 0.03 and g["cos_min"] > 0.99, g
    assert "training int8, Y" in render_table(rep, width=160)


def test_a_no_grad_region_stays_without_gradient():
    """Regression: the capture trace records no grad-mode switches, so a value computed under
    torch.no_grad() was differentiated once a site was rewritten (HF's rotary embedding runs
    under no_grad too)."""

    class Gated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(64))

        def forward(self, x, mask=None):
            b, n, _ = x.shape
            with torch.no_grad():
                g = self.w.sigmoid()
            q = x.view(b, n, 4, 16).transpose(1, 2)
            y = F.scaled_dot_product_attention(q, q, q)
            return y.transpose(1, 2).reshape(b, n, -1) * g

    torch.manual_seed(0)
    model = Gated().bfloat16()
    x = torch.randn(1, 77, 64, dtype=torch.bfloat16)
    f, be = _compiled(model)
    _, gx, gp = _grads(f, x)
    assert [s.status for s in be.recorder.sites()] == ["rewritten"]
    assert gp["w"] is None or not gp["w"].any()
    _, want, _ = _grads(model, x)
    assert rel_l1(gx.float(), want.float()) < 0.05
