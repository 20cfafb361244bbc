"""The speed-versus-error front a `search="all"` calibration explored: its data, its Pareto set,
and two drawings of it (a PNG through matplotlib, an inline SVG for the HTML report).

The front is plain JSON, kept in the plan as `plan.meta["front"]`:

    {"arch": "sm90", "cost_model": "analytical" | "measured: <file>",
     "baseline_time": seconds (the model's rewritable sites unchanged, estimated),
     "budget": model rel-L1 budget (optional),
     "points": [{"time": seconds (estimated, the whole model's rewritable sites),
                 "error": predicted model-output rel-L1,
                 "measured_error": measured model-output rel-L1 or null,
                 "chosen": true for the plan's point,
                 "label": what the point changes (short)}, ...]}

Both drawings put the predicted error on x and the estimated speedup (baseline_time / time) on
y: every explored point, the Pareto line (no other point is both faster and more accurate), the
chosen point highlighted (and its measured error, where known), the budget as a vertical line.
"""

from __future__ import annotations

import html
import math
from typing import Mapping, Sequence

POINT_KEYS = ("time", "error", "measured_error", "chosen", "label")


def make_front(arch: str, cost_model: str, baseline_time: float, points: Sequence[Mapping],
               budget: float | None = None) -> dict:
    """A front dict (checked, JSON-able) from its parts; each point needs time, error and label,
    measured_error and chosen default to None and False."""
    front = {"arch": arch, "cost_model": cost_model, "baseline_time": float(baseline_time),
             "points": [{"time": float(p["time"]), "error": float(p["error"]),
                         "measured_error": None if p.get("measured_error") is None else float(p["measured_error"]),
                         "chosen": bool(p.get("chosen", False)), "label": str(p.get("label", ""))}
                        for p in points]}
    if budget is not None:
        front["budget"] = float(budget)
    check_front(front)
    return front


def check_front(front: Mapping) -> None:
    """Raise ValueError where `front` is not the shape above (at most one chosen point)."""
    for key in ("arch", "cost_model", "baseline_time", "points"):
        if key not in front:
            raise ValueError(f"front: missing {key!r}")
    if not (isinstance(front["baseline_time"], (int, float)) and front["baseline_time"] > 0):
        raise ValueError(f"front: baseline_time must be a positive number, got {front['baseline_time']!r}")
    for i, p in enumerate(front["points"]):
        for key in ("time", "error"):
            v = p.get(key)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 and (key == "error" or v > 0)):
                raise ValueError(f"front: points[{i}].{key} must be a finite number >= 0 (time > 0), got {v!r}")
    if sum(bool(p.get("chosen")) for p in front["points"]) > 1:
        raise ValueError("front: more than one chosen point")


def pareto(points: Sequence[Mapping]) -> list:
    """The points no other point dominates (another as fast or faster and as accurate or more,
    better in one of the two), sorted by error, then time. Equal points are all kept."""
    out = [p for p in points
           if not any(q["time"] <= p["time"] and q["error"] <= p["error"]
                      and (q["time"] < p["time"] or q["error"] < p["error"]) for q in points)]
    return sorted(out, key=lambda p: (p["error"], p["time"]))


def chosen(front: Mapping) -> dict | None:
    return next((p for p in front["points"] if p.get("chosen")), None)


def speedup(front: Mapping, point: Mapping) -> float:
    return front["baseline_time"] / point["time"]


def _title(front: Mapping) -> str:
    return f"{front['arch']}: estimated speedup vs predicted error ({front['cost_model']})"


