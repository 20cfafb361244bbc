"""Train a tiny DiT-style video denoiser with VSA (trainable block-sparse attention), in eager
mode through the differentiable op `attnopt::sparse_attention_train` (or, --compile, the dense
model under torch.compile(backend="attnopt") with vsa in its options), next to the same model with
dense attention from the same initialization.

    python examples/train_dit_vsa.py                      # 4 frames x 16 x 16 patches, CPU, 30 steps
    python examples/train_dit_vsa.py --compile            # the compiler rewrites SDPA into VSA
    python examples/train_dit_vsa.py --steps 200 --topk 0.125 --cube 1 8 8

Tokens are put into cube order once, at patchify (attnopt.ops.sparse_ref.vsa_cube_order): every
64-token tile VSA pools is then one video cube (--cube, default 1 x 8 x 8 patches). The data is a
fixed set of smooth random latent videos; the objective is flow matching (predict noise - x0 from
(1 - t) x0 + t noise). The summary line gives both runs' first and last losses and VSA's block
sparsity.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from attnopt.ops import sparse_ref as R
from attnopt.ops.sparse_train import sparse_attention_train


def smooth_videos(n: int, channels: int, frames: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """[n, C, T, H, W] latents: low-resolution noise upsampled, drifting slowly across frames."""
    base = torch.randn(n, channels, 1, size // 4, size // 4, generator=gen)
    drift = 0.3 * torch.randn(n, channels, frames, size // 4, size // 4, generator=gen).cumsum(2)
    low = (base + drift).flatten(1, 2)
    up = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return up.reshape(n, channels, frames, size, size)


class Attention(torch.nn.Module):
    """Self-attention over the video tokens: VSA's sparse op (bf16 operands), or dense SDPA."""

    def __init__(self, dim: int, heads: int, sparsity: dict | None):
        super().__init__()
        self.heads, self.sparsity = heads, sparsity
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)
        self.q_norm = torch.nn.RMSNorm(dim // heads)
        self.k_norm = torch.nn.RMSNorm(dim // heads)

    def forward(self, x):
        b, n, dim = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.sparsity is None:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = sparse_attention_train(q.bfloat16(), k.bfloat16(), v.bfloat16(), self.sparsity, quant="int8",
                                       pv="fp16").float()
        return self.out(o.transpose(1, 2).reshape(b, n, dim))


class Block(torch.nn.Module):
    """DiT block: adaLN-modulated attention and MLP, conditioned on the timestep embedding."""

    def __init__(self, dim: int, heads: int, sparsity: dict | None):
        super().__init__()
        self.attn = Attention(dim, heads, sparsity)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))
        self.norm1 = torch.nn.LayerNorm(dim, elementwise_affine=False)
        self.norm2 = torch.nn.LayerNorm(dim, elementwise_affine=False)
        self.ada = torch.nn.Linear(dim, 6 * dim)
        torch.nn.init.zeros_(self.ada.weight)
        torch.nn.init.zeros_(self.ada.bias)

    def forward(self, x, c):
        s1, b1, g1, s2, b2, g2 = self.ada(F.silu(c))[:, None].chunk(6, dim=-1)
        x = x + (1 + g1) * self.attn(self.norm1(x) * (1 + s1) + b1)
        return x + (1 + g2) * self.mlp(self.norm2(x) * (1 + s2) + b2)


