"""Real model code (transformers), built offline from configs with random weights."""

import pytest
import torch

from helpers import inspect

transformers = pytest.importorskip("transformers")

E2E_BOUND = 0.05
LAYERS = 2


def _llama(impl):
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS,
                                   num_attention_heads=8, num_key_value_heads=2, vocab_size=128,
                                   attn_implementation=impl)
    return transformers.LlamaForCausalLM(cfg).eval().to(torch.bfloat16)


def _check(model, *args, kwargs=None, n_sites=LAYERS, kv_heads=None, causal=None):
    report = inspect(model, *args, example_kwargs=kwargs or {})
    att = [s for s in report.sites if s.kind == "attention"]
    assert len(att) == n_sites, report
    for s in att:
        assert s.status == "rewritten", (s.key, s.reason)
        if kv_heads is not None:
            assert s.details["kv_heads"] == kv_heads, s.details  # GQA read unrepeated
        if causal is not None:
            assert (s.details["causal_offset"] is not None) == causal
    assert report.summary["e2e"]["rel_l1"] <= E2E_BOUND, report
    return report


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_llama_gqa(impl):
    ids = torch.randint(0, 128, (2, 77))
    _check(_llama(impl), ids, kv_heads=2, causal=True)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_llama_left_padding(impl):
    ids = torch.randint(0, 128, (2, 77))
    mask = torch.ones(2, 77, dtype=torch.long)
    mask[1, :9] = 0
    report = _check(_llama(impl), ids, kwargs={"attention_mask": mask}, kv_heads=2, causal=True)
    assert all(s.details["keep_masks"] >= 1 for s in report.sites)  # padding stays a tensor mask


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_bert_padding_mask(impl):
    cfg = transformers.BertConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS,
                                  num_attention_heads=4, vocab_size=128, attn_implementation=impl)
    model = transformers.BertModel(cfg).eval().to(torch.bfloat16)
    mask = torch.ones(2, 77, dtype=torch.long)
    mask[1, 50:] = 0
    _check(model, torch.randint(0, 128, (2, 77)), kwargs={"attention_mask": mask}, causal=False)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_vit(impl):
    cfg = transformers.ViTConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS,
                                 num_attention_heads=4, image_size=64, patch_size=8, attn_implementation=impl)
    model = transformers.ViTModel(cfg).eval().to(torch.bfloat16)
    _check(model, torch.randn(2, 3, 64, 64, dtype=torch.bfloat16), causal=False)


# ---------------------------------------------------------------- the model zoo (benchmarks/models.py)

def _zoo():
    """benchmarks/models.py as a module: the tests build through the very functions the benchmark uses."""
    import importlib.util
    import pathlib
    import sys

    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "models.py"
    spec = importlib.util.spec_from_file_location("attnopt_bench_models", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


zoo = _zoo()


def _leaf_attention_modules(model) -> int:
    """Attention modules with no attention module inside (BertSelfAttention, not BertAttention)."""
    def is_attn(m):
        return type(m).__name__.endswith("Attention")
    return sum(is_attn(m) and not any(is_attn(c) for c in m.children()) for m in model.modules())


def _expected(name: str) -> tuple[str, str]:
    """'rewritten/total' for attention and linears, read off the model's own modules (on meta:
    no weights): every attention and every Linear, all rewritten but the excluded lm_head."""
    model = zoo.MODELS[name]("tiny", "meta").model
    n_attn = _leaf_attention_modules(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    heads = sum(n.split(".")[-1] == "lm_head" for n in linears)
    return f"{n_attn}/{n_attn}", f"{len(linears) - heads}/{len(linears)}"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(zoo.MODELS))
def test_zoo_model_tiny(name):
    """Every zoo row on its tiny config: all sites captured, e2e rel-L1 within the bound."""
    if "timm" in name:
        pytest.importorskip("timm")
    if "diffusers" in name:
        pytest.importorskip("diffusers")
    row = zoo.run(name, zoo.MODELS[name], "tiny", "cpu", latency=False)
    assert "error" not in row, row.get("error")
    assert (row["attention"], row["linear"]) == _expected(name), row
    assert 0 < row["e2e_rel_l1"] <= E2E_BOUND, row
    assert all("lm_head" in why for why in row["left_alone"]), row["left_alone"]


def test_zoo_large_lengths():
    """Large rows reach the targets' lengths (LLM prefill 32K, DiT / video 16K+) and the eager rows'
    score tensors fit an 80 GB GPU; built on the meta device (shapes only, no memory)."""
    pytest.importorskip("diffusers")
    for name, build in zoo.MODELS.items():
        if "timm" in name:
            continue
        case = build("large", "meta")
        _, tokens = case.inputs(None)
        if "(sdpa)" in name and ("llama" in name or "qwen2" in name):
            assert tokens == zoo.LLM_TOKENS == 32768
        if "(eager)" in name and ("llama" in name or "qwen2" in name):
            assert tokens < zoo.LLM_TOKENS and str(tokens) in case.note
            assert zoo._score_gib(case.heads, tokens) < 40
        if "diffusers" in name:
            assert tokens >= 16384, (name, tokens)
        params = sum(p.numel() for p in case.model.parameters())
        assert params * 2 < 8 * 2**30, (name, params)  # bf16 weights: a small part of 80 GB
        cap = zoo.probe_cap(case)  # inspect / calibrate inputs keep float64 attention under budget
        _, short = case.inputs(cap)
        assert case.batch * case.heads * short**2 * 8 * zoo.PROBE_COPIES <= zoo.PROBE_BYTES, (name, short)


@pytest.mark.parametrize("name", [n for n in zoo.MODELS if "diffusers" in n])
def test_zoo_large_dit_inputs_run(name):
    """The large DiT and video inputs, full and cut to the inspect length, go through the model
    (on the meta device: shapes only), so a GPU run does not meet a shape error after hours."""
    pytest.importorskip("diffusers")
    case = zoo.MODELS[name]("large", "meta")
    for cap in (None, zoo.probe_cap(case)):
        kwargs, tokens = case.inputs(cap)
        with torch.no_grad():
            out = case.model(**kwargs).sample
        assert out.shape[-2:] == kwargs["hidden_states"].shape[-2:], (tokens, out.shape)


class _Tiny(torch.nn.Module):
    """A one-attention model that 'runs out of memory' above `limit` tokens."""

    def __init__(self, limit: int):
        super().__init__()
        self.qkv, self.out, self.limit = torch.nn.Linear(64, 192), torch.nn.Linear(64, 64), limit

    def forward(self, x):
        _oom_above(x, self.limit)
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 4, 16).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(a.transpose(1, 2).reshape(b, n, 64))


