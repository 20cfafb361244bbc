"""Plots benchmark JSON files (written by the benchmark scripts) as PNGs beside them.

    python benchmarks/plot.py benchmarks/results/attention_*.json
"""

from __future__ import annotations

import json
import sys


def plot_attention(path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        data = json.load(f)
    rows = [r for r in data["rows"] if "tops" in r]
    panels = sorted({(r["head_dim"], r["causal"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (d, causal) in zip(axes[0], panels):
        for variant in dict.fromkeys(r["variant"] for r in rows):
            pts = sorted((r["seq"], r["tops"]) for r in rows
                         if r["variant"] == variant and r["head_dim"] == d and r["causal"] == causal)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=variant)
        ax.set_xscale("log", base=2)
        ax.set_title(f"head dim {d}, {'causal' if causal else 'non-causal'}")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TOPS")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    env = data.get("env", {})
    fig.suptitle(f"{env.get('device')} | torch {env.get('torch')} | triton {env.get('triton')}")
    fig.tight_layout()
    out = path.rsplit(".", 1)[0] + ".png"
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(plot_attention(p))
