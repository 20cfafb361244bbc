"""The inspection tool: HTML view in a real (headless) browser, logging channels, progress."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import attnopt
from attnopt.inspection.html import render_html
from attnopt.inspection.target import load_target

ROOT = pathlib.Path(__file__).parents[1]
ARTIFACTS = ROOT / "out"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def report():
    model, inputs, kwargs = load_target(str(ROOT / "examples" / "tiny_attention.py") + ":build")
    return attnopt.inspect(model, *inputs, options={"attention": {"min_seq_len": 0}})


def test_html_is_self_contained(report):
    page = render_html(report)
    assert "<svg" in page and "attnopt-data" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "no network resources"
    data = json.loads(page.split("id='attnopt-data'>", 1)[1].split("</script>", 1)[0].replace("<\\/", "</"))
    assert set(data["sites"]) == {s.key for s in report.sites}
    # one highlighted anchor per rewritten site in the "after" op graph
    after = page.split('id="g0-after-ops"', 1)[1].split("</svg>", 1)[0]
    assert after.count("site-anchor") == len(report.rewritten()) == 2


def _chromium(*args, page, profile, fragment=""):
    """Headless chromium on `page`; its own profile dir, so tests in parallel workers don't share one."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
           *args, page.as_uri() + (f"#{fragment}" if fragment else "")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs Debian's)")
