"""Block-sparse attention: which key blocks each query block keeps (predict.py) and the block masks (masks.py)."""
