"""Non-finite inputs (README Guarantees, "Non-finite inputs").

The guarantee: a NaN / +inf / -inf in query row i, or in a key / value row that row i attends
unmasked (kept by the causal rule, the bool keep mask, the additive mask not -inf there and, for
sparse attention, a kept block), may make output row i non-finite; every other output row is
exactly what the same call gives with that value replaced by 0. A NaN / +inf in the additive mask
at (i, j) may poison row i only (and only when (i, j) is otherwise attended); a -inf there is a
mask, which changes row i alone. Each case below injects one bad value into fresh random inputs
(GQA: 4 query heads on 2 kv heads; square causal / not, and 77 queries on 200 keys with a causal
offset), runs the call with and without it, and checks
  (1) the rows outside the allowed set are equal (the reference: bit for bit; the kernels, run by
      Triton's interpreter: bit for bit too, and against the reference within the kernel tests'
      tolerance),
  (2) NaN appears in exactly the rows that attend a NaN / Inf (so never outside the allowed set),
  (3) float64 attention's non-finite rows are among them for Q, K and the mask (float64 keeps
      some of those rows finite: a key whose logit comes out -inf, a query whose logits all do;
      attnopt marks them all); for V it is the other way round (float64's P.V multiplies a
      masked-out V row by 0, which a NaN / Inf turns into NaN in rows that never see it).

Sparse attention: the predictors read a non-finite value as 0, so the block mask is the one the
zero-replaced inputs give (checked exactly, for a pooled and an antidiagonal predictor); then the
dense guarantee holds with "attends" also requiring a kept block. With the second stage
(pv_threshold) the same holds for NaN / Inf, which count as 0 there too; a -inf in the additive
mask is not checked there, as it legitimately moves its row's maximum and with it the skip
decision of its whole 128-row q-block.
"""

import math

import pytest
import torch

from attnopt.codegen.attention.launch import attention_triton
from attnopt.ops import sparse_ref as R
from attnopt.ops.attention_ref import attention_exact, attention_reference, causal_keep
from attnopt.ops.sparse import predict_block_mask

from helpers import rel_l1

HQ, HKV, D = 4, 2, 64
SCALE = D ** -0.5
SHAPES = {"square": (77, 77, 0), "offset": (77, 200, 123)}  # nq, nk, causal offset
VALUES = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}
BLOCK_N = 64  # the interpreter's key tile: the reference runs the kernels' online softmax with it


def make_case(shape, causal, mask, dtype=torch.float16, nq_nk=None):
    nq, nk, off = nq_nk or SHAPES[shape]
    q = torch.randn(1, HQ, nq, D).to(dtype)
    k = torch.randn(1, HKV, nk, D).to(dtype)
    v = torch.randn(1, HKV, nk, D).to(dtype)
    bias = keep = None
    if mask == "bool":
        keep = torch.rand(1, HQ, nq, nk) > 0.3
    elif mask == "bias":
        bias = torch.randn(1, HQ, nq, nk).masked_fill(torch.rand(1, HQ, nq, nk) < 0.3, -math.inf).to(dtype)
    return dict(q=q, k=k, v=v, bias=bias, keep=keep, causal=causal, offset=off if causal else 0)


def visible(c, blocks=None) -> torch.Tensor:
    """[Hq, Nq, Nk]: key j attended unmasked by row i of head h (a -inf bias masks)."""
    nq, nk = c["q"].shape[2], c["k"].shape[2]
    vis = torch.ones(HQ, nq, nk, dtype=torch.bool)
    if c["causal"]:
        vis &= causal_keep(nq, nk, c["offset"], "cpu")
    if c["keep"] is not None:
        vis &= c["keep"][0]
    if c["bias"] is not None:
        vis &= ~torch.isneginf(c["bias"][0])
    if blocks is not None:
        vis &= R.expand_block_mask(blocks, nq, nk)[0]
    return vis