def test_html_in_headless_chromium(report, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    page = ARTIFACTS / "inspect_report.html"
    attnopt.inspection.html.save_html(report, str(page))
    dom = _chromium("--dump-dom", page=page, profile=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console  # the page's script ran without errors (it logs nothing otherwise)
    svg = dom.stdout.split('id="g0-after-ops"', 1)[1].split("</svg>", 1)[0]
    assert len(re.findall(r'class="[^"]*site-anchor', svg)) == len(report.rewritten())
    shot = ARTIFACTS / "inspect_screenshot.png"
    r = _chromium("--window-size=1400,900", f"--screenshot={shot}", page=page, profile=tmp_path)
    assert r.returncode == 0 and shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")


def test_torch_logs_channel_and_structured_trace(tmp_path):
    code = textwrap.dedent("""
        import torch, torch.nn.functional as F
        import attnopt
        f = torch.compile(lambda q: F.scaled_dot_product_attention(q, q, q, is_causal=True),
                          backend=attnopt.backend({"attention": {"min_seq_len": 0}},
                                                  inductor_config={"fx_graph_cache": False}))
        f(torch.randn(1, 2, 77, 32, dtype=torch.bfloat16))
    """)
    env = dict(os.environ, TORCH_LOGS="attnopt", TORCH_TRACE=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("attention site #0: rewritten") == 1, r.stderr[-3000:]  # one handler, not two
    traces = "".join(p.read_text() for p in tmp_path.glob("**/*") if p.is_file())
    assert "attnopt_sites" in traces


def test_progress_messages(capsys):
    msgs = []
    x = torch.randn(1, 2, 77, 32, dtype=torch.bfloat16)

    class M(torch.nn.Module):
        def forward(self, q):
            return torch.nn.functional.scaled_dot_product_attention(q, q, q)

    attnopt.inspect(M(), x, options={"attention": {"min_seq_len": 0}}, progress=msgs.append)
    text = "\n".join(msgs)
    assert "compiling graph 0" in text and "measured #0" in text and "done:" in text


def test_table_lists_every_site_and_summary(report):
    text = str(report)
    for s in report.sites:
        assert s.key in text
    assert "sites rewritten: 2/2" in text and "end-to-end" in text and "graph breaks: 0" in text


# ----------------------------------------------------------------- a multi-layer model (HTML views)

def _positions(page: str) -> dict:
    """svg id -> [(x, y) of every node box] in the rendered page."""
    out = {}
    for m in re.finditer(r'<svg id="([^"]+)"(.*?)</svg>', page, re.S):
        out[m.group(1)] = re.findall(r'<g class="[^"]*node[^"]*"[^>]*transform="translate\(([-\d.]+),([-\d.]+)\)"',
                                     m.group(2))
    return out


@pytest.fixture(scope="module")
def llama_report():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval().to(torch.bfloat16)
    return attnopt.inspect(model, torch.randint(0, 128, (1, 16)), options={"attention": {"min_seq_len": 0}})


def test_llama_site_paths_read_model_layers(llama_report):
    """Regression: Dynamo's L['self'] / L['args'][0] roots are stripped from module paths."""
    keys = sorted(s.key for s in llama_report.sites if s.kind == "attention")
    assert keys == [f"model.layers.{i}.self_attn#0" for i in range(3)]
    q = llama_report.sites[0].shapes["q"]
    assert q[-3:] == [4, 16, 16] and llama_report.sites[0].shapes["k"][-3:] == [2, 16, 16]  # one layout, GQA


def test_no_two_nodes_share_a_position_in_any_view(llama_report):
    page = render_html(llama_report)
    views = _positions(page)
    assert {v.rsplit("-", 1)[1] for v in views} == {"ops", "modules", "layers"}
    for svg_id, pos in views.items():
        assert len(pos) > 3, svg_id
        assert len(set(pos)) == len(pos), f"{svg_id}: {len(pos) - len(set(pos))} boxes on top of another"
    layers = page.split('id="g0-after-layers"', 1)[1].split("</svg>", 1)[0]
    box = re.search(r'<g [^>]*data-module="model\.layers\.\*\.self_attn" data-members="([^"]*)"', layers)
    assert box, "repeated layers collapse into model.layers.*.self_attn"
    assert box.group(1).split() == [f"model.layers.{i}.self_attn" for i in range(3)]


def test_layout_breaks_module_cycles():
    """A layer and its attention feed each other: every box still gets its own place."""
    import networkx as nx

    from attnopt.inspection.html import _layered

    g = nx.DiGraph()
    for i, n in enumerate(["top", "l0", "l0.attn", "l1", "l1.attn", "head"]):
        g.add_node(n, order=i)
    g.add_edges_from([("top", "l0"), ("l0", "l0.attn"), ("l0.attn", "l0"), ("l0", "l1"), ("l1", "l1.attn"),
                      ("l1.attn", "l1"), ("l1", "head")])
    pos = _layered(g)
    assert set(pos) == set(g.nodes) and len(set(pos.values())) == len(pos)
    xs = [pos[n][0] for n in ["top", "l0", "l0.attn", "l1", "l1.attn", "head"]]
    assert xs == sorted(xs) and xs[0] < xs[-1]  # first appearance reads left to right


def test_only_repeated_layers_collapse():
    from attnopt.inspection.html import repeat_groups

    paths = {}
    for b in range(3):
        paths.update({f"blocks.{b}": "Block", f"blocks.{b}.attn": "Attention", f"blocks.{b}.ff.net.0": "GELU",
                      f"blocks.{b}.ff.net.0.proj": "Linear", f"blocks.{b}.ff.net.2": "Linear"})
    paths.update({"extra.0": "Linear", "extra.1": "Dropout"})
    names = repeat_groups(paths)
    assert names["blocks.1.attn"] == "blocks.*.attn"
    assert names["blocks.2.ff.net.0.proj"] == "blocks.*.ff.net.0.proj"  # net.0 and net.2 differ: kept
    assert names["blocks.0.ff.net.2"] == "blocks.*.ff.net.2"
    assert names["extra.0"] == "extra.0" and names["extra.1"] == "extra.1"
    mixed = repeat_groups({"h.0": "Dense", "h.1": "Dense", "h.2": "MoE", "h.3": "MoE", "h.4": "MoE"})
    assert mixed["h.1"] == "h.{0-1}" and mixed["h.4"] == "h.{2-4}"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs Debian's)")
def test_layers_view_search_finds_a_collapsed_layer(llama_report, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    page = ARTIFACTS / "inspect_llama.html"
    attnopt.inspection.html.save_html(llama_report, str(page))
    # the URL's fragment picks the view and fills the search box
    dom = _chromium("--dump-dom", page=page, profile=tmp_path, fragment="level=layers&q=layers.2")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert not [ln for ln in dom.stderr.splitlines() if ":CONSOLE" in ln]
    assert "hidden" not in re.search(r'<svg id="g0-after-layers"[^>]*>', dom.stdout).group(0)
    svg = dom.stdout.split('id="g0-after-layers"', 1)[1].split("</svg>", 1)[0]
    matched = re.findall(r'<g class="node[^"]*\bmatch\b[^"]*" data-id="([^"]*)"', svg)
    assert "model.layers.*.self_attn" in matched
    r = _chromium("--window-size=1400,900", f"--screenshot={ARTIFACTS / 'inspect_llama_layers.png'}", page=page,
                  profile=tmp_path, fragment="level=layers")
    assert r.returncode == 0


# ----------------------------------------------------------------- graph breaks

class _TwoTopLevel(torch.nn.Module):
    """Two top-level attention calls with a graph break between them: two graphs, two sites."""

    def forward(self, q):
        a = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        torch._dynamo.graph_break()
        return torch.nn.functional.scaled_dot_product_attention(a, a, a)


class _BreakInLoop(torch.nn.Module):
    """A break inside a loop: Dynamo cannot split there and skips the whole frame."""

    def forward(self, q):
        for _ in range(2):
            q = torch.nn.functional.scaled_dot_product_attention(q, q, q)
            print("", end="")
        return q


def test_graph_break_is_reported_with_its_reason():
    rep = attnopt.inspect(_TwoTopLevel(), torch.randn(1, 2, 64, 32, dtype=torch.bfloat16),
                          options={"attention": {"min_seq_len": 0}})
    assert rep.summary["graphs"] == 2
    (gb,) = rep.summary["graph_breaks"]
    assert gb["kind"] == "graph break" and "graph_break()" in gb["reason"]
    assert any("User-inserted graph break" in e for e in gb["explanation"])
    # the two sites are both top-level '#0' in their own graph: the keys stay apart
    assert sorted(s.key for s in rep.sites) == ["#0", "#0@g1"]
    assert all(s.status == "rewritten" and s.error for s in rep.sites)
    text = str(rep)
    assert "graph breaks: 1" in text and "User-inserted graph break" in text and "sites rewritten: 2/2" in text


def test_frame_skipping_break_in_a_loop_is_reported():
    rep = attnopt.inspect(_BreakInLoop(), torch.randn(1, 2, 64, 32, dtype=torch.bfloat16),
                          options={"attention": {"min_seq_len": 0}})
    assert rep.summary["graphs"] == 0 and rep.sites == []
    breaks = rep.summary["graph_breaks"]
    assert len(breaks) == 1 and breaks[0]["kind"].startswith("frame skipped")
    assert any("for/while loop" in e for e in breaks[0]["explanation"])
    assert any("print" in e for e in breaks[0]["explanation"])  # the break that caused it, too
    assert "compiled no graph" in rep.summary["warnings"][0]
    text = str(rep)
    assert "WARNING: Dynamo compiled no graph" in text and "graph breaks: 1" in text


# ----------------------------------------------------------------- terminal table

def _rec(key, kind="attention", status="rewritten", **kw):
    return attnopt.SiteRecord(kind=kind, module=key.split("#")[0], key=key, status=status, **kw)


def _table_report(sites):
    return attnopt.Report(sites=sites, summary={"graphs": 1, "graph_breaks": []}, options={}, env={})


def test_table_sorts_naturally_and_cuts_paths_in_the_middle():
    long = "encoder.transformer.blocks.{}.attention.self_attention_layer#0"
    sites = [_rec(long.format(i), kernel="reference/int8qk-f16pv") for i in (10, 2, 1)]
    lines = str(_table_report(sites)).splitlines()
    rows = [ln for ln in lines[2:] if ln.strip()][:3]
    from attnopt.inspection.table import render_table

    narrow = render_table(_table_report(sites), width=100).splitlines()[2:5]
    firsts = [r.split()[0] for r in narrow]
    assert all(len(f) < len(long) for f in firsts), firsts  # cut to fit 100 columns...
    assert [re.search(r"\.(\d+)\.", f).group(1) for f in firsts] == ["1", "2", "10"]  # ...indices kept
    assert all(f.endswith("#0") for f in firsts)
    assert [r.split()[0] for r in rows] == [long.format(i) for i in (1, 2, 10)]


def test_table_columns_kernel_arch_note_shapes_flops():
    att = _rec("model.layers.0.self_attn#0", kernel="triton/int8qk-f16pv", dtype="bfloat16", flops=10**9,
               shapes={"q": [8, 77, 64], "k": [2, 77, 64], "v": [2, 77, 64], "out": [1, 8, 77, 64]},
               details={"arch": "sm90"}, reason="two dense heads kept")
    lin = _rec("model.layers.0.mlp.up_proj", kind="linear", kernel="reference/w8a8: per-token int8",
               dtype="bfloat16", shapes={"x": [2, 77, 128], "w": [256, 128]})
    skip = _rec("lm_head", kind="linear", status="skipped", reason="module 'lm_head' is excluded",
                shapes={"x": [2, 77, 128], "w": [1000, 128]})
    from attnopt.inspection.table import HEADER, render_table

    lines = render_table(_table_report([att, lin, skip]), width=240).splitlines()
    head = lines[0]
    for col in ("kernel", "arch", "reason / note", "shapes", "FLOPs"):
        assert col in head
    row = {ln.split()[0]: ln for ln in lines[2:5]}
    cells = lambda ln: re.split(r"\s{2,}", ln.strip())  # noqa: E731
    a = dict(zip(HEADER, cells(row["model.layers.0.self_attn#0"])))
    assert a["kernel"] == "triton/int8qk-bf16pv" and a["arch"] == "sm90"  # the model's 16-bit dtype, by name
    assert a["reason / note"] == "two dense heads kept"  # a rewritten site's note has its own column
    assert a["shapes"] == "q 1x8x77x64, kv 1x2x77x64 bfloat16"  # B=1 keeps its batch dim
    li = dict(zip(HEADER, cells(row["model.layers.0.mlp.up_proj"])))
    assert li["kernel"] == "reference/w8a8" and li["arch"] == "cpu" and li["reason / note"] == "per-token int8"
    assert li["shapes"] == "x 2x77x128, w 256x128 bfloat16"
    assert li["FLOPs"] == "10.1M"  # 2 * 154 * 256 * 128
    sk = dict(zip(HEADER, cells(row["lm_head"])))
    assert sk["kernel"] == "-" and sk["reason / note"] == "module 'lm_head' is excluded"


def _cells(lines, key):
    from attnopt.inspection.table import HEADER

    row = next(ln for ln in lines if ln.startswith(key + " "))
    return dict(zip(HEADER, re.split(r"\s{2,}", row.strip())))


def test_table_shows_orig_error_sparsity_reasons_and_a_legend():
    """orig-L1 (the original model's own error) beside attnopt's; a sparse site that skipped
    nothing or stayed dense says why; the legend explains 'reference' and the formats."""
    from attnopt.inspection.html import render_html
    from attnopt.inspection.table import render_table

    err = {"rel_l1": 0.0094, "cos": 0.99995, "baseline_rel_l1": 0.0019}
    shapes = {"q": [2, 8, 256, 32], "k": [2, 2, 256, 32], "v": [2, 2, 256, 32], "out": [2, 8, 256, 32]}
    common = dict(dtype="bfloat16", shapes=shapes, flops=10**8, error=err)
    dense = _rec("l.0.attn#0", kernel="reference/int8qk-f16pv", details={"arch": "cpu"}, **common)
    kept = _rec("l.1.attn#0", kernel="reference/int8qk-f16pv +topk", details={"arch": "cpu", "sparsity": 0.0},
                **common)
    short = _rec("l.2.attn#0", kernel="reference/int8qk-f16pv", details={"arch": "cpu"},
                 reason="dense: key length 256 < sparsity.min_seq_len", **common)
    half = _rec("l.3.attn#0", kernel="reference/int8qk-f16pv +topk", details={"arch": "cpu", "sparsity": 0.5},
                **common)
    unrun = _rec("l.4.attn#0", kernel="reference/int8qk-f16pv +sparge +softcap 30", details={"arch": "cpu"},
                 dtype="bfloat16", shapes=shapes)
    soft = _rec("l.5.attn#0", kernel="reference/int8qk-f16pv +softcap 30", details={"arch": "cpu"}, **common)
    rep = _table_report([dense, kept, short, half, unrun, soft])
    lines = render_table(rep, width=240).splitlines()
    assert "orig-L1" in lines[0] and lines[0].index("rel-L1") < lines[0].index("orig-L1")
    d = _cells(lines, "l.0.attn#0")
    assert d["kernel"] == "reference/int8qk-bf16pv" and d["rel-L1"] == "0.0094" and d["orig-L1"] == "0.0019"
    assert d["sparsity"] == "-" and d["shapes"] == "q 2x8x256x32, kv 2x2x256x32 bfloat16"
    assert _cells(lines, "l.1.attn#0")["sparsity"] == "0 all kept"
    assert _cells(lines, "l.2.attn#0")["sparsity"] == "dense <min"
    h = _cells(lines, "l.3.attn#0")
    assert h["sparsity"] == "0.50" and h["saved"] == "50.0M"
    assert _cells(lines, "l.4.attn#0")["sparsity"] == "not run"
    assert _cells(lines, "l.5.attn#0")["sparsity"] == "-"  # soft-capping is not a sparse method
    text = "\n".join(lines)
    assert "f16pv" not in text.replace("bf16pv", "")
    leg = text.split("legend:", 1)[1].split("\n\n", 1)[0]
    assert "reference = attnopt's pure-PyTorch emulation of the GPU arithmetic" in leg
    assert "P.V in bf16" in leg and "orig-L1: the original model's own rel-L1" in leg
    assert "'0 all kept'" in leg and "sparsity.min_seq_len" in leg
    assert "triton" not in leg  # only the kernels the table shows are explained
    page = render_html(rep)
    assert "<th>orig-L1</th>" in page and "<th>sparsity</th>" in page and "id='legend'" in page
    assert "0 all kept" in page and "int8qk-bf16pv" in page and "pure-PyTorch emulation" in page


def _plan_with_front(tmp_path=None):
    from attnopt.calibration.front import make_front

    pts = [{"time": 1.0, "error": 0.0, "label": "unchanged"},
           {"time": 0.6, "error": 0.012, "measured_error": 0.014, "chosen": True, "label": "int8 QK, fp8 PV"},
           {"time": 0.7, "error": 0.02, "label": "int8 QK <dominated>"},
           {"time": 0.4, "error": 0.09, "label": "fp4 everywhere"}]
    front = make_front("sm90", "analytical", 1.0, pts, budget=0.05)
    return {"schema_version": 1, "kind": "attnopt-plan", "sites": {}, "meta": {"front": front}}


def test_html_calibration_section_shows_the_plans_front():
    """A plan whose meta holds a front: the page gets a Calibration section with the budget, the
    chosen point's predicted and measured error, the chart and every point; without one, none."""
    import xml.etree.ElementTree as ET

    from attnopt.config import normalize_options

    opts = normalize_options({"plan": _plan_with_front()}).to_dict()  # as inspect records them
    rep = attnopt.Report(sites=[], summary={"graphs": 1, "graph_breaks": []}, options=opts, env={})
    assert rep.plan_meta["front"]["arch"] == "sm90"
    page = render_html(rep)
    section = page.split("<details id='calibration' open>", 1)[1].split("</details>", 1)[0]
    summary = section.split("</summary>", 1)[0]
    assert "budget (model output rel-L1) 0.05" in summary and "predicted 0.012" in summary
    assert "measured 0.014" in summary and "estimated speedup 1.67x" in summary and "cost model: analytical" in summary
    ET.fromstring(section.split("<div class='body'>", 1)[1].split("<div class='points'>", 1)[0])  # the chart
    table = section.split("<table id='front-points'>", 1)[1]
    assert table.count("<tr class=") == 4 and table.count("<tr class='pareto chosen'>") == 1
    assert "int8 QK &lt;dominated&gt;" in table and "<tr class=''><td>int8 QK &lt;" in table
    for options in ({}, normalize_options({}).to_dict(),
                    {"plan": {"schema_version": 1, "sites": {}, "meta": {"budget": 0.05}}}):
        rep = attnopt.Report(sites=[], summary={"graphs": 1, "graph_breaks": []}, options=options, env={})
        assert "id='calibration'" not in render_html(rep)
    broken = {"plan": {"meta": {"front": {"arch": "sm90", "points": []}}}}
    rep = attnopt.Report(sites=[], summary={"graphs": 1, "graph_breaks": []}, options=broken, env={})
    page = render_html(rep)
    assert "front is unreadable: front: missing &#x27;cost_model&#x27;" in page


def test_table_legend_wraps_to_the_width_and_names_gpu_kernels():
    from attnopt.inspection.table import render_table

    a = _rec("b.0.attn#0", kernel="triton/sm90/int8qk-f16pv/BM128-BN128-w8-s2+tma (autotuned)", dtype="float16",
             shapes={"q": [4, 8, 77, 64], "k": [4, 8, 77, 64], "v": [4, 8, 77, 64]})
    b = _rec("b.1.attn#0", kernel="triton-interpreter/sm80/int8qk-f16pv/BM64-BN64", dtype="float16")
    text = render_table(_table_report([a, b]), width=100)
    assert "int8qk-fp16pv" in text
    leg = text.split("legend:", 1)[1].split("\n\n", 1)[0]
    assert "kernel triton = the compiled GPU kernel" in leg and "Triton's CPU interpreter" in leg
    assert "reference" not in leg
    assert all(len(ln) <= 100 for ln in leg.splitlines())


# ----------------------------------------------------------------- progress bar

class _FakeTTY:
    """A stream that says it is a terminal and keeps what is written."""

    def __init__(self, tty=True):
        self.tty, self.parts = tty, []

    def isatty(self):
        return self.tty

    def write(self, s):
        self.parts.append(s)

    def flush(self):
        pass

    @property
    def text(self):
        return "".join(self.parts)


def test_progress_bar_draws_on_a_terminal_only(monkeypatch):
    from attnopt.progress import Progress, track

    monkeypatch.delenv("ATTNOPT_PROGRESS", raising=False)
    tty = _FakeTTY()
    with Progress("calibrate", total=4, stream=tty, interval=0) as bar:
        for key in ("l.0.attn#0", "l.1.attn#0", "l.2.attn#0", "l.3.attn#0"):
            bar.note(key)
            bar.step()
            if bar.done == 2:
                half = bar.line(200)
    assert "[attnopt] calibrate [#####-----] 2/4 l.1.attn#0" in half and "elapsed, ~" in half and "left" in half
    frames = tty.text.split("\r")
    assert "4/4 l.3.attn#0" in frames[-1] and tty.text.endswith("\n") and "l.0.attn#0" in tty.text
    pipe = _FakeTTY(tty=False)
    assert list(track(range(3), "models", stream=pipe)) == [0, 1, 2]
    assert pipe.text == ""  # silent when not a terminal
    monkeypatch.setenv("ATTNOPT_PROGRESS", "0")
    off = _FakeTTY()
    list(track(range(3), "models", stream=off))
    assert off.text == ""
    monkeypatch.setenv("ATTNOPT_PROGRESS", "1")
    forced = _FakeTTY(tty=False)
    list(track(["a", "b"], "models", stream=forced, interval=0))
    assert "2/2" in forced.text


def test_progress_write_keeps_printed_lines_clean(capsys):
    from attnopt.progress import Progress

    tty = _FakeTTY()
    with Progress("models", total=2, stream=tty, enabled=True, interval=0) as bar:
        bar.note("llama")
        bar.write('{"model": "llama"}')
        bar.step()
    assert capsys.readouterr().out == '{"model": "llama"}\n'
    assert "\r\x1b[K" in tty.text  # the bar's line cleared before the print, drawn again after


def test_inspect_progress_bar_on_terminal_and_silent_otherwise(monkeypatch, capsys):
    monkeypatch.delenv("ATTNOPT_PROGRESS", raising=False)
    x = torch.randn(1, 2, 77, 32, dtype=torch.bfloat16)

    class M(torch.nn.Module):
        def forward(self, q):
            return torch.nn.functional.scaled_dot_product_attention(q, q, q)

    tty = _FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    attnopt.inspect(M(), x, options={"attention": {"min_seq_len": 0}}, progress=True)
    monkeypatch.undo()
    assert "[attnopt] inspect" in tty.text and "compiling graph 0" in tty.text
    assert "1/1 measured #0" in tty.text and "elapsed" in tty.text and tty.text.endswith("\n")
    attnopt.inspect(M(), x, options={"attention": {"min_seq_len": 0}}, progress=True)  # stderr is not a tty
    assert capsys.readouterr().err == ""


def test_calibrate_progress_bar_per_site(monkeypatch):
    monkeypatch.delenv("ATTNOPT_PROGRESS", raising=False)

    class M(torch.nn.Module):
        def forward(self, q):
            return torch.nn.functional.scaled_dot_product_attention(q, q, q)

    tty = _FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    x = torch.randn(1, 2, 256, 32, dtype=torch.bfloat16)
    attnopt.calibrate(M(), [(x,)], options={"attention": {"min_seq_len": 0, "sparsity": {"method": "sparge"}}},
                      progress=True, cache_dir=False)
    monkeypatch.undo()
    text = tty.text.replace("\r", "\n")  # the whole text in a failure's message, a draw per line
    assert "calibrate: capture [##########] 1/1 batch 1" in text, text
    assert "calibrate: search [##########] 1/1 searching #0 (2 heads)" in text and "elapsed" in text, text
    assert "calibrate: sensitivity [##########] 1/1 #0" in text, text
