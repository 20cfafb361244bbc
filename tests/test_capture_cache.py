"""The capture cache (passes/capture_cache.py): a warm start rebuilds the rewritten aten graph
instead of tracing it, and everything downstream comes out exactly as from a fresh trace: the
same outputs bit for bit, the same site records, and Inductor's / AOTAutograd's caches hit."""

import glob
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import attnopt
from attnopt import schedule as S
from attnopt.demo_model import build
from attnopt.passes import manager


@pytest.fixture
def cache_on(tmp_path, monkeypatch):
    """Capture cache on (the test suite turns it off elsewhere), in a fresh Inductor cache dir;
    returns the list that counts real traces."""
    monkeypatch.setenv("ATTNOPT_CAPTURE_CACHE", "on")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    traces = []
    real = manager.trace_to_aten
    monkeypatch.setattr(manager, "trace_to_aten", lambda *a, **k: traces.append(1) or real(*a, **k))
    return traces


def _entries(tmp_path) -> list[str]:
    return glob.glob(str(tmp_path / "attnopt_capture" / "*" / "*.json"))


def _compile_and_run(model, args, opts, grad=False, **compile_kw):
    """A cold Dynamo (reset), a fresh backend; returns (outputs, backend)."""
    torch._dynamo.reset()
    be = attnopt.backend(opts)
    f = torch.compile(model, backend=be, **compile_kw)
    with torch.set_grad_enabled(grad):
        out = f(*args)
    return out, be


def _records(be) -> list[dict]:
    return sorted((s.to_dict() for s in be.recorder.sites()), key=lambda d: d["key"])


OPTS = {"attention": {"min_seq_len": 0}}


def test_a_warm_compile_is_rebuilt_and_matches_the_traced_one(cache_on, tmp_path, monkeypatch):
    """The demo model (SDPA and spelled-out attention, GQA, in-graph causal masks): the second
    compile does not trace, its records and outputs equal the first's and a cache-off compile's,
    and compile_fx's caches serve it (the rebuilt graph keys as the traced one)."""
    model, (ids,) = build(size="tiny", seed=3)
    model.eval()
    first, be1 = _compile_and_run(model, (ids,), OPTS)
    assert len(cache_on) == 1 and len(_entries(tmp_path)) == 1
    assert [c["captured"] for c in be1.recorder.cache_report()] == ["traced"]
    assert sum(s.status == "rewritten" for s in be1.recorder.sites()) == 4

    hits = counters["aot_autograd"]["autograd_cache_hit"]
    second, be2 = _compile_and_run(model, (ids,), OPTS)
    assert len(cache_on) == 1, "the warm compile traced again"
    assert be2.recorder.cache_report() == [{"graph": 0, "served": "cache", "captured": "cache"}]
    assert counters["aot_autograd"]["autograd_cache_hit"] == hits + 1
    assert torch.equal(first, second)
    assert _records(be2) == _records(be1)

    monkeypatch.setenv("ATTNOPT_CAPTURE_CACHE", "off")
    fresh, be3 = _compile_and_run(model, (ids,), OPTS)
    assert len(cache_on) == 2 and torch.equal(fresh, first) and _records(be3) == _records(be1)


def test_the_key_follows_options_shapes_and_grad_mode(cache_on, tmp_path):
    model, (ids,) = build(size="tiny", seed=4)
    model.eval()
    _compile_and_run(model, (ids,), OPTS)
    _compile_and_run(model, (ids,), {"attention": {"min_seq_len": 0, "quant": "fp8"}})
    _compile_and_run(model, (ids[:1, :77],), OPTS)
    assert len(cache_on) == 3 and len(_entries(tmp_path)) == 3
    _, be = _compile_and_run(model, (ids[:1, :77],), OPTS)  # seen before: rebuilt
    assert len(cache_on) == 3 and be.recorder.cache_report()[0]["captured"] == "cache"


class Tiny(torch.nn.Module):
    """One attention layer whose q/k/v/o projections the linear pass quantizes."""

    def __init__(self, dim=64, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.o = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(a.transpose(1, 2).reshape(b, n, d))


def test_a_rebuilt_graph_reads_this_models_quantized_weights(cache_on, monkeypatch):
    """The linear pass's quantized weights are constants of the aten graph: a rebuilt graph takes
    them from this compile's Dynamo graph, so a second model of the same shape gets its own."""
    opts = {"attention": {"min_seq_len": 0}, "linear": {"quant": "w8a8"}}
    x = torch.randn(2, 77, 64)
    a, b = Tiny().eval(), Tiny().eval()
    out_a, _ = _compile_and_run(a, (x,), opts)
    out_b, be = _compile_and_run(b, (x,), opts)
    assert len(cache_on) == 1 and be.recorder.cache_report()[0]["captured"] == "cache"
    assert sum(s.kind == "linear" and s.status == "rewritten" for s in be.recorder.sites()) == 2
    monkeypatch.setenv("ATTNOPT_CAPTURE_CACHE", "off")
    want_b, _ = _compile_and_run(b, (x,), opts)
    assert torch.equal(out_b, want_b) and not torch.equal(out_a, out_b)


class TwoBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])

    def forward(self, q, k, v):
        return [F.scaled_dot_product_attention(q * (i + 1), k, v) for i in range(2)]


