"""benchmarks/gpu_session.sh, checked without a GPU: its steps are selectable, its plan (DRY=1)
says what each would run and for how long, and the benchmarks it runs parse their arguments and
stop with one clear line where there is no CUDA GPU."""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
DEFAULT_ORDER = ["tests", "attention", "budget", "sparse", "linear", "training", "decode"]


def _plan(**env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.endswith("_S") and k not in ("STEPS", "OUT")}
    return subprocess.run(["bash", str(SCRIPT)], env={**full, "DRY": "1", **env}, capture_output=True, text=True,
                          timeout=60)


def _steps(out: str) -> dict[str, tuple[int, str]]:
    """step -> (limit seconds, command) from the plan's lines '  NAME (limit Ns): COMMAND'."""
    return {m[1]: (int(m[2]), m[3]) for m in re.finditer(r"^  (\w+) \(limit (\d+)s\): (.*)$", out, re.M)}


def test_script_parses():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_default_plan_runs_every_step_in_priority_order():
    r = _plan()
    assert r.returncode == 0, r.stderr
    steps = _steps(r.stdout)
    assert list(steps) == DEFAULT_ORDER
    assert sum(limit for limit, _ in steps.values()) <= 9 * 60 - 30, "the whole session within 9 minutes"
    assert steps["budget"][1].startswith("python3 benchmarks/launch_budget.py --gpu-times --out ")
    assert "-m gpu" in steps["tests"][1] and "tests/test_gpu_kernels.py" in steps["tests"][1]
    for name in ("attention", "sparse", "linear"):
        assert f"benchmarks/{name}.py --quick" in steps[name][1] and "--time-limit" in steps[name][1]
    assert "benchmarks/training_gpu.py --quick" in steps["training"][1] and "--time-limit" in steps["training"][1]
    assert "benchmarks/decode.py --quick" in steps["decode"][1] and "--time-limit" in steps["decode"][1]


def test_steps_are_selectable_with_their_own_seconds():
    r = _plan(STEPS="attention")
    assert r.returncode == 0, r.stderr
    steps = _steps(r.stdout)
    assert list(steps) == ["attention"] and steps["attention"][0] == 120
    r = _plan(STEPS="linear,attention", ATTN_S="77")
    steps = _steps(r.stdout)
    assert list(steps) == ["linear", "attention"] and steps["attention"][0] == 77
    assert "--time-limit 57 " in steps["attention"][1]  # its own clock starts after its imports


def test_unknown_step_or_bad_seconds_are_refused():
    r = _plan(STEPS="tests,atention")
    assert r.returncode == 2 and r.stdout == ""
    assert "unknown step 'atention'" in r.stderr and "tests, attention, budget, sparse, linear, training, decode" in r.stderr
    r = _plan(STEPS="sparse", SPARSE_S="1m")
    assert r.returncode == 2 and "seconds for sparse must be a positive integer, got '1m'" in r.stderr


def _benchmark(name: str):
    """benchmarks/<name>.py as a module (it puts benchmarks/ on sys.path for `common`)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["attention", "sparse", "linear", "training_gpu", "decode"])
def test_benchmark_parses_its_arguments_and_needs_cuda(name, monkeypatch, capsys):
    bench = _benchmark(name)
    args = bench.parse_args(["--quick", "--time-limit", "60", "--out-dir", "x"])
    assert args.quick and args.time_limit == 60 and args.out_dir == "x"
    if name == "attention":
        assert args.seqs == [4096, 16384, 32768] and args.dims == [128, 64]
    if name == "sparse":
        assert args.seqs == [16384] and 0.5 in args.sparsities
    if name == "training_gpu":
        assert args.seqs == [2048, 8192] and args.backward == "int8"
    if name == "decode":
        assert args.batches == [1, 8, 32] and args.contexts == [4096, 16384, 32768] and not args.accuracy
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--help"])
    assert e.value.code == 0 and "--time-limit" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--quick"])
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert f"benchmarks/{name}.py: needs a CUDA GPU" in str(e.value.code)
