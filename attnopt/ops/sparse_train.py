"""Trainable block-sparse attention (issue 16: VSA): `attnopt::sparse_attention_train` and its
backward `attnopt::sparse_attention_backward`.

The forward is `attnopt::sparse_attention`'s arithmetic (any method's block mask, predicted from
this call's Q and K, then block-sparse quantized attention) and also returns what the backward
needs: the rows' log-sum-exp and the block mask it used. The mask is a non-differentiable choice
(a top-k, a mass threshold); gradients flow through the attention inside the kept blocks only,
exactly as through dense attention with the skipped blocks' logits at -inf.

The backward is straight-through over the quantized forward: it recomputes P from 16-bit Q and K
in fp32 and the saved log-sum-exp, and takes D = rowsum(dO * O) from the forward's output (as
FlashAttention's backward does). Today its body is a plain-PyTorch reference
(`sparse_attention_backward_reference`); a Triton block-sparse backward kernel replaces the body
of the same op later, with the same signature.

How a training graph calls it: `torch.ops.attnopt.sparse_attention_train(q, k, v, is_causal,
causal_offset, scale, quant, pv, smooth_k, arch, impl, sparsity)` -> (out, lse, block_keep); use
`out` (the other two are saved for the backward and carry no gradient). AOTAutograd consults the
`register_autograd` formula below when the op is captured before autograd is traced.
"""

from __future__ import annotations

import math

import torch

from . import aot_inline
from . import sparse_ref as R
from .attention_ref import attention_reference
from .checks import check_attention_operands
from .sparse import predict_block_mask, predict_lut
from .sparse_params import parse
from ..switches import use_triton as use_triton_for

ROW_CHUNK_ELEMS = 1 << 24  # the reference backward's [B, H, rows, Nk] fp32 blocks stay under 64 MiB


