"""The torch.compile entry point: options -> attnopt's passes (before AOTAutograd) -> Inductor's compile_fx.

`torch.compile(model, backend="attnopt", options={...})` finds `attnopt_backend` through the
`torch_dynamo_backends` entry point (no import needed). `attnopt.backend(options, mode=...)`
returns a configured backend for code that also wants an Inductor mode.
"""

from __future__ import annotations

import operator
import os
import sys
import threading
import time
from typing import Any, Mapping

import torch

from .config import ConfigError, Options, normalize_options
from .logs import log
from .ops import aot_inline
from .passes import capture_cache
from .passes.graph_utils import copy_graph
from .passes.linear_rewrite import BAKED_META_KEY
from .passes.manager import (JointGraphFallback, PassContext, SiteInternalError, config_patches, needs_linear_pass,
                             run_attention, run_linear)
from .passes.schedule_rewrite import step_devices
from .report import Recorder
from .schedule import step_tensor

# keys torch.compile may leave in `options` that belong to torch, not to attnopt
_TORCH_KEYS = ("guard_filter_fn", "use_aoti")


class AttnoptBackend:
    """A torch.compile backend: Inductor with attnopt's passes installed.

    Options are validated when the backend is made, so a bad configuration raises
    `attnopt.ConfigError` before anything is compiled.
    """

    def __init__(self, options: Mapping | Options | None = None, *, mode: str | None = None,
                 inductor_config: Mapping[str, Any] | None = None, recorder: Recorder | None = None,
                 probe_sink: str | None = None, progress=None):
        if isinstance(options, Mapping) and not isinstance(options, Options):
            options = {k: v for k, v in options.items() if k not in _TORCH_KEYS}
        self.options = normalize_options(options)
        self.ctx = PassContext(self.options, recorder or Recorder(), probe_sink)
        self.mode = mode
        self.inductor_config = dict(inductor_config or {})
        self.compile_time_s = 0.0
        self.graphs_compiled = 0
        self.progress = progress  # callable(str) told about each graph compile
        if mode is not None:
            from torch._inductor import list_mode_options

            modes = list(list_mode_options(None))
            if mode not in modes:
                raise ConfigError("mode", mode, " | ".join(repr(m) for m in modes))

    @property
    def recorder(self) -> Recorder:
        return self.ctx.recorder

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        from torch._inductor import list_mode_options

        patches = {}
        if self.mode is not None:
            patches.update(list_mode_options(self.mode))
        patches.update(self.inductor_config)
        patches.update(config_patches(self.ctx, example_inputs))
        t0 = time.perf_counter()
        check_ops_registered()
        if self.progress:
            self.progress(f"compiling graph {self.graphs_compiled} ({len(gm.graph.nodes)} nodes)...")
        self.ctx.current_graph = self.ctx.recorder.new_graph()
        pristine = _copy_graph_module(gm) if needs_linear_pass(self.ctx) else None
        try:
            run_linear(self.ctx, gm, example_inputs)
            baked = gm.meta.pop(BAKED_META_KEY, None)
            graph = run_attention(self.ctx, gm, example_inputs, cache=capture_cache.enabled(self.ctx, patches))
            devices = step_devices(graph.graph)
            if devices:  # scheduled sites read the step tensors, passed after Dynamo's inputs
                example_inputs = [*example_inputs, *_step_examples(devices)]
            fn = self._compile_fx(graph, example_inputs, patches)
            if devices:
                fn = StepInputs(fn, devices)
            if not baked:
                return fn
            return FreshWeights(self, fn, baked, pristine)
        finally:
            dt = time.perf_counter() - t0
            self.compile_time_s += dt
            self.graphs_compiled += 1
            if self.progress:
                self.progress(f"graph {self.graphs_compiled - 1} compiled in {dt:.1f}s")

    def _compile_fx(self, gm, example_inputs, patches: dict):
        """compile_fx on the rewritten graph, AOTAutograd tracing attnopt's ops by this backend's
        inline mode. The caches key on that graph, so one that lacks a rewrite (a site left as it
        was after an internal error) is never served for one that has it; after an internal error
        they are skipped anyway, so such a graph is compiled afresh. Under JointGraphFallback an
        internal error aborts the compile (SiteInternalError) and it is done again from a copy of
        Dynamo's graph, the failed site left as it was."""
        from torch._dynamo.utils import counters

        gi = self.ctx.current_graph
        fallback = isinstance(patches.get("joint_custom_pre_pass"), JointGraphFallback)
        backup = _copy_graph_module(gm) if fallback else None  # the fallback pass edits gm in place
        hits = counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
        for attempt in range(64):  # each retry leaves at least one more site as it was
            graph = gm if attempt == 0 else _copy_graph_module(backup)
            try:
                fn = self._compile_fx_once(graph, example_inputs, patches)
                break
            except Exception as e:  # noqa: BLE001 - only attnopt's own signal is handled
                if backup is None or _site_failure(e) is None:
                    raise
                self.ctx.recorder.drop_sites(gi, kind="attention")
        else:
            raise RuntimeError("attnopt: internal errors kept recurring while compiling this graph")
        now = counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
        self.ctx.recorder.set_served(gi, "cache" if now > hits else "compiled")
        return fn

    def _compile_fx_once(self, gm, example_inputs, patches: dict):
        from torch._functorch import config as functorch_config
        from torch._inductor.compile_fx import compile_fx

        fresh = (self.ctx.internal_errors or _linear_internal_error(self.ctx, self.ctx.current_graph)
                 or patches.get("fx_graph_cache") is False)
        with aot_inline.inline_mode(self.ctx.inline_mode()):
            if not fresh:
                return compile_fx(gm, example_inputs, config_patches=patches)
            with functorch_config.patch(enable_autograd_cache=False):
                return compile_fx(gm, example_inputs, config_patches={**patches, "fx_graph_cache": False})

    def __repr__(self) -> str:
        return f"AttnoptBackend({self.options.to_json()}, mode={self.mode!r})"


