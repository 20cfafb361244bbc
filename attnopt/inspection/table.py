"""Plain-text rendering of a Report: one row per site, then a summary.

The column helpers (kernel, arch, note, shapes, FLOPs) are shared with the HTML view, so both
say the same thing about a site.
"""

from __future__ import annotations

import math
import re
import shutil
import sys
import textwrap

HEADER = ("site", "kind", "status", "kernel", "arch", "reason / note", "shapes", "rel-L1", "orig-L1", "cos",
          "sparsity", "FLOPs", "saved")
FLEX = (0, 5, 6)  # columns that give way (cut) when the terminal is narrow: site, note, shapes


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
    return str(int(f))


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def natural_key(text: str) -> list:
    """'layers.2' before 'layers.10': digit runs compare as numbers."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text) if t]


def cut_middle(s: str, n: int) -> str:
    """Keep both ends of `s`, at most n characters."""
    if len(s) <= n:
        return s
    if n < 5:
        return s[:n]
    head = (n - 1) // 3
    return s[:head] + "…" + s[len(s) - (n - 1 - head):]


def cut_path(path: str, n: int) -> str:
    """A module path in n characters, keeping what tells sites apart: the layer indices and the
    leaf. Names before the leaf shrink to their first letter first; then the leaf loses its middle."""
    if len(path) <= n:
        return path
    parts = path.split(".")
    for i in range(len(parts) - 1):
        if not parts[i].isdigit():
            parts[i] = parts[i][:1]
        if len(".".join(parts)) <= n:
            return ".".join(parts)
    prefix = ".".join(parts[:-1])
    room = n - len(prefix) - 1
    if prefix and room >= 6:
        return prefix + "." + cut_middle(parts[-1], room)
    return cut_middle(".".join(parts), n)


def _cut_end(s: str, n: int) -> str:
    return s if len(s) <= n else s[: max(0, n - 1)] + "…"


def _dims(shape) -> str:
    return "x".join(str(d) for d in shape)


def _with_batch(sh: dict) -> dict:
    """Attention operands are recorded without size-1 dims, so B=1 lost its batch dim; the
    output's recorded shape still has it: put the leading 1s back so every row reads alike."""
    q, out = sh.get("q"), sh.get("out")
    if not q or not out or len(out) <= len(q):
        return sh
    pad = len(out) - len(q)
    if any(d != 1 for d in out[:pad]):
        return sh
    return {n: ([1] * pad + list(d) if d and n in ("q", "k", "v") else d) for n, d in sh.items()}


def shapes_text(s) -> str:
    """Every operand in one layout, then the dtype: 'q 1x8x77x64, kv 1x2x77x64 bf16'."""
    sh = dict(s.shapes or {})
    if s.kind == "attention":
        sh = _with_batch(sh)
    if "k" in sh and sh.get("k") == sh.get("v"):
        sh["kv"] = sh.pop("k")
        sh.pop("v")
    parts = [f"{name} {_dims(dims)}" for name, dims in sh.items() if dims and name != "out"]
    text = ", ".join(parts) or "-"
    return f"{text} {s.dtype}" if s.dtype and parts else text


def linear_flops(shapes: dict) -> int | None:
    """2·M·N·K of x [.., K] @ w[N, K]^T; None for symbolic sizes."""
    x, w = shapes.get("x") or [], shapes.get("w") or []
    if len(w) != 2 or not x or not all(isinstance(d, int) for d in [*x, *w]):
        return None
    return 2 * math.prod(x[:-1]) * w[0] * w[1]


def site_flops(s) -> int | None:
    """The FLOPs the pass recorded, else an estimate from the shapes (linear sites)."""
    if s.flops:
        return s.flops
    return linear_flops(s.shapes or {}) if s.kind == "linear" else None


_DTYPE_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def kernel_words(kernel: str, dtype: str | None) -> str:
    """The report's kernel name as the table shows it: 'f16' (the 16-bit formats) becomes the
    site's own dtype, 'int8qk-bf16pv' for a bf16 model. The JSON keeps the name as recorded."""
    d = _DTYPE_SHORT.get(dtype or "")
    return re.sub(r"\bf16(qk|pv)\b", rf"{d if d in ('bf16', 'fp16') else 'fp16'}\1", kernel)


