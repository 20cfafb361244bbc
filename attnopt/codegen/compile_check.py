"""Compile every Triton kernel variant attnopt launches, for a GPU architecture, without a GPU.

The CPU tests run the kernels through Triton's interpreter, which executes the Python body as
it stands and so accepts code the compiler rejects (a function whose constexpr branches return
different types, a tensor descriptor reaching a pointer-only path, a format the target lacks).
This module drives each launch path on CPU tensors with `wrap_triton` launches captured
instead of run, then compiles each captured launch for the target with `triton.compile` (PTX
and cubin through the ptxas that ships with Triton). It reports, per variant, whether it
compiled, the tensor-core instructions it uses and its shared memory against the arch table's.

    python -m attnopt.codegen.compile_check --arch sm90 --arch sm100

Must run without TRITON_INTERPRET (the kernels must be JIT functions, not interpreted ones).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from unittest import mock

import torch

# The tensor-core instruction families worth naming in the report.
_MMA = re.compile(r"\b((?:tcgen05\.mma|wgmma\.mma_async|mma\.sync)[\w:.]*)")

_PTR = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "i8", torch.uint8: "u8",
        torch.int32: "i32", torch.int64: "i64", torch.float8_e4m3fn: "fp8e4nv", torch.bool: "i1"}


@dataclass
class Launch:
    """One captured kernel launch: what to compile and under which name to report it."""

    label: str
    kernel: object
    args: tuple
    kwargs: dict


@dataclass
class Result:
    label: str
    kernel: str
    ok: bool
    seconds: float
    shared: int = 0
    mma: list = field(default_factory=list)
    error: str = ""


class _Capture:
    """Stands in for `wrap_triton`: `capture(kernel)[grid](*args, **kw)` records, runs nothing."""

    def __init__(self):
        self.launches: list[Launch] = []
        self.label = ""

    def __call__(self, kernel):
        capture = self

        class _Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    capture.launches.append(Launch(capture.label, kernel, args, kwargs))
                return launch

        return _Grid()


_LAUNCHING_MODULES = ("attnopt.codegen.attention.launch", "attnopt.codegen.attention.quantize",
                      "attnopt.codegen.linear.w8a8", "attnopt.codegen.linear.w4a16",
                      "attnopt.codegen.sparse.masks", "attnopt.codegen.sparse.predict")


@contextlib.contextmanager
def capturing():
    import importlib

    cap = _Capture()
    with contextlib.ExitStack() as stack:
        for name in _LAUNCHING_MODULES:
            stack.enter_context(mock.patch.object(importlib.import_module(name), "wrap_triton", cap))
        yield cap


# ------------------------------------------------------------------------------ the variants


def _qkv(hq, hkv, n, d, dtype=torch.float16):
    return (torch.randn(1, hq, n, d, dtype=dtype), torch.randn(1, hkv, n, d, dtype=dtype),
            torch.randn(1, hkv, n, d, dtype=dtype))


def drive(arch: str, cap: _Capture) -> None:
    """Run every launch path attnopt takes on `arch` (on CPU tensors; launches are captured)."""
    from ..ops.sparse_ref import BK, BQ, block_mask_to_lut, n_blocks
    from .arch import ARCHS
    from .attention.launch import attention_triton
    from .attention.quantize import kv_stats
    from .attention.stats import STATS_CHUNK
    from .linear.w4a16 import linear_w4a16_triton
    from .linear.w8a8 import linear_8bit_triton
    from .sparse import masks, predict

    spec = ARCHS[arch]
    n = 300
    q, k, v = _qkv(4, 2, n, 128)

    def attn(label, q=q, k=k, v=v, quant="int8", pv="fp16", tma=None, **kw):
        tma = spec.tma and "fp4" not in (quant, pv) if tma is None else tma  # NVFP4 loads without TMA
        cap.label = f"attention {label} {quant}/{pv}" + (" tma" if tma else "")
        args = dict(attn_bias=None, keep_mask=None, masked_value=-math.inf, is_causal=True, causal_offset=0,
                    scale=q.shape[-1] ** -0.5, smooth_k=True, smooth_q=False)
        args.update(kw)
        attention_triton(q, k, v, args.pop("attn_bias"), args.pop("keep_mask"), args.pop("masked_value"),
                         args.pop("is_causal"), args.pop("causal_offset"), args.pop("scale"), quant, pv,
                         args.pop("smooth_k"), args.pop("smooth_q"), arch, use_tma=tma, **args)

    quants = [f for f in spec.qk_formats] + ["none"]
    for quant in quants:
        for pv in spec.pv_formats:
            if quant == "none" and pv != "fp16":
                continue
            attn("causal d128", quant=quant, pv=pv)
    base = spec.qk_formats[0]
    attn("non-causal d64", *_qkv(4, 2, n, 64), quant=base, is_causal=False)
    attn("d96 (padded)", *_qkv(4, 4, n, 96), quant=base, tma=False)
    attn("d96 16-bit QK", *_qkv(4, 4, n, 96), quant="none", tma=False)
    attn("d256", *_qkv(2, 2, n, 256), quant=base)
    attn("bias+keep, finite fill, LSE", quant=base, attn_bias=torch.randn(n, n, dtype=torch.float16),
         keep_mask=torch.rand(1, 1, n, n) > 0.2, masked_value=torch.finfo(torch.float16).min, return_lse=True)
    attn("smooth_q", quant=base, smooth_q=True)
    attn("softcap, bias", quant=base, softcap=30.0, attn_bias=torch.randn(n, n, dtype=torch.float16))
    attn("softcap 16-bit QK", quant="none", softcap=50.0, is_causal=False)
    keep = torch.rand(1, 4, n_blocks(n, BQ), n_blocks(n, BK)) > 0.3
    lut, counts = block_mask_to_lut(keep, n, n, True, 0)
    attn("block-sparse", quant=base, lut=lut, counts=counts)
    attn("block-sparse, second stage", quant=base, lut=lut, counts=counts, pv_threshold=torch.full((4,), 4.0))
    cap.label = "kv statistics, key chunks"  # long keys: partials merged by each head's last chunk
    kv_stats(*_qkv(1, 2, 2 * STATS_CHUNK + 1, 128)[1:], True, True, 448.0)

    cap.label = "sparse predictors"
    tau, dense = torch.full((4,), 0.9, dtype=torch.float64), torch.zeros(4, dtype=torch.int8)
    theta = torch.full((4,), 0.3)
    predict.sparge_lut_triton(q, k, 0.1, tau, theta, None, dense, True, True, 0)
    predict.sparge_lut_triton(q, k, 0.1, tau, theta, tau, dense, False, False, 0)  # top-k, no sink
    for stride in (4, 8, 16):
        predict.xattention_lut_triton(q, k, 0.1, stride, tau, dense, is_causal=True)
    for dtype in (torch.float16, torch.bfloat16):
        qs, ks, vs = _qkv(4, 2, n, 64, dtype)
        pats = torch.zeros(3, n_blocks(n, BQ), n_blocks(n, BK), dtype=torch.int32)
        predict.svg_lut_triton(qs, ks, vs, 0.125, {"frame_tokens": 64, "prefix_tokens": 8, "spatial_frames": 1,
                                                   "temporal_tokens": 32}, torch.arange(32, dtype=torch.int32),
                               pats, torch.zeros(3, n_blocks(n, BQ), 2, dtype=torch.int32), dense, True, 0)
    cap.label = "structured masks"
    masks.window_mask_triton(4, n, n, {"window": 64, "sinks": 64}, True, 0, "cpu")
    masks.radial_mask_triton(n, n, {"frame_tokens": 64, "prefix_tokens": 0, "dense_frames": 1, "min_band": 128},
                             "cpu")
    masks.user_block_mask_triton([[True] * n_blocks(n, 64)] * n_blocks(n, 64), 64, n, n, 4, "cpu")
    masks.svg_masks_triton(n, n, {"frame_tokens": 64, "prefix_tokens": 0, "spatial_frames": 1,
                                  "temporal_tokens": 64}, "cpu")

    from ..ops.linear_ref import quantize_weight, quantize_weight_int4

    w = torch.randn(256, 512) * 0.05
    for fmt in [f for f in ("int8", "fp8") if {"int8": "w8a8", "fp8": "fp8"}[f] in spec.linear_formats]:
        wq, ws = quantize_weight(w, fmt)
        for m in (200, 40, 4):  # pre-quantized GEMM, GEMM quantizing in its prologue, split-K weight-only
            cap.label = f"linear {fmt} M={m}"
            linear_8bit_triton(torch.randn(m, 512, dtype=torch.bfloat16), wq, ws, torch.randn(256), fmt, arch)
        for t in spec.gemm_tiles[1:]:  # the GPU autotunes over every tile of the table
            for m in (200, 40):
                cap.label = f"linear {fmt} M={m} tile {t.block_m}x{t.block_n}x{t.block_k}"
                linear_8bit_triton(torch.randn(m, 512, dtype=torch.bfloat16), wq, ws, None, fmt, arch, tile=t)
    pk, sc, zr = quantize_weight_int4(w)
    for dtype in (torch.float16, torch.bfloat16):
        for m in (64, 1):  # one K split; split K
            cap.label = f"linear w4a16 {str(dtype)[6:]} M={m}"
            linear_w4a16_triton(torch.randn(m, 512, dtype=dtype), pk, sc, zr, torch.randn(256, dtype=dtype), arch=arch)
    for m, tiles in ((64, spec.w4_tiles), (1, spec.w4_decode_tiles)):
        for t in tiles[1:]:  # autotuned on the GPU too
            cap.label = f"linear w4a16 M={m} tile {t.block_m}x{t.block_n}x{t.block_k}"
            linear_w4a16_triton(torch.randn(m, 512, dtype=torch.bfloat16), pk, sc, zr, None, arch=arch, tile=t)


# ------------------------------------------------------------------------------ compiling


def _signature(launch: Launch):
    """(signature, constexprs, options) for triton.compile from the captured arguments."""
    kernel = launch.kernel
    names = list(kernel.arg_names)
    values = dict(zip(names, launch.args))
    options = {}
    for key, val in launch.kwargs.items():
        if key in ("num_warps", "num_stages"):
            options[key] = val
        else:
            values[key] = val
    sig, consts = {}, {}
    for i, (name, param) in enumerate(zip(names, kernel.params)):
        val = values[name]
        if param.is_constexpr or val is None:
            sig[name] = "constexpr"
            consts[(i,)] = val
        elif isinstance(val, torch.Tensor):
            sig[name] = "*" + _PTR[val.dtype]
        elif isinstance(val, bool):
            sig[name] = "i1"
        elif isinstance(val, int):
            sig[name] = "i32" if -2**31 <= val < 2**31 else "i64"
        elif isinstance(val, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{launch.label}: argument {name} of type {type(val).__name__}")
    return sig, consts, options


def compile_launch(launch: Launch, capability: int) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name = getattr(launch.kernel, "__name__", str(launch.kernel))
    t0 = time.perf_counter()
    try:
        sig, consts, options = _signature(launch)
        compiled = triton.compile(ASTSource(launch.kernel, sig, constexprs=consts),
                                  target=GPUTarget("cuda", capability, 32), options=options)
    except Exception as e:  # noqa: BLE001 - every failure is a finding to report
        msg = str(e).strip().splitlines()
        return Result(launch.label, name, False, time.perf_counter() - t0, error=(msg[-1] if msg else repr(e))[:300])
    ptx = compiled.asm.get("ptx", "")
    return Result(launch.label, name, True, time.perf_counter() - t0, shared=int(compiled.metadata.shared),
                  mma=sorted(set(_MMA.findall(ptx))))


def check(arch: str) -> list[Result]:
    """Capture every launch for `arch` and compile each distinct one."""
    from .arch import ARCHS

    spec = ARCHS[arch]
    with capturing() as cap:
        drive(arch, cap)
    seen, results = set(), []
    for launch in cap.launches:
        key = (id(launch.kernel), repr(_signature(launch)))
        if key in seen:
            continue
        seen.add(key)
        cc = spec.capability[0] * 10 + spec.capability[1]
        r = compile_launch(launch, cc)
        if r.ok and r.shared > spec.smem_kb * 1024:
            r = _next_tile_that_fits(launch, cc, spec, r)
        results.append(r)
    return results


def _next_tile_that_fits(launch: Launch, cc: int, spec, first: Result) -> Result:
    """The attention kernel is autotuned over the arch table's tiles, and the autotuner drops
    a tile that does not fit: that launch is fine if a later tile of its bucket fits."""
    too_big = f"needs {first.shared // 1024} KB of shared memory; {spec.name} has {spec.smem_kb} KB"
    if launch.kernel.__name__ != "_attn_fwd" or launch.kwargs["SPARSE"]:
        first.ok, first.error = False, too_big
        return first
    for t in spec.attention_tiles(launch.kwargs["BLOCK_D"])[1:]:
        kw = dict(launch.kwargs, BLOCK_M=t.block_m, BLOCK_N=t.block_n, num_warps=t.warps, num_stages=t.stages)
        r = compile_launch(Launch(launch.label, launch.kernel, launch.args, kw), cc)
        if r.ok and r.shared <= spec.smem_kb * 1024:
            r.label = f"{launch.label} [{t}; first tile {too_big}]"
            return r
    first.ok, first.error = False, too_big + ", and so does every other tile of its bucket"
    return first


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check: unset TRITON_INTERPRET (it turns the kernels into interpreted functions)",
              file=sys.stderr)
        return 2
    ap = argparse.ArgumentParser(prog="python -m attnopt.codegen.compile_check", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", action="append", default=None,
                    help="table row to compile for (repeatable; default sm80, sm90, sm100)")
    args = ap.parse_args(argv)
    failed = 0
    for arch in args.arch or ["sm80", "sm90", "sm100"]:
        for r in check(arch):
            status = "ok  " if r.ok else "FAIL"
            detail = (f"{r.shared // 1024:>3} KB smem  {', '.join(r.mma) or '-'}" if r.ok else r.error)
            print(f"{arch:6} {status} {r.seconds:5.1f}s  {r.label:45.45} {r.kernel:22.22} {detail}")
            failed += not r.ok
    print(f"compile_check: {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
