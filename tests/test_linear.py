"""Quantized linears: reference numerics, Triton kernels (interpreter), smoothing folded exactly,
real model code, mixed precision."""

import copy
import fnmatch

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

import attnopt
from attnopt.codegen.linear.w4a16 import linear_w4a16_triton
from attnopt.codegen.linear.w8a8 import linear_8bit_triton
from attnopt.ops import linear_ref as L

from helpers import rel_l1

transformers = pytest.importorskip("transformers")


def exact(x, w, b=None):
    return x.double() @ w.double().T + (b.double() if b is not None else 0)


def exact_model(model, *xs):
    """The model in float64 (a copy): what quantized outputs are measured against."""
    with torch.no_grad():
        return copy.deepcopy(model).double()(*(x.double() for x in xs))


def _compiled(model, opts, *args):
    torch._dynamo.reset()
    be = attnopt.backend(opts)
    with torch.no_grad():
        out = torch.compile(model, backend=be)(*args)
    return out, be.recorder.sites()


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
    assert rel_l1(out, ref) <= 1e-5  # same arithmetic; fp32 summation order only


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_weight_only_path_covers_every_row_when_min_m_is_raised(fmt):
    """linear.min_m above 16 sends up to min_m - 1 rows down the weight-only path: all written."""
    x = torch.randn(40, 200).bfloat16()
    w = torch.randn(96, 200) * 0.05
    wq, ws = L.quantize_weight(w, fmt)
    ref = L.linear_w8a8_ref(x, wq, ws, None, fmt, 64)
    out = linear_8bit_triton(x, wq, ws, None, fmt, "cpu", small_m=64)
    assert rel_l1(out, ref) <= 1e-5 and rel_l1(out[16:], ref[16:]) <= 1e-5


@pytest.mark.parametrize("k", [40, 8200])
def test_activation_quantization_one_block_and_several(k):
    """Rows up to 8192 wide are read once; longer ones in blocks (max first, then quantized)."""
    x = torch.randn(20, k).bfloat16() * torch.linspace(0.1, 4, k).bfloat16()
    w = torch.randn(8, k) * 0.05
    for fmt in ("int8", "fp8"):
        wq, ws = L.quantize_weight(w, fmt)
        out = linear_8bit_triton(x, wq, ws, None, fmt, "cpu")
        assert rel_l1(out, L.linear_w8a8_ref(x, wq, ws, None, fmt)) <= 1e-5


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
    assert out.dtype == dtype and rel_l1(out, ref) <= 1e-5


@pytest.mark.parametrize("m", [3, 40])
def test_w4a16_kernel_with_bias(m):
    """M <= 16 splits K (fp32 partials added up by each tile's last split, bias included); larger M
    adds the bias in the kernel."""
    x = torch.randn(m, 1024).bfloat16()
    w, b = torch.randn(72, 1024) * 0.05, torch.randn(72).bfloat16()
    pk, sc, zr = L.quantize_weight_int4(w)
    out = linear_w4a16_triton(x, pk, sc, zr, b)
    assert rel_l1(out, L.linear_w4a16_ref(x, pk, sc, zr, b)) <= 1e-5
    assert rel_l1(out, exact(x, w, b)) <= 0.12


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


class ModuleNorms(nn.Module):
    """nn.RMSNorm -> q/k (Dynamo records torch.rms_norm), F.rms_norm -> up."""

    def __init__(self, d=64):
        super().__init__()
        self.rms = nn.RMSNorm(d, eps=1e-6)
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)
        self.w = nn.Parameter(torch.rand(d) + 0.5)
        self.up = nn.Linear(d, d)

    def forward(self, x):
        h = self.rms(x)
        a = self.q(h) * self.k(h)
        return self.up(F.rms_norm(a, (a.shape[-1],), self.w, 1e-6))


def test_module_rmsnorm_and_functional_rmsnorm_fold_exactly_in_fp64():
    model = ModuleNorms().double().eval()
    with torch.no_grad():
        model.rms.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 13, 64, dtype=torch.float64)
    opts = {"linear": {"quant": "none", "smooth": {"alpha": 0.5}}, "plan": _stats_plan(model)}
    out, sites = _compiled(model, opts, x)
    norms = {s.module: s for s in sites if s.kind == "norm"}
    assert {m for m, s in norms.items() if s.status == "rewritten"} == {"rms", ""}, norms
    with torch.no_grad():
        assert rel_l1(out, model(x)) <= 1e-9


