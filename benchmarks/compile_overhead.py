"""Inductor compile time with and without attnopt on Llama-shaped models of 4, 16 and 64 layers.

Target: attnopt adds under 10% to the compile, and its own pass time grows linearly with layers.
Every compile is cold (FX graph and AOT caches off) so all sides do the same work. Three sides:
plain Inductor, attnopt with attention disabled (the cost of the backend and of installing a
custom joint pass, nothing rewritten) and attnopt rewriting every attention.

Measuring on a shared machine: each compile is timed by wall clock and by this process's CPU
time (other users' load stretches the first, hardly the second); compiles run with Inductor's
compile_threads=1 so kernel builds happen where CPU time sees them; a gc.collect() precedes every
compile (otherwise a full collection lands in every other compile and swamps the difference);
each side runs in processes of its own (in a shared process the graph compiled first stays
5-8% slower than the others), a few per side, their order rotated; medians are reported.
Even so a whole process can run ~7% faster or slower than another for the same compile (see
NOISE): compare attnopt with attnopt_off (same backend, nothing rewritten) for what the rewrite
itself costs, and read attnopt vs plain Inductor as "within that band".

    python benchmarks/compile_overhead.py [--layers 4 16 64] [--reps 3] [--inner 2] [--device cpu|cuda]

`--warm` measures the other case users meet: a compile with Inductor's caches warm (a second run
of the same program). Each process gets a fresh cache directory, compiles once to fill it (that
compile, the process's first, is reported as `*_first_compile_cpu_s`: cold, with the caches
being written), then times `inner` compiles after resetting Dynamo, with every cache on (attnopt's capture cache,
AOTAutograd's, Inductor's FX graph cache). Sides: plain Inductor, attnopt, and attnopt with its
capture cache off (each warm compile traces to aten again).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import common  # noqa: E402

import attnopt  # noqa: E402
from attnopt.progress import Progress  # noqa: E402


def llama(layers: int, device: str):
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                                   num_attention_heads=8, num_key_value_heads=2, vocab_size=1024,
                                   attn_implementation="sdpa")
    model = transformers.LlamaModel(cfg).eval().to(device=device, dtype=torch.bfloat16)
    return model, torch.randint(0, 1024, (1, 256), device=device)


class Timed:
    """Wraps a backend and adds up the wall and CPU time spent inside it (Inductor's compile,
    passes included), leaving out Dynamo's tracing and the first call's execution, which both
    sides share."""

    def __init__(self, inner):
        self.inner, self.wall, self.cpu = inner, 0.0, 0.0

    def __call__(self, gm, example_inputs):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return self.inner(gm, example_inputs)
        finally:
            self.wall += time.perf_counter() - t0
            self.cpu += time.process_time() - c0


def compile_time(model, ids, backend, warm: bool = False) -> Timed:
    from torch._inductor.compile_fx import compile_fx

    torch._dynamo.reset()
    timed = Timed(compile_fx if backend == "inductor" else backend)
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=warm, compile_threads=1), \
            torch._functorch.config.patch(enable_autograd_cache=warm):
        torch.compile(model, backend=timed)(ids)
    return timed


def versions() -> dict:
    """What the numbers were measured with: library versions and attnopt's commit."""
    def version(name):
        try:
            return __import__(name).__version__
        except Exception:  # noqa: BLE001 - absent or broken: recorded as such
            return None

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": version("triton"),
            "transformers": version("transformers"), "attnopt_commit": commit}


SIDES = {"inductor": None, "attnopt_off": {"attention": {"enabled": False}}, "attnopt": {"attention": {"min_seq_len": 0}}}
WARM_SIDES = {"inductor": None, "attnopt": SIDES["attnopt"], "attnopt_no_capture_cache": SIDES["attnopt"]}


NOISE = ("Process-level offsets: the same plain-Inductor 4-layer compile measured 1.62-1.83 s CPU "
         "depending only on how the process was started (as this script's worker, or importing it), "
         "each setup consistent to ~1% across processes and hash seeds. Differences between sides "
         "below ~7% are within that band; attnopt vs attnopt_off isolates the rewrite.")


def one_compile(model, ids, side: str, warm: bool = False):
    """(Timed, backend or None) of one compile of `side` (cold, or with the caches on), after a
    full garbage collection."""
    opts = (WARM_SIDES if warm else SIDES)[side]
    be = None if opts is None else attnopt.backend(opts)
    gc.collect()
    return compile_time(model, ids, "inductor" if be is None else be, warm), be


def side_worker(layers: int, device: str, side: str, inner: int, warm: bool = False) -> dict:
    """In a process of its own: one warm-up compile of `side` (with --warm: into a fresh cache
    directory), then `inner` timed compiles, cold or warm."""
    if warm:
        import atexit
        import shutil
        import tempfile

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tmp = tempfile.mkdtemp(prefix="attnopt-warm-")
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        os.environ["ATTNOPT_CAPTURE_CACHE"] = "off" if side == "attnopt_no_capture_cache" else "on"
    model, ids = llama(layers, device)
    fill, _ = one_compile(model, ids, side, warm)  # imports, the on-disk kernel-binary cache (--warm: every cache)
    walls, cpus, passes, sites = [], [], [], 0
    for _ in range(inner):
        t, be = one_compile(model, ids, side, warm)
        walls.append(t.wall)
        cpus.append(t.cpu)
        if be is not None:
            passes.append(be.recorder.pass_time())
            sites = sum(s.status == "rewritten" for s in be.recorder.sites())
    return {"wall": statistics.median(walls), "cpu": statistics.median(cpus), "first_cpu": fill.cpu,
            "pass_s": statistics.median(passes) if passes else 0.0, "sites": sites}


