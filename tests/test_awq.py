"""AWQ scales for w4a16 linears: the search (never worse than round-to-nearest on its rows,
clearly better with outlier input channels, on held-out rows too), the plan entry's validation,
and the compiled model applying the scales as (x / s) Q(W s)^T."""

import pytest
import torch

from attnopt.calibration.awq import awq_scales, awq_search, w4a16_output
from attnopt.calibration.calibrate import _add_awq
from attnopt.calibration.capture import Captured
from attnopt.compiler import AttnoptBackend
from attnopt.config import PLAN_KIND, PLAN_SCHEMA_VERSION, ConfigError, normalize_options
from attnopt.ops import linear_ref as L
from attnopt.plan import Plan

from helpers import compile_planned_and_folded


def _rel_l1(y, ref):
    return float((y.double() - ref).abs().sum() / ref.abs().sum())


def _acts(m, k, outliers, gen):
    """Rows with `outliers` input channels 30x larger than the rest (as LLM activations have)."""
    x = torch.randn(m, k, generator=gen)
    x[:, :outliers] *= 30
    return x


def test_alpha_zero_is_round_to_nearest_and_scales_straddle_one():
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(32, 256, generator=gen), torch.randn(16, 256, generator=gen)
    mean_abs = x.abs().mean(dim=0)
    assert torch.equal(awq_scales(mean_abs, 0.0), torch.ones(256, dtype=torch.float64))
    assert torch.equal(w4a16_output(x, w, awq_scales(mean_abs, 0.0)), w4a16_output(x, w, None))
    s = awq_scales(mean_abs, 0.7)
    assert float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-12)
    order = mean_abs.argsort()
    assert bool((s[order].diff() >= 0).all())  # larger mean |x|, larger scale
    mean_abs[5] = 0  # a channel never seen non-zero takes the smallest
    assert float(awq_scales(mean_abs, 0.7)[5]) == pytest.approx(float(awq_scales(mean_abs, 0.7).min()))


@pytest.mark.parametrize("outliers", [0, 6])
def test_search_is_never_worse_than_rtn_and_clearly_better_with_outlier_channels(outliers):
    gen = torch.Generator().manual_seed(0)
    k, n = 256, 128
    w = torch.randn(n, k, generator=gen) * 0.05
    calib, held = _acts(256, k, outliers, gen), _acts(512, k, outliers, gen)
    c = awq_search(calib, w)
    assert c.awq_rel_l1 <= c.rtn_rel_l1  # alpha 0 is on the grid
    ref = held.double() @ w.double().T
    rtn, awq = _rel_l1(w4a16_output(held, w, None), ref), _rel_l1(w4a16_output(held, w, c.scales), ref)
    if outliers:
        assert c.alpha > 0 and awq < 0.8 * rtn, (rtn, awq)
    else:
        assert awq <= 1.02 * rtn, (rtn, awq)


def test_plan_awq_entries_are_validated():
    def plan(awq):
        return {"schema_version": PLAN_SCHEMA_VERSION, "kind": PLAN_KIND,
                "sites": {"fc": {"kind": "linear", "quant": "w4a16", "awq": awq}}}

    ok = Plan.from_dict(plan({"alpha": 0.5, "scales": [0.5, 2], "rel_l1": {"rtn": 0.1, "awq": 0.05}}))
    assert ok.sites["fc"]["awq"] == {"alpha": 0.5, "scales": [0.5, 2.0], "rel_l1": {"rtn": 0.1, "awq": 0.05}}
    for bad, where in (({"alpha": 1.5, "scales": [1.0]}, r"awq\.alpha"),
                       ({"alpha": True, "scales": [1.0]}, r"awq\.alpha"),
                       ({"alpha": 0.5, "scales": [1.0, 0.0]}, r"awq\.scales"),
                       ({"alpha": 0.5, "scales": [1.0, float("nan")]}, r"awq\.scales"),
                       ({"alpha": 0.5, "scales": []}, r"awq\.scales"),
                       ({"alpha": 0.5}, r"fc\.awq:"), ({"alpha": 0.5, "scales": [1.0], "beta": 1}, r"fc\.awq:"),
                       ([0.5], r"fc\.awq:")):
        with pytest.raises(ConfigError, match=where):
            Plan.from_dict(plan(bad))


def _outlier_input(gen=None):
    x = torch.randn(2, 64, 256, generator=gen)
    x[..., :6] *= 30
    return x


