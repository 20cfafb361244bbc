"""Structured block masks on the GPU: sliding window with sinks, radial (video), a user's block
mask, and SVG's spatial / temporal patterns. Each program decides, for one head and one q-block,
which kv-blocks hold a kept (query, key) pair, checking the same rows ops/sparse_ref checks
(every row up to 4096 queries; past that every 8th plus each block's last row).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ...ops.sparse_ref import BK, BQ, n_blocks, per_head

WINDOW, RADIAL, USER_BLOCK, SPATIAL, TEMPORAL = 0, 1, 2, 3, 4


@triton.jit
def _keep(i, j, h, SPAN, USER, stride_uh, stride_ur, sinks, offset, s_frame, prefix, dense, min_band, ubs,
          frames_near, band_tokens, METHOD: tl.constexpr, LOOK_BACK: tl.constexpr, BK_C: tl.constexpr):
    """Element predicate [R, C] of (query i [R, 1], key j [1, C])."""
    if METHOD == 0:  # window + sinks
        span = tl.load(SPAN + h)
        ii = i + offset
        near = ((ii - j).to(tl.float32) < span)
        if LOOK_BACK:
            near = near & (j - ii < 1)
        else:
            near = near & ((j - ii).to(tl.float32) < span)
        return near | (j < sinks)
    if METHOD == 2:  # a user's block mask at block size ubs
        return tl.load(USER + h * stride_uh + (i // ubs) * stride_ur + j // ubs) != 0
    text = (i < prefix) | (j < prefix)
    ip = tl.maximum(i - prefix, 0)
    jp = tl.maximum(j - prefix, 0)
    fi, fj = ip // s_frame, jp // s_frame
    pi, pj = ip % s_frame, jp % s_frame
    if METHOD == 3:  # spatial: nearby frames
        return text | (tl.abs(fi - fj) <= frames_near)
    if METHOD == 4:  # temporal: the same position across frames
        return text | (tl.abs(pi - pj) * 2 < band_tokens)
    dist = tl.abs(fi - fj)  # radial
    e = tl.floor(tl.log2(tl.maximum(dist, 1).to(tl.float32))).to(tl.int32)
    band = tl.where(dist <= 1, s_frame, s_frame >> e)
    every = tl.maximum((BK_C + tl.maximum(band, 1) - 1) // tl.maximum(band, 1), 1)
    near = tl.abs(pi - pj) * 2 < tl.maximum(band, min_band)
    sampled = (band >= BK_C) | (dist % every == 0)
    return text | (dist <= dense) | (near & sampled)


@triton.jit
def _mask_kernel(OUT, stride_oh, stride_or, SPAN, USER, stride_uh, stride_ur, nq, nk, nkb, sinks, offset,
                 s_frame, prefix, dense, min_band, ubs, frames_near, band_tokens,
                 METHOD: tl.constexpr, LOOK_BACK: tl.constexpr, SAMPLE: tl.constexpr, BQ_C: tl.constexpr,
                 BK_C: tl.constexpr, TILE_C: tl.constexpr):
    r = tl.program_id(0)
    ct = tl.program_id(1)
    h = tl.program_id(2)
    rows = r * BQ_C + tl.arange(0, BQ_C // SAMPLE) * SAMPLE
    last = tl.minimum(r * BQ_C + BQ_C - 1, nq - 1)
    rows = tl.where(rows < nq, rows, last)  # rows past the end: the block's last row again
    keys = ct * TILE_C * BK_C + tl.arange(0, TILE_C * BK_C)
    kvalid = keys < nk
    hit = _keep(rows[:, None], keys[None, :], h, SPAN, USER, stride_uh, stride_ur, sinks, offset, s_frame, prefix,
                dense, min_band, ubs, frames_near, band_tokens, METHOD, LOOK_BACK, BK_C)
    hit_last = _keep(last + tl.zeros([1, 1], dtype=tl.int32), keys[None, :], h, SPAN, USER, stride_uh, stride_ur,
                     sinks, offset, s_frame, prefix, dense, min_band, ubs, frames_near, band_tokens, METHOD,
                     LOOK_BACK, BK_C)
    hit = (tl.max(hit.to(tl.int32), 0) > 0) | (tl.max(hit_last.to(tl.int32), 0) > 0)
    hit = hit & kvalid
    blocks = tl.max(tl.reshape(hit.to(tl.int32), [TILE_C, BK_C]), 1)
    cols = ct * TILE_C + tl.arange(0, TILE_C)
    tl.store(OUT + h * stride_oh + r * stride_or + cols, blocks.to(tl.int8), mask=cols < nkb)


def _launch(method: int, h: int, nq: int, nk: int, device, span=None, user=None, ubs=1, sinks=0, offset=0,
            look_back=True, s_frame=1, prefix=0, dense=0, min_band=1, frames_near=0, band_tokens=1) -> torch.Tensor:
    nqb, nkb = n_blocks(nq, BQ), n_blocks(nk, BK)
    out = torch.zeros(h, nqb, nkb, dtype=torch.int8, device=device)
    span_t = span if span is not None else torch.zeros(h, dtype=torch.float32, device=device)
    user_t = user if user is not None else out
    us = (user.stride(0), user.stride(1)) if user is not None else (0, 0)
    tile = 4
    wrap_triton(_mask_kernel)[(nqb, triton.cdiv(nkb, tile), h)](
        out, out.stride(0), out.stride(1), span_t, user_t, *us, nq, nk, nkb, sinks, offset, s_frame, prefix, dense,
        min_band, ubs, frames_near, band_tokens, METHOD=method, LOOK_BACK=look_back,
        SAMPLE=1 if nq <= 4096 else 8, BQ_C=BQ, BK_C=BK, TILE_C=tile)
    return out.bool()


def window_mask_triton(h, nq, nk, params, is_causal, causal_offset, device) -> torch.Tensor:
    if params.get("window") is not None:
        span = per_head(params["window"], h, device)
    else:
        span = per_head(params["alpha"], h, device) + per_head(params["beta"], h, device) * nk
    return _launch(WINDOW, h, nq, nk, device, span=span.float().contiguous(), sinks=int(params["sinks"]),
                   offset=int(causal_offset), look_back=bool(params.get("causal_only") or is_causal))


def radial_mask_triton(nq, nk, params, device) -> torch.Tensor:
    return _launch(RADIAL, 1, nq, nk, device, s_frame=int(params["frame_tokens"]),
                   prefix=int(params["prefix_tokens"]), dense=int(params["dense_frames"]),
                   min_band=int(params["min_band"]))[0]


def user_block_mask_triton(mask, block_size, nq, nk, h, device) -> torch.Tensor:
    m = torch.as_tensor(mask, dtype=torch.bool, device=device)
    if m.dim() == 2:
        m = m.expand(h, *m.shape)
    need = (n_blocks(nq, block_size), n_blocks(nk, block_size))
    if tuple(m.shape[-2:]) != need or m.shape[0] != h:
        raise ValueError(f"block mask of shape {list(m.shape)} does not cover [{h}, {need[0]}, {need[1]}] "
                         f"blocks of {block_size} for {nq} queries x {nk} keys")
    m = m.to(torch.int8).contiguous()
    return _launch(USER_BLOCK, h, nq, nk, device, user=m, ubs=int(block_size))


def svg_masks_triton(nq, nk, params, device) -> torch.Tensor:
    """[2, nqb, nkb]: SVG's spatial and temporal patterns."""
    common = dict(s_frame=int(params["frame_tokens"]), prefix=int(params["prefix_tokens"]))
    return torch.stack([
        _launch(SPATIAL, 1, nq, nk, device, frames_near=int(params["spatial_frames"]), **common)[0],
        _launch(TEMPORAL, 1, nq, nk, device, band_tokens=int(params["temporal_tokens"]), **common)[0]])
