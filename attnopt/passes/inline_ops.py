"""Inline attnopt's triton_ops into the graph, as AOT autograd does for ops it traces.

Our passes insert `torch.ops.attnopt.*` calls after AOT has run, so Inductor would see them as
opaque extern calls (which still launch our Triton kernels, through Python). Tracing the op's
body under FunctionalTensorMode, as AOT's functionalization does, turns each `wrap_triton`
launch into a `triton_kernel_wrapper_functional` node, which Inductor compiles into its own
generated code: no Python between kernels, and the launches sit in Inductor's CUDA graphs.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx

from .graph_utils import fake_mode_of

log = logging.getLogger("attnopt")


def _unused_name(owner: torch.nn.Module, stem: str) -> str:
    """A fresh attribute name: each inlined site keeps its own constants (per-head parameters,
    masks), never overwriting another site's that happened to get the same traced name."""
    i = 0
    while hasattr(owner, f"{stem}_{i}"):
        i += 1
    return f"{stem}_{i}"


def inline_op(graph: fx.Graph, node: fx.Node) -> bool:
    """Replace `node` (a call of a triton_op) by its traced body. False if it could not be."""
    tensor_pos = [i for i, a in enumerate(node.args) if isinstance(a, fx.Node)]
    if any(isinstance(a, (torch.SymInt, torch.SymFloat)) for a in node.args):
        return False
    args = list(node.args)

    def body(*tensors):
        call = list(args)
        for i, t in zip(tensor_pos, tensors):
            call[i] = t
        return node.target(*call)

    from torch._inductor.decomposition import select_decomp_table

    fake_args = [args[i].meta["val"] for i in tensor_pos]
    mode = fake_mode_of(graph)
    try:
        with mode:  # Inductor's decompositions, as AOT applies them before joint passes
            traced = make_fx(dispatch_functionalize(body), decomposition_table=select_decomp_table(),
                             tracing_mode="real")(*fake_args)
    except Exception as e:  # keep the extern call: still correct, only not inlined
        log.info("attnopt: could not inline %s: %r", node.target, e)
        return False
    env: dict[fx.Node, fx.Node] = {}
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    for ph, i in zip(placeholders, tensor_pos):
        env[ph] = args[i]
    result = None
    with graph.inserting_before(node):
        for n in traced.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                out = n.args[0]
                result = env[out[0] if isinstance(out, (tuple, list)) else out]
                continue
            if n.op == "get_attr":  # constants the body made: copy them onto the owning module
                owner = graph.owning_module
                name = _unused_name(owner, f"_attnopt_const_{n.target}")
                owner.register_buffer(name, getattr(traced, n.target), persistent=False)
                new = graph.get_attr(name)
                new.meta.update(n.meta)
            else:
                new = graph.node_copy(n, lambda x: env[x])
            for key in ("nn_module_stack", "stack_trace"):
                if key in node.meta:
                    new.meta[key] = node.meta[key]
            env[n] = new
    node.replace_all_uses_with(result)
    graph.erase_node(node)
    return True
