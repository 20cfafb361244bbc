"""A video DiT (Wan-style, random weights) denoised with a step schedule and a calibrated SVG2 plan.

    python examples/video_dit.py                         # tiny Wan transformer, CPU
    python examples/video_dit.py --device cuda --size large

What it shows:
- `attention.sparsity` SVG2 (semantic-aware permutation: k-means clusters of queries and keys,
  block-sparse attention over the cluster-sorted tokens), its per-head `top_p` calibrated once on
  a few timesteps of this trajectory (`attnopt.calibrate`);
- `attention.schedule`: the first quarter of the steps runs dense (8-bit, no sparsity), as Sparse
  VideoGen and Radial Attention advise; the compiled model reads the step from `attnopt.step(i, n)`
  at run time, so all steps share one compiled graph;
- the report of what was rewritten, and the final latent against the uncompiled model.
"""

import argparse
import os
import tempfile

import torch

import attnopt
from attnopt.metrics import compare

SIZES = {
    "tiny": dict(frames=4, height=16, width=32, heads=2, head_dim=32, layers=2, text=16, steps=8,
                 q_clusters=8, k_clusters=16),
    "large": dict(frames=13, height=60, width=104, heads=12, head_dim=128, layers=30, text=128, steps=50,
                  q_clusters=100, k_clusters=500),
}


def build(size: str, device: str, dtype: torch.dtype):
    from diffusers import WanTransformer3DModel

    s = SIZES[size]
    model = WanTransformer3DModel.from_config(dict(
        patch_size=(1, 2, 2), num_attention_heads=s["heads"], attention_head_dim=s["head_dim"], in_channels=4,
        out_channels=4, text_dim=64, freq_dim=64, ffn_dim=2 * s["heads"] * s["head_dim"], num_layers=s["layers"],
        rope_max_seq_len=256))
    with torch.no_grad():  # random weights give near-uniform attention; a trained model's is peaked
        for name, p in model.named_parameters():
            if name.endswith(("attn1.norm_q.weight", "attn1.norm_k.weight")):  # Wan normalizes q and k
                p.mul_(3.0)
    return model.eval().to(device, dtype)


def scene_latents(s, device, dtype, objects: int = 6):
    """Latents of a few 'objects' scattered over the frames (each token near one of a few
    vectors): the semantic clusters SVG2 groups, which are not spatially contiguous."""
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(objects, 4, generator=g) * 2.0
    label = torch.randint(0, objects, (s["frames"], s["height"] // 2, s["width"] // 2), generator=g)
    label = label.repeat_interleave(2, 1).repeat_interleave(2, 2)  # one object per 2x2 patch
    x = centers[label].permute(3, 0, 1, 2) + 0.3 * torch.randn(4, s["frames"], s["height"], s["width"], generator=g)
    return x[None].to(device, dtype)


def denoise(fn, latents, text, timesteps):
    """A plain Euler loop; each step runs inside `attnopt.step(i, n)`, which the schedule reads."""
    x = latents
    for i, t in enumerate(timesteps):
        with attnopt.step(i, len(timesteps)):
            eps = fn(hidden_states=x, timestep=t[None], encoder_hidden_states=text, return_dict=False)[0]
        dt = (timesteps[i + 1] - t).item() / 1000 if i + 1 < len(timesteps) else -t.item() / 1000
        x = x + dt * eps
    return x


def plan_path(given):
    """Where the plan goes: --plan, else a new private temporary file (created, never guessed)."""
    if given:
        return given
    fd, path = tempfile.mkstemp(prefix="attnopt-plan-", suffix=".json")
    os.close(fd)
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", choices=SIZES, default="tiny")
    ap.add_argument("--plan", help="where to write the calibrated plan (default: a new temporary file)")
    args = ap.parse_args()
    s = SIZES[args.size]
    dtype = torch.bfloat16
    torch.manual_seed(0)
    model = build(args.size, args.device, dtype)
    latents = scene_latents(s, args.device, dtype)
    text = torch.randn(1, s["text"], 64, device=args.device, dtype=dtype)
    timesteps = torch.linspace(999, 0, s["steps"], device=args.device).round().long()

    options = {"attention": {
        "min_seq_len": 0,
        # self-attention only: the text cross-attention's few keys stay dense
        "sparsity": {"method": "svg2", "q_clusters": s["q_clusters"], "k_clusters": s["k_clusters"],
                     "min_seq_len": 64},
        # the first quarter of the run stays dense (8-bit attention, no sparsity)
        "schedule": [{"steps": [0.0, 0.25], "use": {"sparsity": None}}],
    }}
    # per-head top_p for SVG2, calibrated on three timesteps of the sparse part of the run
    batches = [dict(hidden_states=latents, timestep=t[None], encoder_hidden_states=text)
               for t in timesteps[len(timesteps) // 4::3][:3]]
    plan = attnopt.calibrate(model, batches, options=options, budget={"model_rel_l1": 0.05})
    path = plan_path(args.plan)
    plan.save(path)
    print(f"calibrated {len(plan.sites)} attention sites; plan written to {path}")
    options["plan"] = path
    report = attnopt.inspect(model, example_kwargs=batches[0], options=options)
    print(report)

    backend = attnopt.backend(options)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        x = denoise(compiled, latents, text, timesteps)
        ref = denoise(model, latents, text, timesteps)
    dense_steps = sum(1 for i in range(len(timesteps)) if i / len(timesteps) < 0.25)
    print(f"denoised {len(timesteps)} steps ({dense_steps} dense by the schedule, the rest SVG2); "
          f"graphs compiled: {backend.graphs_compiled}")
    print(f"summary: sites rewritten {report.summary['sites_rewritten']}/{report.summary['sites_total']}; "
          f"step rel-L1 {report.summary['e2e']['rel_l1']:.4f}; final latent rel-L1 {compare(x, ref)['rel_l1']:.4f}")


if __name__ == "__main__":
    main()