class TinyDiT(torch.nn.Module):
    """Patch tokens (1 x 1 patches of a [C, T, H, W] latent, in cube order), factorized learned
    position embeddings, a few DiT blocks, a linear head predicting the velocity per token."""

    def __init__(self, channels, frames, size, dim, heads, layers, sparsity, order):
        super().__init__()
        self.register_buffer("order", order)
        self.embed = torch.nn.Linear(channels, dim)
        self.pos_t = torch.nn.Parameter(0.02 * torch.randn(frames, 1, 1, dim))
        self.pos_h = torch.nn.Parameter(0.02 * torch.randn(1, size, 1, dim))
        self.pos_w = torch.nn.Parameter(0.02 * torch.randn(1, 1, size, dim))
        self.time = torch.nn.Sequential(torch.nn.Linear(64, dim), torch.nn.SiLU(), torch.nn.Linear(dim, dim))
        self.blocks = torch.nn.ModuleList(Block(dim, heads, sparsity) for _ in range(layers))
        self.head = torch.nn.Linear(dim, channels)

    def forward(self, x, t):
        b, c = x.shape[:2]
        tokens = x.flatten(2).transpose(1, 2)  # [B, T*H*W, C], raster order
        pos = (self.pos_t + self.pos_h + self.pos_w).flatten(0, 2)
        h = (self.embed(tokens) + pos)[:, self.order]  # cube order: each VSA tile is one cube
        freqs = torch.exp(-math.log(1000.0) * torch.arange(32) / 32)
        c_emb = self.time(torch.cat([(t[:, None] * 1000 * freqs).sin(), (t[:, None] * 1000 * freqs).cos()], -1))
        for blk in self.blocks:
            h = blk(h, c_emb)
        out = self.head(h)[:, self.order.argsort()]  # back to raster order
        return out.transpose(1, 2).reshape(x.shape)


def compile_options(sparsity: dict) -> dict:
    """backend="attnopt" options that turn the dense model's SDPA sites into trainable VSA (its
    attention runs in fp32 here, hence allow_fp32: P.V then runs in bf16)."""
    return {"attention": {"sparsity": dict(sparsity), "allow_fp32": True, "min_seq_len": 0}}


def train(steps: int = 30, sparsity: dict | None = None, frames: int = 4, size: int = 16, channels: int = 8,
          dim: int = 128, heads: int = 4, layers: int = 2, batch: int = 2, lr: float = 1e-3,
          cube=(1, 8, 8), seed: int = 0, compiled: bool = False, backend=None) -> list[float]:
    """Train from a seed-fixed initialization; -> the loss of every step. `compiled`: the dense
    model under torch.compile(backend="attnopt") with `sparsity` in the options (the compiler
    rewrites its SDPA calls into attnopt::sparse_attention_train) instead of the eager op."""
    gen = torch.Generator().manual_seed(seed)
    data = smooth_videos(8, channels, frames, size, gen)
    torch.manual_seed(seed)
    model = TinyDiT(channels, frames, size, dim, heads, layers, None if compiled else sparsity,
                    R.vsa_cube_order(frames, size, size, cube))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    if compiled:
        import attnopt

        torch._dynamo.reset()
        model = torch.compile(model, backend=backend or attnopt.backend(compile_options(sparsity)), fullgraph=True)
    losses = []
    for _ in range(steps):
        x0 = data[torch.randint(0, len(data), (batch,), generator=gen)]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.rand(batch, generator=gen)
        xt = (1 - t)[:, None, None, None, None] * x0 + t[:, None, None, None, None] * noise
        loss = F.mse_loss(model(xt, t), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def vsa_sparsity(sparsity: dict, frames: int = 4, size: int = 16, heads: int = 4, dim: int = 128) -> float:
    """Share of the kv-blocks VSA skips on random tokens of this size (the top-k count is fixed
    per query tile, so the share does not depend on the data)."""
    n = frames * size * size
    q = torch.randn(1, heads, n, dim // heads)
    keep = R.predict_vsa(q, q, 1.0, int(sparsity.get("tile", 64)), sparsity.get("topk", 0.25))
    return 1.0 - keep.float().mean().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--topk", type=float, default=0.25, help="share of the key tiles each query tile keeps")
    ap.add_argument("--tile", type=int, default=64)
    ap.add_argument("--cube", type=int, nargs=3, default=[1, 8, 8], help="frames x height x width per cube")
    ap.add_argument("--compile", action="store_true",
                    help='the dense model under torch.compile(backend="attnopt") with vsa in the options')
    args = ap.parse_args()
    sparsity = {"method": "vsa", "tile": args.tile, "topk": args.topk}
    vsa = train(args.steps, sparsity, cube=tuple(args.cube), compiled=args.compile)
    dense = train(args.steps, None, cube=tuple(args.cube))
    print(f"summary: vsa loss {vsa[0]:.4f} -> {vsa[-1]:.4f}; dense loss {dense[0]:.4f} -> {dense[-1]:.4f}; "
          f"block sparsity {vsa_sparsity(sparsity):.3f}; steps {args.steps}")


if __name__ == "__main__":
    main()
