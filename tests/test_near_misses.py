"""Graphs that look like attention but are not (or cannot be replaced) must stay as they were."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnopt
from helpers import ALL_SITES, inspect, randn, rel_l1

B, H, N, D = 2, 4, 77, 32


def _run(fn, *inputs):
    class M(nn.Module):
        def forward(self, *a):
            return fn(*a)

    report = inspect(M(), *inputs)
    report.fn, report.inputs = fn, inputs
    torch._dynamo.reset()
    return report


def _qkv():
    return randn(B, H, N, D), randn(B, H, N, D), randn(B, H, N, D)


def _assert_untouched(report):
    """Nothing rewritten, and the output is bit-for-bit what plain Inductor gives."""
    assert not report.rewritten("attention"), report
    torch._dynamo.reset()
    ours = torch.compile(report.fn, backend=attnopt.backend(ALL_SITES))(*report.inputs)
    torch._dynamo.reset()
    plain = torch.compile(report.fn, backend="inductor")(*report.inputs)
    for a, b in zip(ours if isinstance(ours, tuple) else (ours,), plain if isinstance(plain, tuple) else (plain,)):
        assert torch.equal(a, b)


def test_softmax_over_wrong_dim_is_not_attention():
    r = _run(lambda q, k, v: (q @ k.transpose(-1, -2)).softmax(dim=-2) @ v, *_qkv())
    _assert_untouched(r)
    assert not r.sites


def test_scale_after_softmax_is_not_captured():
    r = _run(lambda q, k, v: ((q @ k.transpose(-1, -2)).softmax(dim=-1) * 0.5) @ v, *_qkv())
    _assert_untouched(r)


def test_multiplicative_mask_is_skipped_with_reason():
    m = torch.rand(1, 1, N, N).bfloat16()
    r = _run(lambda q, k, v, m: ((q @ k.transpose(-1, -2)) * m).softmax(dim=-1) @ v, *_qkv(), m)
    _assert_untouched(r)
    assert r.sites and "not a scale or mask" in r.sites[0].reason


def test_probs_transposed_before_pv_is_not_captured():
    r = _run(lambda q, k, v: (q @ k.transpose(-1, -2)).softmax(dim=-1).transpose(-1, -2) @ v, *_qkv())
    _assert_untouched(r)


def test_values_on_the_left_is_not_attention():
    q, k, v = _qkv()
    r = _run(lambda q, k, v: v.transpose(-1, -2) @ (q @ k.transpose(-1, -2)).softmax(dim=-1), q, k, v)
    _assert_untouched(r)


def test_returned_attention_weights_keep_the_site_dense():
    def f(q, k, v):
        p = (q @ k.transpose(-1, -2) * D ** -0.5).softmax(dim=-1)
        return p @ v, p

    r = _run(f, *_qkv())
    _assert_untouched(r)
    assert "used elsewhere" in r.sites[0].reason


def test_logit_softcap_is_captured_and_exact():
    """Soft-capping runs inside the kernel (cap 30, scale 1/30 * 30 = 1)."""
    def f(q, k, v):
        s = torch.tanh(q @ k.transpose(-1, -2) / 30.0) * 30.0
        return s.softmax(dim=-1) @ v

    q, k, v = _qkv()
    r = _run(f, q, k, v)
    assert r.rewritten("attention") and r.sites[0].details["softcap"] == 30.0, r
    torch._dynamo.reset()
    out = torch.compile(f, backend=attnopt.backend(ALL_SITES))(q, k, v)
    assert rel_l1(out.double(), f(q.double(), k.double(), v.double())) < 0.025


def test_bias_inside_softcap_tanh_is_skipped_with_reason():
    bias = randn(1, 1, N, N)

    def f(q, k, v, bias):
        s = torch.tanh((q @ k.transpose(-1, -2) + bias) / 30.0) * 30.0
        return s.softmax(dim=-1) @ v

    r = _run(f, *_qkv(), bias)
    _assert_untouched(r)
    assert r.sites and "soft-capping" in r.sites[0].reason


def test_relative_position_matmul_in_logits_is_skipped():
    pos = randn(B, H, N, D)

    def f(q, k, v, pos):
        s = q @ k.transpose(-1, -2) + q @ pos.transpose(-1, -2)
        return s.softmax(dim=-1) @ v

    r = _run(f, *_qkv(), pos)
    _assert_untouched(r)


def test_small_finite_fill_is_not_a_mask():
    keep = torch.rand(N, N) > 0.5

    def f(q, k, v, keep):
        s = torch.where(keep, q @ k.transpose(-1, -2), -5.0)
        return s.softmax(dim=-1) @ v

    r = _run(f, *_qkv(), keep)
    _assert_untouched(r)


def test_masks_of_3d_scores_stay_correct():
    """[B*H, N, N] scores with masks shaped per batch*head and shared."""
    q, k, v = (randn(B * H, N, D) for _ in range(3))
    per = torch.where(torch.rand(B * H, N, N) > 0.3, 0.0, float("-inf")).bfloat16()
    per[..., 0] = 0  # no fully masked rows

    def f(q, k, v, m):
        return (torch.bmm(q, k.transpose(1, 2)) * D ** -0.5 + m).softmax(-1) @ v

    r = _run(f, q, k, v, per)
    assert r.rewritten("attention") and r.summary["e2e"]["rel_l1"] < 0.03, r
    shared = per[:1]
    r = _run(f, q, k, v, shared)
    assert r.rewritten("attention") and r.summary["e2e"]["rel_l1"] < 0.03, r


def test_attention_dropout_in_training_is_skipped():
    m = nn.Module()

    class Drop(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)

    del m
    report = inspect(Drop().train(), *_qkv())
    assert not report.rewritten("attention")
    assert "dropout" in report.sites[0].reason


def test_rewrite_equals_uncompiled_numerically():
    q, k, v = _qkv()
    r = _run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), q, k, v)
    assert r.summary["e2e"]["rel_l1"] < 0.02
    assert rel_l1(q, q) == 0


def _head_mask():
    """A per-head additive mask [H, 1, N, N]: 30% masked, no fully masked row."""
    m = torch.where(torch.rand(H, 1, N, N) > 0.3, 0.0, float("-inf"))
    m[..., 0] = 0.0
    return m


def _flat_head_major(q, k, v, m):
    """Logits flattened batch-major ([B*H], b*H + h) plus a mask flattened head-major (h*B + b):
    row b*H + h gets mask[(b*H + h) // B], not mask[h] as a broadcast over heads would give."""
    qf, kf, vf = (t.reshape(B * H, N, D) for t in (q, k, v))
    mf = m.expand(H, B, N, N).reshape(H * B, N, N)
    return torch.bmm((torch.bmm(qf, kf.transpose(1, 2)) * D ** -0.5 + mf).softmax(-1), vf).view(B, H, N, D)


def test_mask_not_broadcast_over_heads_as_assumed_stays_correct():
    q, k, v = (randn(B, H, N, D, dtype=torch.float32) for _ in range(3))
    m = _head_mask()
    exact = _flat_head_major(q.double(), k.double(), v.double(), m.double())
    per_head = ((q.double() @ k.double().transpose(-1, -2)) * D ** -0.5 + m.double().transpose(0, 1)).softmax(-1) \
        @ v.double()
    assert rel_l1(per_head, exact) > 0.2  # reading the mask as broadcast over heads would be far off
    r = _run(_flat_head_major, *(t.bfloat16() for t in (q, k, v, m)))
    assert r.rewritten("attention"), r
    torch._dynamo.reset()
    out = torch.compile(_flat_head_major, backend=attnopt.backend(ALL_SITES))(*r.inputs)
    assert rel_l1(out.double(), exact) < 0.025


def test_sdpa_3d_with_flattened_head_mask_stays_correct():
    """SDPA on [B*H, N, D] with a [B*H, N, N] mask: the rewrite must keep each row's own mask."""
    qf, kf, vf = (randn(B * H, N, D, dtype=torch.float32) for _ in range(3))
    mf = _head_mask().expand(H, B, N, N).reshape(H * B, N, N)
    sdpa = (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m))
    exact = sdpa(qf.double(), kf.double(), vf.double(), mf.double())
    r = _run(sdpa, *(t.bfloat16() for t in (qf, kf, vf, mf)))
    assert r.rewritten("attention"), r
    torch._dynamo.reset()
    out = torch.compile(sdpa, backend=attnopt.backend(ALL_SITES))(*r.inputs)
    assert rel_l1(out.double(), exact) < 0.025


