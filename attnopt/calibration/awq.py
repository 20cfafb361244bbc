"""AWQ: an activation-aware per-input-channel scale for each INT4-weight linear (`w4a16`, and
`w4a8`, whose activations are then rounded to INT8 per token after the division by s, so the
search measures that rounding too: for W4A8 the scales also balance x's channels).

Salient input channels (large mean |x|) lose less to 4-bit rounding when their weight columns
are scaled up before quantizing and x is divided by the same scale: x W^T = (x / s)(W s)^T
exactly, and only W s is rounded. The scale is s = mean|x_j|^alpha (normalized), alpha chosen on
a grid by the linear's own output error on the calibration rows (docs/algorithms.md#awq). alpha = 0
is plain round-to-nearest, so the choice is never worse than it on those rows.

Only computes, in float64 on the captured rows; the compile applies the scales
(linear_rewrite.py: W s quantized, x multiplied by 1 / s in the graph).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops import linear_ref as L

ALPHAS = tuple(i / 20 for i in range(21))  # 0, 0.05, ..., 1: AWQ's grid of 20 steps


@dataclass
class AwqChoice:
    """The chosen alpha, its scales (one per input channel) and the rel-L1 on the search rows of
    plain round-to-nearest (alpha 0) and of the chosen scales."""

    alpha: float
    scales: torch.Tensor  # [K] float64, > 0
    rtn_rel_l1: float
    awq_rel_l1: float

    def entry(self) -> dict:
        """The plan's `awq` value of a linear site."""
        return {"alpha": self.alpha, "scales": self.scales.tolist(),
                "rel_l1": {"rtn": self.rtn_rel_l1, "awq": self.awq_rel_l1}}


def awq_scales(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = mean|x_j|^alpha divided by sqrt(max s * min s), so the scales straddle 1 (the
    weight's range moves as little as it can). Channels never seen non-zero get the smallest."""
    m = mean_abs.double()
    pos = m[m > 0]
    floor = pos.min() if pos.numel() else torch.tensor(1.0, dtype=torch.float64)
    s = m.clamp_min(floor) ** alpha
    return s / (s.max() * s.min()).sqrt()


def w4a16_output(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None,
                 group: int = L.W4_GROUP) -> torch.Tensor:
    """(x / s) Q(W s)^T in float64 with attnopt's w4a16 round-to-nearest grouping (s None: plain
    round-to-nearest)."""
    w64, x64 = w.double(), x.double()
    if s is not None:
        w64, x64 = w64 * s[None, :], x64 / s[None, :]
    pk, sc, zr = L.quantize_weight_int4(w64, group)
    return x64 @ L.dequantize_int4(pk, sc, zr, w.shape[1], group).double().T


def w4a8_output(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None,
                group: int = L.W4A8_GROUP) -> torch.Tensor:
    """Q8(x / s) Q4(W s)^T in float64: x / s rounded per token to INT8 and W s to attnopt's
    symmetric group int4, as the w4a8 linear does (s None: no scales)."""
    w64, x64 = w.double(), x.double()
    if s is not None:
        w64, x64 = w64 * s[None, :], x64 / s[None, :]
    xq, xs = L.quantize_rows(x64, "int8")
    pk, sc = L.quantize_weight_w4a8(w64, group)
    return (xq.double() * xs.double()[:, None]) @ L.dequantize_w4a8(pk, sc, w.shape[1], group).double().T


OUTPUTS = {"w4a16": w4a16_output, "w4a8": w4a8_output}  # format -> its output under scales s


def _rel_l1(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).abs().sum() / ref.abs().sum().clamp_min(1e-300))


def awq_search(x: torch.Tensor, w: torch.Tensor, alphas=ALPHAS, group: int = L.W4_GROUP,
               fmt: str = "w4a16") -> AwqChoice:
    """The alpha of `alphas` whose scales give the smallest rel-L1 of the `fmt` (w4a16 | w4a8)
    linear against float64 x W^T on the rows x [M, K] (w [N, K]); ties keep the smaller alpha."""
    output = OUTPUTS[fmt]
    x2 = x.reshape(-1, x.shape[-1]).double()
    ref = x2 @ w.double().T
    rtn = _rel_l1(output(x2, w, None, group), ref)
    mean_abs = x2.abs().mean(dim=0)
    best = AwqChoice(0.0, awq_scales(mean_abs, 0.0), rtn, rtn)
    for a in alphas:
        if a <= 0:
            continue
        s = awq_scales(mean_abs, a)
        err = _rel_l1(output(x2, w, s, group), ref)
        if err < best.awq_rel_l1:
            best = AwqChoice(float(a), s, rtn, err)
    return best
