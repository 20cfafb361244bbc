"""Gradient error of attnopt's differentiable attention (`attnopt::attention_train`, CPU reference)
against float64 autograd of plain softmax attention: dQ, dK, dV rel-L1 and cosine per backward
mode ("int8": SageBwd arithmetic; "exact": 16-bit, straight-through), for the default INT8 Q.K /
16-bit P.V forward over the test grid (N, head dim, dtype, causal, GQA), and for the FP8 and
NVFP4 forwards on a subset. Inputs: standard normal Q, V, dO; K with a per-channel offset drawn
from N(0, 1) (what K smoothing is for). CPU, about two minutes.

    python benchmarks/attention_backward_accuracy.py   # writes benchmarks/results/attention_backward_accuracy_cpu.json
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import time

import torch

from attnopt.ops.attention_train import BACKWARD_MODES  # (importing it registers the ops)
from attnopt.ops.attention_ref import attention_exact

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write  # noqa: E402

FORWARDS = {"int8/fp16": ("int8", "fp16"), "fp8/fp8": ("fp8", "fp8"), "fp4/fp4": ("fp4", "fp4")}


def _metrics(got, want) -> dict:
    out = {}
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        g, w = g.double(), w.double()
        out[f"{name}_rel_l1"] = round(((g - w).abs().sum() / w.abs().sum()).item(), 5)
        out[f"{name}_cos"] = round(torch.nn.functional.cosine_similarity(g.flatten(), w.flatten(), dim=0).item(), 6)
    return out


def measure(n, d, dtype, causal, gqa, forwards, seed) -> list[dict]:
    torch.manual_seed(seed)
    hq, hkv = (4, 1) if gqa else (2, 2)
    nk = n + 19 if causal and gqa else n  # causal with Nq < Nk (bottom-right aligned) where GQA
    offset = nk - n if causal else 0
    q = torch.randn(1, hq, n, d).to(dtype)
    k = (torch.randn(1, hkv, nk, d) + torch.randn(d)).to(dtype)
    v = torch.randn(1, hkv, nk, d).to(dtype)
    do = torch.randn(1, hq, n, d).to(dtype)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    attention_exact(*leaves, is_causal=causal, causal_offset=offset).backward(do.double())
    want = [t.grad for t in leaves]
    rows = []
    for fwd in forwards:
        quant, pv = FORWARDS[fwd]
        for mode in BACKWARD_MODES:
            xs = [t.clone().requires_grad_() for t in (q, k, v)]
            out, _ = torch.ops.attnopt.attention_train(*xs, None, None, -math.inf, causal, offset, d ** -0.5, quant,
                                                       pv, True, False, "cpu", "reference", 0.0, mode)
            out.backward(do)
            rows.append({"forward": fwd, "backward": mode, "dtype": str(dtype)[6:], "head_dim": d, "n_q": n,
                         "n_k": nk, "causal": causal, "gqa": f"{hq}:{hkv}", **_metrics([t.grad for t in xs], want)})
    return rows


def main() -> None:
    t0 = time.time()
    rows = []
    seed = 0
    for n, d, dtype, causal, gqa in itertools.product((77, 256, 1024), (64, 128), (torch.float16, torch.bfloat16),
                                                      (False, True), (False, True)):
        subset = n >= 256 and d == 128 and not gqa  # the FP8 / NVFP4 forwards on a subset
        forwards = list(FORWARDS) if subset else ["int8/fp16"]
        seed += 1
        for r in measure(n, d, dtype, causal, gqa, forwards, seed):
            rows.append(r)
            worst = max(r["dq_rel_l1"], r["dk_rel_l1"], r["dv_rel_l1"])
            print(f"{r['forward']:9s} {r['backward']:5s} {r['dtype']:8s} d{d:<3d} N{n:<4d} causal={int(causal)} "
                  f"gqa={r['gqa']}  dq {r['dq_rel_l1']:.4f} dk {r['dk_rel_l1']:.4f} dv {r['dv_rel_l1']:.4f} "
                  f"(worst {worst:.4f}, min cos {min(r['dq_cos'], r['dk_cos'], r['dv_cos']):.5f})", flush=True)
    summary = {}
    for r in rows:
        key = f"{r['forward']} {r['backward']}"
        s = summary.setdefault(key, {"rows": 0, "max_rel_l1": 0.0, "min_cos": 1.0})
        s["rows"] += 1
        s["max_rel_l1"] = max(s["max_rel_l1"], r["dq_rel_l1"], r["dk_rel_l1"], r["dv_rel_l1"])
        s["min_cos"] = min(s["min_cos"], r["dq_cos"], r["dk_cos"], r["dv_cos"])
    path = write("attention_backward_accuracy_cpu.json", rows,
                 {"summary": summary, "seconds": round(time.time() - t0, 1),
                  "reference": "float64 autograd of softmax attention (attention_ref.attention_exact)"})
    for key, s in summary.items():
        print(f"{key:16s} rows {s['rows']:3d}  max rel-L1 {s['max_rel_l1']:.4f}  min cosine {s['min_cos']:.5f}")
    print("wrote", path)


if __name__ == "__main__":
    main()
