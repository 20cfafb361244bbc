"""W4A8 linears (ViDiT-Q's format): the reference's accuracy against float64, the Triton kernel
(interpreter) equal to the reference on odd shapes, the rewrite, AWQ for it, its calibration
candidate and cost."""

import dataclasses

import pytest
import torch
import torch.nn as nn

from attnopt.calibration.awq import awq_search, w4a8_output
from attnopt.calibration.calibrate import _add_awq
from attnopt.calibration.capture import Captured
from attnopt.calibration.cost_model import linear_phases, linear_time
from attnopt.calibration.linear_formats import linear_errors
from attnopt.codegen.arch import ARCHS
from attnopt.codegen.linear.w4a8 import linear_w4a8_triton
from attnopt.compiler import AttnoptBackend
from attnopt.config import ConfigError, normalize_options, validate_plan_dict
from attnopt.ops import linear_ref as L
from attnopt.passes.linear_match import _format_reason
from attnopt.plan import Plan

from helpers import compile_planned_and_folded, rel_l1


def exact(x, w, b=None):
    return x.double() @ w.double().T + (b.double() if b is not None else 0)


def _outlier_acts(m, k, outliers=6, scale=30.0):
    """Rows with a few input channels much larger than the rest (DiT / LLM activations)."""
    x = torch.randn(m, k)
    x[:, :outliers] *= scale
    return x


def test_weight_grid_is_symmetric_int4_per_group():
    w = torch.randn(40, 200)
    pk, sc = L.quantize_weight_w4a8(w, 64)
    assert pk.dtype == torch.uint8 and pk.shape == (40, 128) and sc.shape == (40, 4)
    q = L.int4_symmetric_values(pk)
    assert int(q.min()) >= -7 and int(q.max()) <= 7 and bool((q[:, 200:] == 0).all())  # padding stays 0
    deq = L.dequantize_w4a8(pk, sc, 200, 64)
    step = sc.repeat_interleave(64, dim=1)[:, :200]
    assert bool(((deq - w).abs() <= step / 2 + 1e-6).all())
    assert torch.allclose(sc[:, 0], w[:, :64].abs().amax(dim=1) / 7)


@pytest.mark.parametrize("m", [1, 77])
def test_reference_is_the_int_arithmetic_and_close_to_float64(m):
    """The reference equals Q8(x) Q4(W)^T in float64 (integer partial sums are exact) and stays
    within 4-bit weight error of float64 x W^T."""
    x = torch.randn(m, 333).bfloat16()
    w = torch.randn(81, 333) * 0.05
    b = torch.randn(81).bfloat16()
    pk, sc = L.quantize_weight_w4a8(w)
    ref = L.linear_w4a8_ref(x, pk, sc, b)
    assert ref.dtype == x.dtype and ref.shape == (m, 81)
    assert rel_l1(ref, w4a8_output(x, w, None) + b.double()) <= 4e-3  # bf16 output rounding only
    err = rel_l1(ref, exact(x, w, b))
    assert err <= 0.12
    cos = torch.nn.functional.cosine_similarity(ref.double().flatten(), exact(x, w, b).flatten(), dim=0)
    assert float(cos) >= 0.99


@pytest.mark.parametrize("m,k,n,group,dtype", [(1, 333, 81, 128, torch.bfloat16), (77, 200, 47, 64, torch.float16),
                                               (333, 256, 65, 128, torch.bfloat16)])
def test_kernel_equals_reference_on_odd_shapes(m, k, n, group, dtype):
    """M 1 / 77 / 333, K not a multiple of the group, N odd, into a NaN-poisoned buffer, with bias."""
    x = torch.randn(m, k).to(dtype)
    w = torch.randn(n, k) * 0.05
    b = torch.randn(n).to(dtype)
    pk, sc = L.quantize_weight_w4a8(w, group)
    out = torch.full((m, n), float("nan"), dtype=dtype)
    got = linear_w4a8_triton(x, pk, sc, b, group, out=out)
    ref = L.linear_w4a8_ref(x, pk, sc, b, group)
    assert got.dtype == dtype and bool(torch.isfinite(got).all())
    assert rel_l1(got, ref) <= 1e-5  # same integer partial sums, same fp32 order
    assert rel_l1(got, exact(x, w, b)) <= 0.12


