"""Quantized KV cache (attnopt.decode) and decode attention over it: layout round trips against
float64, the reference decode attention against float64 attention, the Triton split-KV kernel
(Triton's interpreter) against the reference, memory bounds, and transformers generate()."""

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnopt.decode.decode_ref import decode_attention_ref
from attnopt.decode.kv_quant import FORMATS, KVLayout, dequantize_k, dequantize_v, quantize_k, quantize_v
from attnopt.decode.storage import PLANES, QuantizedKV

from helpers import rel_l1

# rel-L1 of the dequantized K / V (standard normal, group 64) against float64, per format
ROUND_TRIP = {"int8": 0.01, "int4": 0.13, "int4+int8": 0.01}
DRAFT = 0.16  # "int4+int8" read through its upper nibbles only


@pytest.mark.parametrize("quant", FORMATS)
def test_round_trip_against_float64(quant):
    lay = KVLayout(quant, 64, 128)
    x = torch.randn(2, 3, 128, 64, dtype=torch.float64)
    x[..., 5] *= 50  # an outlier channel: K's per-channel scales keep it from the other channels
    kc, kl, ks, kz = quantize_k(x, lay)
    assert kc.dtype == torch.uint8 and kc.shape[-1] == (64 if quant == "int8" else 32)
    assert (kl is not None) == (quant == "int4+int8") and ks.shape == (2, 3, 2, 64) and ks.dtype == torch.float16
    k = dequantize_k(kc, kl, ks, kz, lay)
    others = [c for c in range(64) if c != 5]
    assert 0 < rel_l1(k[..., others], x[..., others]) < ROUND_TRIP[quant]
    y = torch.randn(2, 3, 128, 64, dtype=torch.float64)
    vc, vl, vs, vz = quantize_v(y, lay)
    assert vs.shape == (2, 3, 128, 1)
    assert 0 < rel_l1(dequantize_v(vc, vl, vs, vz, lay), y) < ROUND_TRIP[quant]
    if quant == "int4+int8":
        # 8-bit codes as two nibble planes: all of them give int8's values; the upper plane alone (the
        # draft's read) needs no low plane and is within int4's error
        assert torch.equal(k, dequantize_k(*quantize_k(x, KVLayout("int8")), KVLayout("int8")))
        draft = dequantize_k(kc, None, ks, kz, lay, draft=True)
        assert ROUND_TRIP["int8"] < rel_l1(draft[..., others], x[..., others]) < DRAFT


def test_appends_equal_one_write():
    """Prefill then token-by-token appends store what one write of every token stores: groups a
    step touches are re-quantized whole (their earlier tokens from the 16-bit ring)."""
    lay = KVLayout("int4+int8", 32, 64)
    k, v = torch.randn(2, 2, 150, 64), torch.randn(2, 2, 150, 64)
    once, steps = (QuantizedKV(lay, 2, 2, 160, 64, torch.float32, "cpu") for _ in range(2))
    once.append(k, v, torch.tensor(0))
    steps.append(k[:, :, :70], v[:, :, :70], torch.tensor(0))
    steps.append(k[:, :, 70:75], v[:, :, 70:75], torch.tensor(70))
    for t in range(75, 150):
        steps.append(k[:, :, t:t + 1], v[:, :, t:t + 1], torch.tensor(t))
    for name in PLANES:
        assert torch.equal(getattr(once, name), getattr(steps, name)), name
    assert torch.equal(steps.ring_k[:, :, torch.arange(86, 150) % 64], k[:, :, 86:150])


def _stores(lay, lengths, heads=2, dim=64, max_len=400, dtype=torch.float32):
    """Per-row storage of random K / V for rows of different lengths: (stacked storage, K, V)."""
    rows, k, v = [], torch.randn(len(lengths), heads, max_len, dim), torch.randn(len(lengths), heads, max_len, dim)
    for b, n in enumerate(lengths):
        s = QuantizedKV(lay, 1, heads, max_len, dim, dtype, "cpu")
        s.append(k[b:b + 1, :, :n].to(dtype), v[b:b + 1, :, :n].to(dtype), torch.tensor(0))
        rows.append(s)
    planes = {n: None if getattr(rows[0], n) is None else torch.cat([getattr(s, n) for s in rows]) for n in PLANES}
    return SimpleNamespace(layout=lay, **planes), k, v


