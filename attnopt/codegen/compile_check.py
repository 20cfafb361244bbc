"""Compile every Triton kernel variant attnopt launches, in every autotune config, for a GPU
architecture, without a GPU; record each config's registers, spills and shared memory and
whether it can launch there.

The CPU tests run the kernels through Triton's interpreter, which executes the Python body as
it stands and so accepts code the compiler rejects (a function whose constexpr branches return
different types, a tensor descriptor reaching a pointer-only path, a format the target lacks),
and never learns what a config costs on the chip. This module drives each launch path on CPU
tensors with `wrap_triton` launches captured instead of run (`DRIVERS`), widens each captured
launch to the configs a GPU autotunes it over (`AUTOTUNE_SPACES`), then compiles each for the
target with `triton.compile` (TTGIR, PTX, and cubin through the ptxas that ships with Triton),
specialized by the kernel's own JIT binder as a GPU launch would be.
Per config it reports registers per thread, spilled bytes, shared and tensor memory (ptxas's
and Triton's numbers), the tensor-core instructions it uses and, against codegen/launch_limits,
whether it can launch.

    python -m attnopt.codegen.compile_check --arch sm90 --arch sm100 --json report.json

Must run without TRITON_INTERPRET (the kernels must be JIT functions, not interpreted ones).

Adding a kernel: give its host launcher a `wrap_triton` launch (every attnopt.codegen module
that imports `wrap_triton` is captured), then add a driver below, `@driver("name")`, that calls
the launcher on small CPU tensors for each variant the code takes on `arch` (setting
`cap.label`). If the GPU autotunes the kernel, register its config space in `AUTOTUNE_SPACES`
(kernel name -> function of (arch, launch) returning the `triton.Config`s); a launch handed
to `wrap_triton` as a `triton.autotune` object is widened without one.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable
from unittest import mock

import torch

# The tensor-core instruction families worth naming in the report.
_MMA = re.compile(r"\b((?:tcgen05\.mma|wgmma\.mma_async|mma\.sync)[\w:.]*)")

DEFAULT_ARCHS = ("sm80", "sm89", "sm90", "sm100")


@dataclass
class Launch:
    """One captured kernel launch: what to compile and under which name to report it."""

    label: str
    kernel: object  # a JIT function, or a triton.autotune object before widening
    args: tuple
    kwargs: dict
    config: str = ""  # the config's name, once widened


@dataclass
class Result:
    """One compiled (kernel, arch, config) row of the report."""

    arch: str
    label: str
    kernel: str
    config: str
    ok: bool
    seconds: float
    regs: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    shared: int = 0
    tmem: int | None = None
    warps: int = 4
    constants: dict = field(default_factory=dict)  # the launch's keyword constexprs: which variant
    mma: list = field(default_factory=list)
    error: str = ""  # compile error, or why the config cannot launch
    dropped: bool = False  # cannot launch, but another config of its autotuned launch can: Triton's
    #                        autotuner drops it (OutOfResources), so it is a warning, not a failure

    @property
    def failed(self) -> bool:
        return not self.ok and not self.dropped

    @property
    def spills(self) -> int | None:
        return None if self.spill_stores is None else self.spill_stores + self.spill_loads

    def row(self) -> dict:
        return dict(asdict(self), spills=self.spills, failed=self.failed, seconds=round(self.seconds, 2))


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


def _launching_modules():
    """Every attnopt.codegen module holding torch's `wrap_triton` (so a new one is captured too)."""
    import importlib
    import pkgutil

    from torch.library import wrap_triton

    from .. import codegen

    for info in pkgutil.walk_packages(codegen.__path__, codegen.__name__ + "."):
        module = importlib.import_module(info.name)
        if getattr(module, "wrap_triton", None) is wrap_triton:
            yield module


@contextlib.contextmanager
def capturing():
    cap = _Capture()
    with contextlib.ExitStack() as stack:
        for module in list(_launching_modules()):
            stack.enter_context(mock.patch.object(module, "wrap_triton", cap))
        yield cap


# ------------------------------------------------------------------------------ the launch drivers

DRIVERS: dict[str, Callable] = {}


