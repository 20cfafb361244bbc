"""A plain, JSON-safe copy of an FX graph, taken before and after attnopt's passes for the HTML view."""

from __future__ import annotations

import torch
import torch.fx as fx

from .graph_utils import module_class, module_path, source_line

SITE_META = "attnopt_site"  # node.meta key: the site key a node belongs to


def _target(n: fx.Node) -> str:
    t = n.target
    if n.op == "call_function":
        name = getattr(t, "__name__", None) or str(t)
        pkt = getattr(t, "_overloadpacket", None)
        if pkt is not None:
            ns = getattr(pkt, "__module__", "").rsplit(".", 1)[-1]
            name = f"{ns}.{pkt.__name__}" if ns and ns != "ops" else pkt.__name__
        return name
    return str(t)


def snapshot(graph: fx.Graph, sites_of: dict | None = None) -> list[dict]:
    """One dict per node: name, op, target, module (and its class: the HTML view collapses only
    indices whose layers match), inputs, shape, dtype, site, source."""
    sites_of = sites_of or {}
    out = []
    for n in graph.nodes:
        v = n.meta.get("val")
        shape = [int(s) if isinstance(s, int) else str(s) for s in v.shape] if isinstance(v, torch.Tensor) else None
        site = sites_of.get(n) or n.meta.get(SITE_META)
        out.append({
            "name": n.name, "op": n.op, "target": _target(n), "module": module_path(n),
            "module_type": module_class(n),
            "inputs": [a.name for a in n.all_input_nodes], "shape": shape,
            "dtype": str(v.dtype).replace("torch.", "") if isinstance(v, torch.Tensor) else None,
            "site": site, "source": source_line(n) if n.op == "call_function" else "",
        })
    return out
