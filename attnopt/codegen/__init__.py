"""Triton kernels and the per-architecture table (arch.py) that picks their formats and tiles."""