@torch._dynamo.disable
def _oom_above(x, limit):
    if x.shape[1] > limit:
        raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[1]} GiB (simulated)")


def _tiny_case(limit: int, seen: list, fail_inspect: bool = False):
    def build(size, dev):
        seen.append(size)
        model = _Tiny(limit).eval().to(torch.bfloat16)
        model.fail_inspect = fail_inspect
        x = torch.randn(1, 256, 64, dtype=torch.bfloat16)
        return zoo.Case(model, lambda cap=None: ({"x": x[:, :zoo._cut(256, cap)]}, zoo._cut(256, cap)), 1, 4)
    return build


def _read(path):
    import json

    with open(path) as f:
        return json.load(f)["rows"]


@pytest.mark.slow
def test_zoo_run_survives_failures_and_writes_each_row(tmp_path, monkeypatch):
    """A row whose variants run out of memory, one whose build does and one whose inspect does are
    recorded (the latter still timed); every row is on disk (JSON and markdown) as soon as it
    finishes; a later run merges by model name."""
    monkeypatch.setattr(zoo, "PROBE_BYTES", 128 * 4 * 8 * zoo.PROBE_COPIES * 128)  # probe inputs: 128 tokens
    coverage = zoo.coverage

    def failing_coverage(model, kwargs):
        if model.fail_inspect:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated, in float64 reference attention)")
        return coverage(model, kwargs)

    monkeypatch.setattr(zoo, "coverage", failing_coverage)
    seen = []
    path = tmp_path / "models_cpu_tiny.json"

    def check_first_row_written(size, dev):
        rows = _read(path)  # written before this row started
        assert [r["model"] for r in rows] == ["fits"] and "ms" in rows[0]["variants"]["attnopt int8"]
        raise torch.OutOfMemoryError("CUDA out of memory (simulated, while building)")

    fake = {"fits": _tiny_case(10_000, seen), "build OOM": check_first_row_written,
            "full length OOM": _tiny_case(128, seen)}
    zoo.main(["--latency", "--out-dir", str(tmp_path)], zoo=fake)
    rows = {r["model"]: r for r in _read(path)}
    assert set(rows) == set(fake)
    ok = rows["fits"]["variants"]
    assert set(ok) == set(zoo.VARIANT_NAMES) and not any("error" in c for c in ok.values()), ok
    assert all(0 <= ok[n]["rel_l1"] <= E2E_BOUND for n in zoo.VARIANT_NAMES[1:])
    assert ok["attnopt int8"]["attention"] == "1/1" and ok["attnopt int8 + w8a8"]["linear"] == "2/2"
    assert ok["attnopt sparse (calibrated)"]["calib_tokens"] == 128
    assert rows["build OOM"]["error"].startswith("build: OutOfMemoryError")
    big = rows["full length OOM"]
    assert big["attention"] == "1/1" and big["measured_tokens"] == 128  # inspected at the short length
    assert all(c["error"].startswith("OutOfMemoryError") for c in big["variants"].values())
    md = (tmp_path / "models_cpu_tiny.md").read_text()
    assert "| build OOM | - | - | - | - | - | - | build: OutOfMemoryError" in md
    assert "| fits | 256 (inspected at 128) | 1/1 |" in md and "full length OOM, eager: OutOfMemoryError" in md

    again = {"build OOM": _tiny_case(10_000, seen), "inspect OOM": _tiny_case(10_000, seen, fail_inspect=True)}
    zoo.main(["--out-dir", str(tmp_path), "--latency", "--variants", "eager"], zoo=again)
    rows = {r["model"]: r for r in _read(path)}
    assert set(rows) == set(fake) | set(again) and "error" not in rows["build OOM"]  # replaced; the others kept
    assert "attnopt int8" in rows["fits"]["variants"]
    assert rows["inspect OOM"]["error"].startswith("inspect: OutOfMemoryError")
    assert list(rows["inspect OOM"]["variants"]) == ["eager"] and "ms" in rows["inspect OOM"]["variants"]["eager"]