def test_relu_chain_and_addmm_forms_fold_exactly_in_fp64():
    """LayerNorm -> a (nn.Linear) -> ReLU -> b and b's input reaching an addmm through view(-1, C):
    relu(x / s) = relu(x) / s, so both groups fold exactly."""
    model = ReluChain().double().eval()
    x = torch.randn(2, 19, 64, dtype=torch.float64)
    plan = _stats_plan(model)
    plan["sites"][""] = plan["sites"].pop("b")  # the addmm is called from the top module
    opts = {"linear": {"quant": "none", "smooth": {"alpha": 0.5}}, "plan": plan}
    out, sites = _compiled(model, opts, x)
    norms = {s.module: s for s in sites if s.kind == "norm"}
    assert norms["ln"].status == "rewritten" and norms["a"].status == "rewritten", norms
    with torch.no_grad():
        assert rel_l1(out, model(x)) <= 1e-9


class ReluChain(nn.Module):
    def __init__(self, d=64, f=80):
        super().__init__()
        self.ln, self.a, self.b = nn.LayerNorm(d), nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x):
        h = torch.relu(self.a(self.ln(x)))
        return torch.addmm(self.b.bias, h.view(-1, h.shape[-1]), self.b.weight.t()).view(x.shape)


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

def _llama(layers=2):
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
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
    before = sum(s.details["weight_bytes_before"] for s in rewritten)
    after = sum(s.details["weight_bytes_after"] for s in rewritten)
    line = next(x for x in str(report).splitlines() if x.startswith("linear weights rewritten:"))
    assert "(14 sites, " in line and f"{after / before:.2f}x" in line, line


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
    assert chosen and set(chosen.values()) <= {"none", "fp8", "w8a8", "w4a16", "w4a8"}
    for k, v in plan.sites.items():
        if v["quant"] != "none":
            assert v["error"]["rel_l1"][v["quant"]] <= 0.05 * 0.8
    report = attnopt.inspect(model, ids, options={"arch": "sm90", "plan": plan.to_dict()})
    for s in report.sites:
        if s.kind == "linear" and s.module in chosen and chosen[s.module] != "none":
            assert s.status == "rewritten" and s.details["format"] == chosen[s.module]


def test_training_leaves_linears_alone():
    model = _llama(layers=1).float()  # forward and backward compiled: one layer shows every linear kind
    be = attnopt.backend({"linear": {"quant": "w8a8"}}, inductor_config={"fx_graph_cache": False})
    torch._dynamo.reset()
    with torch._functorch.config.patch(enable_autograd_cache=False):
        torch.compile(model, backend=be)(torch.randint(0, 128, (1, 16))).logits.sum().backward()
    lin = [s for s in be.recorder.sites() if s.kind == "linear"]
    assert lin and all(s.status == "skipped" for s in lin)
    assert any("require grad" in (s.reason or "") for s in lin)


def _tiny_llama(impl="sdpa", use_cache=False):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, attn_implementation=impl, use_cache=use_cache)
    return transformers.LlamaModel(cfg).eval().double()


@pytest.mark.parametrize("impl,use_cache", [("eager", False), ("sdpa", False), ("sdpa", True)])
def test_llama_smoothing_groups_fold_exactly(impl, use_cache):
    """Every smoothing group of a real Llama folds exactly in fp64: norm -> q/k/v, norm -> gate/up,
    up -> down and, through the GQA attention, v_proj -> o_proj. With a KV cache V also leaves the
    graph (the cache would hold V / s): that group is skipped, and the cache is unchanged.
    Compared with a compile without smoothing (the fp32 rotary differs from eager by ~5e-8)."""
    model = _tiny_llama(impl, use_cache)
    plan = _stats_plan(model)
    ids = torch.randint(0, 100, (2, 20))
    out, sites = _compiled(model, {"linear": {"quant": "none", "smooth": {"alpha": 0.5}}, "plan": plan}, ids)
    base, _ = _compiled(model, {"linear": {"quant": "none", "smooth": None}, "plan": plan}, ids)
    groups = {s.module: s for s in sites if s.kind == "norm"}
    done = {k for k, s in groups.items() if s.status == "rewritten"}
    assert {"layers.0.input_layernorm", "layers.0.post_attention_layernorm", "layers.0.mlp.up_proj"} <= done, groups
    v = groups["layers.0.self_attn.v_proj"]
    if use_cache:
        assert v.status == "skipped" and "cache" in v.reason, v
        assert rel_l1(out.past_key_values.layers[0].values, base.past_key_values.layers[0].values) <= 1e-9
    else:
        assert v.status == "rewritten" and v.pattern.startswith("attention-v"), v
    assert rel_l1(out.last_hidden_state, base.last_hidden_state) <= 1e-9
    with torch.no_grad():
        assert rel_l1(out.last_hidden_state, model(ids).last_hidden_state) <= 1e-6


