"""Segment-masked flash attention, forward: a Pallas kernel for Mosaic GPU (Hopper).

Same contract as `pallas_kernels.segment_attention.forward` (the Triton
lowering): same padded inputs, the same tile plan from `jpack.masks`, and the
same outputs (out in q.dtype, lse float32 in natural log, EMPTY_LSE and exact
zeros for rows that attend to nothing, never NaN).

One CTA owns one q tile of one head: `tile.block_major` rows, 64 per consumer
warpgroup (so 64 or 128), plus one producer warpgroup that streams K/V tiles
(and their segment ids and positions) through `tile.num_stages` shared-memory
slots with TMA. Each consumer warpgroup runs, for every kv tile j in the plan
row's [lo, hi):

    S = Q K_j^T (wgmma, Q and K from shared memory)
    mask S only where j is outside [full_lo, full_hi)
    online softmax in registers (base 2, as the Triton kernel)
    acc = acc * alpha + P V_j (wgmma, P from registers)

Shapes (all already padded by the caller):
  q: [B, Tq, H, D]; k, v: [B, Tk, Hkv, D], H % Hkv == 0;
  D in {64, 128}; dtype bfloat16 or float16;
  q_seg, q_pos: int32 [B, Tq]; kv_seg, kv_pos: int32 [B, Tk];
  q_ranges: int32 [B, Tq / block_major, 4], planned with
  (block_q, block_k) = (tile.block_major, tile.block_minor).

tile.num_warps is not used: the warpgroups follow from block_major.

Synchronisation, per slot s of the K/V ring:
  kv_ready[s]:    the producer's TMA of K, V, kv ids and kv positions landed
                  (4 copies, so 4 arrivals, each with its expected bytes);
  kv_consumed[s]: every consumer warpgroup is done reading the slot
                  (one arrival per consumer).
The producer and the consumers walk the same plan row, so they agree on the
number of steps; step t (t = j - lo) uses slot t % num_stages.

Schedules (`forward(..., schedule=...)`, see SCHEDULES), same contract and
outputs; they differ only in how a consumer orders its work:

  "serial"    the loop above, one kv tile at a time: QK^T, wait, softmax, PV,
              wait (tensor cores idle during the softmax). The baseline.
  "pipelined" software pipelining inside each consumer warpgroup (as FA3):
              step j issues QK^T_j and then PV_{j-1} (P_{j-1} from registers)
              back to back, waits only for QK^T_j (wgmma_wait(1)), and runs
              the softmax of S_j while PV_{j-1} is still on the tensor cores;
              the acc rescale by alpha_j waits for PV_{j-1}. One QK^T before
              the loop (prologue) and one PV after it (epilogue).
  "pingpong"  the serial loop per warpgroup, but the two consumers take turns
              on the tensor cores through a shared schedule barrier, so one
              warpgroup's softmax runs under the other's matmuls (as JAX's
              attention_mgpu). With one consumer (64-row tiles) it is the
              serial loop with the split barriers below.

The two new schedules split every slot's barriers into K and V halves, so a
consumer can start QK^T before V lands and the producer can refill K as soon
as QK^T (and the mask, which reads the kv ids) is done:
  k_ready[s]:    TMA of K, kv ids and kv positions landed (3 arrivals);
  v_ready[s]:    TMA of V landed (1 arrival);
  k_consumed[s]: every consumer is done with K and the ids of the slot
                 (one arrival per consumer, after the softmax read the ids);
  v_consumed[s]: every consumer's PV reading V of the slot completed
                 (one arrival per consumer).
Every consumer waits each ready barrier exactly once per step and arrives at
each consumed barrier exactly once per step; the producer waits a consumed
barrier only for steps t >= num_stages (the completion of step t - num_stages)
and loads K before waiting for V's slot, so one stage is enough to make
progress. A barrier never runs two phases ahead of a waiter: its next
completion needs that waiter's own later arrival (or the producer's next copy,
issued after its wait), which keeps the parity tracking of barrier_wait exact.
An empty plan row (lo == hi) issues no copies and no waits: consumers write
zeros and EMPTY_LSE straight away.

  "persistent" the serial consumer loop in a persistent kernel: a grid of
              `num_ctas` CTAs (default: the GPU's SM count, see num_sms),
              each walking a list of work items (batch, head, q tile) from a
              schedule array (persistent_schedule: heaviest plan rows first,
              dealt to the CTAs in snake order; CTA c reads positions c,
              c + num_ctas, ...). The producer streams Q (with the q ids and
              positions) of every item and the K/V tiles of every item without
              draining between items, so the next item's loads land while the
              consumers finish the current one; the consumers stage each
              item's output in the item's own Q buffer and store it with TMA,
              without waiting for the store.

Synchronisation of "persistent". The CTA's items are n = 0 .. N-1; item n
uses Q buffer pair qs = n % 2 (one 64-row buffer per consumer, which also
stages that consumer's output of the item). Step t counts kv tiles over all
the CTA's items (item n's first step is the number of tiles of items
0 .. n-1) and uses ring slot t % num_stages, so the K/V ring runs on across
items exactly as within one plan row. Per barrier (who arrives, how often):
  q_ready[qs]:  the producer's TMA of item n's Q, q ids and q positions, one
                copy of each per consumer: 3 * num_consumers arrivals per
                item, every item (zero-tile ones too). Every consumer waits
                it once per item.
  q_free[qs]:   every consumer, once per item n >= 1, releases item n - 1's
                buffer pair (1 - qs) after its output store has read shared
                memory (wait_smem_to_gmem read-only): right after item n's
                first QK^T, or, for a zero-tile item n, before item n issues
                its own stores. num_consumers arrivals per release. The
                producer waits it before loading Q of item n >= 2 (the
                release of item n - 2, made during item n - 1).
  kv_ready[s]:  the producer's 4 copies of step t (K, V, kv ids, kv
                positions); every consumer waits it once per step.
  kv_consumed[s]: every consumer, once per step, after its PV; the producer
                waits it before loading step t >= num_stages (the completion
                of step t - num_stages, possibly of an earlier item).
Balance across item boundaries: both sides derive N, every item's plan row
and hence every step count from the same schedule array, so they agree on t
and on n. A zero-tile item has no steps (t unchanged; no kv copies, no kv
waits) but still one q_ready phase and one q_free release; a one-tile item has
one step like any other. The last item: the releases of items 0 .. N-2 happen
(in items 1 .. N-1), the producer waits those of 0 .. N-3, so the release of
item N-2 completes a phase nobody waits for, and item N-1 releases nothing
(its store is awaited at the kernel's end); likewise the last num_stages
kv_consumed completions are never waited. Unwaited completions at the end are
harmless: the kernel ends. No barrier runs two phases ahead of a waiter, which
keeps the per-thread parity tracking of barrier_wait exact: q_ready's
completion for item n + 2 needs the release of item n, which every consumer
makes after waiting q_ready for item n + 1; q_free's release of item n + 2 is
made in item n + 3, whose Q the producer loads only after waiting the release
of item n + 1; the kv barriers as in "serial". No cycle: the release the
producer waits for (item n - 2, in item n - 1) needs only Q and the first
K/V tile of item n - 1, both issued before. A CTA with no items (num_ctas >
number of items) skips both loops.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.config import TileConfig
from pallas_kernels.segment_attention import EMPTY_LSE, LOG2E, MASKED_LOGIT

__all__ = ["DEFAULT_NUM_SMS", "DEFAULT_TILE", "SCHEDULES", "check_supported", "forward",
           "num_sms", "persistent_schedule"]

_LN2 = 1.0 / LOG2E
_WG_ROWS = 64  # rows of one wgmma M tile, owned by one consumer warpgroup
_SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_SUPPORTED_HEAD_DIMS = (64, 128)
_SUPPORTED_BLOCK_K = (64, 128)
_PRODUCER_REGISTERS = 40
_CONSUMER_REGISTERS = 232

DEFAULT_TILE = TileConfig(128, 128, num_stages=2)
"""Two consumer warpgroups, 128-key tiles, double-buffered (untuned starting point)."""

SCHEDULES = ("serial", "pipelined", "pingpong", "persistent")
"""Consumer loop orders of the forward kernel (module docstring); "serial" is the default."""
DEFAULT_SCHEDULE = "serial"

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


def persistent_schedule(q_ranges, heads: int, num_ctas: int):
  """int32 [B * nq * heads]: the work items of the persistent forward, in its reading order.

  q_ranges: int32 [B, nq, 4], the plan rows. Item (b, qt, h) is encoded as
  (b * nq + qt) * heads + h; its work is hi - lo of row (b, qt). Items are
  sorted by descending work (stable: equal work keeps the encoded order, so
  the heads of one row stay together) and dealt in rounds of num_ctas: CTA c
  takes the c-th item of an even round and the c-th from the end of an odd
  round (snake order, which evens out the heavy firsts), and reads positions
  c, c + num_ctas, c + 2 * num_ctas, ... of the result. So every CTA walks its
  items heaviest first, and round r's items are all at least as heavy as
  round r + 1's.
  """
  batch, n_q, _ = q_ranges.shape
  work = (q_ranges[..., 3] - q_ranges[..., 0]).reshape(batch * n_q)
  rows = jnp.argsort(-work, stable=True).astype(jnp.int32)  # heaviest rows first
  items = (rows[:, None] * heads + jnp.arange(heads, dtype=jnp.int32)).reshape(-1)
  n_items = batch * n_q * heads
  pos = np.arange(n_items)
  rnd, lane = pos // num_ctas, pos % num_ctas
  round_size = np.minimum(num_ctas, n_items - rnd * num_ctas)
  sorted_pos = rnd * num_ctas + np.where(rnd % 2 == 0, lane, round_size - 1 - lane)
  return items[sorted_pos]


def check_supported(q, k, tile: TileConfig, *, kv_major: bool = False) -> None:
  """Raises ValueError if a Mosaic kernel cannot run (q: [B, Tq, H, D], k: [B, Tk, Hkv, D]).

  kv_major: the tile's major axis runs over keys (the dK/dV kernel), so Tk
  must be a multiple of block_major and Tq of block_minor.
  """
  if q.dtype not in _SUPPORTED_DTYPES:
    raise ValueError(f"Mosaic GPU attention needs bfloat16 or float16, got {q.dtype}")
  head_dim = q.shape[3]
  if head_dim not in _SUPPORTED_HEAD_DIMS:
    raise ValueError(f"Mosaic GPU attention supports head_dim in {_SUPPORTED_HEAD_DIMS}, "
                     f"got {head_dim}")
  if tile.block_major not in (_WG_ROWS, 2 * _WG_ROWS):
    raise ValueError(f"tile.block_major must be 64 or 128 (64 rows per consumer "
                     f"warpgroup), got {tile.block_major}")
  if tile.block_minor not in _SUPPORTED_BLOCK_K:
    raise ValueError(f"tile.block_minor must be one of {_SUPPORTED_BLOCK_K}, "
                     f"got {tile.block_minor}")
  if tile.num_stages < 1:
    raise ValueError(f"tile.num_stages must be >= 1, got {tile.num_stages}")
  major, minor = (k.shape[1], q.shape[1]) if kv_major else (q.shape[1], k.shape[1])
  if major % tile.block_major or minor % tile.block_minor:
    names = "(Tk, Tq)" if kv_major else "(Tq, Tk)"
    raise ValueError(f"sequence lengths {names} = ({major}, {minor}) must be multiples "
                     f"of the tile ({tile.block_major}, {tile.block_minor})")
  # Too many stages for shared memory (227 KiB) is reported by Mosaic GPU
  # itself when the kernel is lowered (a ValueError naming shared memory).


def _mma_transforms(dtype):
  """SMEM tiling + swizzle for wgmma operands whose rows are head_dim wide."""
  swizzle = 128
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(swizzle))


def _row_vector(x):
  """[64] array in the layout of one row statistic of a wgmma accumulator."""
  return plgpu.layout_cast(x, plgpu.Layout.WGMMA.reduce(1))


def _col_vector(x):
  """[n] array in the layout of one column of a [64, n] wgmma accumulator."""
  return plgpu.layout_cast(x, plgpu.Layout.WGMMA.reduce(0))


def _rows(x, shape):
  """[64] row statistic broadcast over the columns of a [64, n] accumulator."""
  return lax.broadcast_in_dim(x, shape, (0,))


def _cols(x, shape):
  """[n] column vector broadcast over the rows of a [64, n] accumulator."""
  return lax.broadcast_in_dim(x, shape, (1,))


def _wait_for_free_slot(t, consumed, num_stages):
  """Slot of step t in a ring of num_stages; waits until the consumers freed it."""
  slot = lax.rem(t, jnp.int32(num_stages))

  @pl.when(t >= num_stages)
  def _wait_free():
    plgpu.barrier_wait(consumed.at[slot])

  return slot


def _stream_kv_tiles(gmem, smem, ready, consumed, *, b, kv_head, lo, hi, block_k,
                     num_stages):
  """Producer loop: kv tiles j in [lo, hi) into ring slot (j - lo) % num_stages.

  gmem: (k, v [B, Tk, Hkv, D], kv_seg, kv_pos [B, Tk]); smem: (k, v
  [stages, block_k, D], ids int32 [stages, 2, block_k]). Each slot's `ready`
  barrier gets 4 arrivals (one per copy).
  """
  k_ref, v_ref, kv_seg_ref, kv_pos_ref = gmem
  k_smem, v_smem, kv_ids_smem = smem

  def load(j):
    slot = _wait_for_free_slot(j - lo, consumed, num_stages)
    cols = pl.ds(j * block_k, block_k)
    done = ready.at[slot]
    plgpu.copy_gmem_to_smem(k_ref.at[b, cols, kv_head], k_smem.at[slot], done)
    plgpu.copy_gmem_to_smem(v_ref.at[b, cols, kv_head], v_smem.at[slot], done)
    plgpu.copy_gmem_to_smem(kv_seg_ref.at[b, cols], kv_ids_smem.at[slot, 0], done)
    plgpu.copy_gmem_to_smem(kv_pos_ref.at[b, cols], kv_ids_smem.at[slot, 1], done)

  pl.loop(lo, hi)(load)


def _launch(kernel, args, scratch, barriers, *, out_type, grid, grid_names,
            num_consumers):
  """plgpu.kernel of kernel(*arg_refs, *out_refs, (scratch_refs, barrier_refs)).

  num_consumers + 1 warpgroups (the last one is the producer), named "wg";
  scratch and barriers are shared by all of them.
  """
  def entry(*refs):
    pl.run_scoped(lambda *s: kernel(*refs, (s[:len(scratch)], s[len(scratch):])),
                  *scratch, *barriers, collective_axes="wg")

  return plgpu.kernel(
      entry, out_type=out_type, grid=grid, grid_names=grid_names,
      num_threads=num_consumers + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(*args)


def _doc_mask(q_seg, q_pos, kv_seg, kv_pos, shape, *, kv_major, causal,
              sliding_window):
  """bool `shape` of allowed pairs of one tile: [64, n] accumulator rows x columns.

  q_seg, q_pos: [64] row vectors and kv_seg, kv_pos: [n] column vectors (or,
  if kv_major, kv on the rows and q on the columns). segment_attention's
  _tile_mask rule, broadcast explicitly: a [64, 1] array (expand_dims) has no
  wgmma layout.
  """
  q_side, kv_side = (_cols, _rows) if kv_major else (_rows, _cols)
  qs, ks = q_side(q_seg, shape), kv_side(kv_seg, shape)
  qp, kp = q_side(q_pos, shape), kv_side(kv_pos, shape)
  mask = (qs == ks) & (qs != 0)
  if causal:
    mask &= kp <= qp
  if sliding_window is not None:
    mask &= qp - kp < sliding_window
  return mask


def _forward_kernel(ranges_ref, q_ref, k_ref, v_ref, q_seg_ref, q_pos_ref,
                    kv_seg_ref, kv_pos_ref, o_ref, lse_ref, scratch, *, scale,
                    causal, sliding_window, block_k, num_stages,
                    num_consumers, group):
  (qo_smem, q_ids_smem, lse_smem, k_smem, v_smem, kv_ids_smem), barriers = scratch
  q_ready, kv_ready, kv_consumed = barriers
  qt, b, h = (lax.axis_index(n) for n in ("q_tiles", "batch", "heads"))
  wg = lax.axis_index("wg")
  lo, full_lo, full_hi, hi = (ranges_ref[b, qt, n] for n in range(4))
  head_dim = q_ref.shape[-1]
  dtype = q_ref.dtype

  # Moving registers from the producer to the consumers is only well defined
  # when the launch allots fewer than the consumers ask for (3 warpgroups:
  # 65536 / 384 = 170 per thread); with 2 warpgroups everyone has 255 anyway.
  rebalance_registers = num_consumers > 1

  @pl.when(wg == num_consumers)
  def _producer():
    if rebalance_registers:
      plgpu.set_max_registers(_PRODUCER_REGISTERS, action="decrease")
    _stream_kv_tiles((k_ref, v_ref, kv_seg_ref, kv_pos_ref),
                     (k_smem, v_smem, kv_ids_smem), kv_ready, kv_consumed,
                     b=b, kv_head=lax.div(h, jnp.int32(group)), lo=lo, hi=hi,
                     block_k=block_k, num_stages=num_stages)

  @pl.when(wg < num_consumers)
  def _consumer():
    if rebalance_registers:
      plgpu.set_max_registers(_CONSUMER_REGISTERS, action="increase")
    q0 = qt * (num_consumers * _WG_ROWS) + wg * _WG_ROWS
    rows = pl.ds(q0, _WG_ROWS)
    q_smem = qo_smem.at[wg]
    plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem, q_ready.at[wg])
    plgpu.copy_gmem_to_smem(q_seg_ref.at[b, rows], q_ids_smem.at[wg, 0], q_ready.at[wg])
    plgpu.copy_gmem_to_smem(q_pos_ref.at[b, rows], q_ids_smem.at[wg, 1], q_ready.at[wg])
    plgpu.barrier_wait(q_ready.at[wg])
    q_seg, q_pos = (_row_vector(q_ids_smem.at[wg, n][...]) for n in range(2))
    logit_scale = scale * LOG2E
    s_shape = (_WG_ROWS, block_k)

    def tile_mask(slot):
      kv_seg, kv_pos = (_col_vector(kv_ids_smem.at[slot, n][...]) for n in range(2))
      return _doc_mask(q_seg, q_pos, kv_seg, kv_pos, s_shape, kv_major=False,
                       causal=causal, sliding_window=sliding_window)

    def visit(j, carry, *, masked):
      acc, m, l = carry
      slot = lax.rem(j - lo, jnp.int32(num_stages))
      plgpu.barrier_wait(kv_ready.at[slot])

      def qk(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
        return acc_ref[...]

      s = pl.run_scoped(qk, plgpu.ACC(s_shape, jnp.float32)) * logit_scale
      if masked:
        s = jnp.where(tile_mask(slot), s, MASKED_LOGIT)
      m_new = jnp.maximum(m, jnp.max(s, axis=1))
      # A row that has seen nothing keeps m_new == MASKED_LOGIT; shifting it
      # by 0 instead makes its masked p exactly 0 (see segment_attention).
      shift = jnp.where(m_new == MASKED_LOGIT, 0.0, m_new)
      alpha = jnp.exp2(m - shift)
      p = jnp.exp2(s - _rows(shift, s_shape))
      l = l * alpha + jnp.sum(p, axis=1)
      acc = acc * _rows(alpha, acc.shape)

      def pv(acc_ref):
        plgpu.wgmma(acc_ref, p.astype(dtype), v_smem.at[slot])

      acc = pl.run_state(pv)(plgpu.ACC.init(acc))
      plgpu.barrier_arrive(kv_consumed.at[slot])
      return acc, m_new, l

    carry = (plgpu.layout_cast(jnp.zeros((_WG_ROWS, head_dim), jnp.float32),
                               plgpu.Layout.WGMMA),
             _row_vector(jnp.full((_WG_ROWS,), MASKED_LOGIT, jnp.float32)),
             _row_vector(jnp.zeros((_WG_ROWS,), jnp.float32)))
    masked_visit = functools.partial(visit, masked=True)
    carry = lax.fori_loop(lo, full_lo, masked_visit, carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(visit, masked=False), carry)
    acc, m, l = lax.fori_loop(full_hi, hi, masked_visit, carry)

    seen = l > 0.0
    l = jnp.where(seen, l, 1.0)
    q_smem[...] = (acc * _rows(1.0 / l, acc.shape)).astype(dtype)
    lse_smem.at[wg][...] = jnp.where(seen, m * _LN2 + jnp.log(l), EMPTY_LSE)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, rows, h])
    plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, rows])
    plgpu.wait_smem_to_gmem(0)


def _stream_kv_split(gmem, smem, barriers, *, b, kv_head, lo, hi, block_k, num_stages):
  """Producer loop of the split schedules: kv tiles j in [lo, hi), slot (j - lo) % stages.

  As _stream_kv_tiles, but K (with the kv ids and positions, which the mask
  needs next to S) and V have their own ready / consumed barriers: K of step t
  is loaded as soon as every consumer released K of step t - num_stages, before
  waiting for V's slot (so V's later release never holds up the next QK^T).
  """
  k_ref, v_ref, kv_seg_ref, kv_pos_ref = gmem
  k_smem, v_smem, kv_ids_smem = smem
  k_ready, v_ready, k_consumed, v_consumed = barriers

  def load(j):
    t = j - lo
    slot = _wait_for_free_slot(t, k_consumed, num_stages)
    cols = pl.ds(j * block_k, block_k)
    plgpu.copy_gmem_to_smem(k_ref.at[b, cols, kv_head], k_smem.at[slot], k_ready.at[slot])
    plgpu.copy_gmem_to_smem(kv_seg_ref.at[b, cols], kv_ids_smem.at[slot, 0],
                            k_ready.at[slot])
    plgpu.copy_gmem_to_smem(kv_pos_ref.at[b, cols], kv_ids_smem.at[slot, 1],
                            k_ready.at[slot])
    _wait_for_free_slot(t, v_consumed, num_stages)
    plgpu.copy_gmem_to_smem(v_ref.at[b, cols, kv_head], v_smem.at[slot], v_ready.at[slot])

  pl.loop(lo, hi)(load)


def _split_forward_kernel(ranges_ref, q_ref, k_ref, v_ref, q_seg_ref, q_pos_ref,
                          kv_seg_ref, kv_pos_ref, o_ref, lse_ref, scratch, *, scale,
                          causal, sliding_window, block_k, num_stages, num_consumers,
                          group, schedule):
  """The "pipelined" and "pingpong" schedules (module docstring), split K/V barriers."""
  (qo_smem, q_ids_smem, lse_smem, k_smem, v_smem, kv_ids_smem), barriers = scratch
  q_ready, k_ready, v_ready, k_consumed, v_consumed, *sched = barriers
  qt, b, h = (lax.axis_index(n) for n in ("q_tiles", "batch", "heads"))
  wg = lax.axis_index("wg")
  lo, full_lo, full_hi, hi = (ranges_ref[b, qt, n] for n in range(4))
  head_dim = q_ref.shape[-1]
  dtype = q_ref.dtype
  rebalance_registers = num_consumers > 1  # see _forward_kernel
  stages = jnp.int32(num_stages)

  @pl.when(wg == num_consumers)
  def _producer():
    if rebalance_registers:
      plgpu.set_max_registers(_PRODUCER_REGISTERS, action="decrease")
    _stream_kv_split((k_ref, v_ref, kv_seg_ref, kv_pos_ref), (k_smem, v_smem, kv_ids_smem),
                     (k_ready, v_ready, k_consumed, v_consumed), b=b,
                     kv_head=lax.div(h, jnp.int32(group)), lo=lo, hi=hi, block_k=block_k,
                     num_stages=num_stages)

  @pl.when(wg < num_consumers)
  def _consumer():
    if rebalance_registers:
      plgpu.set_max_registers(_CONSUMER_REGISTERS, action="increase")
    q0 = qt * (num_consumers * _WG_ROWS) + wg * _WG_ROWS
    rows = pl.ds(q0, _WG_ROWS)
    q_smem = qo_smem.at[wg]
    # q_ready[wg]: this consumer's Q tile, q ids and q positions (3 copies).
    plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem, q_ready.at[wg])
    plgpu.copy_gmem_to_smem(q_seg_ref.at[b, rows], q_ids_smem.at[wg, 0], q_ready.at[wg])
    plgpu.copy_gmem_to_smem(q_pos_ref.at[b, rows], q_ids_smem.at[wg, 1], q_ready.at[wg])
    plgpu.barrier_wait(q_ready.at[wg])
    q_seg, q_pos = (_row_vector(q_ids_smem.at[wg, n][...]) for n in range(2))
    logit_scale = scale * LOG2E
    s_shape = (_WG_ROWS, block_k)
    o_shape = (_WG_ROWS, head_dim)

    def slot_of(j):
      return lax.rem(j - lo, stages)

    def softmax(s, m, l, slot, masked):
      """(p in dtype, m_new, l_new, alpha) of raw logits s [64, block_k] of `slot`."""
      s = s * logit_scale
      if masked:
        kv_seg, kv_pos = (_col_vector(kv_ids_smem.at[slot, n][...]) for n in range(2))
        s = jnp.where(_doc_mask(q_seg, q_pos, kv_seg, kv_pos, s_shape, kv_major=False,
                                causal=causal, sliding_window=sliding_window),
                      s, MASKED_LOGIT)
      m_new = jnp.maximum(m, jnp.max(s, axis=1))
      # A row that has seen nothing keeps m_new == MASKED_LOGIT; shifting it
      # by 0 instead makes its masked p exactly 0 (see segment_attention).
      shift = jnp.where(m_new == MASKED_LOGIT, 0.0, m_new)
      alpha = jnp.exp2(m - shift)
      p = jnp.exp2(s - _rows(shift, s_shape))
      l_new = l * alpha + jnp.sum(p, axis=1)
      return p.astype(dtype), m_new, l_new, alpha

    def finish(acc, m, l):
      seen = l > 0.0
      l = jnp.where(seen, l, 1.0)
      q_smem[...] = (acc * _rows(1.0 / l, acc.shape)).astype(dtype)
      lse_smem.at[wg][...] = jnp.where(seen, m * _LN2 + jnp.log(l), EMPTY_LSE)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, rows, h])
      plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, rows])
      plgpu.wait_smem_to_gmem(0)

    zero_acc = lambda: plgpu.layout_cast(jnp.zeros(o_shape, jnp.float32),
                                         plgpu.Layout.WGMMA)
    m0 = lambda: _row_vector(jnp.full((_WG_ROWS,), MASKED_LOGIT, jnp.float32))
    l0 = lambda: _row_vector(jnp.zeros((_WG_ROWS,), jnp.float32))

    def three_loops(first, body, carry):
      """body(j, carry, masked=...) over j in [first, hi), masked outside [full_lo, full_hi)."""
      a, b_ = jnp.maximum(full_lo, first), jnp.maximum(full_hi, first)
      carry = lax.fori_loop(first, a, functools.partial(body, masked=True), carry)
      carry = lax.fori_loop(a, b_, functools.partial(body, masked=False), carry)
      return lax.fori_loop(b_, hi, functools.partial(body, masked=True), carry)

    if schedule == "pipelined":
      def pipeline(acc_ref, s_ref):
        """acc_ref: the O accumulator [64, D]; s_ref: the S accumulator [64, block_k]."""
        # Prologue, step lo (masked whatever the plan says: a no-op on a full tile).
        plgpu.barrier_wait(k_ready.at[0])
        plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(k_smem.at[0], (1, 0)))
        p, m, l, _ = softmax(s_ref[...], m0(), l0(), 0, masked=True)
        plgpu.barrier_arrive(k_consumed.at[0])

        def step(j, carry, *, masked):
          """QK^T_j and PV_{j-1} in flight together; the softmax of S_j under PV_{j-1}."""
          p_prev, m, l = carry
          slot, prev = slot_of(j), slot_of(j - 1)
          s_ref[...] = plgpu.layout_cast(jnp.zeros(s_shape, jnp.float32),
                                         plgpu.Layout.WGMMA)
          plgpu.barrier_wait(k_ready.at[slot])
          plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
          plgpu.barrier_wait(v_ready.at[prev])
          plgpu.wgmma(acc_ref, p_prev, v_smem.at[prev])
          # wgmma groups retire in order: at most 1 pending means QK^T_j is done.
          s = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)
          p, m, l, alpha = softmax(s, m, l, slot, masked)
          plgpu.barrier_arrive(k_consumed.at[slot])
          acc = acc_ref[...]  # waits for PV_{j-1}
          plgpu.barrier_arrive(v_consumed.at[prev])
          acc_ref[...] = acc * _rows(alpha, o_shape)
          return p, m, l

        p, m, l = three_loops(lo + 1, step, (p, m, l))
        # Epilogue: PV of the last step.
        last = slot_of(hi - 1)
        plgpu.barrier_wait(v_ready.at[last])
        plgpu.wgmma(acc_ref, p, v_smem.at[last])
        acc = acc_ref[...]
        plgpu.barrier_arrive(v_consumed.at[last])
        return acc, m, l

      @pl.when(hi > lo)
      def _visit():
        finish(*pl.run_scoped(pipeline, plgpu.ACC(o_shape, jnp.float32),
                              plgpu.ACC(s_shape, jnp.float32)))

      @pl.when(hi <= lo)
      def _empty():
        finish(zero_acc(), m0(), l0())
      return

    assert schedule == "pingpong", schedule
    if sched:
      # sched_barrier: both consumers arrive, then wait (a rendezvous; 2
      # arrivals per phase). Consumer 1 starts one rendezvous behind consumer
      # 0 and consumer 0 does one more after its loop, so both do 2 per step
      # plus 1, whatever the trip count (both walk the same plan row).
      (sched_barrier,) = sched

      def rendezvous():
        plgpu.barrier_arrive(sched_barrier)
        plgpu.barrier_wait(sched_barrier)
    else:
      sched_barrier, rendezvous = None, lambda: None

    if sched_barrier is not None:
      pl.when(wg == 1)(rendezvous)

    def visit(j, carry, *, masked):
      acc, m, l = carry
      slot = slot_of(j)
      plgpu.barrier_wait(k_ready.at[slot])

      def qk(s_ref):
        plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
        rendezvous()  # QK^T issued: the other consumer may finish its softmax
        return s_ref[...]

      s = pl.run_scoped(qk, plgpu.ACC(s_shape, jnp.float32))
      p, m, l, alpha = softmax(s, m, l, slot, masked)
      plgpu.barrier_arrive(k_consumed.at[slot])
      acc = acc * _rows(alpha, o_shape)
      if sched_barrier is not None:
        acc, l, m, p = lax.optimization_barrier((acc, l, m, p))
        plgpu.barrier_arrive(sched_barrier)  # softmax done
        plgpu.barrier_wait(v_ready.at[slot])
        plgpu.barrier_wait(sched_barrier)  # the other consumer issued its QK^T
      else:
        plgpu.barrier_wait(v_ready.at[slot])

      def pv(acc_ref):
        plgpu.wgmma(acc_ref, p, v_smem.at[slot])

      acc = pl.run_state(pv)(plgpu.ACC.init(acc))
      plgpu.barrier_arrive(v_consumed.at[slot])
      return acc, m, l

    acc, m, l = three_loops(lo, visit, (zero_acc(), m0(), l0()))
    if sched_barrier is not None:
      pl.when(wg == 0)(rendezvous)
    finish(acc, m, l)


def _persistent_forward_kernel(schedule_ref, ranges_ref, q_ref, k_ref, v_ref, q_seg_ref,
                               q_pos_ref, kv_seg_ref, kv_pos_ref, o_ref, lse_ref, scratch, *,
                               scale, causal, sliding_window, block_k, num_stages,
                               num_consumers, group, num_ctas):
  """The "persistent" schedule (module docstring): serial consumers, items from schedule_ref.

  schedule_ref: int32 [num_items] (persistent_schedule); CTA c runs the items
  at positions c, c + num_ctas, ... Scratch: Q buffers [2 * num_consumers, 64,
  D] (item n, consumer wg: buffer (n % 2) * num_consumers + wg), which also
  stage that item's output; q ids [2 * num_consumers, 2, 64]; lse [2 *
  num_consumers, 64]; the K/V ring as in _forward_kernel.
  """
  (q_bufs, q_ids_smem, lse_smem, k_smem, v_smem, kv_ids_smem), barriers = scratch
  q_ready, q_free, kv_ready, kv_consumed = barriers
  cta = lax.axis_index("ctas")
  wg = lax.axis_index("wg")
  num_items = schedule_ref.shape[0]
  heads, head_dim = q_ref.shape[2], q_ref.shape[3]
  n_q_tiles = ranges_ref.shape[1]
  block_q = num_consumers * _WG_ROWS
  dtype = q_ref.dtype
  stages = jnp.int32(num_stages)
  # Items of this CTA: positions cta + n * num_ctas < num_items (0 if cta >= num_items).
  count = lax.div(jnp.int32(num_items + num_ctas - 1) - cta, jnp.int32(num_ctas))
  rebalance_registers = num_consumers > 1  # see _forward_kernel

  def describe(n):
    """(b, qt, h, lo, full_lo, full_hi, hi) of the CTA's item n (clamped into the array)."""
    pos = jnp.minimum(cta + n * num_ctas, jnp.int32(num_items - 1))
    item = schedule_ref[pos]
    h = lax.rem(item, jnp.int32(heads))
    row = lax.div(item, jnp.int32(heads))
    qt, b = lax.rem(row, jnp.int32(n_q_tiles)), lax.div(row, jnp.int32(n_q_tiles))
    return (b, qt, h, *(ranges_ref[b, qt, i] for i in range(4)))

  def q_buffer(n, consumer):
    return lax.rem(n, jnp.int32(2)) * num_consumers + consumer

  @pl.when(wg == num_consumers)
  def _producer():
    if rebalance_registers:
      plgpu.set_max_registers(_PRODUCER_REGISTERS, action="decrease")

    def item(n, t):
      b, qt, h, lo, _, _, hi = describe(n)
      qs = lax.rem(n, jnp.int32(2))

      # q_free[qs]: wait for every consumer's release of item n - 2 (the last
      # user of this Q buffer); items 0 and 1 find their buffer fresh.
      @pl.when(n >= 2)
      def _wait_q_buffer():
        plgpu.barrier_wait(q_free.at[qs])

      # q_ready[qs]: 3 copies per consumer (Q, q ids, q positions) per item.
      for c in range(num_consumers):
        rows = pl.ds(qt * block_q + c * _WG_ROWS, _WG_ROWS)
        buf = q_buffer(n, c)
        plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_bufs.at[buf], q_ready.at[qs])
        plgpu.copy_gmem_to_smem(q_seg_ref.at[b, rows], q_ids_smem.at[buf, 0],
                                q_ready.at[qs])
        plgpu.copy_gmem_to_smem(q_pos_ref.at[b, rows], q_ids_smem.at[buf, 1],
                                q_ready.at[qs])
      kv_head = lax.div(h, jnp.int32(group))

      def load(j, t):
        # kv_ready[slot]: 4 copies per step; kv_consumed[slot]: waited for step
        # t - num_stages (the slot's previous use, possibly of an earlier item).
        slot = _wait_for_free_slot(t, kv_consumed, num_stages)
        cols = pl.ds(j * block_k, block_k)
        done = kv_ready.at[slot]
        plgpu.copy_gmem_to_smem(k_ref.at[b, cols, kv_head], k_smem.at[slot], done)
        plgpu.copy_gmem_to_smem(v_ref.at[b, cols, kv_head], v_smem.at[slot], done)
        plgpu.copy_gmem_to_smem(kv_seg_ref.at[b, cols], kv_ids_smem.at[slot, 0], done)
        plgpu.copy_gmem_to_smem(kv_pos_ref.at[b, cols], kv_ids_smem.at[slot, 1], done)
        return t + 1

      return lax.fori_loop(lo, hi, load, t)

    lax.fori_loop(jnp.int32(0), count, item, jnp.int32(0))

  @pl.when(wg < num_consumers)
  def _consumer():
    if rebalance_registers:
      plgpu.set_max_registers(_CONSUMER_REGISTERS, action="increase")
    logit_scale = scale * LOG2E
    s_shape = (_WG_ROWS, block_k)
    o_shape = (_WG_ROWS, head_dim)

    def item(n, carry):
      t0, (b, qt, h, lo, full_lo, full_hi, hi) = carry
      next_item = describe(n + 1)  # loads issued now, used by the next iteration
      qs = lax.rem(n, jnp.int32(2))
      buf = q_buffer(n, wg)
      q_smem = q_bufs.at[buf]
      rows = pl.ds(qt * block_q + wg * _WG_ROWS, _WG_ROWS)
      plgpu.barrier_wait(q_ready.at[qs])  # once per item, every consumer
      q_seg, q_pos = (_row_vector(q_ids_smem.at[buf, i][...]) for i in range(2))

      def release_previous_item():
        """q_free[1 - qs]: item n - 1's output store has read its Q buffer."""
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        plgpu.barrier_arrive(q_free.at[1 - qs])

      has_previous = n >= 1

      def visit(j, carry, *, masked):
        acc, m, l = carry
        slot = lax.rem(t0 + (j - lo), stages)
        plgpu.barrier_wait(kv_ready.at[slot])  # once per step, every consumer

        def qk(acc_ref):
          plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
          return acc_ref[...]

        s = pl.run_scoped(qk, plgpu.ACC(s_shape, jnp.float32)) * logit_scale
        # The release of item n - 1, once per item, after the first QK^T (the
        # store had the Q wait and the QK^T to read; no wgmma is in flight here).
        pl.when((j == lo) & has_previous)(release_previous_item)
        if masked:
          kv_seg, kv_pos = (_col_vector(kv_ids_smem.at[slot, i][...]) for i in range(2))
          s = jnp.where(_doc_mask(q_seg, q_pos, kv_seg, kv_pos, s_shape, kv_major=False,
                                  causal=causal, sliding_window=sliding_window),
                        s, MASKED_LOGIT)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # A row that has seen nothing keeps m_new == MASKED_LOGIT; shifting it
        # by 0 instead makes its masked p exactly 0 (see segment_attention).
        shift = jnp.where(m_new == MASKED_LOGIT, 0.0, m_new)
        alpha = jnp.exp2(m - shift)
        p = jnp.exp2(s - _rows(shift, s_shape))
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * _rows(alpha, acc.shape)

        def pv(acc_ref):
          plgpu.wgmma(acc_ref, p.astype(dtype), v_smem.at[slot])

        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(kv_consumed.at[slot])  # once per step, every consumer
        return acc, m_new, l

      carry = (plgpu.layout_cast(jnp.zeros(o_shape, jnp.float32), plgpu.Layout.WGMMA),
               _row_vector(jnp.full((_WG_ROWS,), MASKED_LOGIT, jnp.float32)),
               _row_vector(jnp.zeros((_WG_ROWS,), jnp.float32)))
      masked_visit = functools.partial(visit, masked=True)
      carry = lax.fori_loop(lo, full_lo, masked_visit, carry)
      carry = lax.fori_loop(full_lo, full_hi, functools.partial(visit, masked=False), carry)
      acc, m, l = lax.fori_loop(full_hi, hi, masked_visit, carry)
      # A zero-tile item issued no QK^T: it releases item n - 1 here, before
      # issuing its own stores (so that the wait covers item n - 1's only).
      pl.when((hi <= lo) & has_previous)(release_previous_item)

      seen = l > 0.0
      l = jnp.where(seen, l, 1.0)
      q_smem[...] = (acc * _rows(1.0 / l, acc.shape)).astype(dtype)
      lse_smem.at[buf][...] = jnp.where(seen, m * _LN2 + jnp.log(l), EMPTY_LSE)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, rows, h])
      plgpu.copy_smem_to_gmem(lse_smem.at[buf], lse_ref.at[b, h, rows])
      # Not awaited here: item n + 1 waits for the read, the kernel's end for the write.
      return t0 + jnp.maximum(hi - lo, 0), next_item

    lax.fori_loop(jnp.int32(0), count, item, (jnp.int32(0), describe(jnp.int32(0))))
    plgpu.wait_smem_to_gmem(0)


def forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, q_ranges, *, tile: TileConfig,
            scale, causal, sliding_window, interpret=False,
            schedule: str = DEFAULT_SCHEDULE, num_ctas: int | None = None):
  """Returns (out [B, Tq, H, D] in q.dtype, lse float32 [B, H, Tq]).

  Same arguments as `segment_attention.forward`; `interpret` must be False
  (the Mosaic GPU interpreter cannot run this kernel: see tests/test_mosaic.py).
  schedule: one of SCHEDULES, the consumer loop order (module docstring).
  num_ctas: "persistent" only, the number of CTAs launched; default
  min(num_sms(), number of work items B * H * Tq / block_major). More CTAs
  than items leaves the extra ones idle.
  """
  if interpret:
    raise NotImplementedError("the Mosaic GPU attention kernel has no interpret mode")
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
  if num_ctas is not None and (schedule != "persistent" or num_ctas < 1):
    raise ValueError(f"num_ctas must be None or >= 1, and only with schedule="
                     f"'persistent'; got num_ctas={num_ctas}, schedule={schedule!r}")
  check_supported(q, k, tile)
  batch, tq, heads, head_dim = q.shape
  group = heads // k.shape[2]
  num_consumers = tile.block_major // _WG_ROWS
  bk, stages = tile.block_minor, tile.num_stages
  transforms = _mma_transforms(q.dtype)
  opts = dict(scale=scale, causal=causal, sliding_window=sliding_window, block_k=bk,
              num_stages=stages, num_consumers=num_consumers, group=group)
  if schedule == "persistent":
    return _persistent_forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, q_ranges,
                               num_ctas=num_ctas, opts=opts, transforms=transforms)
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

  scratch = (
      plgpu.SMEM((num_consumers, _WG_ROWS, head_dim), q.dtype, transforms=transforms),
      plgpu.SMEM((num_consumers, 2, _WG_ROWS), jnp.int32),
      plgpu.SMEM((num_consumers, _WG_ROWS), jnp.float32),
      plgpu.SMEM((stages, bk, head_dim), k.dtype, transforms=transforms),
      plgpu.SMEM((stages, bk, head_dim), v.dtype, transforms=transforms),
      plgpu.SMEM((stages, 2, bk), jnp.int32),
  )
  return _launch(
      kernel, (q_ranges, q, k, v, q_seg, q_pos, kv_seg, kv_pos), scratch, barriers,
      out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                jax.ShapeDtypeStruct((batch, heads, tq), jnp.float32)),
      grid=(tq // tile.block_major, batch, heads),
      grid_names=("q_tiles", "batch", "heads"),
      num_consumers=num_consumers)


