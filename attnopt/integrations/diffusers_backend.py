"""attnopt as a diffusers attention backend: quantized / sparse attention without torch.compile.

    from attnopt.integrations.diffusers import register_backend, track_sites
    register_backend({"attention": {"quant": "int8"}, "plan": plan})  # validated here (ConfigError)
    track_sites(transformer)                  # site identity: per-layer plans, include / exclude
    transformer.set_attention_backend("attnopt")
    with attnopt.step(i, total):              # step schedules (attention.schedule)
        transformer(...)

diffusers (0.35 and later) sends the attention of Flux, Wan, HunyuanVideo, QwenImage and others
through `dispatch_attention_fn`, which looks the backend up by an `AttentionBackendName` member.
That Enum is closed, so `register_backend` adds a member to it (`extend_backend_names`), then
registers the function in `_AttentionBackendRegistry`. Nothing happens on import.

Each call decides as the compile pass does for a site (`attention_rewrite.check_selected`,
`check_operands`, `choose_formats`): the options in force at the current step, the site's plan
entry, the lengths and dtypes. A site that stays as it was runs SDPA exactly as diffusers'
"native" backend would; `decisions(name)` says what ran at each site and why.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import threading
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..config import Options, _thaw, normalize_options
from ..codegen.arch import resolve_arch
from ..codegen.attention.describe import describe_attention_kernel
from ..ops.attention import split_mask
from ..passes import on_cpu
from ..passes.attention_rewrite import Reject, check_operands, check_selected, choose_formats
from ..passes.schedule_rewrite import site_schedule
from ..schedule import apply_use, current_step, step_in
from .diffusers_sites import next_site, track_sites

log = logging.getLogger(__name__)

NAME = "attnopt"
_NAME_RE = re.compile(r"[a-z][a-z0-9_]*\Z")
_REGISTERED: dict[str, "_Backend"] = {}  # name -> its state, for this process
_lock = threading.Lock()


class SiteUnknown(RuntimeError):
    """The options need the calling module's path and the backend was called outside a tracked one."""


def extend_backend_names(name: str):
    """The `AttentionBackendName` member whose value is `name`, added if it is not there.

    diffusers' AttentionBackendName is a `str` Enum with a fixed member list. A new member is
    built as Enum builds its own (`str.__new__` on the class, `_name_` = name.upper(),
    `_value_` = name) and entered where Enum looks members up: the class attribute, `_member_map_`
    (name -> member, `__members__`), `_member_names_` (iteration order) and `_value2member_map_`
    (`AttentionBackendName(name)`). It hashes and compares as the string `name`.
    """
    from diffusers.models.attention_dispatch import AttentionBackendName as E

    existing = E._value2member_map_.get(name)
    if existing is not None:
        return existing
    member_name = name.upper()
    if member_name in E._member_map_ or hasattr(E, member_name):
        raise ValueError(f"AttentionBackendName already has an attribute {member_name!r}")
    member = E._member_type_.__new__(E, name)
    member._name_, member._value_ = member_name, name
    member.__objclass__ = E
    member._sort_order_ = len(E._member_names_)
    type.__setattr__(E, member_name, member)  # EnumType.__setattr__ refuses member names once mapped
    E._member_names_.append(member_name)
    E._member_map_[member_name] = member
    E._value2member_map_[name] = member
    return member


def register_backend(options: Mapping | Options | None = None, name: str = NAME) -> str:
    """Register attnopt's attention as diffusers backend `name` with these pass options
    (validated now: a bad dict raises attnopt.ConfigError). Registering the same name again
    replaces its options. Returns `name`, for `model.set_attention_backend(name)` or
    `diffusers.attention_backend(name)`."""
    opts = normalize_options(options)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"backend name must be lower case letters, digits and '_' (diffusers lower-cases "
                         f"the names set_attention_backend takes), got {name!r}")
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    with _lock:
        if name not in _REGISTERED and name in AttentionBackendName._value2member_map_:
            raise ValueError(f"{name!r} is one of diffusers' own attention backends; pick another name")
        member = extend_backend_names(name)
        state = _Backend(opts)
        _REGISTERED[name] = state
        _AttentionBackendRegistry.register(member, constraints=[])(state.function())
    return name


