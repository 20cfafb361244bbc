"""The pass-configuration dict: defaults, validation errors, README table."""

import json
import pathlib

import pytest
import torch

import attnopt
from attnopt.config import ConfigError, normalize_options, schema_markdown, schema_rows


def test_defaults_are_json_and_complete():
    d = attnopt.default_options()
    json.dumps(d)
    assert d["attention"]["quant"] == "int8" and d["attention"]["pv"] == "auto"
    assert d["linear"]["quant"] == "none" and d["arch"] == "auto" and d["plan"] is None
    assert normalize_options(None) == normalize_options({}) == normalize_options(d)


def test_config_error_is_value_error_naming_path_value_and_allowed():
    with pytest.raises(ValueError) as e:
        normalize_options({"attention": {"quant": "int4"}})
    err = e.value
    assert isinstance(err, ConfigError)
    assert err.path == "attention.quant" and err.value == "int4"
    msg = str(err)
    assert "attention.quant" in msg and "'int4'" in msg
    for allowed in ("'int8'", "'fp8'", "'none'"):
        assert allowed in msg


@pytest.mark.parametrize("opts, path, hint", [
    ({"attention": {"quantt": "int8"}}, "attention.quantt", "did you mean 'quant'"),
    ({"atention": {}}, "atention", "did you mean 'attention'"),
    ({"linear": {"smoth": None}}, "linear.smoth", "did you mean 'smooth'"),
    ({"attention": {"sparsity": {"method": "sparge", "tauu": 0.9}}}, "attention.sparsity.tauu",
     "did you mean 'tau'"),
])
def test_unknown_keys_suggest_the_closest(opts, path, hint):
    with pytest.raises(ConfigError) as e:
        normalize_options(opts)
    assert e.value.path == path
    assert hint in str(e.value)


@pytest.mark.parametrize("opts, path, hint", [
    ({"quant": "int8"}, "quant", "did you mean 'attention.quant' or 'linear.quant'?"),
    ({"min_seq_len": 64}, "min_seq_len", "did you mean 'attention.min_seq_len' or 'attention.sparsity.min_seq_len'?"),
    ({"attention": {"arch": "cpu"}}, "attention.arch", "did you mean top-level 'arch'?"),
    ({"attention": {"tau": 0.9}}, "attention.tau", "'attention.sparsity.tau'"),
    ({"linear": {"alpha": 0.5}}, "linear.alpha", "'linear.smooth.alpha'"),
])
def test_keys_at_the_wrong_level_suggest_their_full_path(opts, path, hint):
    """A key valid elsewhere in the schema is pointed to its real place, not just its siblings."""
    with pytest.raises(ConfigError) as e:
        normalize_options(opts)
    assert e.value.path == path
    assert hint in str(e.value), str(e.value)


def test_no_suggestion_for_keys_nothing_resembles():
    with pytest.raises(ConfigError) as e:
        normalize_options({"xyz": 1})
    assert "did you mean" not in str(e.value)


@pytest.mark.parametrize("opts, path", [
    ({"attention": {"enabled": "yes"}}, "attention.enabled"),
    ({"attention": {"min_seq_len": -1}}, "attention.min_seq_len"),
    ({"attention": {"min_seq_len": 1.5}}, "attention.min_seq_len"),
    ({"attention": {"min_seq_len": True}}, "attention.min_seq_len"),
    ({"attention": {"pv": "fp32"}}, "attention.pv"),
    ({"attention": {"include": 3}}, "attention.include"),
    ({"attention": {"sparsity": "sparge"}}, "attention.sparsity"),
    ({"attention": {"sparsity": {"tau": 0.9}}}, "attention.sparsity.method"),
    ({"attention": {"sparsity": {"method": "magic"}}}, "attention.sparsity.method"),
    ({"attention": {"sparsity": {"method": "sparge", "tau": 1.5}}}, "attention.sparsity.tau"),
    ({"attention": {"sparsity": {"method": "sparge", "tau": [0.9, -1]}}}, "attention.sparsity.tau[1]"),
    ({"attention": {"sparsity": {"method": "xattention", "stride": 5}}}, "attention.sparsity.stride"),
    ({"attention": {"sparsity": {"method": "radial"}}}, "attention.sparsity.frame_tokens"),
    ({"attention": {"sparsity": {"method": "block", "mask": [[True], [1]]}}}, "attention.sparsity.mask"),
    ({"linear": {"quant": "int4"}}, "linear.quant"),
    ({"linear": {"smooth": {"alpha": 2}}}, "linear.smooth.alpha"),
    ({"linear": {"smooth": 0.5}}, "linear.smooth"),
    ({"arch": "sm75"}, "arch"),
    ({"plan": 3}, "plan"),
    ({"plan": "/nonexistent/plan.json"}, "plan"),
    ({"plan": {"schema_version": 99, "sites": {}}}, "plan.schema_version"),
    ({"plan": {"schema_version": 1, "sites": {"a#0": {"kind": "linear", "quant": "int3"}}}}, "plan.sites.a#0.quant"),
])
def test_bad_values_name_their_key_path(opts, path):
    with pytest.raises(ConfigError) as e:
        normalize_options(opts)
    assert e.value.path == path, str(e.value)
    assert "allowed:" in str(e.value)


def test_valid_sparsity_gets_method_defaults():
    o = normalize_options({"attention": {"sparsity": {"method": "sparge", "tau": [0.9, 0.95]}}})
    sp = o["attention"]["sparsity"]
    assert sp["method"] == "sparge" and sp["tau"] == [0.9, 0.95] and sp["theta"] == 0.3


def test_options_hash_and_json_are_canonical():
    a = normalize_options({"attention": {"quant": "fp8", "pv": "fp16"}})
    b = normalize_options({"attention": {"pv": "fp16", "quant": "fp8"}})
    assert a == b and hash(a) == hash(b) and a.to_json() == b.to_json()
    assert a != normalize_options({})


def test_backend_validates_before_compiling():
    with pytest.raises(ConfigError, match="attention.quant"):
        attnopt.backend({"attention": {"quant": "int4"}})
    with pytest.raises(ValueError, match="mode"):
        attnopt.backend(None, mode="not-a-mode")


def test_string_backend_reports_config_error():
    torch._dynamo.reset()
    f = torch.compile(lambda x: x + 1, backend="attnopt", options={"attention": {"quant": "int4"}})
    with pytest.raises(Exception) as e:
        f(torch.randn(3))
    chain, err = [], e.value
    while err is not None:
        chain.append(err)
        err = err.__cause__ or err.__context__
    assert any(isinstance(x, ConfigError) for x in chain), chain


def test_readme_option_table_matches_schema():
    """README's tables are `python -m attnopt.config` output, pasted between the markers."""
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    start, end = "<!-- options:begin -->\n", "\n<!-- options:end -->"
    assert start in readme and end in readme
    table = readme.split(start, 1)[1].split(end, 1)[0]
    assert table.strip() == schema_markdown().strip(), "regenerate with: python -m attnopt.config"
    for key, *_ in schema_rows():
        assert f"| `{key}` |" in table


def test_ci_runs_the_readme_test_command():
    root = pathlib.Path(__file__).parents[1]
    readme, ci = (root / "README.md").read_text(), (root / ".ci" / "run").read_text()
    line = next(x for x in readme.splitlines() if "pytest" in x and x.startswith("pip install"))
    test_cmd = line.split("&&", 1)[1].split("#")[0].strip()
    assert test_cmd.replace("python ", "python3 ") in ci
