"""The paths a GPU takes, run on CPU: inlined op bodies, the Triton impl under the interpreter, an
emulated arch (attnopt/switches.py); and what must happen when a rewrite goes wrong (the fake
impls reject bad operands, internal errors are loud and never cached, missing ops are named)."""

import json

import pytest
import torch
import torch.nn.functional as F

import attnopt
from attnopt import switches
from attnopt.ops.attention_ref import attention_exact
from attnopt.ops.checks import OperandError
from attnopt.passes import manager

from helpers import randn, rel_l1, run_traced_for_arch


class TwoSites(torch.nn.Module):
    """Two attention sites with the same structure (so inlined bodies trace to the same names)."""

    def __init__(self):
        super().__init__()
        self.a0, self.a1 = torch.nn.Identity(), torch.nn.Identity()

    def forward(self, q, k, v):
        o0 = self.a0(F.scaled_dot_product_attention(q, k, v))
        o1 = self.a1(F.scaled_dot_product_attention(q * 1.5, k, v))
        return o0, o1


class Attn(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True) * 2


def _backend(opts, inline):
    be = attnopt.backend(opts, inductor_config={"fx_graph_cache": False})
    be.ctx.inline = inline
    return be


def _sparge_plan(tau0, tau1):
    return {"schema_version": 1, "sites": {
        "#0": {"kind": "attention", "sparsity": {"method": "sparge", "tau": [tau0, tau0], "theta": [-1.0, -1.0]}},
        "#1": {"kind": "attention", "sparsity": {"method": "sparge", "tau": [tau1, tau1], "theta": [-1.0, -1.0]}}}}


def _sparge_site(q, k, v, tau):
    """What one sparge site computes with per-head tau (the op called eagerly: never inlined)."""
    sp = json.dumps({"method": "sparge", "tau": [tau, tau], "theta": [-1.0, -1.0], "topk": None, "sink": True},
                    sort_keys=True)
    return torch.ops.attnopt.sparse_attention(q, k, v, None, None, float("-inf"), False, 0, q.shape[-1] ** -0.5,
                                              "int8", "fp16", True, "cpu", "auto", sp)


def test_inlined_sites_keep_their_own_per_site_constants():
    """Regression: inlined bodies named their constants by position, so two sites of the same
    structure overwrote each other's per-head parameters (every site ran with the last plan's)."""
    q, k, v = (randn(1, 2, 256, 32) for _ in range(3))
    opts = {"attention": {"min_seq_len": 0, "sparsity": {"method": "sparge"}}, "plan": _sparge_plan(0.05, 1.0)}
    want = (_sparge_site(q, k, v, 0.05), _sparge_site(q * 1.5, k, v, 1.0))
    wrong = _sparge_site(q, k, v, 1.0)  # site 0 with site 1's parameters
    assert rel_l1(want[0], wrong) > 0.2  # the plans really differ at site 0
    for inline in ("never", "always"):
        torch._dynamo.reset()
        be = _backend(opts, inline)
        with torch.no_grad():
            out = torch.compile(TwoSites(), backend=be)(q, k, v)
        assert [s.status for s in be.recorder.sites()] == ["rewritten", "rewritten"]
        # inlined, Inductor keeps fp32 intermediates where the eager op rounds to bf16: ~1e-2
        for i in range(2):
            assert rel_l1(out[i], want[i]) < 0.03, f"site {i} (inline={inline}) runs other parameters"


# ------------------------------------------------------------------ internal errors, never cached

def _boom(*args, **kwargs):
    raise RuntimeError("injected failure")


def _compile_run(opts, model, *inputs):
    be = attnopt.backend(opts)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=be)(*inputs)
    return be, out


