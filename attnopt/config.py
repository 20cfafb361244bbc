"""The pass-configuration dict: schema, defaults, validation and normalization.

Every key the passes read is declared here once, with its default and what it accepts, so that
a bad value fails before anything is compiled (nothing is half-applied) and the README table can
be generated from the same source. A calibration plan is an option's value, so the plan schema
and its validation are here too (plan.py holds the Plan class that loads and saves one). Normalized options are plain JSON, hashed into the
Inductor cache key of every attnopt pass.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping


class ConfigError(ValueError):
    """A configuration value is invalid. Names the full key path, the value and what is allowed."""

    def __init__(self, path: str, value: Any, allowed: str, hint: str = ""):
        self.path, self.value, self.allowed = path, value, allowed
        msg = f"{path}: got {value!r}; allowed: {allowed}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


# --------------------------------------------------------------------------------------------
# Field specs: each knows its default, how to check a value, and how to describe what it allows.


@dataclass(frozen=True)
class Field:
    default: Any
    check: Callable[[str, Any], Any]  # (path, value) -> normalized value, or raises ConfigError
    allowed: str
    doc: str


def _choice(*values: str) -> Callable[[str, Any], Any]:
    def check(path, v):
        if v not in values:
            raise ConfigError(path, v, " | ".join(repr(x) for x in values))
        return v

    return check


def _bool(path, v):
    if not isinstance(v, bool):
        raise ConfigError(path, v, "true | false")
    return v


def _number(lo=-math.inf, hi=math.inf, integer=False, lo_open=False, allow_none=False):
    kind = "an integer" if integer else "a number"
    left = "(" if lo_open else "["
    rng = f"{kind} in {left}{lo}, {hi}]" if math.isfinite(hi) or math.isfinite(lo) else kind
    if allow_none:
        rng += " or null"

    def check(path, v):
        if v is None and allow_none:
            return None
        ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok_type:
            raise ConfigError(path, v, rng)
        if not (lo < v if lo_open else lo <= v) or not v <= hi or (not integer and math.isnan(v)):
            raise ConfigError(path, v, rng)
        return v if integer else float(v)

    check.allowed = rng
    return check


def _globs(path, v):
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
        raise ConfigError(path, v, "a glob string or a list of glob strings")
    return list(v)


def _per_head(inner: Callable[[str, Any], Any], allowed: str):
    """A value for every head, or one list entry per head (heads indexed from 0)."""

    def check(path, v):
        if isinstance(v, (list, tuple)):
            if not v:
                raise ConfigError(path, v, allowed + ", or a non-empty list of them (one per head)")
            return [inner(f"{path}[{i}]", x) for i, x in enumerate(v)]
        return inner(path, v)

    return check


# --------------------------------------------------------------------------------------------
# Sparse-attention methods (issue: sparse attention). Each method has its own parameter table.

SPARSITY_METHODS: dict[str, dict[str, Field]] = {
    "sparge": {
        "tau": Field(0.9, _per_head(_number(0, 1, lo_open=True), "a number in (0, 1]"),
                     "number in (0, 1] or per-head list",
                     "cumulative mass of pooled attention each q-block row keeps"),
        "theta": Field(0.3, _per_head(_number(-1, 1), "a number in [-1, 1]"),
                       "number in [-1, 1] or per-head list",
                       "block self-similarity below which a block is always kept"),
        "topk": Field(None, _number(0, 1, lo_open=True, allow_none=True), "null or number in (0, 1]",
                      "keep this fraction of kv-blocks per row instead of the tau rule"),
        "pv_threshold": Field(None, _per_head(_number(0, math.inf, allow_none=True), "a number >= 0 or null"),
                              "null, number >= 0 or per-head list",
                              "second stage lambda: skip P.V of tiles whose row maxima trail the running max by more (log2 units)"),
        "sink": Field(True, _bool, "true | false", "always keep the first kv-block"),
    },
    "xattention": {
        "stride": Field(8, _choice(4, 8, 16), "4 | 8 | 16", "antidiagonal stride S"),
        "tau": Field(0.9, _per_head(_number(0, 1, lo_open=True), "a number in (0, 1]"),
                     "number in (0, 1] or per-head list", "block-score mass each row keeps"),
        "pv_threshold": Field(None, _per_head(_number(0, math.inf, allow_none=True), "a number >= 0 or null"),
                              "null, number >= 0 or per-head list", "second stage lambda (log2 units)"),
    },
    "window": {
        "window": Field(None, _per_head(_number(1, math.inf, integer=True, allow_none=True), "an integer >= 1 or null"),
                        "null, integer >= 1 or per-head list", "fixed span in tokens (overrides alpha/beta)"),
        "alpha": Field(0.0, _per_head(_number(0), "a number >= 0"), "number >= 0 or per-head list",
                       "span = alpha + beta * N"),
        "beta": Field(0.25, _per_head(_number(0, 1), "a number in [0, 1]"), "number in [0, 1] or per-head list",
                      "span = alpha + beta * N"),
        "sinks": Field(64, _number(0, math.inf, integer=True), "integer >= 0", "leading tokens always kept"),
        "causal_only": Field(False, _bool, "true | false",
                             "window only looks back (true) or both ways (false, for non-causal sites)"),
    },
    "radial": {
        "frame_tokens": Field(None, _number(1, math.inf, integer=True, allow_none=True),
                              "integer >= 1 (required)", "tokens per video frame"),
        "dense_frames": Field(1, _number(0, math.inf, integer=True), "integer >= 0",
                              "frame distance up to which attention stays dense"),
        "min_band": Field(128, _number(1, math.inf, integer=True), "integer >= 1", "narrowest band in tokens"),
        "prefix_tokens": Field(0, _number(0, math.inf, integer=True), "integer >= 0",
                               "tokens before the first frame (text), attended densely"),
    },
    "block": {
        "mask": Field(None, lambda p, v: v, "nested list of booleans [nq][nk] or [H][nq][nk] (required)",
                      "the kv-blocks each q-block keeps"),
        "block_size": Field(64, _choice(64, 128), "64 | 128", "tokens per block (q and kv)"),
    },
    "svg": {
        "frame_tokens": Field(None, _number(1, math.inf, integer=True, allow_none=True),
                              "integer >= 1 (required)", "tokens per video frame"),
        "spatial_frames": Field(1, _number(0, math.inf, integer=True), "integer >= 0",
                                "frames on each side kept by the spatial pattern"),
        "temporal_tokens": Field(64, _number(1, math.inf, integer=True), "integer >= 1",
                                 "tokens around each position kept by the temporal pattern, per frame"),
        "sample_rows": Field(32, _number(1, math.inf, integer=True), "integer >= 1",
                             "query rows sampled to choose each head's pattern"),
        "prefix_tokens": Field(0, _number(0, math.inf, integer=True), "integer >= 0",
                               "tokens before the first frame (text), attended densely"),
    },
}

# Every method's own parameters, plus these.
for _table in SPARSITY_METHODS.values():
    _table["min_seq_len"] = Field(0, _number(0, math.inf, integer=True), "integer >= 0",
                                  "sites with fewer keys run dense quantized attention instead")

_REQUIRED_SPARSITY_PARAMS = {"radial": ("frame_tokens",), "block": ("mask",), "svg": ("frame_tokens",)}


def _sparsity(path, v):
    if v is None:
        return None
    if not isinstance(v, Mapping):
        raise ConfigError(path, v, "null or a dict with 'method'")
    if "method" not in v:
        raise ConfigError(f"{path}.method", None, " | ".join(repr(m) for m in SPARSITY_METHODS))
    method = v["method"]
    if method not in SPARSITY_METHODS:
        raise ConfigError(f"{path}.method", method, " | ".join(repr(m) for m in SPARSITY_METHODS))
    out = {"method": method}
    params = {k: x for k, x in v.items() if k != "method"}
    out.update(_validate_table(SPARSITY_METHODS[method], params, path))
    for name in _REQUIRED_SPARSITY_PARAMS.get(method, ()):
        if out[name] is None:
            raise ConfigError(f"{path}.{name}", None, SPARSITY_METHODS[method][name].allowed,
                              f"required by method {method!r}")
    if method == "block":
        out["mask"] = _block_mask(f"{path}.mask", out["mask"])
    return out


def _block_mask(path, v):
    def is_bool_matrix(m):
        return (isinstance(m, list) and m and all(isinstance(r, list) and r for r in m)
                and len({len(r) for r in m}) == 1 and all(isinstance(x, bool) for r in m for x in r))

    if hasattr(v, "tolist"):  # a tensor or array given in Python
        v = v.tolist()
    if is_bool_matrix(v) or (isinstance(v, list) and v and all(is_bool_matrix(m) for m in v)
                             and len({(len(m), len(m[0])) for m in v}) == 1):
        return v
    raise ConfigError(path, "<mask>" if isinstance(v, list) else v,
                      "a nested list of booleans [nq][nk] or [H][nq][nk] of one shape")


_SMOOTH_TABLE = {"alpha": Field(0.5, _number(0, 1), "number in [0, 1]", "migration strength")}


def _smooth(path, v):
    if v is None:
        return None
    if not isinstance(v, Mapping):
        raise ConfigError(path, v, "null or {'alpha': number in [0, 1]}")
    return _validate_table(_SMOOTH_TABLE, v, path)


def _plan(path, v):
    if v is None:
        return None
    if isinstance(v, (str, os.PathLike)):
        p = os.fspath(v)
        try:
            with open(p) as f:
                v = json.load(f)
        except OSError as e:
            raise ConfigError(path, p, "null, a plan dict, or the path of a plan JSON file",
                              f"cannot read: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(path, p, "a plan JSON file", f"invalid JSON: {e}") from None
    if hasattr(v, "to_dict"):
        v = v.to_dict()
    if not isinstance(v, Mapping):
        raise ConfigError(path, v, "null, a plan dict, or the path of a plan JSON file")
    return validate_plan_dict(v, path)


ARCHS = ("auto", "sm80", "sm86", "sm89", "sm90", "sm100", "sm120", "cpu")

SCHEMA: dict[str, dict[str, Field] | Field] = {
    "attention": {
        "enabled": Field(True, _bool, "true | false", "rewrite attention sites at all"),
        "quant": Field("int8", _choice("int8", "fp8", "fp4", "none"), "'int8' | 'fp8' | 'fp4' | 'none'",
                       "QK^T format ('fp4': NVFP4, sm100+); 'none' keeps 16-bit QK^T (useful with sparsity only)"),
        "pv": Field("auto", _choice("fp16", "fp8", "fp4", "auto"), "'fp16' | 'fp8' | 'fp4' | 'auto'",
                    "P.V format: 16-bit (the model's fp16/bf16), FP8 e4m3, NVFP4, or the arch default "
                    "('fp4' with quant 'fp4')"),
        "smooth_k": Field(True, _bool, "true | false", "subtract K's token mean before quantizing (exact)"),
        "smooth_q": Field(False, _bool, "true | false",
                          "subtract each Q block's mean and add its QK^T term back before softmax"),
        "sparsity": Field(None, _sparsity, "null or {'method': " + " | ".join(repr(m) for m in SPARSITY_METHODS) + ", ...}",
                          "block-sparse attention (see the sparsity table)"),
        "min_seq_len": Field(128, _number(0, math.inf, integer=True), "integer >= 0",
                             "sites whose key length is shorter stay as they were"),
        "decode": Field(False, _bool, "true | false", "also rewrite sites with one query token (decode)"),
        "allow_fp32": Field(False, _bool, "true | false",
                            "also rewrite fp32 sites (P.V then runs in bf16)"),
        "include": Field(["*"], _globs, "glob or list of globs", "module paths to rewrite"),
        "exclude": Field([], _globs, "glob or list of globs", "module paths to leave alone"),
    },
    "linear": {
        "quant": Field("none", _choice("none", "w8a8", "fp8", "w4a16"), "'none' | 'w8a8' | 'fp8' | 'w4a16'",
                       "linear-layer format"),
        "smooth": Field(None, _smooth, "null or {'alpha': number in [0, 1]}",
                        "SmoothQuant scales folded into the preceding norm / linear (needs a calibrated plan)"),
        "min_m": Field(17, _number(1, math.inf, integer=True), "integer >= 1",
                       "rows below which a linear takes the small-M path or stays as it was"),
        "include": Field(["*"], _globs, "glob or list of globs", "module paths to rewrite"),
        "exclude": Field(["lm_head", "*.lm_head"], _globs, "glob or list of globs",
                         "module paths to leave alone (output heads by default)"),
    },
    "arch": Field("auto", _choice(*ARCHS), " | ".join(repr(a) for a in ARCHS),
                  "target architecture; 'auto' reads the device, 'cpu' forces the reference path"),
    "plan": Field(None, _plan, "null, a plan dict, or a path to a plan JSON file",
                  "calibrated per-site parameters from attnopt.calibrate"),
}


def _leaf_paths() -> list[str]:
    """Every key path a user can set, nested tables included: a key given at the wrong level
    (top-level 'quant') is found under its real parent ('attention.quant')."""
    out = []

    def walk(table, prefix):
        for key, spec in table.items():
            path = f"{prefix}.{key}" if prefix else key
            out.append(path)
            if isinstance(spec, Mapping):
                walk(spec, path)

    walk(SCHEMA, "")
    walk(_SMOOTH_TABLE, "linear.smooth")
    for table in SPARSITY_METHODS.values():
        walk(table, "attention.sparsity")
    return list(dict.fromkeys(out))


def _suggest(key: str, known, path: str = "") -> str:
    """Closest sibling key, and any full path elsewhere whose last part is (or is close to) `key`."""
    siblings = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
    elsewhere = [p for p in _leaf_paths() if p != path and p not in known]
    exact = [p for p in elsewhere if p.rsplit(".", 1)[-1] == key]
    close = [] if siblings or exact else [
        p for p in elsewhere if difflib.get_close_matches(key, [p.rsplit(".", 1)[-1]], cutoff=0.8)]
    names = list(dict.fromkeys(exact + siblings + close))[:3]
    if not names:
        return ""
    return "did you mean " + " or ".join(repr(n) if "." in n or n in known else f"top-level {n!r}"
                                         for n in names) + "?"


def _validate_table(table: Mapping[str, Any], given: Mapping[str, Any], prefix: str) -> dict:
    """Check every key of `given` against `table`; return the table's defaults filled in."""
    if not isinstance(given, Mapping):
        raise ConfigError(prefix or "options", given, "a dict")
    for key in given:
        if key not in table:
            path = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(path, given[key], "one of " + ", ".join(sorted(table)), _suggest(str(key), table, path))
    out = {}
    for key, spec in table.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(spec, Field):
            out[key] = spec.check(path, copy.deepcopy(given[key])) if key in given else copy.deepcopy(spec.default)
        else:
            out[key] = _validate_table(spec, given.get(key, {}) if given.get(key) is not None else {}, path)
    return out


