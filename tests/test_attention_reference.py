"""The reference op's quantized arithmetic against float64 attention."""

import math

import pytest
import torch

import attnopt
from attnopt.ops.attention_ref import (
    FP8_MAX, INT8_MAX, attention_exact, attention_reference, quantize_rows,
)

from helpers import rel_l1

# Honest bounds on standard-normal inputs (FP8's 3 mantissa bits cost more than INT8's 7).
BOUNDS = {("int8", "fp16"): 0.02, ("int8", "fp8"): 0.05, ("fp8", "fp16"): 0.05, ("fp8", "fp8"): 0.07,
          ("none", "fp16"): 0.005}


def qkv(b, hq, hkv, nq, nk, d, dv=None, dtype=torch.float16):
    dv = dv or d
    return (torch.randn(b, hq, nq, d, dtype=dtype), torch.randn(b, hkv, nk, d, dtype=dtype),
            torch.randn(b, hkv, nk, dv, dtype=dtype))


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantize_rows_grid(fmt):
    x = torch.randn(2, 3, 77, 64) * 3
    xq, s = quantize_rows(x, 32, fmt)
    assert s.shape == (2, 3, 3)
    assert xq.dtype == (torch.int8 if fmt == "int8" else torch.float8_e4m3fn)
    deq = xq.float() * s.repeat_interleave(32, -1)[..., :77, None]
    blocks = torch.nn.functional.pad(x, (0, 0, 0, 19)).reshape(2, 3, 3, 32, 64)
    amax = blocks.abs().amax(dim=(-1, -2))
    torch.testing.assert_close(s, amax / (INT8_MAX if fmt == "int8" else FP8_MAX))
    assert xq.float().abs().max() <= (INT8_MAX if fmt == "int8" else FP8_MAX)
    step = s.repeat_interleave(32, -1)[..., :77, None]
    bound = 0.5 * step if fmt == "int8" else x.abs() / 8 + step / 512
    assert ((deq - x).abs() <= bound * (1 + 1e-5)).all()


def test_quantize_zero_block_has_unit_scale():
    x = torch.randn(1, 1, 64, 32)
    x[:, :, :32] = 0
    xq, s = quantize_rows(x, 32, "int8")
    assert s[0, 0, 0] == 1.0 and (xq[:, :, :32] == 0).all()


@pytest.mark.parametrize("quant,pv", sorted(BOUNDS))
@pytest.mark.parametrize("n,d", [(1, 32), (77, 64), (200, 96), (333, 128), (129, 256)])
def test_reference_accuracy_vs_float64(quant, pv, n, d):
    q, k, v = qkv(2, 4, 4, n, n, d)
    out = attention_reference(q, k, v, quant=quant, pv=pv)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert rel_l1(out, attention_exact(q, k, v)) <= BOUNDS[(quant, pv)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes_and_bound(dtype):
    q, k, v = qkv(1, 2, 2, 256, 256, 64, dtype=dtype)
    out = attention_reference(q, k, v)
    assert out.dtype == dtype
    assert rel_l1(out, attention_exact(q, k, v)) <= 0.02


def test_k_smoothing_removes_channel_bias():
    q, k, v = qkv(2, 4, 4, 256, 256, 64)
    k = (k.float() + torch.randn(64) * 20).half()  # the large per-channel K bias real models have
    ref = attention_exact(q, k, v)
    smooth = rel_l1(attention_reference(q, k, v, smooth_k=True), ref)
    raw = rel_l1(attention_reference(q, k, v, smooth_k=False), ref)
    assert smooth <= 0.02
    assert raw >= 2 * smooth


def test_q_smoothing_helps_with_q_channel_bias():
    q, k, v = qkv(2, 4, 4, 256, 256, 64)
    q = (q.float() + torch.randn(64) * 5).half()
    ref = attention_exact(q, k, v)
    with_q = rel_l1(attention_reference(q, k, v, smooth_q=True), ref)
    without = rel_l1(attention_reference(q, k, v, smooth_q=False), ref)
    assert with_q <= 0.02 and with_q < without


@pytest.mark.parametrize("nq,nk", [(77, 200), (200, 77), (1, 333)])
@pytest.mark.parametrize("causal", [False, True])
def test_cross_lengths_causal_and_gqa(nq, nk, causal):
    q, k, v = qkv(2, 8, 2, nq, nk, 64, dv=32)
    off = nk - nq if causal else 0  # bottom-right aligned causal (KV-cache style)
    out = attention_reference(q, k, v, is_causal=causal, causal_offset=off)
    ref = attention_exact(q, k, v, is_causal=causal, causal_offset=off)
    assert out.shape == (2, 8, nq, 32)
    assert rel_l1(out, ref) <= 0.02
    # GQA is the same as repeating K/V per query-head group
    rep = attention_exact(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=causal,
                          causal_offset=off)
    torch.testing.assert_close(ref, rep)


def test_exact_matches_torch_sdpa_semantics():
    q, k, v = qkv(2, 4, 4, 77, 77, 32, dtype=torch.float64)
    keep = torch.rand(2, 1, 77, 77) > 0.3
    bias = torch.randn(1, 4, 1, 77, dtype=torch.float64)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.where(keep, bias, -math.inf), scale=0.3)
    out = attention_exact(q, k, v, attn_bias=bias, keep_mask=keep, scale=0.3)
    torch.testing.assert_close(out, ref)
    causal = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(attention_exact(q, k, v, is_causal=True), causal)


