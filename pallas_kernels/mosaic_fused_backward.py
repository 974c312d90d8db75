"""Segment-masked flash attention, backward in ONE kernel: dQ, dK and dV (Mosaic GPU, Hopper).

Same contract as `mosaic_backward.backward_dq` + `backward_dkdv` (same inputs,
same masks, base-2 softmax, `_bwd_shift`, exact zeros for queries that attend
to nothing and for keys no query sees, never NaN), but every score tile is
computed once: 5 matmuls per (kv tile, q tile) pair instead of the 7 of the
two kernels (which both recompute S and dP).

Grid, roles and ring as `backward_dkdv` (the kv-major transposed plan): a CTA
owns a kv tile of `tile.block_major` keys of one kv head, 64 key rows per
consumer warpgroup (K, V and kv ids stay in shared memory), and a producer
warpgroup streams the q tiles (`tile.block_minor` rows: Q, dO, lse, delta, q
ids) of every q head of the group through `tile.num_stages` slots
(`mosaic_common.stream_q_tiles`). Step t of consumer w (its keys K_w, V_w):

    S^T, dP^T = K_w Q_i^T, V_w dO_i^T        (two wgmmas, one wait)
    P^T  = exp2(S^T * scale * log2e - lse2)  (masked outside [full_lo, full_hi))
    dS^T = P^T * (dP^T - delta)
    dV_w += P^T dO_i                          (wgmma, P^T from registers)
    dS_buf[t % 2][w] = dS^T                   (shared memory, input dtype)
    dK_w += dS_buf[t % 2][w] Q_i              (wgmma, dS^T from shared memory)
    rendezvous                                (every consumer's dS^T is stored)
    dQ_i[part w] = sum_u dS_buf[t % 2][u]^T K_u [:, cols of part w]
    global dQ_acc[part w] += scale * dQ_i[part w]   (TMA reduce-add, float32)

dQ of a q tile is [block_q, D] = dS [block_q, block_major] K [block_major, D];
each consumer computes one part of it (`_DqSplit`): with 64-row q tiles the
consumers split the head_dim columns (two consumers: D/2 each), with 128-row
q tiles (two consumers, D = 64 only) the rows. A part is one wgmma M tile
([64, cols] float32 accumulator: 32 registers at D = 128) and reads every
consumer's dS^T rows, hence the rendezvous. Parts are disjoint, so each
element of dQ_acc gets one addition per visited (kv tile, q tile) pair.

Shared-memory hand-offs between the two consumers:
  dS_buf is double-buffered by step parity: consumer w rewrites
    dS_buf[t % 2][w] at step t + 2 only after the rendezvous of step t + 1,
    which every consumer reaches after its dQ wgmma of step t (that read the
    buffer) completed; so one rendezvous per step suffices.
  K is read by every consumer's dQ wgmma: after the loop one more rendezvous
    before a consumer overwrites its K rows with dK (the output staging).
  rendezvous: plgpu.Barrier(num_arrivals=2), both consumers arrive and wait
    once per step (and once after the loop): they walk the same plan row, so
    the phases match. With one consumer (block_major = 64) there is none.
The dQ staging buffer (float32 [64, cols] per consumer, swizzled) is
single-buffered: before writing step t's part, the consumer waits until the
TMA reduction of step t - 1 finished reading it (wait_smem_to_gmem(0,
wait_read_only=True)); it was issued a whole step earlier, so this rarely
waits.

The float32 dQ accumulator [B, Tq, H, D] starts at zero and is updated in place
(`mosaic_common.launch_accumulating`: a jax Ref, aliased input/output). The
additions from different CTAs (kv tiles and kv heads) land in any order, so dQ
is not bitwise deterministic run to run; its error stays at float32 rounding
of the sum before the final cast to q.dtype. Queries that attend to nothing,
and padding queries, only ever receive exact zeros (P = 0 exactly, see
mosaic_backward), so their dQ is exactly 0.

Shapes (all already padded by the caller):
  q, do: [B, Tq, H, D]; k, v: [B, Tk, Hkv, D], H % Hkv == 0;
  D in {64, 128}; dtype bfloat16 or float16;
  lse, delta: float32 [B, H, Tq]; delta = rowsum(o * do) - dlse;
  q_seg, q_pos: int32 [B, Tq]; kv_seg, kv_pos: int32 [B, Tk];
  kv_ranges: int32 [B, Tk / block_major, 4], the transposed plan of
    (block_q, block_k) = (tile.block_minor, tile.block_major).

Tiles: block_major 128 (two consumers) or 64 (one); block_minor 64, or 128
with two consumers at D = 64. Registers (two consumers, 232 a thread): dK
and dV [64, D] float32 (64 each at D = 128), S^T and dP^T [64, block_minor]
(32 each at 64), then, once those are dead, the dQ part (32 at D = 128) next
to P^T kept for the dV wgmma; 128-row q tiles at D = 128 would need ~256, so
they are refused.

Shared memory at the default tile (128, 64, 2 stages), D = 128, bf16: K, V
64 KiB, Q/dO ring 64 KiB, dS buffers 32 KiB, dQ staging 32 KiB, ids and
stats 3 KiB: 195 KiB of the 227 (3 stages need 229 KiB and fail to lower).
At D = 64: 115 KiB (3 stages: 132 KiB; 128-row q tiles, 2 stages: 197 KiB).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.config import TileConfig
from pallas_kernels.mosaic_backward import check_backward_inputs
from pallas_kernels.mosaic_common import (
    WG_ROWS, broadcast_cols, col_vector, consumer_warpgroups, launch_accumulating,
    load_kv_rows, mma_transforms, producer_warpgroup, rendezvous, scores_and_grads,
    stream_q_tiles, three_runs, tile_doc_mask, zeros_acc)
from pallas_kernels.segment_attention import LOG2E, MASKED_LOGIT, _bwd_shift

__all__ = ["DEFAULT_FUSED_TILE", "backward_fused", "check_fused_inputs"]

DEFAULT_FUSED_TILE = TileConfig(128, 64, num_stages=2)
"""Two consumer warpgroups (128 kv rows), 64-query tiles, double-buffered.

