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
slot.

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
  D in {64, 128}; dtype bfloat16 or float16;
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
    WG_ROWS, broadcast_cols, broadcast_rows, check_supported, col_vector,
    consumer_warpgroups, launch, load_kv_rows, mma_accumulate, mma_transforms, producer_warpgroup,
    row_vector,
    scores_and_grads, stream_kv_tiles, stream_q_tiles, three_runs, tile_doc_mask, zeros_acc)
from pallas_kernels.segment_attention import LOG2E, MASKED_LOGIT, _bwd_shift

__all__ = ["DEFAULT_DQ_TILE", "DEFAULT_DKDV_TILE", "backward_dq", "backward_dkdv",
           "check_backward_inputs"]

DEFAULT_DQ_TILE = TileConfig(128, 64, num_stages=2)
"""dQ: two consumer warpgroups (128 q rows), 64-key tiles, double-buffered.

Untuned starting point: K/V ring 2 x 32 KiB plus Q/dO 64 KiB at D = 128."""

DEFAULT_DKDV_TILE = TileConfig(128, 64, num_stages=2)
"""dK/dV: two consumer warpgroups (128 kv rows), 64-query tiles, double-buffered.

Untuned starting point: 64-query tiles keep S^T and dP^T at 32 registers each
next to the dK and dV accumulators (64 each at D = 128)."""


def check_backward_inputs(q, k, plan, tile: TileConfig, *, kv_major: bool, rule=None,
                          kv_doc=None, dense=None, interpret=False) -> None:
  """Raises if the Mosaic backward cannot run these inputs.

  plan: the range plan, int32 [B, n_major, 4]; kv_major: the dK/dV kernel
  (major tiles over keys). NotImplementedError for interpret mode, ValueError
  for a general mask, tile lists or unsupported shapes.
  """
  if interpret:
    raise NotImplementedError("the Mosaic GPU backward kernels have no interpret mode")
  if rule is not None or kv_doc is not None or dense is not None:
    raise ValueError("the Mosaic GPU backward supports document masks only (segment "
                     "ids, positions, causal, sliding_window); a mask rule or dense "
                     "mask needs the Triton kernels (pallas_kernels.segment_attention)")
  check_supported(q, k, tile, kv_major=kv_major)
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
  (q_smem, do_smem, stats_smem, q_ids_smem, k_smem, v_smem, kv_ids_smem), barriers = scratch
  q_ready, kv_ready, kv_consumed = barriers
  qt, b, h = (lax.axis_index(n) for n in ("q_tiles", "batch", "heads"))
  wg = lax.axis_index("wg")
  lo, full_lo, full_hi, hi = (ranges_ref[b, qt, n] for n in range(4))
  dtype = q_ref.dtype

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
    lse2 = _bwd_shift(row_vector(stats_smem.at[wg, 0][...]))
    delta = row_vector(stats_smem.at[wg, 1][...])
    q_ids = tuple(row_vector(q_ids_smem.at[wg, n][...]) for n in range(2))
    logit_scale = scale * LOG2E
    s_shape = (WG_ROWS, block_k)

    def visit(j, dq, *, masked):
      slot = lax.rem(j - lo, jnp.int32(num_stages))
      plgpu.barrier_wait(kv_ready.at[slot])
      k_tile = k_smem.at[slot]
      s, dp = scores_and_grads(qs, k_tile, dos, v_smem.at[slot], s_shape)
      s = s * logit_scale
      if masked:
        mask = tile_doc_mask(q_ids, kv_ids_smem, slot, s_shape, kv_major=False,
                             causal=causal, sliding_window=sliding_window)
        s = jnp.where(mask, s, MASKED_LOGIT)
      p = jnp.exp2(s - broadcast_rows(lse2, s_shape))
      ds = p * (dp - broadcast_rows(delta, s_shape))

      dq = mma_accumulate(dq, ds, k_tile, dtype)
      plgpu.barrier_arrive(kv_consumed.at[slot])
      return dq

    dq = three_runs(lo, full_lo, full_hi, hi, visit,
                     zeros_acc((WG_ROWS, qs.shape[-1])))
    qs[...] = (dq * scale).astype(dtype)  # Q is no longer read: reuse its slot
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(qs, dq_ref.at[b, rows, h])
    plgpu.wait_smem_to_gmem(0)


