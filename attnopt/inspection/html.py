"""A self-contained HTML view of a Report: summary, sites, graph breaks, and each FX graph before
and after attnopt's passes as SVG (laid out with networkx), rewritten subgraphs highlighted.

No network, no CDN: styles, script and data are inline. Large graphs stay usable: three levels
(every op; one box per module; repeated layers collapsed into one box with a count), pan and
zoom, and a search over module paths.
"""

from __future__ import annotations

import html
import json
import re

import networkx as nx

from ..report import Report

NODE_W, NODE_H, GAP_X, GAP_Y = 130, 22, 40, 10
_NUM = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)")


def _esc(s) -> str:
    return html.escape(str(s), quote=True)


def _short(t: str, n: int = 18) -> str:
    return t if len(t) <= n else t[: n - 1] + "…"


def _layered(g: nx.DiGraph) -> dict:
    """Node -> (x, y): columns by as-late-as-possible layering, so weights and other inputs sit
    just before their first use instead of piling up in the first column."""
    if not nx.is_directed_acyclic_graph(g):
        c = nx.condensation(g)
        pos_c = _layered(c)
        return {n: pos_c[m] for n, m in c.graph["mapping"].items()}
    order = list(nx.topological_sort(g))
    depth = {}
    for n in order:  # longest path from a source (ASAP)
        depth[n] = max((depth[p] + 1 for p in g.predecessors(n)), default=0)
    last = max(depth.values(), default=0)
    layer = {}
    for n in reversed(order):  # then pull every node as late as its consumers allow (ALAP)
        succ = [layer[s] for s in g.successors(n)]
        layer[n] = min(succ) - 1 if succ else (depth[n] if g.in_degree(n) else last)
    columns: dict[int, list] = {}
    for n in order:
        columns.setdefault(layer[n], []).append(n)
    lo = min(columns, default=0)
    pos = {}
    for x, col in columns.items():
        for y, n in enumerate(sorted(col, key=lambda n: g.nodes[n].get("order", 0))):
            pos[n] = ((x - lo) * (NODE_W + GAP_X), y * (NODE_H + GAP_Y))
    return pos


def _status_of(key, sites: dict) -> str:
    s = sites.get(key)
    return "" if s is None else ("site-rewritten" if s["status"] == "rewritten" else "site-skipped")


def _svg(svg_id: str, nodes: dict, edges: set, pos: dict, hidden: bool) -> str:
    xs = [p[0] for p in pos.values()] or [0]
    ys = [p[1] for p in pos.values()] or [0]
    w, h = max(xs) + NODE_W + 20, max(ys) + NODE_H + 20
    out = [f'<svg id="{_esc(svg_id)}" class="graph{" hidden" if hidden else ""}" viewBox="-10 -10 {w} {h}" '
           f'data-w="{w}" data-h="{h}" xmlns="http://www.w3.org/2000/svg">']
    for a, b in edges:
        if a in pos and b in pos:
            (x1, y1), (x2, y2) = pos[a], pos[b]
            out.append(f'<line x1="{x1 + NODE_W}" y1="{y1 + NODE_H / 2}" x2="{x2}" y2="{y2 + NODE_H / 2}"/>')
    for nid, attrs in nodes.items():
        x, y = pos[nid]
        cls = " ".join(c for c in ("node", attrs.get("cls", "")) if c)
        out.append(f'<g class="{cls}" data-id="{_esc(nid)}" data-module="{_esc(attrs.get("module", ""))}" '
                   f'data-site="{_esc(attrs.get("site") or "")}" transform="translate({x},{y})">'
                   f'<title>{_esc(attrs.get("title", nid))}</title>'
                   f'<rect width="{NODE_W}" height="{NODE_H}" rx="4"/>'
                   f'<text x="5" y="15">{_esc(_short(attrs.get("label", nid)))}</text></g>')
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


