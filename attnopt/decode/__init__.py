"""Quantized KV cache storage and decode attention over it (issue 19): the layout and its
reference arithmetic (kv_quant), the reference decode attention (decode_ref) and the op that
picks the Triton split-KV kernel or the reference (op)."""
