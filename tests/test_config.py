"""Pass options: typed frozen classes, defaults, validation errors, README table."""

import copy
import dataclasses
import json
import pathlib
import pickle

import pytest
import torch

import attnopt
from attnopt.config import (SPARSITY_METHODS, AttentionOptions, BlockOptions, ConfigError, LinearOptions, Options,
                            PlanOptions, SmoothOptions, SpargeOptions, WindowOptions, normalize_options,
                            schema_markdown, schema_rows, sparsity_rows)


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
    sp = o.attention.sparsity
    assert isinstance(sp, SpargeOptions) and sp.method == "sparge" and sp.tau == (0.9, 0.95) and sp.theta == 0.3
    assert sp.to_dict() == {"method": "sparge", "tau": [0.9, 0.95], "theta": 0.3, "topk": None,
                            "pv_threshold": None, "sink": True, "local_keys": 0, "min_seq_len": 0}


def test_options_hash_and_json_are_canonical():
    a = normalize_options({"attention": {"quant": "fp8", "pv": "fp16"}})
    b = normalize_options({"attention": {"pv": "fp16", "quant": "fp8"}})
    assert a == b and hash(a) == hash(b) and a.to_json() == b.to_json()
    assert a != normalize_options({})


PLAN = {"schema_version": 1, "sites": {
    "l.0.attn#0": {"kind": "attention", "sparsity": {"method": "sparge", "topk": [0.3, 0.4], "dense_heads": [1]},
                   "error": {"rel_l1": [0.01, 0.02]}},
    "l.0.mlp.up": {"kind": "linear", "quant": "w8a8", "act_absmax": [1.0, 2.5]}}, "meta": {"budget": {"rel_l1": 0.05}}}

ROUND_TRIP = [
    None,
    {"attention": {"quant": "fp8", "pv": "fp16", "include": "blocks.*", "exclude": ["a", "b"], "decode": True}},
    {"attention": {"sparsity": {"method": "sparge", "tau": [0.9, 1], "topk": 1, "pv_threshold": [None, 3]}}},
    {"attention": {"sparsity": {"method": "window", "window": [64, 128], "sinks": 0}}},
    {"attention": {"sparsity": {"method": "block", "mask": [[[True, False], [True, True]]]}}},
    {"attention": {"sparsity": {"method": "svg", "frame_tokens": 64, "min_seq_len": 5}}},
    {"linear": {"quant": "w8a8", "smooth": {"alpha": 1}, "min_m": 3}, "arch": "sm90"},
    {"plan": PLAN},
]


def test_options_are_typed_and_read_by_attribute():
    o = normalize_options({"attention": {"quant": "fp8", "sparsity": {"method": "window", "window": [64, 128]}},
                           "linear": {"quant": "w8a8", "smooth": {}, "min_m": 5}, "arch": "sm90", "plan": PLAN})
    assert isinstance(o, Options) and isinstance(o.attention, AttentionOptions)
    assert isinstance(o.linear, LinearOptions) and isinstance(o.linear.smooth, SmoothOptions)
    assert o.attention.quant == "fp8" and o.attention.pv == "auto" and o.attention.include == ("*",)
    sp = o.attention.sparsity
    assert isinstance(sp, WindowOptions) and sp.method == "window" and sp.window == (64, 128) and sp.sinks == 64
    assert o.linear.min_m == 5 and o.linear.smooth.alpha == 0.5 and o.linear.exclude == ("lm_head", "*.lm_head")
    assert o.arch == "sm90" and isinstance(o.plan, PlanOptions)
    assert o.plan.sites["l.0.mlp.up"]["quant"] == "w8a8" and o.plan.site("nowhere") is None
    assert o.plan.site("l.0.attn#0")["sparsity"]["topk"] == [0.3, 0.4]  # a plain dict: lists, as in the JSON
    assert normalize_options(None).plan is None and normalize_options(None).attention.sparsity is None
    with pytest.raises(TypeError):
        o["attention"]  # no dict-style access: every reader uses attributes
    assert set(SPARSITY_METHODS) == {"sparge", "xattention", "window", "radial", "block", "svg", "svg2", "vsa"}
    assert all(cls.method == name for name, cls in SPARSITY_METHODS.items())


def test_options_are_frozen():
    o = normalize_options({"attention": {"sparsity": {"method": "sparge"}}, "plan": PLAN})
    for obj, name in ((o, "arch"), (o.attention, "quant"), (o.linear, "min_m"), (o.attention.sparsity, "tau"),
                      (o, "plan")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, None)
    with pytest.raises(TypeError):
        o.plan.sites["l.0.mlp.up"]["quant"] = "fp8"
    with pytest.raises(AttributeError):
        o.attention.include.append("x")  # a tuple
    d = o.to_dict()
    d["attention"]["include"].append("x")  # to_dict is a copy
    assert o.attention.include == ("*",) and o.to_dict()["attention"]["include"] == ["*"]


