"""Calibration plans: per-site parameters chosen by `attnopt.calibrate`, stored as versioned JSON.

A plan never holds code or pickles: it is a dict of site keys (the module path of a site plus
its index inside that module, e.g. ``model.layers.3.self_attn#0``) to the parameters chosen
for that site. `options={"plan": path_or_dict}` applies it; sites missing from it use defaults.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Mapping

# the plan's schema and its validation live in config.py (a plan is an option's value)
from .config import LINEAR_FORMATS, PLAN_KIND, PLAN_SCHEMA_VERSION, validate_plan_dict  # noqa: F401


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