def inject(c, target, value, blocks=None):
    """Put `value` at a random position of `target` in a copy of case c. Returns (poisoned case,
    the same case with 0 there, rows that must be NaN [Hq, Nq], rows that may change [Hq, Nq])."""
    nq, nk = c["q"].shape[2], c["k"].shape[2]
    vis = visible(c, blocks)
    bad, clean = dict(c), dict(c)
    must = torch.zeros(HQ, nq, dtype=torch.bool)
    if target == "q":
        h, i = int(torch.randint(HQ, ())), int(torch.randint(nq, ()))
        pos = (0, h, i, int(torch.randint(D, ())))
        must[h, i] = True
    elif target in ("k", "v"):
        lo = c["offset"] + 1 if c["causal"] else 0  # causally, some rows never see the key
        hk, j = int(torch.randint(HKV, ())), int(torch.randint(lo, nk, ()))
        pos = (0, hk, j, int(torch.randint(D, ())))
        g = HQ // HKV
        must[hk * g:(hk + 1) * g] = vis[hk * g:(hk + 1) * g, :, j]
    else:  # the additive mask: pick a position it does not already mask
        h = int(torch.randint(HQ, ()))
        cand = (~torch.isneginf(c["bias"][0, h])).nonzero()
        i, j = cand[int(torch.randint(len(cand), ()))].tolist()
        pos = (0, h, i, j)
        must[h, i] = bool(vis[h, i, j]) and not value == -math.inf  # -inf is a mask, not poison
    may = must.clone()
    if target == "bias":
        may[pos[1], pos[2]] = True
    name = "bias" if target == "bias" else target
    bad[name] = c[name].clone()
    bad[name][pos] = value
    clean[name] = c[name].clone()
    clean[name][pos] = 0
    return bad, clean, must, may


def ref(c, quant="int8", pv="fp16", smooth_k=True, smooth_q=False):
    return attention_reference(c["q"], c["k"], c["v"], c["bias"], c["keep"], -math.inf, c["causal"], c["offset"],
                               SCALE, quant, pv, smooth_k, smooth_q, block_n=BLOCK_N)


def kernel(c, quant="int8", pv="fp16", smooth_k=True, smooth_q=False, lut=None, counts=None):
    return attention_triton(c["q"], c["k"], c["v"], c["bias"], c["keep"], -math.inf, c["causal"], c["offset"],
                            SCALE, quant, pv, smooth_k, smooth_q, "cpu", lut=lut, counts=counts)


def exact_bad_rows(c, blocks=None):
    keep = c["keep"]
    if blocks is not None:  # skipped blocks as a bool mask (an additive -inf would meet NaN logits)
        kept = R.expand_block_mask(blocks, c["q"].shape[2], c["k"].shape[2])
        keep = kept if keep is None else keep & kept
    o = attention_exact(c["q"], c["k"], c["v"], c["bias"], keep, -math.inf, c["causal"], c["offset"], SCALE)
    return ~torch.isfinite(o[0]).all(-1)


def check(out, out_clean, must, may, c_bad, target, blocks=None):
    out, out_clean = out[0], out_clean[0]
    nan_rows = torch.isnan(out).any(-1)
    assert torch.equal(nan_rows, must), f"NaN rows {nan_rows.nonzero().tolist()} != {must.nonzero().tolist()}"
    assert torch.isfinite(out[~must]).all()
    assert torch.equal(out[~may], out_clean[~may]), "a row that does not see the bad value changed"
    f64 = exact_bad_rows(c_bad, blocks)
    if target == "v":  # float64 also spoils the rows that mask the value: 0 * NaN in P.V
        assert not (must & ~f64).any()
    elif not (target == "k" and c_bad["bias"] is not None):  # (a NaN logit + a -inf bias is NaN there)
        assert not (f64 & ~must).any(), "float64 has a non-finite row attnopt leaves finite"
    return int(nan_rows.sum()), int(f64.sum())


# ------------------------------------------------------------------------- the reference path

