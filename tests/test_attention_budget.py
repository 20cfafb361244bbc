"""The dense attention body's work budget (issue 15), counted with codegen/work_count on CPU.

Per call, in steady state: at most three Triton launches (K / V statistics, one fused Q / K / V
quantize, attention; the quantize launch is skipped when nothing is quantized) and no aten op
at all, full-size or not, for every format pair, prefill and decode, with and without the LSE,
soft-capping, masks, Q smoothing and GQA. Structural counts only, no timings.
"""

import math

import pytest
import torch

from attnopt.codegen.attention.launch import attention_triton
from attnopt.codegen.work_count import count_work

STATS, QUANT, ATTN = "_kv_stats_kernel", "_quant_qkv_kernel", "_attn_fwd"

CASES = [  # (quant, pv, nq, nk, hq, hkv, options)
    ("int8", "fp16", 130, 130, 2, 2, {}),
    ("int8", "fp8", 130, 130, 2, 2, {}),
    ("fp8", "fp8", 130, 130, 2, 2, {"return_lse": True}),
    ("fp4", "fp4", 130, 130, 2, 2, {"softcap": 30.0}),
    ("none", "fp16", 130, 130, 2, 2, {"return_lse": True, "softcap": 30.0}),
    ("int8", "fp16", 1, 256, 4, 2, {"return_lse": True}),  # decode, GQA
    ("int8", "fp8", 1, 256, 2, 2, {"softcap": 20.0, "return_lse": True}),
    ("none", "fp16", 1, 256, 4, 1, {}),
    ("int8", "fp16", 130, 130, 4, 1, {"smooth_q": True, "keep": True, "fill": -1e30}),
    ("fp8", "fp16", 130, 130, 2, 2, {"bias": True, "return_lse": True}),
]


def _call(quant, pv, nq, nk, hq, hkv, opts):
    d = 64
    q = torch.randn(1, hq, nq, d).half()
    k = torch.randn(1, hkv, nk, d).half()
    v = torch.randn(1, hkv, nk, d).half()
    keep = torch.rand(1, 1, nq, nk) > 0.2 if opts.get("keep") else None
    bias = torch.randn(1, hq, nq, nk).half() if opts.get("bias") else None

    def body():
        return attention_triton(q, k, v, bias, keep, opts.get("fill", -math.inf), True, nk - nq, d ** -0.5,
                                quant, pv, True, opts.get("smooth_q", False), "cpu",
                                return_lse=opts.get("return_lse", False), softcap=opts.get("softcap", 0.0))

    return body, (min(q.numel(), k.numel()) if nq > 1 else k.numel())


@pytest.mark.parametrize("quant,pv,nq,nk,hq,hkv,opts", CASES)
def test_dense_body_launches_three_kernels_and_no_aten_op(quant, pv, nq, nk, hq, hkv, opts):
    body, full_size = _call(quant, pv, nq, nk, hq, hkv, opts)
    body()  # warm: the count is the steady state's
    _, work = count_work(body, full_size=full_size)
    quantized = quant != "none" or pv != "fp16"
    assert work.launches == ([STATS, QUANT, ATTN] if quantized else [STATS, ATTN])
    assert work.full_size_passes == []
    assert work.aten_ops == []  # not even small ones: every statistic is a kernel's
