"""Block-sparse attention in plain PyTorch: the predictors, the lookup table the kernel reads, and
the reference arithmetic the block-sparse kernel is tested against. What each predictor computes:
docs/algorithms.md#block-sparse-attention.

A block mask is [B, H, nqb, nkb] bool over tiles of BQ query rows x BK keys. Every method
produces one; the kernel visits only the kept kv-blocks of each q-block, and still applies exact
element masks on causal-diagonal and tail tiles. Per-head parameters are tensors of shape [H]
(a scalar config value is broadcast to every head).

Non-finite inputs: the predictors see them as 0 (a NaN in one token never changes the pooled
statistics, hence the blocks kept, of any block), so the block mask is the one the same inputs
with those values replaced by 0 give; attention then poisons exactly the rows that attend them
among the kept blocks (attention_ref.poisoned_rows).
"""

from __future__ import annotations

import math

import torch

from .attention_ref import LOG2E, attention_reference, finite_or_zero

BQ = 128  # query rows per sparse block (the kernel's BLOCK_M divides it)
BK = 64  # keys per sparse block (the kernel's BLOCK_N equals it)


def n_blocks(n: int, b: int) -> int:
    return -(-n // b)


def per_head(x, h: int, device, dtype=torch.float32) -> torch.Tensor:
    """A config value (scalar or per-head list) -> tensor [H]."""
    t = torch.as_tensor(x, dtype=dtype, device=device)
    if t.dim() == 0:
        return t.expand(h).clone()
    if t.numel() != h:
        raise ValueError(f"per-head list of {t.numel()} values for {h} heads")
    return t


def causal_blocks(nq: int, nk: int, offset: int, device) -> torch.Tensor:
    """[nqb, nkb]: kv-block c holds a key visible to some row of q-block r (j <= i + offset)."""
    nqb, nkb = n_blocks(nq, BQ), n_blocks(nk, BK)
    last_row = torch.clamp(torch.arange(nqb, device=device) * BQ + BQ - 1, max=max(nq - 1, 0))
    first_key = torch.arange(nkb, device=device) * BK
    return first_key[None, :] <= last_row[:, None] + offset


def _pool(x: torch.Tensor, blk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each block of rows and the block's self-similarity (mean pairwise cosine)."""
    b, h, n, d = x.shape
    nb = n_blocks(n, blk)
    pad = nb * blk - n
    xf = torch.nn.functional.pad(finite_or_zero(x), (0, 0, 0, pad)).reshape(b, h, nb, blk, d)
    count = torch.full((nb,), float(blk), device=x.device)
    count[-1] = n - (nb - 1) * blk
    mean = xf.sum(dim=3) / count[:, None]
    unit = xf / xf.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    s = unit.sum(dim=3)
    # mean over pairs i != j of cos(x_i, x_j) = (|sum unit|^2 - n) / (n (n - 1))
    sim = ((s * s).sum(-1) - count) / (count * (count - 1)).clamp_min(1)
    sim = torch.where(count > 1, sim, torch.ones_like(sim))
    return mean, sim


def sparge_similarities(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-similarity of every Q block [B, Hq, nqb] and (centered) K block [B, Hkv, nkb]: what
    theta is compared with."""
    kf = finite_or_zero(k)
    return _pool(q, BQ)[1], _pool(kf - kf.mean(dim=-2, keepdim=True), BK)[1]


def _keep_mass(scores: torch.Tensor, valid: torch.Tensor, tau: torch.Tensor, topk: torch.Tensor | None,
               forced: torch.Tensor | None = None) -> torch.Tensor:
    """Per row: the blocks kept by the mass rule, taken in descending score order.

    tau rule: add blocks until the kept mass reaches tau [H] * the row's total; `forced` blocks
    (kept anyway) count toward that mass first. topk rule: ceil(topk [H] * the row's candidate
    count) blocks, at least one. tau and topk are float64 tensors. Sums run in float64 so that a choice at the tau boundary does
    not hinge on float32 rounding (the brute-force tests sum in Python floats).
    """
    s = torch.where(valid, scores.double(), torch.zeros((), dtype=torch.float64, device=scores.device))
    forced = torch.zeros_like(valid) if forced is None else forced & valid
    cand = valid & ~forced
    # candidates by descending score (ties: lower block first); the others sort last
    order = torch.where(cand, s, torch.full_like(s, -1.0)).argsort(dim=-1, descending=True, stable=True)
    sorted_s = torch.where(cand, s, torch.zeros_like(s)).gather(-1, order)
    if topk is not None:
        rank = torch.arange(s.shape[-1], device=s.device)
        keep_sorted = rank < torch.clamp((topk[None, :, None, None] * cand.sum(-1, keepdim=True)).ceil(), min=1)
    else:
        total = s.sum(-1, keepdim=True).clamp_min(1e-30)
        before = (s * forced).sum(-1, keepdim=True) + torch.cumsum(sorted_s, dim=-1) - sorted_s
        keep_sorted = before < tau[None, :, None, None] * total  # the first one always passes
    keep = torch.zeros_like(valid).scatter(-1, order, keep_sorted)
    return (keep & cand) | forced


def select_sparge(qhat, qsim, khat, ksim, scale: float, tau, theta, topk, sink: bool, valid,
                  diagonal) -> torch.Tensor:
    """SpargeAttn steps 3-5 on pooled blocks: qhat [B, H, nqb, D], khat [B, H, nkb, D] (K heads
    already repeated to the query heads), self-similarities qsim / ksim, valid [nqb, nkb]
    (causal), diagonal [nqb, nkb] or None. Shared by the reference and the Triton predictor."""
    b, hq, nqb, _ = qhat.shape
    nkb = khat.shape[2]
    dev = qhat.device
    f64 = torch.float64  # the user's decimal tau / topk, not their float32 roundings (0.2 * 5 > 1)
    tau_h, theta_h = per_head(tau, hq, dev, f64), per_head(theta, hq, dev)
    topk_h = None if topk is None else per_head(topk, hq, dev, f64)
    valid = valid.expand(b, hq, nqb, nkb)
    k_rough = (ksim < theta_h[None, :, None])[:, :, None, :] & valid  # pooled mean not representative
    q_rough = (qsim < theta_h[None, :, None])[:, :, :, None] & valid
    logits = torch.matmul(qhat, khat.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~valid | k_rough, -math.inf)
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    keep = _keep_mass(probs, valid & ~k_rough, tau_h, topk_h) | k_rough | q_rough
    if sink:
        keep[..., 0] |= valid[..., 0]
    if diagonal is not None:
        keep |= diagonal & valid
    return keep


def sparge_grid(nq: int, nk: int, is_causal: bool, causal_offset: int, device, local: int = 0):
    """(valid [nqb, nkb], diagonal blocks or None): the causally visible blocks, and the diagonal
    of causal or square (self-attention) sites, widened by `local` keys before each q-block."""
    valid = causal_blocks(nq, nk, causal_offset, device) if is_causal else torch.ones(
        n_blocks(nq, BQ), n_blocks(nk, BK), dtype=torch.bool, device=device)
    diag = diagonal_blocks(nq, nk, causal_offset if is_causal else 0, device, local) if is_causal or nq == nk \
        else None
    return valid, diag


def predict_sparge(q, k, scale: float, tau, theta, topk=None, sink: bool = True, is_causal: bool = False,
                   causal_offset: int = 0, local: int = 0) -> torch.Tensor:
    """SpargeAttn stage 1: pooled-attention prediction of each q-block's needed kv-blocks."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    kf = finite_or_zero(k)
    kc = kf - kf.mean(dim=-2, keepdim=True)
    qhat, qsim = _pool(q, BQ)  # [B, Hq, nqb, D], [B, Hq, nqb]
    khat, ksim = _pool(kc, BK)
    g = hq // hkv
    khat, ksim = khat.repeat_interleave(g, 1), ksim.repeat_interleave(g, 1)
    valid, diag = sparge_grid(nq, nk, is_causal, causal_offset, q.device, local)
    return select_sparge(qhat, qsim, khat, ksim, scale, tau, theta, topk, sink, valid, diag)


def diagonal_blocks(nq: int, nk: int, offset: int, device, local: int = 0) -> torch.Tensor:
    """[nqb, nkb]: kv-blocks crossing a q-block's diagonal (keys i + offset for its rows i), and
    with `local` > 0 those holding the `local` keys before its first row's. Pooled scores can miss
    them at a block boundary, and a row without its own key (or, in a local head, its neighbours)
    is badly off: attnopt always keeps them (an addition to SpargeAttn's rule)."""
    nqb, nkb = n_blocks(nq, BQ), n_blocks(nk, BK)
    r0 = torch.arange(nqb, device=device) * BQ + offset
    r1 = torch.clamp(torch.arange(nqb, device=device) * BQ + BQ - 1, max=max(nq - 1, 0)) + offset
    c0 = torch.arange(nkb, device=device) * BK
    return (c0[None, :] <= r1[:, None]) & (c0[None, :] + BK - 1 >= r0[:, None] - local)


def xattention_scores(q, k, scale: float, stride: int, is_causal: bool = False, causal_offset: int = 0):
    """XAttention: antidiagonal-strided scores, row softmax, summed per (q-block, kv-block)."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    s = stride
    g = hq // hkv
    nqr, nkr = n_blocks(nq, s), n_blocks(nk, s)
    qp = torch.nn.functional.pad(finite_or_zero(q), (0, 0, 0, nqr * s - nq)).reshape(b, hq, nqr, s, d)
    kp = torch.nn.functional.pad(finite_or_zero(k), (0, 0, 0, nkr * s - nk)).reshape(b, hkv, nkr, s, d)
    qt = qp.flip(3).reshape(b, hq, nqr, s * d)  # Qt[i] = concat_j Q[S i + S-1-j]
    kt = kp.reshape(b, hkv, nkr, s * d).repeat_interleave(g, 1)  # Kt[m] = concat_j K[S m + j]
    at = torch.matmul(qt, kt.transpose(-1, -2)) * (scale / s)
    if is_causal:  # in reduced coordinates: group m visible to group i when its first key is
        i = torch.arange(nqr, device=q.device)[:, None] * s + (s - 1)
        m = torch.arange(nkr, device=q.device)[None, :] * s
        at = at.masked_fill(~(m <= i + causal_offset), -math.inf)
    probs = torch.softmax(at, dim=-1).nan_to_num(0.0)
    rq, rk = BQ // s, BK // s
    nqb, nkb = n_blocks(nq, BQ), n_blocks(nk, BK)
    probs = torch.nn.functional.pad(probs, (0, nkb * rk - nkr, 0, nqb * rq - nqr))
    return probs.reshape(b, hq, nqb, rq, nkb, rk).sum(dim=(3, 5))  # [B, H, nqb, nkb]


def select_xattention(scores: torch.Tensor, tau, valid: torch.Tensor, diagonal) -> torch.Tensor:
    """XAttention step 3 on block scores [B, H, nqb, nkb]: keep block 0 and the diagonal blocks,
    then the highest-scoring others until the kept mass (those included) reaches tau * row sum."""
    valid = valid.expand_as(scores)
    forced = torch.zeros_like(valid)
    forced[..., 0] = True
    if diagonal is not None:
        forced |= diagonal
    tau_h = per_head(tau, scores.shape[1], scores.device, torch.float64)
    return _keep_mass(scores, valid, tau_h, None, forced & valid)


def predict_xattention(q, k, scale: float, stride: int, tau, is_causal: bool = False,
                       causal_offset: int = 0, local: int = 0) -> torch.Tensor:
    """XAttention: antidiagonal block scores, then the tau selection."""
    nq, nk = q.shape[2], k.shape[2]
    scores = xattention_scores(q, k, scale, stride, is_causal, causal_offset)
    valid, diag = sparge_grid(nq, nk, is_causal, causal_offset, q.device, local)
    return select_xattention(scores, tau, valid, diag)


# ------------------------------------------------------------------------------ VSA

def vsa_topk(topk, h: int, device) -> torch.Tensor:
    """VSA's top-k per head as float64 [H]: a share in (0, 1] as itself, a tile count c as -c
    (an integer 1 is one tile, a float 1.0 every tile). The predictor kernel reads this form."""
    vals = list(topk) if isinstance(topk, (list, tuple)) else [topk] * h
    if len(vals) != h:
        raise ValueError(f"per-head list of {len(vals)} values for {h} heads")
    return torch.tensor([-float(x) if isinstance(x, int) else float(x) for x in vals], dtype=torch.float64,
                        device=device)


def _mean_pool(x: torch.Tensor, blk: int) -> torch.Tensor:
    """[B, H, N, D] -> mean of each run of `blk` rows [B, H, ceil(N / blk), D] (a short last run
    over its own rows), in fp32, non-finite values as 0."""
    b, h, n, d = x.shape
    nb = n_blocks(n, blk)
    xf = torch.nn.functional.pad(finite_or_zero(x).float(), (0, 0, 0, nb * blk - n)).reshape(b, h, nb, blk, d)
    count = torch.full((nb,), float(blk), device=x.device)
    count[-1] = n - (nb - 1) * blk
    return xf.sum(dim=3) / count[:, None]


def _blocks_to_tiles(m: torch.Tensor, per: int) -> torch.Tensor:
    """[..., nkb] block flags -> [..., ceil(nkb / per)]: a tile is flagged when any of its blocks is."""
    nkb = m.shape[-1]
    nkt = n_blocks(nkb, per)
    return torch.nn.functional.pad(m, (0, nkt * per - nkb)).reshape(*m.shape[:-1], nkt, per).any(-1)


def vsa_grid(nq: int, nk: int, tile: int, is_causal: bool, causal_offset: int, diagonal: bool, device):
    """(valid, diag or None) per (q-block, key tile) [nqb, nkt]: a tile is visible when one of its
    kv-blocks is, on the diagonal when one of its kv-blocks is (sparse_ref.sparge_grid's rules;
    the diagonal of non-causal square sites only with `diagonal`)."""
    valid, diag = sparge_grid(nq, nk, is_causal, causal_offset, device)
    if diag is not None and not (is_causal or diagonal):
        diag = None
    per = tile // BK
    return _blocks_to_tiles(valid, per), None if diag is None else _blocks_to_tiles(diag, per)


def vsa_coarse_probs(q, k, scale: float, tile: int, valid: torch.Tensor) -> torch.Tensor:
    """VSA's coarse stage: mean-pooled q-blocks (BQ rows) against mean-pooled key tiles, softmax
    over each q-block's visible tiles -> [B, Hq, nqb, nkt] fp32 (0 on invisible tiles)."""
    g = q.shape[1] // k.shape[1]
    qhat = _mean_pool(q, BQ)
    khat = _mean_pool(k, tile).repeat_interleave(g, 1)
    logits = torch.matmul(qhat, khat.transpose(-1, -2)) * scale
    return torch.softmax(logits.masked_fill(~valid, -math.inf), dim=-1).nan_to_num(0.0)


def select_top_tiles(probs: torch.Tensor, valid: torch.Tensor, diag, topk: torch.Tensor) -> torch.Tensor:
    """Per row of probs [B, H, nqb, nkt]: the diagonal tiles, and among the other visible ones the
    `want` best by descending score (ties to the lower tile), want = the count (topk < 0) or
    ceil(share * candidates), at least one. topk: vsa_topk's float64 [H]."""
    valid = valid.expand_as(probs)
    forced = torch.zeros_like(valid) if diag is None else diag.expand_as(probs) & valid
    cand = valid & ~forced
    s = torch.where(cand, probs.double(), torch.full_like(probs, -1.0, dtype=torch.float64))
    order = s.argsort(dim=-1, descending=True, stable=True)
    t = topk[None, :, None, None]
    n_cand = cand.sum(-1, keepdim=True).double()
    want = torch.where(t < 0, -t, (t * n_cand).ceil()).clamp_min(1)
    rank = torch.arange(s.shape[-1], device=s.device)
    keep = torch.zeros_like(valid).scatter(-1, order, rank < want)
    return (keep & cand) | forced


def vsa_tiles_to_blocks(keep_tiles: torch.Tensor, nk: int, tile: int) -> torch.Tensor:
    """[..., nkt] kept key tiles -> [..., nkb] kept kv-blocks (every block of a kept tile)."""
    nkb = n_blocks(nk, BK)
    return keep_tiles.repeat_interleave(tile // BK, dim=-1)[..., :nkb]


def vsa_cube_order(frames: int, height: int, width: int, cube: tuple[int, int, int], device=None) -> torch.Tensor:
    """The token order that makes VSA's 1-D tiles video cubes: a permutation of the frames x height
    x width patch tokens (raster order) listing cube after cube (each cube's tokens in raster
    order, cubes in raster order; border cubes may be smaller). Apply it once where the model
    patchifies (`x[:, order]`, and `out[:, order.argsort()]` to go back): with a cube of `tile`
    tokens every key tile is then one cube, as VSA tiles video latents."""
    ct, ch, cw = (int(c) for c in cube)
    t, h, w = torch.meshgrid(torch.arange(frames, device=device), torch.arange(height, device=device),
                             torch.arange(width, device=device), indexing="ij")
    nh, nw = n_blocks(height, ch), n_blocks(width, cw)
    cube_id = ((t // ct) * nh + h // ch) * nw + w // cw
    inner = ((t % ct) * ch + h % ch) * cw + w % cw
    key = cube_id.flatten() * (ct * ch * cw) + inner.flatten()
    return key.argsort()


def predict_vsa(q, k, scale: float, tile: int, topk, is_causal: bool = False, causal_offset: int = 0,
                diagonal: bool = True) -> torch.Tensor:
    """VSA's selection: the coarse stage's top-k key tiles of each q-block, as kv-blocks
    [B, Hq, nqb, nkb] (causally invisible blocks never kept)."""
    nq, nk = q.shape[2], k.shape[2]
    valid, diag = vsa_grid(nq, nk, tile, is_causal, causal_offset, diagonal, q.device)
    probs = vsa_coarse_probs(q, k, scale, tile, valid)
    keep = select_top_tiles(probs, valid, diag, vsa_topk(topk, q.shape[1], q.device))
    block_valid = sparge_grid(nq, nk, is_causal, causal_offset, q.device)[0]
    return vsa_tiles_to_blocks(keep, nk, tile) & block_valid


def _element_to_blocks(keep_fn, nq: int, nk: int, device, sample: int | None = None) -> torch.Tensor:
    """Block mask [nqb, nkb] of an element predicate keep_fn(i [R,1], j [1,C]) -> bool [R, C]:
    a block is kept when any of its rows keeps any of its keys. Every row is checked up to 4096
    queries; past that every `sample`-th row plus each block's first and last row."""
    nqb, nkb = n_blocks(nq, BQ), n_blocks(nk, BK)
    if sample is None:
        sample = 1 if nq <= 4096 else 8
    rows = torch.unique(torch.cat([torch.arange(0, nq, sample, device=device),
                                   torch.arange(nqb, device=device) * BQ,
                                   torch.clamp(torch.arange(nqb, device=device) * BQ + BQ - 1, max=nq - 1)]))
    j = torch.arange(nk, device=device)[None, :]
    hit = keep_fn(rows[:, None], j)  # [R, nk]
    hit = torch.nn.functional.pad(hit, (0, nkb * BK - nk)).reshape(len(rows), nkb, BK).any(-1)
    hits = torch.zeros(nqb, nkb, dtype=torch.int32, device=device).index_add_(0, rows // BQ, hit.to(torch.int32))
    return hits > 0


def window_mask(h: int, nq: int, nk: int, params: dict, is_causal: bool, causal_offset: int, device):
    """Per-head sliding window with sink tokens: [H, nqb, nkb]. span_h = window_h, or alpha_h + beta_h * N."""
    n = nk
    if params.get("window") is not None:
        span = per_head(params["window"], h, device)
    else:
        span = per_head(params["alpha"], h, device) + per_head(params["beta"], h, device) * n
    sinks = int(params["sinks"])
    out = []
    for hh in range(h):
        w = float(span[hh])

        def keep(i, j, w=w):
            i = i + causal_offset
            near = (i - j < w) & (j - i < (1 if params.get("causal_only") or is_causal else w))
            return near | (j < sinks)

        out.append(_element_to_blocks(keep, nq, nk, device))
    return torch.stack(out)


def radial_mask(nq: int, nk: int, params: dict, device) -> torch.Tensor:
    """Radial attention for video: dense near the diagonal frame, the band halving as the frame
    distance doubles; below one block wide, only every f-th frame pair. [nqb, nkb]."""
    s, pre = int(params["frame_tokens"]), int(params["prefix_tokens"])
    dense, min_band = int(params["dense_frames"]), int(params["min_band"])

    def keep(i, j):
        text = (i < pre) | (j < pre)
        fi, fj = (i - pre).clamp_min(0) // s, (j - pre).clamp_min(0) // s
        pi, pj = (i - pre).clamp_min(0) % s, (j - pre).clamp_min(0) % s
        dist = (fi - fj).abs()
        band = torch.where(dist <= 1, torch.full_like(dist, s),
                           s // (2 ** torch.floor(torch.log2(dist.clamp_min(1).float())).long()))
        every = torch.clamp(-(-BK // band.clamp_min(1)), min=1)  # band under a block: sample frames
        near = (pi - pj).abs() * 2 < torch.maximum(band, torch.full_like(band, min_band))
        sampled = (band >= BK) | (dist % every == 0)
        return text | (dist <= dense) | (near & sampled)

    return _element_to_blocks(keep, nq, nk, device)


def user_block_mask(mask, block_size: int, nq: int, nk: int, h: int, device) -> torch.Tensor:
    """A user's block mask ([nq][nk] or [H][nq][nk] at block_size) on our grid: [H, nqb, nkb]."""
    m = torch.as_tensor(mask, dtype=torch.bool, device=device)
    if m.dim() == 2:
        m = m.expand(h, *m.shape)
    need = (n_blocks(nq, block_size), n_blocks(nk, block_size))
    if tuple(m.shape[-2:]) != need or m.shape[0] != h:
        raise ValueError(f"block mask of shape {list(m.shape)} does not cover [{h}, {need[0]}, {need[1]}] "
                         f"blocks of {block_size} for {nq} queries x {nk} keys")
    return torch.stack([_element_to_blocks(lambda i, j, mm=mm: mm[i // block_size, j // block_size], nq, nk,
                                           device) for mm in m])


def _svg_patterns(params: dict):
    """SVG's element predicates: spatial (nearby frames) and temporal (same in-frame position)."""
    s, pre = int(params["frame_tokens"]), int(params["prefix_tokens"])
    sf, tt = int(params["spatial_frames"]), int(params["temporal_tokens"])

    def frames(i):
        return (i - pre).clamp_min(0) // s, (i - pre).clamp_min(0) % s

    def spatial(i, j):
        (fi, _), (fj, _) = frames(i), frames(j)
        return (i < pre) | (j < pre) | ((fi - fj).abs() <= sf)

    def temporal(i, j):
        (_, pi), (_, pj) = frames(i), frames(j)
        return (i < pre) | (j < pre) | ((pi - pj).abs() * 2 < tt)

    return spatial, temporal


def svg_masks(nq: int, nk: int, params: dict, device) -> torch.Tensor:
    """[2, nqb, nkb]: SVG's spatial and temporal block masks."""
    return torch.stack([_element_to_blocks(fn, nq, nk, device) for fn in _svg_patterns(params)])


def svg_rows(nq: int, params: dict, device) -> torch.Tensor:
    """The query rows SVG samples to choose a head's pattern."""
    return torch.linspace(0, nq - 1, min(int(params["sample_rows"]), nq), device=device).round().long()


def predict_svg(q, k, v, scale: float, params: dict, is_causal: bool, causal_offset: int, masks=None):
    """Sparse VideoGen: per head, the spatial (nearby frames) or temporal (same position across
    frames) mask, whichever errs less on a few sampled query rows. -> [B, H, nqb, nkb], choice [H]."""
    b, hq, nq, d = q.shape
    nk = k.shape[2]
    dev = q.device
    rows = svg_rows(nq, params, dev)
    g = hq // k.shape[1]
    kk, vv = finite_or_zero(k).repeat_interleave(g, 1), finite_or_zero(v).repeat_interleave(g, 1)
    logit = torch.matmul(finite_or_zero(q)[:, :, rows], kk.transpose(-1, -2)) * scale  # [B, H, R, nk]
    j = torch.arange(nk, device=dev)[None, :]
    allowed = torch.ones(len(rows), nk, dtype=torch.bool, device=dev)
    if is_causal:
        allowed = j <= rows[:, None] + causal_offset
    dense = torch.matmul(torch.softmax(logit.masked_fill(~allowed, -math.inf), -1), vv)
    errs = []
    for fn in _svg_patterns(params):
        m = fn(rows[:, None], j) & allowed
        o = torch.matmul(torch.softmax(logit.masked_fill(~m, -math.inf), -1).nan_to_num(0), vv)
        errs.append(((o - dense).abs().sum((0, 2, 3)) / dense.abs().sum((0, 2, 3)).clamp_min(1e-12)))
    choice = (errs[1] < errs[0]).long()  # [H]: 0 spatial, 1 temporal
    if masks is None:  # (the op passes them in, built once: ops/sparse.py)
        masks = svg_masks(nq, nk, params, dev)
    return masks[choice].expand(b, hq, *masks.shape[1:]), choice


def block_mask_to_lut(keep: torch.Tensor, nq: int, nk: int, is_causal: bool, causal_offset: int):
    """[B, H, nqb, nkb] -> (lut int32 [B, H, nqb, nkb], counts int32 [B, H, nqb, 2]).

    Each row lists its kept kv-blocks: first those every row of the q-block sees in full (no
    element masks), then the causal-diagonal / tail ones; counts = (n_full, n_total).
    """
    b, h, nqb, nkb = keep.shape
    dev = keep.device
    if is_causal:
        keep = keep & causal_blocks(nq, nk, causal_offset, dev)
    first_row = torch.arange(nqb, device=dev) * BQ
    last_key = torch.arange(nkb, device=dev) * BK + BK - 1
    full = last_key[None, :] < nk  # no tail
    if is_causal:
        full = full & (last_key[None, :] <= first_row[:, None] + causal_offset)
    full = full.expand_as(keep) & keep
    masked = keep & ~full
    col = torch.arange(nkb, device=dev, dtype=torch.int32)
    # sort key: full blocks first (ascending), then masked (ascending), then unkept
    rank = torch.where(full, col, torch.where(masked, col + nkb, col + 2 * nkb))
    lut = rank.argsort(dim=-1).to(torch.int32)
    counts = torch.stack([full.sum(-1), keep.sum(-1)], dim=-1).to(torch.int32)
    return lut.contiguous(), counts.contiguous()


def lut_to_block_mask(lut: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(lut, counts) -> the block mask [B, H, nqb, nkb] they list (block_mask_to_lut's inverse on
    the causally visible blocks)."""
    listed = torch.arange(lut.shape[-1], device=lut.device) < counts[..., 1:2]
    return torch.zeros(lut.shape, dtype=torch.bool, device=lut.device).scatter(-1, lut.long(), listed)


def expand_block_mask(keep: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
    """[B, H, nqb, nkb] -> element keep mask [B, H, nq, nk]."""
    e = keep.repeat_interleave(BQ, dim=2)[:, :, :nq].repeat_interleave(BK, dim=3)[..., :nk]
    return e


def sparse_attention_reference(q, k, v, block_keep, attn_bias=None, keep_mask=None, masked_value=-math.inf,
                               is_causal=False, causal_offset=0, scale=None, quant="int8", pv="fp16",
                               smooth_k=True, pv_threshold=None, stats: dict | None = None, softcap: float = 0.0):
    """Attention over the kept blocks only, with the quantized arithmetic of attention_reference.

    Skipped blocks contribute nothing (their logits are -inf, whatever the mask fill value).
    `pv_threshold` [H] (log2 units; None = off) adds the second stage: a tile whose every row's
    maximum trails that row's running maximum by more than it skips exp and P.V. That result
    depends on the order tiles are visited, so that path walks them in the kernel's LUT order.
    `stats` (a dict, second stage only) receives "visited" and "skipped" tile counts per head
    (lists), which tests and calibration read to see that the stage really skips.
    `softcap` > 0 soft-caps the logits as attention_reference does.
    """
    b, hq, nq, d = q.shape
    nk = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if pv_threshold is None:
        kept = expand_block_mask(block_keep, nq, nk)
        skipped = torch.where(kept, 0.0, -math.inf)  # (a NaN bias in a skipped block stays unseen)
        bias = skipped if attn_bias is None else torch.where(kept, attn_bias.float(), -math.inf)
        return attention_reference(q, k, v, bias, keep_mask, masked_value, is_causal, causal_offset, scale, quant,
                                   pv, smooth_k, False, softcap=softcap)
    return _second_stage(q, k, v, block_keep, attn_bias, keep_mask, masked_value, is_causal, causal_offset, scale,
                         quant, pv, smooth_k, pv_threshold, stats, softcap)


def _second_stage(q, k, v, block_keep, bias, keep_mask, masked_value, is_causal, causal_offset, scale, quant, pv,
                  smooth_k, pv_threshold, stats=None, softcap=0.0):
    """Tile by tile in LUT order, as the kernel runs, skipping P.V of tiles far below the running max.
    Step t takes every (batch, head, q-block)'s t-th listed kv-block at once: one batched matmul
    per step instead of one per tile, so calibration can afford it on a CPU."""
    from .attention_ref import (_full_mask, _log2_logit, apply_softcap, nonfinite_rows, pv_dtype_for,
                                pv_tile, quantized_operands, round_p, sane_bias, softcap_row_shift, unscale_pv)

    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv
    nqb, nkb = n_blocks(nq, BQ), n_blocks(nk, BK)
    # non-finite inputs: zeros in the arithmetic; the rows that attend them are marked (as the kernel)
    bad_q = nonfinite_rows(q)
    bad_kv = _pad_rows((nonfinite_rows(k) | nonfinite_rows(v)).repeat_interleave(g, 1)[..., None], nkb * BK)
    bad_kv = bad_kv.reshape(b, hq, nkb, BK)
    q, k, v = (finite_or_zero(t).to(t.dtype) for t in (q, k, v))
    lut, counts = block_mask_to_lut(block_keep, nq, nk, is_causal, causal_offset)
    ops = quantized_operands(q, k, v, scale, quant, pv, smooth_k, False)
    vmean_all = v.float().mean(dim=-2)
    fill = _log2_logit(float(masked_value))
    lam = per_head(pv_threshold, hq, q.device)
    tiles = _Tiles(ops.q, ops.k.repeat_interleave(g, 1), ops.v.repeat_interleave(g, 1), nqb, nkb)
    bias_t = None if bias is None else tiles.grid(_log2_logit(_full_mask(bias, b, hq, nq, nk)), 0.0)
    keep_t = None if keep_mask is None else tiles.grid(_full_mask(keep_mask, b, hq, nq, nk), True)
    rows = (torch.arange(nqb, device=q.device)[:, None] * BQ + torch.arange(BQ, device=q.device))  # [nqb, BQ]
    row_ok = rows < nq  # padded rows never hold a tile back from skipping
    cap_shift = None
    if softcap and smooth_k and quant != "none":  # [B, H, nqb, BQ, 1]: K smoothing's row shift, added back
        sh = torch.nn.functional.pad(softcap_row_shift(q, ops.k_mean, scale), (0, nqb * BQ - nq))
        cap_shift = sh.reshape(b, hq, nqb, BQ, 1)
    m = torch.full((b, hq, nqb, BQ), -math.inf, device=q.device)
    l = torch.zeros(b, hq, nqb, BQ, device=q.device)
    acc = torch.zeros(b, hq, nqb, BQ, dv, device=q.device)
    visited = torch.zeros(hq, dtype=torch.long, device=q.device)
    skipped = torch.zeros_like(visited)
    bad_rows = torch.zeros(b, hq, nqb, BQ, dtype=torch.bool, device=q.device)
    for t in range(nkb):  # step t: every (batch, head, q-block)'s t-th listed kv-block at once
        active = counts[..., 1] > t  # [B, H, nqb]
        col = lut[..., t].long()
        cols = col[..., None] * BK + torch.arange(BK, device=q.device)  # [B, H, nqb, BK]
        s = tiles.qk(col) * ops.qk_scale  # [B, H, nqb, BQ, BK], log2 units
        hit = torch.gather(bad_kv, 2, col[..., None].expand(*col.shape, BK))[..., None, :] & active[..., None, None]
        if softcap:
            s = apply_softcap(s if cap_shift is None else s + cap_shift, softcap)
        if bias_t is not None:
            bt = tiles.pick(bias_t, col)
            s = s + sane_bias(bt)
            hit = (hit | torch.isnan(bt) | torch.isposinf(bt)) & ~torch.isneginf(bt)
        if keep_t is not None:
            kt = tiles.pick(keep_t, col)
            s = torch.where(kt, s, torch.full_like(s, fill))
            hit = hit & kt
        if is_causal:
            seen = cols[..., None, :] <= rows[:, :, None] + causal_offset
            s = torch.where(seen, s, torch.full_like(s, fill))
            hit = hit & seen
        s = torch.where(cols[..., None, :] < nk, s, torch.full_like(s, -math.inf))
        bad_rows |= (hit & (cols[..., None, :] < nk)).any(-1)
        m_tile = s.amax(-1)
        trails = ((m_tile - m < -lam[None, :, None, None]) | ~row_ok).all(-1)  # second stage
        go = active & ~trails
        visited += active.sum((0, 2))
        skipped += (active & trails).sum((0, 2))
        m_new = torch.maximum(m, m_tile)
        m_safe = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp2(s - m_safe[..., None])
        alpha = torch.exp2(m - m_safe)
        pp = round_p(p, pv, pv_dtype_for(v.dtype))
        g4 = go[..., None]
        l = torch.where(g4, l * alpha + p.sum(-1), l)
        acc = torch.where(g4[..., None], acc * alpha[..., None] + pv_tile(pp, tiles.v(col), pv), acc)
        m = torch.where(g4, m_new, m)
    o = acc / torch.where(l > 0, l, torch.ones_like(l))[..., None]
    hk = torch.arange(hq, device=q.device) // g
    if pv in ("fp8", "fp4", "fp8_acc16"):  # [B, Hkv, 1, Dv] -> [B, H, 1, 1, Dv]
        o = unscale_pv(o, pv, ops.v_scale[:, hk][:, :, None], ops.v_mean[:, hk][:, :, None])
    if masked_value != -math.inf:
        o = torch.where((m <= fill)[..., None], vmean_all[:, hk][:, :, None, None], o)
    else:
        o = torch.where(torch.isneginf(m)[..., None], torch.zeros_like(o), o)
    if stats is not None:
        stats.update(visited=visited.tolist(), skipped=skipped.tolist())
    out = o.reshape(b, hq, nqb * BQ, dv)[:, :, :nq]
    bad = bad_rows.reshape(b, hq, nqb * BQ)[:, :, :nq] | bad_q
    return out.masked_fill(bad[..., None], float("nan")).to(q.dtype)


class _Tiles:
    """Operands cut into the kernel's tiles: q [B, H, nqb, BQ, D]; k, v [B, H, nkb, BK, D]
    (query heads); per-step gathers of each q-block's current kv-block."""

    def __init__(self, qd, kd, vd, nqb, nkb):
        self.q = _pad_rows(qd, nqb * BQ).reshape(*qd.shape[:2], nqb, BQ, qd.shape[-1])
        self.k = _pad_rows(kd, nkb * BK).reshape(*kd.shape[:2], nkb, BK, kd.shape[-1])
        self.vt = _pad_rows(vd, nkb * BK).reshape(*vd.shape[:2], nkb, BK, vd.shape[-1])
        self.nqb, self.nkb = nqb, nkb

    def _gather(self, x, col):  # x [B, H, nkb, BK, C], col [B, H, nqb] -> [B, H, nqb, BK, C]
        idx = col[..., None, None].expand(*col.shape, *x.shape[-2:])
        return torch.gather(x, 2, idx)

    def qk(self, col):
        return self.q @ self._gather(self.k, col).transpose(-1, -2)

    def v(self, col):
        return self._gather(self.vt, col)

    def grid(self, m, pad):
        """A [B, H, nq, nk] mask -> [B, H, nqb, nkb, BQ, BK], padded with `pad`."""
        b, h, nq, nk = m.shape
        m = torch.nn.functional.pad(m.to(torch.float32) if m.dtype != torch.bool else m,
                                    (0, self.nkb * BK - nk, 0, self.nqb * BQ - nq), value=pad)
        return m.reshape(b, h, self.nqb, BQ, self.nkb, BK).transpose(3, 4)

    @staticmethod
    def pick(grid, col):  # grid [B, H, nqb, nkb, BQ, BK] -> each q-block's tile at col: [B, H, nqb, BQ, BK]
        idx = col[..., None, None, None].expand(*col.shape, 1, *grid.shape[-2:])
        return torch.gather(grid, 3, idx)[:, :, :, 0]


def _pad_rows(x, n):
    return torch.nn.functional.pad(x, (0, 0, 0, n - x.shape[-2]))
