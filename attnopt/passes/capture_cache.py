"""The capture and attention passes' result, kept on disk so a warm start skips the aten trace.

With Inductor's caches warm, plain `torch.compile` serves a graph from AOTAutograd's cache
without tracing it. attnopt's capture traces every graph that may hold attention before
compile_fx can look anything up, which made a warm compile ~9x slower than plain Inductor's
(docs/design.md#compile-time). This cache keeps what the trace and the attention pass produced
for one Dynamo graph: the rewritten aten graph (or "unchanged"), its site records and notes.
On a hit the graph is rebuilt node for node under the same names, graph-module class and
attribute order, so it pickles as the traced one does and AOTAutograd's cache hits as well.

The key covers everything the trace and the decisions read: Dynamo's graph (code, module paths,
source lines), its inputs' metadata and aliasing, the small constants' values, the ShapeEnv's
guards and ranges, the global state a trace bakes in (grad mode, autocast, default dtype, ...),
torch's configs, and PassContext.uuid (attnopt's source, options, plan, versions, arch,
switches). An entry is stored only when the trace and the pass left the ShapeEnv as they found
it (no guard a rebuilt graph would fail to install), when every call in Dynamo's graph is
torch's or attnopt's (a user function's body is not in the key), and when every node, argument
and constant can be written down exactly; anything else compiles as before. Any error while
keying, reading or rebuilding is a miss. Off when Inductor's FX graph cache is off, in inspect /
calibrate runs, after an internal error, and with ATTNOPT_CAPTURE_CACHE=off.
"""

from __future__ import annotations

import builtins
import hashlib
import importlib
import json
import math
import operator
import os
import tempfile
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx

from .. import switches
from ..logs import log
from ..report import SiteRecord
from .graph_utils import attr_of
from .linear_rewrite import LINEAR_BUFFER_PREFIX
from .schedule_rewrite import STEP_INPUT_KEY

FORMAT = 1  # bump when the entry layout changes
_SMALL = 4096  # constants up to this many elements are keyed (and stored) by value
_MODULES = {"operator": operator, "math": math, "builtins": builtins, "torch": torch}


class Uncacheable(Exception):
    """Something in the graph cannot be written down exactly: the entry is not stored."""


@dataclass
class Entry:
    """One graph's result: `nodes` None when the pass left Dynamo's graph as it was."""

    nodes: list | None
    constants: dict = field(default_factory=dict)  # get_attr target -> ("dynamo", attr) | ("value", tensor)
    records: list = field(default_factory=list)  # SiteRecord dicts, in the order the pass added them
    notes: list = field(default_factory=list)
    tracer: str | None = None  # "module:qualname" of the class make_fx left in the graph module
    class_name: str = "GraphModule"  # the graph module's class name (pickled, so in AOT's cache key)


def enabled(ctx, patches: dict) -> bool:
    """Whether this compile may read and write the cache (see the module docstring)."""
    cfg = torch._inductor.config
    return (switches.capture_cache() and patches.get("fx_graph_cache", cfg.fx_graph_cache)
            and not cfg.force_disable_caches and not ctx.internal_errors and not ctx.probe_sink
            and not ctx.capture_graphs and not ctx.capture_linears)


def directory() -> str:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return os.path.join(cache_dir(), "attnopt_capture")


# ---- the key -----------------------------------------------------------------------------------

def _shape_env(example_inputs):
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode(example_inputs)
    return None if mode is None else mode.shape_env


def shape_env_state(example_inputs) -> tuple | None:
    """What a trace may add to the ShapeEnv: if any of it moved, a rebuilt graph would lack guards.
    None when it cannot be read (a torch whose ShapeEnv differs): then nothing is stored."""
    try:
        env = _shape_env(example_inputs)
        if env is None:
            return ()
        return (env._version_counter, len(env.guards), env.num_deferred_runtime_asserts,
                env.unbacked_symint_counter, env.unbacked_symfloat_counter)
    except Exception:  # noqa: BLE001
        return None


