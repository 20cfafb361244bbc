"""A self-contained HTML view of a Report: summary, sites, graph breaks, and each FX graph before
and after attnopt's passes as SVG (laid out with networkx), rewritten subgraphs highlighted.

No network, no CDN: styles, script and data are inline. Large graphs stay usable: three levels
(every op; one box per module; repeated layers collapsed into one box with a count), pan and
zoom, and a search over module paths (a collapsed box answers for its members: `layers.3` finds
`layers.*`). Module graphs have cycles (a layer feeds its attention and back); boxes are laid out
in order of first appearance with the back edges left out of the layering, one box per place.
The URL fragment picks a view: `report.html#level=layers&phase=before&graph=1&q=layers.3`.
"""

from __future__ import annotations

import html
import json
import re

import networkx as nx

from ..calibration.front import check_front, chosen, front_svg, pareto, speedup
from ..report import Report
from .table import _fmt_flops, kernel_parts, legend, natural_key, shapes_text, site_flops, sparsity_text

NODE_W, NODE_H, GAP_X, GAP_Y = 130, 22, 40, 10
MODULE_W = 210  # module boxes carry paths, wider than op names
_INDEX = re.compile(r"^\d+$")


def _esc(s) -> str:
    return html.escape(str(s), quote=True)


def _short(t: str, n: int = 18) -> str:
    return t if len(t) <= n else t[: n - 1] + "…"


def _tail_label(path: str, n: int) -> str:
    """Leading components dropped until it fits: the leaf and its index tell modules apart."""
    if len(path) <= n:
        return path
    parts = path.split(".")
    while len(parts) > 1 and len(".".join(parts)) + 1 > n:
        parts.pop(0)
    tail = ".".join(parts)
    return "…" + tail if len(tail) + 1 <= n else _short(tail, n)


def _acyclic(g: nx.DiGraph) -> nx.DiGraph:
    """`g` without its back edges, reading nodes in their "order" (first appearance in the FX
    graph): module graphs have cycles (a layer feeds its attention, which feeds the layer back)."""
    rank = {n: (g.nodes[n].get("order", 0), i) for i, n in enumerate(g.nodes)}
    dag = nx.DiGraph()
    dag.add_nodes_from(g.nodes(data=True))
    dag.add_edges_from((a, b) for a, b in g.edges if rank[a] < rank[b])
    return dag


def _columns(g: nx.DiGraph) -> dict:
    """Node -> column of a DAG: longest path from a source, then every node pulled as late as its
    consumers allow, so weights and other inputs sit just before their first use."""
    order = list(nx.topological_sort(g))
    depth = {}
    for n in order:
        depth[n] = max((depth[p] + 1 for p in g.predecessors(n)), default=0)
    last = max(depth.values(), default=0)
    layer = {}
    for n in reversed(order):
        succ = [layer[s] for s in g.successors(n)]
        layer[n] = min(succ) - 1 if succ else (depth[n] if g.in_degree(n) else last)
    return layer


def _layered(g: nx.DiGraph, node_w: int = NODE_W) -> dict:
    """Node -> (x, y), one node per (column, row): back edges are left out of the layering (they
    are still drawn), rows follow the order of first appearance."""
    dag = g if nx.is_directed_acyclic_graph(g) else _acyclic(g)
    layer = _columns(dag)
    columns: dict[int, list] = {}
    for n in dag.nodes:
        columns.setdefault(layer[n], []).append(n)
    lo = min(columns, default=0)
    pos = {}
    for x, col in columns.items():
        for y, n in enumerate(sorted(col, key=lambda n: dag.nodes[n].get("order", 0))):
            pos[n] = ((x - lo) * (node_w + GAP_X), y * (NODE_H + GAP_Y))
    return pos


def _status_of(key, sites: dict) -> str:
    s = sites.get(key)
    return "" if s is None else ("site-rewritten" if s["status"] == "rewritten" else "site-skipped")


