"""Per-head windows for decode (MoA-style plans): windowed KV storage keeps only the sinks and
the span the widest window reaches, and decode attention applies each head's own window."""

import pytest
import torch

from attnopt.decode.kv_quant import KVLayout
from attnopt.decode.op import decode_attention
from attnopt.decode.storage import QuantizedKV, windowed_slots

from helpers import rel_l1

WINDOW = [40, 100, 8, 64, 1, 30, 100, 77]  # per query head; 8 query heads over 2 KV heads
SINKS = 5


def _windowed_exact(q, k, v, length, window, sinks):
    """float64 attention of q [1, Hq, nq, D] over k / v [1, Hkv, length, D], causal offset, per-head windows."""
    _, hq, nq, d = q.shape
    kk = k[0, :, :length].double().repeat_interleave(hq // k.shape[1], 0)
    vv = v[0, :, :length].double().repeat_interleave(hq // k.shape[1], 0)
    s = q[0].double() @ kk.transpose(-1, -2) / d ** 0.5  # [Hq, nq, length]
    t = torch.arange(length)[None, None, :]
    pos = (length - nq + torch.arange(nq))[None, :, None]
    ok = (t <= pos) & ((pos - t < torch.tensor(window)[:, None, None]) | (t < sinks))
    return (torch.softmax(s.masked_fill(~ok, -torch.inf), -1) @ vv)[None]


@pytest.mark.parametrize("quant", ["int8", "int4+int8"])
def test_windowed_storage_decode(quant):
    """A 300-token prefill (only its sinks and tail are stored), 60 one-token steps and a 3-token
    verification, the slot ring wrapping (224 slots for 363 tokens): windowed storage
    reads what the full storage reads under the same windows, and both match float64 windowed
    attention; its buffers are a fraction of the full storage's."""
    lay = KVLayout(quant, 32, 32)
    n = 363
    k, v = torch.randn(1, 2, n, 64), torch.randn(1, 2, n, 64)
    keep = windowed_slots(lay, SINKS, max(WINDOW), 16)
    full = QuantizedKV(lay, 1, 2, 1024, 64, torch.float32, "cpu")
    win = QuantizedKV(lay, 1, 2, 1024, 64, torch.float32, "cpu", keep=keep)
    assert win.keep == (32, 192) and win.nbytes() < 0.4 * full.nbytes()
    window = torch.tensor(WINDOW)
    steps = [(0, 300)] + [(t, t + 1) for t in range(300, 360)] + [(360, 363)]
    for a, b in steps:
        for s in (full, win):
            s.append(k[:, :, a:b], v[:, :, a:b], torch.tensor(a))
        if b - a > 1 or b % 17 == 0:
            q = torch.randn(1, 8, b - a if b - a <= 3 else 1, 64)
            got = decode_attention(q, win, torch.tensor([b]), window=window, sinks=SINKS)
            want = decode_attention(q, full, torch.tensor([b]), window=window, sinks=SINKS)
            assert torch.allclose(got, want, atol=1e-5), (a, b)
            exact = _windowed_exact(q, k, v, b, WINDOW, SINKS)
            assert 0 < rel_l1(got, exact) < 0.01
    dense = decode_attention(q, full, torch.tensor([363]))
    assert rel_l1(got, dense) > 0.1  # the windows change the result
    with pytest.raises(ValueError, match="windows"):
        decode_attention(q, win, torch.tensor([363]))


TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, head_dim=64, vocab_size=128)


def _plan(window, sinks=SINKS, dense_heads=()):
    return {"schema_version": 1, "kind": "attnopt-plan", "meta": {}, "sites": {
        "model.layers.0.self_attn#0": {"kind": "attention", "sparsity": {
            "method": "window", "window": window, "sinks": sinks, "dense_heads": list(dense_heads)}},
        "model.layers.1.self_attn#0": {"kind": "attention", "dense": True}}}


def test_cache_from_plan_bounds_windowed_layers():
    """from_plan: layer 0 (a 'window' site) stores sinks + its widest window, layer 1 (planned
    dense) every token; generate() decodes the same as with every token stored under the same
    windows; the per-layer report shows the sizes."""
    transformers = pytest.importorskip("transformers")
    import attnopt.integrations.transformers as att

    att.register()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, attn_implementation="attnopt")).eval()
    ids = torch.randint(1, 128, (1, 300))
    runs = {}
    for bounded in (True, False):
        cache = att.AttnoptCache.from_plan(model.config, 1024, _plan(WINDOW), model=model, quant="int8",
                                           group=32, residual=32)
        if not bounded:
            for layer in cache.layers:
                layer.keep = None
        with torch.no_grad():
            out = model.generate(ids, cache=cache, max_new_tokens=20, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=0)
        runs[bounded] = out.sequences, torch.stack(out.logits), cache.layer_nbytes()
    assert torch.equal(runs[True][0], runs[False][0])
    assert torch.allclose(runs[True][1], runs[False][1], atol=1e-4)
    small, full = runs[True][2], runs[False][2]
    assert small[1] == full[1] == full[0] and small[0] < 0.35 * full[0]
    assert "layer 0: all tokens" in cache.layer_report()  # the last run: storage not bounded
    plain = att.AttnoptCache(model.config, 1024, quant="int8", group=32, residual=32)
    assert plain.layer_nbytes(batch_size=1, dtype=torch.float32) == full
    windowed = att.AttnoptCache.from_plan(model.config, 1024, _plan(WINDOW), quant="int8", group=32, residual=32)
    assert windowed.layer_nbytes(batch_size=1, dtype=torch.float32) == small
    assert "layer 0: window <= 100, sinks 5, 224 slots" in windowed.layer_report()


def test_plan_windows_mapping():
    from attnopt.integrations.windows import plan_windows

    got = plan_windows(_plan(WINDOW, dense_heads=[2]), 8, 1024)
    assert list(got) == [0] and got[0] == ([40, 100, 1024, 64, 1, 30, 100, 77], SINKS)
    assert plan_windows(_plan(16), 8, 1024)[0] == ([16] * 8, SINKS)
    with pytest.raises(ValueError, match="head windows"):
        plan_windows(_plan([4, 4]), 8, 1024)
    bad = _plan(16)
    bad["sites"]["encoder.block#0"] = bad["sites"].pop("model.layers.0.self_attn#0")
    with pytest.raises(ValueError, match="layers"):
        plan_windows(bad, 8, 1024)
