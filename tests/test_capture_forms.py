"""Every capture form of the core issue, on small hand-written modules, checked numerically."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnopt
from helpers import ALL_SITES, attend_with_keep, inspect, randn, rel_l1

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


# every batch / query-head relation in bf16; fp16 (the same matching) on a few of them
ONE_KV_HEAD_CASES = ([(torch.bfloat16, b, hq) for b in (1, 2, 3, 4) for hq in (2, 4)] + [(torch.bfloat16, 1, 1)]
                     + [(torch.float16, b, hq) for b, hq in ((4, 2), (3, 4), (1, 1))])


@pytest.mark.parametrize("dtype, b, hq", ONE_KV_HEAD_CASES,
                         ids=[f"dtype{int(d is torch.float16)}-{b}-{hq}" for d, b, hq in ONE_KV_HEAD_CASES])
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
        return attend_with_keep(q, k, v, keep, self.apply, additive_fill=torch.finfo(q.dtype).min)


APPLIES = ["where", "masked_fill", "sdpa_bool", "sdpa_additive"]
SLICE_SHAPES = [(64, 128), (33, 77)]  # k - q equal to q; and not (a start read as -q would be wrong)
# every slice form with every way of applying the mask, once each; the two shapes alternate, so
# each slice form and each way of applying meets both shapes (pairwise, not the full 48)
SLICED_CASES = [(*SLICE_SHAPES[(i + j) % 2], apply, form) for i, form in enumerate(SLICES)
                for j, apply in enumerate(APPLIES)]


@pytest.mark.parametrize("nq, nk, apply, slice_form", SLICED_CASES)
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


# ------------------------------------------------- forms torch's SDPA fusion and real models use

def _fn_module(fn):
    class M(nn.Module):
        def forward(self, *a):
            return fn(*a)

    return M()


def _rewritten_and_exact(fn, *inputs, bound=0.025, exact=None):
    """fn is rewritten (one site) and, compiled, equals fn in float64 (or `exact`) within bound."""
    report = inspect(_fn_module(fn), *inputs)
    (site,) = [s for s in report.sites if s.kind == "attention"]
    assert site.status == "rewritten", site.reason
    torch._dynamo.reset()
    out = torch.compile(_fn_module(fn), backend=attnopt.backend(ALL_SITES))(*inputs)
    torch._dynamo.reset()
    ref = exact if exact is not None else fn(*(t.double() if t.is_floating_point() else t for t in inputs))
    assert rel_l1(out.double(), ref.double()) <= bound
    return site


def _split_scale(q, k, v, s=0.125):
    return ((q * s ** 0.5) @ (k * s ** 0.5).transpose(-1, -2)).softmax(-1) @ v


def _split_scale_safe_softmax(q, k, v, s=0.125):
    """SDPA's math path: fp32 upcast, sqrt(scale) on q and k, aten._safe_softmax."""
    logits = (q.float() * s ** 0.5) @ (k.float() * s ** 0.5).transpose(-1, -2)
    return torch.ops.aten._safe_softmax(logits, -1).to(v.dtype) @ v


def _split_scale_safe_softmax_16bit(q, k, v, s=0.125):
    return torch.ops.aten._safe_softmax((q * s ** 0.5) @ (k * s ** 0.5).transpose(-1, -2), -1) @ v


@pytest.mark.parametrize("fn", [_split_scale, _split_scale_safe_softmax, _split_scale_safe_softmax_16bit])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scale_split_across_q_and_k(fn, dtype):
    q, k, v = (randn(B, H, N, D, dtype=dtype) for _ in range(3))
    site = _rewritten_and_exact(fn, q, k, v)
    assert math.isclose(site.details["scale"], 0.125, rel_tol=1e-9)


@pytest.mark.parametrize("nq", [N, 33])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_causal_where_then_additive_mask(nq, dtype):
    """GPT-Neo / ImageGPT / older GPT-2: where(causal, scores, finfo.min) + attention_mask."""
    q, k, v = randn(B, H, nq, D, dtype=dtype), randn(B, H, N, D, dtype=dtype), randn(B, H, N, D, dtype=dtype)
    pad = torch.zeros(B, 1, 1, N, dtype=dtype)
    pad[1, ..., N - 20:] = torch.finfo(dtype).min  # right padding: no fully masked row

    def fn(q, k, v, m):
        s = (q @ k.transpose(-1, -2)) * D ** -0.5
        nq, nk = s.shape[-2:]
        causal = torch.ones(nk, nk, dtype=torch.bool).tril()[nk - nq:nk, :nk]
        s = torch.where(causal, s, torch.tensor(torch.finfo(s.dtype).min, dtype=s.dtype))
        s = s + m
        return s.softmax(-1) @ v

    site = _rewritten_and_exact(fn, q, k, v, pad)
    assert site.details["bias_terms"] == 2, site.details


