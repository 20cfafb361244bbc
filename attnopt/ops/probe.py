"""`torch.ops.attnopt.attention_probe`: the op `attnopt.inspect` puts at each rewritten site.

It returns exactly what the rewritten site computes (so the model downstream sees the real
rewritten numerics) and, on the side, measures that output against float64 attention and the
original-dtype SDPA on the same inputs, handing the numbers (and, for sparse sites, the block
sparsity) to the inspect session's sink. `attnopt.calibrate` uses a capture hook instead: it
keeps each site's inputs to search per-head parameters on, and an override hook replaces a
site's output with what a candidate choice would compute (calibration's model-level error,
without recompiling per candidate). A timer hook (inspect's per-site
timing) gets two calls to time on the site's own inputs: the original and the rewritten op.
"""

from __future__ import annotations

import math
import threading
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .checks import check_attention_operands
from .schema import attention_schema
from ..metrics import compare
from .attention_ref import attention_exact, causal_keep

_SINKS: dict[str, Callable[[str, dict], None]] = {}
_CAPTURES: dict[str, Callable[[str, dict], None]] = {}  # calibration: the site's inputs themselves
_TIMERS: dict[str, Callable[[str, Callable, Callable], None]] = {}  # inspect: (key, original(), rewritten())
# calibration: (key, the site's inputs) -> the output a candidate choice computes, or None (as compiled)
_OVERRIDES: dict[str, Callable[[str, dict], Optional[torch.Tensor]]] = {}
_GRAD_CHECKS: dict[str, str] = {}  # inspect(grad=True): the backward ('int8' | 'exact') to measure per site
_LINEAR_GRAD_CHECKS: dict[str, str] = {}  # inspect(grad=True): the linear.training format to measure
_LOCK = threading.Lock()


def register_sink(sink_id: str, fn: Callable[[str, dict], None]) -> None:
    with _LOCK:
        _SINKS[sink_id] = fn


def unregister_sink(sink_id: str) -> None:
    with _LOCK:
        _SINKS.pop(sink_id, None)
        _CAPTURES.pop(sink_id, None)
        _TIMERS.pop(sink_id, None)
        _OVERRIDES.pop(sink_id, None)
        _GRAD_CHECKS.pop(sink_id, None)
        _LINEAR_GRAD_CHECKS.pop(sink_id, None)


def register_grad_check(sink_id: str, backward: str | None, linear_training: str | None = None) -> None:
    """Each measured dense attention site also reports its gradient error under `backward`, each
    linear under `linear_training` (None: not measured; ops/grad_check.py)."""
    with _LOCK:
        if backward:
            _GRAD_CHECKS[sink_id] = backward
        if linear_training:
            _LINEAR_GRAD_CHECKS[sink_id] = linear_training


def linear_grad_format(sink_id: str) -> str | None:
    return _LINEAR_GRAD_CHECKS.get(sink_id)


def register_override(sink_id: str, fn: Callable[[str, dict], Optional[torch.Tensor]]) -> None:
    """`fn(site_key, inputs)` -> the site's output (same shape and dtype), or None to compute it
    as compiled. `inputs` holds the op's tensors and flags by name (attention: q, k, v, attn_bias,
    ...; linear: kind="linear", x, weight, bias)."""
    with _LOCK:
        _OVERRIDES[sink_id] = fn


def register_timer(sink_id: str, fn: Callable[[str, Callable, Callable], None]) -> None:
    """`fn(site_key, original, rewritten)`: two argument-less calls on the site's inputs to time."""
    with _LOCK:
        _TIMERS[sink_id] = fn


def register_capture(sink_id: str, fn: Callable[[str, dict], None]) -> None:
    with _LOCK:
        _CAPTURES[sink_id] = fn


def _baseline(q, k, v, bias, keep, masked_value, is_causal, causal_offset, scale, softcap=0.0):
    """torch SDPA in the inputs' own dtype with the same mask: what the unmodified model computes
    (soft-capped logits: the eager matmul-tanh-softmax-matmul, in the inputs' dtype)."""
    return baseline_call(q, k, v, bias, keep, masked_value, is_causal, causal_offset, scale, softcap)()


