"""Segment-masked flash attention, backward: Pallas kernels for Mosaic GPU (Hopper).

Same contract as `pallas_kernels.segment_attention.backward_dq` and
`backward_dkdv` (the Triton lowering), for range plans (document masks:
segment ids, positions, causal, sliding window); general masks (a rule or a
dense mask, planned as tile lists) are refused with a ValueError.

Softmax runs in base 2 as in the Triton kernels: with lse2 = lse * log2(e),
P = exp2(S * scale * log2(e) - lse2). Rows that attend to nothing have
lse == EMPTY_LSE; `_bwd_shift` turns that into lse2 = +1e30, so every p of
such a row is exactly 0 (masked logits are -1e30, unmasked ones are finite)
and the row contributes nothing and never NaN. Padding queries (id 0) are
masked in every tile they appear in (a fully unmasked tile has no padding).

Both kernels use the layout of the forward (the warpgroups and the ring of
`mosaic_common`): one CTA of `tile.block_major / 64` consumer warpgroups (64
rows each) and one producer warpgroup that streams the minor tiles through
`tile.num_stages` shared-memory slots with TMA, ready/consumed barriers per
slot. Schedules (SCHEDULES): "grid" is one CTA per major tile (this module's
kernels), "persistent" one CTA per SM walking lists of major tiles
(mosaic_persistent_backward); default_schedule picks per kernel. The math of
a step is shared (mosaic_backward_steps). `backward_dq_and_delta` also
returns delta (below), which the persistent dQ kernel computes itself.

dQ (`backward_dq`): a CTA owns a q tile of one head; each consumer keeps its
64 rows of Q, dO, lse, delta and q ids in shared memory, and for every kv tile
j of the plan row (K_j, V_j, kv ids streamed):

    S = Q K_j^T, dP = dO V_j^T          (two wgmmas, one wait)
    P = exp2(S * scale * log2e - lse2)  (masked only outside [full_lo, full_hi))
    dS = P * (dP - delta)
    dQ += dS K_j                        (wgmma, dS from registers)

and writes dQ * scale.

dK/dV (`backward_dkdv`): a CTA owns a kv tile of one kv head; each consumer
keeps its 64 rows of K, V and kv ids in shared memory, and for every q head r
of the kv head's group and every q tile i of the plan row (Q_i, dO_i, lse,
delta and q ids streamed; step t = r * (hi - lo) + i - lo uses slot
t % num_stages):

    S^T = K Q_i^T, dP^T = V dO_i^T          (two wgmmas, one wait)
    P^T = exp2(S^T * scale * log2e - lse2)  (keys on rows, so lse2 and delta
                                             are column vectors)
    dS^T = P^T * (dP^T - delta)
    dV += P^T dO_i, dK += dS^T Q_i          (two wgmmas, one wait)

and writes dK * scale and dV, summed over the group (GQA).

Shapes (all already padded by the caller):
  q, do: [B, Tq, H, D]; k, v: [B, Tk, Hkv, D], H % Hkv == 0;
  D in {64, 128, 256}; dtype bfloat16 or float16;
  lse, delta: float32 [B, H, Tq]; delta = rowsum(o * do) - dlse;
  q_seg, q_pos: int32 [B, Tq]; kv_seg, kv_pos: int32 [B, Tk];
  dQ: q_ranges int32 [B, Tq / block_major, 4], planned with
    (block_q, block_k) = (tile.block_major, tile.block_minor);
  dK/dV: kv_ranges int32 [B, Tk / block_major, 4], the transposed plan of
    (block_q, block_k) = (tile.block_minor, tile.block_major).

Registers: a consumer holds float32 accumulators of [64, D] (dQ; or dK and
dV) plus two [64, block_minor] ones (S and dP): with D = 128 and two
consumers (232 registers a thread), block_minor = 64 is the comfortable
choice for dK/dV (64 + 64 + 32 + 32 accumulator registers); 128 fits for dQ.
With D = 256, dK and dV alone take 256 registers a thread: the grid dK/dV
kernel spills (4.3 KB of local memory a thread, ptxas; perf notes entry 36),
so there dK/dV runs the "split" kernel, whose two warpgroups split D
(mosaic_split_backward), and dQ the grid kernel on 32-key tiles
(mosaic_common.WIDE_HEAD_DQ_TILE: two consumers, each a [64, 256] accumulator
next to [64, 32] scores; entry 39).
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
    BLOCK_MINORS, DQ_BLOCK_MINORS, WG_ROWS, check_row_words, check_supported,
    consumer_warpgroups, launch, load_kv_rows, mma_transforms, operand_rows_fit, plan_rows,
    producer_warpgroup, row_vector, stream_kv_tiles, stream_q_tiles, three_runs, zeros_acc)
from pallas_kernels.mosaic_persistent import WorkItems
from pallas_kernels.mosaic_persistent_backward import (
    persistent_backward_dkdv, persistent_backward_dq)
from pallas_kernels.mosaic_split_backward import (
    SPLIT_TILE, split_backward_dkdv, split_backward_dq, splits)
from pallas_kernels.segment_attention import LOG2E, backward_delta

__all__ = ["DEFAULT_DQ_TILE", "DEFAULT_DKDV_TILE", "DEFAULT_SCHEDULES", "SCHEDULES",
           "backward_dq", "backward_dq_and_delta", "backward_dkdv", "check_backward_inputs",
           "WIDE_HEAD_SCHEDULES", "default_schedule", "persistent_fits", "splits"]

DEFAULT_DQ_TILE = TileConfig(128, 64, num_stages=2)
"""dQ: two consumer warpgroups (128 q rows), 64-key tiles, double-buffered.

