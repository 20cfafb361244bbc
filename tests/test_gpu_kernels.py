"""Compiled Triton kernels on a GPU (skipped without CUDA), against float64 and the reference op.

The CPU tests run every kernel through Triton's interpreter, which cannot see what only compiled
code gets wrong: register layouts, tensor descriptors (TMA), autotuned tiles, hardware fp8
conversions. These run the same cases compiled for the GPU's own arch row, outputs poisoned
first. Run with the interpreter off: `TRITON_INTERPRET=0 python -m pytest -m gpu`.
"""

import math

import pytest
import torch

import attnopt
from attnopt.codegen.arch import ARCHS, detect_arch
from attnopt.codegen.attention.launch import attention_triton
from attnopt.codegen.attention.quantize import fp4_head_dim, padded_head_dim
from attnopt.codegen.linear.w4a16 import linear_w4a16_triton
from attnopt.codegen.linear.w4a8 import linear_w4a8_triton
from attnopt.codegen.linear.w8a8 import linear_8bit_triton
from attnopt.ops import linear_ref as L
from attnopt.ops.attention_ref import attention_exact
from attnopt.ops.sparse_ref import block_mask_to_lut, sparse_attention_reference

from helpers import rel_l1

pytestmark = pytest.mark.gpu

ARCH = detect_arch("cuda") if torch.cuda.is_available() else "sm80"
SPEC = ARCHS[ARCH]
# rel-L1 against float64 (standard-normal inputs), per (QK^T, P.V) format
BOUND_EXACT = {("int8", "fp16"): 0.02, ("int8", "fp8"): 0.05, ("fp8", "fp16"): 0.05, ("fp8", "fp8"): 0.07,
               ("int8", "fp8_acc16"): 0.05, ("fp8", "fp8_acc16"): 0.07, ("fp4", "fp4"): 0.2, ("none", "fp16"): 0.005}
# against the reference op on the same inputs and key tile: the tensor cores' fp8 accumulation and
# exp2 differ from the CPU's in the last bits, which a rounding boundary can magnify
BOUND_REF = {"fp16": 5e-3, "fp8": 2e-2, "fp8_acc16": 2e-2, "fp4": 5e-2}


def formats():
    out = [("int8", "fp16"), ("none", "fp16")]
    out += [(q, p) for q, p in (("int8", "fp8"), ("fp8", "fp8"), ("int8", "fp8_acc16"),
                                              ("fp8", "fp8_acc16"), ("fp4", "fp4")) if SPEC.supports(q, p) is None]
    return out


def qkv(b, hq, hkv, nq, nk, d, dtype=torch.bfloat16):
    return (torch.randn(b, hq, nq, d, device="cuda", dtype=dtype), torch.randn(b, hkv, nk, d, device="cuda", dtype=dtype),
            torch.randn(b, hkv, nk, d, device="cuda", dtype=dtype))


def block_d(d, quant):
    return fp4_head_dim(d) if quant == "fp4" else padded_head_dim(d)


def launch(q, k, v, quant, pv, bias=None, keep=None, causal=False, use_tma=None, lut=None, counts=None, tile=None):
    """The arch's default tile unless `tile` is given (one compile per variant, not an autotuning
    sweep each, whose timing runs would all write the same poisoned buffer)."""
    scale = 1 / math.sqrt(q.shape[-1])
    out = torch.full((*q.shape[:3], v.shape[-1]), float("nan"), dtype=q.dtype, device="cuda")
    tile = tile or SPEC.default_tile(block_d(q.shape[-1], quant), quant, pv)
    got = attention_triton(q, k, v, bias, keep, -math.inf, causal, 0, scale, quant, pv, True, False, ARCH,
                           tile=tile, out=out, use_tma=use_tma, lut=lut, counts=counts)
    torch.cuda.synchronize()
    assert got is out and not torch.isnan(got).any(), "kernel left elements unwritten"
    return got


def check(got, q, k, v, quant, pv, bias=None, keep=None, causal=False):
    exact = attention_exact(q.double(), k.double(), v.double(), bias, keep, -math.inf, causal, 0,
                            1 / math.sqrt(q.shape[-1]))
    ref = torch.ops.attnopt.attention(q, k, v, bias, keep, -math.inf, causal, 0, 1 / math.sqrt(q.shape[-1]),
                                      quant, pv, True, False, ARCH, "reference")
    assert rel_l1(got, exact) <= BOUND_EXACT[(quant, pv)]
    assert rel_l1(got, ref) <= BOUND_REF[pv]


