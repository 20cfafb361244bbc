"""NVFP4 attention (docs/algorithms.md#nvfp4-microscaling): the format's arithmetic, the quantize
kernels, the scaled dot's operand layout, and the attention kernel (interpreter) against the
reference and float64.

Blackwell runs `tl.dot_scaled` natively; here the interpreter checks the values it multiplies.
"""

import math

import pytest
import torch
import triton
import triton.language as tl

import attnopt
from attnopt.codegen.arch import ARCHS, resolve_pv
from attnopt.codegen.attention.launch import attention_triton
from attnopt.codegen.attention.quantize import quantize_rows_triton, quantize_v_fp4
from attnopt.codegen.microscaling import fp4_dot
from attnopt.ops import nvfp4
from attnopt.ops.attention_ref import attention_exact, attention_reference

from helpers import inspect, rel_l1

# Random standard-normal inputs are FP4's hard case (near-uniform attention): measured
# 0.17-0.19 (fp4/fp4) and 0.12-0.13 (one side fp4) rel-L1 against float64.
BOUND_EXACT = {("fp4", "fp4"): 0.22, ("fp4", "fp16"): 0.15, ("int8", "fp4"): 0.15}
# kernel vs reference run with the kernel's key tile (the same online softmax): ~1e-7, only a value
# on an e2m1 / e4m3 rounding boundary may fall the other way after fp32 reassociation. Against the
# one-tile reference (P rounded against the final row max) the two are different quantizations
# of the same P, each ~0.1 off, and differ by up to a fifth of that.
BOUND_REF = {"same_tiles": 2e-4, "one_tile": 0.05}


# ------------------------------------------------------------------------------ the format

def test_e2m1_rounds_to_nearest_ties_to_even():
    y = torch.tensor([0.0, 0.24, 0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.1, 7.0, 100.0, -0.25, -0.3, -6.5])
    want = torch.tensor([0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, 0.0, -0.5, -6.0])
    got = nvfp4.e2m1_decode(nvfp4.e2m1_codes(y))
    assert torch.equal(got, want), got
    assert nvfp4.e2m1_codes(torch.tensor([-0.1])).item() == 0  # no negative zero code


def test_pack_unpack_roundtrip():
    codes = torch.randint(0, 16, (3, 5, 64), dtype=torch.uint8)
    packed = nvfp4.pack(codes)
    assert packed.shape == (3, 5, 32) and torch.equal(packed[..., 0] & 15, codes[..., 0])
    assert torch.equal(nvfp4.unpack(packed), codes)


@pytest.mark.parametrize("n,d", [(1, 32), (77, 64), (333, 96)])
def test_quantize_error_is_within_half_a_step(n, d):
    x = torch.randn(2, n, d) * torch.rand(2, n, 1) * 10
    codes, gs, outer = nvfp4.quantize_rows(x, 32)
    deq = nvfp4.fake_quantize_rows(x, 32)
    assert deq.shape == x.shape and gs.dtype == torch.float8_e4m3fn
    g = (gs.float().repeat_interleave(16, -1) * outer.repeat_interleave(32, -1)[..., :n, None])[..., :d]
    # the e2m1 grid's widest half-step is 1 (between 4 and 6); a group's max may round its scale
    # down by e4m3's half-ulp (1/16), so the top value may saturate by that much
    assert ((deq - x).abs() <= g * 1.0 + x.abs() * 0.0625 + 1e-6).all()
    assert rel_l1(deq, x) < 0.12
    assert gs.float().max() <= 448 and (gs.float().amax(dim=-1).amax(dim=-1) > 200).all()


# ------------------------------------------------------------------------------ quantize kernels

