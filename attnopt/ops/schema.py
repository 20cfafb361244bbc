"""The attention ops' schemas, stated once.

`attnopt::attention`, `attnopt::sparse_attention`, `attnopt::attention_probe` and
`attnopt::attention_train` take the same leading arguments (the operands, the mask, the scale and
the quantization); each op appends its own. The passes call the ops positionally, so names,
order and defaults here are the ops' API.
"""

from __future__ import annotations

# what every attention op takes first, in this order
ATTENTION_ARGS = ("Tensor q, Tensor k, Tensor v, Tensor? attn_bias, Tensor? keep_mask, float masked_value, "
                  "bool is_causal, SymInt causal_offset, float scale, str quant, str pv, bool smooth_k")


def attention_schema(*extra: str, returns: str = "Tensor") -> str:
    """A torch.library schema: ATTENTION_ARGS, then `extra` (e.g. "str arch"), returning `returns`
    (a Tensor unless told, e.g. "(Tensor, Tensor)")."""
    return "(" + ", ".join((ATTENTION_ARGS,) + extra) + ") -> " + returns


# what the attention and sparse_attention ops take last: a scheduled site's gate (None: ungated)
GATE_ARGS = ("Tensor? gate=None", "int gate_id=0")


def gate_closed(gate, gate_id: int) -> bool:
    """The reference path's check of a gate (the kernels read it on the device): whether this
    variant of a scheduled site is switched off at this step. Syncs with the device."""
    return gate is not None and int(gate.reshape(-1)[0].item()) != gate_id
