"""SVG2 (semantic-aware permutation): k-means, the per-site centroid state, the permuted block
layout and its un-permuted output, the comparison with svg and radial on video-like inputs, the
Triton LUT path, and the rewrite pass."""

import importlib.util
import json
import math
import pathlib

import pytest
import torch
import torch.nn.functional as F

import attnopt
from attnopt.ops import sparse_ref as R
from attnopt.ops import svg2
from attnopt.ops.attention_ref import attention_exact, attention_reference
from attnopt.ops.sparse import block_sparsity, predict_block_mask

from helpers import rel_l1

ROOT = pathlib.Path(__file__).parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_sparse_svg2", ROOT / "benchmarks" / "sparse.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def params(top_p=0.9, qc=8, kc=16, share=0.0, init=10, warm=2, **kw):
    return {"method": "svg2", "q_clusters": qc, "k_clusters": kc, "top_p": top_p, "min_key_share": share,
            "init_iters": init, "warm_iters": warm, **kw}


def clustered(b, h, n, d=64, groups=6, seed=0):
    """Tokens drawn around `groups` random centers, scattered over the sequence."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(b, h, groups, d, generator=g) * 2
    lab = torch.randint(groups, (n,), generator=g)
    x = centers[:, :, lab] + 0.3 * torch.randn(b, h, n, d, generator=g)
    return x, lab


def run(q, k, v, p, quant="int8", state=None, site="", **kw):
    return svg2.svg2_attention(q, k, v, kw.get("bias"), kw.get("keep_mask"), -math.inf, False, 0.125, quant, "fp16",
                               True, "cpu", p, kw.get("use_triton", False), state, site)


# ------------------------------------------------------------------ k-means

def test_kmeans_is_deterministic_and_a_fixed_point_of_lloyd():
    x, _ = clustered(2, 2, 300, 32)
    x = x.reshape(4, 300, 32)
    c1, l1 = svg2.kmeans(x, 6, 15)
    c2, l2 = svg2.kmeans(x, 6, 15)
    assert torch.equal(c1, c2) and torch.equal(l1, l2)
    # converged: each centroid is its cluster's mean and every row sits at its nearest centroid
    for g in range(4):
        for j in range(6):
            if (l1[g] == j).any():
                assert torch.allclose(c1[g, j], x[g, l1[g] == j].mean(0), atol=1e-4)
        d2 = ((x[g, :, None] - c1[g, None]) ** 2).sum(-1)
        assert torch.equal(d2.argmin(-1), l1[g])
    # warm start from converged centroids: one iteration changes nothing
    c3, l3 = svg2.kmeans(x, 6, 1, init=c1)
    assert torch.allclose(c3, c1, atol=1e-5) and torch.equal(l3, l1)
    # more clusters than rows: one per row
    c4, l4 = svg2.kmeans(x[:, :5], 9, 3)
    assert c4.shape == (4, 5, 32) and l4.shape == (4, 5)


# ------------------------------------------------------------------ permutation and output

@pytest.mark.parametrize("nq,nk", [(77, 77), (333, 333), (200, 333)])
def test_all_pairs_kept_equals_dense_attention_unpermuted(nq, nk):
    """top_p 1 with every key cluster kept: every block of the permuted layout is kept, and the
    output scattered back equals dense attention in the original order (GQA, odd lengths)."""
    q = torch.randn(2, 4, nq, 64).bfloat16()
    k, v = (torch.randn(2, 2, nk, 64).bfloat16() for _ in range(2))
    p = params(top_p=1.0, share=1.0)
    out, lay = run(q, k, v, p, quant="none")
    assert lay.keep.all()
    assert not torch.equal(lay.perm_q, torch.arange(nq).expand_as(lay.perm_q))  # really permuted
    dense = attention_reference(q, k, v, None, None, -math.inf, False, 0, 0.125, "none", "fp16", True, False)
    assert rel_l1(out, dense) < 2e-3
    exact = attention_exact(q, k, v, None, None, -math.inf, False, 0, 0.125)
    out8, _ = run(q, k, v, p)
    dense8 = attention_reference(q, k, v, None, None, -math.inf, False, 0, 0.125, "int8", "fp16", True, False)
    assert rel_l1(out8, exact) < 1.2 * rel_l1(dense8, exact) + 1e-3


def test_masks_follow_the_permutation():
    """A padding mask and an additive bias are permuted with the tokens."""
    q, k, v = (torch.randn(2, 2, 150, 64).bfloat16() for _ in range(3))
    pad = torch.ones(2, 1, 1, 150, dtype=torch.bool)
    pad[1, ..., 120:] = False
    bias = torch.randn(1, 2, 150, 150)
    out, _ = run(q, k, v, params(top_p=1.0, share=1.0), quant="none", bias=bias, keep_mask=pad)
    exact = attention_exact(q, k, v, bias, pad, -math.inf, False, 0, 0.125)
    assert rel_l1(out, exact) < 5e-3


def test_blocks_cover_every_selected_pair():
    """A (query, key) pair whose clusters are selected lies in a kept block of the permuted layout;
    with a small top_p some blocks are skipped."""
    x, _ = clustered(1, 2, 400)
    q, k = x.bfloat16(), (x + 0.1 * torch.randn_like(x)).bfloat16()
    lay = svg2.predict_layout(q, k, params(top_p=0.3), 0.125)
    qc, kc = lay.pairs.shape[-2:]
    _, lq = svg2._cluster(q, qc, 10, None)
    _, lk = svg2._cluster(k, kc, 10, None)
    inv_q, inv_k = lay.perm_q.argsort(-1), lay.perm_k.argsort(-1)
    for h in range(2):
        sel = lay.pairs[0, h][lq[0, h][:, None], lk[0, h][None, :]]  # [nq, nk] pair selected
        rows, cols = sel.nonzero(as_tuple=True)
        assert lay.keep[0, h, inv_q[0, h, rows] // R.BQ, inv_k[0, h, cols] // R.BK].all()
    assert 0.2 < block_sparsity(lay.keep, 400, 400, False, 0) < 1.0


def test_selection_is_top_p_of_the_centroid_mass():
    cq = torch.tensor([[[[1.0, 0.0]]]])
    ck = torch.tensor([[[[2.0, 0.0], [0.0, 0.0], [-2.0, 0.0]]]])
    sizes = torch.tensor([[[1.0, 10.0, 0.0]]])  # the third key cluster is empty
    mass = torch.softmax(torch.tensor([2.0, 0.0]) + torch.tensor([1.0, 10.0]).log(), 0)  # [0.42, 0.58]
    assert 0.4 < mass[0] < 0.45
    pick = svg2.select_pairs(cq, ck, sizes, 1.0, torch.tensor([0.5], dtype=torch.float64), 0.0)
    assert pick[0, 0, 0].tolist() == [False, True, False]  # the larger cluster alone passes 0.5
    pick = svg2.select_pairs(cq, ck, sizes, 1.0, torch.tensor([0.6], dtype=torch.float64), 0.0)
    assert pick[0, 0, 0].tolist() == [True, True, False]  # never the empty one
    pick = svg2.select_pairs(cq, ck, sizes, 1.0, torch.tensor([0.1], dtype=torch.float64), 1.0)
    assert pick[0, 0, 0].tolist() == [True, True, False]  # min_key_share 1: every non-empty cluster


# ------------------------------------------------------------------ per-site state

def test_state_per_batch_element_warm_start_and_resets():
    """CFG halves (two batch elements of different data) keep their own centroids; a cold batch
    run equals each element run alone; the next call is warm; on_step(0), reset() and a changed
    shape start cold again."""
    a, _ = clustered(1, 2, 256, seed=1)
    b, _ = clustered(1, 2, 256, seed=2)
    q = torch.cat([a, b]).bfloat16()
    k = (torch.cat([a, b]) + 0.2 * torch.randn(2, 2, 256, 64)).bfloat16()
    v = torch.randn(2, 2, 256, 64).bfloat16()
    state = svg2.CentroidState()
    _, lay = run(q, k, v, params(), state=state, site="s")
    assert not lay.warm
    both = state.get("s", state._sites["s"].shape)
    assert not torch.allclose(both.q[0], both.q[1], atol=1e-2)  # different data, different centroids
    for i in range(2):
        alone = svg2.CentroidState()
        run(q[i:i + 1], k[i:i + 1], v[i:i + 1], params(), state=alone, site="s")
        assert torch.allclose(alone._sites["s"].q[0], both.q[i], atol=1e-4)
        assert torch.allclose(alone._sites["s"].k[0], both.k[i], atol=1e-4)
    _, lay = run(q, k, v, params(), state=state, site="s")
    assert lay.warm
    _, lay = run(q, k, v, params(), state=state, site="other")
    assert not lay.warm and sorted(state.sites()) == ["other", "s"]
    _, lay = run(q[:1], k[:1], v[:1], params(), state=state, site="s")  # batch size changed
    assert not lay.warm
    _, lay = run(q[:1, :, :200], k[:1], v[:1], params(), state=state, site="s")  # token count changed
    assert not lay.warm
    _, lay = run(q[:1, :, :200], k[:1], v[:1], params(), state=state, site="s")
    assert lay.warm
    saved = svg2.STATE
    try:
        svg2.STATE = state
        svg2.on_step(3)
        assert sorted(state.sites()) == ["other", "s"]
        svg2.on_step(0)
        assert state.sites() == []
    finally:
        svg2.STATE = saved
    _, lay = run(q, k, v, params(), state=state, site="s")
    assert not lay.warm


def test_warm_start_moves_centroids_from_the_last_call():
    """With warm_iters 0 the last call's centroids are used as they are."""
    x, _ = clustered(1, 2, 256)
    q = x.bfloat16()
    state = svg2.CentroidState()
    svg2.predict_layout(q, q, params(init=5, warm=0), 0.125, state, "s")
    first = state._sites["s"].q.clone()
    svg2.predict_layout((x + 1.0).bfloat16(), q, params(init=5, warm=0), 0.125, state, "s")
    assert torch.equal(state._sites["s"].q, first)
    svg2.predict_layout((x + 1.0).bfloat16(), q, params(init=5, warm=3), 0.125, state, "s")
    assert not torch.allclose(state._sites["s"].q, first, atol=1e-2)  # follows the new tokens