def test_additive_mask_after_a_finite_additive_fill_is_skipped():
    """(s + where(keep, 0, -1e4)) + m: a finite fill read from an additive mask cannot be kept
    exact as a bias of its own (s + fill is not fill), so the site stays as it was."""
    keep = torch.rand(N, N) > 0.3
    bias = randn(1, 1, N, N)

    def f(q, k, v, keep, bias):
        s = q @ k.transpose(-1, -2) * 0.125 + torch.where(keep, 0.0, -1e4).to(q.dtype)
        s = torch.where(keep, s, -1e4) + bias
        return s.softmax(-1) @ v

    r = _run(f, *_qkv(), keep, bias)
    q, k, v = r.inputs[:3]
    if r.rewritten("attention"):  # allowed only when it equals float64
        torch._dynamo.reset()
        out = torch.compile(f, backend=attnopt.backend(ALL_SITES))(*r.inputs)
        exact = f(q.double(), k.double(), v.double(), keep, bias.double())
        assert rel_l1(out.double(), exact) < 0.025
    else:
        _assert_untouched(r)


def test_baddbmm_bias_inside_softcap_is_skipped():
    alibi = randn(B * H, 1, N)

    def f(q, k, v, alibi):
        s = torch.baddbmm(alibi, q, k.transpose(1, 2), beta=1.0, alpha=0.125)
        return (torch.tanh(s / 5.0) * 5.0).softmax(-1) @ v

    qf, kf, vf = (t.reshape(B * H, N, D) for t in _qkv())
    r = _run(f, qf, kf, vf, alibi)
    _assert_untouched(r)
    assert "soft-capping" in r.sites[0].reason