class Options(Mapping):
    """Validated, normalized pass options. Read like a dict (`opts["attention"]["quant"]`)."""

    __slots__ = ("_d", "_json")

    def __init__(self, normalized: dict):
        self._d = normalized
        self._json = json.dumps(normalized, sort_keys=True, separators=(",", ":"))

    def __getitem__(self, k):
        return self._d[k]

    def __iter__(self):
        return iter(self._d)

    def __len__(self):
        return len(self._d)

    def __eq__(self, other):
        return isinstance(other, Options) and other._json == self._json

    def __hash__(self):
        return hash(self._json)

    def __repr__(self):
        return f"Options({self._json})"

    @property
    def attention(self) -> dict:
        return self._d["attention"]

    @property
    def linear(self) -> dict:
        return self._d["linear"]

    def to_dict(self) -> dict:
        return copy.deepcopy(self._d)

    def to_json(self) -> str:
        """Canonical JSON: equal options give equal strings (used in cache keys)."""
        return self._json


def normalize_options(options: Mapping | Options | None = None) -> Options:
    """Validate a user options dict (None = all defaults) and fill in every default."""
    if isinstance(options, Options):
        return options
    if options is None:
        options = {}
    try:
        json.dumps(options, default=_json_default)
    except (TypeError, ValueError) as e:
        raise ConfigError("options", options, "a JSON-compatible dict", str(e)) from None
    out = _validate_table(SCHEMA, options, "")
    a = out["attention"]
    if a["smooth_q"] and a["sparsity"] is not None:
        raise ConfigError("attention.smooth_q", True, "false when attention.sparsity is set",
                          "the block-sparse kernels do not apply Q smoothing")
    return Options(out)


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"{type(o).__name__} is not JSON-compatible")