CONFIGS = [("square", False), ("square", True), ("offset", True)]
REF_CASES = [  # (quant, pv, smooth_k, smooth_q), (shape, causal): every format, every shape for int8/fp16
    *((("int8", "fp16", True, False), sc) for sc in CONFIGS),
    (("int8", "fp16", False, False), CONFIGS[2]), (("int8", "fp16", True, True), CONFIGS[1]),
    (("int8", "fp8", True, False), CONFIGS[0]), (("fp8", "fp16", True, False), CONFIGS[2]),
    (("fp8", "fp16", False, True), CONFIGS[0]), (("fp4", "fp4", True, False), CONFIGS[1]),
]


@pytest.mark.parametrize("case", range(len(REF_CASES)))
def test_reference_poisons_only_the_rows_that_see_the_value(case):
    """Each mask kind x each target; the three values rotate over targets and cases (every
    combination of target, mask and value comes up in the int8/fp16 cases)."""
    (quant, pv, smooth_k, smooth_q), (shape, causal) = REF_CASES[case]
    fmt = dict(quant=quant, pv=pv, smooth_k=smooth_k, smooth_q=smooth_q)
    values = list(VALUES.values())
    for m, mask in enumerate((None, "bool", "bias")):
        c = make_case(shape, causal, mask)
        targets = ("q", "k", "v") + (("bias",) if mask == "bias" else ())
        for t, target in enumerate(targets):
            value = values[(case + m + t) % 3]
            bad, clean, must, may = inject(c, target, value)
            check(ref(bad, **fmt), ref(clean, **fmt), must, may, bad, target)


def test_one_inf_in_k_poisons_what_float64_does_and_no_more_than_the_rows_that_see_it():
    """The issue's case: one +inf in K (128 rows, no mask). Every row of that head sees the key,
    so every one may be NaN (float64 SDPA: about half, those whose logit is +inf); the other kv
    head's query heads stay bit-identical to the zero-replaced run."""
    c = make_case("square", False, None, nq_nk=(128, 128, 0))
    c["k"][0, 1, 40, 3] = float("inf")
    clean = dict(c, k=c["k"].nan_to_num(0.0, 0.0, 0.0))
    out, out_clean = ref(c), ref(clean)
    assert torch.isnan(out[0, 2:]).all() and torch.equal(out[0, :2], out_clean[0, :2])
    # with a bool mask only the rows keeping key 40 go
    keep = torch.rand(1, HQ, 128, 128) > 0.5
    out = attention_reference(c["q"], c["k"], c["v"], None, keep, -math.inf, False, 0, SCALE)
    out_clean = attention_reference(clean["q"], clean["k"], clean["v"], None, keep, -math.inf, False, 0, SCALE)
    nan_rows = torch.isnan(out[0]).any(-1)
    assert torch.equal(nan_rows[2:], keep[0, 2:, :, 40]) and not nan_rows[:2].any()
    assert torch.equal(out[0][~nan_rows], out_clean[0][~nan_rows])


def test_fully_masked_rows_still_give_zero_and_a_nan_bias_under_a_false_keep_is_unseen():
    c = make_case("square", True, "bias")
    c["keep"] = torch.rand(1, HQ, 77, 77) > 0.3
    c["keep"][0, :, 10] = False  # row 10 keeps no key
    c["k"] = c["k"].clone()
    c["k"][0, 0, 5, 0] = float("nan")  # seen (causally) by row 10, but masked there
    c["bias"] = c["bias"].clone()
    c["bias"][0, 1, 20, 3] = float("nan")
    c["keep"][0, 1, 20, 3] = False
    out = ref(c)
    assert torch.equal(out[0, :, 10], torch.zeros_like(out[0, :, 10]))
    assert torch.isfinite(out[0, 1, 20]).all()


def test_lse_is_nan_exactly_in_the_poisoned_rows():
    c = make_case("offset", True, None)
    c["v"] = c["v"].clone()
    c["v"][0, 1, 150, 7] = float("-inf")
    out, lse = attention_reference(c["q"], c["k"], c["v"], None, None, -math.inf, True, 123, SCALE,
                                   return_lse=True)
    assert torch.equal(torch.isnan(lse), torch.isnan(out).any(-1))
    assert torch.isnan(lse).sum() == 2 * (77 - (150 - 123))


# ------------------------------------------------------------------ the kernels (interpreter)

