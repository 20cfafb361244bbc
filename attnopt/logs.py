"""attnopt's decisions where PyTorch's own tooling looks.

- `TORCH_LOGS=attnopt` (or `+attnopt` for debug detail) prints every site's decision, through a
  log channel registered with torch._logging.
- With `TORCH_TRACE=<dir>`, each compiled graph's site records go into the structured compile
  trace as an `attnopt_sites` artifact, so tlparse shows them beside Inductor's output.
"""

from __future__ import annotations

import json
import logging
import os

log = logging.getLogger("attnopt")

_REGISTERED = False


def register() -> None:
    """Register the `attnopt` TORCH_LOGS channel (once); honour TORCH_LOGS if it names it."""
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    try:
        from torch._logging import _internal

        _internal.register_log("attnopt", "attnopt")
        if "attnopt" in os.environ.get("TORCH_LOGS", ""):
            _internal._init_logs()  # TORCH_LOGS was parsed before our channel existed
    except (ImportError, AttributeError, ValueError):  # an older torch: plain logging still works
        pass


def trace_sites(graph_index: int, records: list) -> None:
    """Put one compiled graph's site records into the structured compile trace."""
    try:
        from torch._logging import trace_structured
    except ImportError:
        return
    trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": "attnopt_sites", "encoding": "json"},
        payload_fn=lambda: json.dumps({"graph": graph_index, "sites": [r.to_dict() for r in records]}),
    )
