"""attnopt's decisions where PyTorch's own tooling looks.

- `TORCH_LOGS=attnopt` (or `+attnopt` for debug detail) prints every site's decision, through a
  log channel registered with torch._logging.
- With `TORCH_TRACE=<dir>`, each compiled graph's site records go into the structured compile
  trace as an `attnopt_sites` artifact, so tlparse shows them beside Inductor's output.
- `warn_once` logs a warning the first time its topic comes up in the process (a fact about the
  setup, such as CPU sites running the emulation, is said once, not per graph or per site).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading

log = logging.getLogger("attnopt")

_REGISTERED = False
_WARNED: set[str] = set()  # warn_once topics already logged in this process
_WARNED_LOCK = threading.Lock()


def warn_once(topic: str, msg: str, *args) -> bool:
    """Log `msg % args` as a warning unless `topic` was already warned about in this process;
    True when it was logged now."""
    with _WARNED_LOCK:
        if topic in _WARNED:
            return False
        _WARNED.add(topic)
    log.warning(msg, *args)
    return True


def _inside_torch_log_setup(internal) -> bool:
    """True while torch is itself parsing TORCH_LOGS: naming `attnopt` there imports attnopt, and
    torch adds the handlers once it returns, so initializing again here would add a second one."""
    code = internal._init_logs.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def register() -> None:
    """Register the `attnopt` TORCH_LOGS channel (once); honour TORCH_LOGS if it names it."""
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    try:
        from torch._logging import _internal

        _internal.register_log("attnopt", "attnopt")
        if "attnopt" in os.environ.get("TORCH_LOGS", "") and not _inside_torch_log_setup(_internal):
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
