"""Where attention is matched: SDPA calls and hand-written matmul-softmax-matmul subgraphs.

Runs on the aten graph `aten_capture.trace_to_aten` traces from Dynamo's graph (the forward graph
AOTAutograd would build), i.e. before Inductor's own SDPA fusion, so hand-written forms are still visible (tril / iota causal masks, repeat_kv,
fp32 softmax casts, einsum layouts) and user SDPA calls appear as their decomposed aten ops.

`find_attention_sites(graph)` only reads the graph. It returns every candidate: a site that can
be rewritten carries its operands and mask; one that cannot carries the reason, so the report
can say why it was left alone.
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .graph_utils import (aten, is_call, known_eq, module_class, module_path, prims, scalar_value, shape,
                          source_line, static_int)
from .layout import Atom, Traced, covers_in_order, initial_dims, is_layout_op, propagate, trace, trace_to
from .masks import MASK_FILL_MAX, KeepMask, read_additive, split_keep

SDPA_OPS = {
    # op: (index of attn_mask/bias arg or None, dropout index, is_causal index, tuple output?)
    aten.scaled_dot_product_attention.default: (3, 4, 5, False),
    aten._scaled_dot_product_flash_attention_for_cpu.default: ("attn_mask", 3, 4, True),
    aten._scaled_dot_product_flash_attention.default: (None, 3, 4, True),
    aten._scaled_dot_product_efficient_attention.default: (3, 5, 6, True),
    aten._scaled_dot_product_cudnn_attention.default: (3, 5, 6, True),
    aten._scaled_dot_product_attention_math.default: (3, 4, 5, True),
    aten._scaled_dot_product_fused_attention_overrideable.default: (3, 4, 5, True),
}

log = logging.getLogger("attnopt")

_BMM = (aten.bmm.default, aten.baddbmm.default)
_CAST = (prims.convert_element_type.default, aten._to_copy.default)
_PASSTHRU = (aten.clone.default, aten.alias.default) + _CAST


@dataclass
class Operand:
    """A [batch..., rows, cols] view of `traced.src` (rows = tokens, cols = features)."""

    traced: Traced
    batch: list  # atoms, flattened batch order
    rows: list
    cols: list


@dataclass
class AttentionSite:
    pattern: str  # what was matched, for the report
    anchor: fx.Node  # its uses receive the op's output (reshaped to the anchor's shape)
    module: str
    module_type: str
    source: str
    q: Operand | None = None
    k: Operand | None = None
    v: Operand | None = None
    scale: float = 1.0
    bias: list = field(default_factory=list)  # (node, coefficient): natural-log logits added
    keep: KeepMask = field(default_factory=KeepMask)
    fill: float = -math.inf
    dropout_p: float = 0.0
    softcap: float = 0.0  # > 0: logits = softcap * tanh(scale * qk / softcap) before bias and masks
    logits_node: fx.Node | None = None  # masks broadcast against this node's shape
    heads: object = None  # query heads when the graph states them (4-D SDPA input / logits)
    kv_heads: object = None  # K/V heads when the graph states them (4-D SDPA k / v, enable_gqa)
    internal: set = field(default_factory=set)  # nodes the rewrite makes dead
    reject: str | None = None  # set when the site cannot be rewritten safely


def _operand(node: fx.Node, batch_dims: list[int], row_dim: int, col_dim: int) -> Operand:
    def accept(t: Traced) -> bool:  # tokens and features must each be one source dim
        return len(t.dims[row_dim]) <= 1 and len(t.dims[col_dim]) <= 1

    t = trace(node, accept)
    return Operand(t, [a for d in batch_dims for a in t.dims[d]], t.dims[row_dim], t.dims[col_dim])


def _compose(op: Operand, t: Traced) -> Operand | None:
    """`op` is a view of t.node's output; re-express it as a view of t.src."""
    def sub(atoms):
        out = []
        for a in atoms:
            out.extend([a] if a.broadcast else t.dims[a.src])
        return out

    new = Operand(t, sub(op.batch), sub(op.rows), sub(op.cols))
    if len(new.rows) > 1 or len(new.cols) > 1:
        return None
    return new


_F16 = (torch.float16, torch.bfloat16)


