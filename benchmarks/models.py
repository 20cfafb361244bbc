"""Model zoo: real architectures from configs with random weights, compiled with attnopt.

Built offline (transformers, diffusers, timm when it imports). For each: attention and linear
sites captured / total (every site left alone listed with its reason), end-to-end rel-L1 against
the uncompiled model, compile time; with latencies (default on a GPU) also eager, torch.compile
default and attnopt (dense INT8, sparse with a plan from attnopt.calibrate on the model's own
inputs, INT8 + W8A8 linears), all measured in the same run, each with its rel-L1 against eager.

    python benchmarks/models.py                          # CPU: tiny configs, coverage and accuracy
    python benchmarks/models.py --size large             # GPU: LLM prefill 32K, DiT / video 16K+ tokens
    python benchmarks/models.py --size large --only pixart cogvideox --variants eager compile int8

Each row is written (JSON and markdown) as soon as it finishes and merged by model name with the
rows an earlier run left in the same file (--fresh starts over, --resume skips rows already done),
so a run cut short by a time limit keeps what it finished. A row or a variant that fails, out of
memory included, records its error and the run goes on. Per-site errors and the sparse plan's
calibration use inputs cut to fit float64 reference attention (the table gives that length).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import attnopt  # noqa: E402
from attnopt.metrics import flatten_outputs  # noqa: E402
from attnopt.progress import Progress  # noqa: E402

DT = torch.bfloat16
LLM_TOKENS = 32768
# eager attention materializes [heads, n, n] scores in bf16 and their softmax in fp32: at 32K tokens
# and 32 heads that is 64 + 128 GiB, so eager rows prefill a shorter prompt (sdpa rows run 32K)
EAGER_LLM_TOKENS = 8192
# inspect and calibrate measure every site against float64 attention: about four float64 [B, H, n, n]
# tensors at once. Their inputs are cut to the length that keeps this under PROBE_BYTES.
PROBE_BYTES = 24 << 30
PROBE_COPIES = 4
DENSE = {"attention": {"min_seq_len": 0}}
SPARSE = {"attention": {"min_seq_len": 0, "sparsity": {"method": "sparge"}}}
W8A8 = {"attention": {"min_seq_len": 0}, "linear": {"quant": "w8a8"}}
BUDGET = {"model_rel_l1": 0.05}  # the model output's rel-L1, all sites together


@dataclass
class Case:
    """One zoo model at one size. inputs(cap) -> (kwargs, attention tokens), at most cap tokens long
    where the model allows a shorter input (cap None: the full benchmark length)."""

    model: torch.nn.Module
    inputs: Callable[[int | None], tuple[dict, int]]
    batch: int
    heads: int
    note: str = ""


def _make(ctor: Callable[[], torch.nn.Module], dev) -> torch.nn.Module:
    """Build straight on the device (meta included), so a large model never lands on the host first."""
    with torch.device(dev):
        model = ctor()
    return model.eval().to(device=dev, dtype=DT)  # and any buffer a library made on the host


def _cut(n: int, cap: int | None) -> int:
    return n if cap is None else max(1, min(n, cap))


LLM_SHAPES = {  # Llama-2-7B-like and Qwen2-7B-like layers, 4 of them (GQA in both)
    "llama": {"large": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                            num_key_value_heads=8, num_hidden_layers=4, vocab_size=32000),
              "tiny": dict(hidden_size=128, intermediate_size=256, num_attention_heads=8,
                           num_key_value_heads=2, num_hidden_layers=2, vocab_size=256)},
    "qwen2": {"large": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                            num_key_value_heads=4, num_hidden_layers=4, vocab_size=32000),
              "tiny": dict(hidden_size=128, intermediate_size=256, num_attention_heads=8,
                           num_key_value_heads=2, num_hidden_layers=2, vocab_size=256)},
}


def _llm(kind: str, impl: str, size: str, dev) -> Case:
    import transformers

    cfg_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                          "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
    cfg = cfg_cls(**LLM_SHAPES[kind][size], max_position_embeddings=LLM_TOKENS, attn_implementation=impl)
    model = _make(lambda: model_cls(cfg), dev)
    n, note = 200, ""
    if size == "large":
        n = EAGER_LLM_TOKENS if impl == "eager" else LLM_TOKENS
        if impl == "eager":
            note = (f"eager attention prefills {n} tokens: its [{cfg.num_attention_heads}, n, n] scores at "
                    f"{LLM_TOKENS} would take {_score_gib(cfg.num_attention_heads, LLM_TOKENS):.0f} GiB")
    ids = torch.randint(0, cfg.vocab_size, (1, n), device=dev)

    def inputs(cap=None):
        m = _cut(n, cap)
        return {"input_ids": ids[:, :m], "use_cache": False}, m

    return Case(model, inputs, 1, cfg.num_attention_heads, note)


def _score_gib(heads: int, n: int) -> float:
    """Eager attention's peak: bf16 scores plus their fp32 softmax, batch 1."""
    return heads * n * n * (2 + 4) / 2**30


