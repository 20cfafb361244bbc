"""Every capture form of the core issue, on small hand-written modules, checked numerically."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnopt
from helpers import ALL_SITES, inspect, randn, rel_l1

B, H, N, D = 2, 4, 77, 64
E2E_BOUND = 0.03


def check(module, *inputs, kv_heads=None, causal=None, options=None, sites=1):
    report = inspect(module.eval(), *inputs, options=options)
    att = [s for s in report.sites if s.kind == "attention"]
    assert len(att) == sites, report
    for s in att:
        assert s.status == "rewritten", (s.reason, report)
        if kv_heads is not None:
            assert s.details["kv_heads"] == kv_heads, s.details
        if causal is not None:
            assert (s.details["causal_offset"] is not None) == causal, s.details
    e2e = report.summary["e2e"]["rel_l1"]
    assert e2e <= E2E_BOUND, report
    for s in att:
        assert s.error["rel_l1"] <= 0.02, s.error
    return report


# ---------------------------------------------------------------------------- SDPA calls

class Sdpa(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.kw)


def test_sdpa_plain_and_scale():
    check(Sdpa(scale=0.2), randn(B, H, N, D), randn(B, H, N, D), randn(B, H, N, D), causal=False)


def test_sdpa_causal():
    check(Sdpa(is_causal=True), randn(B, H, N, D), randn(B, H, N, D), randn(B, H, N, D), causal=True)


def test_sdpa_gqa():
    check(Sdpa(is_causal=True, enable_gqa=True), randn(B, 8, N, D), randn(B, 2, N, D), randn(B, 2, N, D),
          kv_heads=2, causal=True)


@pytest.mark.parametrize("shape", [(N, N), (B, 1, N, N), (B, 1, 1, N), (1, H, N, N)])
def test_sdpa_bool_mask(shape):
    keep = torch.rand(*shape) > 0.3
    keep |= torch.eye(N, dtype=torch.bool).expand_as(keep) if shape[-2] == N else True
    check(Sdpa(), randn(B, H, N, D), randn(B, H, N, D), randn(B, H, N, D), keep)


def test_sdpa_additive_mask():
    bias = randn(B, 1, N, N)
    check(Sdpa(), randn(B, H, N, D), randn(B, H, N, D), randn(B, H, N, D), bias)


def test_sdpa_dropout_zero_in_training_mode():
    m = Sdpa(dropout_p=0.0)
    check(m.train(), randn(B, H, N, D), randn(B, H, N, D), randn(B, H, N, D))


# ---------------------------------------------------------------------- hand-written forms

class Manual(nn.Module):
    """softmax(q k^T * scale + mask) v, written the many ways models write it."""

    def __init__(self, scale_by="div", causal=None, fp32_softmax=False, dropout=0.0, gqa=None, layout="bhnd",
                 mask_kind=None, n=N):
        super().__init__()
        self.scale_by, self.causal, self.fp32 = scale_by, causal, fp32_softmax
        self.drop = nn.Dropout(dropout)
        self.gqa, self.layout, self.mask_kind = gqa, layout, mask_kind
        if causal == "buffer":
            self.register_buffer("bias", torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n))

    def forward(self, q, k, v, mask=None):
        if self.layout == "bnhd":  # [B, N, H, D] activations, heads moved by transpose
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.gqa == "repeat_kv":
            g = q.shape[1] // k.shape[1]
            k = k[:, :, None].expand(k.shape[0], k.shape[1], g, *k.shape[2:]).reshape(q.shape[0], -1, *k.shape[2:])
            v = v[:, :, None].expand(v.shape[0], v.shape[1], g, *v.shape[2:]).reshape(q.shape[0], -1, *v.shape[2:])
        elif self.gqa == "repeat_interleave":
            g = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        d = q.shape[-1]
        if self.scale_by == "prescale":
            s = (q * d ** -0.5) @ k.transpose(-2, -1)
        elif self.scale_by == "mul":
            s = torch.matmul(q, k.transpose(2, 3)) * (1 / math.sqrt(d))
        else:
            s = q @ k.transpose(-2, -1) / math.sqrt(d)
        n, m = s.shape[-2], s.shape[-1]
        if self.causal == "tril":
            s = s.masked_fill(torch.tril(torch.ones(n, m, dtype=torch.bool)) == 0, float("-inf"))
        elif self.causal == "triu":
            s = s.masked_fill(torch.triu(torch.ones(n, m, dtype=torch.bool), diagonal=1), float("-inf"))
        elif self.causal == "where":
            keep = torch.arange(m)[None, :] <= torch.arange(n)[:, None]
            s = torch.where(keep, s, torch.finfo(s.dtype).min)
        elif self.causal == "buffer":
            s = torch.where(self.bias[:, :, :n, :m], s, torch.tensor(float("-inf"), dtype=s.dtype))
        if mask is not None:
            s = s + mask
        p = F.softmax(s.float(), dim=-1).to(q.dtype) if self.fp32 else s.softmax(dim=-1)
        o = self.drop(p) @ v
        return o.transpose(1, 2) if self.layout == "bnhd" else o


@pytest.mark.parametrize("scale_by", ["div", "mul", "prescale"])
def test_manual_scale_forms(scale_by):
    check(Manual(scale_by=scale_by), randn(B, H, N, D), randn(B, H, N, D), randn(B, H, N, D))


@pytest.mark.parametrize("causal", ["tril", "triu", "where"])
def test_manual_causal_is_recognized(causal):
    check(Manual(causal=causal), randn(B, H, N, D), randn(B, H, N, D), randn(B, H, N, D), causal=True)


def test_manual_causal_from_registered_buffer_stays_correct():
    # the buffer's values are not known at compile time: it stays a mask tensor the kernel reads
    check(Manual(causal="buffer"), randn(B, H, N, D), randn(B, H, N, D), randn(B, H, N, D))


def test_manual_additive_padding_mask_and_fp32_softmax():
    pad = torch.zeros(B, 1, 1, N, dtype=torch.bfloat16)
    pad[1, ..., 60:] = torch.finfo(torch.bfloat16).min
    check(Manual(fp32_softmax=True), randn(B, H, N, D), randn(B, H, N, D), randn(B, H, N, D), pad)


def test_manual_dropout_in_eval_and_p0_in_train():
    check(Manual(dropout=0.1), randn(B, H, N, D), randn(B, H, N, D), randn(B, H, N, D))
    m = Manual(dropout=0.0).train()
    report = inspect(m, randn(B, H, N, D), randn(B, H, N, D), randn(B, H, N, D))
    assert report.rewritten("attention"), report


@pytest.mark.parametrize("gqa", ["repeat_kv", "repeat_interleave"])
def test_manual_gqa_does_not_materialize_repeated_kv(gqa):
    check(Manual(gqa=gqa, causal="tril"), randn(B, 8, N, D), randn(B, 2, N, D), randn(B, 2, N, D),
          kv_heads=2, causal=True)


def test_manual_bnhd_layout():
    check(Manual(layout="bnhd", causal="tril"), randn(B, N, H, D), randn(B, N, H, D), randn(B, N, H, D),
          causal=True)


class Einsum(nn.Module):
    def forward(self, q, k, v):  # [B, N, H, D]
        s = torch.einsum("bnhd,bmhd->bhnm", q, k) * q.shape[-1] ** -0.5
        p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.einsum("bhnm,bmhd->bnhd", p, v)


def test_einsum_bnhd():
    check(Einsum(), randn(B, N, H, D), randn(B, N, H, D), randn(B, N, H, D))


class Baddbmm3d(nn.Module):
    """diffusers' legacy processor: [B*H, N, D] and baddbmm with beta=0."""

    def forward(self, q, k, v):
        e = torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype)
        s = torch.baddbmm(e, q, k.transpose(-1, -2), beta=0, alpha=q.shape[-1] ** -0.5)
        return torch.bmm(s.softmax(dim=-1).to(v.dtype), v)