Untuned starting point; the dK/dV kernel's default tile, whose registers leave
room for the dQ part (module docstring)."""

_DS_BUFFERS = 2  # dS^T double-buffered by step parity (module docstring)
_F32_SWIZZLE = 128  # the dQ staging buffer: 32 float32 columns per tile


@dataclasses.dataclass(frozen=True)
class _DqSplit:
  """Which part of a q tile's dQ [block_q, D] each consumer computes.

  row_parts x col_parts == num_consumers parts of [64, cols]; consumer w
  owns row block w // col_parts and column block w % col_parts.
  """
  row_parts: int
  col_parts: int
  cols: int

  @classmethod
  def of(cls, num_consumers, block_q, head_dim):
    row_parts = block_q // WG_ROWS
    col_parts = num_consumers // row_parts
    return cls(row_parts, col_parts, head_dim // col_parts)

  def offsets(self, wg):
    """(first q row in the tile, first column) of consumer wg's part; static where one part."""
    row0 = 0 if self.row_parts == 1 else (wg // self.col_parts) * WG_ROWS
    col0 = 0 if self.col_parts == 1 else (wg % self.col_parts) * self.cols
    return row0, col0


def _operand_swizzle(split: _DqSplit, dtype):
  """Swizzle (bytes) of every wgmma operand: a dQ part's K columns must be whole tiles."""
  return min(128, split.cols * jnp.dtype(dtype).itemsize)


def check_fused_inputs(q, k, kv_ranges, tile: TileConfig, *, rule=None, kv_doc=None,
                       dense=None, interpret=False) -> None:
  """Raises if the fused backward cannot run these inputs.

  As `mosaic_backward.check_backward_inputs` for the dK/dV tiling (kv_ranges:
  int32 [B, Tk / tile.block_major, 4]), plus the tiles the fused kernel
  supports: head_dim 64 or 128; block_minor 64, or 128 with block_major 128
  and head_dim 64.
  """
  check_backward_inputs(q, k, kv_ranges, tile, kv_major=True, rule=rule, kv_doc=kv_doc,
                        dense=dense, interpret=interpret)
  if q.shape[3] > 128:
    raise ValueError(f"the fused backward supports head_dim 64 or 128 (its dQ, dK and "
                     f"dV parts in registers), got {q.shape[3]}")
  if tile.block_minor == 2 * WG_ROWS and (tile.block_major != 2 * WG_ROWS
                                          or q.shape[3] != 64):
    raise ValueError(
        f"the fused backward supports tile.block_minor = 128 only with "
        f"tile.block_major = 128 and head_dim 64 (one q-row part per consumer, "
        f"registers); got tile.block_minor = 128, tile.block_major = "
        f"{tile.block_major}, head_dim = {q.shape[3]}")


def _probs_and_score_grads(s_t, dp_t, stats_smem, slot, mask, logit_scale):
  """(P^T, dS^T) float32 [64 keys, block_q] of one step, keys on the rows.

  s_t, dp_t: raw S^T and dP^T; stats_smem: float32 [stages, 2, block_q] (lse,
  delta) read at `slot` as column vectors; mask: bool [64, block_q] or None.
  """
  s_t = s_t * logit_scale
  if mask is not None:
    s_t = jnp.where(mask, s_t, MASKED_LOGIT)
  lse2 = _bwd_shift(col_vector(stats_smem.at[slot, 0][...]))
  delta = col_vector(stats_smem.at[slot, 1][...])
  p_t = jnp.exp2(s_t - broadcast_cols(lse2, s_t.shape))
  return p_t, p_t * (dp_t - broadcast_cols(delta, s_t.shape))


def _dq_part(ds_buf, k_smem, *, row0, col0, split: _DqSplit, num_consumers):
  """float32 [64, split.cols]: rows row0.. of dS [block_q, keys] @ K [keys, cols col0..].

  ds_buf: [consumers, 64 keys, block_q], every consumer's dS^T of this step;
  k_smem: [consumers, 64 keys, D]. One wgmma per consumer's 64 keys (A is
  the transposed dS^T slice), one wait.
  """
  q_rows, cols = pl.ds(row0, WG_ROWS), pl.ds(col0, split.cols)

  def mma(acc_ref):
    for u in range(num_consumers):
      ds_u = plgpu.transpose_ref(ds_buf.at[u, :, q_rows], (1, 0))  # [64 q, 64 keys]
      plgpu.wgmma(acc_ref, ds_u, k_smem.at[u, :, cols])
    return acc_ref[...]

  return pl.run_scoped(mma, plgpu.ACC((WG_ROWS, split.cols), jnp.float32))


def _add_to_global(part, stage_smem, dst_gmem):
  """dst_gmem += part with a TMA reduction, staged through stage_smem [64, cols] float32.

  Waits first until the previous reduction from stage_smem has read it.
  Issues the reduction without waiting for it.
  """
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)
  stage_smem[...] = part
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(stage_smem, dst_gmem, reduction_op="add")


