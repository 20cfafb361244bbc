"""Host side of the attention kernels: statistics, quantize, pick the arch's tile configs, launch.

At most three launches and no full-size torch op per call: the K / V statistics (stats.py), Q, K
and V quantized together (quantize.py; none for 16-bit Q, K and V), the attention kernel.

Every launch goes through `torch.library.wrap_triton`, so inside torch.compile the op's body
traces into Inductor's graph and Inductor inlines the kernels into its generated code. On a GPU
the kernel is autotuned over the arch table's tiles; under TRITON_INTERPRET=1 (CPU tests) the
table's first tile runs directly.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ...ops.attention_ref import FP8_MAX, K_GRAN, LOG2E, Q_GRAN, V_ACC16_MAX, _log2_logit
from ...ops.nvfp4 import P_SCALE
from ...ops.sparse_ref import BK as SPARSE_BK
from ...ops.sparse_ref import BQ as SPARSE_BQ
from .. import casts
from ...switches import interpreted
from ..arch import ARCHS, Tile, autotune_bucket, fp4_tiles
from .kernel import _attn_fwd
from .quantize import fp4_head_dim, kv_stats, padded_head_dim, quantize_qkv

QK_FORMATS = {"int8": 0, "fp8": 1, "none": 2, "fp4": 3}


def _sparse_tile(t: Tile, second_stage: bool = False) -> Tile:
    """Block-sparse tiles: BLOCK_N is the sparse kv-block, BLOCK_M divides the sparse q-block.
    The second stage decides per q-block, so it takes BLOCK_M = the whole q-block."""
    bm = t.block_m if (SPARSE_BQ % t.block_m == 0 and not second_stage) else SPARSE_BQ
    return Tile(bm, SPARSE_BK, t.warps, min(t.stages, 2) if bm > t.block_m else t.stages)


@functools.lru_cache(maxsize=None)
def autotuned_kernel(arch: str, block_d: int, mode: str = "dense"):
    """_attn_fwd autotuned over the arch table's tiles for this head-dim bucket."""
    tiles = ARCHS[arch].attention_tiles(block_d)
    if mode in ("sparse", "sparse2"):  # not "fp4": dense NVFP4 keeps the table's BLOCK_N (at least 64)
        tiles = tuple(dict.fromkeys(_sparse_tile(t, mode == "sparse2") for t in tiles))
    if mode == "fp4":
        tiles = fp4_tiles(tiles)
    configs = [triton.Config({"BLOCK_M": t.block_m, "BLOCK_N": t.block_n}, num_warps=t.warps, num_stages=t.stages)
               for t in tiles]
    return triton.autotune(configs=configs, key=["N_BUCKET", "DQK", "DV", "QK_FMT", "PV_FP8", "PV_FP4", "IS_CAUSAL",
                                                 "HAS_BIAS", "HAS_KEEP", "SMOOTH_Q", "SOFTCAP"])(_attn_fwd)


def _mask4d(m: torch.Tensor | None, b, h, nq, nk) -> torch.Tensor | None:
    if m is None:
        return None
    while m.dim() < 4:
        m = m.unsqueeze(0)
    m = m.expand(b, h, nq, nk)  # broadcast dims get stride 0: nothing is copied
    return m.view(torch.uint8) if m.dtype == torch.bool else m


def _pv_dtype(dtype: torch.dtype):
    return tl.float16 if dtype == torch.float16 else tl.bfloat16


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """Tensor descriptors need a contiguous last dim and 16-byte aligned base and strides."""
    for t in tensors:
        es = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any((s * es) % 16 for s in t.stride()[:-1]):
            return False
    return True


_ALLOCATOR_SET = False


def _ensure_allocator() -> None:
    """Device-side tensor descriptors need scratch memory from a Triton allocator."""
    global _ALLOCATOR_SET
    if not _ALLOCATOR_SET:
        def alloc(size: int, alignment: int, stream):
            return torch.empty(size, dtype=torch.int8, device="cpu" if interpreted() else "cuda")

        triton.set_allocator(alloc)
        _ALLOCATOR_SET = True