Untuned starting point: K/V ring 2 x 32 KiB plus Q/dO 64 KiB at D = 128."""

DEFAULT_DKDV_TILE = TileConfig(128, 64, num_stages=2)
"""dK/dV: two consumer warpgroups (128 kv rows), 64-query tiles, double-buffered.

Untuned starting point: 64-query tiles keep S^T and dP^T at 32 registers each
next to the dK and dV accumulators (64 each at D = 128)."""

SCHEDULES = ("grid", "persistent", "split")
"""How a backward kernel walks its major tiles: one CTA each ("grid"), a
persistent kernel of one CTA per SM walking lists of them
(mosaic_persistent_backward), or one CTA of 64 rows each whose two consumer
warpgroups split the head dim ("split", mosaic_split_backward: for D = 256,
where one warpgroup's accumulators over all of D spill). All give the same
outputs."""
DEFAULT_SCHEDULES = {"dq": "persistent", "dkdv": "grid"}
"""Each kernel's faster schedule on an H100 at T = 8192 (experiments/perf_notes.md,
entry 17): the persistent dQ kernel is 5-7% faster than the grid one on packed
documents, the persistent dK/dV kernel 3% slower (4% faster with every tile full)."""
WIDE_HEAD_SCHEDULES = {"dq": "grid", "dkdv": "split"}
"""Each kernel's faster schedule at head_dim 256 with 64 x 64 tiles (H100, main shape,
perf notes entry 39): dK/dV split 2.48 ms against the grid's 5.91 (which spills);
dQ grid 2.11 ms against split's 2.19."""
PERSISTENT_MAX_STREAM_BYTES = 16 * 2**20
"""Streamed bytes per head above which the grid is the default (default_schedule)."""


def persistent_fits(tile: TileConfig, streamed) -> bool:
  """Whether the persistent kernel's operands fit in PERSISTENT_MAX_SMEM_BYTES.

  streamed: as default_schedule's. Two buffer pairs of the major operands
  (2 * block_major rows of two operands) next to the ring of the minor ones.
  """
  return operand_rows_fit(2 * (2 * tile.block_major + tile.num_stages * tile.block_minor),
                          streamed)