def _persistent_forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, q_ranges, *, num_ctas,
                        opts, transforms):
  """forward(..., schedule="persistent"): the schedule array, then the persistent kernel."""
  batch, tq, heads, head_dim = q.shape
  num_consumers, bk, stages = opts["num_consumers"], opts["block_k"], opts["num_stages"]
  num_items = batch * heads * q_ranges.shape[1]
  if num_ctas is None:
    num_ctas = min(num_sms(), num_items)
  schedule = persistent_schedule(q_ranges, heads, num_ctas)
  kernel = functools.partial(_persistent_forward_kernel, num_ctas=num_ctas, **opts)
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
  scratch = (
      plgpu.SMEM((2 * num_consumers, _WG_ROWS, head_dim), q.dtype, transforms=transforms),
      plgpu.SMEM((2 * num_consumers, 2, _WG_ROWS), jnp.int32),
      plgpu.SMEM((2 * num_consumers, _WG_ROWS), jnp.float32),
      plgpu.SMEM((stages, bk, head_dim), k.dtype, transforms=transforms),
      plgpu.SMEM((stages, bk, head_dim), v.dtype, transforms=transforms),
      plgpu.SMEM((stages, 2, bk), jnp.int32),
  )
  return _launch(
      kernel, (schedule, q_ranges, q, k, v, q_seg, q_pos, kv_seg, kv_pos), scratch,
      barriers,
      out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                jax.ShapeDtypeStruct((batch, heads, tq), jnp.float32)),
      grid=(num_ctas,), grid_names=("ctas",), num_consumers=num_consumers)
