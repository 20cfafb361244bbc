"""What attnopt did to a model: one record per candidate site, plus a summary.

`attnopt.inspect` returns a `Report`; the inspection tool renders it (table, JSON, HTML).
`Report.to_dict()` is JSON-safe and versioned by REPORT_SCHEMA_VERSION.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

REPORT_SCHEMA_VERSION = 1


def _jsonable(x: Any) -> Any:
    """SymInts and other objects -> str; non-finite floats -> None (JSON has no NaN)."""
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return str(x)


@dataclass
class SiteRecord:
    kind: str  # "attention" | "linear" | "norm"
    module: str  # dotted module path in the user's model
    key: str  # module path + '#' + index inside that module (+ '@g<n>' if another graph has it)
    status: str  # "rewritten" | "skipped"
    reason: str | None = None  # why skipped
    op: str | None = None  # the op that runs there now
    kernel: str | None = None  # kernel variant (arch, formats, tile)
    pattern: str = ""  # what the matcher recognized
    shapes: dict = field(default_factory=dict)
    dtype: str = ""
    details: dict = field(default_factory=dict)  # causal, masks, gqa, scale, formats...
    source: str = ""  # user's source line
    flops: int | None = None
    graph: int = 0  # which compiled graph (graph breaks split a model into several)
    error: dict | None = None  # {rel_l1, cos, max_abs, rmse, baseline_rel_l1} measured by inspect
    timing: dict | None = None  # {original_ms, rewritten_ms, speedup, runs} measured by inspect
    module_type: str = ""

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))


def _dynamo_frame():
    """The Dynamo frame being compiled (recompiles of one frame share it), or None outside Dynamo."""
    try:
        from torch._guards import CompileContext

        cid = CompileContext.current_compile_id()
    except ImportError:
        return None
    return None if cid is None else cid.frame_id


class Recorder:
    """Collects site records from the passes (compile time) and errors from probes (run time).

    Site keys are unique per recorder: a key already recorded by another Dynamo frame (two
    top-level attention calls split by a graph break are both `#0`) gets the frame's ordinal,
    `#0@g1`. Recompiles of one frame keep their keys, so the common single-graph case, and plans
    keyed by it, never see a suffix.
    """

    def __init__(self):
        self._lock = threading.RLock()
        self.graphs: list[dict] = []  # per compiled graph: {"index", "sites", "pass_time_s", ...}
        self._by_key: dict[str, SiteRecord] = {}
        self._owner: dict[str, Any] = {}  # site key -> Dynamo frame that recorded it
        self._frames: list = []  # distinct Dynamo frames, in order of first compile

    def new_graph(self) -> int:
        frame = _dynamo_frame()
        with self._lock:
            if frame is not None and frame not in self._frames:
                self._frames.append(frame)
            ordinal = self._frames.index(frame) if frame is not None else 0
            self.graphs.append({"index": len(self.graphs), "sites": [], "pass_time_s": {}, "frame": frame,
                                "ordinal": ordinal})
            return len(self.graphs) - 1

    def claim(self, graph: int, key: str) -> str:
        """`key`, or `key@g<ordinal>` when another frame of this recorder already recorded `key`."""
        with self._lock:
            frame = self.graphs[graph]["frame"]
            owner = self._owner.setdefault(key, frame)
            if owner == frame or owner is None or frame is None:
                return key
            unique = f"{key}@g{self.graphs[graph]['ordinal']}"
            self._owner.setdefault(unique, frame)
            return unique

    def add_site(self, graph: int, rec: SiteRecord) -> None:
        with self._lock:
            rec.graph = graph
            self.graphs[graph]["sites"].append(rec)
            self._by_key[rec.key] = rec

    def drop_sites(self, graph: int, kind: str) -> None:
        """Forget a graph's records of one kind: its compile is being done again."""
        with self._lock:
            g = self.graphs[graph]
            g["sites"] = [r for r in g["sites"] if r.kind != kind]

    def add_pass_time(self, graph: int, name: str, seconds: float) -> None:
        with self._lock:
            t = self.graphs[graph]["pass_time_s"]
            t[name] = t.get(name, 0.0) + seconds

    def set_snapshot(self, graph: int, which: str, nodes: list) -> None:
        with self._lock:
            self.graphs[graph][which] = nodes

    def snapshots(self) -> list[dict]:
        """[{"index", "before", "after"}] for graphs captured with capture_graphs."""
        with self._lock:
            return [{"index": g["index"], "before": g.get("before"), "after": g.get("after")}
                    for g in self.graphs if "before" in g]

    def add_note(self, graph: int | None, note: str) -> None:
        """Something about a whole graph the user should see (e.g. why nothing in it was captured)."""
        if graph is None:
            return
        with self._lock:
            self.graphs[graph].setdefault("notes", []).append(note)

    def set_served(self, graph: int | None, served: str) -> None:
        """How compile_fx produced the graph's code: 'compiled' or 'cache' (Inductor's caches)."""
        if graph is None:
            return
        with self._lock:
            self.graphs[graph]["served"] = served

    def set_captured(self, graph: int | None, how: str) -> None:
        """How the graph's aten form and site records were made: 'traced' or 'cache' (capture
        cache); graphs with no attention candidate are not traced ('none')."""
        if graph is None:
            return
        with self._lock:
            self.graphs[graph]["captured"] = how

    def cache_report(self) -> list[dict]:
        """How each graph got its code: compiled by Inductor, or served from its caches (`served`),
        and whether its capture was traced, rebuilt from attnopt's capture cache, or not needed
        (`captured`: 'traced' | 'cache' | 'none').
        The site records are the same either way."""
        with self._lock:
            return [{"graph": g["index"], "served": g.get("served", "compiled"),
                     "captured": g.get("captured", "none")} for g in self.graphs]

    def set_error(self, key: str, metrics: dict) -> None:
        with self._lock:
            rec = self._by_key.get(key)
            if rec is not None:
                m = dict(metrics)
                if "sparsity" in m:
                    rec.details["sparsity"] = m.pop("sparsity")
                rec.error = m

    def set_timing(self, key: str, timing: dict) -> None:
        with self._lock:
            rec = self._by_key.get(key)
            if rec is not None:
                rec.timing = dict(timing)

    def sites(self) -> list[SiteRecord]:
        """Latest record per site key (a recompile for new shapes re-records the same sites)."""
        with self._lock:
            seen: dict[str, SiteRecord] = {}
            for g in self.graphs:
                for r in g["sites"]:
                    seen[r.key] = r
            return list(seen.values())

    def pass_time(self) -> float:
        return sum(sum(g["pass_time_s"].values()) for g in self.graphs)


