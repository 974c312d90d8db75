"""Segment-masked flash attention, backward: the "persistent" Mosaic GPU schedule.

`mosaic_backward.backward_dq` and `backward_dkdv` with schedule="persistent"
run these kernels: the consumer steps of the grid kernels
(mosaic_backward_steps) in persistent kernels of `num_ctas` CTAs, each walking
a list of work items, ordered and dealt as the persistent forward's
(mosaic_persistent: reading_positions, item_table, cta_items). An item is a
major tile of one head: (batch, q tile, head) for dQ, (batch, kv tile, kv
head) for dK/dV. Same contract, inputs and outputs as the grid kernels.

What the persistent kernel adds: the producer loads each item's major
operands (dQ: Q, dO, lse, delta, q ids and positions of each consumer's 64
rows; dK/dV: K, V, kv ids and positions) into buffer pair n % 2 of the CTA's
item n, so that item n + 1's land while the consumers work on item n, and it
streams the minor tiles through the ring (mosaic_common) with the step
counter running on across items. The consumers write their results (dQ; dK
and dV) into their own buffers of the pair (Q; K and V), store them with TMA
and do not wait: the launch and epilogue of a CTA per item (the grid) are gone.

delta inside dQ (persistent_backward_dq with out and dlse): each busy item
starts with one more ring step, in which the producer loads the item's O rows
(consumer c's into the K (c = 0) or V (c = 1) half of the slot) and each
consumer computes delta = rowsum(O * dO) - dlse of its rows (dlse arrives in
delta's place), uses it for the item and stores it for the dK/dV kernel.

Items. A CTA's items are n = 0 .. N-1, the busy ones (at least one minor
tile) first, then the empty ones (reading_positions): an empty item's
output is zeros, written by each consumer through its own buffers of pair
n % 2 once its own earlier stores from them have read them (no busy item
follows, so nothing else touches them any more); the producer loads nothing
for it.

Synchronisation, per barrier (who arrives, how often):
  major_ready[p]: the producer's copies of busy item n's major operands (p =
                 n % 2), `copies` per consumer; every consumer waits it once
                 per busy item.
  major_free[p]: every consumer, once per busy item n >= 1, releases item n -
                 1's pair 1 - p once its output store has read it
                 (wait_smem_to_gmem read-only), right after item n's first
                 scores; the producer waits it before loading item n >= 2.
  ring ready[s] / consumed[s]: as mosaic_common, step t counted over all the
                 CTA's items.
The consumers do not meet each other. No barrier runs two phases ahead of a
waiter and there is no cycle, as in mosaic_persistent: the release the
producer waits for (item n - 2's, made in item n - 1) needs only item n - 1's
major operands and first minor tile, both issued before.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.config import TileConfig
from pallas_kernels.mosaic_backward_steps import dkdv_step, dq_step, row_stats
from pallas_kernels.mosaic_common import (
    WG_ROWS, consumer_warpgroups, launch, mma_transforms, producer_warpgroup, row_vector,
    stream_kv_tiles, stream_q_tiles, three_runs, wait_for_free_slot, zeros_acc)
from pallas_kernels.mosaic_persistent import WorkItems, cta_items, resolve_work_items
from pallas_kernels.segment_attention import LOG2E

__all__ = ["persistent_backward_dkdv", "persistent_backward_dq"]


def _item_loops(items_ref, barriers, wg, *, num_ctas, num_consumers, load_major,
                stream_minor, num_steps, run_item, write_empty):
  """The producer's and the consumers' loops over the CTA's items (module docstring).

  barriers: (major_ready, major_free), two each. Callbacks, per item `it` =
  (b, tile, h, lo, full_lo, full_hi, hi, compares) and buffer pair `pair`:
    load_major(it, pair): producer; issue the copies of a busy item's major
      operands onto major_ready[pair].
    stream_minor(it, t): producer; stream the item's minor tiles from step t.
    num_steps(it): the item's ring steps (0 if empty).
    run_item(it, pair, t, release): consumer; a busy item's steps from step
      t and its output store, calling release() once, after its first step's
      scores.
    write_empty(it, pair): consumer; an empty item's zeros.
  """
  major_ready, major_free = barriers
  count, describe = cta_items(items_ref, num_ctas)
  busy = lambda it: it[6] > it[3]  # noqa: E731 - hi > lo

  @producer_warpgroup(wg, num_consumers)
  def _producer():
    def item(n, carry):
      t, it = carry
      next_item = describe(n + 1)  # loads issued now, used by the next iteration
      pair = lax.rem(n, jnp.int32(2))

      @pl.when(busy(it))
      def _load_major():
        @pl.when(n >= 2)
        def _wait_pair():
          plgpu.barrier_wait(major_free.at[pair])

        load_major(it, pair)

      stream_minor(it, t)
      return t + num_steps(it), next_item

    lax.fori_loop(jnp.int32(0), count, item, (jnp.int32(0), describe(jnp.int32(0))))

  @consumer_warpgroups(wg, num_consumers)
  def _consumer():
    def item(n, carry):
      t, it = carry
      next_item = describe(n + 1)
      pair = lax.rem(n, jnp.int32(2))

      @pl.when(busy(it))
      def _run():
        plgpu.barrier_wait(major_ready.at[pair])

        def release():
          @pl.when(n >= 1)
          def _release_previous_pair():
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            plgpu.barrier_arrive(major_free.at[1 - pair])

        run_item(it, pair, t, release)

      @pl.when(jnp.logical_not(busy(it)))
      def _write_empty():
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # own earlier stores
        write_empty(it, pair)

      return t + num_steps(it), next_item

    lax.fori_loop(jnp.int32(0), count, item, (jnp.int32(0), describe(jnp.int32(0))))
    plgpu.wait_smem_to_gmem(0)


def _item_barriers(copies, num_consumers, ring_copies, stages):
  """(major_ready, major_free, ring ready, ring consumed) Barrier specs."""
  return (
      plgpu.Barrier(num_arrivals=copies * num_consumers, num_barriers=2),
      plgpu.Barrier(num_arrivals=num_consumers, num_barriers=2),
      plgpu.Barrier(num_arrivals=ring_copies, num_barriers=stages),
      plgpu.Barrier(num_arrivals=num_consumers, num_barriers=stages),
  )


# ----------------------------------------------------------------------------
# dQ


def _dq_kernel(items_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref,
               q_pos_ref, kv_seg_ref, kv_pos_ref, *refs, scale, causal, sliding_window,
               block_k, num_stages, num_consumers, group, num_ctas, fuse_delta):
  """fuse_delta: refs = (out, dq, delta out, scratch) and delta_ref holds dlse
  (module docstring); else refs = (dq, scratch)."""
  if fuse_delta:
    out_ref, dq_ref, delta_out_ref, scratch = refs
  else:
    (dq_ref, scratch), out_ref, delta_out_ref = refs, None, None
  ((q_bufs, do_bufs, stats_bufs, q_ids_bufs, k_smem, v_smem, kv_ids_smem),
   (major_ready, major_free, kv_ready, kv_consumed)) = scratch
  wg = lax.axis_index("wg")
  dtype = q_ref.dtype
  block_q = num_consumers * WG_ROWS
  step_opts = dict(logit_scale=scale * LOG2E, causal=causal, sliding_window=sliding_window)
  rows_of = lambda qt, c: pl.ds(qt * block_q + c * WG_ROWS, WG_ROWS)  # noqa: E731
  buffer = lambda pair, c: pair * num_consumers + c  # noqa: E731

  def load_major(it, pair):
    b, qt, h = it[:3]
    done = major_ready.at[pair]
    for c in range(num_consumers):  # 6 copies per consumer
      rows, buf = rows_of(qt, c), buffer(pair, c)
      plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_bufs.at[buf], done)
      plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_bufs.at[buf], done)
      plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], stats_bufs.at[buf, 0], done)
      plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], stats_bufs.at[buf, 1], done)
      plgpu.copy_gmem_to_smem(q_seg_ref.at[b, rows], q_ids_bufs.at[buf, 0], done)
      plgpu.copy_gmem_to_smem(q_pos_ref.at[b, rows], q_ids_bufs.at[buf, 1], done)

  def o_slot(c, slot):
    """Where the O rows of consumer c land in ring slot `slot` (the delta step)."""
    return (k_smem, v_smem)[c].at[slot, pl.ds(0, WG_ROWS)]

  def stream_minor(it, t):
    b, qt, h, lo, _, _, hi, _ = it
    if fuse_delta:
      @pl.when(hi > lo)
      def _load_out():  # the delta step: 4 arrivals, like a kv step
        slot = wait_for_free_slot(t, kv_consumed, num_stages)
        for c in range(num_consumers):
          plgpu.copy_gmem_to_smem(out_ref.at[b, rows_of(qt, c), h], o_slot(c, slot),
                                  kv_ready.at[slot])
        for _ in range(4 - num_consumers):
          plgpu.barrier_arrive(kv_ready.at[slot])

    stream_kv_tiles((k_ref, v_ref, kv_seg_ref, kv_pos_ref), (k_smem, v_smem, kv_ids_smem),
                    kv_ready, kv_consumed, b=b, kv_head=lax.div(h, jnp.int32(group)),
                    lo=lo, hi=hi, block_k=block_k, num_stages=num_stages,
                    first_step=t + int(fuse_delta))

  def store_delta(it, buf):
    """TMA of the delta staged in stats_bufs[buf, 1] (dlse's place) to delta_out."""
    b, qt, h = it[:3]
    plgpu.commit_smem()  # also a warpgroup barrier: the whole row is written
    plgpu.copy_smem_to_gmem(stats_bufs.at[buf, 1], delta_out_ref.at[b, h, rows_of(qt, wg)])

  def delta_step(t, dos, dlse, it, buf):
    """delta = rowsum(O * dO) - dlse of the consumer's rows, O from ring step t; stored."""
    slot = lax.rem(t, jnp.int32(num_stages))
    plgpu.barrier_wait(kv_ready.at[slot])
    load = lambda ref: plgpu.load(ref, (), layout=plgpu.Layout.WGMMA).astype(jnp.float32)  # noqa: E731
    for c in range(num_consumers):  # static: each consumer's O sits in its own half
      @pl.when(wg == c)
      def _row_sums():
        out = load(o_slot(c, slot))
        stats_bufs.at[buf, 1][...] = jnp.sum(out * load(dos), axis=1) - dlse

    plgpu.barrier_arrive(kv_consumed.at[slot])
    store_delta(it, buf)
    return row_vector(stats_bufs.at[buf, 1][...])

  def store(dq, it, pair):
    b, qt, h = it[:3]
    out = q_bufs.at[buffer(pair, wg)]  # Q is no longer read: it stages dQ
    out[...] = (dq * scale).astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out, dq_ref.at[b, rows_of(qt, wg), h])

  def run_item(it, pair, t0, release):
    lo, full_lo, full_hi, hi, compares = it[3:]
    buf = buffer(pair, wg)
    qs, dos = q_bufs.at[buf], do_bufs.at[buf]
    stats = row_stats(stats_bufs.at[buf])
    if fuse_delta:
      stats = (stats[0], delta_step(t0, dos, stats[1], it, buf))
      t0 = t0 + 1
    q_ids = tuple(row_vector(q_ids_bufs.at[buf, n][...]) for n in range(2))

    def visit(j, dq, *, masked):
      slot = lax.rem(t0 + j - lo, jnp.int32(num_stages))
      plgpu.barrier_wait(kv_ready.at[slot])
      dq = dq_step(dq, qs, dos, k_smem.at[slot], v_smem.at[slot], stats, q_ids,
                   kv_ids_smem, slot, masked=masked,
                   after_scores=lambda: pl.when(j == lo)(release), **step_opts)
      plgpu.barrier_arrive(kv_consumed.at[slot])
      return dq

    dq = three_runs(lo, full_lo, full_hi, hi, visit, zeros_acc((WG_ROWS, q_ref.shape[3])),
                    compares)
    store(dq, it, pair)

  def write_empty(it, pair):
    store(zeros_acc((WG_ROWS, q_ref.shape[3])), it, pair)
    if fuse_delta:  # no row sees anything: delta is never used, but finite
      buf = buffer(pair, wg)
      stats_bufs.at[buf, 1][...] = row_vector(jnp.zeros((WG_ROWS,), jnp.float32))
      store_delta(it, buf)

  busy_steps = lambda it: it[6] - it[3] + int(fuse_delta)  # noqa: E731
  _item_loops(
      items_ref, (major_ready, major_free), wg, num_ctas=num_ctas,
      num_consumers=num_consumers, load_major=load_major, stream_minor=stream_minor,
      num_steps=lambda it: jnp.where(it[6] > it[3], busy_steps(it), 0), run_item=run_item,
      write_empty=write_empty)


