"""Linear-layer GEMMs: W8A8 INT8 / FP8 (w8a8.py), W4A16 (w4a16.py) and W4A8 (w4a8.py)."""
