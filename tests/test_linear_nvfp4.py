"""NVFP4 linears (`linear.quant = "nvfp4"`, W4A4, sm100+): the reference against float64, the
activation quantizer and the tl.dot_scaled GEMM (interpreter) against the reference, the graph
rewrite, and the arch refusal.

Measured (this file's inputs, rel-L1 against float64): ~0.13 on standard-normal activations,
about 0.12-0.13 with outlier channels; W4A16 is ~0.10 and W8A8 ~0.012 on the same inputs.
"""

import copy

import pytest
import torch
import torch.nn as nn

import attnopt
from attnopt.codegen.linear.nvfp4 import linear_nvfp4_triton, quantize_act_nvfp4_triton
from attnopt.ops import linear_nvfp4_ref as F
from attnopt.ops import nvfp4

from helpers import dynamo_graph, rel_l1, run_traced_for_arch
from test_linear_rewrite import LinearAndConv1D, _consts, _rewrite

BOUND = 0.16  # rel-L1 of the NVFP4 linear against float64 (measured 0.12-0.14)


def exact(x, w, b=None):
    return x.double() @ w.double().T + (b.double() if b is not None else 0)


def cosine(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def outlier_channels(m, k, dtype=torch.bfloat16):
    """Activations with one input channel in 32 thirty times larger than the rest."""
    x = torch.randn(m, k)
    x[:, torch.randperm(k)[:max(1, k // 32)]] *= 30
    return x.to(dtype)


# ------------------------------------------------------------------------------ reference

def test_weight_quantization_grid():
    """Codes on the e2m1 grid, an e4m3 scale per 16 inputs whose row maximum is 448, K padded."""
    w = torch.randn(24, 100) * torch.logspace(-3, 0, 24)[:, None]
    packed, gs, outer = F.quantize_weight_nvfp4(w)
    assert packed.shape == (24, 56) and packed.dtype == torch.uint8  # K 100 -> 112
    assert gs.shape == (24, 7) and gs.dtype == torch.float8_e4m3fn and outer.shape == (24,)
    assert torch.equal(gs.float().amax(dim=1), torch.full((24,), 448.0))
    deq = F.local_values(packed, gs) * outer[:, None]
    assert (deq[:, 100:] == 0).all() and rel_l1(deq[:, :100], w) < 0.12
    assert torch.equal(deq, nvfp4.fake_quantize_rows(nvfp4._pad_to(w, -1, 16), 1))
    grid = torch.tensor(nvfp4.E2M1_VALUES)
    units = (F.local_values(packed, gs) / gs.float().repeat_interleave(16, -1).clamp_min(1e-30)).abs()
    assert torch.isin(units, grid).all()
    # the largest element of each row lands on 6 x 448 of its outer scale, within e2m1's last step
    assert ((w.abs().amax(1) - deq.abs().amax(1)).abs() <= w.abs().amax(1) / 6).all()


@pytest.mark.parametrize("kind", ["normal", "outliers"])
def test_reference_against_float64(kind):
    x = torch.randn(64, 256).bfloat16() if kind == "normal" else outlier_channels(64, 256)
    w = torch.randn(96, 256) * 0.05
    b = torch.randn(96).bfloat16()
    y = F.linear_nvfp4_ref(x, *F.quantize_weight_nvfp4(w), b)
    ref = exact(x, w, b)
    assert y.dtype == x.dtype and y.shape == (64, 96)
    assert rel_l1(y, ref) < BOUND and cosine(y, ref) > 0.98, (rel_l1(y, ref), cosine(y, ref))
    # a weight off by a sign in one group shows up: the test can fail
    wrong = F.quantize_weight_nvfp4(w)[0].clone()
    wrong[:, :8] ^= 0x88
    assert rel_l1(F.linear_nvfp4_ref(x, wrong, *F.quantize_weight_nvfp4(w)[1:], b), ref) > BOUND


def test_mismatched_k_is_refused_with_the_reason():
    q = F.quantize_weight_nvfp4(torch.randn(8, 64))
    with pytest.raises(ValueError, match="padded to a multiple of 16"):
        linear_nvfp4_triton(torch.randn(3, 80), *q, None)
    with pytest.raises(ValueError, match="NVFP4 weight 64"):
        F.linear_nvfp4_ref(torch.randn(3, 80), *q, None)


# ------------------------------------------------------------------------------ kernels (interpreter)

@pytest.mark.parametrize("m,k", [(1, 64), (77, 100), (40, 600)])
def test_activation_quantizer_is_bitwise_the_reference(m, k):
    """One K block or several (BLOCK_K 256), K padded to 16 with zero codes and scales."""
    x = outlier_channels(m, k)
    kp = -(-k // 16) * 16
    xq, xg, xo = quantize_act_nvfp4_triton(x, kp)
    rq, rg, ro = F.quantize_nvfp4(x)
    assert torch.equal(xq, rq) and torch.equal(xg.float(), rg.float()) and torch.equal(xo, ro)


@pytest.mark.parametrize("m,n,k", [(1, 33, 64), (77, 45, 100), (333, 17, 48)])
def test_gemm_kernel_is_the_reference(m, n, k):
    """Odd M (one row; partial row tiles), odd N, K not a multiple of 16; the output buffer is
    poisoned first, so a tile left unwritten shows."""
    x = torch.randn(m, k).bfloat16()
    w = torch.randn(n, k) * 0.05
    b = torch.randn(n).bfloat16()
    q = F.quantize_weight_nvfp4(w)
    out = torch.full((m, n), float("nan"), dtype=x.dtype)
    y = linear_nvfp4_triton(x, *q, b, out=out)
    ref = F.linear_nvfp4_ref(x, *q, b)
    assert torch.isfinite(y).all() and y.dtype == x.dtype
    # the same products (exact) summed in fp32 rather than float64: one bf16 rounding apart at most
    assert rel_l1(y, ref) < 1e-3 and rel_l1(y, exact(x, w, b)) < BOUND


def test_gemm_kernel_3d_input_without_bias():
    x = torch.randn(2, 9, 32, dtype=torch.float16)
    q = F.quantize_weight_nvfp4(torch.randn(20, 32) * 0.1)
    y = linear_nvfp4_triton(x, *q, None)
    assert y.shape == (2, 9, 20) and rel_l1(y, F.linear_nvfp4_ref(x, *q, None)) < 1e-3


@pytest.mark.parametrize("shape", [(1, 200), (2, 40, 200)])
def test_two_launches_and_no_torch_side_pass(shape):
    """Per call: the activation quantizer and the GEMM, no aten op moving data (allocations only)."""
    from attnopt.codegen.work_count import count_work

    q = F.quantize_weight_nvfp4(torch.randn(72, 200) * 0.05)
    x, b = torch.randn(*shape).bfloat16(), torch.randn(72).bfloat16()
    linear_nvfp4_triton(x, *q, b)
    _, work = count_work(lambda: linear_nvfp4_triton(x, *q, b), full_size=x.numel())
    assert work.launches == ["_quant_act_nvfp4_kernel", "_nvfp4_gemm_kernel"], work.to_dict()
    assert work.full_size_passes == [] and work.aten_ops == [], work.to_dict()


def test_calibration_offers_nvfp4_where_the_arch_runs_it():
    """A candidate with its own error and an estimated time on sm100; not offered on sm90."""
    from attnopt.calibration import cost_model as C
    from attnopt.calibration.linear_formats import linear_errors

    assert "nvfp4" in C.linear_formats("sm100") and "nvfp4" not in C.linear_formats("sm90")
    with pytest.raises(ValueError, match="not offered on sm90"):
        C.linear_time("sm90", 64, 256, 256, "nvfp4")
    # prefill: FP4 math at twice FP8's rate, a quarter of bf16's bytes
    assert C.linear_time("sm100", 4096, 4096, 4096, "nvfp4") < C.linear_time("sm100", 4096, 4096, 4096, "fp8")
    x, w = torch.randn(64, 128).bfloat16(), torch.randn(32, 128) * 0.05
    errs = linear_errors(x, w, ["w4a16", "nvfp4"])
    assert errs["w4a16"] < errs["nvfp4"] < BOUND


# ------------------------------------------------------------------------------ the pass

def test_each_linear_becomes_the_nvfp4_op_on_its_quantized_weight():
    model = LinearAndConv1D().eval().bfloat16()
    x = torch.randn(33, 64).bfloat16()
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
    gm, ex = dynamo_graph(model, x)
    m, _, _ = _rewrite(gm, ex, {"linear": {"quant": "nvfp4"}})
    ops = [n for n in gm.graph.nodes if n.target is torch.ops.attnopt.linear_nvfp4.default]
    assert len(ops) == 2
    for op, w in zip(ops, [model.lin.weight, model.w_kn.t()]):
        for got, want in zip(_consts(gm, op)[1:4], F.quantize_weight_nvfp4(w)):
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    with torch.no_grad():
        assert rel_l1(gm(*ex)[0], ref) <= BOUND
    rec = m.records["lin"]
    assert (rec.status, rec.op, rec.details["path"]) == ("rewritten", "attnopt::linear_nvfp4", "gemm")
    assert rec.details["weight_bytes_after"] == F.weight_bytes(48, 64) == 48 * 32 + 48 * 4 + 4 * 48


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 96), nn.Linear(96, 32)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("arch", ["sm90", "sm100"])
def test_only_fp4_archs_take_nvfp4(arch):
    """sm90 refuses with the reason; sm100 (emulated on the CPU) rewrites every linear."""
    model = TwoLinears().eval().bfloat16()
    r = attnopt.inspect(model, torch.randn(4, 20, 64).bfloat16(), options={"linear": {"quant": "nvfp4"}, "arch": arch})
    lin = [s for s in r.sites if s.kind == "linear"]
    assert len(lin) == 2
    if arch == "sm90":
        assert all(s.status == "skipped" and s.reason == "linear format 'nvfp4' needs sm100+ (target is sm90)"
                   for s in lin), [s.reason for s in lin]
    else:
        assert all(s.status == "rewritten" and s.op == "attnopt::linear_nvfp4" for s in lin)
        assert all(s.error["rel_l1"] < BOUND for s in lin)


def test_the_op_runs_the_kernel_or_the_reference():
    """attnopt::linear_nvfp4 with impl 'triton' (the GPU's path, here interpreted) and
    'reference' (the CPU's) give the same output."""
    x = torch.randn(5, 48).bfloat16()
    q = F.quantize_weight_nvfp4(torch.randn(24, 48) * 0.1)
    b = torch.randn(24).bfloat16()
    kernel = torch.ops.attnopt.linear_nvfp4(x, *q, b, "sm100", "triton")
    reference = torch.ops.attnopt.linear_nvfp4(x, *q, b, "sm100", "reference")
    assert torch.equal(reference, F.linear_nvfp4_ref(x, *q, b)) and rel_l1(kernel, reference) < 1e-3


_INLINE_NVFP4 = r"""
from test_linear_nvfp4 import TwoLinears

be = attnopt.backend({"linear": {"quant": "nvfp4"}}, inductor_config={"fx_graph_cache": False})


def run():
    with torch.no_grad():
        torch.compile(TwoLinears().bfloat16().eval(), backend=be)(torch.randn(3, 40, 64).bfloat16())


graph = stop_after_trace(run)
print(json.dumps({"attnopt_ops": attnopt_ops(graph), "kernels": [k for k, _ in kernel_nodes(graph)],
                  "statuses": [r.status for r in be.recorder.sites()]}))
"""


@pytest.mark.slow
def test_nvfp4_bodies_inline_into_the_graph(tmp_path):
    """What an sm100 compile does, short of Inductor compiling the kernels (as
    test_gpu_paths.test_triton_bodies_inline_into_the_graph): with the interpreter off, AOTAutograd
    traces each NVFP4 linear into its quantizer and GEMM. ~25 s (a subprocess)."""
    got = run_traced_for_arch(tmp_path, _INLINE_NVFP4, 100)
    assert got["statuses"] == ["rewritten"] * 2 and got["attnopt_ops"] == []
    assert got["kernels"] == ["_quant_act_nvfp4_kernel", "_nvfp4_gemm_kernel"] * 2
