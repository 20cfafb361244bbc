"""Trains a tiny Qwen3 (QK-norm, random init) with and without attnopt and saves the loss curves.

Both runs start from the same weights and see the same batches: the uncompiled model (eager,
the reference) and `torch.compile(backend="attnopt")` with quantized attention and its own
backward (`attention.backward`) and quantized linear training (`linear.training`). The task is
synthetic and needs attention: each row is a random first half followed by its copy, so the
second half is predictable only by looking back. `--packed` puts several documents in one row
(position ids restart per document, and the model builds a block-diagonal causal mask).

    python benchmarks/training.py [--steps 200] [--backward int8] [--linear fp8] [--packed] [--plot]

Writes benchmarks/results/training_<device>.json (one row per step) and, with --plot, a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

VOCAB = 256


def tiny_qwen3(seed: int = 0, layers: int = 2, dtype=torch.bfloat16, device: str = "cpu"):
    """A 2-layer Qwen3 with QK-norm, random init (fixed seed), in `dtype`."""
    import transformers

    cfg = transformers.Qwen3Config(hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=VOCAB,
                                   max_position_embeddings=2048, attn_implementation="sdpa", attention_dropout=0.0,
                                   tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.Qwen3ForCausalLM(cfg).to(device=device, dtype=dtype).train()


def copy_batches(steps: int, batch: int = 4, seq: int = 256, seed: int = 1, packed: int = 1, device="cpu"):
    """`steps` batches of (input_ids, position_ids): each document is random tokens (Zipf-
    distributed) then their copy; `packed` documents share a row, with position ids restarting at each."""
    g = torch.Generator().manual_seed(seed)
    doc = seq // packed
    half = doc // 2
    zipf = 1.0 / torch.arange(1, VOCAB).double()  # skewed tokens: the loss falls from the first steps
    out = []
    for _ in range(steps):
        first = 1 + torch.multinomial(zipf, batch * packed * half, replacement=True, generator=g)
        first = first.reshape(batch, packed, half)
        ids = torch.cat([first, first, torch.zeros(batch, packed, doc - 2 * half, dtype=torch.long)], -1)
        pos = torch.arange(doc).repeat(batch, packed, 1)
        out.append((ids.reshape(batch, -1).to(device), pos.reshape(batch, -1).to(device)))
    return out


def train(model, batches, lr: float = 3e-3):
    """AdamW on the model's own parameters; returns the loss per step (floats)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    losses = []
    for ids, pos in batches:
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, position_ids=pos, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def attnopt_options(backward: str, linear: str) -> dict:
    return {"attention": {"backward": backward}, "linear": {"training": linear}}


def run(steps: int, backward: str = "int8", linear: str = "fp8", packed: int = 1, seed: int = 0,
        device: str = "cpu", dtype=torch.bfloat16, seq: int = 256) -> dict:
    """Both runs; returns {"eager": losses, "attnopt": losses, "backend": the attnopt backend}."""
    import attnopt

    batches = copy_batches(steps, seq=seq, packed=packed, device=device)
    eager = train(tiny_qwen3(seed, dtype=dtype, device=device), batches)
    model = tiny_qwen3(seed, dtype=dtype, device=device)
    be = attnopt.backend(attnopt_options(backward, linear))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=be, fullgraph=True)
    ours = train(compiled, batches)
    return {"eager": eager, "attnopt": ours, "backend": be}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--backward", default="int8", choices=["int8", "exact", "off"])
    ap.add_argument("--linear", default="fp8", choices=["off", "int8", "fp8"])
    ap.add_argument("--packed", type=int, default=1, help="documents per row")
    ap.add_argument("--plot", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res = run(args.steps, args.backward, args.linear, args.packed, device=device)
    sites = [{"key": s.key, "kind": s.kind, "status": s.status, "kernel": s.kernel, "reason": s.reason}
             for s in res["backend"].recorder.sites()]
    rows = [{"step": i, "eager": a, "attnopt": b} for i, (a, b) in enumerate(zip(res["eager"], res["attnopt"]))]
    final = (sum(res["attnopt"][-10:]) / 10) / (sum(res["eager"][-10:]) / 10) - 1
    out = args.out or os.path.join(common.RESULTS, f"training_{device}.json")
    data = {"env": common.env(), "config": vars(args), "final_loss_rel_diff": final, "sites": sites, "rows": rows}
    common.write_text(out, json.dumps(data, indent=1))
    print(f"final loss (mean of last 10): eager {sum(res['eager'][-10:]) / 10:.4f}, "
          f"attnopt {sum(res['attnopt'][-10:]) / 10:.4f} ({final:+.2%}); rows in {out}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(res["eager"], label="eager (bf16)")
        ax.plot(res["attnopt"], label=f"attnopt (attention backward {args.backward}, linear {args.linear})")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out.replace(".json", ".png"), dpi=100)
        print("plot:", out.replace(".json", ".png"))


if __name__ == "__main__":
    main()
