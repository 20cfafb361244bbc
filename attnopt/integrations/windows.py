"""Per-head decode windows from a calibrated plan (AttnoptCache.from_plan).

A plan's attention sites with sparsity method 'window' hold a span per query head ("window",
tokens) and leading "sinks". Decode applies them per head, keyed by layer:

- site key -> layer: with the model, the site key's module path (the key before '#') is looked
  up and its `layer_idx` taken (transformers' attention modules carry one); without it, the
  number after "layers." in the key ("model.layers.3.self_attn#0" -> layer 3). Several sites in
  one layer, or none matching: an error, not a guess.
- heads in "dense_heads" get an unbounded window (the cache keeps every token of that layer).
- spans given as alpha + beta * N (no fixed "window") grow with the sequence: not bounded, an
  error here (calibrate's window search writes fixed per-head windows).
- sites planned dense or original (no 'window' sparsity) leave their layer unwindowed.
"""

from __future__ import annotations

import re

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _layer_index(key: str, model) -> int:
    path = key.split("#", 1)[0]
    if model is not None:
        idx = getattr(model.get_submodule(path), "layer_idx", None)
        if idx is None:
            raise ValueError(f"plan site {key!r}: module {path!r} has no layer_idx")
        return int(idx)
    m = _LAYER.search(path)
    if m is None:
        raise ValueError(f"plan site {key!r}: no 'layers.<i>.' in its key; pass the model to map it")
    return int(m.group(1))


def plan_windows(plan, heads: int, max_cache_len: int, model=None) -> dict[int, tuple[list[int], int]]:
    """{layer index: (window per query head, sinks)} for the plan's 'window' attention sites."""
    from ..plan import Plan

    if isinstance(plan, (str, bytes)) or hasattr(plan, "__fspath__"):
        plan = Plan.load(plan)
    elif isinstance(plan, dict):
        plan = Plan.from_dict(plan)
    out: dict[int, tuple[list[int], int]] = {}
    for key, entry in plan.sites.items():
        sp = entry.get("sparsity") if entry.get("kind") == "attention" else None
        if not sp or sp.get("method") != "window" or entry.get("dense") or entry.get("original"):
            continue
        if sp.get("window") is None:
            raise NotImplementedError(f"plan site {key!r}: a window of alpha + beta * N grows with the "
                                      "sequence; decode windows need fixed per-head 'window' spans")
        w = sp["window"]
        w = [int(x) if x is not None else max_cache_len for x in (w if isinstance(w, (list, tuple)) else [w] * heads)]
        if len(w) != heads:
            raise ValueError(f"plan site {key!r}: {len(w)} head windows for {heads} query heads")
        for h in sp.get("dense_heads", []):
            w[h] = max_cache_len
        layer = _layer_index(key, model)
        if layer in out:
            raise ValueError(f"plan sites map to layer {layer} twice (last: {key!r})")
        out[layer] = (w, int(sp.get("sinks", 64)))
    return out
