"""Where SmoothQuant groups are found: a producer whose output channels feed only linears.

The linear pass's second finding step (linear_pipeline.py runs the steps): given the linear sites
of linear_match.py, `smooth_groups` returns each producer a shared per-channel scale could be
folded into, with its consumer linears. Three kinds, each exact in exact arithmetic:

- a norm (LayerNorm, RMSNorm, F.rms_norm, HF's hand-written `weight * x * rsqrt(...)`) whose every
  value use is a matched linear, through casts and views that keep the last dim;
- up -> down through SwiGLU (`act(gate) * up`) or ReLU: only up's rows are divided by the scale;
- v_proj -> o_proj through the attention (P.V is linear in V), V's heads followed through the
  head split, a GQA repeat, the attention and the head merge, with a channel map from o_proj's
  input channels back to v_proj's output channels.

Only reads the graph. A V path that reaches an attention but cannot be folded (V also goes into a
KV cache, an op that mixes channels) comes back as a group with a skip_reason for the report.
smoothquant.py computes the scales and decides which groups fold.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..logs import log
from .graph_utils import example_shape, example_value, known_eq, module_path
from .linear_match import MATMUL_FNS, LinearSite, is_transpose

SDPA = torch.nn.functional.scaled_dot_product_attention
_CASTS = ("to", "float", "half", "bfloat16", "double", "type_as")
_META_METHODS = ("size", "dim", "numel", "stride")
_META_ATTRS = ("shape", "dtype", "device", "ndim", "is_cuda")


@dataclass
class SmoothGroup:
    """A producer (norm or linear) whose output feeds only these linears: one shared scale."""

    kind: str  # "rmsnorm" | "layernorm" | "linear" | "attention-v"
    producer: fx.Node
    consumers: list = field(default_factory=list)  # LinearSite
    module: str = ""
    channel_map: torch.Tensor | None = None  # attention-v: consumer input channel -> producer channel
    skip_reason: str | None = None  # a candidate that was found but cannot be folded


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
    a, b = example_value(n.args[0]) if isinstance(n.args[0], fx.Node) else None, example_value(n)
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype


def _same_shape(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(known_eq(x, y) for x, y in zip(a, b))


def _passthrough(n) -> bool:
    """A cast, .contiguous(), or a view keeping the last dim: channel j of each row stays channel j."""
    if _is_cast(n) or (isinstance(n, fx.Node) and n.op == "call_method" and n.target == "contiguous"):
        return True
    if _is_view(n):
        si, so = example_shape(n.args[0]), example_shape(n)
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


def norm_params(n: fx.Node, params: dict) -> tuple[str, fx.Node, fx.Node | None] | None:
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
        kind = norm_params(prod, params)
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
    si, so = example_shape(cur), example_shape(u)
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
    if is_transpose(u) and len(u.args) == 3:
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
    si, so = example_shape(cur), example_shape(u)
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
    si, so = example_shape(cur), example_shape(u)
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
            if not known_eq(example_shape(cur)[-1], hq * st.head_dim):
                return f"o_proj reads {example_shape(cur)[-1]} channels, the heads give {hq} x {st.head_dim}"
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
            if _same_shape(example_shape(u)[:-2], example_shape(n)[:-2]) and _reaches_attention_value(u, s2, depth + 1):
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


