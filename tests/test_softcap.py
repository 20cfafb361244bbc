"""Logit soft-capping (Gemma 2, Grok: cap * tanh(logits / cap) before masks and softmax):
the reference against float64, the Triton kernels (interpreter) against the reference, the
public function, and the capture of eager soft-capped attention."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnopt
from attnopt.codegen.arch import ARCHS
from attnopt.codegen.attention.launch import attention_triton
from attnopt.ops.attention_ref import attention_exact, attention_reference
from attnopt.ops.sparse_ref import BK, BQ, n_blocks, sparse_attention_reference

from helpers import ALL_SITES, inspect, rel_l1


def qkv(b, hq, hkv, nq, nk, d, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(b, hq, nq, d).mul(scale).to(dtype), torch.randn(b, hkv, nk, d).mul(scale).to(dtype),
            torch.randn(b, hkv, nk, d).to(dtype))


def _masks(kind, b, hq, nq, nk, dtype):
    if kind == "bias":
        bias = torch.zeros(b, 1, nq, nk)
        bias[-1, ..., nk // 2:] = -1e4
        return (bias + torch.randn(b, 1, nq, nk) * 0.5).to(dtype), None
    if kind == "keep":
        keep = torch.rand(b, hq, nq, nk) > 0.3
        keep[..., 0] = True
        return None, keep
    return None, None


def _softcap_effect(q, k, v, scale, cap):
    """How far the capped attention is from the uncapped: the cap must matter in these tests."""
    return rel_l1(attention_exact(q, k, v, scale=scale, softcap=cap), attention_exact(q, k, v, scale=scale))


@pytest.mark.parametrize("cap, logit_scale", [(50.0, 4.0), (5.0, 1.0)])  # Gemma-2: cap 50 on large logits
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("smooth_k", [True, False])
def test_reference_against_float64(cap, logit_scale, dtype, smooth_k):
    q, k, v = qkv(2, 4, 2, 77, 200, 64, dtype, scale=logit_scale)
    k = (k.float() + 2.0).to(dtype)  # a large K mean: smoothing's shift must go back before tanh
    scale = 64 ** -0.5
    assert _softcap_effect(q, k, v, scale, cap) > 0.05
    exact = attention_exact(q, k, v, scale=scale, softcap=cap)
    out = attention_reference(q, k, v, scale=scale, quant="int8", pv="fp16", smooth_k=smooth_k, softcap=cap)
    assert rel_l1(out, exact) <= 0.03
    # FP8 on logits this sharp is ~0.09 off with or without the cap: the cap must not add to it
    out8 = attention_reference(q, k, v, scale=scale, quant="fp8", pv="fp8", smooth_k=smooth_k, softcap=cap)
    plain8 = attention_reference(q, k, v, scale=scale, quant="fp8", pv="fp8", smooth_k=smooth_k)
    assert rel_l1(out8, exact) <= max(0.07, 1.1 * rel_l1(plain8, attention_exact(q, k, v, scale=scale)))


def test_without_the_smoothing_term_the_cap_would_be_wrong():
    """Guard of the test above: capping the smoothed (shifted) logits is measurably off."""
    q, k, v = qkv(1, 2, 2, 77, 77, 64, torch.float16)
    k = (k.float() + 3.0).half()
    exact = attention_exact(q, k, v, scale=0.125, softcap=5.0)
    kc = (k.float() - k.float().mean(-2, keepdim=True)).half()  # what the kernel multiplies
    wrong = attention_exact(q, kc, v, scale=0.125, softcap=5.0)
    assert rel_l1(wrong, exact) > 0.05
    assert rel_l1(attention_reference(q, k, v, scale=0.125, softcap=5.0), exact) <= 0.03


# K smoothing only exists where Q.K^T is quantized: ("none", smooth_k=True) would run the very
# computation of ("none", smooth_k=False) on both sides, so it is left out
KERNEL_CASES = [(mask, smooth_k, quant, pv) for mask in ("none", "bias", "keep", "causal") for smooth_k in (True, False)
                for quant, pv in (("int8", "fp16"), ("fp8", "fp8"), ("none", "fp16")) if quant != "none" or not smooth_k]


@pytest.mark.parametrize("mask, smooth_k, quant, pv", KERNEL_CASES)
def test_kernel_equals_reference(quant, pv, smooth_k, mask):
    nq, nk = (77, 133) if mask != "causal" else (133, 133)
    q, k, v = qkv(2, 4, 2, nq, nk, 64, torch.float16)
    k = (k.float() + 1.5).half()
    bias, keep = _masks(mask, 2, 4, nq, nk, torch.float16)
    causal = mask == "causal"
    scale, cap = 0.125, 5.0
    out = torch.full((2, 4, nq, 64), float("nan"), dtype=torch.float16)
    got = attention_triton(q, k, v, bias, keep, -math.inf, causal, 0, scale, quant, pv, smooth_k, False, "cpu",
                           out=out, softcap=cap)
    assert not torch.isnan(got).any()
    block_n = ARCHS["cpu"].default_tile(64, quant, pv).block_n
    ref = attention_reference(q, k, v, bias, keep, -math.inf, causal, 0, scale, quant, pv, smooth_k, False,
                              block_n=block_n, softcap=cap)
    assert rel_l1(got, ref) <= 1e-5
    exact = attention_exact(q, k, v, bias, keep, -math.inf, causal, 0, scale, softcap=cap)
    assert rel_l1(got, exact) <= (0.07 if pv == "fp8" else 0.03)


def test_kernel_lse_with_softcap():
    q, k, v = qkv(1, 2, 1, 64, 96, 64, torch.float16)
    k = (k.float() + 1.0).half()
    _, lse = attention_triton(q, k, v, None, None, -math.inf, False, 0, 0.125, "int8", "fp16", True, False, "cpu",
                              return_lse=True, softcap=4.0)
    _, lse_exact = attention_exact(q, k, v, scale=0.125, softcap=4.0, return_lse=True)
    assert (lse.double() - lse_exact).abs().max() < 0.05


def test_sparse_second_stage_and_first_stage_with_softcap():
    q, k, v = qkv(1, 2, 2, 256, 256, 64, torch.float16)
    keep = torch.ones(1, 2, n_blocks(256, BQ), n_blocks(256, BK), dtype=torch.bool)  # all kept: dense
    exact = attention_exact(q, k, v, scale=0.125, softcap=5.0)
    a = sparse_attention_reference(q, k, v, keep, scale=0.125, softcap=5.0)
    b = sparse_attention_reference(q, k, v, keep, scale=0.125, softcap=5.0, pv_threshold=[1e30, 1e30])
    assert rel_l1(a, exact) <= 0.03 and rel_l1(b, exact) <= 0.03


def test_public_function_softcap():
    q, k, v = qkv(2, 4, 2, 77, 77, 64)
    out = attnopt.attention(q, k, v, is_causal=True, enable_gqa=True, softcap=5.0)
    exact = attention_exact(q, k, v, is_causal=True, softcap=5.0)
    assert rel_l1(out, exact) <= 0.03
    plain = attnopt.attention(q, k, v, is_causal=True, enable_gqa=True, softcap=None)
    assert rel_l1(plain, attention_exact(q, k, v, is_causal=True)) <= 0.03
    with pytest.raises(ValueError):
        attnopt.attention(q, k, v, enable_gqa=True, softcap=-1.0)


# ------------------------------------------------------------------------------ capture

class Gemma2Eager(nn.Module):
    """Gemma 2's eager attention: scale, soft-cap (divide, tanh, multiply), additive mask, fp32 softmax."""

    def __init__(self, cap=50.0, scaling=None, mask_first=False, causal=True):
        super().__init__()
        self.cap, self.scaling, self.mask_first, self.causal = cap, scaling, mask_first, causal

    def forward(self, q, k, v):
        scaling = self.scaling or q.shape[-1] ** -0.5
        s = torch.matmul(q, k.transpose(2, 3)) * scaling
        nq, nk = s.shape[-2:]
        mask = torch.zeros(nq, nk, dtype=q.dtype)
        if self.causal:
            mask = mask.masked_fill(torch.ones(nq, nk, dtype=torch.bool).triu(1 + nk - nq), torch.finfo(q.dtype).min)
        if self.mask_first:  # not soft-capping: the mask would be squashed by tanh
            s = s + mask
        s = s / self.cap
        s = torch.tanh(s)
        s = s * self.cap
        if not self.mask_first:
            s = s + mask
        p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(p, v)