# ------------------------------------------------------------------ against svg and radial

def test_svg2_beats_svg_and_radial_where_semantics_are_not_local():
    """Video-like tokens (4 frames of 16 x 16) whose attention follows scattered objects: at the
    block sparsity of svg and of radial, svg2 errs less; at their error, it skips more blocks."""
    bench = _bench()
    q, k, v = bench.semantic_video(4, 16, heads=1)
    n, scale = q.shape[2], 64 ** -0.5
    exact = attention_exact(q, k, v, None, None, -math.inf, False, 0, scale)
    probe = bench.Svg2Probe(q, k, v, scale)
    curve = [probe.run(top_p, exact) for top_p in (0.9, 0.6)]  # (sparsity, error)
    for p in bench.baseline_configs(256)[::2]:  # svg (spatial_frames 1), radial
        keep = predict_block_mask(q, k, v, p, scale, False, 0, False)
        sp = block_sparsity(keep, n, n, False, 0)
        err = rel_l1(R.sparse_attention_reference(q, k, v, keep, None, None, -math.inf, False, 0, scale), exact)
        top_p, _ = bench.bisect_top_p(probe.sparsity, sp, steps=7)
        sp2, err2 = probe.run(top_p, exact)  # at equal sparsity
        assert sp2 >= sp - 0.02 and err2 < 0.5 * err, (p["method"], sp, err, sp2, err2)
        sp3 = max(s for s, e in curve if e <= err)  # at equal (or lower) error
        assert sp3 > sp + 0.05, (p["method"], sp, err, curve)


