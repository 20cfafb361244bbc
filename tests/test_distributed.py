"""attnopt under torch.distributed: tensor parallelism (DTensor, heads split across ranks) and FSDP2,
two CPU processes over gloo. Each rank's attention is captured on its local heads and the output
matches the unsharded model."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch

WORKER = pathlib.Path(__file__).parent / "dist_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(mode: str) -> list[dict]:
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed not built")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "--master_addr=127.0.0.1", str(WORKER), mode]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    # two ranks print to one pipe: their lines can run together, so read each object after "RESULT "
    decoder = json.JSONDecoder()
    results = [decoder.raw_decode(part)[0] for part in r.stdout.split("RESULT ")[1:]]
    assert len(results) == 2, r.stdout[-2000:]
    return results


def test_tensor_parallel_heads_split_across_ranks():
    for res in _run("tp"):
        assert res["rel_l1"] < 0.02, res
        (site,) = res["sites"]
        assert site["status"] == "rewritten", site
        assert site["q_heads"] == 2  # 4 heads, split across 2 ranks


def test_fsdp2_sharded_model():
    for res in _run("fsdp"):
        assert res["rel_l1"] < 0.02, res
        assert res["sites"] and all(s["status"] == "rewritten" and s["q_heads"] == 4 for s in res["sites"]), res