def _module_level(snap: list, sites: dict, svg_id: str, hidden: bool, collapse: bool) -> str:
    def group(m: str) -> str:
        m = m or "<top>"
        return _NUM.sub("*", m) if collapse else m

    owner = {n["name"]: group(n["module"]) for n in snap if n["op"] not in ("output",)}
    members: dict[str, set] = {}
    site_keys: dict[str, set] = {}
    first: dict[str, int] = {}
    for i, n in enumerate(snap):
        if n["name"] not in owner:
            continue
        gname = owner[n["name"]]
        members.setdefault(gname, set()).add(n["module"] or "<top>")
        first.setdefault(gname, i)
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
        count = len(members[gname])
        label = gname + (f" ×{count}" if collapse and count > 1 else "")
        nodes[gname] = {"label": label.rsplit(".", 2)[-1] if len(label) > 18 else label, "module": gname,
                        "site": sorted(keys)[0] if keys else "", "cls": cls,
                        "title": label + ("\nsites: " + ", ".join(sorted(keys)) if keys else "")}
    return _svg(svg_id, nodes, edges, _layered(g), hidden)


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
  function search(){
    const q = document.getElementById('search').value.trim().toLowerCase();
    const s = current(); if (!s) return;
    let first = null;
    s.querySelectorAll('g.node').forEach(g => {
      const hit = q !== '' && (g.dataset.module || '').toLowerCase().includes(q);
      g.classList.toggle('match', hit);
      if (hit && !first) first = g;
    });
    if (first) center(s, first);
  }
  function center(s, g){
    const m = /translate\\(([-\\d.]+),([-\\d.]+)\\)/.exec(g.getAttribute('transform'));
    if (!m) return;
    const vb = s.viewBox.baseVal;
    vb.x = +m[1] - vb.width / 2; vb.y = +m[2] - vb.height / 2;
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
  show();
  focusFirstSite();
})();
"""


def _fmt(x, digits=4) -> str:
    return "-" if x is None else (f"{x:.{digits}g}" if isinstance(x, float) else str(x))


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
        f"</header>")
    rows = ["<table id='site-table'><tr><th>site</th><th>kind</th><th>status</th><th>kernel / reason</th>"
            "<th>shape</th><th>rel-L1</th><th>cos</th></tr>"]
    for s in d["sites"]:
        err = s.get("error") or {}
        ok = s["status"] == "rewritten"
        shape = (s.get("shapes") or {}).get("q") or (s.get("shapes") or {}).get("x") or ""
        rows.append(f"<tr class='site' data-key='{_esc(s['key'])}' data-graph='{s.get('graph', 0)}'>"
                    f"<td>{_esc(s['key'])}</td><td>{_esc(s['kind'])}</td>"
                    f"<td class='{'ok' if ok else 'skip'}'>{_esc(s['status'])}</td>"
                    f"<td>{_esc(s.get('kernel') if ok else s.get('reason'))}</td><td>{_esc(shape)}</td>"
                    f"<td>{_esc(_fmt(err.get('rel_l1')))}</td><td>{_esc(_fmt(err.get('cos'), 6))}</td></tr>")
    rows.append("</table>")
    breaks = "".join(f"<li>x{b['count']}: {_esc(b['reason'])}</li>" for b in sm.get("graph_breaks", []))
    parts.append(f"<div id='tables'>{''.join(rows)}"
                 f"<h3>Graph breaks</h3><ul id='graph-breaks'>{breaks or '<li>none</li>'}</ul></div>")
    graphs = report.graphs or []
    total_nodes = sum(len(g.get("after") or []) for g in graphs)
    default_level = "ops" if total_nodes <= 1500 else "layers"
    nav = ["<nav>"]
    for g in graphs:
        nav.append(f"<button data-k='graph' data-v='{g['index']}'>graph {g['index']}</button>")
    for k, vals in (("phase", ("before", "after")), ("level", ("ops", "modules", "layers"))):
        nav.extend(f"<button data-k='{k}' data-v='{v}'>{v}</button>" for v in vals)
    nav.append("<input id='search' placeholder='search module path…' size='30'>"
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
