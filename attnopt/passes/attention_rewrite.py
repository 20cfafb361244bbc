"""Decide per attention site, then replace the site with one `torch.ops.attnopt.attention` call.

The decision checks everything that would make a rewrite unsafe or useless (config, dtypes,
head dims, lengths, formats the target arch lacks, intermediates used elsewhere) and returns the
reason; such a site is left exactly as it was.
"""

from __future__ import annotations

import fnmatch
import json
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..codegen.arch import ArchSpec, resolve_pv
from ..codegen.attention.describe import describe_attention_kernel
from ..logs import log
from ..schedule import apply_use
from . import on_cpu
from .attention_match import AttentionSite, FillBias, Operand, QkBias
from .grad_flow import GradFlow
from .graph_utils import GraphBuilder, aten, hint_int, known_eq, known_one, shape, static_int

MAX_HEAD_DIM = 256
_DTYPES_16 = (torch.float16, torch.bfloat16)


class Reject(Exception):
    """A site cannot be rewritten; the message is the reason the report shows."""


@dataclass
class SiteParams:
    """What the op will run at a site (also what the report shows)."""

    quant: str
    pv: str
    smooth_k: bool
    smooth_q: bool
    arch: str
    kernel: str
    sparsity: dict | None = None  # method + (per-head) parameters, for the block-sparse op
    note: str | None = None  # why planned / configured sparse parameters were set aside here
    backward: str | None = None  # in a graph that needs grad: the backward's arithmetic ('int8' | 'exact')


def glob_selected(path: str, include: list[str], exclude: list[str]) -> str | None:
    """None if the module path is selected, else the reason."""
    p = path or "<top>"
    if not any(fnmatch.fnmatchcase(p, g) for g in include):
        return f"module {p!r} not matched by include {include}"
    hit = next((g for g in exclude if fnmatch.fnmatchcase(p, g)), None)
    if hit is not None:
        return f"module {p!r} excluded by {hit!r}"
    return None


def _tensor_meta(op: Operand):
    return op.traced.src.meta["val"]


def _misfit(sp: dict, heads: int) -> str | None:
    """Why sparse parameters cannot run at a site of `heads` query heads (None: they can)."""
    for name, val in sp.items():
        if isinstance(val, list) and name not in ("mask", "dense_heads") and len(val) != heads:
            return f"sparsity.{name} has {len(val)} per-head values for {heads} heads"
    beyond = [h for h in sp.get("dense_heads", []) if h >= heads]
    if beyond:
        return f"dense_heads {beyond} name heads beyond the site's {heads}"
    return None


def sparsity_for(opts, key: str, heads: int, attention=None, entry=None) -> tuple[dict | None, str | None]:
    """(the site's sparse method and parameters, a note or None): its calibrated plan entry, else
    the config's. Parameters that do not fit the site (a plan made for another model, a per-head
    list of another length) fall back, with a note for the report, instead of losing the site:
    a plan entry to the config's defaults, the config's to dense (quantized) attention.
    `attention` / `entry`: a schedule variant's options and plan entry (default: opts')."""
    a = attention if attention is not None else opts.attention
    default = a.sparsity.to_dict() if a.sparsity is not None else None
    if entry is None:
        entry = opts.plan.site(key) if opts.plan is not None else None
    note = None
    if entry is not None and entry.get("kind") == "attention":
        if entry.get("dense"):
            return None, None
        planned = entry.get("sparsity")
        why = _misfit(planned, heads) if planned is not None else None
        if planned is not None and why is None:
            return dict(planned), None
        if why is not None:
            note = f"plan entry ignored ({why}); using the configured sparsity"
    if default is None:
        return None, note
    why = _misfit(default, heads)
    if why is not None:
        return None, (note + "; " if note else "") + f"configured sparsity ignored ({why}): dense"
    return dict(default), note


