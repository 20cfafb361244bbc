"""The torch.compile entry point: options -> attnopt passes -> Inductor's compile_fx.

`torch.compile(model, backend="attnopt", options={...})` finds `attnopt_backend` through the
`torch_dynamo_backends` entry point (no import needed). `attnopt.backend(options, mode=...)`
returns a configured backend for code that also wants an Inductor mode.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import torch

from .config import ConfigError, Options, normalize_options
from .passes.manager import PassContext, config_patches, run_pre_inductor
from .report import Recorder

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
        from torch._inductor.compile_fx import compile_fx

        patches = {}
        if self.mode is not None:
            patches.update(list_mode_options(self.mode))
        patches.update(self.inductor_config)
        patches.update(config_patches(self.ctx))
        t0 = time.perf_counter()
        if self.progress:
            self.progress(f"compiling graph {self.graphs_compiled} ({len(gm.graph.nodes)} nodes)...")
        self.ctx.current_graph = self.ctx.recorder.new_graph()
        try:
            run_pre_inductor(self.ctx, gm, example_inputs)
            return compile_fx(gm, example_inputs, config_patches=patches)
        finally:
            dt = time.perf_counter() - t0
            self.compile_time_s += dt
            self.graphs_compiled += 1
            if self.progress:
                self.progress(f"graph {self.graphs_compiled - 1} compiled in {dt:.1f}s")

    def __repr__(self) -> str:
        return f"AttnoptBackend({self.options.to_json()}, mode={self.mode!r})"


def backend(options: Mapping | Options | None = None, *, mode: str | None = None,
            inductor_config: Mapping[str, Any] | None = None) -> AttnoptBackend:
    """A configured attnopt backend: `torch.compile(model, backend=attnopt.backend({...}))`."""
    return AttnoptBackend(options, mode=mode, inductor_config=inductor_config)


def attnopt_backend(gm: torch.fx.GraphModule, example_inputs, options: Mapping | None = None):
    """The backend registered as "attnopt" (entry point group torch_dynamo_backends)."""
    return AttnoptBackend(options)(gm, example_inputs)