def _svg(svg_id: str, nodes: dict, edges: set, pos: dict, hidden: bool, node_w: int = NODE_W) -> str:
    xs = [p[0] for p in pos.values()] or [0]
    ys = [p[1] for p in pos.values()] or [0]
    w, h = max(xs) + node_w + 20, max(ys) + NODE_H + 20
    chars = max(8, int(node_w / 6.8))
    out = [f'<svg id="{_esc(svg_id)}" class="graph{" hidden" if hidden else ""}" viewBox="-10 -10 {w} {h}" '
           f'data-w="{w}" data-h="{h}" xmlns="http://www.w3.org/2000/svg">']
    for a, b in sorted(edges):
        if a in pos and b in pos:
            (x1, y1), (x2, y2) = pos[a], pos[b]
            back = ' class="back"' if x2 <= x1 else ""
            out.append(f'<line{back} x1="{x1 + node_w}" y1="{y1 + NODE_H / 2}" x2="{x2}" y2="{y2 + NODE_H / 2}"/>')
    for nid, attrs in nodes.items():
        x, y = pos[nid]
        cls = " ".join(c for c in ("node", attrs.get("cls", "")) if c)
        members = attrs.get("members")
        extra = f' data-members="{_esc(" ".join(members))}"' if members else ""
        label = attrs.get("label", nid)
        text = _tail_label(label, chars) if attrs.get("path_label") else _short(label, chars)
        out.append(f'<g class="{cls}" data-id="{_esc(nid)}" data-module="{_esc(attrs.get("module", ""))}"{extra} '
                   f'data-site="{_esc(attrs.get("site") or "")}" transform="translate({x},{y})">'
                   f'<title>{_esc(attrs.get("title", nid))}</title>'
                   f'<rect width="{node_w}" height="{NODE_H}" rx="4"/>'
                   f'<text x="5" y="15">{_esc(text)}</text></g>')
    out.append("</svg>")
    return "".join(out)


def _op_level(snap: list, sites: dict, svg_id: str, hidden: bool) -> str:
    g = nx.DiGraph()
    nodes = {}
    for i, n in enumerate(snap):
        if n["op"] == "output":
            continue
        site = n.get("site")
        anchor = "attnopt." in n["target"] and ("attention" in n["target"])
        cls = _status_of(site, sites) + (" site-anchor" if anchor and site else "")
        if site and not anchor and _status_of(site, sites) == "site-rewritten":
            cls = "site-part"
        title = f"{n['target']}  {n['module'] or '<top>'}\n{n.get('shape')} {n.get('dtype') or ''}\n{n.get('source', '')}"
        nodes[n["name"]] = {"label": n["target"].replace("aten.", ""), "module": n["module"], "site": site,
                            "cls": cls.strip(), "title": title}
        g.add_node(n["name"], order=i)
    edges = set()
    for n in snap:
        for a in n["inputs"]:
            if a in nodes and n["name"] in nodes:
                g.add_edge(a, n["name"])
                edges.add((a, n["name"]))
    return _svg(svg_id, nodes, edges, _layered(g), hidden)


# ---------------------------------------------------------------- repeated layers

def _signatures(paths: dict) -> dict:
    """(prefix, index) -> what lives under prefix.index: {(sub-path, module type)}. Two indices
    with equal signatures are repeats of one layer; `ff.net.0` (GELU) and `ff.net.2` (Linear)
    are not."""
    sig: dict[tuple, set] = {}
    for path, mtype in paths.items():
        parts = path.split(".")
        for i, p in enumerate(parts):
            if _INDEX.match(p):
                sig.setdefault((tuple(parts[:i]), p), set()).add((tuple(parts[i + 1:]), mtype))
    return sig


def _index_label(indices: list[str], alone: bool) -> str:
    """'*' for the one repeated group under a prefix; explicit '{0-2}' ranges when there are several."""
    if alone:
        return "*"
    nums = sorted(int(i) for i in indices)
    runs, start = [], nums[0]
    for a, b in zip(nums, nums[1:] + [None]):
        if b != a + 1:
            runs.append(f"{start}-{a}" if a != start else f"{a}")
            start = b
    return "{" + ",".join(runs) + "}"