def test_quantizing_x_in_the_prologue_or_a_pre_kernel_gives_the_same_output():
    """Up to 64 rows the GEMM quantizes x itself (one launch), beyond a pre-kernel does: the
    same rounding, so either forced on the same rows gives the reference's output bit for bit."""
    x = (torch.randn(40, 300) * torch.linspace(0.1, 5, 300)).bfloat16()
    w = torch.randn(50, 300) * 0.05
    pk, sc = L.quantize_weight_w4a8(w)
    ref = L.linear_w4a8_ref(x, pk, sc, None)
    fused, pre = (linear_w4a8_triton(x, pk, sc, None, fuse=f) for f in (True, False))
    assert torch.equal(fused, pre) and torch.equal(fused, ref)


def test_kernel_without_bias_leading_dims_and_zero_rows():
    x = torch.randn(2, 20, 130).bfloat16()
    x[0, 3] = 0  # a zero row: scale 1, output 0
    w = torch.randn(33, 130) * 0.05
    pk, sc = L.quantize_weight_w4a8(w)
    got = linear_w4a8_triton(x, pk, sc, None)
    assert got.shape == (2, 20, 33) and bool((got[0, 3] == 0).all())
    assert rel_l1(got, L.linear_w4a8_ref(x, pk, sc, None)) <= 1e-5
    assert linear_w4a8_triton(x[:, :0], pk, sc, None).shape == (2, 0, 33)
    with pytest.raises(ValueError, match="group"):
        linear_w4a8_triton(x, pk, sc, None, group=64)  # the weight was packed in groups of 128


def test_outlier_channels_rank_the_formats():
    """On activations with outlier channels: W4A8's error lies between W8A8's and a 4-bit weight
    format's on top of it, and smoothing x's channels (the pipeline's SmoothQuant, ViDiT-Q's
    channel balancing) lowers it."""
    x = _outlier_acts(256, 512).bfloat16()
    w = torch.randn(128, 512) * 0.05
    errs = linear_errors(x, w, ["w8a8", "w4a16", "w4a8"])
    assert errs["w8a8"] < errs["w4a8"] and errs["w4a16"] < errs["w4a8"] < 0.2
    s = x.float().abs().amax(dim=0).clamp_min(1e-5) ** 0.5 / w.abs().amax(dim=0) ** 0.5  # alpha 0.5
    smoothed = linear_errors((x.float() / s).bfloat16(), w * s, ["w4a8"])["w4a8"]
    assert smoothed < 0.8 * errs["w4a8"], (smoothed, errs)


def test_rewrite_reports_w4a8_and_matches_the_reference():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(200, 96), nn.GELU(), nn.Linear(96, 64)).eval()
    x = torch.randn(2, 40, 200)
    with torch.no_grad():
        h = torch.nn.functional.gelu(L.linear_w4a8_ref(x, *L.quantize_weight_w4a8(m[0].weight), m[0].bias))
        want = L.linear_w4a8_ref(h, *L.quantize_weight_w4a8(m[2].weight), m[2].bias)
        be = AttnoptBackend(normalize_options({"linear": {"quant": "w4a8"}}))
        torch._dynamo.reset()
        got = torch.compile(m, backend=be)(x)
        ref = m.double()(x.double())
    torch._dynamo.reset()
    lin = [s for s in be.recorder.sites() if s.kind == "linear"]
    assert len(lin) == 2 and all(s.status == "rewritten" and s.op == "attnopt::linear_w4a8" for s in lin)
    assert lin[0].details["weight_bytes_after"] == 96 * 128 + 4 * 96 * 2  # 2 groups of 128: half a byte + scale
    assert "int8 dot per 128-wide group" in lin[0].kernel
    assert rel_l1(got, want) <= 1e-6 and rel_l1(got, ref) <= 0.15


