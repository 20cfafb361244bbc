"""AWQ scales against plain round-to-nearest for w4a16 linears, on the bundled demo model (random
weights, bf16), as it is and with planted outlier channels (eight RMSNorm gains x20, as trained
LLMs' norms have): each linear's own rel-L1 on a held-out batch's rows, and the compiled model's
logits rel-L1 against the unquantized model on that batch. CPU, about a minute.

    python benchmarks/awq.py    # writes benchmarks/results/awq_cpu.json
"""

from __future__ import annotations

import json
import os

import torch

import attnopt
from attnopt.calibration.awq import w4a16_output
from attnopt.demo_model import build

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "awq_cpu.json")
OPTS = {"linear": {"quant": "w4a16"}, "attention": {"enabled": False}, "on_cpu": "emulate"}


def _rel_l1(y, ref) -> float:
    return float((y.detach().double() - ref.double()).abs().sum() / ref.double().abs().sum())


def _linear_inputs(model, ids) -> dict:
    """module path -> the rows its Linear read on this batch (eager forward hooks)."""
    rows, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            hooks.append(m.register_forward_hook(
                lambda mod, args, out, name=name: rows.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return rows


def _compiled_logits(model, ids, plan=None):
    torch._dynamo.reset()
    opts = dict(OPTS, plan=plan.to_dict()) if plan is not None else OPTS
    with torch.no_grad():
        return torch.compile(model, backend="attnopt", options=opts)(ids)


def measure(planted: bool) -> dict:
    model, (ids,) = build("tiny", seed=0)
    held = torch.randint(0, model.cfg.vocab, ids.shape, generator=torch.Generator().manual_seed(1))
    if planted:
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, m in model.named_modules():
                if name.endswith("norm") and hasattr(m, "weight"):
                    m.weight[torch.randperm(m.weight.shape[0], generator=g)[:8]] *= 20
    plan = attnopt.calibrate(model, [(ids,)], options=OPTS, awq=True, cache_dir=False)
    rows = _linear_inputs(model, held)
    per_linear = {}
    for name, x in rows.items():
        w = dict(model.named_modules())[name].weight
        entry = plan.sites[name]["awq"]
        ref = x.double() @ w.double().T
        s = torch.tensor(entry["scales"], dtype=torch.float64)
        per_linear[name] = {"alpha": entry["alpha"], "rtn": _rel_l1(w4a16_output(x, w, None), ref),
                            "awq": _rel_l1(w4a16_output(x, w, s), ref), "calibration_rows": entry["rel_l1"]}
    with torch.no_grad():
        ref = model(held)
    logits = {"rtn": _rel_l1(_compiled_logits(model, held), ref),
              "awq": _rel_l1(_compiled_logits(model, held, plan), ref)}
    return {"per_linear_heldout_rel_l1": per_linear, "logits_heldout_rel_l1": logits,
            "sites_sharing_scales": sum(1 for v in plan.meta["awq"]["sites"].values() if len(v["searched_with"]) > 1)}


def main() -> None:
    out = {"model": "attnopt demo tiny (bf16, 4 layers, dim 256), calibrated on 1 batch, measured on another"}
    for case, planted in (("as_is", False), ("planted_outlier_norm_gains", True)):
        r = out[case] = measure(planted)
        ratio = [v["awq"] / v["rtn"] for v in r["per_linear_heldout_rel_l1"].values()]
        print(f"{case}: logits rel-L1 rtn {r['logits_heldout_rel_l1']['rtn']:.4f} awq "
              f"{r['logits_heldout_rel_l1']['awq']:.4f}; per-linear held-out awq/rtn min {min(ratio):.3f} "
              f"mean {sum(ratio) / len(ratio):.3f} max {max(ratio):.3f}", flush=True)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
