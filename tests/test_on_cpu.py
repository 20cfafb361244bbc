"""Sites on the CPU run attnopt's emulation of the GPU arithmetic, slower than the original: the
backend says so once per process, `on_cpu: "skip"` keeps them as they were, and inspect's report
states it in its header and times each site's original and rewritten op (no timing assertions:
only that the numbers are there)."""

import json
import logging

import pytest
import torch
import torch.nn.functional as F

import attnopt
from attnopt import logs
from attnopt.config import ConfigError, normalize_options

OPTS = {"attention": {"min_seq_len": 0}}


class Attn(torch.nn.Module):
    def forward(self, q):
        return F.scaled_dot_product_attention(q, q, q, is_causal=True)


class AttnLinear(torch.nn.Module):
    """One attention site and one linear site."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(32, 32).to(torch.bfloat16)

    def forward(self, q):
        return self.proj(F.scaled_dot_product_attention(q, q, q))


def _x(n=77):
    return torch.randn(1, 2, n, 32, dtype=torch.bfloat16)


def _compile(model, options, x):
    torch._dynamo.reset()
    be = attnopt.backend(options, inductor_config={"fx_graph_cache": False})
    with torch.no_grad():
        torch.compile(model, backend=be)(x)
    return {s.key: s for s in be.recorder.sites()}


def _cpu_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "attnopt" and r.levelno == logging.WARNING
            and "on the CPU" in r.getMessage()]


@pytest.fixture
def fresh_process(monkeypatch):
    """As if no warn_once topic had been logged in this process yet."""
    monkeypatch.setattr(logs, "_WARNED", set())


def test_cpu_rewrite_warns_once_per_process_naming_the_option(fresh_process, caplog):
    with caplog.at_level(logging.WARNING, logger="attnopt"):
        first = _compile(Attn(), OPTS, _x())
        second = _compile(AttnLinear(), {**OPTS, "linear": {"quant": "w8a8"}}, _x(96))  # another graph, two sites
    assert first["#0"].status == "rewritten" and first["#0"].details["device"] == "cpu"
    assert all(s.status == "rewritten" for s in second.values()) and len(second) == 2
    warned = _cpu_warnings(caplog)
    assert len(warned) == 1, warned
    assert '{"on_cpu": "skip"}' in warned[0] and "slower than the original" in warned[0]


def test_on_cpu_skip_keeps_cpu_sites_and_says_why(fresh_process, caplog):
    with caplog.at_level(logging.WARNING, logger="attnopt"):
        sites = _compile(AttnLinear(), {**OPTS, "linear": {"quant": "w8a8"}, "on_cpu": "skip"}, _x())
    assert len(sites) == 2
    for s in sites.values():
        assert s.status == "skipped" and "on_cpu is 'skip'" in s.reason, (s.key, s.reason)
    assert _cpu_warnings(caplog) == []
    # a site that would stay as it was anyway keeps its own reason
    assert "attention.min_seq_len" in _compile(Attn(), {"on_cpu": "skip"}, _x())["#0"].reason


def test_on_cpu_is_validated():
    assert normalize_options(None).on_cpu == "emulate"
    assert normalize_options({"on_cpu": "skip"}).on_cpu == "skip"
    with pytest.raises(ConfigError, match=r"on_cpu: got 'never'; allowed: 'emulate' \| 'skip'"):
        normalize_options({"on_cpu": "never"})


def _timing_ok(t: dict) -> None:
    for name in ("original_ms", "rewritten_ms", "speedup"):
        assert isinstance(t[name], float) and t[name] > 0, (name, t)
    assert isinstance(t["runs"], int) and t["runs"] >= 1


def test_inspect_states_cpu_emulation_in_its_header_and_times_each_site(fresh_process, caplog):
    with caplog.at_level(logging.WARNING, logger="attnopt"):
        rep = attnopt.inspect(AttnLinear(), _x(), options={**OPTS, "linear": {"quant": "w8a8"}}, timing_runs=3)
    assert _cpu_warnings(caplog) == []  # the report says it instead of the log
    data = json.loads(rep.to_json())
    cpu = data["summary"]["cpu_emulation"]
    assert cpu["sites"] == 2 and sorted(cpu["keys"]) == sorted(s.key for s in rep.sites)
    assert cpu["option"] == "on_cpu" and '{"on_cpu": "skip"}' in cpu["message"]
    assert str(rep).startswith("NOTE: 2 rewritten site(s) run on the CPU")
    assert data["summary"]["site_timing"]["runs"] == 3 and "median" in data["summary"]["site_timing"]["what"]
    assert {s["kind"] for s in data["sites"]} == {"attention", "linear"}
    for s in data["sites"]:
        _timing_ok(s["timing"])
        assert s["timing"]["runs"] <= 3


def test_inspect_times_sparse_sites(fresh_process):
    opts = {"attention": {"min_seq_len": 0, "sparsity": {"method": "window", "window": 64, "sinks": 0}}}
    rep = attnopt.inspect(Attn(), _x(256), options=opts, timing_runs=2)
    (site,) = rep.sites
    assert site.status == "rewritten" and site.details["sparse_method"] == "window"
    _timing_ok(site.timing)


def test_inspect_with_on_cpu_skip_or_no_timing(fresh_process):
    rep = attnopt.inspect(Attn(), _x(), options={**OPTS, "on_cpu": "skip"})
    assert rep.summary["cpu_emulation"] is None and not str(rep).startswith("NOTE")
    assert rep.sites[0].status == "skipped" and rep.sites[0].timing is None
    rep = attnopt.inspect(Attn(), _x(), options=OPTS, timing_runs=0)
    assert rep.sites[0].status == "rewritten" and rep.sites[0].timing is None
    assert rep.summary["site_timing"] is None and rep.summary["cpu_emulation"]["sites"] == 1
