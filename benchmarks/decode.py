"""Decode with the quantized KV cache (AttnoptCache): accuracy on the CPU, speed and memory on a GPU.

    python benchmarks/decode.py --accuracy [--prompts 2048 8192] [--steps 32]    (CPU is fine)
    python benchmarks/decode.py [--quick] [--time-limit S]                        (needs a CUDA GPU)

--accuracy: tiny Llama and Qwen2 configs (random weights, fp32) after long synthetic prompts; the
same model decodes greedily with transformers' StaticCache (unquantized) and with AttnoptCache in
each format, fed the same tokens, and each decode step's logits are compared (rel-L1). Prefill
runs SDPA in both, so only the cache differs ("int4+int8" read in full is "int8": same codes;
"int4+int8 draft" reads its upper nibbles only, as a self-speculative draft would). Writes decode_accuracy_cpu.json and a PNG of rel-L1
over the generated steps (benchmarks/results/).

GPU (default): one decode step's attention (Llama-3-8B's shape: 32 query heads, 8 KV heads, head
dim 128) at batch 1 / 8 / 32 and 4K-32K tokens of context: attnopt's split-KV kernel on each cache
format against torch SDPA on the bf16 cache of the same length, its rel-L1 against SDPA, the cache's
bytes against bf16's, and tokens/s of the attention of a 32-layer model (batch / (32 x step time)).
Then whole-model decode steps (a 4-layer Llama-3-8B-shaped model, random weights; eager, or
--compile) with transformers' bf16 StaticCache + SDPA against AttnoptCache + attnopt's attention:
tokens/s. (Eager, each step's cache write is one fused Triton kernel per layer; compiled, Inductor
fuses the torch ops, as in generate() on CUDA, which compiles decode steps of static caches itself.)
--quick: what fits gpu_session.sh's decode step. The JSON is written after every row.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from attnopt.decode.kv_quant import FORMATS, KVLayout  # noqa: E402
from attnopt.decode.storage import QuantizedKV  # noqa: E402
from attnopt.metrics import compare  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, MODEL_LAYERS = 32, 8, 128, 32
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, head_dim=64, vocab_size=1000, max_position_embeddings=16384)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--accuracy", action="store_true", help="the CPU accuracy run (per-step logits rel-L1)")
    ap.add_argument("--prompts", type=int, nargs="+", default=[2048, 8192], help="--accuracy: prompt lengths")
    ap.add_argument("--steps", type=int, default=32, help="--accuracy: generated tokens")
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--residual", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--model-contexts", type=int, nargs="+", default=[4096, 16384],
                    help="contexts of the whole-model decode rows (0 rows: none)")
    ap.add_argument("--compile", action="store_true",
                    help="model rows: torch.compile each model (as generate() does on CUDA for static caches)")
    ap.add_argument("--quick", action="store_true", help="4K / 16K / 32K attention, 4K model rows: the session's run")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: a smoke run under TRITON_INTERPRET
    ap.add_argument("--out-dir", default=common.RESULTS)
    common.add_time_limit(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.contexts, args.model_contexts = [4096, 16384, 32768], [4096]
    return args


# ------------------------------------------------------------------------------------- accuracy


def _tiny(kind: str, attn: str):
    import transformers

    cls, cfg_cls = {"llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
                    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config)}[kind]
    torch.manual_seed(0)
    return cls(cfg_cls(**TINY, attn_implementation=attn)).eval()


def _decode(model, cache, ids, steps, feed=None):
    """Greedy decoding (or fed `feed` [B, steps - 1]): logits [B, steps, V] of each generated step."""
    out = model(ids, cache=cache, use_cache=True)
    logits = [out.logits[:, -1].float()]
    for i in range(steps - 1):
        nxt = logits[-1].argmax(-1) if feed is None else feed[:, i]
        out = model(nxt[:, None], cache=cache, use_cache=True)
        logits.append(out.logits[:, -1].float())
    return torch.stack(logits, 1)


def accuracy(args) -> None:
    import transformers

    import attnopt.integrations.transformers as att

    name = att.register(name="attnopt_cache_only", min_seq_len=1 << 30)  # prefill stays SDPA: only the cache differs
    rows, extra = [], {"what": "per-step logits rel-L1, AttnoptCache against the unquantized StaticCache",
                       "config": TINY, "group": args.group, "residual": args.residual}
    limit = common.TimeLimit(args.time_limit)
    for kind in ("llama", "qwen2"):
        ref, model = _tiny(kind, "sdpa"), _tiny(kind, name)
        model.load_state_dict(ref.state_dict())
        for n in args.prompts:
            if not limit.allows():
                break
            with limit.item(), torch.no_grad():
                torch.manual_seed(n)
                ids = torch.randint(0, TINY["vocab_size"], (1, n))
                size = n + args.steps
                want = _decode(ref, transformers.StaticCache(ref.config, size), ids, args.steps)
                tokens = want.argmax(-1)
                variants = [(q, False) for q in args.formats] + [("int4+int8", True)] * ("int4+int8" in args.formats)
                for quant, draft in variants:
                    cache = att.AttnoptCache(model.config, size, quant=quant, group=args.group,
                                             residual=args.residual)
                    cache.set_draft(draft)
                    got = _decode(model, cache, ids, args.steps, feed=tokens)
                    quant = quant + (" draft" if draft else "")
                    # step 0's logits are the prefill's (SDPA on the 16-bit K / V in both): decode steps only
                    per_step = [compare(got[:, i], want[:, i])["rel_l1"] for i in range(1, args.steps)]
                    rows.append({"model": kind, "prompt": n, "quant": quant, "rel_l1": per_step,
                                 "mean": sum(per_step) / len(per_step), "max": max(per_step),
                                 "same_greedy_tokens": float((got.argmax(-1) == tokens).float().mean()),
                                 "cache_bytes": cache.nbytes(),
                                 "static_cache_bytes": att.static_cache_nbytes(model.config, size, 1, torch.float32),
                                 "share_of_bf16": cache.nbytes(1, torch.bfloat16)
                                 / att.static_cache_nbytes(model.config, size, 1, torch.bfloat16)})
                    r = rows[-1]
                    print(f"{kind} prompt {n} {quant:>9}: rel-L1 mean {r['mean']:.4f} max {r['max']:.4f}, "
                          f"greedy tokens equal {r['same_greedy_tokens']:.2f}, memory {r['share_of_bf16']:.3f}x bf16")
                common.write("decode_accuracy_cpu.json", rows, extra, out_dir=args.out_dir)
    path = common.write("decode_accuracy_cpu.json", rows, extra, out_dir=args.out_dir)
    print("wrote", path, plot_accuracy(path))


def plot_accuracy(path: str) -> str:
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        rows = json.load(f)["rows"]
    kinds = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for r in (r for r in rows if r["model"] == kind):
            label = f"{r['quant']}{' (= int8)' if r['quant'] == 'int4+int8' else ''}, {r['prompt']} tok"
            ax.plot(range(1, len(r["rel_l1"]) + 1), r["rel_l1"], marker=".", label=label)
        ax.set_yscale("log")
        ax.set_title(f"tiny {kind} (random weights): logits vs unquantized cache")
        ax.set_xlabel("decode step (after the prompt's prefill)")
        ax.set_ylabel("rel-L1")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = path.rsplit(".", 1)[0] + ".png"
    fig.savefig(out, dpi=110)
    return out


# ------------------------------------------------------------------------------------------- GPU


def _bench(fn, device) -> float:
    """Median milliseconds (do_bench on a GPU; a few timed calls elsewhere, meaningless but runs)."""
    if device == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def attention_rows(args, limit, rows, extra) -> None:
    import torch.nn.functional as F

    from attnopt.codegen.decode.launch import kv_decode_triton

    dev = args.device
    for ctx in args.contexts:
        for b in args.batches:
            if not limit.allows():
                return
            with limit.item():
                k, v = (torch.randn(b, KV_HEADS, ctx, HEAD_DIM, device=dev, dtype=torch.bfloat16) for _ in range(2))
                q = torch.randn(b, HEADS, 1, HEAD_DIM, device=dev, dtype=torch.bfloat16)
                bf16_bytes = 2 * k.numel() * k.element_size()
                ms = _bench(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), dev)
                want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                base = {"kind": "attention", "batch": b, "context": ctx}
                rows.append({**base, "variant": "torch SDPA, bf16 cache", "ms": ms, "cache_bytes": bf16_bytes,
                             "tokens_per_s_32_layers": b / (MODEL_LAYERS * ms * 1e-3)})
                for quant in args.formats:
                    kv = QuantizedKV(KVLayout(quant, args.group, args.residual), b, KV_HEADS, ctx, HEAD_DIM,
                                     torch.bfloat16, dev)
                    kv.append(k, v, torch.tensor(0, device=dev))
                    lengths = torch.full((b,), ctx, device=dev, dtype=torch.int32)
                    drafts = (False, True) if quant == "int4+int8" else (False,)
                    for draft in drafts:
                        ms = _bench(lambda: kv_decode_triton(q, kv, lengths, draft=draft), dev)
                        err = compare(kv_decode_triton(q, kv, lengths, draft=draft), want)["rel_l1"]
                        rows.append({**base, "variant": f"attnopt {quant}" + (" (draft: 4 bits)" if draft else ""),
                                     "ms": ms, "rel_l1_vs_sdpa": err, "cache_bytes": kv.nbytes(),
                                     "share_of_bf16": kv.nbytes() / bf16_bytes,
                                     "tokens_per_s_32_layers": b / (MODEL_LAYERS * ms * 1e-3)})
                print("\n".join(f"  ctx {r['context']:>6} batch {r['batch']:>2} {r['variant']:<30} {r['ms'] * 1e3:8.1f} us"
                                for r in rows[-(1 + len(args.formats) + ("int4+int8" in args.formats)):]))
                common.write(f"decode_{extra['device_tag']}.json", rows, extra, out_dir=args.out_dir)


def _fill(cache, model, batch, ctx, dev) -> None:
    """Every layer's cache holds `ctx` random tokens (no prefill run: its cost is not what is measured)."""
    cfg = model.config
    for layer in cache.layers:
        k, v = (torch.randn(batch, cfg.num_key_value_heads, ctx, cfg.head_dim, device=dev, dtype=torch.bfloat16)
                for _ in range(2))
        layer.update(k, v, kwargs={})
        layer.read = True


