"""Segment-masked flash attention, forward: Pallas kernels for Mosaic GPU (Hopper).

Same contract as `pallas_kernels.segment_attention.forward` (the Triton
lowering): same padded inputs, the same tile plan from `jpack.masks`, and the
same outputs (out in q.dtype, lse float32 in natural log, EMPTY_LSE and exact
zeros for rows that attend to nothing, never NaN).

One CTA owns one q tile of one head: `tile.block_major` rows, 64 per consumer
warpgroup (so 64 or 128), plus one producer warpgroup that streams K/V tiles
(and their segment ids and positions) through `tile.num_stages` shared-memory
slots with TMA (the warpgroups and the ring of mosaic_common). Each consumer
warpgroup runs, for every kv tile j in the plan row's [lo, hi):

    S = Q K_j^T (wgmma, Q and K from shared memory)
    mask S only where j is outside [full_lo, full_hi)
    online softmax in registers (base 2, as the Triton kernel)
    acc = acc * alpha + P V_j (wgmma, P from registers)

Shapes (all already padded by the caller):
  q: [B, Tq, H, D]; k, v: [B, Tk, Hkv, D], H % Hkv == 0;
  D in {64, 128, 256}; dtype bfloat16 or float16;
  q_seg, q_pos: int32 [B, Tq]; kv_seg, kv_pos: int32 [B, Tk];
  q_ranges: int32 [B, Tq / block_major, 4], planned with
  (block_q, block_k) = (tile.block_major, tile.block_minor).

tile.num_warps is not used: the warpgroups follow from block_major.

Schedules (`forward(..., schedule=...)`, see SCHEDULES), same contract and
outputs; they differ only in how a consumer orders its work:
  "serial"     the loop above, one kv tile at a time (_forward_kernel). The
               baseline.
  "pipelined"  QK^T of step j overlaps PV of step j - 1 inside each consumer,
               and two consumers issue their matmuls in turns
               (_split_forward_kernel).
  "pingpong"   the two consumers take turns on the tensor cores
               (_split_forward_kernel). The default for one-stage tiles and
               long rows (default_schedule).
  "persistent" the serial loop in a persistent grid of CTAs walking a list of
               work items (mosaic_persistent). The default at head dim 256
               (WIDE_HEAD_SCHEDULE).
  "persistent-pingpong"
               the persistent kernel with pingpong consumers. The default
               (DEFAULT_SCHEDULE) otherwise.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.config import TileConfig
from pallas_kernels.mosaic_common import (
    WG_ROWS, broadcast_rows, check_row_words, check_supported,
    consumer_warpgroups, copy_q_tile, empty_row_stats, launch, mma_accumulate,
    mma_transforms, online_softmax, producer_warpgroup, rendezvous, row_vector,
    operand_rows_fit, store_output, stream_kv_tiles, three_runs, tile_doc_mask,
    wait_for_free_slot, zeros_acc)
from pallas_kernels.mosaic_persistent import WorkItems, persistent_forward
from pallas_kernels.segment_attention import LOG2E

__all__ = ["DEFAULT_SCHEDULE", "DEFAULT_TILE", "GRID_SCHEDULE", "MIN_SCALE",
           "PERSISTENT_MAX_KV_BYTES", "SCHEDULES", "WIDE_HEAD_SCHEDULE", "check_supported",
           "default_schedule", "forward"]

DEFAULT_TILE = TileConfig(128, 128, num_stages=2)
"""Two consumer warpgroups, 128-key tiles, double-buffered (untuned starting point)."""

SCHEDULES = ("serial", "pipelined", "pingpong", "persistent", "persistent-pingpong")
"""Consumer loop orders of the forward kernel (module docstring)."""
DEFAULT_SCHEDULE = "persistent-pingpong"
"""The fastest measured on an H100 at T = 8192 (experiments/perf_notes.md, entry 16)."""
GRID_SCHEDULE = "pingpong"
"""The default where DEFAULT_SCHEDULE is not (default_schedule)."""
WIDE_HEAD_SCHEDULE = "persistent"
"""DEFAULT_SCHEDULE's place at head dim 256: with one Q buffer pair the two consumers
run faster apart than taking turns (0.85 against 0.99 ms on an H100, perf notes entry 41)."""
MIN_SCALE = 1e-20
"""Smallest logit scale `forward` takes (mosaic_common.online_softmax: masked logits)."""
PERSISTENT_MAX_KV_BYTES = 16 * 2**20
"""K and V bytes of one (batch, kv head) above which the grid schedule is the default."""


def default_schedule(tile: TileConfig, k) -> str:
  """The schedule `forward` runs when none is named: DEFAULT_SCHEDULE (WIDE_HEAD_SCHEDULE
  at head_dim > 128), or GRID_SCHEDULE.

  k: [B, Tk, Hkv, D]. GRID_SCHEDULE for one-stage tiles (DEFAULT_SCHEDULE
  needs 2 stages) and for long rows: the persistent kernel takes its items
  (batch, head)-major, heaviest first within a head, so the CTAs running at
  once read K/V from all over the head's row, and once that is far above L2
  (50 MB) the grid order, q tiles in sequence, is faster: 2.645 against 2.929
  ms at T = 131072 (64 MB of K/V per head), while at T = 8192 (4 MB) the
  persistent kernel is faster (0.528 against 0.551 ms). The 16 MB threshold
  lies between the two measurements, not on one. GRID_SCHEDULE also where the
  persistent kernel's operands would not fit shared memory (_persistent_fits).
  """
  _, tk, _, head_dim = k.shape
  kv_bytes = 2 * tk * head_dim * jnp.dtype(k.dtype).itemsize
  if (tile.num_stages < 2 or kv_bytes > PERSISTENT_MAX_KV_BYTES
      or not _persistent_fits(tile, k)):
    return GRID_SCHEDULE
  return WIDE_HEAD_SCHEDULE if head_dim > 128 else DEFAULT_SCHEDULE


def _persistent_fits(tile: TileConfig, k) -> bool:
  """Whether the persistent forward's operands fit in PERSISTENT_MAX_SMEM_BYTES: at
  least one pair of Q buffers of block_major rows next to the K/V ring (k: [B, Tk,
  Hkv, D]; mosaic_persistent.q_buffer_pairs)."""
  return operand_rows_fit(tile.block_major + 2 * tile.num_stages * tile.block_minor, k)


def _load_consumer_q(gmem, qo_smem, q_ids_smem, q_ready, *, qt, b, h, wg, num_consumers):
  """One consumer's Q tile of q tile qt: loaded, waited for, ids read into registers.

  gmem: (q [B, Tq, H, D], q_seg, q_pos int32 [B, Tq]); qo_smem: [consumers, 64,
  D]; q_ids_smem: int32 [consumers, 2, 64]. Returns (rows, a pl.ds of the 64 q
  rows; q_smem [64, D], this consumer's buffer; (q_seg, q_pos) [64] row vectors).
  """
  q0 = qt * (num_consumers * WG_ROWS) + wg * WG_ROWS
  rows = pl.ds(q0, WG_ROWS)
  q_smem = qo_smem.at[wg]
  # q_ready[wg]: this consumer's Q tile, q ids and q positions (3 copies).
  copy_q_tile(gmem, q_smem, q_ids_smem, wg, q_ready.at[wg], b=b, rows=rows, h=h)
  plgpu.barrier_wait(q_ready.at[wg])
  return rows, q_smem, tuple(row_vector(q_ids_smem.at[wg, n][...]) for n in range(2))


def _forward_kernel(ranges_ref, q_ref, k_ref, v_ref, q_seg_ref, q_pos_ref,
                    kv_seg_ref, kv_pos_ref, o_ref, lse_ref, scratch, *, scale,
                    causal, sliding_window, block_k, num_stages,
                    num_consumers, group):
  """The "serial" schedule: QK^T, wait, softmax, PV, wait, one kv tile at a time.

  The tensor cores idle during the softmax. Barriers: q_ready[wg] (this
  consumer's Q, q ids and q positions: 3 copies) and the K/V ring's
  kv_ready[s] and kv_consumed[s] (mosaic_common).
  """
  (qo_smem, q_ids_smem, lse_smem, k_smem, v_smem, kv_ids_smem), barriers = scratch
  q_ready, kv_ready, kv_consumed = barriers
  qt, b, h = (lax.axis_index(n) for n in ("q_tiles", "batch", "heads"))
  wg = lax.axis_index("wg")
  lo, full_lo, full_hi, hi = (ranges_ref[b, qt, n] for n in range(4))
  head_dim = q_ref.shape[-1]
  dtype = q_ref.dtype

  @producer_warpgroup(wg, num_consumers)
  def _producer():
    stream_kv_tiles((k_ref, v_ref, kv_seg_ref, kv_pos_ref),
                    (k_smem, v_smem, kv_ids_smem), kv_ready, kv_consumed,
                    b=b, kv_head=lax.div(h, jnp.int32(group)), lo=lo, hi=hi,
                    block_k=block_k, num_stages=num_stages)

  @consumer_warpgroups(wg, num_consumers)
  def _consumer():
    rows, q_smem, q_ids = _load_consumer_q((q_ref, q_seg_ref, q_pos_ref), qo_smem,
                                           q_ids_smem, q_ready, qt=qt, b=b, h=h, wg=wg,
                                           num_consumers=num_consumers)
    logit_scale = scale * LOG2E
    s_shape = (WG_ROWS, block_k)

    def visit(j, carry, *, masked):
      acc, m, l = carry
      slot = lax.rem(j - lo, jnp.int32(num_stages))
      plgpu.barrier_wait(kv_ready.at[slot])

      def qk(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
        return acc_ref[...]

      s = pl.run_scoped(qk, plgpu.ACC(s_shape, jnp.float32))
      mask = (tile_doc_mask(q_ids, kv_ids_smem, slot, s_shape, kv_major=False,
                            causal=causal, sliding_window=sliding_window)
              if masked else None)
      p, m_new, l, alpha = online_softmax(s, m, l, mask, logit_scale=logit_scale)
      acc = acc * broadcast_rows(alpha, acc.shape)

      acc = mma_accumulate(acc, p, v_smem.at[slot], dtype)
      plgpu.barrier_arrive(kv_consumed.at[slot])
      return acc, m_new, l

    acc, m, l = three_runs(lo, full_lo, full_hi, hi, visit,
                           (zeros_acc((WG_ROWS, head_dim)), *empty_row_stats()))
    # Q is no longer read: its buffer stages the output.
    store_output(acc, m, l, q_smem, lse_smem.at[wg], o_ref.at[b, rows, h],
                 lse_ref.at[b, h, rows])
    plgpu.wait_smem_to_gmem(0)


def _stream_kv_split(gmem, smem, barriers, *, b, kv_head, lo, hi, block_k, num_stages):
  """Producer loop of the split schedules: kv tiles j in [lo, hi), slot (j - lo) % stages.

  As stream_kv_tiles, but K (with the kv ids and positions, which the mask
  needs next to S) and V have their own ready / consumed barriers: K of step t
  is loaded as soon as every consumer released K of step t - num_stages, before
  waiting for V's slot (so V's later release never holds up the next QK^T).
  """
  k_ref, v_ref, kv_seg_ref, kv_pos_ref = gmem
  k_smem, v_smem, kv_ids_smem = smem
  k_ready, v_ready, k_consumed, v_consumed = barriers

  def load(j):
    t = j - lo
    slot = wait_for_free_slot(t, k_consumed, num_stages)
    cols = pl.ds(j * block_k, block_k)
    plgpu.copy_gmem_to_smem(k_ref.at[b, cols, kv_head], k_smem.at[slot], k_ready.at[slot])
    plgpu.copy_gmem_to_smem(kv_seg_ref.at[b, cols], kv_ids_smem.at[slot, 0],
                            k_ready.at[slot])
    plgpu.copy_gmem_to_smem(kv_pos_ref.at[b, cols], kv_ids_smem.at[slot, 1],
                            k_ready.at[slot])
    wait_for_free_slot(t, v_consumed, num_stages)
    plgpu.copy_gmem_to_smem(v_ref.at[b, cols, kv_head], v_smem.at[slot], v_ready.at[slot])

  pl.loop(lo, hi)(load)


def _split_forward_kernel(ranges_ref, q_ref, k_ref, v_ref, q_seg_ref, q_pos_ref,
                          kv_seg_ref, kv_pos_ref, o_ref, lse_ref, scratch, *, scale,
                          causal, sliding_window, block_k, num_stages, num_consumers,
                          group, schedule):
  """The "pipelined" and "pingpong" schedules, with split K/V barriers.

  "pipelined": software pipelining inside each consumer warpgroup (as FA3):
  step j issues QK^T_j and then PV_{j-1} (P_{j-1} from registers) back to
  back, waits only for QK^T_j (wgmma_wait(1)), and runs the softmax of S_j
  while PV_{j-1} is still on the tensor cores; the acc rescale by alpha_j
  waits for PV_{j-1}. One QK^T before the loop (prologue) and one PV after it
  (epilogue). P_j is cast to the input dtype only after PV_{j-1} is done: a
  non-wgmma instruction that writes a wgmma's input registers while another
  wgmma is in flight makes ptxas serialise every wgmma of the kernel (its
  C7513 report). Two consumers issue their steps' wgmmas in strict turns
  (turns[w], 1 arrival: consumer 1 opens turn 0 once, then each consumer
  opens the other's turn right after its own issue, as FA3's pingpong with
  intra-warpgroup overlap); both take one turn per step plus the prologue's
  and the epilogue's, and turns[w]'s next phase needs consumer w's own next
  issue, so it never runs two phases ahead.

  "pingpong": the serial loop per warpgroup, but the two consumers take turns
  on the tensor cores through a shared schedule barrier, so one warpgroup's
  softmax runs under the other's matmuls (as JAX's attention_mgpu). With one
  consumer (64-row tiles) it is the serial loop with the split barriers below.

  Both split every slot's barriers into K and V halves, so a consumer can
  start QK^T before V lands and the producer can refill K as soon as QK^T
  (and the mask, which reads the kv ids) is done:
    k_ready[s]:    TMA of K, kv ids and kv positions landed (3 arrivals);
    v_ready[s]:    TMA of V landed (1 arrival);
    k_consumed[s]: every consumer is done with K and the ids of the slot
                   (one arrival per consumer, after the softmax read the ids);
    v_consumed[s]: every consumer's PV reading V of the slot completed
                   (one arrival per consumer).
  Every consumer waits each ready barrier exactly once per step and arrives at
  each consumed barrier exactly once per step; the producer waits a consumed
  barrier only for steps t >= num_stages (the completion of step t -
  num_stages) and loads K before waiting for V's slot, so one stage is enough
  to make progress. A barrier never runs two phases ahead of a waiter: its
  next completion needs that waiter's own later arrival (or the producer's
  next copy, issued after its wait), which keeps the parity tracking of
  barrier_wait exact. An empty plan row (lo == hi) issues no copies and no
  waits: consumers write zeros and EMPTY_LSE straight away.

  The consumers' steps carry the persistent kernel's named scopes (c_wait_kv,
  c_qk, c_softmax[_masked], c_meet, c_pv, c_store): regions of Mosaic GPU's
  on-device profiler when it is on (experiments/fwd_probe.py --profile), no
  code otherwise.
  """
  (qo_smem, q_ids_smem, lse_smem, k_smem, v_smem, kv_ids_smem), barriers = scratch
  q_ready, k_ready, v_ready, k_consumed, v_consumed, *sched = barriers
  qt, b, h = (lax.axis_index(n) for n in ("q_tiles", "batch", "heads"))
  wg = lax.axis_index("wg")
  lo, full_lo, full_hi, hi = (ranges_ref[b, qt, n] for n in range(4))
  head_dim = q_ref.shape[-1]
  dtype = q_ref.dtype
  stages = jnp.int32(num_stages)

  @producer_warpgroup(wg, num_consumers)
  def _producer():
    _stream_kv_split((k_ref, v_ref, kv_seg_ref, kv_pos_ref), (k_smem, v_smem, kv_ids_smem),
                     (k_ready, v_ready, k_consumed, v_consumed), b=b,
                     kv_head=lax.div(h, jnp.int32(group)), lo=lo, hi=hi, block_k=block_k,
                     num_stages=num_stages)

  @consumer_warpgroups(wg, num_consumers)
  def _consumer():
    rows, q_smem, q_ids = _load_consumer_q((q_ref, q_seg_ref, q_pos_ref), qo_smem,
                                           q_ids_smem, q_ready, qt=qt, b=b, h=h, wg=wg,
                                           num_consumers=num_consumers)
    logit_scale = scale * LOG2E
    s_shape = (WG_ROWS, block_k)
    o_shape = (WG_ROWS, head_dim)

    def slot_of(j):
      return lax.rem(j - lo, stages)

    def softmax(s, m, l, slot, masked, cast=True):
      """(p, m_new, l_new, alpha) of raw logits s [64, block_k] of `slot`.

      p in dtype, or float32 if not cast.
      """
      mask = (tile_doc_mask(q_ids, kv_ids_smem, slot, s_shape, kv_major=False,
                            causal=causal, sliding_window=sliding_window)
              if masked else None)
      p, m_new, l_new, alpha = online_softmax(s, m, l, mask, logit_scale=logit_scale)
      return (p.astype(dtype) if cast else p), m_new, l_new, alpha

    def finish(acc, m, l):
      # Q is no longer read: its buffer stages the output.
      with jax.named_scope("c_store"):
        store_output(acc, m, l, q_smem, lse_smem.at[wg], o_ref.at[b, rows, h],
                     lse_ref.at[b, h, rows])
        plgpu.wait_smem_to_gmem(0)

    def three_loops(first, body, carry):
      """body(j, carry, masked=...) over j in [first, hi), masked outside [full_lo, full_hi)."""
      return three_runs(first, jnp.maximum(full_lo, first), jnp.maximum(full_hi, first), hi,
                        body, carry)

    if schedule == "pipelined":
      if sched:
        # turns[w]: consumer w may issue its next wgmmas (docstring).
        (turns,) = sched
        other = 1 - wg

        def take_turn(issue):
          plgpu.barrier_wait(turns.at[wg])
          issue()
          plgpu.barrier_arrive(turns.at[other])

        @pl.when(wg == 1)
        def _first_turn_to_0():
          plgpu.barrier_arrive(turns.at[0])
      else:
        def take_turn(issue):
          issue()

      def pipeline(acc_ref, s_ref):
        """acc_ref: the O accumulator [64, D]; s_ref: the S accumulator [64, block_k]."""
        # Prologue, step lo (masked whatever the plan says: a no-op on a full tile).
        plgpu.barrier_wait(k_ready.at[0])
        take_turn(lambda: plgpu.wgmma(s_ref, q_smem,
                                      plgpu.transpose_ref(k_smem.at[0], (1, 0))))
        p, m, l, _ = softmax(s_ref[...], *empty_row_stats(), 0, masked=True)
        plgpu.barrier_arrive(k_consumed.at[0])

        def step(j, carry, *, masked):
          """QK^T_j and PV_{j-1} in flight together; the softmax of S_j under PV_{j-1}."""
          p_prev, m, l = carry
          slot, prev = slot_of(j), slot_of(j - 1)
          s_ref[...] = plgpu.layout_cast(jnp.zeros(s_shape, jnp.float32),
                                         plgpu.Layout.WGMMA)
          with jax.named_scope("c_wait_kv"):
            plgpu.barrier_wait(k_ready.at[slot])
            plgpu.barrier_wait(v_ready.at[prev])

          def issue():
            plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
            plgpu.wgmma(acc_ref, p_prev, v_smem.at[prev])

          with jax.named_scope("c_qk"):
            take_turn(issue)
            # wgmma groups retire in order: at most 1 pending means QK^T_j is done.
            s = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)
          with jax.named_scope("c_softmax" if masked is False else "c_softmax_masked"):
            p, m, l, alpha = softmax(s, m, l, slot, masked, cast=False)
          plgpu.barrier_arrive(k_consumed.at[slot])
          with jax.named_scope("c_pv"):
            acc = acc_ref[...]  # waits for PV_{j-1}
          # P_j's registers (an input of PV_j) are written only now: ptxas
          # serialises every wgmma (C7513) if a non-wgmma instruction defines
          # a wgmma's input registers while another wgmma is in flight.
          acc, p = lax.optimization_barrier((acc, p))
          plgpu.barrier_arrive(v_consumed.at[prev])
          acc_ref[...] = acc * broadcast_rows(alpha, o_shape)
          return p.astype(dtype), m, l

        p, m, l = three_loops(lo + 1, step, (p, m, l))
        # Epilogue: PV of the last step.
        last = slot_of(hi - 1)
        plgpu.barrier_wait(v_ready.at[last])
        take_turn(lambda: plgpu.wgmma(acc_ref, p, v_smem.at[last]))
        acc = acc_ref[...]
        plgpu.barrier_arrive(v_consumed.at[last])
        return acc, m, l

      @pl.when(hi > lo)
      def _visit():
        finish(*pl.run_scoped(pipeline, plgpu.ACC(o_shape, jnp.float32),
                              plgpu.ACC(s_shape, jnp.float32)))

      @pl.when(hi <= lo)
      def _empty():
        finish(zeros_acc(o_shape), *empty_row_stats())
      return

    assert schedule == "pingpong", schedule
    if sched:
      # sched_barrier: both consumers arrive, then wait (a rendezvous; 2
      # arrivals per phase). Consumer 1 starts one rendezvous behind consumer
      # 0 and consumer 0 does one more after its loop, so both do 2 per step
      # plus 1, whatever the trip count (both walk the same plan row).
      (sched_barrier,) = sched
      meet = functools.partial(rendezvous, sched_barrier)
    else:
      sched_barrier, meet = None, lambda: None

    if sched_barrier is not None:
      pl.when(wg == 1)(meet)

    def visit(j, carry, *, masked):
      acc, m, l = carry
      slot = slot_of(j)
      with jax.named_scope("c_wait_kv"):
        plgpu.barrier_wait(k_ready.at[slot])

      def qk(s_ref):
        plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
        meet()  # QK^T issued: the other consumer may finish its softmax
        return s_ref[...]

      with jax.named_scope("c_qk"):
        s = pl.run_scoped(qk, plgpu.ACC(s_shape, jnp.float32))
      with jax.named_scope("c_softmax" if not masked else "c_softmax_masked"):
        p, m, l, alpha = softmax(s, m, l, slot, masked)
        plgpu.barrier_arrive(k_consumed.at[slot])
        acc = acc * broadcast_rows(alpha, o_shape)
      # The wait for V is part of the meeting with two consumers, alone with one.
      with jax.named_scope("c_meet" if sched_barrier is not None else "c_wait_kv"):
        if sched_barrier is not None:
          acc, l, m, p = lax.optimization_barrier((acc, l, m, p))
          plgpu.barrier_arrive(sched_barrier)  # softmax done
          plgpu.barrier_wait(v_ready.at[slot])
          plgpu.barrier_wait(sched_barrier)  # the other consumer issued its QK^T
        else:
          plgpu.barrier_wait(v_ready.at[slot])

      with jax.named_scope("c_pv"):
        acc = mma_accumulate(acc, p, v_smem.at[slot], dtype)
      plgpu.barrier_arrive(v_consumed.at[slot])
      return acc, m, l

    acc, m, l = three_loops(lo, visit, (zeros_acc(o_shape), *empty_row_stats()))
    if sched_barrier is not None:
      pl.when(wg == 0)(meet)
    finish(acc, m, l)


def forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, q_ranges, *, tile: TileConfig,
            scale, causal, sliding_window, interpret=False,
            schedule: str | None = None, num_ctas: int | None = None, q_compares=None,
            q_spans=None, items: WorkItems | None = None, q_pairs: int | None = None):
  """Returns (out [B, Tq, H, D] in q.dtype, lse float32 [B, H, Tq]).

  Same arguments as `segment_attention.forward`; `interpret` must be False
  (the Mosaic GPU interpreter cannot run this kernel: see tests/test_mosaic.py).
  schedule: one of SCHEDULES, the consumer loop order (module docstring);
  None: default_schedule(tile, k) (every schedule gives the same outputs).
  num_ctas: the persistent schedules only, the number of CTAs launched; default
  min(mosaic_persistent.num_sms(), number of work items B * H * Tq /
  block_major). More CTAs than items leaves the extra ones idle.
  q_compares: int32 [B, Tq / block_major], the plan's q_compares (jpack.
  masks.compare_splits: the masked tiles that need only the segment-id or
  only the position compares), used by the persistent schedules; None, or a
  grid schedule: every masked tile compares everything (same outputs).
  q_spans: int32 [B, Tq / block_major], the plan's q_spans (jpack.masks.
  group_spans: per consumer, the kv tiles, or halves of them, at either end
  of the row's range that its rows cannot attend), used by the persistent
  schedules; None: every consumer runs every tile whole (same outputs).
  items: the persistent schedules' work items made beforehand
  (mosaic_persistent.work_items(q_ranges, H, q_compares, spans=q_spans),
  e.g. once per batch for many layers), in place of q_compares and q_spans;
  None: made in the call, to be claimed at run time (dealing "dynamic").
  q_pairs: the persistent schedules only, Q buffer pairs (1 or 2,
  mosaic_persistent.persistent_forward; same outputs); None: as many as fit.
  """
  if interpret:
    raise NotImplementedError("the Mosaic GPU attention kernel has no interpret mode")
  if not scale >= MIN_SCALE:
    raise ValueError(f"scale must be >= {MIN_SCALE} for the Mosaic forward (its masked "
                     f"logits must underflow to exactly 0 after scaling), got {scale!r}")
  if schedule is None:
    schedule = default_schedule(tile, k)
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
  persistent = schedule.startswith("persistent")
  if num_ctas is not None and (not persistent or num_ctas < 1):
    raise ValueError(f"num_ctas must be None or >= 1, and only with a persistent "
                     f"schedule; got num_ctas={num_ctas}, schedule={schedule!r}")
  if items is not None and not persistent:
    raise ValueError(f"items (work items of a persistent kernel) need a persistent "
                     f"schedule, got schedule={schedule!r}")
  if q_pairs is not None and (not persistent or q_pairs not in (1, 2)):
    raise ValueError(f"q_pairs must be None, 1 or 2, and only with a persistent schedule; "
                     f"got q_pairs={q_pairs!r}, schedule={schedule!r}")
  check_supported(q, k, tile)
  check_row_words("q_compares", q_compares, q_ranges)
  check_row_words("q_spans", q_spans, q_ranges)
  if persistent:
    return persistent_forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, q_ranges, tile=tile,
                              scale=scale, causal=causal, sliding_window=sliding_window,
                              num_ctas=num_ctas, pingpong=schedule == "persistent-pingpong",
                              q_compares=q_compares, q_spans=q_spans, items=items,
                              q_pairs=q_pairs)
  batch, tq, heads, head_dim = q.shape
  group = heads // k.shape[2]
  num_consumers = tile.block_major // WG_ROWS
  bk, stages = tile.block_minor, tile.num_stages
  transforms = mma_transforms(q.dtype)
  opts = dict(scale=scale, causal=causal, sliding_window=sliding_window, block_k=bk,
              num_stages=stages, num_consumers=num_consumers, group=group)
  if schedule == "serial":
    kernel = functools.partial(_forward_kernel, **opts)
    barriers = (
        # q_ready[wg]: Q, q ids, q positions (3 copies); kv_ready[s]: K, V, kv
        # ids, kv positions (4 copies); kv_consumed[s]: one arrival per consumer.
        plgpu.Barrier(num_arrivals=3, num_barriers=num_consumers),
        plgpu.Barrier(num_arrivals=4, num_barriers=stages),
        plgpu.Barrier(num_arrivals=num_consumers, num_barriers=stages),
    )
  else:
    kernel = functools.partial(_split_forward_kernel, schedule=schedule, **opts)
    barriers = (
        plgpu.Barrier(num_arrivals=3, num_barriers=num_consumers),  # q_ready[wg]
        plgpu.Barrier(num_arrivals=3, num_barriers=stages),  # k_ready: K, kv ids, kv pos
        plgpu.Barrier(num_arrivals=1, num_barriers=stages),  # v_ready: V
        plgpu.Barrier(num_arrivals=num_consumers, num_barriers=stages),  # k_consumed
        plgpu.Barrier(num_arrivals=num_consumers, num_barriers=stages),  # v_consumed
    )
    if schedule == "pingpong" and num_consumers == 2:
      barriers += (plgpu.Barrier(num_arrivals=2),)  # sched_barrier: consumer rendezvous
    if schedule == "pipelined" and num_consumers == 2:
      barriers += (plgpu.Barrier(num_arrivals=1, num_barriers=2),)  # turns[wg]

  scratch = (
      plgpu.SMEM((num_consumers, WG_ROWS, head_dim), q.dtype, transforms=transforms),
      plgpu.SMEM((num_consumers, 2, WG_ROWS), jnp.int32),
      plgpu.SMEM((num_consumers, WG_ROWS), jnp.float32),
      plgpu.SMEM((stages, bk, head_dim), k.dtype, transforms=transforms),
      plgpu.SMEM((stages, bk, head_dim), v.dtype, transforms=transforms),
      plgpu.SMEM((stages, 2, bk), jnp.int32),
  )
  return launch(
      kernel, (q_ranges, q, k, v, q_seg, q_pos, kv_seg, kv_pos), scratch, barriers,
      out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                jax.ShapeDtypeStruct((batch, heads, tq), jnp.float32)),
      grid=(tq // tile.block_major, batch, heads),
      grid_names=("q_tiles", "batch", "heads"),
      num_consumers=num_consumers)