def _step_examples(devices) -> list[torch.Tensor]:
    """The step tensors as compile_fx's example inputs. Under Dynamo, as fake tensors of its fake
    mode with static shapes: AOTAutograd takes such a tensor as it is, where a real tensor it has
    no symbolic context for would get a symbolic size (a [s0] input, guarded s0 >= 2)."""
    from torch._guards import TracingContext

    ctx = TracingContext.try_get()
    fake_mode = ctx.fake_mode if ctx is not None else None
    if fake_mode is None:
        return [step_tensor(d) for d in devices]
    return [fake_mode.from_tensor(step_tensor(d), static_shapes=True) for d in devices]


class StepInputs:
    """The compiled graph of a model with scheduled attention sites: each call passes, after
    Dynamo's arguments, the step tensor of each device the graph's scheduled sites run on.

    The backend passes them, not Dynamo: Dynamo never sees the tensors, so it installs no guard on
    them and a new step never recompiles. They are the same tensors for the life of the process,
    written in place by `attnopt.step`. Under mode="reduce-overhead", Inductor's CUDA graph trees
    treat them as ordinary (non-static) inputs: they are not parameters or buffers Dynamo lifted
    nor marked static, so `CUDAGraphNode.run` copies them into the graph's input buffers before
    every replay (checked in torch/_inductor/cudagraph_trees.py, torch 2.13:
    `_copy_inputs_and_remove_from_src` for indices not in `static_input_idxs`); the replay then
    reads the current step. Had Inductor treated them as static, their address would be fixed and
    the in-place write would still reach the replay."""

    def __init__(self, fn, devices):
        self.fn, self.devices = fn, list(devices)
        self.tensors = tuple(step_tensor(d) for d in self.devices)

    def __call__(self, *args):
        return self.fn(*args, *self.tensors)