def driver(name: str):
    """Register `fn(arch, spec, cap)`: runs launch paths on CPU tensors; its launches are captured."""
    def register(fn):
        DRIVERS[name] = fn
        return fn
    return register


def _qkv(hq, hkv, n, d, dtype=torch.float16):
    return (torch.randn(1, hq, n, d, dtype=dtype), torch.randn(1, hkv, n, d, dtype=dtype),
            torch.randn(1, hkv, n, d, dtype=dtype))


_N = 300  # sequence length of the driven shapes (odd: masked tails)


@driver("attention")
def drive_attention(arch, spec, cap):
    """The dense and block-sparse attention kernel (with its quantize kernels) in every format
    pair the arch runs, each head-dim bucket and each feature flag that changes its code."""
    from ..ops.sparse_ref import BK, BQ, block_mask_to_lut, n_blocks
    from .attention.launch import attention_triton
    from .attention.quantize import kv_stats
    from .attention.stats import STATS_CHUNK

    n = _N
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

    for quant in list(spec.qk_formats) + ["none"]:
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



@driver("attention backward")
def drive_attention_backward(arch, spec, cap):
    """The backward: delta, the dK/dV and dQ passes (and the int8 mode's quantize launches), each
    mode, with the mask / soft-capping / head-dim variants that change the kernels' code."""
    from .attention.backward import attention_backward_triton

    n = _N

    def bwd(label, hq=4, hkv=2, d=128, mode="int8", bias=None, keep=None, masked_value=-math.inf, causal=True,
            softcap=0.0, **kw):
        cap.label = f"attention backward {mode} {label}"
        q, k, v = _qkv(hq, hkv, n, d)
        out, do = torch.randn_like(q), torch.randn_like(q)
        lse = torch.randn(1, hq, n)
        attention_backward_triton(q, k, v, out, lse, do, bias, keep, masked_value, causal, 0, d ** -0.5, True,
                                  softcap, mode, **kw)

    from ..ops.sparse_ref import BK, BQ, block_mask_to_lut, n_blocks

    lut, counts = block_mask_to_lut(torch.rand(1, 4, n_blocks(n, BQ), n_blocks(n, BK)) > 0.3, n, n, True, 0)

    for mode in ("int8", "exact"):
        bwd("causal gqa d128", mode=mode)
        bwd("d64 bias+keep, finite fill", d=64, mode=mode, causal=False,
            bias=torch.randn(n, n, dtype=torch.float16), keep=torch.rand(1, 1, n, n) > 0.2,
            masked_value=torch.finfo(torch.float16).min)
        bwd("d96 softcap", hq=2, hkv=2, d=96, mode=mode, softcap=30.0)
        bwd("block-sparse", mode=mode, lut=lut, counts=counts)


@driver("sparse predictors")
def drive_predictors(arch, spec, cap):
    """The one-launch predictors (Q, K -> LUT and counts): sparge (tau; top-k without sink), vsa
    (64- and 128-key tiles), xattention at strides 4 / 8 / 16, svg in fp16 and bf16."""
    from ..ops.sparse_ref import BK, BQ, n_blocks
    from .sparse import predict

    n = _N
    q, k, _ = _qkv(4, 2, n, 128)
    tau, dense = torch.full((4,), 0.9, dtype=torch.float64), torch.zeros(4, dtype=torch.int8)
    theta = torch.full((4,), 0.3)
    cap.label = "sparse predictors sparge"
    predict.sparge_lut_triton(q, k, 0.1, tau, theta, None, dense, True, True, 0)
    cap.label = "sparse predictors sparge top-k"
    predict.sparge_lut_triton(q, k, 0.1, tau, theta, tau, dense, False, False, 0)
    cap.label = "sparse predictors vsa"
    predict.vsa_lut_triton(q, k, 0.1, 64, torch.full((4,), 0.25, dtype=torch.float64), dense, True, 0)
    cap.label = "sparse predictors vsa, 128-key tiles"
    predict.vsa_lut_triton(q, k, 0.1, 128, torch.full((4,), -2.0, dtype=torch.float64), dense, False, 0)
    for stride in (4, 8, 16):
        cap.label = f"sparse predictors xattention stride {stride}"
        predict.xattention_lut_triton(q, k, 0.1, stride, tau, dense, is_causal=True)
    for dtype in (torch.float16, torch.bfloat16):
        cap.label = f"sparse predictors svg {str(dtype)[6:]}"
        qs, ks, vs = _qkv(4, 2, n, 64, dtype)
        pats = torch.zeros(3, n_blocks(n, BQ), n_blocks(n, BK), dtype=torch.int32)
        predict.svg_lut_triton(qs, ks, vs, 0.125, {"frame_tokens": 64, "prefix_tokens": 8, "spatial_frames": 1,
                                                   "temporal_tokens": 32}, torch.arange(32, dtype=torch.int32),
                               pats, torch.zeros(3, n_blocks(n, BQ), 2, dtype=torch.int32), dense, True, 0)