def repeat_groups(paths: dict) -> dict:
    """Module path -> its collapsed name: each index under a prefix whose layer repeats (two or
    more indices with the same signature) becomes `*`; other indices stay as they are."""
    by_prefix: dict[tuple, dict] = {}
    for (prefix, idx), sig in _signatures(paths).items():
        by_prefix.setdefault(prefix, {}).setdefault(frozenset(sig), []).append(idx)
    label: dict[tuple, str] = {}
    for prefix, groups in by_prefix.items():
        repeated = [idxs for idxs in groups.values() if len(idxs) > 1]
        for idxs in repeated:
            for i in idxs:
                label[(prefix, i)] = _index_label(idxs, len(repeated) == 1)
    out = {}
    for path in paths:
        parts = path.split(".")
        out[path] = ".".join(label.get((tuple(parts[:i]), p), p) for i, p in enumerate(parts))
    return out


def _owners(snap: list, collapse: bool) -> dict:
    """Node name -> its box: its module (collapsed when asked); inputs and weights without a
    module go to the box of their first user, so `<top>` does not tie every layer together."""
    paths = {n["module"]: n.get("module_type", "") for n in snap if n["module"]}
    name = repeat_groups(paths) if collapse else {p: p for p in paths}
    owner = {n["name"]: name[n["module"]] if n["module"] else "<top>" for n in snap if n["op"] != "output"}
    first_user: dict[str, str] = {}
    for n in snap:
        for a in n["inputs"]:
            if n["name"] in owner:
                first_user.setdefault(a, owner[n["name"]])
    for n in snap:
        if n["op"] in ("placeholder", "get_attr") and not n["module"] and n["name"] in first_user:
            owner[n["name"]] = first_user[n["name"]]
    return owner


def _module_level(snap: list, sites: dict, svg_id: str, hidden: bool, collapse: bool) -> str:
    owner = _owners(snap, collapse)
    members: dict[str, set] = {}
    site_keys: dict[str, set] = {}
    first: dict[str, int] = {}  # a box's place in compute order: its first op (weights come first)
    for i, n in enumerate(snap):
        if n["name"] not in owner:
            continue
        gname = owner[n["name"]]
        members.setdefault(gname, set()).add(n["module"] or "<top>")
        first.setdefault(gname, i + (len(snap) if n["op"] in ("placeholder", "get_attr") else 0))
        if n["op"] not in ("placeholder", "get_attr"):
            first[gname] = min(first[gname], i)
        if n.get("site"):
            site_keys.setdefault(gname, set()).add(n["site"])
    g = nx.DiGraph()
    edges = set()
    for gname in members:
        g.add_node(gname, order=first[gname])
    for n in snap:
        for a in n["inputs"]:
            if a in owner and n["name"] in owner and owner[a] != owner[n["name"]]:
                g.add_edge(owner[a], owner[n["name"]])
                edges.add((owner[a], owner[n["name"]]))
    nodes = {}
    for gname in members:
        keys = site_keys.get(gname, set())
        stats = {_status_of(k, sites) for k in keys}
        cls = "site-rewritten" if "site-rewritten" in stats else ("site-skipped" if stats else "")
        mods = sorted(members[gname] - {"<top>"}, key=natural_key)
        count = len(mods)
        label = gname + (f" ×{count}" if collapse and count > 1 else "")
        nodes[gname] = {"label": label, "path_label": True, "module": gname,
                        "members": mods if collapse and (count > 1 or mods != [gname]) else None,
                        "site": sorted(keys, key=natural_key)[0] if keys else "", "cls": cls,
                        "title": label + ("\nmodules: " + ", ".join(mods[:12]) + (" …" if count > 12 else "")
                                          if count > 1 else "")
                        + ("\nsites: " + ", ".join(sorted(keys, key=natural_key)) if keys else "")}
    return _svg(svg_id, nodes, edges, _layered(g, MODULE_W), hidden, MODULE_W)