def _peel(op: Operand, allow_scale: bool) -> tuple[Operand, float]:
    """Look through a lossless fp32 upcast of a 16-bit tensor and (q/k) a constant scale.

    Models and SDPA's math fallback compute attention in fp32 from fp16/bf16 inputs, sometimes
    scaling q and k by sqrt(scale) each; the op takes the 16-bit tensors and folds the scale.
    """
    factor = 1.0
    while True:
        src = op.traced.src
        if is_call(src, *_CAST) and src.meta["val"].dtype == torch.float32 and \
                src.args[0].meta["val"].dtype in _F16:
            nxt = src.args[0]
        elif allow_scale and is_call(src, aten.mul.Tensor, aten.mul.Scalar) and \
                isinstance(src.args[0], fx.Node) and scalar_value(src.args[1]) is not None and \
                shape(src.args[0]) == shape(src) and scalar_value(src.args[1]) > 0:
            factor *= scalar_value(src.args[1])
            nxt = src.args[0]
        else:
            return op, factor
        composed = _compose(op, trace(nxt))
        if composed is None:
            return op, factor
        op = composed


def _sdpa_site(node: fx.Node) -> AttentionSite:
    mask_at, drop_at, causal_at, tupled = SDPA_OPS[node.target]
    site = AttentionSite(f"sdpa:{node.target.__name__.split('.')[0]}", node, module_path(node),
                         module_class(node), source_line(node))
    args = list(node.args)

    def arg(i, default=None):
        if isinstance(i, str):
            return node.kwargs.get(i, default)
        return args[i] if i is not None and i < len(args) else default

    q, k, v = args[:3]
    nd = len(shape(q))
    if nd < 3 or len(shape(k)) != nd or len(shape(v)) != nd:
        site.reject = "q, k, v of different ranks"
        return site
    lead = list(range(nd - 2))
    site.q, site.k, site.v = (_operand(x, lead, nd - 2, nd - 1) for x in (q, k, v))
    site.heads = shape(q)[-3] if nd == 4 else None
    if nd == 4:
        if not known_eq(shape(k)[-3], shape(v)[-3]):
            site.reject = "k and v have different head counts"
            return site
        site.kv_heads = shape(k)[-3]
    scale = node.kwargs.get("scale")
    site.scale = float(scale) if scale is not None else 1.0 / math.sqrt(static_int(shape(q)[-1]))
    site.dropout_p = float(arg(drop_at, 0.0) or 0.0)
    if arg(causal_at, False):
        site.keep = KeepMask(0, [])
    mask = arg(mask_at)
    if isinstance(mask, fx.Node):
        _add_mask(site, mask)
    if tupled:
        outs = [u for u in node.users]
        if not all(is_call(u, operator.getitem) for u in outs):
            site.reject = "SDPA tuple output used as a whole"
            return site
        used = [u for u in outs if u.users]
        if any(u.args[1] != 0 for u in used):
            site.reject = "SDPA's logsumexp / extra outputs are used by other ops: rewriting would drop them"
            return site
        firsts = [u for u in outs if u.args[1] == 0]
        if len(firsts) != 1:
            site.reject = "SDPA output read more than once"
            return site
        site.anchor = firsts[0]
        site.internal = set(outs) | {node}
    else:
        site.internal = {node}
    return site


def _add_mask(site: AttentionSite, mask: fx.Node) -> None:
    """Fold an SDPA attn_mask (bool keep mask or float additive mask) into the site."""
    if mask.meta["val"].dtype == torch.bool:
        km = split_keep(mask)
        _merge_keep(site, km, -math.inf)
        return
    add = read_additive(mask)
    if add.keep is not None:
        _merge_keep(site, split_keep(add.keep, add.keep_negated), add.fill)
    else:
        site.bias.append((add.bias, 1.0))


def _merge_keep(site: AttentionSite, km: KeepMask, fill: float) -> None:
    has_keep = site.keep.causal_offset is not None or site.keep.residual
    if has_keep and fill != site.fill:
        if math.isinf(fill) != math.isinf(site.fill) or not math.isinf(fill):
            site.reject = f"masks with different fill values ({site.fill} and {fill})"
            return
    site.fill = fill
    off = site.keep.causal_offset
    if km.causal_offset is not None:
        off = km.causal_offset if off is None else min(off, km.causal_offset)
    site.keep = KeepMask(off, site.keep.residual + km.residual)


# ------------------------------------------------------------------------------ manual form


