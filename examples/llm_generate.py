"""LLM prefill + generate with a KV cache, two ways:

1. torch.compile with attnopt's backend: prefill runs attnopt's quantized attention, decode (one
   query token) is left dense, as attention.decode=false says; compared with the uncompiled model
   fed the same tokens.
2. model.generate() with the quantized KV cache (attention.kv_cache: AttnoptCache, K / V in INT8
   by default): attn_implementation="attnopt" reads it in every decode step; compared per step
   with the same model on transformers' 16-bit StaticCache.

    python examples/llm_generate.py                       # tiny Llama, CPU, random weights
    python examples/llm_generate.py --device cuda --size large --kv-cache int4
"""

import argparse
import inspect
import time

import torch
import transformers

import attnopt
import attnopt.integrations.transformers as att
from attnopt.metrics import compare

SIZES = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=1000, prompt=200),
    "large": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=8, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=32000, prompt=8192),
}
INSPECT_TOKENS = 2048  # inspect measures each site against float64 attention: keep its prompt short


def cache_name(model) -> str:
    """The KV cache's argument and output name: `cache` in transformers 5.x, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def generate(fn, name: str, ids, steps: int, feed=None):
    """Greedy decoding with a KV cache; `feed` forces the tokens fed back (to compare two models).
    Returns (tokens [B, steps], last-position logits [B, steps, V])."""
    out = fn(ids, use_cache=True)  # prefill
    logits = [out.logits[:, -1]]
    for i in range(steps - 1):  # decode: one token at a time, reusing the cache
        nxt = logits[-1].argmax(-1) if feed is None else feed[:, i]
        out = fn(nxt[:, None], use_cache=True, **{name: getattr(out, name)})
        logits.append(out.logits[:, -1])
    logits = torch.stack(logits, 1)
    return logits.argmax(-1), logits


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", choices=SIZES, default="tiny")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--linear", default="none", help="linear.quant: none | w8a8 | fp8 | w4a16 | w4a8 | nvfp4")
    ap.add_argument("--kv-cache", default="int8", help="attention.kv_cache.quant: int8 | int4 | int4+int8")
    args = ap.parse_args()
    cfg = dict(SIZES[args.size])
    prompt_len = cfg.pop("prompt")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval().to(args.device, torch.bfloat16)
    ids = torch.randint(0, cfg["vocab_size"], (1, prompt_len), device=args.device)
    options = {"attention": {"min_seq_len": 0}, "linear": {"quant": args.linear}}

    short = ids[:, :INSPECT_TOKENS]
    report = attnopt.inspect(model, short, options=options)  # what the prefill graph becomes, and its error
    print(report)

    name = cache_name(model)
    compiled = torch.compile(model, backend=attnopt.backend(options))
    with torch.no_grad():
        t0 = time.perf_counter()
        tokens, logits = generate(compiled, name, ids, args.new_tokens)
        dt = time.perf_counter() - t0
        _, ref = generate(model, name, ids, args.new_tokens, feed=tokens)
    print(f"generated {tokens.shape[1]} tokens after a {prompt_len}-token prompt in {dt:.2f}s:", tokens[0].tolist())
    decode = compare(logits[:, 1:], ref[:, 1:])["rel_l1"] if tokens.shape[1] > 1 else 0.0

    # 2. generate() with the quantized KV cache, against the same model on a 16-bit StaticCache
    att.register()
    quantized = type(model)(model.config.__class__(**{**model.config.to_dict(), "attn_implementation": "attnopt"}))
    quantized = quantized.eval().to(args.device, torch.bfloat16)
    quantized.load_state_dict(model.state_dict())
    size = prompt_len + args.new_tokens
    group = 64 if model.config.hidden_size // model.config.num_attention_heads >= 64 else 32  # V: channels per scale
    kv_cache = {"quant": args.kv_cache, "group": group}
    cache = att.AttnoptCache.from_options(model.config, size, {"attention": {"kv_cache": kv_cache}})
    with torch.no_grad():
        kw = dict(max_new_tokens=args.new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True)
        want = model.generate(ids, cache=transformers.StaticCache(model.config, size), **kw)
        got = quantized.generate(ids, cache=cache, **kw)
    cache_err = compare(torch.stack(got.logits, 1).float(), torch.stack(want.logits, 1).float())["rel_l1"]
    share = cache.nbytes() / att.static_cache_nbytes(model.config, size, ids.shape[0], torch.bfloat16)
    same = (got.sequences == want.sequences).float().mean().item()
    print(f"generate() with AttnoptCache ({args.kv_cache}, {size} tokens: {share:.2f}x the bf16 cache's bytes, "
          f"its 16-bit ring of the last {cache.layout.residual} tokens included): greedy tokens "
          f"equal to the 16-bit cache's {same:.2f}")
    print(f"summary: sites rewritten {report.summary['sites_rewritten']}/{report.summary['sites_total']} "
          f"(inspected at {short.shape[1]} tokens); prefill rel-L1 {compare(logits[:, 0], ref[:, 0])['rel_l1']:.4f}; "
          f"decode rel-L1 {decode:.4f}; quantized cache rel-L1 {cache_err:.4f}")


if __name__ == "__main__":
    main()
