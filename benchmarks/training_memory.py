"""Bytes saved for backward by a model made only of norms and linears, with linear.training 'int8' /
'fp8' against the same model's bf16 run (both compiled by attnopt, the bf16 one with training
'off'), counted with torch.autograd.graph.saved_tensors_hooks (attnopt.metrics.saved_for_backward).

    python benchmarks/training_memory.py [--tokens 2048 --dim 128 --blocks 2]

The model: `blocks` pre-norm blocks x + down(up(norm(x))), up d -> 4d with a bias, down 4d -> d.
Rows: eager bf16, compiled bf16, compiled int8 / fp8 (norm_train on, as the linear pass does),
int8 / fp8 with the norms left plain (what the linears alone give), and fp8 with the ops' bodies
traced into the graph (ATTNOPT_INLINE=always: what a GPU compiles, the partitioner free to save or
recompute). The ratio counts the weights
too (a saved weight is the parameter itself: its bytes are alive anyway, so the ratio without them,
activations only, is printed beside it). Runs on the CPU (the reference arithmetic saves the same
tensors the GPU kernels do). Writes benchmarks/results/training_memory_cpu.json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import attnopt  # noqa: E402
from attnopt.metrics import saved_for_backward  # noqa: E402


class Block(torch.nn.Module):
    """x + down(up(norm(x))): norms and linears only."""

    def __init__(self, dim: int, norm: str):
        super().__init__()
        self.norm = torch.nn.RMSNorm(dim) if norm == "rms" else torch.nn.LayerNorm(dim)
        self.up = torch.nn.Linear(dim, 4 * dim)
        self.down = torch.nn.Linear(4 * dim, dim)

    def forward(self, x):
        return x + self.down(self.up(self.norm(x)))


def make_model(dim: int, blocks: int, norm: str = "rms", dtype=torch.bfloat16) -> torch.nn.Module:
    return torch.nn.Sequential(*[Block(dim, norm) for _ in range(blocks)]).to(dtype)


@contextlib.contextmanager
def plain_norms():
    """The linear pass without norm_train: norms keep their 16-bit input for backward."""
    with mock.patch("attnopt.passes.linear_pipeline.find_train_norms", lambda m: []):
        yield


def measure(training: str | None, tokens: int, dim: int, blocks: int, norm: str = "rms", plain: bool = False,
            seed: int = 0, inline: str | None = None) -> dict:
    """Saved-for-backward bytes of one forward. training None: eager; 'off' / 'int8' / 'fp8':
    compiled by attnopt with that linear.training; `inline` 'always': the ops' bodies traced into
    the graph (as on a GPU), so Inductor's partitioner, not the ops, decides what is saved."""
    torch.manual_seed(seed)
    model = make_model(dim, blocks, norm)
    x = torch.randn(tokens // 256 or 1, min(tokens, 256), dim, dtype=torch.bfloat16, requires_grad=True)
    torch._dynamo.reset()
    fn = model
    ctx = plain_norms() if plain else contextlib.nullcontext()
    with ctx:
        if training is not None:
            backend = attnopt.backend({"linear": {"training": training}})
            backend.ctx.inline = inline
            fn = torch.compile(model, backend=backend, fullgraph=True)
            fn(x)  # compile outside the count
        res = saved_for_backward(lambda: fn(x), list(model.parameters()))
    res.pop("out")
    return res


def rows(tokens: int, dim: int, blocks: int, norm: str = "rms") -> list[dict]:
    configs = [("eager bf16", None, False, None), ("compiled bf16", "off", False, None), ("int8", "int8", False, None),
               ("fp8", "fp8", False, None), ("int8, plain norms", "int8", True, None),
               ("fp8, plain norms", "fp8", True, None), ("fp8, bodies inlined", "fp8", False, "always")]
    out = []
    base = None
    for name, training, plain, inline in configs:
        r = measure(training, tokens, dim, blocks, norm, plain, inline=inline)
        if name == "compiled bf16":
            base = r
        out.append({"config": name, "norm": norm, "tokens": tokens, "dim": dim, "blocks": blocks, **r})
    for r in out:
        r["ratio"] = r["bytes"] / base["bytes"]
        r["ratio_activations"] = r["activation_bytes"] / base["activation_bytes"]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    import common

    table = []
    for norm in ("rms", "layer"):
        table += rows(args.tokens, args.dim, args.blocks, norm)
    print(f"{'config':<20} {'norm':<6} {'saved bytes':>12} {'of which weights':>16} {'ratio':>6} {'acts only':>9}")
    for r in table:
        print(f"{r['config']:<20} {r['norm']:<6} {r['bytes']:>12} {r['param_bytes']:>16} {r['ratio']:>6.3f} "
              f"{r['ratio_activations']:>9.3f}")
    print("ratio: against the compiled bf16 run (weights counted); acts only: without the weights' bytes")
    path = common.write("training_memory_cpu.json", table, out_dir=args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