def _site_failure(e: BaseException) -> SiteInternalError | None:
    """The SiteInternalError behind `e` (Inductor and Dynamo may wrap it), or None."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, SiteInternalError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _linear_internal_error(ctx: PassContext, gi: int | None) -> bool:
    """The linear pass (which ran before compile_fx) left a site unrewritten after an internal error."""
    if gi is None:
        return False
    return any(r.kind == "linear" and (r.reason or "").startswith("internal error")
               for r in ctx.recorder.graphs[gi]["sites"])


OP_NAMES = ("attention", "sparse_attention", "attention_probe", "linear_8bit", "linear_w4a16", "linear_w4a8",
            "linear_nvfp4", "linear_probe", "linear_train", "norm_train", "attention_train", "attention_backward",
            "sparse_attention_train", "sparse_attention_backward")


def check_ops_registered() -> None:
    """attnopt's ops must be registered with torch before a graph is compiled: a rewrite into an
    op torch does not know would fail. They are missing when `import attnopt` found something
    other than the installed package (e.g. a folder named attnopt in the working directory)."""
    missing = [n for n in OP_NAMES if not hasattr(torch.ops.attnopt, n)]
    if missing:
        # this module's own package: whatever `import attnopt` found, it imported this file
        where = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__init__.py")
        raise RuntimeError(
            f"attnopt: torch.ops.attnopt.{missing[0]} is not registered ({len(missing)} of attnopt's ops missing): "
            f"`import attnopt` resolved to {where}, which did not register them. A folder named 'attnopt' in "
            "the working directory or on sys.path may be shadowing the installed package, or the install is "
            "broken; reinstall with `pip install -e .` or run from another directory.")


def _copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The graph as Dynamo gave it, before attnopt's passes edit it in place: what a recompile
    starts from. Shares the module's tensors; copies nodes and Dynamo's side tables."""
    out = torch.fx.GraphModule(gm, copy_graph(gm.graph))
    out.meta = dict(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        out._param_name_to_source = dict(gm._param_name_to_source)
    return out


def _is_static(gm: torch.fx.GraphModule) -> bool:
    """No symbolic sizes among the graph's inputs: a recompile from real inputs is equivalent."""
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        v = n.meta.get("example_value")
        if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return False
        if isinstance(v, torch.Tensor) and not all(isinstance(d, int) for d in v.shape):
            return False
    return True


_DATA_PTR = torch.Tensor.data_ptr
_VERSION = operator.attrgetter("_version")


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter: identity is all we can check
        return None


class FreshWeights:
    """The compiled graph, checked on every call against the parameters the linear pass copied
    into it (quantized / smoothed / folded). Why: an in-place change (weight.mul_, load_state_dict),
    a swapped `.data` or a replaced parameter would otherwise go on using the old values silently
    (writes through `.data`, which bypass the version counter, are the one thing it cannot see). On a change the
    graph is compiled again from Dynamo's graph with the current values; graphs with symbolic
    sizes raise instead, since recompiling from one call's inputs would fix those sizes."""

    # A graph whose weights change on every call (offloading hooks swapping tensors in, EMA
    # updates) would recompile forever: past this many refreshes it raises instead.
    MAX_RECOMPILES = 16
    SWEEP_FROM = 8  # baked parameters from which the C-level sweeps beat the Python loop

    def __init__(self, backend: "AttnoptBackend", fn, baked, pristine: torch.fx.GraphModule | None):
        self.backend, self.fn, self.pristine = backend, fn, pristine
        self.recompiles = 0
        self._lock = threading.Lock()
        self._arm(baked)

    def _arm(self, baked) -> None:
        # (position among the graph's inputs or None for get_attr, tensor, version, data_ptr, label):
        # the version counter sees in-place writes, data_ptr a swapped `.data`, identity a new tensor
        self.checks = [(i, t, _version(t), t.data_ptr(), label) for i, t, label in baked]
        # The per-call check, as three C-level sweeps (no Python loop body per parameter): each
        # baked input is the tensor baked; then, those being the very tensors, their data_ptrs and
        # version counters as recorded. Version counters are per tensor (nothing aggregates them),
        # so no check that sees every in-place write can be O(1) in the number of parameters.
        positions = [i for i, *_ in self.checks if i is not None]
        self._pick = (operator.itemgetter(*positions) if len(positions) > 1
                      else (lambda args, i=positions[0]: (args[i],)) if positions else (lambda args: ()))
        self._baked_inputs = tuple(t for i, t, *_ in self.checks if i is not None)
        once = list({id(t): (t, v, ptr) for _, t, v, ptr, _ in self.checks}.values())  # a tensor baked twice: once
        self._held = tuple(t for t, _, _ in once)
        self._ptrs = tuple(ptr for _, _, ptr in once)
        self._versioned = tuple(t for t, v, _ in once if v is not None)
        self._versions = tuple(v for _, v, _ in once if v is not None)

    def _stale(self, args) -> bool:
        """Whether any baked parameter changed: `_changed`'s loop for a few (cheaper than setting
        up the sweeps), the sweeps past SWEEP_FROM."""
        if len(self.checks) < self.SWEEP_FROM:
            return self._changed(args) is not None
        return not (all(map(operator.is_, self._pick(args), self._baked_inputs))
                    and tuple(map(_DATA_PTR, self._held)) == self._ptrs
                    and tuple(map(_VERSION, self._versioned)) == self._versions)

    def _changed(self, args) -> str | None:
        """The label of the first baked parameter that changed, or None."""
        for i, t, v, ptr, label in self.checks:
            a = t if i is None else args[i]
            if a is not t or a.data_ptr() != ptr or (v is not None and a._version != v):
                return label
        return None

    def __call__(self, *args):
        if self._stale(args):  # identity, data_ptr and version counters only: cheap
            self._refresh(args)
        return self.fn(*args)

    def _refresh(self, args):
        with self._lock:
            label = self._changed(args)
            if label is not None:
                if self.pristine is None or not _is_static(self.pristine):
                    raise RuntimeError(
                        f"attnopt: the {label} parameter changed after torch.compile quantized a copy of it "
                        "(in-place update, load_state_dict or a new tensor); this graph has symbolic sizes, so "
                        "attnopt cannot recompile it from this call. Call torch._dynamo.reset() and compile "
                        "again after changing weights.")
                if self.recompiles >= self.MAX_RECOMPILES:
                    raise RuntimeError(
                        f"attnopt: the {label} parameter changed again after {self.recompiles} recompiles of this "
                        "graph for changed weights: its quantized linears would be recompiled on every call. "
                        "Quantize linears only once the weights stay put (or leave them out: linear.quant 'none' "
                        "or linear.exclude), e.g. not under offloading hooks that swap weights in per call.")
                log.warning("attnopt: %s changed after compiling; quantizing again (recompiling this graph)", label)
                gm = _copy_graph_module(self.pristine)
                fresh = self.backend(gm, list(args))
                self.recompiles += 1
                self.fn, self.checks = (fresh.fn, fresh.checks) if isinstance(fresh, FreshWeights) else (fresh, [])


def backend(options: Mapping | Options | None = None, *, mode: str | None = None,
            inductor_config: Mapping[str, Any] | None = None) -> AttnoptBackend:
    """A configured attnopt backend: `torch.compile(model, backend=attnopt.backend({...}))`."""
    return AttnoptBackend(options, mode=mode, inductor_config=inductor_config)


def attnopt_backend(gm: torch.fx.GraphModule, example_inputs, options: Mapping | None = None,
                    mode: str | None = None):
    """The backend registered as "attnopt" (entry point group torch_dynamo_backends).

    Dynamo calls this once per graph. Every graph of one `torch.compile(..., backend="attnopt")`
    call shares one AttnoptBackend (kept on torch.compile's wrapper, see `torch_compile_wrapper`),
    so site keys stay unique across graph breaks ('#0', '#0@g1') exactly as under
    `attnopt.backend()` and `attnopt.inspect`, and a calibrated plan reaches the sites it was made
    for. `mode` (torch.compile's, e.g. "max-autotune") goes to Inductor as under
    `attnopt.backend(mode=)`."""
    wrapper = torch_compile_wrapper(sys._getframe(1))
    if wrapper is None:
        _warn_unshared()
        return AttnoptBackend(options, mode=mode)(gm, example_inputs)
    be = wrapper.__dict__.get("_attnopt_backend")
    if be is None:
        be = wrapper.__dict__["_attnopt_backend"] = AttnoptBackend(options, mode=mode)
    return be(gm, example_inputs)


def torch_compile_wrapper(caller) -> Any | None:
    """The one place attnopt touches torch's private frames: the `_TorchCompileWrapper` that one
    `torch.compile(..., backend="attnopt")` call made, found as `self` in the frame that called
    the backend (`_TorchCompileWrapper.__call__`), or None when something else called it.

    Why private (checked on torch 2.13): there is no public per-call hook. A backend named by
    string gets only (gm, example_inputs, **kwargs); `lookup_backend("attnopt")` returns the same
    function for every call; the `options` dict is the caller's own object (not passed when empty
    or with `mode=`, and shared when a caller reuses one dict for two models); and
    `torch._guards.CompileContext.current_compile_id()` numbers frames, not calls: a function with
    one graph break compiled by two torch.compile calls gives 0/0, 1/0, then 0/1, 1/1 (the resume
    function is frame 1 under both calls).
    tests/test_backend.py asserts this lookup finds the wrapper under torch.compile, so a torch
    that renames or restructures the wrapper fails CI; at run time `attnopt_backend` warns."""
    wrapper_type = getattr(torch, "_TorchCompileWrapper", None)
    wrapper = caller.f_locals.get("self") if caller is not None else None
    if wrapper_type is not None and isinstance(wrapper, wrapper_type):
        return wrapper
    return None


_warned_unshared = False


def _warn_unshared() -> None:
    """Dynamo called the backend but not through the wrapper `torch_compile_wrapper` knows: each
    graph gets its own AttnoptBackend (site keys restart at '#0' after a graph break). Said once."""
    global _warned_unshared
    from torch._guards import TracingContext

    if _warned_unshared or TracingContext.try_get() is None:
        return
    _warned_unshared = True
    log.warning("attnopt: backend=\"attnopt\" could not find torch.compile's wrapper (torch %s changed "
                "_TorchCompileWrapper?); graphs of one compile call will not share site keys. "
                "Use backend=attnopt.backend({...}) instead.", torch.__version__)
