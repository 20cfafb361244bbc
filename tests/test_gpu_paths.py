"""The paths a GPU takes, run on CPU: inlined op bodies, the Triton impl under the interpreter, an
emulated arch (attnopt/switches.py); and what must happen when a rewrite goes wrong (the fake
impls reject bad operands, internal errors are loud and never cached, missing ops are named)."""

import json
import os
import tempfile
import warnings

import pytest
import torch
import torch.nn.functional as F

import attnopt
from attnopt import switches
from attnopt.ops.attention_ref import attention_exact
from attnopt.ops.checks import OperandError
from attnopt.passes import manager

from helpers import randn, rel_l1


class TwoSites(torch.nn.Module):
    """Two attention sites with the same structure (so inlined bodies trace to the same names)."""

    def __init__(self):
        super().__init__()
        self.a0, self.a1 = torch.nn.Identity(), torch.nn.Identity()

    def forward(self, q, k, v):
        o0 = self.a0(F.scaled_dot_product_attention(q, k, v))
        o1 = self.a1(F.scaled_dot_product_attention(q * 1.5, k, v))
        return o0, o1


class Attn(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True) * 2


def _backend(opts, inline):
    be = attnopt.backend(opts, inductor_config={"fx_graph_cache": False})
    be.ctx.inline = inline
    return be


def _sparge_plan(tau0, tau1):
    return {"schema_version": 1, "sites": {
        "#0": {"kind": "attention", "sparsity": {"method": "sparge", "tau": [tau0, tau0], "theta": [-1.0, -1.0]}},
        "#1": {"kind": "attention", "sparsity": {"method": "sparge", "tau": [tau1, tau1], "theta": [-1.0, -1.0]}}}}


def _sparge_site(q, k, v, tau):
    """What one sparge site computes with per-head tau (the op called eagerly: never inlined)."""
    sp = json.dumps({"method": "sparge", "tau": [tau, tau], "theta": [-1.0, -1.0], "topk": None, "sink": True},
                    sort_keys=True)
    return torch.ops.attnopt.sparse_attention(q, k, v, None, None, float("-inf"), False, 0, q.shape[-1] ** -0.5,
                                              "int8", "fp16", True, "cpu", "auto", sp)


def test_inlined_sites_keep_their_own_per_site_constants():
    """Regression: inlined bodies named their constants by position, so two sites of the same
    structure overwrote each other's per-head parameters (every site ran with the last plan's)."""
    q, k, v = (randn(1, 2, 256, 32) for _ in range(3))
    opts = {"attention": {"min_seq_len": 0, "sparsity": {"method": "sparge"}}, "plan": _sparge_plan(0.05, 1.0)}
    want = (_sparge_site(q, k, v, 0.05), _sparge_site(q * 1.5, k, v, 1.0))
    wrong = _sparge_site(q, k, v, 1.0)  # site 0 with site 1's parameters
    assert rel_l1(want[0], wrong) > 0.2  # the plans really differ at site 0
    for inline in ("never", "always"):
        torch._dynamo.reset()
        be = _backend(opts, inline)
        with torch.no_grad():
            out = torch.compile(TwoSites(), backend=be)(q, k, v)
        assert [s.status for s in be.recorder.sites()] == ["rewritten", "rewritten"]
        # inlined, Inductor keeps fp32 intermediates where the eager op rounds to bf16: ~1e-2
        for i in range(2):
            assert rel_l1(out[i], want[i]) < 0.03, f"site {i} (inline={inline}) runs other parameters"
