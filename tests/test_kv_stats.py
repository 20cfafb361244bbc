"""The K / V statistics launch split over key chunks (codegen/attention/stats.py), on CPU.

Long keys run as several programs per (batch, kv head) whose partials the last one merges in
chunk order. Small inputs would use one chunk, so these force several with a small STATS_CHUNK
and check: the same statistics as one chunk (up to fp32 summation order) and as float64, the same
bits on every call, the ticket counters back at zero, non-finite rows flagged on both sides of
chunk boundaries, and the attention op's output unchanged.
"""

import math

import pytest
import torch

from attnopt.codegen.attention import stats
from attnopt.codegen.attention.launch import attention_triton
from attnopt.codegen.attention.quantize import kv_stats, padded_head_dim
from attnopt.codegen.linear import splitk
from attnopt.ops.attention_ref import FP8_MAX

from helpers import rel_l1, run_traced_for_arch


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of one BLOCK_N step (64 keys at d <= 64) from 65 keys on."""
    monkeypatch.setattr(stats, "STATS_CHUNK", 64)


def _exact(k, v, qmax):
    """float64 statistics, every non-finite value counted as 0 (attention_ref's convention)."""
    kf = torch.where(k.isfinite(), k.double(), 0.0)
    vf = torch.where(v.isfinite(), v.double(), 0.0)
    vmean = vf.mean(-2)
    amax = (vf - vmean[..., None, :]).abs().amax(-2)
    vscale = torch.where(amax > 0, amax / qmax, 1.0)
    bad = ~(k.isfinite().all(-1) & v.isfinite().all(-1))
    return kf.mean(-2), vmean, vscale, bad.to(torch.uint8)


def _inputs(n, d=64, dv=48):
    k = (torch.randn(2, 3, n, d) + 0.5).half()
    v = (torch.randn(2, 3, n, dv) * 3 + 1).half()
    return k, v


@pytest.mark.parametrize("n", [65, 200, 333])
def test_chunks_match_one_chunk_and_float64(n, small_chunks):
    k, v = _inputs(n)
    block_n = stats.stats_block_n(padded_head_dim(64), padded_head_dim(48))
    chunks, per = stats.stats_chunks(n, block_n)
    assert chunks == math.ceil(n / 64) > 1 and per == 64
    got = kv_stats(k, v, True, True, FP8_MAX)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stats, "STATS_CHUNK", 1 << 20)
        one = kv_stats(k, v, True, True, FP8_MAX)
    for g, o, e in zip(got, one, _exact(k, v, FP8_MAX)):
        if g.dtype == torch.uint8:
            assert torch.equal(g, o) and torch.equal(g, e)
        else:  # fp32 sums in another order: a few ulps of the values summed
            torch.testing.assert_close(g, o, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-6)


def test_chunks_are_bitwise_repeatable_and_leave_counters_at_zero(small_chunks):
    k, v = _inputs(200)  # four chunks, the last partial
    first = kv_stats(k, v, True, True, FP8_MAX)
    for _ in range(3):
        again = kv_stats(k, v, True, True, FP8_MAX)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not splitk.tile_counters(k, 2 * 3).any()


@pytest.mark.parametrize("k_mean,v_mean,qmax", [(False, False, None), (True, False, None), (False, True, None),
                                                (False, True, 6.0)])
def test_chunks_in_every_variant(k_mean, v_mean, qmax, small_chunks):
    k, v = _inputs(200)
    kmean, vmean, vscale, bad = kv_stats(k, v, k_mean, v_mean, qmax)
    ek, ev, es, eb = _exact(k, v, qmax or 1.0)
    torch.testing.assert_close(kmean.double(), ek if k_mean else torch.zeros_like(ek), rtol=1e-5, atol=1e-6)
    assert (vmean is not None) == (v_mean or qmax is not None)
    if vmean is not None:
        torch.testing.assert_close(vmean.double(), ev, rtol=1e-5, atol=1e-6)
    assert (vscale is not None) == (qmax is not None)
    if vscale is not None:
        torch.testing.assert_close(vscale.double(), es, rtol=1e-5, atol=1e-6)
    assert torch.equal(bad, eb)
    assert not splitk.tile_counters(k, 6).any()


def test_non_finite_rows_across_chunk_boundaries(small_chunks):
    k, v = _inputs(333)
    for row in (0, 63, 64, 127, 128, 332):  # either side of the 64-key chunk edges, first and last key
        (k if row % 2 else v)[1, 2, row, row % 40] = float("nan") if row % 3 else float("inf")
    k[0, 0, 191, 1] = -float("inf")
    v[0, 1, 192, 47] = float("nan")
    kmean, vmean, vscale, bad = kv_stats(k, v, True, True, FP8_MAX)
    ek, ev, es, eb = _exact(k, v, FP8_MAX)
    assert torch.equal(bad, eb) and int(bad.sum()) == 8
    for g, e in ((kmean, ek), (vmean, ev), (vscale, es)):
        assert g.isfinite().all()
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("quant,pv", [("int8", "fp16"), ("fp8", "fp8")])
def test_attention_output_with_chunked_statistics(quant, pv, monkeypatch):
    q = torch.randn(1, 4, 77, 64).half()
    k, v = (torch.randn(1, 2, 333, 64).half() for _ in range(2))

    def call():
        out = torch.full((1, 4, 77, 64), float("nan"), dtype=torch.float16)
        return attention_triton(q, k, v, None, None, -math.inf, True, 333 - 77, 0.125, quant, pv, True, False,
                                "cpu", out=out)

    one = call()
    monkeypatch.setattr(stats, "STATS_CHUNK", 64)
    got = call()
    assert not got.isnan().any()
    assert rel_l1(got, one) <= 1e-3  # the same statistics up to fp32 summation order


_TRACE_CHUNKED = """
import attnopt.codegen.attention.quantize as _quantize
import attnopt.codegen.attention.stats as _stats
_stats.STATS_CHUNK = 16  # two 64-key chunks for the graph's 128 keys


def _logged_chunks(n, block_n, _chunks=_quantize.stats_chunks):
    got = _chunks(n, block_n)
    print("stats chunks", got[0], file=sys.stderr)
    return got


_quantize.stats_chunks = _logged_chunks
"""


def test_chunked_statistics_inline_into_the_graph(tmp_path):
    """torch.compile traces the chunked launch on fake tensors (the counters then come from a
    per-call zero fill, splitk.tile_counters): the dense sites' bodies still inline, chunked
    statistics kernel included."""
    from test_gpu_paths import _INLINE_TRITON

    got = run_traced_for_arch(tmp_path, _TRACE_CHUNKED + _INLINE_TRITON, 90)
    assert got["statuses"] == ["rewritten"] * 3
    assert "attnopt.attention.default" not in got["attnopt_ops"]  # the dense sites' bodies are inlined
    assert got["kernels"].count("_kv_stats_kernel") >= 2
    assert "stats chunks 2" in got["stderr"] and "stats chunks 1" not in got["stderr"]  # traced chunked
