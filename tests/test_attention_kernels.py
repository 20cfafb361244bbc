"""Triton attention kernels (through the interpreter on CPU) against float64 and the reference op.

Outputs are poisoned with NaN before the kernel writes them, so a skipped element shows.
"""

import math

import pytest
import torch

import attnopt
from attnopt.codegen.arch import ARCHS, Tile
from attnopt.codegen.attention.launch import attention_triton
from attnopt.codegen.attention.quantize import quantize_rows_triton, quantize_v_fp8
from attnopt.ops.attention_ref import (FP8_MAX, K_GRAN, Q_GRAN, attention_exact, attention_reference,
                                       quantize_rows)

from helpers import rel_l1

BOUND_EXACT = {("int8", "fp16"): 0.02, ("int8", "fp8"): 0.05, ("fp8", "fp16"): 0.05, ("fp8", "fp8"): 0.07,
               ("none", "fp16"): 0.005}
# kernel vs reference op run with the kernel's key tile (the same online softmax): they differ in
# fp32 summation order only (~1e-6; the interpreter's e4m3 casts round ties to even, as the GPU)
BOUND_REF = {"fp16": 1e-4, "fp8": 1e-4}


def qkv(b, hq, hkv, nq, nk, d, dv=None, dtype=torch.float16):
    dv = dv or d
    return (torch.randn(b, hq, nq, d).to(dtype), torch.randn(b, hkv, nk, d).to(dtype),
            torch.randn(b, hkv, nk, dv).to(dtype))


def run(q, k, v, bias=None, keep=None, fill=-math.inf, causal=False, offset=0, quant="int8", pv="fp16",
        smooth_k=True, smooth_q=False, tile=None):
    scale = 1 / math.sqrt(q.shape[-1])
    out = torch.full((q.shape[0], q.shape[1], q.shape[2], v.shape[3]), float("nan"), dtype=q.dtype)
    got = attention_triton(q, k, v, bias, keep, fill, causal, offset, scale, quant, pv, smooth_k, smooth_q, "cpu",
                           tile=tile, out=out)
    assert got is out and not torch.isnan(got).any(), "kernel left elements unwritten"
    block_n = (tile or ARCHS["cpu"].default_tile(q.shape[-1], quant, pv)).block_n
    ref = attention_reference(q, k, v, bias, keep, fill, causal, offset, scale, quant, pv, smooth_k, smooth_q,
                              block_n=block_n)
    exact = attention_exact(q, k, v, bias, keep, fill, causal, offset, scale)
    return got, ref, exact


def check(got, ref, exact, quant="int8", pv="fp16"):
    assert rel_l1(got, ref) <= BOUND_REF[pv]
    assert rel_l1(got, exact) <= BOUND_EXACT[(quant, pv)]


@pytest.mark.parametrize("fmt,gran", [("int8", Q_GRAN), ("int8", K_GRAN), ("fp8", Q_GRAN)])
@pytest.mark.parametrize("n,d", [(1, 32), (77, 64), (200, 96), (333, 128)])
def test_quantize_kernel_is_bitwise_the_reference(fmt, gran, n, d):
    x = torch.randn(2, 3, n, d).half() * 3
    mean = x.float().mean(dim=-2)
    xq, xs, _ = quantize_rows_triton(x, gran, fmt, mult=0.37, mean=mean)
    rq, rs = quantize_rows((x.float() - mean[:, :, None]) * 0.37, gran, fmt)
    torch.testing.assert_close(xs, rs, rtol=0, atol=0)
    assert torch.equal(xq[..., :d].float(), rq.float())
    assert (xq[..., d:].float() == 0).all()  # head-dim padding is zeros
    assert x.float().mean(dim=-2).equal(mean), "the caller's tensor is not modified"