def decisions(name: str = NAME) -> dict[str, str]:
    """What backend `name` ran at each site it has seen: the kernel, or why it ran SDPA."""
    return dict(_REGISTERED[name].decisions)


def use_backend(model: torch.nn.Module, options: Mapping | Options | None = None, name: str = NAME) -> str:
    """register_backend + track_sites(model) + model.set_attention_backend(name), in one call."""
    register_backend(options, name)
    track_sites(model)
    model.set_attention_backend(name)
    return name


def _needs_site(opts: Options) -> str | None:
    """Why these options cannot run without knowing the calling module, or None."""
    a = opts.attention
    if opts.plan is not None and any(e.get("kind") == "attention" for e in opts.plan.sites.values()):
        return "the plan has per-site attention entries"
    if tuple(a.include) != ("*",) or tuple(a.exclude):
        return "attention.include / attention.exclude select modules by path"
    for entry in a.schedule:
        if tuple(entry["include"]) != ("*",):
            return "an attention.schedule entry selects modules by path"
    methods = [a.sparsity.method if a.sparsity is not None else None]
    methods += [(e["use"].get("sparsity") or {}).get("method") for e in a.schedule]
    if "svg2" in methods:
        return "sparsity 'svg2' keeps its k-means centroids per site"
    return None


@dataclasses.dataclass
class _Params:
    quant: str
    pv: str
    smooth_k: bool
    smooth_q: bool
    arch: str
    sparsity: str  # JSON of the sparse method and parameters, "" for dense
    kernel: str  # what decisions() shows


class _Backend:
    """One registered backend: its options, its per-site decisions (cached by what they depend on)."""

    def __init__(self, opts: Options):
        self.opts = opts
        self.needs_site = _needs_site(opts)
        self.decisions: dict[str, str] = {}
        self._cache: dict[tuple, _Params | str] = {}
        self._scheduled: dict[tuple, object] = {}  # (site key, module path, step) -> schedule `use` or None
        self._at_step: dict[object, Options] = {}  # attention options at a step -> Options with them
        self.has_schedule = bool(opts.attention.schedule) or (opts.plan is not None and any(
            e.get("schedule") for e in opts.plan.sites.values()))

    def _options_with(self, a) -> Options:
        if a is self.opts.attention:
            return self.opts
        got = self._at_step.get(a)
        if got is None:
            got = self._at_step[a] = dataclasses.replace(self.opts, attention=a)
        return got

    def decide(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, site: tuple[str, int] | None,
               is_causal: bool = False):
        """(site key, _Params) or (site key, reason it stays SDPA). q, k, v are [B, H, N, D]."""
        if site is None:
            if self.needs_site:
                raise SiteUnknown(
                    f"attnopt diffusers backend: {self.needs_site}, but it was called outside any tracked "
                    "attention module; call attnopt.integrations.diffusers.track_sites(model) on the model "
                    "(or use_backend(model, options)) first")
            path, index = "", 0
        else:
            path, index = site
        key = f"{path}#{index}"
        use, use_tag = self._use(key, path, current_step())
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        ck = (key, use_tag, tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype, k.dtype, v.dtype, q.device,
              grad, bool(is_causal))
        got = self._cache.get(ck)
        if got is None:
            got = self._cache[ck] = self._decide(use, key, path, q, k, v, grad, bool(is_causal))
        return key, got

    def _use(self, key: str, path: str, step_now):
        """(the `use` of the schedule entry in force at the site and step, its JSON) or (None, None):
        the site's plan entry's own schedule first, then attention.schedule, the first match
        winning (as the compile pass tries them: passes/schedule_rewrite.py)."""
        if step_now is None or not self.has_schedule:
            return None, None
        at = (key, path, step_now)
        if at not in self._scheduled:
            hit = next((e for _, e in site_schedule(self.opts, key, path) if step_in(e["steps"], *step_now)), None)
            use = _thaw(hit["use"]) if hit is not None else None
            self._scheduled[at] = (use, None if use is None else json.dumps(use, sort_keys=True))
        return self._scheduled[at]

    def _decide(self, use, key: str, path: str, q, k, v, grad: bool, is_causal: bool) -> _Params | str:
        a = self.opts.attention if use is None else apply_use(self.opts.attention, use)
        opts = self._options_with(a)
        try:
            check_selected(a, path, plain_ok=use is not None)
            if grad:
                raise Reject("q/k/v require grad: the backend runs attnopt's forward only, left for autograd")
            check_operands(a, (q.dtype, k.dtype, v.dtype), q.device.type, q.shape[-1], v.shape[-1],
                           q.shape[2], k.shape[2])
            spec = resolve_arch(opts.arch, q.device)
            quant, pv, sparsity, note = choose_formats(opts, key, spec, q.shape[1], q.shape[2], k.shape[2],
                                                       q.device.type, causal=is_causal, attention=a, use=use,
                                                       plain_ok=use is not None)
        except Reject as e:
            return str(e)
        kernel = describe_attention_kernel(spec, quant, pv, q.shape[-1], q.device.type)
        if sparsity is not None:
            kernel += f" +{sparsity['method']}"
        sp = json.dumps(sparsity, sort_keys=True) if sparsity is not None else ""
        on_cpu.announce(q.device.type)
        return _Params(quant, pv, a.smooth_k, a.smooth_q and sparsity is None, spec.name, sp,
                       kernel + (f" ({note})" if note else ""))

    def function(self):
        """The backend function diffusers calls. It names every argument dispatch_attention_fn
        passes (diffusers drops the ones a backend's signature lacks) and refuses what it does not
        implement instead of ignoring it."""
        state = self

        def attnopt_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                              scale: float | None = None, enable_gqa: bool = False, return_lse: bool = False,
                              window_size=None, _parallel_config=None) -> torch.Tensor:
            """query / key / value [B, N, H, D] (diffusers' layout) -> out [B, Nq, H, Dv]."""
            _refuse(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, return_lse, window_size,
                    _parallel_config)
            q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, H, N, D] views
            if attn_mask is not None and attn_mask.ndim == 2 and attn_mask.shape == (q.shape[0], k.shape[2]):
                attn_mask = attn_mask[:, None, None, :]  # [B, Nk] key padding, as the native backend reads it
            site_key, params = state.decide(q, k, v, next_site(), is_causal)
            if isinstance(params, str):
                state.decisions[site_key] = f"sdpa: {params}"
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                                     enable_gqa=enable_gqa)
                return out.transpose(1, 2)
            state.decisions[site_key] = params.kernel
            return _run(params, q, k, v, attn_mask, is_causal, scale).transpose(1, 2)

        return attnopt_attention