def _bert(impl: str, size: str, dev) -> Case:
    import transformers

    big = size == "large"
    cfg = transformers.BertConfig(hidden_size=1024 if big else 128, intermediate_size=4096 if big else 256,
                                  num_hidden_layers=4 if big else 2, num_attention_heads=16 if big else 4,
                                  vocab_size=30522 if big else 256, max_position_embeddings=512,
                                  attn_implementation=impl)
    model = _make(lambda: transformers.BertModel(cfg), dev)
    b, n = (8, 512) if big else (2, 128)
    ids = torch.randint(0, cfg.vocab_size, (b, n), device=dev)
    mask = torch.ones(b, n, dtype=torch.long, device=dev)
    mask[1, n // 2:] = 0  # padding

    def inputs(cap=None):
        m = _cut(n, cap)
        return {"input_ids": ids[:, :m], "attention_mask": mask[:, :m]}, m

    return Case(model, inputs, b, cfg.num_attention_heads)


def _fixed(kwargs: dict, tokens: int) -> Callable:
    """Inputs that cannot be shortened (a ViT's patch grid is fixed by its position embeddings)."""
    return lambda cap=None: (kwargs, tokens)


def _vit_hf(impl: str, size: str, dev) -> Case:
    import transformers

    big = size == "large"
    cfg = transformers.ViTConfig(hidden_size=1024 if big else 128, intermediate_size=4096 if big else 256,
                                 num_hidden_layers=4 if big else 2, num_attention_heads=16 if big else 4,
                                 image_size=448 if big else 64, patch_size=14 if big else 8,
                                 attn_implementation=impl)
    model = _make(lambda: transformers.ViTModel(cfg), dev)
    b, s = (16 if big else 2), cfg.image_size
    x = torch.randn(b, 3, s, s, device=dev, dtype=DT)
    return Case(model, _fixed({"pixel_values": x}, (s // cfg.patch_size) ** 2 + 1), b, cfg.num_attention_heads)


def _vit_timm(size: str, dev) -> Case:
    import timm

    big = size == "large"
    name, patch, heads = ("vit_large_patch14_224", 14, 16) if big else ("vit_tiny_patch16_224", 16, 3)
    model = _make(lambda: timm.create_model(name, pretrained=False), dev)
    b = 16 if big else 2
    x = torch.randn(b, 3, 224, 224, device=dev, dtype=DT)
    return Case(model, _fixed({"x": x}, (224 // patch) ** 2 + 1), b, heads)


def _pixart(size: str, dev) -> Case:
    """PixArt-alpha-like DiT: self-attention over the latent patches, cross-attention to the caption.
    Large: a 256x256 latent (a 2048px image), 16384 tokens."""
    from diffusers import PixArtTransformer2DModel

    big = size == "large"
    heads, hd, side, text, cap_ch = (16, 72, 256, 120, 4096) if big else (4, 32, 32, 20, 64)
    model = _make(lambda: PixArtTransformer2DModel(
        sample_size=side, patch_size=2, in_channels=4, out_channels=8, num_layers=4 if big else 2,
        attention_head_dim=hd, num_attention_heads=heads, cross_attention_dim=heads * hd, caption_channels=cap_ch,
        norm_type="ada_norm_single", use_additional_conditions=False), dev)
    x = torch.randn(2, 4, side, side, device=dev, dtype=DT)
    kw = {"encoder_hidden_states": torch.randn(2, text, cap_ch, device=dev, dtype=DT),
          "timestep": torch.tensor([10, 500], device=dev)}

    def inputs(cap=None):
        s = side if cap is None else min(side, 2 * max(1, math.isqrt(cap)))
        return {"hidden_states": x[..., :s, :s], **kw}, (s // 2) ** 2

    return Case(model, inputs, 2, heads)


def _cogvideox(size: str, dev) -> Case:
    """CogVideoX-2b-like video transformer: joint text + video self-attention. Large: 13 latent frames
    of 60x90 (49 frames of 480x720 video), 13 * 30 * 45 + 226 = 17776 tokens."""
    from diffusers import CogVideoXTransformer3DModel

    big = size == "large"
    frames, h, w, text, emb = (13, 60, 90, 226, 4096) if big else (3, 16, 24, 16, 64)
    heads, ch = (30, 16) if big else (2, 8)
    model = _make(lambda: CogVideoXTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=64 if big else 32, in_channels=ch, out_channels=ch,
        num_layers=4 if big else 1, sample_width=w, sample_height=h, sample_frames=(frames - 1) * 4 + 1,
        patch_size=2, text_embed_dim=emb, time_embed_dim=512 if big else 64, temporal_compression_ratio=4,
        max_text_seq_length=text), dev)
    x = torch.randn(1, frames, ch, h, w, device=dev, dtype=DT)
    kw = {"encoder_hidden_states": torch.randn(1, text, emb, device=dev, dtype=DT),
          "timestep": torch.tensor([10], device=dev)}
    per_frame = (h // 2) * (w // 2)

    def inputs(cap=None):
        f = frames if cap is None else max(1, min(frames, (cap - text) // per_frame))
        return {"hidden_states": x[:, :f], **kw}, f * per_frame + text

    return Case(model, inputs, 1, heads)


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


def probe_cap(case: Case) -> int:
    """Longest input whose float64 reference attention (inspect, calibrate) stays under PROBE_BYTES."""
    return math.isqrt(PROBE_BYTES // (case.batch * case.heads * 8 * PROBE_COPIES))


def describe(e: BaseException) -> str:
    """One line for the table: the error's type and the start of its first line."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:200]}"


def free(dev) -> None:
    """Drop compiled graphs and cached blocks, so a failed or finished run leaves memory to the next."""
    torch._dynamo.reset()
    gc.collect()
    if str(dev).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def counts(sites) -> dict:
    """'rewritten/total' per site kind."""
    out = {}
    for kind in ("attention", "linear"):
        ks = [s for s in sites if s.kind == kind]
        out[kind] = f"{sum(s.status == 'rewritten' for s in ks)}/{len(ks)}"
    return out


def coverage(model, kwargs: dict) -> dict:
    """attnopt.inspect with W8A8 linears: sites, why any is left alone, per-site and e2e error."""
    t0 = time.perf_counter()
    report = attnopt.inspect(model, example_kwargs=kwargs, options=W8A8)
    row = {"inspect_s": round(time.perf_counter() - t0, 1), **counts(report.sites),
           "e2e_rel_l1": report.summary["e2e"].get("rel_l1"),
           "compile_s": round(report.summary["compile_time_s"], 2),
           "left_alone": sorted({f"{s.kind} {s.module}: {s.reason}" for s in report.sites if s.status != "rewritten"}),
           "max_site_rel_l1": max((s.error["rel_l1"] for s in report.sites if s.error), default=None)}
    return row


def rel_l1(out, ref: torch.Tensor) -> float:
    """rel-L1 of a model output's first float tensor against `ref`, in float64 chunks on the device."""
    a = flatten_outputs(out)[0].reshape(-1)
    b = ref.reshape(-1)
    num = den = 0.0
    for x, y in zip(a.split(1 << 25), b.split(1 << 25)):
        x, y = x.double(), y.double()
        num += (x - y).abs().sum().item()
        den += y.abs().sum().item()
    return num / den if den > 0 else math.nan


def bench_ms(fn: Callable, dev) -> float:
    """Median latency: Triton's do_bench on a GPU, a few timed calls elsewhere."""
    if str(dev).startswith("cuda"):
        import triton

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def sync(dev) -> None:
    if str(dev).startswith("cuda"):
        torch.cuda.synchronize()


def plan_stats(plan) -> dict:
    """Mean planned block sparsity over every attention head (dense heads count as 0)."""
    per_head = []
    for entry in plan.sites.values():
        if entry.get("kind") != "attention":
            continue
        sp = entry.get("stats", {}).get("sparsity", [])
        dense = set(range(len(sp))) if entry.get("dense") else set((entry.get("sparsity") or {}).get("dense_heads", []))
        per_head += [0.0 if i in dense else float(x) for i, x in enumerate(sp)]
    return {"plan_sparsity": sum(per_head) / len(per_head) if per_head else 0.0}


def make_variants(model, calib: dict, calib_tokens: int) -> dict[str, Callable]:
    """name -> () -> (backend or None for eager, facts about the variant)."""
    def sparse():
        t0 = time.perf_counter()
        plan = attnopt.calibrate(model, [calib], options=SPARSE, budget=BUDGET)
        facts = {"calib_tokens": calib_tokens, "calibrate_s": round(time.perf_counter() - t0, 1), **plan_stats(plan)}
        return attnopt.backend({**DENSE, "plan": plan}), facts

    return {
        "eager": lambda: (None, {}),
        "torch.compile": lambda: ("inductor", {}),
        "attnopt int8": lambda: (attnopt.backend(DENSE), {}),
        "attnopt sparse (calibrated)": sparse,
        "attnopt int8 + w8a8": lambda: (attnopt.backend(W8A8), {}),
    }


def run_variant(model, kwargs: dict, make: Callable, ref, dev) -> tuple[dict, object]:
    """Compile one variant, time it, and measure its rel-L1 against `ref` (None: it is the reference).
    Returns (cell, output's first tensor); a failure, OOM included, becomes the cell's error."""
    cell, first = {}, None
    try:
        backend, info = make()
        cell.update(info)
        torch._dynamo.reset()
        if str(dev).startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        fn = model if backend is None else torch.compile(model, backend=backend)
        with torch.no_grad():
            t0 = time.perf_counter()
            out = fn(**kwargs)
            sync(dev)
            cell["first_call_s"] = round(time.perf_counter() - t0, 2)
            first = flatten_outputs(out)[0].detach()
            del out
            if ref is not None:
                cell["rel_l1"] = rel_l1(first, ref)
            cell["ms"] = bench_ms(lambda: fn(**kwargs), dev)
        if isinstance(backend, attnopt.AttnoptBackend):
            cell.update(counts(backend.recorder.sites()))
        if str(dev).startswith("cuda"):
            cell["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    except Exception as e:  # noqa: BLE001 - any failure, OOM included, is a result to record
        cell = {**cell, "error": describe(e)}
        first = None
    finally:
        free(dev)
    return cell, first


def variants(model, kwargs: dict, calib: dict, calib_tokens: int, dev, names=None) -> dict:
    """The latency variants (all, or those named) on the same model and inputs; eager's output is
    the reference the others' rel-L1 is measured against."""
    cells, ref = {}, None
    for name, make in make_variants(model, calib, calib_tokens).items():
        if names is not None and name not in names:
            continue
        cells[name], out = run_variant(model, kwargs, make, ref, dev)
        if name == "eager":
            ref = out
    return cells


def stage(row: dict, name: str, fn: Callable[[], dict], dev) -> bool:
    """Run one stage of a row into it; a failure, OOM included, is recorded and the row goes on."""
    try:
        row.update(fn())
        return True
    except Exception as e:  # noqa: BLE001 - a library missing here (timm without torchvision), OOM, ...
        row["error"] = "; ".join(filter(None, [row.get("error"), f"{name}: {describe(e)}"]))
        return False
    finally:
        free(dev)


def run(name: str, build: Callable, size: str, dev, latency: bool | tuple = False) -> dict:
    """One table row; `latency`: time every variant (True), those named (a tuple), or none.
    Never raises: a failing stage is recorded in 'error'; a failed inspect still leaves the
    latencies to measure."""
    names = None if latency is True else latency
    row = {"model": name, "size": size, "env": common.env(short=True)}
    got = {}

    def built():
        torch.manual_seed(0)  # the same random weights and inputs in every run
        got["case"] = case = build(size, dev)
        got["kwargs"], tokens = case.inputs(None)
        got["short"], measured = case.inputs(probe_cap(case))
        return {"tokens": tokens, "measured_tokens": measured, **({"note": case.note} if case.note else {})}

    if stage(row, "build", built, dev):
        stage(row, "inspect", lambda: coverage(got["case"].model, got["short"]), dev)
        if latency:
            stage(row, "latency", lambda: {"variants": variants(got["case"].model, got["kwargs"], got["short"],
                                                                row["measured_tokens"], dev, names)}, dev)
    got.clear()  # the model and its inputs: freed before the next row is built
    free(dev)
    return row


# ----------------------------------------------------------------------------------------- output

VARIANT_NAMES = ("eager", "torch.compile", "attnopt int8", "attnopt sparse (calibrated)", "attnopt int8 + w8a8")
SHORT = dict(zip(("eager", "compile", "int8", "sparse", "w8a8"), VARIANT_NAMES))  # --variants names


def _num(x, fmt=".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _tokens(r: dict) -> str:
    t, m = r.get("tokens"), r.get("measured_tokens")
    if t is None:
        return "-"
    return str(t) if m in (None, t) else f"{t} (inspected at {m})"


def _header(rows: list[dict]) -> str:
    envs = sorted({json.dumps(r.get("env", {}), sort_keys=True) for r in rows})
    said = "; ".join(", ".join(f"{k} {v}" for k, v in json.loads(e).items() if v) for e in envs)
    return (f"Model zoo ({said}). Attention and linear sites rewritten / candidates with `linear.quant = w8a8`; "
            "rel-L1 of the whole model's output against the uncompiled model, and the worst single site's "
            "rel-L1 against float64 attention, on the inputs inspected.")


def _coverage_table(rows: list[dict]) -> list[str]:
    lines = ["| model | tokens | attention | linear | e2e rel-L1 | worst site rel-L1 | compile s | notes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        notes = (r.get("error") or r.get("note") or "").replace("|", "\\|")  # a pipe would split the cell
        if "attention" not in r:
            lines.append(f"| {r['model']} | {_tokens(r)} | - | - | - | - | - | {notes} |")
            continue
        lines.append(f"| {r['model']} | {_tokens(r)} | {r['attention']} | {r['linear']} | {_num(r.get('e2e_rel_l1'))} "
                     f"| {_num(r.get('max_site_rel_l1'))} | {r['compile_s']} | {notes} |")
    return lines


def _ms(cell: dict | None) -> str:
    if not cell:
        return "-"
    return "error" if "error" in cell else f"{cell['ms']:.2f} ms"


def _speedup(cells: dict, name: str) -> str:
    a, b = cells.get("torch.compile", {}), cells.get(name, {})
    return f"{a['ms'] / b['ms']:.2f}x" if "ms" in a and "ms" in b and b["ms"] > 0 else "-"


def _latency_tables(rows: list[dict]) -> list[str]:
    timed = [r for r in rows if r.get("variants")]
    if not timed:
        return []
    lines = ["", "Latency (median), all variants in the same run; speed-ups against torch.compile default:", "",
             "| model | tokens | " + " | ".join(VARIANT_NAMES) + " | int8 speed-up | sparse speed-up |",
             "| --- | --- |" + " --- |" * (len(VARIANT_NAMES) + 2)]
    for r in timed:
        v = r["variants"]
        lines.append(f"| {r['model']} | {r['tokens']} | " + " | ".join(_ms(v.get(n)) for n in VARIANT_NAMES)
                     + f" | {_speedup(v, 'attnopt int8')} | {_speedup(v, 'attnopt sparse (calibrated)')} |")
    lines += ["", "Accuracy of each timed variant (rel-L1 of the output against eager, same inputs):", "",
              "| model | " + " | ".join(VARIANT_NAMES[1:]) + " | sparse plan |",
              "| --- |" + " --- |" * len(VARIANT_NAMES)]
    for r in timed:
        v = r["variants"]
        sp = v.get("attnopt sparse (calibrated)", {})
        plan = (f"calibrated at {sp['calib_tokens']} tokens, {sp['plan_sparsity']:.0%} of blocks skipped"
                if "plan_sparsity" in sp else "-")
        lines.append(f"| {r['model']} | " + " | ".join(_num(v.get(n, {}).get("rel_l1")) for n in VARIANT_NAMES[1:])
                     + f" | {plan} |")
    errors = [f"- {r['model']}, {n}: {c['error']}" for r in timed for n, c in r["variants"].items() if "error" in c]
    return lines + (["", "Variants that failed:", "", *errors] if errors else [])


def markdown(rows: list[dict]) -> str:
    lines = [_header(rows), "", *_coverage_table(rows)]
    left = [f"- {r['model']}: {why}" for r in rows for why in r.get("left_alone", [])]
    lines += ["", "Sites left alone, and why:", ""] + (left or ["- none"])
    return "\n".join(lines + _latency_tables(rows))


def load_rows(path: str) -> list[dict]:
    """Rows an earlier run wrote to `path` (none if it is missing or unreadable)."""
    try:
        with open(path) as f:
            return list(json.load(f).get("rows", []))
    except (OSError, ValueError):
        return []


def merge(rows: list[dict], row: dict) -> list[dict]:
    """Replace the row of the same model, keeping the zoo's order."""
    out = [r for r in rows if r["model"] != row["model"]] + [row]
    order = {name: i for i, name in enumerate(MODELS)}
    return sorted(out, key=lambda r: order.get(r["model"], len(order)))


def save(path: str, rows: list[dict]) -> str:
    """Write the JSON and the markdown beside it; returns the markdown."""
    common.write(os.path.basename(path), rows, {"what": __doc__.splitlines()[0]}, out_dir=os.path.dirname(path))
    md = markdown(rows)
    common.write_text(path[: -len(".json")] + ".md", md + "\n")
    return md


def main(argv=None, zoo=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["tiny", "large"], default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", nargs="*", help="model names containing any of these words")
    ap.add_argument("--latency", action=argparse.BooleanOptionalAction, default=None,
                    help="time the variants (default: on a GPU only)")
    ap.add_argument("--variants", nargs="+", choices=list(SHORT), default=list(SHORT),
                    help="which to time (rel-L1 needs eager, the reference)")
    ap.add_argument("--fresh", action="store_true", help="discard rows earlier runs left in the result file")
    ap.add_argument("--resume", action="store_true", help="skip models whose row is already there without error")
    ap.add_argument("--out-dir", default=common.RESULTS)
    args = ap.parse_args(argv)
    timed = args.device.startswith("cuda") if args.latency is None else args.latency
    latency = tuple(SHORT[v] for v in args.variants) if timed else False
    path = os.path.join(args.out_dir, f"models_{args.device.split(':')[0]}_{args.size}.json")
    rows = [] if args.fresh else load_rows(path)
    md = ""
    todo = [(name, build) for name, build in (zoo or MODELS).items()
            if not (args.only and not any(w in name for w in args.only))
            and not (args.resume and any(r["model"] == name and "error" not in r for r in rows))]
    with Progress("models", total=len(todo)) as bar:  # on stderr, when it is a terminal
        for name, build in todo:
            bar.note(name)
            bar.write(f"== {name}")
            row = run(name, build, args.size, args.device, latency)
            bar.write(json.dumps(row))
            rows = merge(rows, row)
            md = save(path, rows)
            bar.step()
    print(md)
    return path


if __name__ == "__main__":
    main()
