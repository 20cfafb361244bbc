"""The examples a user copies run as shipped (tiny configs on CPU), rewrite every site, and stay
within the accuracy bound against the uncompiled model (numbers parsed from their summary line)."""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]
BOUND = 0.05
NUMBER = r"(\d+(?:\.\d+)?)"


def summary(stdout: str) -> dict:
    """The example's `summary:` line -> {'sites': (rewritten, total), metric name: value}."""
    line = next((ln for ln in stdout.splitlines() if ln.startswith("summary:")), None)
    assert line is not None, stdout[-3000:]
    sites = re.search(r"sites rewritten (\d+)/(\d+)", line)
    out = {"sites": (int(sites[1]), int(sites[2]))}
    for name, val in re.findall(r"([a-z -]+?) rel-L1 " + NUMBER, line):
        out[name.strip().split(";")[-1].strip()] = float(val)
    return out


def run(script: str, *args: str) -> str:
    r = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], capture_output=True, text=True,
                       timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_summary_parser():
    s = summary("x\nsummary: sites rewritten 2/3 (at 9 tokens); prefill rel-L1 0.0100; decode rel-L1 0.2\n")
    assert s == {"sites": (2, 3), "prefill": 0.01, "decode": 0.2}


def _all_rewritten(s: dict) -> None:
    rewritten, total = s["sites"]
    assert total > 0 and rewritten == total, s


def test_llm_generate():
    pytest.importorskip("transformers")
    out = run("llm_generate.py", "--new-tokens", "3")
    s = summary(out)
    _all_rewritten(s)
    assert "generated 3 tokens" in out
    # prefill quantized: a real but bounded difference; decode (dense) reads a cache the prefill filled
    assert 0 < s["prefill"] <= BOUND and s["decode"] <= BOUND, s
    # generate() with the INT8 KV cache (prefill also attnopt's) against the 16-bit StaticCache
    assert 0 < s["quantized cache"] <= BOUND, s


def test_vit_classifier():
    pytest.importorskip("transformers")
    s = summary(run("vit_classifier.py"))
    _all_rewritten(s)
    assert 0 < s["logits"] <= BOUND, s


def _denoise_with_plan(tmp_path, script: str) -> tuple[str, dict]:
    """Run a diffusers example that calibrates a plan into tmp_path: (its output, its summary)."""
    pytest.importorskip("diffusers")
    plan = tmp_path / "plan.json"
    out = run(script, "--plan", str(plan))
    s = summary(out)
    _all_rewritten(s)
    assert plan.exists()
    return out, s


def test_dit_denoise(tmp_path):
    out, s = _denoise_with_plan(tmp_path, "dit_denoise.py")
    assert "denoised 4 steps" in out
    assert 0 < s["step"] <= BOUND and s["final latent"] <= BOUND, s


def test_video_dit(tmp_path):
    """Wan-style video DiT: a calibrated SVG2 plan, the first quarter of the steps dense by the
    schedule, all steps on one compiled graph."""
    out, s = _denoise_with_plan(tmp_path, "video_dit.py")
    assert "denoised 8 steps (2 dense by the schedule" in out
    assert "graphs compiled: 1" in out, out[-2000:]
    assert "+svg2" in out  # the plan keeps SVG2 at some self-attention site
    assert 0 < s["step"] <= BOUND and 0 < s["final latent"] <= BOUND, s
