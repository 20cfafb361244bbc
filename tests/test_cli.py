"""The command line: demo, inspect TARGET, exit codes, JSON report."""

import json
import pathlib

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


def test_bad_target_and_options_exit_2(capsys):
    assert main(["inspect", "no_colon_here", "--quiet"]) == 2
    assert "TARGET" in capsys.readouterr().err
    assert main(["inspect", "/no/such/file.py:build", "--quiet"]) == 2
    assert main(["inspect", "json:nothing_here", "--quiet"]) == 2
    target = str(ROOT / "examples" / "tiny_attention.py") + ":build"
    assert main(["inspect", target, "--quiet", "--options", '{"attention": {"quant": "int4"}}']) == 2
    assert "attention.quant" in capsys.readouterr().err
    assert main(["inspect", target, "--quiet", "--options", "{not json"]) == 2
