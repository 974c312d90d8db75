"""One step of each Mosaic GPU backward kernel: the math of one minor tile.

Shared by the grid kernels (mosaic_backward) and the persistent ones
(mosaic_persistent_backward), which differ only in how they walk the tiles.
Each function is one consumer warpgroup's step on 64 major rows, after the
minor tile's ring slot is ready; the caller waits for the slot and frees it.
`after_scores` (optional) runs once the step's first two wgmmas are done,
before the softmax: the persistent kernels release the previous item's buffers
there.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mosaic_common import (
    WG_ROWS, broadcast_cols, broadcast_rows, col_vector, mask_tile, mma_accumulate,
    row_vector, scores_and_grads)
from pallas_kernels.segment_attention import _bwd_shift

__all__ = ["dkdv_step", "dq_step", "row_stats"]


def dq_step(dq, q_smem, do_smem, k_tile, v_tile, stats, q_ids, kv_ids_smem, slot, *,
            masked, logit_scale, causal, sliding_window, after_scores=None):
  """dq + dS K_j of kv tile j (in ring slot `slot`): the dQ kernel's step.

  dq: float32 [64, D] accumulator; q_smem, do_smem: [64, D]; k_tile, v_tile:
  [block_k, D] (the slot's); stats: (lse2, delta) [64] row vectors (lse2 from
  row_stats); q_ids: (q_seg, q_pos) [64] row vectors; kv_ids_smem: int32
  [stages, 2, block_k]. masked: False, or the document mask to apply (True,
  or the compares the plan calls for, mosaic_common.three_runs and mask_tile).

      S = Q K_j^T, dP = dO V_j^T          (two wgmmas, one wait)
      P = exp2(S * scale * log2e - lse2), dS = P * (dP - delta)
      dQ += dS K_j                        (wgmma, dS from registers)
  """
  s_shape = (WG_ROWS, k_tile.shape[0])
  s, dp = scores_and_grads(q_smem, k_tile, do_smem, v_tile, s_shape)
  if after_scores is not None:
    after_scores()
  s = s * logit_scale
  if masked is not False:
    s = mask_tile(s, q_ids, kv_ids_smem, slot, kv_major=False, causal=causal,
                  sliding_window=sliding_window, masked=masked)
  lse2, delta = stats
  p = jnp.exp2(s - broadcast_rows(lse2, s_shape))
  ds = p * (dp - broadcast_rows(delta, s_shape))
  return mma_accumulate(dq, ds, k_tile, q_smem.dtype)


def row_stats(stats_smem):
  """(lse2, delta) [64] row vectors of one consumer's float32 [2, 64] (lse, delta) in smem.

  lse2 = lse * log2(e), +1e30 for rows that attend to nothing
  (segment_attention._bwd_shift), as dq_step takes them.
  """
  return (_bwd_shift(row_vector(stats_smem.at[0][...])), row_vector(stats_smem.at[1][...]))


def dkdv_step(dk, dv, k_smem, v_smem, q_tile, do_tile, stats_smem, q_ids_smem, slot,
              kv_ids, *, masked, logit_scale, causal, sliding_window, after_scores=None):
  """(dk + dS^T Q_i, dv + P^T dO_i) of q tile i (in ring slot `slot`): the dK/dV step.

  dk, dv: float32 [64, D] accumulators; k_smem, v_smem: the consumer's [64, D]
  rows; q_tile, do_tile: [block_q, D] (the slot's); stats_smem: float32
  [stages, 2, block_q] (lse, delta); q_ids_smem: int32 [stages, 2, block_q];
  kv_ids: (kv_seg, kv_pos) [64] row vectors. masked as in dq_step. Keys are
  on the rows, so lse2 and delta are column vectors:

      S^T = K Q_i^T, dP^T = V dO_i^T          (two wgmmas, one wait)
      P^T = exp2(S^T * scale * log2e - lse2), dS^T = P^T * (dP^T - delta)
      dV += P^T dO_i, dK += dS^T Q_i          (two wgmmas, one wait)
  """
  s_shape = (WG_ROWS, q_tile.shape[0])
  s_t, dp_t = scores_and_grads(k_smem, q_tile, v_smem, do_tile, s_shape)
  if after_scores is not None:
    after_scores()
  s_t = s_t * logit_scale
  if masked is not False:
    s_t = mask_tile(s_t, kv_ids, q_ids_smem, slot, kv_major=True, causal=causal,
                    sliding_window=sliding_window, masked=masked)
  lse2 = _bwd_shift(col_vector(stats_smem.at[slot, 0][...]))
  delta = col_vector(stats_smem.at[slot, 1][...])
  p_t = jnp.exp2(s_t - broadcast_cols(lse2, s_shape))
  ds_t = p_t * (dp_t - broadcast_cols(delta, s_shape))
  dtype = q_tile.dtype

  def grads(refs):
    dk_ref, dv_ref = refs
    plgpu.wgmma(dv_ref, p_t.astype(dtype), do_tile)
    plgpu.wgmma(dk_ref, ds_t.astype(dtype), q_tile)

  return pl.run_state(grads)((plgpu.ACC.init(dk), plgpu.ACC.init(dv)))
