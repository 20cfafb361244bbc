"""A tiny causal transformer trained on associative recall with local structure: trained attention
that is sharp and long-range on some rows and local on the others, as real LMs' is, to measure
the sparse predictors on (docs/algorithms.md#why-the-predictors-found-little-sparsity-on-trained-attention).

The task. Most tokens are "filler" following a local rule: the filler after position t is the
filler at t-2 plus one (mod FILLERS), so predicting it needs attention two tokens back.
Scattered through the first half are N/64 (4 to 64) pair tokens, each binding a key to a value
(one token per pair, keys distinct within a sequence); the second half holds twice as many query
tokens naming one of those keys, at whose position the model must output the key's value: one
sharp attention peak, hundreds or thousands of tokens back.

The model: 2 layers, 4 heads of dim 32, d_model 128, a small MLP; half of each head's dims carry
rotary position (the local rule), the other half none (content matching that does not depend on
distance). Trained on 64 to 512 tokens (short first: recall is found within 100 steps at 64),
the shipped weights recall 0.97 / 0.85 / 0.68 of the queries at 1K / 2K / 4K tokens (`--eval`;
the local rule 1.0 / 1.0 / 0.99). Attention runs through F.scaled_dot_product_attention(is_causal=True),
which attnopt captures.

Regenerate the shipped weights (600 steps, about 10 minutes on 2 busy CPU cores; fixed seed,
bit-identical weights need the same torch build):

    python benchmarks/recall_model.py            # trains, saves benchmarks/data/recall_model.pt
    python benchmarks/recall_model.py --eval     # accuracy of the shipped weights at 1K / 2K / 4K

The state dict is stored in float16 (under 1 MB) and loaded as float32 with
torch.load(weights_only=True).
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "recall_model.pt")
FILLERS = 32  # filler token ids 0..31
KEYS = 64
VALUES = 16
PAIR0 = FILLERS  # pair token id = PAIR0 + key * VALUES + value
QUERY0 = PAIR0 + KEYS * VALUES  # query token id = QUERY0 + key
VOCAB = QUERY0 + KEYS
CLASSES = FILLERS + VALUES  # outputs: the next filler, or (at a query) the recalled value
IGNORE = -100


def _token_parts() -> torch.Tensor:
    """[VOCAB, 4]: each token id's (kind, filler, key, value) indices (kind 0 filler, 1 pair, 2 query)."""
    parts = torch.zeros(VOCAB, 4, dtype=torch.long)
    ids = torch.arange(VOCAB)
    parts[:FILLERS, 1] = ids[:FILLERS]
    pair = ids[PAIR0:QUERY0] - PAIR0
    parts[PAIR0:QUERY0, 0], parts[PAIR0:QUERY0, 2], parts[PAIR0:QUERY0, 3] = 1, pair // VALUES, pair % VALUES
    parts[QUERY0:, 0], parts[QUERY0:, 2] = 2, ids[QUERY0:] - QUERY0
    return parts


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, rotary_dims: int, mlp: int):
        super().__init__()
        self.heads, self.rotary_dims = heads, rotary_dims
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        r = self.rotary_dims
        a, b, rest = x[..., :r // 2], x[..., r // 2:r], x[..., r:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos, rest], dim=-1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, dim))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class RecallModel(nn.Module):
    """tokens [B, N] int64 -> logits [B, N, CLASSES]."""

    def __init__(self, dim: int = 128, heads: int = 4, layers: int = 2, rotary_dims: int = 16, mlp: int = 256):
        super().__init__()
        self.kind = nn.Embedding(3, dim)
        self.filler = nn.Embedding(FILLERS, dim)
        self.key = nn.Embedding(KEYS, dim)
        self.value = nn.Embedding(VALUES, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, rotary_dims, mlp) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, CLASSES)
        self.rotary_dims = rotary_dims
        self.register_buffer("parts", _token_parts(), persistent=False)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        p = self.parts[tokens]
        kind = p[..., 0]
        x = self.kind(kind) + torch.where((kind == 0)[..., None], self.filler(p[..., 1]), 0.0)
        x = x + torch.where((kind > 0)[..., None], self.key(p[..., 2]), 0.0)
        return x + torch.where((kind == 1)[..., None], self.value(p[..., 3]), 0.0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        half = self.rotary_dims // 2
        freq = 1.0 / (10000 ** (torch.arange(half, device=tokens.device, dtype=torch.float32) / half))
        ang = torch.arange(n, device=tokens.device, dtype=torch.float32)[:, None] * freq[None, :]
        cos, sin = ang.cos(), ang.sin()
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x, cos, sin)
        return self.head(self.norm(x))