_CSS = """
body{font:13px system-ui,sans-serif;margin:0;color:#222}
header{padding:10px 16px;background:#1f2937;color:#eee}
header h1{font-size:17px;margin:0 0 4px}
.wrap{display:flex;height:calc(100vh - 170px)}
#canvas{flex:1;overflow:hidden;border-top:1px solid #ccc;position:relative;background:#fafafa}
#details{width:360px;overflow:auto;border-left:1px solid #ccc;padding:8px;font:12px monospace;white-space:pre-wrap}
nav{padding:6px 16px;background:#eef;display:flex;gap:8px;align-items:center;flex-wrap:wrap}
nav button.on{background:#1f2937;color:#fff}
svg.graph{width:100%;height:100%;cursor:grab}
svg.hidden,.hidden{display:none}
svg line{stroke:#bbb;stroke-width:1}
svg line.back{stroke:#c4b5fd;stroke-dasharray:4 3}
g.node rect{fill:#fff;stroke:#888}
g.node text{font:11px monospace;fill:#222;pointer-events:none}
g.site-rewritten rect{fill:#bbf7d0;stroke:#15803d;stroke-width:2}
g.site-anchor rect{fill:#22c55e;stroke:#14532d;stroke-width:3}
g.site-part rect{fill:#dcfce7;stroke:#15803d}
g.site-skipped rect{fill:#fde68a;stroke:#b45309;stroke-width:2}
g.match rect{stroke:#dc2626;stroke-width:3}
g.selected rect{stroke:#2563eb;stroke-width:4}
table{border-collapse:collapse;font-size:12px}
td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}
tr.site:hover{background:#eef;cursor:pointer}
.ok{color:#15803d}.skip{color:#b45309}
#tables{max-height:130px;overflow:auto;padding:4px 16px}
.warning{color:#fca5a5;font-weight:bold;margin-top:4px}
.expl{color:#555;margin-left:12px}
#calibration{padding:4px 16px;border-top:1px solid #ccc}
#calibration summary{cursor:pointer;font-weight:bold}
#calibration .body{display:flex;gap:16px;align-items:flex-start}
#calibration .points{max-height:380px;overflow:auto}
tr.chosen{background:#fee2e2;font-weight:bold}tr.pareto td:first-child{color:#1f77b4}
"""

