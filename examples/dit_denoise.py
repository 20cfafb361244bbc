"""A DiT (PixArt-style, cross-attention to text) denoising loop with sparse attention calibrated
once per layer on a few timesteps, and the plan reused for every step.

    python examples/dit_denoise.py                         # tiny transformer, CPU, random weights
    python examples/dit_denoise.py --device cuda --size large --plan plan.json

The last line compares the compiled loop's final latent with the uncompiled model's.
"""

import argparse
import os
import tempfile

import torch

import attnopt
from attnopt.metrics import compare

SIZES = {
    "tiny": dict(sample=32, layers=2, heads=4, head_dim=32, text=20, steps=4),
    "large": dict(sample=128, layers=28, heads=16, head_dim=72, text=120, steps=20),
}


def build(size, device):
    from diffusers import PixArtTransformer2DModel

    s = SIZES[size]
    model = PixArtTransformer2DModel(sample_size=s["sample"], patch_size=2, in_channels=4, out_channels=8,
                                     num_layers=s["layers"], attention_head_dim=s["head_dim"],
                                     num_attention_heads=s["heads"], cross_attention_dim=s["heads"] * s["head_dim"],
                                     caption_channels=64, norm_type="ada_norm_single", use_additional_conditions=False)
    return model.eval().to(device, torch.bfloat16)


def plan_path(given):
    """Where the plan goes: --plan, else a new private temporary file (created, never guessed)."""
    if given:
        return given
    fd, path = tempfile.mkstemp(prefix="attnopt-plan-", suffix=".json")
    os.close(fd)
    return path


def denoise(fn, latents, text, timesteps):
    """A plain Euler loop over the timesteps: enough to exercise every step."""
    x = latents
    for i, t in enumerate(timesteps):
        eps = fn(x, encoder_hidden_states=text, timestep=t[None]).sample[:, :4]
        dt = (timesteps[i + 1] - t).item() / 1000 if i + 1 < len(timesteps) else -t.item() / 1000
        x = x + dt * eps
    return x


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", choices=SIZES, default="tiny")
    ap.add_argument("--plan", help="where to write the calibrated plan (default: a new temporary file)")
    args = ap.parse_args()
    s = SIZES[args.size]
    torch.manual_seed(0)
    model = build(args.size, args.device)
    text = torch.randn(1, s["text"], 64, device=args.device, dtype=torch.bfloat16)
    latents = torch.randn(1, 4, s["sample"], s["sample"], device=args.device, dtype=torch.bfloat16)
    timesteps = torch.linspace(999, 0, s["steps"], device=args.device).round().long()

    options = {"attention": {"min_seq_len": 0, "sparsity": {"method": "sparge"}}}
    # per-layer calibration on three timesteps of this trajectory; the plan then serves every step
    batches = [dict(hidden_states=latents, encoder_hidden_states=text, timestep=t[None]) for t in timesteps[::2][:3]]
    plan = attnopt.calibrate(model, batches, options=options, budget={"model_rel_l1": 0.05})
    path = plan_path(args.plan)
    plan.save(path)
    print(f"calibrated {len(plan.sites)} attention sites; plan written to {path}")
    options["plan"] = path
    report = attnopt.inspect(model, example_kwargs=batches[0], options=options)
    print(report)

    compiled = torch.compile(model, backend=attnopt.backend(options))
    with torch.no_grad():
        x = denoise(compiled, latents, text, timesteps)
        ref = denoise(model, latents, text, timesteps)
    print(f"denoised {len(timesteps)} steps; final latent std {x.float().std().item():.3f}")
    print(f"summary: sites rewritten {report.summary['sites_rewritten']}/{report.summary['sites_total']}; "
          f"step rel-L1 {report.summary['e2e']['rel_l1']:.4f}; final latent rel-L1 {compare(x, ref)['rel_l1']:.4f}")


if __name__ == "__main__":
    main()