KERNEL_CASES = [  # (format, shape, causal, mask, target, value)
    (("int8", "fp16", True, False), "offset", True, "bool", "k", "+inf"),
    (("int8", "fp16", False, False), "square", False, "bias", "bias", "nan"),
    (("int8", "fp16", True, True), "square", True, None, "q", "-inf"),
    (("int8", "fp8", True, False), "offset", True, "bias", "v", "nan"),
    (("fp8", "fp16", False, False), "square", False, "bool", "v", "-inf"),
    (("fp8", "fp16", True, True), "offset", True, "bias", "bias", "+inf"),
    (("fp4", "fp4", True, False), "square", True, "bool", "k", "nan"),
]


@pytest.mark.parametrize("fmt,shape,causal,mask,target,value", KERNEL_CASES)
def test_kernel_poisons_only_the_rows_that_see_the_value(fmt, shape, causal, mask, target, value):
    quant, pv, smooth_k, smooth_q = fmt
    fmt = dict(quant=quant, pv=pv, smooth_k=smooth_k, smooth_q=smooth_q)
    c = make_case(shape, causal, mask)
    bad, clean, must, may = inject(c, target, VALUES[value])
    out = kernel(bad, **fmt)
    check(out, kernel(clean, **fmt), must, may, bad, target)
    want = ref(bad, **fmt)  # and the kernel is the reference's arithmetic, poisoned rows included
    assert torch.equal(torch.isnan(out), torch.isnan(want))
    fin = ~torch.isnan(want).any(-1)
    assert rel_l1(out[fin], want[fin]) <= 1e-4


FUSED_CASES = [  # (quant, pv, shape, causal, mask, target, value, options): the 16-bit Q checked in the
    # attention kernel, V flagged by the statistics kernel for every P.V format, the row dots soft-capping
    # and the LSE read, a finite fill's mean of V, GQA
    ("none", "fp16", "square", True, "bool", "q", "nan", {}),
    ("none", "fp16", "offset", True, None, "k", "+inf", {"softcap": 30.0, "lse": True}),
    ("fp4", "fp4", "offset", True, "bias", "v", "nan", {"lse": True}),
    ("int8", "fp8", "square", False, "bool", "q", "-inf", {"softcap": 20.0, "lse": True}),
    ("fp8", "fp16", "offset", True, "bool", "k", "-inf", {"fill": -3.0e38, "lse": True}),
    ("int8", "fp16", "square", True, None, "v", "+inf", {"softcap": 30.0, "smooth_q": True}),
]


@pytest.mark.parametrize("quant,pv,shape,causal,mask,target,value,opts", FUSED_CASES)
def test_fused_launches_poison_only_the_rows_that_see_the_value(quant, pv, shape, causal, mask, target, value,
                                                                opts):
    """The statistics / fused quantize / attention launches: NaN rows exactly where the reference
    has them (LSE too), every other row bit for bit the zero-replaced call's, and every element of
    a poisoned output buffer written."""
    c = make_case(shape, causal, mask)
    bad, clean, must, may = inject(c, target, VALUES[value])
    fill, cap, lse = opts.get("fill", -math.inf), opts.get("softcap", 0.0), opts.get("lse", False)
    smooth_q = opts.get("smooth_q", False)

    def call(x, fn):
        return fn(x["q"], x["k"], x["v"], x["bias"], x["keep"], fill, x["causal"], x["offset"], SCALE, quant, pv,
                  True, smooth_q)

    def kern(x):
        out = torch.full((1, HQ, x["q"].shape[2], D), -math.inf, dtype=x["q"].dtype)
        got = call(x, lambda *a: attention_triton(*a, "cpu", out=out, return_lse=lse, softcap=cap))
        o = got[0] if lse else got
        assert o is out and not torch.isneginf(o).any(), "the kernel left elements unwritten"
        return got

    got, got_clean = kern(bad), kern(clean)
    want = call(bad, lambda *a: attention_reference(*a, return_lse=lse, block_n=BLOCK_N, softcap=cap))
    if lse:
        (got, got_lse), (got_clean, _), (want, want_lse) = got, got_clean, want
        assert torch.equal(torch.isnan(got_lse), torch.isnan(got).any(-1))
        assert torch.equal(torch.isnan(got_lse), torch.isnan(want_lse))
        fin = torch.isfinite(want_lse)
        assert torch.equal(fin, torch.isfinite(got_lse))
        assert (got_lse[fin] - want_lse[fin]).abs().max() < 1e-3
    nan_rows = torch.isnan(got[0]).any(-1)
    assert torch.equal(nan_rows, must), f"NaN rows {nan_rows.nonzero().tolist()} != {must.nonzero().tolist()}"
    assert torch.equal(got[0][~may], got_clean[0][~may]), "a row that does not see the bad value changed"
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    fin = ~torch.isnan(want).any(-1)
    assert rel_l1(got[fin], want[fin]) <= 1e-4


