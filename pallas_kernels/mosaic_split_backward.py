"""Segment-masked flash attention, backward: the "split" Mosaic GPU kernels (wide heads).

`mosaic_backward.backward_dq` and `backward_dkdv` with schedule="split" run
these kernels; the dK/dV one is the default at head_dim 256
(mosaic_backward.WIDE_HEAD_SCHEDULES: there dQ runs faster on the grid with
32-key tiles, mosaic_common.WIDE_HEAD_DQ_TILE). Same contract, inputs and
outputs as the grid kernels (mosaic_backward); what differs is who owns what.

Why. A grid kernel's consumer warpgroup owns 64 major rows and all D columns
of its accumulators: at D = 256, dK and dV alone are 256 float32 registers a
thread, so the dK/dV grid kernel spills (perf notes entry 36). Split, dK/dV
takes 2.48 ms against the grid's 5.91 at the benchmark's shape (entry 39).
Here a CTA owns 64 major rows, and its two consumer warpgroups split the work
of each step between them:

  - the scores: consumer w computes the 32 minor columns [32w, 32w + 32) of
    S and dP (two [64, 32] wgmmas over all of D);
  - the accumulators: consumer w owns the D/2 columns [w D/2, (w + 1) D/2)
    of dQ (of dK and dV), 64 (128) float32 registers a thread at D = 256.

Between the two, each consumer writes its half of dS (and of P, for dV) into
a shared [64, 64] buffer and both meet; then each multiplies the whole buffer
by its columns of the minor tile. Per step of minor tile m (K_j, V_j for
dQ; Q_i, dO_i for dK/dV), consumer w with c = [32w, 32w + 32), d = its D/2
columns:

  dQ:    S_c = Q K_j[c]^T, dP_c = dO V_j[c]^T          (two wgmmas, one wait)
         dS_c = exp2(S_c * scale * log2e - lse2) * (dP_c - delta)
         ds_buf[:, c] = dS_c; meet
         dQ_d += ds_buf K_j[:, d]                       (wgmma from shared memory)
  dK/dV: S^T_c = K Q_i[c]^T, dP^T_c = V dO_i[c]^T      (two wgmmas, one wait)
         P^T_c = exp2(S^T_c * scale * log2e - lse2[c]), dS^T_c = P^T_c (dP^T_c - delta[c])
         p_buf[:, c] = P^T_c, ds_buf[:, c] = dS^T_c; meet
         dV_d += p_buf dO_i[:, d], dK_d += ds_buf Q_i[:, d]   (two wgmmas, one wait)

Every operand is swizzled at 64 bytes (`SWIZZLE`): the halves of the shared
buffers are 32 columns wide, whole swizzle tiles, and every operand of one
wgmma must share its swizzle.

Synchronisation. The shared buffers are double-buffered by step parity, so
one meeting per step suffices (a plgpu.Barrier of 2 arrivals, `rendezvous`):
consumer w writes buffer t % 2 at step t only after the meeting of step t - 1,
which the other consumer reached after its wgmmas of step t - 2 (which read
that buffer) completed. The major operands (one copy, read by both consumers)
are loaded by consumer 0 onto a barrier that both wait, as two [64, D/2]
halves: after a row's last meeting nobody reads them, so consumer w stages its
output in half w and stores it with one TMA. dK/dV's kv ids share P^T's
buffer (shared memory is full): both consumers read them into registers and
meet once more before the first step writes P^T. The producer streams the
minor tiles through the ring as in the grid kernels (mosaic_common:
stream_kv_tiles, stream_q_tiles).

Shared memory at D = 256, bf16, two stages: major operands 64 KiB, ring
128 KiB, dS (and P) buffers 16 (32) KiB, ids and stats 3 (2) KiB: dQ 211 KiB,
dK/dV 226 KiB of the 227. Tiles: `SPLIT_TILE` only (64 major rows, 64-row
minor tiles); D a multiple of 64.
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
    WG_ROWS, broadcast_cols, broadcast_rows, col_vector, consumer_warpgroups, launch,
    mask_tile, mma_transforms, plan_rows, producer_warpgroup, rendezvous, row_vector,
    stream_kv_tiles, stream_q_tiles, three_runs, zeros_acc)
from pallas_kernels.segment_attention import LOG2E, _bwd_shift

__all__ = ["SPLIT_TILE", "SWIZZLE", "check_split_tile", "split_backward_dkdv",
           "split_backward_dq", "splits"]

SPLIT_TILE = TileConfig(WG_ROWS, WG_ROWS, num_stages=2)
"""The split kernels' tiling: 64 major rows per CTA, 64-row minor tiles, two stages."""
SWIZZLE = 64  # bytes: a [64, 32] half of a shared buffer is whole swizzle tiles
_CONSUMERS = 2
_HALF = WG_ROWS // _CONSUMERS  # the minor columns of one consumer's scores
_BUFFERS = 2  # the shared dS (and P) buffers, by step parity