def test_causal_where_then_additive_mask_left_padding_keeps_eager_fully_masked_rows():
    """Left padding: the first rows of batch 1 see only padded keys. Eager gives those rows
    softmax over (finfo.min + mask) values; the rewrite keeps exactly those values, so it matches
    fp32 eager there too (finfo.min + finfo.min overflows to -inf in fp32, not in float64)."""
    q, k, v = (randn(B, H, N, D) for _ in range(3))
    pad = torch.zeros(B, 1, 1, N, dtype=torch.float32)
    pad[1, ..., :20] = torch.finfo(torch.float32).min

    def fn(q, k, v, m):
        s = q.float() @ k.float().transpose(-1, -2) * D ** -0.5
        s = torch.where(torch.ones(N, N, dtype=torch.bool).tril(), s, torch.finfo(torch.float32).min) + m
        return s.softmax(-1).to(v.dtype) @ v

    eager_fp32 = fn(q.float(), k.float(), v.float(), pad)
    _rewritten_and_exact(fn, q, k, v, pad, exact=eager_fp32)


MASK_DTYPES = [torch.bool, torch.int32, torch.float32, torch.float16]
# a float mask promotes bf16 and fp16 scores differently, so those meet both; a bool or int mask
# adds to either dtype alike (the scores' own dtype): bf16 only
ANOTHER_DTYPE_CASES = [(dtype, how, mask_dtype) for dtype in (torch.bfloat16, torch.float16)
                       for how in ("add", "masked_fill", "bmm_add", "sdpa") for mask_dtype in MASK_DTYPES
                       if dtype is torch.bfloat16 or mask_dtype.is_floating_point]


@pytest.mark.parametrize("dtype, how, mask_dtype", ANOTHER_DTYPE_CASES,
                         ids=[f"dtype{int(d is torch.float16)}-{h}-mask_dtype{MASK_DTYPES.index(m)}"
                              for d, h, m in ANOTHER_DTYPE_CASES])
def test_masks_of_another_dtype(mask_dtype, how, dtype):
    """Eager type promotion decides the softmax input (bf16 scores + an fp32 mask softmax in fp32;
    a bool or int mask added is 0/1 or its integers); the rewrite computes the same function."""
    q, k, v = (randn(B, H, N, D, dtype=dtype) for _ in range(3))
    keep = torch.rand(B, 1, N, N) > 0.3
    keep[..., 0] = True
    if mask_dtype is torch.bool:
        m = keep
    else:
        m = torch.where(keep, 0, -10000).to(mask_dtype)
    if how == "sdpa" and mask_dtype in (torch.int32, torch.float16) and mask_dtype != dtype:
        pytest.skip("SDPA itself rejects a float mask of another dtype than q / an int mask")

    def fn(q, k, v, m):
        if how == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m.to(q.dtype) if m.dtype == torch.float32 else m)
        if how == "masked_fill":
            keep_ = m if m.dtype == torch.bool else m == 0
            return (q @ k.transpose(-1, -2) * 0.2).masked_fill(~keep_, float("-inf")).softmax(-1) @ v
        if how == "bmm_add":  # [B*H, N, D] bmms, mask added on the [B, H, N, N] view
            b, h, n, d = q.shape
            s = (torch.bmm(q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2)) * 0.2).view(b, h, n, n) + m
            return torch.bmm(s.softmax(-1).to(v.dtype).flatten(0, 1), v.flatten(0, 1)).view(b, h, n, d)
        return ((q @ k.transpose(-1, -2) * 0.2) + m).softmax(-1).to(v.dtype) @ v

    _rewritten_and_exact(fn, q, k, v, m)


def _bloom(q, k, v, alibi, beta=1.0):
    """Bloom: ALiBi through baddbmm's input, causal mask, fp32 softmax, [B*H, N, D] bmms."""
    b, h, n, d = q.shape
    s = torch.baddbmm(alibi, q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2), beta=beta, alpha=d ** -0.5)
    s = s.view(b, h, n, -1)
    s = s + torch.zeros(n, n, dtype=s.dtype).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(),
                                                          torch.finfo(s.dtype).min)
    p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.bmm(p.view(b * h, n, -1), v.flatten(0, 1)).view(b, h, n, d)


