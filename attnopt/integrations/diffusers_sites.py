"""Which attention site a diffusers attention-backend call belongs to.

diffusers' dispatcher calls a backend with tensors only: no module, no name. `track_sites(model)`
puts a forward pre-hook (and an always-called forward hook) on every attention module of `model`
(diffusers `Attention`, `AttentionModuleMixin` subclasses, `MochiAttention`). While such a module
runs, its path in `model.named_modules()` sits on top of a thread-local stack, with a count of the
backend calls made under it so far. The backend reads that top entry: the n-th call (from 0)
under module `blocks.3.attn` is the site `blocks.3.attn#n`, the key `attnopt.calibrate` gives the
n-th attention inside that module's forward when it compiles the same model, so a calibrated plan
applies layer by layer.
"""

from __future__ import annotations

import threading

import torch

_local = threading.local()  # .stack: [[module path, calls so far], ...], innermost last
HOOKS_ATTR = "_attnopt_site_hooks"  # on the tracked root: its hook handles (tracking is idempotent)


def _stack() -> list:
    st = getattr(_local, "stack", None)
    if st is None:
        st = _local.stack = []
    return st


def attention_classes() -> tuple[type, ...]:
    """The module classes whose processors diffusers' `set_attention_backend` reaches."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    out = [Attention, AttentionModuleMixin]
    try:
        from diffusers.models.attention_processor import MochiAttention

        out.append(MochiAttention)
    except ImportError:
        pass
    return tuple(out)


class SiteHooks:
    """The hooks `track_sites` installed on one model; `remove()` takes them all off."""

    def __init__(self, root: torch.nn.Module, handles: list, paths: list[str]):
        self.root, self.handles, self.paths = root, handles, paths

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        if getattr(self.root, HOOKS_ATTR, None) is self:
            delattr(self.root, HOOKS_ATTR)


def track_sites(model: torch.nn.Module) -> SiteHooks:
    """Hook every attention module of `model` so the attnopt backend knows which site it runs
    (module paths relative to `model`). Calling it again on the same model changes nothing."""
    done = getattr(model, HOOKS_ATTR, None)
    if done is not None:
        return done
    classes = attention_classes()
    handles, paths = [], []
    for path, module in model.named_modules():
        if not isinstance(module, classes):
            continue
        handles.append(module.register_forward_pre_hook(_enter(path)))
        handles.append(module.register_forward_hook(_leave, always_call=True))
        paths.append(path)
    hooks = SiteHooks(model, handles, paths)
    object.__setattr__(model, HOOKS_ATTR, hooks)  # not a submodule or parameter: plain attribute
    return hooks


def _enter(path: str):
    def pre_hook(module, args):
        _stack().append([path, 0])

    return pre_hook


def _leave(module, args, output):
    st = _stack()
    if st:
        st.pop()


def next_site() -> tuple[str, int] | None:
    """(module path, index of this call under it) for a backend call now, or None outside any
    tracked attention module. Counts the call."""
    st = _stack()
    if not st:
        return None
    top = st[-1]
    index = top[1]
    top[1] += 1
    return top[0], index
