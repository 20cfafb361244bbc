"""The model's output error under any per-site choice, without recompiling per choice.

Calibration compiles the model once with a probe op at every site (ops/probe.py). A probe
normally computes what its site was compiled to; with an override registered, it asks this
module what the site would compute under the choice being evaluated (the same ops the compiled
model calls: attnopt::attention, attnopt::sparse_attention, the linear references), so each
candidate plan costs one run of the model per batch, not a compile.

Errors are rel-L1 of the model's outputs (every floating tensor it returns) against the
unmodified model run eagerly on the same batch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence

import torch

from ..metrics import compare_outputs
from ..ops import linear_ref as L
from ..ops import probe
from ..ops.probe import baseline_call

ORIGINAL = {"original": True}  # an attention site left as it was


def attention_output(call: Mapping, choice: Mapping, site: Mapping) -> torch.Tensor:
    """What one attention site computes under `choice` on the captured `call` inputs.
    choice: {"original": True} | {"quant", "pv", "sparsity": params or None};
    site: the compiled site's fixed settings (smooth_k, smooth_q, arch)."""
    c = call
    if choice.get("original"):
        return baseline_call(c["q"], c["k"], c["v"], c["attn_bias"], c["keep_mask"], c["masked_value"],
                             c["is_causal"], c["causal_offset"], c["scale"], c.get("softcap", 0.0))()
    head = (c["q"], c["k"], c["v"], c["attn_bias"], c["keep_mask"], float(c["masked_value"]), bool(c["is_causal"]),
            int(c["causal_offset"]), float(c["scale"]), choice["quant"], choice["pv"], bool(site["smooth_k"]))
    sp = choice.get("sparsity")
    if sp is None:
        return torch.ops.attnopt.attention(*head, bool(site["smooth_q"]), site["arch"], "auto",
                                           float(c.get("softcap", 0.0)))
    return torch.ops.attnopt.sparse_attention(*head, site["arch"], "auto", json.dumps(sp, sort_keys=True),
                                              float(c.get("softcap", 0.0)))


class LinearFormats:
    """Each linear's quantized weights, made once per (linear, format); x -> the format's output
    with the reference arithmetic of attnopt's linear ops."""

    def __init__(self, small_m: int):
        self.small_m = small_m
        self._weights: dict[tuple, tuple] = {}

    def output(self, key: str, fmt: str, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        if fmt == "none":
            return torch.nn.functional.linear(x, weight, bias)
        wk = (key, fmt, weight.data_ptr(), tuple(weight.shape))
        if wk not in self._weights:
            self._weights[wk] = L.quantize_format(weight, fmt)
        return L.format_output(x, self._weights[wk], bias, fmt, self.small_m)


def run_batches(fn: Callable, batches: Sequence) -> list:
    with torch.no_grad():
        return [fn(**b) if isinstance(b, Mapping) else fn(*b) for b in batches]


class ModelRunner:
    """The calibration-compiled model, run under a per-site choice.

    `choice`: site key -> attention choice dict (see attention_output) or linear format string;
    sites missing from it run as they were (original attention, 16-bit linears)."""

    def __init__(self, model, compiled, sink: str, sites: Mapping[str, Mapping], small_m: int):
        self.model, self.compiled, self.sink, self.sites = model, compiled, sink, sites
        self.linears = LinearFormats(small_m)
        self.runs = 0  # model runs made (calibration cost, reported)
        self._refs: dict[int, list] = {}

    def reference(self, batches: Sequence) -> list:
        """The unmodified model's outputs (eager), once per batch list."""
        key = id(batches)
        if key not in self._refs:
            self._refs[key] = run_batches(self.model, batches)
        return self._refs[key]

    def outputs(self, choice: Mapping[str, object], batches: Sequence) -> list:
        def override(key: str, call: dict):
            linear = call.get("kind") == "linear"
            ch = choice.get(key, "none" if linear else ORIGINAL)
            if linear:
                out = self.linears.output(key, ch, call["x"], call["weight"], call["bias"])
            else:
                out = attention_output(call, ch, self.sites[key])
            return out.contiguous()  # the layout the op's fake promised the compiled graph

        probe.register_override(self.sink, override)
        try:
            self.runs += len(batches)
            return run_batches(self.compiled, batches)
        finally:
            probe.register_override(self.sink, lambda key, call: None)

    def close(self) -> None:
        """Drop the probes' hooks and the compiled model."""
        probe.unregister_sink(self.sink)
        torch._dynamo.reset()

    def errors(self, choice: Mapping[str, object], batches: Sequence) -> list[float]:
        """Per batch, the model output's rel-L1 under `choice` against the unmodified model."""
        refs = self.reference(batches)
        return [compare_outputs(o, r)["rel_l1"] for o, r in zip(self.outputs(choice, batches), refs)]
