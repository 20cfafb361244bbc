"""linear.training: the 8-bit training linear (attnopt::linear_train) and norm (attnopt::norm_train)
against float64 autograd, their Triton kernels under the interpreter against the reference, the
linear pass on training graphs, and the memory saved for backward."""

import importlib.util
import pathlib

import pytest
import torch
import torch.nn.functional as F

import attnopt
from attnopt.codegen.arch import ARCHS
from attnopt.codegen.linear.block_gemm import block_gemm_triton, quantize_blocks_triton
from attnopt.config import normalize_options
from attnopt.ops import linear_train_ref as R
from attnopt.passes.linear_pipeline import run_linear_pass

from helpers import rel_l1

ROOT = pathlib.Path(__file__).parents[1]
FWD_BOUND = {"int8": 0.02, "fp8": 0.05}  # e4m3: 3 mantissa bits
GRAD_BOUND = {"int8": 0.03, "fp8": 0.08}  # e5m2 dY: 2 mantissa bits (the measured figures are in the README)


def _float64_grads(x, w, b, gy):
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    bd = b.detach().double().requires_grad_() if b is not None else None
    y = F.linear(xd, wd, bd)
    y.backward(gy.double())
    return y, xd.grad, wd.grad, (bd.grad if bd is not None else None)


def _run(x, w, b, gy, fmt, impl="auto"):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = b.detach().requires_grad_() if b is not None else None
    y = torch.ops.attnopt.linear_train(x, w, b, fmt, "cpu", impl)
    y.backward(gy)
    return y, x.grad, w.grad, (b.grad if b is not None else None)


def _operands(m, k, n, dtype, bias=True):
    x = torch.randn(m, k).to(dtype)
    w = (torch.randn(n, k) * 0.05).to(dtype)
    b = (torch.randn(n) * 0.1).to(dtype) if bias else None
    return x, w, b, torch.randn(m, n).to(dtype)


# ------------------------------------------------------------------------------ numerics


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_forward_and_gradients_against_float64(fmt, dtype):
    """M=77 and K, N not multiples of the 32-wide block: masked tails in every GEMM."""
    x, w, b, gy = _operands(77, 200, 90, dtype)
    x = x.reshape(7, 11, 200)
    gy = gy.reshape(7, 11, 90)
    got = _run(x, w, b, gy, fmt)
    ref = _float64_grads(x, w, b, gy)
    errs = {name: rel_l1(g, r) for name, g, r in zip(("y", "dx", "dw", "db"), got, ref)}
    print(fmt, dtype, {k: round(v, 4) for k, v in errs.items()})
    assert got[0].dtype == dtype and got[1].shape == x.shape and got[2].dtype == w.dtype
    assert errs["y"] <= FWD_BOUND[fmt]
    assert errs["dx"] <= GRAD_BOUND[fmt] and errs["dw"] <= GRAD_BOUND[fmt]
    assert errs["db"] <= 0.01  # a sum of dY in fp32: only the output dtype's rounding


def test_quantization_is_per_block_and_transposes():
    """A 32 x 32 block has one scale: the transpose of Q(t) is Q(t^T) (what backward relies on),
    and one large value only coarsens its own block."""
    t = torch.randn(70, 100)
    t[5, 40] = 1000.0
    for qfmt in ("int8", "e4m3", "e5m2"):
        q, s = R.quantize_blocks(t, qfmt)
        qt, st = R.quantize_blocks(t.t(), qfmt)
        assert torch.equal(q.t().float(), qt.float()) and torch.equal(s.t(), st)
        assert s.shape == (3, 4)
        assert s[0, 1] == 1000.0 / R.QMAX[qfmt] and (s[1:, :] < 1).all() and (s[:, 2:] < 1).all()