def _exact(q, k, v, lengths, starts):
    """float64 attention of q [B, Hq, nq, D] over each row's keys starts[b] .. lengths[b]-1, causal offset."""
    b, hq, nq, d = q.shape
    group = hq // k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i in range(b):
        kk = k[i, :, starts[i]:lengths[i]].double().repeat_interleave(group, 0)
        vv = v[i, :, starts[i]:lengths[i]].double().repeat_interleave(group, 0)
        s = q[i].double() @ kk.transpose(-1, -2) / d ** 0.5
        t = torch.arange(starts[i], lengths[i])
        s = s.masked_fill(t[None, :] > (lengths[i] - nq + torch.arange(nq))[:, None], -torch.inf)
        out[i] = torch.softmax(s, -1) @ vv
    return out


LENGTHS, STARTS = [333, 77, 1], [40, 0, 0]  # row 0 left-padded; row 1's ring partly filled; row 2 one token


@pytest.mark.parametrize("quant", FORMATS)
def test_reference_against_float64(quant):
    lay = KVLayout(quant, 64, 128)
    kv, k, v = _stores(lay, LENGTHS)
    valid = torch.ones(3, 400, dtype=torch.bool)
    valid[0, :STARTS[0]] = False
    for nq in (1, 3):
        q = torch.randn(3, 8, nq, 64)
        out = decode_attention_ref(q, kv, torch.tensor(LENGTHS), valid)
        exact = _exact(q, k, v, LENGTHS, STARTS)
        exact[2, :, :-1] = 0  # the one-token row: only its last query row has a key
        assert 0 < rel_l1(out, exact) < {"int8": 0.01, "int4": 0.1, "int4+int8": 0.01}[quant]
        assert torch.allclose(out[1:], exact[1:].float(), atol=0.05)  # short rows: 16-bit ring mostly


@pytest.mark.parametrize("quant,dim,group", [(f, 64, 64) for f in FORMATS] + [("int4", 96, 32)])
def test_triton_kernel_equals_reference(quant, dim, group):
    """Head dim 96: the kernel's tiles are 128 channels wide, those past 96 masked; 19 query tokens
    go 8, 8 and 3 per launch (MAX_ROWS 32 over 4 query heads per KV head)."""
    pytest.importorskip("triton")
    from attnopt.codegen.decode.launch import kv_decode_triton

    lay = KVLayout(quant, group, 128)
    kv, _, _ = _stores(lay, LENGTHS, dim=dim, max_len=336)
    valid = torch.ones(3, 336, dtype=torch.bool)
    valid[0, :STARTS[0]] = False
    lengths = torch.tensor(LENGTHS)
    cases = [(1, False), (3, quant == "int4+int8")] + ([(19, False)] if dim == 96 else [])  # 19: three launches
    for nq, draft in cases:
        q = torch.randn(3, 8, nq, dim)
        ref = decode_attention_ref(q, kv, lengths, valid, draft=draft)
        out = kv_decode_triton(q, kv, lengths, valid, draft=draft, splits=2)
        assert torch.allclose(out, ref, atol=2e-6, rtol=1e-5), (out - ref).abs().max()


def test_op_runs_triton_under_impl_switch(monkeypatch):
    """torch.ops.attnopt.kv_decode's body: the kernels with ATTNOPT_IMPL=triton, else the reference."""
    from attnopt.decode.op import decode_attention

    kv, _, _ = _stores(KVLayout("int8", 32, 32), [40, 9], heads=1, dim=32, max_len=64)
    q = torch.randn(2, 2, 1, 32)
    ref = decode_attention(q, kv, torch.tensor([40, 9]))
    monkeypatch.setenv("ATTNOPT_IMPL", "triton")
    assert torch.allclose(decode_attention(q, kv, torch.tensor([40, 9])), ref, atol=2e-6)


