"""Inductor compile time with and without attnopt on Llama-shaped models of 4, 16 and 64 layers.

Target: attnopt adds under 10% to the compile, and its own pass time grows linearly with layers.
Every compile is cold (FX graph and AOT caches off) so both sides do the same work.

    python benchmarks/compile_overhead.py [--layers 4 16 64] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import common  # noqa: E402

import attnopt  # noqa: E402


def llama(layers: int, device: str):
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                                   num_attention_heads=8, num_key_value_heads=2, vocab_size=1024,
                                   attn_implementation="sdpa")
    model = transformers.LlamaModel(cfg).eval().to(device=device, dtype=torch.bfloat16)
    return model, torch.randint(0, 1024, (1, 256), device=device)


class Timed:
    """Wraps a backend and adds up the time spent inside it (Inductor's compile, passes included),
    leaving out Dynamo's tracing and the first call's execution, which both sides share."""

    def __init__(self, inner):
        self.inner, self.seconds = inner, 0.0

    def __call__(self, gm, example_inputs):
        t0 = time.perf_counter()
        try:
            return self.inner(gm, example_inputs)
        finally:
            self.seconds += time.perf_counter() - t0


def compile_time(model, ids, backend) -> float:
    from torch._inductor.compile_fx import compile_fx

    torch._dynamo.reset()
    timed = Timed(compile_fx if backend == "inductor" else backend)
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        torch.compile(model, backend=timed)(ids)
    return timed.seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for n in args.layers:
        model, ids = llama(n, args.device)
        opts = {"attention": {"min_seq_len": 0}}
        # warm up process-level state (imports, the on-disk kernel-binary cache) for both sides,
        # then take the median of cold graph compiles
        compile_time(model, ids, "inductor")
        compile_time(model, ids, attnopt.backend(opts))
        base_t, ours_t, pass_t = [], [], []
        for _ in range(args.reps):  # interleaved, so machine noise hits both sides alike
            base_t.append(compile_time(model, ids, "inductor"))
            be = attnopt.backend(opts)
            ours_t.append(compile_time(model, ids, be))
            pass_t.append(be.recorder.pass_time())
        base, ours, pass_s = statistics.median(base_t), statistics.median(ours_t), statistics.median(pass_t)
        sites = sum(s.status == "rewritten" for s in be.recorder.sites())
        row = {"layers": n, "inductor_s": round(base, 3), "attnopt_s": round(ours, 3),
               "overhead_pct": round(100 * (ours - base) / base, 1), "attnopt_pass_s": round(pass_s, 4),
               "pass_ms_per_layer": round(1000 * pass_s / n, 3), "sites_rewritten": sites}
        rows.append(row)
        print(row, flush=True)
    out = args.out or f"compile_overhead_{'cuda' if args.device.startswith('cuda') else 'cpu'}.json"
    print("wrote", common.write(out, rows, {"what": __doc__.splitlines()[0]}))


if __name__ == "__main__":
    main()
