"""Quantized linears: reference numerics, Triton kernels (interpreter), smoothing folded exactly,
real model code, mixed precision."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnopt
from attnopt.codegen.linear.w4a16 import linear_w4a16_triton
from attnopt.codegen.linear.w8a8 import linear_8bit_triton
from attnopt.ops import linear_ref as L

from helpers import rel_l1

transformers = pytest.importorskip("transformers")


def exact(x, w, b=None):
    return x.double() @ w.double().T + (b.double() if b is not None else 0)


# ------------------------------------------------------------------------------ numerics

@pytest.mark.parametrize("fmt,bound", [("int8", 0.01), ("fp8", 0.03)])
@pytest.mark.parametrize("m", [1, 7, 77, 200])
def test_8bit_reference_and_kernel(fmt, bound, m):
    x = torch.randn(m, 200).bfloat16()
    w = torch.randn(96, 200) * 0.05
    b = torch.randn(96).bfloat16()
    wq, ws = L.quantize_weight(w, fmt)
    ref = L.linear_w8a8_ref(x, wq, ws, b, fmt)
    assert rel_l1(ref, exact(x, w, b)) <= bound
    out = linear_8bit_triton(x, wq, ws, b, fmt, "cpu")
    assert out.dtype == x.dtype and out.shape == (m, 96)
    assert rel_l1(out, ref) <= 2e-3


def test_weight_quantization_grid():
    w = torch.randn(64, 300)
    wq, ws = L.quantize_weight(w, "int8")
    assert wq.dtype == torch.int8 and wq.is_contiguous() and ws.shape == (64,)
    assert ((wq.float() * ws[:, None] - w).abs() <= ws[:, None] / 2 + 1e-6).all()
    pk, sc, zr = L.quantize_weight_int4(w)
    assert pk.shape == (64, 384 // 2) and sc.shape == (64, 3)
    q = L.unpack_int4(pk)
    assert q.max() <= 15 and ((zr >= 0) & (zr <= 15)).all()
    deq = L.dequantize_int4(pk, sc, zr, 300)
    step = sc.repeat_interleave(128, dim=1)[:, :300]
    assert ((deq - w).abs() <= step / 2 + 1e-5).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 33])
def test_w4a16_reference_and_kernel(dtype, m):
    x = torch.randn(m, 333).to(dtype)
    w = torch.randn(80, 333) * 0.05
    pk, sc, zr = L.quantize_weight_int4(w)
    ref = L.linear_w4a16_ref(x, pk, sc, zr, None)
    assert rel_l1(ref, exact(x, w)) <= 0.12  # 4-bit weights on random normal data: step ~ sigma / 3
    out = linear_w4a16_triton(x, pk, sc, zr, None)
    assert out.dtype == dtype and rel_l1(out, ref) <= 2e-3


def test_bf16_activations_beyond_fp16_range():
    x = (torch.randn(4, 128) * 1e5).bfloat16()  # would overflow fp16
    w = torch.randn(32, 128) * 0.05
    pk, sc, zr = L.quantize_weight_int4(w)
    out = linear_w4a16_triton(x, pk, sc, zr, None)
    assert torch.isfinite(out).all() and rel_l1(out, exact(x, w)) < 0.15


# ------------------------------------------------------------------------------ smoothing

class Norms(nn.Module):
    """LayerNorm -> q/k/v, hand-written RMSNorm -> SwiGLU (gate/up -> down)."""

    def __init__(self, d=64, f=96):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.rms_w = nn.Parameter(torch.rand(d) + 0.5)
        self.gate, self.up, self.down = nn.Linear(d, f, bias=False), nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x):
        h = self.ln(x)
        a = self.q(h) + self.k(h) * self.v(h)
        xf = a.to(torch.float64 if a.dtype == torch.float64 else torch.float32)  # HF upcasts 16-bit
        r = self.rms_w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(a.dtype)
        return self.down(F.silu(self.gate(r)) * self.up(r))


def _stats_plan(model, d=64, f=96):
    g = torch.Generator().manual_seed(1)
    sites = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            sites[name] = {"kind": "linear", "act_absmax": (torch.rand(m.in_features, generator=g) * 5 + 0.1).tolist()}
    return {"schema_version": 1, "sites": sites}


def test_smoothing_folds_exactly_in_fp64():
    model = Norms().double().eval()
    x = torch.randn(3, 17, 64, dtype=torch.float64)
    opts = {"linear": {"quant": "none", "smooth": {"alpha": 0.5}}, "plan": _stats_plan(model)}
    report = attnopt.inspect(model, x, options=opts)
    norms = [s for s in report.sites if s.kind == "norm"]
    assert {s.module for s in norms if s.status == "rewritten"} == {"ln", "", "up"}, [(s.key, s.reason) for s in norms]
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=attnopt.backend(opts))(x)
        ref = model(x)
    assert (out - ref).abs().max() <= 1e-9 * ref.abs().max()
    assert report.summary["e2e"]["rel_l1"] <= 1e-9


def test_smoothing_needs_every_consumer_smoothed():
    model = Norms().double().eval()
    opts = {"linear": {"quant": "none", "smooth": {"alpha": 0.5}, "exclude": ["k"]}, "plan": _stats_plan(model)}
    report = attnopt.inspect(model, torch.randn(2, 5, 64, dtype=torch.float64), options=opts)
    ln = next(s for s in report.sites if s.kind == "norm" and s.module == "ln")
    assert ln.status == "skipped" and "consumer" in ln.reason


class Outliers(nn.Module):
    """LayerNorm whose gain plants a few huge activation channels (what LLMs have)."""

    def __init__(self, d=128):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        with torch.no_grad():
            self.ln.weight[:4] = 40.0
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        h = self.ln(x)
        return self.q(h) + self.k(h)


def test_smoothing_lowers_w8a8_error_with_activation_outliers():
    model = Outliers().eval().to(torch.bfloat16)
    batches = [(torch.randn(4, 64, 128, dtype=torch.bfloat16),) for _ in range(2)]
    x = torch.randn(4, 64, 128, dtype=torch.bfloat16)
    plan = attnopt.calibrate(model, batches, options={"linear": {"smooth": {"alpha": 0.8}}})
    plain = attnopt.inspect(model, x, options={"linear": {"quant": "w8a8"}})
    smooth = attnopt.inspect(model, x, options={"linear": {"quant": "w8a8", "smooth": {"alpha": 0.8}},
                                                "plan": plan.to_dict()})
    assert all(s.status == "rewritten" for s in smooth.sites)
    e_plain, e_smooth = plain.summary["e2e"]["rel_l1"], smooth.summary["e2e"]["rel_l1"]
    assert e_smooth < 0.75 * e_plain, (e_smooth, e_plain)


# ------------------------------------------------------------------------------ real models

def _llama():
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    return transformers.LlamaForCausalLM(cfg).eval().to(torch.bfloat16)


def test_w8a8_llama_all_linears_but_lm_head():
    report = attnopt.inspect(_llama(), torch.randint(0, 128, (2, 77)), options={"linear": {"quant": "w8a8"}})
    lin = {s.module: s for s in report.sites if s.kind == "linear"}
    assert lin["lm_head"].status == "skipped" and "excluded" in lin["lm_head"].reason
    rewritten = [s for s in lin.values() if s.status == "rewritten"]
    assert len(rewritten) == 14
    for s in rewritten:
        assert s.details["weight_bytes_after"] < 0.6 * s.details["weight_bytes_before"]
        assert s.error["rel_l1"] < 0.02
    assert report.summary["e2e"]["rel_l1"] <= 0.05


def test_gpt2_conv1d_linears_are_captured():
    cfg = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=100, n_positions=128)
    model = transformers.GPT2LMHeadModel(cfg).eval().to(torch.bfloat16)
    report = attnopt.inspect(model, torch.randint(0, 100, (2, 40)), options={"linear": {"quant": "w8a8"}})
    conv = [s for s in report.sites if s.kind == "linear" and s.pattern.startswith("addmm")]
    assert len(conv) == 4 and all(s.status == "rewritten" for s in conv)
    assert report.summary["e2e"]["rel_l1"] <= 0.05


def test_include_exclude_and_formats_by_arch():
    model = _llama()
    ids = torch.randint(0, 128, (1, 40))
    r = attnopt.inspect(model, ids, options={"linear": {"quant": "w8a8", "include": ["*.mlp.*"]}})
    done = {s.module for s in r.sites if s.kind == "linear" and s.status == "rewritten"}
    assert done and all(".mlp." in m for m in done)
    r = attnopt.inspect(model, ids, options={"linear": {"quant": "fp8"}, "arch": "sm80"})
    assert all("sm89+" in s.reason for s in r.sites if s.kind == "linear" and s.module != "lm_head")


def test_mixed_precision_plan_picks_formats_under_budget():
    model = _llama()
    ids = torch.randint(0, 128, (2, 64))
    plan = attnopt.calibrate(model, [(ids,)], options={"arch": "sm90"}, mixed_precision=True,
                             budget={"linear_rel_l1": 0.05})
    chosen = {k: v["quant"] for k, v in plan.sites.items() if v["kind"] == "linear"}
    assert chosen and set(chosen.values()) <= {"none", "fp8", "w8a8", "w4a16"}
    for k, v in plan.sites.items():
        if v["quant"] != "none":
            assert v["error"]["rel_l1"][v["quant"]] <= 0.05 * 0.8
    report = attnopt.inspect(model, ids, options={"arch": "sm90", "plan": plan.to_dict()})
    for s in report.sites:
        if s.kind == "linear" and s.module in chosen and chosen[s.module] != "none":
            assert s.status == "rewritten" and s.details["format"] == chosen[s.module]


def test_training_leaves_linears_alone():
    model = _llama().float()
    be = attnopt.backend({"linear": {"quant": "w8a8"}}, inductor_config={"fx_graph_cache": False})
    torch._dynamo.reset()
    with torch._functorch.config.patch(enable_autograd_cache=False):
        torch.compile(model, backend=be)(torch.randint(0, 128, (1, 16))).logits.sum().backward()
    lin = [s for s in be.recorder.sites() if s.kind == "linear"]
    assert lin and all(s.status == "skipped" for s in lin)
    assert any("require grad" in (s.reason or "") for s in lin)