def splits(tile: TileConfig) -> bool:
  """Whether the split kernels run this tile (SPLIT_TILE's 64 x 64, any number of stages)."""
  return (tile.block_major, tile.block_minor) == (SPLIT_TILE.block_major,
                                                  SPLIT_TILE.block_minor)


def check_split_tile(tile: TileConfig, head_dim: int) -> None:
  """ValueError unless the split kernels run this tile and head_dim."""
  if not splits(tile):
    raise ValueError(f"schedule='split' needs tile.block_major = tile.block_minor = "
                     f"{WG_ROWS}, got ({tile.block_major}, {tile.block_minor})")
  if head_dim % (_CONSUMERS * 32):
    raise ValueError(f"schedule='split' needs head_dim a multiple of 64, got {head_dim}")


def _scores_half(a_smem, b_tile, c_smem, d_tile, wg):
  """(a @ b[c]^T, c @ d[c]^T) float32 [64, 32], c = consumer wg's rows of the minor tiles.

  a_smem, c_smem: the major operands, [2, 64, D/2] (D in two halves); b_tile,
  d_tile: [64, D] ring slot tiles. Each product is two wgmmas, one per half of D.
  """
  half, width = pl.ds(wg * _HALF, _HALF), a_smem.shape[-1]

  def both(x_ref, y_ref):
    for acc_ref, major, minor in ((x_ref, a_smem, b_tile), (y_ref, c_smem, d_tile)):
      for n in range(_CONSUMERS):
        part = minor.at[half, pl.ds(n * width, width)]
        plgpu.wgmma(acc_ref, major.at[n], plgpu.transpose_ref(part, (1, 0)))
    return x_ref[...], y_ref[...]

  shape = (WG_ROWS, _HALF)
  return pl.run_scoped(both, plgpu.ACC(shape, jnp.float32), plgpu.ACC(shape, jnp.float32))


def _load_major(gmem, smem, ready, wg, *, b, rows, h):
  """Consumer 0 issues the TMA of the CTA's major rows; both consumers wait for them.

  gmem: two [B, T, heads, D] operands then two int32 [B, T] (ids, positions);
  smem: two [2, 64, D/2] (D in halves) and int32 [2, 64]; ready: 6 arrivals.
  Returns the ids and positions as [64] row vectors.
  """
  a_ref, c_ref, seg_ref, pos_ref = gmem
  a_smem, c_smem, ids_smem = smem
  width = a_smem.shape[-1]

  @pl.when(wg == 0)
  def _issue():
    for n in range(_CONSUMERS):
      cols = pl.ds(n * width, width)
      plgpu.copy_gmem_to_smem(a_ref.at[b, rows, h, cols], a_smem.at[n], ready)
      plgpu.copy_gmem_to_smem(c_ref.at[b, rows, h, cols], c_smem.at[n], ready)
    plgpu.copy_gmem_to_smem(seg_ref.at[b, rows], ids_smem.at[0], ready)
    plgpu.copy_gmem_to_smem(pos_ref.at[b, rows], ids_smem.at[1], ready)

  plgpu.barrier_wait(ready)
  return tuple(row_vector(ids_smem.at[n][...]) for n in range(2))


_MAJOR_COPIES = 2 * _CONSUMERS + 2  # _load_major's arrivals


def _store_halves(parts, smem, gmem):
  """Each float32 [64, D/2] part into its staging smem [64, D/2], then TMA to gmem."""
  for part, staging in zip(parts, smem):
    staging[...] = part.astype(staging.dtype)
  plgpu.commit_smem()
  for staging, dst in zip(smem, gmem):
    plgpu.copy_smem_to_gmem(staging, dst)
  plgpu.wait_smem_to_gmem(0)


def _accumulate(accs, a_refs, b_refs):
  """accs[n] + a_refs[n] @ b_refs[n] for each n: wgmmas from shared memory, one wait."""
  def mma(refs):
    for acc_ref, a, b in zip(refs, a_refs, b_refs):
      plgpu.wgmma(acc_ref, a, b)

  out = pl.run_state(mma)(tuple(plgpu.ACC.init(acc) for acc in accs))
  return tuple(out)


