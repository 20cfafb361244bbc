"""Sparse predictors on trained attention (CPU): the recall model of benchmarks/recall_model.py
at 1K / 2K / 4K tokens.

1. Calibration: for window (the static pattern to beat), sparge and xattention, `attnopt.calibrate`
   on two batches under a few per-site budgets; the compiled model with that plan is run on two
   held-out batches: logits rel-L1 against the uncompiled model, and the plan's block sparsity
   (the mean over sites and heads, dense heads counting 0).
2. Diagnosis, per site and head, on a held-out batch: the share of the causally visible blocks
   each of sparge's rules forces (rough K columns, rough Q rows, sink, diagonal); for query rows
   (a sharp peak on one token far back), how often each predictor keeps the recalled pair's
   block, against its sparsity; the attention mass each predictor's blocks capture, against the
   truly heaviest blocks of the same count and a window of the same count.

    python benchmarks/sparse_predictors.py                  # everything (hours on 2 busy cores)
    python benchmarks/sparse_predictors.py --seqs 1024 --skip-calibration
    python benchmarks/sparse_predictors.py --seqs 4096 --batches 1 --budgets 0.05 \
        --methods window sparge:theta-off:local --skip-diagnosis --out x.json

Methods: window, sparge, xattention; `:theta-off` (sparge: -1 added to calibration's theta grid)
and `:local` (local_keys 64) variants. Writes benchmarks/results/sparse_predictors_cpu.json (after
every row). The shipped file merges such runs: 1K on 2 batches with budgets 0.03 / 0.05 / 0.08,
2K and 4K on 1 batch with 0.05 (and window at more budgets, to compare at equal error).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import recall_model  # noqa: E402

import attnopt  # noqa: E402
from attnopt.ops import sparse_ref as R  # noqa: E402

THETAS = (0.1, 0.3, 0.5)


@contextlib.contextmanager
def captured_attention():
    """Every F.scaled_dot_product_attention call's (q, k, v) while inside, in call order."""
    calls = []
    orig = F.scaled_dot_product_attention

    def grab(q, k, v, *args, **kwargs):
        calls.append((q.detach().clone(), k.detach().clone(), v.detach().clone()))
        return orig(q, k, v, *args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = grab
    try:
        yield calls
    finally:
        torch.nn.functional.scaled_dot_product_attention = orig


def exact_probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax(q k^T * scale) in float64 for one head: [N, N]."""
    s = (q.double() @ k.double().T) * scale
    n = s.shape[0]
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
    return torch.softmax(s, -1)


def sparge_forced(q, k, theta: float, valid: torch.Tensor, diag: torch.Tensor) -> dict:
    """Shares of the valid blocks forced by each of sparge's rules for one head ([1, 1, N, D] inputs)."""
    qsim, ksim = R.sparge_similarities(q, k)
    kr = (ksim[0, 0] < theta)[None, :] & valid
    qr = (qsim[0, 0] < theta)[:, None] & valid
    sink = torch.zeros_like(valid)
    sink[:, 0] = valid[:, 0]
    dg = diag & valid
    tot = valid.sum().item()
    share = {name: m.sum().item() / tot for name, m in (("rough_k", kr), ("rough_q", qr), ("sink", sink),
                                                          ("diagonal", dg))}
    share["any"] = (kr | qr | sink | dg).sum().item() / tot
    share["k_rough_blocks"] = (ksim[0, 0] < theta).float().mean().item()
    share["q_rough_blocks"] = (qsim[0, 0] < theta).float().mean().item()
    return share


def diagnose(sites, seq: int) -> list[dict]:
    """Per site and head: the share of the causally visible blocks each of sparge's rules forces,
    per theta of calibration's grid, and the median block self-similarities."""
    rows = []
    valid = R.causal_blocks(seq, seq, 0, "cpu")
    diag = R.diagonal_blocks(seq, seq, 0, "cpu")
    for layer, (q, k, _) in enumerate(sites):
        for h in range(q.shape[1]):
            qh, kh = q[:, h:h + 1], k[:, h:h + 1]
            qsim, ksim = R.sparge_similarities(qh, kh)
            rows.append({"seq": seq, "layer": layer, "head": h, "q_sim_median": qsim.median().item(),
                         "k_sim_median": ksim.median().item(),
                         "sparge_forced": {str(t): sparge_forced(qh, kh, t, valid, diag) for t in THETAS}})
    return rows


def query_targets(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(query rows, the position of the pair each one recalls) of a [1, N] recall sequence."""
    parts = recall_model._token_parts()[tokens[0]]
    rows = (parts[:, 0] == 2).nonzero().flatten()
    pairs = (parts[:, 0] == 1).nonzero().flatten()
    key_at = {int(parts[j, 2]): int(j) for j in pairs}
    return rows, torch.tensor([key_at[int(parts[i, 2])] for i in rows])


def peak_hits(sites, tokens, scale: float, seq: int) -> list[dict]:
    """Per site, head and predictor setting: block sparsity, and the share of query rows whose
    recalled pair's kv-block the mask keeps (a sharp long-range peak: does the predictor see it?),
    beside how much attention those rows give that pair."""
    from attnopt.ops.sparse import block_sparsity

    rows, cols = query_targets(tokens)
    out = []
    settings = [("sparge", {"theta": th, "tau": t}) for th in (-1.0, 0.1) for t in (0.3, 0.6, 0.9)]
    settings += [("xattention", {"stride": st, "tau": t}) for st in (8, 4) for t in (0.3, 0.6, 0.9)]
    settings += [("window", {"window": int(f * seq)}) for f in (0.125, 0.25, 0.5)]
    for layer, (q, k, v) in enumerate(sites):
        mass = torch.stack([exact_probs(q[0, h], k[0, h], scale)[rows, cols] for h in range(q.shape[1])])
        for method, prm in settings:
            if method == "sparge":
                keep = R.predict_sparge(q, k, scale, prm["tau"], prm["theta"], is_causal=True)
            elif method == "xattention":
                keep = R.predict_xattention(q, k, scale, prm["stride"], prm["tau"], is_causal=True)
            else:
                keep = R.window_mask(q.shape[1], seq, seq, {"window": prm["window"], "sinks": 64}, True, 0,
                                     "cpu")[None]
            hit = keep[0][:, rows // R.BQ, cols // R.BK].float()  # [H, queries]
            for h in range(q.shape[1]):
                out.append({"seq": seq, "layer": layer, "head": h, "method": method, **prm,
                            "sparsity": block_sparsity(keep[:, h:h + 1], seq, seq, True, 0),
                            "query_pair_kept": hit[h].mean().item(),
                            "query_pair_attention": mass[h].mean().item()})
    return out


def window_like(n_blocks: int, seq: int) -> torch.Tensor:
    """The causal window (64 sink tokens) keeping the fewest blocks at least n_blocks: [nqb, nkb]."""
    lo, hi = 1, seq
    while lo < hi:
        mid = (lo + hi) // 2
        if R.window_mask(1, seq, seq, {"window": mid, "sinks": 64}, True, 0, "cpu")[0].sum().item() >= n_blocks:
            hi = mid
        else:
            lo = mid + 1
    return R.window_mask(1, seq, seq, {"window": lo, "sinks": 64}, True, 0, "cpu")[0]


def mass_capture(sites, scale: float, seq: int, tau: float = 0.6) -> list[dict]:
    """Per site and head, at sparge (theta -1, the similarity rule off) / xattention (stride 8)
    with `tau`, and a window of the same block count: the share of blocks kept, and the attention
    mass captured (mean over rows, and the worst row), beside the best possible blocks: per
    q-block, the same number of blocks ranked by their true mass (the pooled-score quality)."""
    out = []
    valid = R.causal_blocks(seq, seq, 0, "cpu")
    for layer, (q, k, _) in enumerate(sites):
        masks = {"sparge": R.predict_sparge(q, k, scale, tau, -1.0, is_causal=True),
                 "xattention": R.predict_xattention(q, k, scale, 8, tau, True)}
        for h in range(q.shape[1]):
            p = exact_probs(q[0, h], k[0, h], scale)
            bm = F.pad(p, (0, 0, 0, -seq % R.BQ)).reshape(-1, R.BQ, seq).sum(1)  # [nqb, N]
            bm = F.pad(bm, (0, -seq % R.BK)).reshape(bm.shape[0], -1, R.BK).sum(-1)  # true q-block mass
            for name, keep in masks.items():
                kh = keep[0, h] & valid
                n_keep = kh.sum(-1)
                rank = bm.masked_fill(~valid, -1).argsort(-1, descending=True).argsort(-1)
                best = (rank < n_keep[:, None]) & valid
                win = window_like(kh.sum().item(), seq)
                row = {"seq": seq, "layer": layer, "head": h, "method": name, "tau": tau,
                       "kept": kh.sum().item() / valid.sum().item()}
                for label, m in (("predictor", kh), ("true_top_blocks", best), ("window", win & valid)):
                    cap = (p * R.expand_block_mask(m[None, None], seq, seq)[0, 0]).sum(-1)
                    row[label] = {"kept": m.sum().item() / valid.sum().item(), "mass_mean": cap.mean().item(),
                                  "mass_min": cap.min().item()}
                out.append(row)
    return out


def mean_sparsity(plan) -> float:
    """The plan's block sparsity averaged over attention sites and heads (dense heads: 0)."""
    vals = []
    for entry in plan.sites.values():
        if entry.get("kind") != "attention":
            continue
        sp = entry["stats"]["sparsity"]
        dense = set((entry.get("sparsity") or {}).get("dense_heads") or ()) if not entry.get("dense") else set(
            range(len(sp)))
        vals += [0.0 if h in dense else s for h, s in enumerate(sp)]
    return sum(vals) / max(len(vals), 1)


def held_out(n: int, seq: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n (tokens, targets) pairs of the recall task."""
    g = torch.Generator().manual_seed(seed)
    return [recall_model.make_batch(1, seq, g) for _ in range(n)]


def run_plan(model, opts: dict, plan, batches) -> tuple[float, float]:
    """(logits rel-L1 against the uncompiled model, recall accuracy) of the model compiled with
    `plan`, over (tokens, targets) batches."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="attnopt", options={**opts, "plan": plan} if plan is not None else opts)
    num = den = 0.0
    hit = tot = 0
    with torch.no_grad():
        for tokens, targets in batches:
            ref = model(tokens).double()
            out = compiled(tokens).double()
            num += (out - ref).abs().sum().item()
            den += ref.abs().sum().item()
            sel = targets >= recall_model.FILLERS
            hit += int((out.argmax(-1)[sel] == targets[sel]).sum())
            tot += int(sel.sum())
    torch._dynamo.reset()
    return num / den, hit / max(tot, 1)


@contextlib.contextmanager
def theta_grid(thetas):
    """Calibration's sparge theta grid replaced while inside (None: as it is)."""
    from attnopt.calibration import site_search

    old = site_search.THETAS
    site_search.THETAS = old if thetas is None else tuple(thetas)
    try:
        yield
    finally:
        site_search.THETAS = old


def calibrate_row(model, spec: str, budget: float, seq: int, calib, held) -> dict:
    """spec: a method name, then optionally `:theta-off` (sparge: calibration's theta grid with -1
    added, the self-similarity rule off where a head is sparser so) and/or `:local` (local_keys
    64: the block before each q-block kept), e.g. sparge:theta-off:local."""
    method, *variants = spec.split(":")
    variant = "theta-off" if "theta-off" in variants else ""
    sp = {"method": method, **({"local_keys": 64} if "local" in variants else {})}
    opts = {"attention": {"min_seq_len": 0, "allow_fp32": True, "sparsity": sp}}
    t0 = time.time()
    with theta_grid((-1.0,) + THETAS if variant == "theta-off" else None):
        plan = attnopt.calibrate(model, calib, options=opts, budget={"rel_l1": budget}, second_stage=False)
    t1 = time.time()
    err, acc = run_plan(model, opts, plan, held)
    return {"seq": seq, "method": spec, "budget_rel_l1": budget,
            "sparsity": mean_sparsity(plan), "logits_rel_l1": err, "recall_accuracy": acc, "calibrate_s": t1 - t0,
            "sites": {k: {"sparsity": v["stats"]["sparsity"], "dense": v.get("dense", False),
                          "params": {kk: vv for kk, vv in (v.get("sparsity") or {}).items()
                                     if kk in ("tau", "theta", "topk", "window", "dense_heads")}}
                      for k, v in plan.sites.items() if v.get("kind") == "attention"}}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.03, 0.05, 0.08])
    ap.add_argument("--methods", nargs="+", default=["window", "sparge", "sparge:theta-off", "sparge:theta-off:local",
                                                     "xattention", "xattention:local"])
    ap.add_argument("--weights", default=recall_model.WEIGHTS)
    ap.add_argument("--batches", type=int, default=2, help="calibration batches (and as many held out)")
    ap.add_argument("--skip-calibration", action="store_true")
    ap.add_argument("--skip-diagnosis", action="store_true")
    ap.add_argument("--out", default="sparse_predictors_cpu.json")
    ap.add_argument("--out-dir", default=common.RESULTS)
    return ap.parse_args(argv)


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    model = recall_model.load_recall_model(args.weights)
    rows, diag_rows, peak_rows, mass_rows = [], [], [], []
    extra = {"what": __doc__.splitlines()[0]}

    def save():
        common.write(args.out, rows, {**extra, "diagnosis": diag_rows, "peaks": peak_rows,
                                              "mass": mass_rows}, args.out_dir)

    for seq in args.seqs:
        calib = recall_model.recall_batches(args.batches, seq, seed=100 + seq)
        held = held_out(args.batches, seq, seed=200 + seq)
        err, acc = run_plan(model, {"attention": {"min_seq_len": 0, "allow_fp32": True}}, None, held)
        rows.append({"seq": seq, "method": "dense int8", "sparsity": 0.0, "logits_rel_l1": err,
                     "recall_accuracy": acc, "task_accuracy_fp32": recall_model.accuracy(model, seq, n=2)})
        print(rows[-1], flush=True)
        save()
        if not args.skip_diagnosis:
            with captured_attention() as sites, torch.no_grad():
                model(held[0][0])
            scale = 1 / math.sqrt(sites[0][0].shape[-1])
            diag_rows += diagnose(sites, seq)
            peak_rows += peak_hits(sites, held[0][0], scale, seq)
            mass_rows += mass_capture(sites, scale, seq)
            save()
        if args.skip_calibration:
            continue
        for method in args.methods:
            for b in args.budgets:
                rows.append(calibrate_row(model, method, b, seq, calib, held))
                print({k: v for k, v in rows[-1].items() if k != "sites"}, flush=True)
                save()
    print("wrote", save() or os.path.join(args.out_dir, args.out))


if __name__ == "__main__":
    main()
