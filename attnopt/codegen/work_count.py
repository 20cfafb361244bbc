"""Count the work an op's GPU body does, on CPU: Triton launches, full-size aten passes, bytes allocated.

Why: without a GPU no speed can be measured, but the work a body asks of the GPU can. Every
Triton launch in attnopt goes through `torch.library.wrap_triton`; every other piece of GPU work
is an aten op, which a TorchDispatchMode sees. `count_work(fn)` runs `fn` once with both
watched and returns what it did:

- `launches`: the Triton kernels launched, by name (the launch itself runs with the mode
  paused, so the interpreter's own tensor traffic is not counted);
- `full_size_passes`: aten ops that read or write a tensor of at least `full_size` elements
  (views and allocations move no data and are not passes);
- `aten_ops`: every other aten op that moves data (on a GPU each is a launch too);
- `extra_bytes`: bytes of fresh storage the aten ops allocated, less what `fn` returns;
- `host_s`: wall time spent neither in a launch nor in an aten op's compute (Python and
  dispatch overhead: the per-call host cost a GPU would still pay).
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten

# ops that allocate or alias without moving data
_NO_DATA = {
    aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default, aten.new_empty.default,
    aten.new_empty_strided.default, aten.detach.default, aten.alias.default, aten.lift_fresh.default,
    aten._local_scalar_dense.default,
}


def _is_view(func) -> bool:
    return bool(getattr(func, "is_view", False)) or func in _NO_DATA


@dataclass
class Work:
    """What one call did (see the module docstring)."""

    launches: list = field(default_factory=list)
    full_size_passes: list = field(default_factory=list)
    aten_ops: list = field(default_factory=list)
    extra_bytes: int = 0
    host_s: float = 0.0

    def to_dict(self) -> dict:
        return {"launches": len(self.launches), "kernels": list(self.launches),
                "full_size_passes": len(self.full_size_passes), "full_size_ops": list(self.full_size_passes),
                "aten_ops": len(self.aten_ops), "extra_bytes": int(self.extra_bytes),
                "host_us": round(self.host_s * 1e6, 1)}


class _Watch(TorchDispatchMode):
    def __init__(self, work: Work, full_size: int):
        super().__init__()
        self.work, self.full_size = work, full_size
        self.allocated: list[tuple[int, int]] = []  # (storage data_ptr, bytes) of each fresh storage
        self.busy_s = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t0 = time.perf_counter()
        out = func(*args, **kwargs)
        self.busy_s += time.perf_counter() - t0
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        held = {t.untyped_storage().data_ptr() for t in ins}
        for t in outs:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in held and t.untyped_storage().nbytes():
                held.add(ptr)
                self.allocated.append((ptr, t.untyped_storage().nbytes()))
        if _is_view(func):
            return out
        name = str(func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else func)
        if any(t.numel() >= self.full_size for t in ins + outs):
            self.work.full_size_passes.append(name)
        else:
            self.work.aten_ops.append(name)
        return out


class _Launcher:
    """What a patched `wrap_triton(kernel)` returns: `[grid](*args)` and `.run(*args)` record, then launch."""

    def __init__(self, kernel, work: Work, timer: list):
        self.kernel, self.work, self.timer = kernel, work, timer

    def _launch(self, fn, args, kwargs):
        k = self.kernel
        while not hasattr(k, "__name__") and hasattr(k, "fn"):
            k = k.fn
        self.work.launches.append(getattr(k, "__name__", type(k).__name__))
        t0 = time.perf_counter()
        with _disable_current_modes():
            result = fn(*args, **kwargs)
        self.timer[0] += time.perf_counter() - t0
        return result

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._launch(_real_wrap(self.kernel)[grid], args, kwargs)

    def run(self, *args, **kwargs):
        return self._launch(_real_wrap(self.kernel).run, args, kwargs)


def _real_wrap(kernel):
    from torch._library.triton import wrap_triton

    return wrap_triton(kernel)


@contextlib.contextmanager
def _count_launches(work: Work, timer: list):
    """Every attnopt module launches through its own `wrap_triton` name: patch each for the call
    (and torch.library's, for code that imports it at call time)."""
    from torch.library import wrap_triton

    patched = [m for name, m in list(sys.modules.items())
               if (name.startswith("attnopt.") or name == "torch.library")
               and getattr(m, "wrap_triton", None) is wrap_triton]
    for m in patched:
        m.wrap_triton = lambda kernel: _Launcher(kernel, work, timer)
    try:
        yield
    finally:
        for m in patched:
            m.wrap_triton = wrap_triton


def count_work(fn, *args, full_size: int, **kwargs) -> tuple[object, Work]:
    """Run `fn(*args, **kwargs)` once and return (its result, the Work it did)."""
    work = Work()
    launch_s = [0.0]
    watch = _Watch(work, full_size)
    t0 = time.perf_counter()
    with _count_launches(work, launch_s), watch:
        result = fn(*args, **kwargs)
    wall = time.perf_counter() - t0
    returned = {t.untyped_storage().data_ptr() for t in tree_leaves(result) if isinstance(t, torch.Tensor)}
    # the returned storage was allocated once, by its last allocation at that address
    last = {ptr: i for i, (ptr, _) in enumerate(watch.allocated)}
    work.extra_bytes = sum(n for i, (ptr, n) in enumerate(watch.allocated) if not (ptr in returned and last[ptr] == i))
    work.host_s = max(wall - launch_s[0] - watch.busy_s, 0.0)
    return result, work