# ----------------------------------------------------------------------------
# dQ


def _dq_kernel(ranges_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref,
               q_pos_ref, kv_seg_ref, kv_pos_ref, dq_ref, scratch, *, scale, causal,
               sliding_window, num_stages, group):
  ((q_smem, do_smem, stats_smem, q_ids_smem, k_smem, v_smem, kv_ids_smem, ds_smem),
   (q_ready, kv_ready, kv_consumed, meeting)) = scratch
  qt, b, h = (lax.axis_index(n) for n in ("q_tiles", "batch", "heads"))
  wg = lax.axis_index("wg")
  lo, full_lo, full_hi, hi = (ranges_ref[b, qt, n] for n in range(4))
  compares = ranges_ref[b, qt, 4] if ranges_ref.shape[2] == 5 else None
  logit_scale = scale * LOG2E

  @producer_warpgroup(wg, _CONSUMERS)
  def _producer():
    stream_kv_tiles((k_ref, v_ref, kv_seg_ref, kv_pos_ref),
                    (k_smem, v_smem, kv_ids_smem), kv_ready, kv_consumed,
                    b=b, kv_head=lax.div(h, jnp.int32(group)), lo=lo, hi=hi,
                    block_k=WG_ROWS, num_stages=num_stages)

  @consumer_warpgroups(wg, _CONSUMERS)
  def _consumer():
    rows = pl.ds(qt * WG_ROWS, WG_ROWS)

    @pl.when(wg == 0)
    def _stats():  # lse and delta ride on q_ready with the Q rows
      plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], stats_smem.at[0], q_ready)
      plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], stats_smem.at[1], q_ready)

    q_ids = _load_major((q_ref, do_ref, q_seg_ref, q_pos_ref), (q_smem, do_smem, q_ids_smem),
                        q_ready, wg, b=b, rows=rows, h=h)
    lse2 = _bwd_shift(row_vector(stats_smem.at[0][...]))
    delta = row_vector(stats_smem.at[1][...])
    width = q_smem.shape[-1]
    cols = pl.ds(wg * width, width)
    half = pl.ds(wg * _HALF, _HALF)

    def visit(j, dq, *, masked):
      t = j - lo
      slot = lax.rem(t, jnp.int32(num_stages))
      plgpu.barrier_wait(kv_ready.at[slot])
      k_tile, v_tile = k_smem.at[slot], v_smem.at[slot]
      s, dp = _scores_half(q_smem, k_tile, do_smem, v_tile, wg)
      s = s * logit_scale
      if masked is not False:
        s = mask_tile(s, q_ids, kv_ids_smem, slot, kv_major=False, causal=causal,
                      sliding_window=sliding_window, masked=masked, first_column=wg * _HALF)
      p = jnp.exp2(s - broadcast_rows(lse2, s.shape))
      ds = p * (dp - broadcast_rows(delta, s.shape))
      ds_buf = ds_smem.at[lax.rem(t, jnp.int32(_BUFFERS))]
      ds_buf.at[:, half][...] = ds.astype(ds_buf.dtype)
      plgpu.commit_smem()  # the stores before the other consumer's wgmma reads them
      rendezvous(meeting)
      (dq,) = _accumulate((dq,), (ds_buf,), (k_tile.at[:, cols],))
      plgpu.barrier_arrive(kv_consumed.at[slot])
      return dq

    dq = three_runs(lo, full_lo, full_hi, hi, visit, zeros_acc((WG_ROWS, width)), compares)
    _store_halves((dq * scale,), (q_smem.at[wg],), (dq_ref.at[b, rows, h, cols],))


