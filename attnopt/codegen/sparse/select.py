"""In-kernel block selection and lookup-table writing, shared by the predictor kernels.

A predictor kernel ends with one q-block's row of block scores in registers ([NKB_P2], one entry
per kv-block). These helpers turn it into the row's kept blocks by ops/sparse_ref's rules
(`_keep_mass`: descending score, ties to the lower block, mass summed in float64) and write the
row of the lookup table the attention kernel reads (ops/sparse_ref.block_mask_to_lut's layout:
blocks needing no element mask first, then the masked ones, then the rest; counts = (n_full,
n_kept)). Doing it in the predictor's own launch is what keeps a sparse call at one launch
before the attention.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def block_row_grid(r, Nq, Nk, causal_offset, cols, IS_CAUSAL: tl.constexpr, HAS_DIAG: tl.constexpr,
                   BQ: tl.constexpr, BK: tl.constexpr, local):
    """For q-block r and kv-blocks `cols`: (valid: holds a visible key, diag: crosses the row's
    diagonal or holds one of the `local` keys before it, full: visible to every row and inside
    Nk), as sparse_ref's causal_blocks, diagonal_blocks and block_mask_to_lut."""
    nkb = (Nk + BK - 1) // BK
    first_row = r * BQ
    last_row = tl.minimum(r * BQ + BQ - 1, tl.maximum(Nq - 1, 0))
    c0 = cols * BK
    valid = cols < nkb
    full = valid & (c0 + BK - 1 < Nk)
    if IS_CAUSAL:
        valid = valid & (c0 <= last_row + causal_offset)
        full = full & (c0 + BK - 1 <= first_row + causal_offset)
        off = causal_offset
    else:
        off = 0
    if HAS_DIAG:
        diag = valid & (c0 <= last_row + off) & (c0 + BK - 1 >= first_row + off - local)
    else:
        diag = valid & (cols < 0)
    return valid, diag, full


@triton.jit
def keep_by_mass(s, valid, forced, tau, topk, cols, USE_TOPK: tl.constexpr, NKB_P2: tl.constexpr):
    """sparse_ref._keep_mass for one row: s fp32 [NKB_P2] >= 0, valid / forced bool; tau, topk
    float64 scalars. Candidates (valid, not forced) by descending score, ties to the lower block:
    tau rule, the shortest prefix whose mass (forced blocks counted first) reaches tau * the
    valid mass; topk rule, the best max(ceil(topk * candidates), 1). -> kept (forced included)."""
    forced = forced & valid
    cand = valid & ~forced
    s = tl.where(valid, s, 0.0)
    # one sortable int64 per block: (score bits + 1) above a reversed column index; non-candidates
    # keep only the index, below every candidate (fp32 bits of scores >= 0 order as the scores)
    low = (NKB_P2 - 1 - cols).to(tl.int64)
    bits = s.to(tl.int32, bitcast=True).to(tl.int64)
    key = tl.where(cand, ((bits + 1) << 32) | low, low)
    srt = tl.sort(key, 0, descending=True)
    is_cand = srt >= (1 << 32)
    ss = tl.where(is_cand, ((srt >> 32) - 1).to(tl.int32).to(tl.float32, bitcast=True), 0.0).to(tl.float64)
    if USE_TOPK:
        n = tl.sum(cand.to(tl.int32), 0).to(tl.float64) * topk
        want = n.to(tl.int32)
        want = tl.maximum(tl.where(want.to(tl.float64) < n, want + 1, want), 1)
        keep_sorted = cols < want
    else:
        s64 = s.to(tl.float64)
        total = tl.maximum(tl.sum(s64, 0), 1e-30)
        fmass = tl.sum(tl.where(forced, s64, 0.0), 0)
        before = fmass + tl.cumsum(ss, 0) - ss
        keep_sorted = before < tau * total
    thr = tl.min(tl.where(keep_sorted, srt, 9223372036854775807), 0)  # the last key kept
    return (cand & (key >= thr)) | forced


@triton.jit
def write_lut_row(keep, full, cols, nkb, LUT_row, CNT_row):
    """One q-block's LUT row and counts: kept blocks without element masks first (ascending),
    then kept ones with, then the others. `keep` must already be within the valid blocks."""
    inside = cols < nkb
    keep = keep & inside
    f = keep & full
    m = keep & ~full
    u = inside & ~keep
    fi, mi, ui = f.to(tl.int32), m.to(tl.int32), u.to(tl.int32)
    n_full = tl.sum(fi, 0)
    n_keep = tl.sum(keep.to(tl.int32), 0)
    pos = tl.where(f, tl.cumsum(fi, 0) - fi,
                   tl.where(m, n_full + tl.cumsum(mi, 0) - mi, n_keep + tl.cumsum(ui, 0) - ui))
    tl.store(LUT_row + pos, cols.to(tl.int32), mask=inside)
    tl.store(CNT_row, n_full)
    tl.store(CNT_row + 1, n_keep)


@triton.jit
def keep_top(s, cand, want, cols, NKB_P2: tl.constexpr):
    """The `want` best candidates of one row (descending score s >= 0, ties to the lower column),
    keep_by_mass's ordering: -> kept (candidates only)."""
    low = (NKB_P2 - 1 - cols).to(tl.int64)
    bits = tl.where(cand, s, 0.0).to(tl.int32, bitcast=True).to(tl.int64)
    key = tl.where(cand, ((bits + 1) << 32) | low, low)
    srt = tl.sort(key, 0, descending=True)
    thr = tl.min(tl.where(cols < want, srt, 9223372036854775807), 0)  # the last key kept
    return cand & (key >= thr)