def test_scheduled_sites_keep_their_step_input(cache_on):
    """A graph with scheduled sites takes the step tensor as an extra input: the rebuilt graph
    declares it again, so each step still runs its own variant."""
    opts = {"attention": {"min_seq_len": 0, "schedule": [{"steps": [0, 2], "use": {"quant": "none"}}]}}
    q, k, v = (torch.randn(1, 2, 200, 32, dtype=torch.bfloat16) for _ in range(3))
    outs = []
    for _ in range(2):
        torch._dynamo.reset()
        f = torch.compile(TwoBlocks(), backend=attnopt.backend(opts))
        with torch.no_grad():
            outs.append([torch.cat(_at(f, (q, k, v), i)) for i in range(4)])
    assert len(cache_on) == 1
    for early, late in zip(outs[0], outs[1]):
        assert torch.equal(early, late)
    assert torch.equal(outs[0][0], outs[0][1]) and not torch.equal(outs[0][1], outs[0][2])


def _at(f, args, i):
    with S.step(i, 4):
        return f(*args)


def test_training_graphs_give_the_same_gradients(cache_on):
    model = Tiny().train()
    x = torch.randn(2, 77, 64)
    grads = []
    for _ in range(2):
        model.zero_grad()
        out, _ = _compile_and_run(model, (x,), OPTS, grad=True)
        out.float().square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert len(cache_on) == 1
    assert all(torch.equal(a, b) for a, b in zip(*grads))


class NoSite(torch.nn.Module):
    """A softmax that is no attention: the capture runs, nothing is rewritten."""

    def forward(self, x):
        return torch.softmax(x, -1) * 2


def test_an_unchanged_graph_is_remembered_as_unchanged(cache_on, tmp_path):
    x = torch.randn(4, 33)
    out1, _ = _compile_and_run(NoSite(), (x,), OPTS)
    out2, be = _compile_and_run(NoSite(), (x,), OPTS)
    assert len(cache_on) == 1 and be.recorder.cache_report()[0]["captured"] == "cache"
    assert torch.equal(out1, out2)
    (entry,) = _entries(tmp_path)
    assert json.load(open(entry))["nodes"] is None


def test_a_damaged_entry_is_a_miss(cache_on, tmp_path):
    model, (ids,) = build(size="tiny", seed=5)
    model.eval()
    want, _ = _compile_and_run(model, (ids,), OPTS)
    (entry,) = _entries(tmp_path)
    with open(entry, "w") as f:
        f.write('{"format": 1, "nodes": [["bogus"')
    got, be = _compile_and_run(model, (ids,), OPTS)
    assert len(cache_on) == 2 and torch.equal(got, want)
    assert be.recorder.cache_report()[0]["captured"] == "traced"


def test_off_when_inductor_caches_are_off_and_under_inspect(cache_on, tmp_path):
    model, (ids,) = build(size="tiny", seed=6)
    model.eval()
    torch._dynamo.reset()
    be = attnopt.backend(OPTS, inductor_config={"fx_graph_cache": False})
    with torch.no_grad():
        torch.compile(model, backend=be)(ids)
    assert not os.path.exists(tmp_path / "attnopt_capture")
    attnopt.inspect(model, ids, options=OPTS, timing_runs=1)
    assert not os.path.exists(tmp_path / "attnopt_capture")


def test_dynamic_shapes_stay_right(cache_on):
    """A dynamic graph is stored only if its trace added no guard; a warm compile runs every
    length as the fresh one did."""
    model = Tiny().eval()
    outs, captured = [], []
    for _ in range(2):
        torch._dynamo.reset()
        be = attnopt.backend(OPTS)
        f = torch.compile(model, backend=be, dynamic=True)
        with torch.no_grad():
            outs.append([f(torch.ones(2, n, 64) + torch.arange(n)[:, None] / n) for n in (77, 200, 1)])
        captured.append([c["captured"] for c in be.recorder.cache_report()])
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    # n=1 is specialized (a second graph); the symbolic one's trace adds no guard, so it is kept too
    assert captured == [["traced", "traced"], ["cache", "cache"]]


class Sdpa(torch.nn.Module):
    def forward(self, q):
        return F.scaled_dot_product_attention(q, q, q) + torch.ones(1)


def _sdpa_compile(q):
    torch._dynamo.reset()
    be = attnopt.backend(OPTS)
    with torch.no_grad():
        out = torch.compile(Sdpa(), backend=be)(q)
    site = be.recorder.sites()[0]
    return out, (site.status, site.dtype), be.recorder.cache_report()[0]["captured"]