transformers = pytest.importorskip("transformers")
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, head_dim=64, vocab_size=128)


class CountDecode(TorchDispatchMode):
    """Counts torch.ops.attnopt.kv_decode calls: proof decode read the quantized storage."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.attnopt.kv_decode.default:
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("quant,size", [("int8", 4096), ("int4", 4096), ("int4+int8", 4096), ("int8", 4000)])
def test_cache_memory_against_bf16_static_cache(quant, size):
    import attnopt.integrations.transformers as att

    cfg = transformers.LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                   num_key_value_heads=8, vocab_size=128)
    cache = att.AttnoptCache(cfg, size, quant=quant, group=64, residual=128)
    ratio = cache.nbytes(batch_size=8) / att.static_cache_nbytes(cfg, size, batch_size=8)
    assert ratio <= {"int8": 0.6, "int4": 0.35, "int4+int8": 0.6}[quant], ratio
    assert ratio > 0.25


def _models(attn="attnopt"):
    import attnopt.integrations.transformers as att

    att.register()
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, attn_implementation="sdpa")).eval()
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, attn_implementation=attn)).eval()
    model.load_state_dict(ref.state_dict())
    return ref, model


def _generate(model, ids, mask, cache, steps):
    out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=steps, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1)


@pytest.mark.parametrize("quant,bound,batch", [("int8", 0.02, 32), ("int4", 0.06, 8)])
def test_generate_against_16bit_static_cache(quant, bound, batch):
    """Greedy generate with a left-padded batch: per-step logits within the bound of the same
    model with a 16-bit StaticCache, the same tokens for INT8, every decode step on the quantized
    storage."""
    import attnopt.integrations.transformers as att

    ref, model = _models()
    ids = torch.randint(1, 128, (batch, 100))
    mask = torch.ones_like(ids)
    for b in range(batch):
        mask[b, : 9 * b % 90] = 0
    steps = 5
    want, want_logits = _generate(ref, ids, mask, transformers.StaticCache(ref.config, 112), steps)
    cache = att.AttnoptCache(model.config, 112, quant=quant, group=32, residual=64)
    with torch.no_grad(), CountDecode() as spy:
        got, logits = _generate(model, ids, mask, cache, steps)
    assert spy.calls == (steps - 1) * TINY["num_hidden_layers"]
    err = rel_l1(logits, want_logits)
    print(f"{quant}: per-step logits rel-L1 {err:.4f}")
    assert 0 < err <= bound
    if quant == "int8":
        assert torch.equal(got, want)
    assert cache.nbytes() == sum(t.numel() * t.element_size() for lay in cache.layers for t in lay.store.tensors())


def test_generate_runs_the_triton_kernel(monkeypatch):
    """generate() through the Triton split-KV kernel (interpreter) gives the reference's logits."""
    import attnopt.integrations.transformers as att

    name = att.register(name="attnopt_sdpa_prefill", min_seq_len=1 << 30)  # interpret the decode kernel only
    _, model = _models(name)
    ids = torch.randint(1, 128, (2, 80))
    mask = torch.ones_like(ids)
    mask[1, :30] = 0
    runs = []
    for impl in ("reference", "triton"):
        monkeypatch.setenv("ATTNOPT_IMPL", impl)
        cache = att.AttnoptCache(model.config, 84, quant="int4+int8", group=32, residual=32)
        with torch.no_grad():
            runs.append(_generate(model, ids, mask, cache, 2))  # one decode step: a kernel call per layer
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.allclose(runs[0][1], runs[1][1], atol=1e-4)


