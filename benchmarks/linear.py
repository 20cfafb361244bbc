"""Linear throughput: attnopt's W8A8 / FP8 / W4A16 / W4A8 GEMMs (and NVFP4 where the arch offers
it: sm100 / sm120, its activation quantizer included) against torch bf16 matmul,
torch._int_mm and torch._scaled_mm, the training linear's forward + backward (linear.training
int8 / fp8) against bf16's, plus prefill and decode latency of a Llama-shaped block
(attention + MLP) compiled with and without attnopt, all in one run. Needs a CUDA GPU.
Targets on H100: INT8 GEMM >= 1.5x bf16 at M, N, K >= 4096; W4A16 at M = 1 >= 2.5x bf16.

    python benchmarks/linear.py [--quick] [--time-limit S]

--quick: the GEMMs at M = 1 and M = N = K = 4096 (what the session runs first: they are written
before the Llama-block rows start), the training linear at M = N = K = 4096, then the block at 1
and 2048 tokens as time allows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import attnopt  # noqa: E402
from attnopt.codegen.arch import ARCHS, detect_arch  # noqa: E402
from attnopt.codegen.linear.nvfp4 import linear_nvfp4_triton  # noqa: E402
from attnopt.codegen.linear.w4a16 import linear_w4a16_triton  # noqa: E402
from attnopt.codegen.linear.w4a8 import linear_w4a8_triton  # noqa: E402
from attnopt.codegen.linear.w8a8 import linear_8bit_triton  # noqa: E402
from attnopt.ops import linear_ref as L  # noqa: E402
from attnopt.ops.linear_nvfp4_ref import quantize_weight_nvfp4  # noqa: E402
from attnopt.progress import Progress  # noqa: E402


def bench(fn, rep=100):
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def gemm_rows(shapes, arch, limit: common.TimeLimit):
    rows = []
    bar = Progress("gemm", total=len(shapes))  # stderr, terminal only
    for m, n, k in shapes:
        if not limit.allows():
            break
        bar.note(f"{m}x{n}x{k}")
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        flops = 2 * m * n * k
        fns = {"torch bf16": lambda: x @ w.T}
        wq, ws = L.quantize_weight(w, "int8")
        fns["attnopt w8a8"] = lambda: linear_8bit_triton(x, wq, ws, None, "int8", arch)
        if m > 16:
            xq, xs = L.quantize_weight(x, "int8")
            fns["torch._int_mm (no quant)"] = lambda: torch._int_mm(xq, wq.T)
        if arch in ("sm89", "sm90", "sm100", "sm120"):
            wf, wfs = L.quantize_weight(w, "fp8")
            fns["attnopt fp8"] = lambda: linear_8bit_triton(x, wf, wfs, None, "fp8", arch)
            if m > 16:
                xf, xfs = L.quantize_weight(x, "fp8")
                fns["torch._scaled_mm (no quant)"] = lambda: torch._scaled_mm(
                    xf, wf.T, scale_a=xfs[:, None], scale_b=wfs[None, :], out_dtype=torch.bfloat16)
        pk, sc, zr = L.quantize_weight_int4(w)
        fns["attnopt w4a16"] = lambda: linear_w4a16_triton(x, pk, sc, zr, None)
        p8, s8 = L.quantize_weight_w4a8(w)
        fns["attnopt w4a8"] = lambda: linear_w4a8_triton(x, p8, s8, None, arch=arch)
        if "nvfp4" in ARCHS[arch].linear_formats:
            q4 = quantize_weight_nvfp4(w)
            fns["attnopt nvfp4"] = lambda: linear_nvfp4_triton(x, *q4, None, arch)
        with limit.item():
            for name, fn in fns.items():
                row = {"kind": "gemm", "M": m, "N": n, "K": k, "variant": name}
                try:
                    t = bench(fn)
                    row.update(ms=t, tflops=flops / t / 1e9)
                except Exception as e:
                    row["error"] = repr(e)[:200]
                rows.append(row)
                bar.write(json.dumps(row))
        bar.step()
    bar.close()
    return rows


def train_rows(shapes, arch, limit: common.TimeLimit):
    """Forward + backward of one linear (dX and dW): bf16 F.linear against attnopt::linear_train
    (each format the arch runs), TFLOPS counting the three GEMMs (6 M N K)."""
    rows = []
    formats = ["int8"] + (["fp8"] if arch in ("sm89", "sm90", "sm100", "sm120") else [])
    for m, n, k in shapes:
        if not limit.allows():
            break
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.nn.Parameter(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
        gy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        fns = {"torch bf16 fwd+bwd": lambda: torch.nn.functional.linear(x, w).backward(gy)}
        for fmt in formats:
            fns[f"attnopt train-{fmt} fwd+bwd"] = (
                lambda fmt=fmt: torch.ops.attnopt.linear_train(x, w, None, fmt, arch, "auto").backward(gy))
        with limit.item():
            for name, fn in fns.items():
                row = {"kind": "train", "M": m, "N": n, "K": k, "variant": name}
                try:
                    t = bench(fn)
                    row.update(ms=t, tflops=6 * m * n * k / t / 1e9)
                except Exception as e:
                    row["error"] = repr(e)[:200]
                x.grad = w.grad = None
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    return rows


def block_rows(seq_lens, arch, limit: common.TimeLimit):
    rows = []
    try:
        import transformers
    except ImportError as e:
        return [{"kind": "llama-block", "error": f"transformers is not installed ({e})"}]
    cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)
    model = transformers.LlamaModel(cfg).eval().to("cuda", torch.bfloat16)
    bar = Progress("llama block", total=len(seq_lens))  # stderr, terminal only
    for n in seq_lens:
        bar.note(f"seq {n}")
        ids = torch.randint(0, 32000, (1, n), device="cuda")
        variants = [("eager", None), ("inductor", "inductor"),
                    ("attnopt int8 attn", attnopt.backend({})),
                    ("attnopt int8 attn + w8a8", attnopt.backend({"linear": {"quant": "w8a8"}})),
                    ("attnopt w4a16", attnopt.backend({"linear": {"quant": "w4a16"}}))]
        if "nvfp4" in ARCHS[arch].linear_formats:
            variants.append(("attnopt nvfp4", attnopt.backend({"linear": {"quant": "nvfp4"}})))
        for name, backend in variants:
            if not limit.allows():
                break
            torch._dynamo.reset()
            row = {"kind": "llama-block", "seq": n, "variant": name}
            with limit.item():
                try:  # one variant failing (a compile error, OOM) still leaves the others measured
                    f = model if backend is None else torch.compile(model, backend=backend)
                    with torch.no_grad():
                        f(ids)
                        row["ms"] = bench(lambda: f(ids))
                except Exception as e:
                    row["error"] = repr(e)[:200]
            rows.append(row)
            bar.write(json.dumps(row))
        bar.step()
    bar.close()
    return rows


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two GEMM shapes, then the block at 1 and 2048 tokens")
    ap.add_argument("--out-dir", default=common.RESULTS)
    common.add_time_limit(ap)
    return ap.parse_args(argv)


def main():
    args = parse_args()
    common.require_cuda("benchmarks/linear.py")
    arch = detect_arch("cuda")
    out_name = f"linear_{arch}.json"
    extra = {"what": __doc__.splitlines()[0], "arch": arch}
    limit = common.TimeLimit(args.time_limit)
    shapes = [(1, 4096, 4096), (16, 4096, 4096), (4096, 4096, 4096), (8192, 8192, 8192), (1, 11008, 4096)]
    if args.quick:
        shapes = [(4096, 4096, 4096), (1, 4096, 4096)]
    rows = gemm_rows(shapes, arch, limit)
    common.write(out_name, rows, extra, out_dir=args.out_dir)  # kept if the block rows are cut short
    rows += train_rows([(4096, 4096, 4096)] if args.quick else [(4096, 4096, 4096), (8192, 4096, 11008)], arch,
                       limit)
    common.write(out_name, rows, extra, out_dir=args.out_dir)
    rows += block_rows([1, 2048] if args.quick else [1, 512, 4096], arch, limit)
    print("wrote", common.write(out_name, rows, {**extra, "stopped_by_time_limit": limit.stopped},
                                out_dir=args.out_dir))


if __name__ == "__main__":
    main()
