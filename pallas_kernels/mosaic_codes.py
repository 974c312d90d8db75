"""Segment ids compared on the tensor cores: the persistent forward's document mask
of an ids-only tile as one more small wgmma, instead of a compare per score.

An ids-only tile (all its keys at or before all its queries, so only the segment
ids can mask a pair: jpack.masks.compare_splits' ids_len tiles) adds S += A @ C^T
(k = CODE_DIMS = 16) to its scores S = Q K^T:
  C [n, 16] per key (`key_codes`: bf16, made once per batch, loaded with K): the
    one-hot of the id's residue (id mod CODE_RESIDUES = 15, in 0 .. 14), or of
    dimension 15 for padding (id 0);
  A [64, 16] per query row (`row_operand`: in registers, once per item): 0 in the
    row's own residue, CODE_BIAS = -2^100 in the other 15 dimensions.
So a score gains one CODE_BIAS term where the key's residue differs from the row's
(or the key is padding) and nothing where they match. A score is far below 2^76 in
magnitude, so it then ends at CODE_BIAS exactly, below MASKED_LOGIT, and the online
softmax treats it as masked. Different residues mean different ids: the codes never
let through a pair that the id compare stops. Where the nonzero ids of a q tile's
rows and of its whole kv range span at most 15 values (so no two of them share a
residue), they stop every pair it stops, and the compare can go: `coded_compares`
keeps a row's ids-only tiles where that holds and makes them compare both ids and
positions elsewhere. Rows of padding (id 0, residue 0) are not masked by the codes;
the forward writes them as empty rows at its store.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.config import COMPARE_SPLIT_BITS
from pallas_kernels.mosaic_common import WG_ROWS, broadcast_rows

__all__ = ["CODE_BIAS", "CODE_DIMS", "CODE_RESIDUES", "coded_compares", "key_codes",
           "row_operand"]

CODE_DIMS = 16
"""The codes' width: one wgmma k step of bf16."""

CODE_RESIDUES = 15
"""Ids are coded by their residue mod 15; the 16th dimension marks padding keys."""

CODE_BIAS = -2.0**100
"""What a pair of different residues adds to its score: exact in bf16 and float32,
below segment_attention.MASKED_LOGIT (-1e30), and large enough to absorb any score."""

_INT_MAX, _INT_MIN = jnp.iinfo(jnp.int32).max, jnp.iinfo(jnp.int32).min


def key_codes(kv_seg):
  """bf16 [B, Tk, CODE_DIMS]: the codes C of keys of segment ids kv_seg int32 [B, Tk]."""
  residue = jnp.where(kv_seg == 0, CODE_RESIDUES, jnp.mod(kv_seg, CODE_RESIDUES))
  return jax.nn.one_hot(residue, CODE_DIMS, dtype=jnp.bfloat16)


def _nonzero_span(seg, block: int, read_block: int):
  """(min, max) int32 [B, T / block] of each tile's nonzero ids; (INT_MAX, INT_MIN)
  for a tile of padding only.

  Reduced at read_block tokens (where it divides block), then combined: the
  tiling at which jpack.masks.make_tile_plan reads the ids for the Mosaic
  forward's tiles (its row groups of 64 and half kv tiles), so that under jit
  XLA reduces them once for both.
  """
  if block % read_block:
    read_block = block
  batch, length = seg.shape
  tiles = seg.reshape(batch, length // read_block, read_block)
  valid = tiles != 0
  low = jnp.min(jnp.where(valid, tiles, _INT_MAX), axis=-1)
  high = jnp.max(jnp.where(valid, tiles, _INT_MIN), axis=-1)
  factor = block // read_block
  return (functools.reduce(jnp.minimum, [low[:, i::factor] for i in range(factor)]),
          functools.reduce(jnp.maximum, [high[:, i::factor] for i in range(factor)]))


def coded_compares(q_seg, kv_seg, ranges, compares, block_k: int):
  """int32 [B, nq]: q_compares for a forward that masks ids-only tiles with the codes.

  q_seg [B, Tq], kv_seg [B, Tk]: int32 segment ids; ranges: int32 [B, nq, 4], the
  q-major plan rows (Tq / nq rows per q tile, block_k keys per kv tile);
  compares: the plan's q_compares (jpack.masks.compare_splits) or None (every
  masked tile compares both). Same encoding, ids_len + (positions_len <<
  COMPARE_SPLIT_BITS), read by the coded kernel as: the ids_len tiles are masked
  by the codes alone, no compare. A row keeps its ids_len where the nonzero ids of
  its q tile and of its kv tiles [lo, hi) span at most CODE_RESIDUES values; any
  other row gets ids_len = 0 (its ids-only tiles compare both), as the codes may
  let some of their pairs through.
  """
  block_q = q_seg.shape[1] // ranges.shape[1]
  q_min, q_max = _nonzero_span(q_seg, block_q, WG_ROWS)  # [B, nq]
  k_min, k_max = _nonzero_span(kv_seg, block_k, block_k // 2)  # [B, nk]
  lo, hi = ranges[..., 0], ranges[..., 3]
  kv_tile = jnp.arange(k_min.shape[1], dtype=jnp.int32)
  in_range = (kv_tile >= lo[..., None]) & (kv_tile < hi[..., None])  # [B, nq, nk]
  # One variadic reduction (one kernel, like jpack.masks.min_max_last).
  low, high = lax.reduce((jnp.where(in_range, k_min[:, None], _INT_MAX),
                          jnp.where(in_range, k_max[:, None], _INT_MIN)),
                         (jnp.int32(_INT_MAX), jnp.int32(_INT_MIN)),
                         lambda a, b: (jnp.minimum(a[0], b[0]), jnp.maximum(a[1], b[1])), (2,))
  low, high = jnp.minimum(q_min, low), jnp.maximum(q_max, high)
  # high - low in uint32 is exact for high >= low (no int32 overflow).
  spread = high.astype(jnp.uint32) - low.astype(jnp.uint32)
  coded = (high < low) | (spread < CODE_RESIDUES)
  words = jnp.zeros_like(lo) if compares is None else compares.astype(jnp.int32)
  positions_only = words & ~jnp.int32(2**COMPARE_SPLIT_BITS - 1)
  return jnp.where(coded, words, positions_only)


def row_operand(q_seg):
  """bf16 [64, CODE_DIMS] in the wgmma layout: the codes' operand A of 64 query rows
  of segment ids q_seg (an int32 [64] row vector, mosaic_common.row_vector)."""
  residue = lax.rem(q_seg, jnp.int32(CODE_RESIDUES))
  residue = jnp.where(residue < 0, residue + CODE_RESIDUES, residue)
  dims = plgpu.layout_cast(lax.broadcasted_iota(jnp.int32, (WG_ROWS, CODE_DIMS), 1),
                           plgpu.Layout.WGMMA)
  own = dims == broadcast_rows(residue, dims.shape)
  return jnp.where(own, 0.0, CODE_BIAS).astype(jnp.bfloat16)
