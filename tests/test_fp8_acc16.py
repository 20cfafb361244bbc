"""FP8 P.V with FP16 accumulation per key tile (SageAttention2++; attention.pv = "fp8_acc16").

The reference rounds each key tile's e4m3 P.V sum to fp16 before the fp32 sum across tiles, as
the kernel's fp16 MMA accumulator holds it; its accuracy against float64 must stay at plain FP8
P.V's. The kernel runs under the interpreter against the reference; a compile for sm89 (no GPU)
shows the FP16-accumulating e4m3 MMA in its PTX. GPU runs: tests/test_gpu_kernels.py.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from attnopt.codegen.arch import ARCHS
from attnopt.codegen.attention.launch import attention_triton
from attnopt.ops.attention_ref import ACC16_BLOCK_N, FP8_MAX, V_ACC16_MAX, attention_exact, attention_reference

from helpers import rel_l1


def qkv(n, d, hq=2, hkv=2):
    return (torch.randn(1, hq, n, d).half(), torch.randn(1, hkv, n, d).half(), torch.randn(1, hkv, n, d).half())


def test_the_fp16_tile_sum_cannot_overflow():
    """The worst tile: every P~ = 448 (equal logits) and every V~ at +V_ACC16_MAX."""
    assert FP8_MAX * V_ACC16_MAX * ACC16_BLOCK_N <= torch.finfo(torch.float16).max
    q = torch.zeros(1, 1, 64, 64).half()
    k = torch.randn(1, 1, 256, 64).half()
    v = torch.cat([torch.ones(1, 1, 64, 64), -torch.ones(1, 1, 192, 64)], dim=2).half()  # mean -0.5
    ref = attention_reference(q, k, v, quant="int8", pv="fp8_acc16", block_n=64)
    got = attention_triton(q, k, v, None, None, -math.inf, False, 0, 0.125, "int8", "fp8_acc16", True, False, "cpu")
    exact = attention_exact(q, k, v)
    assert torch.isfinite(ref).all() and torch.isfinite(got).all()
    assert rel_l1(ref, exact) < 1e-2 and rel_l1(got, exact) < 1e-2


@pytest.mark.parametrize("n,d", [(256, 64), (700, 128)])
def test_reference_accuracy_stays_at_fp8_level(n, d):
    q, k, v = qkv(n, d)
    exact = attention_exact(q.double(), k.double(), v.double())
    fp8 = rel_l1(attention_reference(q, k, v, quant="int8", pv="fp8", block_n=64), exact)
    acc16 = attention_reference(q, k, v, quant="int8", pv="fp8_acc16", block_n=64)
    assert rel_l1(acc16, exact) <= min(0.05, 1.1 * fp8 + 1e-4), (rel_l1(acc16, exact), fp8)


def test_reference_rounds_each_tile_sum_to_fp16(monkeypatch):
    """Without the fp16 rounding the result moves: the emulation is not a no-op."""
    from attnopt.ops import attention_ref

    q, k, v = qkv(256, 64)
    rounded = attention_reference(q, k, v, quant="int8", pv="fp8_acc16", block_n=64)
    monkeypatch.setattr(attention_ref, "pv_tile", lambda p, v, pv: torch.matmul(p, v))
    unrounded = attention_reference(q, k, v, quant="int8", pv="fp8_acc16", block_n=64)
    assert not torch.equal(rounded, unrounded)


@pytest.mark.parametrize("quant,causal", [("int8", True), ("fp8", False)])
def test_kernel_under_the_interpreter_is_the_reference(quant, causal):
    q, k, v = qkv(200, 64, hq=4, hkv=2)
    out = torch.full_like(q, float("nan"))
    got = attention_triton(q, k, v, None, None, -math.inf, causal, 0, 0.125, quant, "fp8_acc16", True, False,
                           "cpu", out=out)
    assert not torch.isnan(got).any()
    ref = attention_reference(q, k, v, is_causal=causal, scale=0.125, quant=quant, pv="fp8_acc16", block_n=64)
    assert rel_l1(got, ref) <= 1e-4


def test_archs_without_the_fast_fp16_accumulating_mma_refuse_it():
    for arch in ("sm89", "sm120", "cpu"):
        assert ARCHS[arch].supports("int8", "fp8_acc16") is None
    for arch in ("sm80", "sm86", "sm90", "sm100"):
        assert "sm89 or sm120" in ARCHS[arch].supports("int8", "fp8_acc16")


_PTX_PROBE = """
import json, math, torch
from attnopt.codegen import compile_check
from attnopt.codegen.arch import ARCHS
from attnopt.codegen.attention.launch import attention_triton
q, k, v = (torch.randn(1, 2, 128, 64).half() for _ in range(3))
mma = {}
for pv in ("fp8", "fp8_acc16"):
    with compile_check.capturing() as cap:
        attention_triton(q, k, v, None, None, -math.inf, False, 0, 0.125, "int8", pv, True, False, "sm89",
                         tile=ARCHS["sm89"].default_tile(64))
    res = compile_check.compile_launch(cap.launches[-1], ARCHS["sm89"])
    mma[pv] = [res.ok, res.error, res.mma]
print(json.dumps(mma))
"""


def test_sm89_ptx_holds_the_fp16_accumulating_e4m3_mma():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _PTX_PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    mma = json.loads(proc.stdout.strip().splitlines()[-1])
    assert mma["fp8_acc16"][0], mma
    assert "mma.sync.aligned.m16n8k32.row.col.f16.e4m3.e4m3.f16" in mma["fp8_acc16"][2], mma
    assert "mma.sync.aligned.m16n8k32.row.col.f16.e4m3.e4m3.f16" not in mma["fp8"][2], mma