def test_mask_read_as_scores_is_impossible_with_scale_between_layout_ops():
    """bmm -> scale -> view -> + mask: the mask (not the scores) is the bias; float64-exact."""
    m = torch.where(torch.rand(B, 1, N, N) > 0.3, 0.0, float("-inf"))
    m[..., 0] = 0.0

    def f(q, k, v, m):
        s = (torch.bmm(q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2)) * 0.125).view(B, H, N, N) + m
        return torch.bmm(s.softmax(-1).to(v.dtype).flatten(0, 1), v.flatten(0, 1)).view(B, H, N, D)

    q, k, v = _qkv()
    r = _run(f, q, k, v, m)
    assert r.rewritten("attention"), r
    torch._dynamo.reset()
    out = torch.compile(f, backend=attnopt.backend(ALL_SITES))(q, k, v, m)
    assert rel_l1(out.double(), f(q.double(), k.double(), v.double(), m.double())) < 0.025


@pytest.mark.parametrize("scale_by", ["0-d tensor input", "per-channel vector", "per-head tensor"])
def test_q_scaled_by_a_tensor_is_not_folded_as_a_constant(scale_by):
    """Near miss of the split scale: a tensor multiplier is part of q (or the site is skipped), never
    read as a constant; either way the result is the float64 one."""
    q, k, v = _qkv()
    t = {"0-d tensor input": torch.tensor(0.3), "per-channel vector": torch.rand(D) + 0.5,
         "per-head tensor": torch.rand(1, H, 1, 1) + 0.5}[scale_by]
    t = t if t.dim() == 0 else t.to(q.dtype)  # a 0-d tensor does not promote q

    def fn(q, k, v, t):
        return ((q * t) @ k.transpose(-1, -2)).softmax(-1) @ v

    r = _run(fn, q, k, v, t)
    (site,) = r.sites
    if site.status == "rewritten":
        assert site.details["scale"] == 1.0, site.details  # the tensor stays in q
    torch._dynamo.reset()
    out = torch.compile(fn, backend=attnopt.backend(ALL_SITES))(q, k, v, t)
    exact = fn(q.double(), k.double(), v.double(), t.double())
    assert rel_l1(out.double(), exact) < 0.025
