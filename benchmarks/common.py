"""Shared benchmark plumbing: environment facts and result files."""

from __future__ import annotations

import datetime
import json
import os
import platform

import torch

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - missing, or failing to import beside this torch (timm's torchvision)
        return None


def env(short: bool = False) -> dict:
    """The device and library versions a result was measured with (short: what a table row names)."""
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor() or "cpu")
    facts = {"device": dev, "torch": torch.__version__, "triton": _version("triton")}
    if short:
        return facts
    return {**facts, "cuda": torch.cuda.is_available(), "transformers": _version("transformers"),
            "diffusers": _version("diffusers"), "cpu_count": os.cpu_count(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def write_text(path: str, text: str) -> None:
    """Replace a file whole (temporary file + rename): a run killed mid-write leaves the old one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write(name: str, rows: list, extra: dict | None = None, out_dir: str | None = None) -> str:
    """Write rows (with the environment) as JSON under out_dir (default RESULTS); returns the path."""
    out_dir = out_dir or RESULTS
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    write_text(path, json.dumps({"env": env(), **(extra or {}), "rows": rows}, indent=1))
    return path
