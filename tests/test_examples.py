"""The examples a user copies run as shipped (tiny configs on CPU)."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]


@pytest.mark.parametrize("script, args, expect", [
    ("llm_generate.py", ["--new-tokens", "3"], "generated 3 tokens"),
    ("vit_classifier.py", [], "agree with the uncompiled model"),
    ("dit_denoise.py", [], "denoised 4 steps"),
])
def test_example_runs(script, args, expect):
    pytest.importorskip("transformers")
    if script.startswith("dit"):
        pytest.importorskip("diffusers")
    r = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], capture_output=True, text=True,
                       timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert expect in r.stdout and "sites rewritten" in r.stdout
