"""The calibration cost model: per-arch time estimates that rank formats and sparsity as a GPU
would, and measured benchmark ratios in their place where a GPU benchmark file has them."""

import json
import pathlib

import pytest

from attnopt.calibration import cost_model as C
from attnopt.codegen.arch import ARCHS

ROOT = pathlib.Path(__file__).resolve().parents[1]
PREFILL = dict(batch=1, q_heads=32, kv_heads=8, q_len=16384, k_len=16384, head_dim=128, causal=True)


def test_throughput_rows_are_the_arch_tables_rows_and_rates_exist_for_every_offered_format():
    assert set(C.THROUGHPUT) == set(ARCHS)
    for arch in ARCHS:
        tp = C.THROUGHPUT[arch]
        for quant, pv in C.attention_formats(arch):
            assert tp.rate(quant) > 0 and tp.rate(pv) > 0
        for fmt in C.linear_formats(arch):
            C.linear_time(arch, 64, 256, 256, fmt)  # every offered format has an estimate
        assert tp.int8 >= tp.fp16 and tp.hbm > 0


def test_formats_the_arch_lacks_are_not_offered():
    assert ("int8", "fp8") not in C.attention_formats("sm80") and "fp8" not in C.linear_formats("sm86")
    assert ("fp4", "fp4") in C.attention_formats("sm100") and ("fp4", "fp4") not in C.attention_formats("sm90")
    assert ("none", "fp8") not in C.attention_formats("sm90")  # a quantized P.V needs a quantized QK^T
    with pytest.raises(ValueError, match="not offered on sm80"):
        C.attention_time("sm80", **PREFILL, quant="fp8", pv="fp8")
    with pytest.raises(ValueError, match="not offered on sm86"):
        C.linear_time("sm86", 16, 128, 128, "fp8")
    with pytest.raises(ValueError, match="unknown arch"):
        C.linear_time("sm70", 16, 128, 128, "none")


def test_quantized_prefill_attention_beats_16_bit_and_dense_16_bit_is_the_original():
    orig = C.original_attention_time("sm90", **PREFILL)
    int8 = C.attention_time("sm90", **PREFILL, quant="int8", pv="fp16")
    fp8pv = C.attention_time("sm90", **PREFILL, quant="int8", pv="fp8")
    assert fp8pv < int8 < orig
    assert C.attention_time("sm90", **PREFILL, quant="int8", pv="auto") == fp8pv  # sm90's P.V default
    assert C.CostModel("sm80").attention_time(**PREFILL, quant="int8", pv="auto") == \
        C.attention_time("sm80", **PREFILL, quant="int8", pv="fp16")
    # QK^T at twice the 16-bit rate, P.V at the same: 2 / 1.5 = 1.33x at most (plus the passes)
    assert 1.15 < orig / int8 < 4 / 3
    assert C.attention_time("sm90", **PREFILL, quant="none", pv="fp16") == orig  # nothing to quantize: 1 launch
    names = [p.name for p in C.attention_phases("sm90", **PREFILL, quant="int8", pv="fp16")]
    assert names == ["statistics", "quantize", "attention"]  # README's three launches


def test_kept_blocks_scale_the_kernels_compute_and_predictors_add_a_launch():
    full = C.attention_phases("sm90", **PREFILL, quant="int8", pv="fp8")[-1]
    half = C.attention_phases("sm90", **PREFILL, quant="int8", pv="fp8", kept=0.5)[-1]
    assert half.compute_s == pytest.approx(0.5 * full.compute_s, rel=1e-12)
    assert full.compute_s > full.memory_s  # long prefill is compute-bound
    for method in C.PREDICTORS:
        phases = C.attention_phases("sm90", **PREFILL, quant="int8", pv="fp8", kept=0.5, method=method)
        assert len(phases) == 4 and phases[2].name == f"predict {method}"
        # a fraction of the attention (xattention's two 1/8-stride 16-bit passes: ~1/4 of 8-bit dense)
        assert 0 < phases[2].time < 0.3 * full.time
    window = C.attention_time("sm90", **PREFILL, quant="int8", pv="fp8", kept=0.5, method="window")
    assert window < C.attention_time("sm90", **PREFILL, quant="int8", pv="fp8", kept=0.5, method="sparge")
    xa8 = C.attention_time("sm90", **PREFILL, quant="int8", pv="fp8", kept=0.5, method="xattention")
    xa16 = C.attention_time("sm90", **PREFILL, quant="int8", pv="fp8", kept=0.5, method="xattention",
                            params={"stride": 16})
    assert xa16 < xa8  # a wider stride scores fewer antidiagonals


