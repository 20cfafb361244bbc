"""Block-sparse attention: kernel time against sparsity (0-90%) next to attnopt dense and
FlexAttention with the same block mask, each predictor's cost (sparge, xattention, vsa, and svg2's
warm k-means + permutation + selection) as a share of dense attention, and svg2's whole op.
(Error at equal sparsity, on the CPU: benchmarks/sparse_vsa.py, and --cpu-compare below.)
Needs a CUDA GPU. Targets (seq >= 16K, head dim 128): at 50% sparsity <= 0.6x the dense quantized
kernel; predictor <= 10% of dense attention; faster than FlexAttention at equal masks.

    python benchmarks/sparse.py [--seqs 16384 32768] [--quick] [--time-limit S]
    python benchmarks/sparse.py --cpu-compare [--frames 8] [--size 16]

--quick: 16K tokens at sparsity 0, 0.5 and 0.9 (the session's run). The JSON is written after
every row, so a run cut short keeps what it measured.

--cpu-compare (no GPU): svg2 against svg (SVG1) and radial on video-like inputs, int8 block-sparse
attention against float64 dense: svg2's top_p bisected to each svg / radial configuration's block
sparsity (error at equal sparsity) and to its rel-L1 (sparsity at equal error). Inputs: "semantic"
(frames x size x size tokens; q and k the embedding of one of 8 objects laid out at random on 2x2
patches that move one patch per frame, plus a small (t, h, w) embedding and noise: attention goes
to tokens of the same object wherever they are) and "local" (benchmarks/sparse_vsa.py's video:
attention near in space and time). Writes sparse_svg2_cpu.json.
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
from attnopt.ops.sparse import block_sparsity, predict_block_mask  # noqa: E402
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
    ap.add_argument("--cpu-compare", action="store_true", help="svg2 against svg and radial on the CPU (error)")
    ap.add_argument("--frames", type=int, default=8, help="--cpu-compare: video frames")
    ap.add_argument("--size", type=int, default=16, help="--cpu-compare: tokens per frame side")
    ap.add_argument("--out-dir", default=common.RESULTS)
    common.add_time_limit(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.seqs, args.sparsities = [16384], [0.5, 0.0, 0.9]
    return args


def main() -> None:
    args = parse_args()
    if args.cpu_compare:
        return cpu_compare(args)
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
        if limit.allows():
            with limit.item():
                rows.extend(svg2_rows(q, k, v, n, scale, arch, t_dense))
                bar.write(json.dumps(rows[-1]))
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


SVG2_GPU = {"method": "svg2", "q_clusters": 100, "k_clusters": 500, "top_p": 0.9, "min_key_share": 0.1,
            "init_iters": 50, "warm_iters": 2}  # the paper's cluster counts and top-p


def svg2_rows(q, k, v, n, scale, arch, t_dense) -> list[dict]:
    """svg2 at 16K: its warm predictor (2 k-means iterations from the last centroids, the
    permutation, the pair selection, the LUT) and the whole op (predictor, permuted copies of
    Q, K, V, the block-sparse kernel, the un-permuted output), both against dense attention."""
    from attnopt.ops import svg2

    state = svg2.CentroidState()
    svg2.predict_layout(q, k, SVG2_GPU, scale, state, "bench")  # cold: init_iters

    def predictor():
        lay = svg2.predict_layout(q, k, SVG2_GPU, scale, state, "bench")
        return R.block_mask_to_lut(lay.keep, n, n, False, 0)

    def whole():
        return svg2.svg2_attention(q, k, v, None, None, -math.inf, False, scale, "int8", "fp16", True, arch,
                                   SVG2_GPU, True, state, "bench")[0]

    t_pred = do_bench(predictor, rep=50)
    out, lay = svg2.svg2_attention(q, k, v, None, None, -math.inf, False, scale, "int8", "fp16", True, arch,
                                   SVG2_GPU, True, state, "bench")
    sp = 1 - lay.keep.float().mean().item()
    t_all = do_bench(whole, rep=50)
    return [{"seq": n, "variant": "predictor svg2 (warm)", "ms": t_pred, "share_of_dense": t_pred / t_dense,
             "sparsity": sp},
            {"seq": n, "variant": "attnopt svg2 int8 (whole op)", "ms": t_all, "vs_dense": t_all / t_dense,
             "sparsity": sp}]


# ------------------------------------------------------------------ --cpu-compare (svg2 vs svg, radial)

def _sinusoid(pos: torch.Tensor, d: int, base: float) -> torch.Tensor:
    freqs = 1.0 / (base ** (torch.arange(d // 2).float() / (d // 2)))
    ang = pos[:, None].float() * freqs
    return torch.cat([ang.cos(), ang.sin()], -1)


def semantic_video(frames: int, size: int, objects: int = 8, heads: int = 2, dim: int = 64, batch: int = 1,
                   amp: float = 0.8, pos_amp: float = 1.0, noise: float = 0.3, seed: int = 0):
    """Video-like q, k, v [batch, heads, frames * size^2, dim] (bf16) whose attention follows
    objects, not distance: each token belongs to one of `objects`, laid out at random on 2x2
    patches that shift one patch per frame; q and k are the object's (per head, per batch element)
    embedding plus a small (t, h, w) sinusoid and noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(objects, (-(-size // 2),) * 2, generator=g).repeat_interleave(2, 0).repeat_interleave(2, 1)
    labels = torch.stack([base[:size, :size].roll(t, dims=1) for t in range(frames)]).flatten()
    t, h, w = torch.meshgrid(torch.arange(frames), torch.arange(size), torch.arange(size), indexing="ij")
    third = dim // 3 // 2 * 2
    pos = torch.cat([_sinusoid(t.flatten(), third, 50.0), _sinusoid(h.flatten(), third, 50.0),
                     _sinusoid(w.flatten(), dim - 2 * third, 50.0)], -1) * pos_amp
    n = labels.numel()
    sem = (torch.randn(batch, heads, objects, dim, generator=g) * amp)[:, :, labels]
    q = sem + pos + noise * torch.randn(batch, heads, n, dim, generator=g)
    k = sem + pos + noise * torch.randn(batch, heads, n, dim, generator=g)
    return q.bfloat16(), k.bfloat16(), torch.randn(batch, heads, n, dim, generator=g).bfloat16()


def rel_l1(out, exact) -> float:
    return ((out.double() - exact).abs().sum() / exact.abs().sum()).item()


def svg2_params(top_p: float, q_clusters: int = 16, k_clusters: int = 32) -> dict:
    return {"method": "svg2", "q_clusters": q_clusters, "k_clusters": k_clusters, "top_p": top_p,
            "min_key_share": 0.0, "init_iters": 20, "warm_iters": 0}


class Svg2Probe:
    """svg2 on fixed inputs at any top_p: k-means runs once (init_iters), later calls reuse its
    centroids (warm_iters 0), so only the selection changes with top_p."""

    def __init__(self, q, k, v, scale: float, q_clusters: int = 16, k_clusters: int = 32):
        from attnopt.ops import svg2

        self.svg2, self.state = svg2, svg2.CentroidState()
        self.q, self.k, self.v, self.scale, self.qc, self.kc = q, k, v, scale, q_clusters, k_clusters

    def sparsity(self, top_p: float) -> float:
        lay = self.svg2.predict_layout(self.q, self.k, svg2_params(top_p, self.qc, self.kc), self.scale, self.state)
        n, m = self.q.shape[2], self.k.shape[2]
        return block_sparsity(lay.keep, n, m, False, 0)

    def run(self, top_p: float, exact) -> tuple[float, float]:
        """(block sparsity, rel-L1 against `exact`) of int8 svg2 at top_p."""
        out, lay = self.svg2.svg2_attention(self.q, self.k, self.v, None, None, -math.inf, False, self.scale, "int8",
                                            "fp16", True, "cpu", svg2_params(top_p, self.qc, self.kc), False,
                                            self.state)
        return block_sparsity(lay.keep, self.q.shape[2], self.k.shape[2], False, 0), rel_l1(out, exact)


def bisect_top_p(measure, target: float, steps: int = 10) -> tuple[float, float]:
    """The top_p whose measure (decreasing in top_p: sparsity or error) is nearest `target`."""
    lo, hi, best = 1e-3, 1.0, None
    for _ in range(steps):
        mid = (lo + hi) / 2
        got = measure(mid)
        if best is None or abs(got - target) < abs(best[1] - target):
            best = (mid, got)
        lo, hi = (mid, hi) if got > target else (lo, mid)
    return best


def baseline_configs(frame_tokens: int) -> list[dict]:
    """svg and radial at their usual knobs (nothing continuous to bisect)."""
    svg = {"method": "svg", "frame_tokens": frame_tokens, "sample_rows": 32, "prefix_tokens": 0}
    radial = {"method": "radial", "frame_tokens": frame_tokens, "prefix_tokens": 0}
    return [{**svg, "spatial_frames": 1, "temporal_tokens": 64}, {**svg, "spatial_frames": 0, "temporal_tokens": 32},
            {**radial, "dense_frames": 1, "min_band": 128}]


def compare_row(q, k, v, params: dict, probe: Svg2Probe, exact, scale: float) -> dict:
    """One baseline configuration against svg2 at its sparsity and at its error."""
    n, m = q.shape[2], k.shape[2]
    keep = predict_block_mask(q, k, v, params, scale, False, 0, False)
    sp = block_sparsity(keep, n, m, False, 0)
    err = rel_l1(R.sparse_attention_reference(q, k, v, keep, None, None, -math.inf, False, 0, scale, "int8", "fp16",
                                              True), exact)
    p_sp, _ = bisect_top_p(probe.sparsity, sp)
    sp_at_sp, err_at_sp = probe.run(p_sp, exact)
    p_err, _ = bisect_top_p(lambda p: probe.run(p, exact)[1], err, steps=8)
    sp_at_err, err_at_err = probe.run(p_err, exact)
    knobs = {k_: v_ for k_, v_ in params.items() if k_ in ("spatial_frames", "temporal_tokens", "dense_frames",
                                                           "min_band")}
    return {"method": params["method"], "knobs": knobs, "sparsity": round(sp, 4), "rel_l1": round(err, 5),
            "svg2_at_equal_sparsity": {"top_p": round(p_sp, 4), "sparsity": round(sp_at_sp, 4),
                                       "rel_l1": round(err_at_sp, 5)},
            "svg2_at_equal_error": {"top_p": round(p_err, 4), "sparsity": round(sp_at_err, 4),
                                    "rel_l1": round(err_at_err, 5)}}


def cpu_compare(args) -> None:
    from sparse_vsa import video_inputs

    from attnopt.ops.attention_ref import attention_exact

    torch.manual_seed(0)
    dim = 64
    inputs = {"semantic": semantic_video(args.frames, args.size, dim=dim)}
    local = video_inputs(args.frames, args.size)
    inputs["local"] = tuple(t[:, :2] for t in local)  # two heads, as the semantic inputs
    rows = []
    for name, (q, k, v) in inputs.items():
        scale = dim ** -0.5
        exact = attention_exact(q, k, v, None, None, -math.inf, False, 0, scale)
        probe = Svg2Probe(q, k, v, scale)
        for params in baseline_configs(args.size * args.size):
            row = {"inputs": name, "seq": q.shape[2], **compare_row(q, k, v, params, probe, exact, scale)}
            rows.append(row)
            a, b = row["svg2_at_equal_sparsity"], row["svg2_at_equal_error"]
            print(f"{name:8s} {row['method']:6s} {row['knobs']}: sparsity {row['sparsity']:.3f} rel-L1 "
                  f"{row['rel_l1']:.4f} | svg2 at its sparsity {a['sparsity']:.3f}: rel-L1 {a['rel_l1']:.4f} | "
                  f"svg2 at its error {b['rel_l1']:.4f}: sparsity {b['sparsity']:.3f}")
            common.write("sparse_svg2_cpu.json", rows, {"what": "svg2 against svg and radial (CPU, int8)"},
                         out_dir=args.out_dir)


if __name__ == "__main__":
    main()