def _refuse(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, return_lse, window_size,
            parallel_config) -> None:
    """Raise on what the backend does not implement (what SDPA would refuse included)."""
    if dropout_p:
        raise NotImplementedError(f"attnopt diffusers backend: attention dropout (dropout_p={dropout_p}) is "
                                  "not implemented")
    if return_lse:
        raise NotImplementedError("attnopt diffusers backend: return_lse=True is not implemented")
    if window_size is not None:
        raise NotImplementedError(f"attnopt diffusers backend: window_size={window_size} (flash-attn's sliding "
                                  "window) is not implemented; use attention.sparsity {'method': 'window'}")
    if parallel_config is not None:
        raise NotImplementedError("attnopt diffusers backend: context parallelism is not implemented")
    if attn_mask is not None and is_causal:
        raise ValueError("attnopt diffusers backend: attn_mask and is_causal=True together (SDPA refuses them too)")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError("attnopt diffusers backend: query, key and value must be 4-D [batch, tokens, heads, dim]")
    hq, hkv = query.shape[2], key.shape[2]
    if hq != hkv and not enable_gqa:
        raise ValueError(f"attnopt diffusers backend: query has {hq} heads and key {hkv}, and enable_gqa is False")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"attnopt diffusers backend: {hq} query heads are not a multiple of {hkv} key heads")


def _run(p: _Params, q, k, v, attn_mask, is_causal: bool, scale: float | None) -> torch.Tensor:
    """attnopt's attention op on [B, H, N, D] operands, as the compile pass's rewrite calls it."""
    bias, keep = split_mask(attn_mask)
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    head = (q, k, v, bias, keep, -math.inf, bool(is_causal), 0, s, p.quant, p.pv, p.smooth_k)
    if p.sparsity:
        return torch.ops.attnopt.sparse_attention(*head, p.arch, "auto", p.sparsity)
    return torch.ops.attnopt.attention(*head, p.smooth_q, p.arch, "auto")