# ------------------------------------------------------------------------------------ sparse

SPARGE = {"method": "sparge", "tau": 0.5, "theta": 0.3, "topk": None, "sink": True}
XATTN = {"method": "xattention", "stride": 8, "tau": 0.5}
WINDOW = {"method": "window", "window": 64, "sinks": 4}


def sparse_case(causal, mask):
    return make_case(None, causal, mask, nq_nk=(200, 260, 60))  # 2 q-blocks, 5 kv-blocks


def blocks_for(c, params, use_triton):
    return predict_block_mask(c["q"], c["k"], c["v"], params, SCALE, c["causal"], c["offset"], use_triton)


@pytest.mark.parametrize("params", [SPARGE, XATTN, WINDOW], ids=["sparge", "xattention", "window"])
@pytest.mark.parametrize("causal", [False, True])
def test_sparse_reference_poisons_only_the_rows_that_see_the_value(params, causal):
    values = list(VALUES.values())
    for m, mask in enumerate((None, "bool", "bias")):
        c = sparse_case(causal, mask)
        for t, target in enumerate(("q", "k", "v") + (("bias",) if mask == "bias" else ())):
            for value in (values[(m + t + causal) % 3],):
                blocks = blocks_for(c, params, False)
                bad, clean, must, may = inject(c, target, value, blocks)
                blocks_bad, blocks_clean = blocks_for(bad, params, False), blocks_for(clean, params, False)
                assert torch.equal(blocks_bad, blocks_clean), "a bad value changed the predicted blocks"
                if target in ("q", "k", "v"):  # the injected zero can move blocks: use the clean mask
                    _, _, must, may = inject_at_same(c, bad, target, blocks_clean)
                runs = [R.sparse_attention_reference(x["q"], x["k"], x["v"], blocks_clean, x["bias"], x["keep"],
                                                     -math.inf, causal, x["offset"], SCALE) for x in (bad, clean)]
                check(*runs, must, may, bad, target, blocks_clean)


def inject_at_same(c, bad, target, blocks):
    """must / may for the bad value already placed in `bad` (recomputed for another block mask)."""
    vis = visible(c, blocks)
    nq = c["q"].shape[2]
    pos = (~torch.isfinite(bad[target].float())).nonzero()[0].tolist()
    must = torch.zeros(HQ, nq, dtype=torch.bool)
    if target == "q":
        must[pos[1], pos[2]] = True
    else:
        g = HQ // HKV
        must[pos[1] * g:(pos[1] + 1) * g] = vis[pos[1] * g:(pos[1] + 1) * g, :, pos[2]]
    return None, None, must, must.clone()


@pytest.mark.parametrize("target,value", [("k", "nan"), ("q", "+inf"), ("v", "-inf"), ("bias", "nan")])
def test_sparse_second_stage_reference(target, value):
    c = sparse_case(True, "bias")
    blocks = torch.rand(1, HQ, 2, 5) > 0.3
    blocks[..., 0] = True
    bad, clean, must, may = inject(c, target, VALUES[value], blocks)
    lam = torch.full((HQ,), 2.0)
    runs = [R.sparse_attention_reference(x["q"], x["k"], x["v"], blocks, x["bias"], x["keep"], -math.inf, True,
                                         x["offset"], SCALE, pv_threshold=lam) for x in (bad, clean)]
    check(*runs, must, may, bad, target, blocks)


