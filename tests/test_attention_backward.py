"""The differentiable attention op (`attnopt::attention_train` -> `attnopt::attention_backward`):
gradients against float64 autograd of plain softmax attention, the Triton backward kernels
(interpreter) against the CPU reference, masks, GQA, causal offsets, soft-capping, tracing.

The default run takes a pairwise subset of the accuracy grid; `pytest -m slow` runs all of it
(N in {77, 256, 1024}, head dims 64 / 128, fp16 / bf16, causal or not, GQA, additive masks)."""

import itertools
import math

import pytest
import torch

import attnopt
from attnopt.ops.attention_bwd_ref import attention_backward_reference
from attnopt.ops.attention_ref import attention_exact
from attnopt.ops.attention_train import BackwardUnsupported

INT8_REL, INT8_COS, EXACT_REL = 0.05, 0.99, 0.02


def rel_l1(a, b) -> float:
    return ((a.double() - b.double()).abs().sum() / b.double().abs().sum().clamp_min(1e-30)).item()


def cosine(a, b) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def make_inputs(nq, nk, d, dtype, hq=2, hkv=2, bias=False, keep=False, b=1):
    """Fresh random operands; K carries a per-channel offset (what K smoothing is for)."""
    q = torch.randn(b, hq, nq, d).to(dtype)
    k = (torch.randn(b, hkv, nk, d) + torch.randn(d)).to(dtype)
    v = torch.randn(b, hkv, nk, d).to(dtype)
    do = torch.randn(b, hq, nq, d).to(dtype)
    attn_bias = (torch.randn(1, hq, nq, nk) * 2).to(dtype) if bias else None
    keep_mask = (torch.rand(b, 1, nq, nk) > 0.3) if keep else None
    return q, k, v, do, attn_bias, keep_mask


def train_op(q, k, v, attn_bias=None, keep_mask=None, masked_value=-math.inf, causal=False, offset=0,
             backward="int8", impl="reference", softcap=0.0, quant="int8", pv="fp16", arch="cpu"):
    return torch.ops.attnopt.attention_train(q, k, v, attn_bias, keep_mask, masked_value, causal, offset,
                                             q.shape[-1] ** -0.5, quant, pv, True, False, arch, impl, softcap,
                                             backward)