def baseline_call(q, k, v, bias, keep, masked_value, is_causal, causal_offset, scale, softcap=0.0):
    """`_baseline` as an argument-less call, its masks built beforehand: what timing runs as the
    original. A site with no mask but SDPA's own causal rule passes `is_causal` instead of a mask,
    as the original SDPA call did (torch picks its fused kernels then); GQA goes through enable_gqa."""
    if not softcap and bias is None and keep is None and (not is_causal or causal_offset == 0):
        gqa = q.shape[1] != k.shape[1]
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=gqa)
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    nq, nk = q.shape[2], k.shape[2]
    allowed = torch.ones(nq, nk, dtype=torch.bool, device=q.device)
    if is_causal:
        allowed = causal_keep(nq, nk, causal_offset, q.device)
    if keep is not None:
        allowed = allowed & keep
    mask = torch.where(allowed, 0.0, float(masked_value)).to(q.dtype if q.is_floating_point() else torch.float32)
    if bias is not None:
        mask = torch.where(allowed, mask + bias.to(mask.dtype), mask)
    if softcap:
        def capped():
            s = torch.tanh(torch.matmul(q, kk.transpose(-1, -2)) * scale / softcap) * softcap
            return torch.matmul(torch.softmax(s + mask, dim=-1), vv)

        return capped
    return lambda: F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale)


@torch.library.custom_op("attnopt::attention_probe", mutates_args=(),
                         schema=attention_schema("bool smooth_q", "str arch", "str impl", "str sparsity",
                                                 "str probe_key", "float softcap=0."))
def attention_probe(
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
    smooth_q: bool,
    arch: str,
    impl: str,
    sparsity: str,
    probe_key: str,
    softcap: float = 0.0,
) -> torch.Tensor:
    """`sparsity` is "" for dense sites, else the sparse op's JSON parameters."""
    stats = {}
    sink_id, _, site_key = probe_key.partition("/")
    override = _OVERRIDES.get(sink_id)
    if override is not None:
        out = override(site_key, dict(q=q, k=k, v=v, attn_bias=attn_bias, keep_mask=keep_mask,
                                      masked_value=masked_value, is_causal=is_causal, causal_offset=causal_offset,
                                      scale=scale, softcap=softcap))
        if out is not None:
            return out
    if sparsity:
        from .sparse import sparse_attention_impl
        from .sparse_params import parse

        out, stats = sparse_attention_impl(q, k, v, attn_bias, keep_mask, masked_value, is_causal, causal_offset,
                                           scale, quant, pv, smooth_k, arch, impl, parse(sparsity),
                                           return_stats=True, softcap=softcap)

        def rewritten():
            return torch.ops.attnopt.sparse_attention(q, k, v, attn_bias, keep_mask, masked_value, is_causal,
                                                      causal_offset, scale, quant, pv, smooth_k, arch, impl,
                                                      sparsity, softcap)
    else:
        def rewritten():
            return torch.ops.attnopt.attention(q, k, v, attn_bias, keep_mask, masked_value, is_causal, causal_offset,
                                               scale, quant, pv, smooth_k, smooth_q, arch, impl, softcap)

        out = rewritten()
    capture = _CAPTURES.get(sink_id)
    if capture is not None:
        capture(site_key, dict(q=q, k=k, v=v, attn_bias=attn_bias, keep_mask=keep_mask, masked_value=masked_value,
                               is_causal=is_causal, causal_offset=causal_offset, scale=scale, softcap=softcap))
    sink = _SINKS.get(sink_id)
    if sink is not None:
        with torch.no_grad():
            ref = attention_exact(q, k, v, attn_bias, keep_mask, masked_value, is_causal, causal_offset, scale,
                                  softcap=softcap)
            m = compare(out, ref)
            m.update(stats)
            try:
                base = _baseline(q, k, v, attn_bias, keep_mask, masked_value, is_causal, causal_offset, scale, softcap)
                m["baseline_rel_l1"] = compare(base, ref)["rel_l1"]
            except RuntimeError:
                m["baseline_rel_l1"] = math.nan
        backward = _GRAD_CHECKS.get(sink_id)
        if backward and not sparsity:
            from .grad_check import attention_grad_error

            m["grad"] = attention_grad_error(q, k, v, attn_bias, keep_mask, masked_value, is_causal, causal_offset,
                                             scale, quant, pv, smooth_k, smooth_q, arch, impl, softcap, backward)
        sink(site_key, m)
    timer = _TIMERS.get(sink_id)
    if timer is not None:
        with torch.no_grad():
            timer(site_key, baseline_call(q, k, v, attn_bias, keep_mask, masked_value, is_causal, causal_offset,
                                          scale, softcap), rewritten)
    return out.clone() if out is q else out


@attention_probe.register_fake
def _(q, k, v, attn_bias, keep_mask, masked_value, is_causal, causal_offset, scale, quant, pv, smooth_k,
      smooth_q, arch, impl, sparsity, probe_key, softcap=0.0):
    check_attention_operands("attnopt::attention_probe", q, k, v, attn_bias, keep_mask)
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])
