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
