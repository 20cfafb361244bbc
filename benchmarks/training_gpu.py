"""Training speed on a GPU: attention forward+backward against torch SDPA (flash, cuDNN) and
FlexAttention, and a whole training step of a small Qwen3 under attnopt against bf16, all in
this one process. Needs a CUDA GPU.

Attention rows: ms of out = attn(q, k, v); out.backward(dO), bf16, B*N = --tokens, 16 heads,
medians of triton.testing.do_bench; attnopt's dQ/dK/dV rel-L1 against float64 autograd on two
heads (at most 2048 tokens, so float64 fits). Step rows: ms per optimizer step of the tiny
Qwen3 of benchmarks/training.py scaled up (--hidden, --layers) at --seq tokens, eager bf16,
torch.compile (Inductor) bf16, and attnopt (attention.backward, linear.training).

    python benchmarks/training_gpu.py [--seqs 2048 8192] [--quick] [--time-limit S]
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
from attnopt.metrics import compare  # noqa: E402

VARIANTS = {"attnopt int8 bwd": "int8", "attnopt exact bwd": "exact"}


def attention_fns(causal: bool) -> dict:
    """attnopt with each backward, and the forward peers of benchmarks/attention.py that have a
    backward (SageAttention's kernels are inference only)."""
    from attention import peers

    fns = {name: (lambda q, k, v, bw=bw: attnopt.attention(q, k, v, is_causal=causal, backward=bw))
           for name, bw in VARIANTS.items()}
    fns.update({name: fn for name, fn in peers(causal).items() if not name.startswith("sageattn")})
    return fns


def fwd_bwd_ms(fn, q, k, v, dout, rep_ms: int) -> float:
    import triton

    def step():
        out = fn(q, k, v)
        torch.autograd.grad(out, (q, k, v), dout)

    return triton.testing.do_bench(step, warmup=10, rep=rep_ms, return_mode="median")


def attention_rows(args, limit) -> list:
    rows = []
    for causal in (True, False):
        fns = attention_fns(causal)
        for n in args.seqs:
            if not limit.allows():
                return rows
            with limit.item():
                b = max(1, args.tokens // n)
                q, k, v = (torch.randn(b, 16, n, args.head_dim, device="cuda", dtype=torch.bfloat16,
                                       requires_grad=True) for _ in range(3))
                dout = torch.randn(b, 16, n, args.head_dim, device="cuda", dtype=torch.bfloat16)
                qs, ks, vs = (t[:1, :2, :2048].detach() for t in (q, k, v))
                ds = dout[:1, :2, :2048]
                q6, k6, v6 = (t.double().requires_grad_() for t in (qs, ks, vs))
                ref = torch.autograd.grad(F.scaled_dot_product_attention(q6, k6, v6, is_causal=causal),
                                          (q6, k6, v6), ds.double())
                for name, fn in fns.items():
                    row = {"what": "attention fwd+bwd", "variant": name, "seq": n, "batch": b, "heads": 16,
                           "head_dim": args.head_dim, "causal": causal}
                    try:
                        if name.startswith("attnopt"):
                            leaves = [t.clone().requires_grad_() for t in (qs, ks, vs)]
                            got = torch.autograd.grad(fn(*leaves), leaves, ds)
                            for g, r, nm in zip(got, ref, ("dq", "dk", "dv")):
                                row[f"{nm}_rel_l1"] = compare(g, r)["rel_l1"]
                        row["ms"] = fwd_bwd_ms(fn, q, k, v, dout, args.rep_ms)
                        flops = 4 * b * 16 * n * n * args.head_dim * 3.5 / (2 if causal else 1)  # fwd 2 + bwd 5 matmuls
                        row["tflops"] = flops / row["ms"] / 1e9
                    except Exception as e:  # a peer without this shape
                        row["error"] = repr(e)[:200]
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                del q, k, v, dout
                torch.cuda.empty_cache()
    return rows


def step_rows(args, limit) -> list:
    import training

    rows = []
    batches = training.copy_batches(4, batch=args.batch, seq=args.seq, device="cuda")

    sides = {"eager bf16": lambda m: m,
             "inductor bf16": lambda m: torch.compile(m),
             "attnopt": lambda m: torch.compile(m, backend=attnopt.backend(
                 training.attnopt_options(args.backward, args.linear)))}
    for name, wrap in sides.items():
        if not limit.allows():
            break
        with limit.item():
            torch._dynamo.reset()
            f = wrap(training.tiny_qwen3(0, layers=args.layers, device="cuda"))
            opt = torch.optim.AdamW(f.parameters(), lr=1e-3)

            def step(ids=batches[0][0], pos=batches[0][1]):
                opt.zero_grad(set_to_none=True)
                f(input_ids=ids, position_ids=pos, labels=ids, use_cache=False).loss.backward()
                opt.step()

            for _ in range(3):
                step()
            torch.cuda.synchronize()
            import triton

            ms = triton.testing.do_bench(step, warmup=5, rep=args.rep_ms * 4, return_mode="median")
            row = {"what": "training step", "variant": name, "seq": args.seq, "batch": args.batch,
                   "layers": args.layers, "ms": ms}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[2048, 8192, 16384])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--rep-ms", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="2K and 8K tokens: the GPU session's run")
    ap.add_argument("--seq", type=int, default=2048, help="training step: tokens per row")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--backward", default="int8", choices=["int8", "exact"])
    ap.add_argument("--linear", default="fp8", choices=["off", "int8", "fp8"])
    ap.add_argument("--time-limit", type=float, default=None)
    ap.add_argument("--out-dir", default=common.RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.seqs = [2048, 8192]
    return args


def main() -> None:
    args = parse_args()
    common.require_cuda("benchmarks/training_gpu.py")
    limit = common.TimeLimit(args.time_limit)
    name = f"training_gpu_{torch.cuda.get_device_name().replace(' ', '_')}.json"
    rows = attention_rows(args, limit)
    common.write(name, rows, {"what": __doc__.splitlines()[0]}, out_dir=args.out_dir)
    rows += step_rows(args, limit)
    print("wrote", common.write(name, rows, {"what": __doc__.splitlines()[0], "stopped_by_time_limit": limit.stopped},
                                out_dir=args.out_dir))


if __name__ == "__main__":
    main()
