"""The sparse predictors on trained attention: the recall model shipped with
benchmarks/recall_model.py (docs/algorithms.md#why-the-predictors-found-little-sparsity-on-trained-attention).

What was measured there and is held here, on layer 0 at 1K tokens (heads 0 and 1: sharp local
attention plus long-range recall): every centered K block is "rough" under the smallest theta
calibration tries (0.1), so sparge keeps every block; with the self-similarity rule off, sparge
and XAttention keep about half the blocks and still capture most of each row's attention.
"""

import importlib.util
import math
import os
import pathlib
import sys

import pytest
import torch

from attnopt.ops import sparse_ref as R

SEQ = 1024


def _recall_module():
    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "recall_model.py"
    spec = importlib.util.spec_from_file_location("attnopt_bench_recall_model", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


RM = _recall_module()


@pytest.fixture(scope="module")
def sites():
    """(q, k, v) of the trained model's two attention sites at 1K tokens."""
    model = RM.load_recall_model()
    (tokens,) = RM.recall_batches(1, SEQ, seed=0)[0]
    got = []
    orig = torch.nn.functional.scaled_dot_product_attention

    def grab(q, k, v, *a, **kw):
        got.append((q, k, v))
        return orig(q, k, v, *a, **kw)

    torch.nn.functional.scaled_dot_product_attention = grab
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        torch.nn.functional.scaled_dot_product_attention = orig
    return got


@pytest.fixture(scope="module")
def layer0(sites):
    """(q, k) of the first attention, and the scale."""
    q, k, _ = sites[0]
    return q, k, 1 / math.sqrt(q.shape[-1])


def _kept_and_mass(keep, q, k, scale, h):
    """(share of the causal blocks kept, mean over rows of the attention mass inside them)."""
    valid = R.causal_blocks(SEQ, SEQ, 0, "cpu")
    s = (q[0, h].double() @ k[0, h].double().T) * scale
    s = s.masked_fill(torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1), -math.inf)
    p = torch.softmax(s, -1)
    inside = R.expand_block_mask(keep[:, h:h + 1], SEQ, SEQ)[0, 0]
    return (keep[0, h] & valid).sum().item() / valid.sum().item(), (p * inside).sum(-1).mean().item()


def test_shipped_weights_are_small_and_recall():
    assert os.path.getsize(RM.WEIGHTS) < 1 << 20
    acc = RM.accuracy(RM.load_recall_model(), SEQ, n=2)
    assert acc["query"] >= 0.9 and acc["filler"] >= 0.99


@pytest.mark.parametrize("head", [0, 1])
def test_self_similarity_rule_keeps_every_block_of_trained_keys(layer0, head):
    """The cause of sparge's missing sparsity: token-driven keys are not self-similar."""
    q, k, scale = layer0
    _, ksim = R.sparge_similarities(q[:, head:head + 1], k[:, head:head + 1])
    assert (ksim < 0.1).all()
    kept, _ = _kept_and_mass(R.predict_sparge(q, k, scale, 0.6, 0.1, is_causal=True), q, k, scale, head)
    assert kept == 1.0


@pytest.mark.parametrize("head", [0, 1])
@pytest.mark.parametrize("method", ["sparge", "xattention"])
def test_predictors_keep_half_the_blocks_and_most_of_the_mass(layer0, head, method):
    q, k, scale = layer0
    if method == "sparge":  # theta -1: the self-similarity rule off
        keep = R.predict_sparge(q, k, scale, 0.6, -1.0, is_causal=True)
    else:
        keep = R.predict_xattention(q, k, scale, 8, 0.6, True)
    kept, mass = _kept_and_mass(keep, q, k, scale, head)
    assert kept <= 0.55 and mass >= 0.75, (kept, mass)


def _head_rel_l1(keep, q, k, v, scale, h):
    """rel-L1 of one head's float64 attention over the kept blocks against dense."""
    s = (q[0, h].double() @ k[0, h].double().T) * scale
    future = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)
    inside = R.expand_block_mask(keep[:, h:h + 1], SEQ, SEQ)[0, 0]
    ref = torch.softmax(s.masked_fill(future, -math.inf), -1) @ v[0, h].double()
    out = torch.softmax(s.masked_fill(future | ~inside, -math.inf), -1) @ v[0, h].double()
    return ((out - ref).abs().sum() / ref.abs().sum()).item()


def test_local_keys_serve_a_sharp_local_head(sites):
    """Layer 1 head 3 attends its last few tokens: with the diagonal blocks alone a q-block's
    first rows lose their neighbours (the pooled scores rank that block low, so no tau brings it
    back); local_keys 64 keeps it, as a window would."""
    q, k, v = sites[1]
    scale = 1 / math.sqrt(q.shape[-1])
    without = R.predict_sparge(q, k, scale, 0.9, -1.0, is_causal=True)
    with_local = R.predict_sparge(q, k, scale, 0.9, -1.0, is_causal=True, local=64)
    kept, _ = _kept_and_mass(with_local, q, k, scale, 3)
    assert kept <= 0.45
    assert _head_rel_l1(without, q, k, v, scale, 3) > 0.03 > 0.02 > _head_rel_l1(with_local, q, k, v, scale, 3)
