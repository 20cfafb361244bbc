"""`torch.ops.attnopt.sparse_attention`: predict a block mask, then run the block-sparse kernel.

The method and its (per-head) parameters travel as one JSON string argument, normalized by
config.py (and, per site, by a calibrated plan). On CUDA the predictors and the attention run
as Triton kernels; elsewhere the same arithmetic runs in plain PyTorch (ops/sparse_ref.py).
"""

from __future__ import annotations

import json
from typing import Optional

import torch

from . import aot_inline
from . import sparse_ref as R
from ..switches import use_triton as use_triton_for
from .checks import check_attention_operands
from .schema import attention_schema


def predict_block_mask(q, k, v, params: dict, scale: float, is_causal: bool, causal_offset: int,
                       use_triton: bool) -> torch.Tensor:
    """[B, Hq, nqb, nkb] kept blocks for `params["method"]` (dense heads keep everything)."""
    b, hq, nq, _ = q.shape
    nk = k.shape[2]
    method = params["method"]
    if method == "sparge":
        fn = R.predict_sparge
        if use_triton:
            from ..codegen.sparse.predict import predict_sparge_triton as fn
        keep = fn(q, k, scale, params["tau"], params["theta"], params.get("topk"), params.get("sink", True),
                  is_causal, causal_offset)
    elif method == "xattention":
        fn = R.predict_xattention
        if use_triton:
            from ..codegen.sparse.predict import predict_xattention_triton as fn
        keep = fn(q, k, scale, int(params["stride"]), params["tau"], is_causal, causal_offset)
    elif method in ("window", "radial", "block", "svg"):
        if use_triton:
            from ..codegen.sparse import masks as M

            window, radial, user, svg = (M.window_mask_triton, M.radial_mask_triton, M.user_block_mask_triton,
                                         M.svg_masks_triton)
        else:
            window, radial, user, svg = R.window_mask, R.radial_mask, R.user_block_mask, None
        if method == "window":
            keep = window(hq, nq, nk, params, is_causal, causal_offset, q.device).expand(b, -1, -1, -1)
        elif method == "radial":
            keep = radial(nq, nk, params, q.device).expand(b, hq, -1, -1)
        elif method == "block":
            keep = user(params["mask"], int(params["block_size"]), nq, nk, hq, q.device).expand(b, -1, -1, -1)
        else:
            pre = svg(nq, nk, params, q.device) if svg is not None else None
            keep, _ = R.predict_svg(q, k, v, scale, params, is_causal, causal_offset, masks=pre)
    else:
        raise ValueError(f"unknown sparsity method {method!r}")
    keep = keep.clone()
    dense = params.get("dense_heads") or []
    if dense:
        keep[:, dense] = True
    return keep


def block_sparsity(keep: torch.Tensor, nq: int, nk: int, is_causal: bool, causal_offset: int) -> float:
    """Share of the blocks dense attention would visit that the mask skips."""
    valid = R.causal_blocks(nq, nk, causal_offset, keep.device) if is_causal else torch.ones_like(keep[0, 0])
    total = valid.sum().item() * keep.shape[0] * keep.shape[1]
    return 1.0 - (keep & valid).sum().item() / max(total, 1)


def pv_thresholds(params: dict, hq: int, device) -> torch.Tensor | None:
    """The second stage's lambda per head [Hq] (None: off). A head without one, or a dense head,
    never skips (1e30)."""
    lam = params.get("pv_threshold")
    if not isinstance(lam, list):
        lam = [lam] * hq
    dense = set(params.get("dense_heads") or [])
    lam = [None if h in dense else x for h, x in enumerate(lam)]
    if all(x is None for x in lam):
        return None
    return R.per_head([1e30 if x is None else x for x in lam], hq, device)


def sparse_attention_impl(q, k, v, attn_bias, keep_mask, masked_value, is_causal, causal_offset, scale, quant, pv,
                          smooth_k, arch, impl, params: dict, return_stats: bool = False, softcap: float = 0.0):
    use_triton = use_triton_for(q, arch, impl)
    block_keep = predict_block_mask(q, k, v, params, scale, is_causal, causal_offset, use_triton)
    lam = pv_thresholds(params, q.shape[1], q.device)
    if use_triton:
        from ..codegen.attention.launch import attention_triton

        lut, counts = R.block_mask_to_lut(block_keep, q.shape[2], k.shape[2], is_causal, causal_offset)
        out = attention_triton(q, k, v, attn_bias, keep_mask, masked_value, is_causal, causal_offset, scale, quant,
                               pv, smooth_k, False, arch, lut=lut, counts=counts, pv_threshold=lam, softcap=softcap)
    else:
        out = R.sparse_attention_reference(q, k, v, block_keep, attn_bias, keep_mask, masked_value, is_causal,
                                           causal_offset, scale, quant, pv, smooth_k, pv_threshold=lam, softcap=softcap)
    if return_stats:
        return out, {"sparsity": block_sparsity(block_keep, q.shape[2], k.shape[2], is_causal, causal_offset)}
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
) -> torch.Tensor:
    """Block-sparse quantized attention; `sparsity` is the JSON of the method and its parameters.
    `softcap` > 0 soft-caps the logits as in `attnopt::attention` (the predictors see raw logits:
    the cap is monotonic, so the blocks they rank highest stay the highest)."""
    check_attention_operands("attnopt::sparse_attention", q, k, v, attn_bias, keep_mask)
    return sparse_attention_impl(q, k, v, attn_bias, keep_mask, masked_value, is_causal, causal_offset, scale, quant,
                                 pv, smooth_k, arch, impl, json.loads(sparsity), softcap=softcap)


sparse_attention_op = torch.library.triton_op(
    "attnopt::sparse_attention", mutates_args=(),
    schema=attention_schema("str arch", "str impl", "str sparsity", "float softcap=0."))(_sparse_attention_body)
aot_inline.install(sparse_attention_op, _sparse_attention_body)


@sparse_attention_op.register_fake
def _sparse_fake(q, k, v, attn_bias, keep_mask, masked_value, is_causal, causal_offset, scale, quant, pv, smooth_k,
                 arch, impl, sparsity, softcap=0.0):
    check_attention_operands("attnopt::sparse_attention", q, k, v, attn_bias, keep_mask)
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])

