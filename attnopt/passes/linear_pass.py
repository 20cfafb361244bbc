"""Where linears are matched and rewritten: quantized weights (once, at compile time), SmoothQuant
scales folded into the preceding norm or linear, and the linear becomes an attnopt GEMM op.

This pass runs on Dynamo's graph, before Inductor: there the weights are real parameters
(Dynamo hands the backend its example inputs), so they can be quantized and smoothed once and
stored as constants of the graph module; Inductor's freezing, which would expose them later,
cannot be switched on from a backend (Dynamo reads that flag while tracing).

Matched forms (W a 2-D parameter, lifted to a graph input or a get_attr):
`F.linear(x, W[, b])` / `nn.Linear`; `torch.addmm(b, x, W)` (HF's Conv1D, W stored [in, out]) and
`addmm(b, x, W.t())`; `torch.mm(x, W)` / `mm(x, W.t())`; `x @ W`, `x @ W.t()` / `torch.matmul`.
`.t()`, `.T`, `.mT`, `transpose(0, 1)`, `permute(1, 0)` are all read as the transpose.

The pass works in two phases so that a failure never leaves a half-folded model: first every
decision and every quantized tensor is computed (a SmoothQuant group whose member cannot be
rewritten is dropped, and its members are quantized again without the scales); then the graph is
edited, and if any edit fails the graph is restored as it was.
"""

from __future__ import annotations

import copy
import fnmatch
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from ..codegen.arch import ArchSpec
from ..logs import log
from ..ops import linear_ref as L
from ..report import SiteRecord
from .graph_utils import known_eq, module_class, module_path, source_line

LINEAR_FNS = (torch._C._nn.linear, torch.nn.functional.linear)
MATMUL_FNS = (torch.matmul, operator.matmul)
SDPA = torch.nn.functional.scaled_dot_product_attention
_CASTS = ("to", "float", "half", "bfloat16", "double", "type_as")
_META_METHODS = ("size", "dim", "numel", "stride")
_META_ATTRS = ("shape", "dtype", "device", "ndim", "is_cuda")
BAKED_META_KEY = "attnopt_baked_params"  # gm.meta entry read by the backend (stale-weight check)


@dataclass
class LinearSite:
    node: fx.Node
    x: fx.Node
    weight: fx.Node  # the parameter's node (placeholder or get_attr)
    bias: fx.Node | None
    transposed: bool  # weight stored [in, out] (Conv1D, mm(x, W))
    module: str
    key: str = ""
    pattern: str = "linear"


@dataclass
class SmoothGroup:
    """A producer (norm or linear) whose output feeds only these linears: one shared scale."""

    kind: str  # "rmsnorm" | "layernorm" | "linear" | "attention-v"
    producer: fx.Node
    consumers: list = field(default_factory=list)  # LinearSite
    module: str = ""
    channel_map: torch.Tensor | None = None  # attention-v: consumer input channel -> producer channel
    skip_reason: str | None = None  # a candidate that was found but cannot be folded


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of Dynamo's graph that AOT autograd still accepts: node metas (shallow) and the
    placeholders' `_dynamo_source`, which deepcopy alone drops."""
    new = copy.deepcopy(graph)
    for old_n, new_n in zip(graph.nodes, new.nodes):
        if hasattr(old_n, "_dynamo_source"):
            new_n._dynamo_source = old_n._dynamo_source
    return new


def _example(node: fx.Node):
    return node.meta.get("example_value")


def _shape(n) -> tuple:
    """The example value's shape; () for anything that is not one tensor (split's tuple, SymInts)."""
    ev = _example(n) if isinstance(n, fx.Node) else None
    return tuple(ev.shape) if isinstance(ev, torch.Tensor) else ()


def _get_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _params(gm: fx.GraphModule, example_inputs) -> tuple[dict[fx.Node, torch.Tensor], dict[fx.Node, int]]:
    """(parameter node -> real tensor, placeholder -> its position among the graph's inputs).
    Dynamo lifts parameters to graph inputs; without inlining they stay get_attr nodes."""
    out, index = {}, {}
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, (n, t) in enumerate(zip(phs, example_inputs)):
        index[n] = i
        if isinstance(t, torch.nn.Parameter) or (isinstance(t, torch.Tensor) and "_parameters_" in n.name):
            out[n] = t
    for n in gm.graph.nodes:
        if n.op == "get_attr" and isinstance(_get_attr(gm, n.target), torch.nn.Parameter):
            out[n] = _get_attr(gm, n.target)
    return out, index


# ------------------------------------------------------------------------------------ capture

def _is_transpose(n: fx.Node) -> bool:
    return (n.op == "call_method" and n.target == "transpose") or (n.op == "call_function"
                                                                  and n.target is torch.transpose)


def _transpose_source(n) -> fx.Node | None:
    """W for a node computing W's 2-D transpose (W.t(), W.T, W.mT, transpose, permute(1, 0))."""
    if not isinstance(n, fx.Node) or n.kwargs:
        return None
    a = n.args
    if n.op == "call_method" and n.target == "t" and len(a) == 1:
        return a[0]
    if n.op == "call_function" and n.target is torch.t and len(a) == 1:
        return a[0]
    if n.op == "call_function" and n.target is getattr and len(a) == 2 and a[1] in ("T", "mT"):
        return a[0]
    if _is_transpose(n) and len(a) == 3 and all(isinstance(d, int) for d in a[1:]) and {a[1] % 2, a[2] % 2} == {0, 1}:
        return a[0]
    if n.op == "call_method" and n.target == "permute":
        dims = tuple(a[1]) if len(a) == 2 and isinstance(a[1], (tuple, list)) else tuple(a[1:])
        if dims in ((1, 0), (-1, -2), (1, -2), (-1, 0)):
            return a[0]
    return None