def test_causal_visits_about_half_the_blocks_and_decode_nearly_all():
    assert C.visited_fraction(16384, 16384, True) == pytest.approx(0.5, abs=0.01)
    assert C.visited_fraction(256, 256, True) == 0.75  # 2 q-blocks x 4 kv-blocks: 2 + 4 of 8
    assert C.visited_fraction(1, 4096, True) == 1.0 and C.visited_fraction(300, 500, False) == 1.0
    causal = C.original_attention_time("sm90", **PREFILL)
    full = C.original_attention_time("sm90", **{**PREFILL, "causal": False})
    assert causal / full == pytest.approx(0.5, abs=0.02)


def test_decode_attention_is_memory_bound_and_quantizing_it_costs_extra_passes():
    shape = dict(PREFILL, q_len=1, k_len=4096)
    phases = C.attention_phases("sm90", **shape, quant="int8", pv="fp8")
    assert all(p.memory_s >= p.compute_s for p in phases)
    assert C.attention_time("sm90", **shape, quant="int8", pv="fp8") > C.original_attention_time("sm90", **shape)


def test_decode_linear_is_memory_bound_w4a16_wins_there_and_the_8_bit_gemm_wins_prefill():
    for arch in ("sm80", "sm90", "sm120"):
        assert C.linear_time(arch, 1, 4096, 4096, "w4a16") < C.linear_time(arch, 1, 4096, 4096, "w8a8") \
            < C.linear_time(arch, 1, 4096, 4096, "none")
        assert C.linear_time(arch, 4096, 4096, 4096, "w8a8") < C.linear_time(arch, 4096, 4096, 4096, "w4a16")
    dec = C.linear_phases("sm90", 1, 4096, 4096, "none")[0]
    assert dec.memory_s > 10 * dec.compute_s
    assert len(C.linear_phases("sm90", 64, 4096, 4096, "w8a8")) == 1  # activation quantized in the prologue
    assert len(C.linear_phases("sm90", 65, 4096, 4096, "w8a8")) == 2  # a pre-kernel beyond 64 rows


def test_cpu_plans_with_sm80_rates_and_every_emulated_format():
    assert C.THROUGHPUT["cpu"].fp16 == C.THROUGHPUT["sm80"].fp16 and C.THROUGHPUT["cpu"].hbm == C.THROUGHPUT["sm80"].hbm
    assert C.original_attention_time("cpu", **PREFILL) == C.original_attention_time("sm80", **PREFILL)
    assert set(C.attention_formats("cpu")) >= {("int8", "fp16"), ("fp8", "fp8"), ("fp4", "fp4")}


def _attention_file(tmp_path, arch="sm90", fp8_ms=0.5):
    rows = [{"variant": v, "seq": 16384, "head_dim": 128, "causal": True, "batch": 2, "heads": 32, "ms": ms}
            for v, ms in (("sdpa flash", 2.0), ("attnopt int8+f16pv", 1.6), ("attnopt int8+fp8pv", fp8_ms),
                          ("sdpa cudnn", 1.9))]
    rows.append({"variant": "attnopt fp8+fp8pv", "seq": 4096, "head_dim": 64, "causal": False, "error": "x"})
    path = tmp_path / f"attention_{arch}_GPU.json"
    path.write_text(json.dumps({"env": {}, "arch": arch, "rows": rows}))
    return path