@pytest.mark.parametrize("given", ROUND_TRIP, ids=range(len(ROUND_TRIP)))
def test_to_dict_round_trips_through_normalize_options(given):
    o = normalize_options(given)
    d = o.to_dict()
    assert json.loads(json.dumps(d)) == d  # plain JSON: lists, dicts
    again = normalize_options(d)
    assert again == o and again.to_dict() == d and again.to_json() == o.to_json()
    assert normalize_options(o) is o
    assert Options.from_dict(d) == o
    assert pickle.loads(pickle.dumps(o)) == o and copy.deepcopy(o) == o


def test_equal_options_have_equal_json_and_hash():
    spellings = [
        {"attention": {"include": "blocks.*", "sparsity": {"method": "sparge", "tau": [1, 0.5]}}, "plan": PLAN},
        {"attention": {"include": ["blocks.*"], "sparsity": {"method": "sparge", "tau": (1.0, 0.5), "sink": True}},
         "plan": json.loads(json.dumps(PLAN))},
        {"plan": attnopt.Plan.from_dict(PLAN),
         "attention": {"sparsity": {"tau": [1.0, 0.5], "method": "sparge"}, "include": ("blocks.*",)}},
    ]
    opts = [normalize_options(x) for x in spellings]
    assert len({x.to_json() for x in opts}) == 1 and len({hash(x) for x in opts}) == 1 and len(set(opts)) == 1
    assert opts[0].attention == opts[1].attention and hash(opts[0].attention) == hash(opts[2].attention)
    assert opts[0] != normalize_options({"attention": {"include": "blocks.*"}})


def test_to_json_format_is_unchanged():
    """to_json() is hashed into the cache keys: its format stays what it was (sorted keys, compact)."""
    assert normalize_options(None).to_json() == (
        '{"arch":"auto","attention":{"allow_fp32":false,"backward":"int8","decode":false,"enabled":true,"exclude":[],"include":["*"],'
        '"min_seq_len":128,"pv":"auto","quant":"int8","schedule":[],"smooth_k":true,"smooth_q":false,"sparsity":null},'
        '"linear":{"exclude":["lm_head","*.lm_head"],"include":["*"],"min_m":17,"quant":"none","smooth":null,'
        '"training":"off"},'
        '"on_cpu":"emulate","plan":null}')
    o = normalize_options({"attention": {"sparsity": {"method": "xattention", "tau": 1}}})
    assert ('"sparsity":{"local_keys":0,"method":"xattention","min_seq_len":0,"pv_threshold":null,"stride":8,'
            '"tau":1.0}') in o.to_json()


def test_defaults_live_in_the_classes():
    assert Options() == normalize_options(None) == normalize_options({})
    assert attnopt.default_options() == Options().to_dict()
    assert AttentionOptions().quant == "int8" and LinearOptions().min_m == 17 and SmoothOptions().alpha == 0.5
    assert SpargeOptions().tau == 0.9 and SpargeOptions().min_seq_len == 0


def test_constructing_or_replacing_checks_values():
    with pytest.raises(ConfigError) as e:
        AttentionOptions(quant="int4")
    assert e.value.path == "attention.quant"
    with pytest.raises(ConfigError) as e:
        dataclasses.replace(normalize_options(None).linear, min_m=0)
    assert e.value.path == "linear.min_m"
    with pytest.raises(ConfigError) as e:
        BlockOptions()
    assert e.value.path == "attention.sparsity.mask" and "required by method 'block'" in str(e.value)
    with pytest.raises(ConfigError, match="attention.smooth_q"):
        AttentionOptions(smooth_q=True, sparsity=SpargeOptions())
    o = Options(attention={"quant": "fp8"}, plan=PLAN)  # nested dicts are read as their tables
    assert o == normalize_options({"attention": {"quant": "fp8"}, "plan": PLAN})
    assert dataclasses.replace(o, arch="sm90").arch == "sm90" and o.arch == "auto"
    assert WindowOptions(window=[8, 16]).window == (8, 16)


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
    for method, name, *_ in sparsity_rows():
        assert f"| `{method}` | `{name}` |" in table


def test_schema_rows_are_the_option_classes_fields():
    """The README rows, the CLI help and validation all come from the dataclass fields."""
    keys = [k for k, *_ in schema_rows()]
    expected = ([f"attention.{f.name}" for f in dataclasses.fields(AttentionOptions)]
                + [f"linear.{f.name}" for f in dataclasses.fields(LinearOptions)] + ["arch", "on_cpu", "plan"])
    assert keys == expected
    assert [(m, n) for m, n, *_ in sparsity_rows()] == [
        (m, f.name) for m, cls in SPARSITY_METHODS.items() for f in dataclasses.fields(cls)]
    rows = {k: (d, a) for k, d, a, _ in schema_rows()}
    assert rows["attention.quant"] == ('"int8"', "'int8' | 'fp8' | 'fp4' | 'none'")
    assert rows["linear.exclude"][0] == '["lm_head", "*.lm_head"]'


def test_ci_runs_the_readme_test_command():
    root = pathlib.Path(__file__).parents[1]
    readme, ci = (root / "README.md").read_text(), (root / ".ci" / "run").read_text()
    line = next(x for x in readme.splitlines() if "pytest" in x and x.startswith("pip install"))
    test_cmd = line.split("&&", 1)[1].split("#")[0].strip()
    assert test_cmd.replace("python ", "python3 ") in ci