@pytest.mark.parametrize("producer", ["*.up_proj", "*.v_proj"])
def test_smoothing_skipped_when_producer_linear_is_not_rewritten(producer):
    """A linear -> linear group needs the producer's rows divided by s: with the producer excluded
    the group is skipped (its consumer keeps its weights), never half folded."""
    model = _tiny_llama()
    ids = torch.randint(0, 100, (2, 16))
    opts = {"linear": {"quant": "none", "smooth": {"alpha": 0.5}, "exclude": [producer]}, "plan": _stats_plan(model)}
    out, sites = _compiled(model, opts, ids)
    with torch.no_grad():
        assert rel_l1(out.last_hidden_state, model(ids).last_hidden_state) <= 1e-6
    group = next(s for s in sites if s.kind == "norm" and fnmatch.fnmatch(s.module, producer))
    assert group.status == "skipped" and "producer" in group.reason, group


def test_failed_member_undoes_its_group(monkeypatch):
    """All or nothing: when quantizing a group's consumer fails, the scales are not folded into
    its producer either, and every other group still folds."""
    model = Norms().eval()
    x = torch.randn(2, 24, 64)
    real = L.quantize_weight

    def failing(w, fmt):
        if w.shape == (64, 96):  # down
            raise RuntimeError("planted failure")
        return real(w, fmt)

    monkeypatch.setattr(L, "quantize_weight", failing)
    opts = {"linear": {"quant": "w8a8", "smooth": {"alpha": 0.5}}, "plan": _stats_plan(model)}
    out, sites = _compiled(model, opts, x)
    assert rel_l1(out, exact_model(model, x)) <= 0.03
    by = {s.key: s for s in sites}
    assert by["down"].status == "skipped" and "planted" in by["down"].reason
    assert by["up:smooth"].status == "skipped" and "fold was undone" in by["up:smooth"].reason
    assert by["ln:smooth"].status == "rewritten" and by[":smooth"].status == "rewritten"


class MatmulForms(nn.Module):
    """Linears written as mm / addmm / matmul on raw parameters, both weight orientations."""

    def __init__(self, k=40, n=24):
        super().__init__()
        self.w_nk = nn.Parameter(torch.randn(n, k) / k ** 0.5)  # [out, in]
        self.w_kn = nn.Parameter(torch.randn(k, n) / k ** 0.5)  # [in, out]
        self.b = nn.Parameter(torch.randn(n))

    def forward(self, x2, x3):
        a = torch.mm(x2, self.w_nk.t())
        b = torch.mm(x2, self.w_kn)
        c = torch.addmm(self.b, x2, self.w_nk.T)
        d = x3 @ self.w_nk.transpose(0, 1)
        e = torch.matmul(x3, self.w_kn)
        return torch.cat([a, b, c], 1), d + e


def test_mm_addmm_matmul_forms_are_captured():
    model = MatmulForms().eval()
    x2, x3 = torch.randn(37, 40), torch.randn(3, 29, 40)
    report = attnopt.inspect(model, x2, x3, options={"linear": {"quant": "w8a8"}})
    lin = [s for s in report.sites if s.kind == "linear"]
    assert sorted(s.pattern for s in lin) == ["addmm (x, W^T)", "matmul (x, W)", "matmul (x, W^T)",
                                              "mm (x, W)", "mm (x, W^T)"]
    assert all(s.status == "rewritten" and s.error["rel_l1"] < 0.02 for s in lin), lin
    out, _ = _compiled(model, {"linear": {"quant": "w8a8"}}, x2, x3)
    ref = exact_model(model, x2, x3)
    assert rel_l1(out[0], ref[0]) <= 0.02 and rel_l1(out[1], ref[1]) <= 0.02
    assert out[0].shape == (37, 72) and out[1].shape == (3, 29, 24)