def _compiled_vs_float64(m, *inputs):
    torch._dynamo.reset()
    out = torch.compile(m, backend=attnopt.backend(ALL_SITES))(*inputs)
    torch._dynamo.reset()
    return rel_l1(out.double(), m(*(t.double() for t in inputs)))


# each cap regime with each dtype once; the lengths alternate, so each regime and each dtype meets both
GEMMA2_CASES = [(77, torch.bfloat16, 50.0, 4.0), (200, torch.float16, 50.0, 4.0), (200, torch.bfloat16, 5.0, 1.0),
                (77, torch.float16, 5.0, 1.0)]


@pytest.mark.parametrize("n, dtype, cap, qk_scale", GEMMA2_CASES,
                         ids=[f"{n}-dtype{int(d is torch.float16)}-{c}-{s}" for n, d, c, s in GEMMA2_CASES])
def test_gemma2_eager_softcap_is_captured(cap, qk_scale, dtype, n):
    q, k, v = qkv(2, 4, 4, n, n, 64, dtype, scale=qk_scale)
    k = (k.float() + 1.0).to(dtype)
    m = Gemma2Eager(cap)
    report = inspect(m.eval(), q, k, v)
    (site,) = [s for s in report.sites if s.kind == "attention"]
    assert site.status == "rewritten", site.reason
    assert site.details["softcap"] == cap, site.details
    assert math.isclose(site.details["scale"], 64 ** -0.5, rel_tol=1e-6)
    assert report.summary["e2e"]["rel_l1"] <= 0.03 and site.error["rel_l1"] <= 0.03
    assert _compiled_vs_float64(m, q, k, v) <= 0.03


