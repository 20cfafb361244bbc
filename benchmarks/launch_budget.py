"""The work each op's GPU body does per call, against its budget: launches, full-size passes, bytes.

Without a GPU no speed can be measured, but the work a body asks of one can: this runs each op's
eager GPU body (the code a GPU runs when the op is not inlined) with the Triton path forced,
calls it once to warm its caches, and counts the second call with attnopt/codegen/work_count.py:
Triton launches, aten ops reading or writing a tensor at least as large as Q (attention) or the
activation (linear), every other aten op, extra bytes allocated and host time. Each row has a
budget (BUDGETS); tests/test_launch_budget.py holds every row to it (the rows a per-op budget test
already holds to stricter counts under `-m slow`, a row per budget family in the default run).

    TRITON_INTERPRET=1 python benchmarks/launch_budget.py            # table (CPU: interpreter)
    TRITON_INTERPRET=1 python benchmarks/launch_budget.py --json     # JSON rows on stdout
    python benchmarks/launch_budget.py --json --gpu-times            # on a GPU: + kernel times

On a CPU, TRITON_INTERPRET=1 must be set before this runs (the kernels run under Triton's
interpreter); `host_us` there is the Python time outside kernels and aten compute.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

# prefill and decode shapes: GQA (4 query heads over 2 kv heads), head dim 64, fp16
SHAPES = {"prefill": dict(b=1, hq=4, hkv=2, nq=256, nk=256, d=64),
          "decode": dict(b=2, hq=4, hkv=2, nq=1, nk=256, d=64)}
LINEAR_SHAPES = {"prefill": dict(m=256, k=512, n=384), "decode": dict(m=4, k=512, n=384)}
# the test's shapes: the same structure (GQA, several sparse blocks, decode) at half the work
SMALL_SHAPES = {"prefill": dict(b=1, hq=2, hkv=1, nq=200, nk=200, d=64),
                "decode": dict(b=2, hq=2, hkv=1, nq=1, nk=200, d=64)}
SMALL_LINEAR_SHAPES = {"prefill": dict(m=96, k=256, n=128), "decode": dict(m=4, k=256, n=128)}

# (quant, pv, arch): the dense formats, on an arch that runs them natively
DENSE = (("int8", "fp16", "sm80"), ("int8", "fp8", "sm90"), ("fp8", "fp8", "sm90"), ("fp4", "fp4", "sm100"))
SPARSE = ("sparge", "xattention", "window", "radial", "block", "svg")
LINEAR = ("w8a8", "fp8", "w4a16", "w4a8", "nvfp4")
LINEAR_ARCH = {"nvfp4": "sm100"}  # the CPU's rows run each format on an arch that offers it (else sm90)

# the most each row may do per call (issue 15's budgets); None: not bounded
BUDGETS = {
    "attention": {"launches": 3, "full_size_passes": 0},
    "sparse_predicted": {"launches": 4, "full_size_passes": 0},  # sparge, xattention, svg
    "sparse_static": {"launches": 3, "full_size_passes": 0},  # window, radial, block: mask cached
    "linear": {"launches": 2, "full_size_passes": 0},
}


def budget_of(row: dict) -> dict:
    """The budget a measured row is held to."""
    if row["op"] == "linear":
        return BUDGETS["linear"]
    method = row["config"]["sparsity"]
    if method is None:
        return BUDGETS["attention"]
    return BUDGETS["sparse_static" if method in ("window", "radial", "block") else "sparse_predicted"]


def _sparsity_params(method: str, s: dict) -> dict:
    from attnopt.config import normalize_options

    extra = {}
    if method in ("radial", "svg"):
        extra["frame_tokens"] = 64
    if method == "block":
        nqb, nkb = -(-s["nq"] // 64), -(-s["nk"] // 64)
        extra["mask"] = [[(i + j) % 2 == 0 or j <= i for j in range(nkb)] for i in range(nqb)]
        extra["block_size"] = 64
    opts = normalize_options({"attention": {"sparsity": {"method": method, **extra}}})
    return opts.attention.sparsity.to_dict()


def _attention_inputs(phase: str, device, shapes: dict, seed: int = 0):
    s = shapes[phase]
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(s["b"], s["hq"], s["nq"], s["d"], generator=g).to(device, torch.float16)
    k = torch.randn(s["b"], s["hkv"], s["nk"], s["d"], generator=g).to(device, torch.float16)
    v = torch.randn(s["b"], s["hkv"], s["nk"], s["d"], generator=g).to(device, torch.float16)
    return s, q, k, v


def attention_case(phase: str, quant: str, pv: str, arch: str, sparsity: str | None, device,
                   shapes: dict = SHAPES):
    """(body, args, full_size, config) for one attention row: causal, decode aligned to the end."""
    from attnopt.ops.attention import _attention_body
    from attnopt.ops.sparse import _sparse_attention_body

    s, q, k, v = _attention_inputs(phase, device, shapes)
    offset = s["nk"] - s["nq"]
    scale = 1.0 / math.sqrt(s["d"])
    common = (q, k, v, None, None, -math.inf, True, offset, scale, quant, pv, True)
    if sparsity is None:
        fn, args = _attention_body, (*common, False, arch, "triton")
    else:
        params = json.dumps(_sparsity_params(sparsity, s), sort_keys=True)
        fn, args = _sparse_attention_body, (*common, arch, "triton", params)
    config = {"quant": quant, "pv": pv, "sparsity": sparsity, "phase": phase, "arch": arch}
    return fn, args, q.numel(), config


def linear_case(phase: str, quant: str, device, arch: str = "sm90", shapes: dict = LINEAR_SHAPES):
    """(body, args, full_size, config) for one linear row (weights quantized once, as at compile time)."""
    from attnopt.ops import linear_ref as L

    s = shapes[phase]
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(s["m"], s["k"], generator=g).to(device, torch.float16)
    w = torch.randn(s["n"], s["k"], generator=g) / math.sqrt(s["k"])
    bias = torch.randn(s["n"], generator=g).to(device, torch.float16)
    if quant == "nvfp4":
        from attnopt.codegen.linear.nvfp4 import linear_nvfp4_triton
        from attnopt.ops.linear_nvfp4_ref import quantize_weight_nvfp4

        fn, args = linear_nvfp4_triton, (x, *(t.to(device) for t in quantize_weight_nvfp4(w)), bias, arch)
    elif quant == "w4a16":
        from attnopt.codegen.linear.w4a16 import linear_w4a16_triton

        packed, sc, zero = (t.to(device) for t in L.quantize_weight_int4(w, L.W4_GROUP))
        fn, args = linear_w4a16_triton, (x, packed, sc, zero, bias, L.W4_GROUP)
    elif quant == "w4a8":
        from attnopt.codegen.linear.w4a8 import linear_w4a8_triton

        packed, sc = (t.to(device) for t in L.quantize_weight_w4a8(w, L.W4A8_GROUP))
        fn, args = linear_w4a8_triton, (x, packed, sc, bias, L.W4A8_GROUP, arch)
    else:
        from attnopt.codegen.linear.w8a8 import linear_8bit_triton

        fmt = "int8" if quant == "w8a8" else "fp8"
        wq, ws = (t.to(device) for t in L.quantize_weight(w, fmt))
        fn, args = linear_8bit_triton, (x, wq, ws, bias, fmt, arch, 16)
    return fn, args, x.numel(), {"quant": quant, "phase": phase, "arch": arch}


def _device_arch(device) -> str | None:
    """On a GPU its own arch row (formats it lacks are left out); on a CPU None: each row names
    the arch whose kernel variant it runs under the interpreter."""
    if torch.device(device).type != "cuda":
        return None
    from attnopt.codegen.arch import resolve_arch

    return resolve_arch("auto", torch.device(device)).name


def cases(device, shapes: dict = SHAPES, linear_shapes: dict = LINEAR_SHAPES):
    """Every (op, body, args, full_size, config), in table order."""
    from attnopt.codegen.arch import ARCHS

    gpu = _device_arch(device)
    for phase in shapes:
        for quant, pv, arch in DENSE:
            if gpu is not None and (quant not in ARCHS[gpu].qk_formats or pv not in ARCHS[gpu].pv_formats):
                continue
            yield ("attention", *attention_case(phase, quant, pv, gpu or arch, None, device, shapes))
        for method in SPARSE:
            yield ("attention", *attention_case(phase, "int8", "fp16", gpu or "sm80", method, device, shapes))
        for quant in LINEAR:
            if gpu is not None and quant == "fp8" and "fp8" not in ARCHS[gpu].qk_formats:
                continue
            if gpu is not None and quant == "nvfp4" and "nvfp4" not in ARCHS[gpu].linear_formats:
                continue
            yield ("linear", *linear_case(phase, quant, device, gpu or LINEAR_ARCH.get(quant, "sm90"), linear_shapes))


def _kernel_times(fn, args) -> dict:
    """GPU time per kernel name (microseconds, one call) from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    times = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t:
            times[ev.key] = round(float(t), 2)
    return times