def check_selected(a, module: str, plain_ok: bool = False) -> None:
    """Raise Reject unless the attention options `a` select the site at module path `module`
    and ask for a change there (`plain_ok`: 16-bit dense attention counts as one, see decide)."""
    if not a.enabled:
        raise Reject("attention.enabled is false")
    why = glob_selected(module, list(a.include), list(a.exclude))
    if why:
        raise Reject(why)
    if a.quant == "none" and a.sparsity is None and not plain_ok:
        raise Reject("attention.quant is 'none' and no sparsity is configured: nothing to change")


def check_operands(a, dtypes: tuple, device_type: str, d: int, dv: int, nq, nk) -> None:
    """Raise Reject unless the options `a` rewrite operands of these dtypes (q, k, v), device,
    head dims and query / key lengths (symbolic lengths may install a guard)."""
    dtype = dtypes[0]
    if dtype not in _DTYPES_16 and not (dtype == torch.float32 and a.allow_fp32):
        raise Reject(f"dtype {dtype} (fp16/bf16 only; fp32 needs attention.allow_fp32)")
    if len(set(dtypes)) != 1:
        raise Reject("q/k/v dtypes differ ({}, {}, {})".format(*dtypes))
    if device_type not in ("cuda", "cpu"):
        raise Reject(f"device {device_type}")
    for name, x in (("head dim", d), ("value head dim", dv)):
        if x > MAX_HEAD_DIM:
            raise Reject(f"{name} {x} > {MAX_HEAD_DIM}")
    if isinstance(nq, int) and nq == 1 and not a.decode:
        raise Reject("decode (one query token): stays dense unless attention.decode is true")
    if a.min_seq_len and not bool(nk >= a.min_seq_len):  # may guard on a symbolic length
        raise Reject(f"key length {nk} < attention.min_seq_len ({a.min_seq_len})")