def test_cache_draft_reads_four_bits():
    """set_draft: decode over "int4+int8" reads the upper nibbles (about int4's error), then the full
    8 bits again (int8's logits exactly)."""
    import attnopt.integrations.transformers as att

    _, model = _models()
    ids = torch.randint(1, 128, (2, 100))
    mask = torch.ones_like(ids)
    runs = {}
    for quant, draft in (("int8", False), ("int4+int8", True), ("int4+int8", False)):
        cache = att.AttnoptCache(model.config, 112, quant=quant, group=32, residual=64)
        cache.set_draft(draft)
        with torch.no_grad():
            runs[quant, draft] = _generate(model, ids, mask, cache, 4)[1]
    assert torch.equal(runs["int8", False], runs["int4+int8", False])
    assert 0.003 < rel_l1(runs["int4+int8", True], runs["int8", False]) < 0.06
    with pytest.raises(ValueError, match="int4\\+int8"):
        att.AttnoptCache(model.config, 112, quant="int8").set_draft()


def test_cache_needs_attnopt_attention():
    import attnopt.integrations.transformers as att

    ref, _ = _models()
    ids = torch.randint(1, 128, (1, 40))
    with pytest.raises(RuntimeError, match="attn_implementation='attnopt'"):
        ref.generate(ids, cache=att.AttnoptCache(ref.config, 64), max_new_tokens=3, do_sample=False)


def test_cache_from_options():
    import attnopt.integrations.transformers as att
    from attnopt.config import ConfigError

    cfg = transformers.LlamaConfig(**TINY)
    cache = att.AttnoptCache.from_options(cfg, 256, {"attention": {"kv_cache": {"quant": "int4", "group": 32}}})
    assert isinstance(cache, att.AttnoptCache) and cache.layout == KVLayout("int4", 32, 128)
    assert type(att.AttnoptCache.from_options(cfg, 256)) is transformers.StaticCache  # kv_cache null: 16-bit
    with pytest.raises(ConfigError, match=r"attention\.kv_cache\.residual.*multiple of group \(64\)"):
        att.AttnoptCache.from_options(cfg, 256, {"attention": {"kv_cache": {"residual": 96}}})
    with pytest.raises(ConfigError, match=r"attention\.kv_cache\.quant.*'int4\+int8'"):
        att.AttnoptCache.from_options(cfg, 256, {"attention": {"kv_cache": {"quant": "int2"}}})


@pytest.mark.gpu
@pytest.mark.parametrize("quant", FORMATS)
def test_gpu_kernel_equals_reference(quant):
    """The compiled split-KV kernel (Llama-3-8B's attention shape, bf16) against the reference on the GPU."""
    from attnopt.codegen.decode.launch import kv_decode_triton

    lengths = [4096, 1000, 129, 1]
    kv, _, _ = _stores(KVLayout(quant, 64, 128), lengths, heads=8, dim=128, max_len=4096, dtype=torch.bfloat16)
    kv = SimpleNamespace(**{n: getattr(kv, n) if n == "layout" or getattr(kv, n) is None else getattr(kv, n).cuda()
                            for n in ("layout",) + PLANES})
    valid = torch.ones(4, 4096, dtype=torch.bool, device="cuda")
    valid[1, :300] = False
    lengths = torch.tensor(lengths, device="cuda")
    for nq, draft in ((1, False), (4, quant == "int4+int8")):
        q = torch.randn(4, 32, nq, 128, device="cuda", dtype=torch.bfloat16)
        ref = decode_attention_ref(q.float(), kv, lengths, valid, draft=draft)
        out = kv_decode_triton(q, kv, lengths, valid, draft=draft)
        assert out.dtype == torch.bfloat16 and rel_l1(out.float(), ref) < 5e-3