@driver("structured masks")
def drive_masks(arch, spec, cap):
    from ..ops.sparse_ref import n_blocks
    from .sparse import masks

    n = _N
    cap.label = "structured masks"
    masks.window_mask_triton(4, n, n, {"window": 64, "sinks": 64}, True, 0, "cpu")
    masks.radial_mask_triton(n, n, {"frame_tokens": 64, "prefix_tokens": 0, "dense_frames": 1, "min_band": 128},
                             "cpu")
    masks.user_block_mask_triton([[True] * n_blocks(n, 64)] * n_blocks(n, 64), 64, n, n, 4, "cpu")
    masks.svg_masks_triton(n, n, {"frame_tokens": 64, "prefix_tokens": 0, "spatial_frames": 1,
                                  "temporal_tokens": 64}, "cpu")
    cap.label = "structured masks, > 4096 queries (sampled rows)"
    masks.window_mask_triton(1, 4097, 4097, {"window": 64, "sinks": 64}, True, 0, "cpu")


@driver("linear 8-bit")
def drive_linear_8bit(arch, spec, cap):
    """W8A8 / FP8 GEMM (autotuned), its activation quantizer (row in one block or several) and
    the small-M weight-only path."""
    from ..ops.linear_ref import quantize_weight
    from .linear.w8a8 import linear_8bit_triton

    for fmt in [f for f in ("int8", "fp8") if {"int8": "w8a8", "fp8": "fp8"}[f] in spec.linear_formats]:
        for k_dim in (512, 12288):  # 12288 > one 8192-wide block: the quantizer's two-pass path
            w = torch.randn(256, k_dim) * 0.05
            wq, ws = quantize_weight(w, fmt)
            # pre-quantized GEMM (M=200), GEMM quantizing in its prologue (M=40), split-K weight-only (M=4);
            # the GEMM's launches are widened to every autotune config of the arch
            for m, dtype in ((200, torch.bfloat16), (40, torch.bfloat16), (4, torch.bfloat16), (4, torch.float16)):
                if k_dim > 512 and m < 16:
                    continue
                cap.label = f"linear {fmt} M={m} K={k_dim} {str(dtype)[6:]}"
                linear_8bit_triton(torch.randn(m, k_dim, dtype=dtype), wq, ws, torch.randn(256), fmt, arch)


@driver("linear w4a16")
def drive_w4a16(arch, spec, cap):
    from ..ops.linear_ref import quantize_weight_int4
    from .linear.w4a16 import linear_w4a16_triton

    pk, sc, zr = quantize_weight_int4(torch.randn(256, 512) * 0.05)
    for dtype in (torch.float16, torch.bfloat16):
        for m in (64, 1):  # one K split; split K
            cap.label = f"linear w4a16 {str(dtype)[6:]} M={m}"
            linear_w4a16_triton(torch.randn(m, 512, dtype=dtype), pk, sc, zr, torch.randn(256, dtype=dtype), arch=arch)
    for m, tiles in ((64, spec.w4_tiles), (1, spec.w4_decode_tiles)):
        for t in tiles[1:]:  # autotuned on the GPU too
            cap.label = f"linear w4a16 M={m} tile {t.block_m}x{t.block_n}x{t.block_k}"
            linear_w4a16_triton(torch.randn(m, 512, dtype=torch.bfloat16), pk, sc, zr, None, arch=arch, tile=t)