def write_png(front: Mapping, path) -> str:
    """Draw the front as a PNG at `path` (matplotlib, no display needed); returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    check_front(front)
    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    pts = front["points"]
    ax.scatter([p["error"] for p in pts], [speedup(front, p) for p in pts], s=18, color="#9aa5b1",
               label="explored", zorder=2)
    line = pareto(pts)
    if line:
        ax.step([p["error"] for p in line], [speedup(front, p) for p in line], where="post", color="#1f77b4",
                marker="o", ms=4, label="Pareto front", zorder=3)
    best = chosen(front)
    if best is not None:
        ax.scatter([best["error"]], [speedup(front, best)], s=140, marker="*", color="#d62728",
                   label=f"chosen: {best['label']}"[:70], zorder=4)
        if best.get("measured_error") is not None:
            ax.scatter([best["measured_error"]], [speedup(front, best)], s=60, facecolors="none",
                       edgecolors="#d62728", label="chosen, measured error", zorder=4)
    if front.get("budget") is not None:
        ax.axvline(front["budget"], color="#555", ls="--", lw=1, label=f"budget {front['budget']:.3g}")
    ax.axhline(1.0, color="#bbb", lw=0.8)
    ax.set_xlabel("predicted model output rel-L1")
    ax.set_ylabel("estimated speedup (x)")
    ax.set_title(_title(front), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return str(path)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 2.5, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def esc(s) -> str:
    return html.escape(str(s), quote=True)


def front_svg(front: Mapping, width: int = 640, height: int = 380) -> str:
    """The PNG's chart as an inline SVG element (no dependency), points titled with their label,
    time, speedup and errors."""
    check_front(front)
    pts = front["points"]
    budget = front.get("budget")
    errs = [p["error"] for p in pts] + [p["measured_error"] for p in pts if p.get("measured_error") is not None]
    x_hi = max(errs + ([budget] if budget is not None else []) + [1e-6]) * 1.1
    speeds = [speedup(front, p) for p in pts] + [1.0]
    y_lo, y_hi = min(speeds), max(speeds)
    pad = max((y_hi - y_lo) * 0.08, 0.05)
    y_lo, y_hi = max(0.0, y_lo - pad), y_hi + pad
    left, right, top, bottom = 60, 20, 30, 45
    pw, ph = width - left - right, height - top - bottom

    def X(e):
        return left + pw * e / x_hi

    def Y(s):
        return top + ph * (1 - (s - y_lo) / (y_hi - y_lo))

    out = [f'<svg class="front" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f'<text x="{width / 2}" y="16" text-anchor="middle">{esc(_title(front))}</text>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" style="fill:none;stroke:#888"/>']
    for t in _ticks(0.0, x_hi):
        out.append(f'<line x1="{X(t):.1f}" y1="{top}" x2="{X(t):.1f}" y2="{top + ph}" style="stroke:#eee"/>'
                   f'<text x="{X(t):.1f}" y="{top + ph + 14}" text-anchor="middle">{t:.3g}</text>')
    for t in _ticks(y_lo, y_hi):
        out.append(f'<line x1="{left}" y1="{Y(t):.1f}" x2="{left + pw}" y2="{Y(t):.1f}" style="stroke:#eee"/>'
                   f'<text x="{left - 5}" y="{Y(t) + 4:.1f}" text-anchor="end">{t:.3g}x</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 8}" text-anchor="middle">predicted model output rel-L1</text>'
               f'<text transform="translate(14,{top + ph / 2}) rotate(-90)" text-anchor="middle">'
               f'estimated speedup</text>')
    if y_lo <= 1.0 <= y_hi:
        out.append(f'<line class="baseline" x1="{left}" y1="{Y(1):.1f}" x2="{left + pw}" y2="{Y(1):.1f}" '
                   f'style="stroke:#bbb"/>')
    if budget is not None:
        out.append(f'<line class="budget" x1="{X(budget):.1f}" y1="{top}" x2="{X(budget):.1f}" y2="{top + ph}" '
                   f'style="stroke:#555;stroke-dasharray:5,4"><title>budget {budget:.4g}</title></line>'
                   f'<text x="{X(budget) + 4:.1f}" y="{top + 12}">budget {budget:.3g}</text>')
    line = pareto(pts)
    if line:  # a staircase: each Pareto point's speed holds until the next, more error-tolerant one
        xy = []
        for a, b in zip(line, line[1:] + [None]):
            xy.append((X(a["error"]), Y(speedup(front, a))))
            if b is not None:
                xy.append((X(b["error"]), Y(speedup(front, a))))
        out.append('<polyline class="pareto" style="fill:none;stroke:#1f77b4;stroke-width:1.5" points="'
                   + " ".join(f"{x:.1f},{y:.1f}" for x, y in xy) + '"/>')
    on_front = {id(p) for p in line}
    for p in pts:
        tip = (f"{p['label']}: {speedup(front, p):.3g}x ({p['time'] * 1e3:.4g} ms), predicted rel-L1 "
               f"{p['error']:.4g}" + ("" if p.get("measured_error") is None else
                                      f", measured {p['measured_error']:.4g}"))
        cls, fill, r = ("point pareto-point", "#1f77b4", 4) if id(p) in on_front else ("point", "#9aa5b1", 3)
        if p.get("chosen"):
            cls, fill, r = cls + " chosen", "#d62728", 7
        out.append(f'<circle class="{cls}" cx="{X(p["error"]):.1f}" cy="{Y(speedup(front, p)):.1f}" r="{r}" '
                   f'style="fill:{fill}"><title>{esc(tip)}</title></circle>')
    best = chosen(front)
    if best is not None and best.get("measured_error") is not None:
        out.append(f'<circle class="measured" cx="{X(best["measured_error"]):.1f}" '
                   f'cy="{Y(speedup(front, best)):.1f}" r="7" style="fill:none;stroke:#d62728">'
                   f'<title>chosen, measured rel-L1 {best["measured_error"]:.4g}</title></circle>')
    out.append("</svg>")
    return "".join(out)
