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
the item's own Q buffer and store it with TMA in the next item's first step,
right after that step's QK^T issue (under it, and under the wait for the other
consumer's softmax: item boundaries cost ~12% of a packed item otherwise,
experiments/perf_notes.md entry 28), without waiting for the store. An item's
first step runs the masked step's code (one loop body less to carry the
previous item's output through), with no compare where the plan says the tile
is full (mosaic_common.NO_COMPARE). The masked steps do not mask the rows of
padding (segment id 0) against the keys of padding (mask_tile's
padding_rows=False, a select per score less, ~1% on packed documents,
experiments/perf_notes.md entry 34); such rows get l = 0 at the item's end, so
the store writes them as rows that saw nothing.
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

One Q buffer pair (q_pairs=1, q_buffer_pairs: where two pairs of 128 x 256 do
not fit beside the K/V ring, as at head dim 256). Each consumer releases its Q
buffer right after the item's last QK^T (done_with_q), and the producer loads
the next item's first K/V tile, then its Q (each consumer's once that
consumer released it), then the rest. The output cannot wait in the Q buffer:
each consumer stages it in the K/V slot of the item's last step, consumer 0
in K once consumer 1's last QK^T is done (k_read), consumer 1 in V once
consumer 0's last PV is done (v_read); consumer 0 waits k_read before it
arrives on v_read, so neither handoff barrier runs a phase ahead of its
waiter. Each consumer stores its output at the item's end and waits for the
store to read the slot before its arrival on that step's kv_consumed, which
it holds back until then; with items dealt ahead (not claimed) that wait and
arrival come in the next item's first step, after its QK^T issue, or after
the walk (defer_store: 2% faster there, 2.5% slower with claims, perf notes
entry 41). The claims stay safe: the producer claims item n + 2 after the
release of item n - 1, made in its last step, after every consumer read the
indices up to n.

Synchronisation, per barrier (who arrives, how often; with two Q buffer pairs):
  q_ready[qs]:  the producer's TMA of busy item n's Q, q ids and q positions,
                one copy of each per consumer: 3 * num_consumers arrivals per
                busy item. Every consumer waits it once per busy item.
  q_free[qs]:   every consumer, once per busy item n >= 1, releases item n -
                1's buffer pair (1 - qs) after its output store (issued in
                item n's first step) has read shared memory (wait_smem_to_gmem
                read-only), right after item n's first softmax. num_consumers
                arrivals per release. The
                producer waits it before loading Q of item n >= 2 (the
                release of item n - 2, made during item n - 1).
  kv_ready[s]:  the producer's 5 arrivals of step t (the copies of K, V, kv
                ids, kv positions, and of the key codes for an ids-only tile,
                mosaic_codes, else a plain arrival); every consumer waits it
                once per step.
  kv_consumed[s]: every consumer, once per step, after its PV; the producer
                waits it before loading step t >= num_stages (the completion
                of step t - num_stages, possibly of an earlier item).
  rendezvous (pingpong only): see _persistent_forward_kernel.
Balance: both sides read every item's plan row from the same table, so they
agree on t and n. The last busy item releases nothing (its store is awaited
at the kernel's end), the release of the one before completes a phase nobody
waits for, and likewise the last num_stages kv_consumed completions: harmless,
the kernel ends. Items dealt "dynamic" (claimed at run time, mosaic_claims):
the table holds the items in rank order, busy ones first; the CTA's busy
items n = 0, 1, ... are those its producer claims (items 0 and 1 before its
loop, item n + 2 in item n right after the wait for q_free and the Q load),
until a claimed index is >= busy; then its round of the empty rows, as
above (the producer skips them). Every warpgroup waits for item n + 1's
index at the start of item n (ready[(n + 1) % 4]) and loads its row. Safe
with 4 slots: the producer's claim of item n + 2 comes after the release of
item n - 2 (n >= 2), which every consumer makes in item n - 1, after reading
the indices of items up to n; so the slot's previous index (item n - 2) was
read by all, and its barrier's previous phase waited by all. No deadlock:
the index a warpgroup waits for at item n was claimed in the producer's item
n - 1, which needs nothing of item n. All claimed items are busy, so the
producer cannot run ahead through empty ones.
No barrier runs two phases ahead of a waiter, which keeps the per-thread
parity tracking of barrier_wait exact: q_ready's completion for
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

from pallas_kernels import item_order
from pallas_kernels.config import GROUP_SPAN_BITS, SPAN_HALF_BITS, TileConfig
from pallas_kernels.mosaic_claims import CLAIM_SLOTS, claim, claimed
from pallas_kernels.mosaic_codes import CODE_DIMS, coded_compares, key_codes, row_operand
from pallas_kernels.mosaic_common import (
    NO_COMPARE, WG_ROWS, broadcast_rows, consumer_warpgroups, copy_kv_tile, copy_q_tile,
    empty_row_stats, launch, launch_accumulating, mask_tile, mma_accumulate, mma_transforms,
    online_softmax, operand_rows_fit, producer_warpgroup, rendezvous, row_vector, store_output,
    three_runs, tile_compares, wait_for_free_slot, zeros_acc)
from pallas_kernels.segment_attention import LOG2E

__all__ = ["DEALINGS", "DEFAULT_NUM_SMS", "WorkItems", "claimed_tail", "cta_items", "item_table",
           "num_sms", "persistent_forward", "persistent_schedule", "q_buffer_pairs",
           "reading_positions", "resolve_work_items", "table_row", "work_items"]

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


CLAIMED_TAIL = 0.3
"""Items to be claimed at run time (dealing "dynamic"): the share of the windows at
the end that form one window, so the CTAs meet the heavy items of the last 30% of
the work before its light ones (a CPU model of the claims, perf_notes entry 27: the
busiest CTA 0.6-1.6% above the mean on the benchmark's layouts, against 9-18% with
windows alone and 2.5-8% dealt by load before _rebalance; larger windows cost L2
locality, entry 13)."""


WIDE_CLAIMED_TAIL = 0.2
"""CLAIMED_TAIL at head_dim 256: with twice the K/V bytes per (batch, head) pair, a tail
of 30% of the windows thrashes L2. The claimed forward at D = 256 on the benchmark's
layout (128 x 64 tiles), against the "load" deal (H100, perf_notes entry 41): tail 0.2
1.024x, 0.1 1.042x, 0.3 1.048x, 0.0 1.059x (on 64 x 64 tiles, entry 39: 0.1 1.007x,
0.3 1.156x); at D = 128 0.3 stays the best (1.036x; 0.1 1.077x)."""


def claimed_tail(head_dim: int) -> float:
  """The share of windows claimed as one tail (CLAIMED_TAIL, WIDE_CLAIMED_TAIL) at head_dim."""
  return CLAIMED_TAIL if head_dim <= 128 else WIDE_CLAIMED_TAIL


RANK_MAX_PAIRS = 2**26
"""Up to this many (item, item) pairs inside windows _ranks counts them; above, it sorts."""


def _ranks(work, window_items: int, tail_windows: int = 0):
  """(rank int32 [n], busy int32 []): each item's rank in the stable order by
  (work <= 0, window, -work), and how many items are busy (work > 0).

  work: int32 [n] (clipped to [0, 65535] for the order: longer rows tie);
  window k holds items [k * window_items, (k + 1) * window_items), except
  that the last tail_windows windows form one. Busy items come first, window
  by window, heaviest first, ties by index; the empty ones after all of them,
  by index. An item's rank inside its window is counted over the window's
  pairs (one fused compare-and-sum per window size; XLA's sort of 4096 items
  with three keys took 44 us on a GPU), then offset by the busy (or, for an
  empty item, the empty) items of earlier windows, counted per window: no
  scan over the items (a cumulative sum over 4096 items took 7.7 us on an
  H100, perf_notes entry 37). Above RANK_MAX_PAIRS pairs the order is sorted
  instead.
  """
  n = work.shape[0]
  head = _head_items(n, window_items, tail_windows)
  starts = np.array([*range(0, head, window_items), *([head] if head < n else []), n])
  window = np.searchsorted(starts, np.arange(n), side="right") - 1
  clipped = jnp.clip(work, 0, 2**16 - 1)
  busy = work > 0
  if head * window_items + (n - head)**2 + len(starts) * n > RANK_MAX_PAIRS:
    order = jnp.lexsort((-clipped, jnp.asarray(window, jnp.int32), ~busy))
    rank = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32),
                                                  unique_indices=True)
    return rank, jnp.sum(busy, dtype=jnp.int32)
  in_window = jnp.concatenate([_window_ranks(clipped[a:b], busy[a:b], size)
                               for a, b, size in ((0, head, window_items), (head, n, n - head))
                               if b > a])
  # busy_before[k]: the busy items before window k starts (k = windows: all of them).
  ahead = jnp.arange(n, dtype=jnp.int32)[None, :] < jnp.asarray(starts[:, None], jnp.int32)
  busy_before = jnp.sum(busy[None, :] & ahead, axis=1, dtype=jnp.int32)
  total = busy_before[-1]
  # An empty item's in-window rank counts all its window's busy items first.
  empty_rank = (total + jnp.asarray(starts[window], jnp.int32) - busy_before[window + 1]
                + in_window)
  rank = jnp.where(busy, busy_before[window] + in_window, empty_rank)
  return rank.astype(jnp.int32), total