def backward_dq(q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos, q_ranges, *,
                tile: TileConfig, scale, causal, sliding_window, rule=None, kv_doc=None,
                dense=None, interpret=False):
  """dQ [B, Tq, H, D] in q.dtype; arguments as `segment_attention.backward_dq`.

  q_ranges: int32 [B, Tq / tile.block_major, 4]. rule, kv_doc, dense must be
  None and interpret False (accepted so that the call matches the Triton one).
  """
  check_backward_inputs(q, k, q_ranges, tile, kv_major=False, rule=rule,
                        kv_doc=kv_doc, dense=dense, interpret=interpret)
  batch, tq, heads, head_dim = q.shape
  num_consumers = tile.block_major // WG_ROWS
  bk, stages = tile.block_minor, tile.num_stages
  transforms = mma_transforms(q.dtype)
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
      kernel, (q_ranges, q, k, v, do, lse, delta, q_seg, q_pos, kv_seg, kv_pos),
      scratch, barriers,
      out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
      grid=(tq // tile.block_major, batch, heads),
      grid_names=("q_tiles", "batch", "heads"),
      num_consumers=num_consumers)


# ----------------------------------------------------------------------------
# dK and dV


def _dkdv_kernel(ranges_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref,
                 q_pos_ref, kv_seg_ref, kv_pos_ref, dk_ref, dv_ref, scratch, *, scale,
                 causal, sliding_window, block_q, num_stages, num_consumers, group):
  ((k_smem, v_smem, kv_ids_smem, q_smem, do_smem, stats_smem, q_ids_smem),
   barriers) = scratch
  kv_ready, q_ready, q_consumed = barriers
  kt, b, kv_head = (lax.axis_index(n) for n in ("kv_tiles", "batch", "kv_heads"))
  wg = lax.axis_index("wg")
  lo, full_lo, full_hi, hi = (ranges_ref[b, kt, n] for n in range(4))
  dtype = k_ref.dtype

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

    def visit(i, carry, *, step0, masked):
      dk, dv = carry
      slot = lax.rem(step0 + i, jnp.int32(num_stages))
      plgpu.barrier_wait(q_ready.at[slot])
      q_tile, do_tile = q_smem.at[slot], do_smem.at[slot]
      s_t, dp_t = scores_and_grads(ks, q_tile, vs, do_tile, s_shape)
      s_t = s_t * logit_scale
      if masked:
        mask = tile_doc_mask(kv_ids, q_ids_smem, slot, s_shape, kv_major=True,
                             causal=causal, sliding_window=sliding_window)
        s_t = jnp.where(mask, s_t, MASKED_LOGIT)
      lse2 = _bwd_shift(col_vector(stats_smem.at[slot, 0][...]))
      delta = col_vector(stats_smem.at[slot, 1][...])
      p_t = jnp.exp2(s_t - broadcast_cols(lse2, s_shape))
      ds_t = p_t * (dp_t - broadcast_cols(delta, s_shape))

      def grads(refs):
        dk_ref, dv_ref = refs
        plgpu.wgmma(dv_ref, p_t.astype(dtype), do_tile)
        plgpu.wgmma(dk_ref, ds_t.astype(dtype), q_tile)

      dk, dv = pl.run_state(grads)((plgpu.ACC.init(dk), plgpu.ACC.init(dv)))
      plgpu.barrier_arrive(q_consumed.at[slot])
      return dk, dv

    def one_head(r, carry):
      # The producer's step counter: r * (hi - lo) + i - lo.
      visit_r = functools.partial(visit, step0=r * (hi - lo) - lo)
      return three_runs(lo, full_lo, full_hi, hi, visit_r, carry)

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
                  kv_doc=None, dense=None, interpret=False):
  """(dK in k.dtype, dV in v.dtype) [B, Tk, Hkv, D], summed over each kv head's q heads.

  Arguments as `segment_attention.backward_dkdv`; kv_ranges: int32
  [B, Tk / tile.block_major, 4] (the kv_ranges of a plan made with block_q =
  tile.block_minor, block_k = tile.block_major). rule, kv_doc, dense must be
  None and interpret False.
  """
  check_backward_inputs(q, k, kv_ranges, tile, kv_major=True, rule=rule,
                        kv_doc=kv_doc, dense=dense, interpret=interpret)
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
      kernel, (kv_ranges, q, k, v, do, lse, delta, q_seg, q_pos, kv_seg, kv_pos),
      scratch, barriers,
      out_type=(jax.ShapeDtypeStruct(k.shape, k.dtype),
                jax.ShapeDtypeStruct(v.shape, v.dtype)),
      grid=(tk // tile.block_major, batch, kv_heads),
      grid_names=("kv_tiles", "batch", "kv_heads"),
      num_consumers=num_consumers)
