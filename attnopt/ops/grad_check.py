"""A site's gradient error: what `attnopt.inspect(..., grad=True)` reports for training.

On a site's captured inputs (a linear: `ops/linear_train.site_error`), attnopt's trainable attention (`attnopt::attention_train`, the same
forward formats the site runs, the configured backward) is differentiated against a random
upstream gradient, and dQ, dK, dV are compared with float64 autograd of unquantized attention
under the same masks. The upstream gradient is seeded, so a report is repeatable.
"""

from __future__ import annotations

import threading

import torch

from ..metrics import compare
from .attention_ref import attention_exact


def with_autograd(fn, *args, **kwargs):
    """fn(*args, **kwargs) with autograd on. Called from inside an op's body, where the dispatcher
    has autograd switched off for this thread: `fn` runs on a thread of its own."""
    result: list = []
    dev = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    cuda = dev is not None and dev.type == "cuda"
    stream = torch.cuda.current_stream(dev) if cuda else None

    def run():
        try:
            if cuda:  # a new thread starts on device 0's default stream: run on the caller's
                with torch.cuda.device(dev), torch.cuda.stream(stream):
                    result.append(fn(*args, **kwargs))
            else:
                result.append(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            result.append(e)

    t = threading.Thread(target=run, name="attnopt-grad-check")
    t.start()
    t.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def attention_grad_error(*args, **kwargs) -> dict:
    """{"dq": rel-L1, "dk": ..., "dv": ..., "cos_min": the lowest cosine of the three, "backward"}
    (arguments: `_measure`'s)."""
    return with_autograd(_measure, *args, **kwargs)


def linear_grad_error(x, weight, bias, fmt: str, arch: str) -> dict:
    """A linear under `linear.training = fmt` on these inputs: {"y", "dx", "dw"[, "db"]: rel-L1,
    "cos_min", "training": fmt} (ops/linear_train.site_error, random upstream gradient)."""
    from .linear_train import site_error

    errs = with_autograd(site_error, x, weight, bias, fmt, arch)
    out = {k: v["rel_l1"] for k, v in errs.items()}
    out.update(cos_min=min(v["cos"] for v in errs.values()), training=fmt)
    return out


def _measure(q, k, v, attn_bias, keep_mask, masked_value, is_causal, causal_offset, scale, quant, pv, smooth_k,
             smooth_q, arch, impl, softcap, backward: str, seed: int = 0) -> dict:
    g = torch.Generator(device=q.device).manual_seed(seed)
    grads, ref = [], []
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out, _ = torch.ops.attnopt.attention_train(*leaves, attn_bias, keep_mask, masked_value, is_causal,
                                                   causal_offset, scale, quant, pv, smooth_k, smooth_q, arch, impl,
                                                   softcap, backward)
        dout = torch.randn(out.shape, generator=g, device=q.device, dtype=torch.float32).to(out.dtype)
        grads = torch.autograd.grad(out, leaves, dout)
        leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
        out64 = attention_exact(*leaves64, attn_bias, keep_mask, masked_value, is_causal, causal_offset, scale,
                                softcap=softcap)
        ref = torch.autograd.grad(out64, leaves64, dout.double())
    errs = [compare(a, b) for a, b in zip(grads, ref)]
    return {"dq": errs[0]["rel_l1"], "dk": errs[1]["rel_l1"], "dv": errs[2]["rel_l1"],
            "cos_min": min(e["cos"] for e in errs), "backward": backward}
