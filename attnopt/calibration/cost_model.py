"""How long a site takes per format, estimated without a GPU: the calibration planner's ranking.

`attnopt.calibrate(..., search="all")` weighs each candidate (a QK^T / P.V format, a sparse
method keeping some fraction of blocks, a linear format) by the time it saves. On a machine
without a GPU nothing can be timed, so this module counts what each op asks of the target GPU and
turns it into seconds with that GPU's published peak rates (`THROUGHPUT`, one row per arch of
codegen/arch.py's table). Only the ratios between candidates matter to the planner; the absolute
times assume every unit runs at its datasheet peak and are optimistic.

What is counted, per launch ("phase"), as a roofline: time = max(FLOPs / the format's
tensor-core rate, bytes moved / HBM bandwidth) + LAUNCH_S.

- Original attention (`original_attention_time`): one flash-style launch, QK^T and P.V in 16-bit,
  Q, K, V read once and O written once in 16-bit.
- attnopt attention (`attention_time`), the launches README "The work each op does per call"
  lists: a statistics pass (reads K and V in 16-bit: K's token mean, V's channel scale), one
  fused quantize (reads Q, K, V in 16-bit, writes each tensor whose format is not 16-bit in its
  format), and the attention kernel: QK^T FLOPs at the QK^T format's rate plus P.V FLOPs at the
  P.V format's rate, both times `kept`, reading Q, K in the QK^T format and V in the P.V format,
  writing O in 16-bit. With `quant="none"` and a 16-bit P.V nothing is quantized: no statistics
  or quantize pass. A sparse method with a predictor adds one launch:
  sparge reads Q and K, pools them per block and multiplies the pooled blocks
  (2 B Hq (Nq/128) (Nk/64) D FLOPs); xattention reads Q and K and scores the strided
  antidiagonals twice (each pass 1/stride of QK^T's FLOPs); svg attends `sample_rows` query rows
  three times (dense, spatial, temporal: 8 B Hq R Nk D FLOPs) reading K and V. Each writes the
  block list (4 bytes per block). window / radial / block masks are built once and cached: no
  launch, no time.
- Causal attention visits the (128-row x 64-key) blocks on or below the diagonal, keys aligned
  to the end (query i sees keys up to i + Nk - Nq, the KV-cache case): about half for Nq = Nk,
  nearly all for one decode row. `kept` is the fraction of those blocks a sparse site visits.
- Linears (`linear_time`): 2 M N K FLOPs at the format's rate (W4A16 dequantizes in registers and
  multiplies in 16-bit), the weight read in its format with its scales (W8A8 / FP8: int8 / e4m3
  plus an fp32 scale per output channel; W4A16: 4 bits plus an fp32 scale and zero per 128
  inputs), the activation read in 16-bit and the output written in 16-bit. 8-bit formats above
  `FUSED_QUANT_MAX_M` rows quantize the activation in a pre-kernel (a second launch that reads
  it in 16-bit and writes it in 8-bit for the GEMM to read). W4A8 quantizes the activation the
  same way and multiplies at the INT8 rate, reading 4-bit weights plus an fp32 scale per 128
  inputs. NVFP4 (sm100+) always quantizes the activation in a pre-kernel (4 bits plus an e4m3
  scale per 16 elements and an fp32 per row, the weight alike per output channel) and
  multiplies at the FP4 rate. Small M is memory-bound: the weight's bytes decide, so the 4-bit
  weights (W4A16, W4A8, NVFP4) win decode and the low-bit-activation GEMMs win prefill, W4A8
  with half W8A8's weight bytes.

What is ignored: the softmax's exponentials and other non-tensor-core arithmetic, caches (K and
V are read from HBM once per launch however many query blocks revisit them), per-block scales of
INT8 / FP8 operands (a few bytes per 128 rows), occupancy, tile-padding waste beyond the block
grid, wave quantization, and overlap between launches. The measured-times mode below corrects
what this misses where a GPU has timed the real kernels.

Measured times: `CostModel(arch, measured=path)` (or `CostModel.from_benchmark(path)`) reads GPU
benchmark results written by benchmarks/attention.py (`attention_<arch>_<device>.json`) and
benchmarks/linear.py (`linear_<arch>.json`); several paths may be given. Where a file has the
format's time and the 16-bit baseline's time ("sdpa flash" / "torch bf16") at some shape, the
measured ratio r = t(format) / t(baseline) at the nearest measured shape replaces the analytical
one: attention_time = original_attention_time * r * (analytical time with `kept` and the
predictor / analytical dense time of the same format), so sparsity and the predictor still scale
as counted above; linear_time = analytical 16-bit linear_time * r. Nearest means, for attention:
the same head dim if measured (else the nearest), then the same causal flag if measured, then the
key length nearest in log2; only prefill shapes (Nq > 16) use it, since the benchmark times
square prefill attention. For linears: the smallest sum over M, N, K of |log2(measured / asked)|.
The baselines themselves stay analytical; formats or shapes a file lacks stay analytical.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass

from ..codegen.arch import ARCHS, FUSED_QUANT_MAX_M, resolve_pv

LAUNCH_S = 4e-6  # fixed cost per kernel launch (host dispatch and GPU launch latency, a few us)
BQ, BK = 128, 64  # the block grid causal and sparse attention is counted on (ops/sparse_ref.py's)
W4_GROUP = 128  # W4A16 inputs per scale / zero, W4A8 inputs per scale (ops/linear_ref.py's)
DECODE_ROWS = 16  # measured attention ratios apply above this many query rows


@dataclass(frozen=True)
class Throughput:
    """One GPU's dense peak rates (no 2:4 structured sparsity), FLOP/s or OP/s, and HBM bytes/s.
    16-bit and FP8 are the rates with FP32 accumulation (attnopt's kernels accumulate in FP32).
    None: the arch has no tensor-core path for that format."""

    gpu: str
    fp16: float
    int8: float
    fp8: float | None
    fp4: float | None
    hbm: float

    def rate(self, fmt: str) -> float:
        """A QK^T / P.V / GEMM format's tensor-core rate ('none' and 'fp16' are 16-bit)."""
        # fp8_acc16: the FP8 MMA accumulating in FP16, twice the FP32-accumulating rate where the
        # arch offers it (sm89 / sm120: Ada and consumer Blackwell datasheets; SageAttention2++)
        fp8_acc16 = 2 * self.fp8 if self.fp8 is not None else None
        r = {"none": self.fp16, "fp16": self.fp16, "int8": self.int8, "fp8": self.fp8, "fp8_acc16": fp8_acc16,
             "fp4": self.fp4}[fmt]
        if r is None:
            raise ValueError(f"{self.gpu} has no {fmt} tensor-core rate")
        return r


T, P = 1e12, 1e15
THROUGHPUT: dict[str, Throughput] = {
    # NVIDIA A100 Tensor Core GPU datasheet, A100 80GB SXM: FP16/BF16 312 TFLOPS, INT8 624 TOPS,
    # HBM2e 2,039 GB/s (anchors: FA2 reaches 160-204 TFLOP/s there)
    "sm80": Throughput("A100 SXM 80GB", 312 * T, 624 * T, None, None, 2039e9),
    # NVIDIA A10 Tensor Core GPU datasheet: FP16/BF16 125 TFLOPS, INT8 250 TOPS, GDDR6 600 GB/s
    # (an RTX 3090 has 71 TFLOPS 16-bit with FP32 accumulate, 284 INT8 TOPS, 936 GB/s)
    "sm86": Throughput("A10", 125 * T, 250 * T, None, None, 600e9),
    # NVIDIA L40S datasheet: FP16/BF16 362.05 TFLOPS, FP8 733 TFLOPS, INT8 733 TOPS, GDDR6 864 GB/s
    # (an RTX 4090 has 165.2 TFLOPS 16-bit and 330.3 FP8 with FP32 accumulate, 660.6 INT8, 1,008 GB/s)
    "sm89": Throughput("L40S", 362 * T, 733 * T, 733 * T, None, 864e9),
    # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM: BF16 989 TFLOPS, FP8 1,979 TFLOPS,
    # INT8 1,979 TOPS, HBM3 3.35 TB/s (anchors.md: bf16 ~989, fp8/int8 ~1979)
    "sm90": Throughput("H100 SXM", 989 * T, 1979 * T, 1979 * T, None, 3350e9),
    # NVIDIA HGX B200 datasheet, per GPU, dense (half the sparse figures): FP16/BF16 2.25 PFLOPS,
    # FP8 4.5 PFLOPS, INT8 4.5 POPS, FP4 9 PFLOPS, HBM3e 8 TB/s (anchors: FA4 1613 = 71% of bf16 peak)
    "sm100": Throughput("B200", 2.25 * P, 4.5 * P, 4.5 * P, 9 * P, 8000e9),
    # NVIDIA RTX Blackwell GPU architecture whitepaper, GeForce RTX 5090, dense: FP16 209.5 and
    # FP8 419 TFLOPS with FP32 accumulate (GeForce runs FP32 accumulation at half rate), INT8 838
    # TOPS, FP4 1,676 TFLOPS (3,352 AI TOPS with sparsity), GDDR7 1,792 GB/s
    "sm120": Throughput("RTX 5090", 209.5 * T, 838 * T, 419 * T, 1676 * T, 1792e9),
    # No GPU: plan as for an A100 (sm80's rates), so CPU calibration ranks candidates as a GPU
    # would. The CPU reference emulates every format; FP8 gets the INT8 rate and FP4 twice it, the
    # ratios of the datacenter parts that have them (FP8 = INT8 on sm89 / sm90 / sm100, FP4 = 2x on sm100).
    "cpu": Throughput("cpu (planned as an A100 SXM 80GB)", 312 * T, 624 * T, 624 * T, 1248 * T, 2039e9),
}

# bytes per element stored in each format (NVFP4: 4 bits plus one e4m3 scale per 16 elements)
BYTES = {"none": 2.0, "fp16": 2.0, "int8": 1.0, "fp8": 1.0, "fp8_acc16": 1.0, "fp4": 0.5 + 1 / 16}

PREDICTORS = ("sparge", "xattention", "svg", "svg2", "vsa")  # methods with a predictor launch per call
STATIC_METHODS = ("window", "radial", "block")  # masks built once and cached

# benchmarks/attention.py's variant names -> (quant, pv); its 16-bit baseline
ATTENTION_VARIANTS = {"attnopt int8+f16pv": ("int8", "fp16"), "attnopt int8+fp8pv": ("int8", "fp8"),
                      "attnopt int8+fp8pv-acc16": ("int8", "fp8_acc16"),
                      "attnopt fp8+fp8pv": ("fp8", "fp8"), "attnopt nvfp4": ("fp4", "fp4")}
ATTENTION_BASELINE = "sdpa flash"
# benchmarks/linear.py's variant names -> format; its 16-bit baseline
LINEAR_VARIANTS = {"attnopt w8a8": "w8a8", "attnopt fp8": "fp8", "attnopt w4a16": "w4a16", "attnopt w4a8": "w4a8",
                   "attnopt nvfp4": "nvfp4"}
LINEAR_BASELINE = "torch bf16"


@dataclass(frozen=True)
class Phase:
    """One launch: its name, tensor-core seconds and memory seconds (time = max + LAUNCH_S)."""

    name: str
    compute_s: float
    memory_s: float

    @property
    def time(self) -> float:
        return max(self.compute_s, self.memory_s) + LAUNCH_S


def _row(arch: str) -> Throughput:
    if arch not in THROUGHPUT:
        raise ValueError(f"unknown arch {arch!r}: one of {', '.join(THROUGHPUT)}")
    return THROUGHPUT[arch]


def qk_formats(arch: str) -> tuple[str, ...]:
    """QK^T formats offered on `arch`: 'none' (16-bit) and those arch.py says it runs."""
    return ("none",) + ARCHS[arch].qk_formats


def attention_formats(arch: str) -> list[tuple[str, str]]:
    """(quant, pv) pairs offered on `arch`: what the arch runs and the attention pass accepts
    (a quantized P.V needs a quantized QK^T)."""
    spec = ARCHS[arch]
    return [(q, pv) for q in qk_formats(arch) for pv in spec.pv_formats
            if spec.supports(q, pv) is None and not (q == "none" and pv != "fp16")]


def linear_formats(arch: str) -> tuple[str, ...]:
    """Linear formats offered on `arch`: 'none' and arch.py's linear_formats."""
    return ("none",) + ARCHS[arch].linear_formats


@functools.lru_cache(maxsize=4096)
def visited_fraction(q_len: int, k_len: int, causal: bool) -> float:
    """Fraction of the (BQ x BK) block grid a dense kernel visits: all of it, or, causal, the
    blocks holding a key at or before some row's diagonal (query i sees keys <= i + Nk - Nq)."""
    nqb, nkb = -(-q_len // BQ), -(-k_len // BK)
    if not causal or nqb == 0 or nkb == 0:
        return 1.0
    off = k_len - q_len
    seen = 0
    for b in range(nqb):
        last = min((b + 1) * BQ, q_len) - 1 + off  # the block's last row's last visible key
        seen += min(max(last // BK + 1, 0), nkb) if last >= 0 else 0
    return seen / (nqb * nkb)


def _check_attention(arch: str, quant: str, pv: str) -> None:
    if (quant, pv) not in attention_formats(arch):
        raise ValueError(f"attention format quant={quant!r} pv={pv!r} is not offered on {arch} "
                         f"(offered: {attention_formats(arch)})")


def _predictor_phase(tp: Throughput, method: str, params: dict, b: int, hq: int, hkv: int, nq: int, nk: int,
                     d: int, causal: bool) -> Phase:
    nqb, nkb = -(-nq // BQ), -(-nk // BK)
    lut = 4.0 * b * hq * nqb * nkb
    q16, k16 = 2.0 * b * hq * nq * d, 2.0 * b * hkv * nk * d
    if method == "sparge":
        flops = 2.0 * b * hq * nqb * nkb * d
        read = q16 + k16
    elif method == "xattention":
        stride = int(params.get("stride", 8))
        flops = 2 * (2.0 * b * hq * nq * nk * d * visited_fraction(nq, nk, causal)) / stride
        read = q16 + k16
    elif method == "vsa":  # pool Q and K, pooled logits against every key tile
        tile = int(params.get("tile", 64))
        flops = 2.0 * b * hq * nqb * -(-nk // tile) * d
        read = q16 + k16
    elif method == "svg":
        rows = min(int(params.get("sample_rows", 32)), nq)
        flops = 8.0 * b * hq * rows * nk * d
        read = 2 * k16
    elif method == "svg2":  # warm k-means (each iteration and the last assignment: one distance GEMM) + gathers
        its = int(params.get("warm_iters", 2)) + 1
        qc, kc = min(int(params.get("q_clusters", 100)), nq), min(int(params.get("k_clusters", 500)), nk)
        flops = 2.0 * its * (b * hq * nq * qc + b * hkv * nk * kc) * d
        read = its * (q16 + k16) + 2 * (q16 + 2 * k16)  # k-means passes; Q, K, V permuted (read and written)
    else:
        raise ValueError(f"unknown predictor {method!r}")
    return Phase(f"predict {method}", flops / tp.fp16, (read + lut) / tp.hbm)


def attention_phases(arch: str, batch: int, q_heads: int, kv_heads: int, q_len: int, k_len: int, head_dim: int,
                     causal: bool, quant: str, pv: str, kept: float = 1.0, method: str | None = None,
                     params: dict | None = None) -> list[Phase]:
    """attnopt attention's launches, each with its compute and memory seconds (analytical)."""
    tp = _row(arch)
    pv = resolve_pv(pv, quant, ARCHS[arch])
    _check_attention(arch, quant, pv)
    if not 0.0 <= kept <= 1.0:
        raise ValueError(f"kept must be in [0, 1], got {kept}")
    b, hq, hkv, nq, nk, d = batch, q_heads, kv_heads, q_len, k_len, head_dim
    q_el, kv_el = b * hq * nq * d, b * hkv * nk * d
    phases = []
    if quant != "none" or pv != "fp16":
        phases.append(Phase("statistics", 0.0, 2 * kv_el * 2.0 / tp.hbm))
        written = q_el * BYTES[quant] + kv_el * BYTES[quant] + (kv_el * BYTES[pv] if pv != "fp16" else 0.0)
        read = 2.0 * (q_el + 2 * kv_el)
        phases.append(Phase("quantize", 0.0, (read + written) / tp.hbm))
    if method in PREDICTORS:
        phases.append(_predictor_phase(tp, method, params or {}, b, hq, hkv, nq, nk, d, causal))
    elif method is not None and method not in STATIC_METHODS:
        raise ValueError(f"unknown sparse method {method!r}")
    dots = 2.0 * b * hq * nq * nk * d * visited_fraction(nq, nk, causal) * kept
    compute = dots / tp.rate(quant) + dots / tp.rate(pv)
    memory = (q_el * BYTES[quant] + kv_el * BYTES[quant] + kv_el * BYTES[pv] + 2.0 * q_el) / tp.hbm
    phases.append(Phase("attention", compute, memory))
    return phases


def _analytical_attention(arch, batch, q_heads, kv_heads, q_len, k_len, head_dim, causal, quant, pv, kept,
                          method, params) -> float:
    return sum(p.time for p in attention_phases(arch, batch, q_heads, kv_heads, q_len, k_len, head_dim, causal,
                                                quant, pv, kept, method, params))


def attention_time(arch: str, batch: int, q_heads: int, kv_heads: int, q_len: int, k_len: int, head_dim: int,
                   causal: bool, quant: str, pv: str, kept: float = 1.0, method: str | None = None,
                   params: dict | None = None) -> float:
    """Estimated seconds of one attnopt attention call on `arch` (analytical; see the module
    docstring). `pv` may be 'auto' (the arch's default, as the attention pass resolves it).
    `kept`: fraction of the (causal) blocks a sparse site visits; `method`: the sparse
    method (its predictor's cost), `params` its options (xattention's `stride`, svg's
    `sample_rows`; defaults 8 and 32)."""
    return _analytical_attention(arch, batch, q_heads, kv_heads, q_len, k_len, head_dim, causal, quant, pv, kept,
                                 method, params)


def original_attention_time(arch: str, batch: int, q_heads: int, kv_heads: int, q_len: int, k_len: int,
                            head_dim: int, causal: bool) -> float:
    """Estimated seconds of the unmodified 16-bit attention (one flash-style launch)."""
    return _analytical_attention(arch, batch, q_heads, kv_heads, q_len, k_len, head_dim, causal, "none", "fp16",
                                 1.0, None, None)


def linear_phases(arch: str, m: int, n: int, k: int, fmt: str) -> list[Phase]:
    """A linear's launches (x [M, K] @ W[N, K]^T), each with its compute and memory seconds."""
    tp = _row(arch)
    if fmt not in linear_formats(arch):
        raise ValueError(f"linear format {fmt!r} is not offered on {arch} (offered: {linear_formats(arch)})")
    flops = 2.0 * m * n * k
    out = 2.0 * m * n
    if fmt == "none":
        return [Phase("gemm", flops / tp.fp16, (2.0 * n * k + 2.0 * m * k + out) / tp.hbm)]
    if fmt == "w4a16":
        weight = n * k / 2 + 8.0 * n * -(-k // W4_GROUP)
        return [Phase("gemm", flops / tp.fp16, (weight + 2.0 * m * k + out) / tp.hbm)]
    if fmt == "nvfp4":
        weight, act4 = BYTES["fp4"] * n * k + 4.0 * n, BYTES["fp4"] * m * k + 4.0 * m
        return [Phase("quantize activation", 0.0, (2.0 * m * k + act4) / tp.hbm),
                Phase("gemm", flops / tp.rate("fp4"), (weight + act4 + out) / tp.hbm)]
    if fmt == "w4a8":  # 4 bits and an fp32 scale per group of 128 inputs
        weight = n * k / 2 + 4.0 * n * -(-k // W4_GROUP)
    else:
        weight = 1.0 * n * k + 4.0 * n
    rate = tp.rate("fp8" if fmt == "fp8" else "int8")
    if m <= FUSED_QUANT_MAX_M:  # the activation is quantized in the GEMM's prologue
        return [Phase("gemm", flops / rate, (weight + 2.0 * m * k + out) / tp.hbm)]
    act8 = 1.0 * m * k + 4.0 * m
    return [Phase("quantize activation", 0.0, (2.0 * m * k + act8) / tp.hbm),
            Phase("gemm", flops / rate, (weight + act8 + out) / tp.hbm)]


def linear_time(arch: str, m: int, n: int, k: int, fmt: str) -> float:
    """Estimated seconds of one linear of M rows, N outputs, K inputs in `fmt` on `arch`
    (none / w8a8 / fp8 / w4a16 / w4a8 / nvfp4; analytical, see the module docstring)."""
    return sum(p.time for p in linear_phases(arch, m, n, k, fmt))


def _log2_gap(a: float, b: float) -> float:
    return abs(math.log2(max(a, 1) / max(b, 1)))


class CostModel:
    """The estimates above for one arch, with measured kernel times in place of the analytical
    format ratios where GPU benchmark files give them (`measured`: a path or a list of paths to
    benchmarks/results/ JSON; see the module docstring for exactly how they are used)."""

    def __init__(self, arch: str, measured: str | os.PathLike | list | tuple | None = None):
        _row(arch)
        self.arch = arch
        self.throughput = THROUGHPUT[arch]
        paths = [] if measured is None else [measured] if isinstance(measured, (str, os.PathLike)) else list(measured)
        self.files = [os.fspath(p) for p in paths]
        self._attention: dict[tuple, dict[str, float]] = {}  # (head_dim, causal, seq) -> variant -> ms
        self._linear: dict[tuple, dict[str, float]] = {}  # (M, N, K) -> variant -> ms
        for p in self.files:
            self._read(p)

    @classmethod
    def from_benchmark(cls, path: str | os.PathLike | list | tuple, arch: str | None = None) -> CostModel:
        """A cost model for the arch the benchmark file(s) were measured on (or `arch`)."""
        paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        if arch is None:
            with open(paths[0]) as f:
                arch = json.load(f).get("arch")
            if arch is None:
                raise ValueError(f"{os.fspath(paths[0])} names no arch: pass arch=")
        return cls(arch, measured=paths)

    @property
    def source(self) -> str:
        """'analytical', or 'measured: <files>' (the front's cost_model field)."""
        return "analytical" if not self.files else "measured: " + ", ".join(os.path.basename(p) for p in self.files)

    def _read(self, path: str) -> None:
        with open(path) as f:
            data = json.load(f)
        arch = data.get("arch")
        if arch is not None and arch != self.arch:
            raise ValueError(f"{path} was measured on {arch}, not {self.arch}")
        used = 0
        for r in data.get("rows", []):
            if not isinstance(r.get("ms"), (int, float)) or r["ms"] <= 0:
                continue
            if "head_dim" in r and "seq" in r and "variant" in r:
                self._attention.setdefault((r["head_dim"], bool(r["causal"]), r["seq"]), {})[r["variant"]] = r["ms"]
                used += 1
            elif r.get("kind") == "gemm":
                self._linear.setdefault((r["M"], r["N"], r["K"]), {})[r["variant"]] = r["ms"]
                used += 1
        if not used:
            raise ValueError(f"{path}: no attention or GEMM times (benchmarks/attention.py or linear.py rows)")

    # formats offered
    def attention_formats(self) -> list[tuple[str, str]]:
        return attention_formats(self.arch)

    def linear_formats(self) -> tuple[str, ...]:
        return linear_formats(self.arch)

    # measured ratios
    def attention_ratio(self, head_dim: int, causal: bool, k_len: int, quant: str, pv: str) -> float | None:
        """Measured t(format) / t(16-bit baseline) at the nearest measured shape, or None."""
        names = [v for v, f in ATTENTION_VARIANTS.items() if f == (quant, pv)]
        shapes = [(s, t) for s, t in self._attention.items()
                  if ATTENTION_BASELINE in t and any(n in t for n in names)]
        if not names or not shapes:
            return None
        (d, c, n), times = min(shapes, key=lambda st: (_log2_gap(st[0][0], head_dim), st[0][1] != causal,
                                                       _log2_gap(st[0][2], k_len)))
        return times[next(n for n in names if n in times)] / times[ATTENTION_BASELINE]

    def linear_ratio(self, m: int, n: int, k: int, fmt: str) -> float | None:
        names = [v for v, f in LINEAR_VARIANTS.items() if f == fmt]
        shapes = [(s, t) for s, t in self._linear.items() if LINEAR_BASELINE in t and any(x in t for x in names)]
        if not names or not shapes:
            return None
        _, times = min(shapes, key=lambda st: sum(_log2_gap(a, b) for a, b in zip(st[0], (m, n, k))))
        return times[next(x for x in names if x in times)] / times[LINEAR_BASELINE]

    # times
    def original_attention_time(self, batch: int, q_heads: int, kv_heads: int, q_len: int, k_len: int,
                                head_dim: int, causal: bool) -> float:
        return original_attention_time(self.arch, batch, q_heads, kv_heads, q_len, k_len, head_dim, causal)

    def attention_time(self, batch: int, q_heads: int, kv_heads: int, q_len: int, k_len: int, head_dim: int,
                       causal: bool, quant: str, pv: str, kept: float = 1.0, method: str | None = None,
                       params: dict | None = None) -> float:
        pv = resolve_pv(pv, quant, ARCHS[self.arch])
        shape = (self.arch, batch, q_heads, kv_heads, q_len, k_len, head_dim, causal)
        t = _analytical_attention(*shape, quant, pv, kept, method, params)
        ratio = self.attention_ratio(head_dim, causal, k_len, quant, pv) if q_len > DECODE_ROWS else None
        if ratio is None:
            return t
        dense = _analytical_attention(*shape, quant, pv, 1.0, None, None)
        return original_attention_time(*shape) * ratio * (t / dense)

    def linear_time(self, m: int, n: int, k: int, fmt: str) -> float:
        t = linear_time(self.arch, m, n, k, fmt)
        ratio = self.linear_ratio(m, n, k, fmt) if fmt != "none" else None
        return t if ratio is None else linear_time(self.arch, m, n, k, "none") * ratio
