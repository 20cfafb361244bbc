"""Every Triton kernel variant compiles for the GPU architectures of the arch table, and can
launch there.

The other kernel tests run through Triton's interpreter, which runs code the compiler would
reject; this compiles each launch attnopt makes for the target (PTX and cubin, no GPU needed)
and checks its registers and shared memory against the arch's limits (codegen/launch_limits).
A subprocess, since the interpreter must be off. The fast tests compile one config of each
kernel for one arch and an impossible config; the slow ones every launched variant for each
arch (`python -m attnopt.codegen.compile_check` widens those to every autotune config:
benchmarks/results/compile_check.json).
"""

import json
import os
import subprocess
import sys

import pytest

from attnopt.codegen.arch import ARCHS
from attnopt.codegen.launch_limits import launch_problems, regs_per_block

_ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _compile_check(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "attnopt.codegen.compile_check", *args],
                          capture_output=True, text=True, env=_ENV, timeout=timeout)


def test_launch_limits_flag_what_cannot_launch():
    sm89, sm90 = ARCHS["sm89"], ARCHS["sm90"]
    assert launch_problems(sm90, 255, 8, 227 * 1024, 512) == []  # every limit reached, none passed
    assert regs_per_block(255, 8) == 65536  # 255 x 32 rounds up to 8192 per warp
    assert any("registers per thread" in p for p in launch_problems(sm90, 256, 4, 0))
    assert any("registers per block" in p for p in launch_problems(sm90, 200, 16, 0))
    assert any("threads per block" in p for p in launch_problems(sm90, 32, 33, 0))
    assert any("shared memory" in p for p in launch_problems(sm89, 32, 4, 100 * 1024))
    assert launch_problems(sm90, 32, 4, 100 * 1024) == []
    assert any("tensor-memory" in p for p in launch_problems(ARCHS["sm100"], 32, 4, 0, 513))


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "cpu"])
def test_the_cpu_paths_launch_configs_the_gpu_autotunes_over(arch, monkeypatch):
    """What a launch on CPU tensors runs (the table's first tile; forced tiles) is among the
    configs the GPU's autotuner tries for the same launch (capture only: nothing is compiled or
    run; the interpreter's own small GEMM tile, a deliberate speed choice, is switched off)."""
    from attnopt.codegen import compile_check

    for module in compile_check._launching_modules():
        if hasattr(module, "interpreted"):
            monkeypatch.setattr(module, "interpreted", lambda: False)
    launches = compile_check.capture(arch)
    tuned = [l for l in launches if compile_check._kernel_name(l.kernel) in compile_check.AUTOTUNE_SPACES]
    assert {compile_check._kernel_name(l.kernel) for l in tuned} == set(compile_check.AUTOTUNE_SPACES)
    drifted = [f"{l.label}: {compile_check._config_name(l.kwargs)}" for l in tuned
               if compile_check.outside_autotune_space(l, compile_check.widen(arch, l))]
    assert not drifted, drifted


def test_one_config_of_each_kernel_compiles_and_fits_sm89(tmp_path):
    """sm89 (99 KB of shared memory, FP8 but no TMA): the first config of each kernel except
    the XAttention scorer (slow to compile; the slow tests cover it)."""
    report = tmp_path / "report.json"
    proc = _compile_check("--arch", "sm89", "--per-kernel", "1", "--kernel", "^(?!_xattn)",
                          "--json", str(report), timeout=600)
    rows = json.loads(report.read_text())["rows"]
    assert proc.returncode == 0, "\n".join(l for l in proc.stdout.splitlines() if "FAIL" in l) + proc.stderr[-2000:]
    kernels = {r["kernel"] for r in rows}
    assert {"_attn_fwd", "_kv_stats_kernel", "_quant_qkv_kernel", "_sparge_lut_kernel", "_svg_lut_kernel",
            "_vsa_lut_kernel",
            "_mask_kernel", "_quant_act_kernel", "_gemm_8bit_kernel", "_wonly_kernel", "_w4a16_kernel"} <= kernels
    for r in rows:
        assert r["ok"] and r["arch"] == "sm89" and r["regs"] and 0 < r["regs"] <= 255, r
        assert r["spills"] is not None and r["seconds"] > 0, r
    attn = [r for r in rows if r["kernel"] == "_attn_fwd"]
    assert all(any("mma.sync" in m for m in r["mma"]) for r in attn)  # tensor cores, not FMA loops


