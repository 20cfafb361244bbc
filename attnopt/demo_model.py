"""The bundled default model: a small Llama-style decoder in plain PyTorch, random weights.

It exists so `attnopt demo` runs anywhere with no downloads. Its layers write attention both
ways models do: even layers call SDPA, odd layers spell out matmul / softmax / matmul with an
in-graph causal mask and repeat_kv GQA, so the demo shows both forms being captured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class DemoConfig:
    vocab: int = 512
    dim: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int = 2
    ffn: int = 512
    seq: int = 256
    batch: int = 2


SIZES = {
    "tiny": DemoConfig(),
    "large": DemoConfig(vocab=32000, dim=2048, layers=8, heads=16, kv_heads=4, ffn=5632, seq=4096, batch=1),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope(x, cos, sin):  # x: [B, H, N, D]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: DemoConfig, spelled_out: bool):
        super().__init__()
        self.heads, self.kv_heads, self.hd = cfg.heads, cfg.kv_heads, cfg.dim // cfg.heads
        self.q_proj = nn.Linear(cfg.dim, cfg.heads * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_heads * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_heads * self.hd, bias=False)
        self.o_proj = nn.Linear(cfg.heads * self.hd, cfg.dim, bias=False)
        self.spelled_out = spelled_out

    def forward(self, x, cos, sin):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.hd).transpose(1, 2)  # [B, H, N, D]
        k = self.k_proj(x).view(b, n, self.kv_heads, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if self.spelled_out:
            g = self.heads // self.kv_heads  # repeat_kv: [B, Hkv, N, D] -> [B, H, N, D]
            k = k[:, :, None].expand(b, self.kv_heads, g, n, self.hd).reshape(b, self.heads, n, self.hd)
            v = v[:, :, None].expand(b, self.kv_heads, g, n, self.hd).reshape(b, self.heads, n, self.hd)
            s = (q @ k.transpose(-2, -1)) / math.sqrt(self.hd)
            causal = torch.tril(torch.ones(n, n, dtype=torch.bool, device=x.device))
            s = s.masked_fill(~causal, float("-inf"))
            o = F.softmax(s.float(), dim=-1).to(q.dtype) @ v
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self, cfg: DemoConfig, i: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim)
        self.attn = Attention(cfg, spelled_out=bool(i % 2))
        self.mlp_norm = RMSNorm(cfg.dim)
        self.gate = nn.Linear(cfg.dim, cfg.ffn, bias=False)
        self.up = nn.Linear(cfg.dim, cfg.ffn, bias=False)
        self.down = nn.Linear(cfg.ffn, cfg.dim, bias=False)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class DemoLM(nn.Module):
    def __init__(self, cfg: DemoConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        hd = cfg.dim // cfg.heads
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, ids):
        n = ids.shape[1]
        ang = torch.outer(torch.arange(n, device=ids.device, dtype=torch.float32), self.inv_freq)
        ang = torch.cat((ang, ang), dim=-1)
        x = self.embed(ids)
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


def build(size: str = "tiny", device: str = "cpu", dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """(model, example_inputs) of the demo model: random weights, random token ids."""
    cfg = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DemoLM(cfg)
    with torch.no_grad():
        for p in model.parameters():  # scaled so activations stay O(1) through the layers
            if p.dim() == 2:
                p.normal_(0, 1.0 / math.sqrt(p.shape[1]), generator=g)
    model = model.eval().to(device=device, dtype=dtype)
    ids = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=g).to(device)
    return model, (ids,)
