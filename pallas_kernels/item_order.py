"""The persistent kernels' work items ranked and tabled in one Triton kernel.

`mosaic_persistent.work_items` ranks the items (busy ones first, window by window,
heaviest first; the empty ones last) and scatters each item's table row to its
reading position. In XLA that is eight small kernels of 2.5-5 us each on an H100
(the work per item, the busy counts, the ranks of the head windows and of the tail
window, the scatter's zeros and the scatter; perf_notes entry 37). Here each
program takes BLOCK_ITEMS items, counts the items of their windows that go before
them, and stores their rows: the same table, bit for bit, in one launch.

Items are enumerated (batch, head)-major, rows fastest, as in mosaic_persistent;
windows are whole (batch, head) pairs, so the busy items before a window start
are counted from the plan rows' busy flags.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

__all__ = ["BLOCK_ITEMS", "ranked_table"]

BLOCK_ITEMS = 32
"""Items per program."""

_BLOCK_OTHERS = 128
"""Items (or plan rows) compared with a program's items per loop step."""

_COLUMNS = 9
"""(b, tile, h, lo, full_lo, full_hi, hi, compares, spans): mosaic_persistent.item_table."""


def _item_rows(item, *, heads: int, n_rows: int):
  """(b, tile, h, plan row b * n_rows + tile) of items enumerated (batch, head)-major."""
  pair, tile = item // n_rows, item % n_rows
  b, h = pair // heads, pair % heads
  return b, tile, h, b * n_rows + tile