def _is_zero(x) -> bool:
    if scalar_value(x) == 0.0:
        return True
    if is_call(x, aten.full.default) and x.args[1] == 0:
        return True
    return is_call(x, aten.zeros_like.default) or (is_call(x, aten.full_like.default) and x.args[1] == 0)


def _all_neginf_rows(cond: fx.Node, x: fx.Node) -> bool:
    """cond == 'every logit of the row is -inf': all(x == -inf) or not(any(not(x == -inf)))."""
    def is_eq_neginf(n):
        return is_call(n, aten.eq.Scalar) and n.args[0] is x and n.args[1] == -math.inf

    if is_call(cond, aten.all.dim, aten.all.dims):
        return is_eq_neginf(cond.args[0])
    if is_call(cond, aten.logical_not.default, aten.bitwise_not.default):
        a = cond.args[0]
        return (is_call(a, aten.any.dim, aten.any.dims)
                and is_call(a.args[0], aten.logical_not.default, aten.bitwise_not.default)
                and is_eq_neginf(a.args[0].args[0]))
    return False


def _softmax_input(node: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """If `node` computes softmax(x, -1) (any of its decompositions), return (x, its nodes)."""
    if is_call(node, aten.where.self) and _is_zero(node.args[1]):
        # safe softmax: where(row all -inf, 0, softmax(x)); fully masked rows -> 0, as our op.
        # On 16-bit logits the softmax runs on an fp32 upcast and is cast back; the row test
        # reads the 16-bit logits (an upcast keeps -inf, so it is the same test).
        sm, casts = node.args[2], []
        while is_call(sm, *_CAST):
            casts.append(sm)
            sm = sm.args[0]
        inner = _softmax_input(sm)
        if inner is None:
            return None
        x, nodes = inner
        nodes = nodes + casts
        probe = x
        while not _all_neginf_rows(node.args[0], probe):
            if not (is_call(probe, *_CAST) and probe.meta["val"].dtype == torch.float32
                    and probe.args[0].meta["val"].dtype in _F16):
                return None
            probe = probe.args[0]
        extra, stack = [node], [node.args[0], node.args[1]]
        while stack:  # the row test's own nodes
            n = stack.pop()
            if isinstance(n, fx.Node) and n is not x and n is not probe and n.op == "call_function":
                extra.append(n)
                stack.extend(a for a in n.args if isinstance(a, fx.Node))
        return x, nodes + extra
    if is_call(node, aten._softmax.default, aten.softmax.int, aten._safe_softmax.default):
        x, dim = node.args[0], node.args[1]
        return (x, [node]) if dim % len(shape(x)) == len(shape(x)) - 1 else None
    if not is_call(node, aten.div.Tensor):
        return None
    e, s = node.args
    if not (is_call(e, aten.exp.default) and is_call(s, aten.sum.dim_IntList) and s.args[0] is e):
        return None
    sub = e.args[0]
    if not is_call(sub, aten.sub.Tensor) or not is_call(sub.args[1], aten.amax.default):
        return None
    x, mx = sub.args[0], sub.args[1]
    if mx.args[0] is not x:
        return None
    nd = len(shape(x))
    for red in (mx, s):
        dims = red.args[1]
        keep = red.args[2] if len(red.args) > 2 else red.kwargs.get("keepdim", False)
        if len(dims) != 1 or dims[0] % nd != nd - 1 or not keep:
            return None
    return x, [node, e, s, sub, mx]


def _dropout_input(node: fx.Node) -> tuple[fx.Node, float, list] | None:
    """Attention dropout in any decomposition -> (input, p, its nodes)."""
    if is_call(node, operator.getitem) and node.args[1] == 0 and is_call(node.args[0], aten.native_dropout.default):
        d = node.args[0]
        p = float(d.args[1]) if d.args[2] is not False else 0.0
        return d.args[0], p, [node, d]
    # math SDPA: mul(mul(gt(rand, p), x), 1 / (1 - p))
    if is_call(node, aten.mul.Tensor) and scalar_value(node.args[1]) is not None:
        inner = node.args[0]
        if is_call(inner, aten.mul.Tensor) and is_call(inner.args[0], aten.gt.Scalar) and is_call(
                inner.args[0].args[0], aten.rand.default):
            gt = inner.args[0]
            return inner.args[1], float(gt.args[1]), [node, inner, gt, gt.args[0]]
    return None


def _trace_probs(pv_bmm: fx.Node):
    """From the P.V matmul's first operand back to a softmax.

    Returns (softmax output, softmax input, softmax nodes, chain of layout/cast nodes from the
    softmax output to the operand, in forward order) or None.
    """
    if pv_bmm.target is not aten.bmm.default:
        return None
    cur = pv_bmm.args[0]
    chain = []
    dropout_p = 0.0
    while True:
        if is_layout_op(cur) or is_call(cur, *_CAST):
            chain.append(cur)
            cur = cur.args[0]
            continue
        drop = _dropout_input(cur)
        if drop is not None:
            x, p, nodes = drop
            dropout_p = max(dropout_p, p)
            chain.extend(nodes)
            cur = x
            continue
        break
    sm = _softmax_input(cur)
    if sm is None:
        return None
    chain.reverse()
    return cur, sm[0], sm[1], chain, dropout_p


def _pv_operand_ok(p_node: fx.Node, chain: list[fx.Node]) -> bool:
    """The P.V operand is P as [batch (P's leading dims in order), queries, keys]."""
    dims = initial_dims(p_node)
    for op in chain:
        if is_layout_op(op):
            dims = propagate(dims, op, allow_split=True)
            if dims is None:
                return False
    r = len(shape(p_node))
    full = shape(p_node)
    if len(dims) != 3:
        return False

    def whole(a, d):
        return a.src == d and known_eq(a.stride, 1) and known_eq(a.size, full[d])

    lead = [d for d in range(r - 2) if not known_eq(full[d], 1)]
    return (len(dims[0]) == len(lead) and all(whole(a, d) for a, d in zip(dims[0], lead))
            and len(dims[1]) == 1 and whole(dims[1][0], r - 2)
            and len(dims[2]) == 1 and whole(dims[2][0], r - 1))


def _manual_site(pv: fx.Node) -> AttentionSite | None:
    found = _trace_probs(pv)
    if found is None:
        return None
    p_node, x, sm_nodes, p_chain, dropout_p = found
    site = AttentionSite("matmul-softmax-matmul", pv, module_path(sm_nodes[0]), module_class(sm_nodes[0]),
                         source_line(sm_nodes[0]))
    site.internal = set(sm_nodes) | set(p_chain) | {pv}
    site.dropout_p = dropout_p
    if not _pv_operand_ok(p_node, p_chain):
        return None  # softmax output contracted over anything but keys: not attention

    # -- score side: walk from the softmax input back to QK^T, collecting scale and masks
    chain = []
    cur = x
    while not is_call(cur, *_BMM) and not is_layout_op(cur):
        if not isinstance(cur, fx.Node) or cur.op != "call_function":
            site.reject = "softmax input is not computed from a matmul"
            return site
        chain.append(cur)
        if is_call(cur, aten.where.self):
            cur = _score_operand_of_where(cur)
            if cur is None:
                site.reject = "torch.where between QK^T and softmax is not a mask"
                return site
        elif is_call(cur, aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor):
            cur = _score_operand_of_binary(cur)
            if cur is None:
                site.reject = f"{chain[-1].target} between QK^T and softmax is not a scale or mask"
                return site
        elif is_call(cur, *_PASSTHRU, aten.tanh.default):
            cur = cur.args[0]
        else:
            site.reject = f"unsupported op {cur.target} between QK^T and softmax"
            return site
    logits = cur  # first node after QK^T's layout ops (or the bmm itself)
    qk = logits
    # Below the logits' layout ops: constant scales and casts (they commute with layout ops), and
    # additive terms on QK^T's own [batch, queries, keys] frame, below every layout op (DeBERTa's
    # disentangled c2p / p2c terms: bmm + rel_att, then view to heads).
    inner = []
    while True:
        if is_layout_op(qk):
            qk = qk.args[0]
        elif _is_scalar_scale(qk) or is_call(qk, *_CAST):
            inner.append(qk)
            qk = qk.args[0]
        elif is_call(qk, aten.add.Tensor, aten.sub.Tensor) and _score_operand_of_binary(qk) is not None and \
                all(isinstance(a, fx.Node) for a in qk.args[:2]):
            inner.append(qk)
            qk = _score_operand_of_binary(qk)
        else:
            break
    if not is_call(qk, *_BMM):
        site.reject = "softmax input is not computed from a matmul"
        return site
    for n in inner:
        if is_call(n, aten.add.Tensor, aten.sub.Tensor):
            below = _layout_nodes(n, qk, frozenset(inner)) - set(inner)
            if below or not all(known_eq(a, b) for a, b in zip(shape(n), shape(qk))) or \
                    len(shape(n)) != len(shape(qk)):
                site.reject = "a term added to QK^T between its layout ops"
                return site
    chain.reverse()
    chain = inner[::-1] + chain
    site.internal |= set(chain) | {qk}
    ldims = trace_to(logits, qk, frozenset(inner), _inner_input)
    if ldims is None or not _logits_ok(ldims):
        site.reject = "QK^T is not laid out as [batch, queries, keys] before softmax"
        return site
    site.internal |= _layout_nodes(logits, qk, frozenset(inner))
    site.logits_node = logits
    site.heads = shape(logits)[-3] if len(shape(logits)) == 4 else None
    if len(shape(x)) != len(shape(logits)) or not all(known_eq(a, b) for a, b in zip(shape(x), shape(logits))):
        site.reject = "masks broadcast the logits to a larger shape"
        return site

    a, b = (qk.args[1], qk.args[2]) if qk.target is aten.baddbmm.default else qk.args[:2]
    scale = 1.0
    first_bias = []
    if qk.target is aten.baddbmm.default:
        beta = qk.kwargs.get("beta", 1)
        scale = float(qk.kwargs.get("alpha", 1))
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta):
            site.reject = f"baddbmm with beta={beta!r}"
            return site
        if beta != 0:  # beta * input + alpha * QK^T (Bloom's ALiBi): the input is an additive bias
            inp = qk.args[0]
            if not isinstance(inp, fx.Node) or len(shape(inp)) > 3:
                site.reject = "baddbmm input is not a tensor broadcast to [batch, queries, keys]"
                return site
            first_bias = [(QkBias(inp), float(beta))]
    site.q, fq = _peel(_operand(a, [0], 1, 2), allow_scale=True)
    site.k, fk = _peel(_operand(b, [0], 2, 1), allow_scale=True)  # b is K^T: its rows are features
    site.v, _ = _peel(_operand(pv.args[1], [0], 1, 2), allow_scale=False)
    _apply_score_chain(site, chain, scale * fq * fk, logits, first_bias, n_inner=len(inner))
    return site