# each beta with each ALiBi shape once; the dtypes alternate, so each beta and each shape meets both
ALIBI_CASES = [(torch.bfloat16, "bloom", 1.0), (torch.float16, "bloom", 0.5), (torch.float16, "full", 1.0),
               (torch.bfloat16, "full", 0.5)]


@pytest.mark.parametrize("dtype, alibi_shape, beta", ALIBI_CASES,
                         ids=[f"dtype{int(d is torch.float16)}-{s}-{b}" for d, s, b in ALIBI_CASES])
def test_alibi_through_baddbmm(beta, alibi_shape, dtype):
    q, k, v = (randn(B, H, N, D, dtype=dtype) for _ in range(3))
    slopes = torch.tensor([2.0 ** (-8 * (i + 1) / H) for i in range(H)])
    if alibi_shape == "bloom":  # [B*H, 1, N]: slope * key position
        alibi = (slopes[:, None, None] * torch.arange(N)[None, None, :]).repeat(B, 1, 1)
    else:
        alibi = torch.randn(B * H, N, N)
    site = _rewritten_and_exact(lambda *a: _bloom(*a, beta=beta), q, k, v, alibi.to(dtype))
    assert site.details["bias_terms"] >= 1


# ------------------------------------------------------- DeBERTa-v2's disentangled attention

def _disentangled(q, k, v, pos_k, pos_q, c2p_idx, p2c_idx, keep):
    """DeBERTa-v2: [B*H, N, D] bmms; content-to-position and position-to-content terms (matmuls
    with position embeddings, gathered by relative position) added to QK^T on its own frame,
    K pre-divided by a tensor scale; then viewed to heads, masked_fill(finfo.min), softmax."""
    bh, n, d = q.shape
    scale = torch.sqrt(torch.tensor(d, dtype=torch.float) * 3)
    s = torch.bmm(q, k.transpose(-1, -2) / scale.to(q.dtype))
    c2p = torch.gather(torch.bmm(q, pos_k.transpose(-1, -2)), -1, c2p_idx.expand(bh, n, n))
    p2c = torch.gather(torch.bmm(k, pos_q.transpose(-1, -2)), -1, p2c_idx.expand(bh, n, n)).transpose(-1, -2)
    s = s + (c2p / scale.to(c2p.dtype) + p2c / scale.to(p2c.dtype))
    s = s.view(-1, H, n, n).masked_fill(~keep, torch.finfo(q.dtype).min)
    p = F.softmax(s, dim=-1)
    return torch.bmm(p.view(-1, n, n), v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [77, 200])
def test_disentangled_attention_terms_are_an_additive_bias(dtype, n):
    span = 32
    q, k, v = (randn(B * H, n, D, dtype=dtype, scale=1.5) for _ in range(3))
    pos_k, pos_q = randn(B * H, 2 * span, D, dtype=dtype), randn(B * H, 2 * span, D, dtype=dtype)
    rel = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    c2p_idx = torch.clamp(rel + span, 0, 2 * span - 1)[None]
    p2c_idx = torch.clamp(-rel + span, 0, 2 * span - 1)[None]
    keep = torch.ones(B, 1, 1, n, dtype=torch.bool)
    keep[1, ..., n - 17:] = False
    site = _rewritten_and_exact(_disentangled, q, k, v, pos_k, pos_q, c2p_idx, p2c_idx, keep)
    assert site.details["bias_terms"] == 1, site.details


def test_transformers_deberta_v2_is_captured_end_to_end():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.DebertaV2Config(vocab_size=128, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=256, max_position_embeddings=256, relative_attention=True,
                                       position_buckets=32, pos_att_type=["p2c", "c2p"], max_relative_positions=64)
    model = transformers.DebertaV2Model(cfg).eval().bfloat16()
    ids = torch.randint(0, 128, (2, 77))
    mask = torch.ones(2, 77, dtype=torch.long)
    mask[1, 60:] = 0
    report = inspect(model, ids, mask)
    att = [s for s in report.sites if s.kind == "attention"]
    assert len(att) == 2 and all(s.status == "rewritten" for s in att), att
    be = attnopt.backend(ALL_SITES)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=be)(ids, mask).last_hidden_state
        exact = model.double()(ids, mask).last_hidden_state
    torch._dynamo.reset()
    assert rel_l1(out.double(), exact) <= 0.03


