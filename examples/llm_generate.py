"""LLM prefill + generate with a KV cache: prefill runs attnopt's quantized attention, decode
(one query token) is left dense, as attention.decode=false says.

    python examples/llm_generate.py                       # tiny Llama, CPU, random weights
    python examples/llm_generate.py --device cuda --size large
"""

import argparse
import time

import torch
import transformers

import attnopt

SIZES = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=1000, prompt=200),
    "large": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=8, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=32000, prompt=8192),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", choices=SIZES, default="tiny")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--linear", default="none", help="linear.quant: none | w8a8 | fp8 | w4a16")
    args = ap.parse_args()
    cfg = dict(SIZES[args.size])
    prompt_len = cfg.pop("prompt")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval().to(args.device, torch.bfloat16)
    ids = torch.randint(0, cfg["vocab_size"], (1, prompt_len), device=args.device)
    options = {"attention": {"min_seq_len": 0}, "linear": {"quant": args.linear}}

    report = attnopt.inspect(model, ids, options=options)  # what the prefill graph becomes, and its error
    print(report)

    compiled = torch.compile(model, backend=attnopt.backend(options))
    with torch.no_grad():
        t0 = time.perf_counter()
        out = compiled(ids, use_cache=True)  # prefill: quantized attention
        past, tokens = out.past_key_values, [out.logits[:, -1].argmax(-1)]
        for _ in range(args.new_tokens - 1):  # decode: one token at a time, attention left dense
            out = compiled(tokens[-1][:, None], past_key_values=past, use_cache=True)
            past = out.past_key_values
            tokens.append(out.logits[:, -1].argmax(-1))
        dt = time.perf_counter() - t0
    print(f"generated {len(tokens)} tokens after a {prompt_len}-token prompt in {dt:.2f}s:",
          torch.stack(tokens, 1)[0].tolist())


if __name__ == "__main__":
    main()
