"""Training loops under backend="attnopt" track the uncompiled model (benchmarks/training.py: a
tiny Qwen3 with QK-norm, random init, a synthetic copy task)."""

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import training  # noqa: E402


def _mean(xs):
    return sum(xs) / len(xs)


def test_twenty_steps_with_int8_attention_backward_and_fp8_linears_track_eager():
    res = training.run(20, backward="int8", linear="fp8", seq=128)
    eager, ours = res["eager"], res["attnopt"]
    assert all(math.isfinite(x) for x in ours)
    assert _mean(eager[-5:]) < eager[0] - 0.5  # the loop does learn
    assert abs(_mean(ours[-5:]) / _mean(eager[-5:]) - 1) < 0.03, (eager, ours)
    sites = res["backend"].recorder.sites()
    att = [s for s in sites if s.kind == "attention"]
    lin = [s for s in sites if s.kind == "linear" and s.status == "rewritten"]
    assert len(att) == 2 and all(s.status == "rewritten" and s.details["backward"] == "int8" for s in att)
    assert lin, [(s.key, s.reason) for s in sites]


@pytest.mark.parametrize("backward", ["exact"])
def test_packed_documents_train_with_their_block_diagonal_mask(backward):
    """Two documents per row (position ids restart): the model's block-diagonal causal mask
    reaches the op as a keep mask, and the loop tracks eager."""
    res = training.run(3, backward=backward, linear="off", seq=256, packed=2)
    eager, ours = res["eager"], res["attnopt"]
    for a, b in zip(eager, ours):
        assert abs(a - b) <= 0.01 * abs(a), (eager, ours)
    att = [s for s in res["backend"].recorder.sites() if s.kind == "attention"]
    assert att and all(s.status == "rewritten" and "+keep" in s.details["mask"] for s in att)
