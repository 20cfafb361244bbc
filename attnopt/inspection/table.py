"""Plain-text rendering of a Report: one row per site, then a summary."""

from __future__ import annotations

import math
import shutil


def _fmt_err(x) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.4f}" if x >= 1e-4 else f"{x:.1e}"


def _fmt_flops(f) -> str:
    if not f:
        return "-"
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if f >= div:
            return f"{f / div:.1f}{unit}"
    return str(f)


def _shape(s: dict) -> str:
    q = s.get("q") or s.get("x") or s.get("out")
    return "x".join(str(d) for d in q) if q else "-"


def _cut(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def render_table(report, width: int | None = None) -> str:
    width = width or max(100, min(160, shutil.get_terminal_size((140, 20)).columns))
    rows = [("site", "kind", "status", "kernel / reason", "shape", "rel-L1", "cos", "sparsity", "FLOPs",
             "saved")]
    for s in sorted(report.sites, key=lambda r: (r.graph, r.key)):
        err = s.error or {}
        what = s.kernel if s.status == "rewritten" else (s.reason or "")
        sp = s.details.get("sparsity") if s.status == "rewritten" else None
        saved = s.flops * sp if (s.flops and sp) else None
        rows.append((s.key, s.kind, s.status, what, _shape(s.shapes), _fmt_err(err.get("rel_l1")),
                     _fmt_err(err.get("cos")), f"{sp:.2f}" if sp else "-", _fmt_flops(s.flops), _fmt_flops(saved)))
    fixed = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fixed[0] = min(fixed[0], 40)
    budget = width - sum(fixed) + fixed[3] - 2 * (len(fixed) - 1)
    fixed[3] = max(24, min(fixed[3], budget))
    lines = []
    for i, r in enumerate(rows):
        cells = [_cut(c, fixed[j]).ljust(fixed[j]) for j, c in enumerate(r)]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in fixed))
    sm = report.summary
    e2e = sm.get("e2e", {})
    lines.append("")
    by_kind = ", ".join(f"{k} {v['rewritten']}/{v['total']}" for k, v in sm.get("by_kind", {}).items())
    lines.append(f"sites rewritten: {sm.get('sites_rewritten', 0)}/{sm.get('sites_total', 0)} ({by_kind})")
    lines.append(f"graphs: {sm.get('graphs', 0)}, graph breaks: {len(sm.get('graph_breaks', []))}"
                 f"; compile {sm.get('compile_time_s', 0):.2f}s (attnopt passes {sm.get('pass_time_s', 0):.3f}s)")
    for gb in sm.get("graph_breaks", []):
        lines.append(f"  graph break x{gb['count']}: {_cut(gb['reason'], width - 20)}")
    if e2e:
        lines.append(f"end-to-end vs uncompiled model: rel-L1 {_fmt_err(e2e.get('rel_l1'))}, "
                     f"cos {_fmt_err(e2e.get('cos'))}, max abs {_fmt_err(e2e.get('max_abs'))}")
    env = report.env
    lines.append(f"torch {env.get('torch')}, triton {env.get('triton')}, device {env.get('device_name')}"
                 f" ({env.get('device')})")
    return "\n".join(lines)