def op_grads(q, k, v, do, **kw):
    """(dq, dk, dv) through the op's register_autograd."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = train_op(*leaves, **kw)
    assert not lse.requires_grad
    out.backward(do)
    return [t.grad for t in leaves]


def float64_grads(q, k, v, do, attn_bias=None, keep_mask=None, masked_value=-math.inf, causal=False, offset=0,
                  softcap=0.0):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = attention_exact(*leaves, attn_bias, keep_mask, masked_value, causal, offset, q.shape[-1] ** -0.5,
                          softcap=softcap)
    out.backward(do.double())
    return [t.grad for t in leaves]


def check_accuracy(mode, nq, nk, d, dtype, causal, gqa, bias):
    # GQA: 4 query heads on one kv head
    q, k, v, do, attn_bias, _ = make_inputs(nq, nk, d, dtype, hq=4 if gqa else 2, hkv=1 if gqa else 2, bias=bias)
    offset = nk - nq if causal else 0
    got = op_grads(q, k, v, do, attn_bias=attn_bias, causal=causal, offset=offset, backward=mode)
    want = float64_grads(q, k, v, do, attn_bias, causal=causal, offset=offset)
    errs = {name: (rel_l1(g, w), cosine(g, w)) for name, g, w in zip(("dq", "dk", "dv"), got, want)}
    for name, (rel, cos) in errs.items():
        if mode == "int8":
            assert rel <= INT8_REL and cos >= INT8_COS, (name, errs)
        else:
            assert rel <= EXACT_REL, (name, errs)
    return errs


# (N, head dim, dtype, causal, GQA, additive mask): every pair of values of the fast subset's
# factors appears at least once; causal cases with Nq < Nk use Nk = N + 19
FAST = [
    (77, 64, torch.float16, True, True, False),
    (77, 128, torch.bfloat16, False, False, True),
    (256, 64, torch.bfloat16, True, False, True),
    (256, 128, torch.float16, False, True, False),
    (77, 64, torch.bfloat16, False, True, True),
    (256, 128, torch.bfloat16, True, True, True),
]


@pytest.mark.parametrize("mode", ["int8", "exact"])
@pytest.mark.parametrize("case", FAST, ids=lambda c: f"n{c[0]}-d{c[1]}-{str(c[2])[6:]}-c{int(c[3])}-g{int(c[4])}-b{int(c[5])}")
def test_gradients_match_float64(mode, case):
    n, d, dtype, causal, gqa, bias = case
    check_accuracy(mode, n, n + 19 if causal else n, d, dtype, causal, gqa, bias)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "exact"])
@pytest.mark.parametrize("n", [77, 256, 1024])
def test_gradients_match_float64_full_grid(mode, n):
    for d, dtype, causal, gqa, bias in itertools.product((64, 128), (torch.float16, torch.bfloat16), (False, True),
                                                         (False, True), (False, True)):
        nk = n + 19 if causal and gqa else n  # causal with Nq < Nk (bottom-right aligned) in half the cases
        check_accuracy(mode, n, nk, d, dtype, causal, gqa, bias)


def test_gradients_1024_fast():
    check_accuracy("int8", 1024, 1024, 64, torch.bfloat16, True, False, False)


# ------------------------------------------------------------------------ masks and edge rows


@pytest.mark.parametrize("mode", ["int8", "exact"])
def test_keep_mask_and_fully_masked_rows(mode):
    q, k, v, do, _, keep = make_inputs(70, 90, 64, torch.float16, keep=True)
    keep = keep.clone()
    keep[..., 5, :] = False  # a row with no kept key: zero output, zero gradients
    got = op_grads(q, k, v, do, keep_mask=keep, backward=mode)
    want = float64_grads(q, k, v, do, keep_mask=keep)
    assert got[0][..., 5, :].abs().max() == 0
    for g, w in zip(got, want):
        assert rel_l1(g, w) <= (INT8_REL if mode == "int8" else EXACT_REL)


def test_finite_masked_value_rows_take_the_mean():
    """A finite fill makes a fully masked row the mean of V: dV gets dO / Nk there, dQ nothing."""
    q, k, v, do, _, keep = make_inputs(40, 50, 64, torch.float16, keep=True)
    keep = keep.clone()
    keep[..., 3, :] = False
    fill = torch.finfo(torch.float16).min
    got = op_grads(q, k, v, do, keep_mask=keep, masked_value=fill, backward="exact")
    want = float64_grads(q, k, v, do, keep_mask=keep, masked_value=fill)
    for g, w in zip(got, want):
        assert rel_l1(g, w) <= EXACT_REL


def test_a_bias_that_requires_grad_is_refused_and_inference_is_unchanged():
    """The op gives the bias no gradient: a bias that requires one is refused, never silently
    left without (eagerly here; the compiler leaves such sites as they were)."""
    q, k, v, do, bias, _ = make_inputs(50, 50, 64, torch.bfloat16, bias=True)
    with pytest.raises(ValueError, match="learnable bias"):
        attnopt.attention(q, k, v, attn_mask=bias.clone().requires_grad_(), backward="int8")
    with pytest.raises(RuntimeError, match="attn_bias requires grad"):  # the op itself, called directly
        out, _ = torch.ops.attnopt.attention_train(q, k, v, bias.clone().requires_grad_(), None, -math.inf, False, 0,
                                                   0.125, "int8", "fp16", True, False, "cpu", "auto", 0.0, "int8")
        out.backward(do)
    qg = q.clone().requires_grad_()
    out = attnopt.attention(qg, k, v, attn_mask=bias, backward="int8")
    ref = attnopt.attention(q, k, v, attn_mask=bias)
    assert torch.equal(out.detach(), ref)  # the inference op's numbers, unchanged
    out.backward(do)
    assert qg.grad is not None and qg.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["int8", "exact"])
def test_softcap_gradient(mode):
    q, k, v, do, _, _ = make_inputs(64, 64, 64, torch.float16)
    q = (q.float() * 3).half()  # logits large enough for the cap to bend them
    got = op_grads(q, k, v, do, softcap=5.0, backward=mode)
    want = float64_grads(q, k, v, do, softcap=5.0)
    for g, w in zip(got, want):
        assert rel_l1(g, w) <= (INT8_REL if mode == "int8" else EXACT_REL)
        assert cosine(g, w) >= INT8_COS


def test_unknown_backward_mode_is_refused():
    q, k, v, *_ = make_inputs(8, 8, 64, torch.float16)
    with pytest.raises(BackwardUnsupported):
        train_op(q, k, v, backward="fp8")
    with pytest.raises(attnopt.ConfigError):
        attnopt.attention(q, k, v, backward="fp8")


# ------------------------------------------------------------------- Triton under the interpreter

KERNEL_CASES = {
    "gqa-causal-offset": dict(nq=70, nk=130, d=64, dtype=torch.bfloat16, hq=2, hkv=1, causal=True, bias=True),
    "keep-finite-fill-d128": dict(nq=96, nk=96, d=128, dtype=torch.float16, hq=2, hkv=1, keep=True,
                                  masked_value=-1e4),
    "softcap-d96": dict(nq=65, nk=65, d=96, dtype=torch.float16, hq=2, hkv=2, softcap=8.0),
    # causal with q longer than k and a finite fill: rows 0-59 see no key and attend to all of
    # them uniformly, key tiles above the diagonal included (regression: the dK/dV pass skipped them)
    "causal-finite-fill-no-key-rows": dict(nq=130, nk=70, d=64, dtype=torch.float16, hq=1, hkv=1, causal=True,
                                          masked_value=-1e4),
}


@pytest.mark.parametrize("mode", ["int8", "exact"])
@pytest.mark.parametrize("name", sorted(KERNEL_CASES))
def test_triton_backward_equals_reference(mode, name):
    c = dict(KERNEL_CASES[name])
    q, k, v, do, bias, keep = make_inputs(c.pop("nq"), c.pop("nk"), c.pop("d"), c.pop("dtype"), c.pop("hq"),
                                          c.pop("hkv"), bias=c.pop("bias", False), keep=c.pop("keep", False))
    if keep is not None:
        keep = keep.clone()
        keep[..., 3, :] = False  # a row with no kept key (finite fill: the mean of V)
    causal = c.pop("causal", False)
    offset = k.shape[2] - q.shape[2] if causal else 0
    masked_value, softcap = c.pop("masked_value", -math.inf), c.pop("softcap", 0.0)
    kw = dict(attn_bias=bias, keep_mask=keep, masked_value=masked_value, causal=causal, offset=offset,
              softcap=softcap, backward=mode)
    out, lse = train_op(q, k, v, **kw)
    args = (q, k, v, out, lse, do, bias, keep, masked_value, causal, offset, q.shape[-1] ** -0.5, "int8", True, "cpu")
    got = torch.ops.attnopt.attention_backward(*args, "triton", softcap, mode)
    want = torch.ops.attnopt.attention_backward(*args, "reference", softcap, mode)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert rel_l1(g, w) <= 1e-4, (rel_l1(g, w))


def test_triton_autograd_end_to_end():
    """impl 'triton' forward and backward through register_autograd, under the interpreter."""
    q, k, v, do, _, _ = make_inputs(80, 80, 64, torch.float16, hq=2, hkv=1)
    got = op_grads(q, k, v, do, causal=True, impl="triton")
    want = op_grads(q, k, v, do, causal=True, impl="reference")
    for g, w in zip(got, want):
        assert rel_l1(g, w) <= 1e-3


def test_fully_masked_rows_triton():
    q, k, v, do, _, keep = make_inputs(40, 70, 64, torch.float16, keep=True)
    keep = keep.clone()
    keep[..., 7, :] = False
    out, lse = train_op(q, k, v, keep_mask=keep)
    dq, dk, dv = torch.ops.attnopt.attention_backward(q, k, v, out, lse, do, None, keep, -math.inf, False, 0,
                                                      0.125, "int8", True, "cpu", "triton", 0.0, "int8")
    assert dq[..., 7, :].abs().max() == 0 and torch.isfinite(dk).all() and torch.isfinite(dv).all()


# ----------------------------------------------------------------------------------- tracing


def test_compile_fullgraph_differentiates_through_register_autograd():
    q, k, v, do, _, _ = make_inputs(64, 64, 64, torch.float16, hq=4, hkv=2)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def f(q, k, v):
        return attnopt.attention(q, k, v, is_causal=True, enable_gqa=True, backward="exact") * 2

    torch._dynamo.reset()
    torch.compile(f, backend="aot_eager", fullgraph=True)(*leaves).backward(do)
    want = op_grads(q, k, v, do * 2, causal=True, backward="exact")
    for leaf, w in zip(leaves, want):
        assert torch.allclose(leaf.grad.float(), w.float(), rtol=1e-3, atol=1e-3)


def test_opcheck():
    q, k, v, do, _, _ = make_inputs(32, 48, 64, torch.float32, hq=2, hkv=1)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    args = (q, k, v, None, None, -math.inf, True, 16, 0.125, "int8", "fp16", True, False, "cpu", "reference", 0.0,
            "exact")
    result = torch.library.opcheck(torch.ops.attnopt.attention_train.default, args)  # all four checks, AOT dynamic too
    assert set(result.values()) == {"SUCCESS"}, result


# --------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["int8", "exact"])
@pytest.mark.parametrize("n,d,dtype,causal", [(256, 64, torch.bfloat16, True), (1024, 128, torch.float16, False),
                                              (333, 128, torch.bfloat16, False)])
def test_gpu_backward_kernels_against_float64(mode, n, d, dtype, causal):
    from attnopt.codegen.arch import resolve_arch

    q, k, v, do, _, _ = (t.cuda() if t is not None else None for t in make_inputs(n, n, d, dtype, hq=4, hkv=2))
    got = op_grads(q, k, v, do, causal=causal, backward=mode, impl="triton", arch=resolve_arch("auto", q.device).name)
    want = float64_grads(q, k, v, do, causal=causal)
    ref_args = [t.cpu() for t in (q, k, v)]
    out, lse = train_op(*ref_args, causal=causal, backward=mode)
    ref = attention_backward_reference(*ref_args, out, lse, do.cpu(), is_causal=causal, mode=mode)
    for g, w, r in zip(got, want, ref):
        assert rel_l1(g.cpu(), w.cpu()) <= (INT8_REL if mode == "int8" else EXACT_REL)
        assert rel_l1(g.cpu(), r) <= 1e-2  # the CPU reference of the same arithmetic


@pytest.mark.parametrize("mode", ["int8", "exact"])
def test_block_sparse_backward_equals_dense_masked_reference(mode):
    """With the sparse forward's LUT the kernels visit only the kept blocks: the gradients equal
    the reference's under the same blocks as an element keep mask (the hook for trainable
    sparse attention)."""
    from attnopt.codegen.attention.backward import attention_backward_triton
    from attnopt.ops.sparse_ref import BK, BQ, block_mask_to_lut, expand_block_mask, n_blocks

    nq, nk, causal = 150, 200, True
    q, k, v, do, _, _ = make_inputs(nq, nk, 64, torch.float16, hq=2, hkv=1)
    blocks = torch.rand(1, 2, n_blocks(nq, BQ), n_blocks(nk, BK)) > 0.4
    blocks[..., 0] = True  # every q-block keeps its first kv-block: no row left empty by the blocks alone
    lut, counts = block_mask_to_lut(blocks, nq, nk, causal, nk - nq)
    keep = expand_block_mask(blocks, nq, nk)
    out, lse = train_op(q, k, v, keep_mask=keep, causal=causal, offset=nk - nq, backward=mode)
    got = attention_backward_triton(q, k, v, out, lse, do, None, None, -math.inf, causal, nk - nq, 0.125, True,
                                    0.0, mode, lut=lut, counts=counts)
    want = attention_backward_reference(q, k, v, out, lse, do, None, keep, -math.inf, causal, nk - nq, 0.125,
                                        mode=mode)
    for g, w in zip(got, want):
        assert rel_l1(g, w) <= 1e-4


def test_train_schema_is_the_shared_prefix_then_its_own():
    from attnopt.ops.schema import ATTENTION_ARGS

    schema = torch.ops.attnopt.attention_train.default._schema
    assert str(schema).startswith(f"attnopt::attention_train({ATTENTION_ARGS}, ")
    assert [a.name for a in schema.arguments][-5:] == ["smooth_q", "arch", "impl", "softcap", "backward"]
    assert len(schema.returns) == 2 and len(torch.ops.attnopt.attention_backward.default._schema.returns) == 3