def choose_formats(opts, key: str, spec: ArchSpec, heads: int, nq, nk, device_type: str,
                   causal: bool = False, attention=None, use=None,
                   plain_ok: bool = False) -> tuple[str, str, dict | None, str | None]:
    """(quant, resolved pv, sparsity or None, note or None) for the site `key`: its calibrated
    plan entry over `opts.attention`. Raise Reject where the result would change nothing or the
    target cannot run it. The compile pass and the diffusers backend both decide here.
    `attention` / `use` / `plain_ok`: a schedule variant's options, its entry's `use` (which wins
    over the plan entry for the keys it sets) and whether 16-bit dense attention is an answer."""
    a = attention if attention is not None else opts.attention
    entry = opts.plan.site(key) if opts.plan is not None else None
    entry = entry if entry is not None and entry.get("kind") == "attention" else {}
    entry = overridden(entry, use)
    if entry.get("original"):
        raise Reject("the calibrated plan keeps this site as it was (its error budget is spent elsewhere, "
                     "or no rewrite met it)")
    quant = entry.get("quant", a.quant)
    pv = entry.get("pv") or resolve_pv(a.pv, quant, spec)
    if quant == "none" and pv in ("fp8", "fp4", "fp8_acc16"):
        raise Reject(f"pv {pv!r} needs a quantized QK^T (attention.quant)")
    why = spec.supports(quant, pv) or on_cpu.skip_reason(device_type, opts)
    if why:
        raise Reject(why)
    sparsity, note = sparsity_for(opts, key, heads, a, entry)
    if note:
        log.warning("attnopt: attention site %s: %s", key, note)
    if sparsity is not None and sparsity.get("min_seq_len") and not bool(nk >= sparsity["min_seq_len"]):
        sparsity = None  # short: dense quantized attention (may guard on a symbolic length); no warning
        note = (note + "; " if note else "") + f"dense: key length {nk} < sparsity.min_seq_len"
    if sparsity is not None and sparsity["method"] == "svg2":  # ops/svg2.py: its centroids are kept per site
        if causal:
            sparsity, note = None, (note + "; " if note else "") + "dense: svg2 permutes tokens, no causal form"
        else:
            sparsity = {**sparsity, "site": key}
    if sparsity is None and quant == "none" and not plain_ok:
        raise Reject((note + "; " if note else "plan keeps this site dense and ") + "attention.quant is 'none': "
                     "nothing to change")
    if sparsity is not None and sparsity["method"] == "block":
        if not (isinstance(nq, int) and isinstance(nk, int)):
            raise Reject("a user block mask needs static sequence lengths")
        bs = sparsity["block_size"]
        need = (-(-nq // bs), -(-nk // bs))
        mask = sparsity["mask"]
        got = (len(mask[0]), len(mask[0][0])) if isinstance(mask[0][0], list) else (len(mask), len(mask[0]))
        if got != need:
            raise Reject(f"block mask is {got[0]}x{got[1]} blocks; this site needs {need[0]}x{need[1]}")
    return quant, pv, sparsity, note


# what attnopt's attention backward differentiates (docs/algorithms.md#attention-backward)
TRAINABLE_SOFTCAP = True

REQUIRES_GRAD = ("the graph requires grad (a training graph, or inference outside torch.no_grad() / "
                 "torch.inference_mode()) and attention.backward is 'off': left for autograd")
JOINT_GRAPH = ("the graph requires grad and reached attnopt after autograd was traced (tensor-subclass inputs "
               "take the joint-graph fallback): its backward would not see the rewrite, left for autograd")


def decide(site: AttentionSite, opts, spec: ArchSpec, training: bool, key: str = "",
           grad: GradFlow | None = None, use=None, plain_ok: bool = False) -> SiteParams:
    """Raise Reject(reason) unless the site can be rewritten; return what it will run.
    `training`: the graph will be differentiated; `grad` says which of its values need a
    gradient (None: autograd is already traced, as in the joint-graph fallback).
    `use`: a schedule entry's options, merged over the section's and over the site's plan entry
    (passes/schedule_rewrite.py). `plain_ok`: 16-bit dense attention (quant 'none', no sparsity)
    is a valid answer, as one variant of a scheduled site whose other variants change something."""
    a = opts.attention if use is None else apply_use(opts.attention, use)
    check_selected(a, site.module, plain_ok)
    if training and grad is None:  # checked before the matcher's reasons: a joint graph's saved tensors trip those
        raise Reject(JOINT_GRAPH)
    if training and a.backward == "off":
        raise Reject(REQUIRES_GRAD)
    if site.reject:
        raise Reject(site.reject)
    for n in site.internal:
        if n is not site.anchor and any(u not in site.internal for u in n.users):
            raise Reject(f"intermediate {n.target} of the attention is used elsewhere "
                         "(e.g. attention weights returned): rewriting would drop it")
    if site.dropout_p:
        raise Reject(f"attention dropout p={site.dropout_p} (training-mode dropout is not implemented)")
    q, k, v = (_tensor_meta(x) for x in (site.q, site.k, site.v))
    if not training and any(t.requires_grad for t in (q, k, v)):
        raise Reject("q/k/v require grad in a graph traced for inference")
    if training and any(grad(n) for n in _bias_sources(site)):
        raise Reject("the attention bias needs a gradient (a learnable bias): attnopt's attention backward "
                     "gives none, left for autograd")
    d = static_int(_size(site.q.cols))
    dv = static_int(_size(site.v.cols))
    nq, nk = _size(site.q.rows), _size(site.k.rows)
    check_operands(a, (q.dtype, k.dtype, v.dtype), q.device.type, d, dv, nq, nk)
    heads = static_int(site.heads) if site.heads is not None else static_int(_size(site.q.batch[-1:]))
    quant, pv, sparsity, note = choose_formats(opts, key, spec, heads, nq, nk, q.device.type,
                                               causal=site.keep.causal_offset is not None,
                                               attention=a, use=use, plain_ok=plain_ok)
    backward = None
    if training:
        if site.softcap and not TRAINABLE_SOFTCAP:
            raise Reject("logit soft-capping in a graph that needs grad: attnopt's attention backward does not "
                         "differentiate the cap, left for autograd")
        why = _untrainable_sparsity(site, sparsity) if sparsity is not None else None
        if why:
            note = (note + "; " if note else "") + f"sparsity {sparsity['method']!r} {why}: dense in this graph " \
                "that needs grad"
            sparsity = None
            if quant == "none":
                raise Reject(note + "; attention.quant is 'none': nothing to change")
        backward = a.backward if sparsity is None else "exact"  # the sparse backward is 16-bit only
    kernel = describe_attention_kernel(spec, quant, pv, d, q.device.type)
    if site.softcap:
        kernel += f" +softcap {site.softcap:g}"
    if sparsity is not None:
        kernel += f" +{sparsity['method']}" + ("+pv-skip" if sparsity.get("pv_threshold") is not None else "")
    if backward is not None:
        kernel += f" | backward {backward}"
    return SiteParams(quant, pv, a.smooth_k, a.smooth_q and sparsity is None, spec.name, kernel, sparsity,
                      note, backward)


def overridden(entry: dict, use) -> dict:
    """A site's plan entry without what a schedule entry's `use` sets (the schedule wins there)."""
    if not use:
        return entry
    # a planned pv was chosen for the planned quant: a schedule that sets quant resolves pv afresh
    drop = ({"quant", "pv"} if "quant" in use else {"pv"} if "pv" in use else set()) | (
        {"sparsity", "dense"} if "sparsity" in use else set())
    return {k: v for k, v in entry.items() if k not in drop}


def _untrainable_sparsity(site: AttentionSite, sparsity: dict) -> str | None:
    """Why `attnopt::sparse_attention_train` cannot take this sparse site, or None."""
    if site.bias or site.keep.residual:
        return "with a mask other than causal has no trainable op"
    if site.softcap:
        return "with logit soft-capping has no trainable op"
    if sparsity.get("pv_threshold") is not None:
        return "with P.V skipping has no trainable op"
    if sparsity["method"] == "svg2":
        return "permutes tokens by per-call clusters: no trainable op"
    return None


def _bias_sources(site: AttentionSite) -> list[fx.Node]:
    """The graph values the site's additive bias is made from."""
    out = []
    for node, _ in site.bias:
        if isinstance(node, QkBias):
            node = node.node
        if isinstance(node, fx.Node):
            out.append(node)
    return out


def _size(atoms):
    out = 1
    for a in atoms:
        out = out * a.size
    return out


# ------------------------------------------------------------------------------ building


def _int_size(x, what: str) -> int:
    del what
    return static_int(x)


def _as_bhnd(b: GraphBuilder, op: Operand, heads: int, drop_bcast_last: bool = False) -> fx.Node:
    """Build [B, heads, rows, cols] from an operand's source: permute, expand broadcast batch
    atoms, reshape. No copy when the source is already laid out that way."""
    src = op.traced.src
    rank = len(shape(src))
    batch = list(op.batch)
    if drop_bcast_last:
        batch = batch[:-1]
    target = batch + list(op.rows) + list(op.cols)
    real = [a.src for a in target if not a.broadcast]
    rest = [d for d in range(rank) if d not in real]  # size-1 dims, carried in front
    x = b.permute(src, rest + real)
    # insert broadcast atoms (repeated heads or batch) as expanded dims
    pos = len(rest)
    sizes = []
    for a in target:
        if a.broadcast:
            x = b.call(aten.unsqueeze.default, x, pos)
            sizes.append(_int_size(a.size, "broadcast size"))
        else:
            sizes.append(-1)
        pos += 1
    if any(s != -1 for s in sizes):
        x = b.call(aten.expand.default, x, [-1] * len(rest) + sizes)
    rows_i = len(rest) + len(batch)
    cols_i = rows_i + len(op.rows)
    n = b.dim(x, rows_i) if len(op.rows) == 1 else _prod_dims(b, x, range(rows_i, cols_i))
    c = b.dim(x, cols_i) if len(op.cols) == 1 else _prod_dims(b, x, range(cols_i, cols_i + len(op.cols)))
    if not op.rows:
        n = 1
    if not op.cols:
        c = 1
    return b.reshape(x, [-1, heads, n, c])


def _prod_dims(b: GraphBuilder, x: fx.Node, dims) -> object:
    out = 1
    for d in dims:
        out = b.mul(out, b.dim(x, d))
    return out


def build_qkv(b: GraphBuilder, site: AttentionSite):
    """Operands as [B, Hq, Nq, D], [B, Hkv, Nk, D], [B, Hkv, Nk, Dv]; GQA kept unrepeated."""
    qb = site.q.batch
    if site.heads is not None:
        hq = _int_size(site.heads, "head count")
    elif len(qb) >= 2 and not qb[-1].broadcast:
        hq = _int_size(qb[-1].size, "head count")
    else:
        hq = 1
    q4 = _as_bhnd(b, site.q, hq)
    total = _size(qb)

    def kv(op: Operand) -> tuple[fx.Node, int]:
        kb = op.batch
        if site.kv_heads is not None and not known_eq(site.kv_heads, hq):
            # SDPA enable_gqa: the 4-D input states its own head count. Its batch atoms flatten
            # (batch, kv head) in order; a size-1 head dim has no atom, so the atoms alone cannot
            # tell a batch from a head (MQA).
            hkv = _int_size(site.kv_heads, "kv head count")
            if hkv <= 0 or hq % hkv:
                raise Reject(f"{hq} query heads are not a multiple of {hkv} kv heads")
            return _as_bhnd(b, op, hkv), hkv
        if (len(kb) >= 1 and kb[-1].broadcast and known_eq(kb[-1].size, hq) and hq > 1
                and known_eq(_size(kb[:-1]) * hq, total)):
            return _as_bhnd(b, op, 1, drop_bcast_last=True), 1  # one kv head repeated to all: MQA
        if (len(kb) >= 2 and kb[-1].broadcast and not kb[-2].broadcast and hq > 1
                and known_eq(kb[-2].size * kb[-1].size, hq) and known_eq(_size(kb[:-2]) * hq, total)):
            hkv = _int_size(kb[-2].size, "kv head count")  # repeat_kv / repeat_interleave: GQA
            return _as_bhnd(b, op, hkv, drop_bcast_last=True), hkv
        if kb and not kb[-1].broadcast and isinstance(kb[-1].size, int) and kb[-1].size < hq \
                and hq % kb[-1].size == 0 and known_eq(_size(kb[:-1]) * hq, total):
            return _as_bhnd(b, op, kb[-1].size), kb[-1].size  # own, fewer heads (SDPA enable_gqa)
        return _as_bhnd(b, op, hq), hq

    k4, hk = kv(site.k)
    v4, hv = kv(site.v)
    if hk != hv:  # one side repeated, the other not: read both with the query-head count
        k4 = _as_bhnd(b, site.k, hq)
        v4 = _as_bhnd(b, site.v, hq)
    return q4, k4, v4, hq


def _to_b_h_q_k(b: GraphBuilder, m: fx.Node, site: AttentionSite, hq: int, q4: fx.Node, k4: fx.Node) -> fx.Node:
    """A mask broadcastable to the site's logits -> broadcastable to [B, Hq, Nq, Nk]."""
    ms = shape(m)
    if site.logits_node is None:  # SDPA: masks broadcast against [B, H, Nq, Nk]
        if len(shape(site.anchor)) == 4 or len(ms) <= 2:
            return m
        raise Reject("attention mask on a non-4-D SDPA call")
    lshape = list(shape(site.logits_node))
    if (len(lshape) == 4 and known_eq(lshape[1], hq)) or len(ms) <= 2:
        return m  # same [B, Hq] split as ours (or only [Nq, Nk]): broadcasting carries over
    if len(lshape) == 3 and len(ms) == 3 and known_one(ms[0]):
        return b.call(aten.unsqueeze.default, m, 0)
    # general: materialize against the logits, then split the flat batch into (B, Hq)
    full = b.call(aten.expand.default, m, [b.dim(site.logits_node, i) for i in range(len(lshape))])
    return b.reshape(full, [-1, hq, b.dim(q4, 2), b.dim(k4, 2)])


def build_masks(b: GraphBuilder, site: AttentionSite, hq: int, q4, k4):
    keep = None
    for node, negated in site.keep.residual:
        m = b.call(aten.bitwise_not.default, node) if negated else node
        keep = m if keep is None else b.call(aten.logical_and.default, keep, m)
    if keep is not None:
        keep = _to_b_h_q_k(b, keep, site, hq, q4, k4)
    bias = framed = None  # biases against the logits; biases already in the op's [B, Hq, Nq, Nk] frame
    for node, coef in site.bias:
        in_frame = isinstance(node, QkBias)
        if in_frame:  # baddbmm's input: broadcast in the bmm frame [B*Hq, Nq, Nk]
            node = _qk_frame_bias(b, node.node, hq, q4, k4)
        elif isinstance(node, FillBias):
            node = _fill_bias(b, node)
        t = node if coef == 1.0 else b.call(aten.mul.Tensor, node, coef)
        if in_frame:
            framed = t if framed is None else b.call(aten.add.Tensor, framed, t)
        else:
            bias = t if bias is None else b.call(aten.add.Tensor, bias, t)
    if bias is not None:
        bias = _to_b_h_q_k(b, bias, site, hq, q4, k4)
    if framed is not None:
        bias = framed if bias is None else b.call(aten.add.Tensor, framed, bias)
    return bias, keep


def _qk_frame_bias(b: GraphBuilder, m: fx.Node, hq: int, q4: fx.Node, k4: fx.Node) -> fx.Node:
    """A bias broadcast against the QK^T bmm [B*Hq, Nq, Nk] -> [B, Hq, Nq, Nk] (a view when its
    batch is whole or broadcast: the bmm batch flattens (B, Hq) as the operands do)."""
    nq, nk = b.dim(q4, 2), b.dim(k4, 2)
    while len(shape(m)) < 3:
        m = b.call(aten.unsqueeze.default, m, 0)
    full = b.call(aten.expand.default, m, [b.mul(b.dim(q4, 0), hq), nq, nk])
    return b.reshape(full, [-1, hq, nq, nk])


def _fill_bias(b: GraphBuilder, fb: FillBias) -> fx.Node:
    """where(all keep conditions, 0, fill) in the logits' dtype, as eager adds it."""
    keep = None
    for node, negated in fb.conds:
        m = b.call(aten.bitwise_not.default, node) if negated else node
        keep = m if keep is None else b.call(aten.logical_and.default, keep, m)
    zero = b.call(aten.scalar_tensor.default, 0.0, dtype=fb.dtype)
    fill = b.call(aten.scalar_tensor.default, fb.fill, dtype=fb.dtype)
    return b.call(aten.where.self, keep, zero, fill)


def rewrite(graph: fx.Graph, site: AttentionSite, params: SiteParams, probe_key: str | None = None,
            tag: str | None = None, variants: list[SiteParams] | None = None, gate=None) -> fx.Node:
    """Replace the site by the op (or, for inspect, the measuring probe). Returns the op node.
    New nodes carry `tag` (the site key) in their meta, for the graph view. `variants` (a
    scheduled site, passes/schedule_rewrite.py): one gated op call per variant, `gate(builder)`
    building the variant index they read, their outputs combined by torch.where on it."""
    b = GraphBuilder(graph, site.anchor)
    try:
        q4, k4, v4, hq = build_qkv(b, site)
        bias, keep = build_masks(b, site, hq, q4, k4)
        causal = site.keep.causal_offset is not None
        offset = site.keep.causal_offset if causal else 0

        def call(params: SiteParams, **gated):
            head = (q4, k4, v4, bias, keep, float(site.fill), causal, int(offset), float(site.scale),
                    params.quant, params.pv, params.smooth_k)
            sp = json.dumps(params.sparsity, sort_keys=True) if params.sparsity is not None else ""
            cap = (float(site.softcap or 0.0),) if site.softcap or gated else ()  # 0.0 (off) by default
            if params.backward is not None and sp:  # a graph that needs grad: the ops with attnopt's own backward
                op = b.call(torch.ops.attnopt.sparse_attention_train.default, q4, k4, v4, causal, int(offset),
                            float(site.scale), params.quant, params.pv, params.smooth_k, params.arch, "auto", sp)
                return op, b.call(operator.getitem, op, 0)
            if params.backward is not None:
                op = b.call(torch.ops.attnopt.attention_train.default, *head, params.smooth_q, params.arch, "auto",
                            float(site.softcap or 0.0), params.backward)
                return op, b.call(operator.getitem, op, 0)
            if probe_key is not None:
                out = b.call(torch.ops.attnopt.attention_probe.default, *head, params.smooth_q, params.arch, "auto",
                             sp, probe_key, *cap)
            elif sp:
                out = b.call(torch.ops.attnopt.sparse_attention.default, *head, params.arch, "auto", sp, *cap, **gated)
            else:
                out = b.call(torch.ops.attnopt.attention.default, *head, params.smooth_q, params.arch, "auto", *cap,
                             **gated)
            return out, out

        if variants:
            index = gate(b)
            calls = [call(p, gate=index, gate_id=v) for v, p in enumerate(variants)]
            op, out = calls[0]
            for v, (_, other) in enumerate(calls[1:], 1):
                out = b.call(aten.where.self, b.call(aten.eq.Scalar, index, v), other, out)
        else:
            op, out = call(params)
        anchor_shape = shape(site.anchor)
        if len(anchor_shape) == 4:
            final = b.reshape(out, [-1, hq, b.dim(out, 2), b.dim(out, 3)])
        elif len(anchor_shape) == 3:
            final = b.reshape(out, [-1, b.dim(out, 2), b.dim(out, 3)])
        else:
            raise Reject(f"attention output of rank {len(anchor_shape)}")
        if final.meta["val"].dtype != site.anchor.meta["val"].dtype:
            final = b.call(torch.ops.prims.convert_element_type.default, final, site.anchor.meta["val"].dtype)
        final = _in_anchor_layout(b, final, site.anchor.meta["val"])
    except Exception:
        for n in reversed(b.created):  # leave the graph as it was
            if not n.users:
                graph.erase_node(n)
        raise
    site.anchor.replace_all_uses_with(final)
    if tag is not None:
        for n in b.created:
            n.meta["attnopt_site"] = tag
    return op


def _in_anchor_layout(b: GraphBuilder, out: fx.Node, want: torch.Tensor) -> fx.Node:
    """`out` (contiguous) in the dim order of the value it replaces. SDPA's kernels return
    [B, H, N, D] stored as [B, N, H, D], and the graph's later views were traced on that layout
    (transpose(1, 2) then view is no copy there); AOTAutograd checks them again when it traces
    the rewritten graph. One copy, where Inductor's view of a permuted tensor made one anyway."""
    strides = [hint_int(s) for s in want.stride()]
    if None in strides:
        return out
    order = sorted(range(want.dim()), key=lambda d: -strides[d])  # outermost stored dim first
    if order == list(range(want.dim())) or want.dim() != out.meta["val"].dim():
        return out
    stored = b.call(aten.clone.default, b.call(aten.permute.default, out, order),
                    memory_format=torch.contiguous_format)
    back = sorted(range(len(order)), key=lambda d: order[d])
    return b.call(aten.permute.default, stored, back)


def site_flops(site: AttentionSite) -> int | None:
    """4 * B * Hq * Nq * Nk * D (halved when causal with Nq == Nk), at the example sizes."""
    sizes = [hint_int(_size(x)) for x in (site.q.batch, site.q.rows, site.k.rows, site.q.cols)]
    if any(x is None for x in sizes):
        return None
    bh, nq, nk, d = sizes
    f = 4 * bh * nq * nk * d
    if site.keep.causal_offset is not None and nq == nk:
        f //= 2
    return f
