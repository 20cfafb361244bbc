"""SVG2 (Sparse VideoGen2, "semantic-aware permutation"), in torch ops: it runs as is on a GPU.

Per (batch element, head): k-means clusters the query tokens and (per kv head) the key tokens;
a stable sort by cluster permutes each so that every cluster is a contiguous run; the attention
mass of query cluster i on key cluster j is estimated from the centroids,
|K_j| exp(scale c_i . c_j) normalized over j, and each query cluster keeps its key clusters in
descending mass until the kept mass reaches `top_p` (and at least `min_key_share` of them).
The block-sparse kernel then runs on the permuted Q, K, V; its blocks (BQ rows x BK keys) do not
follow cluster boundaries, so a block is kept when any (query cluster, key cluster) pair inside
it is selected (a block straddling clusters keeps more than the pairs asked for, never less).
The output rows are scattered back to their original positions.

Centroids are per-site state (`CentroidState`): a site's next call starts k-means from them
(`warm_iters` iterations instead of `init_iters`). Each batch element of one call keeps its
own (the two halves of a batched classifier-free guidance cluster differently). The state is
keyed by the site key alone: pipelines that run the two guidance halves as separate calls (Wan)
or two transformers with the same module paths (Wan 2.2's experts) warm-start one call from the
other's centroids, which costs quality (a worse start), never correctness. The state of a site
resets when its batch size, lengths, heads or cluster counts change, on `reset()`, and at step 0
of a generation (`with attnopt.step(0, n):` calls `on_step` through a step listener).
k-means has no randomness: its cold start takes farthest-point tokens as the first centroids
(bitwise repeatable on the CPU; on CUDA, scatter_add's float atomics may order a centroid's sum
differently from run to run).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..schedule import add_step_listener
from . import sparse_ref as R
from .attention_ref import finite_or_zero

ASSIGN_BYTES = 1 << 28  # the distance matrix k-means builds per chunk of (batch, head) groups


# ------------------------------------------------------------------------------ k-means

def _assign(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Nearest centroid of each row: x [G, N, D], c [G, K, D] -> labels [G, N] (ties to the lower
    cluster). argmin |x - c|^2 = argmax x.c - |c|^2 / 2, in chunks of groups to bound memory."""
    g, n, _ = x.shape
    per = max(1, ASSIGN_BYTES // max(1, n * c.shape[1] * 4))
    half = 0.5 * (c * c).sum(-1)
    return torch.cat([(x[i:i + per] @ c[i:i + per].transpose(1, 2) - half[i:i + per, None]).argmax(-1)
                      for i in range(0, g, per)])


def _centroids(x: torch.Tensor, labels: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """Mean of each cluster's rows; an empty cluster keeps its previous centroid."""
    g, k, d = prev.shape
    sums = torch.zeros_like(prev).scatter_add_(1, labels[..., None].expand(-1, -1, d), x)
    counts = torch.zeros(g, k, device=x.device, dtype=x.dtype).scatter_add_(1, labels, torch.ones_like(x[..., 0]))
    return torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], prev)


def farthest_points(x: torch.Tensor, k: int) -> torch.Tensor:
    """k rows of each group as first centroids [G, k, D]: row 0, then each time the row farthest
    from those taken (maximin). Deterministic, and one start in each well-separated group (evenly
    spaced rows can put several in one group and merge others, a minimum Lloyd never leaves)."""
    g, n, d = x.shape
    sq = (x * x).sum(-1)  # [G, N]
    picks = [torch.zeros(g, dtype=torch.long, device=x.device)]
    dist = torch.full_like(sq, float("inf"))
    for _ in range(1, k):
        c = x.gather(1, picks[-1][:, None, None].expand(-1, 1, d))  # [G, 1, D]
        d2 = sq - 2 * (x @ c.transpose(1, 2))[..., 0] + (c * c).sum(-1)
        dist = torch.minimum(dist, d2)
        picks.append(dist.argmax(-1))
    return x.gather(1, torch.stack(picks, 1)[..., None].expand(-1, -1, d))


def kmeans(x: torch.Tensor, k: int, iters: int, init: torch.Tensor | None = None):
    """Lloyd's k-means of each group's rows: x [G, N, D] fp32 -> (centroids [G, k, D], labels
    [G, N]); k at most N. Without `init`, it starts from `farthest_points`."""
    k = min(k, x.shape[1])
    c = farthest_points(x, k) if init is None else init
    for _ in range(iters):
        c = _centroids(x, _assign(x, c), c)
    return c, _assign(x, c)


