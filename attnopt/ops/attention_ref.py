"""Pure-PyTorch reference of attnopt's quantized attention (what it computes, with the papers:
docs/algorithms.md#quantized-attention).

This is the CPU path of `torch.ops.attnopt.attention` and the ground truth the Triton kernels
are tested against: the same quantization grid (per-block scales, K smoothing, scale*log2(e)
folded into Q), the same P precision, fp32 accumulation, and with `block_n` the kernels' online
softmax: keys are visited in tiles of `block_n`, P is rounded against the running row maximum
and earlier tiles rescaled, so the kernels differ from it only in fp32 summation order (and in
values that sit exactly on a rounding boundary). Without `block_n` the softmax uses the row's
final maximum (one tile), which rounds P slightly differently but not less accurately.

Tensors: q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv], Hq % Hkv == 0 (GQA: query head
h reads kv head h // (Hq // Hkv)). Masks broadcast to [B, Hq, Nq, Nk].

Mask semantics (shared with the kernels):
- attn_bias: float, added to the scaled logits.
- keep_mask: bool, False positions take the logit `masked_value`; so do keys j > i + causal_offset
  when is_causal.
- A row with no kept key: masked_value == -inf gives 0 (as torch SDPA); a finite masked_value
  gives the plain mean of V over all keys (what eager softmax over equal logits gives).

Non-finite inputs (shared with the kernels): every NaN / Inf in Q, K, V and every NaN / +inf in
attn_bias counts as 0 in the arithmetic (scales, means, logits), and the output rows that depend
on one are set to NaN afterwards (`poisoned_rows`): a query row holding one, and a row attending
unmasked a key whose K or V row holds one (or a NaN / +inf bias). Every other row is exactly the
result with those values replaced by 0.

- softcap > 0 (Gemma 2 / Grok logit soft-capping): the scaled logits become
  softcap * tanh(logits / softcap) before the bias and masks are applied. K smoothing shifts a
  row's logits by -scale * q . mean(K) (harmless to softmax, not to tanh): that term is added
  back before capping (`softcap_row_shift`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import nvfp4

LOG2E = 1.4426950408889634
FP32_MAX = 3.4028234663852886e38
INT8_MAX = 127.0
FP8_MAX = 448.0  # float8_e4m3fn
# P.V "fp8_acc16" (SageAttention2++): each key tile's e4m3 product sums in fp16 (max 65504). P~ <= 448
# per key, so V~ is scaled to +-2.25 and a tile holds at most ACC16_BLOCK_N keys: 448 * 2.25 * 64 = 64512.
V_ACC16_MAX = 2.25
ACC16_BLOCK_N = 64

# Quantization granularity: rows of Q / K sharing one scale. The kernels read scales per row
# (row // GRAN), so their tile sizes are free to differ from these.
Q_GRAN = 32
K_GRAN = 64

_ROW_CHUNK_ELEMS = 1 << 25  # bound on logits held at once by the reference (per chunk)


# ------------------------------------------------------------------------------- quantization


def quantize_rows(x: torch.Tensor, gran: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x [..., N, D] (float32) in blocks of `gran` rows.

    Returns (xq [..., N, D] int8 | float8_e4m3fn, scales [..., ceil(N / gran)] float32) with
    x ~= xq * scale. int8 rounds half away from zero (as the kernels do); a block of zeros gets
    scale 1.
    """
    n = x.shape[-2]
    nb = -(-n // gran)
    pad = nb * gran - n
    xp = torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x
    blocks = xp.reshape(*x.shape[:-2], nb, gran, x.shape[-1])
    amax = blocks.abs().amax(dim=(-1, -2))
    qmax = INT8_MAX if fmt == "int8" else FP8_MAX
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    y = blocks / scale[..., None, None]
    if fmt == "int8":
        y = torch.trunc(y + 0.5 * torch.sign(y)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    elif fmt == "fp8":
        y = y.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    y = y.reshape(*x.shape[:-2], nb * gran, x.shape[-1])[..., :n, :]
    return y, scale


def rows_scale(scale: torch.Tensor, gran: int, n: int) -> torch.Tensor:
    """Per-block scales [..., nb] -> per-row scales [..., n]."""
    return scale.repeat_interleave(gran, dim=-1)[..., :n]


def block_mean(x: torch.Tensor, gran: int) -> torch.Tensor:
    """Mean of each block of `gran` rows of x [..., N, D] over its valid rows -> [..., nb, D]."""
    n = x.shape[-2]
    nb = -(-n // gran)
    pad = nb * gran - n
    xp = torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x
    sums = xp.reshape(*x.shape[:-2], nb, gran, x.shape[-1]).sum(dim=-2)
    counts = torch.full((nb,), float(gran), dtype=x.dtype, device=x.device)
    counts[-1] = n - (nb - 1) * gran
    return sums / counts[:, None]


def pv_dtype_for(v_dtype: torch.dtype) -> torch.dtype:
    """16-bit type P and V use for P.V: the model's own, bf16 for fp32 models (no fp16 overflow)."""
    return v_dtype if v_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


# ----------------------------------------------------------------------------------- masking


def causal_keep(nq: int, nk: int, offset: int, device) -> torch.Tensor:
    """[nq, nk] bool: key j visible to query i iff j <= i + offset."""
    i = torch.arange(nq, device=device)[:, None]
    j = torch.arange(nk, device=device)[None, :]
    return j <= i + offset


def _fold_gqa(t: torch.Tensor | None, hkv: int) -> torch.Tensor | None:
    """[B, Hq, Nq, X] -> [B, Hkv, G*Nq, X]: query heads of one kv head become rows."""
    if t is None:
        return None
    b, hq, nq, x = t.shape
    return t.reshape(b, hkv, (hq // hkv) * nq, x)


def _full_mask(m: torch.Tensor | None, b, hq, nq, nk) -> torch.Tensor | None:
    if m is None:
        return None
    while m.dim() < 4:
        m = m.unsqueeze(0)
    return m.expand(b, hq, nq, nk)


def _log2_logit(x: torch.Tensor | float) -> torch.Tensor | float:
    """Natural-log logits -> log2 units, keeping finite values finite (finfo.min masks stay finite)."""
    if isinstance(x, float):
        return x if x == -math.inf else max(x * LOG2E, -FP32_MAX)
    y = x.float() * LOG2E
    return torch.where(torch.isneginf(x), y, y.clamp(min=-FP32_MAX))


def _masked_logits(s, rows, nq, nk, bias, keep, masked_value, is_causal, causal_offset):
    """Apply bias / keep mask / causal to log2-domain logits s [B, Hkv, rows_chunk, Nk]. A NaN or
    +inf bias counts as 0 here (its row is poisoned instead: `poisoned_rows`)."""
    if bias is not None:
        s = s + _log2_logit(sane_bias(bias))
    fill = _log2_logit(float(masked_value))
    if keep is not None:
        s = torch.where(keep, s, torch.full_like(s, fill))
    if is_causal:
        qi = (rows % nq)[:, None]
        kj = torch.arange(nk, device=s.device)[None, :]
        s = torch.where(kj <= qi + causal_offset, s, torch.full_like(s, fill))
    return s


# ---------------------------------------------------------------------------- soft-capping


def softcap_row_shift(q: torch.Tensor, kmean: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * log2(e) * q . mean(K) per query row [B, Hq, Nq] (fp32, log2 units): what K smoothing
    took off each row's logits. q finite [B, Hq, Nq, D]; kmean [B, Hkv, 1, D] or [B, Hkv, D]."""
    if kmean.dim() == 3:
        kmean = kmean[:, :, None]
    g = q.shape[1] // kmean.shape[1]
    km = kmean.float().repeat_interleave(g, dim=1)  # [B, Hq, 1, D]
    return torch.matmul(q.float(), km.transpose(-1, -2))[..., 0] * (scale * LOG2E)


def apply_softcap(s: torch.Tensor, cap: float) -> torch.Tensor:
    """log2-domain logits s -> cap * tanh(s / cap) in natural units, back in log2 units."""
    c2 = cap * LOG2E
    return torch.tanh(s / c2) * c2


# ------------------------------------------------------------------------ non-finite inputs


def finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    """Non-finite entries -> 0, so one NaN cannot spoil a whole block's quantization scale."""
    return torch.nan_to_num(x.float(), nan=0.0, posinf=0.0, neginf=0.0)


def sane_bias(bias: torch.Tensor) -> torch.Tensor:
    """An additive mask with NaN / +inf -> 0 (-inf stays: it masks). Their row is poisoned instead."""
    bad = torch.isnan(bias) | torch.isposinf(bias)
    return torch.where(bad, torch.zeros_like(bias), bias)


def nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., N, D] -> [..., N] bool: the row holds a NaN or an Inf."""
    return ~torch.isfinite(x).all(dim=-1)


def poisoned_rows(rows, nq, nk, bad_q, bad_kv, bias, keep, is_causal: bool, causal_offset) -> torch.Tensor:
    """Which of `rows` (folded GQA rows of [B, Hkv, G*Nq]) depend on a non-finite input -> [B, Hkv, R].

    A row is poisoned by its own query (bad_q [B, Hkv, R]), by a key / value row (bad_kv
    [B, Hkv, Nk]) it attends unmasked, or by a NaN / +inf in the additive mask at a position it
    attends. "Unmasked": kept by `keep`, by the causal rule, and with a bias other than -inf there
    (bias, keep: this chunk's [B, Hkv, R, Nk] or None). Every other row is computed exactly as if
    the non-finite values were 0 (they are zeroed before quantization), so it is unaffected."""
    hit = bad_kv[:, :, None, :]
    if bias is not None:
        hit = (hit | torch.isnan(bias) | torch.isposinf(bias)) & ~torch.isneginf(bias)
    if keep is not None:
        hit = hit & keep
    if is_causal:
        qi = (rows % nq)[:, None]
        kj = torch.arange(nk, device=bad_kv.device)[None, :]
        hit = hit & (kj <= qi + causal_offset)
    return bad_q | hit.any(dim=-1)


# ---------------------------------------------------------------------------- the reference


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_bias: torch.Tensor | None = None,
    keep_mask: torch.Tensor | None = None,
    masked_value: float = -math.inf,
    is_causal: bool = False,
    causal_offset: int = 0,
    scale: float | None = None,
    quant: str = "int8",
    pv: str = "fp16",
    smooth_k: bool = True,
    smooth_q: bool = False,
    return_lse: bool = False,
    block_n: int | None = None,
    softcap: float = 0.0,
):
    """Quantized attention, computed in plain PyTorch with the kernels' arithmetic.

    With `return_lse`, also the natural-log logsumexp of each row's logits [B, Hq, Nq] (fp32).
    `block_n`: the kernel's key tile (None: all keys in one tile). `softcap` > 0 caps the scaled
    logits at +-softcap through tanh (0: off).
    """
    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    if hq % hkv:
        raise ValueError(f"query heads {hq} not a multiple of kv heads {hkv}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out_dtype = q.dtype
    if nq == 0 or b == 0 or hq == 0:
        z = q.new_zeros(b, hq, nq, dv)
        return (z, z.new_zeros(b, hq, nq, dtype=torch.float32)) if return_lse else z

    g = hq // hkv
    # the caller's non-finite entries mark output rows at the end; the arithmetic sees zeros
    bad_q = _fold_gqa(nonfinite_rows(q)[..., None], hkv)[..., 0]  # [B, Hkv, G*Nq]
    bad_kv = nonfinite_rows(k) | nonfinite_rows(v)  # [B, Hkv, Nk]
    q, k, v = (finite_or_zero(t).to(t.dtype) for t in (q, k, v))
    ops = quantized_operands(q, k, v, scale, quant, pv, smooth_k, smooth_q)
    q_deq, k_deq, kf, kmean, corr_rows, qk_scale = ops.q, ops.k, ops.k_smooth, ops.k_mean, ops.q_bar, ops.qk_scale
    v_op, v_scale, v_mean = ops.v, ops.v_scale, ops.v_mean

    q_rows = _fold_gqa(q_deq, hkv)  # [B, Hkv, G*Nq, D]
    cap_shift = None
    if softcap and smooth_k and quant != "none":
        cap_shift = _fold_gqa(softcap_row_shift(q, kmean, scale)[..., None], hkv)  # [B, Hkv, G*Nq, 1]
    corr_rows = _fold_gqa(corr_rows, hkv)
    bias = _fold_gqa(_full_mask(attn_bias, b, hq, nq, nk), hkv)
    keep = _fold_gqa(_full_mask(keep_mask, b, hq, nq, nk), hkv)

    v_all_mean = v.float().mean(dim=-2, keepdim=True)  # [B, Hkv, 1, Dv]

    rows_total = g * nq
    chunk = max(1, min(rows_total, _ROW_CHUNK_ELEMS // max(1, b * hkv * nk)))
    outs, lses, bads = [], [], []
    for r0 in range(0, rows_total, chunk):
        r1 = min(rows_total, r0 + chunk)
        rows = torch.arange(r0, r1, device=q.device)
        s = torch.matmul(q_rows[:, :, r0:r1], k_deq.transpose(-1, -2)) * qk_scale
        if corr_rows is not None:
            s = s + torch.matmul(corr_rows[:, :, r0:r1], kf.transpose(-1, -2))
        if softcap:
            s = apply_softcap(s if cap_shift is None else s + cap_shift[:, :, r0:r1], softcap)
        bias_c = None if bias is None else bias[:, :, r0:r1]
        keep_c = None if keep is None else keep[:, :, r0:r1]
        s = _masked_logits(s, rows, nq, nk, bias_c, keep_c, masked_value, is_causal, causal_offset)
        bads.append(poisoned_rows(rows, nq, nk, bad_q[:, :, r0:r1], bad_kv, bias_c, keep_c, is_causal,
                                  causal_offset))
        if pv == "fp8_acc16":  # the fp16 tile sum is only bounded for tiles of at most 64 keys
            block_n = min(block_n or ACC16_BLOCK_N, ACC16_BLOCK_N)
        m, l, acc = _online_softmax_pv(s, v_op, pv, pv_dtype_for(v.dtype), block_n or max(nk, 1))
        empty = torch.isneginf(m)  # row with no kept key and -inf fill
        o = unscale_pv(acc / torch.where(l > 0, l, torch.ones_like(l)), pv, v_scale, v_mean)
        o = torch.where(empty, torch.zeros_like(o), o)
        if masked_value != -math.inf:
            # A row whose every key is masked with a finite value: eager softmax is uniform.
            fill = _log2_logit(float(masked_value))
            all_masked = (m <= fill) & ~empty
            o = torch.where(all_masked, v_all_mean.expand_as(o), o)
        outs.append(o)
        if return_lse:
            lse2 = torch.where(empty, torch.full_like(m, -math.inf), m + torch.log2(torch.where(l > 0, l, 1.0)))
            lses.append(lse2[..., 0] * math.log(2.0))
    o = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    bad = torch.cat(bads, dim=2).reshape(b, hq, nq)
    o = o.reshape(b, hq, nq, dv).masked_fill(bad[..., None], float("nan")).to(out_dtype)
    if not return_lse:
        return o
    lse = (torch.cat(lses, dim=2) if len(lses) > 1 else lses[0]).reshape(b, hq, nq)
    if smooth_k and quant != "none" and not softcap:  # undo K smoothing's per-row shift of the logits
        lse = lse + scale * torch.matmul(q.float(), kmean.repeat_interleave(g, dim=1).transpose(-1, -2))[..., 0]
    return o, lse.masked_fill(bad, float("nan"))


@dataclass
class Operands:
    """Q, K and V as the kernels multiply them (dequantized to fp32), and what undoes their scaling."""

    q: torch.Tensor  # [B, Hq, Nq, D], scale * log2(e) folded in unless quant is "none"
    k: torch.Tensor  # [B, Hkv, Nk, D]
    qk_scale: float  # applied to Q.K^T after the dot (the 16-bit path's scale * log2(e))
    k_smooth: torch.Tensor  # K minus its token mean (if smoothed), fp32
    k_mean: torch.Tensor  # [B, Hkv, 1, D]
    q_bar: torch.Tensor | None  # per-row block mean of Q (Q smoothing): its QK^T term is added back
    v: torch.Tensor  # [B, Hkv, Nk, Dv]: 16-bit V, or smoothed V over its per-channel scale (8 / 4 bit)
    v_scale: torch.Tensor | None  # [B, Hkv, 1, Dv]
    v_mean: torch.Tensor | None  # [B, Hkv, 1, Dv]


def quantized_operands(q, k, v, scale: float, quant: str, pv: str, smooth_k: bool, smooth_q: bool) -> Operands:
    """The quantization grid (inputs already finite): per-block INT8 / FP8 or NVFP4 Q (scale * log2(e)
    folded, optionally block-smoothed) and K (token mean subtracted); V in 16 bits, or smoothed and
    per-channel scaled to FP8 / NVFP4. See docs/algorithms.md#q-and-k-quantization-int8-fp8,
    docs/algorithms.md#pv-precision and docs/algorithms.md#nvfp4-microscaling."""
    nq, nk = q.shape[2], k.shape[2]
    qf = q.float() * (scale * LOG2E)
    kf = k.float()
    kmean = kf.mean(dim=-2, keepdim=True)
    if smooth_k:
        kf = kf - kmean
    corr_rows = None
    if quant == "none":
        qs16 = pv_dtype_for(q.dtype)
        q_deq, k_deq, qk_scale = q.to(qs16).float(), k.to(qs16).float(), scale * LOG2E
    else:
        q_in = qf
        if smooth_q:
            qmean = block_mean(qf, Q_GRAN)  # [B, Hq, nbq, D]
            corr_rows = qmean.repeat_interleave(Q_GRAN, dim=-2)[..., :nq, :]  # per-row qbar
            q_in = qf - corr_rows
        if quant == "fp4":  # NVFP4: groups of 16 along D, outer scale per block of rows
            q_deq = nvfp4.fake_quantize_rows(q_in, Q_GRAN)
            k_deq = nvfp4.fake_quantize_rows(kf, K_GRAN)
        else:
            q_q, q_s = quantize_rows(q_in, Q_GRAN, quant)
            k_q, k_s = quantize_rows(kf, K_GRAN, quant)
            # Exact in fp32: int8 products summed over D <= 1040 stay below 2**24.
            q_deq = q_q.float() * rows_scale(q_s, Q_GRAN, nq)[..., None]
            k_deq = k_q.float() * rows_scale(k_s, K_GRAN, nk)[..., None]
        qk_scale = 1.0
    v_scale = v_mean = None
    if pv in ("fp8", "fp4", "fp8_acc16"):
        vf = v.float()
        v_mean = vf.mean(dim=-2, keepdim=True)  # V smoothing: O = P (V - vbar) + vbar, exact
        vs = vf - v_mean
        if pv == "fp4":  # per-channel outer scale, e4m3 scales per 16 keys: the P.V reduction dim
            v_op, v_scale = nvfp4.quantize_v(vs)
        else:
            amax = vs.abs().amax(dim=-2, keepdim=True)
            vmax = V_ACC16_MAX if pv == "fp8_acc16" else FP8_MAX
            v_scale = torch.where(amax > 0, amax / vmax, torch.ones_like(amax))
            v_op = (vs / v_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    elif pv == "fp16":
        v_op = v.to(pv_dtype_for(v.dtype)).float()
    else:
        raise ValueError(f"unknown pv format {pv!r}")
    return Operands(q_deq, k_deq, qk_scale, kf, kmean, corr_rows, v_op, v_scale, v_mean)


def round_p(p: torch.Tensor, pv: str, p16: torch.dtype) -> torch.Tensor:
    """Softmax numerators (<= 1, against the running max) as the P.V dot reads them: 16-bit,
    FP8 scaled to [0, 448], or NVFP4 scaled by 448 * 6 (undone by unscale_pv)."""
    if pv in ("fp8", "fp8_acc16"):
        return (p * FP8_MAX).to(torch.float8_e4m3fn).float()
    if pv == "fp4":
        return nvfp4.quantize_p(p)
    return p.to(p16).float()


def unscale_pv(o: torch.Tensor, pv: str, v_scale, v_mean) -> torch.Tensor:
    """Normalized P.V -> output: undo P's and V's 8 / 4-bit scales and add V's mean back."""
    if pv in ("fp8", "fp8_acc16"):
        return o * (v_scale / FP8_MAX) + v_mean
    if pv == "fp4":
        return o * (v_scale / nvfp4.P_SCALE) + v_mean
    return o


def pv_tile(p: torch.Tensor, v: torch.Tensor, pv: str) -> torch.Tensor:
    """One key tile's P.V product (operands already rounded), as the kernel's accumulator holds it:
    fp32, or for "fp8_acc16" the exact sum rounded to fp16 (the tile's fp16 accumulator) before it
    joins the fp32 sum across tiles."""
    out = torch.matmul(p, v)
    return out.to(torch.float16).float() if pv == "fp8_acc16" else out


def _online_softmax_pv(s, v_op, pv: str, p16: torch.dtype, block_n: int):
    """Softmax(s) . V over key tiles of `block_n`, as the kernels run it (exp2 domain): returns
    the final row max m, the row sum l and the unnormalized fp32 accumulator.

    Each tile's P is rounded to the P.V format against the running maximum, and the running
    sum and accumulator are rescaled when the maximum grows. FP8 P is scaled to [0, 448] and
    FP4 P by 448 * 6 (their V scales are applied by the caller)."""
    shape = s.shape[:-1]
    m = torch.full((*shape, 1), -math.inf, device=s.device)
    l = torch.zeros((*shape, 1), device=s.device)
    acc = torch.zeros((*shape, v_op.shape[-1]), device=s.device)
    for c0 in range(0, s.shape[-1], block_n):
        sb = s[..., c0:c0 + block_n]
        m_new = torch.maximum(m, sb.amax(dim=-1, keepdim=True))
        m_safe = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp2(sb - m_safe)
        alpha = torch.exp2(m - m_safe)
        l = l * alpha + p.sum(dim=-1, keepdim=True)
        acc = acc * alpha + pv_tile(round_p(p, pv, p16), v_op[..., c0:c0 + block_n, :], pv)
        m = m_new
    return m, l, acc


def attention_exact(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_bias: torch.Tensor | None = None,
    keep_mask: torch.Tensor | None = None,
    masked_value: float = -math.inf,
    is_causal: bool = False,
    causal_offset: int = 0,
    scale: float | None = None,
    return_lse: bool = False,
    softcap: float = 0.0,
):
    """Unquantized attention in float64 with the same mask semantics: the accuracy yardstick."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    g = hq // hkv
    kk = k.double().repeat_interleave(g, dim=1)
    vv = v.double().repeat_interleave(g, dim=1)
    s = torch.matmul(q.double(), kk.transpose(-1, -2)) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if attn_bias is not None:
        s = s + attn_bias.double()
    keep = torch.ones(nq, nk, dtype=torch.bool, device=q.device)
    if is_causal:
        keep = causal_keep(nq, nk, causal_offset, q.device)
    keep = keep.expand(b, hq, nq, nk)
    if keep_mask is not None:
        keep = keep & _full_mask(keep_mask, b, hq, nq, nk)
    s = torch.where(keep, s, torch.full_like(s, float(masked_value)))
    m = s.amax(dim=-1, keepdim=True)
    empty = torch.isneginf(m)
    p = torch.exp(s - torch.where(empty, torch.zeros_like(m), m))
    l = p.sum(dim=-1, keepdim=True)
    o = torch.matmul(p, vv) / torch.where(l > 0, l, torch.ones_like(l))
    o = torch.where(empty, torch.zeros_like(o), o)
    if masked_value != -math.inf:
        all_masked = (~keep).all(dim=-1, keepdim=True)
        o = torch.where(all_masked, vv.mean(dim=-2, keepdim=True).expand_as(o), o)
    if return_lse:
        return o, torch.logsumexp(s, dim=-1)
    return o
