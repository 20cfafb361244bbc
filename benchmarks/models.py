"""Model zoo: real architectures built offline from configs with random weights (transformers,
diffusers, timm when it imports), compiled with attnopt. For each: attention and linear sites
captured / total (every site left alone listed with its reason), end-to-end rel-L1 against the
uncompiled model, compile time; on a GPU also the latency of eager, torch.compile default and
attnopt (dense INT8 attention, + calibrated-free Sparge sparsity, + W8A8 linears), measured in
the same run. Writes JSON and a markdown table under benchmarks/results/.

    python benchmarks/models.py                 # CPU: tiny configs, coverage and accuracy
    python benchmarks/models.py --size large    # on a GPU: realistic shapes, latencies
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import attnopt  # noqa: E402

DT = torch.bfloat16


def _llm(kind, impl, size, dev):
    import transformers

    big = size == "large"
    cfg = dict(hidden_size=4096 if big else 128, intermediate_size=11008 if big else 256,
               num_hidden_layers=4 if big else 2, num_attention_heads=32 if big else 8,
               num_key_value_heads=8 if big else 2, vocab_size=32000 if big else 256, attn_implementation=impl)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
    model = cls[1](cls[0](**cfg)).eval().to(dev, DT)
    n = 32768 if big else 200
    return model, (torch.randint(0, cfg["vocab_size"], (1, n), device=dev),), {}


def _bert(impl, size, dev):
    import transformers

    big = size == "large"
    cfg = transformers.BertConfig(hidden_size=1024 if big else 128, intermediate_size=4096 if big else 256,
                                  num_hidden_layers=4 if big else 2, num_attention_heads=16 if big else 4,
                                  vocab_size=30522 if big else 256, max_position_embeddings=4096,
                                  attn_implementation=impl)
    model = transformers.BertModel(cfg).eval().to(dev, DT)
    b, n = (8, 512) if big else (2, 128)
    mask = torch.ones(b, n, dtype=torch.long, device=dev)
    mask[1, n // 2:] = 0  # padding
    return model, (torch.randint(0, cfg.vocab_size, (b, n), device=dev),), {"attention_mask": mask}


def _vit_hf(impl, size, dev):
    import transformers

    big = size == "large"
    cfg = transformers.ViTConfig(hidden_size=1024 if big else 128, intermediate_size=4096 if big else 256,
                                 num_hidden_layers=4 if big else 2, num_attention_heads=16 if big else 4,
                                 image_size=448 if big else 64, patch_size=14 if big else 8, attn_implementation=impl)
    model = transformers.ViTModel(cfg).eval().to(dev, DT)
    s = cfg.image_size
    return model, (torch.randn(16 if big else 2, 3, s, s, device=dev, dtype=DT),), {}


def _vit_timm(size, dev):
    import timm

    big = size == "large"
    model = timm.create_model("vit_large_patch14_224" if big else "vit_tiny_patch16_224", pretrained=False)
    model = model.eval().to(dev, DT)
    return model, (torch.randn(16 if big else 2, 3, 224, 224, device=dev, dtype=DT),), {}


def _pixart(size, dev):
    from diffusers import PixArtTransformer2DModel

    big = size == "large"
    heads, hd = (16, 72) if big else (4, 32)
    model = PixArtTransformer2DModel(sample_size=128 if big else 32, patch_size=2, in_channels=4, out_channels=8,
                                     num_layers=4 if big else 2, attention_head_dim=hd, num_attention_heads=heads,
                                     cross_attention_dim=heads * hd, caption_channels=64, norm_type="ada_norm_single",
                                     use_additional_conditions=False).eval().to(dev, DT)
    s = 128 if big else 32
    kw = dict(encoder_hidden_states=torch.randn(2, 120 if big else 20, 64, device=dev, dtype=DT),
              timestep=torch.tensor([10, 500], device=dev))
    return model, (torch.randn(2, 4, s, s, device=dev, dtype=DT),), kw


def _cogvideox(size, dev):
    from diffusers import CogVideoXTransformer3DModel

    big = size == "large"
    frames, hw = (13, 60) if big else (3, 32)
    model = CogVideoXTransformer3DModel(num_attention_heads=30 if big else 2, attention_head_dim=64 if big else 32,
                                        in_channels=16 if big else 8, out_channels=16 if big else 8,
                                        num_layers=2 if big else 1, sample_width=hw, sample_height=hw,
                                        sample_frames=(frames - 1) * 4 + 1, patch_size=2,
                                        text_embed_dim=256 if big else 64, time_embed_dim=256 if big else 64,
                                        temporal_compression_ratio=4, max_text_seq_length=226 if big else 16
                                        ).eval().to(dev, DT)
    x = torch.randn(1, frames, 16 if big else 8, hw, hw, device=dev, dtype=DT)
    kw = dict(encoder_hidden_states=torch.randn(1, 226 if big else 16, 256 if big else 64, device=dev, dtype=DT),
              timestep=torch.tensor([10], device=dev))
    return model, (x,), kw


MODELS = {
    "llama (eager)": lambda s, d: _llm("llama", "eager", s, d),
    "llama (sdpa)": lambda s, d: _llm("llama", "sdpa", s, d),
    "qwen2 (eager)": lambda s, d: _llm("qwen2", "eager", s, d),
    "qwen2 (sdpa)": lambda s, d: _llm("qwen2", "sdpa", s, d),
    "bert + padding (eager)": lambda s, d: _bert("eager", s, d),
    "bert + padding (sdpa)": lambda s, d: _bert("sdpa", s, d),
    "vit (transformers)": lambda s, d: _vit_hf("sdpa", s, d),
    "vit (timm)": _vit_timm,
    "pixart DiT, cross-attention (diffusers)": _pixart,
    "cogvideox video, long sequence (diffusers)": _cogvideox,
}


def _latency(model, args, kwargs, backend) -> float:
    import triton

    torch._dynamo.reset()
    f = model if backend is None else torch.compile(model, backend=backend)
    with torch.no_grad():
        f(*args, **kwargs)
        return triton.testing.do_bench(lambda: f(*args, **kwargs), warmup=10, rep=50, return_mode="median")


def run(name, build, size, dev) -> dict:
    row = {"model": name}
    try:
        model, args, kwargs = build(size, dev)
    except Exception as e:  # a library missing here (timm without torchvision, say)
        return {**row, "error": f"not built: {type(e).__name__}: {str(e)[:160]}"}
    opts = {"attention": {"min_seq_len": 0}, "linear": {"quant": "w8a8"}}
    t0 = time.perf_counter()
    report = attnopt.inspect(model, *args, example_kwargs=kwargs, options=opts)
    row["inspect_s"] = round(time.perf_counter() - t0, 1)
    for kind in ("attention", "linear"):
        sites = [s for s in report.sites if s.kind == kind]
        row[kind] = f"{sum(s.status == 'rewritten' for s in sites)}/{len(sites)}"
    row["e2e_rel_l1"] = report.summary["e2e"].get("rel_l1")
    row["compile_s"] = round(report.summary["compile_time_s"], 2)
    row["left_alone"] = sorted({f"{s.kind} {s.module}: {s.reason}" for s in report.sites if s.status != "rewritten"})
    row["max_site_rel_l1"] = max((s.error["rel_l1"] for s in report.sites if s.error), default=None)
    if dev == "cuda":
        row["ms"] = {
            "eager": _latency(model, args, kwargs, None),
            "torch.compile": _latency(model, args, kwargs, "inductor"),
            "attnopt int8": _latency(model, args, kwargs, attnopt.backend({})),
            "attnopt int8 + sparge": _latency(model, args, kwargs, attnopt.backend(
                {"attention": {"sparsity": {"method": "sparge"}}})),
            "attnopt int8 + w8a8": _latency(model, args, kwargs, attnopt.backend({"linear": {"quant": "w8a8"}})),
        }
    return row


def markdown(rows, env) -> str:
    lines = [f"Model zoo on {env['device']} (torch {env['torch']}, triton {env['triton']}); attention and "
             "linear sites rewritten / candidates with `linear.quant = w8a8`; rel-L1 of the whole model's output "
             "against the uncompiled model.", "",
             "| model | attention | linear | e2e rel-L1 | worst site rel-L1 | compile s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | - | - | - | - | {r['error']} |")
            continue
        e2e = f"{r['e2e_rel_l1']:.4f}" if r.get("e2e_rel_l1") is not None else "-"
        worst = f"{r['max_site_rel_l1']:.4f}" if r.get("max_site_rel_l1") is not None else "-"
        lines.append(f"| {r['model']} | {r['attention']} | {r['linear']} | {e2e} | {worst} | {r['compile_s']} |")
    lines += ["", "Sites left alone, and why:", ""]
    for r in rows:
        for why in r.get("left_alone", []):
            lines.append(f"- {r['model']}: {why}")
    if any("ms" in r for r in rows):
        lines += ["", "| model | " + " | ".join(next(r for r in rows if "ms" in r)["ms"]) + " |",
                  "| --- |" + " --- |" * len(next(r for r in rows if "ms" in r)["ms"])]
        for r in rows:
            if "ms" in r:
                lines.append(f"| {r['model']} | " + " | ".join(f"{v:.2f} ms" for v in r["ms"].values()) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=["tiny", "large"], default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", nargs="*", help="model names containing these words")
    ap.add_argument("--out-dir", default=common.RESULTS)
    args = ap.parse_args()
    rows = []
    for name, build in MODELS.items():
        if args.only and not any(w in name for w in args.only):
            continue
        print(f"== {name}", flush=True)
        rows.append(run(name, build, args.size, args.device))
        print(json.dumps(rows[-1]), flush=True)
    common.RESULTS = args.out_dir
    tag = f"{args.device}_{args.size}"
    path = common.write(f"models_{tag}.json", rows, {"what": __doc__.splitlines()[0]})
    md = markdown(rows, common.env())
    with open(path.replace(".json", ".md"), "w") as f:
        f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
