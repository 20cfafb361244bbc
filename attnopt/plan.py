"""Calibration plans: per-site parameters chosen by `attnopt.calibrate`, stored as versioned JSON.

A plan never holds code or pickles: it is a dict of site keys (the module path of a site plus
its index inside that module, e.g. ``model.layers.3.self_attn#0``) to the parameters chosen
for that site. `options={"plan": path_or_dict}` applies it; sites missing from it use defaults.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from .config import ConfigError, SPARSITY_METHODS, _number, _per_head, _validate_table

PLAN_SCHEMA_VERSION = 1
PLAN_KIND = "attnopt-plan"
LINEAR_FORMATS = ("none", "w8a8", "fp8", "w4a16")
# calibration tunes topk per head; the config takes one value (a list would be per head there too)
_PLAN_TOPK = _per_head(_number(0, 1, lo_open=True), "a number in (0, 1]")


def _finite_list(path: str, v: Any) -> list[float]:
    if not isinstance(v, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                          and math.isfinite(x) for x in v):
        raise ConfigError(path, "<list>" if isinstance(v, list) else v, "a list of finite numbers")
    return [float(x) for x in v]


def _validate_attention_site(path: str, entry: Mapping) -> dict:
    out = {"kind": "attention"}
    for key, val in entry.items():
        p = f"{path}.{key}"
        if key == "kind":
            continue
        if key == "sparsity":
            if val is None:
                out["sparsity"] = None
                continue
            if not isinstance(val, Mapping) or val.get("method") not in SPARSITY_METHODS:
                raise ConfigError(f"{p}.method", val.get("method") if isinstance(val, Mapping) else val,
                                  " | ".join(repr(m) for m in SPARSITY_METHODS))
            params = {k: x for k, x in val.items() if k not in ("method", "dense_heads")}
            topk = params.pop("topk") if isinstance(params.get("topk"), list) else None
            checked = _validate_table(SPARSITY_METHODS[val["method"]], params, p)
            if topk is not None and "topk" in checked:
                checked["topk"] = _PLAN_TOPK(f"{p}.topk", topk)
            elif topk is not None:
                raise ConfigError(f"{p}.topk", topk, "no topk for method " + repr(val["method"]))
            checked["method"] = val["method"]
            dense = val.get("dense_heads", [])
            if not isinstance(dense, list) or not all(isinstance(h, int) and h >= 0 for h in dense):
                raise ConfigError(f"{p}.dense_heads", dense, "a list of head indices (integers >= 0)")
            checked["dense_heads"] = list(dense)
            out["sparsity"] = checked
        elif key == "dense":
            if not isinstance(val, bool):
                raise ConfigError(p, val, "true | false")
            out["dense"] = val
        elif key in ("error", "stats"):
            out[key] = val  # informational, written by calibrate
        else:
            raise ConfigError(p, val, "one of kind, sparsity, dense, error, stats")
    return out


def _validate_linear_site(path: str, entry: Mapping) -> dict:
    out = {"kind": "linear"}
    for key, val in entry.items():
        p = f"{path}.{key}"
        if key == "kind":
            continue
        if key == "quant":
            if val not in LINEAR_FORMATS:
                raise ConfigError(p, val, " | ".join(repr(f) for f in LINEAR_FORMATS))
            out["quant"] = val
        elif key == "act_absmax":  # per input channel max|x| seen in calibration (for smoothing)
            out["act_absmax"] = _finite_list(p, val)
        elif key in ("error", "stats", "group", "sensitivity"):  # calibration's measurements, kept for reading
            out[key] = val
        else:
            raise ConfigError(p, val, "one of kind, quant, act_absmax, group, error, stats, sensitivity")
    return out


def validate_plan_dict(d: Mapping, path: str = "plan") -> dict:
    """Check a plan dict (as loaded from JSON) and return a normalized copy."""
    version = d.get("schema_version")
    if version != PLAN_SCHEMA_VERSION:
        raise ConfigError(f"{path}.schema_version", version, str(PLAN_SCHEMA_VERSION),
                          "plan written by another attnopt version; re-run attnopt.calibrate")
    sites = d.get("sites", {})
    if not isinstance(sites, Mapping):
        raise ConfigError(f"{path}.sites", sites, "a dict of site key -> parameters")
    out_sites = {}
    for key, entry in sites.items():
        p = f"{path}.sites.{key}"
        if not isinstance(entry, Mapping) or entry.get("kind") not in ("attention", "linear"):
            raise ConfigError(f"{p}.kind", entry.get("kind") if isinstance(entry, Mapping) else entry,
                              "'attention' | 'linear'")
        out_sites[str(key)] = (_validate_attention_site if entry["kind"] == "attention"
                               else _validate_linear_site)(p, entry)
    meta = d.get("meta", {})
    if not isinstance(meta, Mapping):
        raise ConfigError(f"{path}.meta", meta, "a dict")
    return {"schema_version": PLAN_SCHEMA_VERSION, "kind": PLAN_KIND, "sites": out_sites, "meta": dict(meta)}


@dataclass
class Plan:
    """Per-site calibrated parameters. `save()` writes JSON; `Plan.load()` reads and validates it."""

    sites: dict[str, dict] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"schema_version": PLAN_SCHEMA_VERSION, "kind": PLAN_KIND, "sites": self.sites, "meta": self.meta}

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping) -> "Plan":
        v = validate_plan_dict(d)
        return cls(sites=v["sites"], meta=v["meta"])

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def site(self, key: str) -> dict | None:
        return self.sites.get(key)