def _kernel(ranges_ref, compares_ref, spans_ref, table_ref, busy_ref, *, n: int,
            heads: int, n_rows: int, window_items: int, head: int, num_ctas: int | None):
  rows = ranges_ref.shape[0] // 4
  i = pl.program_id(0) * BLOCK_ITEMS + jnp.arange(BLOCK_ITEMS, dtype=jnp.int32)
  valid = i < n
  i = jnp.minimum(i, n - 1)
  b, tile, h, row = _item_rows(i, heads=heads, n_rows=n_rows)

  def work_of(r):  # int32 work (hi - lo, clipped like mosaic_persistent._ranks), busy
    lo, hi = ranges_ref[r * 4], ranges_ref[r * 4 + 3]
    return jnp.clip(hi - lo, 0, 2**16 - 1), (hi > lo).astype(jnp.int32)

  w_i, busy_i = work_of(row)
  in_head = i < head
  start = jnp.where(in_head, i // window_items * window_items, head)
  end = jnp.where(in_head, jnp.minimum(start + window_items, n), n)

  # Busy items before the window's start and end, and in all: windows are whole
  # (batch, head) pairs, and plan row r = (b, tile) is busy in each of b's heads.
  def count_busy(c, carry):
    before_start, before_end, total = carry
    r = c * _BLOCK_OTHERS + jnp.arange(_BLOCK_OTHERS, dtype=jnp.int32)
    _, busy_r = work_of(jnp.minimum(r, rows - 1))
    busy_r = jnp.where(r < rows, busy_r, 0)
    first_pair = (r // n_rows * heads)[None, :]  # the pair (b, 0) of row r

    def pairs_before(s):  # [items, rows]: r's pairs among the first s // n_rows
      return jnp.clip((s // n_rows)[:, None] - first_pair, 0, heads)

    return (before_start + jnp.sum(busy_r[None, :] * pairs_before(start), axis=1),
            before_end + jnp.sum(busy_r[None, :] * pairs_before(end), axis=1),
            total + jnp.sum(busy_r) * heads)

  zeros = jnp.zeros((BLOCK_ITEMS,), jnp.int32)
  before_start, before_end, total = jax.lax.fori_loop(
      0, pl.cdiv(rows, _BLOCK_OTHERS), count_busy, (zeros, zeros, jnp.int32(0)))

  # Items of the same window that go first: busy before empty, then heavier, then
  # lower index (busy), or lower index (empty).
  def count_first(c, ahead):
    j = c * _BLOCK_OTHERS + jnp.arange(_BLOCK_OTHERS, dtype=jnp.int32)
    w_j, busy_j = work_of(_item_rows(jnp.minimum(j, n - 1), heads=heads, n_rows=n_rows)[3])
    j, w_j, busy_j = j[None, :], w_j[None, :], busy_j[None, :] > 0
    bi, wi, ii = busy_i[:, None] > 0, w_i[:, None], i[:, None]
    same = (j >= start[:, None]) & (j < end[:, None])
    earlier = j < ii
    first = ((busy_j & ~bi) | (busy_j & bi & ((w_j > wi) | ((w_j == wi) & earlier)))
             | (~busy_j & ~bi & earlier))
    return ahead + jnp.sum((same & first).astype(jnp.int32), axis=1)

  lowest = jnp.min(jnp.where(valid, start, n))
  highest = jnp.max(jnp.where(valid, end, 0))
  ahead = jax.lax.fori_loop(lowest // _BLOCK_OTHERS, pl.cdiv(highest, _BLOCK_OTHERS),
                            count_first, zeros)
  rank = jnp.where(busy_i > 0, before_start + ahead, total + start - before_end + ahead)
  if num_ctas is None:  # claimed at run time: read in rank order
    position = rank
  else:  # dealt "snake": round r in order if r is even, reversed if odd
    rnd, lane = rank // num_ctas, rank % num_ctas
    size = jnp.minimum(num_ctas, n - rnd * num_ctas)
    position = rnd * num_ctas + jnp.where(rnd % 2 == 0, lane, size - 1 - lane)

  # Past the last item (the table's padding to whole programs): rows of their own.
  position = jnp.where(valid, position, pl.program_id(0) * BLOCK_ITEMS
                       + jnp.arange(BLOCK_ITEMS, dtype=jnp.int32))
  values = (b, tile, h, *(ranges_ref[row * 4 + k] for k in range(4)),
            compares_ref[row], spans_ref[row])
  for k, value in enumerate(values):
    table_ref[position * _COLUMNS + k] = value

  @pl.when(pl.program_id(0) == 0)
  def _():
    busy_ref[0] = total


def ranked_table(ranges, compares, spans, *, heads: int, window_items: int, head: int,
                 num_ctas: int | None, interpret: bool = False):
  """(table int32 [n, 9], busy int32 [1]): mosaic_persistent's item table of the
  items ranked by _ranks(window_items, head), read in rank order (num_ctas None:
  dealing "dynamic") or dealt "snake" to num_ctas CTAs; and the busy items.

  ranges: int32 [B, n_rows, 4]; compares, spans: int32 [B, n_rows] (zeros where
  the plan has none); n = B * heads * n_rows items; head: the items before the
  tail window (the windows of window_items items start at multiples of it, and
  n_rows divides both).
  """
  batch, n_rows, _ = ranges.shape
  n = batch * heads * n_rows
  if window_items % n_rows or head % n_rows:
    raise ValueError(f"windows must hold whole (batch, head) pairs of {n_rows} rows, got "
                     f"window_items={window_items}, head={head}")
  kernel = functools.partial(_kernel, n=n, heads=heads, n_rows=n_rows,
                             window_items=window_items, head=head, num_ctas=num_ctas)
  flat = lambda x: x.reshape(-1).astype(jnp.int32)  # noqa: E731
  whole = lambda x: pl.BlockSpec(x.shape, lambda p: (0,))  # noqa: E731
  inputs = (flat(ranges), flat(compares), flat(spans))
  padded = pl.cdiv(n, BLOCK_ITEMS) * BLOCK_ITEMS  # rows, whole programs
  table, busy = pl.pallas_call(
      kernel,
      grid=(padded // BLOCK_ITEMS,),
      in_specs=[whole(x) for x in inputs],
      out_specs=[pl.BlockSpec((padded * _COLUMNS,), lambda p: (0,)),
                 pl.BlockSpec((1,), lambda p: (0,))],
      out_shape=[jax.ShapeDtypeStruct((padded * _COLUMNS,), jnp.int32),
                 jax.ShapeDtypeStruct((1,), jnp.int32)],
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret,
      name="ranked_item_table",
  )(*inputs)
  table = table.reshape(padded, _COLUMNS)
  return (table if padded == n else table[:n]), busy
