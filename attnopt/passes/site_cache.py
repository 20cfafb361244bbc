"""Site records kept beside Inductor's caches, so a graph served from a cache still reports its sites.

When Inductor's FX graph cache (or AOTAutograd's cache) serves a compiled graph, attnopt's passes
do not run: without this the recorder, `TORCH_LOGS=attnopt` and the `attnopt_sites` trace would
say nothing about a graph that does run attnopt's kernels. The attention pass writes its records
to `<inductor cache dir>/attnopt_sites/<hash>.json`, the hash covering the pass uuid (attnopt's
source, options, versions, arch), Dynamo's graph code and the example inputs' metadata; a later
compile of the same graph reads them back when a cache hit is seen instead of the pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import weakref

import torch

FORMAT_VERSION = 1
_PENDING: "weakref.WeakSet" = weakref.WeakSet()  # recorders with graphs waiting to be settled


def cache_folder() -> str:
    """Beside Inductor's own cache (TORCHINDUCTOR_CACHE_DIR honoured), so clearing one clears both."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        root = cache_dir()
    except ImportError:
        root = os.path.join(tempfile.gettempdir(), "torchinductor_attnopt")
    return os.path.join(root, "attnopt_sites")


def _input_meta(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"T{tuple(x.shape)}{tuple(x.stride())}{x.dtype}{x.device.type}{x.requires_grad}"
    return type(x).__name__ if not isinstance(x, (int, float, bool)) else repr(x)


def graph_hash(pass_uuid: str, gm: torch.fx.GraphModule, example_inputs) -> str:
    """Same for the same graph, inputs and pass configuration, in any process."""
    h = hashlib.sha256()
    # grad mode too: Dynamo's graph reads the same with and without no_grad, but the passes decide
    # differently (a graph that requires grad keeps its attention)
    grad = f"grad={torch.is_grad_enabled()} inference={torch.is_inference_mode_enabled()}"
    for part in (str(FORMAT_VERSION), pass_uuid, grad, gm.code, *(_input_meta(x) for x in example_inputs)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def path_for(digest: str) -> str:
    return os.path.join(cache_folder(), f"{digest}.json")


def save(path: str, records: list) -> None:
    """Write atomically (rename), so a concurrent reader never sees half a file."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        payload = json.dumps({"version": FORMAT_VERSION, "sites": [r.to_dict() for r in records]})
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(payload)
        os.replace(tmp, path)
    except OSError:  # a read-only cache dir must not fail the user's compile
        pass


def load(path: str, decode) -> list | None:
    """The records saved at `path`, each made by `decode(dict)` (report.SiteRecord.from_dict: the
    caller passes it, so this module never imports the report), or None when there are none (or
    they are unreadable)."""
    try:
        with open(path) as f:
            d = json.load(f)
        if d.get("version") != FORMAT_VERSION:
            return None
        return [decode(s) for s in d["sites"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def hits() -> int:
    """Cache hits so far (FX graph cache and AOTAutograd cache): a rise means a graph was served."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]


def caching_enabled() -> bool:
    """Whether Inductor may store this graph (read inside compile_fx, under its config patches)."""
    from torch._functorch import config as fconfig
    from torch._inductor import config

    return bool(config.fx_graph_cache) or bool(getattr(fconfig, "enable_autograd_cache", False))


def _settle_all(*_args) -> None:
    """Dynamo finished a frame: every graph compiled in it is done."""
    for rec in list(_PENDING):
        rec.settle(final=True)


def watch(recorder) -> None:
    """Settle `recorder` when Dynamo finishes compiling the frame (records logged and traced then).
    Checked on every call: torch._dynamo.reset() clears Dynamo's callbacks."""
    _PENDING.add(recorder)
    try:
        from torch._dynamo.callback import callback_handler
    except ImportError:  # readers of the recorder settle it too
        return
    if _settle_all not in callback_handler.end_callbacks:
        callback_handler.register_end_callback(_settle_all)


def unwatch(recorder) -> None:
    _PENDING.discard(recorder)
