"""The command line: demo, inspect TARGET, exit codes, JSON report."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from attnopt.cli import main

ROOT = pathlib.Path(__file__).parents[1]


def test_demo_prints_report_and_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["demo", "--quiet", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "layers.0.attn#0" in text and "end-to-end" in text
    rep = json.loads(out.read_text())
    assert rep["schema_version"] == 1
    att = [s for s in rep["sites"] if s["kind"] == "attention"]
    assert len(att) == 4 and all(s["status"] == "rewritten" for s in att)
    for s in att:
        assert set(s) >= {"kind", "module", "status", "reason", "op", "kernel", "shapes", "error"}
        assert s["error"]["rel_l1"] < 0.02 and s["error"]["cos"] > 0.999
    assert rep["summary"]["e2e"]["rel_l1"] < 0.05


def test_inspect_target_file(tmp_path, capsys):
    opts = tmp_path / "o.json"
    opts.write_text(json.dumps({"attention": {"min_seq_len": 0}}))
    assert main(["inspect", str(ROOT / "examples" / "tiny_attention.py") + ":build", "--quiet",
                 "--options", str(opts)]) == 0
    assert capsys.readouterr().out.count("rewritten") >= 2


def test_bad_target_and_options_exit_2(capsys, tmp_path):
    assert main(["inspect", "no_colon_here", "--quiet"]) == 2
    assert "TARGET" in capsys.readouterr().err
    assert main(["inspect", "/no/such/file.py:build", "--quiet"]) == 2
    assert main(["inspect", "json:nothing_here", "--quiet"]) == 2
    target = str(ROOT / "examples" / "tiny_attention.py") + ":build"
    assert main(["inspect", target, "--quiet", "--options", '{"attention": {"quant": "int4"}}']) == 2
    assert "attention.quant" in capsys.readouterr().err
    assert main(["inspect", target, "--quiet", "--options", "{not json"]) == 2
    bad = tmp_path / "opts.json"
    bad.write_text("{not json")
    capsys.readouterr()
    assert main(["inspect", target, "--quiet", "--options", str(bad)]) == 2
    assert "opts.json is not valid JSON" in capsys.readouterr().err


def _one_line_error(capsys, fragment):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("attnopt: error: ") and "Traceback" not in err, err
    assert fragment in err, err
    return err


def test_cli_errors_are_one_line_naming_the_fix(capsys, tmp_path, monkeypatch):
    """A missing --options file, a misspelled factory or file, a bad option, a bad flag: one line,
    exit 2, no traceback; the options are checked before any model is built."""
    monkeypatch.chdir(tmp_path)
    target = str(ROOT / "examples" / "tiny_attention.py") + ":build"
    assert main(["inspect", target, "--quiet", "--options", "missing.json"]) == 2
    _one_line_error(capsys, "file not found: missing.json")
    assert main(["inspect", target, "--quiet", "--options", "conf/missing.json"]) == 2
    _one_line_error(capsys, "file not found: conf/missing.json")
    assert main(["inspect", str(ROOT / "examples" / "tiny_attention.py") + ":buidl", "--quiet"]) == 2
    _one_line_error(capsys, "did you mean 'build'?")
    assert main(["inspect", str(ROOT / "examples" / "tiny_atention.py") + ":build", "--quiet"]) == 2
    _one_line_error(capsys, "did you mean")
    assert main(["inspect", "/no/such.py:build", "--quiet", "--options", '{"atention": {}}']) == 2
    _one_line_error(capsys, "did you mean 'attention'")  # options first: the bad file is not reached
    with pytest.raises(SystemExit) as e:
        main(["inspect", target, "--no-such-flag"])
    assert e.value.code == 2
    _one_line_error(capsys, "--no-such-flag")
    assert main(["demo", "--device", "cuda:7", "--quiet"]) == 2 or torch.cuda.device_count() > 7
    _one_line_error(capsys, "--device cuda:7")


def test_misspelled_module_target_gets_did_you_mean(tmp_path, monkeypatch, capsys):
    _write_pkg(tmp_path, ZOO)
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", "mymodels.zo:build", "--quiet"]) == 2
    _one_line_error(capsys, "did you mean 'mymodels.zoo'?")
    assert main(["inspect", "mymodels.zoo:biuld", "--quiet"]) == 2
    _one_line_error(capsys, "did you mean 'build'")


BROKEN_FORWARD = '''
import torch


class Broken(torch.nn.Module):
    def forward(self, x):
        raise ValueError("shape mismatch in my model")


def build():
    return Broken(), (torch.randn(2, 3),)
'''


def test_model_failure_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    f = tmp_path / "broken_model.py"
    f.write_text(BROKEN_FORWARD)
    assert main(["inspect", f"{f}:build", "--quiet"]) == 2
    _one_line_error(capsys, "ValueError: shape mismatch in my model (--debug shows the traceback)")
    assert main(["inspect", f"{f}:nope", "--quiet", "--debug"]) == 2
    assert main(["inspect", f"{f}:build", "--quiet", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("attnopt: error: the model failed")


@pytest.fixture(autouse=True)
def _forget_target_modules():
    """Targets imported by one test must not be found in sys.modules by the next."""
    yield
    for name in [m for m in sys.modules if m.split(".")[0] in ("mymodels", "badimport")]:
        del sys.modules[name]


def _write_pkg(root, body):
    pkg = root / "mymodels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "zoo.py").write_text(body)


ZOO = '''
import torch
import torch.nn.functional as F


class Attn(torch.nn.Module):
    def forward(self, q):
        return F.scaled_dot_product_attention(q, q, q)


def build():
    return Attn(), (torch.randn(1, 2, 64, 32, dtype=torch.bfloat16),)


def build_kwargs():
    return Attn(), {"q": torch.randn(1, 2, 64, 32, dtype=torch.bfloat16)}


def broken():
    raise RuntimeError("weights not found at /nowhere")
'''


def test_progress_is_silent_when_stderr_is_not_a_terminal(tmp_path, monkeypatch, capsys):
    """Without --quiet: a bar on a terminal only; a log (here captured stderr) gets no progress."""
    _write_pkg(tmp_path, ZOO)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ATTNOPT_PROGRESS", raising=False)
    assert main(["inspect", "mymodels.zoo:build", "--options", '{"attention": {"min_seq_len": 0}}']) == 0
    out = capsys.readouterr()
    assert "sites rewritten: 1/1" in out.out and out.err == ""


def test_module_target_from_current_directory(tmp_path, monkeypatch, capsys):
    """The `attnopt` console script's sys.path starts at its bin folder, not the current one."""
    _write_pkg(tmp_path, ZOO)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path), os.getcwd())])
    opts = json.dumps({"attention": {"min_seq_len": 0}})
    assert main(["inspect", "mymodels.zoo:build", "--quiet", "--options", opts]) == 0
    assert "sites rewritten: 1/1" in capsys.readouterr().out
    assert main(["inspect", "mymodels.zoo:build_kwargs", "--quiet", "--options", opts]) == 0  # inputs as kwargs
    assert "sites rewritten: 1/1" in capsys.readouterr().out


