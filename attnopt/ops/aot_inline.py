"""When AOTAutograd traces an attention op into its body (its kernels) and when it keeps the call.

A `torch.library.triton_op` is decomposed into its body whenever AOTAutograd functionalizes a
graph: on CUDA that puts the Triton kernels into Inductor's generated code (no Python between
kernels, launches inside CUDA graphs). On a CPU the body is the pure-PyTorch reference: traced,
it would guard on every sequence length (its block padding) and be recompiled per length, so
there the op stays one call by default. The inline mode says which:

  'auto'   trace the body for CUDA tensors, keep the call elsewhere (the default)
  'always' trace the body on every device (the CPU tests of the inlined path)
  'never'  keep the call everywhere

A body that launches Triton kernels under Triton's CPU interpreter cannot be traced (the
interpreter runs the kernel on fake tensors), so such calls are always kept.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

from .. import switches
from ..logs import log

_MODE: contextvars.ContextVar[str | None] = contextvars.ContextVar("attnopt_inline_mode", default=None)


@contextlib.contextmanager
def inline_mode(mode: str | None):
    """Within the block, AOTAutograd treats attnopt's attention ops by `mode` (None: the
    ATTNOPT_INLINE switch). The backend wraps each compile_fx in this."""
    token = _MODE.set(mode)
    try:
        yield
    finally:
        _MODE.reset(token)


def current_mode() -> str:
    return _MODE.get() or switches.inline_mode()


def traces_body(schema: torch.FunctionSchema, args, kwargs) -> bool:
    """Whether this call of an attention op is traced into its body under the current mode."""
    mode = current_mode()
    if mode == "never":
        return False
    names = [a.name for a in schema.arguments]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    q = bound[names[0]]
    if mode == "auto" and q.device.type != "cuda":
        return False
    if switches.interpreted() and switches.use_triton(q, bound.get("arch", "auto"), bound.get("impl", "auto")):
        return False
    return True


def install(op_def, body: Callable) -> None:
    """Replace torch's rule for `op_def` under FunctionalTensorMode (always trace the body) by
    `traces_body`'s. Export's switch that keeps triton ops whole is honoured as torch does."""

    def rule(mode, op, types, args, kwargs):
        from torch.export._trace import custom_triton_ops_decomposition_disabled

        if custom_triton_ops_decomposition_disabled() or not traces_body(op._schema, args, kwargs):
            return mode.__torch_dispatch__(op, types, args, kwargs)
        if any(not issubclass(t, FakeTensor) and t not in (torch.Tensor, FunctionalTensor) for t in types):
            return NotImplemented
        try:
            with mode:
                return body(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - e.g. a data-dependent branch: keep the call, still correct
            log.info("attnopt: %s kept as one call (its body could not be traced: %r)", op, e)
            return mode.__torch_dispatch__(op, types, args, kwargs)

    op_def.register_torch_dispatch(FunctionalTensorMode, rule)
