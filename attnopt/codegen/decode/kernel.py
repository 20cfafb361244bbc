"""Split-KV decode attention over the quantized KV cache (attnopt.decode): two Triton kernels.

`_kv_decode_split`: grid (batch * kv heads, SPLITS + 1). Program (bh, s < SPLITS) takes the s-th
of SPLITS equal chunks of the row's quantized tokens (chunk size from the row's own length at run
time, so a static grid balances whatever the length), program s = SPLITS the 16-bit ring of the
last `residual` tokens. Codes are dequantized in registers (K: the tile's one group row of per-
channel scale / zero; V: per token and channel group), never written back. All query heads of a
KV head and all query tokens are the rows of one tile (GQA without copying K / V). Each program
writes its unnormalized P.V, running max and sum (exp2 domain) to fp32 partials. A launch takes
NQ of the query tokens; `q_behind` says how many come after them (the host splits many queries
into launches of a few, so a tile keeps at most MAX_ROWS rows).

`_kv_decode_combine`: grid (batch * kv heads,), merges the SPLITS + 1 partials of each row and
writes the output in the query's dtype. The arithmetic is decode_ref's, in the same order.

FMT: 0 "int8", 1 "int4", 2 "int4+int8" (8-bit: both nibble planes), 3 "int4+int8" draft (upper
nibbles only, code = 16 * hi + 7.5).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _codes(hi_ptr, lo_ptr, offs, d, dmask, FMT: tl.constexpr):
    """Float codes of the elements at byte rows `offs` [N, 1] and channels d [1, BLOCK_D] (0 past D)."""
    if FMT == 0:
        c = tl.load(hi_ptr + offs + d, mask=dmask, other=0).to(tl.float32)
    else:
        shift = (d % 2) * 4
        hi = ((tl.load(hi_ptr + offs + d // 2, mask=dmask, other=0) >> shift) & 15).to(tl.float32)
        if FMT == 1:
            c = hi
        elif FMT == 2:
            lo = ((tl.load(lo_ptr + offs + d // 2, mask=dmask, other=0) >> shift) & 15).to(tl.float32)
            c = hi * 16.0 + lo
        else:
            c = hi * 16.0 + 7.5
    return c


@triton.jit
def _step(qs, k, v, ok, m_i, l_i, acc):
    """One online-softmax step (exp2 domain) of rows qs [M, D] over keys k, v [N, D]."""
    s = tl.dot(qs, tl.trans(k))
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p, v)
    return m_new, l_i, acc


@triton.jit
def _kv_decode_split(Q, KC, KL, KS, KZ, VC, VL, VS, VZ, RK, RV, LENS, VALID, OP, MP, LP,
                     sq_b, sq_h, sq_n, sc_b, sc_h, sc_t, sks_b, sks_h, sks_g, svs_b, svs_h, svs_t,
                     sr_b, sr_h, sr_t, s_valid, qk_scale, q_behind,
                     HKV: tl.constexpr, GQ: tl.constexpr, NQ: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
                     R: tl.constexpr, SPLITS: tl.constexpr, FMT: tl.constexpr, HAS_VALID: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)  # batch offsets of a 32K-token cache pass 2^31 bytes
    h = bh % HKV
    rows = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    dm = dmask[None, :]
    head, qi = rows // NQ, rows % NQ
    row_ok = rows < GQ * NQ
    q_ptr = Q + b * sq_b + (h * GQ + head)[:, None] * sq_h + qi[:, None] * sq_n + d[None, :]
    qs = tl.load(q_ptr, mask=row_ok[:, None] & dm, other=0.0).to(tl.float32) * qk_scale
    length = tl.load(LENS + b).to(tl.int32)
    limit = length - q_behind - NQ + qi  # the last key each row sees (causal offset; q_behind: later queries)
    quant_end = tl.maximum(length - R, 0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    offs_n = tl.arange(0, G)
    if sp < SPLITS:
        chunk = tl.cdiv(tl.cdiv(quant_end, SPLITS), G) * G
        lo = sp * chunk
        hi = tl.minimum(lo + chunk, quant_end)
        kc_base = b * sc_b + h * sc_h
        for start in range(lo, hi, G):
            t = start + offs_n
            byte_rows = kc_base + t[:, None] * sc_t
            kc = _codes(KC, KL, byte_rows, d[None, :], dm, FMT)
            g_off = b * sks_b + h * sks_h + (start // G) * sks_g + d
            ks = tl.load(KS + g_off, mask=dmask, other=0).to(tl.float32)
            kz = tl.load(KZ + g_off, mask=dmask, other=0).to(tl.float32)
            k = kc * ks[None, :] + kz[None, :]
            vc = _codes(VC, VL, byte_rows, d[None, :], dm, FMT)
            v_off = b * svs_b + h * svs_h + t[:, None] * svs_t + (d // G)[None, :]
            v = vc * tl.load(VS + v_off, mask=dm, other=0).to(tl.float32) + tl.load(VZ + v_off, mask=dm,
                                                                                     other=0).to(tl.float32)
            ok = (t[None, :] < quant_end) & (t[None, :] <= limit[:, None])
            if HAS_VALID:
                ok = ok & (tl.load(VALID + b * s_valid + t) != 0)[None, :]
            m_i, l_i, acc = _step(qs, k, v, ok, m_i, l_i, acc)
    else:
        for s0 in range(0, R, G):
            slot = s0 + offs_n
            back = ((length - 1 - slot) % R + R) % R  # C remainder: may be negative before + R
            t = length - 1 - back  # the token the slot holds (< 0: never written)
            r_off = b * sr_b + h * sr_h + slot[:, None] * sr_t + d[None, :]
            k = tl.load(RK + r_off, mask=dm, other=0).to(tl.float32)
            v = tl.load(RV + r_off, mask=dm, other=0).to(tl.float32)
            ok = (t[None, :] >= 0) & (t[None, :] <= limit[:, None])
            if HAS_VALID:
                ok = ok & (tl.load(VALID + b * s_valid + tl.maximum(t, 0)) != 0)[None, :]
            m_i, l_i, acc = _step(qs, k, v, ok, m_i, l_i, acc)
    part = bh * (SPLITS + 1) + sp
    tl.store(OP + (part * BLOCK_M + rows)[:, None] * BLOCK_D + d[None, :], acc)
    tl.store(MP + part * BLOCK_M + rows, m_i)
    tl.store(LP + part * BLOCK_M + rows, l_i)


@triton.jit
def _kv_decode_combine(OP, MP, LP, OUT, so_b, so_h, so_n,
                       HKV: tl.constexpr, GQ: tl.constexpr, NQ: tl.constexpr, D: tl.constexpr,
                       SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    b = (bh // HKV).to(tl.int64)
    h = bh % HKV
    rows = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    top = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for sp in range(0, SPLITS + 1):
        top = tl.maximum(top, tl.load(MP + (bh * (SPLITS + 1) + sp) * BLOCK_M + rows))
    top = tl.where(top == float("-inf"), 0.0, top)
    den = tl.zeros([BLOCK_M], tl.float32)
    num = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for sp in range(0, SPLITS + 1):
        part = bh * (SPLITS + 1) + sp
        w = tl.exp2(tl.load(MP + part * BLOCK_M + rows) - top)
        den += w * tl.load(LP + part * BLOCK_M + rows)
        num += w[:, None] * tl.load(OP + (part * BLOCK_M + rows)[:, None] * BLOCK_D + d[None, :])
    out = tl.where(den[:, None] > 0, num / tl.maximum(den, 1e-30)[:, None], 0.0)
    head, qi = rows // NQ, rows % NQ
    o_ptr = OUT + b * so_b + (h * GQ + head)[:, None] * so_h + qi[:, None] * so_n + d[None, :]
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=(rows < GQ * NQ)[:, None] & (d < D)[None, :])