def _fused_kernel(ranges_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref,
                  q_pos_ref, kv_seg_ref, kv_pos_ref, dq_acc_ref, dk_ref, dv_ref, scratch,
                  *, scale, causal, sliding_window, block_q, num_stages, num_consumers,
                  group, split: _DqSplit):
  ((k_smem, v_smem, kv_ids_smem, q_smem, do_smem, stats_smem, q_ids_smem, ds_smem,
    dq_stage), barriers) = scratch
  kv_ready, q_ready, q_consumed, *ds_ready = barriers
  kt, b, kv_head = (lax.axis_index(n) for n in ("kv_tiles", "batch", "kv_heads"))
  wg = lax.axis_index("wg")
  lo, full_lo, full_hi, hi = (ranges_ref[b, kt, n] for n in range(4))
  dtype = k_ref.dtype
  # Every consumer's dS^T of the step is stored (none with one consumer).
  meet = functools.partial(rendezvous, ds_ready[0]) if ds_ready else lambda: None

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
    logit_scale = scale * LOG2E
    s_shape = (WG_ROWS, block_q)
    row0, col0 = split.offsets(wg)
    stage = dq_stage.at[wg]

    def visit(i, carry, *, h, step0, masked):
      dk, dv = carry
      t = step0 + i
      slot = lax.rem(t, jnp.int32(num_stages))
      plgpu.barrier_wait(q_ready.at[slot])
      q_tile, do_tile = q_smem.at[slot], do_smem.at[slot]
      s_t, dp_t = scores_and_grads(ks, q_tile, vs, do_tile, s_shape)
      mask = (tile_doc_mask(kv_ids, q_ids_smem, slot, s_shape, kv_major=True,
                            causal=causal, sliding_window=sliding_window)
              if masked else None)
      p_t, ds_t = _probs_and_score_grads(s_t, dp_t, stats_smem, slot, mask, logit_scale)
      ds_buf = ds_smem.at[lax.rem(t, jnp.int32(_DS_BUFFERS))]

      def grads(refs):
        dk_ref, dv_ref = refs
        plgpu.wgmma(dv_ref, p_t.astype(dtype), do_tile)
        ds_buf.at[wg][...] = ds_t.astype(dtype)
        plgpu.commit_smem()  # the stores before any wgmma reads them
        plgpu.wgmma(dk_ref, ds_buf.at[wg], q_tile)
        meet()
        # Waits for every wgmma of the step (dK, dV too).
        dq = _dq_part(ds_buf, k_smem, row0=row0, col0=col0, split=split,
                      num_consumers=num_consumers)
        plgpu.barrier_arrive(q_consumed.at[slot])
        q_rows = pl.ds(i * block_q + row0, WG_ROWS)
        _add_to_global(dq * scale, stage,
                       dq_acc_ref.at[b, q_rows, h, pl.ds(col0, split.cols)])

      return pl.run_state(grads)((plgpu.ACC.init(dk), plgpu.ACC.init(dv)))

    def one_head(r, carry):
      # The producer's step counter: r * (hi - lo) + i - lo.
      visit_r = functools.partial(visit, h=kv_head * group + r, step0=r * (hi - lo) - lo)
      return three_runs(lo, full_lo, full_hi, hi, visit_r, carry)

    acc_shape = (WG_ROWS, ks.shape[-1])
    carry = (zeros_acc(acc_shape), zeros_acc(acc_shape))
    if group == 1:
      dk, dv = one_head(jnp.int32(0), carry)
    else:
      dk, dv = lax.fori_loop(0, group, one_head, carry)
    meet()  # every consumer's last dQ wgmma (reading all of K) completed
    # K and V are no longer read: their slots stage the results.
    ks[...] = (dk * scale).astype(dtype)
    vs[...] = dv.astype(v_ref.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(ks, dk_ref.at[b, rows, kv_head])
    plgpu.copy_smem_to_gmem(vs, dv_ref.at[b, rows, kv_head])
    plgpu.wait_smem_to_gmem(0)  # the dQ reductions too


def backward_fused(q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos, kv_ranges, *,
                   tile: TileConfig, scale, causal, sliding_window, rule=None, kv_doc=None,
                   dense=None, interpret=False):
  """(dQ [B, Tq, H, D] in q.dtype, dK, dV [B, Tk, Hkv, D] in k.dtype, v.dtype), one kernel.

  Arguments as `mosaic_backward.backward_dkdv` (kv_ranges: int32 [B, Tk /
  tile.block_major, 4], the kv_ranges of a plan made with block_q =
  tile.block_minor, block_k = tile.block_major); dQ is scaled by `scale` as
  backward_dq's, dK and dV are summed over each kv head's q heads. rule,
  kv_doc, dense must be None and interpret False. dQ is accumulated in
  float32 by unordered additions (not bitwise deterministic; module docstring).
  """
  check_fused_inputs(q, k, kv_ranges, tile, rule=rule, kv_doc=kv_doc, dense=dense,
                     interpret=interpret)
  batch, tk, kv_heads, head_dim = k.shape
  num_consumers = tile.block_major // WG_ROWS
  bq, stages = tile.block_minor, tile.num_stages
  split = _DqSplit.of(num_consumers, bq, head_dim)
  transforms = mma_transforms(q.dtype, _operand_swizzle(split, q.dtype))
  kernel = functools.partial(
      _fused_kernel, scale=float(scale), causal=causal, sliding_window=sliding_window,
      block_q=bq, num_stages=stages, num_consumers=num_consumers,
      group=q.shape[2] // kv_heads, split=split)
  per_consumer = (num_consumers, WG_ROWS, head_dim)
  scratch = (
      plgpu.SMEM(per_consumer, k.dtype, transforms=transforms),  # K, then dK
      plgpu.SMEM(per_consumer, v.dtype, transforms=transforms),  # V, then dV
      plgpu.SMEM((num_consumers, 2, WG_ROWS), jnp.int32),  # kv ids, positions
      plgpu.SMEM((stages, bq, head_dim), q.dtype, transforms=transforms),
      plgpu.SMEM((stages, bq, head_dim), do.dtype, transforms=transforms),
      plgpu.SMEM((stages, 2, bq), jnp.float32),  # lse, delta
      plgpu.SMEM((stages, 2, bq), jnp.int32),  # q ids, positions
      plgpu.SMEM((_DS_BUFFERS, num_consumers, WG_ROWS, bq), k.dtype,
                 transforms=transforms),  # dS^T by step parity
      plgpu.SMEM((num_consumers, WG_ROWS, split.cols), jnp.float32,
                 transforms=mma_transforms(jnp.float32, _F32_SWIZZLE)),  # dQ staging
  )
  barriers = (
      plgpu.Barrier(num_arrivals=4, num_barriers=num_consumers),  # kv_ready[wg]
      plgpu.Barrier(num_arrivals=6, num_barriers=stages),  # q_ready[s]: 6 copies
      plgpu.Barrier(num_arrivals=num_consumers, num_barriers=stages),  # q_consumed[s]
  )
  if num_consumers > 1:
    barriers += (plgpu.Barrier(num_arrivals=num_consumers),)  # ds_ready: rendezvous
  (dk, dv), (dq_acc,) = launch_accumulating(
      kernel, (kv_ranges, q, k, v, do, lse, delta, q_seg, q_pos, kv_seg, kv_pos),
      (jnp.zeros(q.shape, jnp.float32),), scratch, barriers,
      out_type=(jax.ShapeDtypeStruct(k.shape, k.dtype),
                jax.ShapeDtypeStruct(v.shape, v.dtype)),
      grid=(tk // tile.block_major, batch, kv_heads),
      grid_names=("kv_tiles", "batch", "kv_heads"),
      num_consumers=num_consumers, name="fused_backward")
  return dq_acc.astype(q.dtype), dk, dv