def measure(op, fn, args, full_size, config, gpu_times: bool = False) -> dict:
    """One row: warm call, then the counted steady-state call."""
    from attnopt.codegen.work_count import count_work

    fn(*args)
    _, work = count_work(fn, *args, full_size=full_size)
    row = {"op": op, "config": config, **work.to_dict()}
    if gpu_times and torch.cuda.is_available():
        row["kernel_us"] = _kernel_times(fn, args)
    row["budget"] = budget_of(row)
    row["within_budget"] = all(row[key] <= limit for key, limit in row["budget"].items() if limit is not None)
    return row


def run(device=None, only: str | None = None, gpu_times: bool = False, shapes: dict = SHAPES):
    """Measured rows, one at a time (a caller writing them as they come keeps what a cut-short run did)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    for op, fn, args, full_size, config in cases(device, shapes):
        label = f"{op} {config}"
        if only and only not in label:
            continue
        yield measure(op, fn, args, full_size, config, gpu_times)


def _name(row: dict) -> str:
    c = row["config"]
    if row["op"] == "linear":
        return f"linear {c['quant']}"
    return f"attention {c['quant']}/{c['pv']}" + (f" {c['sparsity']}" if c["sparsity"] else "")


def table(rows: list[dict]) -> str:
    head = "| op | phase | launches | full-size passes | other aten ops | extra KiB | host us | budget |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        b = r["budget"]
        mark = "ok" if r["within_budget"] else "OVER"
        lines.append(f"| {_name(r)} | {r['config']['phase']} | {r['launches']} | {r['full_size_passes']} | "
                     f"{r['aten_ops']} | {r['extra_bytes'] / 1024:.0f} | {r['host_us']:.0f} | "
                     f"{b['launches']} / {b['full_size_passes']} {mark} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="a JSON list of rows on stdout instead of the table")
    ap.add_argument("--only", help="only rows whose label contains this text (e.g. 'sparge', 'linear')")
    ap.add_argument("--gpu-times", action="store_true", help="on a GPU: add each kernel's time per call")
    ap.add_argument("--out", help="also write the rows (with the environment) to this JSON file")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        print("launch_budget: no GPU here; run with TRITON_INTERPRET=1 (the kernels run under Triton's "
              "interpreter)", file=sys.stderr)
        return 2
    os.environ.setdefault("ATTNOPT_IMPL", "triton")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import env, write_text

    rows = []
    for row in run(only=a.only, gpu_times=a.gpu_times):
        rows.append(row)
        if a.out:  # rewritten after every row
            write_text(a.out, json.dumps({"env": env(), "rows": rows}, indent=1))
    print(json.dumps(rows, indent=1) if a.json else table(rows))
    return 0 if all(r["within_budget"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