def attention_triton(q, k, v, attn_bias, keep_mask, masked_value, is_causal, causal_offset, scale, quant, pv,
                     smooth_k, smooth_q, arch, tile: Tile | None = None, out: torch.Tensor | None = None,
                     return_lse: bool = False, use_tma: bool | None = None, lut: torch.Tensor | None = None,
                     counts: torch.Tensor | None = None, pv_threshold: torch.Tensor | None = None,
                     softcap: float = 0.0, gate: torch.Tensor | None = None, gate_id: int = 0):
    """The op's CUDA body (and, under TRITON_INTERPRET, a CPU one). `tile` forces a config;
    `out` lets tests pass a poisoned buffer to prove every element gets written; `use_tma`
    forces the tensor-descriptor path on or off (default: the arch table's choice). With `lut`
    and `counts` (ops/sparse_ref.block_mask_to_lut) only the kept kv-blocks are visited;
    `pv_threshold` [Hq] (log2 units) turns on the second stage. `softcap` > 0 soft-caps the
    logits (attention_ref's semantics; K smoothing's row shift is added back before the cap).
    `gate` (int32, one element on the device): the programs of all three launches exit at once
    unless it holds `gate_id` (a scheduled site's inactive variant; `out` is then left unwritten).
    A gated call takes the arch table's default tile: the autotuner would time programs that
    exited at once."""
    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    if out is None:
        out = torch.empty(b, hq, nq, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, hq, nq, dtype=torch.float32, device=q.device) if return_lse else None
    if out.numel() == 0:
        return (out, lse) if return_lse else out
    spec = ARCHS[arch]
    acc16 = pv == "fp8_acc16"  # FP8 P.V with fp16 tile sums: FP8's operands, V scaled to +-V_ACC16_MAX
    pv = "fp8" if acc16 else pv
    fp4 = quant == "fp4" or pv == "fp4"
    block_d = fp4_head_dim(d) if quant == "fp4" else padded_head_dim(d)
    block_dv = fp4_head_dim(dv) if pv == "fp4" else padded_head_dim(dv)
    smooth_q = smooth_q and quant != "none"
    softcap = float(softcap or 0.0)
    finite_fill = masked_value != -math.inf
    # the logits K smoothing shifted by -scale * q . mean(K): soft-capping adds the shift back
    # before tanh, the LSE after the softmax (both from each Q row's dot with K's mean)
    row_dot = quant != "none" and smooth_k and (bool(softcap) or return_lse)
    # launch 1: K's mean, V's mean / scale, the non-finite key rows; launch 2: Q, K, V quantized
    v_qmax = V_ACC16_MAX if acc16 else {"fp8": FP8_MAX, "fp4": P_SCALE}.get(pv)
    kmean, vmean, vscale, bad_kv = kv_stats(k, v, quant != "none" and smooth_k, finite_fill, v_qmax, gate, gate_id)
    ops = quantize_qkv(q, k, v, kmean, vmean, vscale, scale, quant, pv, smooth_k, smooth_q, row_dot,
                       block_d, block_dv, gate, gate_id)
    qbuf, kbuf, vbuf = ops.q, ops.k, ops.v
    qs = ops.qs if ops.qs is not None else out
    ks = ops.ks if ops.ks is not None else out
    qbar = ops.qbar if ops.qbar is not None else out
    qg = ops.qg if ops.qg is not None else out
    kg = ops.kg if ops.kg is not None else out
    vg = ops.vg if ops.vg is not None else out
    bad_q = ops.bad_q if ops.bad_q is not None else bad_kv  # quant "none": the kernel checks its Q tile
    qkm = ops.qkm if ops.qkm is not None else out
    if pv in ("fp8", "fp4"):
        v_strides = (vbuf.stride(0), vbuf.stride(1), 1, vbuf.stride(2))
    else:
        v_strides = tuple(v.stride())
    vc = vmean if vmean is not None else kmean  # V's per-channel vectors share their strides
    vsc = vscale if vscale is not None else vc
    bias = _mask4d(attn_bias, b, hq, nq, nk)
    keep = _mask4d(keep_mask, b, hq, nq, nk)
    bias_t = bias if bias is not None else out
    keep_t = keep if keep is not None else out
    bias_s = tuple(bias.stride()) if bias is not None else (0, 0, 0, 0)
    keep_s = tuple(keep.stride()) if keep is not None else (0, 0, 0, 0)
    q_s = tuple(qbuf.stride())
    k_s = tuple(kbuf.stride())
    if use_tma is None:
        use_tma = spec.tma and q.device.type == "cuda"
    use_tma = bool(use_tma) and not fp4 and _tma_ok(qbuf, kbuf, vbuf)
    if use_tma:
        _ensure_allocator()
    lse_t = lse if lse is not None else out

    args = (
        qbuf, *q_s,
        qs, *((qs.stride(0), qs.stride(1)) if quant != "none" else (0, 0)),
        qbar, *((qbar.stride(0), qbar.stride(1), qbar.stride(2)) if smooth_q else (0, 0, 0)),
        kbuf, *k_s,
        ks, *((ks.stride(0), ks.stride(1)) if quant != "none" else (0, 0)),
        k, *k.stride(),
        kmean, kmean.stride(0), kmean.stride(1),
        vbuf, *v_strides,
        qg, *((qg.stride(0), qg.stride(1), qg.stride(2)) if quant == "fp4" else (0, 0, 0)),
        kg, *((kg.stride(0), kg.stride(1), kg.stride(2)) if quant == "fp4" else (0, 0, 0)),
        vg, *((vg.stride(0), vg.stride(1), vg.stride(2)) if pv == "fp4" else (0, 0, 0)),
        vsc, vc, vc, vc.stride(0), vc.stride(1),
        bad_kv, bad_kv.stride(0), bad_kv.stride(1), bad_q,
        *((bad_q.stride(0), bad_q.stride(1)) if ops.bad_q is not None else (0, 0)),
        bias_t, *bias_s,
        keep_t, *keep_s,
        out, *out.stride(),
        lse_t, *((lse.stride(0), lse.stride(1)) if lse is not None else (0, 0)),
        lut if lut is not None else out, *(tuple(lut.stride()[:3]) if lut is not None else (0, 0, 0)),
        counts if counts is not None else out, *(tuple(counts.stride()[:3]) if counts is not None else (0, 0, 0)),
        pv_threshold if pv_threshold is not None else out,
        gate if gate is not None else out, int(gate_id),
        qkm, *((qkm.stride(0), qkm.stride(1)) if row_dot else (0, 0)), softcap * LOG2E if softcap else 1.0,
        b, hq, hkv, vbuf.shape[-1] if pv == "fp8" else nk,
        nq, nk, d, dv, hq // hkv, int(causal_offset), _log2_logit(float(masked_value)), scale * LOG2E, scale,
        autotune_bucket(nk),
    )
    consts = dict(QK_FMT=QK_FORMATS[quant], PV_FP8=2 if acc16 else int(pv == "fp8"), PV_FP4=pv == "fp4", IS_CAUSAL=bool(is_causal),
                  HAS_BIAS=bias is not None, HAS_KEEP=keep is not None, FINITE_FILL=finite_fill,
                  SMOOTH_Q=smooth_q, EVEN_D=(d == block_d and dv == block_dv), HAS_LSE=lse is not None,
                  USE_TMA=use_tma, SPARSE=lut is not None, SPARSE_BQ=SPARSE_BQ,
                  HAS_LAMBDA=pv_threshold is not None,
                  Q_GRAN=Q_GRAN, K_GRAN=K_GRAN, PV_DTYPE=_pv_dtype(v.dtype), BLOCK_D=block_d, BLOCK_DV=block_dv,
                  EMULATE=casts.EMULATE, SOFTCAP=bool(softcap), ROW_DOT=row_dot, HAS_GATE=gate is not None)
    if tile is None and (interpreted() or q.device.type != "cuda" or gate is not None):
        tile = spec.default_tile(block_d, quant, pv)
    if tile is not None and lut is not None:
        tile = _sparse_tile(tile, pv_threshold is not None)
    if tile is not None and fp4:
        tile = fp4_tiles((tile,))[0]
    if tile is not None:
        grid = (triton.cdiv(nq, tile.block_m), hq, b)
        wrap_triton(_attn_fwd)[grid](*args, **consts, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
                                     num_warps=tile.warps, num_stages=tile.stages)
    else:
        def grid(meta):
            return (triton.cdiv(nq, meta["BLOCK_M"]), hq, b)

        mode = "dense" if lut is None else ("sparse2" if pv_threshold is not None else "sparse")
        mode = "fp4" if fp4 and mode == "dense" else mode
        wrap_triton(autotuned_kernel(arch, block_d, mode))[grid](*args, **consts)
    return (out, lse) if return_lse else out