def default_options() -> dict:
    """All defaults, as a plain dict."""
    return normalize_options(None).to_dict()


def schema_rows() -> list[tuple[str, str, str, str]]:
    """(key, default, allowed, meaning) for every option: the README table is made from these."""
    rows = []

    def walk(table, prefix):
        for key, spec in table.items():
            path = f"{prefix}.{key}" if prefix else key
            if isinstance(spec, Field):
                rows.append((path, json.dumps(spec.default), spec.allowed, spec.doc))
            else:
                walk(spec, path)

    walk(SCHEMA, "")
    return rows


def schema_markdown() -> str:
    """The README's option tables, generated from the schema (a test keeps them in sync)."""
    lines = ["| key | default | allowed | meaning |", "| --- | --- | --- | --- |"]
    def esc(t: str) -> str:
        return t.replace("|", "\\|")

    lines += [f"| `{k}` | `{d}` | {esc(a)} | {esc(m)} |" for k, d, a, m in schema_rows()]
    lines += ["", "Sparsity methods (`attention.sparsity = {\"method\": ..., <parameters>}`):", "",
              "| method | parameter | default | allowed | meaning |", "| --- | --- | --- | --- | --- |"]
    for method, table in SPARSITY_METHODS.items():
        for name, f in table.items():
            lines.append(f"| `{method}` | `{name}` | `{json.dumps(f.default)}` | {esc(f.allowed)} | {esc(f.doc)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(schema_markdown())


# ----------------------------------------------------------------- plans (plan.py holds the Plan class)

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
