"""The sparse op's per-call work (issue 15), counted with codegen/work_count on its GPU body under
Triton's interpreter: a predictor is ONE launch that writes the LUT, static masks cost nothing
after the first call, and nothing rebuilt from the parameters is ever reused for other ones."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from attnopt.codegen.work_count import count_work
from attnopt.ops import sparse_cache
from attnopt.ops import sparse_params
from attnopt.ops import sparse_ref as R
from attnopt.ops.attention import _attention_body
from attnopt.ops.sparse import _sparse_attention_body, predict_block_mask, predict_lut
from attnopt.ops.sparse_params import parse

N, D = 200, 64  # 2 q-blocks x 4 kv-blocks, a tail block each way
PARAMS = {
    "sparge": {"method": "sparge", "tau": [0.9, 0.5], "theta": 0.2, "topk": None, "sink": True,
               "dense_heads": [1]},
    "xattention": {"method": "xattention", "stride": 8, "tau": 0.9, "dense_heads": []},
    "svg": {"method": "svg", "frame_tokens": 64, "prefix_tokens": 20, "spatial_frames": 1, "temporal_tokens": 32,
            "sample_rows": 16, "dense_heads": [1]},
    "window": {"method": "window", "window": [64, 96], "sinks": 16, "dense_heads": []},
    "radial": {"method": "radial", "frame_tokens": 64, "prefix_tokens": 0, "dense_frames": 1, "min_band": 16},
    "block": {"method": "block", "mask": [[True, False], [True, True]],
              "block_size": 128},
    "vsa": {"method": "vsa", "tile": 64, "topk": [1, 0.5], "diagonal": True, "dense_heads": [1]},
}
PREDICTORS = {"sparge": "_sparge_lut_kernel", "xattention": "_xattn_lut_kernel", "svg": "_svg_lut_kernel",
              "vsa": "_vsa_lut_kernel"}


def _qkv(h=2, n=N, dtype=torch.float16):
    return tuple(torch.randn(1, h, n, D).to(dtype) for _ in range(3))  # MHA: K / V as large as Q


def _steady(fn, *args, full_size):
    fn(*args)  # the first call of a shape builds what is cached
    return count_work(fn, *args, full_size=full_size)[1]


def _head(q, k, v):
    return (q, k, v, None, None, -math.inf, True, 0, D ** -0.5, "int8", "fp16", True)


@pytest.fixture(scope="module")
def dense_work():
    """The dense body's steady-state work at the test shape, counted once for every method (what
    it launches and runs depends on shapes and formats, not on values)."""
    q, k, v = _qkv()
    return _steady(_attention_body, *_head(q, k, v), False, "sm90", "triton", full_size=q.numel())


@pytest.mark.parametrize("method", list(PARAMS))
def test_sparse_call_budget(method, dense_work):
    """Second call of a shape: the dense attention's work, plus one launch for a predictor (it
    writes the LUT itself) and nothing for a static mask: no aten pass of ours, full-size or not."""
    q, k, v = _qkv()
    head, dense = _head(q, k, v), dense_work
    sparse = _steady(_sparse_attention_body, *head, "sm90", "triton", json.dumps(PARAMS[method]), full_size=q.numel())
    ours = list(sparse.launches)
    for name in dense.launches:
        ours.remove(name)
    assert ours == ([PREDICTORS[method]] if method in PREDICTORS else []), sparse.launches
    assert len(sparse.launches) <= (4 if method in PREDICTORS else 3), sparse.launches  # issue 15's budget
    assert sorted(sparse.full_size_passes) == sorted(dense.full_size_passes), sparse.full_size_passes
    assert sorted(sparse.aten_ops) == sorted(dense.aten_ops), sparse.aten_ops


def _lut_of_mask(keep, nq, nk, causal, offset):
    return R.block_mask_to_lut(keep, nq, nk, causal, offset)


@pytest.mark.parametrize("causal,offset", [(True, 0), (False, 0), (True, 77)])
def test_changed_plan_never_reuses_a_cached_mask(causal, offset):
    """Two plans for the same shapes (and the same plan at another causal offset) get their own
    LUTs, each the one built from scratch; going back to the first plan hits its own entry."""
    nq, nk = 400, 400 + offset
    q, k, v = torch.randn(1, 2, nq, D).half(), torch.randn(1, 2, nk, D).half(), torch.randn(1, 2, nk, D).half()
    plans = [{"method": "window", "window": 32, "sinks": 0}, {"method": "window", "window": 96, "sinks": 0},
             {"method": "window", "window": 32, "sinks": 0, "dense_heads": [1]}]
    seen = []
    for p in plans + plans[:1]:
        lut, counts = predict_lut(q, k, v, parse(json.dumps(p)), 0.125, causal, offset)
        keep = R.window_mask(2, nq, nk, p, causal, offset, "cpu")
        for h in p.get("dense_heads", []):
            keep[h] = True
        want = _lut_of_mask(keep[None], nq, nk, causal, offset)
        assert torch.equal(counts[0], want[1][0])
        assert torch.equal(R.lut_to_block_mask(lut, counts)[0], R.lut_to_block_mask(*want)[0])
        seen.append(counts.clone())
    assert not any(torch.equal(seen[i], seen[j]) for i, j in ((0, 1), (1, 2), (0, 2)))
    assert torch.equal(seen[3], seen[0])
    # a caller writing the mask it got never changes what later calls read
    m = predict_block_mask(q, k, v, parse(json.dumps(plans[0])), 0.125, causal, offset, True)
    m.fill_(False)
    assert torch.equal(predict_lut(q, k, v, parse(json.dumps(plans[0])), 0.125, causal, offset)[1], seen[0])


def test_cache_is_bounded_and_keyed_by_shape(monkeypatch):
    q, k, v = _qkv(1, 64)
    sparse_cache.clear()
    p = parse(json.dumps({"method": "window", "window": 32, "sinks": 0}))
    for n in range(1, sparse_cache.MAX_ENTRIES + 10):
        qq, kk = q[:, :, :n], k[:, :, :n]
        lut, counts = predict_lut(qq, kk, v[:, :, :n], p, 0.125, True, 0)
        assert lut.shape[-1] == R.n_blocks(n, R.BK)
        assert sparse_cache.entries() <= sparse_cache.MAX_ENTRIES
    monkeypatch.setattr(sparse_cache, "MAX_BYTES", 3 * sparse_cache.held_bytes() // sparse_cache.entries())
    predict_lut(q, k, v, parse(json.dumps({"method": "window", "window": 16, "sinks": 0})), 0.125, True, 0)
    assert sparse_cache.entries() <= 3 and sparse_cache.held_bytes() <= sparse_cache.MAX_BYTES  # bounded in bytes


def test_sparsity_json_is_parsed_once(monkeypatch):
    calls = []
    real = json.loads
    monkeypatch.setattr(sparse_params.json, "loads", lambda s: calls.append(s) or real(s))
    sparse_params.parse.cache_clear()
    q, k, v = _qkv(2, 130)
    s = json.dumps({"method": "window", "window": 64, "sinks": 16})
    for _ in range(3):
        _sparse_attention_body(q, k, v, None, None, -math.inf, True, 0, 0.125, "int8", "fp16", True, "cpu",
                               "reference", s)
    assert calls == [s]
    p = parse(s)
    with pytest.raises(TypeError):
        p["window"] = 1  # read-only: the cached parse is shared by every call
    assert p == parse(json.dumps(json.loads(s))) and hash(p) == hash(sparse_params.freeze(json.loads(s)))


def _with_dense(keep, dense):
    keep = keep.clone()
    keep[:, list(dense)] = True
    return keep


@pytest.mark.parametrize("causal,offset,nq,b", [(True, 0, 300, 1), (False, 0, 333, 1), (True, 100, 200, 2)])
def test_predictor_luts_equal_the_reference_selection(causal, offset, nq, b):
    """The kernels' LUT rows and counts are block_mask_to_lut's for the reference's selection:
    sparge against the reference predictor (pooled statistics in fp32 on both sides); XAttention
    on the block scores the kernel computed (its At dots run in fp16 on tensor cores, so a score
    may differ from the fp32 reference in the last bits: the scores themselves are checked
    against their float64 definition in test_sparse.py)."""
    nk = nq + offset
    q = torch.randn(b, 4, nq, D).half()  # one case with a second batch: the kernels' batch strides
    k, v = torch.randn(b, 2, nk, D).half(), torch.randn(b, 2, nk, D).half()  # GQA
    p = parse(json.dumps(PARAMS["sparge"] | {"tau": [0.9, 0.5, 0.8, 0.7], "dense_heads": [2]}))
    got = predict_lut(q, k, v, p, 0.125, causal, offset)
    keep = _with_dense(R.predict_sparge(q, k, 0.125, list(p["tau"]), p["theta"], None, True, causal, offset), [2])
    want = R.block_mask_to_lut(keep, nq, nk, causal, offset)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])

    from attnopt.codegen.sparse.predict import xattention_lut_triton

    tau = R.per_head([0.5, 0.9, 0.7, 0.95], 4, "cpu", torch.float64)
    dense = torch.tensor([0, 0, 0, 1], dtype=torch.int8)
    scores = []
    got = xattention_lut_triton(q, k, 0.125, 8, tau, dense, causal, offset, scores_out=scores)
    valid, diag = R.sparge_grid(nq, nk, causal, offset, "cpu")
    keep = _with_dense(R.select_xattention(scores[0], tau, valid, diag), [3])
    want = R.block_mask_to_lut(keep, nq, nk, causal, offset)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    ref = R.predict_xattention(q, k, 0.125, 8, tau, causal, offset)
    agree = (R.lut_to_block_mask(*got)[:, :3] == ref[:, :3]).float().mean()
    assert agree > 0.97  # against the fp32 reference: at most a borderline block or two differs


def test_svg_kernel_chooses_as_the_reference():
    """Head 0 attends its own frame (spatial), head 1 the same in-frame position (temporal): the
    one-launch kernel picks each head's pattern as the reference does and lists its blocks."""
    s, f, pre = 128, 4, 64
    n = pre + s * f
    t = (torch.arange(n) - pre).clamp_min(0)
    frame, inframe = t // s, t % s
    q, k = torch.randn(2, 2, n, 32) * 0.3, torch.randn(2, 2, n, 32) * 0.3
    q[:, 0, :, :4] = F.one_hot(frame, 4).float() * 6
    k[:, 0, :, :4] = F.one_hot(frame, 4).float() * 6
    w = 2 * math.pi * torch.arange(1, 13).float() / s
    enc = torch.cat([(inframe[:, None] * w).cos(), (inframe[:, None] * w).sin()], -1) * 2.5
    q[:, 1, :, 4:28], k[:, 1, :, 4:28] = enc, enc
    q, k, v = q.half(), k.half(), torch.randn(2, 2, n, 32).half()
    params = {"method": "svg", "frame_tokens": s, "spatial_frames": 0, "temporal_tokens": 64, "sample_rows": 24,
              "prefix_tokens": pre}
    for causal in (False, True):
        keep, choice = R.predict_svg(q, k, v, 32 ** -0.5, params, causal, 0)
        assert choice.tolist() == [0, 1]
        lut, counts = predict_lut(q, k, v, parse(json.dumps(params)), 32 ** -0.5, causal, 0)
        want = R.block_mask_to_lut(keep, n, n, causal, 0)
        assert torch.equal(counts, want[1]) and torch.equal(lut, want[0])


