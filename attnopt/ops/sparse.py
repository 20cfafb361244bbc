"""`torch.ops.attnopt.sparse_attention`: predict a block mask, then run the block-sparse kernel.

The method and its (per-head) parameters travel as one JSON string argument, normalized by
config.py (and, per site, by a calibrated plan). On CUDA the predictors and the attention run
as Triton kernels; elsewhere the same arithmetic runs in plain PyTorch (ops/sparse_ref.py).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch._subclasses.fake_tensor import is_fake

from . import aot_inline
from . import sparse_ref as R
from .checks import check_attention_operands
from .schema import GATE_ARGS, attention_schema, gate_closed
from .sparse_cache import built_once
from .sparse_params import Params, freeze, parse
from ..switches import use_triton as use_triton_for

STATIC_METHODS = ("window", "radial", "block")  # masks from the parameters and shapes alone
PREDICTED_METHODS = ("sparge", "xattention", "svg", "vsa")  # masks predicted from each call's Q / K (/ V)
PERMUTED_METHODS = ("svg2",)  # masks over a permuted token order, with per-site state (ops/svg2.py)


def head_tensors(params: Params, hq: int, device) -> dict:
    """Per-head parameter tensors the predictor kernels read: tau / topk float64 (the user's
    decimals, as sparse_ref's selection), theta float32, dense int8 [Hq] (1: keep every block)."""
    dense = torch.zeros(hq, dtype=torch.int8)
    dense[list(params.get("dense_heads") or ())] = 1
    out = {"dense": dense.to(device)}
    if "tau" in params:
        out["tau"] = R.per_head(params["tau"], hq, device, torch.float64).contiguous()
    if params.get("theta") is not None:
        out["theta"] = R.per_head(params["theta"], hq, device).contiguous()
    if params.get("topk") is not None and params.get("method") == "vsa":  # counts as -c: sparse_ref.vsa_topk
        out["topk"] = R.vsa_topk(params["topk"], hq, device).contiguous()
    elif params.get("topk") is not None:
        out["topk"] = R.per_head(params["topk"], hq, device, torch.float64).contiguous()
    lam = pv_thresholds(params, hq, device)
    if lam is not None:
        out["pv_threshold"] = lam.contiguous()
    return out


def _heads(q, params: Params) -> dict:
    hq = q.shape[1]
    return built_once(q, ("heads", params, hq, q.device), lambda: head_tensors(params, hq, q.device), hq)


def _with_dense_heads(keep: torch.Tensor, params: Params, hq: int) -> torch.Tensor:
    """[Hm, nqb, nkb] (Hm 1 or hq) -> with the dense heads' rows all kept ([hq, ...] then)."""
    dense = list(params.get("dense_heads") or ())
    if not dense:
        return keep
    keep = keep.expand(hq, -1, -1).clone()
    keep[dense] = True
    return keep


def _static_mask_build(params: Params, hq, nq, nk, is_causal, causal_offset, device, use_triton):
    method = params["method"]
    if use_triton:
        from ..codegen.sparse import masks as M

        window, radial, user = M.window_mask_triton, M.radial_mask_triton, M.user_block_mask_triton
    else:
        window, radial, user = R.window_mask, R.radial_mask, R.user_block_mask
    if method == "window":
        keep = window(hq, nq, nk, params, is_causal, causal_offset, device)
    elif method == "radial":
        keep = radial(nq, nk, params, device)[None]
    else:
        keep = user(params["mask"], int(params["block_size"]), nq, nk, hq, device)
    return _with_dense_heads(keep, params, hq)


def _static_key(kind, q, k, params, is_causal, causal_offset, use_triton):
    return (kind, params, q.shape[1], q.shape[2], k.shape[2], bool(is_causal), causal_offset, q.device,
            bool(use_triton))


def static_mask(q, k, params: Params, is_causal, causal_offset, use_triton) -> torch.Tensor:
    """[Hm, nqb, nkb] (Hm: 1 or Hq) block mask of a window / radial / block site; shared, read-only."""
    hq, nq, nk = q.shape[1], q.shape[2], k.shape[2]
    return built_once(q, _static_key("mask", q, k, params, is_causal, causal_offset, use_triton),
                      lambda: _static_mask_build(params, hq, nq, nk, is_causal, causal_offset, q.device, use_triton),
                      hq, nq, nk, causal_offset)


def static_lut(q, k, params: Params, is_causal, causal_offset):
    """(lut, counts) [1, Hm, ...] of a static mask; shared, read-only."""
    hq, nq, nk = q.shape[1], q.shape[2], k.shape[2]

    def build():
        keep = _static_mask_build(params, hq, nq, nk, is_causal, causal_offset, q.device, True)
        return R.block_mask_to_lut(keep[None], nq, nk, is_causal, causal_offset)

    return built_once(q, _static_key("lut", q, k, params, is_causal, causal_offset, True), build,
                      hq, nq, nk, causal_offset)


def _svg_static_build(params: Params, hq, nq, nk, is_causal, causal_offset, device, use_triton):
    """SVG's two patterns [2, nqb, nkb], its sampled rows, and (Triton) the LUTs of the spatial,
    temporal and all-blocks masks [3, nqb, nkb] with their counts."""
    if not use_triton:
        return {"masks": R.svg_masks(nq, nk, params, device)}
    from ..codegen.sparse import masks as M

    pats = M.svg_masks_triton(nq, nk, params, device)
    lut, counts = R.block_mask_to_lut(torch.cat([pats, torch.ones_like(pats[:1])])[None], nq, nk, is_causal,
                                      causal_offset)
    return {"masks": pats, "rows": R.svg_rows(nq, params, device).to(torch.int32), "lut": lut[0].contiguous(),
            "counts": counts[0].contiguous()}


def svg_static(q, k, params: Params, is_causal, causal_offset, use_triton) -> dict:
    hq, nq, nk = q.shape[1], q.shape[2], k.shape[2]
    return built_once(q, _static_key("svg", q, k, params, is_causal, causal_offset, use_triton),
                      lambda: _svg_static_build(params, hq, nq, nk, is_causal, causal_offset, q.device, use_triton),
                      hq, nq, nk, causal_offset)


def predict_lut(q, k, v, params: Params, scale: float, is_causal: bool, causal_offset: int):
    """The Triton path's (lut [B, Hq, nqb, nkb], counts [B, Hq, nqb, 2]) for any method: a static
    mask's cached LUT, or one predictor launch that writes it."""
    from ..codegen.sparse import predict as P

    b, hq = q.shape[0], q.shape[1]
    method = params["method"]
    if method in STATIC_METHODS:
        lut, counts = static_lut(q, k, params, is_causal, causal_offset)
        return lut.expand(b, hq, -1, -1), counts.expand(b, hq, -1, -1)
    heads = _heads(q, params)
    if method == "sparge":
        return P.sparge_lut_triton(q, k, scale, heads["tau"], heads["theta"], heads.get("topk"), heads["dense"],
                                   params.get("sink", True), is_causal, causal_offset, int(params.get("local_keys", 0)))
    if method == "xattention":
        return P.xattention_lut_triton(q, k, scale, int(params["stride"]), heads["tau"], heads["dense"], is_causal,
                                       causal_offset, local=int(params.get("local_keys", 0)))
    if method == "vsa":
        return P.vsa_lut_triton(q, k, scale, int(params["tile"]), heads["topk"], heads["dense"], is_causal,
                                causal_offset, bool(params.get("diagonal", True)))
    if method == "svg":
        st = svg_static(q, k, params, is_causal, causal_offset, True)
        return P.svg_lut_triton(q, k, v, scale, params, st["rows"], st["lut"], st["counts"], heads["dense"],
                                is_causal, causal_offset)
    raise ValueError(f"unknown sparsity method {method!r}")


def predict_block_mask(q, k, v, params, scale: float, is_causal: bool, causal_offset: int,
                       use_triton: bool) -> torch.Tensor:
    """[B, Hq, nqb, nkb] kept blocks for `params["method"]` (dense heads keep everything); a
    fresh tensor the caller may write."""
    params = freeze(params)
    b, hq = q.shape[0], q.shape[1]
    method = params["method"]
    if method in PERMUTED_METHODS:
        raise ValueError(f"sparsity {method!r} keeps blocks of a permuted token order, not of the sequence's: "
                         "it has no block mask to calibrate or train with")
    if method in STATIC_METHODS:
        return static_mask(q, k, params, is_causal, causal_offset, use_triton).expand(b, hq, -1, -1).clone()
    if method not in PREDICTED_METHODS:
        raise ValueError(f"unknown sparsity method {method!r}")
    if use_triton:
        return R.lut_to_block_mask(*predict_lut(q, k, v, params, scale, is_causal, causal_offset))
    if method == "sparge":
        keep = R.predict_sparge(q, k, scale, params["tau"], params["theta"], params.get("topk"),
                                params.get("sink", True), is_causal, causal_offset, int(params.get("local_keys", 0)))
    elif method == "vsa":
        keep = R.predict_vsa(q, k, scale, int(params["tile"]), params["topk"], is_causal, causal_offset,
                             bool(params.get("diagonal", True)))
    elif method == "xattention":
        keep = R.predict_xattention(q, k, scale, int(params["stride"]), params["tau"], is_causal, causal_offset,
                                    int(params.get("local_keys", 0)))
    else:
        masks = svg_static(q, k, params, is_causal, causal_offset, False)["masks"]
        keep = R.predict_svg(q, k, v, scale, params, is_causal, causal_offset, masks=masks)[0].clone()
    dense = list(params.get("dense_heads") or ())
    if dense:
        keep[:, dense] = True
    return keep


def block_sparsity(keep: torch.Tensor, nq: int, nk: int, is_causal: bool, causal_offset: int) -> float:
    """Share of the blocks dense attention would visit that the mask skips."""
    valid = R.causal_blocks(nq, nk, causal_offset, keep.device) if is_causal else torch.ones_like(keep[0, 0])
    total = valid.sum().item() * keep.shape[0] * keep.shape[1]
    return 1.0 - (keep & valid).sum().item() / max(total, 1)


def lut_sparsity(counts: torch.Tensor, nq: int, nk: int, is_causal: bool, causal_offset: int) -> float:
    """block_sparsity from a LUT's counts (they list the kept, causally visible blocks)."""
    valid = R.causal_blocks(nq, nk, causal_offset, counts.device) if is_causal else torch.ones(
        R.n_blocks(nq, R.BQ), R.n_blocks(nk, R.BK), dtype=torch.bool, device=counts.device)
    total = valid.sum().item() * counts.shape[0] * counts.shape[1]
    return 1.0 - counts[..., 1].sum().item() / max(total, 1)


def pv_thresholds(params, hq: int, device) -> torch.Tensor | None:
    """The second stage's lambda per head [Hq] (None: off). A head without one, or a dense head,
    never skips (1e30)."""
    lam = params.get("pv_threshold")
    if not isinstance(lam, (list, tuple)):
        lam = [lam] * hq
    dense = set(params.get("dense_heads") or ())
    lam = [None if h in dense else x for h, x in enumerate(lam)]
    if all(x is None for x in lam):
        return None
    return R.per_head([1e30 if x is None else x for x in lam], hq, device)


def sparse_attention_impl(q, k, v, attn_bias, keep_mask, masked_value, is_causal, causal_offset, scale, quant, pv,
                          smooth_k, arch, impl, params, return_stats: bool = False, softcap: float = 0.0,
                          gate: torch.Tensor | None = None, gate_id: int = 0):
    params = freeze(params)
    use_triton = use_triton_for(q, arch, impl)
    nq, nk = q.shape[2], k.shape[2]
    # an inactive scheduled variant: the reference returns at once, and so does svg2 (its clusters
    # are computed in torch ops, so they are skipped too); the Triton kernels read the gate themselves
    if (not use_triton or params["method"] in PERMUTED_METHODS) and gate_closed(gate, gate_id):
        return q.new_empty(q.shape[0], q.shape[1], nq, v.shape[3])
    if params["method"] in PERMUTED_METHODS:
        from . import svg2

        out, lay = svg2.svg2_attention(q, k, v, attn_bias, keep_mask, masked_value, is_causal, scale, quant, pv,
                                       smooth_k, arch, params, use_triton, svg2.STATE, str(params.get("site", "")),
                                       softcap)
        return (out, {"sparsity": block_sparsity(lay.keep, nq, nk, False, 0)}) if return_stats else out
    if use_triton:
        from ..codegen.attention.launch import attention_triton

        lut, counts = predict_lut(q, k, v, params, scale, is_causal, causal_offset)
        lam = _heads(q, params).get("pv_threshold")
        out = attention_triton(q, k, v, attn_bias, keep_mask, masked_value, is_causal, causal_offset, scale, quant,
                               pv, smooth_k, False, arch, lut=lut, counts=counts, pv_threshold=lam, softcap=softcap,
                               gate=gate, gate_id=gate_id)
        if return_stats:
            return out, {"sparsity": lut_sparsity(counts, nq, nk, is_causal, causal_offset)}
        return out
    if params["method"] in STATIC_METHODS:
        block_keep = static_mask(q, k, params, is_causal, causal_offset, False).expand(q.shape[0], q.shape[1], -1, -1)
    else:
        block_keep = predict_block_mask(q, k, v, params, scale, is_causal, causal_offset, False)
    lam = pv_thresholds(params, q.shape[1], q.device)
    out = R.sparse_attention_reference(q, k, v, block_keep, attn_bias, keep_mask, masked_value, is_causal,
                                       causal_offset, scale, quant, pv, smooth_k, pv_threshold=lam, softcap=softcap)
    if return_stats:
        return out, {"sparsity": block_sparsity(block_keep, nq, nk, is_causal, causal_offset)}
    return out


def _sparse_attention_body(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_bias: Optional[torch.Tensor],
    keep_mask: Optional[torch.Tensor],
    masked_value: float,
    is_causal: bool,
    causal_offset: int,
    scale: float,
    quant: str,
    pv: str,
    smooth_k: bool,
    arch: str,
    impl: str,
    sparsity: str,
    softcap: float = 0.0,
    gate: Optional[torch.Tensor] = None,
    gate_id: int = 0,
) -> torch.Tensor:
    """Block-sparse quantized attention; `sparsity` is the JSON of the method and its parameters.
    `softcap` > 0 soft-caps the logits as in `attnopt::attention` (the predictors see raw logits:
    the cap is monotonic, so the blocks they rank highest stay the highest). `gate` / `gate_id`
    as in `attnopt::attention` (the predictor still runs; the attention kernel exits)."""
    check_attention_operands("attnopt::sparse_attention", q, k, v, attn_bias, keep_mask)
    params = parse(sparsity)
    if params["method"] in PERMUTED_METHODS and is_fake(q):  # aot_inline then keeps the call, which runs per
        raise RuntimeError(f"sparsity {params['method']!r} keeps per-site state: not traced into a graph")  # call
    return sparse_attention_impl(q, k, v, attn_bias, keep_mask, masked_value, is_causal, causal_offset, scale, quant,
                                 pv, smooth_k, arch, impl, params, softcap=softcap, gate=gate, gate_id=gate_id)


sparse_attention_op = torch.library.triton_op(
    "attnopt::sparse_attention", mutates_args=(),
    schema=attention_schema("str arch", "str impl", "str sparsity", "float softcap=0.", *GATE_ARGS))(
        _sparse_attention_body)
aot_inline.install(sparse_attention_op, _sparse_attention_body)


@sparse_attention_op.register_fake
def _sparse_fake(q, k, v, attn_bias, keep_mask, masked_value, is_causal, causal_offset, scale, quant, pv, smooth_k,
                 arch, impl, sparsity, softcap=0.0, gate=None, gate_id=0):
    check_attention_operands("attnopt::sparse_attention", q, k, v, attn_bias, keep_mask)
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])