@dataclass(frozen=True)
class QkBias:
    """A bias in the QK^T bmm's own frame [batch, queries, keys] (baddbmm's input), not the logits'."""

    node: fx.Node


@dataclass(frozen=True)
class FillBias:
    """where(keep, 0, fill) as an additive bias, in `dtype`: a finite masked fill followed by an
    additive mask, eager's where(keep, s, fill) + m == where(keep, s + m, fill + m), kept exact
    (fill + m, not fill, at masked positions) by adding both as biases instead of a keep mask."""

    conds: tuple  # (node, negated): keep where every node is True (False when negated)
    fill: float
    dtype: torch.dtype


def _inner_input(n: fx.Node) -> fx.Node:
    return _score_operand_of_binary(n) if is_call(n, aten.add.Tensor, aten.sub.Tensor) else n.args[0]


def _is_scalar_scale(n) -> bool:
    return (is_call(n, aten.mul.Tensor, aten.div.Tensor) and isinstance(n.args[0], fx.Node)
            and scalar_value(n.args[1]) is not None and scalar_value(n.args[1]) > 0
            and shape(n) == shape(n.args[0]))


def _layout_nodes(top: fx.Node, bottom: fx.Node, through: frozenset = frozenset()) -> set:
    """Nodes from `top` down to `bottom` (excluded) along the score path."""
    out, cur = set(), top
    while cur is not bottom:
        out.add(cur)
        cur = _score_operand_of_binary(cur) if cur in through and is_call(
            cur, aten.add.Tensor, aten.sub.Tensor) else cur.args[0]
    return out


