"""attnopt.calibrate on the trained recall model (benchmarks/recall_model.py), one sparse method at
a time, under one model-output budget: the plan's block sparsity and the logits rel-L1 of the
compiled model on batches calibration never saw. CPU, a few minutes.

    python benchmarks/calibration_recall.py    # writes benchmarks/results/calibration_recall_cpu.json
"""

from __future__ import annotations

import json
import os
import sys
import time

import attnopt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from recall_model import load_recall_model, recall_batches  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "calibration_recall_cpu.json")


def plan_sparsity(plan, report) -> float:
    """Mean planned block sparsity over every rewritten site's heads (dense heads 0)."""
    heads = []
    for site in report.sites:
        entry = plan.sites.get(site.key, {})
        sp = (entry.get("stats") or {}).get("sparsity")
        dense = set((entry.get("sparsity") or {}).get("dense_heads", []))
        n = site.details.get("q_heads", len(sp or [])) or 1
        heads += [0.0 if sp is None or entry.get("dense") or entry.get("original") or i in dense else sp[i]
                  for i in range(n)]
    return sum(heads) / max(len(heads), 1)


def main(n: int = 1024, budget: float = 0.05) -> None:
    model = load_recall_model().eval()  # float32: allow_fp32 lets attnopt rewrite its sites
    rows = []
    for method in ("window", "sparge", "xattention"):
        opts = {"attention": {"min_seq_len": 0, "allow_fp32": True, "sparsity": {"method": method}}}
        t0 = time.perf_counter()
        plan = attnopt.calibrate(model, recall_batches(3, n, seed=0), options=opts,
                                 budget={"model_rel_l1": budget}, holdout=recall_batches(1, n, seed=5)[0],
                                 cache_dir=False)
        seconds = time.perf_counter() - t0
        errs, sparsity = [], None
        for seed in (9, 10):
            report = attnopt.inspect(model, *recall_batches(1, n, seed=seed)[0], options={**opts, "plan": plan.to_dict()})
            errs.append(report.summary["e2e"]["rel_l1"])
            sparsity = plan_sparsity(plan, report)
        rows.append({"method": method, "seq": n, "budget": budget, "plan_sparsity": sparsity,
                     "calibration_upper": plan.meta["model_error"]["upper"],
                     "holdout": plan.meta["model_error"].get("holdout"), "new_batches_rel_l1": errs,
                     "calibrate_s": round(seconds, 1)})
        print(json.dumps(rows[-1]), flush=True)
    with open(OUT, "w") as f:
        json.dump({"env": {"device": "cpu"}, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
