"""One attention site's search: per head, the sparsest parameters of a sparse method whose rel-L1
(against float64 dense attention, on the captured inputs) stays under a target.

A head that cannot meet it, or gains under 10% (blocks skipped, and tiles the second stage
skips), stays dense.
"""

from __future__ import annotations

import torch

from ..config import SparsityOptions
from ..ops import sparse_ref as R
from ..ops.attention_ref import attention_exact
from ..ops.sparse import PERMUTED_METHODS, block_sparsity, predict_block_mask, pv_thresholds

MIN_GAIN = 0.1  # heads sparser than this are not worth a sparse kernel (SpargeAttn's rule)
# Sparge's self-similarity thresholds, searched per head; -1 turns the rule off (no block is
# "rough"): token-driven keys are never self-similar, and the rule would keep every block
# (docs/algorithms.md, "Why the predictors found little sparsity on trained attention"). Last, so
# a tie keeps the rule on.
THETAS = (0.1, 0.3, 0.5, -1.0)
# second-stage lambda range (log2 units): at 2 a skipped tile's entries are all under 1/4 of the
# running max; at 24 under 2^-24 (nothing skipped matters)
LAMBDA_RANGE = (2.0, 24.0)


def _per_head_rel_l1(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """[B, H, N, D] -> rel-L1 per head [H] (sums over batch, tokens and channels)."""
    o, r = out.double(), ref.double()
    return (o - r).abs().sum(dim=(0, 2, 3)), r.abs().sum(dim=(0, 2, 3))


def row_chunks(nq: int, max_rows: int, block: int = 128) -> list[tuple[int, int]]:
    """The query rows a search measures: all of them up to `max_rows`, else evenly spaced whole
    128-row blocks (the first and last included) adding up to about `max_rows` (SpargeAttn's tuner
    samples query rows the same way: exact attention on every row is what costs memory)."""
    if nq <= max_rows:
        return [(0, nq)]
    nqb = -(-nq // block)
    want = max(2, max_rows // block)
    picks = sorted({round(i * (nqb - 1) / (want - 1)) for i in range(want)})
    return [(b * block, min(nq, (b + 1) * block)) for b in picks]


def _rows(c: dict, r0: int, r1: int) -> dict:
    """The call restricted to query rows [r0, r1): masks sliced where they have a row axis, the
    causal offset moved so each row sees the keys it saw."""
    nq = c["q"].shape[2]

    def cut(t):
        return t[..., r0:r1, :] if t is not None and t.dim() >= 2 and t.shape[-2] == nq else t

    return {**c, "q": c["q"][:, :, r0:r1], "attn_bias": cut(c["attn_bias"]), "keep_mask": cut(c["keep_mask"]),
            "causal_offset": int(c["causal_offset"]) + r0}


class SiteSearch:
    """One site's captured inputs, and its error / sparsity under candidate parameters.
    Errors are measured on `row_chunks` of each call's queries (all rows up to `max_rows`)."""

    def __init__(self, key: str, calls: list[dict], quant: str, pv: str, smooth_k: bool, arch: str,
                 max_rows: int = 2048):
        self.key, self.calls = key, calls
        self.quant, self.pv, self.smooth_k, self.arch = quant, pv, smooth_k, arch
        self.heads = calls[0]["q"].shape[1]
        self.chunks = [row_chunks(c["q"].shape[2], max_rows) for c in calls]
        self.refs = [[_exact(_rows(c, r0, r1)) for r0, r1 in chunks] for c, chunks in zip(calls, self.chunks)]
        self._centroids = None  # svg2's clustering of each call (ops/svg2.CentroidState), made once

    def _outputs(self, c: dict, chunks, keep: torch.Tensor, quant: str, pv: str, lam):
        """The rewritten site's output on each chunk of rows, blocks chosen on the whole call."""
        for r0, r1 in chunks:
            yield _run(_rows(c, r0, r1), keep[:, :, r0 // 128:-(-r1 // 128)], quant, pv, self.smooth_k, self.arch, lam)

    def _sparse(self, i: int, c: dict, chunks, params: dict, quant: str, pv: str):
        """(outputs on each chunk, the block mask the sparsity is counted on) of call i."""
        if params["method"] in PERMUTED_METHODS:
            lay = self._layout(i, c, params)
            return self._permuted_outputs(c, chunks, lay, quant, pv), lay.keep
        keep = self._keep(c, params)
        return self._outputs(c, chunks, keep, quant, pv, pv_thresholds(params, self.heads, c["q"].device)), keep

    def _layout(self, i: int, c: dict, params: dict):
        """svg2's layout of call i. k-means runs once per call and cluster counts (its cold start
        is deterministic, so it is the clustering a fresh run finds): later candidates reuse its
        centroids as they are (warm_iters 0) and only the pair selection changes."""
        from ..ops import svg2

        if self._centroids is None:
            self._centroids = svg2.CentroidState()
        return svg2.predict_layout(c["q"], c["k"], {**params, "warm_iters": 0}, c["scale"], self._centroids, str(i))

    def _permuted_outputs(self, c: dict, chunks, lay, quant: str, pv: str):
        """svg2's output on each chunk of rows, in the original order: quantized attention where
        the (query, key) pair lies in a kept block of the permuted layout. (The kernel quantizes
        Q and K in blocks of the permuted order; this reference, in blocks of the original one.)"""
        from ..ops.attention_ref import attention_reference

        nkb = lay.keep.shape[-1]
        g = self.heads // c["k"].shape[1]
        block_q = lay.perm_q.argsort(dim=-1) // R.BQ  # [B, H, Nq] each row's permuted q-block
        block_k = (lay.perm_k.argsort(dim=-1) // R.BK).repeat_interleave(g, 1)  # [B, H, Nk]
        for r0, r1 in chunks:
            sub = _rows(c, r0, r1)
            rows = lay.keep.gather(2, block_q[:, :, r0:r1, None].expand(-1, -1, -1, nkb))
            kept = rows.gather(3, block_k[:, :, None, :].expand(-1, -1, r1 - r0, -1))
            bias = 0.0 if sub["attn_bias"] is None else sub["attn_bias"].float()
            bias = torch.where(kept, bias, torch.full((), float("-inf"), device=kept.device))
            yield attention_reference(sub["q"], sub["k"], sub["v"], bias, sub["keep_mask"], sub["masked_value"],
                                      False, 0, sub["scale"], quant, pv, self.smooth_k, False,
                                      softcap=sub.get("softcap", 0.0))

    def evaluate(self, params: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(rel-L1 [H], block sparsity [H]) of the rewritten site under `params`."""
        num = den = 0
        sparsity = torch.zeros(self.heads, dtype=torch.float64)
        for i, (c, chunks, refs) in enumerate(zip(self.calls, self.chunks, self.refs)):
            outs, keep = self._sparse(i, c, chunks, params, self.quant, self.pv)
            for out, ref in zip(outs, refs):
                n, d = _per_head_rel_l1(out, ref)
                num, den = num + n, den + d
            nq, nk = c["q"].shape[2], c["k"].shape[2]
            for h in range(self.heads):
                sparsity[h] += block_sparsity(keep[:, h:h + 1], nq, nk, c["is_causal"], c["causal_offset"])
        return (num / den.clamp_min(1e-30)).float(), (sparsity / len(self.calls)).float()

    def _keep(self, c: dict, params: dict) -> torch.Tensor:
        use_triton = c["q"].device.type == "cuda" and self.arch != "cpu"
        return predict_block_mask(c["q"], c["k"], c["v"], params, c["scale"], c["is_causal"], c["causal_offset"],
                                  use_triton)

    def site_error(self, choice: dict, site: dict) -> float:
        """The site's rel-L1 (all heads) on its worst call under an attention choice
        (evaluate.attention_output's: dense through the op itself, sparse with its blocks chosen on
        the whole call); `site`: the compiled site's fixed settings."""
        from .evaluate import attention_output

        worst = 0.0
        params = choice.get("sparsity")
        for i, (c, chunks, refs) in enumerate(zip(self.calls, self.chunks, self.refs)):
            if params is None:
                outs = (attention_output(_rows(c, r0, r1), choice, site) for r0, r1 in chunks)
            else:
                outs = self._sparse(i, c, chunks, params, choice["quant"], choice["pv"])[0]
            num = den = 0.0
            for out, ref in zip(outs, refs):
                n, d = _per_head_rel_l1(out, ref)
                num, den = num + float(n.sum()), den + float(d.sum())
            worst = max(worst, num / max(den, 1e-30))
        return worst

    def skipped_share(self, params: dict) -> list[float]:
        """Per head, the share of visited tiles the second stage skips under `params` (measured
        with the reference, which counts them; the kernel does not)."""
        visited, skipped = [0] * self.heads, [0] * self.heads
        for c, chunks in zip(self.calls, self.chunks):
            keep = predict_block_mask(c["q"], c["k"], c["v"], params, c["scale"], c["is_causal"], c["causal_offset"],
                                      False)
            lam = pv_thresholds(params, self.heads, c["q"].device)
            for r0, r1 in chunks:
                sub, stats = _rows(c, r0, r1), {}
                R.sparse_attention_reference(sub["q"], sub["k"], sub["v"], keep[:, :, r0 // 128:-(-r1 // 128)],
                                             sub["attn_bias"], sub["keep_mask"], sub["masked_value"],
                                             sub["is_causal"], sub["causal_offset"], sub["scale"], self.quant,
                                             self.pv, self.smooth_k, pv_threshold=lam, stats=stats,
                                             softcap=sub.get("softcap", 0.0))
                visited = [a + b for a, b in zip(visited, stats["visited"])]
                skipped = [a + b for a, b in zip(skipped, stats["skipped"])]
        return [s / max(v, 1) for s, v in zip(skipped, visited)]


def _exact(c: dict) -> torch.Tensor:
    return attention_exact(c["q"], c["k"], c["v"], c["attn_bias"], c["keep_mask"], c["masked_value"],
                           c["is_causal"], c["causal_offset"], c["scale"], softcap=c.get("softcap", 0.0))


def _run(c: dict, keep, quant, pv, smooth_k, arch, lam_t):
    if c["q"].device.type == "cuda" and arch != "cpu":
        from ..codegen.attention.launch import attention_triton

        lut, counts = R.block_mask_to_lut(keep, c["q"].shape[2], c["k"].shape[2], c["is_causal"], c["causal_offset"])
        return attention_triton(c["q"], c["k"], c["v"], c["attn_bias"], c["keep_mask"], c["masked_value"],
                                c["is_causal"], c["causal_offset"], c["scale"], quant, pv, smooth_k, False, arch,
                                lut=lut, counts=counts, pv_threshold=lam_t, softcap=c.get("softcap", 0.0))
    return R.sparse_attention_reference(c["q"], c["k"], c["v"], keep, c["attn_bias"], c["keep_mask"],
                                        c["masked_value"], c["is_causal"], c["causal_offset"], c["scale"], quant, pv,
                                        smooth_k, pv_threshold=lam_t, softcap=c.get("softcap", 0.0))


def _bisect(search: SiteSearch, make, lo: float, hi: float, target: float, steps: int = 7):
    """Per head, the smallest x in [lo, hi] with error <= target (x larger = denser).
    Returns (x [H], ok [H], error [H], sparsity [H])."""
    h = search.heads
    lo_t, hi_t = torch.full((h,), lo), torch.full((h,), hi)
    err_hi, sp_hi = search.evaluate(make(hi_t))
    ok = err_hi <= target
    for _ in range(steps):
        mid = (lo_t + hi_t) / 2
        err, sp = search.evaluate(make(mid))
        good = err <= target
        hi_t = torch.where(good & ok, mid, hi_t)
        lo_t = torch.where(good & ok, lo_t, mid)
        err_hi = torch.where(good & ok, err, err_hi)
        sp_hi = torch.where(good & ok, sp, sp_hi)
    return hi_t, ok, err_hi, sp_hi


def search_site(search: SiteSearch, sp: SparsityOptions, target: float, second_stage: bool = True) -> dict:
    """The calibrated plan entry of one site for method sp.method: per head, the sparsest
    parameters under the budget: for Sparge a grid over theta, the sparsest tau or topk, then the
    smallest second-stage lambda keeping the error there (docs/algorithms.md#sparse-attention-search)."""
    method = sp.method
    base = sp.to_dict()  # the configured parameters, plain (lists), "method" included
    h = search.heads
    staged = method in ("sparge", "xattention")
    if staged and second_stage:
        base["pv_threshold"] = None  # blocks first, on their own; lambda spends what budget is left
    stats = {}
    if method == "sparge":
        params, ok = _search_sparge(search, base, target)
    elif method == "xattention":
        x, ok, _, _ = _bisect(search, lambda t: {**base, "tau": t.tolist()}, 0.05, 1.0, target)
        params = {**base, "tau": x.tolist()}
    elif method == "svg2" and any(bool(c["is_causal"]) for c in search.calls):
        return {"kind": "attention", "dense": True, "error": {"rel_l1": [0.0] * h},
                "stats": {"sparsity": [0.0] * h, "note": "svg2 has no causal form"}}
    elif method == "svg2":  # the centroid mass each query cluster keeps, per head
        x, ok, _, _ = _bisect(search, lambda t: {**base, "top_p": t.tolist()}, 0.05, 1.0, target)
        params = {**base, "top_p": x.tolist()}
    elif method == "vsa":  # the share of key tiles each query tile keeps, per head
        x, ok, _, _ = _bisect(search, lambda t: {**base, "topk": t.tolist()}, 0.05, 1.0, target)
        params = {**base, "topk": x.tolist()}
    elif method == "window":
        n = max(c["k"].shape[2] for c in search.calls)
        # window as a fraction of the key length: smallest that meets the budget
        x, ok, err, spars = _bisect(search, lambda f: {**base, "window": [max(1, int(v * n)) for v in f.tolist()]},
                                    1.0 / max(n, 1), 1.0, target)
        params = {**base, "window": [max(1, int(v * n)) for v in x.tolist()]}
    else:  # radial / block / svg: nothing per head to tune; measure and keep failing heads dense
        params = dict(base)
        err, spars = search.evaluate(params)
        ok = err <= target
    if staged and second_stage:
        params, stats = _search_lambda(search, params, ok, target)
    err, spars = search.evaluate(params)  # the final choice, all heads together
    # the gain counts both stages: tiles the second stage skips save their exp and P.V too
    gain = 1 - (1 - spars) * (1 - torch.tensor(stats.get("pv_skipped", [0.0] * h)))
    dense = [i for i in range(h) if not bool(ok[i]) or float(gain[i]) < MIN_GAIN or float(err[i]) > target]
    entry = {"kind": "attention", "error": {"rel_l1": err.tolist()}, "stats": {"sparsity": spars.tolist(), **stats}}
    if len(dense) == h:
        entry["dense"] = True
    else:
        entry["sparsity"] = {**params, "dense_heads": dense}
        if isinstance(params.get("pv_threshold"), list):  # a dense head skips nothing
            entry["sparsity"]["pv_threshold"] = [None if i in dense else x
                                                 for i, x in enumerate(params["pv_threshold"])]
    return entry


def _search_sparge(search: SiteSearch, base: dict, target: float) -> tuple[dict, torch.Tensor]:
    """Per head and for each theta of THETAS, the sparsest tau (or topk, when the config uses
    topk) under target; each head keeps its sparsest passing theta. -> (params, ok [H])."""
    knob = "topk" if base.get("topk") is not None else "tau"
    best = None
    thetas = _thetas_to_try(search)
    for i, theta in enumerate(thetas):
        x, ok, _, spars = _bisect(search, lambda v, theta=theta: {**base, "theta": theta, knob: v.tolist()},
                                  0.05, 1.0, target)
        pick = torch.full_like(x, i)
        if best is None:
            best = [x, ok, spars, pick]
        else:  # per head, the sparser passing choice
            better = ok & (~best[1] | (spars > best[2]))
            best = [torch.where(better, new, old) for new, old in zip((x, ok, spars, pick), best)]
    x, ok, _, pick = best
    return {**base, knob: x.tolist(), "theta": [thetas[int(i)] for i in pick.tolist()]}, ok


def _thetas_to_try(search: SiteSearch) -> list[float]:
    """THETAS that can change the outcome: one per distinct set of non-self-similar blocks (the
    others predict the same masks), and none past the first that marks a whole side of the site
    non-similar (every block kept: no sparsity to find)."""
    sims = [R.sparge_similarities(c["q"], c["k"]) for c in search.calls]
    out, seen = [], set()
    for theta in THETAS:
        rough = tuple(tuple((x < theta).flatten().tolist()) for pair in sims for x in pair)
        everything = all(bool((qs < theta).all() or (ks < theta).all()) for qs, ks in sims)
        if rough not in seen and not (out and everything):
            out.append(theta)
        seen.add(rough)
    return out


def _search_lambda(search: SiteSearch, params: dict, ok: torch.Tensor, target: float) -> tuple[dict, dict]:
    """Per head, the smallest second-stage lambda in LAMBDA_RANGE keeping the error under target.
    A head whose lambda skips no tile of the calibration inputs gets none: nothing shows it safe
    on other inputs, and the test costs the kernel a reduction per tile. Heads that skip nothing
    even at the smallest lambda are left out of the search (one pass instead of a bisection).
    -> (params with pv_threshold, {"pv_skipped": share of visited tiles skipped [H]})."""
    h = search.heads

    def make(x, heads):
        return {**params, "pv_threshold": [float(v) if o else None for v, o in zip(x.tolist(), heads)]}

    lowest = search.skipped_share(make(torch.full((h,), LAMBDA_RANGE[0]), ok.tolist()))
    heads = [bool(o) and s > 0 for o, s in zip(ok.tolist(), lowest)]
    if not any(heads):
        return {**params, "pv_threshold": None}, {"pv_skipped": [0.0] * h}
    lam, lam_ok, _, _ = _bisect(search, lambda x: make(x, heads), *LAMBDA_RANGE, target, steps=5)
    trial = make(lam, [a and bool(b) for a, b in zip(heads, lam_ok.tolist())])
    skipped = search.skipped_share(trial)
    chosen = [v if v is not None and s > 0 else None for v, s in zip(trial["pv_threshold"], skipped)]
    shares = [s if v is not None else 0.0 for v, s in zip(chosen, skipped)]
    return {**params, "pv_threshold": chosen if any(v is not None for v in chosen) else None}, {"pv_skipped": shares}