def test_zero_gradient_and_no_bias():
    x, w, _, gy = _operands(40, 64, 48, torch.bfloat16, bias=False)
    y, dx, dw, db = _run(x, w, None, torch.zeros_like(gy), "int8")
    assert db is None and not dx.any() and not dw.any() and torch.isfinite(y).all()


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_ops_pass_opcheck(fmt):
    """Schemas, fakes (strides of a transposed weight, Conv1D's), autograd registration, AOT; fp8
    the fakes only: the other checks do arithmetic on every output, which torch has no CPU kernel
    for on e4m3 tensors (the same schemas and autograd code run under int8)."""
    tests = ("test_faketensor",) + (
        ("test_schema", "test_autograd_registration", "test_aot_dispatch_dynamic") if fmt == "int8" else ())
    x = torch.randn(2, 37, 64, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(64, 48, dtype=torch.bfloat16).t().requires_grad_()
    b = torch.randn(48, dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(torch.ops.attnopt.linear_train_fwd.default, (x, w, b, fmt, "cpu", "auto"), test_utils=tests)
    _, xq, xs = torch.ops.attnopt.linear_train_fwd(x, w, b, fmt, "cpu", "auto")
    torch.library.opcheck(torch.ops.attnopt.linear_train_bwd.default,
                          (torch.randn(74, 48, dtype=torch.bfloat16), xq, xs, w.detach(), fmt, "cpu", "auto", True,
                           fmt == "int8"), test_utils=tests)
    g = torch.ones(64, dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(torch.ops.attnopt.norm_train_fwd.default, (x, g, None, 1e-6, "rms", fmt, "cpu", "auto"),
                          test_utils=tests)


def test_frozen_weight_keeps_no_input_and_gets_no_gradient():
    """LoRA's base layers: a weight that needs no gradient makes backward keep only the weight
    (no Q(x)) and compute dX alone, the same dX as with a trainable weight."""
    from attnopt.metrics import saved_for_backward

    x, w, b, gy = _operands(64, 96, 80, torch.bfloat16)
    xl = x.clone().requires_grad_()
    saved = saved_for_backward(lambda: torch.ops.attnopt.linear_train(xl, w, b, "int8", "cpu", "auto"), [w])
    assert saved["activation_bytes"] == 0 and saved["param_bytes"] == w.numel() * 2
    saved["out"].backward(gy)
    _, dx, dw, _ = _run(x, w, b, gy, "int8")
    assert torch.equal(xl.grad, dx)


# ------------------------------------------------------------------------------ kernels (interpreter)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_kernels_equal_the_reference(fmt, dtype):
    """The Triton quantizer and block GEMM (interpreter) compute the reference's arithmetic, forward
    and both backward GEMMs, through the op's autograd (impl 'triton')."""
    x, w, b, gy = _operands(77, 70, 45, dtype)
    got = _run(x, w, b, gy, fmt, impl="triton")
    ref = _run(x, w, b, gy, fmt, impl="reference")
    for g, r in zip(got, ref):
        assert g.dtype == r.dtype and g.shape == r.shape
        assert rel_l1(g, r) <= 1e-3  # fp32 summation order, then one rounding to 16 bits
    act, grad = R.operand_formats(fmt)
    for t, qfmt in ((x, act), (gy * 1e-3, grad)):
        (q1, s1), (q2, s2) = R.quantize_blocks(t, qfmt), quantize_blocks_triton(t, qfmt)
        assert torch.equal(q1.view(torch.int8), q2.view(torch.int8)) and torch.equal(s1, s2)


def test_block_gemm_writes_every_output_of_transposed_operands():
    """A poisoned output buffer is fully overwritten, reading operands and scales as transposes."""
    a, b = torch.randn(50, 77), torch.randn(40, 77)
    (aq, sa), (bq, sb) = R.quantize_blocks(a.t().contiguous(), "int8"), R.quantize_blocks(b.t().contiguous(), "int8")
    out = torch.full((50, 40), float("nan"), dtype=torch.bfloat16)
    block_gemm_triton(aq.t(), sa.t(), bq.t(), sb.t(), torch.bfloat16, out=out)
    ref = R.block_gemm_ref(aq.t(), sa.t(), bq.t(), sb.t(), torch.bfloat16)
    assert torch.isfinite(out).all() and rel_l1(out, ref) <= 1e-3


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_norm_train_against_float64(kind):
    """The norm's output is exact (16-bit rounding only); its gradients read the e4m3 input."""
    x = (torch.randn(4, 33, 96) * 2 + 0.5).bfloat16()
    w = (1 + 0.1 * torch.randn(96)).bfloat16()
    b = (0.1 * torch.randn(96)).bfloat16() if kind == "layer" else None
    gy = torch.randn_like(x)
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = torch.ops.attnopt.norm_train(*leaves, 1e-6, kind, "fp8", "cpu", "auto")
    y.backward(gy)
    xd, wd, bd = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b)]
    yd = F.rms_norm(xd, (96,), wd, 1e-6) if kind == "rms" else F.layer_norm(xd, (96,), wd, bd, 1e-6)
    yd.backward(gy.double())
    assert rel_l1(y, yd) <= 0.005
    assert rel_l1(leaves[0].grad, xd.grad) <= 0.01
    assert rel_l1(leaves[1].grad, wd.grad) <= 0.05
    if kind == "layer":
        assert rel_l1(leaves[2].grad, bd.grad) <= 0.01


# ------------------------------------------------------------------------------ the pass


class Mlp(torch.nn.Module):
    def __init__(self, d=64, f=160):
        super().__init__()
        self.norm = torch.nn.RMSNorm(d)
        self.up = torch.nn.Linear(d, f)
        self.down = torch.nn.Linear(f, d, bias=False)

    def forward(self, x):
        return x + self.down(F.relu(self.up(self.norm(x))))


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


def test_compiled_training_matches_eager():
    """fullgraph torch.compile with linear.training 'fp8': loss.backward() gives gradients close
    to eager bf16, and no further from float64 than the formats allow."""
    torch._dynamo.reset()
    model = Mlp().bfloat16()
    eager, exact = Mlp().bfloat16(), Mlp().double()
    eager.load_state_dict(model.state_dict())
    exact.load_state_dict(model.state_dict())
    x = torch.randn(4, 50, 64).bfloat16()
    compiled = torch.compile(model, backend="attnopt", options={"linear": {"training": "fp8"}}, fullgraph=True)
    for m, inp in ((compiled, x), (eager, x), (exact, x.double())):
        m(inp).float().pow(2).mean().backward()
    got, ref, ex = _grads(model), _grads(eager), _grads(exact)
    for name in got:
        assert torch.isfinite(got[name]).all()
        assert rel_l1(got[name], ex[name]) <= 0.15, name  # an fp8 backward through three layers
        assert rel_l1(got[name], ref[name]) <= 0.15, name
    assert rel_l1(got["norm.weight"], ex["norm.weight"]) <= 0.1


def test_training_graph_records_and_ops():
    torch._dynamo.reset()
    model = Mlp().bfloat16()
    be = attnopt.backend({"linear": {"training": "int8"}})
    torch.compile(model, backend=be, fullgraph=True)(torch.randn(2, 40, 64).bfloat16()).sum().backward()
    recs = {r.key: r for r in be.recorder.sites()}
    assert {k: (r.status, r.op) for k, r in recs.items()} == {
        "up": ("rewritten", "attnopt::linear_train"), "down": ("rewritten", "attnopt::linear_train"),
        "norm:train": ("rewritten", "attnopt::norm_train")}
    up = recs["up"]
    assert up.details["forward_format"] == "int8 x int8" and up.details["backward_format"].startswith("dY int8")
    assert "train-int8" in up.kernel
    from attnopt.inspection.table import render_table
    from attnopt.report import Report

    text = render_table(Report(sites=be.recorder.sites(), summary={}, options={}, env={}), width=400)
    assert "reference/train-int8" in text and "keeps x as int8" in text and "training linear" in text


def _grad_graph(model, x):
    """Dynamo's graph for model(x) with gradients on (parameters lifted to inputs)."""
    graphs = []
    torch._dynamo.reset()
    torch.compile(model, backend=lambda gm, ex: graphs.append((gm, ex)) or gm)(x)
    assert len(graphs) == 1
    return graphs[0]


def test_training_off_and_inference_graphs_are_unchanged():
    model = Mlp().bfloat16()
    x = torch.randn(2, 40, 64).bfloat16()
    gm, ex = _grad_graph(model, x)
    before = gm.code
    recs = run_linear_pass(gm, ex, normalize_options({"linear": {"quant": "w8a8"}}), ARCHS["cpu"])
    assert gm.code == before  # training 'off': a training graph keeps its linears
    assert all(r.status == "skipped" and "linear.training" in r.reason for r in recs)
    with torch.no_grad():  # an inference graph: linear.training changes nothing
        gm, ex = _grad_graph(model, x)
        before = gm.code
        recs = run_linear_pass(gm, ex, normalize_options({"linear": {"training": "fp8"}}), ARCHS["cpu"])
        assert gm.code == before and all(r.status == "skipped" for r in recs)
        recs = run_linear_pass(gm, ex, normalize_options({"linear": {"training": "fp8", "quant": "w8a8"}}),
                               ARCHS["cpu"])
        assert {r.op for r in recs if r.kind == "linear"} == {"attnopt::linear_8bit"}


def test_training_format_needs_the_arch():
    model = Mlp().bfloat16()
    gm, ex = _grad_graph(model, torch.randn(2, 40, 64).bfloat16())
    recs = run_linear_pass(gm, ex, normalize_options({"linear": {"training": "fp8"}}), ARCHS["sm80"])
    assert all(r.status == "skipped" for r in recs)
    assert "needs sm89+" in next(r.reason for r in recs if r.kind == "linear")


# ------------------------------------------------------------------------------ memory


def _bench():
    spec = importlib.util.spec_from_file_location("bench_training_memory", ROOT / "benchmarks" / "training_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bf16_saved():
    """What the compiled bf16 run of the memory model keeps for backward (measured once)."""
    return _bench().measure("off", 2048, 128, 2)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_saved_for_backward_is_at_most_0_6_of_bf16(fmt, bf16_saved):
    """Norms and linears only (benchmarks/training_memory.py's model), the weights' bytes counted:
    8-bit training keeps at most 0.6x what the compiled bf16 run keeps for backward."""
    base = bf16_saved
    got = _bench().measure(fmt, 2048, 128, 2)
    ratio = got["bytes"] / base["bytes"]
    print(fmt, "saved for backward", got["bytes"], "bf16", base["bytes"], f"ratio {ratio:.3f}")
    assert ratio <= 0.6
    assert got["param_bytes"] == base["param_bytes"]  # weights are saved as themselves, not copies


class HfRMSNorm(torch.nn.Module):
    """transformers' hand-written RMSNorm (Llama / Qwen3 / Mistral), as its forward is written
    (importing transformers takes longer than this test)."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def test_hf_rmsnorm_feeding_three_linears_keeps_an_8bit_input():
    """The hand-written RMSNorm shared by three linears becomes norm_train, and gradients stay
    close to float64."""

    class Qkv(torch.nn.Module):
        def __init__(self, d=64):
            super().__init__()
            self.norm = HfRMSNorm(d)
            self.q, self.k, self.v = (torch.nn.Linear(d, d, bias=False) for _ in range(3))

        def forward(self, x):
            h = self.norm(x)
            return self.q(h) * self.k(h) + self.v(h)

    torch._dynamo.reset()
    model = Qkv().bfloat16()
    with torch.no_grad():
        model.norm.weight.add_(0.1 * torch.randn(64).bfloat16())
    exact = Qkv().double()
    exact.load_state_dict(model.state_dict())
    x = torch.randn(2, 48, 64).bfloat16()
    be = attnopt.backend({"linear": {"training": "int8"}})
    compiled = torch.compile(model, backend=be, fullgraph=True)
    compiled(x).float().square().mean().backward()
    exact(x.double()).square().mean().backward()
    recs = {r.key: r for r in be.recorder.sites()}
    assert recs["norm:train"].status == "rewritten" and recs["norm:train"].details["consumers"] == ["q", "k", "v"]
    for (name, p), pe in zip(model.named_parameters(), exact.parameters()):
        assert rel_l1(p.grad, pe.grad) <= 0.05, name


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_a_few_optimizer_steps_track_eager_without_recompiling(fmt):
    """AdamW updates the parameters in place every step: the training graph holds no copy of them,
    so it is compiled once, and its loss follows the bf16 eager run's."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, eager = Mlp(), Mlp()
    eager.load_state_dict(model.state_dict())
    model, eager = model.bfloat16(), eager.bfloat16()
    be = attnopt.backend({"linear": {"training": fmt}})
    compiled = torch.compile(model, backend=be, fullgraph=True)
    x = torch.randn(4, 32, 64).bfloat16()
    target = torch.randn(4, 32, 64).bfloat16()
    losses = {}
    for name, m, fn in (("attnopt", model, compiled), ("eager", eager, eager)):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        for _ in range(6):
            opt.zero_grad()
            loss = (fn(x).float() - target.float()).square().mean()
            loss.backward()
            opt.step()
            losses.setdefault(name, []).append(loss.item())
    print(fmt, {k: [round(v, 4) for v in vs] for k, vs in losses.items()})
    assert be.graphs_compiled == 1
    assert all(torch.isfinite(torch.tensor(v)).all() for v in losses.values())
    assert losses["attnopt"][-1] < losses["attnopt"][0]
    assert abs(losses["attnopt"][-1] - losses["eager"][-1]) <= 0.03 * losses["eager"][-1], losses


def test_autocast_region_computes_in_its_dtype():
    """Under torch.autocast an fp32 model's linear gets its input cast to bf16 (its output is bf16,
    as autocast's), its fp32 master weight quantized as it is and given an fp32 gradient."""
    torch._dynamo.reset()
    lin = torch.nn.Linear(64, 96)
    be = attnopt.backend({"linear": {"training": "int8"}})
    f = torch.compile(lambda t: lin(t), backend=be, fullgraph=True)
    x = torch.randn(2, 40, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = f(x)
    assert y.dtype == torch.bfloat16
    gy = torch.randn_like(y)
    y.backward(gy)
    (rec,) = be.recorder.sites()
    assert rec.op == "attnopt::linear_train" and rec.details["autocast"] == "bfloat16"
    ref = _float64_grads(x.bfloat16(), lin.weight, lin.bias, gy)
    assert lin.weight.grad.dtype == torch.float32 and rel_l1(lin.weight.grad, ref[2]) <= GRAD_BOUND["int8"]
    assert x.grad.dtype == torch.float32 and rel_l1(x.grad, ref[1]) <= GRAD_BOUND["int8"]


def test_aten_capture_of_a_training_graph_keeps_the_ops_whole():
    """The attention pass's trace to aten must not inline linear_train's body (on CUDA it would by
    default; 'always' forces that here): AOT has to see the op to use its autograd formula."""
    from attnopt.ops import aot_inline
    from attnopt.passes.aten_capture import trace_to_aten

    model = Mlp().bfloat16()
    gm, ex = _grad_graph(model, torch.randn(2, 40, 64).bfloat16())
    run_linear_pass(gm, ex, normalize_options({"linear": {"training": "int8"}}), ARCHS["cpu"])
    with aot_inline.inline_mode("always"):
        aten = trace_to_aten(gm, ex, training=True)  # as the backend calls it for a graph that needs grad
    ops = [n.target for n in aten.graph.nodes if n.op == "call_function" and "attnopt" in str(n.target)]
    assert ops == [torch.ops.attnopt.norm_train_fwd.default] + [torch.ops.attnopt.linear_train_fwd.default] * 2


def test_launch_and_pass_budget():
    """Per call: forward three launches (quantize x, quantize W, the GEMM with its bias), backward
    four (quantize dY, quantize W, the dX and dW GEMMs); no aten op moves an activation-sized
    tensor besides backward's dBias, a sum of dY (autograd's, outside the kernels)."""
    from attnopt.codegen.linear.block_gemm import linear_train_backward_triton, linear_train_forward_triton
    from attnopt.codegen.work_count import count_work

    x, w, b, gy = _operands(96, 200, 72, torch.bfloat16)
    linear_train_forward_triton(x, w, b, "int8")
    (_, xq, xs), fwd = count_work(lambda: linear_train_forward_triton(x, w, b, "int8"), full_size=x.numel())
    assert fwd.launches == ["_quant_block_kernel", "_quant_block_kernel", "_block_gemm_kernel"], fwd.to_dict()
    assert fwd.full_size_passes == [], fwd.to_dict()
    _, bwd = count_work(lambda: linear_train_backward_triton(gy, xq, xs, w, "int8"), full_size=x.numel())
    assert bwd.launches == ["_quant_block_kernel", "_quant_block_kernel", "_block_gemm_kernel",
                            "_block_gemm_kernel"], bwd.to_dict()
    assert bwd.full_size_passes == [], bwd.to_dict()


def test_norm_train_quantizer_kernel_equals_the_reference():
    """norm_train with impl 'triton' (its quantizer under the interpreter) saves the same Q(x) and
    gives the same gradients as the reference."""
    x = (torch.randn(70, 96) * 3).bfloat16()
    w = (1 + 0.1 * torch.randn(96)).bfloat16()
    gy = torch.randn_like(x)
    got = []
    for impl in ("triton", "reference"):
        xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
        y, xq, xs, stats = torch.ops.attnopt.norm_train_fwd(xl, wl, None, 1e-6, "rms", "fp8", "cpu", impl)
        y.backward(gy)
        got.append((y, xq.view(torch.int8), xs, stats, xl.grad, wl.grad))
    for a, b in zip(*got):
        assert torch.equal(a, b)


def test_site_error_measures_forward_and_gradients():
    """What the report's per-site gradient error would carry: the op against float64 autograd with
    a seeded random upstream gradient, the same figures twice."""
    from attnopt.ops.linear_train import site_error

    x, w, b, _ = _operands(77, 200, 90, torch.bfloat16)
    err = site_error(x, w, b, "int8")
    assert set(err) == {"y", "dx", "dw", "db"} and err == site_error(x, w, b, "int8")
    assert 0 < err["dw"]["rel_l1"] <= GRAD_BOUND["int8"] and err["y"]["cos"] > 0.999
    assert site_error(x, w, None, "fp8")["dx"]["rel_l1"] > err["dx"]["rel_l1"]  # e5m2 dY: coarser
