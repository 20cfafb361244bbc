"""A TARGET for `attnopt inspect examples/tiny_attention.py:build`: two attention layers."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class TwoLayers(nn.Module):
    def __init__(self, dim=128, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(2))

    def forward(self, x):
        b, n, d = x.shape
        for proj in self.qkv:
            q, k, v = proj(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            x = x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return x


def build():
    model = TwoLayers().eval().to(torch.bfloat16)
    return model, (torch.randn(2, 200, 128, dtype=torch.bfloat16),)