def test_baddbmm_3d():
    check(Baddbmm3d(), randn(B * H, N, D), randn(B * H, N, D), randn(B * H, N, D))


class CrossAttention(nn.Module):
    def forward(self, x, ctx):
        return F.scaled_dot_product_attention(x, ctx, ctx)


def test_cross_attention_q_len_differs():
    check(CrossAttention(), randn(B, H, 200, D), randn(B, H, 77, D))


@pytest.mark.parametrize("d", [32, 96, 128, 256])
def test_head_dims(d):
    check(Sdpa(is_causal=True), randn(1, 2, 77, d), randn(1, 2, 77, d), randn(1, 2, 77, d))


class SdpaMath(nn.Module):
    """SDPA's math fallback (what CUDA picks when no fused backend fits): fp32 upcasts,
    q and k each scaled by sqrt(scale), a safe softmax."""

    def forward(self, q, k, v):
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_sdpa_math_decomposition():
    check(SdpaMath(), randn(B, H, N, D), randn(B, H, N, D), randn(B, H, N, D), causal=True)


# ------------------------------------------------------------------------------- GPT-2's forms

class LegacyGpt2Attention(nn.Module):
    """GPT-2's attention as transformers wrote it before 5.x: a bool tril buffer over all positions,
    sliced to the query rows [kl - ql : kl, :kl], scale and fill as 0-d torch.full tensors, where()."""

    def __init__(self, max_positions=256):
        super().__init__()
        tril = torch.tril(torch.ones(max_positions, max_positions, dtype=torch.bool))
        self.register_buffer("bias", tril.view(1, 1, max_positions, max_positions), persistent=False)

    def forward(self, q, k, v):
        w = torch.matmul(q, k.transpose(-1, -2))
        w = w / torch.full([], v.size(-1) ** 0.5, dtype=w.dtype, device=w.device)
        ql, kl = q.size(-2), k.size(-2)
        keep = self.bias[:, :, kl - ql:kl, :kl]
        fill = torch.full([], torch.finfo(w.dtype).min, dtype=w.dtype, device=w.device)
        p = F.softmax(torch.where(keep, w.to(w.dtype), fill), dim=-1).type(v.dtype)
        return torch.matmul(p, v)