def model_rows(args, limit, rows, extra) -> None:
    import transformers

    import attnopt.integrations.transformers as att

    dev = args.device
    name = att.register()
    cfg = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=HEADS,
               num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, vocab_size=32000, max_position_embeddings=65536)
    if dev != "cuda":  # smoke run
        cfg.update(hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    models = {attn: transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg, attn_implementation=attn))
              .eval().to(dev, torch.bfloat16) for attn in ("sdpa", name)}
    models[name].load_state_dict(models["sdpa"].state_dict())
    run = {k: torch.compile(m) if args.compile else m for k, m in models.items()}
    steps = 16 if dev == "cuda" else 2
    for ctx in args.model_contexts:
        for b in args.batches:
            if not limit.allows():
                return
            with limit.item(), torch.no_grad():
                caches = [("transformers StaticCache bf16 + SDPA", run["sdpa"],
                           transformers.StaticCache(models["sdpa"].config, ctx + steps + 1))]
                caches += [(f"AttnoptCache {quant} + attnopt", run[name],
                            att.AttnoptCache(models[name].config, ctx + steps + 1, quant=quant, group=args.group,
                                             residual=args.residual)) for quant in args.formats]
                for variant, model, cache in caches:
                    _fill(cache, models["sdpa"], b, ctx, dev)
                    tok = torch.zeros(b, 1, dtype=torch.long, device=dev)
                    model(tok, cache=cache, use_cache=True)  # warm-up step (and compile)
                    if dev == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(steps):
                        model(tok, cache=cache, use_cache=True)
                    if dev == "cuda":
                        torch.cuda.synchronize()
                    dt = (time.perf_counter() - t0) / steps
                    nbytes = (cache.nbytes() if hasattr(cache, "nbytes")
                              else sum(2 * lay.keys.numel() * lay.keys.element_size() for lay in cache.layers))
                    rows.append({"kind": "model", "compiled": args.compile, "layers": cfg["num_hidden_layers"],
                                 "batch": b, "context": ctx,
                                 "variant": variant, "ms_per_step": dt * 1e3, "tokens_per_s": b / dt,
                                 "cache_bytes": nbytes})
                    print(f"  model ctx {ctx:>6} batch {b:>2} {variant:<40} {b / dt:10.1f} tokens/s")
                common.write(f"decode_{extra['device_tag']}.json", rows, extra, out_dir=args.out_dir)


def main() -> None:
    args = parse_args()
    if args.accuracy:
        return accuracy(args)
    if args.device == "cuda":
        common.require_cuda("benchmarks/decode.py")
    tag = "cpu_smoke"
    if args.device == "cuda":
        from attnopt.codegen.arch import detect_arch

        tag = detect_arch("cuda")
    extra = {"what": __doc__.splitlines()[0], "device_tag": tag, "group": args.group, "residual": args.residual}
    limit = common.TimeLimit(args.time_limit)
    rows: list = []
    attention_rows(args, limit, rows, extra)
    if args.model_contexts:
        model_rows(args, limit, rows, extra)
    print("wrote", common.write(f"decode_{tag}.json", rows, extra, out_dir=args.out_dir))


if __name__ == "__main__":
    main()