def _logits_ok(dims) -> bool:
    """Logits [lead..., q, k] against the QK^T bmm [batch, q, k]: keys and queries are whole bmm
    dims and the leading dims enumerate the bmm batch in order."""
    if len(dims) < 2:
        return False
    if [a.src for a in dims[-1]] != [2] or [a.src for a in dims[-2]] != [1]:
        return False
    if not all(known_eq(a.stride, 1) for a in dims[-1] + dims[-2]):
        return False
    lead_atoms = [a for d in dims[:-2] for a in d]
    if not lead_atoms:
        return True  # batch of size 1
    return all(a.src == 0 for a in lead_atoms) and covers_in_order(lead_atoms, 0, _prod_atoms(lead_atoms))


def _prod_atoms(atoms):
    out = 1
    for a in atoms:
        out = out * a.size
    return out


def _score_operand_of_where(w: fx.Node):
    cond, a, b = w.args
    if scalar_value(b) is not None and isinstance(a, fx.Node) and len(shape(a)) > 0:
        return a
    if scalar_value(a) is not None and isinstance(b, fx.Node) and len(shape(b)) > 0:
        return b
    return None


def _score_operand_of_binary(n: fx.Node):
    a, b = n.args[0], n.args[1]
    if n.target in (aten.mul.Tensor, aten.div.Tensor):
        if scalar_value(b) is not None and isinstance(a, fx.Node):
            return a
        if n.target is aten.mul.Tensor and scalar_value(a) is not None and isinstance(b, fx.Node):
            return b
        return None
    # add / sub: the score operand is the one that leads back to the matmul; prefer the larger
    if n.kwargs.get("alpha", 1) != 1:
        return None
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return a if isinstance(a, fx.Node) and scalar_value(b) is not None else None
    la, lb = _leads_to_bmm(a), _leads_to_bmm(b)
    if la and lb:
        return None  # several matmuls add into the logits (e.g. relative-position terms)
    if la:
        return a
    if n.target is aten.add.Tensor and lb:
        return b
    return None


