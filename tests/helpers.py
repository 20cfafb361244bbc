"""Shared test helpers."""

import torch
import torch.nn.functional as F

import attnopt
from attnopt.metrics import compare

# Rewrite every site the tests build, however short (the default skips short sequences).
ALL_SITES = {"attention": {"min_seq_len": 0}}


def rel_l1(a, b) -> float:
    return compare(a, b)["rel_l1"]


def inspect(model, *inputs, options=None, **kw):
    opts = dict(ALL_SITES)
    for k, v in (options or {}).items():
        opts[k] = {**opts.get(k, {}), **v} if isinstance(v, dict) else v
    return attnopt.inspect(model, *inputs, options=opts, **kw)


def dynamo_graph(model, *inputs):
    """(graph module, example inputs): the one graph Dynamo hands a backend for model(*inputs),
    parameters lifted to inputs, as the linear pass sees it."""
    graphs = []
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=lambda gm, ex: graphs.append((gm, ex)) or gm)(*inputs)
    assert len(graphs) == 1, f"{len(graphs)} graphs"
    return graphs[0]


def randn(*shape, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape) * scale).to(dtype)


def cuda_peak_bytes(fn) -> int:
    """Peak CUDA memory `fn` allocates above what was allocated before it (run it once first,
    so compilation and caches are not counted)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def attend_with_keep(q, k, v, keep, apply: str, additive_fill: float = float("-inf")):
    """Attention under a bool keep mask, applied the ways models apply one: as SDPA's bool mask
    ("sdpa_bool") or additive mask ("sdpa_additive", `additive_fill` where dropped), or by hand
    with `where(keep, s, finfo.min)` ("where") or `masked_fill(~keep, -inf)` ("masked_fill")."""
    if apply == "sdpa_bool":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    if apply == "sdpa_additive":
        mask = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, additive_fill)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if apply == "where":
        s = torch.where(keep, s, torch.finfo(s.dtype).min)
    else:
        s = s.masked_fill(~keep, float("-inf"))
    return s.softmax(-1) @ v


# A script that compiles as for a GPU arch without one (run in a subprocess: TRITON_INTERPRET=0,
# which the interpreter-run test process cannot switch off). A stand-in for the CUDA driver names
# the target (torch's mutation analysis compiles each kernel to TTIR for it; without one it assumes
# every input is written, which a GPU compile never does), and Inductor's first pass records the
# graph AOTAutograd traced, then stops: the rest is Inductor compiling Triton for a GPU this
# machine lacks. The body compiles something under `stop_after_trace(...)` and prints JSON.
_TRACE_FOR_ARCH = r'''import json, sys
sys.path.insert(0, sys.argv[1])
import torch, attnopt, triton
from attnopt.passes import manager


class Stop(Exception):
    pass


class Target:
    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", ARCH, 32)


triton.runtime.driver.set_active(Target())
after = []


def call_then_stop(self, graph):
    after.append(graph)
    raise Stop()


manager.CacheKeyPass.__call__ = call_then_stop


def stop_after_trace(run):
    """Run `run()` (a first compile), return the graph Inductor's first pass saw."""
    try:
        run()
    except Exception as e:
        assert "Stop" in repr(e) or "Stop" in str(type(e)), e
    (graph,) = after
    return graph


def kernel_nodes(graph):
    """(kernel name, node) of each Triton kernel traced into the graph."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    return [(kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__, n) for n in graph.nodes
            if n.op == "call_function" and "triton_kernel_wrapper_functional" in str(n.target)]


def attnopt_ops(graph):
    return [str(n.target) for n in graph.nodes if n.op == "call_function" and str(n.target).startswith("attnopt.")]
'''


def run_traced_for_arch(tmp_path, body: str, arch: int) -> dict:
    """Run `body` after the trace-for-arch preamble (sm`arch`, attnopt's Triton bodies inlined) in a
    subprocess; its last stdout line, parsed as JSON, with the script's stderr under "stderr"."""
    import json
    import os
    import subprocess
    import sys

    here = os.path.dirname(__file__)
    script = tmp_path / f"trace_sm{arch}.py"
    script.write_text(_TRACE_FOR_ARCH.replace("ARCH", str(arch)) + body)
    env = {**os.environ, "TRITON_INTERPRET": "0", "ATTNOPT_INLINE": "always", "ATTNOPT_IMPL": "triton",
           "ATTNOPT_ARCH": f"sm{arch}", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, str(script), here], env=env, capture_output=True, text=True, timeout=600,
                         cwd=os.path.dirname(here))
    assert res.returncode == 0, res.stderr[-3000:]
    return {**json.loads(res.stdout.strip().splitlines()[-1]), "stderr": res.stderr}


def compile_planned_and_folded(model, folded, opts, plan, x):
    """(backend, `model` compiled with `plan` run on x, `folded` compiled without a plan run on x):
    what a plan folds at compile time against the same folds made by hand."""
    from attnopt.compiler import AttnoptBackend

    with torch.no_grad():
        be = AttnoptBackend(attnopt.normalize_options({**opts, "plan": plan}))
        torch._dynamo.reset()
        y = torch.compile(model, backend=be)(x)
        torch._dynamo.reset()
        y_same = torch.compile(folded, backend="attnopt", options=opts)(x)
    torch._dynamo.reset()
    return be, y, y_same
