"""The backend: found by name in a fresh interpreter, configurable, cache-safe."""

import subprocess

import pytest
import sys
import textwrap

import torch
import torch.nn.functional as F

import attnopt
from helpers import ALL_SITES, randn


class Attn(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_backend_by_name_without_import_in_fresh_interpreter():
    code = textwrap.dedent("""
        import sys, torch, torch.nn.functional as F
        assert "attnopt" not in sys.modules
        f = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                          backend="attnopt", options={"attention": {"min_seq_len": 0}})
        q = torch.randn(1, 2, 77, 32, dtype=torch.bfloat16)
        out = f(q, q, q)
        assert "attnopt" in sys.modules
        ref = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        err = ((out.float() - ref.float()).abs().sum() / ref.float().abs().sum()).item()
        assert err < 0.03, err
        print("OK", err)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OK" in r.stdout


def test_backend_factory_with_mode():
    be = attnopt.backend(ALL_SITES, mode="default")
    torch._dynamo.reset()
    q = randn(1, 2, 77, 32)
    out = torch.compile(Attn(), backend=be)(q, q, q)
    ref = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert not torch.equal(out, ref)  # rewritten (possibly served from the FX graph cache)
    assert ((out.float() - ref.float()).abs().sum() / ref.float().abs().sum()) < 0.03


def test_backend_by_name_takes_torch_compile_mode(monkeypatch):
    """torch.compile(..., backend="attnopt", mode=...) passes mode to the backend (it raised).
    torch.compile takes mode or options, not both: default options here."""
    modes = []
    real = attnopt.compiler.AttnoptBackend.__init__
    monkeypatch.setattr(attnopt.compiler.AttnoptBackend, "__init__",
                        lambda self, *a, **kw: modes.append(kw.get("mode")) or real(self, *a, **kw))
    torch._dynamo.reset()
    q = randn(1, 2, 160, 32)  # above the default min_seq_len
    out = torch.compile(Attn(), backend="attnopt", mode="max-autotune-no-cudagraphs")(q, q, q)
    assert modes == ["max-autotune-no-cudagraphs"]
    ref = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert not torch.equal(out, ref) and ((out.float() - ref.float()).abs().sum() / ref.float().abs().sum()) < 0.03


def _run(options, q, k, v):
    torch._dynamo.reset()
    return torch.compile(Attn(), backend=attnopt.backend(options))(q, k, v)


def test_cache_never_serves_a_graph_compiled_under_other_options():
    from torch._dynamo.utils import counters

    q, k, v = randn(1, 2, 77, 32), randn(1, 2, 77, 32), randn(1, 2, 77, 32)
    dense = _run({"attention": {"enabled": False}}, q, k, v)
    int8 = _run(ALL_SITES, q, k, v)
    fp8 = _run({"attention": {"min_seq_len": 0, "pv": "fp8"}}, q, k, v)
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(dense, exact)  # untouched: torch's own kernel
    assert not torch.equal(int8, dense) and not torch.equal(fp8, int8)  # three behaviours
    # the same options again: Inductor's FX graph cache serves it, with the same result
    hits = counters["inductor"]["fxgraph_cache_hit"]
    again = _run(ALL_SITES, q, k, v)
    assert torch.equal(again, int8)
    assert counters["inductor"]["fxgraph_cache_hit"] > hits


def test_pass_uuid_covers_options_and_arch():
    from attnopt.config import normalize_options
    from attnopt.passes.manager import CacheKeyPass, PassContext

    a = CacheKeyPass(PassContext(normalize_options({}))).uuid()
    assert a == CacheKeyPass(PassContext(normalize_options({}))).uuid()
    assert a != CacheKeyPass(PassContext(normalize_options({"attention": {"pv": "fp8"}}))).uuid()
    assert a != CacheKeyPass(PassContext(normalize_options({"arch": "sm90"}))).uuid()
    plans = [{"schema_version": 1, "sites": {"#0": {"kind": "attention", "sparsity": {"method": m}}}}
             for m in ("window", "radial")]
    with_plan = [CacheKeyPass(PassContext(normalize_options({"plan": p}))).uuid() for p in plans]
    assert len({a, *with_plan}) == 3, "another plan never reuses a cached graph"


def test_pass_order_lists_every_pass_where_it_runs():
    """PASS_ORDER is the one list of attnopt's passes, in the order they run: everything that
    rewrites runs in the backend (linears on Dynamo's graph, then capture and attention on the aten
    graph), and the Inductor slots it names are exactly what config_patches installs."""
    from torch._inductor import config as inductor_config

    from attnopt.config import normalize_options
    from attnopt.passes import manager as M

    where = [w for w, _, _ in M.PASS_ORDER]
    in_backend = (M.DYNAMO_GRAPH, M.ATEN_GRAPH)
    assert where == sorted(where, key=lambda w: w not in in_backend), "the backend's passes come first"
    assert [run for w, _, run in M.PASS_ORDER if w in in_backend] == [M.run_linear, M.trace_to_aten, M.AttentionPass]
    slots = [w for w in where if w not in in_backend]
    patches = M.config_patches(M.PassContext(normalize_options({})), [torch.randn(2)])
    assert list(patches) == slots and all(hasattr(inductor_config, s) for s in slots)
    assert [type(p) for p in patches.values()] == [run for w, _, run in M.PASS_ORDER if w in slots]


def _compiled_code(be, *inputs):
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    out, code = run_and_get_code(torch.compile(Attn(), backend=be), *inputs)
    return out, "\n".join(code)


def test_ops_inline_into_inductor_code():
    """With inlining (the default on CUDA), the op's body lands in Inductor's generated code
    instead of an extern call; on CPU that body is the reference arithmetic."""
    q = randn(1, 2, 77, 32)
    extern_be = attnopt.backend(ALL_SITES, inductor_config={"fx_graph_cache": False})
    out_extern, code_extern = _compiled_code(extern_be, q, q, q)
    assert "attnopt.attention" in code_extern
    inline_be = attnopt.backend(ALL_SITES, inductor_config={"fx_graph_cache": False})
    inline_be.ctx.inline = "always"
    out_inline, code_inline = _compiled_code(inline_be, q, q, q)
    assert "attnopt.attention" not in code_inline
    assert ((out_inline.float() - out_extern.float()).abs().max()) < 2e-2


@pytest.mark.gpu
def test_cuda_kernels_are_inlined_and_run_under_cuda_graphs():
    q = torch.randn(2, 8, 1024, 128, device="cuda", dtype=torch.float16)
    be = attnopt.backend({"attention": {"min_seq_len": 0}}, mode="reduce-overhead")
    torch._dynamo.reset()
    f = torch.compile(Attn(), backend=be, fullgraph=True)
    for _ in range(3):  # warm-up, record, replay
        out = f(q, q, q)
    ref = F.scaled_dot_product_attention(q.double(), q.double(), q.double(), is_causal=True)
    assert ((out.double() - ref).abs().sum() / ref.abs().sum()) < 0.05
    _, code = _compiled_code(attnopt.backend({"attention": {"min_seq_len": 0}}), q, q, q)
    assert "_attn_fwd" in code and "attnopt.attention" not in code


def test_torch_compile_wrapper_lookup_finds_the_wrapper(monkeypatch):
    """backend="attnopt" shares one AttnoptBackend per torch.compile call by finding torch's private
    `_TorchCompileWrapper` in its caller's frame (compiler.torch_compile_wrapper; torch has no public
    per-call hook). If a torch upgrade renames or restructures the wrapper this fails here, instead of
    every graph silently getting a fresh backend. The fallback's warning needs Dynamo's tracing context."""
    from torch._guards import TracingContext

    found, tracing = [], []
    real = attnopt.compiler.torch_compile_wrapper

    def spy(caller):
        found.append(real(caller))
        tracing.append(TracingContext.try_get())
        return found[-1]

    monkeypatch.setattr(attnopt.compiler, "torch_compile_wrapper", spy)
    torch._dynamo.reset()
    q = randn(1, 2, 160, 32)
    torch.compile(Attn(), backend="attnopt")(q, q, q)
    assert len(found) == 1
    assert isinstance(found[0], torch._TorchCompileWrapper), "torch.compile's wrapper was not found"
    assert found[0].__dict__.get("_attnopt_backend") is not None
    assert tracing[0] is not None
    assert real(sys._getframe(0)) is None  # any other caller: no wrapper


def test_backend_by_name_warns_when_the_wrapper_is_not_found(monkeypatch, caplog):
    """Should the lookup fail (a changed torch), the graph is still compiled, and the log says why
    graphs no longer share site keys."""
    monkeypatch.setattr(attnopt.compiler, "torch_compile_wrapper", lambda caller: None)
    monkeypatch.setattr(attnopt.compiler, "_warned_unshared", False)
    torch._dynamo.reset()
    q = randn(1, 2, 160, 32)
    with caplog.at_level("WARNING", logger="attnopt"):
        out = torch.compile(Attn(), backend="attnopt")(q, q, q)
    assert any("could not find torch.compile's wrapper" in r.getMessage() for r in caplog.records)
    ref = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert ((out.float() - ref.float()).abs().sum() / ref.float().abs().sum()) < 0.03