def default_schedule(tile: TileConfig, streamed, kernel: str) -> str:
  """The schedule a backward kernel runs when none is named: DEFAULT_SCHEDULES,
  WIDE_HEAD_SCHEDULES or "grid".

  kernel: "dq" or "dkdv"; streamed: the operand whose tiles stream through
  the ring, with its partner (K and V for dQ: pass k [B, Tk, Hkv, D]; Q and dO
  for dK/dV: pass q). In order:
    - "grid" for 32-key tiles (dQ's mosaic_common.WIDE_HEAD_DQ_TILE);
    - WIDE_HEAD_SCHEDULES at head_dim > 128 with the split kernels' 64 x 64 tile
      (mosaic_split_backward.SPLIT_TILE);
    - "grid" where the persistent kernel would not fit in shared memory (two
      buffer pairs of major operands next to the ring) and for long rows, more
      than PERSISTENT_MAX_STREAM_BYTES of streamed operands per head: the
      threshold of the persistent forward (mosaic_attention.default_schedule),
      whose item order thrashes L2 there;
    - DEFAULT_SCHEDULES otherwise.
  """
  _, length, _, head_dim = streamed.shape
  if tile.block_minor < WG_ROWS:  # 32-key dQ tiles: the grid kernel only
    return "grid"
  if head_dim > 128 and splits(tile):
    return WIDE_HEAD_SCHEDULES[kernel]
  stream_bytes = 2 * length * head_dim * jnp.dtype(streamed.dtype).itemsize
  if not persistent_fits(tile, streamed) or stream_bytes > PERSISTENT_MAX_STREAM_BYTES:
    return "grid"
  return DEFAULT_SCHEDULES[kernel]


def _pick_schedule(schedule, num_ctas, tile, streamed, kernel, items=None):
  """The schedule to run (default_schedule if None); ValueError for bad arguments."""
  if schedule is None:
    schedule = default_schedule(tile, streamed, kernel)
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
  if num_ctas is not None and (schedule != "persistent" or num_ctas < 1):
    raise ValueError(f"num_ctas must be None or >= 1, and only with schedule="
                     f"'persistent'; got num_ctas={num_ctas}, schedule={schedule!r}")
  if tile.block_minor < WG_ROWS and schedule != "grid":
    raise ValueError(f"tile.block_minor = {tile.block_minor} runs on schedule='grid' "
                     f"only, got schedule={schedule!r}")
  if schedule == "split" and not splits(tile):
    raise ValueError(f"schedule='split' needs a {SPLIT_TILE.block_major} x "
                     f"{SPLIT_TILE.block_minor} tile, got ({tile.block_major}, "
                     f"{tile.block_minor})")
  if items is not None and schedule != "persistent":
    raise ValueError(f"items (work items of a persistent kernel) need schedule="
                     f"'persistent', got schedule={schedule!r}")
  return schedule