@pytest.mark.parametrize("params,target,value,mask", [(SPARGE, "k", "+inf", "bool"), (WINDOW, "v", "nan", "bias")],
                         ids=["sparge", "window"])
def test_sparse_kernel_poisons_only_the_rows_that_see_the_value(params, target, value, mask):
    c = sparse_case(True, mask)
    blocks = blocks_for(c, params, True)
    bad, clean, must, may = inject(c, target, VALUES[value], blocks)
    blocks_bad, blocks_clean = blocks_for(bad, params, True), blocks_for(clean, params, True)
    assert torch.equal(blocks_bad, blocks_clean) and torch.equal(blocks_clean, blocks_for(clean, params, False))
    _, _, must, may = inject_at_same(c, bad, target, blocks_clean)
    lut, counts = R.block_mask_to_lut(blocks_clean, 200, 260, True, 60)
    out = kernel(bad, lut=lut, counts=counts)
    check(out, kernel(clean, lut=lut, counts=counts), must, may, bad, target, blocks_clean)
    want = R.sparse_attention_reference(bad["q"], bad["k"], bad["v"], blocks_clean, bad["bias"], bad["keep"],
                                        -math.inf, True, 60, SCALE)
    assert torch.equal(torch.isnan(out), torch.isnan(want))
    fin = ~torch.isnan(want).any(-1)
    assert rel_l1(out[fin], want[fin]) <= 2e-3  # the block-sparse kernel tests' bound


# ------------------------------------------------------------------------- quantize kernels

@pytest.mark.parametrize("fmt", ["int8", "fp8", "fp4"])
def test_quantize_kernel_counts_a_bad_value_as_zero_and_flags_its_row(fmt):
    from attnopt.codegen.attention.quantize import quantize_rows_triton

    x = torch.randn(1, 2, 77, 64).half()
    bad, clean = x.clone(), x.clone()
    bad[0, 1, 40, 5], bad[0, 0, 3, 0], bad[0, 0, 70, 63] = float("nan"), float("inf"), float("-inf")
    clean[0, 1, 40, 5] = clean[0, 0, 3, 0] = clean[0, 0, 70, 63] = 0
    mean = clean.float().mean(-2)
    flags = torch.full((1, 2, 77), 7, dtype=torch.uint8)
    got = quantize_rows_triton(bad, 32, fmt, mult=0.3, mean=mean, block_mean=True, bad=flags)
    want = quantize_rows_triton(clean, 32, fmt, mult=0.3, mean=mean, block_mean=True)
    def bits(t):  # fp8 codes compared as bytes
        return t.view(torch.uint8) if t.element_size() == 1 else t

    for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        assert torch.equal(bits(g), bits(w))  # codes, block scales, NVFP4 group scales, block means
    want_flags = torch.zeros(1, 2, 77, dtype=torch.uint8)
    want_flags[0, 1, 40] = want_flags[0, 0, 3] = want_flags[0, 0, 70] = 1
    assert torch.equal(flags, want_flags)


@pytest.mark.parametrize("target", ["q", "k"])
def test_triton_predictors_read_a_bad_value_as_zero(target):
    from attnopt.codegen.sparse.predict import predict_sparge_triton, xattention_scores_triton

    c = sparse_case(True, None)
    bad, clean, _, _ = inject(c, target, float("nan"))
    # the sparge kernel pools, scores and selects in one launch: its kept blocks are what it read
    for fn in (lambda x: xattention_scores_triton(x["q"], x["k"], SCALE, 8, True, 60),
               lambda x: predict_sparge_triton(x["q"], x["k"], SCALE, 0.9, 0.3, None, True, True, 60)):
        for g, w in zip(torch.utils._pytree.tree_leaves(fn(bad)), torch.utils._pytree.tree_leaves(fn(clean))):
            assert torch.equal(g, w)
    assert torch.equal(blocks_for(bad, XATTN, True), blocks_for(clean, XATTN, True))