@pytest.mark.slow
def test_decode_step_compiles_once():
    """fullgraph torch.compile of decode steps with AttnoptCache: one graph for every step (static
    shapes, the length a tensor), the same logits as eager."""
    import attnopt.integrations.transformers as att
    from torch._dynamo.utils import counters

    _, model = _models()
    ids = torch.randint(1, 128, (2, 100))

    def run(forward):
        cache = att.AttnoptCache(model.config, 112, quant="int4", group=32, residual=64)
        tok = model(ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        logits = []
        for _ in range(5):
            logits.append(forward(tok, cache=cache, use_cache=True).logits[:, -1])
            tok = logits[-1][:, None].argmax(-1)
        return torch.stack(logits)

    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        want = run(model)
        got = run(torch.compile(model, fullgraph=True, backend="aot_eager"))
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.equal(got, want)


@pytest.mark.gpu
def test_gpu_generate_with_quantized_cache():
    """generate() on CUDA (bf16, eager steps) with the INT8 cache: the Triton kernels read it, logits
    within the INT8 bound of the bf16 StaticCache's."""
    import attnopt.integrations.transformers as att

    ref, model = _models()
    ref, model = ref.cuda().to(torch.bfloat16), model.cuda().to(torch.bfloat16)
    ids = torch.randint(1, 128, (8, 200), device="cuda")
    mask = torch.ones_like(ids)
    for b in range(8):
        mask[b, : 23 * b] = 0

    def run(m, cache):
        out = m.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=6, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True, disable_compile=True)
        return torch.stack(out.logits, 1).float()

    want = run(ref, transformers.StaticCache(ref.config, 208))
    with torch.no_grad(), CountDecode() as spy:
        got = run(model, att.AttnoptCache(model.config, 208, quant="int8", group=64, residual=128))
    assert spy.calls == 5 * TINY["num_hidden_layers"]
    assert 0 < rel_l1(got, want) <= 0.02


@pytest.mark.parametrize("quant,dim,group,residual", [("int8", 64, 64, 128), ("int4", 96, 32, 64),
                                                      ("int4+int8", 64, 32, 32)])
def test_fused_one_token_write_equals_torch_ops(quant, dim, group, residual, monkeypatch):
    """A decode step's write as one Triton kernel (interpreter) stores exactly what the torch ops
    store: ring, re-quantized K group (codes, fp16 scale / zero), V row."""
    lay = KVLayout(quant, group, residual)
    k, v = torch.randn(2, 2, 140, dim).bfloat16(), torch.randn(2, 2, 140, dim).bfloat16()
    ops, fused = (QuantizedKV(lay, 2, 2, 160, dim, torch.bfloat16, "cpu") for _ in range(2))
    first = 2 * group - 3
    for s in (ops, fused):
        s.append(k[:, :, :first], v[:, :, :first], torch.tensor(0))
    for t in range(first, first + 6):  # the last tokens of a group, then the first of the next
        ops.append(k[:, :, t:t + 1], v[:, :, t:t + 1], torch.tensor(t))
        monkeypatch.setenv("ATTNOPT_IMPL", "triton")
        fused.append(k[:, :, t:t + 1], v[:, :, t:t + 1], torch.tensor(t))
        monkeypatch.delenv("ATTNOPT_IMPL")
        for name in PLANES:
            a, b = getattr(ops, name), getattr(fused, name)
            assert a is None or torch.equal(a[:, :, :t + 1 if name not in ("k_scale", "k_zero") else t // group + 1],
                                            b[:, :, :t + 1 if name not in ("k_scale", "k_zero") else t // group + 1]), name


@pytest.mark.gpu
def test_gpu_fused_write_equals_torch_ops(monkeypatch):
    lay = KVLayout("int4+int8", 64, 128)
    k, v = (torch.randn(4, 8, 300, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ops, fused = (QuantizedKV(lay, 4, 8, 320, 128, torch.bfloat16, "cuda") for _ in range(2))
    for s in (ops, fused):
        s.append(k[:, :, :250], v[:, :, :250], torch.tensor(0, device="cuda"))
    for t in range(250, 300):
        monkeypatch.setenv("ATTNOPT_IMPL", "reference")  # the torch ops
        ops.append(k[:, :, t:t + 1], v[:, :, t:t + 1], torch.tensor(t, device="cuda"))
        monkeypatch.delenv("ATTNOPT_IMPL")  # one token on CUDA: the fused kernel
        fused.append(k[:, :, t:t + 1], v[:, :, t:t + 1], torch.tensor(t, device="cuda"))
    for name in PLANES:
        n = 300 if name not in ("k_scale", "k_zero") else 300 // 64 + 1
        assert torch.equal(getattr(ops, name)[:, :, :n], getattr(fused, name)[:, :, :n]), name