# ------------------------------------------------------------------ Triton LUT path, the op, the pass

def test_triton_lut_path_matches_the_reference():
    x, _ = clustered(1, 2, 200)
    q, k, v = x.bfloat16(), (x + 0.2 * torch.randn_like(x)).bfloat16(), torch.randn(1, 2, 200, 64).bfloat16()
    ref, lay = run(q, k, v, params(top_p=0.5))
    tri, lay2 = run(q, k, v, params(top_p=0.5), use_triton=True)
    assert torch.equal(lay.keep, lay2.keep) and not lay.keep.all()
    assert rel_l1(tri, ref) < 3e-3


def test_op_keys_its_state_by_the_site():
    q, k, v = (torch.randn(1, 2, 150, 64).bfloat16() for _ in range(3))
    svg2.reset()
    sp = json.dumps({**params(), "site": "block3.attn"})
    out = torch.ops.attnopt.sparse_attention(q, k, v, None, None, -math.inf, False, 0, 0.125, "int8", "fp16", True,
                                             "cpu", "reference", sp)
    assert svg2.STATE.sites() == ["block3.attn"]
    ref, _ = run(q, k, v, params())
    assert torch.equal(out, ref)
    svg2.reset("block3.attn")
    assert svg2.STATE.sites() == []
    with pytest.raises(ValueError, match="permuted token order"):
        predict_block_mask(q, k, v, params(), 0.125, False, 0, False)
    with pytest.raises(ValueError, match="no causal form"):
        svg2.svg2_attention(q, k, v, None, None, -math.inf, True, 0.125, "int8", "fp16", True, "cpu", params(), False)


