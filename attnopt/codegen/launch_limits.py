"""Whether a compiled kernel can launch on an architecture: its registers, threads, shared and
tensor memory against the hardware's per-block limits.

A GPU refuses such a launch (Triton raises OutOfResources when it loads the kernel; its
autotuner then silently drops the config). Checking the compiler's numbers here finds that on a
CPU, before a GPU is lent.

The limits, from NVIDIA's documentation:
- 64K 32-bit registers per block and at most 255 per thread, on every compute capability from
  8.0 to 12.0; at most 1024 threads per block (CUDA C++ Programming Guide, "Compute
  Capabilities", technical specifications table: docs.nvidia.com/cuda/cuda-programming-guide/
  05-appendices/compute-capabilities.html). Registers are handed out per warp in units of 256
  (the occupancy calculator's register allocation unit).
- Shared memory per block (dynamic, opt-in) is the arch table's `smem_kb` (codegen/arch.py):
  the SM's largest shared-memory carve-out less the 1 KB the system reserves per block ("The
  1 KB of shared memory not made available to a thread block is reserved for system use",
  programming guide, shared memory of compute capability 8.x).
  8.0 (A100): carve-out up to 164 KB -> 163 KB (docs.nvidia.com/cuda/ampere-tuning-guide/,
  "Unified Shared Memory/L1/Texture Cache"); 8.6 and 8.9: up to 100 KB -> 99 KB ("allows a
  single thread block to address up to 99 KB", programming guide 8.x; Ada tuning guide,
  docs.nvidia.com/cuda/ada-tuning-guide/); 9.0 (H100): 228 KB -> 227 KB
  (docs.nvidia.com/cuda/hopper-tuning-guide/); 10.0 (B200): 228 KB -> 227 KB
  (docs.nvidia.com/cuda/blackwell-tuning-guide/); 12.0: 99 KB (the technical specifications
  table).
- Tensor memory (10.0): 512 columns of 128 lanes x 32 bits per SM (PTX ISA, "Tensor Memory";
  Triton's loader checks the same 512).
"""

from __future__ import annotations

REGS_PER_BLOCK = 64 * 1024
REGS_PER_THREAD = 255
REG_ALLOC_UNIT = 256  # registers per warp are allocated in multiples of this
THREADS_PER_BLOCK = 1024
TMEM_COLUMNS = 512
WARP = 32


def regs_per_block(regs_per_thread: int, warps: int) -> int:
    """Registers a block of `warps` warps takes from the register file (per-warp rounding)."""
    per_warp = -(-regs_per_thread * WARP // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    return per_warp * warps


def launch_problems(spec, regs: int | None, warps: int, shared: int, tmem: int | None = None) -> list[str]:
    """Why a kernel with these resources cannot launch on `spec` (codegen/arch.ArchSpec); empty
    when it can. `regs` None (unknown) skips the register checks."""
    problems = []
    if warps * WARP > THREADS_PER_BLOCK:
        problems.append(f"{warps * WARP} threads per block > {THREADS_PER_BLOCK}")
    if regs is not None:
        if regs > REGS_PER_THREAD:
            problems.append(f"{regs} registers per thread > {REGS_PER_THREAD}")
        if regs_per_block(regs, warps) > REGS_PER_BLOCK:
            problems.append(f"{regs} registers x {warps * WARP} threads = {regs_per_block(regs, warps)} "
                            f"registers per block > {REGS_PER_BLOCK}")
    if shared > spec.smem_kb * 1024:
        problems.append(f"{shared} bytes ({shared / 1024:.1f} KB) of shared memory > {spec.name}'s "
                        f"{spec.smem_kb} KB per block")
    if tmem and tmem > TMEM_COLUMNS:
        problems.append(f"{tmem} tensor-memory columns > {TMEM_COLUMNS}")
    return problems
