"""Segment-masked flash attention, forward: the "persistent" Mosaic GPU schedule.

`mosaic_attention.forward(..., schedule="persistent[-pingpong]")` runs
`persistent_forward`: the consumer loop of mosaic_attention in a persistent
kernel, a grid of `num_ctas` CTAs (default: the GPU's SM count, see num_sms),
each walking a list of work items (batch, head, q tile) from an item table
(reading_positions orders the items: (batch, head)-major windows for L2
locality, heaviest plan rows first within a window, empty items after all
others, dealt to the CTAs in rounds, in snake order or by modelled load;
item_table puts each item's coordinates and plan row at its position; CTA c
reads rows c, c + num_ctas, ...). The producer
streams Q (with the q ids and positions) and the K/V tiles of every item
without draining between items, so the next item's loads land while the
consumers finish the current one; the consumers stage each item's output in
the item's own Q buffer and store it with TMA, without waiting for the store.
Same contract, inputs and outputs as the other schedules (mosaic_attention).
The loops carry named scopes (c_qk, c_softmax, p_load_kv, ...): regions of
Mosaic GPU's on-device profiler when it is on (experiments/fwd_probe.py
--profile), no code otherwise.

Spans. Each consumer reads its own group span from the item (the plan's
q_spans, jpack.masks.group_spans): the half kv tiles at the start and at the
end of the item's range that its 64 rows cannot attend. It skips the kv tiles
wholly inside them (the rows of a document that starts inside the q tile
skip the tiles of the documents before it) and, with 128-key tiles, runs a
tile of which it needs one half on that half's 64 keys only (consumer 0 on a
diagonal tile runs the first half). A skipped step keeps the barriers of a
step: it waits for the tile, meets the other consumer twice (pingpong) and
releases the slot. Same outputs.

Items. A CTA's items are n = 0 .. N-1, the busy ones (hi > lo: at least one
kv tile) first, then the empty ones (reading_positions). A busy item n uses
Q buffer pair qs = n % 2 (one 64-row buffer per consumer, which also stages
that consumer's output of the item). Step t counts kv tiles over all the
CTA's items (item n's first step is the number of tiles of items 0 .. n-1) and
uses ring slot t % num_stages, so the K/V ring (mosaic_common) runs on across
items exactly as within one plan row. An empty item needs no Q: the producer
loads nothing for it, and each consumer writes its zeros and EMPTY_LSE
through its own buffer of pair n % 2 once its own earlier stores from that
buffer have read it (nothing else touches the buffer any more: no busy item
follows).

Synchronisation, per barrier (who arrives, how often):
  q_ready[qs]:  the producer's TMA of busy item n's Q, q ids and q positions,
                one copy of each per consumer: 3 * num_consumers arrivals per
                busy item. Every consumer waits it once per busy item.
  q_free[qs]:   every consumer, once per busy item n >= 1, releases item n -
                1's buffer pair (1 - qs) after its output store has read
                shared memory (wait_smem_to_gmem read-only), right after item
                n's first QK^T. num_consumers arrivals per release. The
                producer waits it before loading Q of item n >= 2 (the
                release of item n - 2, made during item n - 1).
  kv_ready[s]:  the producer's 4 copies of step t (K, V, kv ids, kv
                positions); every consumer waits it once per step.
  kv_consumed[s]: every consumer, once per step, after its PV; the producer
                waits it before loading step t >= num_stages (the completion
                of step t - num_stages, possibly of an earlier item).
  rendezvous (pingpong only): see _persistent_forward_kernel.
Balance: both sides read every item's plan row from the same table, so they
agree on t and n. The last busy item releases nothing (its store is awaited
at the kernel's end), the release of the one before completes a phase nobody
waits for, and likewise the last num_stages kv_consumed completions: harmless,
the kernel ends. No barrier runs two phases ahead of a waiter, which keeps
the per-thread parity tracking of barrier_wait exact: q_ready's completion for
item n + 2 needs the release of item n, which every consumer makes after
waiting q_ready for item n + 1; q_free's release of item n + 2 is made in item
n + 3, whose Q the producer loads only after waiting the release of item n +
1; the kv barriers as in the serial schedule (mosaic_common). No cycle: the
release the producer waits for (item n - 2, in item n - 1) needs only Q and
the first K/V tile of item n - 1, both issued before. A CTA with no items
(num_ctas > number of items) skips both loops.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.config import GROUP_SPAN_BITS, SPAN_HALF_BITS, TileConfig
from pallas_kernels.mosaic_common import (
    WG_ROWS, broadcast_rows, consumer_warpgroups, copy_kv_tile, copy_q_tile, empty_row_stats,
    launch, mask_tile, mma_accumulate, mma_transforms, online_softmax, producer_warpgroup,
    rendezvous, row_vector, store_output, three_runs, wait_for_free_slot, zeros_acc)
from pallas_kernels.segment_attention import LOG2E

__all__ = ["DEFAULT_NUM_SMS", "WorkItems", "cta_items", "item_table", "num_sms",
           "persistent_forward", "persistent_schedule", "reading_positions",
           "resolve_work_items", "work_items"]

DEFAULT_NUM_SMS = 132
"""SMs of an H100 SXM: the persistent grid when the device does not say (num_sms)."""


def num_sms() -> int:
  """Streaming multiprocessors of the first local CUDA device, else DEFAULT_NUM_SMS.

  Read from the device's `core_count` (XLA's GPU devices carry it); without a
  GPU (lowering for CUDA on a CPU machine) the H100 SXM's 132.
  """
  try:
    device = jax.local_devices(backend="gpu")[0]
  except Exception:  # noqa: BLE001 - no GPU backend here
    return DEFAULT_NUM_SMS
  return int(getattr(device, "core_count", 0) or DEFAULT_NUM_SMS)


WINDOW_ROUNDS = 1
"""Work items sorted together, in rounds of num_ctas (persistent_schedule's window):
1 was the fastest of 1, 2, 4 and one global sort on an H100 (perf_notes entry 13)."""


RANK_MAX_PAIRS = 2**26
"""Up to this many (item, item) pairs inside windows _ranks counts them; above, it sorts."""


def _ranks(work, window_items: int):
  """int32 [n]: each item's rank in the stable order by (work <= 0, window, -work).

  work: int32 [n] (clipped to [0, 65535] for the order: longer rows tie);
  window k holds items [k * window_items, (k + 1) * window_items). Busy items
  (work > 0) come first, window by window, heaviest first, ties by index;
  the empty ones after all of them, by index. Each busy item's rank inside
  its window is counted over the window's pairs (one fused compare-and-sum,
  n * window_items pairs; XLA's sort of 4096 items with three keys took 44 us
  on a GPU), then offset by the busy items of earlier windows; above
  RANK_MAX_PAIRS pairs the order is sorted instead.
  """
  n = work.shape[0]
  windows = -(-n // window_items)
  clipped = jnp.clip(work, 0, 2**16 - 1)
  busy = work > 0
  if windows * window_items**2 > RANK_MAX_PAIRS:
    window = jnp.asarray(np.arange(n) // window_items, jnp.int32)
    order = jnp.lexsort((-clipped, window, ~busy))
    return jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32),
                                                  unique_indices=True)
  pad = windows * window_items - n  # padding: not busy, ranked nowhere
  w = jnp.pad(clipped, (0, pad)).reshape(windows, 1, window_items)
  b = jnp.pad(busy, (0, pad)).reshape(windows, 1, window_items)
  index = jnp.arange(window_items, dtype=jnp.int32)
  # before[k, i, j]: busy item j of window k goes before item i of that window.
  before = b & ((w > w.transpose(0, 2, 1))
                | ((w == w.transpose(0, 2, 1)) & (index[None, :] < index[:, None])))
  in_window = jnp.sum(before, axis=2, dtype=jnp.int32)
  per_window = jnp.sum(b, axis=(1, 2), dtype=jnp.int32)
  earlier = (jnp.cumsum(per_window) - per_window)[:, None]  # busy items of earlier windows
  busy_rank = (earlier + in_window).reshape(-1)[:n]
  empty_rank = jnp.sum(busy, dtype=jnp.int32) + jnp.cumsum(~busy, dtype=jnp.int32) - 1
  return jnp.where(busy, busy_rank, empty_rank).astype(jnp.int32)


ITEM_COST, FULL_TILE_COST, MASKED_TILE_COST = 6, 20, 23
"""The load model of _deal_by_load, in twentieths of a full kv tile: an item's own
cost (its Q load and output store, about a third of a tile) plus its tiles, a masked
one 15% dearer than a full one (the mask's compares and selects; perf_notes entry 24)."""


def _item_costs(ranges, heads: int):
  """int32 [B * n * heads]: the modelled cost of each item (b, h, row), 0 if empty."""
  batch, n_rows, _ = ranges.shape
  lo, full_lo, full_hi, hi = (ranges[..., i] for i in range(4))
  full = jnp.maximum(full_hi - full_lo, 0)
  masked = jnp.maximum(hi - lo, 0) - full
  cost = jnp.where(hi > lo, ITEM_COST + FULL_TILE_COST * full + MASKED_TILE_COST * masked, 0)
  return jnp.broadcast_to(cost[:, None, :], (batch, heads, n_rows)).reshape(-1).astype(jnp.int32)


def _deal_by_load(rank, cost, num_ctas: int):
  """int32 [n]: reading positions of items ranked `rank` (a permutation of 0 .. n-1),
  dealt in rounds of num_ctas by modelled load.

  Round r holds the items of ranks [r * num_ctas, (r + 1) * num_ctas), one per CTA
  (CTA c reads position r * num_ctas + c); within a round the costliest item goes
  to the CTA with the least load so far (cost summed over its earlier rounds), the
  next costliest to the next, and so on: list scheduling in rounds. Ties go to the
  lower rank and the lower CTA. The rounds depend on each other through the loads
  only: a scan over rounds of num_ctas^2 pair counts each (on an H100 about 0.22
  ms for the main shape's 31 rounds, mostly the loop's kernel launches).
  """
  n, ctas = rank.shape[0], num_ctas
  rounds = -(-n // ctas)
  lane = jnp.arange(ctas, dtype=jnp.int32)
  # Cost of the item of each rank, -1 where the last round has no item.
  by_rank = jnp.full((rounds * ctas,), -1, jnp.int32).at[rank].set(
      cost, unique_indices=True).reshape(rounds, ctas)
  ci, cj = by_rank[:, :, None], by_rank[:, None, :]
  costlier = (cj > ci) | ((cj == ci) & (lane[None, None, :] < lane[None, :, None]))
  order = jnp.sum(costlier, axis=2, dtype=jnp.int32)  # [rounds, ctas]: k-th costliest

  def one_round(loads, x):
    r, costs, cost_rank = x
    # In the last round only the CTAs whose position exists read an item.
    key = jnp.where(r * ctas + lane < n, loads, jnp.iinfo(jnp.int32).max)
    lighter = (key[None, :] < key[:, None]) | ((key[None, :] == key[:, None])
                                               & (lane[None, :] < lane[:, None]))
    load_rank = jnp.sum(lighter, axis=1, dtype=jnp.int32)  # [ctas]: k-th least loaded
    match = cost_rank[:, None] == load_rank[None, :]  # [item, cta]
    cta_of = jnp.sum(jnp.where(match, lane[None, :], 0), axis=1, dtype=jnp.int32)
    added = jnp.sum(jnp.where(match, jnp.maximum(costs, 0)[:, None], 0), axis=0,
                    dtype=jnp.int32)
    return loads + added, cta_of

  _, cta_of = lax.scan(one_round, jnp.zeros(ctas, jnp.int32),
                       (jnp.arange(rounds, dtype=jnp.int32), by_rank, order), unroll=4)
  return (rank // ctas) * ctas + cta_of.reshape(-1)[rank]


def _deal_snake(rank, num_ctas: int):
  """int32 [n]: reading positions of items ranked `rank`, dealt in rounds of num_ctas
  in rank order, odd rounds reversed (heavy firsts evened out when ranks follow work)."""
  n = rank.shape[0]
  rnd, lane = rank // num_ctas, rank % num_ctas
  round_size = jnp.minimum(num_ctas, n - rnd * num_ctas)
  return rnd * num_ctas + jnp.where(rnd % 2 == 0, lane, round_size - 1 - lane)


DEALINGS = ("snake", "load")
"""How reading_positions deals each round's items to the CTAs: "snake" (parallel,
a few microseconds) or "load" (_deal_by_load: balanced, a sequential scan)."""


def reading_positions(ranges, heads: int, num_ctas: int,
                      window_rounds: int | None = WINDOW_ROUNDS, dealing: str = "snake"):
  """int32 [B * n * heads]: where item (b, h, row) sits in a persistent kernel's reading
  order, items enumerated (batch, head)-major, rows fastest.

  ranges: int32 [B, n, 4], the plan rows (q tiles, or kv tiles for dK/dV); an
  item's work is hi - lo of its row.

  Locality first: items are taken (batch, head)-major, rows fastest, so the
  CTAs running at one time share the K/V of a few heads in L2 (sorting all
  items by work spread every round over all heads: K/V came from HBM each
  time, entry 13 of experiments/perf_notes.md). Balance within that: the
  items are cut into windows of whole (batch, head) pairs, about
  window_rounds * num_ctas items each (None: one window, the global sort),
  sorted by descending work inside a window (stable, _ranks); the empty items
  (work 0, no kv tile) go after all the others, so that every CTA meets them
  last (the kernels rely on it). The result is dealt in rounds of num_ctas
  (CTA c reads positions c, c + num_ctas, c + 2 * num_ctas, ...). dealing (one
  of DEALINGS): "snake", round r in order if r is even, reversed if odd; or
  "load", each round's items to the CTAs by their modelled load so far
  (_deal_by_load, _item_costs). On the benchmark's layouts "load" runs the
  persistent forward 7-20% faster, where the snake leaves CTAs 5-20% apart
  in modelled load, but costs ~0.2 ms to make (perf_notes entry 26): worth it
  where the items are made once and reused (jpack's make_attention_plan).
  """
  if dealing not in DEALINGS:
    raise ValueError(f"dealing must be one of {DEALINGS}, got {dealing!r}")
  batch, n_rows, _ = ranges.shape
  n_items = batch * n_rows * heads
  work = jnp.broadcast_to((ranges[..., 3] - ranges[..., 0])[:, None, :],
                          (batch, heads, n_rows)).reshape(-1)
  window_items = (n_items if window_rounds is None else  # whole (batch, head) pairs
                  max(1, -(-window_rounds * num_ctas // n_rows)) * n_rows)
  rank = _ranks(work, min(window_items, n_items))
  if dealing == "snake":
    return _deal_snake(rank, num_ctas)
  return _deal_by_load(rank, _item_costs(ranges, heads), num_ctas)


def persistent_schedule(q_ranges, heads: int, num_ctas: int,
                        window_rounds: int | None = WINDOW_ROUNDS, dealing: str = "snake"):
  """int32 [B * nq * heads]: the work items in reading order (reading_positions), each
  encoded as (b * nq + qt) * heads + h."""
  batch, n_q, _ = q_ranges.shape
  b, h, qt = np.unravel_index(np.arange(batch * n_q * heads), (batch, heads, n_q))
  items = jnp.asarray((b * n_q + qt) * heads + h, jnp.int32)
  positions = reading_positions(q_ranges, heads, num_ctas, window_rounds, dealing)
  return jnp.zeros_like(items).at[positions].set(items, unique_indices=True)


def item_table(ranges, positions, heads: int, compares=None, spans=None):
  """int32 [num_items, 9]: row positions[i] = (b, tile, h, lo, full_lo, full_hi, hi,
  compares, spans) of item i = (b, h, tile), items enumerated as in reading_positions.

  ranges: int32 [B, n, 4]; positions: int32 [num_items] (reading_positions);
  compares: the plan's int32 [B, n] (jpack.masks.compare_splits), or None for
  0 (every masked tile compares everything); spans: the plan's int32 [B, n]
  (jpack.masks.group_spans), or None for 0. Built in item order (broadcasts)
  and scattered once. The kernel reads a row with independent loads, instead
  of decoding the item and then loading its plan row (two dependent trips to
  global memory at every item).
  """
  batch, n_rows, _ = ranges.shape
  per_item = lambda x: jnp.broadcast_to(  # noqa: E731  [B, n, ...] -> [items, ...]
      x[:, None], (batch, heads, *x.shape[1:])).reshape(batch * heads * n_rows, *x.shape[2:])
  zeros = jnp.zeros((batch, n_rows), jnp.int32)
  b, h, tile = np.unravel_index(np.arange(batch * heads * n_rows), (batch, heads, n_rows))
  rows = jnp.concatenate([jnp.asarray(np.stack([b, tile, h], axis=1), jnp.int32),
                          per_item(ranges.astype(jnp.int32)),
                          per_item(zeros if compares is None else compares)[:, None],
                          per_item(zeros if spans is None else spans)[:, None]], axis=1)
  return jnp.zeros_like(rows).at[positions].set(rows, unique_indices=True)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class WorkItems:
  """A persistent kernel's work items, in reading order: what `work_items` returns.

  table: int32 [num_items, 9] (item_table); num_ctas: the CTAs that deal them
  (reading_positions' order depends on it). A pytree: it can be made once
  per batch (jpack's AttentionPlan) and passed through jit.
  """
  table: jax.Array
  num_ctas: int = dataclasses.field(metadata=dict(static=True))


def work_items(ranges, heads: int, compares=None, num_ctas: int | None = None,
               spans=None, dealing: str = "snake") -> WorkItems:
  """The work items of a persistent kernel over plan rows `ranges`: one per (row, head).

  ranges: int32 [B, n, 4] plan rows (q-major for the forward and dQ, kv-major
  for dK/dV); heads: the heads each row is run for (kv heads for dK/dV);
  compares: the plan's int32 [B, n] (q_compares or kv_compares) or None;
  num_ctas: default min(num_sms(), number of items); spans: the plan's
  q_spans (the forward's) or None; dealing: reading_positions' (DEALINGS:
  "load" balances the CTAs better and costs more to make).
  """
  num_items = ranges.shape[0] * ranges.shape[1] * heads
  if num_ctas is None:
    num_ctas = min(num_sms(), num_items)
  positions = reading_positions(ranges, heads, num_ctas, dealing=dealing)
  return WorkItems(item_table(ranges, positions, heads, compares, spans), num_ctas)


def resolve_work_items(items: WorkItems | None, ranges, heads: int, compares,
                       num_ctas: int | None, spans=None) -> WorkItems:
  """`items` checked against a launch, or work_items(ranges, ...) when None.

  ValueError when given items do not fit: a table of another shape, with
  compares or spans (the table holds them), or num_ctas other than the
  table's.
  """
  if items is None:
    return work_items(ranges, heads, compares, num_ctas, spans)
  if not isinstance(items, WorkItems):
    raise TypeError(f"items must be a WorkItems (work_items), got {type(items).__name__}")
  expected = (ranges.shape[0] * ranges.shape[1] * heads, 9)
  if tuple(items.table.shape) != expected or items.table.dtype != jnp.int32:
    raise ValueError(f"items: the table must be int32 {expected} (one row per plan row "
                     f"and head), got {items.table.dtype} {tuple(items.table.shape)}")
  if compares is not None or spans is not None:
    raise ValueError("items: give the compares and spans to work_items, not beside a "
                     "table (the table holds them)")
  if num_ctas is not None and num_ctas != items.num_ctas:
    raise ValueError(f"num_ctas: the items were dealt to {items.num_ctas} CTAs, "
                     f"got num_ctas={num_ctas}")
  return items


def cta_items(items_ref, num_ctas: int, columns: int = 8):
  """(count, describe): the work items of this CTA (grid axis "ctas") in an item table.

  items_ref: int32 [num_items, 9] (item_table); CTA c owns rows c, c + num_ctas,
  ... count: int32, how many (0 if c >= num_items). describe(n): the first
  `columns` columns (b, tile, h, lo, full_lo, full_hi, hi, compares[, spans])
  of the CTA's item n, independent loads that nothing waits for until they are
  used; n is clamped into the table, so a loop may prefetch describe(n + 1) at
  its last item.
  """
  cta = lax.axis_index("ctas")
  num_items = items_ref.shape[0]
  count = lax.div(jnp.int32(num_items + num_ctas - 1) - cta, jnp.int32(num_ctas))

  def describe(n):
    pos = jnp.minimum(cta + n * num_ctas, jnp.int32(num_items - 1))
    return tuple(items_ref[pos, i] for i in range(columns))

  return count, describe


def _persistent_forward_kernel(items_ref, q_ref, k_ref, v_ref, q_seg_ref,
                               q_pos_ref, kv_seg_ref, kv_pos_ref, o_ref, lse_ref, scratch, *,
                               scale, causal, sliding_window, block_k, num_stages,
                               num_consumers, group, num_ctas, pingpong):
  """The persistent kernel (module docstring): serial or pingpong consumers.

  pingpong (two consumers only): the consumers take turns on the tensor cores
  as in mosaic_attention's "pingpong" schedule, through a rendezvous barrier
  (2 arrivals a phase) met twice a step (after the QK^T issue, after the
  softmax). Consumer 1 starts one rendezvous behind consumer 0 and consumer 0
  does one more after its last item, and the pairing runs on across items, so
  the tensor cores stay busy at item boundaries. This is deadlock-free because
  a consumer's waits outside the rendezvous never need the other consumer to
  be further ahead than one rendezvous: the release that the next Q load
  needs is made right after an item's first QK^T, and empty items (which
  have no rendezvous and wait for nothing) come after all busy ones. The
  ring needs 2 stages: with one, consumer 0's QK^T of step t waits for
  consumer 1's PV of step t - 1, which follows the rendezvous that needs
  that QK^T.

  items_ref: int32 [num_items, 9] (item_table); CTA c runs the items of rows
  c, c + num_ctas, ... Scratch: Q buffers [2 * num_consumers, 64, D] (item n,
  consumer wg: buffer (n % 2) * num_consumers + wg), which also stage that
  item's output; q ids [2 * num_consumers, 2, 64]; lse [2 * num_consumers,
  64]; the K/V ring as in mosaic_attention._forward_kernel.
  """
  (q_bufs, q_ids_smem, lse_smem, k_smem, v_smem, kv_ids_smem), barriers = scratch
  q_ready, q_free, kv_ready, kv_consumed, *sched = barriers
  wg = lax.axis_index("wg")
  head_dim = q_ref.shape[3]
  block_q = num_consumers * WG_ROWS
  dtype = q_ref.dtype
  stages = jnp.int32(num_stages)
  count, describe = cta_items(items_ref, num_ctas, columns=9)
  # A tile of which a consumer needs one half runs on that half's keys only
  # with 128-key tiles (module docstring: spans); other tilings run it whole.
  half_k = block_k // 2 if block_k == 128 else None

  def q_buffer(n, consumer):
    return lax.rem(n, jnp.int32(2)) * num_consumers + consumer

  @producer_warpgroup(wg, num_consumers)
  def _producer():

    def item(n, carry):
      t, (b, qt, h, lo, _, _, hi, _, _) = carry
      next_item = describe(n + 1)  # loaded now, used by the next iteration
      qs = lax.rem(n, jnp.int32(2))

      @pl.when(hi > lo)  # an empty item loads nothing (its output needs no Q)
      def _load_q():
        # q_free[qs]: wait for every consumer's release of item n - 2 (the last
        # user of this Q buffer); items 0 and 1 find their buffer fresh.
        @pl.when(n >= 2)
        def _wait_q_buffer():
          plgpu.barrier_wait(q_free.at[qs])

        # q_ready[qs]: 3 copies per consumer (Q, q ids, q positions) per item.
        for c in range(num_consumers):
          rows = pl.ds(qt * block_q + c * WG_ROWS, WG_ROWS)
          buf = q_buffer(n, c)
          with jax.named_scope("p_load_q"):
            copy_q_tile((q_ref, q_seg_ref, q_pos_ref), q_bufs.at[buf], q_ids_smem, buf,
                        q_ready.at[qs], b=b, rows=rows, h=h)

      kv_head = lax.div(h, jnp.int32(group))

      def load(j, t):
        # kv_ready[slot]: 4 copies per step; kv_consumed[slot]: waited for step
        # t - num_stages (the slot's previous use, possibly of an earlier item).
        with jax.named_scope("p_wait_slot"):
          slot = wait_for_free_slot(t, kv_consumed, num_stages)
        with jax.named_scope("p_load_kv"):
          copy_kv_tile((k_ref, v_ref, kv_seg_ref, kv_pos_ref), (k_smem, v_smem, kv_ids_smem),
                       kv_ready.at[slot], slot, b=b, j=j, kv_head=kv_head, block_k=block_k)
        return t + 1

      return lax.fori_loop(lo, hi, load, t), next_item

    lax.fori_loop(jnp.int32(0), count, item, (jnp.int32(0), describe(jnp.int32(0))))

  @consumer_warpgroups(wg, num_consumers)
  def _consumer():
    logit_scale = scale * LOG2E
    o_shape = (WG_ROWS, head_dim)

    # The pingpong consumers' meeting point (docstring); nothing without it.
    meet = functools.partial(rendezvous, sched[0]) if sched else lambda: None
    if sched:
      pl.when(wg == 1)(meet)  # consumer 1 runs one rendezvous behind (docstring)

    def item(n, carry):
      t0, (b, qt, h, lo, full_lo, full_hi, hi, compares, spans) = carry
      next_item = describe(n + 1)  # loads issued now, used by the next iteration
      qs = lax.rem(n, jnp.int32(2))
      buf = q_buffer(n, wg)
      q_smem = q_bufs.at[buf]
      rows = pl.ds(qt * block_q + wg * WG_ROWS, WG_ROWS)
      out_refs = (q_smem, lse_smem.at[buf], o_ref.at[b, rows, h], lse_ref.at[b, h, rows])
      # This consumer's kv tiles: [first, last], the first on its second half
      # only (front odd), the last on its first half only (back odd).
      span = lax.shift_right_logical(spans, GROUP_SPAN_BITS * wg) & (2**GROUP_SPAN_BITS - 1)
      front = span & (2**SPAN_HALF_BITS - 1)
      back = lax.shift_right_logical(span, SPAN_HALF_BITS)
      first = lo + lax.shift_right_logical(front, 1)
      last = hi - 1 - lax.shift_right_logical(back, 1)

      def release_previous_item(j):
        # q_free[1 - qs]: the release of item n - 1, once per item, after the
        # first QK^T (so the store had time to read its Q buffer).
        @pl.when((j == lo) & (n >= 1))
        def _release():
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          plgpu.barrier_arrive(q_free.at[1 - qs])

      @pl.when(hi > lo)
      def _attend():
        with jax.named_scope("c_wait_q"):
          plgpu.barrier_wait(q_ready.at[qs])  # once per item, every consumer
        q_ids = tuple(row_vector(q_ids_smem.at[buf, i][...]) for i in range(2))

        def visit(j, carry, *, masked):
          slot = lax.rem(t0 + (j - lo), stages)
          with jax.named_scope("c_wait_kv"):
            plgpu.barrier_wait(kv_ready.at[slot])  # once per step, every consumer
          if masked is False:  # a full tile: every row attends all of it
            carry = step(j, carry, slot, masked, keys=(0, block_k))
          else:  # skipped, on its second half, on its first half, or whole (the span)
            outside = (j < first) | (j > last)
            whole = functools.partial(step, keys=(0, block_k))
            if half_k is None:
              kinds, kind = [skip, whole], jnp.where(outside, 0, 1)
            else:
              kinds = [skip, functools.partial(step, keys=(half_k, half_k)),
                       functools.partial(step, keys=(0, half_k)), whole]
              kind = jnp.where(outside, 0, jnp.where(
                  (j == first) & ((front & 1) == 1), 1,
                  jnp.where((j == last) & ((back & 1) == 1), 2, 3)))
            carry = lax.switch(kind.astype(jnp.int32), kinds, j, carry, slot, masked)
          plgpu.barrier_arrive(kv_consumed.at[slot])  # once per step, every consumer
          return carry

        def skip(j, carry, slot, masked):
          """A tile none of this consumer's rows attend: the step's meetings only."""
          del slot, masked
          meet()
          release_previous_item(j)
          meet()
          return carry

        def step(j, carry, slot, masked, keys):
          """One kv tile on keys [start, start + width) (the rest masked for these rows)."""
          acc, m, l = carry
          start, width = keys
          part = lambda ref: ref if width == block_k else ref.at[pl.ds(start, width)]  # noqa: E731

          def qk(acc_ref):
            plgpu.wgmma(acc_ref, q_smem,
                        plgpu.transpose_ref(part(k_smem.at[slot]), (1, 0)))
            meet()  # QK^T issued: the other consumer may finish its softmax
            return acc_ref[...]

          with jax.named_scope("c_qk"):
            s = pl.run_scoped(qk, plgpu.ACC((WG_ROWS, width), jnp.float32))
          release_previous_item(j)

          with jax.named_scope("c_softmax" if masked is False else "c_softmax_masked"):
            if masked is not False:
              s = mask_tile(s, q_ids, kv_ids_smem, slot, kv_major=False, causal=causal,
                            sliding_window=sliding_window, masked=masked, first_column=start)
            p, m_new, l, alpha = online_softmax(s, m, l, logit_scale=logit_scale)
            acc = acc * broadcast_rows(alpha, acc.shape)
          if sched:
            acc, l, m_new, p = lax.optimization_barrier((acc, l, m_new, p))
            with jax.named_scope("c_meet"):
              meet()  # softmax done; the other consumer issued its QK^T

          with jax.named_scope("c_pv"):
            acc = mma_accumulate(acc, p, part(v_smem.at[slot]), dtype)
          return acc, m_new, l

        acc, m, l = three_runs(lo, full_lo, full_hi, hi, visit,
                               (zeros_acc(o_shape), *empty_row_stats()), compares=compares)
        with jax.named_scope("c_store"):
          store_output(acc, m, l, *out_refs)

      @pl.when(hi <= lo)
      def _write_empty():
        # Empty items come last (reading_positions) and have no Q: the
        # buffer's last reader was this consumer's own store of item n - 2.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        store_output(zeros_acc(o_shape), *empty_row_stats(), *out_refs)

      # Not awaited here: item n + 1 waits for the read, the kernel's end for the write.
      return t0 + jnp.maximum(hi - lo, 0), next_item

    lax.fori_loop(jnp.int32(0), count, item, (jnp.int32(0), describe(jnp.int32(0))))
    if sched:
      pl.when(wg == 0)(meet)  # pairs with consumer 1's last one
    plgpu.wait_smem_to_gmem(0)


def persistent_forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, q_ranges, *, tile: TileConfig,
                       scale, causal, sliding_window, num_ctas: int | None = None,
                       pingpong: bool = False, q_compares=None, q_spans=None,
                       items: WorkItems | None = None):
  """forward(..., schedule="persistent[-pingpong]"): the item table, then the kernel.

  Arguments and outputs as mosaic_attention.forward, which checks them.
  q_compares: the plan's int32 [B, nq] (the masked tiles that need only one
  compare), or None (they compare everything).
  pingpong: the two consumers take turns on the tensor cores (no effect with
  one consumer); needs tile.num_stages >= 2 (ValueError).
  num_ctas: the number of CTAs launched; default min(num_sms(), number of
  work items B * H * Tq / block_major). q_spans: the plan's int32 [B, nq]
  (jpack.masks.group_spans: the kv tiles, or halves of them with block_k =
  128, that each consumer's rows cannot attend), or None. items: the work
  items made beforehand (work_items(q_ranges, H, q_compares, spans=q_spans)), or None
  to make them here.
  """
  batch, tq, heads, head_dim = q.shape
  num_consumers = tile.block_major // WG_ROWS
  bk, stages = tile.block_minor, tile.num_stages
  transforms = mma_transforms(q.dtype)
  opts = dict(scale=scale, causal=causal, sliding_window=sliding_window, block_k=bk,
              num_stages=stages, num_consumers=num_consumers, group=heads // k.shape[2])
  items = resolve_work_items(items, q_ranges, heads, q_compares, num_ctas, q_spans)
  num_ctas = items.num_ctas
  pingpong = pingpong and num_consumers == 2
  if pingpong and stages < 2:
    raise ValueError(f"schedule='persistent-pingpong' needs tile.num_stages >= 2 (one "
                     f"stage would deadlock its two consumers), got {stages}")
  kernel = functools.partial(_persistent_forward_kernel, num_ctas=num_ctas,
                             pingpong=pingpong, **opts)
  barriers = (
      # q_ready[qs]: Q, q ids, q positions per consumer (3 * num_consumers copies
      # per item); q_free[qs]: one arrival per consumer per item n >= 1.
      plgpu.Barrier(num_arrivals=3 * num_consumers, num_barriers=2),
      plgpu.Barrier(num_arrivals=num_consumers, num_barriers=2),
      # kv_ready[s]: K, V, kv ids, kv positions (4 copies per step);
      # kv_consumed[s]: one arrival per consumer per step.
      plgpu.Barrier(num_arrivals=4, num_barriers=stages),
      plgpu.Barrier(num_arrivals=num_consumers, num_barriers=stages),
  )
  if pingpong:
    barriers += (plgpu.Barrier(num_arrivals=2),)  # the consumers' rendezvous
  scratch = (
      plgpu.SMEM((2 * num_consumers, WG_ROWS, head_dim), q.dtype, transforms=transforms),
      plgpu.SMEM((2 * num_consumers, 2, WG_ROWS), jnp.int32),
      plgpu.SMEM((2 * num_consumers, WG_ROWS), jnp.float32),
      plgpu.SMEM((stages, bk, head_dim), k.dtype, transforms=transforms),
      plgpu.SMEM((stages, bk, head_dim), v.dtype, transforms=transforms),
      plgpu.SMEM((stages, 2, bk), jnp.int32),
  )
  return launch(
      kernel, (items.table, q, k, v, q_seg, q_pos, kv_seg, kv_pos), scratch,
      barriers,
      out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                jax.ShapeDtypeStruct((batch, heads, tq), jnp.float32)),
      grid=(num_ctas,), grid_names=("ctas",), num_consumers=num_consumers)
