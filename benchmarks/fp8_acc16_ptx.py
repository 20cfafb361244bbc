"""Which tensor-core instruction Triton emits for an e4m3 dot accumulated in fp16 versus fp32,
per target, compiled without a GPU (docs/algorithms.md#fp16-accumulating-fp8-mma).

    python benchmarks/fp8_acc16_ptx.py [--arch 89 --arch 120 ...]

Must run without TRITON_INTERPRET.
"""

import argparse
import re

import triton
import triton.language as tl

_MMA = re.compile(r"\b((?:tcgen05\.mma|wgmma\.mma_async|mma\.sync)[\w:.]*)")


@triton.jit
def _e4m3_dot(a_ptr, b_ptr, c_ptr, ACC16: tl.constexpr):
    rows = tl.arange(0, 64)
    ks = tl.arange(0, 32)
    a = tl.load(a_ptr + rows[:, None] * 32 + ks[None, :])
    b = tl.load(b_ptr + ks[:, None] * 64 + rows[None, :])
    if ACC16:
        c = tl.dot(a, b, out_dtype=tl.float16)
    else:
        c = tl.dot(a, b)
    tl.store(c_ptr + rows[:, None] * 64 + rows[None, :], c)


def mma_instructions(capability: int, acc16: bool) -> list[str]:
    """The MMA instructions in the PTX of the probe dot for compute capability `capability` (89, 120...)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "c_ptr": "*fp16" if acc16 else "*fp32", "ACC16": "constexpr"}
    compiled = triton.compile(ASTSource(_e4m3_dot, sig, {"ACC16": acc16}), target=GPUTarget("cuda", capability, 32))
    return sorted(set(_MMA.findall(compiled.asm["ptx"])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, action="append", default=None, help="compute capability, e.g. 89")
    args = ap.parse_args()
    print(f"triton {triton.__version__}")
    for cap in args.arch or (89, 120, 90):
        for acc16 in (True, False):
            print(f"sm{cap} {'fp16' if acc16 else 'fp32'} accumulate: {', '.join(mma_instructions(cap, acc16))}")


if __name__ == "__main__":
    main()