def _weight_operand(n, params: dict) -> tuple[fx.Node, bool] | None:
    """(parameter node, stored [in, out]) when mm's second operand is W [K, N] or W.t() of W [N, K]."""
    if n in params and params[n].dim() == 2:
        return n, True
    src = _transpose_source(n)
    if src in params and params[src].dim() == 2:
        return src, False
    return None


def _match_linear(n: fx.Node, params: dict) -> LinearSite | None:
    """The LinearSite for one call node, or None (the weight must be a 2-D parameter)."""
    if n.target in LINEAR_FNS:
        x, w = n.args[0], n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
        b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        if w in params and params[w].dim() == 2:
            return LinearSite(n, x, w, b, False, module_path(n))
        return None
    if n.kwargs:  # addmm's beta / alpha, matmul's out=
        return None
    if n.target is torch.addmm and len(n.args) == 3:
        b, x, wop = n.args
        wo = _weight_operand(wop, params)
        if wo and (b is None or (b in params and params[b].dim() == 1)):
            return LinearSite(n, x, wo[0], b, wo[1], module_path(n),
                              pattern="addmm (Conv1D)" if wo[1] else "addmm (x, W^T)")
        return None
    if (n.target is torch.mm or n.target in MATMUL_FNS) and len(n.args) == 2:
        x, wop = n.args
        wo = _weight_operand(wop, params)
        if wo and isinstance(x, fx.Node) and x not in params and len(_shape(x)) >= 1:
            name = "mm" if n.target is torch.mm else "matmul"
            return LinearSite(n, x, wo[0], None, wo[1], module_path(n),
                              pattern=f"{name} (x, W)" if wo[1] else f"{name} (x, W^T)")
    return None


def find_linears(gm: fx.GraphModule, params: dict) -> list[LinearSite]:
    sites = []
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        site = _match_linear(n, params)
        if site is not None:
            idx = counts[site.module] = counts.get(site.module, -1) + 1
            site.key = site.module if idx == 0 else f"{site.module}#{idx}"
            sites.append(site)
    return sites


# ------------------------------------------------------------------------------ channel paths

def _is_cast(n) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_method" and n.target in _CASTS


def _is_view(n) -> bool:
    """view / reshape / flatten that only reshapes (x.view(dtype) reinterprets bits: not one)."""
    if not isinstance(n, fx.Node):
        return False
    if not ((n.op == "call_method" and n.target in ("view", "reshape", "flatten"))
            or (n.op == "call_function" and n.target in (torch.reshape, torch.flatten))):
        return False
    if any(isinstance(a, torch.dtype) for a in n.args[1:]):
        return False
    a, b = _example(n.args[0]) if isinstance(n.args[0], fx.Node) else None, _example(n)
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype


