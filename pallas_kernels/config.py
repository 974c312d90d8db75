"""Tuning knobs for the segment-masked attention kernels."""

from __future__ import annotations

import dataclasses

COMPARE_SPLIT_BITS = 16
"""A tile plan's q_compares (jpack.masks.compare_splits) per q tile: ids_len +
(positions_len << COMPARE_SPLIT_BITS): the first ids_len kv tiles of the row
need only the segment-id compare, the last positions_len only the position
compares (causal, sliding window)."""

GROUP_SPAN_BITS = 16
"""A tile plan's q_spans (jpack.masks.group_spans) per q tile: row group g (64
rows, one Mosaic consumer warpgroup) in bits [GROUP_SPAN_BITS * g, ... + 16):
front + (back << SPAN_HALF_BITS), the half kv tiles at the start and at the
end of the row's range that the group's rows cannot attend."""

SPAN_HALF_BITS = 8
"""Bits of a group span's front and of its back (each capped at 255 halves)."""


@dataclasses.dataclass(frozen=True)
class TileConfig:
  """Tiling of one kernel.

  block_major is the tile each program owns (q rows for the forward and dQ
  kernels, kv rows for dK/dV); block_minor is the tile its loop steps over.
  Both must be powers of two >= 16 on GPU.
  """
  block_major: int
  block_minor: int
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_major", "block_minor"):
      b = getattr(self, name)
      if b < 1 or b & (b - 1):
        raise ValueError(f"TileConfig.{name} must be a power of two, got {b}")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Tilings of the three kernels: forward, dQ, and dK/dV."""
  forward: TileConfig
  dq: TileConfig
  dkdv: TileConfig

  @classmethod
  def for_head_dim(cls, head_dim: int) -> "KernelConfig":
    """Default tilings per head dim.

    D = 128 (and the backward tiles everywhere) were chosen by sweeps on an
    H100 (experiments/perf_notes.md); D <= 64 and D > 128 are untuned starting
    points that compile and pass the GPU tests.
    """
    if head_dim <= 64:
      return cls(forward=TileConfig(128, 64, num_warps=4, num_stages=3),
                 dq=TileConfig(64, 64, num_warps=4, num_stages=2),
                 dkdv=TileConfig(64, 64, num_warps=4, num_stages=2))
    if head_dim <= 128:
      return cls(forward=TileConfig(64, 64, num_warps=4, num_stages=3),
                 dq=TileConfig(64, 64, num_warps=4, num_stages=2),
                 dkdv=TileConfig(64, 64, num_warps=4, num_stages=2))
    return cls(forward=TileConfig(64, 32, num_warps=4, num_stages=1),
               dq=TileConfig(32, 32, num_warps=4, num_stages=1),
               dkdv=TileConfig(32, 32, num_warps=4, num_stages=1))

  @classmethod
  def uniform(cls, block: int, **kw) -> "KernelConfig":
    """Square tiles of one size everywhere (handy for tests in interpret mode)."""
    tile = TileConfig(block, block, **kw)
    return cls(forward=tile, dq=tile, dkdv=tile)

  @property
  def row_multiple(self) -> int:
    """Sequence lengths are padded to a multiple of this (the largest tile)."""
    return max(max(t.block_major, t.block_minor)
               for t in (self.forward, self.dq, self.dkdv))
