"""A sparse site's method and parameters, parsed once and read-only.

The rewrite passes them as one JSON string argument to `attnopt::sparse_attention`; parsing it on
every call costs host time a GPU would wait on. `parse` caches the parse per string, so its result
must never change: `Params` is an immutable, hashable mapping (lists become tuples), and its hash
makes it a cache key for everything built from the parameters (ops/sparse_cache.py).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping


class Params(Mapping):
    """Read-only mapping of a method's parameters; equal parameters hash equal."""

    __slots__ = ("_items", "_hash")

    def __init__(self, items: dict):
        self._items = dict(items)
        self._hash = hash(tuple(sorted(self._items.items())))

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return isinstance(other, Params) and self._items == other._items

    def __repr__(self):
        return f"Params({self._items!r})"


def _freeze(x):
    if isinstance(x, Mapping):
        return Params({k: _freeze(v) for k, v in x.items()})
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(v) for v in x)
    return x


def freeze(params) -> Params:
    """A dict (calibration passes them) or Params -> Params."""
    return params if isinstance(params, Params) else _freeze(params)


@functools.lru_cache(maxsize=256)
def parse(sparsity: str) -> Params:
    """The op's `sparsity` argument, parsed once per distinct string."""
    return _freeze(json.loads(sparsity))
