"""Sparse attention: predictors against brute-force definitions, the block-sparse kernel against
the dense reference under the same mask, calibration, plans."""

import math

import pytest
import torch
import torch.nn.functional as F

import attnopt
from attnopt.calibration.site_search import SiteSearch, search_site
from attnopt.codegen.arch import Tile
from attnopt.codegen.attention.launch import attention_triton
from attnopt.codegen.sparse.predict import predict_sparge_triton, predict_xattention_triton, xattention_scores_triton
from attnopt.ops import sparse_ref as R
from attnopt.ops.attention_ref import attention_exact, attention_reference

from helpers import rel_l1


def qkv(b, hq, hkv, nq, nk, d, dtype=torch.float16, shift=0.0):
    return (torch.randn(b, hq, nq, d).to(dtype), (torch.randn(b, hkv, nk, d) + shift).to(dtype),
            torch.randn(b, hkv, nk, d).to(dtype))


def local_qkv(b, h, n, d, noise=0.3, amp=4.0, dtype=torch.bfloat16):
    """Attention that concentrates near the diagonal: q_i . k_j ~ sum_f cos(w_f (i - j))."""
    pos = torch.arange(n).float()
    freqs = 1.0 / (200 ** (torch.arange(d // 2).float() / (d // 2)))
    base = torch.cat([(pos[:, None] * freqs).cos(), (pos[:, None] * freqs).sin()], -1) * amp
    return ((base + noise * torch.randn(b, h, n, d)).to(dtype), (base + noise * torch.randn(b, h, n, d)).to(dtype),
            torch.randn(b, h, n, d).to(dtype))


# ------------------------------------------------------------------ brute-force definitions

def _mean_pair_cos(x):
    """Self-similarity by definition: the mean cosine over ordered pairs of distinct tokens."""
    if len(x) < 2:
        return 1.0
    u = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    g = u @ u.T
    return ((g.sum() - g.diagonal().sum()) / (len(x) * (len(x) - 1))).item()


def _block_sims(q, k):
    """(q-block sims [B, H][nqb], k-block sims [B, Hkv][nkb]) as Python floats, K centered."""
    qs = [[[_mean_pair_cos(q[bb, hh, r:r + R.BQ].double()) for r in range(0, q.shape[2], R.BQ)]
           for hh in range(q.shape[1])] for bb in range(q.shape[0])]
    kc = k.double() - k.double().mean(2, keepdim=True)
    ks = [[[_mean_pair_cos(kc[bb, hh, c:c + R.BK]) for c in range(0, k.shape[2], R.BK)]
           for hh in range(k.shape[1])] for bb in range(k.shape[0])]
    return qs, ks


def _at(x, hh):
    """A scalar or per-head list parameter's value for head hh."""
    return x[hh] if isinstance(x, list) else x


def brute_sparge(q, k, scale, tau, theta, causal, sink=True, topk=None):
    b, h, nq, d = q.shape
    nk = k.shape[2]
    g = h // k.shape[1]
    nqb, nkb = R.n_blocks(nq, R.BQ), R.n_blocks(nk, R.BK)
    qsims, ksims = _block_sims(q, k)
    keep = torch.zeros(b, h, nqb, nkb, dtype=torch.bool)
    for bb in range(b):
        for hh in range(h):
            th, ta, tk = _at(theta, hh), _at(tau, hh), _at(topk, hh)
            kc = k[bb, hh // g].double() - k[bb, hh // g].double().mean(0)
            qsim, ksim = qsims[bb][hh], ksims[bb][hh // g]
            for r in range(nqb):
                last = min(nq - 1, r * R.BQ + R.BQ - 1)
                valid = [not causal or c * R.BK <= last for c in range(nkb)]
                cand = [c for c in range(nkb) if valid[c] and ksim[c] >= th]
                qhat = q[bb, hh, r * R.BQ:(r + 1) * R.BQ].double().mean(0)
                logits = {c: (qhat @ kc[c * R.BK:(c + 1) * R.BK].mean(0)).item() * scale for c in cand}
                if logits:
                    mx = max(logits.values())
                    z = sum(math.exp(x - mx) for x in logits.values())
                    ranked = sorted(((math.exp(x - mx) / z, c) for c, x in logits.items()), key=lambda t: (-t[0], t[1]))
                    if tk is not None:  # the best ceil(topk * candidates), at least one
                        chosen = [c for _, c in ranked[:max(1, math.ceil(tk * len(cand)))]]
                    else:  # the shortest prefix whose mass reaches tau
                        chosen, acc = [], 0.0
                        for p, c in ranked:
                            if acc < ta:
                                chosen.append(c)
                            acc += p
                    keep[bb, hh, r, chosen] = True
                for c in range(nkb):
                    if valid[c] and (ksim[c] < th or qsim[r] < th or (sink and c == 0)):
                        keep[bb, hh, r, c] = True
                    first, lastk = c * R.BK, c * R.BK + R.BK - 1
                    if valid[c] and (causal or nq == nk) and first <= last and lastk >= r * R.BQ:
                        keep[bb, hh, r, c] = True  # the diagonal blocks
    return keep


def brute_xattention_scores(q, k, scale, s, causal):
    b, h, nq, d = q.shape
    nk = k.shape[2]
    g = h // k.shape[1]
    nqr, nkr = -(-nq // s), -(-nk // s)
    out = torch.zeros(b, h, R.n_blocks(nq, R.BQ), R.n_blocks(nk, R.BK), dtype=torch.float64)
    for bb in range(b):
        for hh in range(h):
            at = torch.full((nqr, nkr), -math.inf, dtype=torch.float64)
            for i in range(nqr):
                for m in range(nkr):
                    if causal and m * s > i * s + s - 1:
                        continue
                    tot = 0.0
                    for j in range(s):  # the antidiagonal of the s x s tile (i, m)
                        qi, kj = s * i + s - 1 - j, s * m + j
                        if qi < nq and kj < nk:
                            tot += (q[bb, hh, qi].double() @ k[bb, hh // g, kj].double()).item()
                    at[i, m] = tot * scale / s
            p = torch.softmax(at, -1).nan_to_num(0)
            for i in range(nqr):
                for m in range(nkr):
                    out[bb, hh, (i * s) // R.BQ, (m * s) // R.BK] += p[i, m]
    return out


@pytest.mark.parametrize("n_rough,tau,topk", [
    (0, 0.7, None),  # theta below every block: the tau rule alone
    (2, 0.7, None),  # theta above the two least self-similar blocks: the always-keep rule fires
    (3, [0.5, 0.9], None),  # per-head tau
    (0, 0.7, 0.3),  # topk
    (2, 0.7, [0.2, 0.6]),  # per-head topk with non-similar blocks
])
@pytest.mark.parametrize("causal", [False, True])
def test_sparge_matches_its_definition(causal, n_rough, tau, topk):
    q, k, _ = local_qkv(1, 2, 300, 32, noise=0.5, amp=1.0, dtype=torch.float16)
    k = k[:, :1]  # GQA: one kv head for two query heads
    qsims, ksims = _block_sims(q, k)
    sims = sorted(qsims[0][0] + qsims[0][1] + ksims[0][0])
    theta = (sims[n_rough - 1] + sims[n_rough]) / 2 if n_rough else sims[0] - 0.01
    want = brute_sparge(q, k, 0.2, tau, theta, causal, topk=topk)
    got = R.predict_sparge(q, k, 0.2, tau, theta, topk=topk, is_causal=causal)
    assert torch.equal(got, want)
    assert torch.equal(predict_sparge_triton(q, k, 0.2, tau, theta, topk=topk, is_causal=causal), want)
    assert 0 < got.float().mean() < 1


@pytest.mark.parametrize("stride", [4, 8, 16])
@pytest.mark.parametrize("causal", [False, True])
def test_xattention_scores_match_their_definition(stride, causal):
    q, k, _ = qkv(1, 2, 1, 200, 200, 16)
    want = brute_xattention_scores(q, k, 0.25, stride, causal)
    torch.testing.assert_close(R.xattention_scores(q, k, 0.25, stride, causal).double(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(xattention_scores_triton(q, k, 0.25, stride, causal).double(), want, rtol=1e-4,
                               atol=1e-4)


def brute_xattention_select(scores, tau, nq, nk, causal, offset=0, local=0):
    """XAttention's selection by definition (docs/algorithms.md#xattention-antidiagonal-scoring, step
    4): block 0 and the diagonal blocks (and those holding the `local` keys before a q-block's
    first row), then the others by descending score until the kept mass (forced blocks included)
    reaches tau * row sum."""
    b, h, nqb, nkb = scores.shape
    keep = torch.zeros(b, h, nqb, nkb, dtype=torch.bool)
    for bb in range(b):
        for hh in range(h):
            for r in range(nqb):
                first, last = r * R.BQ + offset, min(nq - 1, r * R.BQ + R.BQ - 1) + offset
                valid = [c for c in range(nkb) if not causal or c * R.BK <= last]
                diag = [c for c in valid if (causal or nq == nk) and c * R.BK <= last
                        and c * R.BK + R.BK > first - local]
                row = {c: scores[bb, hh, r, c].item() for c in valid}
                kept = {0, *diag}
                mass = sum(row[c] for c in kept)
                for c in sorted(set(valid) - kept, key=lambda c: (-row[c], c)):
                    if mass >= _at(tau, hh) * sum(row.values()):
                        break
                    kept.add(c)
                    mass += row[c]
                keep[bb, hh, r, sorted(kept)] = True
    return keep


@pytest.mark.parametrize("tau", [0.5, [0.8, 0.95]])
@pytest.mark.parametrize("nq,causal,offset", [(512, True, 0), (512, False, 0), (320, True, 192)])
def test_xattention_selection_matches_its_definition(nq, causal, offset, tau):
    q, k, _ = local_qkv(1, 2, 512, 32, noise=0.5, amp=1.0)
    q = q[:, :, 512 - nq:]  # the last nq queries: causal offset 512 - nq
    scores = R.xattention_scores(q, k, 0.2, 8, causal, offset)
    want = brute_xattention_select(scores, tau, nq, 512, causal, offset)
    got = R.predict_xattention(q, k, 0.2, 8, tau, causal, offset)
    assert torch.equal(got, want)
    tri_scores = xattention_scores_triton(q, k, 0.2, 8, causal, offset)
    assert torch.equal(predict_xattention_triton(q, k, 0.2, 8, tau, causal, offset),
                       brute_xattention_select(tri_scores, tau, nq, 512, causal, offset))
    assert 0 < got.float().mean() < 1
    if causal:
        assert not (got & ~R.causal_blocks(nq, 512, offset, "cpu")).any(), "no future blocks"
    for r in range(got.shape[2]):  # the first block, and the diagonal's kv-blocks (two for a full q-block)
        first, last = r * R.BQ + offset, min(nq - 1, r * R.BQ + R.BQ - 1) + offset
        assert got[..., r, 0].all() and got[..., r, first // R.BK:last // R.BK + 1].all()


@pytest.mark.parametrize("nq,offset", [(512, 0), (320, 192)])
def test_local_keys_keep_the_blocks_before_each_q_block(nq, offset):
    """local_keys 64: the kv-block just before each q-block's first row is kept with the diagonal
    (a local head's first rows need it), in the reference and the kernels alike."""
    q, k, _ = local_qkv(1, 2, 512, 32, noise=0.5, amp=1.0)
    q = q[:, :, 512 - nq:]
    scores = R.xattention_scores(q, k, 0.2, 8, True, offset)
    got = R.predict_xattention(q, k, 0.2, 8, 0.5, True, offset, local=64)
    assert torch.equal(got, brute_xattention_select(scores, 0.5, nq, 512, True, offset, local=64))
    assert torch.equal(predict_xattention_triton(q, k, 0.2, 8, 0.5, True, offset, local=64),
                       brute_xattention_select(xattention_scores_triton(q, k, 0.2, 8, True, offset), 0.5, nq, 512,
                                               True, offset, local=64))
    sp = R.predict_sparge(q, k, 0.2, 0.5, -1.0, is_causal=True, causal_offset=offset, local=64)
    base = R.predict_sparge(q, k, 0.2, 0.5, -1.0, is_causal=True, causal_offset=offset)
    widened = R.diagonal_blocks(nq, 512, offset, "cpu", 64) & R.causal_blocks(nq, 512, offset, "cpu")
    assert torch.equal(sp, base | widened)
    assert torch.equal(predict_sparge_triton(q, k, 0.2, 0.5, -1.0, is_causal=True, causal_offset=offset, local=64), sp)
    for keep in (got, sp):
        for r in range(keep.shape[2]):
            before = (r * R.BQ + offset - 1) // R.BK  # the block holding the key just before row 0's own
            if r * R.BQ + offset >= 1:
                assert keep[..., r, before].all()


def _brute_blocks(pred, nq, nk):
    i = torch.arange(nq)[:, None]
    j = torch.arange(nk)[None, :]
    e = pred(i, j)
    out = torch.zeros(R.n_blocks(nq, R.BQ), R.n_blocks(nk, R.BK), dtype=torch.bool)
    for r in range(out.shape[0]):
        for c in range(out.shape[1]):
            out[r, c] = e[r * R.BQ:(r + 1) * R.BQ, c * R.BK:(c + 1) * R.BK].any()
    return out


def test_window_mask_matches_definition():
    params = {"window": [64, 200], "alpha": 0.0, "beta": 0.0, "sinks": 16, "causal_only": True}
    got = R.window_mask(2, 700, 700, params, True, 0, "cpu")
    for h, w in enumerate((64, 200)):
        want = _brute_blocks(lambda i, j, w=w: (((i - j) < w) & (j - i < 1)) | (j < 16), 700, 700)
        assert torch.equal(got[h], want)
    span = R.window_mask(1, 700, 700, {"window": None, "alpha": 32.0, "beta": 0.1, "sinks": 0, "causal_only": True},
                         True, 0, "cpu")[0]
    assert torch.equal(span, _brute_blocks(lambda i, j: ((i - j) < 32 + 70) & (j - i < 1), 700, 700))


def brute_radial(n, s, pre, dense, min_band):
    """The radial mask (docs/algorithms.md#radial-attention), frame pair by frame pair: text
    rows/columns dense; frame distance d <= dense: dense; else a band of width
    W = s / 2^floor(log2 d) (at least min_band) around the same in-frame position, and when W is
    under one kv-block only every ceil(block / W)-th frame distance. -> block mask [nqb, nkb] (a
    block with any kept pair)."""
    m = torch.zeros(n, n, dtype=torch.bool)
    m[:pre], m[:, :pre] = True, True
    pos = torch.arange(s)
    frames = -(-(n - pre) // s)
    for fi in range(frames):
        for fj in range(frames):
            d = abs(fi - fj)
            width = s >> (max(d, 1).bit_length() - 1)
            if d <= dense:
                tile = torch.ones(s, s, dtype=torch.bool)
            elif width < R.BK and d % -(-R.BK // width):
                continue  # a frame pair the sampling skips
            else:
                tile = (pos[:, None] - pos[None, :]).abs() * 2 < max(width, min_band)
            r0, c0 = pre + fi * s, pre + fj * s
            rows, cols = min(s, n - r0), min(s, n - c0)
            m[r0:r0 + rows, c0:c0 + cols] = tile[:rows, :cols]
    return _brute_blocks(lambda i, j: m[i, j], n, n)


@pytest.mark.parametrize("s,pre,dense,min_band", [(128, 40, 1, 16), (256, 0, 2, 128)])
def test_radial_mask_matches_its_definition(s, pre, dense, min_band):
    from attnopt.codegen.sparse.masks import radial_mask_triton

    n = pre + 11 * s + 50  # 11 frames and a partial one: distances up to 11 (W down to s / 8)
    p = {"frame_tokens": s, "dense_frames": dense, "min_band": min_band, "prefix_tokens": pre}
    want = brute_radial(n, s, pre, dense, min_band)
    assert torch.equal(R.radial_mask(n, n, p, "cpu"), want)
    assert torch.equal(radial_mask_triton(n, n, p, "cpu"), want)
    assert 0.2 < want.float().mean() < 1


def test_radial_mask_dense_near_and_log_sparse_far():
    frame, frames = 1024, 8  # frames much wider than a block: the band shows at block level
    p = {"frame_tokens": frame, "dense_frames": 1, "min_band": 16, "prefix_tokens": 0}
    m = R.radial_mask(frame * frames, frame * frames, p, "cpu")
    qpf, kpf = frame // R.BQ, frame // R.BK  # blocks per frame
    density = {}
    for fi in range(frames):
        for fj in range(frames):
            blk = m[fi * qpf:(fi + 1) * qpf, fj * kpf:(fj + 1) * kpf]
            d = abs(fi - fj)
            if d <= 1:
                assert blk.all()
            else:
                density.setdefault(int(math.log2(d)), []).append(blk.float().mean().item())
    octave = [sum(v) / len(v) for _, v in sorted(density.items())]
    assert all(a > b for a, b in zip(octave, octave[1:])), octave  # the band halves as distance doubles
    assert m.float().mean() < 0.65  # ~ (3 + 2 log2 frames) / frames of dense


def test_user_block_mask_maps_to_the_kernel_grid():
    mask = [[True, False, False, True], [False, True, False, False]]  # blocks of 128: 2 x 4
    got = R.user_block_mask(mask, 128, 256, 512, 1, "cpu")[0]
    want = _brute_blocks(lambda i, j: torch.tensor(mask)[i // 128, j // 128], 256, 512)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="does not cover"):
        R.user_block_mask(mask, 128, 512, 512, 1, "cpu")


def test_svg_chooses_per_head_pattern_and_masks_match_definitions():
    s, f, pre = 256, 4, 128  # 4 frames of 256 tokens after 128 text tokens: frames wider than blocks
    n = pre + s * f
    t = (torch.arange(n) - pre).clamp_min(0)
    frame, inframe = t // s, t % s
    q, k = torch.randn(1, 2, n, 32) * 0.3, torch.randn(1, 2, n, 32) * 0.3
    # head 0 attends its own frame (spatial); head 1 the same in-frame position in every frame (temporal)
    q[0, 0, :, :4] = F.one_hot(frame, 4).float() * 6
    k[0, 0, :, :4] = F.one_hot(frame, 4).float() * 6
    w = 2 * math.pi * torch.arange(1, 13).float() / s  # a peak at equal in-frame positions
    enc = torch.cat([(inframe[:, None] * w).cos(), (inframe[:, None] * w).sin()], -1) * 2.5
    q[0, 1, :, 4:28], k[0, 1, :, 4:28] = enc, enc
    v = torch.randn(1, 2, n, 32)
    # |dp| < 64: a 128-row q-block reaches 3 of a frame's 4 kv-blocks (|dp| < 128 would reach all 4)
    params = {"frame_tokens": s, "spatial_frames": 0, "temporal_tokens": 128, "sample_rows": 32, "prefix_tokens": pre}
    keep, choice = R.predict_svg(q, k, v, 32 ** -0.5, params, False, 0)
    assert choice.tolist() == [0, 1]
    text = (torch.arange(n) < pre)
    spatial = _brute_blocks(lambda i, j: text[i] | text[j] | (frame[i] == frame[j]), n, n)
    temporal = _brute_blocks(lambda i, j: text[i] | text[j] | ((inframe[i] - inframe[j]).abs() * 2 < 128), n, n)
    assert torch.equal(keep[0, 0], spatial) and torch.equal(keep[0, 1], temporal)
    assert spatial.float().mean() < 0.5 and temporal.float().mean() < 0.9


# ------------------------------------------------------------------ block-sparse kernel

@pytest.mark.parametrize("nq,nk,causal,offset", [(300, 300, True, 0), (333, 200, False, 0), (200, 333, True, 133),
                                                 (77, 77, True, 0)])
@pytest.mark.parametrize("pv", ["fp16", "fp8"])
def test_block_sparse_kernel_matches_reference(nq, nk, causal, offset, pv):
    q, k, v = qkv(2, 4, 2, nq, nk, 64)
    keep = torch.rand(2, 4, R.n_blocks(nq, R.BQ), R.n_blocks(nk, R.BK)) > 0.4
    keep[..., 0] = True
    lut, counts = R.block_mask_to_lut(keep, nq, nk, causal, offset)
    ref = R.sparse_attention_reference(q, k, v, keep, None, None, -math.inf, causal, offset, 0.125, "int8", pv)
    for tile in (Tile(128, 64, 4, 2), Tile(64, 64, 4, 2)):
        out = torch.full_like(ref, float("nan"))
        attention_triton(q, k, v, None, None, -math.inf, causal, offset, 0.125, "int8", pv, True, False, "cpu",
                         tile=tile, out=out, lut=lut, counts=counts)
        assert not torch.isnan(out).any()
        assert rel_l1(out, ref) <= (2e-3 if pv == "fp16" else 0.03)
    # against float64 attention restricted to the same blocks (diagonal tiles masked per element)
    elem = R.expand_block_mask(keep, nq, nk)
    exact = attention_exact(q, k, v, torch.where(elem, 0.0, -math.inf), None, -math.inf, causal, offset, 0.125)
    assert rel_l1(ref, exact) <= (0.02 if pv == "fp16" else 0.05)


@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_kernel_with_user_masks(causal):
    """A padding-style bool mask and an additive bias on top of the block table (GQA)."""
    q, k, v = qkv(2, 4, 2, 200, 260, 64)
    keep = torch.rand(2, 4, R.n_blocks(200, R.BQ), R.n_blocks(260, R.BK)) > 0.4
    keep[..., 0] = True
    lut, counts = R.block_mask_to_lut(keep, 200, 260, causal, 60)
    pad = torch.ones(2, 1, 1, 260, dtype=torch.bool)
    pad[1, ..., 230:] = False
    bias = torch.randn(1, 4, 200, 260).to(q.dtype)
    for kw in ({"keep_mask": pad}, {"attn_bias": bias}):
        ref = R.sparse_attention_reference(q, k, v, keep, kw.get("attn_bias"), kw.get("keep_mask"), -math.inf,
                                           causal, 60, 0.125, "int8", "fp16")
        out = torch.full_like(ref, float("nan"))
        attention_triton(q, k, v, kw.get("attn_bias"), kw.get("keep_mask"), -math.inf, causal, 60, 0.125, "int8",
                         "fp16", True, False, "cpu", out=out, lut=lut, counts=counts)
        assert not torch.isnan(out).any() and rel_l1(out, ref) <= 2e-3
        elem = R.expand_block_mask(keep, 200, 260)
        mask = torch.where(elem, 0.0, -math.inf) + (bias.float() if "attn_bias" in kw else 0.0)
        exact = attention_exact(q, k, v, mask, kw.get("keep_mask"), -math.inf, causal, 60, 0.125)
        assert rel_l1(out, exact) <= 0.02


def test_all_blocks_kept_equals_dense():
    q, k, v = qkv(1, 2, 2, 300, 300, 64)
    keep = torch.ones(1, 2, 3, 5, dtype=torch.bool)
    lut, counts = R.block_mask_to_lut(keep, 300, 300, True, 0)
    out = attention_triton(q, k, v, None, None, -math.inf, True, 0, 0.125, "int8", "fp16", True, False, "cpu",
                           lut=lut, counts=counts)
    dense = attention_triton(q, k, v, None, None, -math.inf, True, 0, 0.125, "int8", "fp16", True, False, "cpu")
    assert rel_l1(out, dense) < 1e-4


def sink_qkv(b, hq, hkv, n, d, amp=8.0, dtype=torch.float16):
    """Every query aligns with the first 64 keys (an attention sink): visited first, that tile sets
    a running maximum the later tiles trail by several log2 units, so the second stage skips them."""
    u = F.normalize(torch.randn(d), dim=0) * amp
    q = torch.randn(b, hq, n, d) + u
    k = torch.randn(b, hkv, n, d)
    k[:, :, :64] += u
    return q.to(dtype), k.to(dtype), torch.randn(b, hkv, n, d).to(dtype)


def _second_stage_case(n, causal, lam, pv="fp16"):
    q, k, v = sink_qkv(1, 2, 1, n, 64)  # GQA: two query heads on one kv head
    keep = torch.ones(1, 2, R.n_blocks(n, R.BQ), R.n_blocks(n, R.BK), dtype=torch.bool)
    lut, counts = R.block_mask_to_lut(keep, n, n, causal, 0)
    lam_t = torch.full((2,), lam)
    stats = {}
    ref = R.sparse_attention_reference(q, k, v, keep, None, None, -math.inf, causal, 0, 0.125, pv=pv,
                                       pv_threshold=lam_t, stats=stats)
    never = R.sparse_attention_reference(q, k, v, keep, None, None, -math.inf, causal, 0, 0.125, pv=pv,
                                         pv_threshold=torch.full((2,), math.inf))
    out = attention_triton(q, k, v, None, None, -math.inf, causal, 0, 0.125, "int8", pv, True, False, "cpu",
                           lut=lut, counts=counts, pv_threshold=lam_t)
    exact = attention_exact(q, k, v, is_causal=causal, scale=0.125)
    return out, ref, never, exact, stats


@pytest.mark.parametrize("causal,lam,pv", [(True, 2.0, "fp16"), (False, 6.0, "fp16"), (True, 6.0, "fp8")])
def test_second_stage_skips_tiles_and_kernel_matches_reference(causal, lam, pv):
    out, ref, never, exact, stats = _second_stage_case(256, causal, lam, pv)
    assert all(s > 0 for s in stats["skipped"]) and all(s < v for s, v in zip(stats["skipped"], stats["visited"]))
    skip_effect = rel_l1(ref, never)
    assert skip_effect > 1e-4  # the skipped tiles carried some mass
    assert rel_l1(out, ref) < 0.05 * skip_effect  # the kernel skips the same tiles
    assert rel_l1(ref, exact) < rel_l1(never, exact) + 0.005  # skipping costs little against float64


def test_second_stage_skips_in_a_tail_q_block():
    out, ref, never, _, stats = _second_stage_case(300, True, 2.0)
    assert sum(stats["skipped"]) > 0
    assert rel_l1(out, ref) < 0.05 * rel_l1(ref, never)


# ------------------------------------------------------------------ op, calibration, plans

class Attn(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("method", ["sparge", "xattention"])
def test_calibration_keeps_unstructured_heads_dense(method):
    opts = {"attention": {"min_seq_len": 0, "sparsity": {"method": method}}}
    rnd = [tuple(torch.randn(1, 4, 768, 64, dtype=torch.bfloat16) for _ in range(3)) for _ in range(2)]
    plan = attnopt.calibrate(Attn(), rnd, options=opts, cache_dir=False)
    (entry,) = plan.sites.values()
    assert entry.get("dense") or entry.get("original") or len(entry["sparsity"]["dense_heads"]) == 4
    report = attnopt.inspect(Attn(), *rnd[0], options={**opts, "plan": plan.to_dict()})
    assert report.sites[0].op != "attnopt::sparse_attention"  # the plan's dense choice is what runs


def _site_search(q, k, v):
    """The calibration search over one hand-made causal call (no model, no compile)."""
    call = {"q": q, "k": k, "v": v, "attn_bias": None, "keep_mask": None, "masked_value": -math.inf,
            "is_causal": True, "causal_offset": 0, "scale": 0.125}
    return SiteSearch("site", [call], "int8", "fp16", True, "cpu")


def _configured(method, **params):
    return attnopt.normalize_options({"attention": {"sparsity": {"method": method, **params}}}).attention.sparsity


@pytest.mark.parametrize("method", ["sparge", "xattention"])
def test_calibration_searches_second_stage_lambda_per_head(method):
    search = _site_search(*sink_qkv(1, 2, 2, 512, 64, dtype=torch.bfloat16))
    entry = search_site(search, _configured(method), 0.04)
    assert not entry.get("dense"), entry  # sparge keeps every block (random keys): the gain is the second stage's
    lam = entry["sparsity"]["pv_threshold"]
    assert lam is not None and all(x is not None and 2.0 <= x <= 24.0 for x in lam)
    assert min(entry["stats"]["pv_skipped"]) > 0.1 and max(entry["error"]["rel_l1"]) <= 0.04
    held = _site_search(*sink_qkv(1, 2, 2, 512, 64, dtype=torch.bfloat16))  # held out, same kind
    err, _ = held.evaluate(entry["sparsity"])
    assert float(err.max()) <= 0.05 and min(held.skipped_share(entry["sparsity"])) > 0.1


def test_calibration_without_second_stage_keeps_configured_lambda():
    search = _site_search(*sink_qkv(1, 2, 2, 512, 64, dtype=torch.bfloat16))
    entry = search_site(search, _configured("xattention"), 0.04, second_stage=False)
    assert entry["sparsity"]["pv_threshold"] is None and "pv_skipped" not in entry["stats"]
    entry = search_site(search, _configured("xattention", pv_threshold=30.0), 0.04, second_stage=False)
    assert entry["sparsity"]["pv_threshold"] == 30.0


def test_calibration_tunes_topk_per_head():
    sharp, wide = local_qkv(1, 1, 512, 64, noise=0.3), local_qkv(1, 1, 512, 64, noise=0.3, amp=1.0)
    q, k, v = (torch.cat(pair, 1) for pair in zip(sharp, wide))  # head 0 attends narrowly, head 1 widely
    entry = search_site(_site_search(q, k, v), _configured("sparge", topk=0.5), 0.1, second_stage=False)
    topk = entry["sparsity"]["topk"]
    assert isinstance(topk, list) and topk[0] < topk[1] < 1.0 and entry["sparsity"]["dense_heads"] == []
    assert max(entry["error"]["rel_l1"]) <= 0.1


def test_sites_missing_from_plan_use_defaults_and_short_sites_stay_dense():
    opts = {"attention": {"min_seq_len": 256, "sparsity": {"method": "window", "window": 128}},
            "plan": {"schema_version": 1, "sites": {"elsewhere#0": {"kind": "attention", "dense": True}}}}
    q = local_qkv(1, 2, 512, 64)
    report = attnopt.inspect(Attn(), *q, options=opts)
    assert report.sites[0].op == "attnopt::sparse_attention"
    short = local_qkv(1, 2, 200, 64)
    report = attnopt.inspect(Attn(), *short, options=opts)
    assert report.sites[0].status == "skipped" and "min_seq_len" in report.sites[0].reason


def test_sparsity_min_seq_len_keeps_short_sites_dense_quantized():
    opts = {"attention": {"min_seq_len": 0, "sparsity": {"method": "window", "window": 128, "min_seq_len": 300}}}
    (long,) = attnopt.inspect(Attn(), *local_qkv(1, 2, 512, 64), options=opts).sites
    assert long.op == "attnopt::sparse_attention"
    (short,) = attnopt.inspect(Attn(), *local_qkv(1, 2, 200, 64), options=opts).sites
    assert short.status == "rewritten" and short.op == "attnopt::attention"
    assert "sparsity.min_seq_len" in short.reason and short.error["rel_l1"] < 0.02
    with pytest.raises(attnopt.ConfigError, match="attention.sparsity.min_seq_len"):
        attnopt.config.normalize_options({"attention": {"sparsity": {"method": "sparge", "min_seq_len": -1}}})


@pytest.mark.parametrize("bad", [{"tau": [0.5, 0.5, 0.5]}, {"dense_heads": [0, 7]}])
def test_plan_entry_that_does_not_fit_falls_back_to_the_defaults(bad, caplog):
    site = {"kind": "attention", "sparsity": {"method": "sparge", "tau": 0.5, **bad}}
    plan = {"schema_version": 1, "sites": {"#0": site}}
    q = local_qkv(1, 2, 512, 64)
    opts = {"attention": {"min_seq_len": 0, "sparsity": {"method": "window", "window": 128}}, "plan": plan}
    with caplog.at_level("WARNING", logger="attnopt"):
        (rec,) = attnopt.inspect(Attn(), *q, options=opts).sites
    assert rec.key == "#0"  # the plan entry names this site
    assert rec.status == "rewritten" and rec.details["sparse_method"] == "window"  # the configured defaults
    assert "plan entry ignored" in rec.reason and "plan entry ignored" in caplog.text
    assert rec.error["rel_l1"] < 0.05
    # no configured sparsity: the site still gets dense quantized attention, not the original SDPA
    opts["attention"]["sparsity"] = None
    (rec,) = attnopt.inspect(Attn(), *q, options=opts).sites
    assert rec.status == "rewritten" and rec.op == "attnopt::attention" and "plan entry ignored" in rec.reason


def test_configured_per_head_list_that_does_not_fit_keeps_quantized_attention():
    opts = {"attention": {"min_seq_len": 0, "sparsity": {"method": "window", "window": [64, 128, 256]}}}
    (rec,) = attnopt.inspect(Attn(), *local_qkv(1, 2, 512, 64), options=opts).sites
    assert rec.status == "rewritten" and rec.op == "attnopt::attention"
    assert "configured sparsity ignored (sparsity.window has 3 per-head values for 2 heads)" in rec.reason


def test_plan_entry_that_fits_is_used():
    plan = {"schema_version": 1, "sites": {"#0": {"kind": "attention", "sparsity": {
        "method": "sparge", "tau": [0.5, 0.6], "topk": [0.3, 0.4], "dense_heads": [1]}}}}
    q = local_qkv(1, 2, 512, 64)
    opts = {"attention": {"min_seq_len": 0, "sparsity": {"method": "window", "window": 128}}, "plan": plan}
    (rec,) = attnopt.inspect(Attn(), *q, options=opts).sites
    assert rec.status == "rewritten" and rec.details["sparse_method"] == "sparge" and rec.reason is None
    plan["sites"]["#0"]["sparsity"]["topk"] = [0.3, 1.5]  # per-head values are each checked
    with pytest.raises(attnopt.ConfigError, match=r"topk\[1\]"):
        attnopt.Plan.from_dict(plan)


def test_dense_reference_agrees_when_mask_keeps_all():
    q, k, v = qkv(1, 2, 2, 200, 200, 64)
    keep = torch.ones(1, 2, 2, 4, dtype=torch.bool)
    a = R.sparse_attention_reference(q, k, v, keep, is_causal=True)
    b = attention_reference(q, k, v, is_causal=True)
    assert rel_l1(a, b) < 1e-6


def test_structured_mask_kernels_match_reference():
    from attnopt.codegen.sparse import masks as M

    p = {"window": [64, 300], "alpha": 0.0, "beta": 0.0, "sinks": 16, "causal_only": True}
    for causal, off in ((True, 0), (False, 0), (True, 100)):
        assert torch.equal(M.window_mask_triton(2, 700, 800, p, causal, off, "cpu"),
                           R.window_mask(2, 700, 800, p, causal, off, "cpu"))
    p = {"window": None, "alpha": 32.0, "beta": [0.1, 0.3], "sinks": 0, "causal_only": False}
    assert torch.equal(M.window_mask_triton(2, 500, 500, p, False, 0, "cpu"), R.window_mask(2, 500, 500, p, False, 0, "cpu"))
    rp = {"frame_tokens": 256, "dense_frames": 1, "min_band": 16, "prefix_tokens": 40}
    for n in (1100, 4100):  # every row; past 4096 queries sampled rows (and a 4-row last q-block)
        assert torch.equal(M.radial_mask_triton(n, n, rp, "cpu"), R.radial_mask(n, n, rp, "cpu"))
    mask = (torch.rand(3, 4, 7) > 0.5).tolist()
    assert torch.equal(M.user_block_mask_triton(mask, 128, 500, 800, 3, "cpu"),
                       R.user_block_mask(mask, 128, 500, 800, 3, "cpu"))
    sp = {"frame_tokens": 128, "spatial_frames": 1, "temporal_tokens": 32, "sample_rows": 8, "prefix_tokens": 10}
    got = M.svg_masks_triton(700, 700, sp, "cpu")
    q, k, v = qkv(1, 2, 2, 700, 700, 32)
    _, choice = R.predict_svg(q, k, v, 0.2, sp, False, 0)
    keep, choice2 = R.predict_svg(q, k, v, 0.2, sp, False, 0, masks=got)
    ref, _ = R.predict_svg(q, k, v, 0.2, sp, False, 0)
    assert torch.equal(choice, choice2) and torch.equal(keep, ref)


def test_dense_heads_never_skip_in_the_second_stage():
    from attnopt.ops.sparse import pv_thresholds

    lam = pv_thresholds({"pv_threshold": [1.0, None, 3.0], "dense_heads": [2]}, 3, "cpu")
    assert lam[0] == 1.0 and (lam[1:] > 1e29).all()
    assert pv_thresholds({"pv_threshold": 2.0, "dense_heads": [0, 1]}, 2, "cpu") is None
