"""Site records: keys unique across graphs, stable across recompiles, and still known when
Inductor's FX graph cache serves a compiled graph (attnopt's passes do not run then)."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import attnopt

OPTS = {"attention": {"min_seq_len": 0}}


class TwoGraphs(torch.nn.Module):
    """Two top-level attention calls split by a graph break: both are '#0' in their own graph."""

    def forward(self, q):
        a = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        torch._dynamo.graph_break()
        return F.scaled_dot_product_attention(a, a, a)


class OneSite(torch.nn.Module):
    def forward(self, q):
        return F.scaled_dot_product_attention(q, q, q)


def _x(n=64):
    return torch.randn(1, 2, n, 32, dtype=torch.bfloat16)


def _run(backend, model, *xs):
    torch._dynamo.reset()
    f = torch.compile(model, backend=backend)
    with torch.no_grad():
        for x in xs:
            f(x)
    return backend.recorder


def test_recompiles_keep_their_keys():
    """A recompile for new shapes is the same frame: same key, so plans keyed by it still apply."""
    be = attnopt.backend(OPTS, inductor_config={"fx_graph_cache": False})
    rec = _run(be, OneSite(), _x(64), _x(96))
    assert len(rec.graphs) == 2
    assert [s.key for s in rec.sites()] == ["#0"]


def test_graph_break_keys_unique_and_plan_reaches_second_graph():
    be = attnopt.backend(OPTS, inductor_config={"fx_graph_cache": False})
    assert sorted(s.key for s in _run(be, TwoGraphs(), _x()).sites()) == ["#0", "#0@g1"]
    plan = {"schema_version": 1, "sites": {"#0@g1": {"kind": "attention", "sparsity": {"method": "window"}}}}
    be = attnopt.backend({**OPTS, "plan": plan}, inductor_config={"fx_graph_cache": False})
    by_key = {s.key: s for s in _run(be, TwoGraphs(), _x()).sites()}
    assert by_key["#0@g1"].details.get("sparse_method") == "window"  # the plan entry found its site
    assert "sparse_method" not in by_key["#0"].details and by_key["#0"].status == "rewritten"


def test_backend_by_name_keys_graphs_like_attnopt_backend(monkeypatch):
    """backend="attnopt" (one fresh call per graph from Dynamo) keys a graph-broken model's sites
    as attnopt.backend() and calibration do, so a plan entry for '#0@g1' reaches only that site."""
    plan = {"schema_version": 1, "sites": {"#0@g1": {"kind": "attention", "sparsity": {"method": "window"}}}}
    opts = {**OPTS, "plan": plan}
    calls = []
    real = attnopt.compiler.AttnoptBackend.__call__
    monkeypatch.setattr(attnopt.compiler.AttnoptBackend, "__call__",
                        lambda self, gm, inputs: calls.append(self) or real(self, gm, inputs))
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(TwoGraphs(), backend="attnopt", options=opts)(_x())
    assert len(calls) == 2 and calls[0] is calls[1], "one backend for both graphs of the compile call"
    by_key = {s.key: s for s in calls[0].recorder.sites()}
    assert sorted(by_key) == ["#0", "#0@g1"]
    assert by_key["#0@g1"].details.get("sparse_method") == "window"
    assert "sparse_method" not in by_key["#0"].details


@pytest.fixture
def attnopt_log():
    """Records of the attnopt logger at INFO (what TORCH_LOGS=attnopt would print)."""
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    log = logging.getLogger("attnopt")
    level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    yield records
    log.removeHandler(handler)
    log.setLevel(level)


def _cached_compile(model=None):
    be = attnopt.backend(OPTS)  # Inductor's FX graph cache on (the default)
    return _run(be, model or TwoGraphs(), _x())


def test_fx_cache_hit_still_records_sites(tmp_path, monkeypatch, attnopt_log):
    """attnopt's passes run before compile_fx looks anything up (capture before AOTAutograd), so
    a graph served from Inductor's / AOTAutograd's caches is rewritten, logged and traced as
    one compiled afresh: same keys, statuses and kernels."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    first = _cached_compile()
    assert [c["served"] for c in first.cache_report()] == ["compiled", "compiled"]
    want = sorted((s.key, s.status, s.kernel) for s in first.sites())
    assert [k for k, _, _ in want] == ["#0", "#0@g1"]
    assert all(status == "rewritten" for _, status, _ in want)
    traced = []
    monkeypatch.setattr(attnopt.passes.manager, "trace_sites", lambda gi, recs: traced.append((gi, [r.key for r in recs])))
    hits = counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
    attnopt_log.clear()
    second = _cached_compile()  # a fresh backend, Dynamo reset: only the on-disk caches remain
    assert counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"] >= hits + 2
    messages = [r.getMessage() for r in attnopt_log]
    assert sum(m.startswith("attention site #0") and "rewritten" in m for m in messages) == 2, messages
    assert sorted(k for _, keys in traced for k in keys) == ["#0", "#0@g1"]
    assert sorted((s.key, s.status, s.kernel) for s in second.sites()) == want
    assert [c["served"] for c in second.cache_report()] == ["cache"] * 2


def test_cache_hit_reports_the_grad_mode_it_was_compiled_under(tmp_path, monkeypatch):
    """Dynamo's graph reads the same with and without no_grad, but the passes decide differently
    (a graph that requires grad keeps its attention): records must not cross grad modes."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model, x = Projected(), _x()

    def compile_once(grad: bool):
        be = attnopt.backend({"attention": {"min_seq_len": 0, "backward": "off"}})
        torch._dynamo.reset()
        f = torch.compile(model, backend=be)
        with torch.set_grad_enabled(grad):
            f(x)
        return [s.status for s in be.recorder.sites()]

    assert compile_once(False) == ["rewritten"]
    assert compile_once(True) == ["skipped"]
    assert compile_once(False) == ["rewritten"]  # served from the cache, with its own records


class Projected(torch.nn.Module):
    """Attention after a projection whose weight requires grad, as a freshly loaded model's does."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(32, 32).to(torch.bfloat16)

    def forward(self, q):
        q = self.proj(q)
        return F.scaled_dot_product_attention(q, q, q)
