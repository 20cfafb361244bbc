"""attention.schedule in compiled graphs: one compile serves every step, each step runs the variant
its entry names (the step is read from the step tensor at run time, never baked at trace time)."""

import contextlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import attnopt
from attnopt import schedule as S
from attnopt.codegen.arch import ARCHS, resolve_pv
from attnopt.config import normalize_options

from helpers import randn, run_traced_for_arch


class Attn(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attn()

    def forward(self, q, k, v):
        return self.attn(q, k, v)


class TinyDiT(torch.nn.Module):
    """Two blocks of bidirectional attention over the same tokens (a DiT's shape, no weights)."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block(), Block()])

    def forward(self, q, k, v):
        return [blk(q * (i + 1), k, v) for i, blk in enumerate(self.blocks)]


SCHEDULE = [
    {"steps": [0.0, 0.25], "include": ["blocks.0.*"], "use": {"quant": "none"}},  # block 0 16-bit early
    {"steps": [45, 50], "use": {"quant": "int8", "sparsity": None}},  # the last 5 steps dense (integer range)
    {"steps": [0.25, 1.0], "use": {"quant": "fp8", "pv": "fp8"}},  # the middle: FP8 everywhere
]
SECTION = {"min_seq_len": 0, "quant": "int8", "pv": "fp16", "sparsity": {"method": "window", "window": 64}}


def _backend(opts, inline="never"):
    be = attnopt.backend(opts, inductor_config={"fx_graph_cache": False})
    be.ctx.inline = inline
    return be


def _direct(x, k, v, a, impl="auto"):
    """What a site computes under attention options `a`, the op called eagerly."""
    pv = resolve_pv(a.pv, a.quant, ARCHS["cpu"])
    args = (x, k, v, None, None, -math.inf, False, 0, x.shape[-1] ** -0.5, a.quant, pv, a.smooth_k)
    if a.sparsity is not None:
        sp = json.dumps(a.sparsity.to_dict(), sort_keys=True)
        return torch.ops.attnopt.sparse_attention(*args, "cpu", impl, sp)
    return torch.ops.attnopt.attention(*args, a.smooth_q, "cpu", impl)


def _expected(section, path, step, x, k, v, impl, cache):
    a = S.options_at(section, path, step)
    key = (path, a.quant, a.pv, json.dumps(a.sparsity.to_dict() if a.sparsity else None))
    if key not in cache:
        cache[key] = _direct(x, k, v, a, impl)
    return cache[key]


def _run_steps(be, steps, total, inputs, impl="auto"):
    """Run `steps` of a `total`-step run compiled once; return (frames compiled, mismatches)."""
    section = normalize_options(be.options).attention
    q, k, v = inputs
    frames = counters["frames"]["ok"]
    f = torch.compile(TinyDiT(), backend=be)
    cache, bad = {}, []
    with torch.no_grad():
        for i in list(steps) + [None]:  # None: outside any step block
            with S.step(i, total) if i is not None else contextlib.nullcontext():
                out = f(q, k, v)
            step_now = (i, total) if i is not None else None
            for j in range(2):
                want = _expected(section, f"blocks.{j}.attn", step_now, q * (j + 1), k, v, impl, cache)
                if not torch.equal(out[j], want):
                    bad.append((i, j, (out[j].float() - want.float()).abs().max().item()))
    return counters["frames"]["ok"] - frames, bad, cache


def test_fifty_steps_compile_once_and_each_step_runs_its_variant():
    torch._dynamo.reset()
    be = _backend({"attention": {**SECTION, "schedule": SCHEDULE}})
    inputs = [randn(1, 2, 128, 32) for _ in range(3)]
    frames, bad, variants = _run_steps(be, range(50), 50, inputs)
    assert frames == 1 and be.graphs_compiled == 1  # never once per step
    assert bad == []
    # the variants really differ (a wrong pick would show): 16-bit, FP8, INT8 sparse
    outs = [t for (path, *_), t in variants.items() if path == "blocks.0.attn"]
    assert len(outs) == 4 and all(not torch.equal(a, b) for n, a in enumerate(outs) for b in outs[n + 1:])
    rec = {r.module: r for r in be.recorder.sites()}
    v0 = rec["blocks.0.attn"].details["schedule"]
    assert [x["quant"] for x in v0["variants"]] == ["int8", "none", "int8", "fp8"]
    assert [x["sparsity"] for x in v0["variants"]] == ["window", "window", None, "window"]
    assert [e["variant"] for e in v0["entries"]] == [1, 2, 3]
    assert [e["variant"] for e in rec["blocks.1.attn"].details["schedule"]["entries"]] == [1, 2]


def test_a_new_shape_compiles_once_more_not_per_step():
    torch._dynamo.reset()
    be = _backend({"attention": {**SECTION, "sparsity": None, "schedule": SCHEDULE[2:]}})
    f = torch.compile(TinyDiT(), backend=be, dynamic=False)
    frames = counters["frames"]["ok"]
    with torch.no_grad():
        for n in (128, 160):
            x = randn(1, 2, n, 32)
            for i in range(6):
                with attnopt.step(i, 6):
                    f(x, x, x)
    assert be.graphs_compiled == 2 and counters["frames"]["ok"] - frames == 2


@pytest.mark.parametrize("inline", ["never", "always"])
def test_gated_triton_kernels_under_the_interpreter(monkeypatch, inline):
    """ATTNOPT_IMPL=triton: the ops launch the gated kernels (Triton's interpreter on CPU): every
    variant's kernels run, only the selected one writes the output that reaches the result."""
    monkeypatch.setenv("ATTNOPT_IMPL", "triton")
    torch._dynamo.reset()
    sched = [{"steps": [0, 1], "use": {"sparsity": None}}, {"steps": [0.5, 1.0], "use": {"quant": "fp8", "pv": "fp8"}}]
    be = _backend({"attention": {**SECTION, "schedule": sched}}, inline)
    inputs = [randn(1, 1, 128, 32) for _ in range(3)]
    frames, bad, variants = _run_steps(be, (0, 1, 2), 4, inputs, impl="triton")  # dense, sparse, FP8 sparse
    assert frames == 1 and bad == []
    assert len(variants) == 6  # three variants per site, each checked


def test_per_site_schedule_from_a_plan_comes_first():
    torch._dynamo.reset()
    plan = {"schema_version": 1, "sites": {"blocks.1.attn#0": {
        "kind": "attention", "quant": "fp8", "pv": "fp8",
        "schedule": [{"steps": [0.0, 0.25], "use": {"quant": "none", "pv": "fp16"}}]}}}
    opts = {"attention": {**SECTION, "sparsity": None, "schedule": [{"steps": [0, 2], "use": {"quant": "int8"}}]},
            "plan": plan}
    be = _backend(opts)
    q, k, v = (randn(1, 2, 128, 32) for _ in range(3))
    f = torch.compile(TinyDiT(), backend=be)
    a = normalize_options(opts).attention
    with torch.no_grad():
        # the plan entry's schedule; the section's (its `use` names quant: the plan's pv, chosen for fp8,
        # goes too and pv resolves from the section's); the plan
        for i, quant, pv in ((0, "none", "fp16"), (1, "int8", a.pv), (3, "fp8", "fp8")):
            with attnopt.step(i, 4):
                out = f(q, k, v)
            site1 = S.apply_use(a, {"quant": quant, "pv": pv})
            assert torch.equal(out[1], _direct(q * 2, k, v, site1)), i
    rec = {r.module: r for r in be.recorder.sites()}
    assert [e["entry"] for e in rec["blocks.1.attn"].details["schedule"]["entries"]] == [
        "plan 'blocks.1.attn#0' schedule[0]", "attention.schedule[0]"]
    with pytest.raises(attnopt.ConfigError, match=r"plan.sites.*schedule\[0\].steps"):
        normalize_options({"plan": {"schema_version": 1, "sites": {"x#0": {
            "kind": "attention", "schedule": [{"steps": [2, 1], "use": {}}]}}}})


def test_a_variant_that_cannot_run_rejects_the_site_naming_the_entry():
    torch._dynamo.reset()
    bad = {"steps": [0.5, 1.0], "include": ["blocks.1.*"],
           "use": {"sparsity": {"method": "block", "block_size": 64, "mask": [[True]]}}}
    be = _backend({"attention": {**SECTION, "sparsity": None, "schedule": [bad]}})
    x = randn(1, 2, 128, 32)
    with torch.no_grad():
        torch.compile(TinyDiT(), backend=be)(x, x, x)
    rec = {r.module: r for r in be.recorder.sites()}
    assert rec["blocks.0.attn"].status == "rewritten" and "schedule" not in rec["blocks.0.attn"].details
    assert rec["blocks.1.attn"].status == "skipped"
    assert "attention.schedule[0]" in rec["blocks.1.attn"].reason and "block mask" in rec["blocks.1.attn"].reason


def test_unscheduled_sites_take_no_step_input(monkeypatch):
    """A schedule whose entries change nothing at a site, or no schedule: built as before."""
    import attnopt.compiler as C

    made, real = [], C.StepInputs
    monkeypatch.setattr(C, "StepInputs", lambda fn, devices: made.append(devices) or real(fn, devices))
    torch._dynamo.reset()
    same = [{"steps": [0, 3], "include": ["blocks.0.*"], "use": {"quant": "int8"}}]
    be = _backend({"attention": {**SECTION, "sparsity": None, "schedule": same}})
    x = randn(1, 2, 128, 32)
    with torch.no_grad():
        torch.compile(TinyDiT(), backend=be)(x, x, x)
    assert made == [] and [r.status for r in be.recorder.sites()] == ["rewritten"] * 2
    assert all("schedule" not in r.details for r in be.recorder.sites())
    torch._dynamo.reset()
    be = _backend({"attention": {**SECTION, "sparsity": None, "schedule": SCHEDULE}})
    with torch.no_grad():
        torch.compile(TinyDiT(), backend=be)(x, x, x)
    assert made == [[torch.device("cpu")]]  # one step input for the graph, both sites reading it


def test_sixteen_bit_section_quantized_in_the_middle_steps():
    """quant 'none' and no sparsity is a variant like any other (attnopt's 16-bit kernel) when
    another variant changes something; a site whose every variant is 16-bit dense stays as it was."""
    torch._dynamo.reset()
    mid = [{"steps": [0.25, 0.75], "include": ["blocks.1.*"], "use": {"quant": "int8"}}]
    be = _backend({"attention": {"min_seq_len": 0, "quant": "none", "schedule": mid}})
    q, k, v = (randn(1, 2, 128, 32) for _ in range(3))
    f = torch.compile(TinyDiT(), backend=be)
    a = normalize_options(be.options).attention
    with torch.no_grad():
        for i, quant in ((0, "none"), (1, "int8"), (3, "none")):
            with attnopt.step(i, 4):
                out = f(q, k, v)
            assert torch.equal(out[1], _direct(q * 2, k, v, S.apply_use(a, {"quant": quant}))), i
    rec = {r.module: r for r in be.recorder.sites()}
    assert rec["blocks.0.attn"].status == "skipped" and "nothing to change" in rec["blocks.0.attn"].reason
    assert rec["blocks.1.attn"].status == "rewritten"


def test_graph_that_needs_grad_uses_the_section_options():
    torch._dynamo.reset()
    be = _backend({"attention": {**SECTION, "sparsity": None, "schedule": SCHEDULE}})
    q, k, v = (randn(1, 2, 128, 32).requires_grad_() for _ in range(3))
    with attnopt.step(0, 50):
        torch.compile(TinyDiT(), backend=be)(q, k, v)[0].float().sum().backward()
    for r in be.recorder.sites():
        assert r.status == "rewritten" and "attention.schedule not applied in a graph that needs grad" in r.reason


@pytest.mark.gpu
def test_reduce_overhead_replays_read_the_current_step():
    """mode="reduce-overhead": one CUDA graph replayed every step; each replay runs the step's variant."""
    torch._dynamo.reset()
    be = attnopt.backend({"attention": {**SECTION, "schedule": SCHEDULE}}, mode="reduce-overhead")
    q, k, v = (torch.randn(1, 4, 1024, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    section = normalize_options(be.options).attention
    f = torch.compile(TinyDiT(), backend=be, fullgraph=True)
    frames = counters["frames"]["ok"]
    with torch.no_grad():
        for i in range(50):
            with attnopt.step(i, 50):
                out = [t.clone() for t in f(q, k, v)]
            for j in range(2):
                a = S.options_at(section, f"blocks.{j}.attn", (i, 50))
                want = _direct_cuda(q * (j + 1), k, v, a)
                err = ((out[j].double() - want.double()).abs().sum() / want.double().abs().sum()).item()
                assert err < 1e-2, (i, j, err)  # the same kernels, Inductor's fusions around them aside
    assert counters["frames"]["ok"] - frames == 1 and be.graphs_compiled == 1


def _direct_cuda(x, k, v, a):
    from attnopt.codegen.arch import detect_arch

    arch = detect_arch(x.device)
    pv = resolve_pv(a.pv, a.quant, ARCHS[arch])
    args = (x, k, v, None, None, -math.inf, False, 0, x.shape[-1] ** -0.5, a.quant, pv, a.smooth_k)
    if a.sparsity is not None:
        return torch.ops.attnopt.sparse_attention(*args, arch, "auto", json.dumps(a.sparsity.to_dict(),
                                                                                  sort_keys=True))
    return torch.ops.attnopt.attention(*args, a.smooth_q, arch, "auto")


_TRACE_SM90 = r"""
from test_schedule_compiled import TinyDiT, SCHEDULE, SECTION
from helpers import randn

be = attnopt.backend({"attention": {**SECTION, "schedule": SCHEDULE}}, inductor_config={"fx_graph_cache": False})
x = randn(1, 2, 128, 32)


def run():
    with torch.no_grad(), attnopt.step(3, 50):
        torch.compile(TinyDiT(), backend=be)(x, x, x)


graph = stop_after_trace(run)
kernels = kernel_nodes(graph)
gated = sum(name == "_attn_fwd" and isinstance(n.kwargs["kwargs"].get("GATE"), torch.fx.Node) for name, n in kernels)
print(json.dumps({"attnopt_ops": attnopt_ops(graph), "kernels": [k for k, _ in kernels], "gated": gated,
                  "inputs": len(graph.find_nodes(op="placeholder"))}))
"""


@pytest.mark.slow
def test_gated_kernels_inline_into_the_graph_a_gpu_compiles(tmp_path):
    """As on a GPU (ATTNOPT_INLINE=always, Triton impl, sm90 target, stopped before Inductor's
    codegen): every variant's kernels trace into the graph, each attention kernel reading the gate
    (torch's mutation analysis compiles the gated kernel to TTIR for sm90 on the way)."""
    got = run_traced_for_arch(tmp_path, _TRACE_SM90, 90)
    assert got["attnopt_ops"] == []  # nothing left as an extern call
    assert got["kernels"].count("_attn_fwd") == got["gated"] == 4 + 3  # every variant of both sites, gated


def test_a_plan_file_keeps_its_site_schedules(tmp_path):
    from attnopt.plan import Plan

    entry = {"kind": "attention", "quant": "fp8", "schedule": [{"steps": [0, 5], "use": {"quant": "int8"}}]}
    Plan.from_dict({"schema_version": 1, "sites": {"blocks.0.attn#0": entry}}).save(tmp_path / "plan.json")
    opts = normalize_options({"plan": str(tmp_path / "plan.json")})
    assert opts.plan.site("blocks.0.attn#0")["schedule"] == [
        {"steps": [0, 5], "include": ["*"], "use": {"quant": "int8"}}]


def test_inspect_lists_the_variants_it_does_not_measure():
    """attnopt.inspect measures the section's options (its probes take no step) and says so; the
    report still lists each site's variants."""
    torch._dynamo.reset()
    x = randn(1, 2, 128, 32)
    report = attnopt.inspect(TinyDiT(), x, x, x, options={"attention": {**SECTION, "schedule": SCHEDULE}})
    rec = {r.module: r for r in report.sites}
    sched = rec["blocks.0.attn"].details["schedule"]
    assert sched["applied"] is False and [v["quant"] for v in sched["variants"]] == ["int8", "none", "int8", "fp8"]
    assert "attention.schedule not applied in attnopt.inspect's measuring probes" in rec["blocks.0.attn"].reason