def _conv1d_stats_plan(model):
    g = torch.Generator().manual_seed(2)
    sites = {name: {"kind": "linear", "act_absmax": (torch.rand(m.weight.shape[0], generator=g) * 5 + 0.1).tolist()}
             for name, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    return {"schema_version": 1, "sites": sites}


def test_gpt2_layernorm_groups_fold_through_the_conv1d_view():
    """GPT-2's Conv1D reads LayerNorm's output through view(-1, C): ln_1 -> c_attn and ln_2 -> c_fc
    fold exactly in fp64 (and c_attn's fused q/k/v split does not break the v -> o search)."""
    cfg = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=100, n_positions=64, use_cache=False)
    model = transformers.GPT2Model(cfg).eval().double()
    ids = torch.randint(0, 100, (2, 24))
    opts = {"linear": {"quant": "none", "smooth": {"alpha": 0.5}}, "plan": _conv1d_stats_plan(model)}
    out, sites = _compiled(model, opts, ids)
    done = {s.module for s in sites if s.kind == "norm" and s.status == "rewritten"}
    assert {"h.0.ln_1", "h.0.ln_2"} <= done, [(s.key, s.status, s.reason) for s in sites]
    with torch.no_grad():
        assert rel_l1(out.last_hidden_state, model(ids).last_hidden_state) <= 1e-9


# ------------------------------------------------------------------------------ compile-time weights

class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(64)
        self.a, self.b = nn.Linear(64, 96), nn.Linear(96, 64)

    def forward(self, x):
        return self.b(torch.relu(self.a(self.ln(x))))


def test_weights_are_quantized_once(monkeypatch):
    calls = []
    real = L.quantize_weight
    monkeypatch.setattr(L, "quantize_weight", lambda w, fmt: calls.append(w.shape) or real(w, fmt))
    model = TwoLinears().eval()
    torch._dynamo.reset()
    f = torch.compile(model, backend=attnopt.backend({"linear": {"quant": "w8a8"}}))
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(2, 20, 64)
            assert rel_l1(f(x), exact_model(model, x)) <= 0.03
    assert sorted(calls) == [(64, 96), (96, 64)]


@pytest.mark.parametrize("change", ["mul_", "load_state_dict", "new_parameter", "swapped_data"])
def test_changed_weights_after_compile_are_never_stale(change):
    """The compiled graph holds quantized copies of the weights: after an in-place change,
    load_state_dict or a replaced parameter it must use the new values (it recompiles)."""
    model = TwoLinears().eval()
    torch._dynamo.reset()
    f = torch.compile(model, backend=attnopt.backend({"linear": {"quant": "w8a8", "smooth": None}}))
    x = torch.randn(2, 20, 64)
    with torch.no_grad():
        before = f(x)
        if change == "mul_":
            model.a.weight.mul_(-3)
        elif change == "load_state_dict":
            model.load_state_dict(TwoLinears().state_dict())
        elif change == "new_parameter":
            model.b.weight = nn.Parameter(torch.randn(64, 96) * 0.1)
        else:
            model.a.weight.data = torch.randn(96, 64) * 0.1
        after = f(x)
    ref = exact_model(model, x)
    assert rel_l1(after, ref) <= 0.03 and rel_l1(before, ref) > 0.3


def test_weights_changing_every_call_raise_after_the_recompile_limit(monkeypatch):
    from attnopt.compiler import FreshWeights

    monkeypatch.setattr(FreshWeights, "MAX_RECOMPILES", 2)
    model = TwoLinears().eval()
    torch._dynamo.reset()
    f = torch.compile(model, backend=attnopt.backend({"linear": {"quant": "w8a8"}}))
    x = torch.randn(2, 20, 64)
    with torch.no_grad():
        f(x)
        for _ in range(2):  # within the limit: recompiled, and right
            model.a.weight.mul_(1.5)
            assert rel_l1(f(x), exact_model(model, x)) <= 0.03
        model.a.weight.mul_(1.5)
        with pytest.raises(RuntimeError, match="recompiles"):
            f(x)