# ------------------------------------------------------------------------------ per-site state

@dataclass
class _Entry:
    shape: tuple
    q: torch.Tensor  # [B, Hq, QC, D] fp32
    k: torch.Tensor  # [B, Hkv, KC, D] fp32


class CentroidState:
    """The centroids each site's last call ended with, per batch element and head."""

    def __init__(self):
        self._sites: dict[str, _Entry] = {}

    def get(self, site: str, shape: tuple) -> _Entry | None:
        entry = self._sites.get(site)
        if entry is not None and entry.shape != shape:  # another batch / length / head count: cold
            del self._sites[site]
            return None
        return entry

    def put(self, site: str, shape: tuple, q: torch.Tensor, k: torch.Tensor) -> None:
        self._sites[site] = _Entry(shape, q, k)

    def reset(self, site: str | None = None) -> None:
        if site is None:
            self._sites.clear()
        else:
            self._sites.pop(site, None)

    def sites(self) -> list[str]:
        return list(self._sites)


STATE = CentroidState()  # what the op uses: keyed by the site key the rewrite pass gives it


def reset(site: str | None = None) -> None:
    """Forget the centroids of `site` (None: of every site): their next call starts cold."""
    STATE.reset(site)


def on_step(step_index: int) -> None:
    """The step API's hook: step 0 starts a new generation, whose tokens the last one's
    centroids do not describe."""
    if int(step_index) == 0:
        reset()


add_step_listener(lambda i, total: on_step(i))  # `with attnopt.step(0, n):` starts a generation


# ------------------------------------------------------------------------------ prediction

@dataclass
class Layout:
    """One call's permutation and its block mask over the permuted layout."""

    perm_q: torch.Tensor  # [B, Hq, Nq] original row of each permuted row
    perm_k: torch.Tensor  # [B, Hkv, Nk] original key of each permuted key
    keep: torch.Tensor  # [B, Hq, nqb, nkb] kept blocks of the permuted layout
    pairs: torch.Tensor  # [B, Hq, QC, KC] selected cluster pairs
    warm: bool  # k-means started from the site's previous centroids


def _cluster(x: torch.Tensor, k: int, iters: int, init):
    b, h, n, d = x.shape
    c, labels = kmeans(finite_or_zero(x).float().reshape(b * h, n, d), k, iters,
                       None if init is None else init.reshape(b * h, -1, d))
    return c.reshape(b, h, -1, d), labels.reshape(b, h, n)


def select_pairs(cq, ck, sizes_k, scale: float, top_p: torch.Tensor, min_share: float) -> torch.Tensor:
    """Per query cluster: key clusters by descending centroid-estimated mass until the kept mass
    reaches top_p [Hq] (float64) of the total, and at least ceil(min_share * non-empty clusters).
    cq [B, Hq, QC, D], ck [B, Hq, KC, D], sizes_k [B, Hq, KC] -> [B, Hq, QC, KC] bool."""
    logits = (cq @ ck.transpose(-1, -2)).double() * scale + sizes_k.double().log()[:, :, None]
    mass = torch.softmax(logits, -1)  # empty clusters: log 0 = -inf, mass 0
    order = mass.argsort(dim=-1, descending=True, stable=True)
    sorted_m = mass.gather(-1, order)
    before = torch.cumsum(sorted_m, -1) - sorted_m
    nonempty = (sizes_k > 0).sum(-1, keepdim=True)[:, :, None]  # [B, Hq, 1, 1]
    least = (min_share * nonempty).ceil().clamp_min(1)
    rank = torch.arange(mass.shape[-1], device=mass.device)
    keep_sorted = ((before < top_p[None, :, None, None]) | (rank < least)) & (sorted_m > 0)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def _members(labels_sorted: torch.Tensor, blk: int, k: int) -> torch.Tensor:
    """[B, H, N] cluster of each permuted token -> [B, H, ceil(N / blk), k]: the clusters each
    block of `blk` tokens holds (a short last block padded with its own last token's)."""
    b, h, n = labels_sorted.shape
    nb = R.n_blocks(n, blk)
    pad = labels_sorted[..., -1:].expand(b, h, nb * blk - n)
    lab = torch.cat([labels_sorted, pad], -1).reshape(b, h, nb, blk)
    return torch.zeros(b, h, nb, k, device=lab.device).scatter_(-1, lab, 1.0)