class _TwoLinears(torch.nn.Module):
    """fc1 reads the model's input (nothing to fold into: x * (1 / s) in the graph); fc2 and fc3
    read a LayerNorm with six large-gain channels (searched together, one s, folded into its gain
    and bias)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = torch.nn.Linear(256, 256), torch.nn.LayerNorm(256), torch.nn.Linear(256, 128)
        self.fc3 = torch.nn.Linear(256, 128)
        with torch.no_grad():
            self.norm.weight[:6] = 25.0
            self.norm.bias.normal_()

    def forward(self, x):
        h = self.norm(self.fc1(x))
        return self.fc2(h) * self.fc3(h)


class _WrittenOut(torch.nn.Module):
    """The same model with the scales written out: fc1 reads x * (1 / s1) and holds W1 s1, the
    norm holds gamma / s2 and beta / s2, fc2 and fc3 hold W s2."""

    def __init__(self, m, s1, s2):
        super().__init__()
        self.inv1 = (1.0 / s1).float()
        self.fc1, self.norm, self.fc2 = torch.nn.Linear(256, 256), torch.nn.LayerNorm(256), torch.nn.Linear(256, 128)
        self.fc3 = torch.nn.Linear(256, 128)
        with torch.no_grad():
            self.fc3.weight.copy_((m.fc3.weight.double() * s2).float())
            self.fc3.bias.copy_(m.fc3.bias)
            self.fc1.weight.copy_((m.fc1.weight.double() / self.inv1.double()).float())
            self.norm.weight.copy_((m.norm.weight.double() / s2).float())
            self.norm.bias.copy_((m.norm.bias.double() / s2).float())
            self.fc2.weight.copy_((m.fc2.weight.double() * s2).float())
            self.fc1.bias.copy_(m.fc1.bias)
            self.fc2.bias.copy_(m.fc2.bias)

    def forward(self, x):
        h = self.norm(self.fc1(x * self.inv1))
        return self.fc2(h) * self.fc3(h)


def test_calibrate_searches_w4a16_linears_reading_one_tensor_together():
    """calibrate(awq=True)'s step on captured rows: sites with bit-equal per-channel max |x| share
    one search; a site the plan puts in another format gets none."""
    gen = torch.Generator().manual_seed(3)
    xa, xc = _acts(128, 256, 4, gen), _acts(128, 256, 4, gen)
    w = {k: torch.randn(64, 256, generator=gen) for k in "abcd"}
    calls = {k: [{"kind": "linear", "absmax": x.abs().amax(dim=0), "x": x}]
             for k, x in (("a", xa), ("b", xa), ("c", xc), ("d", xc))}
    cap = Captured(calls, {}, {k: (v, None) for k, v in w.items()}, "cpu", None, "", False)
    plan = Plan(sites={k: {"kind": "linear"} for k in "abc"} | {"d": {"kind": "linear", "quant": "w8a8"}})
    _add_awq(plan, cap, normalize_options({"linear": {"quant": "w4a16"}}))
    assert plan.sites["a"]["awq"] == plan.sites["b"]["awq"] == awq_search(xa, torch.cat([w["a"], w["b"]])).entry()
    assert plan.sites["c"]["awq"] == awq_search(xc, w["c"]).entry() and "awq" not in plan.sites["d"]
    assert plan.meta["awq"]["sites"]["a"]["searched_with"] == ["a", "b"]
    assert Plan.from_dict(plan.to_dict()).sites["a"]["awq"]["scales"] == plan.sites["a"]["awq"]["scales"]


def test_compiled_plan_applies_the_awq_scales_folded_or_on_x_and_beats_rtn():
    torch.manual_seed(0)
    m = _TwoLinears().eval()
    opts = {"linear": {"quant": "w4a16"}, "on_cpu": "emulate"}
    with torch.no_grad():  # the plan calibrate(awq=True) writes (its search is tested below)
        x0 = _outlier_input().reshape(-1, 256)
        e1 = awq_search(x0, m.fc1.weight).entry()
        e2 = awq_search(m.norm(m.fc1(x0)), torch.cat([m.fc2.weight, m.fc3.weight])).entry()
    for e in (e1, e2):
        assert e["alpha"] > 0 and e["rel_l1"]["awq"] < e["rel_l1"]["rtn"]
    plan = Plan(sites={"fc1": {"kind": "linear", "awq": e1}, "fc2": {"kind": "linear", "awq": e2},
                       "fc3": {"kind": "linear", "awq": e2}})
    x = _outlier_input()
    s1, s2 = (torch.tensor(e["scales"], dtype=torch.float64) for e in (e1, e2))
    with torch.no_grad():
        torch._dynamo.reset()
        be = AttnoptBackend(normalize_options({**opts, "plan": plan.to_dict()}))
        y_awq = torch.compile(m, backend=be)(x)
        torch._dynamo.reset()
        y_same = torch.compile(_WrittenOut(m, s1, s2).eval(), backend="attnopt", options=opts)(x)
        # the float model, and plain round-to-nearest with the op's arithmetic
        h = m.fc1(x)
        ref = (m.fc2(m.norm(h)) * m.fc3(m.norm(h))).double()
        h_rtn = m.norm(L.linear_w4a16_ref(x, *L.quantize_weight_int4(m.fc1.weight), m.fc1.bias))
        y_rtn = (L.linear_w4a16_ref(h_rtn, *L.quantize_weight_int4(m.fc2.weight), m.fc2.bias)
                 * L.linear_w4a16_ref(h_rtn, *L.quantize_weight_int4(m.fc3.weight), m.fc3.bias))
    torch._dynamo.reset()
    recs = {r.key: r for r in be.recorder.sites()}
    assert recs["norm:awq"].status == "rewritten" and recs["norm:awq"].details["scales"] == "awq"
    assert recs["fc1"].details["awq_alpha"] == e1["alpha"] and not recs["fc1"].details["smoothed"]
    assert "awq_alpha" not in recs["fc2"].details
    assert _rel_l1(y_awq, y_same.double()) < 1e-6  # the same arithmetic as the scales written out
    rtn, awq = _rel_l1(y_rtn, ref), _rel_l1(y_awq, ref)
    assert awq < 0.9 * rtn, (rtn, awq)


class _SwiGLU(torch.nn.Module):
    """RMSNorm -> gate / up -> silu(gate) * up -> down: 1 / s of gate / up folds into the norm's
    gain, down's into up's rows."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.RMSNorm(256)
        self.gate, self.up, self.down = (torch.nn.Linear(256, 256, bias=False), torch.nn.Linear(256, 256),
                                         torch.nn.Linear(256, 128, bias=False))
        with torch.no_grad():
            self.norm.weight[:6] = 25.0
            self.up.weight[:4] *= 20  # large channels into down too

    def forward(self, x):
        h = self.norm(x)
        return self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


