"""The quantized attention kernel (kernel.py), its launcher (launch.py) and Q/K/V quantization (quantize.py)."""