def test_options_plan_and_arch_refusal():
    assert normalize_options({"linear": {"quant": "w4a8"}}).linear.quant == "w4a8"
    with pytest.raises(ConfigError):
        normalize_options({"linear": {"quant": "w4a4"}})
    plan = validate_plan_dict({"schema_version": 1, "sites": {"a": {"kind": "linear", "quant": "w4a8"}}})
    assert plan["sites"]["a"]["quant"] == "w4a8"
    assert all("w4a8" in spec.linear_formats for spec in ARCHS.values())  # INT8 tensor cores: sm80+
    without = dataclasses.replace(ARCHS["sm80"], linear_formats=("w8a8", "w4a16"))
    assert _format_reason("w4a8", torch.zeros(4, 4), without) == "linear format 'w4a8' needs sm80+ (target is sm80)"
    assert _format_reason("w4a8", torch.zeros(4, 4), ARCHS["sm80"]) is None


def test_cost_model_counts_the_quantizer_int8_rate_and_half_byte_weights():
    phases = linear_phases("sm90", 4096, 4096, 4096, "w4a8")
    assert [p.name for p in phases] == ["quantize activation", "gemm"]
    assert phases[1].compute_s == pytest.approx(linear_phases("sm90", 4096, 4096, 4096, "w8a8")[1].compute_s)
    # decode: x quantized in the GEMM's prologue (one launch), half W8A8's weight bytes
    (w8,), (w4,) = linear_phases("sm90", 1, 4096, 4096, "w8a8"), linear_phases("sm90", 1, 4096, 4096, "w4a8")
    assert w4.name == "gemm" and 0 < w4.memory_s < 0.6 * w8.memory_s
    assert linear_time("sm90", 1, 4096, 4096, "w4a8") < linear_time("sm90", 1, 4096, 4096, "w8a8")
    assert linear_time("sm90", 4096, 4096, 4096, "w4a8") < linear_time("sm90", 4096, 4096, 4096, "w4a16")


@pytest.mark.parametrize("outliers", [0, 6])
def test_awq_search_for_w4a8_is_never_worse_and_helps_with_outliers(outliers):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(128, 256, generator=gen) * 0.05
    calib = torch.randn(256, 256, generator=gen)
    held = torch.randn(512, 256, generator=gen)
    calib[:, :outliers] *= 30
    held[:, :outliers] *= 30
    c = awq_search(calib, w, fmt="w4a8")
    assert c.awq_rel_l1 <= c.rtn_rel_l1
    ref = held.double() @ w.double().T
    rtn = rel_l1(w4a8_output(held, w, None), ref)
    awq = rel_l1(w4a8_output(held, w, c.scales), ref)
    if outliers:
        assert c.alpha > 0 and awq < 0.8 * rtn, (rtn, awq)
    else:
        assert awq <= 1.02 * rtn, (rtn, awq)


def test_calibrate_awq_searches_w4a8_sites_for_their_format():
    gen = torch.Generator().manual_seed(3)
    x = _outlier_acts(128, 256)
    w = {k: torch.randn(64, 256, generator=gen) for k in "ab"}
    calls = {k: [{"kind": "linear", "absmax": x.abs().amax(dim=0), "x": x}] for k in "ab"}
    cap = Captured(calls, {}, {k: (v, None) for k, v in w.items()}, "cpu", None, "", False)
    plan = Plan(sites={"a": {"kind": "linear", "quant": "w4a8"}, "b": {"kind": "linear", "quant": "w4a16"}})
    _add_awq(plan, cap, normalize_options({}))
    assert plan.sites["a"]["awq"] == awq_search(x, w["a"], fmt="w4a8").entry()
    assert plan.sites["b"]["awq"] == awq_search(x, w["b"], fmt="w4a16").entry()  # same input, other format
    assert plan.meta["awq"]["sites"]["a"]["format"] == "w4a8"