def test_softcap_scale_after_tanh_and_inside_are_folded():
    """a * tanh(b * qk): cap a, scale a * b, whatever the form of a and b."""
    def f(q, k, v):
        s = torch.tanh((q * 0.25) @ k.transpose(-1, -2) * 0.1) * 6.0 * 0.5
        return s.softmax(-1) @ v

    class M(nn.Module):
        def forward(self, q, k, v):
            return f(q, k, v)

    q, k, v = qkv(1, 2, 2, 77, 77, 32, scale=2.0)
    report = inspect(M(), q, k, v)
    (site,) = report.sites
    assert site.status == "rewritten", site.reason
    assert math.isclose(site.details["softcap"], 3.0) and math.isclose(site.details["scale"], 3.0 * 0.025)
    assert _compiled_vs_float64(M(), q, k, v) <= 0.03


@pytest.mark.parametrize("kind", ["mask_inside", "const_inside", "twice"])
def test_softcap_near_misses_stay_dense(kind):
    class M(nn.Module):
        def forward(self, q, k, v):
            s = q @ k.transpose(-1, -2) * 0.125
            if kind == "mask_inside":
                return Gemma2Eager(5.0, mask_first=True)(q, k, v)
            if kind == "const_inside":
                s = torch.tanh((s + 1.0) / 5.0) * 5.0
            else:
                s = torch.tanh(torch.tanh(s / 5.0) * 2.0) * 5.0
            return s.softmax(-1) @ v

    q, k, v = qkv(1, 2, 2, 64, 64, 32)
    report = inspect(M(), q, k, v)
    assert not report.rewritten("attention"), report
    reason = report.sites[0].reason
    assert ("tanh" in reason) or ("soft-capping" in reason), reason
    torch._dynamo.reset()
    ours = torch.compile(M(), backend=attnopt.backend(ALL_SITES))(q, k, v)
    torch._dynamo.reset()
    plain = torch.compile(M(), backend="inductor")(q, k, v)
    torch._dynamo.reset()
    assert torch.equal(ours, plain)


def test_transformers_gemma2_eager_is_captured_end_to_end():
    """transformers' Gemma 2 (tiny config, random weights): both layers rewritten with the cap,
    GQA kept unrepeated, a sliding-window layer included; logits against the float64 model."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Gemma2Config(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                    max_position_embeddings=512, sliding_window=64, attn_logit_softcapping=50.0,
                                    final_logit_softcapping=30.0, query_pre_attn_scalar=32,
                                    attn_implementation="eager")
    model = transformers.Gemma2ForCausalLM(cfg).eval().bfloat16()
    ids = torch.randint(0, 128, (2, 100))
    report = inspect(model, ids)
    att = [s for s in report.sites if s.kind == "attention"]
    assert len(att) == 2 and all(s.status == "rewritten" for s in att), att
    assert all(s.details["softcap"] == 50.0 and s.details["kv_heads"] == 2 for s in att), att
    be = attnopt.backend(ALL_SITES)
    torch._dynamo.reset()
    with torch.no_grad():
        logits = torch.compile(model, backend=be)(ids).logits
        exact = model.double()(ids).logits
    torch._dynamo.reset()
    assert rel_l1(logits.double(), exact) <= 0.03