def _exact(module, *inputs):
    """The module's own computation in float64, on the same (rounded) inputs."""
    return module.double()(*(t.double() for t in inputs)).float()


@pytest.mark.parametrize("ql, kl", [(N, N), (40, 150)])
def test_gpt2_legacy_sliced_bias_buffer(ql, kl):
    """ql < kl: the slice starts at kl - ql, so query i may see keys up to kl - ql + i."""
    q, k, v = randn(B, H, ql, D), randn(B, H, kl, D), randn(B, H, kl, D)
    check(LegacyGpt2Attention(), q, k, v)
    torch._dynamo.reset()
    out = torch.compile(LegacyGpt2Attention(), backend=attnopt.backend(ALL_SITES))(q, k, v)
    assert rel_l1(out, _exact(LegacyGpt2Attention(), q, k, v)) <= 0.025


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_transformers_gpt2_attention_is_rewritten_end_to_end(impl):
    """transformers' GPT-2 at a length above the default min_seq_len, default options."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=128, n_head=4, n_layer=2, vocab_size=128, n_positions=256,
                                  bos_token_id=0, eos_token_id=0, attn_implementation=impl)
    model = transformers.GPT2LMHeadModel(cfg).eval().bfloat16()
    ids = torch.randint(0, 128, (2, 150))
    be = attnopt.backend({})
    torch._dynamo.reset()
    with torch.no_grad():
        logits = torch.compile(model, backend=be)(ids).logits
        exact = model.double()(ids).logits
    att = [s for s in be.recorder.sites() if s.kind == "attention"]
    assert [s.module for s in att] == ["transformer.h.0.attn", "transformer.h.1.attn"], att
    assert all(s.status == "rewritten" and s.details["causal_offset"] == 0 for s in att), att
    assert rel_l1(logits.double(), exact) <= 0.03


# ----------------------------------------------------------------- MQA through SDPA's enable_gqa

def _compiled_vs_float64(fn, *inputs):
    """rel-L1 of fn compiled with attnopt against fn itself in float64 on the same (rounded) inputs."""
    torch._dynamo.reset()
    out = torch.compile(fn, backend=attnopt.backend(ALL_SITES))(*inputs)
    torch._dynamo.reset()
    return rel_l1(out.double(), fn(*(t.double() if t.is_floating_point() else t for t in inputs)))


@pytest.mark.parametrize("b, hq", [(b, hq) for b in (1, 2, 3, 4) for hq in (2, 4)] + [(1, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sdpa_enable_gqa_with_one_kv_head(b, hq, dtype):
    """k / v [B, 1, N, D]: the size-1 head dim has no batch atom; B must stay the batch (not heads)."""
    q, k, v = randn(b, hq, N, D, dtype=dtype), randn(b, 1, N, D, dtype=dtype), randn(b, 1, N, D, dtype=dtype)
    m = Sdpa(enable_gqa=True)
    report = check(m, q, k, v, kv_heads=1)
    assert [s.details["q_heads"] for s in report.sites if s.kind == "attention"] == [hq]
    assert _compiled_vs_float64(m, q, k, v) <= 0.025


@pytest.mark.parametrize("b, hq, hkv", [(3, 4, 2), (2, 6, 3), (4, 8, 2)])
def test_sdpa_enable_gqa_batch_vs_heads(b, hq, hkv):
    """B equal to or a divisor of the head counts must not be taken for heads."""
    q, k, v = randn(b, hq, 33, D), randn(b, hkv, 33, D), randn(b, hkv, 33, D)
    m = Sdpa(enable_gqa=True, is_causal=True)
    check(m, q, k, v, kv_heads=hkv, causal=True)
    assert _compiled_vs_float64(m, q, k, v) <= 0.025


def test_manual_mqa_expand_reads_one_kv_head():
    """repeat_kv with one KV head ([B, 1, N, D] expanded to every query head)."""
    q, k, v = randn(3, 4, N, D), randn(3, 1, N, D), randn(3, 1, N, D)
    m = Manual(gqa="repeat_kv", causal="tril")
    check(m, q, k, v, kv_heads=1, causal=True)
    assert _compiled_vs_float64(m, q, k, v) <= 0.025


# ------------------------------------------------- causal masks from sliced query positions

SLICES = {
    "k-q:": lambda pos, q, k: pos[k - q:],
    "-q:": lambda pos, q, k: pos[-q:],
    "-q:k": lambda pos, q, k: pos[-q:k],
    "k-q:k": lambda pos, q, k: pos[k - q:k],
    "-q:-0": lambda pos, q, k: pos[-q:None],
    "narrow": lambda pos, q, k: pos.narrow(0, k - q, q),
}


class SlicedCausal(nn.Module):
    """Query positions are the last q of k positions (a KV cache's new tokens), sliced from arange(k)."""

    def __init__(self, slice_form, apply):
        super().__init__()
        self.slice_form, self.apply = slice_form, apply

    def forward(self, q, k, v):
        nq, nk = q.shape[-2], k.shape[-2]
        kpos = torch.arange(nk, device=q.device)
        qpos = SLICES[self.slice_form](kpos, nq, nk)
        keep = kpos[None, :] <= qpos[:, None]
        if self.apply == "sdpa_bool":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        if self.apply == "sdpa_additive":
            mask = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, torch.finfo(q.dtype).min)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        if self.apply == "where":
            s = torch.where(keep, s, torch.finfo(s.dtype).min)
        else:
            s = s.masked_fill(~keep, float("-inf"))
        return s.softmax(-1) @ v