_JS = """
(function(){
  const data = JSON.parse(document.getElementById('attnopt-data').textContent);
  const state = {graph: 0, phase: 'after', level: data.default_level};
  const details = document.getElementById('details');
  function current(){ return document.getElementById(`g${state.graph}-${state.phase}-${state.level}`); }
  function show(){
    document.querySelectorAll('svg.graph').forEach(s => s.classList.add('hidden'));
    const s = current(); if (s) s.classList.remove('hidden');
    document.querySelectorAll('nav button[data-k]').forEach(b =>
      b.classList.toggle('on', state[b.dataset.k] === (b.dataset.k === 'graph' ? +b.dataset.v : b.dataset.v)));
    search();
  }
  function describe(id, site){
    let t = '';
    const node = (data.nodes[state.graph] || {})[state.phase + ':' + id];
    if (node) t += 'node ' + JSON.stringify(node, null, 1) + '\\n\\n';
    if (site && data.sites[site]) t += 'site ' + JSON.stringify(data.sites[site], null, 1);
    details.textContent = t || id;
  }
  function matches(g, q){
    if ((g.dataset.module || '').toLowerCase().includes(q)) return true;
    // a collapsed box (layers.*.self_attn) stands for its members: layers.3 finds it
    return (g.dataset.members || '').toLowerCase().split(' ').some(m => m.includes(q));
  }
  function search(){
    const q = document.getElementById('search').value.trim().toLowerCase();
    const s = current(); if (!s) return;
    let first = null, n = 0;
    s.querySelectorAll('g.node').forEach(g => {
      const hit = q !== '' && matches(g, q);
      g.classList.toggle('match', hit);
      if (hit) { n += 1; if (!first) first = g; }
    });
    document.getElementById('hits').textContent = q === '' ? '' : `${n} match${n === 1 ? '' : 'es'}`;
    if (first) center(s, first);
  }
  function fromHash(){
    // #level=layers&phase=after&graph=0&q=layers.3: a view to link to (and to screenshot)
    const h = new URLSearchParams(location.hash.slice(1));
    if (h.has('graph')) state.graph = +h.get('graph');
    ['phase', 'level'].forEach(k => { if (h.has(k)) state[k] = h.get(k); });
    if (h.has('q')) document.getElementById('search').value = h.get('q');
  }
  function center(s, g){
    const m = /translate\\(([-\\d.]+),([-\\d.]+)\\)/.exec(g.getAttribute('transform'));
    if (!m) return;
    const vb = s.viewBox.baseVal;
    // centred, but never scrolled past the graph's top-left corner into empty space
    vb.x = Math.max(-10, +m[1] - vb.width / 2); vb.y = Math.max(-10, +m[2] - vb.height / 2);
  }
  document.querySelectorAll('nav button[data-k]').forEach(b => b.addEventListener('click', () => {
    state[b.dataset.k] = b.dataset.k === 'graph' ? +b.dataset.v : b.dataset.v; show(); }));
  document.getElementById('search').addEventListener('input', search);
  document.querySelectorAll('svg.graph').forEach(s => {
    let drag = null;
    s.addEventListener('wheel', e => { e.preventDefault(); const vb = s.viewBox.baseVal;
      const f = e.deltaY > 0 ? 1.15 : 1 / 1.15; const cx = vb.x + vb.width / 2, cy = vb.y + vb.height / 2;
      vb.width *= f; vb.height *= f; vb.x = cx - vb.width / 2; vb.y = cy - vb.height / 2; }, {passive: false});
    s.addEventListener('mousedown', e => { drag = [e.clientX, e.clientY]; });
    window.addEventListener('mouseup', () => { drag = null; });
    s.addEventListener('mousemove', e => { if (!drag) return; const vb = s.viewBox.baseVal;
      const k = vb.width / s.clientWidth; vb.x -= (e.clientX - drag[0]) * k; vb.y -= (e.clientY - drag[1]) * k;
      drag = [e.clientX, e.clientY]; });
    s.addEventListener('click', e => { const g = e.target.closest('g.node'); if (!g) return;
      s.querySelectorAll('g.selected').forEach(x => x.classList.remove('selected'));
      g.classList.add('selected'); describe(g.dataset.id, g.dataset.site); });
    const vb = s.viewBox.baseVal; const w = s.clientWidth || 1000, h = s.clientHeight || 600;
    if (vb.width > w) { vb.width = w; vb.height = h; }  // start at 1:1, readable; wheel zooms out
  });
  function focusFirstSite(){
    const s = current(); const g = s && (s.querySelector('g.site-anchor') || s.querySelector('g.site-rewritten')
      || s.querySelector('g.site-skipped'));
    if (g) center(s, g);
  }
  document.querySelectorAll('tr.site').forEach(r => r.addEventListener('click', () => {
    state.graph = +r.dataset.graph; state.phase = 'after'; state.level = 'ops'; show();
    const s = current(); const g = s && s.querySelector(`g.site-anchor[data-site="${CSS.escape(r.dataset.key)}"]`)
      || (s && s.querySelector(`g[data-site="${CSS.escape(r.dataset.key)}"]`));
    if (g) { center(s, g); s.querySelectorAll('g.selected').forEach(x => x.classList.remove('selected'));
             g.classList.add('selected'); }
    describe(r.dataset.key, r.dataset.key);
  }));
  fromHash();
  show();
  if (!document.getElementById('search').value) focusFirstSite();
})();
"""


