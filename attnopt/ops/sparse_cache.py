"""What a sparse call builds from its parameters and shapes alone, built once.

Static masks (window, radial, a user's block mask, SVG's two patterns), their lookup tables and
the per-head parameter tensors depend on nothing a call's data holds. Rebuilding them per call
costs launches, argsorts and host-to-device copies, so:

- eager (and extern-kernel) calls keep them in a small LRU keyed by everything they depend on:
  the frozen parameters (ops/sparse_params.Params, which hash by value), the shapes, causality,
  the causal offset, the device and the implementation. A changed plan is a changed key, so a
  stale mask can never be reused; the LRU bounds what a calibration's many plans leave behind.
- a body traced into a graph (ops/aot_inline.py) with static shapes builds them for real at
  trace time and lifts each tensor into the graph as its own constant (`lift_fresh_copy`, as
  `torch.tensor` does): AOT names every constant of a graph uniquely, so two sites never share
  one by position. Under symbolic shapes, or where nothing can run at trace time (a Triton
  build traced for a GPU on a machine without one), the build is traced and runs per call.

Cached tensors are shared: callers must never write to them.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_leaves, tree_map

from ..logs import log

MAX_ENTRIES = 48  # a model's distinct (site parameters, shape) pairs; calibration's plans cycle through
MAX_BYTES = 1 << 30  # a LUT at 128k tokens and 32 heads is 256 MiB: entries are bounded by size too

_CACHE: OrderedDict = OrderedDict()  # key -> (value, bytes)


def clear() -> None:
    _CACHE.clear()


def entries() -> int:
    return len(_CACHE)


def held_bytes() -> int:
    return sum(n for _, n in _CACHE.values())


def _nbytes(value) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(value) if isinstance(t, torch.Tensor))


def _lookup(key, build: Callable):
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit[0]
    value = build()
    _CACHE[key] = (value, _nbytes(value))
    while len(_CACHE) > 1 and (len(_CACHE) > MAX_ENTRIES or held_bytes() > MAX_BYTES):
        _CACHE.popitem(last=False)  # the least recently used (never the entry just built)
    return value


def _concrete(*dims) -> bool:
    return all(isinstance(d, (int, bool)) for d in dims)


def _lift(t):
    return torch.ops.aten.lift_fresh_copy.default(t) if isinstance(t, torch.Tensor) else t


def built_once(like: torch.Tensor, key: tuple, build: Callable, *dims):
    """`build()` (a tensor or a tuple / dict of them), cached under `key` for eager calls, a graph
    constant for traced ones with concrete `dims`, traced as it runs under symbolic ones."""
    if not is_fake(like):
        return _lookup(key, build)
    if not _concrete(*dims):
        return build()
    try:
        with _disable_current_modes():  # the real tensors, outside fake and functional modes
            value = _lookup(key, build)
    except Exception as e:  # noqa: BLE001 - no device to build on at trace time: build it per call instead
        log.debug("attnopt: %s not built at trace time (%r); traced to run per call", key[0], e)
        return build()
    return tree_map(_lift, value)