def test_get_attr_weights_are_captured_and_checked():
    """Weights as get_attr nodes (an FX graph handed to the backend directly): captured in every
    mm / matmul form, and an in-place change still reaches the output."""
    model = MatmulForms().eval()
    x2, x3 = torch.randn(37, 40), torch.randn(3, 29, 40)
    gm = torch.fx.symbolic_trace(model)
    ShapeProp(gm).propagate(x2, x3)
    for n in gm.graph.nodes:  # the example values Dynamo would record
        tm = n.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape"):
            n.meta["example_value"] = torch.empty(tm.shape, dtype=tm.dtype, device="meta")
    be = attnopt.backend({"linear": {"quant": "w8a8"}})
    with torch.no_grad():
        f = be(gm, [x2, x3])
        model.w_kn.mul_(-3)
        out = f(x2, x3)
    assert sum(s.status == "rewritten" for s in be.recorder.sites()) == 5
    ref = exact_model(model, x2, x3)
    assert rel_l1(out[0], ref[0]) <= 0.02 and rel_l1(out[1], ref[1]) <= 0.02


def test_changed_weights_with_symbolic_shapes_raise():
    model = TwoLinears().eval()
    torch._dynamo.reset()
    f = torch.compile(model, backend=attnopt.backend({"linear": {"quant": "w8a8"}}), dynamic=True)
    with torch.no_grad():
        f(torch.randn(2, 20, 64))
        model.a.weight.mul_(2)
        with pytest.raises(RuntimeError, match=r"weight of a .*torch._dynamo.reset"):
            f(torch.randn(2, 21, 64))


def test_small_m_path_is_reported_per_site():
    model = TwoLinears().eval().bfloat16()
    notes = {}
    for fmt in ("w8a8", "w4a16"):
        for m in (1, 128):
            report = attnopt.inspect(model, torch.randn(1, m, 64).bfloat16(), options={"linear": {"quant": fmt}})
            site = next(s for s in report.sites if s.key == "a")
            notes[fmt, m] = (site.details["path"], site.kernel)
            assert site.details["m"] == m and site.error["rel_l1"] < 0.1
    assert notes["w8a8", 1][0] == "small-m" and "weight-only" in notes["w8a8", 1][1]
    assert notes["w8a8", 128][0] == "gemm" and "per-token INT8" in notes["w8a8", 128][1]
    assert notes["w4a16", 1][0] == "small-m" and "split-K" in notes["w4a16", 1][1]
    assert notes["w4a16", 128][0] == "gemm" and "M=128" in notes["w4a16", 128][1]


@pytest.mark.parametrize("n", [1, 7, 8, 50])
@pytest.mark.parametrize("change", ["none", "mul_", "swapped_data", "new_input", "get_attr_mul_"])
def test_fresh_weights_check_sees_every_kind_of_change(n, change):
    """The per-call staleness check (the loop for a few parameters, the C-level sweeps from
    FreshWeights.SWEEP_FROM on) sees in-place writes, swapped .data and replaced inputs, for
    parameters passed as graph inputs and held as get_attr constants, and nothing else."""
    from attnopt.compiler import FreshWeights

    ts = [nn.Parameter(torch.randn(3, 3)) for _ in range(n)]
    k = (n + 1) // 2  # the first half are graph inputs (after one activation), the rest get_attr
    args = [torch.randn(2)] + ts[:k]
    baked = [(1 + j, t, f"in{j}") for j, t in enumerate(ts[:k])] + [(None, t, f"attr{j}") for j, t in enumerate(ts[k:])]
    fw = FreshWeights(None, lambda *a: None, baked, None)
    assert not fw._stale(args) and fw._changed(args) is None
    last = k - 1  # the last graph input: the sweep's final element
    with torch.no_grad():
        if change == "mul_":
            ts[last].mul_(2)
        elif change == "swapped_data":
            ts[last].data = torch.randn(3, 3)
        elif change == "new_input":
            args[1 + last] = nn.Parameter(ts[last].detach().clone())
        elif change == "get_attr_mul_" and n > 1:
            ts[-1].add_(1)
    stale = change != "none" and not (change == "get_attr_mul_" and n == 1)
    assert fw._stale(args) == stale
    assert (fw._changed(args) is not None) == stale
