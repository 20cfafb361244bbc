"""Sites whose tensors are on the CPU: the `on_cpu` option, and the one warning that says what it costs.

There is no quantized CPU kernel: a rewritten CPU site runs attnopt's pure-PyTorch emulation of
the GPU arithmetic, which shows the accuracy a GPU would give but is slower than the original
(measured against plain Inductor: 1.8-2.6x at 512 tokens, 6-8x at 2048). `on_cpu: "emulate"`
(the default, what CI and accuracy checks need) rewrites them anyway and says so once per process;
`on_cpu: "skip"` leaves them as they were, with the reason in the report.
"""

from __future__ import annotations

from ..logs import warn_once

COST = ("there is no quantized CPU kernel, so they run attnopt's pure-PyTorch emulation of the GPU "
        "arithmetic: accurate to what a GPU gives, but slower than the original model "
        "(measured 1.8-2.6x at 512 tokens, 6-8x at 2048, against plain torch.compile)")
HOW_TO_SKIP = 'the option {"on_cpu": "skip"} leaves CPU sites as they were'
SKIP_REASON = ("tensors on the CPU and on_cpu is 'skip' (attnopt's emulation of the GPU arithmetic "
               "would be slower than the original)")


def skip_reason(device_type: str, opts) -> str | None:
    """Why a site on `device_type` stays as it was under `opts.on_cpu`, or None."""
    if device_type == "cpu" and opts.on_cpu == "skip":
        return SKIP_REASON
    return None


def announce(device_type: str) -> None:
    """A site on `device_type` was rewritten: on the CPU, warn (once per process) what it costs
    and how to keep CPU sites as they were."""
    if device_type == "cpu":
        warn_once("on_cpu", "attnopt: rewriting sites whose tensors are on the CPU: %s; %s.", COST, HOW_TO_SKIP)


def emulated_sites(records) -> list:
    """The rewritten records that run on the CPU (the report's header says so)."""
    return [r for r in records if r.status == "rewritten" and (r.details or {}).get("device") == "cpu"]