def _leads_to_bmm(n: fx.Node, depth: int = 0) -> bool:
    if depth > 16 or not isinstance(n, fx.Node) or n.op != "call_function":
        return False
    if is_call(n, *_BMM):
        return True
    if is_layout_op(n) or is_call(n, *_PASSTHRU, aten.tanh.default):
        return _leads_to_bmm(n.args[0], depth + 1)
    if is_call(n, aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.where.self):
        return any(_leads_to_bmm(a, depth + 1) for a in n.args if isinstance(a, fx.Node))
    return False


def _apply_score_chain(site: AttentionSite, chain: list[fx.Node], scale: float, logits: fx.Node,
                       first_bias: list | None = None, n_inner: int = 0) -> bool:
    """Read scale, additive masks and fills off the ops between QK^T and softmax, in order.

    The first `n_inner` ops of the chain (constant scales / casts) sit below `logits`' layout ops:
    the next op reads the logits through `logits`.

    The logits are kept in the form where(keep, scale * qk + sum(c_i * bias_i), fill), or with
    soft-capping where(keep, a * tanh(b * qk) + sum(c_i * bias_i), fill) (then softcap = a and
    scale = a * b); an op that does not fit that form rejects the site.
    """
    biases: list = list(first_bias or [])
    keep = KeepMask()
    fill = None
    where_conds: list = []  # (cond, negated) of the torch.where fills behind `keep`
    additive_keep = False  # part of `keep` came from an additive where(keep, 0, NEG) mask
    prev = logits  # the node carrying the logits into n
    tanh_at = next((i for i, n in enumerate(chain) if n.target is aten.tanh.default), None)
    pre_tanh = None  # the multiplier inside tanh, once it is seen
    for i, n in enumerate(chain):
        t = n.target
        if tanh_at is not None and i < tanh_at and t not in (aten.mul.Tensor, aten.div.Tensor) and \
                t not in _PASSTHRU:
            site.reject = (f"{t} before the logit soft-capping tanh: only a scale may come before it "
                           "(a mask or bias inside tanh is not soft-capping)")
            return False
        if t is aten.tanh.default:
            if pre_tanh is not None:
                site.reject = "tanh applied twice to the logits"
                return False
            if biases or fill is not None:
                site.reject = "a bias or mask inside the logit soft-capping tanh is not soft-capping"
                return False
            pre_tanh, scale = scale, 1.0
        elif t in (aten.mul.Tensor, aten.div.Tensor):
            c = scalar_value(n.args[1]) if scalar_value(n.args[1]) is not None else scalar_value(n.args[0])
            if c is None or c == 0:
                site.reject = "logits scaled by a non-constant"
                return False
            f = c if t is aten.mul.Tensor else 1.0 / c
            if f < 0:
                site.reject = "negative logit scale"
                return False
            scale *= f
            biases = [(m, k * f) for m, k in biases]
            if fill is not None and fill != -math.inf:
                fill *= f
        elif t in (aten.add.Tensor, aten.sub.Tensor) and i < n_inner:  # a term on QK^T's own frame
            score = _score_operand_of_binary(n)
            other = n.args[1] if score is n.args[0] else n.args[0]
            biases.append((QkBias(other), -1.0 if (t is aten.sub.Tensor and other is n.args[1]) else 1.0))
        elif t in (aten.add.Tensor, aten.sub.Tensor):
            a, b = n.args[0], n.args[1]
            other = b if a is prev else a
            sign = -1.0 if (t is aten.sub.Tensor and other is b) else 1.0
            if t is aten.sub.Tensor and other is a:
                site.reject = "logits subtracted from a tensor"
                return False
            if not isinstance(other, fx.Node):
                continue  # adding a constant to every logit: softmax ignores it
            if len(shape(other)) == 0:
                continue
            if fill is not None and fill != -math.inf:
                if additive_keep or not where_conds:
                    site.reject = "additive mask applied after a finite masked fill"
                    return False
                # where(keep, s, fill) + m: masked positions hold fill + m in eager; keep that
                # exactly by turning the fill into a bias (the causal rule is then not used)
                biases.append((FillBias(tuple(where_conds), fill, prev.meta["val"].dtype), 1.0))
                keep, fill, where_conds = KeepMask(), None, []
            add = read_additive(other)
            # After a fill turned bias, a mask's masked positions hold fill + NEG in eager (-inf where
            # that overflows), not NEG: read it as a plain bias too, so the sum stays eager's
            fill_bias = any(isinstance(m, FillBias) for m, _ in biases)
            if add.keep is not None and sign > 0 and not fill_bias:
                fill = _merge_fill(site, fill, add.fill)
                if fill is None:
                    return False
                km = split_keep(add.keep, add.keep_negated)
                keep = _and_keep(keep, km)
                additive_keep = True
            else:
                biases.append((other, sign))
        elif t is aten.where.self:
            cond, a, b = n.args
            if scalar_value(b) is not None:
                negated, fv = False, scalar_value(b)
            else:
                negated, fv = True, scalar_value(a)
            if fv is None or (fv > MASK_FILL_MAX and fv != -math.inf):
                site.reject = f"torch.where fills logits with {fv}, not a mask value"
                return False
            fill = _merge_fill(site, fill, fv)
            if fill is None:
                return False
            keep = _and_keep(keep, split_keep(cond, negated))
            where_conds.append((cond, negated))
        prev = n if i >= n_inner else logits
    if pre_tanh is not None:  # a * tanh(b * qk): cap a, and a * b the scale the op divides by a
        site.softcap = scale
        scale = scale * pre_tanh
    site.scale = scale
    site.bias = biases
    site.keep = keep
    if fill is not None:
        site.fill = fill
    return True