def predict_layout(q, k, params, scale: float, state: CentroidState | None = None, site: str = "") -> Layout:
    """Cluster, permute and select for one call. With `state`, k-means starts from the site's
    previous centroids (when its shapes match) and leaves this call's there."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    qc, kc = min(int(params["q_clusters"]), nq), min(int(params["k_clusters"]), nk)
    shape = (b, hq, hkv, nq, nk, d, qc, kc, str(q.device))
    entry = state.get(site, shape) if state is not None else None
    iters = int(params["warm_iters"] if entry is not None else params["init_iters"])
    cq, lq = _cluster(q, qc, iters, None if entry is None else entry.q)
    ck, lk = _cluster(k, kc, iters, None if entry is None else entry.k)
    if state is not None:
        state.put(site, shape, cq, ck)
    perm_q = lq.argsort(dim=-1, stable=True)
    perm_k = lk.argsort(dim=-1, stable=True)
    sizes_k = torch.zeros(b, hkv, kc, device=k.device).scatter_add_(-1, lk, torch.ones_like(lk, dtype=torch.float))
    top_p = R.per_head(params["top_p"], hq, q.device, torch.float64)
    pairs = select_pairs(cq, ck.repeat_interleave(g, 1), sizes_k.repeat_interleave(g, 1), scale, top_p,
                         float(params.get("min_key_share", 0.0)))
    aq = _members(lq.gather(-1, perm_q), R.BQ, qc)  # [B, Hq, nqb, QC]
    ak = _members(lk.gather(-1, perm_k), R.BK, kc).repeat_interleave(g, 1)  # [B, Hq, nkb, KC]
    keep = (aq @ pairs.float() @ ak.transpose(-1, -2)) > 0
    dense = list(params.get("dense_heads") or ())
    if dense:
        keep[:, dense] = True
    return Layout(perm_q, perm_k, keep, pairs, entry is not None)


# ------------------------------------------------------------------------------ attention

def _rows(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, C] with its rows taken in `perm` [B, H, N] order."""
    return x.gather(2, perm[..., None].expand(-1, -1, -1, x.shape[-1]))


def _permute_mask(m, lay: Layout, b, hq, nq, nk):
    """A broadcastable [.., nq, nk] bias or keep mask in the permuted layout [B, Hq, nq, nk]."""
    if m is None:
        return None
    g = hq // lay.perm_k.shape[1]
    m = m.expand(b, hq, nq, nk)
    m = m.gather(2, lay.perm_q[..., None].expand(-1, -1, -1, nk))
    return m.gather(3, lay.perm_k.repeat_interleave(g, 1)[:, :, None, :].expand(-1, -1, nq, -1))


def svg2_attention(q, k, v, attn_bias, keep_mask, masked_value, is_causal, scale, quant, pv, smooth_k, arch,
                   params, use_triton: bool, state: CentroidState | None = None, site: str = "",
                   softcap: float = 0.0):
    """-> (output [B, Hq, Nq, Dv] in the original row order, Layout)."""
    if is_causal:
        raise ValueError("sparsity 'svg2' permutes the tokens: it has no causal form (the rewrite keeps causal "
                         "sites dense)")
    b, hq, nq, _ = q.shape
    nk = k.shape[2]
    lay = predict_layout(q, k, params, scale, state, site)
    qp, kp, vp = _rows(q, lay.perm_q), _rows(k, lay.perm_k), _rows(v, lay.perm_k)
    bias, keep_m = (_permute_mask(m, lay, b, hq, nq, nk) for m in (attn_bias, keep_mask))
    if use_triton:
        from ..codegen.attention.launch import attention_triton

        lut, counts = R.block_mask_to_lut(lay.keep, nq, nk, False, 0)
        outp = attention_triton(qp, kp, vp, bias, keep_m, masked_value, False, 0, scale, quant, pv, smooth_k, False,
                                arch, lut=lut, counts=counts, softcap=softcap)
    else:
        outp = R.sparse_attention_reference(qp, kp, vp, lay.keep, bias, keep_m, masked_value, False, 0, scale, quant,
                                            pv, smooth_k, softcap=softcap)
    out = torch.empty_like(outp).scatter_(2, lay.perm_q[..., None].expand_as(outp), outp)
    return out, lay