@dataclass
class Report:
    sites: list[SiteRecord]
    summary: dict
    options: dict
    env: dict
    graphs: list = field(default_factory=list)  # before/after snapshots (not in to_dict)

    def to_dict(self) -> dict:
        return {
            "schema_version": REPORT_SCHEMA_VERSION,
            "sites": [s.to_dict() for s in self.sites],
            "summary": _jsonable(self.summary),
            "options": _jsonable(self.options),
            "env": _jsonable(self.env),
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save_json(self, path) -> None:
        with open(path, "w") as f:
            f.write(self.to_json())

    @property
    def plan_meta(self) -> dict:
        """The applied calibration plan's meta (its front, budget, errors: calibrate writes them),
        from the options the model was compiled with; {} without a plan."""
        plan = (self.options or {}).get("plan")
        meta = plan.get("meta") if isinstance(plan, dict) else None
        return meta if isinstance(meta, dict) else {}

    def rewritten(self, kind: str | None = None) -> list[SiteRecord]:
        return [s for s in self.sites if s.status == "rewritten" and (kind is None or s.kind == kind)]

    def skipped(self, kind: str | None = None) -> list[SiteRecord]:
        return [s for s in self.sites if s.status != "rewritten" and (kind is None or s.kind == kind)]

    def __str__(self) -> str:
        from .inspection.table import render_table

        return render_table(self)

    def __repr__(self) -> str:
        return (f"Report({len(self.rewritten())}/{len(self.sites)} sites rewritten, "
                f"e2e rel_l1={self.summary.get('e2e', {}).get('rel_l1')})")
