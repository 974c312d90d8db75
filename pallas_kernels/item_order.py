"""The persistent kernels' work items ranked and tabled in one Triton kernel.

`mosaic_persistent.work_items` ranks the items (busy ones first, window by
window, heaviest first; the empty ones after all of them) and stores each
item's table row at its reading position. In XLA that is six small kernels
on a GPU (the work per item, the busy counts before each window, the ranks of
the head windows and of the tail window, the table's zeros and its scatter:
23 us on an H100, perf_notes entry 37). `ranked_table` makes the same table,
bit for bit, in one launch.

Why it counts plan rows, not items. Items are (batch, head, row), enumerated
(batch, head)-major, rows fastest, and an item's work is its plan row's: the
items of one row are its batch's `heads` (batch, head) pairs. Windows are whole
pairs, so how many items of a row of batch b lie in a run of pairs [a, c) is
clip(c - b * heads, 0, heads) - clip(a - b * heads, 0, heads), the same for
every row of b. Each item's rank is therefore a sum over the plan rows, batch
by batch, of a few compares per (item, row) pair: no loop over the items of
its window, and no load that waits on another (a first form that looped over
the window's items, gathering their rows, took 22 us, entry 37).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

__all__ = ["BLOCK_ITEMS", "MAX_ITEM_ROW_PAIRS", "ranked_table"]

BLOCK_ITEMS = 16
"""Items per program: 16 (256 programs of 4 warps, two a scheduler's worth per SM) took
6.3 us on the benchmark's layout against 8.2 for 32, 20.5 for 64, and 6.1 for 16 items
on 8 warps (H100, ncu, experiments/item_table_probe.py; perf notes entry 39): one warp
per scheduler left the latency-bound rank sums unhidden (entry 38)."""

MAX_ROW_BLOCK = 256
"""Plan rows of one batch compared with a program's items per step."""

MAX_UNROLLED_STEPS = 32
"""Row steps unrolled (their loads issued together); a loop over batches above."""

MAX_ITEM_ROW_PAIRS = 2**27
"""Items x plan rows up to which ranked_table runs (each pair is ~10 integer ops)."""

NUM_WARPS = 4
"""Warps per program."""

COLUMNS = 9
"""(b, tile, h, lo, full_lo, full_hi, hi, compares, spans): mosaic_persistent.item_table."""


def _kernel(lo_ref, full_lo_ref, full_hi_ref, hi_ref, compares_ref, spans_ref, table_ref,
            busy_ref, *, batch: int, heads: int, n_rows: int, window_items: int, head: int,
            num_ctas: int | None):
  n = batch * heads * n_rows
  window_pairs, head_pairs, pairs = window_items // n_rows, head // n_rows, n // n_rows
  lane = pl.program_id(0) * BLOCK_ITEMS + jnp.arange(BLOCK_ITEMS, dtype=jnp.int32)
  i = jnp.minimum(lane, n - 1)
  pair, tile = i // n_rows, i % n_rows
  b, h = pair // heads, pair % heads
  row = b * n_rows + tile

  def work_of(lo, hi):  # (work clipped as mosaic_persistent._ranks clips it, busy)
    return jnp.clip(hi - lo, 0, 2**16 - 1), hi > lo

  w_i, busy_i = work_of(lo_ref[row], hi_ref[row])
  # The item's window, in pairs [start, end): a head window, or the tail window.
  start = jnp.where(pair < head_pairs, pair // window_pairs * window_pairs, head_pairs)
  end = jnp.where(pair < head_pairs, jnp.minimum(start + window_pairs, pairs), pairs)
  row_block = min(pl.next_power_of_2(n_rows), MAX_ROW_BLOCK)
  steps = pl.cdiv(n_rows, row_block)

  def batch_rows(bb, carry):
    """carry + batch bb's part: (items of its rows read before each item, its busy rows)."""
    counted, busy_rows = carry
    # Of row r = (bb, t), one item in each of bb's pairs: those among pairs [0, c).
    upto = lambda c: jnp.clip(c - bb * heads, 0, heads)  # noqa: E731
    before_start, before_end, before_pair = upto(start), upto(end), upto(pair)
    own = b == bb
    for step in range(steps):
      t = step * row_block + jnp.arange(row_block, dtype=jnp.int32)
      r = bb * n_rows + jnp.minimum(t, n_rows - 1)
      w_r, busy_r = work_of(lo_ref[r], hi_ref[r])
      busy_r &= t < n_rows
      w_r = jnp.where(t < n_rows, w_r, -1)[None, :]  # below any item's work
      n_busy = jnp.sum(busy_r.astype(jnp.int32))
      # Row r's items in the item's own pair with a lower index: lower tiles.
      lower = own[:, None] & (t[None, :] < tile[:, None])
      # A busy item reads after: the busy items of earlier windows (before_start of
      # each busy row), those of its window with more work, and those with as much
      # work and a lower index (all busy: the item's work is > 0).
      busy_first = (jnp.where(w_r > w_i[:, None], (before_end - before_start)[:, None], 0)
                    + jnp.where(w_r == w_i[:, None],
                                (before_pair - before_start)[:, None] + lower, 0))
      # An empty one after all busy items (its index counts the empty ones before
      # it: index - busy items of lower index, summed below).
      lower_busy = (lower & busy_r[None, :]).astype(jnp.int32)
      per_row = jnp.sum(jnp.where(busy_i[:, None], busy_first, -lower_busy), axis=1)
      counted += per_row + n_busy * jnp.where(busy_i, before_start, heads - before_pair)
      busy_rows += n_busy
    return counted, busy_rows

  carry = (jnp.zeros((BLOCK_ITEMS,), jnp.int32), jnp.int32(0))
  if batch * steps <= MAX_UNROLLED_STEPS:
    for bb in range(batch):
      carry = batch_rows(bb, carry)
  else:
    carry = lax.fori_loop(0, batch, batch_rows, carry)
  counted, busy_rows = carry
  rank = jnp.where(busy_i, counted, i + counted)
  if num_ctas is None:  # claimed at run time: read in rank order
    position = rank
  else:  # dealt "snake": round r in order if r is even, reversed if odd
    rnd, lane_of = rank // num_ctas, rank % num_ctas
    size = jnp.minimum(num_ctas, n - rnd * num_ctas)
    position = rnd * num_ctas + jnp.where(rnd % 2 == 0, lane_of, size - 1 - lane_of)
  # Lanes past the last item store the table's padding rows (every lane its own row:
  # no masked scatter, whose duplicates interpret mode resolves by order).
  position = jnp.where(lane < n, position, lane)
  values = (b, tile, h, *(ref[row] for ref in (lo_ref, full_lo_ref, full_hi_ref, hi_ref,
                                               compares_ref, spans_ref)))
  for k, value in enumerate(values):
    table_ref[position * COLUMNS + k] = value

  @pl.when(pl.program_id(0) == 0)
  def _():
    busy_ref[0] = busy_rows * heads


def ranked_table(ranges, compares, spans, *, heads: int, window_items: int, head: int,
                 num_ctas: int | None, interpret: bool = False):
  """(table int32 [n, 9], busy int32 [1]): mosaic_persistent.item_table of the items
  in the order of mosaic_persistent._ranks(work, window_items, tail), read in rank
  order (num_ctas None: dealing "dynamic") or dealt "snake" to num_ctas CTAs; and
  how many items are busy.

  ranges: int32 [B, n_rows, 4]; compares, spans: int32 [B, n_rows] (zeros where
  the plan has none); n = B * heads * n_rows items; window_items: the head
  windows' items; head: the items before the tail window (n: none). Both must
  be whole (batch, head) pairs (multiples of n_rows). For n * B * n_rows up to
  MAX_ITEM_ROW_PAIRS (each program sums over every plan row).
  """
  batch, n_rows, _ = ranges.shape
  n = batch * heads * n_rows
  if window_items % n_rows or head % n_rows or not 0 < window_items or head > n:
    raise ValueError(f"windows must hold whole (batch, head) pairs of {n_rows} rows, got "
                     f"window_items={window_items}, head={head} of {n} items")
  if n * batch * n_rows > MAX_ITEM_ROW_PAIRS:
    raise ValueError(f"{n} items x {batch * n_rows} plan rows is more than "
                     f"MAX_ITEM_ROW_PAIRS={MAX_ITEM_ROW_PAIRS}")
  kernel = functools.partial(_kernel, batch=batch, heads=heads, n_rows=n_rows,
                             window_items=window_items, head=head, num_ctas=num_ctas)
  # The bounds apart: XLA passes its reduction's outputs, without stacking them.
  inputs = (*(ranges[..., k] for k in range(4)), compares, spans)
  inputs = tuple(x.reshape(-1).astype(jnp.int32) for x in inputs)
  whole = lambda shape: pl.BlockSpec(shape, lambda p: (0,))  # noqa: E731
  padded = pl.cdiv(n, BLOCK_ITEMS) * BLOCK_ITEMS  # table rows: whole programs
  table, busy = pl.pallas_call(
      kernel,
      grid=(padded // BLOCK_ITEMS,),
      in_specs=[whole(x.shape) for x in inputs],
      out_specs=[whole((padded * COLUMNS,)), whole((1,))],
      out_shape=[jax.ShapeDtypeStruct((padded * COLUMNS,), jnp.int32),
                 jax.ShapeDtypeStruct((1,), jnp.int32)],
      compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
      interpret=interpret,
      name="ranked_item_table",
  )(*inputs)
  table = table.reshape(padded, COLUMNS)
  return (table if padded == n else table[:n]), busy
