"""With CI set, a test dependency that is missing fails the run; without it, the tests skip."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from strict_skips import missing_dependency

HERE = Path(__file__).parent

CASES = textwrap.dedent("""
    import pytest

    def test_missing_required():
        pytest.importorskip("attnopt_no_such_module")

    def test_missing_optional():
        pytest.importorskip("timm.attnopt_no_such_module")

    def test_not_applicable():
        pytest.skip("SDPA itself rejects this mask")

    @pytest.mark.skipif(True, reason="chromium not installed (.ci/run installs Debian's)")
    def test_no_browser():
        pass
""")
MODULE_LEVEL = 'import pytest\npytest.importorskip("attnopt_no_such_module")\n\ndef test_a():\n    pass\n'


def _pytest(tmp_path, ci: str | None, source: str):
    (tmp_path / "test_cases.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "strict_skips", "-q", "-rs", "-p", "no:cacheprovider",
                        "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path)],
                       capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    return r.returncode, r.stdout, r.stdout.strip().splitlines()[-1]


def test_ci_turns_missing_dependencies_into_failures(tmp_path):
    rc, out, summary = _pytest(tmp_path, "true", CASES)
    assert rc == 1, out
    assert "test_missing_required" in out and "attnopt_no_such_module" in out
    assert "test_no_browser" in out and "chromium" in out
    # importorskip in the body fails the test; a skipif mark, checked at setup, is an error
    assert "1 failed" in summary and "1 error" in summary and "2 skipped" in summary, summary


def test_ci_fails_a_module_level_importorskip(tmp_path):
    rc, out, summary = _pytest(tmp_path, "true", MODULE_LEVEL)
    assert rc == 2, out  # a collection error interrupts the run
    assert "ERROR collecting" in out and "attnopt_no_such_module" in out, out


@pytest.mark.parametrize("ci", [None, "false"])
def test_without_ci_missing_dependencies_skip(tmp_path, ci):
    rc, out, summary = _pytest(tmp_path, ci, CASES)
    assert rc == 0 and "4 skipped" in summary, out
    rc, out, summary = _pytest(tmp_path, ci, MODULE_LEVEL)
    assert rc == 5 and "1 skipped" in summary, out  # 5: no test left to run
    assert "SKIPPED" in out  # -rs prints the reason


def test_reasons():
    assert missing_dependency("could not import 'transformers': No module named 'transformers'") == "transformers"
    assert missing_dependency("could not import 'diffusers.models': No module named 'diffusers'") == "diffusers.models"
    assert missing_dependency("could not import 'timm': No module named 'timm'") is None
    assert missing_dependency("chromium not installed (.ci/run installs Debian's)") == "chromium not installed"
    assert missing_dependency("needs a CUDA GPU") is None
    assert missing_dependency("torch.distributed not built") is None