def _merge_fill(site, fill, new):
    if fill is None or fill == new:
        return new
    site.reject = f"masks with different fill values ({fill} and {new})"
    return None


def _and_keep(a: KeepMask, b: KeepMask) -> KeepMask:
    off = a.causal_offset
    if b.causal_offset is not None:
        off = b.causal_offset if off is None else min(off, b.causal_offset)
    return KeepMask(off, a.residual + b.residual)


def find_attention_sites(graph: fx.Graph) -> list[AttentionSite]:
    """Every attention candidate in graph order (rewritable or with a reject reason)."""
    sites = []
    for node in graph.nodes:
        if node.op != "call_function" or not (node.target in SDPA_OPS or node.target is aten.bmm.default):
            continue
        try:
            s = _sdpa_site(node) if node.target in SDPA_OPS else _manual_site(node)
        except Exception as e:  # a matcher bug must not break the user's compile
            log.warning("attnopt: matching attention at %s failed: %r", node.name, e, exc_info=True)
            s = AttentionSite("unknown", node, module_path(node), module_class(node), source_line(node),
                              reject=f"internal error while matching: {e!r}")
        if s is not None:
            sites.append(s)
    return sites


__all__ = ["AttentionSite", "Operand", "find_attention_sites", "SDPA_OPS", "Atom"]