def sparse_attention_backward_reference(q, k, v, out, lse, dout, block_keep, scale: float, is_causal: bool,
                                        causal_offset: int):
    """dq, dk, dv of attention restricted to the kept blocks, in fp32 on the 16-bit operands.

    q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] (GQA: dk, dv summed over each kv
    head's query heads), out / dout [B, Hq, Nq, Dv], lse [B, Hq, Nq] fp32 (natural log of each
    row's sum of exp(scale * q.k) over its kept keys; -inf for a row with none), block_keep
    [B, Hq, nqb, nkb] bool over sparse_ref's BQ x BK grid. P = exp(scale * q.k - lse) on the kept
    (and causally visible) keys, dS = P * (dP - rowsum(dO * O)); results in q / k / v's dtypes."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    kf = k.float().repeat_interleave(g, 1)
    vf = v.float().repeat_interleave(g, 1)
    dq = torch.zeros(b, hq, nq, d, dtype=torch.float32, device=q.device)
    dk = torch.zeros(b, hq, nk, d, dtype=torch.float32, device=q.device)
    dv = torch.zeros(b, hq, nk, v.shape[3], dtype=torch.float32, device=q.device)
    delta = (dout.float() * out.float()).sum(-1)  # [B, Hq, Nq]
    step = max(R.BQ, (ROW_CHUNK_ELEMS // max(1, b * hq * nk)) // R.BQ * R.BQ)
    cols = torch.arange(nk, device=q.device)
    for r0 in range(0, nq, step):
        r1 = min(nq, r0 + step)
        rows = torch.arange(r0, r1, device=q.device)
        kept = R.expand_block_mask(block_keep[:, :, r0 // R.BQ:-(-r1 // R.BQ)], r1 - r0, nk)  # r0: a block start
        if is_causal:
            kept = kept & (cols[None, :] <= rows[:, None] + causal_offset)
        qc = q[:, :, r0:r1].float()
        s = torch.matmul(qc, kf.transpose(-1, -2)) * scale
        lse_c = lse[:, :, r0:r1, None]
        p = torch.where(kept & torch.isfinite(lse_c), torch.exp(s - lse_c), torch.zeros((), device=q.device))
        dout_c = dout[:, :, r0:r1].float()
        dv += torch.matmul(p.transpose(-1, -2), dout_c)
        dp = torch.matmul(dout_c, vf.transpose(-1, -2))
        ds = p * (dp - delta[:, :, r0:r1, None])
        dq[:, :, r0:r1] = torch.matmul(ds, kf) * scale
        dk += torch.matmul(ds.transpose(-1, -2), qc) * scale
    dk = dk.reshape(b, hkv, g, nk, d).sum(2)
    dv = dv.reshape(b, hkv, g, nk, v.shape[3]).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ------------------------------------------------------------------------------ the forward op

def sparse_attention_train_impl(q, k, v, is_causal, causal_offset, scale, quant, pv, smooth_k, arch, impl, params):
    """(out, lse [B, Hq, Nq] fp32, block_keep [B, Hq, nqb, nkb] bool): the block mask predicted
    from q and k by `params["method"]`, and block-sparse quantized attention over it."""
    if use_triton_for(q, arch, impl):
        from ..codegen.attention.launch import attention_triton

        lut, counts = predict_lut(q, k, v, params, scale, is_causal, causal_offset)
        out, lse = attention_triton(q, k, v, None, None, -math.inf, is_causal, causal_offset, scale, quant, pv,
                                    smooth_k, False, arch, lut=lut, counts=counts, return_lse=True)
        return out, lse, R.lut_to_block_mask(lut, counts)
    keep = predict_block_mask(q, k, v, params, scale, is_causal, causal_offset, False)
    if is_causal:
        keep &= R.causal_blocks(q.shape[2], k.shape[2], causal_offset, q.device)
    bias = torch.where(R.expand_block_mask(keep, q.shape[2], k.shape[2]), 0.0, -math.inf)
    out, lse = attention_reference(q, k, v, bias, None, -math.inf, is_causal, causal_offset, scale, quant, pv,
                                   smooth_k, False, return_lse=True)
    return out, lse, keep


def _train_body(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, causal_offset: int,
                scale: float, quant: str, pv: str, smooth_k: bool, arch: str, impl: str,
                sparsity: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_attention_operands("attnopt::sparse_attention_train", q, k, v, None, None)
    return sparse_attention_train_impl(q, k, v, is_causal, causal_offset, scale, quant, pv, smooth_k, arch, impl,
                                       parse(sparsity))


TRAIN_SCHEMA = ("(Tensor q, Tensor k, Tensor v, bool is_causal, SymInt causal_offset, float scale, str quant, "
                "str pv, bool smooth_k, str arch, str impl, str sparsity) -> (Tensor, Tensor, Tensor)")
BACKWARD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor dout, Tensor block_keep, "
                   "float scale, bool is_causal, SymInt causal_offset) -> (Tensor, Tensor, Tensor)")

sparse_attention_train_op = torch.library.triton_op("attnopt::sparse_attention_train", mutates_args=(),
                                                    schema=TRAIN_SCHEMA)(_train_body)
aot_inline.install(sparse_attention_train_op, _train_body)  # as the other ops: traced into kernels on CUDA


@sparse_attention_train_op.register_fake
def _train_fake(q, k, v, is_causal, causal_offset, scale, quant, pv, smooth_k, arch, impl, sparsity):
    check_attention_operands("attnopt::sparse_attention_train", q, k, v, None, None)
    b, hq, nq = q.shape[0], q.shape[1], q.shape[2]
    nk = k.shape[2]
    return (q.new_empty(b, hq, nq, v.shape[3]), q.new_empty(b, hq, nq, dtype=torch.float32),
            q.new_empty(b, hq, (nq + R.BQ - 1) // R.BQ, (nk + R.BK - 1) // R.BK, dtype=torch.bool))


def _backward_body(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                   dout: torch.Tensor, block_keep: torch.Tensor, scale: float, is_causal: bool,
                   causal_offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton_for(q, "auto", "auto"):  # the attention backward kernels, visiting the kept blocks only
        from ..codegen.attention.backward import attention_backward_triton

        lut, counts = R.block_mask_to_lut(block_keep, q.shape[2], k.shape[2], is_causal, causal_offset)
        grads = attention_backward_triton(q, k, v, out, lse, dout, None, None, -math.inf, is_causal, causal_offset,
                                          scale, False, 0.0, "exact", quant="none", lut=lut, counts=counts)
    else:
        grads = sparse_attention_backward_reference(q, k, v, out, lse, dout, block_keep, scale, is_causal,
                                                    causal_offset)
    return tuple(g.contiguous() for g in grads)  # the layout the fake promises, whatever q's strides


sparse_attention_backward_op = torch.library.triton_op("attnopt::sparse_attention_backward", mutates_args=(),
                                                       schema=BACKWARD_SCHEMA)(_backward_body)
aot_inline.install(sparse_attention_backward_op, _backward_body)


@sparse_attention_backward_op.register_fake
def _backward_fake(q, k, v, out, lse, dout, block_keep, scale, is_causal, causal_offset):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, as the body's


def _setup_context(ctx, inputs, output):
    q, k, v, is_causal, causal_offset, scale = inputs[:6]
    out, lse, keep = output
    ctx.save_for_backward(q, k, v, out, lse, keep)
    ctx.scale, ctx.is_causal, ctx.causal_offset = scale, is_causal, causal_offset
    ctx.mark_non_differentiable(lse, keep)


def _backward(ctx, dout, _dlse, _dkeep):
    q, k, v, out, lse, keep = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.attnopt.sparse_attention_backward(q, k, v, out, lse, dout.contiguous(), keep, ctx.scale,
                                                             ctx.is_causal, ctx.causal_offset)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


sparse_attention_train_op.register_autograd(_backward, setup_context=_setup_context)


def sparsity_arg(sparsity: dict) -> str:
    """The op's `sparsity` argument: a method and its parameters as config.py takes them (e.g.
    {"method": "vsa", "tile": 64, "topk": 0.25}), validated, defaults filled in, as canonical JSON."""
    import json

    from ..config import normalize_options

    sp = normalize_options({"attention": {"sparsity": dict(sparsity)}}).attention.sparsity
    return json.dumps(sp.to_dict(), sort_keys=True)


def sparse_attention_train(q, k, v, sparsity: dict | str, is_causal: bool = False, causal_offset: int = 0,
                           scale: float | None = None, quant: str = "int8", pv: str = "fp16", smooth_k: bool = True,
                           arch: str = "auto", impl: str = "auto") -> torch.Tensor:
    """Differentiable block-sparse attention in eager code -> the output [B, Hq, Nq, Dv].
    `sparsity`: a dict (see `sparsity_arg`) or `sparsity_arg`'s string; inside a function that
    torch.compile traces, pass the string (made once, outside: JSON encoding is not traceable)."""
    from ..codegen.arch import detect_arch

    sp = sparsity if isinstance(sparsity, str) else sparsity_arg(sparsity)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    arch = detect_arch(q.device) if arch == "auto" else arch
    out, _, _ = torch.ops.attnopt.sparse_attention_train(q, k, v, bool(is_causal), int(causal_offset), scale, quant,
                                                         pv, bool(smooth_k), arch, impl, sp)
    return out
