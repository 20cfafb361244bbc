"""`attnopt.inspect`: compile a model with attnopt, run it once, and say what changed and how accurate.

Every rewritten site measures itself on the example inputs (through the probe op) against
float64 attention; the whole model's output is compared with the uncompiled model's.
"""

from __future__ import annotations

import itertools
import platform
import sys
import time
from typing import Any, Callable, Mapping

import torch

from .. import switches
from ..compiler import AttnoptBackend
from ..logs import log
from ..metrics import compare_outputs
from ..ops import probe
from ..passes import on_cpu
from ..progress import Progress
from ..report import Report
from .table import site_flops
from .timing import WHAT as TIMING_WHAT, time_pair

_SINK_IDS = itertools.count()


_BREAK_COUNTERS = ("graph_break", "unimplemented")  # the second: breaks that skipped a whole frame


def _break_counts() -> dict:
    """(counter, message) -> count now, for the counters Dynamo files graph breaks under."""
    from torch._dynamo.utils import counters

    return {(c, msg): n for c in _BREAK_COUNTERS for msg, n in counters[c].items()}


def _describe_break(counter: str, msg: str, count: int) -> dict:
    """First line as the reason, every 'Explanation:' line kept (they say what Dynamo did)."""
    lines = [ln.strip() for ln in msg.splitlines()]
    explanation = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Explanation:")]
    skipped = counter == "unimplemented" or "frame skipped" in msg or "Skipping the frame" in msg
    return {"reason": lines[0] if lines else msg, "explanation": explanation, "detail": msg, "count": count,
            "kind": "frame skipped (ran eagerly)" if skipped else "graph break"}


def _graph_breaks_since(before: dict) -> list[dict]:
    """Graph breaks Dynamo recorded since `before` (a _break_counts() snapshot).

    A break Dynamo can split the graph at lands in counters["graph_break"]; one it cannot (in a
    loop, or with no partial graph possible) skips the frame and stays in counters["unimplemented"],
    often as a message that quotes the break that caused it: the quoted one is left out.
    """
    new = [(c, m, n - before.get((c, m), 0)) for (c, m), n in _break_counts().items()]
    new = [x for x in new if x[2] > 0]
    out = []
    for c, m, n in new:
        if any(m != other and m in other for _, other, _ in new):
            continue
        out.append(_describe_break(c, m, n))
    return out


def _warnings(graphs: int, breaks: list[dict]) -> list[str]:
    """What a user must not miss: nothing compiled, or some code ran eagerly."""
    out = []
    if graphs == 0:
        why = ("see the graph breaks below" if breaks else
               "no graph break was recorded: is the model wrapped in torch.compiler.disable, or already compiled?")
        out.append(f"Dynamo compiled no graph: the model ran eagerly and attnopt changed nothing ({why})")
    elif any(b["kind"] != "graph break" for b in breaks):
        out.append("Dynamo skipped some frames (graph breaks it could not split at): "
                   "the code in them ran eagerly, without attnopt")
    return out