def _tensor_meta(t: torch.Tensor) -> str:
    return (f"{type(t).__name__}|{t.dtype}|{t.device}|{t.layout}|{tuple(map(str, t.shape))}|"
            f"{tuple(map(str, t.stride())) if t.layout == torch.strided else ''}|"
            f"{t.storage_offset() if t.layout == torch.strided else ''}|{t.requires_grad}")


def dynamo_attrs(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Attribute path -> tensor, for every tensor Dynamo's graph reads with get_attr (the linear
    pass's quantized weights, constants Dynamo lifted)."""
    out = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr" and isinstance(obj := attr_of(gm, n.target), torch.Tensor):
            out.setdefault(n.target, obj)
    return out


def _global_state() -> str:
    """Global state the trace bakes in: grad mode, autocast per device and its dtypes, the default
    dtype, deterministic algorithms, matmul precision flags (Dynamo's own global-state guard,
    serialized), plus inference mode and the SDPA backends allowed (which aten SDPA op a call
    becomes)."""
    try:
        dynamo_state = torch._C._dynamo.guards.GlobalStateGuard().__getstate__()
    except Exception:  # noqa: BLE001 - a torch without it: the pieces attnopt knows of
        dynamo_state = repr((torch.is_grad_enabled(), torch.get_default_dtype(),
                             torch.are_deterministic_algorithms_enabled(),
                             [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")]))
    b = torch.backends.cuda
    return (f"{dynamo_state}|inference={torch.is_inference_mode_enabled()}|sdpa={b.flash_sdp_enabled()},"
            f"{b.mem_efficient_sdp_enabled()},{b.math_sdp_enabled()},{b.cudnn_sdp_enabled()}|"
            f"matmul={torch.get_float32_matmul_precision()}")


def _targets_are_torchs(gm: fx.GraphModule) -> None:
    """Uncacheable unless every call in Dynamo's graph is torch's or attnopt's: the key names a
    function by its name in the code, so a user function Dynamo kept whole (allow_in_graph, a
    custom op of another library) could change its body under the same key. Also for graphs
    with `custom` node annotations, which a rebuilt graph does not carry."""
    for n in gm.graph.nodes:
        if n.meta.get("custom"):  # fx_traceback.annotate regions: a rebuilt graph would lose them
            raise Uncacheable(f"node {n.name} carries custom annotations")
        if n.op == "call_module":
            raise Uncacheable(f"module call {n.target}")
        if n.op != "call_function":
            continue
        t = n.target
        if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            if t.namespace not in ("aten", "prims", "attnopt"):
                raise Uncacheable(f"op {t} of another library")
            continue
        if isinstance(t, torch._ops.HigherOrderOperator):
            if _side_table_hop(t):  # a user's Triton kernel: its source is not in the key
                raise Uncacheable(f"Triton kernel call {n.name}")
            continue
        mod = getattr(t, "__module__", None) or ""
        if not (mod.split(".")[0] in ("torch", "attnopt", "operator", "math", "builtins", "_operator")
                or (mod == "" and type(t).__name__ == "builtin_function_or_method")):
            raise Uncacheable(f"call of {getattr(t, '__qualname__', t)} from {mod or 'unknown module'}")


def _config_hashes() -> list:
    """Inductor's, functorch's and the FX tracer's configs (decompositions read some of them), by
    the hash each config module keeps (recomputed only after a change: ~2 us, where writing the
    configs out costs ~40 ms)."""
    import torch._functorch.config as functorch_config
    import torch.fx.experimental._config as fx_config

    out = []
    for mod in (torch._inductor.config, functorch_config, fx_config):
        try:
            out.append(mod.get_hash())
        except Exception:  # noqa: BLE001 - a torch without get_hash: the whole config, slower
            out.append(sorted(mod.save_config_portable().items(), key=lambda kv: kv[0]))
    return out


def key(ctx, gm: fx.GraphModule, example_inputs, training: bool) -> str:
    h = hashlib.sha256()

    def put(s) -> None:
        h.update(str(s).encode())
        h.update(b"\0")

    put(FORMAT)
    put(ctx.uuid("capture-cache"))
    put(f"training={training}")
    put(_global_state())
    put(_config_hashes())
    _targets_are_torchs(gm)
    put(gm.graph.python_code(root_module="self").src)  # gm.code would also compile it
    for n in gm.graph.nodes:  # what the code leaves out: module paths and source lines (site keys, records)
        stack = n.meta.get("nn_module_stack")
        if stack:  # its keys may be ids
            put("|".join(f"{v[0]}:{getattr(v[1], '__qualname__', v[1])}" for v in stack.values()))
        put(n.meta.get("stack_trace") or "")
    cuda = sorted({x.device.index or 0 for x in example_inputs if isinstance(x, torch.Tensor) and x.device.type == "cuda"})
    put([torch.cuda.get_device_capability(i) for i in cuda])  # arch "auto" follows the inputs' GPU
    storages: dict[int, int] = {}
    for i, x in enumerate(example_inputs):
        if isinstance(x, torch.Tensor):
            put(_tensor_meta(x))
            try:  # aliasing between inputs changes functionalization
                put(storages.setdefault(x.untyped_storage()._cdata, i))
            except Exception:  # noqa: BLE001 - no storage (sparse, nested): key on metadata alone
                put("no-storage")
        else:
            put(f"{type(x).__name__}:{x}")
    for name, t in sorted(dynamo_attrs(gm).items()):
        put(name)
        put(_tensor_meta(t))
        # values of small constants (a trace may read them: .item(), a mask); not of the linear
        # pass's buffers, which only attnopt's ops read (new weights must not miss the cache)
        if t.numel() <= _SMALL and t.device.type != "meta" and not name.startswith(LINEAR_BUFFER_PREFIX):
            put(hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
                if t.dtype != torch.bool else t.detach().cpu().tolist())
    env = _shape_env(example_inputs)
    if env is not None:
        put([str(g.expr) for g in env.guards])
        put(sorted((str(k), str(v)) for k, v in env.var_to_range.items()))
        put(sorted((str(k), str(v)) for k, v in env.replacements.items()))
        put(sorted((str(k), str(v)) for k, v in env.backed_var_to_val.items()))
    return h.hexdigest()


# ---- writing a graph down ----------------------------------------------------------------------

def _side_table_hop(t) -> bool:
    """A Triton kernel call: its arguments index this process's kernel side table, and the
    kernel's source is not in the key, so a graph holding one is never stored. (Where the capture
    trace inlines an attnopt op's Triton body, as it may on CUDA for the linear pass's ops, that
    graph is traced on every compile.)"""
    return isinstance(t, torch._ops.HigherOrderOperator) and t.name().startswith("triton_kernel_wrapper")


def _target(t) -> tuple:
    if isinstance(t, torch._ops.OpOverload):
        return ("op", t.namespace, t._opname, t._overloadname)
    if isinstance(t, torch._ops.HigherOrderOperator):
        if _side_table_hop(t) or getattr(torch.ops.higher_order, t.name(), None) is not t:
            raise Uncacheable(f"higher-order op {t.name()}")
        return ("hop", t.name())
    for mod_name, mod in _MODULES.items():
        name = getattr(t, "__name__", None)
        if name and getattr(mod, name, None) is t:
            return ("fn", mod_name, name)
    raise Uncacheable(f"call target {t!r}")


def _resolve(spec: tuple):
    kind = spec[0]
    if kind == "op":
        return getattr(getattr(getattr(torch.ops, spec[1]), spec[2]), spec[3])
    if kind == "hop":
        return getattr(torch.ops.higher_order, spec[1])
    if kind == "fn":
        return getattr(importlib.import_module(spec[1]) if spec[1] not in _MODULES else _MODULES[spec[1]], spec[2])
    raise Uncacheable(f"unknown target kind {kind!r}")


_TAGGED = {torch.dtype: "dtype", torch.device: "device", torch.layout: "layout", torch.memory_format: "memfmt"}


def _arg(a):
    """An FX argument as plain data: containers and torch enums tagged, nodes by name."""
    if a is None or isinstance(a, (bool, int, float, str)):
        if isinstance(a, (int, float)) and not isinstance(a, bool) and type(a) not in (int, float):
            raise Uncacheable(f"argument of type {type(a).__name__}")
        return a
    if isinstance(a, fx.Node):
        return ("node", a.name)
    if isinstance(a, (list, tuple)):
        return ("list" if isinstance(a, list) else "tuple", [_arg(v) for v in a])
    if isinstance(a, dict):
        if not all(isinstance(k, str) for k in a):
            raise Uncacheable("dict argument with non-string keys")
        return ("dict", [(k, _arg(v)) for k, v in a.items()])
    if isinstance(a, slice):
        return ("slice", [_arg(a.start), _arg(a.stop), _arg(a.step)])
    if a is Ellipsis:
        return ("ellipsis", None)
    for cls, tag in _TAGGED.items():
        if isinstance(a, cls):
            return (tag, str(a).replace("torch.", ""))
    raise Uncacheable(f"argument of type {type(a).__name__}")


def _unarg(a, env: dict):
    if not isinstance(a, (tuple, list)):  # every container was tagged: a bare one is a tag (JSON lists)
        return a
    tag, v = a
    if tag == "node":
        return env[v]
    if tag in ("list", "tuple"):
        items = [_unarg(x, env) for x in v]
        return items if tag == "list" else tuple(items)
    if tag == "dict":
        return {k: _unarg(x, env) for k, x in v}
    if tag == "slice":
        return slice(*(_unarg(x, env) for x in v))
    if tag == "ellipsis":
        return Ellipsis
    if tag == "device":
        return torch.device(v)
    if tag in ("dtype", "layout", "memfmt"):
        out = getattr(torch, v)
        if not isinstance(out, {"dtype": torch.dtype, "layout": torch.layout, "memfmt": torch.memory_format}[tag]):
            raise Uncacheable(f"{v} is not a torch {tag}")
        return out
    raise Uncacheable(f"unknown argument tag {tag!r}")


def write_graph(aten: fx.GraphModule, dynamo: fx.GraphModule) -> Entry:
    """The rewritten aten graph as an Entry (records and notes to be filled in); Uncacheable if it
    cannot be rebuilt exactly: same nodes, names, constants and tracer class, so the graph module
    pickles as the traced one does and compile_fx's caches key it the same."""
    extra = set(aten._buffers) - {n.target for n in aten.graph.nodes if n.op == "get_attr"}
    if extra:
        raise Uncacheable(f"buffers no node reads: {sorted(extra)}")
    by_id = {id(t): name for name, t in dynamo_attrs(dynamo).items()}
    nodes, constants = [], {}
    for n in aten.graph.nodes:
        if n.op == "get_attr":
            obj = attr_of(aten, n.target)
            if not isinstance(obj, torch.Tensor) or "." in n.target:
                raise Uncacheable(f"attribute {n.target} ({type(obj).__name__})")
            if id(obj) in by_id:
                constants[n.target] = ("dynamo", by_id[id(obj)])
            elif obj.numel() <= _SMALL and not isinstance(obj, torch._subclasses.FakeTensor):
                constants[n.target] = ("value", obj.detach().clone())
            else:
                raise Uncacheable(f"constant {n.target} of {obj.numel()} elements made by the trace")
        target = _target(n.target) if n.op == "call_function" else n.target
        if n.op not in ("placeholder", "get_attr", "call_function", "output"):
            raise Uncacheable(f"node kind {n.op}")
        step = n.meta.get(STEP_INPUT_KEY)
        nodes.append({"op": n.op, "name": n.name, "target": target, "args": _arg(n.args), "kwargs": _arg(n.kwargs),
                      "step_device": None if step is None else str(step),
                      "stack_trace": n.meta.get("stack_trace")})
    cls = aten.__dict__.get("_tracer_cls")
    return Entry(nodes=nodes, constants=constants, tracer=None if cls is None else f"{cls.__module__}:{cls.__qualname__}",
                 class_name=type(aten).__name__)


def rebuild(entry: Entry, dynamo: fx.GraphModule) -> fx.GraphModule:
    """The stored graph over this compile's constants, names as stored. Nodes carry no "val":
    compile_fx takes Dynamo's graphs without it too, and AOTAutograd traces the graph afresh."""
    root = torch.nn.Module()
    for target, (kind, v) in entry.constants.items():
        obj = attr_of(dynamo, v) if kind == "dynamo" else v
        if not isinstance(obj, torch.Tensor):
            raise Uncacheable(f"Dynamo's graph no longer holds {v}")
        setattr(root, target, obj)
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for spec in entry.nodes:
        target = _resolve(spec["target"]) if spec["op"] == "call_function" else spec["target"]
        node = graph.create_node(spec["op"], target, _unarg(spec["args"], env), _unarg(spec["kwargs"], env),
                                 name=spec["name"])
        if node.name != spec["name"]:
            raise Uncacheable(f"node {spec['name']} came back as {node.name}")
        if spec["stack_trace"]:
            node.meta["stack_trace"] = spec["stack_trace"]
        if spec["op"] == "placeholder":
            if spec["step_device"] is not None:
                node.meta[STEP_INPUT_KEY] = torch.device(spec["step_device"])
        env[spec["name"]] = node
    if entry.tracer is not None:  # GraphModule takes it from the graph, in its own attribute order
        mod, _, name = entry.tracer.partition(":")
        graph._tracer_cls = getattr(importlib.import_module(mod), name)
    out = _graph_module(root, graph, entry.class_name)
    out.meta.update(dynamo.meta)
    return out


def _graph_module(root, graph: fx.Graph, class_name: str) -> fx.GraphModule:
    """A graph module of the class make_fx makes here (lazy or not, by the compile's own flag):
    the class decides when `_code` enters its __dict__, so it is part of AOT's cache key."""
    try:
        from torch.fx._lazy_graph_module import _make_graph_module
    except ImportError:  # torch moved it: the rebuilt graph is still right, AOT's cache just misses once
        return fx.GraphModule(root, graph, class_name=class_name)
    return _make_graph_module(root, graph, class_name)


# ---- the store ---------------------------------------------------------------------------------
# One JSON file per key (fast to read; arguments and records in the tagged form of _arg, so tuples,
# dtypes and devices come back as they were), plus a torch.save file for constants made by the
# trace, written first: the JSON file's presence means the entry is whole.

def _path(k: str) -> str:
    return os.path.join(directory(), k[:2], k + ".json")


def load(k: str) -> Entry | None:
    """The entry under `k`, or None (absent, unreadable or of another format: all a miss)."""
    path = _path(k)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
        if data.get("format") != FORMAT:
            return None
        constants = {t: tuple(v) for t, v in data["constants"].items()}
        if any(kind == "value" for kind, _ in constants.values()):
            values = torch.load(path[:-len(".json")] + ".pt", weights_only=True)
            constants = {t: (kind, values[v] if kind == "value" else v) for t, (kind, v) in constants.items()}
        return Entry(nodes=data["nodes"], constants=constants, records=_unarg(data["records"], {}),
                     notes=data["notes"], tracer=data["tracer"], class_name=data["class_name"])
    except Exception as e:  # noqa: BLE001 - a damaged entry is a miss, never a failed compile
        log.warning("attnopt: ignoring the unreadable capture-cache entry %s (%s)", path, e)
        return None


def store(k: str, entry: Entry) -> bool:
    """Write `entry`; False (and no entry) if it cannot be written down."""
    path = _path(k)
    tmps = []
    try:
        values = {t: v for t, (kind, v) in entry.constants.items() if kind == "value"}
        data = {"format": FORMAT, "nodes": entry.nodes,
                "constants": {t: (kind, t if kind == "value" else v) for t, (kind, v) in entry.constants.items()},
                "records": _arg(entry.records), "notes": entry.notes, "tracer": entry.tracer,
                "class_name": entry.class_name}
        text = json.dumps(data)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if values:
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
            tmps.append(tmp)
            with os.fdopen(fd, "wb") as f:
                torch.save(values, f)
            os.replace(tmp, path[:-len(".json")] + ".pt")
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        tmps.append(tmp)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
        return True
    except Exception as e:  # noqa: BLE001 - caching is an optimization: a failure only costs the next trace
        log.debug("attnopt: capture-cache entry not stored (%s)", e)
        for tmp in tmps:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return False


def record_dicts(records: list[SiteRecord]) -> list[dict]:
    return [asdict(r) for r in records]


def records_from(dicts: list[dict]) -> list[SiteRecord]:
    return [SiteRecord(**d) for d in dicts]
