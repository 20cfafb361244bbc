"""Pass options: frozen, typed option classes, and the schema that defaults, validates and documents them.

`normalize_options(dict)` checks a user's options dict and returns an `Options`, which the passes
read by attribute: `opts.attention.quant`, `opts.attention.sparsity.method`, `opts.linear.min_m`,
`opts.arch`, `opts.plan`. The classes, all frozen dataclasses:

- `Options`: the top level (`attention`, `linear`, `arch`, `on_cpu`, `plan`);
- `AttentionOptions` (`attention.*`), whose `sparsity` is None or a `SparsityOptions`: one class
  per sparse method (`SpargeOptions`, ... listed in `SPARSITY_METHODS`), each with its `method`,
  and whose `kv_cache` is None or a `KvCacheOptions` (read by AttnoptCache, not by the passes);
- `LinearOptions` (`linear.*`), whose `smooth` is None or a `SmoothOptions`;
- `PlanOptions`: a validated calibration plan, read-only (plan.py holds the `Plan` class that
  calibrate returns and that loads and saves plan files).

Every key is declared once, as a dataclass field: its default is the field's, and its metadata
holds how a value is checked (`check`), what is allowed (`allowed`) and what it means (`doc`). The
same fields drive validation (a `ConfigError` naming the key path, the value and what is allowed,
with the closest key suggested for an unknown one), the README's option tables
(`python -m attnopt.config` prints them) and the CLI's option help. Constructing any of the
classes checks its values too, so a bad value fails before anything is compiled.

Options are immutable and hashable: lists are tuples inside (plan entries read-only mappings);
`to_dict()` gives plain JSON (lists) back, and `to_json()` is canonical (equal options, equal
strings): it is hashed into the Inductor cache key of every attnopt pass. A calibration plan is an
option's value, so the plan schema and its validation are here too.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from collections import abc
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any, Callable, ClassVar, Iterator, Mapping


class ConfigError(ValueError):
    """A configuration value is invalid. Names the full key path, the value and what is allowed."""

    def __init__(self, path: str, value: Any, allowed: str, hint: str = ""):
        self.path, self.value, self.allowed, self.hint = path, value, allowed, hint
        msg = f"{path}: got {value!r}; allowed: {allowed}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


# --------------------------------------------------------------------------------------------
# Immutable values: lists become tuples, dicts read-only mappings; to_dict() turns them back.


class FrozenDict(Mapping):
    """A read-only dict (plan entries inside `PlanOptions`): hashable, picklable, no mutation."""

    __slots__ = ("_d",)

    def __init__(self, items: Mapping | None = None):
        self._d = dict(items or {})

    def __getitem__(self, key):
        return self._d[key]

    def __iter__(self) -> Iterator:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __hash__(self):
        return hash(tuple(self._d.items()))

    def __repr__(self):
        return f"FrozenDict({self._d!r})"


_SCALARS = frozenset({str, int, float, bool, type(None)})  # (a plan holds millions of numbers: test these first)


def _freeze(v):
    if type(v) in _SCALARS:
        return v
    if isinstance(v, (list, tuple)):
        return tuple([_freeze(x) for x in v])
    if isinstance(v, abc.Mapping):
        return FrozenDict({k: _freeze(x) for k, x in v.items()})
    return v


def _thaw(v):
    """Lists for tuples and dicts for mappings, all the way down (a fresh copy: values a check
    sees and to_dict() returns never alias the options' own or the caller's)."""
    if type(v) in _SCALARS:
        return v
    if isinstance(v, (list, tuple)):
        return [_thaw(x) for x in v]
    if isinstance(v, abc.Mapping):
        return {k: _thaw(x) for k, x in v.items()}
    return v


# --------------------------------------------------------------------------------------------
# Field specs: each option is a dataclass field whose metadata knows how to check a value and how
# to describe what it allows.


def option(default: Any, check: Callable[[str, Any], Any], allowed: str, doc: str) -> Any:
    """One option key as a dataclass field: `check(path, value)` returns the normalized value or
    raises ConfigError; `allowed` and `doc` are what the README table and the CLI help show."""
    return dataclasses.field(default=_freeze(default), metadata={"check": check, "allowed": allowed, "doc": doc})


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


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
# The option tables. A table's fields are its keys; constructing one checks every value.


class _Table:
    """Base of the option classes: frozen dataclasses whose fields are declared with `option()`.
    `_path` is where the table sits in the options ('attention', 'linear.smooth', ...)."""

    _path: ClassVar[str] = ""

    def __post_init__(self):
        values = {f.name: f.metadata["check"](_join(self._path, f.name), _thaw(getattr(self, f.name)))
                  for f in fields(self)}
        for name, v in self._finish(values).items():
            object.__setattr__(self, name, _freeze(v))

    def _finish(self, values: dict) -> dict:
        """Checks across fields, after each field's own check (plain values: lists, dicts)."""
        return values

    @classmethod
    def from_dict(cls, given: Mapping | None):
        """The table from a user's dict (unknown keys raise ConfigError, missing ones default)."""
        return cls(**_known_keys(cls, {} if given is None else given, cls._path))

    def to_dict(self) -> dict:
        """Plain JSON values: lists, dicts, None for an unset sub-table."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


def _plain(v):
    return v.to_dict() if isinstance(v, (_Table, PlanOptions)) else _thaw(v)


def _known_keys(cls, given: Any, prefix: str) -> dict:
    """`given` as keyword arguments of `cls`; a key that is not one of its fields raises
    ConfigError with the closest key suggested."""
    if not isinstance(given, Mapping):
        raise ConfigError(prefix or "options", given, "a dict")
    names = [f.name for f in fields(cls)]
    for key in given:
        if key not in names:
            path = _join(prefix, str(key))
            raise ConfigError(path, given[key], "one of " + ", ".join(sorted(names)), _suggest(str(key), names, path))
    return {str(k): v for k, v in given.items()}


def _checked_values(cls, given: Mapping, prefix: str) -> dict:
    """`given` checked against `cls`'s fields under `prefix`, defaults filled in, as plain values
    (no object made: the plan's per-site entries, which allow more than the options do)."""
    given = _known_keys(cls, given, prefix)
    return {f.name: f.metadata["check"](_join(prefix, f.name), _thaw(given[f.name])) if f.name in given
            else _thaw(f.default) for f in fields(cls)}


def _table_field(cls, doc: str) -> Any:
    """A nested table (`attention`, `linear`): a dict of its keys, or null for all defaults."""

    def check(path, v):
        if v is None:
            return cls()
        if isinstance(v, cls):
            return v
        return cls.from_dict(v)

    return dataclasses.field(default=cls(), metadata={"check": check, "allowed": "a dict", "doc": doc, "table": cls})


# Sparse-attention methods (issue: sparse attention). Each method has its own class of parameters.


def _min_seq_len() -> Any:
    """Every sparse method's last parameter."""
    return option(0, _number(0, math.inf, integer=True), "integer >= 0",
                  "sites with fewer keys run dense quantized attention instead")


class SparsityOptions(_Table):
    """Base of the sparse methods' parameter classes (`attention.sparsity`); `method` names the
    method, and `to_dict()` includes it: {"method": ..., <parameters>}."""

    method: ClassVar[str] = ""
    _path: ClassVar[str] = "attention.sparsity"
    _required: ClassVar[tuple[str, ...]] = ()  # parameters that have no default

    def _finish(self, values: dict) -> dict:
        for name in self._required:
            if values[name] is None:
                spec = next(f for f in fields(self) if f.name == name)
                raise ConfigError(f"{self._path}.{name}", None, spec.metadata["allowed"],
                                  f"required by method {self.method!r}")
        return values

    def to_dict(self) -> dict:
        return {"method": self.method, **super().to_dict()}


@dataclass(frozen=True)
class SpargeOptions(SparsityOptions):
    """SpargeAttn: keep the kv-blocks holding most of each q-block's pooled attention mass."""

    method: ClassVar[str] = "sparge"
    tau: float | tuple[float, ...] = option(0.9, _per_head(_number(0, 1, lo_open=True), "a number in (0, 1]"),
                                            "number in (0, 1] or per-head list",
                                            "cumulative mass of pooled attention each q-block row keeps")
    theta: float | tuple[float, ...] = option(0.3, _per_head(_number(-1, 1), "a number in [-1, 1]"),
                                              "number in [-1, 1] or per-head list",
                                              "block self-similarity below which a block is always kept")
    topk: float | None = option(None, _number(0, 1, lo_open=True, allow_none=True), "null or number in (0, 1]",
                                "keep this fraction of kv-blocks per row instead of the tau rule")
    pv_threshold: float | None | tuple[float | None, ...] = option(
        None, _per_head(_number(0, math.inf, allow_none=True), "a number >= 0 or null"),
        "null, number >= 0 or per-head list",
        "second stage lambda: skip P.V of tiles whose row maxima trail the running max by more (log2 units)")
    sink: bool = option(True, _bool, "true | false", "always keep the first kv-block")
    local_keys: int = option(0, _number(0, math.inf, integer=True), "integer >= 0",
                             "also always keep the kv-blocks holding this many keys before each q-block's "
                             "first row (local heads' first rows need them)")
    min_seq_len: int = _min_seq_len()


@dataclass(frozen=True)
class XAttentionOptions(SparsityOptions):
    """XAttention: keep the kv-blocks with the most antidiagonal score mass."""

    method: ClassVar[str] = "xattention"
    stride: int = option(8, _choice(4, 8, 16), "4 | 8 | 16", "antidiagonal stride S")
    tau: float | tuple[float, ...] = option(0.9, _per_head(_number(0, 1, lo_open=True), "a number in (0, 1]"),
                                            "number in (0, 1] or per-head list", "block-score mass each row keeps")
    pv_threshold: float | None | tuple[float | None, ...] = option(
        None, _per_head(_number(0, math.inf, allow_none=True), "a number >= 0 or null"),
        "null, number >= 0 or per-head list", "second stage lambda (log2 units)")
    local_keys: int = option(0, _number(0, math.inf, integer=True), "integer >= 0",
                             "also always keep the kv-blocks holding this many keys before each q-block's "
                             "first row (local heads' first rows need them)")
    min_seq_len: int = _min_seq_len()


@dataclass(frozen=True)
class WindowOptions(SparsityOptions):
    """A sliding window of keys around each query, plus leading sink tokens."""

    method: ClassVar[str] = "window"
    window: int | None | tuple[int | None, ...] = option(
        None, _per_head(_number(1, math.inf, integer=True, allow_none=True), "an integer >= 1 or null"),
        "null, integer >= 1 or per-head list", "fixed span in tokens (overrides alpha/beta)")
    alpha: float | tuple[float, ...] = option(0.0, _per_head(_number(0), "a number >= 0"),
                                              "number >= 0 or per-head list", "span = alpha + beta * N")
    beta: float | tuple[float, ...] = option(0.25, _per_head(_number(0, 1), "a number in [0, 1]"),
                                             "number in [0, 1] or per-head list", "span = alpha + beta * N")
    sinks: int = option(64, _number(0, math.inf, integer=True), "integer >= 0", "leading tokens always kept")
    causal_only: bool = option(False, _bool, "true | false",
                               "window only looks back (true) or both ways (false, for non-causal sites)")
    min_seq_len: int = _min_seq_len()


@dataclass(frozen=True)
class RadialOptions(SparsityOptions):
    """Radial attention for video: dense between near frames, banded further away."""

    method: ClassVar[str] = "radial"
    _required: ClassVar[tuple[str, ...]] = ("frame_tokens",)
    frame_tokens: int | None = option(None, _number(1, math.inf, integer=True, allow_none=True),
                               "integer >= 1 (required)", "tokens per video frame")
    dense_frames: int = option(1, _number(0, math.inf, integer=True), "integer >= 0",
                               "frame distance up to which attention stays dense")
    min_band: int = option(128, _number(1, math.inf, integer=True), "integer >= 1", "narrowest band in tokens")
    prefix_tokens: int = option(0, _number(0, math.inf, integer=True), "integer >= 0",
                                "tokens before the first frame (text), attended densely")
    min_seq_len: int = _min_seq_len()


@dataclass(frozen=True)
class BlockOptions(SparsityOptions):
    """A user-given block mask: which kv-blocks each q-block keeps."""

    method: ClassVar[str] = "block"
    _required: ClassVar[tuple[str, ...]] = ("mask",)
    mask: tuple | None = option(None, lambda p, v: v, "nested list of booleans [nq][nk] or [H][nq][nk] (required)",
                         "the kv-blocks each q-block keeps")
    block_size: int = option(64, _choice(64, 128), "64 | 128", "tokens per block (q and kv)")
    min_seq_len: int = _min_seq_len()

    def _finish(self, values: dict) -> dict:
        values = super()._finish(values)
        values["mask"] = _block_mask(f"{self._path}.mask", values["mask"])
        return values


@dataclass(frozen=True)
class SvgOptions(SparsityOptions):
    """Sparse VideoGen: per head, a spatial (same frame) or a temporal (same position) pattern."""

    method: ClassVar[str] = "svg"
    _required: ClassVar[tuple[str, ...]] = ("frame_tokens",)
    frame_tokens: int | None = option(None, _number(1, math.inf, integer=True, allow_none=True),
                               "integer >= 1 (required)", "tokens per video frame")
    spatial_frames: int = option(1, _number(0, math.inf, integer=True), "integer >= 0",
                                 "frames on each side kept by the spatial pattern")
    temporal_tokens: int = option(64, _number(1, math.inf, integer=True), "integer >= 1",
                                  "tokens around each position kept by the temporal pattern, per frame")
    sample_rows: int = option(32, _number(1, math.inf, integer=True), "integer >= 1",
                              "query rows sampled to choose each head's pattern")
    prefix_tokens: int = option(0, _number(0, math.inf, integer=True), "integer >= 0",
                                "tokens before the first frame (text), attended densely")
    min_seq_len: int = _min_seq_len()


@dataclass(frozen=True)
class Svg2Options(SparsityOptions):
    """Sparse VideoGen2: per head, k-means clusters of queries and of keys (warm-started from the
    site's previous call), tokens permuted so each cluster is contiguous, cluster pairs kept by
    top-p of the centroid-estimated attention mass (docs/algorithms.md#svg2)."""

    method: ClassVar[str] = "svg2"
    q_clusters: int = option(100, _number(1, math.inf, integer=True), "integer >= 1",
                             "k-means clusters of the query tokens, per head")
    k_clusters: int = option(500, _number(1, math.inf, integer=True), "integer >= 1",
                             "k-means clusters of the key tokens, per head")
    top_p: float | tuple[float, ...] = option(0.9, _per_head(_number(0, 1, lo_open=True), "a number in (0, 1]"),
                                              "number in (0, 1] or per-head list",
                                              "centroid-estimated attention mass each query cluster keeps")
    min_key_share: float = option(0.1, _number(0, 1), "number in [0, 1]",
                                  "share of the key clusters each query cluster keeps at least")
    init_iters: int = option(50, _number(0, math.inf, integer=True), "integer >= 0",
                             "k-means iterations without centroids to start from (a site's first call)")
    warm_iters: int = option(2, _number(0, math.inf, integer=True), "integer >= 0",
                             "k-means iterations from the site's previous centroids")
    min_seq_len: int = _min_seq_len()


def _vsa_topk(path, v):
    """VSA's top-k: an integer >= 1 counts key tiles, a number in (0, 1] is a share of them."""
    allowed = "an integer >= 1 (key tiles) or a number in (0, 1] (share of the key tiles)"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(path, v, allowed)
    if isinstance(v, int):
        if v < 1:
            raise ConfigError(path, v, allowed)
        return v
    if not 0.0 < v <= 1.0:
        raise ConfigError(path, v, allowed)
    return float(v)


def _multiple_of_64(path, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 64 or v % 64:
        raise ConfigError(path, v, "an integer multiple of 64 (the sparse kernel's kv-block)")
    return v


@dataclass(frozen=True)
class VsaOptions(SparsityOptions):
    """Video Sparse Attention: mean-pooled tiles, coarse attention between them, the top-k key
    tiles per query tile; the fine attention runs inside the kept tiles only (no gate, no coarse
    output: docs/algorithms.md#vsa). Trainable through attnopt.ops.sparse_train."""

    method: ClassVar[str] = "vsa"
    tile: int = option(64, _multiple_of_64, "integer multiple of 64",
                       "tokens per key tile (query tiles are the kernel's q-blocks of 128 rows)")
    topk: int | float | tuple = option(0.25, _per_head(_vsa_topk, "an integer >= 1 or a number in (0, 1]"),
                                      "integer >= 1, number in (0, 1] or per-head list",
                                      "key tiles each query tile keeps: a count (integer) or a share of its "
                                      "visible tiles (number), besides its diagonal tiles")
    diagonal: bool = option(True, _bool, "true | false",
                            "always keep the tiles crossing each query tile's diagonal on self-attention "
                            "sites (causal sites always do: a row could otherwise see no kept key)")
    min_seq_len: int = _min_seq_len()


SPARSITY_METHODS: dict[str, type[SparsityOptions]] = {
    cls.method: cls
    for cls in (SpargeOptions, XAttentionOptions, WindowOptions, RadialOptions, BlockOptions, SvgOptions,
                Svg2Options, VsaOptions)
}
_METHOD_NAMES = " | ".join(repr(m) for m in SPARSITY_METHODS)


def _sparsity(path, v):
    if v is None or isinstance(v, SparsityOptions):
        return v
    if not isinstance(v, Mapping):
        raise ConfigError(path, v, "null or a dict with 'method'")
    if "method" not in v:
        raise ConfigError(f"{path}.method", None, _METHOD_NAMES)
    method = v["method"]
    if method not in SPARSITY_METHODS:
        raise ConfigError(f"{path}.method", method, _METHOD_NAMES)
    return SPARSITY_METHODS[method].from_dict({k: x for k, x in v.items() if k != "method"})


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



@dataclass(frozen=True)
class SmoothOptions(_Table):
    """`linear.smooth`: SmoothQuant."""

    _path: ClassVar[str] = "linear.smooth"
    alpha: float = option(0.5, _number(0, 1), "number in [0, 1]", "migration strength")


def _smooth(path, v):
    if v is None or isinstance(v, SmoothOptions):
        return v
    if not isinstance(v, Mapping):
        raise ConfigError(path, v, "null or {'alpha': number in [0, 1]}")
    return SmoothOptions.from_dict(v)


@dataclass(frozen=True)
class KvCacheOptions(_Table):
    """`attention.kv_cache`: the quantized KV cache for generation (integrations.transformers.AttnoptCache)."""

    _path: ClassVar[str] = "attention.kv_cache"
    quant: str = option("int8", _choice("int8", "int4", "int4+int8"), "'int8' | 'int4' | 'int4+int8'",
                        "K / V code width ('int4+int8': 8-bit codes stored as two nibble planes, a draft reads "
                        "the upper one only)")
    group: int = option(64, _choice(32, 64, 128), "32 | 64 | 128",
                        "tokens per K scale (per channel), channels per V scale (per token)")
    residual: int = option(128, _number(32, math.inf, integer=True), "integer multiple of group",
                           "most recent tokens kept in 16 bits")

    def _finish(self, values: dict) -> dict:
        if values["residual"] % values["group"]:
            raise ConfigError("attention.kv_cache.residual", values["residual"],
                              f"an integer multiple of group ({values['group']})")
        return values


def _kv_cache(path, v):
    if v is None or isinstance(v, KvCacheOptions):
        return v
    if not isinstance(v, Mapping):
        raise ConfigError(path, v, "null or {'quant': 'int8' | 'int4' | 'int4+int8', 'group': ..., 'residual': ...}")
    return KvCacheOptions.from_dict(v)


@dataclass(frozen=True, eq=False)
class PlanOptions:
    """A validated calibration plan as the passes read it. `sites`: site key -> its entry,
    read-only (lists are tuples); `site(key)` gives one entry as a plain dict, `to_dict()` the
    plan's JSON. Constructing one validates it (attnopt.plan.Plan is the mutable, savable form)."""

    sites: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=FrozenDict)
    meta: Mapping[str, Any] = dataclasses.field(default_factory=FrozenDict)

    def __post_init__(self):
        self._set(validate_plan_dict({"schema_version": PLAN_SCHEMA_VERSION, "sites": _thaw(self.sites),
                                      "meta": _thaw(self.meta)}))

    def _set(self, checked: dict) -> None:
        object.__setattr__(self, "sites", _freeze(checked["sites"]))
        object.__setattr__(self, "meta", _freeze(checked["meta"]))

    @classmethod
    def from_dict(cls, d: Mapping, path: str = "plan") -> PlanOptions:
        """A plan dict (as loaded from JSON, schema_version included), validated once."""
        self = object.__new__(cls)
        self._set(validate_plan_dict(d, path))
        return self

    def site(self, key: str) -> dict | None:
        entry = self.sites.get(key)
        return None if entry is None else _thaw(entry)

    def to_dict(self) -> dict:
        return {"schema_version": PLAN_SCHEMA_VERSION, "kind": PLAN_KIND, "sites": _thaw(self.sites),
                "meta": _thaw(self.meta)}

    @cached_property
    def _json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def __eq__(self, other):
        return isinstance(other, PlanOptions) and other._json == self._json

    def __hash__(self):
        return hash(self._json)


def _plan(path, v):
    if v is None or isinstance(v, PlanOptions):
        return v
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
    return PlanOptions.from_dict(v, path)


ARCHS = ("auto", "sm80", "sm86", "sm89", "sm90", "sm100", "sm120", "cpu")

# what a schedule entry's `use` may set: the choices a compiled site can switch between at run time
SCHEDULE_USE_KEYS = ("quant", "pv", "smooth_k", "smooth_q", "sparsity")


def _step_range(path, v):
    allowed = ("[lo, hi] with lo < hi: two integers >= 0 (step indices) or two numbers in [0, 1] "
               "(fractions of the run), half-open")
    if not isinstance(v, (list, tuple)) or len(v) != 2 or any(isinstance(x, bool) or not isinstance(x, (int, float))
                                                            for x in v):
        raise ConfigError(path, v, allowed)
    lo, hi = v
    if isinstance(lo, int) and isinstance(hi, int):
        if not 0 <= lo < hi:
            raise ConfigError(path, v, allowed)
        return [lo, hi]
    if not (0.0 <= lo < hi <= 1.0) or math.isnan(lo) or math.isnan(hi):
        raise ConfigError(path, v, allowed)
    return [float(lo), float(hi)]


def _schedule(path, v):
    """`attention.schedule`: a list of {steps, include, use} entries (attnopt.schedule)."""
    if not isinstance(v, (list, tuple)):
        raise ConfigError(path, v, "a list of {'steps': [lo, hi], 'include': globs, 'use': {...}}")
    fields_by_name = {f.name: f for f in fields(AttentionOptions)}
    out = []
    for n, entry in enumerate(v):
        at = f"{path}[{n}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(at, entry, "a dict with 'steps', 'use' and optionally 'include'")
        for key in entry:
            if key not in ("steps", "include", "use"):
                raise ConfigError(f"{at}.{key}", entry[key], "one of include, steps, use")
        for key in ("steps", "use"):
            if key not in entry:
                raise ConfigError(f"{at}.{key}", None, "required")
        use = entry["use"]
        if not isinstance(use, Mapping):
            raise ConfigError(f"{at}.use", use, "a dict of " + ", ".join(SCHEDULE_USE_KEYS))
        checked = {}
        for key, x in use.items():
            if key not in SCHEDULE_USE_KEYS:
                raise ConfigError(f"{at}.use.{key}", x, "one of " + ", ".join(SCHEDULE_USE_KEYS),
                                  _suggest(str(key), SCHEDULE_USE_KEYS, f"{at}.use.{key}"))
            val = fields_by_name[key].metadata["check"](f"{at}.use.{key}", _thaw(x))
            checked[key] = val.to_dict() if isinstance(val, SparsityOptions) else val
        out.append({"steps": _step_range(f"{at}.steps", _thaw(entry["steps"])),
                    "include": _globs(f"{at}.include", _thaw(entry.get("include", ["*"]))),
                    "use": checked})
    return out


@dataclass(frozen=True)
class AttentionOptions(_Table):
    """`attention.*`: which attention sites are rewritten, and into what."""

    _path: ClassVar[str] = "attention"
    enabled: bool = option(True, _bool, "true | false", "rewrite attention sites at all")
    quant: str = option("int8", _choice("int8", "fp8", "fp4", "none"), "'int8' | 'fp8' | 'fp4' | 'none'",
                        "QK^T format ('fp4': NVFP4, sm100+); 'none' keeps 16-bit QK^T (useful with sparsity only)")
    pv: str = option("auto", _choice("fp16", "fp8", "fp4", "fp8_acc16", "auto"),
                     "'fp16' | 'fp8' | 'fp4' | 'fp8_acc16' | 'auto'",
                     "P.V format: 16-bit (the model's fp16/bf16), FP8 e4m3, NVFP4, FP8 with FP16 "
                     "accumulation per key tile (sm89 / sm120, SageAttention2++), or the arch default "
                     "('fp4' with quant 'fp4')")
    smooth_k: bool = option(True, _bool, "true | false", "subtract K's token mean before quantizing (exact)")
    smooth_q: bool = option(False, _bool, "true | false",
                            "subtract each Q block's mean and add its QK^T term back before softmax")
    sparsity: SparsityOptions | None = option(None, _sparsity, "null or {'method': " + _METHOD_NAMES + ", ...}",
                                              "block-sparse attention (see the sparsity table)")
    min_seq_len: int = option(128, _number(0, math.inf, integer=True), "integer >= 0",
                              "sites whose key length is shorter stay as they were")
    decode: bool = option(False, _bool, "true | false", "also rewrite sites with one query token (decode)")
    allow_fp32: bool = option(False, _bool, "true | false", "also rewrite fp32 sites (P.V then runs in bf16)")
    kv_cache: KvCacheOptions | None = option(
        None, _kv_cache, "null or {'quant': 'int8' | 'int4' | 'int4+int8', 'group': ..., 'residual': ...}",
        "quantized KV cache for generation: AttnoptCache.from_options (README 'Generation')")
    backward: str = option("int8", _choice("int8", "exact", "off"), "'int8' | 'exact' | 'off'",
                           "in graphs that need grad: 'int8' runs the backward's matmuls in INT8 except "
                           "dO.V^T (SageBwd), 'exact' a 16-bit backward from the saved log-sum-exp "
                           "(straight-through over the quantized forward), 'off' keeps such sites as they were")
    include: tuple[str, ...] = option(["*"], _globs, "glob or list of globs", "module paths to rewrite")
    exclude: tuple[str, ...] = option([], _globs, "glob or list of globs", "module paths to leave alone")
    schedule: tuple = option([], _schedule, "list of {'steps': [lo, hi], 'include': globs, 'use': {...}}",
                             "options per denoising step range and module glob, read at run time from "
                             "`attnopt.step(i, total)`; the first matching entry wins (see Schedules)")

    def _finish(self, values: dict) -> dict:
        if values["smooth_q"] and values["sparsity"] is not None:
            raise ConfigError("attention.smooth_q", True, "false when attention.sparsity is set",
                              "the block-sparse kernels do not apply Q smoothing")
        for n, entry in enumerate(values["schedule"]):  # each entry's merged options must be valid too
            merged = {**values, **entry["use"], "schedule": []}
            path = f"attention.schedule[{n}].use"
            try:
                AttentionOptions(**merged)
            except ConfigError as e:
                raise ConfigError(path + e.path[len("attention"):], e.value, e.allowed, e.hint) from None
        return values


@dataclass(frozen=True)
class LinearOptions(_Table):
    """`linear.*`: which linear layers are rewritten, and into what."""

    _path: ClassVar[str] = "linear"
    quant: str = option("none", _choice("none", "w8a8", "fp8", "w4a16", "w4a8", "nvfp4"),
                        "'none' | 'w8a8' | 'fp8' | 'w4a16' | 'w4a8' | 'nvfp4'",
                        "linear-layer format ('nvfp4': W4A4 with e4m3 scales per 16, sm100+)")
    training: str = option("off", _choice("off", "int8", "fp8"), "'off' | 'int8' | 'fp8'",
                           "graphs that need gradients: 'int8' / 'fp8' run each linear's forward and both backward "
                           "GEMMs in 8 bits (32x32 blocks; fp8: e4m3 forward, e5m2 gradients), keeping only the "
                           "8-bit input for backward; 'off' leaves their linears as they are")
    smooth: SmoothOptions | None = option(None, _smooth, "null or {'alpha': number in [0, 1]}",
                                          "SmoothQuant scales folded into the preceding norm / linear "
                                          "(needs a calibrated plan)")
    min_m: int = option(17, _number(1, math.inf, integer=True), "integer >= 1",
                        "rows below which a linear takes the small-M path or stays as it was")
    include: tuple[str, ...] = option(["*"], _globs, "glob or list of globs", "module paths to rewrite")
    exclude: tuple[str, ...] = option(["lm_head", "*.lm_head"], _globs, "glob or list of globs",
                                      "module paths to leave alone (output heads by default)")


@dataclass(frozen=True, eq=False)
class Options(_Table):
    """Validated, normalized pass options (what `normalize_options` returns): frozen, hashable,
    read by attribute (`opts.attention.quant`). Equal options have equal `to_json()`."""

    attention: AttentionOptions = _table_field(AttentionOptions, "the attention pass")
    linear: LinearOptions = _table_field(LinearOptions, "the linear pass")
    arch: str = option("auto", _choice(*ARCHS), " | ".join(repr(a) for a in ARCHS),
                       "target architecture; 'auto' reads the device, 'cpu' forces the reference path")
    on_cpu: str = option("emulate", _choice("emulate", "skip"), "'emulate' | 'skip'",
                         "sites whose tensors are on the CPU: 'emulate' rewrites them into the pure-PyTorch "
                         "emulation of the GPU arithmetic (for checking accuracy; slower than the original: about "
                         "2x at 512 tokens, 6-8x at 2048), 'skip' leaves them as they were")
    plan: PlanOptions | None = option(None, _plan, "null, a plan dict, or a path to a plan JSON file",
                                      "calibrated per-site parameters from attnopt.calibrate")

    @cached_property
    def _json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def to_json(self) -> str:
        """Canonical JSON: equal options give equal strings (used in cache keys)."""
        return self._json

    def __eq__(self, other):
        return isinstance(other, Options) and other._json == self._json

    def __hash__(self):
        return hash(self._json)

    def __repr__(self):
        return f"Options({self._json})"


def _leaf_paths() -> list[str]:
    """Every key path a user can set, nested tables included: a key given at the wrong level
    (top-level 'quant') is found under its real parent ('attention.quant')."""
    out = []

    def walk(cls, prefix):
        for f in fields(cls):
            path = _join(prefix, f.name)
            out.append(path)
            if "table" in f.metadata:
                walk(f.metadata["table"], path)

    walk(Options, "")
    walk(SmoothOptions, "linear.smooth")
    for cls in SPARSITY_METHODS.values():
        walk(cls, "attention.sparsity")
    return list(dict.fromkeys(out))


def _suggest(key: str, known, path: str = "") -> str:
    """Closest sibling key, and any full path elsewhere whose last part is (or is close to) `key`."""
    elsewhere = [p for p in _leaf_paths() if p != path and p not in known]
    exact = [p for p in elsewhere if p.rsplit(".", 1)[-1] == key]
    # a key that exists elsewhere was most likely put at the wrong level: only a close sibling competes
    siblings = difflib.get_close_matches(key, list(known), n=1, cutoff=0.75 if exact else 0.5)
    close = [] if siblings or exact else [
        p for p in elsewhere if difflib.get_close_matches(key, [p.rsplit(".", 1)[-1]], cutoff=0.8)]
    names = list(dict.fromkeys(exact + siblings + close))[:3]
    if not names:
        return ""
    return "did you mean " + " or ".join(repr(n) if "." in n or n in known else f"top-level {n!r}"
                                         for n in names) + "?"


def normalize_options(options: Mapping | Options | None = None) -> Options:
    """Validate a user options dict (None = all defaults), fill in every default -> Options."""
    if isinstance(options, Options):
        return options
    if options is None:
        options = {}
    try:
        json.dumps(options, default=_json_default)
    except (TypeError, ValueError) as e:
        raise ConfigError("options", options, "a JSON-compatible dict", str(e)) from None
    return Options.from_dict(options)


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
    return Options().to_dict()


# --------------------------------------------------------------------------------------------
# The schema as documentation: the README's tables and the CLI's option help.


def schema_rows() -> list[tuple[str, str, str, str]]:
    """(key, default, allowed, meaning) for every option: the README table is made from these."""
    rows = []

    def walk(cls, prefix):
        for f in fields(cls):
            path = _join(prefix, f.name)
            if "table" in f.metadata:
                walk(f.metadata["table"], path)
            else:
                rows.append((path, json.dumps(_thaw(f.default)), f.metadata["allowed"], f.metadata["doc"]))

    walk(Options, "")
    return rows


def sparsity_rows() -> list[tuple[str, str, str, str, str]]:
    """(method, parameter, default, allowed, meaning) for every sparse method's parameter."""
    return [(method, f.name, json.dumps(_thaw(f.default)), f.metadata["allowed"], f.metadata["doc"])
            for method, cls in SPARSITY_METHODS.items() for f in fields(cls)]


def schema_markdown() -> str:
    """The README's option tables, generated from the schema (a test keeps them in sync)."""
    lines = ["| key | default | allowed | meaning |", "| --- | --- | --- | --- |"]
    def esc(t: str) -> str:
        return t.replace("|", "\\|")

    lines += [f"| `{k}` | `{d}` | {esc(a)} | {esc(m)} |" for k, d, a, m in schema_rows()]
    lines += ["", "Sparsity methods (`attention.sparsity = {\"method\": ..., <parameters>}`):", "",
              "| method | parameter | default | allowed | meaning |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| `{m}` | `{n}` | `{d}` | {esc(a)} | {esc(doc)} |" for m, n, d, a, doc in sparsity_rows()]
    return "\n".join(lines)


def schema_text(meanings: bool = True) -> str:
    """The option keys as plain text, for the CLI: `key = default  allowed` per line (and what it
    means, indented, with `meanings`); with meanings, the sparse methods' parameters too."""
    rows = schema_rows()
    width = max(len(f"{k} = {d}") for k, d, _, _ in rows) + 2
    lines = []
    for key, default, allowed, meaning in rows:
        lines.append(f"  {f'{key} = {default}':<{width}}{allowed}")
        if meanings:
            lines.append(f"      {meaning}")
    if meanings:
        lines += ["", 'attention.sparsity = {"method": METHOD, PARAMETER: VALUE, ...}; each method\'s parameters:']
        for method, cls in SPARSITY_METHODS.items():
            lines.append(f"  {method}:")
            for f in fields(cls):
                default = json.dumps(_thaw(f.default))
                lines.append(f"    {f'{f.name} = {default}':<{width - 2}}{f.metadata['allowed']}")
                lines.append(f"        {f.metadata['doc']}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(schema_markdown())


# ----------------------------------------------------------------- plans (plan.py holds the Plan class)

PLAN_SCHEMA_VERSION = 1
PLAN_KIND = "attnopt-plan"
LINEAR_FORMATS = ("none", "w8a8", "fp8", "w4a16", "w4a8", "nvfp4")
QUANT_FORMATS = ("int8", "fp8", "fp4", "none")  # a plan's per-site attention formats (attention.quant / pv)
PV_FORMATS = ("fp16", "fp8", "fp4", "fp8_acc16")
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
            checked = _checked_values(SPARSITY_METHODS[val["method"]], params, p)
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
        elif key in ("dense", "original"):
            if not isinstance(val, bool):
                raise ConfigError(p, val, "true | false")
            out[key] = val
        elif key == "quant":
            if val not in QUANT_FORMATS:
                raise ConfigError(p, val, " | ".join(repr(f) for f in QUANT_FORMATS))
            out[key] = val
        elif key == "pv":
            if val not in PV_FORMATS:
                raise ConfigError(p, val, " | ".join(repr(f) for f in PV_FORMATS))
            out[key] = val
        elif key == "schedule":  # this site's own entries, tried before attention.schedule's
            out[key] = _schedule(p, val)
        elif key in ("error", "stats"):
            out[key] = val  # informational, written by calibrate
        else:
            raise ConfigError(p, val, "one of kind, sparsity, dense, original, quant, pv, schedule, error, stats")
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
        elif key == "awq":  # AWQ's per input channel scales for a w4a16 / w4a8 linear (calibration/awq.py)
            out["awq"] = _validate_awq(p, val)
        elif key in ("error", "stats", "group", "sensitivity"):  # calibration's measurements, kept for reading
            out[key] = val
        else:
            raise ConfigError(p, val, "one of kind, quant, act_absmax, awq, group, error, stats, sensitivity")
    return out


def _validate_awq(path: str, val: Any) -> dict:
    """{'alpha': number in [0, 1], 'scales': positive finite numbers (one per input channel),
    'rel_l1': calibration's measurement, kept for reading}."""
    if not isinstance(val, Mapping) or not {"alpha", "scales"} <= set(val) or set(val) - {"alpha", "scales", "rel_l1"}:
        raise ConfigError(path, "<dict>" if isinstance(val, Mapping) else val,
                          "{'alpha': number in [0, 1], 'scales': [positive numbers]} (and 'rel_l1')")
    a = val["alpha"]
    if not isinstance(a, (int, float)) or isinstance(a, bool) or not 0 <= a <= 1:
        raise ConfigError(f"{path}.alpha", a, "a number in [0, 1]")
    scales = _finite_list(f"{path}.scales", val["scales"])
    if not scales or min(scales) <= 0:
        raise ConfigError(f"{path}.scales", "<list>", "a non-empty list of numbers > 0")
    out = {"alpha": float(a), "scales": scales}
    if "rel_l1" in val:
        out["rel_l1"] = val["rel_l1"]
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