def test_quantize_v_fp8_kernel():
    v = torch.randn(2, 2, 77, 96).half() + torch.randn(96).half()
    vq, vs, vm = quantize_v_fp8(v)
    vf = v.float()
    mean = vf.mean(-2, keepdim=True)
    scale = (vf - mean).abs().amax(-2, keepdim=True) / FP8_MAX
    ref = ((vf - mean) / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    assert torch.equal(vq[:, :, :96, :77].transpose(-1, -2).float(), ref)
    assert (vq[:, :, :, 77:].float() == 0).all() and (vq[:, :, 96:].float() == 0).all()


@pytest.mark.parametrize("n", [1, 77, 200, 333])
@pytest.mark.parametrize("causal", [False, True])
def test_odd_lengths(n, causal):
    check(*run(*qkv(1, 2, 2, n, n, 64), causal=causal))


@pytest.mark.parametrize("d", [32, 64, 96, 128, 256])
def test_head_dims(d):
    check(*run(*qkv(1, 2, 2, 77, 77, d, dtype=torch.bfloat16)))


@pytest.mark.parametrize("nq,nk,causal", [(77, 200, True), (200, 77, False), (1, 333, True), (200, 77, True)])
def test_cross_lengths_and_bottom_right_causal(nq, nk, causal):
    off = nk - nq  # KV-cache style: the last query sees every key
    check(*run(*qkv(1, 4, 1, nq, nk, 64, dv=32), causal=causal, offset=off))


def test_gqa_maps_heads_without_copies():
    got, ref, exact = run(*qkv(2, 8, 2, 200, 200, 64), causal=True)
    check(got, ref, exact)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("quant,pv", sorted(BOUND_EXACT))
def test_formats(quant, pv, dtype):
    check(*run(*qkv(1, 2, 2, 200, 200, 64, dtype=dtype), quant=quant, pv=pv, causal=True), quant=quant, pv=pv)


def test_k_channel_bias_is_smoothed():
    q, k, v = qkv(1, 2, 2, 256, 256, 64)
    k = (k.float() + torch.randn(64) * 20).half()
    got, ref, exact = run(q, k, v)
    assert rel_l1(got, exact) <= 0.02
    raw, _, _ = run(q, k, v, smooth_k=False)
    assert rel_l1(raw, exact) > 2 * rel_l1(got, exact)


def test_q_smoothing():
    q, k, v = qkv(1, 2, 2, 200, 200, 64)
    q = (q.float() + torch.randn(64) * 5).half()
    check(*run(q, k, v, smooth_q=True))


def test_bool_and_additive_masks():
    q, k, v = qkv(2, 2, 2, 200, 200, 64)
    keep = torch.rand(2, 1, 200, 200) > 0.3  # tiles mixed, broadcast over heads
    keep[..., :64, 64:128] = False  # a fully masked tile
    bias = torch.randn(1, 2, 1, 200).half()  # broadcast over batch and queries
    check(*run(q, k, v, keep=keep, bias=bias))


def test_fully_masked_rows():
    q, k, v = qkv(1, 2, 2, 77, 77, 64)
    keep = torch.ones(1, 1, 77, 77, dtype=torch.bool)
    keep[..., 3, :] = False
    got, ref, exact = run(q, k, v, keep=keep)
    assert (got[..., 3, :] == 0).all()
    check(got, ref, exact)
    fmin = torch.finfo(torch.float32).min  # HF's mask value: eager softmax gives the mean of V
    got, ref, exact = run(q, k, v, keep=keep, fill=fmin, causal=True, offset=-5)  # rows 0-4 see nothing
    check(got, ref, exact)
    torch.testing.assert_close(got[..., 3, :].float(), v.float().mean(-2), atol=2e-3, rtol=1e-2)


@pytest.mark.parametrize("tile", [Tile(64, 32, 4, 2), Tile(32, 64, 4, 2), Tile(128, 128, 8, 2)])
def test_tiles_do_not_change_results(tile):
    q, k, v = qkv(1, 2, 2, 333, 333, 64)
    check(*run(q, k, v, causal=True, tile=tile))


def test_public_function_runs_the_kernel_on_cpu_through_the_interpreter():
    q, k, v = qkv(1, 4, 2, 77, 77, 64)
    tri = attnopt.attention(q, k, v, is_causal=True, enable_gqa=True, impl="triton")
    ref = attnopt.attention(q, k, v, is_causal=True, enable_gqa=True, impl="reference")
    assert rel_l1(tri, ref) <= BOUND_REF["fp16"]


@pytest.mark.parametrize("causal", [False, True])
def test_lse_output(causal):
    q, k, v = qkv(1, 4, 2, 200, 200, 64)
    k = (k.float() + 3).half()  # K smoothing shifts the kernel's logits: the LSE must undo it
    scale = 0.125
    keep = torch.ones(1, 1, 200, 200, dtype=torch.bool)
    keep[..., 7, :] = False
    out, lse = attention_triton(q, k, v, None, keep, -math.inf, causal, 0, scale, "int8", "fp16", True, False,
                                "cpu", return_lse=True)
    ref_out, ref_lse = attention_reference(q, k, v, None, keep, -math.inf, causal, 0, scale, return_lse=True,
                                           block_n=ARCHS["cpu"].default_tile(64).block_n)
    _, exact_lse = attention_exact(q, k, v, None, keep, -math.inf, causal, 0, scale, return_lse=True)
    assert torch.isneginf(lse[..., 7]).all() and torch.isneginf(exact_lse[..., 7]).all()
    fin = torch.isfinite(exact_lse)
    assert (lse[fin] - exact_lse[fin].float()).abs().max() < 0.05
    assert (ref_lse[fin] - exact_lse[fin].float()).abs().max() < 0.05
    assert rel_l1(out, ref_out) < BOUND_REF["fp16"]


@pytest.mark.parametrize("quant,pv", [("int8", "fp16"), ("int8", "fp8"), ("none", "fp16")])
@pytest.mark.parametrize("d", [64, 96])
def test_tensor_descriptor_path(quant, pv, d):
    """The sm90+ variant (tiles through tensor descriptors) computes the same as the pointer one."""
    q, k, v = qkv(1, 4, 2, 200, 333, d)
    scale = d ** -0.5
    args = (q, k, v, None, None, -math.inf, True, 133, scale, quant, pv, True, False, "cpu")
    ptr = attention_triton(*args, use_tma=False)
    out = torch.full_like(ptr, float("nan"))
    tma = attention_triton(*args, use_tma=True, out=out)
    assert not torch.isnan(tma).any()
    assert rel_l1(tma, ptr) < 1e-3
    assert rel_l1(tma, attention_exact(q, k, v, None, None, -math.inf, True, 133, scale)) <= BOUND_EXACT[(quant, pv)]