def test_negative_slice_start_under_dynamic_shapes_stays_correct():
    """With symbolic lengths the slice start -q is symbolic: the mask stays a tensor (or a rule the
    sizes prove), never an offset of the wrong sign; two lengths through one compiled function."""
    m = SlicedCausal("-q:", "where")
    torch._dynamo.reset()
    be = attnopt.backend(ALL_SITES)
    fn = torch.compile(m, backend=be, dynamic=True)
    with torch.no_grad():
        for nq, nk in ((64, 128), (33, 77)):
            q, k, v = randn(B, H, nq, D), randn(B, H, nk, D), randn(B, H, nk, D)
            out = fn(q, k, v)
            assert rel_l1(out.double(), m(q.double(), k.double(), v.double())) <= 0.025
    torch._dynamo.reset()
    att = [s for s in be.recorder.sites() if s.kind == "attention"]
    assert att and all(s.status == "rewritten" for s in att), att
    assert all(s.details["causal_offset"] is None for s in att), att  # one graph, two offsets: a mask


def test_transformers_gpt_neo_eager_with_left_padding_end_to_end():
    """GPT-Neo's eager attention (causal buffer slice, torch.where with finfo.min, + attention
    mask, fp32 scores) with left padding. Rows that see a key against float64; the left-padded
    rows that see none against the model run in fp32, whose scores are fp32 as in the bf16 model
    (finfo.min + finfo.min overflows to -inf there, not in float64)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPTNeoConfig(vocab_size=128, hidden_size=128, num_layers=2, num_heads=4,
                                    attention_types=[[["global", "local"], 1]], window_size=32,
                                    max_position_embeddings=256, bos_token_id=0, eos_token_id=0,
                                    attn_implementation="eager")
    model = transformers.GPTNeoForCausalLM(cfg).eval().bfloat16()
    ids = torch.randint(0, 128, (2, 100))
    mask = torch.ones(2, 100, dtype=torch.long)
    mask[1, :10] = 0
    be = attnopt.backend(ALL_SITES)
    torch._dynamo.reset()
    with torch.no_grad():
        logits = torch.compile(model, backend=be)(ids, attention_mask=mask).logits
        exact = model.double()(ids, attention_mask=mask).logits
        fp32 = model.float()(ids, attention_mask=mask).logits
    torch._dynamo.reset()
    att = [s for s in be.recorder.sites() if s.kind == "attention"]
    assert len(att) == 2 and all(s.status == "rewritten" for s in att), att
    assert rel_l1(logits[0].double(), exact[0]) <= 0.03 and rel_l1(logits[1, 10:].double(), exact[1, 10:]) <= 0.03
    assert rel_l1(logits[1, :10].double(), fp32[1, :10].double()) <= 0.03


@pytest.mark.parametrize("mask_dtype", [torch.bfloat16, torch.float32])
def test_causal_where_then_causal_padding_mask_fully_masked_rows(mask_dtype):
    """GPT-Neo with a 4-D causal + padding mask built in the graph (where(keep, 0, finfo.min)):
    left-padded rows see no key. Eager puts finfo.min + finfo.min = -inf where both masks drop a
    key and finfo.min where one does; the rewrite keeps those values (it must not read the second
    mask as a keep mask filling finfo.min), so fully masked rows come out as eager's fp32 ones."""
    q, k, v = (randn(B, H, N, D) for _ in range(3))
    keep = (torch.ones(N, N, dtype=torch.bool).tril()[None, None] & (torch.arange(N) >= 10)).expand(B, 1, N, N)
    keep = keep.clone()
    keep[0] = torch.ones(N, N, dtype=torch.bool).tril()  # batch 0 unpadded, batch 1 left-padded by 10

    def fn(q, k, v, keep):
        s = q.float() @ k.float().transpose(-1, -2) * D ** -0.5
        s = torch.where(torch.ones(N, N, dtype=torch.bool).tril(), s, torch.tensor(torch.finfo(torch.float32).min))
        m = torch.where(keep, 0.0, torch.finfo(mask_dtype).min).to(mask_dtype)
        return (s + m).softmax(-1).to(v.dtype) @ v

    eager_fp32 = fn(q.float(), k.float(), v.float(), keep)
    assert not torch.isnan(eager_fp32).any()
    _rewritten_and_exact(fn, q, k, v, keep, exact=eager_fp32)
