"""VSA (Video Sparse Attention): the tile selection against its definition, the Triton predictor
against the reference, the forward against dense attention under the same block mask, the
trainable op's gradients against float64 autograd of that masked attention, and the DiT example."""

import importlib.util
import json
import math
import pathlib

import pytest
import torch

import attnopt
from attnopt.calibration.site_search import SiteSearch, search_site
from attnopt.codegen.sparse.predict import predict_vsa_triton
from attnopt.ops import sparse_ref as R
from attnopt.ops.attention_ref import attention_exact
from attnopt.ops.sparse_train import sparse_attention_backward_reference, sparse_attention_train

from helpers import rel_l1

ROOT = pathlib.Path(__file__).parents[1]


def qkv(b, hq, hkv, nq, nk, d=64, dtype=torch.float16):
    return (torch.randn(b, hq, nq, d).to(dtype), torch.randn(b, hkv, nk, d).to(dtype),
            torch.randn(b, hkv, nk, d).to(dtype))


def sp(**params):
    return json.dumps(attnopt.normalize_options({"attention": {"sparsity": {"method": "vsa", **params}}})
                      .attention.sparsity.to_dict(), sort_keys=True)


# ------------------------------------------------------------------ selection by definition

def brute_vsa(q, k, scale, tile, topk, causal, offset=0, diagonal=True):
    """Per (batch, head, q-block): mean-pooled rows against mean-pooled key tiles (float64); the
    tiles crossing the diagonal, plus the best `want` other visible tiles by pooled logit."""
    b, hq, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    nqb, nkb, nkt = R.n_blocks(nq, R.BQ), R.n_blocks(nk, R.BK), R.n_blocks(nk, tile)
    per = tile // R.BK
    keep = torch.zeros(b, hq, nqb, nkb, dtype=torch.bool)
    off = offset if causal else 0
    for bb in range(b):
        for h in range(hq):
            t_k = topk[h] if isinstance(topk, list) else topk
            for r in range(nqb):
                r0, r1 = r * R.BQ, min(r * R.BQ + R.BQ, nq) - 1
                qhat = q[bb, h, r0:r1 + 1].double().mean(0)
                blk_visible = [not causal or c * R.BK <= r1 + offset for c in range(nkb)]
                blk_diag = [(causal or (diagonal and nq == nk)) and c * R.BK <= r1 + off
                            and c * R.BK + R.BK - 1 >= r0 + off for c in range(nkb)]
                visible = [any(blk_visible[c] for c in range(t * per, min(t * per + per, nkb))) for t in range(nkt)]
                diag = [visible[t] and any(blk_diag[c] for c in range(t * per, min(t * per + per, nkb)))
                        for t in range(nkt)]
                cand = [t for t in range(nkt) if visible[t] and not diag[t]]
                logit = {t: float(qhat @ k[bb, h * hkv // hq, t * tile:(t + 1) * tile].double().mean(0)) * scale
                         for t in cand}
                want = t_k if isinstance(t_k, int) else math.ceil(t_k * len(cand))
                best = sorted(cand, key=lambda t: (-logit[t], t))[:max(want, 1)]
                for t in best + [t for t in range(nkt) if diag[t]]:
                    for c in range(t * per, min(t * per + per, nkb)):
                        keep[bb, h, r, c] = blk_visible[c]
    return keep


@pytest.mark.parametrize("nq,nk,causal,offset,tile,topk", [
    (300, 300, False, 0, 64, 0.3), (512, 512, True, 0, 128, 2), (200, 333, True, 133, 64, 1),
    (333, 200, False, 0, 192, [0.5, 1.0, 3, 1]), (256, 640, False, 0, 64, 0.25)])
def test_vsa_selection_matches_its_definition(nq, nk, causal, offset, tile, topk):
    q, k, _ = qkv(2, 4, 2, nq, nk)
    got = R.predict_vsa(q, k, 0.125, tile, topk, causal, offset)
    assert torch.equal(got, brute_vsa(q, k, 0.125, tile, topk, causal, offset))


def test_vsa_counts_tiles_for_integers_and_shares_for_numbers():
    q, k, _ = qkv(1, 1, 1, 512, 1024)
    one = R.predict_vsa(q, k, 0.125, 64, 1)  # cross-attention shape: no diagonal
    assert (one.sum(-1) == 1).all()
    assert R.predict_vsa(q, k, 0.125, 64, 1.0).all()
    assert (R.predict_vsa(q, k, 0.125, 128, 3).sum(-1) == 6).all()  # 3 tiles of two kv-blocks
    assert (R.predict_vsa(q, k, 0.125, 64, 0.25).sum(-1) == 4).all()
    square = R.predict_vsa(*qkv(1, 1, 1, 512, 512)[:2], 0.125, 64, 1)
    assert (square.sum(-1) == 3).all()  # the q-block's two diagonal kv-blocks, plus one tile
    off = R.predict_vsa(*qkv(1, 1, 1, 512, 512)[:2], 0.125, 64, 1, diagonal=False)
    assert (off.sum(-1) == 1).all()


@pytest.mark.parametrize("nq,offset", [(512, 0), (300, 0), (200, 133), (130, 500)])
def test_vsa_causal_keeps_the_diagonal_and_nothing_invisible(nq, offset):
    q, k, v = qkv(1, 2, 2, nq, nq + offset)
    keep = R.predict_vsa(q, k, 0.125, 64, 1, True, offset)
    assert not (keep & ~R.causal_blocks(nq, nq + offset, offset, keep.device)).any()
    assert (keep & R.diagonal_blocks(nq, nq + offset, offset, keep.device)).sum() == \
        R.diagonal_blocks(nq, nq + offset, offset, keep.device).sum() * 2
    out = R.sparse_attention_reference(q, k, v, keep, None, None, -math.inf, True, offset, 0.125, "int8", "fp16")
    assert torch.isfinite(out).all() and (out.abs().sum(-1) > 0).all()  # every row sees a kept key


@pytest.mark.parametrize("nq,nk,causal,offset,tile,topk", [
    (300, 300, True, 0, 64, 0.3), (333, 200, False, 0, 128, 2), (512, 512, False, 0, 192, [0.5, 3])])
def test_vsa_predictor_kernel_matches_reference(nq, nk, causal, offset, tile, topk):
    q, k, _ = qkv(2, 2, 1, nq, nk, dtype=torch.bfloat16)
    want = R.predict_vsa(q, k, 0.125, tile, topk, causal, offset)
    assert torch.equal(predict_vsa_triton(q, k, 0.125, tile, topk, causal, offset), want)


def test_vsa_config():
    opts = attnopt.normalize_options({"attention": {"sparsity": {"method": "vsa"}}}).attention.sparsity
    assert (opts.tile, opts.topk, opts.diagonal) == (64, 0.25, True)
    for bad, path in (({"tile": 96}, "tile"), ({"topk": 0}, "topk"), ({"topk": 1.5}, "topk"),
                      ({"topk": [0.5, -2]}, "topk[1]"), ({"topk": True}, "topk")):
        with pytest.raises(attnopt.ConfigError, match=f"attention.sparsity.{re_escape(path)}"):
            attnopt.normalize_options({"attention": {"sparsity": {"method": "vsa", **bad}}})


def re_escape(s):
    import re

    return re.escape(s)


def test_cube_order_makes_each_tile_one_cube():
    order = R.vsa_cube_order(4, 16, 16, (1, 8, 8))
    assert sorted(order.tolist()) == list(range(1024))
    t, h, w = order // 256, order % 256 // 16, order % 16
    for c in range(16):  # every run of 64 tokens is one 1 x 8 x 8 cube
        sl = slice(64 * c, 64 * c + 64)
        assert len(set(t[sl].tolist())) == 1 and len(set((h[sl] // 8).tolist())) == 1
        assert len(set((w[sl] // 8).tolist())) == 1


# ------------------------------------------------------------------ forward and backward

def masked_exact(q, k, v, keep, causal, offset, scale):
    """float64 attention with the kept blocks' elements only (autograd-able)."""
    bias = torch.where(R.expand_block_mask(keep, q.shape[2], k.shape[2]), 0.0, -math.inf)
    return attention_exact(q, k, v, bias, None, -math.inf, causal, offset, scale)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_vsa_op_matches_dense_masked_attention(impl):
    q, k, v = qkv(1, 4, 2, 300, 300)
    out = torch.ops.attnopt.sparse_attention(q, k, v, None, None, -math.inf, True, 0, 0.125, "int8", "fp16", True,
                                             "cpu", impl, sp(topk=0.3))
    keep = R.predict_vsa(q, k, 0.125, 64, 0.3, True, 0)
    assert 0.2 < 1 - keep.float().mean() < 0.6
    assert rel_l1(out, masked_exact(q, k, v, keep, True, 0, 0.125)) <= 0.02
    assert rel_l1(out, attention_exact(q, k, v, None, None, -math.inf, True, 0, 0.125)) > 0.05  # it is sparse


@pytest.mark.parametrize("causal,hq,hkv,n,dtype,quant", [
    (False, 4, 2, 300, torch.float16, "int8"), (True, 2, 2, 256, torch.bfloat16, "none"),
    (True, 4, 1, 333, torch.bfloat16, "int8"), (False, 2, 2, 77, torch.float16, "int8")])
def test_vsa_gradients_match_dense_masked_float64(causal, hq, hkv, n, dtype, quant):
    q, k, v = (x.requires_grad_() for x in qkv(2, hq, hkv, n, n, dtype=dtype))
    out = sparse_attention_train(q, k, v, {"method": "vsa", "topk": 0.3}, is_causal=causal, quant=quant)
    dout = torch.randn_like(out)
    out.backward(dout)
    keep = R.predict_vsa(q.detach(), k.detach(), 0.125, 64, 0.3, causal, 0)
    q2, k2, v2 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = masked_exact(q2, k2, v2, keep, causal, 0, 0.125)
    ref.backward(dout.double())
    assert rel_l1(out, ref) <= 0.02
    for got, want in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        assert torch.isfinite(got).all() and rel_l1(got, want) <= 0.02
    if n > 128:
        sel = R.expand_block_mask(keep, n, n).any(2)  # [B, Hq, Nk]: keys some query row kept
        unseen = ~sel.reshape(2, hkv, hq // hkv, n).any(2)
        assert (k.grad[unseen] == 0).all() and (v.grad[unseen] == 0).all()


def test_backward_reference_on_a_block_mask():
    """The backward's own signature, on a random mask with a q-block that keeps nothing (lse -inf)."""
    q, k, v = qkv(1, 4, 2, 260, 200, dtype=torch.bfloat16)
    keep = torch.rand(1, 4, 3, 4) > 0.5
    keep[0, 1, 2] = False
    keep[0, 0, :, 0] = True
    bias = torch.where(R.expand_block_mask(keep, 260, 200), 0.0, -math.inf)
    out, lse = attnopt.ops.attention_ref.attention_reference(q, k, v, bias, None, -math.inf, True, 60, 0.125, "none",
                                                             "fp16", False, return_lse=True)
    dout = torch.randn_like(out)
    dq, dk, dv = sparse_attention_backward_reference(q, k, v, out, lse, dout, keep, 0.125, True, 60)
    q2, k2, v2 = (x.double().requires_grad_() for x in (q, k, v))
    ref = masked_exact(q2, k2, v2, keep, True, 60, 0.125)
    ref.nan_to_num(0.0).backward(dout.double())
    assert (dq[0, 1, 256:] == 0).all()
    for got, want in ((dq, q2.grad), (dk, k2.grad), (dv, v2.grad)):
        assert got.dtype == torch.bfloat16 and rel_l1(got, want.nan_to_num(0.0)) <= 0.02


def test_train_op_kernel_path_matches_reference_path():
    q, k, v = qkv(1, 4, 2, 300, 300)
    args = (False, 0, 0.125, "int8", "fp16", True, "cpu")
    out_t, lse_t, keep_t = torch.ops.attnopt.sparse_attention_train(q, k, v, *args, "triton", sp(topk=2))
    out_r, lse_r, keep_r = torch.ops.attnopt.sparse_attention_train(q, k, v, *args, "reference", sp(topk=2))
    assert torch.equal(keep_t, keep_r) and rel_l1(out_t, out_r) <= 2e-3
    assert (lse_t - lse_r).abs().max() < 1e-3


@pytest.mark.parametrize("utils", [
    ("test_schema", "test_autograd_registration", "test_faketensor"),
    pytest.param(("test_aot_dispatch_dynamic",), marks=pytest.mark.slow)])  # AOT traces: 5-10 s
def test_train_op_registrations(utils):
    """Schema, fake impl, autograd registration (and AOT dispatch) as torch.library checks them."""
    q, k, v = (x.requires_grad_() for x in qkv(1, 2, 1, 130, 130))
    torch.library.opcheck(torch.ops.attnopt.sparse_attention_train.default,
                          (q, k, v, False, 0, 0.125, "none", "fp16", False, "cpu", "reference", sp(topk=1)),
                          test_utils=utils)


# ------------------------------------------------------------------ compiler, calibration, example

class Attn(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def local_qkv(b, h, n, d=64, noise=0.3, amp=4.0):
    """Attention that concentrates near the diagonal: q_i . k_j ~ sum_f cos(w_f (i - j))."""
    pos = torch.arange(n).float()
    freqs = 1.0 / (200 ** (torch.arange(d // 2).float() / (d // 2)))
    base = torch.cat([(pos[:, None] * freqs).cos(), (pos[:, None] * freqs).sin()], -1) * amp
    return tuple((base + noise * torch.randn(b, h, n, d)).bfloat16() for _ in range(2)) + (
        torch.randn(b, h, n, d).bfloat16(),)


def test_vsa_site_is_rewritten_and_reported():
    opts = {"attention": {"min_seq_len": 0, "sparsity": {"method": "vsa", "topk": 0.25}}}
    (site,) = attnopt.inspect(Attn(), *local_qkv(1, 2, 512), options=opts).sites
    assert site.op == "attnopt::sparse_attention" and site.error["rel_l1"] < 0.05, site
    assert site.details["sparse_method"] == "vsa" and site.details["sparsity"] >= 0.4


def test_calibration_tunes_vsa_topk_per_head():
    q, k, v = qkv(1, 2, 2, 512, 512, dtype=torch.bfloat16)
    call = {"q": q, "k": k, "v": v, "attn_bias": None, "keep_mask": None, "masked_value": -math.inf,
            "is_causal": True, "causal_offset": 0, "scale": 0.125}
    sp_opts = attnopt.normalize_options({"attention": {"sparsity": {"method": "vsa"}}}).attention.sparsity
    entry = search_site(SiteSearch("site", [call], "int8", "fp16", True, "cpu"), sp_opts, 0.5)
    topk = entry["sparsity"]["topk"]
    assert isinstance(topk, list) and len(topk) == 2 and all(0.05 <= t < 1.0 for t in topk)
    assert max(entry["error"]["rel_l1"]) <= 0.5


def _example():
    spec = importlib.util.spec_from_file_location("train_dit_vsa", ROOT / "examples" / "train_dit_vsa.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dit_example_trains_with_vsa():
    ex = _example()
    small = dict(layers=1, dim=64, heads=2)
    vsa = ex.train(5, {"method": "vsa", "tile": 64, "topk": 0.25}, **small)
    dense = ex.train(5, None, **small)
    assert all(math.isfinite(x) for x in vsa) and vsa[-1] < vsa[0]
    assert max(abs(a - b) / b for a, b in zip(vsa, dense)) < 0.1  # tracks dense training from the same start


def test_dit_example_trains_with_vsa_under_the_attnopt_backend():
    """The dense DiT compiled with backend="attnopt" and vsa in the options: its SDPA sites become
    attnopt::sparse_attention_train, and it trains like the eager VSA model from the same start."""
    import attnopt

    ex = _example()
    small = dict(layers=1, dim=64, heads=2)
    sp = {"method": "vsa", "tile": 64, "topk": 0.25}
    be = attnopt.backend(ex.compile_options(sp))
    compiled = ex.train(4, sp, compiled=True, backend=be, **small)
    eager = ex.train(4, sp, **small)
    att = [s for s in be.recorder.sites() if s.kind == "attention"]
    assert att and all(s.op == "attnopt::sparse_attention_train" for s in att), [(s.key, s.reason) for s in att]
    assert all(math.isfinite(x) for x in compiled)
    assert max(abs(a - b) / b for a, b in zip(compiled, eager)) < 0.05, (compiled, eager)


@pytest.mark.slow  # two AOT compiles: 15-25 s on 2 shared cores
def test_train_op_in_a_compiled_training_graph():
    """fullgraph torch.compile (AOTAutograd) consults the op's autograd formula: the same gradients
    as eager, and a second length reuses the graph under dynamic shapes."""
    from attnopt.ops.sparse_train import sparsity_arg

    arg = sparsity_arg({"method": "vsa", "topk": 0.3})

    def loss(q, k, v):
        return sparse_attention_train(q, k, v, arg, quant="int8").float().square().sum()

    q, k, v = (x.requires_grad_() for x in qkv(1, 2, 2, 300, 300, dtype=torch.bfloat16))
    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True, dynamic=True)
    compiled(q, k, v).backward()
    got = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    loss(q, k, v).backward()
    assert all(torch.equal(a, x.grad) for a, x in zip(got, (q, k, v)))
    q2, k2, v2 = (x.requires_grad_() for x in qkv(1, 2, 2, 200, 200, dtype=torch.bfloat16))
    compiled(q2, k2, v2).backward()
    assert torch.isfinite(q2.grad).all() and k2.grad.abs().sum() > 0


@pytest.mark.slow  # a whole calibration: about 30 s on 2 cores
def test_calibrate_with_vsa_and_run_the_plan():
    opts = {"attention": {"min_seq_len": 0, "sparsity": {"method": "vsa"}}}
    batches = [local_qkv(1, 2, 512) for _ in range(2)]
    plan = attnopt.calibrate(Attn(), batches, options=opts, cache_dir=False)
    (entry,) = plan.sites.values()
    assert entry["sparsity"]["method"] == "vsa" and len(entry["sparsity"]["topk"]) == 2
    (site,) = attnopt.inspect(Attn(), *batches[0], options={**opts, "plan": plan.to_dict()}).sites
    assert site.op == "attnopt::sparse_attention" and site.details["sparsity"] > 0.3
    assert site.error["rel_l1"] <= 0.05


def test_sparse_backward_kernels_under_the_interpreter_equal_the_reference(monkeypatch):
    """impl 'triton': attnopt::sparse_attention_backward runs the attention backward kernels over
    the kept blocks (the dense backward's LUT path); they equal the reference body's gradients."""
    from attnopt.ops import sparse_train as T

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 200, 64, dtype=torch.bfloat16) for _ in range(3))
    k = torch.cat([k, k], 1)[:, :2]
    out, lse, keep = T.sparse_attention_train_impl(q, k, v, True, 0, 0.125, "int8", "fp16", True, "sm90", "reference",
                                                   T.parse(T.sparsity_arg({"method": "vsa", "topk": 0.5})))
    assert not keep.all()  # some blocks skipped
    dout = torch.randn_like(out)
    want = T.sparse_attention_backward_reference(q, k, v, out, lse, dout, keep, 0.125, True, 0)
    monkeypatch.setenv("ATTNOPT_IMPL", "triton")
    got = torch.ops.attnopt.sparse_attention_backward(q, k, v, out, lse, dout, keep, 0.125, True, 0)
    for g, w in zip(got, want):  # the kernels round P and dS to 16 bits for the tensor cores, the reference not
        assert rel_l1(g.float(), w.float()) < 1e-2