class Attn(torch.nn.Module):
    def __init__(self, causal=False):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)


def test_rewrite_passes_the_site_key_and_keeps_causal_sites_dense():
    opts = {"attention": {"min_seq_len": 0, "sparsity": params(top_p=0.95)}}
    q, k, v = (torch.randn(1, 2, 300, 64).bfloat16() for _ in range(3))
    svg2.reset()
    (rec,) = attnopt.inspect(Attn(), q, k, v, options=opts).sites
    assert rec.status == "rewritten" and rec.details["sparse_method"] == "svg2"
    assert svg2.STATE.sites() == [rec.key] and rec.error["rel_l1"] < 0.1
    (rec,) = attnopt.inspect(Attn(causal=True), q, k, v, options=opts).sites
    assert rec.op == "attnopt::attention" and "svg2 permutes tokens" in rec.reason
    svg2.reset()


@pytest.mark.gpu
def test_svg2_on_cuda_matches_the_reference_path():
    """The CUDA path (k-means on the GPU, the compiled block-sparse kernel over the LUT) against
    the CPU reference on the same layout."""
    x, _ = clustered(2, 4, 3000, d=128)
    q = x.half().cuda()
    k = (x + 0.2 * torch.randn_like(x)).half().cuda()
    v = torch.randn(2, 4, 3000, 128).half().cuda()
    from attnopt.codegen.arch import detect_arch

    p = params(top_p=0.7, qc=32, kc=64)
    out, lay = svg2.svg2_attention(q, k, v, None, None, -math.inf, False, 128 ** -0.5, "int8", "fp16", True,
                                   detect_arch("cuda"), p, True)
    ref = R.sparse_attention_reference(*(svg2._rows(t.cpu(), perm.cpu()) for t, perm in
                                         ((q, lay.perm_q), (k, lay.perm_k), (v, lay.perm_k))),
                                       lay.keep.cpu(), None, None, -math.inf, False, 0, 128 ** -0.5)
    ref = torch.empty_like(ref).scatter_(2, lay.perm_q.cpu()[..., None].expand_as(ref), ref)
    assert not lay.keep.all() and rel_l1(out.cpu(), ref) < 3e-3


