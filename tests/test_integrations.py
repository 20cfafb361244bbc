"""attn_implementation="attnopt" (transformers) and the diffusers processors, offline, tiny configs.

Each test counts calls of attnopt's attention op, so a silent fallback to SDPA fails it."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import rel_l1

transformers = pytest.importorskip("transformers")

BOUND = 0.03  # int8 QK / 16-bit PV on these sizes stays well under the README's 0.05


class CountAttnopt(TorchDispatchMode):
    """Counts torch.ops.attnopt.attention calls: proof the quantized path ran."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.attnopt.attention.default:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def test_transformers_attn_implementation():
    import attnopt.integrations.transformers as att

    att.register()
    cfg = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
               num_key_value_heads=2, vocab_size=128)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg, attn_implementation="sdpa")).eval()
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg, attn_implementation="attnopt")).eval()
    model.load_state_dict(ref.state_dict())
    ref, model = ref.to(torch.bfloat16), model.to(torch.bfloat16)
    ids = torch.randint(0, 128, (2, 77))
    mask = torch.ones(2, 77, dtype=torch.long)
    mask[1, :7] = 0
    with torch.no_grad():
        with CountAttnopt() as spy:
            a = model(ids, attention_mask=mask).logits
        b = ref(ids, attention_mask=mask).logits
        assert spy.calls == 2  # one prefill call per layer
        assert 0 < rel_l1(a[0], b[0]) < BOUND and rel_l1(a[1, 7:], b[1, 7:]) < BOUND
        with CountAttnopt() as spy:
            out = model.generate(ids[:1, :20], max_new_tokens=5, do_sample=False)
        assert out.shape == (1, 25)
        assert spy.calls == 2  # the prefill only: decode steps stay SDPA


def _pixart(diffusers):
    m = diffusers.PixArtTransformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
                                           attention_head_dim=32, num_attention_heads=4, cross_attention_dim=128,
                                           caption_channels=64, norm_type="ada_norm_single",
                                           use_additional_conditions=False)
    x = torch.randn(2, 4, 16, 16, dtype=torch.bfloat16)
    kw = dict(encoder_hidden_states=torch.randn(2, 20, 64, dtype=torch.bfloat16), timestep=torch.tensor([10, 500]))
    return m.eval().to(torch.bfloat16), (x,), kw


def _cogvideox(diffusers, rotary=False):
    m = diffusers.CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=32, in_channels=8,
                                              out_channels=8, num_layers=1, sample_width=16, sample_height=16,
                                              sample_frames=9, patch_size=2, text_embed_dim=64, time_embed_dim=64,
                                              temporal_compression_ratio=4, max_text_seq_length=8,
                                              use_rotary_positional_embeddings=rotary)
    x = torch.randn(1, 3, 8, 16, 16, dtype=torch.bfloat16)
    kw = dict(encoder_hidden_states=torch.randn(1, 8, 64, dtype=torch.bfloat16), timestep=torch.tensor([10]))
    if rotary:  # what CogVideoX-5b's pipeline passes: cos / sin over the latent grid
        n = 3 * 8 * 8
        kw["image_rotary_emb"] = (torch.ones(n, 32), torch.zeros(n, 32))
    return m.eval().to(torch.bfloat16), (x,), kw


def test_diffusers_apply_swaps_default_processors():
    diffusers = pytest.importorskip("diffusers")
    from attnopt.integrations.diffusers import AttnoptProcessor, apply

    m, args, kw = _pixart(diffusers)
    with torch.no_grad():
        ref = m(*args, **kw).sample
        done = apply(m)
        with CountAttnopt() as spy:
            out = m(*args, **kw).sample
    assert set(done.values()) == {"attnopt"} and len(done) == 4  # self- and cross-attention, two blocks
    assert all(isinstance(p, AttnoptProcessor) for p in m.attn_processors.values())
    assert spy.calls == 4
    assert 0 < rel_l1(out, ref) < BOUND


def test_diffusers_apply_keeps_custom_processors(caplog):
    diffusers = pytest.importorskip("diffusers")
    from attnopt.integrations.diffusers import apply

    m, args, kw = _cogvideox(diffusers)
    with torch.no_grad():
        ref = m(*args, **kw).sample
        with caplog.at_level("INFO", logger="attnopt.integrations.diffusers"):
            done = apply(m)
        with CountAttnopt() as spy:
            out = m(*args, **kw).sample
    assert done and all(v.startswith("kept: CogVideoXAttnProcessor2_0") for v in done.values()), done
    assert all(type(p).__name__ == "CogVideoXAttnProcessor2_0" for p in m.attn_processors.values())
    assert "CogVideoXAttnProcessor2_0" in caplog.text  # the reason is logged
    assert spy.calls == 0 and torch.equal(out, ref)


def test_processor_refuses_rotary_embeddings():
    """Forced onto a RoPE model, the processor raises instead of silently dropping RoPE."""
    diffusers = pytest.importorskip("diffusers")
    from attnopt.integrations.diffusers import AttnoptProcessor

    m, args, kw = _cogvideox(diffusers, rotary=True)
    m.set_attn_processor(AttnoptProcessor())
    with torch.no_grad(), pytest.raises(NotImplementedError, match="image_rotary_emb"):
        m(*args, **kw)


def test_processor_refuses_extra_arguments():
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention

    from attnopt.integrations.diffusers import AttnoptProcessor

    attn = Attention(query_dim=64, heads=4, dim_head=16).eval()
    x = torch.randn(1, 40, 64)
    with pytest.raises(NotImplementedError, match="scale"):
        AttnoptProcessor()(attn, x, scale=0.5)
    with pytest.raises(NotImplementedError, match="positional"):
        AttnoptProcessor()(attn, x, None, None, None, 1.0)


@pytest.mark.parametrize("default", ["AttnProcessor2_0", "AttnProcessor"])
@pytest.mark.parametrize("scale_qk", [True, False])
def test_processor_matches_each_default(default, scale_qk):
    """Same result as the processor it replaces (within the quantized bound), masks and scale included."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models import attention_processor as ap

    from attnopt.integrations.diffusers import apply

    attn = ap.Attention(query_dim=64, cross_attention_dim=32, heads=4, dim_head=16, scale_qk=scale_qk,
                        residual_connection=True, rescale_output_factor=2.0).eval()
    attn.set_processor(getattr(ap, default)())
    x, ctx = torch.randn(2, 50, 64) * 0.5, torch.randn(2, 70, 32)
    mask = torch.ones(2, 70)
    mask[1, 40:] = 0
    bias = ((1 - mask) * -10000.0)[:, None]  # [B, 1, keys]: the additive form diffusers models build
    with torch.no_grad():
        ref = attn(x, encoder_hidden_states=ctx, attention_mask=bias)
        assert apply(attn) == {".processor": "attnopt"}
        with CountAttnopt() as spy:
            out = attn(x, encoder_hidden_states=ctx, attention_mask=bias)
    assert spy.calls == 1
    assert 0 < rel_l1(out, ref) < BOUND