def test_awq_scales_fold_into_a_norm_and_into_up_for_down():
    torch.manual_seed(0)
    m = _SwiGLU().eval()
    opts = {"linear": {"quant": "w4a16"}, "on_cpu": "emulate"}
    with torch.no_grad():
        x0 = torch.randn(128, 256)
        h = m.norm(x0)
        en = awq_search(h, torch.cat([m.gate.weight, m.up.weight])).entry()
        ed = awq_search(torch.nn.functional.silu(m.gate(h)) * m.up(h), m.down.weight).entry()
    assert en["alpha"] > 0 and ed["alpha"] > 0
    plan = Plan(sites={"gate": {"kind": "linear", "awq": en}, "up": {"kind": "linear", "awq": en},
                       "down": {"kind": "linear", "awq": ed}})
    sn, sd = (torch.tensor(e["scales"], dtype=torch.float64) for e in (en, ed))
    out = _SwiGLU().eval()  # the scales written out, as the folds compute them (float64, rounded once)
    with torch.no_grad():
        out.norm.weight.copy_((m.norm.weight.double() / sn).float())
        out.gate.weight.copy_((m.gate.weight.double() * sn).float())
        out.up.weight.copy_((m.up.weight.double() * sn[None, :] / sd[:, None]).float())
        out.up.bias.copy_((m.up.bias.double() / sd).float())
        out.down.weight.copy_((m.down.weight.double() * sd).float())
    be, y, y_same = compile_planned_and_folded(m, out, opts, plan.to_dict(), torch.randn(2, 32, 256))
    recs = {r.key: r for r in be.recorder.sites()}
    assert recs["norm:awq"].status == "rewritten" and recs["up:awq"].status == "rewritten", \
        {k: (r.status, r.reason) for k, r in recs.items()}
    assert not any("awq_alpha" in recs[k].details for k in ("gate", "up", "down"))  # nothing on x
    assert _rel_l1(y, y_same.double()) < 1e-6