@driver("linear w4a8")
def drive_w4a8(arch, spec, cap):
    """W4A8: the group-stepped INT8 GEMM quantizing x in its prologue (M=64) or reading the
    pre-kernel's INT8 x (M=200), in each table tile (prefill and M <= 16 tiles)."""
    if "w4a8" not in spec.linear_formats:
        return
    from ..ops.linear_ref import quantize_weight_w4a8
    from .linear.w4a8 import linear_w4a8_triton

    pk, sc = quantize_weight_w4a8(torch.randn(256, 512) * 0.05)
    for dtype in (torch.float16, torch.bfloat16):
        for m in (64, 200):
            cap.label = f"linear w4a8 {str(dtype)[6:]} M={m}"
            linear_w4a8_triton(torch.randn(m, 512, dtype=dtype), pk, sc, torch.randn(256, dtype=dtype), arch=arch)
    for m, tiles in ((64, spec.w4a8_tiles), (1, spec.w4a8_decode_tiles)):
        for t in tiles[1 if m == 64 else 0:]:  # autotuned on the GPU too
            cap.label = f"linear w4a8 M={m} tile {t.block_m}x{t.block_n}"
            linear_w4a8_triton(torch.randn(m, 512, dtype=torch.bfloat16), pk, sc, None, arch=arch, tile=t)


@driver("linear nvfp4")
def drive_nvfp4(arch, spec, cap):
    """The NVFP4 linear's activation quantizer and block-scaled GEMM, where the arch offers it
    (one tile: not autotuned); K 600 is not a multiple of the GEMM's 128-deep step."""
    from ..ops.linear_nvfp4_ref import quantize_weight_nvfp4
    from .linear.nvfp4 import linear_nvfp4_triton

    if "nvfp4" not in spec.linear_formats:
        return
    for m, k, dtype in ((200, 512, torch.bfloat16), (1, 600, torch.float16)):
        q = quantize_weight_nvfp4(torch.randn(256, k) * 0.05)
        cap.label = f"linear nvfp4 M={m} K={k} {str(dtype)[6:]}"
        linear_nvfp4_triton(torch.randn(m, k, dtype=dtype), *q, torch.randn(256, dtype=dtype), arch)


@driver("linear training")
def drive_linear_training(arch, spec, cap):
    """The training linear's per-block quantizer (INT8, e4m3, e5m2) and block GEMM: forward (with
    bias), dX = dY W and dW = dY^T X (transposed operands), in each format the arch runs."""
    from .linear.block_gemm import linear_train_backward_triton, linear_train_forward_triton

    for fmt in [f for f in ("int8", "fp8") if {"int8": "w8a8", "fp8": "fp8"}[f] in spec.linear_formats]:
        x, w = torch.randn(300, 200, dtype=torch.bfloat16), torch.randn(160, 200, dtype=torch.bfloat16)
        cap.label = f"linear training {fmt} forward"
        _, xq, xs = linear_train_forward_triton(x, w, torch.randn(160, dtype=torch.bfloat16), fmt)
        cap.label = f"linear training {fmt} backward"
        linear_train_backward_triton(torch.randn(300, 160, dtype=torch.bfloat16), xq, xs, w, fmt)


def drive(arch: str, cap: _Capture, drivers=None) -> dict[str, str]:
    """Run every registered launch path (or those named in `drivers`) for `arch`; returns the
    error of each driver that raised (its launches before the error are kept)."""
    from .arch import ARCHS

    errors = {}
    for name, fn in DRIVERS.items():
        if drivers is None or name in drivers:
            try:
                fn(arch, ARCHS[arch], cap)
            except Exception as e:  # noqa: BLE001 - a launch path that breaks on the host is a finding too
                errors[name] = f"{type(e).__name__}: {e}"[:300]
    return errors


# ------------------------------------------------------------------------------ autotune spaces


