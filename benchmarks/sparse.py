"""Block-sparse attention: kernel time against sparsity (0-90%) next to attnopt dense and
FlexAttention with the same block mask, and each predictor's cost (sparge, xattention, vsa) as a
share of dense attention. (Error at equal sparsity, on the CPU: benchmarks/sparse_vsa.py.)
Needs a CUDA GPU. Targets (seq >= 16K, head dim 128): at 50% sparsity <= 0.6x the dense quantized
kernel; predictor <= 10% of dense attention; faster than FlexAttention at equal masks.

    python benchmarks/sparse.py [--seqs 16384 32768] [--quick] [--time-limit S]

--quick: 16K tokens at sparsity 0, 0.5 and 0.9 (the session's run). The JSON is written after
every row, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from attnopt.codegen.arch import detect_arch  # noqa: E402
from attnopt.codegen.attention.launch import attention_triton  # noqa: E402
from attnopt.codegen.sparse.predict import (predict_sparge_triton, predict_vsa_triton,  # noqa: E402
                                            predict_xattention_triton)
from attnopt.ops import sparse_ref as R  # noqa: E402
from attnopt.progress import Progress  # noqa: E402


def do_bench(fn, rep=100):
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, nargs="+", default=[16384, 32768])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 0.9])
    ap.add_argument("--quick", action="store_true", help="16K tokens at sparsity 0, 0.5, 0.9: the session's run")
    ap.add_argument("--out-dir", default=common.RESULTS)
    common.add_time_limit(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.seqs, args.sparsities = [16384], [0.5, 0.0, 0.9]
    return args


def main() -> None:
    args = parse_args()
    common.require_cuda("benchmarks/sparse.py")
    arch = detect_arch("cuda")
    out_name = f"sparse_{arch}.json"
    extra = {"what": __doc__.splitlines()[0], "arch": arch}
    limit = common.TimeLimit(args.time_limit)
    rows = []
    bar = Progress("sparse", total=len(args.seqs))  # stderr, terminal only
    for n in args.seqs:
        if not limit.allows():
            break
        bar.note(f"seq {n}")
        h, d = args.heads, args.dim
        q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=torch.float16) for _ in range(3))
        scale = d ** -0.5

        def dense():
            return attention_triton(q, k, v, None, None, -math.inf, False, 0, scale, "int8", "fp16", True, False, arch)

        t_dense = do_bench(dense)
        rows.append({"seq": n, "variant": "attnopt dense int8", "sparsity": 0.0, "ms": t_dense})
        for name, pred in (("sparge", lambda: predict_sparge_triton(q, k, scale, 0.9, 0.3)),
                           ("xattention", lambda: predict_xattention_triton(q, k, scale, 8, 0.9)),
                           ("vsa", lambda: predict_vsa_triton(q, k, scale, 64, 0.25))):
            t = do_bench(pred)
            rows.append({"seq": n, "variant": f"predictor {name}", "ms": t, "share_of_dense": t / t_dense})
        common.write(out_name, rows, extra, out_dir=args.out_dir)
        nqb, nkb = R.n_blocks(n, R.BQ), R.n_blocks(n, R.BK)
        for sp in args.sparsities:
            if not limit.allows():
                break
            with limit.item():
                rows.append(sparse_row(q, k, v, n, sp, nqb, nkb, scale, arch, t_dense))
                bar.write(json.dumps(rows[-1]))
                common.write(out_name, rows, extra, out_dir=args.out_dir)
        bar.step()
    bar.close()
    path = common.write(out_name, rows, {**extra, "stopped_by_time_limit": limit.stopped}, out_dir=args.out_dir)
    print("wrote", path)


def sparse_row(q, k, v, n, sp, nqb, nkb, scale, arch, t_dense) -> dict:
    """A random block mask of sparsity `sp`: attnopt's block-sparse kernel against its own dense
    kernel (vs_dense) and FlexAttention with the same mask."""
    keep = torch.rand(1, q.shape[1], nqb, nkb, device="cuda") >= sp
    keep[..., 0] = True
    lut, counts = R.block_mask_to_lut(keep, n, n, False, 0)
    real = 1 - keep.float().mean().item()

    def sparse():
        return attention_triton(q, k, v, None, None, -math.inf, False, 0, scale, "int8", "fp16", True, False,
                                arch, lut=lut, counts=counts)

    t = do_bench(sparse)
    row = {"seq": n, "variant": "attnopt block-sparse int8", "target_sparsity": sp, "sparsity": real, "ms": t,
           "vs_dense": t / t_dense}
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention

        kb = keep.repeat_interleave(2, dim=2)[:, :, :R.n_blocks(n, 64)]  # flex: 64-row q blocks here
        kv_num = kb.sum(-1).to(torch.int32)
        kv_idx = kb.to(torch.int32).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
        bm = BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=(64, 64))
        flex = torch.compile(flex_attention)
        row["flex_ms"] = do_bench(lambda: flex(q, k, v, block_mask=bm))
    except Exception as e:
        row["flex_error"] = repr(e)[:200]
    return row


if __name__ == "__main__":
    main()
