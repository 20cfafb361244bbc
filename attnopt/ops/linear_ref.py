"""Pure-PyTorch reference of attnopt's quantized linears (what they compute, with the papers:
docs/algorithms.md#quantized-linear-layers).

The CPU path of the linear ops and what the Triton GEMMs are tested against:
- W8A8: weights per output channel INT8 (s_w = max|W_row| / 127), activations per token INT8
  computed at run time, exact int32 accumulation (here in float64), then * s_x * s_w + bias.
- FP8: the same with e4m3 (max 448) weights and activations.
- W4A16: asymmetric int4 weights, groups of 128 along K (scale and zero per group and output
  channel), two per byte (low nibble first); dequantized to the activation's dtype, 16-bit dot
  with fp32 accumulation. bf16 activations stay bf16 (no fp16 overflow on large models).
- W4A8 (ViDiT-Q's format for DiTs): symmetric int4 weights, groups of 128 along K (one scale
  per group and output channel, s = max|W_group| / 7, values -7..7 stored + 8, two per byte),
  activations per token INT8 at run time (as W8A8). Each group's int8 x int4 dot is an exact
  int32 partial sum; partial * group scale is added up in fp32 over the groups, then times the
  token's scale, + bias. Every M takes this path (no weight-only small-M path).
- NVFP4 (W4A4, sm100+): ops/linear_nvfp4_ref.py; quantize_format / format_output dispatch to it.
- Small M (decode, conditioning): W8A8 / FP8 weights are used without quantizing the
  activation (a weight-only GEMV path, more accurate, and what small M can use).
"""

from __future__ import annotations

import torch

from . import linear_nvfp4_ref as F

INT8_MAX = 127.0
FP8_MAX = 448.0
W4_GROUP = 128
W4A8_GROUP = 128  # W4A8 weights per scale along K (64 also runs: the kernel steps K a group at a time)
INT4_MAX = 7.0
AWQ_FORMATS = ("w4a16", "w4a8")  # the int4-weight formats AWQ scales apply to (calibration/awq.py)


def quantize_weight(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (wq [N, K] int8 | e4m3, K contiguous; scales [N] fp32). Called only at compile
    time (tests count the calls); activations go through quantize_rows."""
    return _quantize_per_row(w, fmt)


def _quantize_per_row(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row 8-bit quantization shared by weights and activations."""
    wf = w.float()
    amax = wf.abs().amax(dim=1)
    qmax = INT8_MAX if fmt == "int8" else FP8_MAX
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    y = wf / scale[:, None]
    if fmt == "int8":
        wq = torch.trunc(y + 0.5 * torch.sign(y)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    else:
        wq = y.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return wq.contiguous(), scale.contiguous()


def quantize_rows(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [M, K] -> per-token (xq, scales [M]); the same rounding as the weights."""
    return _quantize_per_row(x, fmt)


def linear_w8a8_ref(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None,
                    fmt: str = "int8", small_m: int = 16) -> torch.Tensor:
    """y = x W^T + b with 8-bit weights (and, for M > small_m, 8-bit per-token activations)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    m = x2.shape[0]
    if m <= small_m:  # weight-only path: the weight dequantized to x's 16-bit dtype, fp32 accumulate
        dt = act_dtype(x.dtype)
        w = (wq.float() * ws[:, None]).to(dt)
        y = (x2.to(dt).float() @ w.float().T).double()
    else:
        xq, xs = quantize_rows(x2, fmt)
        y = (xq.double() @ wq.double().T) * xs.double()[:, None] * ws.double()[None, :]
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype).reshape(*shape[:-1], wq.shape[0])


def act_dtype(dtype: torch.dtype) -> torch.dtype:
    """The 16-bit dtype a weight-only path computes in: x's own, bf16 for fp32 models."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def quantize_weight_int4(w: torch.Tensor, group: int = W4_GROUP):
    """w [N, K] -> (packed uint8 [N, Kp/2], scales [N, G] fp32, zeros [N, G] fp32), Kp = G * group
    (K padded with zeros). q = clamp(round(w / s) + z, 0, 15); w ~= (q - z) * s."""
    n, k = w.shape
    g = -(-k // group)
    wf = torch.nn.functional.pad(w.float(), (0, g * group - k)).reshape(n, g, group)
    lo, hi = wf.amin(dim=-1), wf.amax(dim=-1)
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))  # keep 0 exact
    scale = torch.where(hi > lo, (hi - lo) / 15.0, torch.ones_like(hi))
    zero = torch.round(-lo / scale).clamp(0, 15)
    q = torch.clamp(torch.round(wf / scale[..., None]) + zero[..., None], 0, 15).to(torch.uint8).reshape(n, -1)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
    return packed, scale.contiguous(), zero.contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[N, Kp/2] uint8 -> [N, Kp] values 0..15 (low nibble first)."""
    lo, hi = packed & 15, packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(packed, scale, zero, k: int, group: int = W4_GROUP) -> torch.Tensor:
    q = unpack_int4(packed).float().reshape(packed.shape[0], -1, group)
    return ((q - zero[..., None]) * scale[..., None]).reshape(packed.shape[0], -1)[:, :k]


def linear_w4a16_ref(x, packed, scale, zero, bias, group: int = W4_GROUP) -> torch.Tensor:
    """y = x dequant(W)^T + b: weights dequantized to x's dtype, fp32 accumulation."""
    shape = x.shape
    k = shape[-1]
    x2 = x.reshape(-1, k)
    dt = act_dtype(x.dtype)
    w = dequantize_int4(packed, scale, zero, k, group).to(dt)
    y = x2.to(dt).float() @ w.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], packed.shape[0])


