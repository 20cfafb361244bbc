"""Calibration's capture: the model compiled once with a probe at every site, run on the batches,
each site's inputs kept (and cached on disk, so another budget or method skips this run).

The same compiled model then serves every later measurement (evaluate.ModelRunner): its probes
compute whatever choice is being evaluated, so nothing is compiled per candidate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..compiler import AttnoptBackend
from ..ops import probe
from ..version import __version__
from .linear_formats import linear_modules

_IDS = itertools.count()


@dataclasses.dataclass
class Captured:
    calls: dict[str, list[dict]]  # site key -> per call, the site's inputs (attention) or rows (linear)
    sites: dict[str, dict]  # attention site key -> its fixed settings (arch, smooth_k, smooth_q)
    weights: dict[str, tuple]  # linear site key -> (weight [N, K], bias)
    arch: str
    compiled: object  # the model compiled with probes (for evaluate.ModelRunner)
    sink: str
    from_cache: bool


def _tensor_digest(h, t: torch.Tensor) -> None:
    t = t.detach()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def cache_key(model, batches, opts, attention: bool, linears: bool) -> str:
    """Weights, buffers, batches, options and versions: anything that changes what is captured."""
    h = hashlib.sha256(f"{__version__} {torch.__version__} {attention} {linears}".encode())
    h.update(json.dumps(opts.to_dict(), sort_keys=True, default=str).encode())
    if isinstance(model, torch.nn.Module):
        h.update(type(model).__qualname__.encode())
        for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
            h.update(name.encode())
            _tensor_digest(h, t)
    for b in batches:
        for v in (b.values() if isinstance(b, Mapping) else b):
            if isinstance(v, torch.Tensor):
                _tensor_digest(h, v)
            else:
                h.update(repr(v).encode())
    return h.hexdigest()[:32]


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "attnopt" / "calibration"


def capture(model, batches, opts, *, attention: bool, linears: bool, cache_dir=None, say=None) -> Captured:
    """Compile `model` with probes (attention sites when `attention`, linears when `linears`)
    and, unless the cache has them, run the batches keeping every site's inputs.
    cache_dir=False turns the disk cache off."""
    from ..codegen.arch import detect_arch

    quant = opts.attention.quant if opts.attention.quant != "none" else "int8"  # every site a probe
    capture_opts = dataclasses.replace(  # statistics of the original linears; CPU sites too (on_cpu)
        opts, on_cpu="emulate", linear=dataclasses.replace(opts.linear, quant="none", smooth=None),
        attention=dataclasses.replace(opts.attention, quant=quant) if attention
        else dataclasses.replace(opts.attention, enabled=False))
    sink = f"calib{next(_IDS)}"
    be = AttnoptBackend(capture_opts, probe_sink=sink, inductor_config={"fx_graph_cache": False})
    be.ctx.capture_linears = linears
    be.ctx.announce_cpu = False  # calibration is meant to measure, not to run fast
    probe.register_sink(sink, lambda key, metrics: None)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=be)
    path = None
    if cache_dir is not False:
        path = Path(cache_dir or default_cache_dir()) / f"{cache_key(model, batches, opts, attention, linears)}.pt"
    if path is not None and path.exists():
        saved = torch.load(path, weights_only=True)
        calls, sites, arch, from_cache = saved["calls"], saved["sites"], saved["arch"], True
    else:
        calls = {}

        def keep(key: str, call: dict) -> None:
            calls.setdefault(key, []).append({k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
                                              for k, v in call.items()})

        probe.register_capture(sink, keep)
        with torch.no_grad(), torch._functorch.config.patch(enable_autograd_cache=False):
            for i, batch in enumerate(batches):
                if say is not None:
                    say.note(f"batch {i + 1}")
                compiled(**batch) if isinstance(batch, Mapping) else compiled(*batch)
                if say is not None:
                    say.step()
        probe.register_capture(sink, lambda key, call: None)
        recs = {r.key: r for r in be.recorder.sites()}
        sites = {k: {"arch": recs[k].details["arch"], "smooth_k": recs[k].details["smooth_k"],
                     "smooth_q": bool(opts.attention.smooth_q)}
                 for k, c in calls.items() if c[0].get("kind") != "linear"}
        first = next((c[0]["x"] for c in calls.values() if c[0].get("kind") == "linear"), None)
        arch = opts.arch if opts.arch != "auto" else detect_arch(first.device if first is not None else None)
        if sites and opts.arch == "auto":
            arch = next(iter(sites.values()))["arch"]
        from_cache = False
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save({"calls": calls, "sites": sites, "arch": arch}, tmp)
            os.replace(tmp, path)
    mods = linear_modules(model)
    weights = {k: (mods[k][1], getattr(mods[k][0], "bias", None)) for k, c in calls.items()
               if c[0].get("kind") == "linear" and k in mods}
    return Captured(calls, sites, weights, arch, compiled, sink, from_cache)