def test_an_impossible_config_is_flagged():
    """A GEMM tile needing 112 KB of shared memory on sm89 (99 KB) compiles but cannot launch:
    beside a config that fits, the autotuner drops it (a warning); alone, the check fails."""
    code = """
import json, triton
from attnopt.codegen import compile_check as cc
too_big = triton.Config(dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=256, GROUP_M=8), num_warps=4, num_stages=8)
fits = triton.Config(dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, GROUP_M=8), num_warps=4, num_stages=2)
for space in ([too_big, fits], [too_big]):
    cc.AUTOTUNE_SPACES["_gemm_8bit_kernel"] = lambda arch, launch: space
    rows = cc.check("sm89", kernels="_gemm", per_kernel=len(space), drivers=["linear 8-bit"])
    print(json.dumps([r.row() for r in rows]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    beside, alone = (json.loads(line) for line in proc.stdout.strip().splitlines()[-2:])
    # the CPU path launches the table's first tile, which these spaces leave out: also a failure
    assert all(r["failed"] for r in beside + alone if "not in the kernel's autotune space" in r["error"])
    beside, alone = ([r for r in rows if "autotune space" not in r["error"]] for rows in (beside, alone))
    big, fit = beside
    assert not big["ok"] and big["shared"] > 99 * 1024 and "shared memory" in big["error"], big
    assert big["regs"] and "compile" not in big["error"], big  # it compiled: the limit check caught it
    assert big["dropped"] and not big["failed"] and fit["ok"], beside
    assert len(alone) == 1 and alone[0]["config"] == big["config"] and alone[0]["failed"], alone
    assert not alone[0]["dropped"], alone


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm80", "sm90", "sm100", "sm120"])
def test_every_kernel_variant_compiles(arch):
    proc = _compile_check("--arch", arch, "--configs", "launched")
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, "\n".join([l for l in lines if "FAIL" in l] or lines[-20:]) + proc.stderr[-2000:]
    compiled = [l for l in lines if l.startswith(arch)]
    assert len(compiled) >= 30, proc.stdout  # attention variants, quantize, predictors, masks, linears
    attn = [l for l in compiled if "_attn_fwd" in l]
    mma = {"sm80": "mma.sync", "sm90": "wgmma", "sm100": "tcgen05.mma", "sm120": "mma.sync"}[arch]
    assert all(mma in l for l in attn), "\n".join(attn)  # every attention variant runs on tensor cores
    if arch in ("sm100", "sm120"):
        assert any("fp4/fp4" in l and "mxf4nvf4" in l for l in attn)  # NVFP4 lowers to block-scaled MMA
        assert all("mxf4nvf4" in l for l in compiled if "_nvfp4_gemm_kernel" in l)  # the NVFP4 linear too
        assert any("_nvfp4_gemm_kernel" in l for l in compiled)


@pytest.mark.slow
def test_the_nvfp4_linear_compiles_to_block_scaled_fp4_mma_on_sm100():
    """The NVFP4 GEMM's tl.dot_scaled lowers to tcgen05's mxf4nvf4 with 16-element e4m3 scales
    (the interpreter tests cannot see this); the quantizer fits too. ~13 s on 2 cores."""
    proc = _compile_check("--arch", "sm100", "--driver", "linear nvfp4", timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    gemm = [l for l in proc.stdout.splitlines() if l.startswith("sm100") and "_nvfp4_gemm_kernel" in l]
    assert len(gemm) == 2 and all("mxf4nvf4.block_scale.block16" in l for l in gemm), proc.stdout
    assert sum("_quant_act_nvfp4_ker" in l for l in proc.stdout.splitlines()) == 2, proc.stdout


def test_a_driver_that_raises_is_a_failed_row(monkeypatch):
    """A launch path broken on the host is reported, not a crash that hides the other kernels."""
    from attnopt.codegen import compile_check

    def broken(arch, spec, cap):
        raise ValueError("no such head dim")

    monkeypatch.setitem(compile_check.DRIVERS, "broken", broken)
    rows = compile_check.check("sm89", drivers=["broken"])
    assert len(rows) == 1 and not rows[0].ok and "no such head dim" in rows[0].error
