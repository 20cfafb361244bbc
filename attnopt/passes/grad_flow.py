"""Which values of a captured forward graph carry gradients, in a graph that will be differentiated.

The capture trace runs below autograd, so its nodes' example values never say `requires_grad`;
this follows the inputs that do (parameters, activations that need grad) through the graph. The
attention rewrite asks it whether a site's additive bias needs a gradient (a learnable bias, e.g.
T5 / ALiBi-style parameters): attnopt's attention backward gives none, so such a site keeps its
original attention.
"""

from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten

# ops whose result carries no gradient whatever their inputs
_NO_GRAD_OPS = {aten.detach.default, aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default,
                aten.full_like.default, aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default,
                aten.new_full.default}


def _floating(node: fx.Node) -> bool:
    val = node.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else (val,)
    return any(isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()) for v in vals)


class GradFlow:
    """`flow(node)`: whether the node's value depends differentiably on an input that needs grad.
    Placeholders follow `example_inputs` (same order); nodes added later (by a rewrite) are
    answered from their own inputs."""

    def __init__(self, graph: fx.Graph, example_inputs):
        self.memo: dict[fx.Node, bool] = {}
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        for node, x in zip(placeholders, example_inputs):
            self.memo[node] = isinstance(x, torch.Tensor) and x.requires_grad
        for node in graph.nodes:
            self(node)

    def __call__(self, node) -> bool:
        if not isinstance(node, fx.Node):
            return False
        if node in self.memo:
            return self.memo[node]
        todo = [node]  # iterative: nodes a rewrite added may chain a few deep
        while todo:
            n = todo[-1]
            pending = [i for i in n.all_input_nodes if i not in self.memo]
            if pending:
                todo.extend(pending)
                continue
            todo.pop()
            if n.op in ("placeholder", "get_attr") or n.target in _NO_GRAD_OPS or not _floating(n):
                self.memo[n] = False if n.op != "placeholder" else self.memo.get(n, False)
            else:
                self.memo[n] = any(self.memo[i] for i in n.all_input_nodes)
        return self.memo[node]
