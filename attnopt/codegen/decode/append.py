"""One decode step's cache write as one Triton kernel (QuantizedKV.append for one token, eager).

Grid (batch * kv heads,). Each program writes the new K / V row into the 16-bit ring, re-quantizes
the K group the token falls in (its earlier tokens from the ring, per channel) and quantizes the
new V row (per group of channels), with kv_quant's arithmetic: fp16 scale / zero, IEEE division,
round half to even. Channels are handled as even / odd pairs, so "int4" packs in registers.
Under torch.compile the torch ops of QuantizedKV.append are used instead (Inductor fuses them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FMT = {"int8": 0, "int4": 1, "int4+int8": 2}


@triton.jit
def _round_even(u):
    f = tl.floor(u)
    diff = u - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    return tl.where((diff > 0.5) | ((diff == 0.5) & odd), f + 1.0, f)


@triton.jit
def _scale_zero(mn, mx, LEVELS: tl.constexpr):
    """fp16-rounded (scale, zero) as fp32, min_max_codes's rule (scale 1 where max == min)."""
    scale = tl.math.div_rn(mx - mn, LEVELS * 1.0).to(tl.float16).to(tl.float32)
    scale = tl.where(scale > 0, scale, 1.0)
    return scale, mn.to(tl.float16).to(tl.float32)


@triton.jit
def _codes(x, scale, zero, LEVELS: tl.constexpr):
    return tl.minimum(tl.maximum(_round_even(tl.math.div_rn(x - zero, scale)), 0.0), LEVELS * 1.0).to(tl.int32)


@triton.jit
def _store_pair(C, L, base, pair, ce, co, mask, FMT: tl.constexpr):
    """Codes of channels 2 * pair (ce) and 2 * pair + 1 (co) as the layout stores them."""
    if FMT == 0:
        tl.store(C + base + 2 * pair, ce.to(tl.uint8), mask=mask)
        tl.store(C + base + 2 * pair + 1, co.to(tl.uint8), mask=mask)
    elif FMT == 1:
        tl.store(C + base + pair, (ce | (co << 4)).to(tl.uint8), mask=mask)
    else:
        tl.store(C + base + pair, ((ce >> 4) | ((co >> 4) << 4)).to(tl.uint8), mask=mask)
        tl.store(L + base + pair, ((ce & 15) | ((co & 15) << 4)).to(tl.uint8), mask=mask)


@triton.jit
def _k_channels(x, valid, KS, KZ, s_off, pm, LEVELS: tl.constexpr):
    """Per-channel codes of a K group x [G, P] (rows `valid`), its scale / zero stored at s_off."""
    mn = tl.min(tl.where(valid, x, float("inf")), 0)
    mx = tl.max(tl.where(valid, x, float("-inf")), 0)
    scale, zero = _scale_zero(mn, mx, LEVELS)
    tl.store(KS + s_off, scale.to(tl.float16), mask=pm)
    tl.store(KZ + s_off, zero.to(tl.float16), mask=pm)
    return tl.where(valid, _codes(x, scale[None, :], zero[None, :], LEVELS), 0)


