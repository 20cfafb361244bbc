"""Accuracy of each linear format on the CPU reference: rel-L1 of one linear against float64
x W^T, on standard-normal activations and on activations with outlier channels (one input
channel in 32 thirty times larger, as in LLM hidden states), with and without SmoothQuant
(alpha 0.5, the scales from the same activations' per-channel max, folded into W and x).
Runs on a CPU in seconds; the numbers of README's linear accuracy table.

    python benchmarks/linear_accuracy.py [--seeds 3]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from attnopt.metrics import compare  # noqa: E402
from attnopt.ops import linear_nvfp4_ref as F  # noqa: E402
from attnopt.ops import linear_ref as L  # noqa: E402

M, N, K = 512, 1024, 1024
FORMATS = ("bf16", "w8a8", "fp8", "w4a16", "nvfp4")


def activations(kind: str) -> torch.Tensor:
    x = torch.randn(M, K)
    if kind == "outliers":
        x[:, torch.randperm(K)[:K // 32]] *= 30
    return x


def output(fmt: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The format's linear (reference arithmetic, every M on its GEMM path) on bf16 x and W."""
    x, w = x.bfloat16(), w.bfloat16()
    if fmt == "bf16":
        return torch.nn.functional.linear(x, w)
    if fmt in ("w8a8", "fp8"):
        f = "int8" if fmt == "w8a8" else "fp8"
        return L.linear_w8a8_ref(x, *L.quantize_weight(w, f), None, f, small_m=0)
    if fmt == "w4a16":
        return L.linear_w4a16_ref(x, *L.quantize_weight_int4(w), None)
    return F.linear_nvfp4_ref(x, *F.quantize_weight_nvfp4(w), None)


def smoothed(x: torch.Tensor, w: torch.Tensor, alpha: float = 0.5):
    """SmoothQuant: x / s and W s with s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)."""
    s = x.abs().amax(0).clamp_min(1e-5) ** alpha / w.abs().amax(0).clamp_min(1e-5) ** (1 - alpha)
    return x / s, w * s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out-dir", default=common.RESULTS)
    args = ap.parse_args(argv)
    rows = []
    for kind in ("normal", "outliers"):
        for smooth in (False, True):
            errs = {f: [] for f in FORMATS}
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                x, w = activations(kind), torch.randn(N, K) * 0.02
                ref = x.double() @ w.double().T
                xs, ws = smoothed(x, w) if smooth else (x, w)
                for f in FORMATS:
                    errs[f].append(compare(output(f, xs, ws), ref)["rel_l1"])
            for f in FORMATS:
                rows.append({"activations": kind, "smoothquant": smooth, "format": f, "rel_l1_min": min(errs[f]),
                             "rel_l1_max": max(errs[f])})
                print(f"{kind:9s} smooth={str(smooth):5s} {f:6s} rel-L1 {min(errs[f]):.4f}-{max(errs[f]):.4f}")
    print("wrote", common.write("linear_accuracy.json", rows, {"what": __doc__.splitlines()[0], "M": M, "N": N,
                                                               "K": K, "seeds": args.seeds}, out_dir=args.out_dir))


if __name__ == "__main__":
    main()
