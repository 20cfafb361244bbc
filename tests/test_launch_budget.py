"""Each op's GPU body stays within its launch and full-size-pass budget (benchmarks/launch_budget.py).

The body runs as a GPU runs it (Triton path forced; kernels under the interpreter here), once
to warm its caches, then counted: a new launch, or a torch-side pass over a Q- or
activation-sized tensor, on any row fails here before it costs GPU time.
"""

import importlib.util
import pathlib
import sys

import pytest

from attnopt.codegen.work_count import count_work


def _budget_module():
    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "launch_budget.py"
    spec = importlib.util.spec_from_file_location("attnopt_bench_launch_budget", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


LB = _budget_module()
CASES = list(LB.cases("cpu", LB.SMALL_SHAPES, LB.SMALL_LINEAR_SHAPES))


def _label(case):
    op, _, _, _, c = case
    return f"{op}-{c.get('quant')}-{c.get('pv', '')}-{c.get('sparsity') or 'dense'}-{c['phase']}".replace("--", "-")


# Rows whose body, formats and phase a per-op budget test already holds to stricter counts
# (exact launches, no aten op at all): slow here (`python -m pytest -m slow` runs them). The
# default run keeps every other row, and at least one per budget family (dense, predicted and
# static sparse, linear), so the benchmark's own measuring and budgets stay checked.
COVERED = {
    "attention-int8-fp8-dense-prefill": "test_attention_budget.py",
    "attention-int8-fp8-dense-decode": "test_attention_budget.py",
    "attention-fp8-fp8-dense-prefill": "test_attention_budget.py",
    "attention-fp4-fp4-dense-prefill": "test_attention_budget.py",
    **{f"attention-int8-fp16-{m}-prefill": "test_sparse_budget.py::test_sparse_call_budget" for m in LB.SPARSE},
    "linear-w8a8-dense-prefill": "test_linear_budget.py::test_8bit_launch_and_pass_budget",
    "linear-fp8-dense-prefill": "test_linear_budget.py::test_8bit_launch_and_pass_budget",
    **{f"linear-nvfp4-dense-{p}": "test_linear_nvfp4.py::test_two_launches_and_no_torch_side_pass"
       for p in ("prefill", "decode")},
}
ROWS = [pytest.param(c, id=_label(c), marks=[pytest.mark.slow] if _label(c) in COVERED else []) for c in CASES]


def test_covered_rows_exist():
    """A renamed row must not leave its COVERED entry behind (and the default run unguarded)."""
    assert set(COVERED) <= {_label(c) for c in CASES}


@pytest.mark.parametrize("case", ROWS)
def test_row_within_budget(case, monkeypatch):
    monkeypatch.setenv("ATTNOPT_IMPL", "triton")
    row = LB.measure(*case)
    assert row["within_budget"], (f"{_label(case)}: {row['launches']} launches {row['kernels']}, "
                                  f"{row['full_size_passes']} full-size passes {row['full_size_ops']}; "
                                  f"budget {row['budget']}")


def test_counter_sees_launches_passes_and_allocations():
    """The measuring stick itself: a known body gives known counts."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _double(X, Y, N, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + i, tl.load(X + i, mask=i < N) * 2, mask=i < N)

    def body(x):
        from torch.library import wrap_triton

        y = torch.empty_like(x)
        wrap_triton(_double)[(triton.cdiv(x.numel(), 64),)](x, y, x.numel(), BLOCK=64)
        t = y.view(-1).transpose(0, 0)  # views: no pass
        small = x[:4].sum()  # reads 4 elements: not full-size
        return t + small  # one full-size pass, one fresh output

    x = torch.randn(256)
    out, work = count_work(body, x, full_size=x.numel())
    torch.testing.assert_close(out, x * 2 + x[:4].sum())
    assert work.launches == ["_double"]
    assert work.full_size_passes == ["add"]
    assert work.extra_bytes >= x.numel() * 4  # y: allocated, not returned