@triton.jit
def _kv_append_one(K, V, START, KC, KL, KS, KZ, VC, VL, VS, VZ, RK, RV,
                   sk_b, sk_h, sv_b, sv_h, sc_b, sc_h, sc_t, sks_b, sks_h, sks_g, svs_b, svs_h, svs_t,
                   sr_b, sr_h, sr_t,
                   HKV: tl.constexpr, D: tl.constexpr, G: tl.constexpr, R: tl.constexpr, LEVELS: tl.constexpr,
                   FMT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_NG: tl.constexpr):
    bh = tl.program_id(0)
    b = (bh // HKV).to(tl.int64)
    h = bh % HKV
    t = tl.load(START).to(tl.int64)
    p = tl.arange(0, BLOCK_P)
    pm = p < D // 2
    cb = b * sc_b + h * sc_h  # codes: byte offsets of this (batch, head)

    # ring: the new row
    ke = tl.load(K + b * sk_b + h * sk_h + 2 * p, mask=pm, other=0.0).to(tl.float32)
    ko = tl.load(K + b * sk_b + h * sk_h + 2 * p + 1, mask=pm, other=0.0).to(tl.float32)
    r_new = b * sr_b + h * sr_h + (t % R) * sr_t
    tl.store(RK + r_new + 2 * p, ke.to(RK.dtype.element_ty), mask=pm)
    tl.store(RK + r_new + 2 * p + 1, ko.to(RK.dtype.element_ty), mask=pm)
    ve_raw = tl.load(V + b * sv_b + h * sv_h + 2 * p, mask=pm, other=0.0)
    vo_raw = tl.load(V + b * sv_b + h * sv_h + 2 * p + 1, mask=pm, other=0.0)
    tl.store(RV + r_new + 2 * p, ve_raw.to(RV.dtype.element_ty), mask=pm)
    tl.store(RV + r_new + 2 * p + 1, vo_raw.to(RV.dtype.element_ty), mask=pm)

    # K: the token's group, per channel; earlier rows from the ring, this row from registers
    j = t % G
    first = t - j
    rows = tl.arange(0, G)
    slot = (first + rows) % R
    r_off = b * sr_b + h * sr_h + slot[:, None] * sr_t
    m2 = (rows[:, None] < j) & pm[None, :]
    xe = tl.load(RK + r_off + 2 * p[None, :], mask=m2, other=0.0).to(tl.float32)
    xo = tl.load(RK + r_off + 2 * p[None, :] + 1, mask=m2, other=0.0).to(tl.float32)
    is_new = rows[:, None] == j
    xe = tl.where(is_new, ke[None, :], xe)
    xo = tl.where(is_new, ko[None, :], xo)
    valid = rows[:, None] <= j
    s_off = b * sks_b + h * sks_h + (t // G) * sks_g + 2 * p
    ce = _k_channels(xe, valid, KS, KZ, s_off, pm, LEVELS)
    co = _k_channels(xo, valid, KS, KZ, s_off + 1, pm, LEVELS)
    _store_pair(KC, KL, cb + (first + rows)[:, None] * sc_t, p[None, :], ce, co, (rows[:, None] >= 0) & pm[None, :],
                FMT)

    # V: the new row, per group of G channels (pairs p of group g: g * G / 2 .. (g + 1) * G / 2 - 1)
    grp = tl.arange(0, BLOCK_NG)
    q = tl.arange(0, G // 2)
    gp = grp[:, None] * (G // 2) + q[None, :]  # pair index [BLOCK_NG, G / 2]
    gm = grp[:, None] < D // G
    v_base = V + b * sv_b + h * sv_h
    ve = tl.load(v_base + 2 * gp, mask=gm, other=0.0).to(tl.float32)
    vo = tl.load(v_base + 2 * gp + 1, mask=gm, other=0.0).to(tl.float32)
    mn = tl.minimum(tl.min(tl.where(gm, ve, float("inf")), 1), tl.min(tl.where(gm, vo, float("inf")), 1))
    mx = tl.maximum(tl.max(tl.where(gm, ve, float("-inf")), 1), tl.max(tl.where(gm, vo, float("-inf")), 1))
    mn = tl.where(grp < D // G, mn, 0.0)
    mx = tl.where(grp < D // G, mx, 0.0)
    scale, zero = _scale_zero(mn, mx, LEVELS)
    vs_off = b * svs_b + h * svs_h + t * svs_t + grp
    tl.store(VS + vs_off, scale.to(tl.float16), mask=grp < D // G)
    tl.store(VZ + vs_off, zero.to(tl.float16), mask=grp < D // G)
    vce = _codes(ve, scale[:, None], zero[:, None], LEVELS)
    vco = _codes(vo, scale[:, None], zero[:, None], LEVELS)
    _store_pair(VC, VL, cb + t * sc_t, gp, vce, vco, gm, FMT)


def append_one_triton(kv, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor) -> None:
    """QuantizedKV.append(k, v, start) for one token [B, H, 1, D], in one launch."""
    lay = kv.layout
    b, h, _, d = k.shape
    k_low = kv.k_low if kv.k_low is not None else kv.k_codes
    v_low = kv.v_low if kv.v_low is not None else kv.v_codes
    assert k.stride(-1) == v.stride(-1) == 1 and kv.k_codes.stride() == kv.v_codes.stride()
    assert kv.ring_k.stride() == kv.ring_v.stride() and kv.k_scale.stride() == kv.k_zero.stride()
    assert kv.v_scale.stride() == kv.v_zero.stride()
    _kv_append_one[(b * h,)](
        k, v, start.reshape(1), kv.k_codes, k_low, kv.k_scale, kv.k_zero, kv.v_codes, v_low, kv.v_scale, kv.v_zero,
        kv.ring_k, kv.ring_v, k.stride(0), k.stride(1), v.stride(0), v.stride(1), *kv.k_codes.stride()[:3],
        *kv.k_scale.stride()[:3], *kv.v_scale.stride()[:3], *kv.ring_k.stride()[:3],
        HKV=h, D=d, G=lay.group, R=lay.residual, LEVELS=lay.levels, FMT=FMT[lay.quant],
        BLOCK_P=triton.next_power_of_2(d // 2), BLOCK_NG=triton.next_power_of_2(d // lay.group), num_warps=4)
