"""Environment switches that make the GPU-only code paths run on a CPU (the one place that reads them).

On a GPU, attnopt inlines its ops' bodies into Inductor's graph and those bodies launch Triton
kernels; on a CPU neither happens by default. So that CI (which has no GPU) executes the very
code a GPU runs, three opt-in variables force those paths:

- `ATTNOPT_INLINE=auto|always|never`: inline the ops' bodies into the compiled graph on CUDA only
  (`auto`, the default), for every device (`always`), or never (`never`: extern op calls).
- `ATTNOPT_IMPL=auto|triton|reference`: the ops' bodies launch the Triton kernels on CUDA and run
  the pure-PyTorch reference elsewhere (`auto`); `triton` forces the kernels (on CPU tensors they
  run under Triton's interpreter, so `TRITON_INTERPRET=1` must be set before attnopt is imported);
  `reference` forces the reference everywhere.
- `ATTNOPT_ARCH=sm80|sm86|sm89|sm90|sm100|sm120`: the GPU architecture a CPU run emulates when the
  `arch` option is "auto" (formats, tiles and kernel variants of that row of codegen/arch.py). It
  never overrides a real GPU's own arch.

And one that turns a cache off:

- `ATTNOPT_CAPTURE_CACHE=on|off`: keep the capture and attention passes' result on disk beside
  Inductor's caches, so a warm start skips the aten trace (`passes/capture_cache.py`; on by
  default; the test suite turns it off, except in the cache's own tests, because a served graph
  skips the passes that tests monkeypatch).

Values are read on every call (tests change them with monkeypatch) and a bad one raises
`attnopt.ConfigError` naming the variable.
"""

from __future__ import annotations

import os

INLINE_MODES = ("auto", "always", "never")
IMPLS = ("auto", "triton", "reference")


def _read(name: str, allowed: tuple[str, ...], default: str) -> str:
    value = os.environ.get(name, "").strip() or default
    if value not in allowed:
        from .config import ConfigError

        raise ConfigError(f"${name}", value, " | ".join(repr(a) for a in allowed))
    return value


def inline_mode() -> str:
    """ATTNOPT_INLINE: 'auto' (inline on CUDA only), 'always' or 'never'."""
    return _read("ATTNOPT_INLINE", INLINE_MODES, "auto")


def impl() -> str:
    """ATTNOPT_IMPL: 'auto' (Triton on CUDA, reference elsewhere), 'triton' or 'reference'."""
    return _read("ATTNOPT_IMPL", IMPLS, "auto")


def capture_cache() -> bool:
    """ATTNOPT_CAPTURE_CACHE: 'on' (the default) or 'off'."""
    return _read("ATTNOPT_CAPTURE_CACHE", ("on", "off"), "on") == "on"


# the GPU rows of codegen/arch.py's table (switches sits below codegen, so the names are listed
# here; codegen/arch.py refuses to import if its table disagrees)
GPU_ARCHS = ("sm80", "sm86", "sm89", "sm90", "sm100", "sm120")


def emulated_arch() -> str | None:
    """ATTNOPT_ARCH: the GPU arch CPU runs emulate (None: CPU runs use the 'cpu' row)."""
    value = os.environ.get("ATTNOPT_ARCH", "").strip()
    if not value:
        return None
    return _read("ATTNOPT_ARCH", GPU_ARCHS, "")


def interpreted() -> bool:
    """Triton kernels run through Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(x, arch: str, impl_arg: str) -> bool:
    """Whether an op's body launches the Triton kernels for tensor `x`: on CUDA by default; the op's
    `impl` argument (or, when it is 'auto', ATTNOPT_IMPL) forces the kernels or the reference."""
    if impl_arg == "auto":
        impl_arg = impl()
    if impl_arg == "reference":
        return False
    if impl_arg == "triton":
        from torch._subclasses.fake_tensor import is_fake

        # traced (inlined into a graph) rather than launched: the interpreter is not needed
        if x.device.type != "cuda" and not interpreted() and not is_fake(x):
            raise RuntimeError("attnopt: the Triton impl on CPU tensors runs under Triton's interpreter: set "
                               "TRITON_INTERPRET=1 before importing attnopt (or use impl 'reference')")
        return True
    return x.device.type == "cuda" and arch != "cpu"


def state() -> str:
    """All switches in one string, for cache keys: a graph built under other switches differs."""
    return f"inline={inline_mode()} impl={impl()} arch={emulated_arch() or ''} interp={int(interpreted())}"