@pytest.mark.parametrize("n,d", [(1, 32), (77, 64), (200, 96), (333, 128)])
def test_quantize_kernel_is_bitwise_the_reference(n, d):
    x = torch.randn(2, 3, n, d).half() * 3
    mean = x.float().mean(dim=-2)
    (xq, xg), xs, _ = quantize_rows_triton(x, 32, "fp4", mult=0.37, mean=mean)
    codes, gs, outer = nvfp4.quantize_rows((x.float() - mean[:, :, None]) * 0.37, 32)
    dp = codes.shape[-1]
    assert torch.equal(xs, outer)
    assert torch.equal(nvfp4.unpack(xq)[..., :dp], codes)
    assert torch.equal(xg[..., :dp // 16].float(), gs.float())
    assert (nvfp4.unpack(xq)[..., dp:] == 0).all() and (xg[..., dp // 16:].float() == 0).all()


def test_quantize_v_kernel():
    v = torch.randn(2, 2, 77, 96).half() + torch.randn(96).half()
    vq, vg, vsc, vm = quantize_v_fp4(v, 128)
    vs = v.float() - v.float().mean(-2, keepdim=True)
    local, outer = nvfp4.quantize_v(vs)
    deq = nvfp4.e2m1_decode(nvfp4.unpack(vq)) * vg.float().repeat_interleave(16, -1)
    assert torch.equal(deq[:, :, :96, :77].transpose(-1, -2), local)
    assert torch.allclose(vsc, outer[:, :, 0]) and torch.allclose(vm, v.float().mean(-2))
    assert (deq[:, :, :, 77:] == 0).all() and (deq[:, :, 96:] == 0).all()


# ------------------------------------------------------------------------------ the scaled dot

@triton.jit
def _dots(A, AS, AS8, B, BS, BS8, O_EMU, O_NATIVE, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
    rm, rn = tl.arange(0, M), tl.arange(0, N)
    rk2, rg = tl.arange(0, K // 2), tl.arange(0, K // 16)
    a = tl.load(A + rm[:, None] * (K // 2) + rk2[None, :])
    b = tl.load(B + rk2[:, None] * N + rn[None, :])
    a_s = tl.load(AS + rm[:, None] * (K // 16) + rg[None, :])
    b_s = tl.load(BS + rn[:, None] * (K // 16) + rg[None, :])
    tl.store(O_EMU + rm[:, None] * N + rn[None, :], fp4_dot(a, a_s, b, b_s, M, K, N, True))
    a_s8 = tl.load(AS8 + rm[:, None] * (K // 16) + rg[None, :])
    b_s8 = tl.load(BS8 + rn[:, None] * (K // 16) + rg[None, :])
    tl.store(O_NATIVE + rm[:, None] * N + rn[None, :], tl.dot_scaled(a, a_s8, "e2m1", b, b_s8, "e2m1"))


def test_packed_operands_mean_the_same_to_dot_scaled():
    """Our operand layout (lhs packed along K, rhs [K/2, N] packed along K, rhs scales [N, K/16])
    against tl.dot_scaled itself. The interpreter decodes scales as e8m0 only, so the e4m3 group
    scales here are powers of two, given to dot_scaled as their e8m0 bytes."""
    m, k, n = 32, 64, 16
    a_codes = torch.randint(0, 16, (m, k), dtype=torch.uint8)
    b_codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)  # B^T rows: K contiguous per column
    exp_a = torch.randint(-4, 5, (m, k // 16))
    exp_b = torch.randint(-4, 5, (n, k // 16))
    a = nvfp4.pack(a_codes)
    b = nvfp4.pack(b_codes).T.contiguous()  # [K/2, N]
    a_s, b_s = (torch.exp2(e.float()).to(torch.float8_e4m3fn) for e in (exp_a, exp_b))
    a_s8, b_s8 = ((e + 127).to(torch.uint8) for e in (exp_a, exp_b))
    emu, native = torch.full((m, n), float("nan")), torch.full((m, n), float("nan"))
    _dots[(1,)](a, a_s, a_s8, b, b_s, b_s8, emu, native, m, k, n)
    want = (nvfp4.e2m1_decode(a_codes) * a_s.float().repeat_interleave(16, -1)) @ \
           (nvfp4.e2m1_decode(b_codes) * b_s.float().repeat_interleave(16, -1)).T
    torch.testing.assert_close(emu, want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(native, want, rtol=1e-6, atol=1e-5)


# ------------------------------------------------------------------------------ attention kernel

def qkv(b, hq, hkv, nq, nk, d, dtype=torch.float16):
    return torch.randn(b, hq, nq, d).to(dtype), torch.randn(b, hkv, nk, d).to(dtype), torch.randn(b, hkv, nk, d).to(dtype)


def run(q, k, v, quant="fp4", pv="fp4", keep=None, bias=None, causal=False, smooth_q=False, fill=-math.inf):
    scale = 1 / math.sqrt(q.shape[-1])
    out = torch.full((q.shape[0], q.shape[1], q.shape[2], v.shape[3]), float("nan"), dtype=q.dtype)
    got = attention_triton(q, k, v, bias, keep, fill, causal, 0, scale, quant, pv, True, smooth_q, "cpu", out=out)
    assert got is out and not torch.isnan(got).any(), "kernel left elements unwritten"
    block_n = ARCHS["cpu"].default_tile(q.shape[-1], quant, pv).block_n
    ref = attention_reference(q, k, v, bias, keep, fill, causal, 0, scale, quant, pv, True, smooth_q,
                              block_n=block_n)
    exact = attention_exact(q, k, v, bias, keep, fill, causal, 0, scale)
    assert rel_l1(got, ref) <= BOUND_REF["same_tiles"]
    one = attention_reference(q, k, v, bias, keep, fill, causal, 0, scale, quant, pv, True, smooth_q)
    assert rel_l1(got, one) <= BOUND_REF["one_tile"]
    assert rel_l1(ref, exact) <= BOUND_EXACT[(quant, pv)]
    assert rel_l1(got, exact) <= BOUND_EXACT[(quant, pv)]
    return got, ref


@pytest.mark.parametrize("n,causal", [(1, False), (50, False), (77, True), (200, False), (333, True)])
def test_odd_lengths(n, causal):
    run(*qkv(1, 2, 2, n, n, 64), causal=causal)


@pytest.mark.parametrize("d", [32, 96, 128])
def test_head_dims(d):
    run(*qkv(1, 2, 1, 70, 90, d))


@pytest.mark.parametrize("quant,pv", [("fp4", "fp16"), ("int8", "fp4")])
def test_one_side_fp4(quant, pv):
    run(*qkv(1, 4, 2, 100, 130, 64), quant=quant, pv=pv, causal=True)


def test_masks_gqa_and_q_smoothing():
    q, k, v = qkv(2, 4, 2, 65, 140, 64, torch.bfloat16)
    keep = torch.rand(2, 1, 65, 140) > 0.3
    keep[1, 0, 7] = False  # a fully masked row: 0, as torch SDPA
    got, _ = run(q, k, v, keep=keep, smooth_q=True)
    assert (got[1, :, 7] == 0).all()
    bias = torch.randn(65, 140)
    run(q, k, v, bias=bias)


# ------------------------------------------------------------------------------ arch and options

def test_fp4_needs_blackwell_and_pv_auto_follows():
    assert "sm100+" in ARCHS["sm90"].supports("fp4", "fp4")
    assert ARCHS["sm100"].supports("fp4", "fp4") is None and ARCHS["sm120"].supports("fp4", "fp4") is None
    assert resolve_pv("auto", "fp4", ARCHS["sm100"]) == "fp4"
    assert resolve_pv("auto", "int8", ARCHS["sm100"]) == "fp8"


class _Attn(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_site_reports_fp4_variant_and_its_error():
    q, k, v = qkv(1, 2, 2, 150, 150, 64, torch.bfloat16)
    rep = inspect(_Attn(), q, k, v, options={"attention": {"quant": "fp4"}})
    site = next(s for s in rep.sites if s.kind == "attention")
    assert site.status == "rewritten" and "fp4qk-fp4pv" in site.kernel
    assert 0.05 < site.error["rel_l1"] <= BOUND_EXACT[("fp4", "fp4")]
    rep = inspect(_Attn(), q, k, v, options={"attention": {"quant": "fp4"}, "arch": "sm90"})
    site = next(s for s in rep.sites if s.kind == "attention")
    assert site.status == "skipped" and "sm100+" in site.reason


def test_plug_and_play_function_takes_fp4():
    q, k, v = qkv(1, 2, 2, 80, 80, 64, torch.bfloat16)
    out = attnopt.attention(q, k, v, is_causal=True, quant="fp4")
    ref = attention_reference(q, k, v, is_causal=True, quant="fp4", pv="fp4",
                              block_n=ARCHS["cpu"].default_tile(64, "fp4", "fp4").block_n)
    assert torch.equal(out, ref)
    with pytest.raises(attnopt.ConfigError, match="fp4"):
        attnopt.attention(q, k, v, quant="fp2")


def test_block_sparse_and_second_stage_in_fp4():
    """The sparse LUT path with NVFP4; the second-stage reference walks tiles in the kernel's order
    with a running max, so there the kernel must match it as closely as within one tile."""
    from attnopt.ops import sparse_ref as R

    q, k, v = qkv(1, 2, 2, 300, 300, 64)
    keep = torch.rand(1, 2, R.n_blocks(300, R.BQ), R.n_blocks(300, R.BK)) > 0.4
    keep[..., 0] = True
    lut, counts = R.block_mask_to_lut(keep, 300, 300, True, 0)
    ref = R.sparse_attention_reference(q, k, v, keep, None, None, -math.inf, True, 0, 0.125, "fp4", "fp4")
    out = torch.full_like(ref, float("nan"))
    attention_triton(q, k, v, None, None, -math.inf, True, 0, 0.125, "fp4", "fp4", True, False, "cpu",
                     out=out, lut=lut, counts=counts)
    assert not torch.isnan(out).any() and rel_l1(out, ref) <= BOUND_REF["one_tile"]
    lam = torch.full((2,), 40.0)  # far above any gap: every tile runs, in LUT order
    ref2 = R.sparse_attention_reference(q, k, v, keep, None, None, -math.inf, True, 0, 0.125, "fp4", "fp4",
                                        pv_threshold=lam)
    out2 = attention_triton(q, k, v, None, None, -math.inf, True, 0, 0.125, "fp4", "fp4", True, False, "cpu",
                            lut=lut, counts=counts, pv_threshold=lam)
    assert rel_l1(out2, ref2) <= BOUND_REF["same_tiles"]
    exact = attention_exact(q, k, v, torch.where(R.expand_block_mask(keep, 300, 300), 0.0, -math.inf), None,
                            -math.inf, True, 0, 0.125)
    assert rel_l1(ref, exact) <= BOUND_EXACT[("fp4", "fp4")]