def test_internal_error_is_loud_and_never_cached(monkeypatch):
    """Regression: a rewrite that raised kept the original graph, Inductor's and AOTAutograd's
    caches stored it, and later healthy processes silently ran the unrewritten graph."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_cache

    q, k, v = (randn(1, 2, 64, 32) for _ in range(3))
    opts = {"attention": {"min_seq_len": 0}}
    with fresh_cache():
        monkeypatch.setattr(manager, "rewrite", _boom)
        with pytest.warns(manager.AttnoptWarning, match=r"site #0 .*injected failure"):
            be, out = _compile_run(opts, Attn(), q, k, v)
        (rec,) = be.recorder.sites()
        assert rec.status == "skipped" and "internal error" in rec.reason and "injected failure" in rec.reason
        assert torch.equal(out, Attn()(q, k, v))  # the site ran as it was
        # inspect (which bypasses the caches) says the same as the real run
        with pytest.warns(manager.AttnoptWarning, match="injected failure"):
            (irec,) = attnopt.inspect(Attn(), q, k, v, options=opts).sites
        assert irec.status == "skipped" and "injected failure" in irec.reason
        monkeypatch.undo()  # a healthy "process" with the same source, options and cache dir
        hits = counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
        be, out = _compile_run(opts, Attn(), q, k, v)
        assert [r.status for r in be.recorder.sites()] == ["rewritten"]
        assert counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"] == hits
        assert rel_l1(out, 2 * attention_exact(q, k, v, is_causal=True)) < 0.03


def test_one_failed_site_leaves_the_others_rewritten(monkeypatch):
    import attnopt.passes.attention_rewrite as AR

    real = AR.rewrite
    calls = []

    def fail_first(graph, site, *args, **kwargs):
        calls.append(site.module)
        if len(calls) == 1:
            raise RuntimeError("injected failure")
        return real(graph, site, *args, **kwargs)

    monkeypatch.setattr(manager, "rewrite", fail_first)
    q, k, v = (randn(1, 2, 64, 32) for _ in range(3))
    with pytest.warns(manager.AttnoptWarning, match="#0"):
        be, out = _compile_run({"attention": {"min_seq_len": 0}}, TwoSites(), q, k, v)
    assert [(r.key, r.status) for r in be.recorder.sites()] == [("#0", "skipped"), ("#1", "rewritten")]
    want = TwoSites()(q, k, v)
    assert torch.equal(out[0], want[0]) and rel_l1(out[1], want[1]) < 0.03


# ------------------------------------------------------------------ fake impls validate

@pytest.mark.parametrize("bad", ["batch", "heads", "head_dim", "kv_len", "dtype", "bias", "keep"])
def test_fake_impls_reject_operands_the_kernels_cannot_run(bad):
    from torch._subclasses.fake_tensor import FakeTensorMode

    shapes = {"q": (2, 4, 16, 32), "k": (2, 2, 24, 32), "v": (2, 2, 24, 32)}
    bias = keep = None
    with FakeTensorMode():
        if bad == "batch":
            shapes["k"] = shapes["v"] = (4, 2, 24, 32)
        elif bad == "heads":
            shapes["k"] = shapes["v"] = (2, 3, 24, 32)
        elif bad == "head_dim":
            shapes["k"] = (2, 2, 24, 64)
        elif bad == "kv_len":
            shapes["v"] = (2, 2, 25, 32)
        q, k, v = (torch.empty(*shapes[n], dtype=torch.bfloat16) for n in ("q", "k", "v"))
        if bad == "dtype":
            v = v.half()
        if bad == "bias":
            bias = torch.empty(2, 3, 16, 24)
        if bad == "keep":
            keep = torch.empty(16, 23, dtype=torch.bool)
        head = (q, k, v, bias, keep, float("-inf"), False, 0, 0.1, "int8", "fp16", True)
        with pytest.raises(OperandError):
            torch.ops.attnopt.attention(*head, False, "cpu", "auto")
        with pytest.raises(OperandError):
            torch.ops.attnopt.sparse_attention(*head, "cpu", "auto", json.dumps({"method": "window", "window": 8}))
        with pytest.raises(OperandError):
            torch.ops.attnopt.attention_probe(*head, False, "cpu", "auto", "", "x/#0")
    good = [torch.randn(*shapes[n]).bfloat16() for n in ("q", "k", "v")] if bad == "bias" else None
    if good is not None:  # the same checks guard eager calls
        with pytest.raises(OperandError):
            torch.ops.attnopt.attention(*good, torch.randn(2, 3, 16, 24), None, float("-inf"), False, 0, 0.1,
                                        "int8", "fp16", True, False, "cpu", "auto")


def test_a_wrong_rewrite_fails_at_compile_time_and_the_site_is_kept(monkeypatch):
    """A rewrite that builds operands the op rejects (here: K with its batch and heads swapped)
    is caught by the fake impl; every node it inserted is removed, the site stays as it was, and
    the compile goes on."""
    import attnopt.passes.attention_rewrite as AR

    real = AR.build_qkv

    def swapped(b, site):
        q4, k4, v4, hq = real(b, site)
        return q4, b.call(torch.ops.aten.permute.default, k4, [1, 0, 2, 3]), v4, hq

    monkeypatch.setattr(AR, "build_qkv", swapped)
    q, k, v = (randn(2, 4, 64, 32) for _ in range(3))
    with pytest.warns(manager.AttnoptWarning, match="OperandError"):
        be, out = _compile_run({"attention": {"min_seq_len": 0}}, Attn(), q, k, v)
    (rec,) = be.recorder.sites()
    assert rec.status == "skipped" and "k/v batch differs" in rec.reason
    assert torch.equal(out, Attn()(q, k, v))


def test_missing_ops_are_named(monkeypatch):
    from attnopt import compiler

    monkeypatch.setattr(compiler, "OP_NAMES", compiler.OP_NAMES + ("not_an_op",))
    with pytest.raises(RuntimeError, match=r"attnopt.not_an_op is not registered.*resolved to"):
        _compile_run({"attention": {"min_seq_len": 0}}, Attn(), *(randn(1, 2, 64, 32) for _ in range(3)))


# ------------------------------------------------------------------ the switches

@pytest.mark.parametrize("var", ["ATTNOPT_INLINE", "ATTNOPT_IMPL", "ATTNOPT_ARCH"])
def test_bad_switch_values_raise_naming_the_variable(var, monkeypatch):
    monkeypatch.setenv(var, "bogus")
    with pytest.raises(attnopt.ConfigError, match=var):
        switches.state()


def test_emulated_arch_drives_formats_and_kernels(monkeypatch):
    from attnopt.codegen.arch import detect_arch

    monkeypatch.setenv("ATTNOPT_ARCH", "sm90")
    assert detect_arch("cpu") == "sm90"
    q, k, v = (randn(1, 2, 64, 32) for _ in range(3))
    rep = attnopt.inspect(Attn(), q, k, v, options={"attention": {"min_seq_len": 0}})
    (rec,) = rep.sites
    assert rec.details["arch"] == "sm90" and rec.details["pv"] == "fp8"  # sm90's pv 'auto'
    assert rec.kernel.startswith("reference/") and rec.kernel.endswith("@sm90")
    monkeypatch.setenv("ATTNOPT_ARCH", "sm80")
    (rec,) = attnopt.inspect(Attn(), q, k, v, options={"attention": {"min_seq_len": 0, "quant": "fp8"}}).sites
    assert rec.status == "skipped" and "sm80" in rec.reason  # the emulated arch refuses what it lacks


def test_triton_impl_needs_the_interpreter_on_cpu(monkeypatch):
    from attnopt.switches import use_triton as _use_triton

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _use_triton(torch.empty(1), "sm90", "triton")
    monkeypatch.setenv("ATTNOPT_IMPL", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _use_triton(torch.empty(1), "sm90", "auto")
    monkeypatch.setenv("ATTNOPT_IMPL", "reference")
    assert not _use_triton(torch.empty(1), "sm90", "auto")


# ------------------------------------------------------------------ forced GPU paths vs the default

class ThreeSites(torch.nn.Module):
    """Several sites with different parameters in one graph: causal SDPA, hand-written GQA with an
    additive mask and its own scale, SDPA with a bool mask and q shorter than k."""

    def forward(self, q, k, v, kv2, bias, keep):
        o0 = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        k2 = kv2.repeat_interleave(2, dim=1)
        s = torch.matmul(q, k2.transpose(-1, -2)) * 0.2 + bias
        o1 = torch.matmul(torch.softmax(s.float(), dim=-1).to(q.dtype), k2)
        o2 = F.scaled_dot_product_attention(q[:, :, -50:], k, v, attn_mask=keep)
        return o0, o1, o2


def _three_inputs():
    q, k, v = (randn(1, 4, 128, 32) for _ in range(3))
    kv2 = randn(1, 2, 128, 32)
    bias = torch.randn(1, 1, 128, 128).bfloat16()
    keep = torch.rand(50, 128) > 0.3
    return q, k, v, kv2, bias, keep


def _three_exact(q, k, v, kv2, bias, keep):
    k2 = kv2.repeat_interleave(2, dim=1)
    return (attention_exact(q, k, v, is_causal=True),
            attention_exact(q, k2, k2, attn_bias=bias, scale=0.2),
            attention_exact(q[:, :, -50:], k, v, keep_mask=keep))


PLAN3 = {"schema_version": 1, "sites": {
    "#0": {"kind": "attention", "sparsity": {"method": "window", "window": [48, 96, 64, 128], "sinks": 16}},
    "#1": {"kind": "attention", "sparsity": {"method": "sparge", "tau": [0.95, 0.9, 0.99, 0.8], "theta": -1.0}},
    "#2": {"kind": "attention", "dense": True}}}


@pytest.mark.parametrize("forced", [{"ATTNOPT_INLINE": "always", "ATTNOPT_IMPL": "reference"},
                                    {"ATTNOPT_INLINE": "never", "ATTNOPT_IMPL": "triton"}],
                         ids=["inlined-reference", "triton-interpreter"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "planned-sparse"])
@pytest.mark.parametrize("arch", ["sm80", "sm90"])
def test_forced_gpu_paths_match_the_default_path(forced, sparse, arch, monkeypatch):
    """The same model compiled the default CPU way (the reference, not inlined) and with the GPU's
    paths forced, emulating a GPU arch (sm90: FP8 P.V, Hopper tiles): same sites, same arithmetic."""
    inputs = _three_inputs()
    opts = {"attention": {"min_seq_len": 0, "pv": "fp8" if arch == "sm90" else "fp16"}}
    if sparse:
        opts["attention"]["sparsity"] = {"method": "window", "window": 64}
        opts["plan"] = PLAN3
    outs, kernels = {}, {}
    for name, env in (("default", {}), ("forced", {"ATTNOPT_ARCH": arch, **forced})):
        for var in ("ATTNOPT_INLINE", "ATTNOPT_IMPL", "ATTNOPT_ARCH"):
            monkeypatch.delenv(var, raising=False)
        for var, value in env.items():
            monkeypatch.setenv(var, value)
        be = attnopt.backend(opts, inductor_config={"fx_graph_cache": False})
        torch._dynamo.reset()
        with torch.no_grad():
            outs[name] = torch.compile(ThreeSites(), backend=be)(*inputs)
        recs = be.recorder.sites()
        assert [r.status for r in recs] == ["rewritten"] * 3, [r.reason for r in recs]
        kernels[name] = [r.kernel for r in recs]
    if forced["ATTNOPT_IMPL"] == "triton":
        assert all(kn.startswith(f"triton-interpreter/{arch}/") for kn in kernels["forced"]), kernels
    bound = 0.05 if arch == "sm90" else 0.03  # FP8 P.V vs 16-bit (README's accuracy table)
    for i, (got, ref, exact) in enumerate(zip(outs["forced"], outs["default"], _three_exact(*inputs))):
        # the default CPU row's tiles differ from sm90's (online-softmax rounding): ~1e-2 apart
        assert rel_l1(got, ref) < (0.03 if arch == "sm90" else 0.02), f"site {i}: forced path vs the default"
        if not sparse:
            assert rel_l1(got, exact) < bound, f"site {i}: forced path vs float64"


def test_triton_impl_runs_the_kernels_in_a_compiled_graph(monkeypatch):
    """ATTNOPT_IMPL=triton: the compiled graph's op calls launch the Triton kernels (counted)."""
    import attnopt.codegen.attention.launch as L

    calls = []
    real = L.attention_triton
    monkeypatch.setattr(L, "attention_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setenv("ATTNOPT_IMPL", "triton")
    q, k, v = (randn(1, 2, 77, 32) for _ in range(3))
    be, out = _compile_run({"attention": {"min_seq_len": 0}}, Attn(), q, k, v)
    assert calls and rel_l1(out, 2 * attention_exact(q, k, v, is_causal=True)) < 0.03


_INLINE_TRITON = r"""
from test_gpu_paths import ThreeSites, _three_inputs, PLAN3

opts = {"attention": {"min_seq_len": 0, "sparsity": {"method": "window", "window": 64}}, "plan": PLAN3}
be = attnopt.backend(opts, inductor_config={"fx_graph_cache": False})


def run():
    with torch.no_grad():
        torch.compile(ThreeSites(), backend=be)(*_three_inputs())


graph = stop_after_trace(run)
print(json.dumps({"attnopt_ops": attnopt_ops(graph), "kernels": [k for k, _ in kernel_nodes(graph)],
                  "statuses": [r.status for r in be.recorder.sites()]}))
"""


def test_triton_bodies_inline_into_the_graph(tmp_path):
    """What a GPU compile does, short of Inductor compiling the kernels: with the interpreter off,
    AOTAutograd traces every site's op into its Triton body (triton_kernel_wrapper_functional
    nodes in the graph Inductor's first pass sees). Under
    the interpreter this cannot run (wrap_triton launches instead of tracing on fake tensors), so
    it runs in a subprocess with TRITON_INTERPRET=0."""
    got = run_traced_for_arch(tmp_path, _INLINE_TRITON, 90)
    assert got["statuses"] == ["rewritten"] * 3
    assert got["attnopt_ops"] == []  # nothing left as an extern call
    assert got["kernels"].count("_attn_fwd") == 3  # one attention kernel per site
    # the static window mask: built at trace time on a GPU; with no device here its build is traced
    assert {"_kv_stats_kernel", "_quant_qkv_kernel", "_sparge_lut_kernel", "_mask_kernel"} <= set(got["kernels"])
