"""Sites that cannot be rewritten safely stay as they were, with the reason in the report."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnopt
from helpers import inspect, randn, rel_l1


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Identity()

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] == k.shape[2])


def _site(report):
    (s,) = [s for s in report.sites if s.kind == "attention"]
    return s


@pytest.mark.parametrize("options, inputs, reason", [
    ({}, (randn(1, 2, 77, 32, dtype=torch.float32),) * 3, "fp32 needs attention.allow_fp32"),
    ({}, (randn(1, 2, 77, 320),) * 3, "head dim 320 > 256"),
    ({"attention": {"min_seq_len": 128}}, (randn(1, 2, 77, 32),) * 3, "min_seq_len"),
    ({}, (randn(1, 2, 1, 32), randn(1, 2, 77, 32), randn(1, 2, 77, 32)), "decode"),
    ({"attention": {"enabled": False}}, (randn(1, 2, 77, 32),) * 3, "enabled is false"),
    ({"attention": {"quant": "none"}}, (randn(1, 2, 77, 32),) * 3, "nothing to change"),
    ({"attention": {"exclude": ["*"]}}, (randn(1, 2, 77, 32),) * 3, "excluded"),
    ({"attention": {"include": ["encoder.*"]}}, (randn(1, 2, 77, 32),) * 3, "not matched by include"),
    ({"arch": "sm80", "attention": {"pv": "fp8"}}, (randn(1, 2, 77, 32),) * 3, "needs sm89+"),
    ({"arch": "sm80", "attention": {"quant": "fp8"}}, (randn(1, 2, 77, 32),) * 3, "needs sm89+"),
])
def test_skipped_with_reason(options, inputs, reason):
    report = inspect(Attn(), *inputs, options=options)
    s = _site(report)
    assert s.status == "skipped" and reason in s.reason, s.reason


def test_fp32_with_opt_in_and_decode_with_opt_in():
    x = randn(1, 2, 77, 32, dtype=torch.float32)
    s = _site(inspect(Attn(), x, x, x, options={"attention": {"allow_fp32": True}}))
    assert s.status == "rewritten" and s.error["rel_l1"] < 0.02
    q, kv = randn(1, 2, 1, 32), randn(1, 2, 77, 32)
    s = _site(inspect(Attn(), q, kv, kv, options={"attention": {"decode": True}}))
    assert s.status == "rewritten"


def test_forced_arch_emulates_that_arch_on_cpu():
    x = randn(1, 2, 200, 64)
    s = _site(inspect(Attn(), x, x, x, options={"arch": "sm90"}))
    assert s.status == "rewritten" and s.details["pv"] == "fp8" and s.kernel.endswith("@sm90")
    assert s.error["rel_l1"] < 0.05


def test_training_graph_with_backward_off_is_left_to_autograd():
    q, k, v = (randn(1, 2, 77, 32).requires_grad_() for _ in range(3))
    be = attnopt.backend({"attention": {"min_seq_len": 0, "backward": "off"}}, inductor_config={"fx_graph_cache": False})
    torch._dynamo.reset()
    with torch._functorch.config.patch(enable_autograd_cache=False):
        out = torch.compile(Attn(), backend=be)(q, k, v)
    out.float().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    Attn()(q, k, v).float().sum().backward()
    for g, t in zip(grads, (q, k, v)):
        assert rel_l1(g, t.grad) < 0.02
    (s,) = be.recorder.sites()
    assert s.status == "skipped" and "training" in s.reason


def test_dynamic_shapes_compile_once():
    be = attnopt.backend({"attention": {"min_seq_len": 0}}, inductor_config={"fx_graph_cache": False})
    torch._dynamo.reset()
    f = torch.compile(Attn(), backend=be, dynamic=True)
    for n in (77, 100, 333):
        x = randn(2, 4, n, 32)
        assert rel_l1(f(x, x, x), Attn()(x, x, x)) < 0.03
    assert be.graphs_compiled == 1
    assert all(s.status == "rewritten" for s in be.recorder.sites())


class Projected(nn.Module):
    """Eval-mode attention block whose weights require grad, as any freshly loaded model's do."""

    def __init__(self, manual: bool, d=32, h=2):
        super().__init__()
        self.qkv, self.h, self.manual = nn.Linear(d * h, 3 * d * h).bfloat16(), h, manual

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, -1).permute(2, 0, 3, 1, 4)
        if self.manual:
            return (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1) @ v
        return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("manual", [False, True])
def test_inference_with_grad_enabled_names_no_grad(manual):
    """Without torch.no_grad() Inductor builds a joint graph: the reason must say so, not guess."""
    model = Projected(manual).eval()
    x = randn(2, 77, 64)
    be = attnopt.backend({"attention": {"min_seq_len": 0, "backward": "off"}}, inductor_config={"fx_graph_cache": False})
    torch._dynamo.reset()
    with torch._functorch.config.patch(enable_autograd_cache=False):
        out = torch.compile(model, backend=be)(x)
    assert rel_l1(out.detach(), model(x).detach()) < 0.02
    (s,) = be.recorder.sites()
    assert s.status == "skipped" and "requires grad" in s.reason and "torch.no_grad()" in s.reason, s.reason
    assert "logsumexp" not in s.reason and "used elsewhere" not in s.reason
    be = attnopt.backend({"attention": {"min_seq_len": 0}}, inductor_config={"fx_graph_cache": False})
    torch._dynamo.reset()
    with torch.no_grad():
        assert rel_l1(torch.compile(model, backend=be)(x), model(x)) < 0.03
    (s,) = be.recorder.sites()
    assert s.status == "rewritten", s.reason
