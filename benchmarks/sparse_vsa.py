"""VSA against window and sparge at equal block sparsity (CPU): each method's knob is bisected to
the target sparsity (the predictor alone), then the block-sparse int8 attention's rel-L1 against
float64 dense attention is measured.

Inputs (non-causal self-attention, 4 heads of 64):
- random: q, k, v ~ N(0, 1), as benchmarks/sparse.py times them (diffuse attention: every method
  errs about equally, the floor of dropping mass at random);
- local: q_i . k_j ~ sum_f cos(w_f (i - j)) (attention near the diagonal of the 1-D sequence);
- video: 8 frames x 16 x 16 patches, q and k a sinusoidal embedding of each patch's (t, h, w)
  plus noise (attention near in space and time), in raster order, and in cube order
  (sparse_ref.vsa_cube_order, 1 x 8 x 8 cubes) where each 64-token tile is one cube.

    python benchmarks/sparse_vsa.py [--targets 0.5 0.75] [--seq 2048]

Methods: window (span bisected, no sinks), sparge (topk bisected, theta -1, no sink), vsa (topk
share bisected; tiles of 64 and of 128 keys). With 64-key tiles and sparge's self-similarity test
and sink off, VSA's selection is sparge's top-k rule (centering K shifts each row's pooled logits
by one constant, which changes no ranking), so those two rows agree; VSA differs by its coarser
tiles, its tile counts and by being trainable. Writes benchmarks/results/sparse_vsa_cpu.json.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from attnopt.ops import sparse_ref as R  # noqa: E402
from attnopt.ops.attention_ref import attention_exact  # noqa: E402
from attnopt.ops.sparse import block_sparsity, predict_block_mask  # noqa: E402

HEADS, DIM = 4, 64


def _sinusoid(pos: torch.Tensor, d: int, base: float) -> torch.Tensor:
    freqs = 1.0 / (base ** (torch.arange(d // 2).float() / (d // 2)))
    ang = pos[:, None].float() * freqs
    return torch.cat([ang.cos(), ang.sin()], -1)


def random_inputs(n: int):
    return tuple(torch.randn(1, HEADS, n, DIM).bfloat16() for _ in range(3))


def local_inputs(n: int, amp: float = 1.5, noise: float = 0.3):
    base = _sinusoid(torch.arange(n), DIM, 200.0) * amp
    return ((base + noise * torch.randn(1, HEADS, n, DIM)).bfloat16(),
            (base + noise * torch.randn(1, HEADS, n, DIM)).bfloat16(), torch.randn(1, HEADS, n, DIM).bfloat16())


def video_inputs(frames: int, size: int, amp: float = 3.0, noise: float = 0.3, order=None):
    t, h, w = torch.meshgrid(torch.arange(frames), torch.arange(size), torch.arange(size), indexing="ij")
    third = DIM // 3 // 2 * 2
    emb = torch.cat([_sinusoid(t.flatten(), third, 50.0), _sinusoid(h.flatten(), third, 50.0),
                     _sinusoid(w.flatten(), DIM - 2 * third, 50.0)], -1) * amp
    n = emb.shape[0]
    q, k = ((emb + noise * torch.randn(1, HEADS, n, DIM)) for _ in range(2))
    v = torch.randn(1, HEADS, n, DIM)
    if order is not None:
        q, k, v = q[:, :, order], k[:, :, order], v[:, :, order]
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def knob(method: str, x: float, n: int) -> dict:
    """The method's parameters at knob value x in (0, 1] (more blocks kept as x grows)."""
    if method == "window":
        return {"method": "window", "window": max(1, int(x * n)), "alpha": 0.0, "beta": 0.25, "sinks": 0,
                "causal_only": False}
    if method == "sparge":
        return {"method": "sparge", "tau": 0.9, "theta": -1.0, "topk": x, "sink": False, "local_keys": 0}
    tile = 128 if method == "vsa-tile128" else 64
    return {"method": "vsa", "tile": tile, "topk": x, "diagonal": True}


def at_sparsity(method: str, q, k, v, target: float, steps: int = 12):
    """Bisect the knob to the block sparsity nearest `target`: -> (params, sparsity, keep)."""
    n, scale = q.shape[2], DIM ** -0.5
    lo, hi, best = 1e-4, 1.0, None
    for _ in range(steps):
        mid = (lo + hi) / 2
        params = knob(method, mid, n)
        keep = predict_block_mask(q, k, v, params, scale, False, 0, False)
        sp = block_sparsity(keep, n, n, False, 0)
        if best is None or abs(sp - target) < abs(best[1] - target):
            best = (params, sp, keep)
        if sp > target:
            lo = mid
        else:
            hi = mid
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.75])
    ap.add_argument("--seq", type=int, default=2048, help="tokens of the random and local inputs")
    ap.add_argument("--out-dir", default=common.RESULTS)
    args = ap.parse_args()
    torch.manual_seed(0)
    cube = R.vsa_cube_order(8, 16, 16, (1, 8, 8))
    inputs = {"random": random_inputs(args.seq), "local": local_inputs(args.seq),
              "video raster": video_inputs(8, 16), "video cubes": None}
    torch.manual_seed(0)
    inputs["video cubes"] = video_inputs(8, 16, order=cube)
    rows = []
    for name, (q, k, v) in inputs.items():
        n = q.shape[2]
        exact = attention_exact(q, k, v, None, None, -math.inf, False, 0, DIM ** -0.5)
        for target in args.targets:
            for method in ("window", "sparge", "vsa", "vsa-tile128"):
                params, sp, keep = at_sparsity(method, q, k, v, target)
                out = R.sparse_attention_reference(q, k, v, keep, None, None, -math.inf, False, 0, DIM ** -0.5,
                                                   "int8", "fp16", True)
                err = ((out.double() - exact).abs().sum() / exact.abs().sum()).item()
                rows.append({"inputs": name, "seq": n, "target_sparsity": target, "method": method,
                             "sparsity": round(sp, 4), "rel_l1": round(err, 5),
                             "knob": {k_: v_ for k_, v_ in params.items() if k_ in ("window", "topk")}})
                print(f"{name:13s} target {target:.2f}  {method:11s} sparsity {sp:.3f}  rel-L1 {err:.4f}")
                common.write("sparse_vsa_cpu.json", rows, {"what": __doc__.splitlines()[0]}, out_dir=args.out_dir)


if __name__ == "__main__":
    main()