def make_batch(batch: int, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B, N], targets [B, N]) of the recall task; targets IGNORE where nothing is predictable."""
    n_pairs = max(4, min(KEYS, seq_len // 64))
    tokens = torch.empty(batch, seq_len, dtype=torch.long)
    targets = torch.full((batch, seq_len), IGNORE, dtype=torch.long)
    half = seq_len // 2
    for b in range(batch):
        g = generator
        kind = torch.zeros(seq_len, dtype=torch.long)
        pair_pos = torch.randperm(half - 4, generator=g)[:n_pairs] + 2
        query_pos = torch.randperm(seq_len - half - 2, generator=g)[:2 * n_pairs] + half
        kind[pair_pos], kind[query_pos] = 1, 2
        keys = torch.randperm(KEYS, generator=g)[:n_pairs]
        values = torch.randint(0, VALUES, (n_pairs,), generator=g)
        asked = torch.randint(0, n_pairs, (len(query_pos),), generator=g)
        seq = torch.randint(0, FILLERS, (seq_len,), generator=g).tolist()
        is_filler = (kind == 0).tolist()
        for t in range(3, seq_len):  # local rule: the filler at t is the filler at t-3 plus one
            if is_filler[t] and is_filler[t - 3]:
                seq[t] = (seq[t - 3] + 1) % FILLERS
        seq = torch.tensor(seq)
        tok = seq.clone()
        tok[pair_pos] = PAIR0 + keys * VALUES + values
        tok[query_pos] = QUERY0 + keys[asked]
        tokens[b] = tok
        nxt = torch.zeros(seq_len, dtype=torch.bool)
        t = torch.arange(3, seq_len)
        nxt[t - 1] = (kind[t] == 0) & (kind[t - 3] == 0)  # position t-1 predicts filler t
        targets[b, :-1][nxt[:-1]] = seq[1:][nxt[:-1]]
        targets[b, query_pos] = FILLERS + values[asked]
    return tokens, targets


def recall_batches(n: int, seq_len: int, seed: int = 0, batch: int = 1) -> list[tuple[torch.Tensor]]:
    """n input tuples (tokens [batch, seq_len],) for the model, reproducible from seed."""
    g = torch.Generator().manual_seed(seed)
    return [(make_batch(batch, seq_len, g)[0],) for _ in range(n)]


def load_recall_model(path: str = WEIGHTS) -> RecallModel:
    """The shipped trained model (float32, eval mode)."""
    model = RecallModel()
    state = torch.load(path, weights_only=True, map_location="cpu")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, seq_len: int, n: int = 4, seed: int = 1234) -> dict:
    """Query (recall) and filler (local rule) accuracy on n fresh sequences."""
    g = torch.Generator().manual_seed(seed)
    hits = {"query": [0, 0], "filler": [0, 0]}
    for _ in range(n):
        tokens, targets = make_batch(1, seq_len, g)
        pred = model(tokens).argmax(-1)
        for name, sel in (("query", targets >= FILLERS), ("filler", (targets >= 0) & (targets < FILLERS))):
            hits[name][0] += int((pred[sel] == targets[sel]).sum())
            hits[name][1] += int(sel.sum())
    return {k: a / max(b, 1) for k, (a, b) in hits.items()}


def train(steps: int = 600, batch: int = 32, seed: int = 0, lengths=(64, 128, 256, 512), log_every: int = 50,
          checkpoint: str | None = None):
    """Train a RecallModel from a fixed seed on CPU; returns it (eval mode)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = RecallModel()
    for blk in model.blocks:  # q and k projections start equal: equal keys already attend each other a little
        dim = blk.qkv.weight.shape[1]
        blk.qkv.weight.data[dim:2 * dim] = blk.qkv.weight.data[:dim]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    t0 = time.time()
    for step in range(steps):
        n = lengths[min(len(lengths) - 1, step * len(lengths) // steps)]  # short first: recall is found early
        bs = max(1, batch * lengths[0] // n)  # same tokens per step at every length
        tokens, targets = make_batch(bs, n, g)
        logits = model(tokens)
        tw = (targets >= FILLERS).float() * 20 + (targets >= 0).float()  # recall rows are few: weigh them more
        loss = (F.cross_entropy(logits.flatten(0, 1), targets.flatten().clamp_min(0), reduction="none")
                * tw.flatten()).sum() / tw.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and step % log_every == 0:
            recall = ((logits.argmax(-1) == targets) & (targets >= FILLERS)).sum() / (targets >= FILLERS).sum()
            print(f"step {step} len {n} loss {loss.item():.4f} recall {recall.item():.2f} ({time.time() - t0:.0f}s)",
                  flush=True)
            if checkpoint:
                save(model, checkpoint)
    return model.eval()


def save(model: RecallModel, path: str = WEIGHTS) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval", action="store_true", help="only report the shipped weights' accuracy")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--out", default=WEIGHTS)
    args = ap.parse_args()
    if args.eval:
        model = load_recall_model(args.out)
    else:
        model = train(args.steps, checkpoint=args.out)
        save(model, args.out)
        model = load_recall_model(args.out)  # what is shipped: float16 weights
    for n in (1024, 2048, 4096):
        print(n, accuracy(model, n))


if __name__ == "__main__":
    main()