def _head_items(n: int, window_items: int, tail_windows: int) -> int:
  """The items before _ranks' tail window (n where there is none)."""
  windows = -(-n // window_items)
  return min((windows - min(tail_windows, windows)) * window_items, n)


def _window_ranks(work, busy, window_items: int):
  """int32 [n]: each item's rank in its window (windows of window_items consecutive
  items) in the order busy first, heaviest first, then by index."""
  n = work.shape[0]
  windows = -(-n // window_items)
  pad = windows * window_items - n  # padding: empty, after every item of its window
  w = jnp.pad(work, (0, pad)).reshape(windows, 1, window_items)
  b = jnp.pad(busy, (0, pad)).reshape(windows, 1, window_items)
  index = jnp.arange(window_items, dtype=jnp.int32)
  # [k, i, j] of item i and item j of window k:
  earlier = index[None, :] < index[:, None]  # j has the lower index
  wi, bi = w.transpose(0, 2, 1), b.transpose(0, 2, 1)
  heavier = (w > wi) | ((w == wi) & earlier)  # j goes first if both are busy
  before = (b & ~bi) | (b & bi & heavier) | (~b & ~bi & earlier)  # j goes first
  return jnp.sum(before, axis=2, dtype=jnp.int32).reshape(-1)[:n]


ITEM_COST, FULL_TILE_COST, MASKED_TILE_COST, SKIPPED_HALF_COST = 69, 100, 126, 12
"""The load model of _deal_by_load, in hundredths of a full kv tile, fitted to the
persistent forward's per-item times in a profile on the benchmark's packed layout
(perf_notes entry 31): an item's own cost (its Q load, its output store, the step
across the item boundary: about two thirds of a tile), its full tiles, its masked
ones (their compares and selects: 26% dearer), less SKIPPED_HALF_COST for each half
kv tile that one of its consumers skips (the plan's q_spans)."""


def _skipped_halves(spans):
  """int32, like spans: the half kv tiles that the consumers skip, summed over groups
  (q_spans' fronts and backs, jpack.masks.group_spans)."""
  field = (1 << SPAN_HALF_BITS) - 1
  total = jnp.zeros_like(spans)
  for group in range(32 // GROUP_SPAN_BITS):
    bits = lax.shift_right_logical(spans, GROUP_SPAN_BITS * group)
    total += (bits & field) + (lax.shift_right_logical(bits, SPAN_HALF_BITS) & field)
  return total


def _item_costs(ranges, heads: int, spans=None):
  """int32 [B * n * heads]: the modelled cost of each item (b, h, row), 0 if empty;
  spans: the rows' q_spans (the forward's) or None."""
  batch, n_rows, _ = ranges.shape
  lo, full_lo, full_hi, hi = (ranges[..., i] for i in range(4))
  full = jnp.maximum(full_hi - full_lo, 0)
  masked = jnp.maximum(hi - lo, 0) - full
  skipped = 0 if spans is None else _skipped_halves(spans.astype(jnp.int32))
  # > 0 for a busy item: its two consumers skip at most 4 halves of a masked tile, none
  # of a full one.
  cost = jnp.where(hi > lo, ITEM_COST + FULL_TILE_COST * full + MASKED_TILE_COST * masked
                   - SKIPPED_HALF_COST * skipped, 0)
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


REBALANCE_SWEEPS = 6
"""Sweeps of _rebalance after dealing by load (0: none). On the benchmark's packed
layouts (seeds 0-2) the busiest CTA's modelled load goes from 3-8% above the mean
to 0.2-0.5% in 4-5 sweeps (perf_notes entry 30)."""


def _rebalance(positions, cost, num_ctas: int, sweeps: int):
  """int32 [n]: reading positions like `positions`, with items swapped between CTAs
  inside their rounds until the CTAs' modelled loads are close.

  A sweep pairs the k-th most loaded CTA with the k-th least loaded one (k <
  num_ctas // 2) and, per pair, swaps the two items of one round whose cost
  difference d is nearest half the pair's load gap (0 < d < gap, so the pair's
  larger load shrinks). Only busy items (cost > 0) move, and only within their
  round, so a round still runs the same items at once (the windows' L2 locality)
  and every CTA still meets its empty items last.
  """
  n, ctas = positions.shape[0], num_ctas
  rounds, half = -(-n // ctas), ctas // 2
  # item[r, c]: the item read at position r * ctas + c (-1: none), costs its cost.
  item = jnp.full((rounds * ctas,), -1, jnp.int32).at[positions].set(
      jnp.arange(n, dtype=jnp.int32), unique_indices=True).reshape(rounds, ctas)
  costs = jnp.where(item >= 0, cost[jnp.maximum(item, 0)], 0)

  def sweep(_, state):
    item, costs = state
    load = jnp.sum(costs, axis=0)
    order = jnp.argsort(load, stable=True)
    heavy, light = order[::-1][:half], order[:half]
    gap = load[heavy] - load[light]  # [half] >= 0
    ch, cl = costs[:, heavy], costs[:, light]  # [rounds, half]
    d = ch - cl
    ok = (d > 0) & (d < gap) & (ch > 0) & (cl > 0)
    r = jnp.argmin(jnp.where(ok, jnp.abs(gap - 2 * d), jnp.iinfo(jnp.int32).max), axis=0)
    swap = jnp.take_along_axis(ok, r[None], axis=0)[0]

    def swapped(x):
      xh, xl = x[r, heavy], x[r, light]
      return x.at[r, heavy].set(jnp.where(swap, xl, xh)).at[r, light].set(
          jnp.where(swap, xh, xl))

    return swapped(item), swapped(costs)

  # Unrolled: a few small sweeps, where a device loop would cost a launch each (as
  # in _deal_by_load's scan).
  item, _ = lax.fori_loop(0, sweeps, sweep, (item, costs), unroll=True)
  flat = item.reshape(-1)
  return jnp.zeros(n, jnp.int32).at[jnp.where(flat >= 0, flat, n)].set(
      jnp.arange(rounds * ctas, dtype=jnp.int32), mode="drop")


def _deal_snake(rank, num_ctas: int):
  """int32 [n]: reading positions of items ranked `rank`, dealt in rounds of num_ctas
  in rank order, odd rounds reversed (heavy firsts evened out when ranks follow work)."""
  n = rank.shape[0]
  rnd, lane = rank // num_ctas, rank % num_ctas
  round_size = jnp.minimum(num_ctas, n - rnd * num_ctas)
  return rnd * num_ctas + jnp.where(rnd % 2 == 0, lane, round_size - 1 - lane)


DEALINGS = ("snake", "load", "dynamic")
"""How reading_positions deals each round's items to the CTAs: "snake" (parallel,
a few microseconds), "load" (_deal_by_load: balanced, a sequential scan), or
"dynamic": not ahead at all, the items stay in rank order and the CTAs claim
them one by one while they run (mosaic_claims; the forward kernel only)."""


def reading_positions(ranges, heads: int, num_ctas: int,
                      window_rounds: int | None = WINDOW_ROUNDS, dealing: str = "snake",
                      spans=None, tail: float = CLAIMED_TAIL):
  """int32 [B * n * heads]: where item (b, h, row) sits in a persistent kernel's reading
  order, items enumerated (batch, head)-major, rows fastest.

  ranges: int32 [B, n, 4], the plan rows (q tiles, or kv tiles for dK/dV); an
  item's work is hi - lo of its row. spans: the rows' q_spans (the forward's)
  or None, for the load model of dealing "load" (_item_costs).

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
  (_deal_by_load, _item_costs), then items swapped between CTAs inside their
  rounds (_rebalance). On the benchmark's layouts "load" runs the
  persistent forward 7-20% faster, where the snake leaves CTAs 5-20% apart
  in modelled load, but costs ~0.2 ms to make (perf_notes entry 26): worth it
  where the items are made once and reused (jpack's make_attention_plan). The
  swaps take the busiest CTA from 3-8% above the mean to under 0.5% and the
  forward 1-4% faster (perf_notes entry 30); the model counts the consumers'
  skipped half tiles since entry 31.
  "dynamic": position = rank, the order in which the CTAs claim the items,
  with the last `tail` of the windows merged into one (claimed_tail).
  """
  return _reading_positions(ranges, heads, num_ctas, window_rounds, dealing, spans,
                            tail)[0]


def _windows(n_items: int, n_rows: int, num_ctas: int, window_rounds: int | None,
             dealing: str, tail: float = CLAIMED_TAIL) -> tuple[int, int]:
  """(window_items, tail_windows) of reading_positions' _ranks: windows of whole
  (batch, head) pairs; dealt "dynamic", the last `tail` of them merged into one
  (the heavy items of the tail first)."""
  window_items = (n_items if window_rounds is None else
                  max(1, -(-window_rounds * num_ctas // n_rows)) * n_rows)
  tail_windows = round(tail * -(-n_items // window_items)) if dealing == "dynamic" else 0
  return min(window_items, n_items), tail_windows


def _reading_positions(ranges, heads: int, num_ctas: int, window_rounds: int | None,
                       dealing: str, spans, tail: float = CLAIMED_TAIL):
  """(reading_positions' int32 [B * n * heads], int32 []: how many items are busy)."""
  if dealing not in DEALINGS:
    raise ValueError(f"dealing must be one of {DEALINGS}, got {dealing!r}")
  batch, n_rows, _ = ranges.shape
  n_items = batch * n_rows * heads
  work = jnp.broadcast_to((ranges[..., 3] - ranges[..., 0])[:, None, :],
                          (batch, heads, n_rows)).reshape(-1)
  window_items, tail_windows = _windows(n_items, n_rows, num_ctas, window_rounds, dealing,
                                        tail)
  if dealing == "dynamic":
    return _ranks(work, window_items, tail_windows)
  rank, busy = _ranks(work, window_items)
  if dealing == "snake":
    return _deal_snake(rank, num_ctas), busy
  cost = _item_costs(ranges, heads, spans)
  return (_rebalance(_deal_by_load(rank, cost, num_ctas), cost, num_ctas, REBALANCE_SWEEPS),
          busy)


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
  and scattered once, scalar by scalar (one kernel of n * 9 scalar updates:
  on an H100 that took 5 us, where a scatter of [n, 9] rows took 15 us and
  inverting the positions then gathering the rows two kernels of 9 us,
  perf_notes entry 37). The kernel reads a row with independent loads,
  instead of decoding the item and then loading its plan row (two dependent
  trips to global memory at every item).
  """
  batch, n_rows, _ = ranges.shape
  n = batch * heads * n_rows
  per_item = lambda x: jnp.broadcast_to(  # noqa: E731  [B, n, ...] -> [items, ...]
      x[:, None], (batch, heads, *x.shape[1:])).reshape(n, *x.shape[2:])
  zeros = jnp.zeros((batch, n_rows), jnp.int32)
  b, h, tile = np.unravel_index(np.arange(n), (batch, heads, n_rows))
  rows = jnp.concatenate([jnp.asarray(np.stack([b, tile, h], axis=1), jnp.int32),
                          per_item(ranges.astype(jnp.int32)),
                          per_item(zeros if compares is None else compares)[:, None],
                          per_item(zeros if spans is None else spans)[:, None]], axis=1)
  columns = rows.shape[1]
  index = (positions[:, None] * columns + jnp.arange(columns, dtype=jnp.int32)).reshape(-1)
  # A permutation: in bounds and never negative, so XLA adds no index checks.
  return jnp.zeros(n * columns, jnp.int32).at[index].set(
      rows.reshape(-1), unique_indices=True, mode="promise_in_bounds",
      wrap_negative_indices=False).reshape(n, columns)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class WorkItems:
  """A persistent kernel's work items, in reading order: what `work_items` returns.

  table: int32 [num_items, 9] (item_table); num_ctas: the CTAs that deal them
  (reading_positions' order depends on it); busy: for items dealt "dynamic"
  (claimed at run time, mosaic_claims), int32 [1], how many items have work
  (the table's first rows; the CTAs claim those and deal the empty ones
  after them in rounds), else None; codes: the forward's, bf16 [B, Tk, 16],
  the key codes with which it masks segment ids on the tensor cores
  (mosaic_codes; its table's compares are coded_compares), else None. A
  pytree: it can be made once per batch (jpack's AttentionPlan) and passed
  through jit.
  """
  table: jax.Array
  num_ctas: int = dataclasses.field(metadata=dict(static=True))
  busy: jax.Array | None = None
  codes: jax.Array | None = None

  @property
  def dynamic(self) -> bool:
    """Claimed at run time (dealing "dynamic") rather than dealt ahead."""
    return self.busy is not None


def work_items(ranges, heads: int, compares=None, num_ctas: int | None = None,
               spans=None, dealing: str = "snake", coded_ids=None,
               tail: float = CLAIMED_TAIL) -> WorkItems:
  """The work items of a persistent kernel over plan rows `ranges`: one per (row, head).

  ranges: int32 [B, n, 4] plan rows (q-major for the forward and dQ, kv-major
  for dK/dV); heads: the heads each row is run for (kv heads for dK/dV);
  compares: the plan's int32 [B, n] (q_compares or kv_compares) or None;
  num_ctas: default min(num_sms(), number of items); spans: the plan's
  q_spans (the forward's) or None; dealing: reading_positions' (DEALINGS:
  "load" balances the CTAs better and costs more to make; "dynamic" items
  are claimed at run time, by the forward kernel only); coded_ids: the
  forward's segment ids and kv tile (q_seg [B, Tq], kv_seg [B, Tk], block_k),
  for items that carry the key codes and coded compares (mosaic_codes), as
  the forward needs; None for the backward's; tail: dealt "dynamic", the
  share of windows claimed as one (claimed_tail(head_dim) for the forward's).
  On a GPU the items of dealings
  "snake" and "dynamic" are ranked and tabled by one Triton kernel
  (item_order.ranked_table: the same table, bit for bit, in one launch where
  XLA takes six).
  """
  if dealing not in DEALINGS:
    raise ValueError(f"dealing must be one of {DEALINGS}, got {dealing!r}")
  num_items = ranges.shape[0] * ranges.shape[1] * heads
  if num_ctas is None:
    num_ctas = min(num_sms(), num_items)
  codes = None
  if coded_ids is not None:
    q_seg, kv_seg, block_k = coded_ids
    compares = coded_compares(q_seg, kv_seg, ranges, compares, block_k)
    codes = key_codes(kv_seg)
  if dealing != "load" and _triton_table(ranges, heads):
    # One Triton kernel: the table below, bit for bit, without XLA's six small kernels.
    window_items, tail_windows = _windows(num_items, ranges.shape[1], num_ctas,
                                          WINDOW_ROUNDS, dealing, tail)
    zeros = jnp.zeros(ranges.shape[:2], jnp.int32)
    table, busy = item_order.ranked_table(
        ranges, zeros if compares is None else compares, zeros if spans is None else spans,
        heads=heads, window_items=window_items,
        head=_head_items(num_items, window_items, tail_windows),
        num_ctas=None if dealing == "dynamic" else num_ctas)
  else:
    positions, busy = _reading_positions(ranges, heads, num_ctas, WINDOW_ROUNDS, dealing,
                                         spans, tail)
    table = item_table(ranges, positions, heads, compares, spans)
  return WorkItems(table, num_ctas, busy.reshape(1) if dealing == "dynamic" else None, codes)


def _triton_table(ranges, heads: int) -> bool:
  """Whether work_items tables the items with item_order.ranked_table: on a GPU
  (where the Mosaic kernels run), for up to MAX_ITEM_ROW_PAIRS (item, plan row) pairs."""
  rows = ranges.shape[0] * ranges.shape[1]
  return (jax.default_backend() == "gpu"
          and rows * heads * rows <= item_order.MAX_ITEM_ROW_PAIRS)


def resolve_work_items(items: WorkItems | None, ranges, heads: int, compares,
                       num_ctas: int | None, spans=None, *, dealing: str = "snake",
                       can_claim: bool = False, coded_ids=None,
                       tail: float = CLAIMED_TAIL) -> WorkItems:
  """`items` checked against a launch, or work_items(ranges, ..., dealing, tail) when None.

  can_claim: the kernel runs items dealt "dynamic" (the forward; the backward
  kernels read their share of the table). coded_ids: the forward's (q_seg,
  kv_seg, block_k) (work_items): its items must carry key codes; None: they
  must not.
  ValueError when given items do not fit: a table of another shape, with
  compares or spans (the table holds them), num_ctas other than the
  table's, items dealt "dynamic" to a kernel that cannot claim them, or
  codes missing, of another shape, or given to a kernel without them.
  """
  if items is None:
    return work_items(ranges, heads, compares, num_ctas, spans, dealing=dealing,
                      coded_ids=coded_ids, tail=tail)
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
  if items.dynamic and not can_claim:
    raise ValueError("items: dealt 'dynamic' (claimed at run time), which only the "
                     "forward kernel can run; deal the backward's items 'snake' or 'load'")
  if coded_ids is None and items.codes is not None:
    raise ValueError("items: they carry the forward's key codes (work_items(..., "
                     "coded_ids=...)); make the backward's without coded_ids")
  if coded_ids is not None:
    kv_seg = coded_ids[1]
    want = (*kv_seg.shape, CODE_DIMS)
    if items.codes is None:
      raise ValueError("items: the forward's items carry key codes: make them with "
                       "work_items(..., coded_ids=(q_seg, kv_seg, block_k))")
    if tuple(items.codes.shape) != want or items.codes.dtype != jnp.bfloat16:
      raise ValueError(f"items: the key codes must be bfloat16 {want}, got "
                       f"{items.codes.dtype} {tuple(items.codes.shape)}")
  return items


def table_row(items_ref, pos, columns: int = 9):
  """The first `columns` columns (b, tile, h, lo, full_lo, full_hi, hi, compares[,
  spans]) of item table row `pos`, clamped into the table: independent loads that
  nothing waits for until they are used (so a loop may prefetch past its end)."""
  pos = jnp.minimum(pos, jnp.int32(items_ref.shape[0] - 1))
  return tuple(items_ref[pos, i] for i in range(columns))


def cta_items(items_ref, num_ctas: int, columns: int = 8, first=0):
  """(count, describe): the work items of this CTA (grid axis "ctas") in an item table.

  items_ref: int32 [num_items, 9] (item_table); dealt in rounds from row
  `first` on (int32; default 0), CTA c owns rows first + c, first + c +
  num_ctas, ... count: int32, how many (0 if there are none). describe(n):
  table_row of the CTA's item n.
  """
  cta = lax.axis_index("ctas")
  num_items = items_ref.shape[0]
  start = first + cta
  count = jnp.maximum(lax.div(jnp.int32(num_items + num_ctas - 1) - start,
                              jnp.int32(num_ctas)), 0)

  def describe(n):
    return table_row(items_ref, start + n * num_ctas, columns)

  return count, describe


def _walk_items(work, carry, items_ref, num_ctas: int, claims, *, producer: bool):
  """carry = work(n, row, carry) over this CTA's items n = 0, 1, ..., in order; returns
  the last carry. row: the item's table_row, loaded one item ahead.

  claims: None, the CTA's share of the table (cta_items). Else (busy_ref,
  counter_ref, claimed_smem, ready) of items dealt "dynamic": the busy items
  as claimed at run time (mosaic_claims; the module docstring says why it is
  safe), then the empty ones (rows busy .. num_items - 1) dealt in rounds,
  which the producer skips (it loads nothing for them). The producer claims
  items 0 and 1 here; `work` claims item n + 2 during item n. Every
  warpgroup waits for item n + 1's index at the start of item n and loads
  its row then.
  """
  def share(first, n0, carry):
    count, describe = cta_items(items_ref, num_ctas, columns=9, first=first)

    def item(n, state):
      carry, row = state
      next_row = describe(n + 1)  # loaded now, used by the next iteration
      return work(n0 + n, row, carry), next_row

    carry, _ = lax.fori_loop(jnp.int32(0), count, item, (carry, describe(jnp.int32(0))))
    return n0 + count, carry

  if claims is None:
    return share(jnp.int32(0), jnp.int32(0), carry)[1]
  busy_ref, counter_ref, claimed_smem, ready = claims
  busy = busy_ref[0]
  if producer:
    for n in range(2):
      claim(counter_ref, claimed_smem, ready, jnp.int32(n))

  def item(state):
    n, carry, _, row = state
    next_index = claimed(claimed_smem, ready, n + 1)
    next_row = table_row(items_ref, next_index)
    return n + 1, work(n, row, carry), next_index, next_row

  first = claimed(claimed_smem, ready, jnp.int32(0))
  n, carry, _, _ = lax.while_loop(lambda state: state[2] < busy, item,
                                  (jnp.int32(0), carry, first, table_row(items_ref, first)))
  if producer:
    return carry
  return share(busy, n, carry)[1]


def _persistent_forward_kernel(items_ref, q_ref, k_ref, v_ref, q_seg_ref,
                               q_pos_ref, kv_seg_ref, kv_pos_ref, codes_ref, *refs, scale, causal,
                               sliding_window, block_k, num_stages, num_consumers, group,
                               num_ctas, pingpong, dynamic, q_pairs):
  """The persistent kernel (module docstring): serial or pingpong consumers.

  pingpong (two consumers only): the consumers take turns on the tensor cores
  as in mosaic_attention's "pingpong" schedule, through a rendezvous barrier
  (2 arrivals a phase) met twice a step (after the QK^T issue, after the
  softmax). Consumer 1 starts one rendezvous behind consumer 0 and consumer 0
  does one more after its last item, and the pairing runs on across items, so
  the tensor cores stay busy at item boundaries. This is deadlock-free because
  a consumer's waits outside the rendezvous never need the other consumer to
  be further ahead than one rendezvous: the release that the next Q load
  needs is made in an item's first step, after its first meeting, and empty
  items (which have no rendezvous and wait for nothing) come after all busy
  ones. The
  ring needs 2 stages: with one, consumer 0's QK^T of step t waits for
  consumer 1's PV of step t - 1, which follows the rendezvous that needs
  that QK^T.

  items_ref: int32 [num_items, 9] (item_table); CTA c runs the items of rows
  c, c + num_ctas, ..., or, if dynamic, the busy rows it claims and then its
  round of the empty ones (_walk_items): refs then start with busy_ref (int32
  [1]) and counter_ref (int32 [1], zero at the launch). refs: (busy_ref,
  counter_ref,) o_ref, lse_ref, scratch. Scratch: Q buffers [2 *
  num_consumers, 64, D] (item n, consumer wg: buffer (n % 2) * num_consumers
  + wg), which also stage that item's output; q ids [2 * num_consumers, 2,
  64]; lse [2 * num_consumers, 64]; the K/V ring as in
  mosaic_attention._forward_kernel; if dynamic, the claimed indices
  [CLAIM_SLOTS] (and their barriers, after the others).
  """
  *claim_refs, o_ref, lse_ref, scratch = refs
  (q_bufs, q_ids_smem, lse_smem, k_smem, v_smem, kv_ids_smem, codes_smem,
   *claimed_smem), barriers = scratch
  q_ready, q_free, kv_ready, kv_consumed, *rest = barriers
  claims = (*claim_refs, *claimed_smem, rest.pop()) if dynamic else None
  # One Q buffer pair with two consumers: k_read / v_read hand the last step's
  # K/V slot over for the output (store_from_slot); nothing otherwise.
  handoff = rest.pop(0) if q_pairs == 1 and num_consumers == 2 else None
  sched = rest  # the pingpong rendezvous, if any
  # One Q buffer pair, items dealt ahead: an item's store is awaited in the next item's
  # first step, under its QK^T; claimed items await it at the item's end (module
  # docstring: each the faster of the two there).
  defer_store = q_pairs == 1 and not dynamic
  wg = lax.axis_index("wg")
  head_dim = q_ref.shape[3]
  block_q = num_consumers * WG_ROWS
  dtype = q_ref.dtype
  stages = jnp.int32(num_stages)
  walk = functools.partial(_walk_items, items_ref=items_ref, num_ctas=num_ctas, claims=claims)
  # A tile of which a consumer needs one half runs on that half's keys only
  # with 128-key tiles (module docstring: spans); other tilings run it whole.
  half_k = block_k // 2 if block_k == 128 else None

  def q_buffer(n, consumer):
    return lax.rem(n, jnp.int32(q_pairs)) * num_consumers + consumer

  def q_signal(qs, consumer):
    """Index of q_ready / q_free: per buffer pair with two pairs, else per consumer."""
    return qs if q_pairs == 2 else consumer

  @producer_warpgroup(wg, num_consumers)
  def _producer():

    def item(n, row, t):
      b, qt, h, lo, full_lo, full_hi, hi, compares, _ = row
      qs = lax.rem(n, jnp.int32(2)) if q_pairs == 2 else None

      busy = hi > lo  # an empty item loads nothing (its output needs no Q)

      def load(j, t, kv_head):
        # kv_ready[slot]: 5 arrivals per step; kv_consumed[slot]: waited for step
        # t - num_stages (the slot's previous use, possibly of an earlier item).
        with jax.named_scope("p_wait_slot"):
          slot = wait_for_free_slot(t, kv_consumed, num_stages)
        with jax.named_scope("p_load_kv"):
          copy_kv_tile((k_ref, v_ref, kv_seg_ref, kv_pos_ref), (k_smem, v_smem, kv_ids_smem),
                       kv_ready.at[slot], slot, b=b, j=j, kv_head=kv_head, block_k=block_k)
          # The key codes only for the ids-only tiles (the consumers' mask_tile
          # index 1; a full tile, the first included, has none); the others arrive
          # without them.
          full = (j >= full_lo) & (j < full_hi)
          coded = ~full & (tile_compares(j, lo, hi, compares) == 1)
          pl.when(coded)(lambda: plgpu.copy_gmem_to_smem(
              codes_ref.at[b, pl.ds(j * block_k, block_k)], codes_smem.at[slot],
              kv_ready.at[slot]))
          pl.when(~coded)(lambda: plgpu.barrier_arrive(kv_ready.at[slot]))
        return t + 1

      kv_start = lo
      if q_pairs == 1:
        # The item's first K/V tile before its Q, whose buffers the consumers
        # release only at the previous item's last step (module docstring).
        kv_head = lax.div(h, jnp.int32(group))

        @pl.when(busy)
        def _load_first_kv():
          load(lo, t, kv_head)

        t, kv_start = jnp.where(busy, t + 1, t), lo + 1

      @pl.when(busy)
      def _load_q():
        # q_free: wait for the release of the buffer's previous item (n - 2 with
        # two pairs, n - 1 with one); the first items find their buffer fresh.
        if q_pairs == 2:
          pl.when(n >= 2)(lambda: plgpu.barrier_wait(q_free.at[qs]))

        # q_ready: 3 copies per consumer (Q, q ids, q positions) per item.
        for c in range(num_consumers):
          if q_pairs == 1:
            pl.when(n >= 1)(lambda c=c: plgpu.barrier_wait(q_free.at[c]))
          rows = pl.ds(qt * block_q + c * WG_ROWS, WG_ROWS)
          buf = q_buffer(n, c)
          with jax.named_scope("p_load_q"):
            copy_q_tile((q_ref, q_seg_ref, q_pos_ref), q_bufs.at[buf], q_ids_smem, buf,
                        q_ready.at[q_signal(qs, c)], b=b, rows=rows, h=h)

      if claims:  # after the wait for q_free: see the module docstring
        with jax.named_scope("p_claim"):
          claim(*claims[1:], n + 2)

      if q_pairs == 2:
        kv_head = lax.div(h, jnp.int32(group))
      return lax.fori_loop(kv_start, hi, functools.partial(load, kv_head=kv_head), t)

    walk(item, jnp.int32(0), producer=True)

  @consumer_warpgroups(wg, num_consumers)
  def _consumer():
    logit_scale = scale * LOG2E
    o_shape = (WG_ROWS, head_dim)

    # The pingpong consumers' meeting point (docstring); nothing without it.
    meet = functools.partial(rendezvous, sched[0]) if sched else lambda: None
    if sched:
      pl.when(wg == 1)(meet)  # consumer 1 runs one rendezvous behind (docstring)

    def out_refs(buf, b, qt, h):
      """This consumer's output destinations of item (b, qt, h), staged in Q buffer buf."""
      rows = pl.ds(qt * block_q + wg * WG_ROWS, WG_ROWS)
      return q_bufs.at[buf], lse_smem.at[buf], o_ref.at[b, rows, h], lse_ref.at[b, h, rows]

    def flush(pending):
      """Store the output of the item that `pending` holds, if any (not awaited). With
      one Q buffer pair every item stores its own output (store_from_slot), and
      pending is () or, with defer_store, (slot, has): wait for the last store to
      have read its slot, then release the slot."""
      if q_pairs == 1:
        if defer_store:
          slot, has = pending

          @pl.when(has == 1)
          def _release_slot():
            with jax.named_scope("c_wait_store"):
              plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            plgpu.barrier_arrive(kv_consumed.at[slot])  # the last step's, held back
        return
      acc, m, l, buf, b, qt, h, has = pending

      @pl.when(has == 1)
      def _store():
        with jax.named_scope("c_store"):
          store_output(acc, m, l, *out_refs(buf, b, qt, h))

    def store_from_slot(acc, m, l, slot, b, qt, h):
      """One Q buffer pair: the item's output, staged in its last step's K/V slot
      (consumer 0 in K, consumer 1 in V, once the other is done with it: the
      handoff), stored; the slot is released once the store has read it (here, or
      with defer_store by flush in the next item's first step or after the walk)."""
      rows = pl.ds(qt * block_q + wg * WG_ROWS, WG_ROWS)

      def store_from(kv_smem):
        with jax.named_scope("c_store"):
          store_output(acc, m, l, kv_smem.at[slot, pl.ds(0, WG_ROWS)], lse_smem.at[wg],
                       o_ref.at[b, rows, h], lse_ref.at[b, h, rows])

      if handoff is None:
        store_from(k_smem)
      else:
        k_read, v_read = handoff.at[0], handoff.at[1]

        @pl.when(wg == 0)
        def _in_k():
          with jax.named_scope("c_wait_handoff"):
            plgpu.barrier_wait(k_read)  # consumer 1's last QK^T is done
          plgpu.barrier_arrive(v_read)  # and so is this consumer's PV
          store_from(k_smem)

        @pl.when(wg == 1)
        def _in_v():
          with jax.named_scope("c_wait_handoff"):
            plgpu.barrier_wait(v_read)
          store_from(v_smem)

      if not defer_store:
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        plgpu.barrier_arrive(kv_consumed.at[slot])  # the last step's, held back until now

    def item(n, row, state):
      t0, pending = state
      b, qt, h, lo, full_lo, full_hi, hi, compares, spans = row
      qs = lax.rem(n, jnp.int32(2)) if q_pairs == 2 else None
      buf = q_buffer(n, wg)
      q_smem = q_bufs.at[buf]
      # This consumer's kv tiles: [first, last], the first on its second half
      # only (front odd), the last on its first half only (back odd).
      span = lax.shift_right_logical(spans, GROUP_SPAN_BITS * wg) & (2**GROUP_SPAN_BITS - 1)
      front = span & (2**SPAN_HALF_BITS - 1)
      back = lax.shift_right_logical(span, SPAN_HALF_BITS)
      first = lo + lax.shift_right_logical(front, 1)
      last = hi - 1 - lax.shift_right_logical(back, 1)

      def release_previous_item():
        # q_free[1 - qs]: the release of item n - 1, in item n's first step, after
        # its softmax (so the store of item n - 1 had time to read its Q buffer).
        @pl.when(n >= 1)
        def _release():
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          plgpu.barrier_arrive(q_free.at[1 - qs])

      def done_with_q(j):
        """One Q buffer pair: after the item's last QK^T, release this consumer's Q
        buffer (and consumer 1 hands the last K buffer to consumer 0)."""
        if q_pairs == 2:
          return

        @pl.when(j == hi - 1)
        def _release():
          plgpu.barrier_arrive(q_free.at[wg])
          if handoff is not None:
            pl.when(wg == 1)(lambda: plgpu.barrier_arrive(handoff.at[0]))

      def attend(pending):
        with jax.named_scope("c_wait_q"):
          plgpu.barrier_wait(q_ready.at[q_signal(qs, wg)])  # once per item, every consumer
        q_ids = tuple(row_vector(q_ids_smem.at[buf, i][...]) for i in range(2))
        q_codes = row_operand(q_ids[0])  # the codes' operand A (mosaic_codes)

        def visit(j, carry, *, masked, first_step=False):
          slot = lax.rem(t0 + (j - lo), stages)
          with jax.named_scope("c_wait_kv"):
            plgpu.barrier_wait(kv_ready.at[slot])  # once per step, every consumer
          if masked is False:  # a full tile: every row attends all of it
            carry = step(j, carry, slot, masked, keys=(0, block_k), first_step=first_step)
          else:  # skipped, on its second half, on its first half, or whole (the span)
            outside = (j < first) | (j > last)
            kind_step = functools.partial(step, first_step=first_step)
            whole = functools.partial(kind_step, keys=(0, block_k))
            skipped = functools.partial(skip, first_step=first_step)
            if half_k is None:
              kinds, kind = [skipped, whole], jnp.where(outside, 0, 1)
            else:
              kinds = [skipped, functools.partial(kind_step, keys=(half_k, half_k)),
                       functools.partial(kind_step, keys=(0, half_k)), whole]
              kind = jnp.where(outside, 0, jnp.where(
                  (j == first) & ((front & 1) == 1), 1,
                  jnp.where((j == last) & ((back & 1) == 1), 2, 3)))
            carry = lax.switch(kind.astype(jnp.int32), kinds, j, carry, slot, masked)
          # once per step, every consumer (the item's last step in store_from_slot
          # with one Q buffer pair)
          if q_pairs == 2:
            plgpu.barrier_arrive(kv_consumed.at[slot])
          else:
            pl.when(j != hi - 1)(lambda: plgpu.barrier_arrive(kv_consumed.at[slot]))
          return carry

        def skip(j, carry, slot, masked, *, first_step):
          """A tile none of this consumer's rows attend: the step's meetings only."""
          del slot, masked
          done_with_q(j)
          if first_step:
            flush(pending)
          meet()
          if first_step and q_pairs == 2:
            release_previous_item()
          meet()
          return carry

        def step(j, carry, slot, masked, keys, *, first_step):
          """One kv tile on keys [start, start + width) (the rest masked for these rows).

          first_step: the item's first kv tile, which also stores the previous
          item's output (right after this QK^T's issue: under it, and while the
          other consumer finishes its softmax) and, after the softmax, releases
          the previous item's Q buffer.
          """
          acc, m, l = carry
          start, width = keys
          part = lambda ref: ref if width == block_k else ref.at[pl.ds(start, width)]  # noqa: E731

          def qk(acc_ref):
            plgpu.wgmma(acc_ref, q_smem,
                        plgpu.transpose_ref(part(k_smem.at[slot]), (1, 0)))
            if masked is not False and masked is not True:
              # An ids-only tile (COMPARES index 1): its segment ids on the tensor
              # cores instead of a compare per score (the producer loaded its codes).
              @pl.when(masked == 1)
              def _mask_ids():
                plgpu.wgmma(acc_ref, q_codes,
                            plgpu.transpose_ref(part(codes_smem.at[slot]), (1, 0)))
            if first_step:
              flush(pending)
            meet()  # QK^T issued: the other consumer may finish its softmax
            return acc_ref[...]

          with jax.named_scope("c_qk"):
            s = pl.run_scoped(qk, plgpu.ACC((WG_ROWS, width), jnp.float32))
          done_with_q(j)

          with jax.named_scope("c_softmax" if masked is False else "c_softmax_masked"):
            if masked is not False:
              s = mask_tile(s, q_ids, kv_ids_smem, slot, kv_major=False, causal=causal,
                            sliding_window=sliding_window, masked=masked, first_column=start,
                            padding_rows=False, ids_coded=True)
            p, m_new, l, alpha = online_softmax(s, m, l, logit_scale=logit_scale)
            acc = acc * broadcast_rows(alpha, acc.shape)
          if first_step and q_pairs == 2:
            release_previous_item()
          if sched:
            acc, l, m_new, p = lax.optimization_barrier((acc, l, m_new, p))
            with jax.named_scope("c_meet"):
              meet()  # softmax done; the other consumer issued its QK^T

          with jax.named_scope("c_pv"):
            acc = mma_accumulate(acc, p, part(v_smem.at[slot]), dtype)
          return acc, m_new, l

        # The first tile runs the masked step's code, its compare chosen at run
        # time: none if the plan says the tile is full.
        compare = (jnp.int32(0) if compares is None
                   else tile_compares(lo, lo, hi, compares))
        first_masked = jnp.where((lo >= full_lo) & (lo < full_hi), NO_COMPARE, compare)
        carry = visit(lo, (zeros_acc(o_shape), *empty_row_stats()), masked=first_masked,
                      first_step=q_pairs == 2 or defer_store)
        acc, m, l = three_runs(lo, full_lo, full_hi, hi, visit, carry, compares=compares,
                               start=lo + 1)
        # Rows of padding (segment id 0) attended the keys of padding (mask_tile's
        # padding_rows=False): l = 0 stores them as rows that saw nothing.
        l = jnp.where(q_ids[0] != 0, l, 0.0)
        if q_pairs == 1:
          last_slot = lax.rem(t0 + (hi - 1 - lo), stages)
          store_from_slot(acc, m, l, last_slot, b, qt, h)
          return (last_slot, jnp.int32(1)) if defer_store else ()
        return acc, m, l, buf, b, qt, h, jnp.int32(1)

      def write_empty(pending):
        # Empty items come last (reading_positions) and have no Q: the
        # buffer's last reader was this consumer's own store of item n - 2,
        # issued during item n - 1 (with one pair: its last QK^T, and its lse
        # buffer's this consumer's earlier store).
        flush(pending)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        store_output(zeros_acc(o_shape), *empty_row_stats(), *out_refs(buf, b, qt, h))
        if q_pairs == 1:
          return (jnp.int32(0), jnp.int32(0)) if defer_store else ()
        return (zeros_acc(o_shape), *empty_row_stats(), buf, b, qt, h, jnp.int32(0))

      # The item's output is stored in the next item's first step (or after the
      # walk): not awaited there, item n + 1 waits for the read, the kernel's
      # end for the write.
      pending = lax.cond(hi > lo, attend, write_empty, pending)
      return t0 + jnp.maximum(hi - lo, 0), pending

    # pending: (acc, m, l, buf, b, qt, h, has) of the item whose output is not
    # stored yet; with one Q buffer pair (flush) () or (slot, has) of the item whose
    # store has not been awaited; has = 0: none.
    if q_pairs == 2:
      nothing = (zeros_acc(o_shape), *empty_row_stats(), *(jnp.int32(0),) * 5)
    else:
      nothing = (jnp.int32(0), jnp.int32(0)) if defer_store else ()
    _, pending = walk(item, (jnp.int32(0), nothing), producer=False)
    flush(pending)
    if sched:
      pl.when(wg == 0)(meet)  # pairs with consumer 1's last one
    plgpu.wait_smem_to_gmem(0)


def q_buffer_pairs(tile: TileConfig, q) -> int:
  """The persistent forward's Q buffer pairs: 2 where two pairs of block_major rows
  fit beside the K/V ring (q: [B, Tq, H, D]; PERSISTENT_MAX_SMEM_BYTES), else 1."""
  return 2 if operand_rows_fit(2 * tile.block_major + 2 * tile.num_stages * tile.block_minor,
                               q) else 1


def persistent_forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, q_ranges, *, tile: TileConfig,
                       scale, causal, sliding_window, num_ctas: int | None = None,
                       pingpong: bool = False, q_compares=None, q_spans=None,
                       items: WorkItems | None = None, dealing: str = "dynamic",
                       q_pairs: int | None = None):
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
  to make them here, dealt by `dealing` (DEALINGS). q_pairs: Q buffer pairs, 2
  (the next item's Q loads during this one) or 1 (after this one's last QK^T,
  its output staged in a K/V slot: module docstring); None: q_buffer_pairs(tile, q).
  """
  batch, tq, heads, head_dim = q.shape
  num_consumers = tile.block_major // WG_ROWS
  bk, stages = tile.block_minor, tile.num_stages
  transforms = mma_transforms(q.dtype)
  opts = dict(scale=scale, causal=causal, sliding_window=sliding_window, block_k=bk,
              num_stages=stages, num_consumers=num_consumers, group=heads // k.shape[2])
  items = resolve_work_items(items, q_ranges, heads, q_compares, num_ctas, q_spans,
                             dealing=dealing, can_claim=True, coded_ids=(q_seg, kv_seg, bk),
                             tail=claimed_tail(head_dim))
  num_ctas = items.num_ctas
  if q_pairs is None:
    q_pairs = q_buffer_pairs(tile, q)
  if q_pairs not in (1, 2):
    raise ValueError(f"q_pairs must be 1 or 2, got {q_pairs!r}")
  pingpong = pingpong and num_consumers == 2
  if pingpong and stages < 2:
    raise ValueError(f"schedule='persistent-pingpong' needs tile.num_stages >= 2 (one "
                     f"stage would deadlock its two consumers), got {stages}")
  kernel = functools.partial(_persistent_forward_kernel, num_ctas=num_ctas,
                             pingpong=pingpong, dynamic=items.dynamic, q_pairs=q_pairs,
                             **opts)
  # q_ready: Q, q ids, q positions (3 copies) of each consumer a barrier serves, per
  # item; q_free: one arrival per consumer it serves, per item n >= 1. A barrier per
  # buffer pair, serving every consumer, or with one pair a barrier per consumer.
  q_signals, served = (2, num_consumers) if q_pairs == 2 else (num_consumers, 1)
  barriers = (
      plgpu.Barrier(num_arrivals=3 * served, num_barriers=q_signals),
      plgpu.Barrier(num_arrivals=served, num_barriers=q_signals),
      # kv_ready[s]: K, V, kv ids, kv positions and the key codes or a plain
      # arrival (5 per step);
      # kv_consumed[s]: one arrival per consumer per step.
      plgpu.Barrier(num_arrivals=5, num_barriers=stages),
      plgpu.Barrier(num_arrivals=num_consumers, num_barriers=stages),
  )
  if q_pairs == 1 and num_consumers == 2:
    # The handoff of the last step's slot: k_read (consumer 1's last QK^T done)
    # and v_read (consumer 0's last PV done), one arrival per busy item.
    barriers += (plgpu.Barrier(num_arrivals=1, num_barriers=2),)
  if pingpong:
    barriers += (plgpu.Barrier(num_arrivals=2),)  # the consumers' rendezvous
  q_buffers = q_pairs * num_consumers
  scratch = (
      plgpu.SMEM((q_buffers, WG_ROWS, head_dim), q.dtype, transforms=transforms),
      plgpu.SMEM((q_buffers, 2, WG_ROWS), jnp.int32),
      plgpu.SMEM((q_buffers, WG_ROWS), jnp.float32),
      plgpu.SMEM((stages, bk, head_dim), k.dtype, transforms=transforms),
      plgpu.SMEM((stages, bk, head_dim), v.dtype, transforms=transforms),
      plgpu.SMEM((stages, 2, bk), jnp.int32),
      plgpu.SMEM((stages, bk, CODE_DIMS), jnp.bfloat16,
                 transforms=mma_transforms(jnp.bfloat16, swizzle=2 * CODE_DIMS)),
  )
  args = (items.table, q, k, v, q_seg, q_pos, kv_seg, kv_pos, items.codes)
  launch_options = dict(
      out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                jax.ShapeDtypeStruct((batch, heads, tq), jnp.float32)),
      grid=(num_ctas,), grid_names=("ctas",), num_consumers=num_consumers)
  if not items.dynamic:
    return launch(kernel, args, scratch, barriers, **launch_options)
  # The claimed indices, their barriers (one producer arrival each) and a counter
  # that starts at zero in every call (an aliased input, launch_accumulating).
  scratch += (plgpu.SMEM((CLAIM_SLOTS,), jnp.int32),)
  barriers += (plgpu.Barrier(num_arrivals=1, num_barriers=CLAIM_SLOTS),)
  outs, _ = launch_accumulating(kernel, (*args, items.busy), (jnp.zeros((1,), jnp.int32),),
                                scratch, barriers, name="persistent_forward_claimed",
                                **launch_options)
  return outs