def test_compiled_graph_keeps_the_op_call_so_state_lives_between_calls(monkeypatch):
    """Inlining the body everywhere (as on CUDA): svg2's body refuses to be traced, the graph
    keeps the op call, and each run updates the site's centroids."""
    monkeypatch.setenv("ATTNOPT_INLINE", "always")
    opts = {"attention": {"min_seq_len": 0, "sparsity": params(top_p=0.95)}}
    q, k, v = (torch.randn(1, 2, 200, 64).bfloat16() for _ in range(3))
    svg2.reset()
    model = torch.compile(Attn(), backend="attnopt", options=opts)
    with torch.no_grad():
        out = model(q, k, v)
        assert svg2.STATE.sites() == ["#0"]
        first = svg2.STATE._sites["#0"].q.clone()
        model((q.float() + 0.5).bfloat16(), k, v)
    assert not torch.equal(svg2.STATE._sites["#0"].q, first)  # ran (warm) at the second call
    assert rel_l1(out, attention_exact(q, k, v, None, None, -math.inf, False, 0, 0.125)) < 0.1
    svg2.reset()


def test_calibration_tunes_top_p_per_head_and_keeps_causal_sites_dense():
    """A head whose tokens form scattered clusters gets a top_p under the default; a diffuse
    (random) head stays dense; the plan entry validates; a causal site stays dense."""
    from attnopt.calibration.site_search import SiteSearch, search_site

    x, _ = clustered(1, 1, 512, seed=3)
    q = torch.cat([x, torch.randn(1, 1, 512, 64)], 1).bfloat16()
    k = torch.cat([x + 0.2 * torch.randn_like(x), torch.randn(1, 1, 512, 64)], 1).bfloat16()
    v = torch.randn(1, 2, 512, 64).bfloat16()
    call = {"q": q, "k": k, "v": v, "attn_bias": None, "keep_mask": None, "masked_value": -math.inf,
            "is_causal": False, "causal_offset": 0, "scale": 0.125}
    sp = attnopt.normalize_options({"attention": {"sparsity": params(init=10)}}).attention.sparsity
    search = SiteSearch("site", [call], "int8", "fp16", True, "cpu")
    entry = search_site(search, sp, 0.1)
    top_p = entry["sparsity"]["top_p"]
    assert isinstance(top_p, list) and len(top_p) == 2 and top_p[0] < 0.9
    assert entry["sparsity"]["dense_heads"] == [1]  # the diffuse head gains too little under the budget
    assert max(entry["error"]["rel_l1"]) <= 0.1 and entry["stats"]["sparsity"][0] > 0.15
    # the search's error (original-order reference) is the op's (permuted kernel) within quantization noise
    out, _ = run(q, k, v, {**entry["sparsity"], "dense_heads": []})
    exact = attention_exact(q, k, v, None, None, -math.inf, False, 0, 0.125)
    assert abs(rel_l1(out[:, :1], exact[:, :1]) - entry["error"]["rel_l1"][0]) < 0.01
    attnopt.Plan.from_dict({"schema_version": 1, "sites": {"#0": {"kind": "attention",
                                                                  "sparsity": entry["sparsity"]}}})
    causal = search_site(SiteSearch("site", [{**call, "is_causal": True}], "int8", "fp16", True, "cpu"), sp, 0.1)
    assert causal.get("dense")


def test_attnopt_step_zero_resets_the_centroids():
    """`with attnopt.step(0, n):` (a new generation) forgets every site's centroids; later steps keep them."""
    svg2.STATE.put("site-a", (1,), torch.zeros(1), torch.zeros(1))
    with attnopt.step(3, 10):
        assert "site-a" in svg2.STATE.sites()
    with attnopt.step(0, 10):
        assert svg2.STATE.sites() == []
