"""attn_implementation="attnopt" (transformers) and AttnoptProcessor (diffusers), offline, tiny configs."""

import pytest
import torch

from helpers import rel_l1

transformers = pytest.importorskip("transformers")


def test_transformers_attn_implementation():
    import attnopt.integrations.transformers as att

    att.register()
    cfg = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
               num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg, attn_implementation="sdpa")).eval()
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg, attn_implementation="attnopt")).eval()
    model.load_state_dict(ref.state_dict())
    ref, model = ref.to(torch.bfloat16), model.to(torch.bfloat16)
    ids = torch.randint(0, 128, (2, 77))
    mask = torch.ones(2, 77, dtype=torch.long)
    mask[1, :7] = 0
    with torch.no_grad():
        a = model(ids, attention_mask=mask).logits
        b = ref(ids, attention_mask=mask).logits
        assert rel_l1(a[0], b[0]) < 0.03 and rel_l1(a[1, 7:], b[1, 7:]) < 0.03
        out = model.generate(ids[:1, :20], max_new_tokens=5, do_sample=False)  # decode stays SDPA
        assert out.shape == (1, 25)


def test_diffusers_processor():
    diffusers = pytest.importorskip("diffusers")
    from attnopt.integrations.diffusers import AttnoptProcessor

    torch.manual_seed(0)
    m = diffusers.PixArtTransformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
                                           attention_head_dim=32, num_attention_heads=4, cross_attention_dim=128,
                                           caption_channels=64, norm_type="ada_norm_single",
                                           use_additional_conditions=False).eval().to(torch.bfloat16)
    x = torch.randn(2, 4, 16, 16, dtype=torch.bfloat16)
    kw = dict(encoder_hidden_states=torch.randn(2, 20, 64, dtype=torch.bfloat16), timestep=torch.tensor([10, 500]))
    with torch.no_grad():
        ref = m(x, **kw).sample
        m.set_attn_processor(AttnoptProcessor())
        out = m(x, **kw).sample
    assert all(isinstance(p, AttnoptProcessor) for p in m.attn_processors.values())
    assert rel_l1(out, ref) < 0.03