def check_backward_inputs(q, k, plan, tile: TileConfig, *, kv_major: bool, rule=None,
                          kv_doc=None, dense=None, interpret=False,
                          block_minors=BLOCK_MINORS) -> None:
  """Raises if the Mosaic backward cannot run these inputs.

  plan: the range plan, int32 [B, n_major, 4]; kv_major: the dK/dV kernel
  (major tiles over keys); block_minors: as mosaic_common.check_supported's.
  NotImplementedError for interpret mode, ValueError for a general mask, tile
  lists or unsupported shapes.
  """
  if interpret:
    raise NotImplementedError("the Mosaic GPU backward kernels have no interpret mode")
  if rule is not None or kv_doc is not None or dense is not None:
    raise ValueError("the Mosaic GPU backward supports document masks only (segment "
                     "ids, positions, causal, sliding_window); a mask rule or dense "
                     "mask needs the Triton kernels (pallas_kernels.segment_attention)")
  check_supported(q, k, tile, kv_major=kv_major, block_minors=block_minors)
  major_len = k.shape[1] if kv_major else q.shape[1]
  expected = (q.shape[0], major_len // tile.block_major, 4)
  if plan.ndim != 3 or tuple(plan.shape) != expected:
    raise ValueError(f"{'kv' if kv_major else 'q'}_ranges must be a range plan int32 "
                     f"[B, n_tiles, 4] = {expected} (tile lists of general masks are "
                     f"not supported), got shape {tuple(plan.shape)}")


# ----------------------------------------------------------------------------
# dQ


def _dq_kernel(ranges_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref,
               q_pos_ref, kv_seg_ref, kv_pos_ref, dq_ref, scratch, *, scale, causal,
               sliding_window, block_k, num_stages, num_consumers, group):
  """ranges_ref: int32 [B, nq, 4] plan rows, or [B, nq, 5] with q_compares last."""
  (q_smem, do_smem, stats_smem, q_ids_smem, k_smem, v_smem, kv_ids_smem), barriers = scratch
  q_ready, kv_ready, kv_consumed = barriers
  qt, b, h = (lax.axis_index(n) for n in ("q_tiles", "batch", "heads"))
  wg = lax.axis_index("wg")
  lo, full_lo, full_hi, hi = (ranges_ref[b, qt, n] for n in range(4))
  compares = ranges_ref[b, qt, 4] if ranges_ref.shape[2] == 5 else None
  dtype = q_ref.dtype
  step_opts = dict(logit_scale=scale * LOG2E, causal=causal, sliding_window=sliding_window)

  @producer_warpgroup(wg, num_consumers)
  def _producer():
    stream_kv_tiles((k_ref, v_ref, kv_seg_ref, kv_pos_ref),
                    (k_smem, v_smem, kv_ids_smem), kv_ready, kv_consumed,
                    b=b, kv_head=lax.div(h, jnp.int32(group)), lo=lo, hi=hi,
                    block_k=block_k, num_stages=num_stages)

  @consumer_warpgroups(wg, num_consumers)
  def _consumer():
    rows = pl.ds(qt * (num_consumers * WG_ROWS) + wg * WG_ROWS, WG_ROWS)
    qs, dos = q_smem.at[wg], do_smem.at[wg]
    ready = q_ready.at[wg]
    plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], qs, ready)
    plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], dos, ready)
    plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], stats_smem.at[wg, 0], ready)
    plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], stats_smem.at[wg, 1], ready)
    plgpu.copy_gmem_to_smem(q_seg_ref.at[b, rows], q_ids_smem.at[wg, 0], ready)
    plgpu.copy_gmem_to_smem(q_pos_ref.at[b, rows], q_ids_smem.at[wg, 1], ready)
    plgpu.barrier_wait(ready)
    stats = row_stats(stats_smem.at[wg])
    q_ids = tuple(row_vector(q_ids_smem.at[wg, n][...]) for n in range(2))

    def visit(j, dq, *, masked):
      slot = lax.rem(j - lo, jnp.int32(num_stages))
      plgpu.barrier_wait(kv_ready.at[slot])
      dq = dq_step(dq, qs, dos, k_smem.at[slot], v_smem.at[slot], stats, q_ids,
                   kv_ids_smem, slot, masked=masked, **step_opts)
      plgpu.barrier_arrive(kv_consumed.at[slot])
      return dq

    dq = three_runs(lo, full_lo, full_hi, hi, visit, zeros_acc((WG_ROWS, qs.shape[-1])),
                    compares)
    qs[...] = (dq * scale).astype(dtype)  # Q is no longer read: reuse its slot
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(qs, dq_ref.at[b, rows, h])
    plgpu.wait_smem_to_gmem(0)