def persistent_backward_dq(q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos,
                           q_ranges, *, tile: TileConfig, scale, causal, sliding_window,
                           num_ctas: int | None = None, out=None, dlse=None,
                           q_compares=None, items: WorkItems | None = None):
  """backward_dq(..., schedule="persistent"): dQ [B, Tq, H, D] in q.dtype.

  Arguments as mosaic_backward.backward_dq, which checks them (q_compares
  included); num_ctas: the CTAs launched, default min(num_sms(), B * H * Tq /
  block_major); items: work_items(q_ranges, H, q_compares) made beforehand, or
  None.
  out [B, Tq, H, D] and dlse float32 [B, H, Tq] in place of delta (None): the
  kernel computes delta = rowsum(out * do) - dlse itself, in one more ring
  step per item (O through the K/V slot), and returns (dQ, delta float32 [B,
  H, Tq]) for the dK/dV kernel; delta is 0 for the rows of q tiles that
  attend to nothing.
  """
  fuse_delta = out is not None
  if fuse_delta == (delta is not None) or fuse_delta != (dlse is not None):
    raise ValueError("pass either delta, or out and dlse")
  batch, tq, heads, head_dim = q.shape
  num_consumers = tile.block_major // WG_ROWS
  bk, stages = tile.block_minor, tile.num_stages
  items = resolve_work_items(items, q_ranges, heads, q_compares, num_ctas)
  num_ctas = items.num_ctas
  kernel = functools.partial(
      _dq_kernel, scale=float(scale), causal=causal, sliding_window=sliding_window,
      block_k=bk, num_stages=stages, num_consumers=num_consumers,
      group=heads // k.shape[2], num_ctas=num_ctas, fuse_delta=fuse_delta)
  transforms = mma_transforms(q.dtype)
  pairs = 2 * num_consumers  # buffer (n % 2) * num_consumers + consumer
  scratch = (
      plgpu.SMEM((pairs, WG_ROWS, head_dim), q.dtype, transforms=transforms),  # Q, dQ
      plgpu.SMEM((pairs, WG_ROWS, head_dim), do.dtype, transforms=transforms),  # dO
      plgpu.SMEM((pairs, 2, WG_ROWS), jnp.float32),  # lse, delta
      plgpu.SMEM((pairs, 2, WG_ROWS), jnp.int32),  # q ids, positions
      plgpu.SMEM((stages, bk, head_dim), k.dtype, transforms=transforms),
      plgpu.SMEM((stages, bk, head_dim), v.dtype, transforms=transforms),
      plgpu.SMEM((stages, 2, bk), jnp.int32),
  )
  dq_type = jax.ShapeDtypeStruct(q.shape, q.dtype)
  args = (items.table, q, k, v, do, lse, dlse if fuse_delta else delta, q_seg, q_pos, kv_seg,
          kv_pos) + ((out,) if fuse_delta else ())
  return launch(
      kernel, args, scratch, _item_barriers(6, num_consumers, 4, stages),
      out_type=((dq_type, jax.ShapeDtypeStruct(lse.shape, jnp.float32)) if fuse_delta
                else dq_type),
      grid=(num_ctas,), grid_names=("ctas",), num_consumers=num_consumers)


# ----------------------------------------------------------------------------
# dK and dV


def _dkdv_kernel(items_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref,
                 q_pos_ref, kv_seg_ref, kv_pos_ref, dk_ref, dv_ref, scratch, *, scale,
                 causal, sliding_window, block_q, num_stages, num_consumers, group,
                 num_ctas):
  ((k_bufs, v_bufs, kv_ids_bufs, q_smem, do_smem, stats_smem, q_ids_smem),
   (major_ready, major_free, q_ready, q_consumed)) = scratch
  wg = lax.axis_index("wg")
  block_kv = num_consumers * WG_ROWS
  step_opts = dict(logit_scale=scale * LOG2E, causal=causal, sliding_window=sliding_window)
  rows_of = lambda kt, c: pl.ds(kt * block_kv + c * WG_ROWS, WG_ROWS)  # noqa: E731
  buffer = lambda pair, c: pair * num_consumers + c  # noqa: E731
  acc_shape = (WG_ROWS, k_ref.shape[3])

  def load_major(it, pair):
    b, kt, kv_head = it[:3]
    done = major_ready.at[pair]
    for c in range(num_consumers):  # 4 copies per consumer
      rows, buf = rows_of(kt, c), buffer(pair, c)
      plgpu.copy_gmem_to_smem(k_ref.at[b, rows, kv_head], k_bufs.at[buf], done)
      plgpu.copy_gmem_to_smem(v_ref.at[b, rows, kv_head], v_bufs.at[buf], done)
      plgpu.copy_gmem_to_smem(kv_seg_ref.at[b, rows], kv_ids_bufs.at[buf, 0], done)
      plgpu.copy_gmem_to_smem(kv_pos_ref.at[b, rows], kv_ids_bufs.at[buf, 1], done)

  def stream_minor(it, t):
    b, _, kv_head, lo, _, _, hi, _ = it
    stream_q_tiles((q_ref, do_ref, lse_ref, delta_ref, q_seg_ref, q_pos_ref),
                   (q_smem, do_smem, stats_smem, q_ids_smem), q_ready, q_consumed,
                   b=b, kv_head=kv_head, group=group, lo=lo, hi=hi, block_q=block_q,
                   num_stages=num_stages, first_step=t)

  def store(dk, dv, it, pair):
    b, kt, kv_head = it[:3]
    buf, rows = buffer(pair, wg), rows_of(kt, wg)
    ks, vs = k_bufs.at[buf], v_bufs.at[buf]  # no longer read: they stage dK, dV
    ks[...] = (dk * scale).astype(dk_ref.dtype)
    vs[...] = dv.astype(dv_ref.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(ks, dk_ref.at[b, rows, kv_head])
    plgpu.copy_smem_to_gmem(vs, dv_ref.at[b, rows, kv_head])

  def run_item(it, pair, t0, release):
    lo, full_lo, full_hi, hi, compares = it[3:]
    buf = buffer(pair, wg)
    ks, vs = k_bufs.at[buf], v_bufs.at[buf]
    kv_ids = tuple(row_vector(kv_ids_bufs.at[buf, n][...]) for n in range(2))

    def one_head(r, carry):
      step0 = t0 + r * (hi - lo) - lo  # the producer's step of q tile i: step0 + i

      def visit(i, carry, *, masked):
        slot = lax.rem(step0 + i, jnp.int32(num_stages))
        plgpu.barrier_wait(q_ready.at[slot])
        carry = dkdv_step(*carry, ks, vs, q_smem.at[slot], do_smem.at[slot], stats_smem,
                          q_ids_smem, slot, kv_ids, masked=masked,
                          after_scores=lambda: pl.when((r == 0) & (i == lo))(release),
                          **step_opts)
        plgpu.barrier_arrive(q_consumed.at[slot])
        return carry

      return three_runs(lo, full_lo, full_hi, hi, visit, carry, compares, kv_major=True)

    carry = (zeros_acc(acc_shape), zeros_acc(acc_shape))
    if group == 1:
      dk, dv = one_head(jnp.int32(0), carry)
    else:
      dk, dv = lax.fori_loop(jnp.int32(0), jnp.int32(group), one_head, carry)
    store(dk, dv, it, pair)

  _item_loops(
      items_ref, (major_ready, major_free), wg, num_ctas=num_ctas,
      num_consumers=num_consumers, load_major=load_major, stream_minor=stream_minor,
      num_steps=lambda it: group * jnp.maximum(it[6] - it[3], 0), run_item=run_item,
      write_empty=lambda it, pair: store(zeros_acc(acc_shape), zeros_acc(acc_shape), it,
                                         pair))


def persistent_backward_dkdv(q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos,
                             kv_ranges, *, tile: TileConfig, scale, causal, sliding_window,
                             num_ctas: int | None = None, kv_compares=None,
                             items: WorkItems | None = None):
  """backward_dkdv(..., schedule="persistent"): (dK, dV) [B, Tk, Hkv, D].

  Arguments as mosaic_backward.backward_dkdv, which checks them (kv_compares
  included); num_ctas: the CTAs launched, default min(num_sms(), B * Hkv * Tk /
  block_major); items: work_items(kv_ranges, Hkv, kv_compares) made
  beforehand, or None.
  """
  batch, tk, kv_heads, head_dim = k.shape
  num_consumers = tile.block_major // WG_ROWS
  bq, stages = tile.block_minor, tile.num_stages
  items = resolve_work_items(items, kv_ranges, kv_heads, kv_compares, num_ctas)
  num_ctas = items.num_ctas
  kernel = functools.partial(
      _dkdv_kernel, scale=float(scale), causal=causal, sliding_window=sliding_window,
      block_q=bq, num_stages=stages, num_consumers=num_consumers,
      group=q.shape[2] // kv_heads, num_ctas=num_ctas)
  transforms = mma_transforms(q.dtype)
  pairs = 2 * num_consumers  # buffer (n % 2) * num_consumers + consumer
  scratch = (
      plgpu.SMEM((pairs, WG_ROWS, head_dim), k.dtype, transforms=transforms),  # K, dK
      plgpu.SMEM((pairs, WG_ROWS, head_dim), v.dtype, transforms=transforms),  # V, dV
      plgpu.SMEM((pairs, 2, WG_ROWS), jnp.int32),  # kv ids, positions
      plgpu.SMEM((stages, bq, head_dim), q.dtype, transforms=transforms),
      plgpu.SMEM((stages, bq, head_dim), do.dtype, transforms=transforms),
      plgpu.SMEM((stages, 2, bq), jnp.float32),  # lse, delta
      plgpu.SMEM((stages, 2, bq), jnp.int32),  # q ids, positions
  )
  return launch(
      kernel, (items.table, q, k, v, do, lse, delta, q_seg, q_pos, kv_seg, kv_pos), scratch,
      _item_barriers(4, num_consumers, 6, stages),
      out_type=(jax.ShapeDtypeStruct(k.shape, k.dtype),
                jax.ShapeDtypeStruct(v.shape, v.dtype)),
      grid=(num_ctas,), grid_names=("ctas",), num_consumers=num_consumers)