def run_side(layers: int, device: str, side: str, inner: int, warm: bool = False) -> dict:
    """side_worker in a fresh interpreter: whichever graph a process compiles first keeps running
    slower there (by ~5-8% here), so sides sharing one process would not be compared fairly."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--layers", str(layers),
           "--device", device, "--reps", str(inner)] + (["--warm"] if warm else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_sides(layers: int, device: str, reps: int, inner: int, warm: bool = False) -> dict[str, list[dict]]:
    """`reps` rounds of one process per side, the sides' order rotated each round."""
    names = list(WARM_SIDES if warm else SIDES)
    runs = {side: [] for side in names}
    for r in range(reps):
        for side in names[r % len(names):] + names[:r % len(names)]:
            runs[side].append(run_side(layers, device, side, inner, warm))
    return runs


def measure_warm(layers: int, device: str, reps: int, inner: int) -> dict:
    """Warm compiles: medians over `reps` processes per side."""
    runs = run_sides(layers, device, reps, inner, warm=True)
    med = statistics.median
    cpu = {s: med(x["cpu"] for x in rs) for s, rs in runs.items()}
    return {"layers": layers, "processes_per_side": reps, "compiles_per_process": inner,
            **{f"{s}_warm_cpu_s": round(v, 3) for s, v in cpu.items()},
            **{f"{s}_warm_wall_s": round(med(x["wall"] for x in rs), 3) for s, rs in runs.items()},
            **{f"{s}_first_compile_cpu_s": round(med(x["first_cpu"] for x in rs), 3) for s, rs in runs.items()},
            "attnopt_pass_s": round(med(x["pass_s"] for x in runs["attnopt"]), 4),
            "attnopt_over_inductor_s": round(cpu["attnopt"] - cpu["inductor"], 3),
            "cpu_s_each": {s: [round(x["cpu"], 3) for x in rs] for s, rs in runs.items()}}


def measure(layers: int, device: str, reps: int, inner: int) -> dict:
    """Cold compiles: medians over `reps` processes per side."""
    return _row(layers, reps, inner, run_sides(layers, device, reps, inner))


def _row(layers, reps, inner, runs) -> dict:
    med = statistics.median
    wall = {s: med(r["wall"] for r in rs) for s, rs in runs.items()}
    cpu = {s: med(r["cpu"] for r in rs) for s, rs in runs.items()}
    pass_s = med(r["pass_s"] for r in runs["attnopt"])

    def pct(d, side):
        return round(100 * (d[side] - d["inductor"]) / d["inductor"], 1)

    return {"layers": layers, "processes_per_side": reps, "compiles_per_process": inner,
            "inductor_s": round(wall["inductor"], 3), "attnopt_s": round(wall["attnopt"], 3),
            "overhead_pct": pct(wall, "attnopt"),
            "inductor_cpu_s": round(cpu["inductor"], 3), "attnopt_cpu_s": round(cpu["attnopt"], 3),
            "cpu_overhead_pct": pct(cpu, "attnopt"),
            "attnopt_off_cpu_s": round(cpu["attnopt_off"], 3), "off_cpu_overhead_pct": pct(cpu, "attnopt_off"),
            "rewrite_cpu_pct": round(100 * (cpu["attnopt"] - cpu["attnopt_off"]) / cpu["attnopt_off"], 1),
            "attnopt_pass_s": round(pass_s, 4), "pass_ms_per_layer": round(1000 * pass_s / layers, 3),
            "pass_pct_of_compile": round(100 * pass_s / wall["attnopt"], 2),
            "sites_rewritten": runs["attnopt"][-1]["sites"],
            "wall_s_each": {s: [round(r["wall"], 2) for r in rs] for s, rs in runs.items()},
            "cpu_s_each": {s: [round(r["cpu"], 2) for r in rs] for s, rs in runs.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--reps", type=int, default=3, help="processes per side (worker: compiles per process)")
    ap.add_argument("--inner", type=int, default=2, help="timed compiles per process")
    ap.add_argument("--warm", action="store_true", help="time compiles with every cache warm")
    ap.add_argument("--worker", choices=sorted({*SIDES, *WARM_SIDES}), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(side_worker(args.layers[0], args.device, args.worker, args.reps, args.warm)))
        return
    rows = []
    load = os.getloadavg()[0]
    with Progress("compile overhead", total=len(args.layers)) as bar:  # stderr, terminal only
        for n in args.layers:
            bar.note(f"{n} layers")
            rows.append((measure_warm if args.warm else measure)(n, args.device, args.reps, args.inner))
            bar.write(str(rows[-1]))
            bar.step()
    out = args.out or (f"compile_overhead_{'cuda' if args.device.startswith('cuda') else 'cpu'}"
                       f"{'_warm' if args.warm else ''}.json")
    what = ("Compile time with Inductor's caches warm (a second run of the same program), with and without "
            "attnopt, on Llama-shaped models." if args.warm else __doc__.splitlines()[0])
    extra = {"what": what, "versions": versions(), "noise": NOISE,
             "load_average_1min": {"start": round(load, 2), "end": round(os.getloadavg()[0], 2)}}
    print("wrote", common.write(out, rows, extra))


if __name__ == "__main__":
    main()
