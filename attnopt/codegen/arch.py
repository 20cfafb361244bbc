"""GPU architectures attnopt targets, and everything chosen per architecture, in one table.

"How is sm90 chosen": `detect_arch()` maps the device's compute capability to a name; the
`ARCHS` table below gives, for that name, the number formats the tensor cores run natively,
the P.V default, whether loads go through tensor descriptors (TMA), and the kernel tile
configurations (the first is the default, all are autotuned on a GPU). `options.arch`
forces a row; "cpu" is the pure-PyTorch reference path, which emulates every format.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .. import switches


@dataclass(frozen=True)
class Tile:
    """One attention kernel configuration."""

    block_m: int  # query rows per program
    block_n: int  # keys per inner-loop step
    warps: int
    stages: int

    def __str__(self) -> str:
        return f"BM{self.block_m}-BN{self.block_n}-w{self.warps}-s{self.stages}"


@dataclass(frozen=True)
class GemmTile:
    """One linear (GEMM) kernel configuration."""

    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int
    group_m: int = 8


@dataclass(frozen=True)
class ArchSpec:
    name: str
    capability: tuple[int, int] | None
    qk_formats: tuple[str, ...]  # QK^T formats the hardware runs ("none" = 16-bit, always)
    pv_formats: tuple[str, ...]  # P.V formats
    pv_auto: str  # P.V format chosen by pv="auto" with a quantized QK^T
    fp4: bool  # NVFP4 (tl.dot_scaled with e4m3 group scales) runs natively
    tma: bool  # tensor descriptors lowered to TMA
    smem_kb: int  # shared memory a block may use (opt-in maximum; sources in launch_limits.py)
    # attention tiles per head-dim bucket (padded head dim <= key); first entry is the default
    attn_tiles: dict[int, tuple[Tile, ...]] = field(default_factory=dict)
    gemm_tiles: tuple[GemmTile, ...] = ()
    linear_formats: tuple[str, ...] = ("w8a8", "w4a16", "w4a8")
    # W4A16 tiles (BLOCK_K divides the 128-wide quantization group): M > 16, and decode
    # (M <= 16, split K); the first of each is the default
    w4_tiles: tuple[GemmTile, ...] = ()
    w4_decode_tiles: tuple[GemmTile, ...] = ()
    # W4A8 tiles (K steps one weight group at a time: block_k unused): M > 16, and M <= 16
    w4a8_tiles: tuple[GemmTile, ...] = ()
    w4a8_decode_tiles: tuple[GemmTile, ...] = ()

    def attention_tiles(self, head_dim: int) -> tuple[Tile, ...]:
        for bucket in sorted(self.attn_tiles):
            if head_dim <= bucket:
                return self.attn_tiles[bucket]
        raise ValueError(f"head dim {head_dim} above the largest supported (256)")

    def default_tile(self, head_dim: int, quant: str = "int8", pv: str = "fp16") -> Tile:
        """The tile a launch without autotuning runs (the interpreter, the reference's key tile)."""
        tiles = self.attention_tiles(head_dim)
        return (fp4_tiles(tiles) if "fp4" in (quant, pv) else tiles)[0]

    def supports(self, quant: str, pv: str) -> str | None:
        """None when (quant, pv) runs here; otherwise the reason it does not."""
        if quant not in self.qk_formats and quant != "none":
            return f"QK^T format {quant!r} needs {_needs(quant)} (target is {self.name})"
        if pv not in self.pv_formats:
            return f"P.V format {pv!r} needs {_needs(pv)} (target is {self.name})"
        return None


def fp4_tiles(tiles: tuple[Tile, ...]) -> tuple[Tile, ...]:
    """NVFP4 P.V reduces over BLOCK_N keys: at least one 64-deep scaled-MMA step."""
    return tuple(dict.fromkeys(Tile(t.block_m, max(64, t.block_n), t.warps, t.stages) for t in tiles))


def _needs(fmt: str) -> str:
    return {"fp4": "sm100+", "fp8": "sm89+", "int8": "sm80+", "fp16": "sm80+",
            # the FP16-accumulating FP8 MMA runs at twice the FP32 one's rate only on the consumer parts
            "fp8_acc16": "sm89 or sm120 (FP8 MMA with FP16 accumulation at 2x rate)"}.get(fmt, "another arch")


_AMPERE_TILES = {
    64: (Tile(128, 64, 4, 3), Tile(64, 64, 4, 3), Tile(128, 128, 8, 2)),
    128: (Tile(128, 64, 8, 3), Tile(64, 64, 4, 3), Tile(128, 32, 4, 3)),
    256: (Tile(64, 32, 4, 2), Tile(64, 64, 8, 2)),
}
# Consumer parts (sm86/sm89/sm120) have ~100 KB of shared memory: fewer stages.
_SMALL_SMEM_TILES = {
    64: (Tile(128, 64, 4, 2), Tile(64, 64, 4, 2), Tile(128, 32, 4, 3)),
    128: (Tile(128, 64, 8, 2), Tile(64, 64, 4, 2), Tile(64, 32, 4, 3)),
    256: (Tile(64, 32, 4, 2), Tile(32, 32, 4, 2)),
}
_HOPPER_TILES = {
    64: (Tile(128, 128, 8, 3), Tile(128, 64, 4, 3), Tile(64, 64, 4, 4)),
    128: (Tile(128, 128, 8, 2), Tile(128, 64, 8, 3), Tile(64, 64, 4, 3)),
    256: (Tile(64, 64, 8, 2), Tile(128, 32, 8, 2)),
}
_GEMM_DEFAULT = (
    GemmTile(128, 128, 64, 8, 3), GemmTile(128, 64, 64, 4, 4), GemmTile(64, 128, 64, 4, 4),
    GemmTile(64, 64, 128, 4, 3), GemmTile(128, 256, 64, 8, 3),
)

# W4A16 dequantizes in registers: a stage holds BLOCK_M x BLOCK_K 16-bit x and BLOCK_N x BLOCK_K / 2
# packed bytes, so every tile here fits the consumer parts' ~100 KB too.
_W4_TILES = (
    GemmTile(64, 64, 64, 4, 3), GemmTile(128, 128, 64, 8, 3), GemmTile(128, 64, 64, 4, 4),
    GemmTile(64, 128, 128, 4, 3),
)
_W4_DECODE_TILES = (  # one row-tile of 16; a wider or deeper weight tile per program
    GemmTile(16, 64, 64, 4, 3), GemmTile(16, 128, 64, 4, 3), GemmTile(16, 64, 128, 4, 4),
    GemmTile(16, 32, 128, 2, 4),
)
# W4A8 steps K by one 128-wide group: a stage holds BLOCK_M x 128 int8 x and BLOCK_N x 64 packed
# bytes, so these fit the consumer parts too. A program keeps two accumulators (the group's
# int32 dot and the fp32 sum), so registers are tight (compile_check): 128 x 256 spilled
# everywhere and is left out, 128 x 64 takes 8 warps (with 4 it spilled); on sm100 every tile of
# 64+ rows spills some (8-892 bytes), on sm90 128 x 128 spills 176 bytes when it also quantizes
# x (M <= 64). Untimed: no GPU has autotuned them yet.
_W4A8_TILES = (
    GemmTile(128, 128, 128, 8, 3), GemmTile(64, 128, 128, 4, 3), GemmTile(128, 64, 128, 8, 3),
    GemmTile(64, 64, 128, 4, 4),
)
_W4A8_DECODE_TILES = (GemmTile(16, 64, 128, 4, 3), GemmTile(16, 128, 128, 4, 3), GemmTile(16, 32, 128, 2, 4))
_W4 = dict(w4_tiles=_W4_TILES, w4_decode_tiles=_W4_DECODE_TILES, w4a8_tiles=_W4A8_TILES,
           w4a8_decode_tiles=_W4A8_DECODE_TILES)

ARCHS: dict[str, ArchSpec] = {
    # name     capability  QK^T formats      P.V formats       pv auto  fp4    tma    smem
    "sm80": ArchSpec("sm80", (8, 0), ("int8",), ("fp16",), "fp16", False, False, 163,
                     _AMPERE_TILES, _GEMM_DEFAULT, ("w8a8", "w4a16", "w4a8"), **_W4),
    "sm86": ArchSpec("sm86", (8, 6), ("int8",), ("fp16",), "fp16", False, False, 99,
                     _SMALL_SMEM_TILES, _GEMM_DEFAULT, ("w8a8", "w4a16", "w4a8"), **_W4),
    "sm89": ArchSpec("sm89", (8, 9), ("int8", "fp8"), ("fp16", "fp8", "fp8_acc16"), "fp8", False, False, 99,
                     _SMALL_SMEM_TILES, _GEMM_DEFAULT, ("w8a8", "fp8", "w4a16", "w4a8"), **_W4),
    "sm90": ArchSpec("sm90", (9, 0), ("int8", "fp8"), ("fp16", "fp8"), "fp8", False, True, 227,
                     _HOPPER_TILES, _GEMM_DEFAULT, ("w8a8", "fp8", "w4a16", "w4a8"), **_W4),
    "sm100": ArchSpec("sm100", (10, 0), ("int8", "fp8", "fp4"), ("fp16", "fp8", "fp4"), "fp8", True, True, 227,
                      _HOPPER_TILES, _GEMM_DEFAULT, ("w8a8", "fp8", "w4a16", "w4a8"), **_W4),
    "sm120": ArchSpec("sm120", (12, 0), ("int8", "fp8", "fp4"), ("fp16", "fp8", "fp4", "fp8_acc16"), "fp8", True, True, 99,
                      _SMALL_SMEM_TILES, _GEMM_DEFAULT, ("w8a8", "fp8", "w4a16", "w4a8"), **_W4),
    # The reference path emulates every format; pv "auto" follows the Ampere default.
    "cpu": ArchSpec("cpu", None, ("int8", "fp8", "fp4"), ("fp16", "fp8", "fp4", "fp8_acc16"), "fp16", True, False, 0,
                    _AMPERE_TILES, _GEMM_DEFAULT, ("w8a8", "fp8", "w4a16", "w4a8"), **_W4),
}

# NVFP4 linears (W4A4, tl.dot_scaled with e4m3 group scales) wherever NVFP4 runs natively
ARCHS = {name: replace(s, linear_formats=s.linear_formats + ("nvfp4",)) if s.fp4 else s for name, s in ARCHS.items()}


def linear_needs(fmt: str) -> str:
    """The archs a linear format needs, for the reason a target without it is refused: the tensor
    cores of its GEMM's operands (NVFP4 from sm100, FP8 from sm89, INT8 for w8a8 / w4a8 and 16-bit
    for w4a16 from sm80)."""
    return _needs({"nvfp4": "fp4", "w8a8": "int8", "w4a8": "int8", "w4a16": "fp16"}.get(fmt, fmt))


if tuple(a for a in ARCHS if a != "cpu") != switches.GPU_ARCHS:
    raise ImportError(f"attnopt.switches.GPU_ARCHS {switches.GPU_ARCHS} must list codegen/arch.py's GPU rows")


# 8-bit GEMM-path rows up to which the activation is quantized in the GEMM's prologue (one launch)
# rather than by a pre-kernel: codegen/linear/w8a8.py's docstring says why
FUSED_QUANT_MAX_M = 64


def arch_for_capability(major: int, minor: int) -> str:
    """Compute capability -> table row (the nearest row at or below it)."""
    if major >= 12:
        return "sm120"
    if major >= 10:
        return "sm100"
    if major == 9:
        return "sm90"
    if (major, minor) >= (8, 9):
        return "sm89"
    if (major, minor) >= (8, 6):
        return "sm86"
    if major == 8:
        return "sm80"
    raise RuntimeError(f"compute capability {major}.{minor} is below sm80: attnopt's kernels need Ampere+")


def detect_arch(device: torch.device | str | None = None) -> str:
    """The table row for a device: its CUDA capability; for anything without CUDA, "cpu", or the
    GPU row a CPU run emulates (`ATTNOPT_ARCH`, attnopt/switches.py)."""
    device = torch.device(device) if device is not None else None
    if (device is not None and device.type != "cuda") or not torch.cuda.is_available():
        return switches.emulated_arch() or "cpu"
    return arch_for_capability(*torch.cuda.get_device_capability(device))


def resolve_arch(option: str, device: torch.device | str | None = None) -> ArchSpec:
    """options.arch ('auto' or a name) -> ArchSpec for tensors on `device`."""
    name = detect_arch(device) if option == "auto" else option
    return ARCHS[name]


def resolve_pv(pv: str, quant: str, spec: ArchSpec) -> str:
    """'auto' P.V format: NVFP4 with an NVFP4 QK^T; FP8 where the arch runs it and QK^T is
    quantized; else 16-bit."""
    if pv != "auto":
        return pv
    if quant == "fp4":
        return "fp4"
    return spec.pv_auto if quant != "none" else "fp16"


def autotune_bucket(n) -> int:
    """An autotune key for a length (keys, rows): its power-of-two bucket, so the kernels are
    tuned once per bucket, not per length; a symbolic length uses its hint."""
    if not isinstance(n, int):
        n = n.node.hint if n.node.hint is not None else 1
    return 1 << (max(int(n), 1) - 1).bit_length()