def test_global_state_the_trace_bakes_in_is_keyed(cache_on):
    """Autocast and the default dtype change the aten graph though Dynamo's code reads the same."""
    q = torch.randn(1, 2, 128, 16)
    plain = _sdpa_compile(q)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = _sdpa_compile(q)
    assert plain[1] == ("skipped", "float32") and cast[1] == ("rewritten", "bfloat16") and cast[2] == "traced"
    torch.set_default_dtype(torch.float64)
    try:
        wide = _sdpa_compile(q)
    finally:
        torch.set_default_dtype(torch.float32)
    assert wide[0].dtype == torch.float64 and wide[2] == "traced"
    assert _sdpa_compile(q)[2] == "cache" and len(cache_on) == 3


SCALE = [2.0]


@torch._dynamo.allow_in_graph
def _user_scale(x):
    return x * SCALE[0]


class UserFn(torch.nn.Module):
    def forward(self, q):
        return _user_scale(F.scaled_dot_product_attention(q, q, q))


def test_graphs_calling_user_functions_are_not_kept(cache_on, tmp_path):
    """A function Dynamo keeps whole is traced through; the key only has its name, so such a
    graph is never stored (its body may change under the same name)."""
    q = torch.randn(1, 2, 128, 16, dtype=torch.bfloat16)
    outs = []
    for scale in (2.0, 3.0):
        SCALE[0] = scale
        torch._dynamo.reset()
        with torch.no_grad():
            outs.append(torch.compile(UserFn(), backend=attnopt.backend(OPTS))(q))
    assert len(cache_on) == 2 and not _entries(tmp_path)
    assert torch.allclose(outs[1].float(), outs[0].float() * 1.5, rtol=1e-2)


def test_an_entry_that_reads_but_does_not_rebuild_is_a_miss(cache_on, tmp_path):
    """Parseable JSON with an unknown op, a dangling node or an unknown record field: traced."""
    q = torch.randn(1, 2, 128, 16, dtype=torch.bfloat16)
    want = _sdpa_compile(q)[0]
    (path,) = _entries(tmp_path)
    good = json.load(open(path))
    ops = [i for i, n in enumerate(good["nodes"]) if n["op"] == "call_function"]
    for damage in ("op", "ref", "record"):
        bad = json.loads(json.dumps(good))
        if damage == "op":
            bad["nodes"][ops[0]]["target"] = ["op", "aten", "no_such_op", "default"]
        elif damage == "ref":
            bad["nodes"][ops[-1]]["args"] = ["tuple", [["node", "nowhere"]]]
        else:
            bad["records"][1][0][1].append(["extra", 1])
        with open(path, "w") as f:
            json.dump(bad, f)
        got, _, captured = _sdpa_compile(q)
        assert captured == "traced" and torch.equal(got, want), damage


@torch._dynamo.assume_constant_result
def _scale():
    return torch.tensor(0.125)


class ScalarConstant(torch.nn.Module):
    def forward(self, q):
        return torch.softmax(q @ q.transpose(-1, -2) * _scale(), -1) @ q


def test_a_graph_that_cannot_be_keyed_compiles_as_without_the_cache(cache_on):
    """A 0-dim constant of Dynamo's graph is keyed by its value (it once made the key raise, which
    failed the compile: any error while keying now just means a trace)."""
    q = torch.randn(1, 2, 128, 16)
    for _ in range(2):
        torch._dynamo.reset()
        with torch.no_grad():
            out = torch.compile(ScalarConstant(), backend=attnopt.backend(OPTS))(q)
        assert torch.allclose(out, torch.softmax(q @ q.transpose(-1, -2) * 0.125, -1) @ q, atol=0.05)
    assert len(cache_on) == 1  # keyed by the constant's value and served the second time


def test_graphs_with_triton_kernel_calls_are_not_written_down():
    """A Triton kernel call's arguments index a per-process side table (and the kernel source is
    not keyed): a graph holding one, e.g. the capture of a linear op inlined on CUDA, is not
    stored, nor is a Dynamo graph calling a user's kernel."""
    from attnopt.passes import capture_cache

    g = torch.fx.Graph()
    x = g.placeholder("x")
    call = g.call_function(torch.ops.higher_order.triton_kernel_wrapper_functional,
                           kwargs={"kernel_idx": 0, "constant_args_idx": 0, "grid": [(1, 1, 1)],
                                   "tma_descriptor_metadata": {}, "kwargs": {"x": x}, "tensors_to_clone": []})
    g.output(call)
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    with pytest.raises(capture_cache.Uncacheable, match="triton_kernel_wrapper"):
        capture_cache.write_graph(gm, gm)
    with pytest.raises(capture_cache.Uncacheable, match="Triton kernel call"):
        capture_cache._targets_are_torchs(gm)