def _attention_space(arch: str, launch: Launch):
    """The configs launch.autotuned_kernel tunes _attn_fwd over for this launch's bucket and mode
    (mode chosen as attention_triton chooses it)."""
    from .attention.launch import autotuned_kernel

    kw = launch.kwargs
    mode = "dense" if not kw["SPARSE"] else ("sparse2" if kw["HAS_LAMBDA"] else "sparse")
    fp4 = kw["PV_FP4"] or kw["QK_FMT"] == 3
    mode = "fp4" if fp4 and mode == "dense" else mode
    return autotuned_kernel(arch, kw["BLOCK_D"], mode).configs


def _gemm_space(arch: str, launch: Launch):
    from .linear.w8a8 import autotuned_gemm

    return autotuned_gemm(arch).configs


def _block_gemm_space(arch: str, launch: Launch):
    from .linear.block_gemm import autotuned_block_gemm

    return autotuned_block_gemm().configs


# kernel name -> the triton.Configs a GPU autotunes a launch of it over
AUTOTUNE_SPACES: dict[str, Callable] = {
    "_attn_fwd": _attention_space,
    "_gemm_8bit_kernel": _gemm_space,
    "_block_gemm_kernel": _block_gemm_space,
}


def _kernel_name(kernel) -> str:
    return getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel))


def _config_name(kwargs: dict) -> str:
    """The tile and launch options of a launch: its block-size constexprs, warps and stages."""
    blocks = [f"{k}={v}" for k, v in kwargs.items()
              if isinstance(v, int) and not isinstance(v, bool) and re.search(r"BLOCK|TILE|GROUP_M|^T[QK]$|^S$", k)]
    return " ".join(blocks + [f"w{kwargs.get('num_warps', 4)}", f"s{kwargs.get('num_stages', 3)}"])