def kernel_parts(s) -> tuple[str, str, str]:
    """(kernel, arch, note): linear kernels read 'where/format: note', attention's arch is in details."""
    kernel = s.kernel or ""
    note = s.reason or ""
    if s.kind == "linear" and ": " in kernel:
        kernel, extra = kernel.split(": ", 1)
        note = f"{note}; {extra}" if note else extra
    arch = (s.details or {}).get("arch") or ""
    if not arch and kernel:
        where = kernel.split("/")
        arch = "cpu" if where[0] == "reference" else (where[1] if len(where) > 1 and where[0] == "triton" else "")
    if s.kind == "attention":
        kernel = kernel_words(kernel, s.dtype)
    return kernel or "-", arch or "-", note or "-"


def sparsity_text(s) -> str:
    """The measured fraction of skipped blocks, or why there is none: '0 all kept' (a sparse
    kernel whose predictor kept every block on these inputs), 'dense <min' (the key is shorter
    than sparsity.min_seq_len), 'not run' (a sparse site the example inputs did not reach), '-'
    (not a sparse site)."""
    if s.status != "rewritten":
        return "-"
    sp = (s.details or {}).get("sparsity")
    if sp is None:
        if "sparsity.min_seq_len" in (s.reason or ""):
            return "dense <min"
        return "not run" if re.search(r" \+(?!softcap)\w", s.kernel or "") else "-"
    if sp == 0:
        return "0 all kept"
    return f"{sp:.2f}"


def _row(s) -> tuple:
    err = s.error or {}
    kernel, arch, note = kernel_parts(s)
    sp = s.details.get("sparsity") if s.status == "rewritten" else None
    flops = site_flops(s)
    saved = flops * sp if (flops and sp) else None
    return (s.key, s.kind, s.status, kernel, arch, note, shapes_text(s), _fmt_err(err.get("rel_l1")),
            _fmt_err(err.get("baseline_rel_l1")), _fmt_err(err.get("cos")), sparsity_text(s), _fmt_flops(flops),
            _fmt_flops(saved))


def legend(sites) -> list[str]:
    """What the columns mean, said once under the table; kernel lines only for kernels it shows."""
    kernels = [x.kernel or "" for x in sites if x.status == "rewritten"]
    att = [x for x in sites if x.kind == "attention" and x.status == "rewritten"]
    lines = []
    if any(k.startswith("reference/") for k in kernels):
        lines.append("kernel reference = attnopt's pure-PyTorch emulation of the GPU arithmetic, what runs on a CPU"
                     + (" (@sm90: with that GPU's number formats)" if any("@" in k for k in kernels) else ""))
    if any(k.startswith("triton-interpreter/") for k in kernels):
        lines.append("kernel triton-interpreter = the GPU kernel run by Triton's CPU interpreter (slow, for checking)")
    if any(k.startswith("triton/") for k in kernels):
        lines.append("kernel triton = the compiled GPU kernel (sm80, sm90, ...: the GPU generation it is built for)")
    if any("/train-" in k for k in kernels):
        lines.append("train-int8 / train-fp8 = a training linear (linear.training): forward and both backward GEMMs "
                     "8-bit per 32x32 block (fp8: e4m3 forward, e5m2 dY), x kept 8-bit for backward; a train- norm "
                     "keeps its input 8-bit for backward")
    if att:
        lines.append("int8qk-bf16pv = Q.K^T in int8, P.V in bf16 (16-bit, the model's own dtype); fp8/fp4 alike; "
                     "+topk, +block, ...: sparse; +pv-skip: negligible P.V blocks skipped")
    lines.append("rel-L1 / cos: this site's output against float64 on your inputs; orig-L1: the original "
                 "model's own rel-L1 against float64 there (attnopt adds little when rel-L1 is close to it)")
    if any(sparsity_text(x) != "-" for x in att):
        lines.append("sparsity: fraction of attention blocks skipped on these inputs ('0 all kept': the predictor "
                     "kept every block; 'dense <min': key shorter than sparsity.min_seq_len; 'not run': the "
                     "inputs did not reach the site); saved: FLOPs skipped")
    lines.append("shapes: attention q/k/v as [batch, heads, tokens, features] (GQA's repeated heads left out); "
                 "linear x/w")
    return ["legend:"] + ["  " + ln for ln in lines]


def _widths(rows: list, width: int) -> list[int]:
    """Natural widths; the flexible columns shrink (note first, then shapes, then site) to fit."""
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    floor = {0: 32, 5: 12, 6: 14}
    for col in (5, 6, 0):
        over = sum(w) + 2 * (len(w) - 1) - width
        if over <= 0:
            break
        w[col] = max(min(w[col], floor[col]), w[col] - over)
    return w