def test_traced_static_masks_are_per_site_constants():
    """Inlined with static shapes, each site's mask is a constant of the graph, built at trace
    time from its own parameters (two windows, two constants): nothing is rebuilt per call."""
    from torch._dynamo.backends.common import aot_autograd

    from attnopt.ops.aot_inline import inline_mode

    graphs = []
    windows = ({"method": "window", "window": 64, "sinks": 0}, {"method": "window", "window": 200, "sinks": 16})
    args = [json.dumps(w) for w in windows]

    def f(q, k, v):
        head = (None, None, -math.inf, True, 0, 0.125, "int8", "fp16", True, "cpu", "reference")
        return [torch.ops.attnopt.sparse_attention(q * (i + 1), k, v, *head, a) for i, a in enumerate(args)]

    q, k, v = (torch.randn(1, 2, 400, 32) for _ in range(3))
    torch._dynamo.reset()
    with inline_mode("always"), torch.no_grad():
        out = torch.compile(f, backend=aot_autograd(fw_compiler=lambda gm, ex: graphs.append(gm) or gm))(q, k, v)
    (gm,) = graphs
    consts = [getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"]
    masks = [c for c in consts if c.dtype == torch.bool]
    for w in windows:
        assert any(torch.equal(m, R.window_mask(2, 400, 400, w, True, 0, "cpu")) for m in masks), w
    assert "sparse_attention" not in str(gm.code)  # the bodies were inlined
    for got, want in zip(out, f(q, k, v)):
        assert torch.equal(got, want)
