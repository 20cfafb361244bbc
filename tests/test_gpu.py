"""GPU-only checks of whole models (skipped without CUDA): every attnopt op under CUDA graphs
with fullgraph=True, and peak memory against the original model.

Kernel compilation for each architecture is checked without a GPU in test_compile_check.py;
these run the compiled kernels.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

import attnopt
from attnopt.codegen.arch import ARCHS, detect_arch

from helpers import cuda_peak_bytes, rel_l1

pytestmark = pytest.mark.gpu


class Block(nn.Module):
    """A pre-norm transformer block with SDPA and a SwiGLU MLP: attention and linear sites."""

    def __init__(self, dim=512, heads=8, hidden=1536):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.qkv, self.o = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.gate, self.up = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, n, d))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def _model(layers=2, **kw):
    torch.manual_seed(0)
    return nn.Sequential(*[Block(**kw) for _ in range(layers)]).cuda().to(torch.bfloat16).eval()


def _formats():
    spec = ARCHS[detect_arch("cuda")] if torch.cuda.is_available() else ARCHS["sm80"]
    return [f for f in ("w8a8", "fp8", "w4a16", "nvfp4") if f in spec.linear_formats]


@pytest.mark.parametrize("linear", _formats())
@pytest.mark.parametrize("sparsity", [None, {"method": "window", "window": 256, "sinks": 64}])
def test_every_op_under_cuda_graphs_and_fullgraph(linear, sparsity):
    model = _model()
    x = torch.randn(2, 1024, 512, device="cuda", dtype=torch.bfloat16)
    opts = {"attention": {"min_seq_len": 0, "sparsity": sparsity}, "linear": {"quant": linear}}
    with torch.no_grad():
        want = model.double()(x.double()).float()
        model.to(torch.bfloat16)
        torch._dynamo.reset()
        f = torch.compile(model, backend=attnopt.backend(opts, mode="reduce-overhead"), fullgraph=True)
        for _ in range(3):  # warm-up, record, replay
            out = f(x)
        torch.cuda.synchronize()
        assert rel_l1(out.clone(), want) < (0.2 if linear == "nvfp4" else 0.05)  # W4A4: ~0.13 per linear
        torch._dynamo.reset()
        _, code = run_and_get_code(torch.compile(model, backend=attnopt.backend(opts), fullgraph=True), x)
    code = "\n".join(code)
    assert "_attn_fwd" in code and "attnopt.attention" not in code and "attnopt.sparse_attention" not in code
    kernel = {"w8a8": "_gemm_8bit_kernel", "fp8": "_gemm_8bit_kernel", "w4a16": "_w4a16_kernel",
              "nvfp4": "_nvfp4_gemm_kernel"}[linear]
    assert kernel in code


def test_peak_memory_of_a_model_not_above_the_original():
    """Quantized Q/K/V copies live only inside one attention call: the model's peak (set by its
    MLP activations and weights) must not grow. Compared with the original model, uncompiled."""
    model = _model(layers=4, dim=2048, heads=16, hidden=8192)
    x = torch.randn(1, 4096, 2048, device="cuda", dtype=torch.bfloat16)

    with torch.no_grad():
        model(x)
        original = cuda_peak_bytes(lambda: model(x))
        torch._dynamo.reset()
        ours = torch.compile(model, backend=attnopt.backend({"attention": {"min_seq_len": 0}}))
        ours(x)
        assert cuda_peak_bytes(lambda: ours(x)) <= original * 1.02
