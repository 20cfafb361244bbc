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


def _chromium(*args, page):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
           f"--user-data-dir={ARTIFACTS / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
           *args, page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs Debian's)")
def test_html_in_headless_chromium(report, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    page = ARTIFACTS / "inspect_report.html"
    attnopt.inspection.html.save_html(report, str(page))
    dom = _chromium("--dump-dom", page=page)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console  # the page's script ran without errors (it logs nothing otherwise)
    svg = dom.stdout.split('id="g0-after-ops"', 1)[1].split("</svg>", 1)[0]
    assert len(re.findall(r'class="[^"]*site-anchor', svg)) == len(report.rewritten())
    shot = ARTIFACTS / "inspect_screenshot.png"
    r = _chromium("--window-size=1400,900", f"--screenshot={shot}", page=page)
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
    assert "attention site #0: rewritten" in r.stderr
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