def _fmt(x, digits=4) -> str:
    return "-" if x is None else (f"{x:.{digits}g}" if isinstance(x, float) else str(x))


def _site_table(report: Report) -> str:
    """The terminal table's columns, one row per site (click: the site in the op graph)."""
    head = "".join(f"<th>{h}</th>" for h in ("site", "kind", "status", "kernel", "arch", "reason / note", "shapes",
                                               "rel-L1", "orig-L1", "cos", "sparsity", "FLOPs"))
    rows = [f"<table id='site-table'><tr>{head}</tr>"]
    for s in sorted(report.sites, key=lambda r: (r.graph, natural_key(r.key))):
        err = s.error or {}
        kernel, arch, note = kernel_parts(s)
        cells = (s.key, s.kind, s.status, kernel, arch, note, shapes_text(s), _fmt(err.get("rel_l1")),
                 _fmt(err.get("baseline_rel_l1")), _fmt(err.get("cos"), 6), sparsity_text(s),
                 _fmt_flops(site_flops(s)))
        status_cls = "ok" if s.status == "rewritten" else "skip"
        tds = "".join(f"<td class='{status_cls}'>{_esc(c)}</td>" if i == 2 else f"<td>{_esc(c)}</td>"
                      for i, c in enumerate(cells))
        rows.append(f"<tr class='site' data-key='{_esc(s.key)}' data-graph='{s.graph}'>{tds}</tr>")
    rows.append("</table>")
    if report.sites:
        items = "".join(f"<li>{_esc(ln.strip())}</li>" for ln in legend(report.sites)[1:])
        rows.append(f"<ul id='legend'>{items}</ul>")
    return "".join(rows)


def _breaks_list(sm: dict) -> str:
    """Each graph break with its kind, count, reason and Dynamo's explanation."""
    items = []
    for b in sm.get("graph_breaks", []):
        expl = "".join(f"<div class='expl'>{_esc(e)}</div>" for e in b.get("explanation", []))
        items.append(f"<li><b>{_esc(b.get('kind', 'graph break'))}</b> x{b['count']}: {_esc(b['reason'])}{expl}</li>")
    return f"<h3>Graph breaks</h3><ul id='graph-breaks'>{''.join(items) or '<li>none</li>'}</ul>"


def _calibration(report: Report) -> str:
    """The applied plan's calibration: budget, predicted and measured model error, the
    speed-versus-error front it explored (chart and points); '' when the plan has no front."""
    meta = report.plan_meta
    front = meta.get("front")
    if not front:
        return ""
    try:
        check_front(front)
    except (ValueError, TypeError, AttributeError) as e:
        return (f"<details id='calibration' open><summary>Calibration</summary>"
                f"the plan's front is unreadable: {_esc(e)}</details>")
    best = chosen(front)
    budget = front.get("budget")
    if budget is None and isinstance(meta.get("budget"), dict):
        budget = meta["budget"].get("model_rel_l1")
    facts = [f"budget (model output rel-L1) {_fmt(budget)}"]
    if best is not None:
        facts += [f"predicted {_fmt(best['error'])}", f"measured {_fmt(best.get('measured_error'))}",
                  f"estimated speedup {speedup(front, best):.3g}x"]
    facts += [f"{len(front['points'])} points explored on {front['arch']}", f"cost model: {front['cost_model']}"]
    on_front = {id(p) for p in pareto(front["points"])}
    head = "".join(f"<th>{h}</th>" for h in ("point", "est. ms", "speedup", "predicted rel-L1", "measured rel-L1",
                                               "Pareto", "chosen"))
    rows = [f"<table id='front-points'><tr>{head}</tr>"]
    for p in sorted(front["points"], key=lambda p: (p["error"], p["time"])):
        cls = " ".join(c for c, on in (("pareto", id(p) in on_front), ("chosen", p.get("chosen"))) if on)
        cells = (p.get("label", ""), f"{p['time'] * 1e3:.4g}", f"{speedup(front, p):.3g}x", _fmt(p["error"]),
                 _fmt(p.get("measured_error")), "yes" if id(p) in on_front else "", "yes" if p.get("chosen") else "")
        rows.append(f"<tr class='{cls}'>" + "".join(f"<td>{_esc(c)}</td>" for c in cells) + "</tr>")
    rows.append("</table>")
    return (f"<details id='calibration' open><summary>Calibration: {_esc(' · '.join(facts))}</summary>"
            f"<div class='body'>{front_svg(front)}<div class='points'>{''.join(rows)}</div></div></details>")


