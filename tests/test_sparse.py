"""Sparse attention: predictors against brute-force definitions, the block-sparse kernel against
the dense reference under the same mask, calibration, plans."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import attnopt
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

def brute_sparge(q, k, scale, tau, theta, causal, sink=True):
    b, h, nq, d = q.shape
    nk = k.shape[2]
    g = h // k.shape[1]
    nqb, nkb = R.n_blocks(nq, R.BQ), R.n_blocks(nk, R.BK)
    keep = torch.zeros(b, h, nqb, nkb, dtype=torch.bool)
    for bb in range(b):
        for hh in range(h):
            kc = k[bb, hh // g].double() - k[bb, hh // g].double().mean(0)
            qb = [q[bb, hh, r * R.BQ:(r + 1) * R.BQ].double() for r in range(nqb)]
            kb = [kc[c * R.BK:(c + 1) * R.BK] for c in range(nkb)]

            def sim(x):
                if len(x) < 2:
                    return 1.0
                u = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
                pairs = [(u[i] @ u[j]).item() for i in range(len(x)) for j in range(len(x)) if i != j]
                return sum(pairs) / len(pairs)

            qsim, ksim = [sim(x) for x in qb], [sim(x) for x in kb]
            for r in range(nqb):
                last = min(nq - 1, r * R.BQ + R.BQ - 1)
                valid = [not causal or c * R.BK <= last for c in range(nkb)]
                cand = [c for c in range(nkb) if valid[c] and ksim[c] >= theta]
                logits = {c: (qb[r].mean(0) @ kb[c].mean(0)).item() * scale for c in cand}
                if logits:
                    mx = max(logits.values())
                    z = sum(math.exp(v - mx) for v in logits.values())
                    probs = sorted(((math.exp(v - mx) / z, c) for c, v in logits.items()), reverse=True)
                    acc = 0.0
                    for p, c in probs:
                        if acc < tau * 1.0 or not keep[bb, hh, r].any():
                            keep[bb, hh, r, c] = True
                        acc += p
                for c in range(nkb):
                    if valid[c] and (ksim[c] < theta or qsim[r] < theta or (sink and c == 0)):
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


@pytest.mark.parametrize("causal", [False, True])
def test_sparge_matches_its_definition(causal):
    q, k, _ = local_qkv(1, 2, 300, 32, noise=0.5, amp=1.0, dtype=torch.float16)
    k = k[:, :1]  # GQA: one kv head for two query heads
    want = brute_sparge(q, k, 0.2, 0.7, 0.05, causal)
    got = R.predict_sparge(q, k, 0.2, 0.7, 0.05, is_causal=causal)
    assert torch.equal(got, want)
    assert torch.equal(predict_sparge_triton(q, k, 0.2, 0.7, 0.05, is_causal=causal), want)
    assert 0 < got.float().mean() < 1


@pytest.mark.parametrize("stride", [4, 8, 16])
@pytest.mark.parametrize("causal", [False, True])
def test_xattention_scores_match_their_definition(stride, causal):
    q, k, _ = qkv(1, 2, 1, 200, 200, 16)
    want = brute_xattention_scores(q, k, 0.25, stride, causal)
    torch.testing.assert_close(R.xattention_scores(q, k, 0.25, stride, causal).double(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(xattention_scores_triton(q, k, 0.25, stride, causal).double(), want, rtol=1e-4,
                               atol=1e-4)


def test_xattention_selection_keeps_first_and_diagonal():
    q, k, _ = qkv(1, 2, 2, 512, 512, 32)
    keep = R.predict_xattention(q, k, 0.2, 8, 0.3, is_causal=True)
    assert keep[..., 0].all()
    for r in range(keep.shape[2]):
        assert keep[..., r, (r * R.BQ + R.BQ - 1) // R.BK].all()
    assert torch.equal(keep, predict_xattention_triton(q, k, 0.2, 8, 0.3, is_causal=True))
    assert not (keep & ~R.causal_blocks(512, 512, 0, "cpu")).any(), "no future blocks"


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


def test_radial_mask_dense_near_and_log_sparse_far():
    frame, frames = 2048, 8  # frames much wider than a block: the band shows at block level
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


def test_svg_chooses_per_head_pattern():
    s, f = 64, 8  # 8 frames of 64 tokens
    n = s * f
    pos = torch.arange(n)
    frame, inframe = pos // s, pos % s
    q = torch.randn(1, 2, n, 32)
    k = torch.randn(1, 2, n, 32)
    # head 0: attends its own frame (spatial); head 1: the same position in other frames (temporal)
    bias = torch.stack([(frame[:, None] == frame[None, :]).float(), (inframe[:, None] == inframe[None, :]).float()])
    q[0, 0, :, :8] = torch.nn.functional.one_hot(frame % 8, 8).float() * 6
    k[0, 0, :, :8] = torch.nn.functional.one_hot(frame % 8, 8).float() * 6
    q[0, 1, :, 8:24] = torch.nn.functional.one_hot(inframe % 16, 16).float() * 6
    k[0, 1, :, 8:24] = torch.nn.functional.one_hot(inframe % 16, 16).float() * 6
    v = torch.randn(1, 2, n, 32)
    params = {"frame_tokens": s, "spatial_frames": 0, "temporal_tokens": 2, "sample_rows": 32, "prefix_tokens": 0}
    keep, choice = R.predict_svg(q, k, v, 32 ** -0.5, params, False, 0)
    assert choice.tolist() == [0, 1]
    del bias, keep


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


def test_all_blocks_kept_equals_dense():
    q, k, v = qkv(1, 2, 2, 300, 300, 64)
    keep = torch.ones(1, 2, 3, 5, dtype=torch.bool)
    lut, counts = R.block_mask_to_lut(keep, 300, 300, True, 0)
    out = attention_triton(q, k, v, None, None, -math.inf, True, 0, 0.125, "int8", "fp16", True, False, "cpu",
                           lut=lut, counts=counts)
    dense = attention_triton(q, k, v, None, None, -math.inf, True, 0, 0.125, "int8", "fp16", True, False, "cpu")
    assert rel_l1(out, dense) < 1e-4


@pytest.mark.parametrize("lam", [0.5, 3.0])
def test_second_stage_kernel_matches_reference(lam):
    q, k, v = local_qkv(1, 2, 300, 64, dtype=torch.float16)
    keep = torch.ones(1, 2, 3, 5, dtype=torch.bool)
    lut, counts = R.block_mask_to_lut(keep, 300, 300, True, 0)
    lam_t = torch.full((2,), lam)
    out = attention_triton(q, k, v, None, None, -math.inf, True, 0, 0.125, "int8", "fp16", True, False, "cpu",
                           lut=lut, counts=counts, pv_threshold=lam_t)
    ref = R.sparse_attention_reference(q, k, v, keep, None, None, -math.inf, True, 0, 0.125, pv_threshold=lam_t)
    assert rel_l1(out, ref) < 2e-3
    assert rel_l1(ref, attention_exact(q, k, v, is_causal=True, scale=0.125)) < 0.05


# ------------------------------------------------------------------ op, calibration, plans

class Attn(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("method", ["sparge", "xattention", "window"])
def test_calibration_meets_budget_on_held_out_and_finds_sparsity(method, tmp_path):
    opts = {"attention": {"min_seq_len": 0, "sparsity": {"method": method}}}
    plan = attnopt.calibrate(Attn(), [local_qkv(1, 4, 1024, 64), local_qkv(1, 4, 1024, 64)], options=opts,
                             budget={"rel_l1": 0.05})
    (entry,) = plan.sites.values()
    assert not entry.get("dense") and entry["sparsity"]["dense_heads"] == []
    path = tmp_path / "plan.json"
    plan.save(path)
    assert attnopt.Plan.load(path).sites == json.loads(path.read_text())["sites"]
    held_out = local_qkv(1, 4, 1024, 64)
    report = attnopt.inspect(Attn(), *held_out, options={**opts, "plan": str(path)})
    (site,) = report.sites
    assert site.status == "rewritten" and site.op == "attnopt::sparse_attention"
    assert site.error["rel_l1"] <= 0.05
    assert site.details["sparsity"] > 0.3


def test_calibration_keeps_unstructured_heads_dense():
    opts = {"attention": {"min_seq_len": 0, "sparsity": {"method": "sparge"}}}
    rnd = [tuple(torch.randn(1, 4, 1024, 64, dtype=torch.bfloat16) for _ in range(3))]
    plan = attnopt.calibrate(Attn(), rnd, options=opts)
    (entry,) = plan.sites.values()
    assert entry.get("dense") or len(entry["sparsity"]["dense_heads"]) == 4
    report = attnopt.inspect(Attn(), *rnd[0], options={**opts, "plan": plan.to_dict(), "attention": {
        "min_seq_len": 0, "sparsity": {"method": "sparge"}, "quant": "none"}})
    assert "dense" in report.sites[0].reason


def test_sites_missing_from_plan_use_defaults_and_short_sites_stay_dense():
    opts = {"attention": {"min_seq_len": 256, "sparsity": {"method": "window", "window": 128}},
            "plan": {"schema_version": 1, "sites": {"elsewhere#0": {"kind": "attention", "dense": True}}}}
    q = local_qkv(1, 2, 512, 64)
    report = attnopt.inspect(Attn(), *q, options=opts)
    assert report.sites[0].op == "attnopt::sparse_attention"
    short = local_qkv(1, 2, 200, 64)
    report = attnopt.inspect(Attn(), *short, options=opts)
    assert report.sites[0].status == "skipped" and "min_seq_len" in report.sites[0].reason


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
    for n in (1100, 5000):  # every row, and the sampled rows past 4096
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