@pytest.mark.parametrize("slice_form", list(SLICES))
@pytest.mark.parametrize("apply", ["where", "masked_fill", "sdpa_bool", "sdpa_additive"])
@pytest.mark.parametrize("nq, nk", [(64, 128), (33, 77)])
def test_causal_mask_from_sliced_query_positions(slice_form, apply, nq, nk):
    q, k, v = randn(B, H, nq, D), randn(B, H, nk, D), randn(B, H, nk, D)
    m = SlicedCausal(slice_form, apply)
    report = check(m, q, k, v)
    (site,) = [s for s in report.sites if s.kind == "attention"]
    if site.details["causal_offset"] is not None:  # when read as the kernel's rule, aligned bottom-right
        assert site.details["causal_offset"] == nk - nq, site.details
    assert _compiled_vs_float64(m, q, k, v) <= 0.025


def test_negative_slice_start_is_the_causal_rule():
    """The exact case of the issue: arange(k)[-q:] with q=64, k=128 gives causal_offset 64."""
    q, k, v = randn(B, H, 64, D), randn(B, H, 128, D), randn(B, H, 128, D)
    for apply in ("where", "sdpa_bool"):
        report = check(SlicedCausal("-q:", apply), q, k, v, causal=True)
        assert [s.details["causal_offset"] for s in report.sites] == [64]
