"""Attention throughput: attnopt's variants against torch SDPA (flash, cuDNN), FlexAttention and
SageAttention's kernels (when installed), all measured in this one run. Needs a CUDA GPU.

TOPS = 4 * B * H * N * N * D / time (half for causal), the op's whole time (quantization
included), medians of triton.testing.do_bench with inputs rotated. attnopt's rel-L1 is measured on
the first 1024 query rows of two heads against float64 SDPA (exact per row, also causal). Writes a
table, JSON (after every configuration, so a run cut short keeps what it measured) and a PNG
under benchmarks/results/ (or --out-dir).

    python benchmarks/attention.py [--seqs 1024 4096 16384] [--dims 64 128] [--quick] [--time-limit S]

--quick: sequence lengths 4K, 16K and 32K at head dims 128 then 64, causal and not (the session's
default); --time-limit stops starting new configurations in time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import attnopt  # noqa: E402
from attnopt.codegen.arch import ARCHS, detect_arch  # noqa: E402
from attnopt.metrics import compare  # noqa: E402
from attnopt.progress import Progress  # noqa: E402

VARIANTS = {  # name: (quant, pv)
    "attnopt int8+f16pv": ("int8", "fp16"),
    "attnopt int8+fp8pv": ("int8", "fp8"),
    "attnopt fp8+fp8pv": ("fp8", "fp8"),
    "attnopt int8+fp8pv-acc16": ("int8", "fp8_acc16"),  # sm89 / sm120 only
    "attnopt nvfp4": ("fp4", "fp4"),  # sm100 / sm120 only
}


def peers(causal: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend):
        def f(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return f

    out = {"sdpa flash": sdpa(SDPBackend.FLASH_ATTENTION), "sdpa cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)}
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        masks = {}

        def f_flex(q, k, v):
            if not causal:
                return flex(q, k, v)
            key = q.shape[-2]
            if key not in masks:
                masks[key] = create_block_mask(lambda b, h, i, j: j <= i, None, None, key, key, device=q.device)
            return flex(q, k, v, block_mask=masks[key])

        out["flex_attention"] = f_flex
    except ImportError:
        pass
    try:  # SageAttention's Triton kernels, if the package is installed
        from sageattention import sageattn_qk_int8_pv_fp16_triton

        out["sageattn triton"] = lambda q, k, v: sageattn_qk_int8_pv_fp16_triton(q, k, v, is_causal=causal)
    except ImportError:
        pass
    return out


def bench(fn, inputs, reps_ms: int) -> float:
    import triton

    it = iter(range(1 << 30))

    def call():
        q, k, v = inputs[next(it) % len(inputs)]
        return fn(q, k, v)

    return triton.testing.do_bench(call, warmup=25, rep=reps_ms, return_mode="median")


ERROR_ROWS = 1024  # query rows attnopt's error is measured on


def reference_rows(q, k, v, causal: bool, rows: int = ERROR_ROWS):
    """float64 attention of the first `rows` queries (against every key): each row is exact on its
    own, and a 32K x 32K float64 score matrix would not fit."""
    r = min(rows, q.shape[2])
    mask = None
    if causal:  # top-left aligned, as SDPA's is_causal on the full square
        i = torch.arange(r, device=q.device)[:, None]
        mask = torch.arange(k.shape[2], device=q.device)[None, :] <= i
    return F.scaled_dot_product_attention(q[:, :, :r].double(), k.double(), v.double(), attn_mask=mask), r


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    ap.add_argument("--tokens", type=int, default=32768, help="B * N per config (B*H fills the GPU)")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--rep-ms", type=int, default=100)
    ap.add_argument("--quick", action="store_true", help="4K, 16K, 32K at head dims 128 and 64: the session's run")
    ap.add_argument("--out-dir", default=common.RESULTS)
    common.add_time_limit(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.seqs, args.dims = [4096, 16384, 32768], [128, 64]
    return args


def main() -> None:
    args = parse_args()
    common.require_cuda("benchmarks/attention.py")
    for knob in ("recompile_limit", "cache_size_limit"):  # FlexAttention compiles once per shape (dynamic=False)
        if hasattr(torch._dynamo.config, knob):  # (the name torch versions before 2.6 use, second)
            setattr(torch._dynamo.config, knob, 64)
            break
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    arch = detect_arch("cuda")
    out_name = f"attention_{arch}_{torch.cuda.get_device_name().replace(' ', '_')}.json"
    extra = {"what": __doc__.splitlines()[0], "arch": arch}
    limit = common.TimeLimit(args.time_limit)
    rows = []
    bar = Progress("attention", total=len(args.dims) * len(causals) * len(args.seqs))  # stderr, terminal only
    for d in args.dims:
        for causal in causals:
            fns = {name: (lambda q, k, v, qu=qu, pv=pv: attnopt.attention(q, k, v, is_causal=causal, quant=qu, pv=pv))
                   for name, (qu, pv) in VARIANTS.items() if ARCHS[arch].supports(qu, pv) is None}
            fns.update(peers(causal))
            for n in args.seqs:
                if not limit.allows():
                    break
                with limit.item():
                    bar.note(f"head dim {d}, causal {causal}, seq {n}")
                    rows += measure_config(fns, d, causal, n, args, bar)
                    common.write(out_name, rows, extra, out_dir=args.out_dir)  # kept if the run is cut short
                    bar.step()
    bar.close()
    path = common.write(out_name, rows, {**extra, "stopped_by_time_limit": limit.stopped}, out_dir=args.out_dir)
    print("wrote", path)
    print_table(rows)
    try:
        from plot import plot_attention

        print("plot", plot_attention(path))
    except Exception as e:  # plotting is a convenience; the JSON is the result
        print("no plot:", repr(e))


def measure_config(fns: dict, d: int, causal: bool, n: int, args, bar) -> list:
    """One (head dim, causal, sequence length): every variant's time, attnopt's error."""
    b = max(1, args.tokens // n)
    h = args.heads
    inputs = [tuple(torch.randn(b, h, n, d, device="cuda", dtype=torch.float16) for _ in range(3))
              for _ in range(2)]
    flops = 4 * b * h * n * n * d / (2 if causal else 1)
    q, k, v = (t[:1, :2] for t in inputs[0])
    ref, r = reference_rows(q, k, v, causal)
    rows = []
    for name, fn in fns.items():
        row = {"variant": name, "seq": n, "head_dim": d, "causal": causal, "batch": b, "heads": h}
        try:
            if name.startswith("attnopt"):
                err = compare(fn(q, k, v)[:, :, :r], ref)
                row.update(rel_l1=err["rel_l1"], cos=err["cos"])
            ms = bench(fn, inputs, args.rep_ms)
            row.update(ms=ms, tops=flops / ms / 1e9)
        except Exception as e:  # a peer that does not support this shape
            row.update(error=repr(e)[:200])
        rows.append(row)
        bar.write(json.dumps(row))
    del inputs, ref
    torch.cuda.empty_cache()
    return rows


def print_table(rows: list) -> None:
    keys = sorted({(r["head_dim"], r["causal"], r["seq"]) for r in rows})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    print(f"{'d':>4} {'causal':>6} {'seq':>6} " + " ".join(f"{v[:18]:>18}" for v in variants))
    for d, c, n in keys:
        cells = []
        for v in variants:
            r = next((r for r in rows if (r["head_dim"], r["causal"], r["seq"], r["variant"]) == (d, c, n, v)), None)
            cells.append(f"{r['tops']:>18.0f}" if r and "tops" in r else f"{'-':>18}")
        print(f"{d:>4} {str(c):>6} {n:>6} " + " ".join(cells))


if __name__ == "__main__":
    main()
