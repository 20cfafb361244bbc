"""Every Triton kernel variant compiles for the GPU architectures of the arch table.

The other kernel tests run through Triton's interpreter, which runs code the compiler would
reject; this compiles each launch attnopt makes for the target (PTX and cubin, no GPU needed)
and checks it fits the arch's shared memory. A subprocess, since the interpreter must be off.
"""

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm80", "sm90", "sm100", "sm120"])
def test_every_kernel_variant_compiles(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "attnopt.codegen.compile_check", "--arch", arch],
                          capture_output=True, text=True, env=env, timeout=900)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, "\n".join([l for l in lines if " FAIL " in l] or lines[-20:]) + proc.stderr[-2000:]
    compiled = [l for l in lines if l.startswith(arch)]
    assert len(compiled) >= 30, proc.stdout  # attention variants, quantize, predictors, masks, linears
    attn = [l for l in compiled if "_attn_fwd" in l]
    mma = {"sm80": "mma.sync", "sm90": "wgmma", "sm100": "tcgen05.mma", "sm120": "mma.sync"}[arch]
    assert all(mma in l for l in attn), "\n".join(attn)  # every attention variant runs on tensor cores
    if arch in ("sm100", "sm120"):
        assert any("fp4/fp4" in l and "mxf4nvf4" in l for l in attn)  # NVFP4 lowers to block-scaled MMA