def backward_dq(q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos, q_ranges, *,
                tile: TileConfig, scale, causal, sliding_window, rule=None, kv_doc=None,
                dense=None, interpret=False, schedule: str | None = None,
                num_ctas: int | None = None, q_compares=None,
                items: WorkItems | None = None):
  """dQ [B, Tq, H, D] in q.dtype; arguments as `segment_attention.backward_dq`.

  q_ranges: int32 [B, Tq / tile.block_major, 4]. rule, kv_doc, dense must be
  None and interpret False (accepted so that the call matches the Triton one).
  schedule: one of SCHEDULES, None for default_schedule(tile, k, "dq"); num_ctas:
  the persistent kernel's CTAs (default: one per SM, at most one per item).
  q_compares: the plan's int32 [B, Tq / tile.block_major] (jpack.masks.
  compare_splits: masked tiles that need one compare), or None (every masked
  tile compares everything; same outputs). items: the persistent schedule's
  work items made beforehand (mosaic_persistent.work_items(q_ranges, H,
  q_compares), e.g. once per batch), in place of q_compares; None: made here.
  """
  check_backward_inputs(q, k, q_ranges, tile, kv_major=False, rule=rule,
                        kv_doc=kv_doc, dense=dense, interpret=interpret,
                        block_minors=DQ_BLOCK_MINORS)
  check_row_words("q_compares", q_compares, q_ranges)
  schedule = _pick_schedule(schedule, num_ctas, tile, k, "dq", items)
  if schedule == "persistent":
    return persistent_backward_dq(q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos,
                                  q_ranges, tile=tile, scale=scale, causal=causal,
                                  sliding_window=sliding_window, num_ctas=num_ctas,
                                  q_compares=q_compares, items=items)
  if schedule == "split":
    return split_backward_dq(q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos,
                             q_ranges, tile=tile, scale=scale, causal=causal,
                             sliding_window=sliding_window, q_compares=q_compares)
  batch, tq, heads, head_dim = q.shape
  num_consumers = tile.block_major // WG_ROWS
  bk, stages = tile.block_minor, tile.num_stages
  # 32-key tiles: dS [64, 32] @ K_j contracts 32 keys, a whole tile only at 64-byte swizzle.
  transforms = mma_transforms(q.dtype, min(128, bk * q.dtype.itemsize))
  kernel = functools.partial(
      _dq_kernel, scale=float(scale), causal=causal, sliding_window=sliding_window,
      block_k=bk, num_stages=stages, num_consumers=num_consumers,
      group=heads // k.shape[2])
  per_consumer = (num_consumers, WG_ROWS, head_dim)
  scratch = (
      plgpu.SMEM(per_consumer, q.dtype, transforms=transforms),  # Q, then dQ
      plgpu.SMEM(per_consumer, do.dtype, transforms=transforms),  # dO
      plgpu.SMEM((num_consumers, 2, WG_ROWS), jnp.float32),  # lse, delta
      plgpu.SMEM((num_consumers, 2, WG_ROWS), jnp.int32),  # q ids, positions
      plgpu.SMEM((stages, bk, head_dim), k.dtype, transforms=transforms),
      plgpu.SMEM((stages, bk, head_dim), v.dtype, transforms=transforms),
      plgpu.SMEM((stages, 2, bk), jnp.int32),
  )
  barriers = (
      plgpu.Barrier(num_arrivals=6, num_barriers=num_consumers),
      plgpu.Barrier(num_arrivals=4, num_barriers=stages),
      plgpu.Barrier(num_arrivals=num_consumers, num_barriers=stages),
  )
  return launch(
      kernel, (plan_rows(q_ranges, q_compares), q, k, v, do, lse, delta, q_seg, q_pos,
               kv_seg, kv_pos),
      scratch, barriers,
      out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
      grid=(tq // tile.block_major, batch, heads),
      grid_names=("q_tiles", "batch", "heads"),
      num_consumers=num_consumers)


def backward_dq_and_delta(q, k, v, do, lse, out, dlse, q_seg, kv_seg, q_pos, kv_pos,
                          q_ranges, *, tile: TileConfig, scale, causal, sliding_window,
                          rule=None, kv_doc=None, dense=None, interpret=False,
                          schedule: str | None = None, num_ctas: int | None = None,
                          q_compares=None, items: WorkItems | None = None):
  """(dQ, delta): backward_dq given out [B, Tq, H, D] and dlse float32 [B, H, Tq].

  delta = rowsum(out * do) - dlse (float32 [B, H, Tq], what backward_dkdv
  takes). The persistent kernel computes it itself (one more ring step per q
  tile, instead of a separate pass over out and do: 0.10 ms at the main
  shape); with the grid schedule it is computed first
  (segment_attention.backward_delta). delta may differ from that formula on
  rows that attend to nothing, where no kernel reads it. Other arguments as
  backward_dq.
  """
  check_backward_inputs(q, k, q_ranges, tile, kv_major=False, rule=rule,
                        kv_doc=kv_doc, dense=dense, interpret=interpret,
                        block_minors=DQ_BLOCK_MINORS)
  check_row_words("q_compares", q_compares, q_ranges)
  schedule = _pick_schedule(schedule, num_ctas, tile, k, "dq", items)
  if schedule == "persistent":
    return persistent_backward_dq(q, k, v, do, lse, None, q_seg, kv_seg, q_pos, kv_pos,
                                  q_ranges, tile=tile, scale=scale, causal=causal,
                                  sliding_window=sliding_window, num_ctas=num_ctas,
                                  out=out, dlse=dlse, q_compares=q_compares, items=items)
  delta = backward_delta(out, do, dlse)
  return backward_dq(q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos, q_ranges,
                     tile=tile, scale=scale, causal=causal, sliding_window=sliding_window,
                     schedule=schedule, q_compares=q_compares), delta


# ----------------------------------------------------------------------------
# dK and dV


def _dkdv_kernel(ranges_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref,
                 q_pos_ref, kv_seg_ref, kv_pos_ref, dk_ref, dv_ref, scratch, *, scale,
                 causal, sliding_window, block_q, num_stages, num_consumers, group):
  """ranges_ref: int32 [B, nk, 4] plan rows, or [B, nk, 5] with kv_compares last."""
  ((k_smem, v_smem, kv_ids_smem, q_smem, do_smem, stats_smem, q_ids_smem),
   barriers) = scratch
  kv_ready, q_ready, q_consumed = barriers
  kt, b, kv_head = (lax.axis_index(n) for n in ("kv_tiles", "batch", "kv_heads"))
  wg = lax.axis_index("wg")
  lo, full_lo, full_hi, hi = (ranges_ref[b, kt, n] for n in range(4))
  compares = ranges_ref[b, kt, 4] if ranges_ref.shape[2] == 5 else None
  dtype = k_ref.dtype
  step_opts = dict(logit_scale=scale * LOG2E, causal=causal, sliding_window=sliding_window)

  @producer_warpgroup(wg, num_consumers)
  def _producer():
    stream_q_tiles((q_ref, do_ref, lse_ref, delta_ref, q_seg_ref, q_pos_ref),
                   (q_smem, do_smem, stats_smem, q_ids_smem), q_ready, q_consumed,
                   b=b, kv_head=kv_head, group=group, lo=lo, hi=hi, block_q=block_q,
                   num_stages=num_stages)

  @consumer_warpgroups(wg, num_consumers)
  def _consumer():
    rows = pl.ds(kt * (num_consumers * WG_ROWS) + wg * WG_ROWS, WG_ROWS)
    kv_ids = load_kv_rows((k_ref, v_ref, kv_seg_ref, kv_pos_ref),
                          (k_smem, v_smem, kv_ids_smem), kv_ready.at[wg], b=b, rows=rows,
                          kv_head=kv_head, wg=wg)
    ks, vs = k_smem.at[wg], v_smem.at[wg]

    def visit(i, carry, *, step0, masked):
      slot = lax.rem(step0 + i, jnp.int32(num_stages))
      plgpu.barrier_wait(q_ready.at[slot])
      carry = dkdv_step(*carry, ks, vs, q_smem.at[slot], do_smem.at[slot], stats_smem,
                        q_ids_smem, slot, kv_ids, masked=masked, **step_opts)
      plgpu.barrier_arrive(q_consumed.at[slot])
      return carry

    def one_head(r, carry):
      # The producer's step counter: r * (hi - lo) + i - lo.
      visit_r = functools.partial(visit, step0=r * (hi - lo) - lo)
      return three_runs(lo, full_lo, full_hi, hi, visit_r, carry, compares, kv_major=True)

    acc_shape = (WG_ROWS, ks.shape[-1])
    carry = (zeros_acc(acc_shape), zeros_acc(acc_shape))
    if group == 1:
      dk, dv = one_head(jnp.int32(0), carry)
    else:
      dk, dv = lax.fori_loop(0, group, one_head, carry)
    # K and V are no longer read: their slots hold the results.
    ks[...] = (dk * scale).astype(dtype)
    vs[...] = dv.astype(v_ref.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(ks, dk_ref.at[b, rows, kv_head])
    plgpu.copy_smem_to_gmem(vs, dv_ref.at[b, rows, kv_head])
    plgpu.wait_smem_to_gmem(0)


def backward_dkdv(q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos, kv_ranges, *,
                  tile: TileConfig, scale, causal, sliding_window, rule=None,
                  kv_doc=None, dense=None, interpret=False, schedule: str | None = None,
                  num_ctas: int | None = None, kv_compares=None,
                  items: WorkItems | None = None):
  """(dK in k.dtype, dV in v.dtype) [B, Tk, Hkv, D], summed over each kv head's q heads.

  Arguments as `segment_attention.backward_dkdv`; kv_ranges: int32
  [B, Tk / tile.block_major, 4] (the kv_ranges of a plan made with block_q =
  tile.block_minor, block_k = tile.block_major). rule, kv_doc, dense must be
  None and interpret False. schedule, num_ctas: as backward_dq's
  (default_schedule(tile, q, "dkdv")). kv_compares: the plan's int32 [B, Tk /
  tile.block_major], as backward_dq's q_compares; items: as backward_dq's
  (work_items(kv_ranges, Hkv, kv_compares)).
  """
  check_backward_inputs(q, k, kv_ranges, tile, kv_major=True, rule=rule,
                        kv_doc=kv_doc, dense=dense, interpret=interpret)
  check_row_words("kv_compares", kv_compares, kv_ranges)
  schedule = _pick_schedule(schedule, num_ctas, tile, q, "dkdv", items)
  if schedule == "persistent":
    return persistent_backward_dkdv(q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos,
                                    kv_ranges, tile=tile, scale=scale, causal=causal,
                                    sliding_window=sliding_window, num_ctas=num_ctas,
                                    kv_compares=kv_compares, items=items)
  if schedule == "split":
    return split_backward_dkdv(q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos,
                               kv_ranges, tile=tile, scale=scale, causal=causal,
                               sliding_window=sliding_window, kv_compares=kv_compares)
  batch, tk, kv_heads, head_dim = k.shape
  num_consumers = tile.block_major // WG_ROWS
  bq, stages = tile.block_minor, tile.num_stages
  transforms = mma_transforms(q.dtype)
  kernel = functools.partial(
      _dkdv_kernel, scale=float(scale), causal=causal, sliding_window=sliding_window,
      block_q=bq, num_stages=stages, num_consumers=num_consumers,
      group=q.shape[2] // kv_heads)
  per_consumer = (num_consumers, WG_ROWS, head_dim)
  scratch = (
      plgpu.SMEM(per_consumer, k.dtype, transforms=transforms),  # K, then dK
      plgpu.SMEM(per_consumer, v.dtype, transforms=transforms),  # V, then dV
      plgpu.SMEM((num_consumers, 2, WG_ROWS), jnp.int32),  # kv ids, positions
      plgpu.SMEM((stages, bq, head_dim), q.dtype, transforms=transforms),
      plgpu.SMEM((stages, bq, head_dim), do.dtype, transforms=transforms),
      plgpu.SMEM((stages, 2, bq), jnp.float32),  # lse, delta
      plgpu.SMEM((stages, 2, bq), jnp.int32),  # q ids, positions
  )
  barriers = (
      plgpu.Barrier(num_arrivals=4, num_barriers=num_consumers),
      plgpu.Barrier(num_arrivals=6, num_barriers=stages),
      plgpu.Barrier(num_arrivals=num_consumers, num_barriers=stages),
  )
  return launch(
      kernel, (plan_rows(kv_ranges, kv_compares), q, k, v, do, lse, delta, q_seg,
               q_pos, kv_seg, kv_pos),
      scratch, barriers,
      out_type=(jax.ShapeDtypeStruct(k.shape, k.dtype),
                jax.ShapeDtypeStruct(v.shape, v.dtype)),
      grid=(tk // tile.block_major, batch, kv_heads),
      grid_names=("kv_tiles", "batch", "kv_heads"),
      num_consumers=num_consumers)