def test_bool_and_additive_masks():
    q, k, v = qkv(2, 4, 4, 200, 200, 64)
    keep = torch.rand(2, 1, 1, 200) > 0.2  # padding-style, broadcast over heads and queries
    bias = torch.randn(1, 4, 200, 200).half()
    out = attention_reference(q, k, v, attn_bias=bias, keep_mask=keep)
    ref = attention_exact(q, k, v, attn_bias=bias, keep_mask=keep)
    assert rel_l1(out, ref) <= 0.02


def test_fully_masked_rows_are_defined():
    q, k, v = qkv(1, 2, 2, 64, 64, 32)
    keep = torch.ones(1, 1, 64, 64, dtype=torch.bool)
    keep[..., 5, :] = False  # row 5 sees nothing
    out = attention_reference(q, k, v, keep_mask=keep)
    assert (out[..., 5, :] == 0).all(), "-inf masking: fully masked rows give 0 (as torch SDPA)"
    assert torch.isfinite(out).all()
    # A finite fill (HF's finfo.min masks) makes eager softmax uniform: the mean of V.
    fin = attention_reference(q, k, v, keep_mask=keep, masked_value=torch.finfo(torch.float32).min)
    torch.testing.assert_close(fin[..., 5, :].float(), v.float().mean(dim=-2), atol=2e-3, rtol=1e-2)
    ex = attention_exact(q, k, v, keep_mask=keep, masked_value=torch.finfo(torch.float32).min)
    assert rel_l1(fin, ex) <= 0.02


def test_public_attention_matches_sdpa_signature():
    q, k, v = qkv(2, 8, 2, 77, 77, 64)
    out = attnopt.attention(q, k, v, is_causal=True, enable_gqa=True, impl="reference")
    ref = attention_exact(q, k, v, is_causal=True)
    assert rel_l1(out, ref) <= 0.02
    with pytest.raises(ValueError, match="enable_gqa"):
        attnopt.attention(q, k, v)
    bnhd = attnopt.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                             enable_gqa=True, layout="bnhd", impl="reference")
    torch.testing.assert_close(bnhd.transpose(1, 2), out)
    keep = torch.rand(77, 77) > 0.5
    keep.fill_diagonal_(True)
    masked = attnopt.attention(q, k, v, attn_mask=keep, enable_gqa=True, impl="reference")
    assert rel_l1(masked, attention_exact(q, k, v, keep_mask=keep)) <= 0.02
    with pytest.raises(attnopt.ConfigError, match="quant"):
        attnopt.attention(q, k, v, enable_gqa=True, quant="int4")


def test_noncontiguous_inputs():
    q, k, v = (torch.randn(2, 77, 4, 64).half().transpose(1, 2) for _ in range(3))  # [B, N, H, D] memory
    assert not q.is_contiguous()
    out = attention_reference(q, k, v)
    assert rel_l1(out, attention_exact(q, k, v)) <= 0.02


def test_head_dims_beyond_the_kernels_still_run_on_the_reference_path():
    """The op's CPU path takes the kernels' key tile where a kernel exists; above 256 (no kernel,
    the rewrite leaves such sites alone) a direct call still computes, in one tile."""
    q, k, v = (torch.randn(1, 2, 70, 320).bfloat16() for _ in range(3))
    out = attnopt.attention(q, k, v, is_causal=True, arch="cpu")
    assert torch.equal(out, attention_reference(q, k, v, is_causal=True))
    assert rel_l1(out, attention_exact(q, k, v, is_causal=True)) < 0.02
