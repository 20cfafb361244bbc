"""The training linear's compiled Triton kernels on a GPU (skipped without CUDA): the per-block
quantizer and the autotuned block GEMM against the reference arithmetic, poisoned outputs, and a
compiled training step whose kernels AOTAutograd inlines. Run with the interpreter off:
`TRITON_INTERPRET=0 python -m pytest -m gpu tests/test_gpu_linear_training.py`."""

import pytest
import torch
import torch.nn.functional as F

import attnopt
from attnopt.codegen.arch import ARCHS, detect_arch
from attnopt.codegen.linear.block_gemm import block_gemm_triton, quantize_blocks_triton
from attnopt.ops import linear_train_ref as R

from helpers import rel_l1

pytestmark = pytest.mark.gpu

ARCH = detect_arch("cuda") if torch.cuda.is_available() else "sm80"
FORMATS = [f for f in ("int8", "fp8") if {"int8": "w8a8", "fp8": "fp8"}[f] in ARCHS[ARCH].linear_formats]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantizer_and_block_gemm_match_the_reference(fmt, dtype):
    act, grad = R.operand_formats(fmt)
    x = torch.randn(1000, 777, device="cuda").to(dtype)
    w = (torch.randn(1536, 777, device="cuda") * 0.05).to(dtype)
    for t, qfmt in ((x, act), (w, act), (x * 1e-4, grad)):
        (q1, s1), (q2, s2) = R.quantize_blocks(t.cpu(), qfmt), quantize_blocks_triton(t, qfmt)
        assert torch.equal(q1.view(torch.int8), q2.cpu().view(torch.int8)) and torch.equal(s1, s2.cpu())
    xq, xs = quantize_blocks_triton(x, act)
    wq, ws = quantize_blocks_triton(w, act)
    bias = torch.randn(1536, device="cuda").to(dtype)
    for a, sa, b, sb, bi in ((xq, xs, wq, ws, bias), (xq.t(), xs.t(), xq.t(), xs.t(), None)):  # forward; a dW-like
        out = torch.full((a.shape[0], b.shape[0]), float("nan"), device="cuda", dtype=dtype)
        block_gemm_triton(a, sa, b, sb, dtype, bi, out=out)
        ref = R.block_gemm_ref(a.cpu(), sa.cpu(), b.cpu(), sb.cpu(), dtype, bi.cpu() if bi is not None else None)
        assert torch.isfinite(out).all() and rel_l1(out, ref) <= 1e-3


@pytest.mark.parametrize("fmt", FORMATS)
def test_compiled_training_step_on_cuda(fmt):
    """The op inlined into Inductor's graph (forward and backward kernels) gives the reference's
    gradients and the float64 ones within the formats' bounds."""
    torch._dynamo.reset()
    lin = torch.nn.Linear(384, 520).cuda().bfloat16()
    x = torch.randn(4, 300, 384, device="cuda").bfloat16().requires_grad_()
    f = torch.compile(lambda t: lin(t), backend=attnopt.backend({"linear": {"training": fmt}}), fullgraph=True)
    gy = torch.randn(4, 300, 520, device="cuda").bfloat16()
    f(x).backward(gy)
    xd, wd = x.detach().double().requires_grad_(), lin.weight.detach().double().requires_grad_()
    F.linear(xd, wd, lin.bias.detach().double()).backward(gy.double())
    bound = 0.03 if fmt == "int8" else 0.08
    assert rel_l1(x.grad, xd.grad) <= bound and rel_l1(lin.weight.grad, wd.grad) <= bound
