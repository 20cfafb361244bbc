"""The quantized linears' GPU bodies within their work budgets (codegen/work_count.py), their
split-K reduction deterministic, and every output element written.

Budgets, per call in steady state: one launch for W8A8 / FP8 up to FUSED_QUANT_MAX_M rows
(weight-only split-K, or the GEMM quantizing x in its prologue), two past it (the quantize
pre-kernel and the GEMM); one launch for W4A16 at every M; and no aten op that moves data (no
host-side sum, bias add, cast or copy of the activation or the output)."""

import pytest
import torch

from attnopt.codegen.linear import splitk
from attnopt.codegen.linear.w4a16 import linear_w4a16_triton
from attnopt.codegen.linear.w8a8 import FUSED_QUANT_MAX_M, linear_8bit_triton
from attnopt.codegen.work_count import count_work
from attnopt.ops import linear_ref as L

from helpers import rel_l1

K, N = 333, 72  # odd: partial K blocks, a partial column tile


def _8bit(fmt, k=K, n=N, bias=True):
    w = torch.randn(n, k) * 0.05
    wq, ws = L.quantize_weight(w, fmt)
    return wq, ws, (torch.randn(n).bfloat16() if bias else None)


def _w4(k=K, n=N, bias=True):
    pk, sc, zr = L.quantize_weight_int4(torch.randn(n, k) * 0.05)
    return pk, sc, zr, (torch.randn(n).bfloat16() if bias else None)


def _steady(fn, x):
    fn()  # first call: compiles, allocates the split-K counters
    return count_work(fn, full_size=x.numel())


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("shape,launches", [((1, K), ["_wonly_kernel"]), ((2, 4, K), ["_wonly_kernel"]),
                                            ((40, K), ["_gemm_8bit_kernel"]),
                                            ((2, 40, K), ["_quant_act_kernel", "_gemm_8bit_kernel"])])
def test_8bit_launch_and_pass_budget(fmt, shape, launches):
    wq, ws, b = _8bit(fmt, k=shape[-1] if shape[0] != 1 else 1024)  # M = 1: a K long enough to split
    x = torch.randn(*shape[:-1], wq.shape[1]).bfloat16()
    out, work = _steady(lambda: linear_8bit_triton(x, wq, ws, b, fmt, "cpu"), x)
    assert work.launches == launches, work.to_dict()
    assert work.full_size_passes == [] and work.aten_ops == [], work.to_dict()
    assert rel_l1(out, L.linear_w8a8_ref(x, wq, ws, b, fmt)) <= 1e-5


@pytest.mark.parametrize("m", [1, 8, 40])
def test_w4a16_launch_and_pass_budget(m):
    pk, sc, zr, b = _w4(k=1024)
    x = torch.randn(m, 1024).bfloat16()
    out, work = _steady(lambda: linear_w4a16_triton(x, pk, sc, zr, b), x)
    assert work.launches == ["_w4a16_kernel"], work.to_dict()
    assert work.full_size_passes == [] and work.aten_ops == [], work.to_dict()
    assert rel_l1(out, L.linear_w4a16_ref(x, pk, sc, zr, b)) <= 1e-5


def test_fused_quantization_is_the_pre_kernels_arithmetic():
    """Quantizing x in the GEMM's prologue or in the pre-kernel: bit for bit the same output."""
    k = 141  # several K blocks (the interpreter's 32), the last partial
    for fmt in ("int8", "fp8"):
        wq, ws, b = _8bit(fmt, k=k)
        for m in (17, FUSED_QUANT_MAX_M + 13):
            x = torch.randn(m, k).bfloat16() * torch.linspace(0.1, 3, k).bfloat16()
            fused = linear_8bit_triton(x, wq, ws, b, fmt, "cpu", fuse=True)
            separate = linear_8bit_triton(x, wq, ws, b, fmt, "cpu", fuse=False)
            assert torch.equal(fused, separate), (fmt, m)
            assert rel_l1(fused, L.linear_w8a8_ref(x, wq, ws, b, fmt)) <= 1e-5


def _split_sum(x, w, splits, per_split):
    """fp32 partials per K split (16-bit operands), added in split order: the kernel's order."""
    total = None
    for s in range(splits):
        ks = slice(s * per_split, min((s + 1) * per_split, x.shape[1]))
        p = x[:, ks].float() @ w[:, ks].float().T
        total = p if total is None else total + p
    return total


def test_split_k_is_deterministic_and_sums_in_split_order():
    k = 1024  # four splits
    wq, ws, b = _8bit("int8", k=k, bias=False)
    x = torch.randn(3, k)  # fp32 out (bf16 operands): the sums themselves are compared, unrounded
    splits, per_split = splitk.split_count(k, 64, 64)
    assert splits > 1
    runs = [linear_8bit_triton(x, wq, ws, None, "int8", "cpu") for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])  # bitwise, run after run
    w = (wq.float() * ws[:, None]).bfloat16()
    assert rel_l1(runs[0], _split_sum(x.bfloat16(), w, splits, per_split)) <= 1e-6
    assert rel_l1(runs[0], L.linear_w8a8_ref(x, wq, ws, None, "int8")) <= 1e-5
    pk, sc, zr, _ = _w4(k=k)
    w4 = [linear_w4a16_triton(x, pk, sc, zr, None) for _ in range(3)]
    assert all(torch.equal(w4[0], r) for r in w4[1:])
    assert rel_l1(w4[0], L.linear_w4a16_ref(x, pk, sc, zr, None)) <= 1e-5


def test_split_k_counters_are_left_at_zero():
    """Each tile's last split resets its ticket counter: no zeroing launch before the next call."""
    wq, ws, b = _8bit("fp8", k=512)  # two splits
    x = torch.randn(5, 512).bfloat16()
    for _ in range(2):
        linear_8bit_triton(x, wq, ws, b, "fp8", "cpu")
        pk, sc, zr, b4 = _w4(k=512)
        linear_w4a16_triton(x, pk, sc, zr, b4)
        counters = splitk.tile_counters(x, 1)
        assert counters.numel() >= 2 and not counters.any()


@pytest.mark.parametrize("m", [1, 7, 33, 77])
def test_poisoned_outputs_are_fully_written(m):
    """Every path stores every element of a NaN-filled output buffer (odd M, N and K; small M
    with a K long enough to split)."""
    k = 1061 if m <= 16 else K
    x = torch.randn(m, k).bfloat16()
    for fmt in ("int8", "fp8"):
        wq, ws, b = _8bit(fmt, k=k)
        out = torch.full((m, N), float("nan"), dtype=x.dtype)
        y = linear_8bit_triton(x, wq, ws, b, fmt, "cpu", out=out)
        assert y.data_ptr() == out.data_ptr() and torch.isfinite(out).all()
        assert rel_l1(out, L.linear_w8a8_ref(x, wq, ws, b, fmt)) <= 1e-5
    pk, sc, zr, b = _w4(k=k)
    out = torch.full((m, N), float("nan"), dtype=x.dtype)
    linear_w4a16_triton(x, pk, sc, zr, b, out=out)
    assert torch.isfinite(out).all() and rel_l1(out, L.linear_w4a16_ref(x, pk, sc, zr, b)) <= 1e-5