def _same_shape(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(known_eq(x, y) for x, y in zip(a, b))


def _passthrough(n) -> bool:
    """A cast, .contiguous(), or a view keeping the last dim: channel j of each row stays channel j."""
    if _is_cast(n) or (isinstance(n, fx.Node) and n.op == "call_method" and n.target == "contiguous"):
        return True
    if _is_view(n):
        si, so = _shape(n.args[0]), _shape(n)
        return bool(si) and bool(so) and known_eq(si[-1], so[-1])
    return False


def _source(n):
    """The tensor a linear's input channels come from, back through casts and views."""
    while _passthrough(n):
        n = n.args[0]
    return n


def _meta_read(u: fx.Node) -> bool:
    """A user that reads only sizes / dtype, never values."""
    if u.op == "call_method" and u.target in _META_METHODS:
        return True
    return u.op == "call_function" and u.target is getattr and len(u.args) == 2 and u.args[1] in _META_ATTRS


def _data_users(n: fx.Node) -> list[fx.Node]:
    return [u for u in n.users if not _meta_read(u)]


def _uses_once(u: fx.Node, n: fx.Node) -> bool:
    """u reads n exactly once (inside lists too: torch.cat([a, n]))."""
    hits = []
    fx.node.map_arg((u.args, u.kwargs), lambda a: hits.append(a is n))
    return sum(hits) == 1


def _feeds_only(n: fx.Node, accept, depth: int = 0) -> bool:
    """Every value use of n ends in a node `accept(user, n)` says yes to, directly or through
    casts / last-dim views (so scaling channels before them equals scaling after)."""
    for u in _data_users(n):
        if accept(u, n):
            continue
        if depth < 8 and _passthrough(u) and u.args[0] is n and _uses_once(u, n) and _feeds_only(u, accept, depth + 1):
            continue
        return False
    return True


def _norm_kind(n: fx.Node, params: dict) -> tuple[str, fx.Node, fx.Node | None] | None:
    """(kind, gamma node, beta node) when n is a norm's output with a 1-D parameter gain."""
    if not isinstance(n, fx.Node) or n.op != "call_function":
        return None

    def p1(w):
        return w in params and params[w].dim() == 1

    if n.target in (torch.nn.functional.layer_norm, torch.layer_norm):
        w = n.args[2] if len(n.args) > 2 else n.kwargs.get("weight")
        b = n.args[3] if len(n.args) > 3 else n.kwargs.get("bias")
        if p1(w) and (b is None or p1(b)):
            return "layernorm", w, b
    if n.target in (torch.nn.functional.rms_norm, torch.rms_norm):  # nn.RMSNorm reaches Dynamo as the latter
        w = n.args[2] if len(n.args) > 2 else n.kwargs.get("weight")
        if p1(w):
            return "rmsnorm", w, None
    if n.target in (operator.mul, torch.mul) and len(n.args) == 2:  # HF: weight * x_normed
        a, b = n.args
        for w, other in ((a, b), (b, a)):
            if p1(w) and _is_rms_normalized(other):
                return "rmsnorm", w, None
    return None


def _is_rms_normalized(n) -> bool:
    """x * rsqrt(mean(x^2) + eps), possibly cast: the hand-written RMSNorm body."""
    n = _through_casts(n)
    if not (isinstance(n, fx.Node) and n.op == "call_function" and n.target in (operator.mul, torch.mul)):
        return False
    return any(isinstance(a, fx.Node) and a.op == "call_function" and a.target is torch.rsqrt for a in n.args)


def _through_casts(n):
    while _is_cast(n):
        n = n.args[0]
    return n


def _is_act(n) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in (
        torch.nn.functional.silu, torch.nn.functional.gelu, torch.nn.functional.relu)


def _is_relu(n) -> bool:
    """relu(x / s) = relu(x) / s for s > 0: a linear -> relu -> linear chain folds exactly."""
    if not (isinstance(n, fx.Node) and n.op == "call_function" and n.target in (torch.nn.functional.relu, torch.relu)):
        return False
    inplace = n.args[1] if len(n.args) > 1 else n.kwargs.get("inplace", False)
    return inplace is False and set(n.kwargs) <= {"inplace"}


def _consumer_of(sites_by_node: dict):
    def accept(u, n):
        s = sites_by_node.get(u)
        return s is not None and s.x is n and _uses_once(u, n)
    return accept


def _up_to_down(s: LinearSite, by_node: dict) -> SmoothGroup | None:
    """up -> down: down's input is act(gate) * up (SwiGLU) or relu(up), and nothing else reads up."""
    x = _source(s.x)
    if not (isinstance(x, fx.Node) and _feeds_only(x, _consumer_of({s.node: s}))):
        return None
    cands = []
    if x.op == "call_function" and x.target in (operator.mul, torch.mul) and len(x.args) == 2:
        a, b = x.args
        cands = [a for a, other in ((a, b), (b, a)) if _is_act(other)]
    elif _is_relu(x):
        cands = [x.args[0]]
    for a in cands:
        up = _source(a)
        if up in by_node and up is not s.node and _feeds_only(up, lambda u, n: u is x and _uses_once(x, n)):
            return SmoothGroup("linear", up, [s], module_path(up))
    return None


def smooth_groups(sites: list[LinearSite], params: dict) -> list[SmoothGroup]:
    """Norm -> linears groups (every consumer of the norm a matched linear), up -> down through
    SwiGLU / ReLU, and v_proj -> o_proj through the attention (P.V is linear in V). Candidates
    on the V path that cannot be folded come back with a skip_reason."""
    by_src: dict[fx.Node, list] = {}
    by_node = {s.node: s for s in sites}
    for s in sites:
        by_src.setdefault(_source(s.x), []).append(s)
    groups = []
    for prod, consumers in by_src.items():
        kind = _norm_kind(prod, params)
        if kind is not None and _feeds_only(prod, _consumer_of({c.node: c for c in consumers})):
            groups.append(SmoothGroup(kind[0], prod, consumers, module_path(prod)))
    for s in sites:
        g = _up_to_down(s, by_node)
        if g is not None:
            groups.append(g)
    by_x = {s.x: s for s in sites}
    for s in sites:
        g = _v_to_o(s, by_x)
        if g is not None:
            groups.append(g)
    return groups


# --------------------------------------------------------------------- v_proj -> o_proj path

@dataclass
class _Heads:
    """Where V's heads are while walking from v_proj to the attention and on to o_proj."""

    axis: int | None = None  # head axis of the current tensor (None before the head split)
    heads: int = 0  # kv heads at the split
    head_dim: int = 0
    group_axis: int | None = None  # axis an expand grew right after the head axis (GQA repeat)
    group: int = 1
    rep: int = 1  # query heads per kv head so far: query head h reads kv head h // rep


def _name(u: fx.Node) -> str:
    t = u.target if isinstance(u.target, str) else getattr(u.target, "__name__", str(u.target))
    return f"{t} ({u.name})"


def _norm_dim(d, nd: int) -> int | None:
    return d % nd if isinstance(d, int) and nd else None


def _index_map(idx, nd_in: int) -> list[int] | None:
    """Output position of each input axis for x[idx] made only of ':', None and '...'."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    if sum(i is Ellipsis for i in idx) > 1:
        return None
    real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    out, pos, src = [], 0, 0
    for i in idx:
        if i is None:
            pos += 1
        elif i is Ellipsis:
            for _ in range(nd_in - real):
                out.append(pos)
                pos, src = pos + 1, src + 1
        elif isinstance(i, slice) and i == slice(None):
            out.append(pos)
            pos, src = pos + 1, src + 1
        else:
            return None
    while src < nd_in:
        out.append(pos)
        pos, src = pos + 1, src + 1
    return out


def _layout_step(u: fx.Node, cur: fx.Node, st: _Heads, after_attention: bool) -> str | None:
    """Track V's head axis through one layout op u(cur); a reason when u could mix channels."""
    si, so = _shape(cur), _shape(u)
    if not si or not so:
        return f"{_name(u)}: no single-tensor shape"
    nd_in, nd_out = len(si), len(so)
    if _is_cast(u) or (u.op == "call_method" and u.target == "contiguous") or (_is_view(u) and _same_shape(si, so)):
        return None
    if u.op == "call_function" and u.target is torch.cat:
        return f"{_name(u)} concatenates V with other values (a KV cache?): it would hold V / s"
    if st.axis is None:  # before the split only views keeping the last dim, then [..., C] -> [..., H, D]
        if _passthrough(u):
            return None
        h, d = so[-2:] if nd_out >= 2 else (None, None)
        if (_is_view(u) and nd_out == nd_in + 1 and isinstance(h, int) and isinstance(d, int)
                and _same_shape(si[:-1], so[:-2]) and known_eq(si[-1], h * d)):
            st.axis, st.heads, st.head_dim = nd_out - 2, h, d
            return None
        return f"{_name(u)} before V's head split"
    last = nd_in - 1
    if _is_transpose(u) and len(u.args) == 3:
        a, b = _norm_dim(u.args[1], nd_in), _norm_dim(u.args[2], nd_in)
        if a is None or b is None or last in (a, b):
            return f"{_name(u)} moves V's head_dim"
        swap = {a: b, b: a}
        st.axis = swap.get(st.axis, st.axis)
        st.group_axis = swap.get(st.group_axis, st.group_axis) if st.group_axis is not None else None
        return None
    if u.op == "call_method" and u.target == "permute":
        dims = tuple(u.args[1]) if len(u.args) == 2 and isinstance(u.args[1], (tuple, list)) else tuple(u.args[1:])
        dims = tuple(_norm_dim(d, nd_in) for d in dims)
        if None in dims or len(dims) != nd_in or dims[-1] != last:
            return f"{_name(u)} moves V's head_dim"
        st.axis = dims.index(st.axis)
        st.group_axis = dims.index(st.group_axis) if st.group_axis is not None else None
        return None
    if u.op == "call_function" and u.target is operator.getitem and len(u.args) == 2:
        m = _index_map(u.args[1], nd_in)
        if m is None or len(m) != nd_in:
            return f"{_name(u)} indexes V"
        st.axis = m[st.axis]
        st.group_axis = m[st.group_axis] if st.group_axis is not None else None
        return None
    if u.op == "call_method" and u.target == "unsqueeze" and len(u.args) == 2:
        d = _norm_dim(u.args[1], nd_out)
        if d is None:
            return f"{_name(u)}: unknown dim"
        st.axis = st.axis + (st.axis >= d)
        st.group_axis = st.group_axis + (st.group_axis >= d) if st.group_axis is not None else None
        return None
    if u.op == "call_method" and u.target == "expand" and not after_attention:
        lead = nd_out - nd_in
        if lead < 0:
            return f"{_name(u)}: unexpected shape"
        for i in range(nd_in):
            if known_eq(si[i], so[i + lead]):
                continue
            if i == st.axis + 1 and known_eq(si[i], 1) and isinstance(so[i + lead], int) and st.group_axis is None:
                st.group_axis, st.group = i + lead, so[i + lead]  # repeat_kv: [B, Hkv, 1, N, D] -> [B, Hkv, G, N, D]
            elif i in (st.axis, last):
                return f"{_name(u)} broadcasts V's heads"
        st.axis += lead
        return None
    if _is_view(u) and st.group_axis == st.axis + 1:  # [.., Hkv, G, ..] -> [.., Hkv * G, ..]
        a = st.axis
        if _same_shape(so, si[:a] + (si[a] * si[a + 1],) + si[a + 2:]):
            st.rep *= st.group
            st.group_axis, st.group = None, 1
            return None
    if u.op == "call_method" and u.target == "repeat_interleave" and not after_attention:
        r = u.args[1] if len(u.args) > 1 else u.kwargs.get("repeats")
        d = u.args[2] if len(u.args) > 2 else u.kwargs.get("dim")
        if isinstance(r, int) and _norm_dim(d, nd_in) == st.axis and st.group_axis is None:
            st.rep *= r
            return None
    return f"{_name(u)} on V's path"


def _attention_step(u: fx.Node, cur: fx.Node, st: _Heads) -> str | None:
    """cur is the value of the attention u (SDPA or P @ V): the output keeps V's channel layout."""
    si, so = _shape(cur), _shape(u)
    nd = len(si)
    if st.axis is None or st.group_axis is not None or not so or len(so) != nd:
        return f"{_name(u)}: V's heads are not in attention layout"
    if u.target is SDPA:
        q = u.args[0] if u.args else u.kwargs.get("query")
        k = u.args[1] if len(u.args) > 1 else u.kwargs.get("key")
        if (u.args[2] if len(u.args) > 2 else u.kwargs.get("value")) is not cur or cur in (q, k):
            return f"{_name(u)} reads V other than as its value"
        if st.axis != nd - 3:
            return f"{_name(u)}: V's head axis is not SDPA's"
        hv, hq = si[st.axis], so[st.axis]
        if not (isinstance(hv, int) and isinstance(hq, int)) or hq % hv:
            return f"{_name(u)}: heads {hq} vs {hv}"
        if hq != hv and not (u.kwargs.get("enable_gqa") or hv == 1):
            return f"{_name(u)}: heads {hq} vs {hv}"
        st.rep *= hq // hv
        return None
    a, b = u.args[:2]
    if b is not cur or a is cur or st.axis >= nd - 2 or not _same_shape(si[:-2], so[:-2]) or not known_eq(si[-1], so[-1]):
        return f"{_name(u)} is not P @ V with V's heads as a batch axis"
    return None


def _is_attention(u: fx.Node, cur: fx.Node) -> bool:
    if u.op != "call_function":
        return False
    if u.target is SDPA:
        return cur in u.args[2:3] or u.kwargs.get("value") is cur
    return u.target in MATMUL_FNS and len(u.args) == 2 and u.args[1] is cur


def _merge_step(u: fx.Node, cur: fx.Node, st: _Heads) -> bool:
    """u merges [..., H, D] into [..., H * D] (heads back into o_proj's channels)."""
    si, so = _shape(cur), _shape(u)
    return (_is_view(u) and len(si) >= 2 and st.axis == len(si) - 2
            and _same_shape(so, si[:-2] + (si[-2] * si[-1],)))


def _single_data_user(n: fx.Node) -> tuple[fx.Node | None, str | None]:
    users = _data_users(n)
    if len(users) == 1 and _uses_once(users[0], n):
        return users[0], None
    names = ", ".join(u.name for u in users) or "the graph output"
    if n.op != "output" and any(u.op == "output" for u in n.users):
        names += " (leaves the graph: e.g. a KV cache)"
    return None, f"{n.name} has {len(users)} users ({names}): folding would change what they read"


def _strict_v_path(v: LinearSite, by_x: dict) -> SmoothGroup | str:
    """Follow v_proj's output (single users only) through the head split, a GQA repeat, the
    attention and the head merge to o_proj; the group with its channel map, or why not."""
    st, cur = _Heads(), v.node
    for _ in range(16):  # up to the attention
        u, why = _single_data_user(cur)
        if u is None:
            return why
        if _is_attention(u, cur):
            why = _attention_step(u, cur, st)
            if why:
                return why
            cur = u
            break
        why = _layout_step(u, cur, st, after_attention=False)
        if why:
            return why
        cur = u
    else:
        return "no attention within 16 ops of V"
    merged = False
    for _ in range(12):  # on to o_proj
        u, why = _single_data_user(cur)
        if u is None:
            return why
        o = by_x.get(cur)
        if merged and o is not None and o.node is u:
            hq = st.heads * st.rep
            if not known_eq(_shape(cur)[-1], hq * st.head_dim):
                return f"o_proj reads {_shape(cur)[-1]} channels, the heads give {hq} x {st.head_dim}"
            c = torch.arange(hq * st.head_dim)  # o input channel h * D + d reads v channel (h // rep) * D + d
            cmap = (c // st.head_dim // st.rep) * st.head_dim + c % st.head_dim
            return SmoothGroup("attention-v", v.node, [o], v.module, channel_map=cmap)
        if not merged and _merge_step(u, cur, st):
            merged = True
        elif merged and _passthrough(u):
            pass
        elif merged:
            return f"{_name(u)} between the head merge and o_proj"
        else:
            why = _layout_step(u, cur, st, after_attention=True)
            if why:
                return why
        cur = u
    return "no o_proj linear after the attention"


def _reaches_attention_value(n: fx.Node, st: _Heads, depth: int = 0) -> bool:
    """Does n flow (any users, through KV-cache concatenations too) into an attention's V? Only
    decides whether a failed v -> o walk is worth reporting."""
    if depth > 16:
        return False
    for u in _data_users(n):
        if _is_attention(u, n):
            if _attention_step(u, n, copy.copy(st)) is None:
                return True
            continue
        s2 = copy.copy(st)
        if u.op == "call_function" and u.target is torch.cat and st.axis is not None:
            if _same_shape(_shape(u)[:-2], _shape(n)[:-2]) and _reaches_attention_value(u, s2, depth + 1):
                return True
            continue
        if _layout_step(u, n, s2, after_attention=False) is None and _reaches_attention_value(u, s2, depth + 1):
            return True
    return False


def _v_to_o(v: LinearSite, by_x: dict) -> SmoothGroup | None:
    """The v_proj -> o_proj group, a skipped candidate (V reaches an attention but the path cannot
    be folded: e.g. V also goes into a KV cache), or None when v is not a V projection at all."""
    try:
        got = _strict_v_path(v, by_x)
        if isinstance(got, SmoothGroup):
            return got
        if _reaches_attention_value(v.node, _Heads()):
            return SmoothGroup("attention-v", v.node, [], v.module, skip_reason=f"V path: {got}")
    except Exception as e:  # a graph shape this walk does not know: never break the compile
        log.debug("attnopt: v -> o walk from %s failed: %r", v.key, e)
    return None


# ------------------------------------------------------------------------------------ decisions

def _selected(path: str, opts) -> str | None:
    lin = opts.linear
    p = path or "<top>"
    if not any(fnmatch.fnmatchcase(p, g) for g in lin.include):
        return f"module {p!r} not matched by include {list(lin.include)}"
    hit = next((g for g in lin.exclude if fnmatch.fnmatchcase(p, g)), None)
    return f"module {p!r} excluded by {hit!r}" if hit else None


def _weight_nk(site: LinearSite, w: torch.Tensor) -> torch.Tensor:
    return w.t() if site.transposed else w


def _static_m(x: fx.Node) -> int | None:
    """Rows of the GEMM (product of x's leading dims) when every one is static."""
    shp = _shape(x)
    if not shp or not all(isinstance(d, int) for d in shp[:-1]):
        return None
    m = 1
    for d in shp[:-1]:
        m *= d
    return m


def _path_note(fmt: str, m: int | None, small_m: int) -> tuple[str, str]:
    """(path, words) for what runs at this site's M: the small-M paths of linear_8bit (weight-only
    split-K GEMV below min_m) and linear_w4a16 (split-K with BLOCK_M 16 at M <= 16)."""
    if fmt in ("w8a8", "fp8"):
        act = "INT8" if fmt == "w8a8" else "FP8"
        if m is None:
            return "dynamic", (f"M known at run time: M<={small_m} weight-only split-K GEMV (16-bit x), "
                               f"else per-token {act} GEMM")
        if m <= small_m:
            return "small-m", f"M={m}<={small_m}: weight-only split-K GEMV, activations stay 16-bit"
        return "gemm", f"M={m}: per-token {act} activations, 8-bit GEMM"
    if fmt == "w4a16":
        if m is None:
            return "dynamic", "M known at run time: M<=16 split-K (BLOCK_M 16), else tiled GEMM"
        if m <= 16:
            return "small-m", f"M={m}<=16: split-K GEMV (BLOCK_M 16), int4 dequantized in registers"
        return "gemm", f"M={m}: tiled GEMM, int4 dequantized in registers"
    return "none", "unquantized"


def _choose_formats(sites, records, params, weights, opts, spec, plan_sites, capture_all) -> dict:
    """key -> format ('none' = rewrite only if smoothed / captured) or None (left as it is)."""
    lin = opts.linear
    grad = torch.is_grad_enabled()
    fmt_of = {}
    for s in sites:
        rec, w = records[s.key], weights[s.key]
        xe = _example(s.x)
        rec.shapes = {"x": [int(d) if isinstance(d, int) else str(d) for d in xe.shape]
                      if isinstance(xe, torch.Tensor) else [], "w": list(w.shape)}
        rec.dtype = str(w.dtype).replace("torch.", "")
        entry = plan_sites.get(s.key, {})
        fmt = entry.get("quant", lin.quant) if entry.get("kind") == "linear" else lin.quant
        reason = _selected(s.module, opts)
        if reason is None and grad and params[s.weight].requires_grad:
            reason = ("weights require grad (a training graph, or inference outside torch.no_grad() / "
                      "torch.inference_mode()): quantized weights would not get gradients")
        if reason is None and fmt != "none" and fmt not in spec.linear_formats:
            reason = f"linear format {fmt!r} needs sm89+ (target is {spec.name})"
        if reason is None and fmt != "none" and w.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            reason = f"weight dtype {w.dtype} (fp16 / bf16 / fp32 quantize)"
        if reason:
            rec.reason = reason
            fmt = None
        elif fmt == "none" and not (capture_all or lin.smooth):
            rec.reason = "linear.quant is 'none'"
            fmt = None
        fmt_of[s.key] = fmt
    return fmt_of


def _smooth_scales(group: SmoothGroup, weights: dict, stats: dict, alpha: float) -> torch.Tensor | None:
    """s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha) over every consumer, clamped >= 1e-5; with a
    channel map (v -> o), per producer channel over the consumer channels that read it."""
    amax = None
    for c in group.consumers:
        a = stats.get(c.key)
        if a is None:
            return None
        a = torch.as_tensor(a, dtype=torch.float64)
        amax = a if amax is None else torch.maximum(amax, a)
    wmax = None
    for c in group.consumers:
        w = weights[c.key].double().abs().amax(dim=0)
        wmax = w if wmax is None else torch.maximum(wmax, w)
    if group.channel_map is not None:
        n = int(group.channel_map.max()) + 1
        amax = torch.zeros(n, dtype=torch.float64).scatter_reduce(0, group.channel_map, amax, "amax")
        wmax = torch.zeros(n, dtype=torch.float64).scatter_reduce(0, group.channel_map, wmax, "amax")
    s = amax.clamp_min(1e-5) ** alpha / wmax.clamp_min(1e-5) ** (1 - alpha)
    return s.clamp_min(1e-5)


@dataclass
class _Fold:
    """A group that will be folded, with its scales (one per producer channel)."""

    group: SmoothGroup
    s: torch.Tensor
    record: SiteRecord
    producer_site: LinearSite | None

    def members(self) -> list[LinearSite]:
        return list(self.group.consumers) + ([self.producer_site] if self.producer_site else [])


def _accept_groups(groups, sites, fmt_of, records, weights, stats, alpha) -> tuple[list[_Fold], list[SiteRecord]]:
    """Groups that may fold: every consumer rewritten, a producer linear rewritten too (its rows
    must be divided by s), statistics present, no site in two groups of the same role."""
    by_node = {s.node: s for s in sites}
    folds, recs = [], []
    as_consumer, as_producer = set(), set()
    for g in groups:
        rec = SiteRecord(kind="norm", module=g.module, key=f"{g.module}:smooth", status="skipped",
                         pattern=f"{g.kind} -> {len(g.consumers) or 'no'} linear(s)", source=source_line(g.producer),
                         module_type=module_class(g.producer), details={"consumers": [c.key for c in g.consumers]})
        recs.append(rec)
        prod = by_node.get(g.producer) if g.kind in ("linear", "attention-v") else None
        bad = [c.key for c in g.consumers if fmt_of.get(c.key) is None]
        if g.skip_reason:
            rec.reason = g.skip_reason
        elif bad:
            rec.reason = f"a consumer of this output is not rewritten: {bad[0]} ({records[bad[0]].reason})"
        elif prod is not None and fmt_of.get(prod.key) is None:
            rec.reason = (f"the producer linear {prod.key} is not rewritten ({records[prod.key].reason}): "
                          "its output channels could not be divided by the scales")
        elif any(c.key in as_consumer for c in g.consumers) or g.producer in as_producer:
            rec.reason = "overlaps another smoothing group"
        else:
            s = _smooth_scales(g, weights, stats, alpha)
            if s is None:
                rec.reason = "no activation statistics in the plan (run attnopt.calibrate with linear.smooth)"
            else:
                as_consumer.update(c.key for c in g.consumers)
                as_producer.add(g.producer)
                folds.append(_Fold(g, s, rec, prod))
    return folds, recs


def _folded_tensors(folds: list[_Fold], weights: dict, params: dict) -> tuple[dict, dict]:
    """(key -> weight [N, K] with the scales folded in, key -> new bias) for the folds' linears:
    computed in float64 from the originals and rounded once."""
    w64: dict[str, torch.Tensor] = {}
    b64: dict[str, tuple[torch.Tensor, torch.dtype]] = {}
    for f in folds:
        per_input = f.s if f.group.channel_map is None else f.s[f.group.channel_map]
        for c in f.group.consumers:
            w64[c.key] = w64.get(c.key, weights[c.key].double()) * per_input[None, :]
        p = f.producer_site
        if p is not None:
            w64[p.key] = w64.get(p.key, weights[p.key].double()) / f.s[:, None]
            if p.bias is not None:
                b64[p.key] = (params[p.bias].double() / f.s, params[p.bias].dtype)
    new_w = {k: v.to(weights[k].dtype) for k, v in w64.items()}
    new_b = {k: v.to(dt) for k, (v, dt) in b64.items()}
    return new_w, new_b


@dataclass
class _Prepared:
    """Everything one site's rewrite needs, computed before the graph is touched."""

    site: LinearSite
    fmt: str
    w: torch.Tensor  # [N, K], smoothed when changed
    changed: bool
    bias: torch.Tensor | None  # a folded bias, or None (the site's own bias node stays)
    q: tuple | None  # quantized weight tensors


def _prepare(site: LinearSite, fmt: str, w: torch.Tensor, changed: bool, bias) -> _Prepared:
    if fmt in ("w8a8", "fp8"):
        q = L.quantize_weight(w, "int8" if fmt == "w8a8" else "fp8")
    elif fmt == "w4a16":
        q = L.quantize_weight_int4(w)
    else:
        q = None
    return _Prepared(site, fmt, w, changed, bias, q)


def _prepare_all(sites, fmt_of, folds, weights, params, records) -> tuple[dict, list[_Fold]]:
    """Quantize every rewritten site; a group with a member that fails is undone (its members
    quantized again without the scales), so no fold is ever half applied."""
    folds = list(folds)
    prepared: dict[str, _Prepared] = {}
    errors: dict[str, Exception] = {}
    todo = [s for s in sites if fmt_of[s.key] is not None]
    while True:
        new_w, new_b = _folded_tensors(folds, weights, params)
        for s in todo:
            try:
                w = new_w.get(s.key, weights[s.key])
                prepared[s.key] = _prepare(s, fmt_of[s.key], w, s.key in new_w, new_b.get(s.key))
                errors.pop(s.key, None)
            except Exception as e:  # leave the site as it was
                log.warning("attnopt: could not quantize linear %s: %r", s.key, e, exc_info=True)
                prepared.pop(s.key, None)
                errors[s.key] = e
        broken = [f for f in folds if any(m.key in errors for m in f.members())]
        if not broken:
            break
        todo = []
        for f in broken:
            folds.remove(f)
            key = next(m.key for m in f.members() if m.key in errors)
            f.record.reason = f"rewriting {key} failed ({errors[key]!r}): the fold was undone"
            todo += [m for m in f.members() if m.key not in [t.key for t in todo]]
    for key, e in errors.items():
        records[key].reason = f"internal error while rewriting: {e!r}"
    return prepared, folds


# --------------------------------------------------------------------------------- graph edits

def _drop_buffers_since(gm: fx.GraphModule, before: set) -> None:
    """Unregister the quantized copies a failed rewrite added: AOT would lift every buffer as a
    graph input and keep them alive with the compiled graph."""
    sources = getattr(gm, "_param_name_to_source", None)
    for name in set(dict(gm.named_buffers(recurse=False))) - before:
        delattr(gm, name)
        if sources is not None:
            sources.pop(name, None)


class LinearRewriter:
    """Applies decisions to the graph: constants registered on the module, op calls inserted."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.fake_mode = detect_fake_mode([_example(n) for n in gm.graph.nodes if _example(n) is not None])
        self.count = 0

    def const(self, t: torch.Tensor, before: fx.Node, name: str) -> fx.Node:
        attr = f"_attnopt_{name}_{self.count}"
        self.count += 1
        self.gm.register_buffer(attr, t.detach().contiguous())
        sources = getattr(self.gm, "_param_name_to_source", None)
        if sources is not None:  # AOT expects every buffer of a Dynamo graph to have a source
            from torch._dynamo.source import ConstantSource

            sources[attr] = ConstantSource(f"attnopt_const_{attr}")
        with self.gm.graph.inserting_before(before):
            node = self.gm.graph.get_attr(attr)
        if self.fake_mode is not None:
            node.meta["example_value"] = self.fake_mode.from_tensor(getattr(self.gm, attr), static_shapes=True)
        return node

    def call(self, target, args, anchor: fx.Node) -> fx.Node:
        with self.gm.graph.inserting_before(anchor):
            node = self.gm.graph.call_function(target, tuple(args))
        for k in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if k in anchor.meta:
                node.meta[k] = anchor.meta[k]
        if "example_value" in anchor.meta:
            node.meta["example_value"] = anchor.meta["example_value"]
        return node


class _Baked:
    """Parameters whose values were copied into the compiled graph (quantized, smoothed or
    folded): the backend checks them on every call, since later changes would not be seen."""

    def __init__(self, index: dict, params: dict):
        self.index, self.params = index, params
        self.items: dict[int, tuple[int | None, torch.Tensor, str]] = {}

    def add(self, node: fx.Node | None, role: str, module: str) -> None:
        if node is None or node not in self.params:
            return
        t = self.params[node]
        self.items.setdefault(id(t), (self.index.get(node), t, f"{role} of {module or '<top>'} ({node.name})"))


def _fold_norm(rw: LinearRewriter, f: _Fold, params: dict, baked: _Baked) -> None:
    """gamma' = gamma / s (and beta' = beta / s) as constants of the graph."""
    node = f.group.producer
    _, gamma, beta = _norm_kind(node, params)
    for ph, role in ((gamma, "weight"), (beta, "bias")):
        if ph is None:
            continue
        new = (params[ph].double() / f.s).to(params[ph].dtype)
        node.replace_input_with(ph, rw.const(new, node, "smooth_norm"))
        baked.add(ph, role, f.group.module)


def _rewrite_linear(rw: LinearRewriter, p: _Prepared, small_m: int, spec: ArchSpec, probe_sink: str | None,
                    rec: SiteRecord, capture_all: bool, baked: _Baked) -> None:
    s, fmt, w = p.site, p.fmt, p.w
    n, k = w.shape
    if fmt == "none" and not p.changed and not (probe_sink is not None and capture_all):
        rec.reason = "linear.quant is 'none' (no smoothing scales folded here)"
        return
    bias = s.bias
    if p.bias is not None:
        bias = rw.const(p.bias, s.node, "smooth_bias")
        baked.add(s.bias, "bias", s.module)
    if fmt in ("w8a8", "fp8"):
        q = (rw.const(p.q[0], s.node, "wq"), rw.const(p.q[1], s.node, "ws"), None)
    elif fmt == "w4a16":
        q = tuple(rw.const(t, s.node, nm) for t, nm in zip(p.q, ("w4", "w4s", "w4z")))
    else:  # "none": smoothed weights only (or a calibration capture)
        q = None
    if q is not None or p.changed:
        baked.add(s.weight, "weight", s.module)
    x = s.x
    if probe_sink is not None:
        if p.changed:
            w_node = rw.const(w, s.node, "wref")
        else:
            w_node = rw.call(torch.t, [s.weight], s.node) if s.transposed else s.weight
        args = [x, w_node, bias, q[0] if q else w_node, q[1] if q else w_node, q[2] if q else None,
                fmt if q else "none", small_m, spec.name, f"{probe_sink}/{s.key}"]
        new = rw.call(torch.ops.attnopt.linear_probe.default, args, s.node)
    elif q is None:
        new = rw.call(torch._C._nn.linear, [x, rw.const(w, s.node, "wsmooth"), bias], s.node)
    elif fmt == "w4a16":
        new = rw.call(torch.ops.attnopt.linear_w4a16.default, [x, *q, bias, L.W4_GROUP, spec.name, "auto"], s.node)
    else:
        new = rw.call(torch.ops.attnopt.linear_8bit.default, [x, q[0], q[1], bias, "int8" if fmt == "w8a8" else "fp8",
                                                              small_m, spec.name, "auto"], s.node)
    s.node.replace_all_uses_with(new)
    if q is None and not p.changed:  # a calibration capture of an unchanged linear
        rec.reason = "linear.quant is 'none' (statistics captured)"
        return
    rec.status = "rewritten"
    before, after = L.weight_bytes(fmt, n, k, w.element_size())
    rec.op = {"w8a8": "attnopt::linear_8bit", "fp8": "attnopt::linear_8bit", "w4a16": "attnopt::linear_w4a16"}.get(
        fmt, "aten::linear (smoothed weights)")
    m = _static_m(x)
    path, words = _path_note(fmt, m, small_m)
    where = "reference" if spec.name == "cpu" else f"triton/{spec.name}"
    rec.kernel = f"{where}/{fmt}: {words}" if fmt != "none" else "smoothed weights, unquantized"
    rec.details.update(format=fmt, weight_bytes_before=before, weight_bytes_after=after, smoothed=p.changed,
                       m=m, path=path)


def _apply(gm, folds, prepared, records, params, lin, spec, probe_sink, capture_all, baked) -> None:
    rw = LinearRewriter(gm)
    for f in folds:
        if f.group.kind in ("rmsnorm", "layernorm"):
            _fold_norm(rw, f, params, baked)
        f.record.status = "rewritten"
        f.record.details.update(alpha=lin.smooth.alpha, scale_min=float(f.s.min()),
                                scale_max=float(f.s.max()))
    for key, p in prepared.items():
        _rewrite_linear(rw, p, lin.min_m - 1, spec, probe_sink, records[key], capture_all, baked)
        log.info("linear site %s: %s (%s)", key, records[key].status, records[key].reason or records[key].kernel)


def run_linear_pass(gm: fx.GraphModule, example_inputs, opts, spec: ArchSpec, probe_sink: str | None = None,
                    capture_all: bool = False) -> list[SiteRecord]:
    """Rewrite the linears of Dynamo's graph in place; return one record per candidate site.
    The parameters whose values the graph now holds copies of go to gm.meta[BAKED_META_KEY]."""
    lin = opts.linear
    plan_sites = opts.plan.sites if opts.plan is not None else {}
    params, index = _params(gm, example_inputs)
    sites = find_linears(gm, params)
    if not sites:
        return []
    records = {s.key: SiteRecord(kind="linear", module=s.module, key=s.key, status="skipped", pattern=s.pattern,
                                 source=source_line(s.node), module_type=module_class(s.node)) for s in sites}
    weights = {s.key: _weight_nk(s, params[s.weight]).detach() for s in sites}
    fmt_of = _choose_formats(sites, records, params, weights, opts, spec, plan_sites, capture_all)
    stats = {k: v.get("act_absmax") for k, v in plan_sites.items() if v.get("kind") == "linear"}
    groups = smooth_groups(sites, params) if lin.smooth is not None else []
    alpha = float(lin.smooth.alpha) if lin.smooth is not None else 0.0
    folds, norm_records = _accept_groups(groups, sites, fmt_of, records, weights, stats, alpha)
    prepared, folds = _prepare_all(sites, fmt_of, folds, weights, params, records)
    backup = copy_graph(gm.graph)
    buffers_before = set(dict(gm.named_buffers(recurse=False)))
    baked = _Baked(index, params)
    try:
        _apply(gm, folds, prepared, records, params, lin, spec, probe_sink, capture_all, baked)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
    except Exception as e:  # all or nothing: the graph as Dynamo gave it
        log.warning("attnopt: linear pass failed, graph left unchanged: %r", e, exc_info=True)
        gm.graph = backup
        _drop_buffers_since(gm, buffers_before)
        baked.items.clear()
        for rec in list(records.values()) + norm_records:
            rec.status, rec.op, rec.kernel = "skipped", None, None
            rec.reason = f"internal error while rewriting the graph (left unchanged): {e!r}"
    gm.recompile()
    gm.meta[BAKED_META_KEY] = list(baked.items.values())
    return list(records.values()) + norm_records
