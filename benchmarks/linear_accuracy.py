"""Accuracy of each linear format on the CPU reference: rel-L1 and cosine of one linear against
float64 x W^T (the arithmetic the kernels compute; tests hold the kernels to it), DiT-XL-sized
linears (1152 -> 1152 and 4608 -> 1152, weights N(0, 1/K), 512 bf16 tokens), two kinds of
activations:

- normal: standard-normal x;
- outliers: per-channel scales drawn log-normal (sigma 0.5) and 1% of the channels 30x larger,
  the channel-wise outliers DiT and LLM activations show.

Per format (bf16, w8a8, fp8, w4a16, w4a8, nvfp4): plain round-to-nearest; SmoothQuant-style
channel balancing (alpha 0.5, statistics from separate calibration rows: what `linear.smooth`
folds, and what ViDiT-Q's static channel balance is); AWQ scales searched on the calibration
rows (the int4-weight formats w4a16 and w4a8). Errors are measured on held-out rows. The numbers
of README's linear accuracy table; CPU, a few minutes on two cores.

    python benchmarks/linear_accuracy.py    # writes benchmarks/results/linear_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from attnopt.calibration.awq import awq_search  # noqa: E402
from attnopt.ops import linear_ref as L  # noqa: E402

SHAPES = ((1152, 1152), (4608, 1152))  # (K, N): attention / MLP-up input width, MLP-down
ROWS = 512
FORMATS = ("bf16", "w8a8", "fp8", "w4a16", "w4a8", "nvfp4")


def activations(kind: str, m: int, k: int, gen: torch.Generator, chan: torch.Tensor | None) -> torch.Tensor:
    x = torch.randn(m, k, generator=gen)
    if kind == "outliers":
        x = x * chan[None, :]
    return x.bfloat16()


def channel_scales(k: int, gen: torch.Generator) -> torch.Tensor:
    """Log-normal per-channel scales with 1% of the channels 30x larger (fixed per linear)."""
    chan = torch.exp(0.5 * torch.randn(k, generator=gen))
    chan[torch.randperm(k, generator=gen)[: max(1, k // 100)]] *= 30
    return chan


def metrics(y: torch.Tensor, ref: torch.Tensor) -> dict:
    y = y.double()
    return {"rel_l1": float((y - ref).abs().sum() / ref.abs().sum()),
            "cos": float(torch.nn.functional.cosine_similarity(y.flatten(), ref.flatten(), dim=0))}


def output(x: torch.Tensor, w: torch.Tensor, fmt: str, s: torch.Tensor | None = None) -> torch.Tensor:
    """The format's reference output (every M on its GEMM path) with x / s and W s (s None: as
    is); x / s rounded to bf16. bf16: the unquantized linear on bf16 x and W."""
    if s is not None:
        x, w = (x.double() / s).bfloat16(), (w.double() * s).float()
    if fmt == "bf16":
        return torch.nn.functional.linear(x, w.bfloat16())
    return L.format_output(x, L.quantize_format(w, fmt), None, fmt, small_m=0)


def smooth_scales(calib: torch.Tensor, w: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant: s_j = max|x_j|^alpha / max|W_j|^(1 - alpha), from the calibration rows."""
    ax = calib.double().abs().amax(dim=0).clamp_min(1e-5)
    aw = w.double().abs().amax(dim=0).clamp_min(1e-5)
    return ax ** alpha / aw ** (1 - alpha)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=common.RESULTS)
    args = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for k, n in SHAPES:
        w = torch.randn(n, k, generator=gen) / k ** 0.5
        for kind in ("normal", "outliers"):
            chan = channel_scales(k, gen) if kind == "outliers" else None
            calib, held = (activations(kind, ROWS, k, gen, chan) for _ in range(2))
            ref = held.double() @ w.double().T
            smooth = smooth_scales(calib, w)
            for fmt in FORMATS:
                row = {"K": k, "N": n, "M": ROWS, "activations": kind, "format": fmt,
                       "rtn": metrics(output(held, w, fmt), ref),
                       "smooth_0.5": metrics(output(held, w, fmt, smooth), ref)}
                if fmt in L.AWQ_FORMATS:
                    c = awq_search(calib.float(), w, fmt=fmt)
                    row["awq"] = {**metrics(output(held, w, fmt, c.scales), ref), "alpha": c.alpha}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("wrote", common.write("linear_accuracy.json", rows, {"what": __doc__.splitlines()[0]}, out_dir=args.out_dir))


if __name__ == "__main__":
    main()