@pytest.mark.parametrize("quant,pv", formats())
@pytest.mark.parametrize("n", [1, 77, 200, 333, 4096])
@pytest.mark.parametrize("causal", [False, True])
def test_dense_formats_lengths_causal(quant, pv, n, causal):
    q, k, v = qkv(2, 4, 4, n, n, 128)
    check(launch(q, k, v, quant, pv, causal=causal), q, k, v, quant, pv, causal=causal)


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_every_tile_the_autotuner_may_pick(d, causal):
    q, k, v = qkv(1, 4, 2, 1000, 1000, d)
    pv = SPEC.pv_auto
    for t in SPEC.attention_tiles(block_d(d, "int8")):
        check(launch(q, k, v, "int8", pv, causal=causal, tile=t), q, k, v, "int8", pv, causal=causal)


@pytest.mark.parametrize("d", [32, 64, 96, 128, 160, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_head_dims_and_dtypes(d, dtype):
    q, k, v = qkv(1, 4, 4, 333, 333, d, dtype)
    check(launch(q, k, v, "int8", "fp16"), q, k, v, "int8", "fp16")


@pytest.mark.parametrize("quant,pv", formats())
def test_gqa_cross_attention_and_masks(quant, pv):
    q, k, v = qkv(2, 8, 2, 200, 777, 64)
    keep = torch.rand(2, 1, 200, 777, device="cuda") > 0.3
    bias = torch.randn(1, 8, 1, 777, device="cuda", dtype=q.dtype)
    for kw in ({}, {"keep": keep}, {"bias": bias}):
        check(launch(q, k, v, quant, pv, **kw), q, k, v, quant, pv, **kw)


@pytest.mark.skipif(not SPEC.tma, reason="tensor descriptors (TMA) are sm90+")
@pytest.mark.parametrize("causal", [False, True])
def test_tma_and_pointer_paths_agree(causal):
    q, k, v = qkv(2, 4, 4, 1000, 1000, 128)
    with_tma = launch(q, k, v, "int8", SPEC.pv_auto, causal=causal, use_tma=True)
    without = launch(q, k, v, "int8", SPEC.pv_auto, causal=causal, use_tma=False)
    check(with_tma, q, k, v, "int8", SPEC.pv_auto, causal=causal)
    assert rel_l1(with_tma, without) <= 1e-3


def test_fully_masked_rows_are_zero():
    q, k, v = qkv(1, 2, 2, 128, 128, 64)
    keep = torch.ones(1, 1, 128, 128, dtype=torch.bool, device="cuda")
    keep[..., 5, :] = False
    got = launch(q, k, v, "int8", "fp16", keep=keep)
    assert (got[..., 5, :] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_kernel_matches_the_sparse_reference(causal):
    q, k, v = qkv(1, 4, 2, 1000, 1000, 128)
    nqb, nkb = -(-1000 // 128), -(-1000 // 64)
    keep = torch.rand(1, 4, nqb, nkb, device="cuda") > 0.5
    keep[..., 0] = True
    lut, counts = block_mask_to_lut(keep, 1000, 1000, causal, 0)
    got = launch(q, k, v, "int8", "fp16", causal=causal, lut=lut, counts=counts)
    ref = sparse_attention_reference(q, k, v, keep, None, None, -math.inf, causal, 0, 1 / math.sqrt(128),
                                     "int8", "fp16", True)
    assert rel_l1(got, ref) <= BOUND_REF["fp16"]


def test_public_function_picks_the_kernels():
    q, k, v = qkv(2, 8, 2, 1024, 1024, 128)
    got = attnopt.attention(q, k, v, is_causal=True, enable_gqa=True)
    exact = attention_exact(q.double(), k.double(), v.double(), is_causal=True)
    assert rel_l1(got, exact) <= BOUND_EXACT[("int8", SPEC.pv_auto)]


@pytest.mark.parametrize("fmt", [f for f in ("int8", "fp8") if ("w8a8" if f == "int8" else "fp8") in SPEC.linear_formats])
@pytest.mark.parametrize("m,k", [(1, 1000), (16, 4096), (40, 4096), (77, 1000), (4096, 4096), (300, 11008)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_8bit_gemm(fmt, m, k, dtype):
    """Autotuned (every tile timed, then the winner), then each tile forced; activation rows of
    one block (<= 8192) and of several; M = 40 quantizes x in the GEMM's prologue."""
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = torch.randn(3000, k, device="cuda") * 0.05
    b = torch.randn(3000, device="cuda", dtype=dtype)
    wq, ws = L.quantize_weight(w, fmt)
    ref = L.linear_w8a8_ref(x, wq, ws, b, fmt)
    for tile in (None, *(SPEC.gemm_tiles if m > 16 else ())):
        out = linear_8bit_triton(x, wq, ws, b, fmt, ARCH, tile=tile)
        assert out.dtype == dtype and not torch.isnan(out).any()
        assert rel_l1(out, ref) <= 2e-3, tile
    assert rel_l1(out, x.double() @ w.double().T + b.double()) <= (0.02 if fmt == "int8" else 0.05)  # per-token steps grow with K


@pytest.mark.parametrize("m", [1, 16, 77, 4096])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_w4a16_gemm(m, dtype):
    x = torch.randn(m, 1024, device="cuda", dtype=dtype)
    w = torch.randn(3000, 1024, device="cuda") * 0.05
    b = torch.randn(3000, device="cuda", dtype=dtype)
    pk, sc, zr = L.quantize_weight_int4(w)
    tiles = SPEC.w4_decode_tiles if m <= 16 else SPEC.w4_tiles
    for bias in (None, b):  # M <= 16: K split, the last split of a tile adds the partials up
        for tile in (None, *tiles):  # autotuned, then each tile of the table forced
            out = linear_w4a16_triton(x, pk, sc, zr, bias, arch=ARCH, tile=tile)
            assert out.dtype == dtype and not torch.isnan(out).any()
            assert rel_l1(out, L.linear_w4a16_ref(x, pk, sc, zr, bias)) <= 2e-3, tile
    assert rel_l1(out, x.double() @ w.double().T + b.double()) <= 0.12


@pytest.mark.parametrize("m,k", [(1, 1000), (16, 4096), (77, 1000), (4096, 4096)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_w4a8_gemm(m, k, dtype):
    """Autotuned, then each tile of the table forced, into a NaN-poisoned buffer: the same int32
    partial sums per group as the reference, so only the fp32 summation order may differ."""
    if "w4a8" not in SPEC.linear_formats:
        pytest.skip(f"{ARCH} does not offer w4a8")
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = torch.randn(3001, k, device="cuda") * 0.05
    b = torch.randn(3001, device="cuda", dtype=dtype)
    pk, sc = L.quantize_weight_w4a8(w)
    tiles = SPEC.w4a8_decode_tiles if m <= 16 else SPEC.w4a8_tiles
    for bias in (None, b):
        ref = L.linear_w4a8_ref(x, pk, sc, bias)
        for tile in (None, *tiles):
            out = torch.full((m, 3001), float("nan"), device="cuda", dtype=dtype)
            out = linear_w4a8_triton(x, pk, sc, bias, arch=ARCH, tile=tile, out=out)
            assert out.dtype == dtype and not torch.isnan(out).any()
            assert rel_l1(out, ref) <= 2e-3, tile
    assert rel_l1(out, x.double() @ w.double().T + b.double()) <= 0.12


@pytest.mark.skipif("nvfp4" not in SPEC.linear_formats, reason=f"NVFP4 linears need sm100+ (this GPU is {ARCH})")
@pytest.mark.parametrize("m,k", [(1, 1000), (77, 4096), (4096, 4096)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nvfp4_gemm(m, k, dtype):
    """The compiled quantizer and block-scaled FP4 GEMM against the reference op on the same GPU
    tensors (the GPU's fp32 division may put a value on the other side of a rounding boundary:
    a few codes differ, hence no bitwise check), output poisoned first; K 1000 is not a
    multiple of the GEMM's 128-deep step."""
    from attnopt.codegen.linear.nvfp4 import linear_nvfp4_triton, quantize_act_nvfp4_triton
    from attnopt.ops import linear_nvfp4_ref as F

    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = torch.randn(3000, k, device="cuda") * 0.05
    b = torch.randn(3000, device="cuda", dtype=dtype)
    q = F.quantize_weight_nvfp4(w)
    kp = q[0].shape[1] * 2
    xq, xg, xo = quantize_act_nvfp4_triton(x, kp)
    rq, rg, ro = F.quantize_nvfp4(x)
    assert torch.allclose(xo, ro, rtol=1e-6, atol=0)
    assert (xq == rq).float().mean() > 0.999 and (xg.float() == rg.float()).float().mean() > 0.999
    for bias in (None, b):
        out = torch.full((m, 3000), float("nan"), device="cuda", dtype=dtype)
        linear_nvfp4_triton(x, *q, bias, arch=ARCH, out=out)
        assert not torch.isnan(out).any()
        assert rel_l1(out, F.linear_nvfp4_ref(x, *q, bias)) <= 1e-2
    assert rel_l1(out, x.double() @ w.double().T + b.double()) <= 0.16


def test_split_k_reduction_is_deterministic_on_the_gpu():
    """Split-K programs finish in any order on a GPU; the last one adds the partials in split
    order, so repeated calls agree bit for bit and the ticket counters end at zero."""
    from attnopt.codegen.linear import splitk

    x = torch.randn(4, 8192, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(3000, 8192, device="cuda") * 0.05
    wq, ws = L.quantize_weight(w, "int8")
    pk, sc, zr = L.quantize_weight_int4(w)
    first8 = linear_8bit_triton(x, wq, ws, None, "int8", ARCH)
    first4 = linear_w4a16_triton(x, pk, sc, zr, None, arch=ARCH)
    for _ in range(20):
        assert torch.equal(linear_8bit_triton(x, wq, ws, None, "int8", ARCH), first8)
        assert torch.equal(linear_w4a16_triton(x, pk, sc, zr, None, arch=ARCH), first4)
    assert rel_l1(first8, L.linear_w8a8_ref(x, wq, ws, None, "int8")) <= 2e-3
    assert rel_l1(first4, L.linear_w4a16_ref(x, pk, sc, zr, None)) <= 2e-3
    torch.cuda.synchronize()
    assert not splitk.tile_counters(x, 1).any()


def test_chunked_kv_statistics_on_the_gpu(monkeypatch):
    """Long keys: the statistics launch runs several chunks per kv head, finishing in any order;
    the last merges the partials in chunk order, so repeated calls agree bit for bit, match one
    chunk per head and float64, flag non-finite rows at the chunk edges, and leave the counters
    at zero."""
    from attnopt.codegen.attention import stats
    from attnopt.codegen.attention.quantize import kv_stats
    from attnopt.codegen.linear import splitk
    from attnopt.ops.attention_ref import FP8_MAX

    n = 32768 + 77
    k = torch.randn(2, 4, n, 128, device="cuda", dtype=torch.bfloat16) + 0.5
    v = torch.randn(2, 4, n, 96, device="cuda", dtype=torch.bfloat16) * 3 + 1
    block_n = stats.stats_block_n(padded_head_dim(128), padded_head_dim(96))
    chunks, per = stats.stats_chunks(n, block_n)
    assert chunks > 1
    edges = [per - 1, per, 2 * per, n - 1]
    for i, row in enumerate(edges):
        (k if i % 2 else v)[1, 3, row, 7] = float("nan") if i % 3 else float("-inf")
    first = kv_stats(k, v, True, True, FP8_MAX)
    for _ in range(20):
        again = kv_stats(k, v, True, True, FP8_MAX)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    torch.cuda.synchronize()
    assert not splitk.tile_counters(k, 8).any()
    monkeypatch.setattr(stats, "STATS_CHUNK", 1 << 30)
    one = kv_stats(k, v, True, True, FP8_MAX)
    kf = torch.where(k.isfinite(), k.double(), 0.0)
    vf = torch.where(v.isfinite(), v.double(), 0.0)
    vmean = vf.mean(-2)
    amax = (vf - vmean[..., None, :]).abs().amax(-2)
    exact = (kf.mean(-2), vmean, amax / FP8_MAX)
    for got, single, want in zip(first[:3], one[:3], exact):
        torch.testing.assert_close(got, single, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    bad = torch.zeros(2, 4, n, dtype=torch.uint8, device="cuda")
    bad[1, 3, edges] = 1
    assert torch.equal(first[3], bad) and torch.equal(one[3], bad)


@pytest.mark.parametrize("causal,tile,topk", [(False, 64, 0.25), (True, 128, 3)])
def test_vsa_predictor_matches_the_reference(causal, tile, topk):
    """VSA's one-launch predictor compiled: the reference's blocks (random inputs have no near ties)."""
    from attnopt.codegen.sparse.predict import predict_vsa_triton
    from attnopt.ops.sparse_ref import predict_vsa

    q, k, _ = qkv(2, 8, 2, 4096, 4096, 128)
    got = predict_vsa_triton(q, k, 128 ** -0.5, tile, topk, causal)
    assert torch.equal(got.cpu(), predict_vsa(q.cpu(), k.cpu(), 128 ** -0.5, tile, topk, causal))


def test_vsa_training_op_gradients():
    """The trainable op on the GPU path (predictor, sparse kernel with lse, reference backward)
    against float64 autograd of attention with the same block mask."""
    from attnopt.ops.sparse_ref import expand_block_mask

    q, k, v = (x.requires_grad_() for x in qkv(1, 4, 2, 1000, 1000, 128))
    out, _, keep = torch.ops.attnopt.sparse_attention_train(
        q, k, v, True, 0, 128 ** -0.5, "int8", "fp16", True, ARCH, "triton",
        '{"diagonal": true, "method": "vsa", "min_seq_len": 0, "tile": 64, "topk": 0.25}')
    dout = torch.randn_like(out)
    out.backward(dout)
    q2, k2, v2 = (x.detach().double().requires_grad_() for x in (q, k, v))
    bias = torch.where(expand_block_mask(keep, 1000, 1000), 0.0, -math.inf)
    ref = attention_exact(q2, k2, v2, bias, None, -math.inf, True, 0, 128 ** -0.5)
    ref.backward(dout.double())
    assert rel_l1(out, ref) <= 0.02
    for got, want in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        assert rel_l1(got, want) <= 0.02
