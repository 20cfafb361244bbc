"""Triton split-KV decode attention over the quantized KV cache (attnopt.decode)."""
