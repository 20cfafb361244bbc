"""Shared benchmark plumbing: environment facts and result files."""

from __future__ import annotations

import datetime
import json
import os
import platform

import torch

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def env() -> dict:
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = None
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor() or "cpu")
    return {"device": dev, "cuda": torch.cuda.is_available(), "torch": torch.__version__, "triton": tv,
            "cpu_count": os.cpu_count(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def write(name: str, rows: list, extra: dict | None = None) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    with open(path, "w") as f:
        json.dump({"env": env(), **(extra or {}), "rows": rows}, f, indent=1)
    return path
