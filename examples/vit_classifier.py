"""A ViT image classifier compiled with attnopt: quantized attention in every encoder layer.

    python examples/vit_classifier.py                      # tiny ViT, CPU, random weights and images
    python examples/vit_classifier.py --device cuda --size large
"""

import argparse

import torch
import transformers

import attnopt
from attnopt.metrics import compare

SIZES = {
    "tiny": dict(hidden_size=192, intermediate_size=384, num_hidden_layers=2, num_attention_heads=3,
                 image_size=64, patch_size=8, num_labels=10, batch=4),
    "large": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=448, patch_size=14, num_labels=1000, batch=32),
}
INSPECT_BATCH = 4  # inspect measures each site against float64 attention: a few images suffice


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", choices=SIZES, default="tiny")
    args = ap.parse_args()
    cfg = dict(SIZES[args.size])
    batch = cfg.pop("batch")
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(**cfg)).eval()
    model = model.to(args.device, torch.bfloat16)
    images = torch.randn(batch, 3, cfg["image_size"], cfg["image_size"], device=args.device, dtype=torch.bfloat16)
    options = {"attention": {"min_seq_len": 0}}
    report = attnopt.inspect(model, images[:INSPECT_BATCH], options=options)
    print(report)
    compiled = torch.compile(model, backend=attnopt.backend(options))
    with torch.no_grad():
        logits, ref = compiled(images).logits, model(images).logits
    same = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"predicted classes {logits.argmax(-1).tolist()}; {same:.0%} agree with the uncompiled model")
    print(f"summary: sites rewritten {report.summary['sites_rewritten']}/{report.summary['sites_total']}; "
          f"logits rel-L1 {compare(logits, ref)['rel_l1']:.4f}")


if __name__ == "__main__":
    main()
