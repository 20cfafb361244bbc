"""Self-speculative decoding (QuantSpec) and per-head window caches (MoA): a CPU run.

    python benchmarks/speculative.py [--prompts 512 2048] [--steps 64] [--draft-tokens 2 4 8]

Speculative rows: tiny Llama and Qwen2 configs (benchmarks/decode.py's, random weights, fp32)
after synthetic prompts; generate_speculative over an "int4+int8" AttnoptCache (the draft reads
4 bits, optionally int4 weights) against plain greedy generate() on the INT8 cache: accept rate
(accepted draft tokens / drafted), tokens per target pass, and whether the tokens are greedy's
up to its first near tie (top-2 logits within 1e-3). Random weights make repetitive text, so
the accept rates are higher than a trained model's; they show the loop works, not a speed-up.

Window rows: AttnoptCache.from_plan with a plan of per-head windows on alternate layers of a
Llama-3-8B-shaped config (32 layers, 8 KV heads, head dim 128), bytes per layer against the
unwindowed cache (computed from the shapes, bf16 ring). Writes speculative_cpu.json.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from decode import TINY, _tiny  # noqa: E402

NEAR_TIE = 1e-3


def speculative_rows(args, rows) -> None:
    import attnopt.integrations.transformers as att
    from attnopt.integrations.speculative import generate_speculative

    att.register()
    for kind in ("llama", "qwen2"):
        model = _tiny(kind, "attnopt")
        for n in args.prompts:
            torch.manual_seed(n)
            ids = torch.randint(1, TINY["vocab_size"], (1, n))  # no pad token (0): generate() would mask it
            size = n + args.steps + max(args.draft_tokens) + 1

            def cache(quant):
                return att.AttnoptCache(model.config, size, quant=quant, group=args.group, residual=args.residual)

            with torch.no_grad():
                ref = model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache("int8"),
                                     max_new_tokens=args.steps, do_sample=False,
                                     output_logits=True, return_dict_in_generate=True, pad_token_id=0)
            want, logits = ref.sequences[0, n:], torch.stack(ref.logits, 1)[0]
            top2 = logits.topk(2, -1).values
            ties = ((top2[:, 0] - top2[:, 1]) < NEAR_TIE).nonzero()
            upto = int(ties[0]) + 1 if len(ties) else args.steps
            for weights in (None, "w4a16"):
                for k in args.draft_tokens:
                    got, st = generate_speculative(model, ids, cache("int4+int8"), args.steps, draft_tokens=k,
                                                   draft_weights=weights)
                    same = bool(torch.equal(got[0, :upto], want[:upto]))
                    rows.append({"kind": "speculative", "model": kind, "prompt": n, "steps": args.steps,
                                 "draft_tokens": k, "draft_weights": weights, "rounds": st.rounds,
                                 "drafted": st.drafted, "accepted": st.accepted, "accept_rate": st.accept_rate,
                                 "tokens_per_target_pass": st.tokens_per_round, "compared_tokens": upto,
                                 "tokens_equal_greedy_int8": same})
                    print(f"{kind} prompt {n} k={k} draft weights {weights}: accept rate {st.accept_rate:.2f}, "
                          f"{st.tokens_per_round:.2f} tokens / target pass, {st.rounds} target passes, "
                          f"greedy INT8 tokens equal (first {upto}): {same}")


def window_rows(args, rows) -> None:
    import transformers

    import attnopt.integrations.transformers as att

    cfg = transformers.LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                   num_key_value_heads=8, vocab_size=128)
    windows = [256 * (1 + h % 4) for h in range(32)]  # 256 .. 1024 tokens per query head
    sites = {f"model.layers.{i}.self_attn#0": {"kind": "attention", "sparsity": {
        "method": "window", "window": windows, "sinks": 64}} for i in range(0, 32, 2)}
    plan = {"schema_version": 1, "kind": "attnopt-plan", "meta": {}, "sites": sites}
    for size in args.window_contexts:
        full = att.AttnoptCache(cfg, size, quant="int8", group=64, residual=128)
        win = att.AttnoptCache.from_plan(cfg, size, plan, quant="int8", group=64, residual=128)
        f, w = full.layer_nbytes(1, torch.bfloat16), win.layer_nbytes(1, torch.bfloat16)
        bf16 = att.static_cache_nbytes(cfg, size, 1, torch.bfloat16) / 32
        rows.append({"kind": "window", "context": size, "windows": "256..1024, sinks 64, even layers",
                     "windowed_layer_mib": w[0] / 2 ** 20, "full_layer_mib": f[0] / 2 ** 20,
                     "bf16_layer_mib": bf16 / 2 ** 20, "total_mib": sum(w) / 2 ** 20,
                     "total_full_mib": sum(f) / 2 ** 20})
        print(f"context {size}: windowed layer {w[0] / 2 ** 20:.2f} MiB, unwindowed layer {f[0] / 2 ** 20:.2f} MiB "
              f"(bf16 StaticCache {bf16 / 2 ** 20:.2f}); all 32 layers {sum(w) / 2 ** 20:.1f} MiB against "
              f"{sum(f) / 2 ** 20:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--draft-tokens", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--residual", type=int, default=128)
    ap.add_argument("--window-contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--out-dir", default=common.RESULTS)
    args = ap.parse_args()
    rows: list = []
    window_rows(args, rows)
    speculative_rows(args, rows)
    print("wrote", common.write("speculative_cpu.json", rows, {"config": TINY}, out_dir=args.out_dir))


if __name__ == "__main__":
    main()