def _linear_file(tmp_path):
    rows = [{"kind": "gemm", "M": m, "N": 4096, "K": 4096, "variant": v, "ms": ms}
            for m, v, ms in ((1, "torch bf16", 0.02), (1, "attnopt w4a16", 0.01), (1, "attnopt w8a8", 0.03),
                             (4096, "torch bf16", 0.2), (4096, "attnopt w8a8", 0.1))]
    rows.append({"kind": "llama-block", "seq": 1, "variant": "eager", "ms": 3.0})
    path = tmp_path / "linear_sm90.json"
    path.write_text(json.dumps({"env": {}, "arch": "sm90", "rows": rows}))
    return path


def test_a_measured_file_replaces_the_format_ratio_and_leaves_the_rest_analytical(tmp_path):
    ana = C.CostModel("sm90")
    meas = C.CostModel.from_benchmark([_attention_file(tmp_path), _linear_file(tmp_path)])
    assert ana.source == "analytical" and meas.source == "measured: attention_sm90_GPU.json, linear_sm90.json"
    orig = meas.original_attention_time(**PREFILL)
    assert orig == ana.original_attention_time(**PREFILL)  # the baseline stays analytical
    # measured 0.5 / 2.0 = 4x, where the analytical model says ~1.8x
    assert meas.attention_time(**PREFILL, quant="int8", pv="fp8") == pytest.approx(orig / 4, rel=1e-9)
    assert ana.attention_time(**PREFILL, quant="int8", pv="fp8") > orig / 2
    # the nearest measured shape serves another length; sparsity still scales as counted
    other = dict(PREFILL, q_len=8192, k_len=8192)
    o2 = meas.original_attention_time(**other)
    assert meas.attention_time(**other, quant="int8", pv="fp16") == pytest.approx(o2 * 0.8, rel=1e-9)
    sparse = meas.attention_time(**PREFILL, quant="int8", pv="fp8", kept=0.5, method="sparge")
    ratio = ana.attention_time(**PREFILL, quant="int8", pv="fp8", kept=0.5, method="sparge") / \
        ana.attention_time(**PREFILL, quant="int8", pv="fp8")
    assert sparse == pytest.approx(orig / 4 * ratio, rel=1e-9)
    # formats the file lacks, and decode, stay analytical
    assert meas.attention_time(**PREFILL, quant="fp8", pv="fp8") == ana.attention_time(**PREFILL, quant="fp8", pv="fp8")
    dec = dict(PREFILL, q_len=1)
    assert meas.attention_time(**dec, quant="int8", pv="fp8") == ana.attention_time(**dec, quant="int8", pv="fp8")
    # linears: measured w8a8 at M=1 is slower than 16-bit (1.5x) though the analytical model says faster
    assert meas.linear_time(1, 4096, 4096, "w8a8") == pytest.approx(1.5 * ana.linear_time(1, 4096, 4096, "none"))
    assert ana.linear_time(1, 4096, 4096, "w8a8") < ana.linear_time(1, 4096, 4096, "none")
    assert meas.linear_time(2048, 4096, 4096, "w8a8") == pytest.approx(0.5 * ana.linear_time(2048, 4096, 4096, "none"))
    assert meas.linear_time(1, 4096, 4096, "fp8") == ana.linear_time(1, 4096, 4096, "fp8")


def test_a_benchmark_file_from_another_arch_or_without_times_is_refused(tmp_path):
    with pytest.raises(ValueError, match="measured on sm90, not sm80"):
        C.CostModel("sm80", measured=_attention_file(tmp_path))
    empty = tmp_path / "sparse_sm90.json"
    empty.write_text(json.dumps({"arch": "sm90", "rows": [{"seq": 1, "variant": "predictor sparge", "ms": 1.0}]}))
    with pytest.raises(ValueError, match="no attention or GEMM times"):
        C.CostModel("sm90", measured=empty)


def test_variant_names_follow_the_benchmark_scripts():
    """The names the measured mode looks up are the ones the benchmark scripts write."""
    src = (ROOT / "benchmarks" / "attention.py").read_text() + (ROOT / "benchmarks" / "linear.py").read_text()
    for name in list(C.ATTENTION_VARIANTS) + list(C.LINEAR_VARIANTS) + [C.ATTENTION_BASELINE, C.LINEAR_BASELINE]:
        assert f'"{name}"' in src, name