def quantize_weight_w4a8(w: torch.Tensor, group: int = W4A8_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (packed uint8 [N, Kp/2], scales [N, G] fp32), Kp = G * group (K padded with
    zeros). q = round(w / s) in -7..7 (half away from zero), s = max|w| / 7 per group, stored as
    q + 8, two per byte (low nibble first)."""
    n, k = w.shape
    g = -(-k // group)
    wf = torch.nn.functional.pad(w.float(), (0, g * group - k)).reshape(n, g, group)
    amax = wf.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / INT4_MAX, torch.ones_like(amax))
    y = wf / scale[..., None]
    q = torch.trunc(y + 0.5 * torch.sign(y)).clamp(-INT4_MAX, INT4_MAX).to(torch.int16) + 8
    q = q.to(torch.uint8).reshape(n, -1)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous(), scale.contiguous()


def int4_symmetric_values(packed: torch.Tensor) -> torch.Tensor:
    """[N, Kp/2] uint8 -> [N, Kp] int8 weights -7..7 (the stored value minus 8)."""
    return (unpack_int4(packed).to(torch.int16) - 8).to(torch.int8)


def dequantize_w4a8(packed, scale, k: int, group: int = W4A8_GROUP) -> torch.Tensor:
    """The W4A8 weight as fp32 [N, K] (what it stands for; the GEMM never forms it)."""
    q = int4_symmetric_values(packed).float().reshape(packed.shape[0], -1, group)
    return (q * scale[..., None]).reshape(packed.shape[0], -1)[:, :k]


def linear_w4a8_ref(x, packed, scale, bias, group: int = W4A8_GROUP) -> torch.Tensor:
    """y = x W^T + b with int4 group weights and per-token INT8 x: the int32 partial sum of each
    group (exact: an fp32 matmul of integers whose sums stay below 2^24), times the group's
    scale, added up over the groups in fp32 in K order, times the token's scale, + bias."""
    shape = x.shape
    k = shape[-1]
    x2 = x.reshape(-1, k)
    n, kp = packed.shape[0], packed.shape[1] * 2
    xq, xs = quantize_rows(x2, "int8")
    xq = torch.nn.functional.pad(xq.float(), (0, kp - k))
    wq = int4_symmetric_values(packed).float()
    acc = torch.zeros(x2.shape[0], n, dtype=torch.float32, device=x.device)
    for g0 in range(0, kp, group):
        acc += (xq[:, g0:g0 + group] @ wq[:, g0:g0 + group].T) * scale[:, g0 // group][None, :]
    y = acc * xs[:, None]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], n)


def quantize_format(w: torch.Tensor, fmt: str) -> tuple:
    """A linear format's compile-time weight tensors: (wq, ws) 8-bit, (packed, scales, zeros)
    w4a16, (packed, scales) w4a8, (packed, group scales, outer scales) nvfp4."""
    if fmt in ("w8a8", "fp8"):
        return quantize_weight(w, "int8" if fmt == "w8a8" else "fp8")
    if fmt == "w4a16":
        return quantize_weight_int4(w)
    if fmt == "w4a8":
        return quantize_weight_w4a8(w)
    if fmt == "nvfp4":
        return F.quantize_weight_nvfp4(w)
    raise ValueError(f"no quantized weights for linear format {fmt!r}")


def format_output(x: torch.Tensor, q: tuple, bias, fmt: str, small_m: int = 16) -> torch.Tensor:
    """The reference output of a linear in `fmt` whose weights are quantize_format's `q`."""
    if fmt in ("w8a8", "fp8"):
        return linear_w8a8_ref(x, q[0], q[1], bias, "int8" if fmt == "w8a8" else "fp8", small_m)
    if fmt == "w4a16":
        return linear_w4a16_ref(x, *q, bias)
    if fmt == "w4a8":
        return linear_w4a8_ref(x, *q, bias)
    if fmt == "nvfp4":
        return F.linear_nvfp4_ref(x, *q, bias)
    raise ValueError(f"no reference for linear format {fmt!r}")


def weight_bytes(fmt: str, n: int, k: int, orig_elem: int) -> tuple[int, int]:
    """(bytes before, bytes after) of one linear's weight (scales and zeros included)."""
    before = n * k * orig_elem
    if fmt in ("w8a8", "fp8"):
        return before, n * k + 4 * n
    if fmt == "w4a16":
        g = -(-k // W4_GROUP)
        return before, n * g * W4_GROUP // 2 + 8 * n * g
    if fmt == "w4a8":
        g = -(-k // W4A8_GROUP)
        return before, n * g * W4A8_GROUP // 2 + 4 * n * g
    if fmt == "nvfp4":
        return before, F.weight_bytes(n, k)
    return before, before