def split_backward_dq(q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos, q_ranges, *,
                      tile: TileConfig, scale, causal, sliding_window, q_compares=None):
  """dQ [B, Tq, H, D] in q.dtype: mosaic_backward.backward_dq's contract, schedule "split".

  q_ranges: int32 [B, Tq / 64, 4]; q_compares: None or int32 [B, Tq / 64];
  tile: SPLIT_TILE's tiling with any num_stages (inputs checked by the caller).
  """
  check_split_tile(tile, q.shape[3])
  batch, tq, heads, head_dim = q.shape
  stages = tile.num_stages
  transforms = mma_transforms(q.dtype, SWIZZLE)
  kernel = functools.partial(
      _dq_kernel, scale=float(scale), causal=causal, sliding_window=sliding_window,
      num_stages=stages, group=heads // k.shape[2])
  major = (_CONSUMERS, WG_ROWS, head_dim // _CONSUMERS)  # D in halves
  scratch = (
      plgpu.SMEM(major, q.dtype, transforms=transforms),  # Q, then dQ
      plgpu.SMEM(major, do.dtype, transforms=transforms),  # dO
      plgpu.SMEM((2, WG_ROWS), jnp.float32),  # lse, delta
      plgpu.SMEM((2, WG_ROWS), jnp.int32),  # q ids, positions
      plgpu.SMEM((stages, WG_ROWS, head_dim), k.dtype, transforms=transforms),
      plgpu.SMEM((stages, WG_ROWS, head_dim), v.dtype, transforms=transforms),
      plgpu.SMEM((stages, 2, WG_ROWS), jnp.int32),
      plgpu.SMEM((_BUFFERS, WG_ROWS, WG_ROWS), q.dtype, transforms=transforms),  # dS
  )
  barriers = (
      plgpu.Barrier(num_arrivals=_MAJOR_COPIES + 2),  # Q, dO, ids, lse, delta
      plgpu.Barrier(num_arrivals=4, num_barriers=stages),
      plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=stages),
      plgpu.Barrier(num_arrivals=_CONSUMERS),  # the meeting
  )
  return launch(
      kernel, (plan_rows(q_ranges, q_compares), q, k, v, do, lse, delta, q_seg, q_pos,
               kv_seg, kv_pos),
      scratch, barriers,
      out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
      grid=(tq // WG_ROWS, batch, heads), grid_names=("q_tiles", "batch", "heads"),
      num_consumers=_CONSUMERS)


# ----------------------------------------------------------------------------
# dK and dV


def _dkdv_kernel(ranges_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref,
                 q_pos_ref, kv_seg_ref, kv_pos_ref, dk_ref, dv_ref, scratch, *, scale,
                 causal, sliding_window, num_stages, group):
  ((k_smem, v_smem, q_smem, do_smem, p_or_kv_ids, ds_smem, stats_smem, q_ids_smem),
   (kv_ready, q_ready, q_consumed, meeting)) = scratch
  p_smem, kv_ids_smem = p_or_kv_ids  # the same memory: kv ids first, then P^T
  kt, b, kv_head = (lax.axis_index(n) for n in ("kv_tiles", "batch", "kv_heads"))
  wg = lax.axis_index("wg")
  lo, full_lo, full_hi, hi = (ranges_ref[b, kt, n] for n in range(4))
  compares = ranges_ref[b, kt, 4] if ranges_ref.shape[2] == 5 else None
  logit_scale = scale * LOG2E

  @producer_warpgroup(wg, _CONSUMERS)
  def _producer():
    stream_q_tiles((q_ref, do_ref, lse_ref, delta_ref, q_seg_ref, q_pos_ref),
                   (q_smem, do_smem, stats_smem, q_ids_smem), q_ready, q_consumed,
                   b=b, kv_head=kv_head, group=group, lo=lo, hi=hi, block_q=WG_ROWS,
                   num_stages=num_stages)

  @consumer_warpgroups(wg, _CONSUMERS)
  def _consumer():
    rows = pl.ds(kt * WG_ROWS, WG_ROWS)
    kv_ids = _load_major((k_ref, v_ref, kv_seg_ref, kv_pos_ref),
                         (k_smem, v_smem, kv_ids_smem), kv_ready, wg, b=b, rows=rows,
                         h=kv_head)
    rendezvous(meeting)  # both read the kv ids before P^T overwrites them
    width = k_smem.shape[-1]
    cols = pl.ds(wg * width, width)
    half = pl.ds(wg * _HALF, _HALF)

    def visit(i, carry, *, step0, masked):
      t = step0 + i
      slot = lax.rem(t, jnp.int32(num_stages))
      plgpu.barrier_wait(q_ready.at[slot])
      q_tile, do_tile = q_smem.at[slot], do_smem.at[slot]
      s_t, dp_t = _scores_half(k_smem, q_tile, v_smem, do_tile, wg)
      s_t = s_t * logit_scale
      if masked is not False:
        s_t = mask_tile(s_t, kv_ids, q_ids_smem, slot, kv_major=True, causal=causal,
                        sliding_window=sliding_window, masked=masked,
                        first_column=wg * _HALF)
      lse2 = _bwd_shift(col_vector(stats_smem.at[slot, 0, half][...]))
      delta = col_vector(stats_smem.at[slot, 1, half][...])
      p_t = jnp.exp2(s_t - broadcast_cols(lse2, s_t.shape))
      ds_t = p_t * (dp_t - broadcast_cols(delta, s_t.shape))
      buf = lax.rem(t, jnp.int32(_BUFFERS))
      p_buf, ds_buf = p_smem.at[buf], ds_smem.at[buf]
      p_buf.at[:, half][...] = p_t.astype(p_buf.dtype)
      ds_buf.at[:, half][...] = ds_t.astype(ds_buf.dtype)
      plgpu.commit_smem()  # the stores before the other consumer's wgmmas read them
      rendezvous(meeting)
      carry = _accumulate(carry, (ds_buf, p_buf), (q_tile.at[:, cols], do_tile.at[:, cols]))
      plgpu.barrier_arrive(q_consumed.at[slot])
      return carry

    def one_head(r, carry):
      # The producer's step counter: r * (hi - lo) + i - lo.
      visit_r = functools.partial(visit, step0=r * (hi - lo) - lo)
      return three_runs(lo, full_lo, full_hi, hi, visit_r, carry, compares, kv_major=True)

    acc = zeros_acc((WG_ROWS, width))
    if group == 1:
      dk, dv = one_head(jnp.int32(0), (acc, acc))
    else:
      dk, dv = lax.fori_loop(0, group, one_head, (acc, acc))
    _store_halves((dk * scale, dv), (k_smem.at[wg], v_smem.at[wg]),
                  (dk_ref.at[b, rows, kv_head, cols], dv_ref.at[b, rows, kv_head, cols]))


def split_backward_dkdv(q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos, kv_ranges, *,
                        tile: TileConfig, scale, causal, sliding_window, kv_compares=None):
  """(dK, dV) [B, Tk, Hkv, D]: mosaic_backward.backward_dkdv's contract, schedule "split".

  kv_ranges: int32 [B, Tk / 64, 4] (the transposed plan of 64 x 64 tiles);
  kv_compares: None or int32 [B, Tk / 64]; tile: SPLIT_TILE's tiling with
  any num_stages (inputs checked by the caller).
  """
  check_split_tile(tile, q.shape[3])
  batch, tk, kv_heads, head_dim = k.shape
  stages = tile.num_stages
  transforms = mma_transforms(q.dtype, SWIZZLE)
  kernel = functools.partial(
      _dkdv_kernel, scale=float(scale), causal=causal, sliding_window=sliding_window,
      num_stages=stages, group=q.shape[2] // kv_heads)
  major = (_CONSUMERS, WG_ROWS, head_dim // _CONSUMERS)  # D in halves
  shared = (_BUFFERS, WG_ROWS, WG_ROWS)
  # Every buffer takes whole KiB (Mosaic GPU aligns each to 1024 bytes): at D = 256
  # a buffer of its own for the kv ids would be 48 bytes too many, so they share P^T's.
  scratch = (
      plgpu.SMEM(major, k.dtype, transforms=transforms),  # K, then dK
      plgpu.SMEM(major, v.dtype, transforms=transforms),  # V, then dV
      plgpu.SMEM((stages, WG_ROWS, head_dim), q.dtype, transforms=transforms),
      plgpu.SMEM((stages, WG_ROWS, head_dim), do.dtype, transforms=transforms),
      plgpu.RefUnion(plgpu.SMEM(shared, q.dtype, transforms=transforms),  # P^T
                     plgpu.SMEM((2, WG_ROWS), jnp.int32)),  # kv ids, positions
      plgpu.SMEM(shared, q.dtype, transforms=transforms),  # dS^T
      plgpu.SMEM((stages, 2, WG_ROWS), jnp.float32),  # lse, delta
      plgpu.SMEM((stages, 2, WG_ROWS), jnp.int32),  # q ids, positions
  )
  barriers = (
      plgpu.Barrier(num_arrivals=_MAJOR_COPIES),  # K, V, kv ids, positions
      plgpu.Barrier(num_arrivals=6, num_barriers=stages),
      plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=stages),
      plgpu.Barrier(num_arrivals=_CONSUMERS),  # the meeting
  )
  return launch(
      kernel, (plan_rows(kv_ranges, kv_compares), q, k, v, do, lse, delta, q_seg, q_pos,
               kv_seg, kv_pos),
      scratch, barriers,
      out_type=(jax.ShapeDtypeStruct(k.shape, k.dtype),
                jax.ShapeDtypeStruct(v.shape, v.dtype)),
      grid=(tk // WG_ROWS, batch, kv_heads), grid_names=("kv_tiles", "batch", "kv_heads"),
      num_consumers=_CONSUMERS)