def widen(arch: str, launch: Launch, all_configs: bool = True) -> list[Launch]:
    """The launch in each config a GPU may run it in: every autotune config when the kernel is
    autotuned (`all_configs`), else the launch as captured."""
    from triton.runtime.autotuner import Autotuner

    kernel, configs = launch.kernel, None
    if isinstance(kernel, Autotuner):  # handed to wrap_triton autotuned: its configs are all there is
        kernel, configs = kernel.fn, kernel.configs if all_configs else kernel.configs[:1]
    elif all_configs and _kernel_name(kernel) in AUTOTUNE_SPACES:
        configs = AUTOTUNE_SPACES[_kernel_name(kernel)](arch, launch)
    if configs is None:
        return [Launch(launch.label, kernel, launch.args, launch.kwargs, _config_name(launch.kwargs))]
    out = []
    for c in configs:
        kw = dict(launch.kwargs, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        for opt in ("num_ctas", "maxnreg"):
            if getattr(c, opt, None) not in (None, 1) or opt in launch.kwargs:
                kw[opt] = getattr(c, opt)
        out.append(Launch(launch.label, kernel, launch.args, kw, _config_name(kw)))
    return out


# ------------------------------------------------------------------------------ compiling


def specialize(launch: Launch, target):
    """(signature, constexprs, attrs, options) for triton.compile, built by the kernel's own JIT
    binder exactly as a launch on the GPU builds them: ints equal to 1 become constants, ints and
    pointers divisible by 16 carry that fact (the CPU tensors' addresses stand in for the GPU's)."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(launch.kwargs, debug=False)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, sig, consts, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return sig, consts, attrs, options.__dict__


def _target(spec):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", spec.capability[0] * 10 + spec.capability[1], 32)


_PTXAS = {"regs": re.compile(r"Used (\d+) registers"), "stack": re.compile(r"(\d+) bytes stack frame"),
          "spill_stores": re.compile(r"(\d+) bytes spill stores"), "spill_loads": re.compile(r"(\d+) bytes spill loads"),
          "static_smem": re.compile(r"(\d+) bytes smem")}


def _ptxas_numbers(log: str, name: str) -> dict:
    """Registers, stack and spills of entry function `name` from ptxas -v (Triton runs ptxas with
    -v): the lines from its "Function properties" to the next function's."""
    start = log.find(f"Function properties for {name}")
    section = log[start:] if start >= 0 else log
    end = re.search(r"Compiling entry function|Function properties for (?!" + re.escape(name) + r"\b)", section[1:])
    section = section[:end.start() + 1] if end else section
    out = {}
    for key, pattern in _PTXAS.items():
        m = pattern.search(section)
        out[key] = int(m.group(1)) if m else None
    return out


@contextlib.contextmanager
def _ptxas_log():
    """Compile afresh (no Triton cache hit, so ptxas runs) with ptxas's log printed, and capture it."""
    from triton import knobs

    saved = knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log
    knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = True, True
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield buf
    finally:
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = saved


def compile_launch(launch: Launch, spec) -> Result:
    """Compile one launch for `spec` (an arch.ArchSpec) and check it can launch there."""
    import triton
    from triton.compiler import ASTSource

    from .launch_limits import launch_problems

    name = _kernel_name(launch.kernel)
    warps = launch.kwargs.get("num_warps") or 4
    res = Result(spec.name, launch.label, name, launch.config or _config_name(launch.kwargs), False, 0.0, warps=warps,
                 constants={k: v if isinstance(v, (bool, int, float)) else str(v) for k, v in launch.kwargs.items()
                            if k not in ("num_warps", "num_stages", "num_ctas", "maxnreg")})
    t0 = time.perf_counter()
    try:
        target = _target(spec)
        sig, consts, attrs, options = specialize(launch, target)
        with _ptxas_log() as log:
            compiled = triton.compile(ASTSource(launch.kernel, sig, consts, attrs), target=target, options=options)
    except Exception as e:  # noqa: BLE001 - every failure is a finding to report
        msg = [l for l in str(e).strip().splitlines() if l.strip()]
        res.seconds = time.perf_counter() - t0
        res.error = "compile: " + ((msg[-1] if msg else repr(e))[:300])
        return res
    res.seconds = time.perf_counter() - t0
    nums = _ptxas_numbers(log.getvalue(), compiled.metadata.name)
    res.regs, res.stack = nums["regs"], nums["stack"]
    res.spill_stores, res.spill_loads = nums["spill_stores"], nums["spill_loads"]
    res.shared = int(compiled.metadata.shared) + (nums["static_smem"] or 0)
    res.tmem = getattr(compiled.metadata, "tmem_size", None)
    res.warps = int(compiled.metadata.num_warps)
    res.mma = sorted(set(_MMA.findall(compiled.asm.get("ptx", ""))))
    problems = launch_problems(spec, res.regs, res.warps, res.shared, res.tmem)
    if res.regs is None:
        problems.append("no register count in the ptxas log")
    res.ok, res.error = not problems, "; ".join(problems)
    return res


def capture(arch: str, drivers=None, errors: dict | None = None) -> list[Launch]:
    """The launches the drivers make for `arch`; `errors` collects the drivers that raised."""
    with capturing() as cap:
        failed = drive(arch, cap, drivers)
    if errors is not None:
        errors.update(failed)
    return cap.launches


def outside_autotune_space(captured: Launch, space: list[Launch]) -> bool:
    """The CPU path (interpreter, forced tiles) launched an autotuned kernel in a config its GPU
    autotuner never tries: the two have drifted apart, and what the CPU tests ran is not what the
    GPU runs."""
    from triton.runtime.autotuner import Autotuner

    if _kernel_name(captured.kernel) not in AUTOTUNE_SPACES or isinstance(captured.kernel, Autotuner):
        return False
    return _config_name(captured.kwargs) not in {c.config for c in space}


def check(arch: str, all_configs: bool = True, kernels: str | None = None, per_kernel: int | None = None,
          drivers=None, progress: Callable | None = None) -> list[Result]:
    """Capture every launch for `arch`, widen it to its autotune configs and compile each distinct
    one (`all_configs` False: for an autotuned kernel, the launched config, or while it cannot
    launch the next, as the autotuner would). `kernels`: a regex on kernel names; `per_kernel`:
    at most this many compiles per kernel name."""
    from triton.runtime.autotuner import Autotuner

    from .arch import ARCHS

    spec = ARCHS[arch]
    results, counts, errors, compiled = [], {}, {}, {}

    def report(r: Result) -> None:
        results.append(r)
        if progress:
            progress(r)

    captured_launches = capture(arch, drivers, errors)
    for name, error in errors.items():
        report(Result(arch, f"driver {name!r}", "-", "-", False, 0.0, error="host code raised " + error))
    for captured in captured_launches:
        name = _kernel_name(captured.kernel)
        if kernels and not re.search(kernels, name):
            continue
        space = widen(arch, captured, True)
        autotuned = name in AUTOTUNE_SPACES or isinstance(captured.kernel, Autotuner)
        own = _config_name(captured.kwargs)
        if outside_autotune_space(captured, space):
            report(Result(arch, captured.label, name, own, False, 0.0,
                          error="the launched config is not in the kernel's autotune space"))
        if not all_configs:
            space.sort(key=lambda c: c.config != own)  # the launched config first
        tried = []
        for launch in space:
            try:
                key = (name, repr(specialize(launch, _target(spec))))
            except Exception:  # noqa: BLE001 - compile_launch reports it
                key = (name, id(launch))
            if key not in compiled:
                if per_kernel is not None and counts.get(name, 0) >= per_kernel:
                    break
                counts[name] = counts.get(name, 0) + 1
                compiled[key] = compile_launch(launch, spec)
                report(compiled[key])
            tried.append(compiled[key])
            if not all_configs and tried[-1].ok:
                break
        if autotuned and any(r.ok for r in tried):
            for r in tried:
                if not r.ok and not r.error.startswith("compile"):
                    r.dropped = True
    return results


def _line(r: Result) -> str:
    status = "ok  " if r.ok else ("over" if r.regs is not None else "FAIL")  # over: compiled, cannot launch
    regs = "-" if r.regs is None else r.regs
    spills = "-" if r.spills is None else r.spills
    detail = f"{r.shared / 1024:5.1f} KB smem {regs:>3} regs {spills:>4} spilled  {', '.join(r.mma) or '-'}"
    if r.error:
        detail = (detail + "  " if r.regs is not None else "") + r.error
    return f"{r.arch:6} {status} {r.seconds:5.1f}s  {r.label:44.44} {r.kernel:20.20} {r.config:46.46} {detail}"


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check: unset TRITON_INTERPRET (it turns the kernels into interpreted functions)",
              file=sys.stderr)
        return 2
    ap = argparse.ArgumentParser(prog="python -m attnopt.codegen.compile_check", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", action="append", default=None,
                    help=f"table row to compile for (repeatable; default {', '.join(DEFAULT_ARCHS)})")
    ap.add_argument("--configs", choices=("all", "launched"), default="all",
                    help="every autotune config of an autotuned kernel (default), or only the one the CPU path launches")
    ap.add_argument("--kernel", default=None, help="only kernels whose name matches this regex")
    ap.add_argument("--driver", action="append", default=None, choices=sorted(DRIVERS),
                    help="only these launch drivers (repeatable)")
    ap.add_argument("--per-kernel", type=int, default=None, help="compile at most this many configs per kernel")
    ap.add_argument("--json", default=None, help="write one row per (kernel, arch, config) to this file")
    args = ap.parse_args(argv)
    rows, failed = [], 0
    for arch in args.arch or DEFAULT_ARCHS:
        results = check(arch, args.configs == "all", args.kernel, args.per_kernel, args.driver,
                        progress=lambda r: print(_line(r), flush=True))
        rows += [r.row() for r in results]
        failed += sum(r.failed for r in results)
        for r in results:
            if r.dropped:
                print(f"dropped {arch} {r.kernel} {r.config} ({r.label}): {r.error}; another config of the "
                      "launch fits, and the autotuner drops this one")
        for r in results:
            if r.failed:
                print(f"FAILED {arch} {r.kernel} {r.config} ({r.label}): {r.error}")
        if args.json:  # after each arch: a long run stopped early keeps what it finished
            with open(args.json, "w") as f:
                json.dump({"command": "python -m attnopt.codegen.compile_check " + " ".join(argv or sys.argv[1:]),
                           "triton": __import__("triton").__version__, "rows": rows}, f, indent=1)
                f.write("\n")
    spilling = sum(1 for r in rows if r["spills"])
    print(f"compile_check: {len(rows)} compiled, {failed} failed (cannot launch or did not compile), "
          f"{spilling} spill registers to local memory")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