def _table(sites, width: int) -> list[str]:
    rows = [HEADER] + [_row(s) for s in sorted(sites, key=lambda r: (r.graph, natural_key(r.key)))]
    w = _widths(rows, width)
    lines = []
    for i, r in enumerate(rows):
        cells = [(cut_path(c, w[j]) if j == 0 else _cut_end(c, w[j])).ljust(w[j]) for j, c in enumerate(r)]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * x for x in w))
    return lines


def _breaks(sm: dict, width: int) -> list[str]:
    lines = []
    for gb in sm.get("graph_breaks", []):
        lines.append(f"  {gb.get('kind', 'graph break')} x{gb['count']}: {_cut_end(gb['reason'], width - 30)}")
        for ex in gb.get("explanation", []):
            lines.append(f"      {_cut_end(ex, width - 6)}")
    return lines


def _default_width() -> int:
    """The terminal's width; piped to a file or a CI log nothing needs cutting."""
    if sys.stdout.isatty():
        return max(100, shutil.get_terminal_size((160, 20)).columns)
    return 240


def header(report, width: int) -> list[str]:
    """What must be read before the numbers: that rewritten sites run the CPU emulation."""
    cpu = report.summary.get("cpu_emulation")
    if not cpu:
        return []
    return textwrap.wrap(f"NOTE: {cpu['message']}", width, subsequent_indent="      ") + [""]


def _grad_lines(sites) -> list[str]:
    """inspect(grad=True): each measured site's backward and its gradients' rel-L1 vs float64."""
    rows = [(s.key, (s.error or {}).get("grad")) for s in sites]
    rows = [(k, g) for k, g in rows if g]
    if not rows:
        return []
    out = ["gradients (training op on each site's inputs, random upstream gradient; rel-L1 vs float64):"]
    for key, g in rows:
        if "backward" in g:
            out.append(f"  {key}: backward {g['backward']}, dQ {_fmt_err(g['dq'])}, dK {_fmt_err(g['dk'])}, "
                       f"dV {_fmt_err(g['dv'])}, min cos {_fmt_err(g['cos_min'])}")
        else:
            out.append(f"  {key}: training {g['training']}, Y {_fmt_err(g['y'])}, dX {_fmt_err(g['dx'])}, "
                       f"dW {_fmt_err(g['dw'])}, min cos {_fmt_err(g['cos_min'])}")
    return out


def render_table(report, width: int | None = None) -> str:
    width = width or _default_width()
    lines = header(report, width) + _table(report.sites, width)
    if report.sites:
        for ln in legend(report.sites):
            lines += textwrap.wrap(ln, width, initial_indent="", subsequent_indent="      ") if ln.startswith("  ") \
                else [ln]
    sm = report.summary
    e2e = sm.get("e2e", {})
    lines.append("")
    for w in sm.get("warnings", []):
        lines.append(f"WARNING: {w}")
    by_kind = ", ".join(f"{k} {v['rewritten']}/{v['total']}" for k, v in sm.get("by_kind", {}).items())
    lines.append(f"sites rewritten: {sm.get('sites_rewritten', 0)}/{sm.get('sites_total', 0)} ({by_kind})")
    lines.append(f"graphs: {sm.get('graphs', 0)}, graph breaks: {len(sm.get('graph_breaks', []))}"
                 f"; compile {sm.get('compile_time_s', 0):.2f}s (attnopt passes {sm.get('pass_time_s', 0):.3f}s)")
    lines += _breaks(sm, width)
    quantized = [x.details for x in report.sites if x.status == "rewritten" and "weight_bytes_before" in x.details]
    if quantized:
        before = sum(d["weight_bytes_before"] for d in quantized)
        after = sum(d["weight_bytes_after"] for d in quantized)
        lines.append(f"linear weights rewritten: {_fmt_bytes(before)} -> {_fmt_bytes(after)} "
                     f"({len(quantized)} sites, {after / max(before, 1):.2f}x)")
    lines += _grad_lines(report.sites)
    if e2e:
        lines.append(f"end-to-end vs uncompiled model: rel-L1 {_fmt_err(e2e.get('rel_l1'))}, "
                     f"cos {_fmt_err(e2e.get('cos'))}, max abs {_fmt_err(e2e.get('max_abs'))}")
    env = report.env
    lines.append(f"torch {env.get('torch')}, triton {env.get('triton')}, device {env.get('device_name')}"
                 f" ({env.get('device')})")
    return "\n".join(lines)