def test_compiled_plan_applies_awq_scales_to_a_w4a8_linear():
    """fc's AWQ scales: W s quantized, x * (1 / s) in the graph, as the scales written out."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 128)).eval()
    x = _outlier_acts(64, 256).reshape(2, 32, 256)
    entry = awq_search(x.reshape(-1, 256), m[0].weight.detach(), fmt="w4a8").entry()
    assert entry["alpha"] > 0
    s = torch.tensor(entry["scales"], dtype=torch.float64)
    inv = (1.0 / s).float()
    opts = {"linear": {"quant": "w4a8"}}
    with torch.no_grad():
        be = AttnoptBackend(normalize_options({**opts, "plan": {"schema_version": 1, "sites": {
            "0": {"kind": "linear", "quant": "w4a8", "awq": entry}}}}))
        torch._dynamo.reset()
        y = torch.compile(m, backend=be)(x)
        want = L.linear_w4a8_ref(x * inv, *L.quantize_weight_w4a8((m[0].weight.double() / inv.double()).float()),
                                 m[0].bias)
        ref = m(x).double()
    torch._dynamo.reset()
    rec = {r.key: r for r in be.recorder.sites()}["0"]
    assert rec.details["format"] == "w4a8" and rec.details["awq_alpha"] == entry["alpha"]
    assert rel_l1(y, want) <= 1e-6
    rtn = L.linear_w4a8_ref(x, *L.quantize_weight_w4a8(m[0].weight.detach()), m[0].bias)
    assert rel_l1(y, ref) < 0.8 * rel_l1(rtn, ref)


def test_planner_offers_w4a8_with_its_own_error_and_cost():
    from attnopt.calibration.calibrate import _linear_site

    x = _outlier_acts(96, 256)
    w = torch.randn(64, 256) * 0.05
    cap = Captured({"fc": [{"kind": "linear", "absmax": x.abs().amax(dim=0), "x": x, "rows": 96}]}, {},
                   {"fc": (w, None)}, "sm80", None, "", False)
    site = _linear_site("fc", cap.calls["fc"], cap, normalize_options({"arch": "sm80"}), float("inf"), "all", None)
    cands = {c.label: c for c in site.candidates}
    assert set(cands) == {"none", "w8a8", "w4a16", "w4a8"}  # sm80: no fp8
    assert cands["w4a8"].entry == {"kind": "linear", "quant": "w4a8"}
    assert site.own_error["w4a8"] == pytest.approx(linear_errors(x, w, ["w4a8"])["w4a8"])
    assert cands["w4a8"].time == pytest.approx(linear_time("sm80", 96, 64, 256, "w4a8"))


class _NormTwo(nn.Module):
    """LayerNorm -> fc2, fc3 (both w4a8): shared AWQ scales fold into the norm."""

    def __init__(self):
        super().__init__()
        self.norm, self.fc2, self.fc3 = nn.LayerNorm(256), nn.Linear(256, 128), nn.Linear(256, 96)
        with torch.no_grad():
            self.norm.weight[:5] = 20.0

    def forward(self, x):
        h = self.norm(x)
        return self.fc2(h).sum(-1) + self.fc3(h).sum(-1)


def test_shared_awq_scales_of_w4a8_linears_fold_into_the_norm():
    torch.manual_seed(0)
    m = _NormTwo().eval()
    x = torch.randn(2, 32, 256)
    with torch.no_grad():
        h = m.norm(x).reshape(-1, 256)
        e = awq_search(h, torch.cat([m.fc2.weight, m.fc3.weight]), fmt="w4a8").entry()
    assert e["alpha"] > 0
    s = torch.tensor(e["scales"], dtype=torch.float64)
    out = _NormTwo().eval()  # the scales written out
    with torch.no_grad():
        out.norm.weight.copy_((m.norm.weight.double() / s).float())
        out.norm.bias.copy_((m.norm.bias.double() / s).float())
        for a, b in ((out.fc2, m.fc2), (out.fc3, m.fc3)):
            a.weight.copy_((b.weight.double() * s).float())
            a.bias.copy_(b.bias)
    opts = {"linear": {"quant": "w4a8"}}
    plan = {"schema_version": 1, "sites": {k: {"kind": "linear", "awq": e} for k in ("fc2", "fc3")}}
    be, y, y_same = compile_planned_and_folded(m, out, opts, plan, x)
    recs = {r.key: r for r in be.recorder.sites()}
    assert recs["norm:awq"].status == "rewritten" and recs["norm:awq"].details["scales"] == "awq"
    assert not any("awq_alpha" in recs[k].details for k in ("fc2", "fc3"))  # nothing on x
    assert rel_l1(y, y_same) < 1e-6