def _env(inputs) -> dict:
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = None
    from ..version import __version__

    dev = next((t.device for t in inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    return {"attnopt": __version__, "torch": torch.__version__, "triton": tv, "python": sys.version.split()[0],
            "device": str(dev), "device_name": name}


def _cpu_emulation(sites) -> dict | None:
    """The report header's statement when rewritten sites run attnopt's CPU emulation (else None)."""
    cpu = on_cpu.emulated_sites(sites)
    if not cpu:
        return None
    return {"sites": len(cpu), "keys": [s.key for s in cpu], "option": "on_cpu",
            "message": f"{len(cpu)} rewritten site(s) run on the CPU: {on_cpu.COST}; {on_cpu.HOW_TO_SKIP}"}


def inspect(model: torch.nn.Module | Callable, *example_inputs, options: Mapping | None = None,
            example_kwargs: Mapping[str, Any] | None = None, progress: bool | Callable[[str], None] = False,
            dynamic: bool | None = None, timing_runs: int = 5, grad: bool = False) -> Report:
    """Compile `model` with attnopt under `options`, run it on the example inputs, and report.

    The report lists every candidate site (rewritten or skipped, with the reason), the error
    each rewritten site adds on these inputs, graph breaks, compile time and the end-to-end error
    against the uncompiled model. Dynamo's caches are reset so that every graph is compiled (and
    every site seen) in this call. `progress`: True draws a progress bar on stderr (on a terminal
    only: graph, measured site, elapsed, time left); a callable gets each step as a message.
    `timing_runs`: each rewritten site's original and rewritten op are timed on its inputs, median
    of up to this many runs each (the site record's `timing`; 0: not timed, nor under Triton's
    interpreter, whose times mean nothing; inspection/timing.py).
    `grad`: each rewritten dense attention site also reports the gradient error of the training
    op under `attention.backward` (dQ, dK, dV rel-L1 against float64 autograd, on the site's
    inputs with a random upstream gradient; the record's `error["grad"]`), and with
    `linear.training` set each selected linear that of its training op (Y, dX, dW).
    """
    bar = Progress("inspect") if progress and not callable(progress) else None  # stderr, on a terminal only
    say = progress if callable(progress) else (bar.note if bar else (lambda m: None))
    kwargs = dict(example_kwargs or {})
    sink_id = f"inspect{next(_SINK_IDS)}"
    be = AttnoptBackend(options, probe_sink=sink_id, inductor_config={"fx_graph_cache": False}, progress=say)
    be.ctx.capture_graphs = True
    be.ctx.announce_cpu = False  # the report's header says it (summary["cpu_emulation"])

    def measured(key: str, metrics: dict) -> None:
        be.recorder.set_error(key, metrics)
        if bar is not None:  # one step per measured site, of the rewritten sites compiled so far
            bar.total = max(bar.done + 1, sum(r.status == "rewritten" for r in list(be.recorder._by_key.values())))
            bar.step(f"measured {key}")
            return
        say(f"measured {key}: rel-L1 {metrics.get('rel_l1', float('nan')):.4g}")

    def timed(key: str, original: Callable, rewritten: Callable) -> None:
        be.recorder.set_timing(key, time_pair(original, rewritten, runs=timing_runs))

    if switches.interpreted() and switches.impl() == "triton":
        timing_runs = 0  # Triton's interpreter runs the kernels: their time says nothing
    probe.register_sink(sink_id, measured)
    if grad:  # gradient errors under the training options (what a training graph would run)
        opts = be.ctx.options
        backward = opts.attention.backward if opts.attention.backward != "off" else None
        training = opts.linear.training if opts.linear.training != "off" else None
        probe.register_grad_check(sink_id, backward, training)
        be.ctx.capture_linears = be.ctx.capture_linears or training is not None  # a probe on every linear
    if timing_runs > 0:
        probe.register_timer(sink_id, timed)
    try:
        torch._dynamo.reset()
        before = _break_counts()
        compiled = torch.compile(model, backend=be, dynamic=dynamic)
        say("compiling and measuring (first call)...")
        t0 = time.perf_counter()
        with torch.no_grad(), torch._functorch.config.patch(enable_autograd_cache=False):
            out = compiled(*example_inputs, **kwargs)
        first_call = time.perf_counter() - t0
        say(f"compiled {be.graphs_compiled} graph(s) in {be.compile_time_s:.1f}s; running the original model...")
        with torch.no_grad():
            ref = model(*example_inputs, **kwargs)
        e2e = compare_outputs(out, ref)
        breaks = _graph_breaks_since(before)
    finally:
        probe.unregister_sink(sink_id)
        if bar is not None:
            bar.close()
    sites = be.recorder.sites()
    for s in sites:  # linear sites: the estimate from their shapes, so the JSON has it too
        s.flops = site_flops(s)
    warnings = _warnings(be.graphs_compiled, breaks)
    warnings += [f"graph {g['index']}: {note}" for g in be.recorder.graphs for note in g.get("notes", [])]
    for w in warnings:
        log.warning("attnopt: %s", w)
    summary = {
        "graphs": be.graphs_compiled,
        "graph_breaks": breaks,
        "warnings": warnings,
        "sites_total": len(sites),
        "sites_rewritten": sum(s.status == "rewritten" for s in sites),
        "by_kind": {k: {"total": sum(s.kind == k for s in sites),
                        "rewritten": sum(s.kind == k and s.status == "rewritten" for s in sites)}
                    for k in sorted({s.kind for s in sites} | {"attention"})},
        "compile_time_s": be.compile_time_s,
        "first_call_s": first_call,
        "pass_time_s": be.recorder.pass_time(),
        "e2e": e2e,
        "cpu_emulation": _cpu_emulation(sites),
        "site_timing": {"runs": timing_runs, "what": TIMING_WHAT} if timing_runs > 0 else None,
    }
    if callable(progress):
        progress(f"done: {summary['sites_rewritten']}/{summary['sites_total']} sites rewritten, "
                 f"end-to-end rel-L1 {e2e.get('rel_l1', float('nan')):.4g}")
    return Report(sites=sites, summary=summary, options=be.options.to_dict(),
                  env=_env(list(example_inputs) + list(kwargs.values())), graphs=be.recorder.snapshots())
