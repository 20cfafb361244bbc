"""Self-speculative decoding over the "int4+int8" AttnoptCache: mark / rewind restore what the
cache reads, and the speculative tokens are plain greedy decoding's on the 8-bit cache."""

import pytest
import torch

from attnopt.decode.op import decode_attention

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, head_dim=64, vocab_size=128)
NEAR_TIE = 1e-3  # top-2 target logits closer than this may order differently in one pass over k+1 tokens


def _layer(config, max_len):
    import attnopt.integrations.transformers as att

    return att.AttnoptCache(config, max_len, quant="int4+int8", group=32, residual=32).layers[0]


def _write(layer, k, v):
    layer.read = True
    layer.update(k, v, kwargs={})


def test_rewind_restores_what_decode_reads():
    """mark, write junk across the ring's wrap, rewind, write the real tokens: decode reads what a
    cache that only ever got the real tokens reads (both bit widths); without mark it refuses."""
    cfg = transformers.LlamaConfig(**TINY)
    k, v = torch.randn(1, 2, 90, 64), torch.randn(1, 2, 90, 64)
    junk_k, junk_v = torch.randn(1, 2, 5, 64) * 3, torch.randn(1, 2, 5, 64) * 3
    clean, spec = _layer(cfg, 96), _layer(cfg, 96)
    _write(clean, k, v)
    _write(spec, k[:, :, :60], v[:, :, :60])
    with pytest.raises(RuntimeError, match="mark"):
        spec.rewind(60)
    for accepted in (2, 0, 1, 5):  # 5 written, `accepted` of them kept
        start = int(spec.cumulative_length)
        spec.mark(5)
        for j in range(5):  # the draft's steps, one token each
            _write(spec, junk_k[:, :, j:j + 1], junk_v[:, :, j:j + 1])
        spec.rewind(start)
        _write(spec, torch.cat([k[:, :, start:start + accepted], junk_k[:, :, accepted:]], 2),
               torch.cat([v[:, :, start:start + accepted], junk_v[:, :, accepted:]], 2))  # the target's pass
        spec.rewind(start + accepted)
    assert int(spec.cumulative_length) == 68  # 60 + 2 + 0 + 1 + 5: the last round crosses a group
    _write(spec, k[:, :, 68:90], v[:, :, 68:90])
    q = torch.randn(1, 8, 3, 64)
    n = torch.tensor([90])
    for draft in (False, True):
        want = decode_attention(q, clean.store, n, draft=draft)
        assert torch.equal(decode_attention(q, spec.store, n, draft=draft), want)
    with pytest.raises(ValueError, match="outside the mark"):
        spec.rewind(60)


@pytest.mark.parametrize("draft_weights", [None, "w4a16"])
def test_speculative_tokens_equal_greedy_int8(draft_weights):
    """Greedy, batch 1, 100-token prompt, 40 new tokens, residual 32 (the ring wraps many times):
    the speculative tokens are plain greedy generate()'s with the INT8 cache up to the first
    near-tie of its logits, whatever the draft reads (4-bit cache, optionally int4 weights); some
    drafts are rejected (the rewinds are exercised)."""
    import attnopt.integrations.transformers as att
    from attnopt.integrations.speculative import generate_speculative

    att.register()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, attn_implementation="attnopt")).eval()
    with torch.no_grad():  # larger weights: less repetitive greedy text from a random model
        for p in model.model.layers.parameters():
            p.mul_(2.0)
    ids = torch.randint(1, 128, (1, 100))
    steps = 40
    ref = model.generate(ids, cache=att.AttnoptCache(model.config, 160, quant="int8", group=32, residual=32),
                         max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=0)
    want, want_logits = ref.sequences[0, 100:], torch.stack(ref.logits, 1)[0]
    cache = att.AttnoptCache(model.config, 160, quant="int4+int8", group=32, residual=32)
    got, stats, logits = generate_speculative(model, ids, cache, steps, draft_tokens=4,
                                              draft_weights=draft_weights, return_logits=True)
    print(f"{draft_weights}: accept rate {stats.accept_rate:.2f}, {stats.tokens_per_round:.2f} tokens per target pass")
    assert got.shape == (1, steps) and logits.shape == want_logits.shape
    top2 = want_logits.topk(2, -1).values
    ties = ((top2[:, 0] - top2[:, 1]) < NEAR_TIE).nonzero()
    upto = int(ties[0]) + 1 if len(ties) else steps
    assert torch.equal(got[0, :upto], want[:upto])
    assert torch.allclose(logits[:upto], want_logits[:upto], atol=1e-3)
    assert 0 < stats.accepted < stats.drafted and stats.rounds < steps
    with pytest.raises(ValueError, match="int4\\+int8"):
        generate_speculative(model, ids, att.AttnoptCache(model.config, 160, quant="int8"), 4)


def test_w4_draft_shares_the_target_weights():
    """The W4 draft: decoder linears on int4 weights (near the 16-bit ones), everything else the
    target's own tensors."""
    from attnopt.integrations.draft_weights import W4Linear, w4_draft

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    draft = w4_draft(model)
    assert isinstance(draft.model.layers[0].mlp.up_proj, W4Linear)
    assert isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)
    assert draft.lm_head.weight is model.lm_head.weight
    assert draft.model.layers[1].input_layernorm.weight is model.model.layers[1].input_layernorm.weight
    x = torch.randn(3, 128)
    want = model.model.layers[0].mlp.up_proj(x)
    err = (draft.model.layers[0].mlp.up_proj(x) - want).abs().sum() / want.abs().sum()
    assert 0 < err < 0.15