def render_html(report: Report) -> str:
    d = report.to_dict()
    sites = {s["key"]: s for s in d["sites"]}
    sm = d["summary"]
    e2e = sm.get("e2e", {}) or {}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>attnopt report</title>"
             f"<style>{_CSS}</style></head><body>"]
    env = d["env"]
    parts.append(
        f"<header><h1>attnopt: {sm.get('sites_rewritten', 0)}/{sm.get('sites_total', 0)} sites rewritten</h1>"
        f"end-to-end vs uncompiled: rel-L1 {_esc(_fmt(e2e.get('rel_l1')))}, cos {_esc(_fmt(e2e.get('cos'), 6))}"
        f" &middot; {sm.get('graphs', 0)} graph(s), {len(sm.get('graph_breaks', []))} graph break(s)"
        f" &middot; compile {_fmt(sm.get('compile_time_s'), 3)}s (passes {_fmt(sm.get('pass_time_s'), 3)}s)"
        f" &middot; torch {_esc(env.get('torch'))}, triton {_esc(env.get('triton'))}, {_esc(env.get('device_name'))}"
        + "".join(f"<div class='warning'>warning: {_esc(w)}</div>" for w in sm.get("warnings", []))
        + "</header>")
    parts.append(f"<div id='tables'>{_site_table(report)}{_breaks_list(sm)}</div>")
    parts.append(_calibration(report))
    graphs = report.graphs or []
    total_nodes = sum(len(g.get("after") or []) for g in graphs)
    default_level = "ops" if total_nodes <= 1500 else "layers"
    nav = ["<nav>"]
    for g in graphs:
        nav.append(f"<button data-k='graph' data-v='{g['index']}'>graph {g['index']}</button>")
    for k, vals in (("phase", ("before", "after")), ("level", ("ops", "modules", "layers"))):
        nav.extend(f"<button data-k='{k}' data-v='{v}'>{v}</button>" for v in vals)
    nav.append("<input id='search' placeholder='search module path…' size='30'><span id='hits'></span>"
               "<span>green: rewritten · amber: skipped · drag to pan, wheel to zoom</span></nav>")
    parts.append("".join(nav))
    svgs = []
    node_data = {}
    for g in graphs:
        node_data[g["index"]] = {}
        for phase in ("before", "after"):
            snap = g.get(phase) or []
            for n in snap:
                node_data[g["index"]][f"{phase}:{n['name']}"] = n
            first = g is graphs[0] and phase == "after"
            svgs.append(_op_level(snap, sites, f"g{g['index']}-{phase}-ops", not (first and default_level == "ops")))
            svgs.append(_module_level(snap, sites, f"g{g['index']}-{phase}-modules", True, collapse=False))
            svgs.append(_module_level(snap, sites, f"g{g['index']}-{phase}-layers",
                                      not (first and default_level == "layers"), collapse=True))
    parts.append(f"<div class='wrap'><div id='canvas'>{''.join(svgs)}</div>"
                 f"<div id='details'>click a node or a site row</div></div>")
    payload = json.dumps({"sites": sites, "nodes": node_data, "default_level": default_level})
    payload = payload.replace("</", "<\\/")  # keep the JSON from closing the script element
    parts.append(f"<script type='application/json' id='attnopt-data'>{payload}</script>")
    parts.append(f"<script>{_JS}</script></body></html>")
    return "".join(parts)


def save_html(report: Report, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_html(report))