def test_factory_or_import_errors_exit_2_with_a_clear_message(tmp_path, monkeypatch, capsys):
    _write_pkg(tmp_path, ZOO)
    (tmp_path / "badimport.py").write_text("raise RuntimeError('needs a GPU to import')\n")
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", "mymodels.zoo:broken", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "mymodels.zoo:broken" in err and "RuntimeError: weights not found at /nowhere" in err
    assert "Traceback" not in err
    assert main(["inspect", "badimport:build", "--quiet"]) == 2  # not an ImportError, still a clear exit 2
    assert "RuntimeError: needs a GPU to import" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "mymodels" / "zoo.py") + ":broken", "--quiet"]) == 2


def test_python_m_inspect_writes_html_and_json(tmp_path):
    _write_pkg(tmp_path, ZOO)
    html, js = tmp_path / "r.html", tmp_path / "r.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "attnopt", "inspect", "mymodels.zoo:build", "--quiet", "--options",
                        '{"attention": {"min_seq_len": 0}}', "--html", str(html), "--json", str(js)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sites rewritten: 1/1" in r.stdout and f"wrote {html}" in r.stdout
    page = html.read_text()
    assert page.startswith("<!doctype html>") and 'id="g0-after-ops"' in page and "site-anchor" in page
    assert json.loads(js.read_text())["sites"][0]["key"] == "#0"


def test_readme_describes_every_column_the_table_prints():
    """README's "Seeing what changed" names each column of the terminal table and what the
    legend and the errors say."""
    from attnopt.inspection.table import HEADER

    text = (ROOT / "README.md").read_text()
    section = text.split("## Seeing what changed", 1)[1].split("\n## ", 1)[0]
    described = set()
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| column"):
            described |= {c.strip() for c in line.split("|")[1].split(",")}
    assert set(HEADER) <= described | {"saved"}, set(HEADER) - described
    flat = " ".join(section.split())
    for words in ("0 all kept", "dense <min", "orig-L1", "baseline_rel_l1", "pure-PyTorch emulation",
                  "legend", "did you mean", "file not found", "--debug", "progress bar"):
        assert words in flat, words


def test_first_run_prints_no_warnings(tmp_path):
    """`import torch` warns "Failed to initialize NumPy" where numpy is missing (torch does not
    require it): attnopt declares it. A first `inspect` in a fresh process prints nothing on
    stderr but what it means to (here nothing: stderr is not a terminal, so no progress bar)."""
    import re

    deps = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.S | re.M).group(1)
    assert re.search(r'^\s*"numpy[">=<]', deps, re.M), deps
    _write_pkg(tmp_path, ZOO)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("PYTHONWARNINGS", None)
    env.pop("ATTNOPT_PROGRESS", None)
    r = subprocess.run([sys.executable, "-m", "attnopt", "inspect", "mymodels.zoo:build", "--options",
                        '{"attention": {"min_seq_len": 0}}'], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr == "", r.stderr[-3000:]


def test_options_help_lists_every_key_from_the_schema(capsys):
    """`attnopt --options-help` and the subcommands' --help list the option keys, made from the
    same schema that validates --options (attnopt/config.py)."""
    from attnopt.config import schema_rows, sparsity_rows

    with pytest.raises(SystemExit) as e:
        main(["--options-help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for key, default, allowed, meaning in schema_rows():
        assert f"{key} = {default}" in out and allowed in out and meaning in out
    for method, name, default, allowed, meaning in sparsity_rows():
        assert f"  {method}:" in out and f"{name} = {default}" in out and meaning in out
    for cmd in ("demo", "inspect"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        for key, default, allowed, _ in schema_rows():
            line = next((x for x in out.splitlines() if x.strip().startswith(f"{key} = {default} ")), None)
            assert line is not None and line.rstrip().endswith(allowed), (cmd, key)
        assert "--options-help" in out
