"""Split-K partial sums added up inside the kernel, deterministically, by the last program to
finish a tile (shared by the small-M paths of the 8-bit and W4A16 linears; the attention
statistics' key chunks take their tickets with the same helpers).

Why: summing the partials on the host (`part.sum(0)`, a bias add, a cast) costs three aten
launches and a pass over splits x M x N floats; float atomics would make the output depend on
the order the programs finish. Here each split stores its fp32 partial, then takes a ticket
from an int32 counter for its output tile with one atomic; the program that draws the last
ticket adds the partials in split order 0, 1, ... (the same order whichever program it is),
adds the bias, stores the output and sets the counter back to 0. So the counters are zero
between launches and need no zeroing launch per call: they are allocated (zeroed) once per
device and stream and reused (`tile_counters`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..casts import store_cast

_COUNTERS: dict = {}  # (device, stream) -> int32 counters, all zero between launches


def tile_counters(like: torch.Tensor, tiles: int) -> torch.Tensor:
    """`tiles` zeroed int32 ticket counters on `like`'s device. Eager calls share one buffer per
    device and stream (kernels on one stream run one after another, and each leaves its counters
    at zero). Traced calls (torch.compile inlining the op's body, fake tensors) allocate fresh
    zeros instead: a buffer kept across calls cannot be a graph's intermediate, so the compiled
    graph pays one small fill per call (tiles x 4 bytes)."""
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(like):
        return torch.zeros(tiles, dtype=torch.int32, device=like.device)
    dev = like.device
    stream = torch.cuda.current_stream(dev).stream_id if dev.type == "cuda" else 0
    key = (dev, stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < tiles:
        buf = _COUNTERS[key] = torch.zeros(max(tiles, 256, 2 * (buf.numel() if buf is not None else 0)),
                                           dtype=torch.int32, device=dev)
    return buf


@triton.jit
def take_ticket(counter):
    """After this program's partial stores: how many programs of the group were done before it."""
    tl.debug_barrier()  # every thread's stores precede the (released) ticket
    return tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")


@triton.jit
def reset_counter(counter):
    """The group's last program: the counter back to 0 for the next launch."""
    tl.atomic_xchg(counter, 0)


@triton.jit
def publish_partial(acc, part_ptrs, mask, counter):
    """Store this split's partial, then take a ticket: how many splits of the tile were done before."""
    tl.store(part_ptrs, acc, mask=mask)
    return take_ticket(counter)


@triton.jit
def sum_partials(first_ptrs, stride_split, mask, splits, counter, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The last program of a tile: the partials in split order (.cg: from L2, where the other
    programs' stores are), and the counter reset for the next launch."""
    total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for s in range(0, splits):
        total += tl.load(first_ptrs + s * stride_split, mask=mask, other=0.0, cache_modifier=".cg")
    reset_counter(counter)
    return total


@triton.jit
def store_output(acc, out_ptrs, mask, BIAS, offs_n, N, HAS_BIAS: tl.constexpr, EMULATE: tl.constexpr):
    """Epilogue: + bias (fp32), cast to the output's dtype, store."""
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptrs, store_cast(acc, out_ptrs.dtype.element_ty, EMULATE), mask=mask)


def split_count(k: int, block_k: int, granule: int, max_splits: int = 16) -> tuple[int, int]:
    """(splits, K per split) for a small-M launch: at least four `block_k`-deep steps per split,
    at most `max_splits` splits (a few rows then still fill the GPU); K per split a multiple of
    `granule` (a K block; a W4A16 group, which a split never cuts)."""
    splits = max(1, min(max_splits, k // (4 * block_k)))
    per_split = triton.cdiv(triton.cdiv(k, splits), granule) * granule
    return triton.cdiv(k, per_split), per_split
