"""What the Mosaic GPU attention kernels share: checks, layouts, the K/V ring, the launch.

Used by the forward (mosaic_attention, mosaic_persistent) and the backward
(mosaic_backward, mosaic_fused_backward).

Warpgroups. Every kernel is launched by `launch` with num_consumers + 1
warpgroups on the axis "wg": consumers 0 .. num_consumers - 1 each own
WG_ROWS = 64 rows of the CTA's major tile (one wgmma M tile, so a major tile
of 64 or 128 rows), and the last one is the producer, which only streams the
minor tiles from global to shared memory with TMA. With two consumers the
producer gives registers to the consumers (PRODUCER_REGISTERS,
CONSUMER_REGISTERS): moving registers is only well defined when the launch
allots fewer than the consumers ask for (3 warpgroups: 65536 / 384 = 170 per
thread); with 2 warpgroups everyone has 255 anyway.
A kernel runs its two roles under `producer_warpgroup` and
`consumer_warpgroups`, which do that.

The ring. The minor tiles (with their segment ids and positions) go through
`tile.num_stages` shared-memory slots; step t uses slot t % num_stages.
Per slot s:
  ready[s]:    the producer's copies of step t landed (one arrival per copy,
               each with its expected bytes; 4 for K, V, kv ids, kv positions);
  consumed[s]: every consumer warpgroup is done reading the slot (one arrival
               per consumer).
The producer and the consumers walk the same plan row, so they agree on the
number of steps; the producer waits consumed[s] only for steps t >=
num_stages (the completion of step t - num_stages, `wait_for_free_slot`).
Every consumer waits each ready barrier once per step and arrives at each
consumed barrier once per step, so a barrier never runs two phases ahead of a
waiter, which keeps the parity tracking of barrier_wait exact. An empty plan
row (lo == hi) issues no copies and no waits.

Tiles in registers are wgmma accumulators [64, n]: `row_vector` and
`col_vector` give a row statistic [64] or a column [n] their layouts,
`broadcast_rows` and `broadcast_cols` broadcast them back, `doc_mask` is
the document mask of one tile and `tile_doc_mask` that of a tile whose minor
ids sit in a ring slot.

The backward kernels whose CTAs own kv tiles stream q tiles instead
(`stream_q_tiles`) and start each step with `scores_and_grads`. Two consumer
warpgroups that share shared memory meet at a `rendezvous`. A kernel that
accumulates into global memory (float32 TMA reductions) is launched with
`launch_accumulating`, which hands it its accumulators as aliased inputs.

The forward kernels share the consumer's steps: `copy_q_tile` (Q with its ids
and positions into shared memory), `online_softmax` (one kv tile of the
base-2 online softmax) and `store_output` (the epilogue: out = acc / l and
the lse, stored with TMA); `zeros_acc`, `empty_row_stats`, `three_runs`
and `mma_accumulate` (acc += a @ b with a in registers) serve forward and
backward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.config import COMPARE_SPLIT_BITS, TileConfig
from pallas_kernels.segment_attention import EMPTY_LSE, LOG2E, MASKED_LOGIT

__all__ = ["BLOCK_MINORS", "COMPARES", "CONSUMER_REGISTERS", "DQ_BLOCK_MINORS", "LN2",
           "PERSISTENT_MAX_SMEM_BYTES", "PRODUCER_REGISTERS", "WG_ROWS", "WIDE_HEAD_DQ_TILE",
           "WIDE_HEAD_FORWARD_TILE", "WIDE_HEAD_TILE", "operand_rows_fit",
           "broadcast_cols", "broadcast_rows", "check_row_words", "check_supported", "col_vector",
           "consumer_warpgroups", "copy_kv_tile", "copy_q_tile", "doc_mask", "empty_row_stats",
           "launch", "launch_accumulating", "load_kv_rows", "mask_tile", "mma_accumulate",
           "mma_transforms", "online_softmax", "plan_rows", "producer_warpgroup", "rendezvous",
           "row_vector", "scores_and_grads", "store_output", "stream_kv_tiles", "stream_q_tiles",
           "three_runs", "tile_doc_mask", "wait_for_free_slot", "zeros_acc"]

LN2 = 1.0 / LOG2E
WG_ROWS = 64  # rows of one wgmma M tile, owned by one consumer warpgroup
_SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_SUPPORTED_HEAD_DIMS = (64, 128, 256)
BLOCK_MINORS = (64, 128)  # tile.block_minor of every kernel
DQ_BLOCK_MINORS = (32, 64, 128)
"""block_minor of the grid dQ kernel: also 32-key tiles, whose [64, 32] scores leave
room for a [64, 256] accumulator next to them (WIDE_HEAD_DQ_TILE)."""
PERSISTENT_MAX_SMEM_BYTES = 220 * 1024
"""Largest operand shared memory (Q, K, V, dO) of a default persistent kernel (227 KiB in all)."""
WIDE_HEAD_TILE = TileConfig(64, 64, num_stages=2)
"""dK/dV's default tile at head dim 256 (jpack.attention; the split kernels): wider ones
do not fit shared memory with two stages, and the one-stage backward tilings measured
1.3-1.5x slower forward+backward on an H100 (experiments/perf_notes.md, entry 36)."""
WIDE_HEAD_FORWARD_TILE = TileConfig(128, 64, num_stages=2)
"""The forward's default tile at head dim 256: two consumers of 64 rows, which fit
beside the two-stage K/V ring with one Q buffer pair (mosaic_persistent.q_buffer_pairs);
0.83x the time of WIDE_HEAD_TILE's one consumer on an H100 (perf notes entry 41)."""
WIDE_HEAD_DQ_TILE = TileConfig(128, 32, num_stages=2)
"""dQ's default tile at head dim 256: two consumers of 64 q rows, each with its own
[64, 256] accumulator, sharing 32-key tiles; 1.56 ms against WIDE_HEAD_TILE's 2.11 on an
H100 (perf notes entry 39)."""
PRODUCER_REGISTERS = 40
CONSUMER_REGISTERS = 232


def check_supported(q, k, tile: TileConfig, *, kv_major: bool = False,
                    block_minors=BLOCK_MINORS) -> None:
  """Raises ValueError if a Mosaic kernel cannot run (q: [B, Tq, H, D], k: [B, Tk, Hkv, D]).

  kv_major: the tile's major axis runs over keys (the dK/dV kernel), so Tk
  must be a multiple of block_major and Tq of block_minor. block_minors: the
  kernel's tile.block_minor choices (DQ_BLOCK_MINORS for the grid dQ kernel).
  """
  if q.dtype not in _SUPPORTED_DTYPES:
    raise ValueError(f"Mosaic GPU attention needs bfloat16 or float16, got {q.dtype}")
  head_dim = q.shape[3]
  if head_dim not in _SUPPORTED_HEAD_DIMS:
    raise ValueError(f"Mosaic GPU attention supports head_dim in {_SUPPORTED_HEAD_DIMS}, "
                     f"got {head_dim}")
  if tile.block_major not in (WG_ROWS, 2 * WG_ROWS):
    raise ValueError(f"tile.block_major must be 64 or 128 (64 rows per consumer "
                     f"warpgroup), got {tile.block_major}")
  if tile.block_minor not in block_minors:
    raise ValueError(f"tile.block_minor must be one of {block_minors}, "
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


def operand_rows_fit(rows: int, like) -> bool:
  """Whether `rows` shared-memory rows of operands shaped like `like` ([..., D]) fit
  in PERSISTENT_MAX_SMEM_BYTES (the persistent kernels' test for their buffers)."""
  return rows * like.shape[-1] * jnp.dtype(like.dtype).itemsize <= PERSISTENT_MAX_SMEM_BYTES


def mma_transforms(dtype, swizzle=128):
  """SMEM tiling + swizzle for wgmma operands (and TMA) of `dtype`.

  The tiles are swizzle bytes wide: (8, 128 / itemsize) by default. A
  narrower swizzle (64 or 32 bytes) gives narrower tiles, so that column
  slices of that width stay whole tiles. Every operand of one wgmma must
  have the same swizzle.
  """
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(swizzle))


def row_vector(x):
  """[64] array in the layout of one row statistic of a wgmma accumulator."""
  return plgpu.layout_cast(x, plgpu.Layout.WGMMA.reduce(1))


def col_vector(x):
  """[n] array in the layout of one column of a [64, n] wgmma accumulator."""
  return plgpu.layout_cast(x, plgpu.Layout.WGMMA.reduce(0))


def broadcast_rows(x, shape):
  """[64] row statistic broadcast over the columns of a [64, n] accumulator."""
  return lax.broadcast_in_dim(x, shape, (0,))


def broadcast_cols(x, shape):
  """[n] column vector broadcast over the rows of a [64, n] accumulator."""
  return lax.broadcast_in_dim(x, shape, (1,))


def _on_warpgroups(cond, registers, action, num_consumers):
  def run(body):
    @pl.when(cond)
    def _role():
      if num_consumers > 1:  # rebalance registers (module docstring)
        plgpu.set_max_registers(registers, action=action)
      body()

  return run


def producer_warpgroup(wg, num_consumers):
  """Decorator: runs the body now on the producer (wg == num_consumers) only.

  With two consumers the producer first gives registers away
  (PRODUCER_REGISTERS).
  """
  return _on_warpgroups(wg == num_consumers, PRODUCER_REGISTERS, "decrease", num_consumers)


def consumer_warpgroups(wg, num_consumers):
  """Decorator: runs the body now on the consumers (wg < num_consumers) only.

  With two consumers they first take the producer's registers
  (CONSUMER_REGISTERS).
  """
  return _on_warpgroups(wg < num_consumers, CONSUMER_REGISTERS, "increase", num_consumers)


def wait_for_free_slot(t, consumed, num_stages):
  """Slot of step t in a ring of num_stages; waits until the consumers freed it."""
  slot = lax.rem(t, jnp.int32(num_stages))

  @pl.when(t >= num_stages)
  def _wait_free():
    plgpu.barrier_wait(consumed.at[slot])

  return slot


def stream_kv_tiles(gmem, smem, ready, consumed, *, b, kv_head, lo, hi, block_k,
                    num_stages, first_step=0):
  """Producer loop: kv tiles j in [lo, hi) as steps t = first_step + j - lo of the ring.

  gmem: (k, v [B, Tk, Hkv, D], kv_seg, kv_pos [B, Tk]); smem: (k, v
  [stages, block_k, D], ids int32 [stages, 2, block_k]). Step t uses slot
  t % num_stages; each slot's `ready` barrier gets 4 arrivals (one per copy);
  the slot's `consumed` barrier is waited for steps t >= num_stages
  (wait_for_free_slot). first_step: steps already streamed through the ring
  (a persistent kernel's earlier items).
  """
  def load(j):
    slot = wait_for_free_slot(first_step + j - lo, consumed, num_stages)
    copy_kv_tile(gmem, smem, ready.at[slot], slot, b=b, j=j, kv_head=kv_head,
                 block_k=block_k)

  pl.loop(lo, hi)(load)


def copy_kv_tile(gmem, smem, done, slot, *, b, j, kv_head, block_k):
  """TMA of kv tile j (K, V, kv ids, kv positions) into ring slot `slot`: 4 arrivals on done.

  gmem, smem: as stream_kv_tiles'. Does not wait.
  """
  k_ref, v_ref, kv_seg_ref, kv_pos_ref = gmem
  k_smem, v_smem, kv_ids_smem = smem
  cols = pl.ds(j * block_k, block_k)
  plgpu.copy_gmem_to_smem(k_ref.at[b, cols, kv_head], k_smem.at[slot], done)
  plgpu.copy_gmem_to_smem(v_ref.at[b, cols, kv_head], v_smem.at[slot], done)
  plgpu.copy_gmem_to_smem(kv_seg_ref.at[b, cols], kv_ids_smem.at[slot, 0], done)
  plgpu.copy_gmem_to_smem(kv_pos_ref.at[b, cols], kv_ids_smem.at[slot, 1], done)


def stream_q_tiles(gmem, smem, ready, consumed, *, b, kv_head, group, lo, hi, block_q,
                   num_stages, first_step=0):
  """Producer loop: for each q head of the group, q tiles i in [lo, hi) into the ring.

  gmem: (q, do [B, Tq, H, D], lse, delta [B, H, Tq], q_seg, q_pos [B, Tq]);
  smem: (q, do [stages, block_q, D], stats float32 [stages, 2, block_q], ids
  int32 [stages, 2, block_q]). Step t = first_step + r * (hi - lo) + i - lo
  for q head kv_head * group + r; each slot's `ready` barrier gets 6
  arrivals (one per copy). first_step as in stream_kv_tiles.
  """
  q_ref, do_ref, lse_ref, delta_ref, q_seg_ref, q_pos_ref = gmem
  q_smem, do_smem, stats_smem, ids_smem = smem

  def one_head(r):
    h = kv_head * group + r

    def load(i):
      slot = wait_for_free_slot(first_step + r * (hi - lo) + i - lo, consumed,
                                num_stages)
      rows = pl.ds(i * block_q, block_q)
      done = ready.at[slot]
      plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem.at[slot], done)
      plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_smem.at[slot], done)
      plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], stats_smem.at[slot, 0], done)
      plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], stats_smem.at[slot, 1], done)
      plgpu.copy_gmem_to_smem(q_seg_ref.at[b, rows], ids_smem.at[slot, 0], done)
      plgpu.copy_gmem_to_smem(q_pos_ref.at[b, rows], ids_smem.at[slot, 1], done)

    pl.loop(lo, hi)(load)

  pl.loop(0, group)(one_head)


def _kernel_entry(kernel, scratch, barriers):
  """kernel(*refs, (scratch_refs, barrier_refs)) with its scratch allocated for every warpgroup."""
  def entry(*refs):
    pl.run_scoped(lambda *s: kernel(*refs, (s[:len(scratch)], s[len(scratch):])),
                  *scratch, *barriers, collective_axes="wg")

  return entry


def load_kv_rows(gmem, smem, ready, *, b, rows, kv_head, wg):
  """One consumer's 64 key rows of a kv-major kernel: K, V, kv ids and positions, waited for.

  gmem: (k, v [B, Tk, Hkv, D], kv_seg, kv_pos [B, Tk]); smem: (k, v
  [consumers, 64, D], ids int32 [consumers, 2, 64]); ready: 4 arrivals.
  Returns (kv_seg, kv_pos) [64] row vectors.
  """
  k_ref, v_ref, kv_seg_ref, kv_pos_ref = gmem
  k_smem, v_smem, ids_smem = smem
  plgpu.copy_gmem_to_smem(k_ref.at[b, rows, kv_head], k_smem.at[wg], ready)
  plgpu.copy_gmem_to_smem(v_ref.at[b, rows, kv_head], v_smem.at[wg], ready)
  plgpu.copy_gmem_to_smem(kv_seg_ref.at[b, rows], ids_smem.at[wg, 0], ready)
  plgpu.copy_gmem_to_smem(kv_pos_ref.at[b, rows], ids_smem.at[wg, 1], ready)
  plgpu.barrier_wait(ready)
  return tuple(row_vector(ids_smem.at[wg, n][...]) for n in range(2))


def launch(kernel, args, scratch, barriers, *, out_type, grid, grid_names, num_consumers):
  """plgpu.kernel of kernel(*arg_refs, *out_refs, (scratch_refs, barrier_refs)).

  num_consumers + 1 warpgroups (the last one is the producer), named "wg";
  scratch and barriers are shared by all of them.
  """
  return plgpu.kernel(
      _kernel_entry(kernel, scratch, barriers), out_type=out_type, grid=grid,
      grid_names=grid_names, num_threads=num_consumers + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True, **PROFILE),
  )(*args)


PROFILE = {}
"""Extra plgpu.CompilerParams for `launch`, normally none. experiments/fwd_probe.py
sets profile_space and profile_dir here to record the kernels' jax.named_scope
regions per warpgroup (Mosaic GPU's on-device profiler)."""


def launch_accumulating(kernel, args, accumulators, scratch, barriers, *, out_type, grid,
                        grid_names, num_consumers, name):
  """As `launch`, plus global accumulators that the kernel updates in place.

  accumulators: arrays (their initial values, e.g. float32 zeros); the kernel
  sees them as gmem refs right after the args, i.e. kernel(*arg_refs,
  *accumulator_refs, *out_refs, (scratch_refs, barrier_refs)), and may add
  into them with TMA reductions (copy_smem_to_gmem(..., reduction_op="add")).
  Returns (outputs as out_type, final accumulator values).

  How: each accumulator becomes a jax Ref (jax.new_ref) passed to pl.kernel
  over a plgpu.Mesh; Pallas turns a Ref argument into an input aliased to an
  output (XLA output_operand_aliases), so the kernel starts from the given
  values and nothing is copied back. plgpu.kernel cannot take Refs (its
  custom_vmap wrapper drops their effects), hence pl.kernel here; the
  launch (grid, warpgroups, compiler params) is the same as `launch`'s.
  """
  refs = [jax.new_ref(a) for a in accumulators]
  mesh = plgpu.Mesh(grid=grid, grid_names=grid_names, num_threads=num_consumers + 1,
                    thread_name="wg")
  outs = pl.kernel(
      _kernel_entry(kernel, scratch, barriers), out_type=out_type, mesh=mesh,
      compiler_params=plgpu.CompilerParams(approx_math=True, **PROFILE), name=name,
  )(*args, *refs)
  return outs, tuple(jax.freeze(r) for r in refs)


def rendezvous(barrier):
  """Arrive at `barrier` and wait for its phase: every party (num_arrivals) got here.

  A barrier with num_arrivals = n used by n warpgroups, each exactly once per
  round, completes one phase per round; no party can run a phase ahead, as
  the next phase needs every party's next arrival.
  """
  plgpu.barrier_arrive(barrier)
  plgpu.barrier_wait(barrier)


def doc_mask(q_seg, q_pos, kv_seg, kv_pos, shape, *, kv_major, causal, sliding_window,
             compare="both", padding_rows=True):
  """bool `shape` of allowed pairs of one tile ([64, n] accumulator rows x columns), or None.

  q_seg, q_pos: [64] row vectors and kv_seg, kv_pos: [n] column vectors (or,
  if kv_major, kv on the rows and q on the columns; the ids not compared may
  be None). segment_attention's _tile_mask rule, broadcast explicitly: a [64,
  1] array (expand_dims) has no wgmma layout. compare: "both", or "ids" (only
  the segment ids) or "positions" (only causal and the window) for tiles
  where the plan says the other compare always passes (its q_compares,
  three_runs); None when nothing is compared. padding_rows=False leaves
  queries of segment id 0 unmasked against keys of id 0 (a compare per pair
  less), for a caller that writes those rows as empty at its store (the
  persistent forward: their l set to 0 for store_output).
  """
  q_side, kv_side = ((broadcast_cols, broadcast_rows) if kv_major
                     else (broadcast_rows, broadcast_cols))
  mask = None
  if compare != "positions":
    qs, ks = q_side(q_seg, shape), kv_side(kv_seg, shape)
    mask = qs == ks
    if padding_rows:
      mask &= qs != 0
  if compare != "ids":
    qp, kp = q_side(q_pos, shape), kv_side(kv_pos, shape)
    for allowed in ((kp <= qp) if causal else None,
                    (qp - kp < sliding_window) if sliding_window is not None else None):
      if allowed is not None:
        mask = allowed if mask is None else mask & allowed
  return mask


def plan_rows(ranges, compares):
  """A grid kernel's plan rows: ranges int32 [B, n, 4], or [B, n, 5] with compares
  (int32 [B, n], jpack.masks.compare_splits) last."""
  return ranges if compares is None else jnp.concatenate([ranges, compares[..., None]], -1)


def check_row_words(name, x, ranges):
  """ValueError unless x (a plan's per-row word: q_compares, kv_compares, q_spans) is
  None or int32 with one entry per plan row of ranges [B, n, 4]."""
  if x is not None and (tuple(x.shape) != tuple(ranges.shape[:2]) or x.dtype != jnp.int32):
    raise ValueError(f"{name} must be int32 {tuple(ranges.shape[:2])} (one per plan row), "
                     f"got {x.dtype} {tuple(x.shape)}")


def tile_doc_mask(major_ids, ids_smem, slot, shape, *, kv_major, causal, sliding_window,
                  compare="both", first_column=0, padding_rows=True):
  """doc_mask of one [64, n] tile: the consumer's rows against the slot's columns
  [first_column, first_column + n).

  major_ids: (segment ids, positions) [64] row vectors of the consumer's rows;
  ids_smem: int32 [stages, 2, N >= n], the ring's minor ids, read at `slot`
  (only those `compare` needs). kv_major: the rows are keys (the minor ids are
  q ids). A tile may run on part of its columns (mosaic_persistent: spans).
  padding_rows: as doc_mask's.
  """
  needed = (compare != "positions", compare != "ids")
  def ids(n):
    ref = ids_smem.at[slot, n]
    whole = ref.shape[-1] == shape[1] and first_column == 0  # first_column may be traced
    return col_vector((ref if whole else ref.at[pl.ds(first_column, shape[1])])[...])

  minor_ids = tuple(ids(n) if needed[n] else None for n in range(2))
  q_ids, kv_ids = (minor_ids, major_ids) if kv_major else (major_ids, minor_ids)
  return doc_mask(*q_ids, *kv_ids, shape, kv_major=kv_major, causal=causal,
                  sliding_window=sliding_window, compare=compare, padding_rows=padding_rows)


def zeros_acc(shape):
  """float32 zeros `shape` ([64, n]) in the wgmma accumulator layout."""
  return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def empty_row_stats():
  """(m, l) [64] of a row that has seen nothing: MASKED_LOGIT and 0."""
  return (row_vector(jnp.full((WG_ROWS,), MASKED_LOGIT, jnp.float32)),
          row_vector(jnp.zeros((WG_ROWS,), jnp.float32)))


COMPARES = ("both", "ids", "positions")
"""The doc_mask compares a masked tile may need, by the index three_runs passes."""


def three_runs(lo, full_lo, full_hi, hi, visit, carry, compares=None, *, kv_major=False,
               start=None):
  """visit(j, carry, masked=...) over [lo, hi); the mask only outside [full_lo, full_hi).

  Separate loops keep `masked` static where it can be, so the unmasked run has
  no mask code: masked=False there, True in the masked runs. compares: None,
  or the plan row's q_compares (kv_compares if kv_major; int32 scalar,
  jpack.masks.compare_splits): then the masked runs pass masked = an int32
  index into COMPARES per tile, 1 ("ids") among the row's ids_len tiles (its
  first ones, its last ones if kv_major), 2 ("positions") among its
  positions_len tiles (its last ones, its first ones if kv_major), 0 ("both")
  elsewhere, for mask_tile to switch on (one loop body per run, not three).
  start: visit only [start, hi) (start >= lo), the tiles still told apart as in
  the whole row [lo, hi).
  """
  if start is not None:
    full_lo, full_hi = jnp.maximum(full_lo, start), jnp.maximum(full_hi, start)

  def run(begin, stop, masked, carry):
    return lax.fori_loop(begin, stop, functools.partial(visit, masked=masked), carry)

  first = lo if start is None else start
  if compares is None:
    carry = run(first, full_lo, True, carry)
    carry = run(full_lo, full_hi, False, carry)
    return run(full_hi, hi, True, carry)

  def masked_visit(j, carry):
    return visit(j, carry, masked=tile_compares(j, lo, hi, compares, kv_major=kv_major))

  carry = lax.fori_loop(first, full_lo, masked_visit, carry)
  carry = run(full_lo, full_hi, False, carry)
  return lax.fori_loop(full_hi, hi, masked_visit, carry)


def tile_compares(j, lo, hi, compares, *, kv_major=False):
  """int32 index into COMPARES of masked tile j of a plan row [lo, hi) (three_runs)."""
  ids_len = compares & (2**COMPARE_SPLIT_BITS - 1)
  positions_len = lax.shift_right_logical(compares, COMPARE_SPLIT_BITS)
  if kv_major:  # positions-only tiles first, ids-only last
    ids_only, positions_only = j >= hi - ids_len, j < lo + positions_len
  else:
    ids_only, positions_only = j < lo + ids_len, j >= hi - positions_len
  return jnp.where(ids_only, 1, jnp.where(positions_only, 2, 0)).astype(jnp.int32)


NO_COMPARE = len(COMPARES)
"""mask_tile's index for a tile that the plan says is full: s as it is."""


def mask_tile(s, major_ids, ids_smem, slot, *, kv_major, causal, sliding_window, masked,
              first_column=0, padding_rows=True, ids_coded=False):
  """s [64, n] with the pairs the document mask disallows set to MASKED_LOGIT.

  masked: True (both compares), or an int32 index into COMPARES chosen per
  tile at run time (three_runs), or NO_COMPARE (a full tile), switched on here:
  only the compare code branches, the rest of the step is shared. ids_coded:
  the tile's ids were masked on the tensor cores (mosaic_codes), and "ids"
  (index 1) needs no compare. Other arguments as tile_doc_mask.
  """
  def masking(compare):
    def apply(s):
      mask = tile_doc_mask(major_ids, ids_smem, slot, s.shape, kv_major=kv_major,
                           causal=causal, sliding_window=sliding_window, compare=compare,
                           first_column=first_column, padding_rows=padding_rows)
      return s if mask is None else jnp.where(mask, s, MASKED_LOGIT)
    return apply

  if masked is True:
    return masking("both")(s)
  unmasked = lambda s: s  # noqa: E731
  kinds = [unmasked if ids_coded and c == "ids" else masking(c) for c in COMPARES]
  return lax.switch(masked, [*kinds, unmasked], s)


def mma_accumulate(acc, a, b_smem, dtype):
  """acc + a @ b: one wgmma from registers into a float32 [64, n] accumulator.

  a: [64, k] in registers, cast to dtype inside the wgmma's scope; b_smem:
  [k, n] in shared memory. Returns the new accumulator value.
  """
  def mma(acc_ref):
    plgpu.wgmma(acc_ref, a.astype(dtype), b_smem)

  return pl.run_state(mma)(plgpu.ACC.init(acc))


def scores_and_grads(a_smem, b_smem, c_smem, d_smem, shape):
  """(a @ b^T, c @ d^T) as float32 `shape` accumulators: two wgmmas, one wait.

  a_smem, c_smem: [64, D]; b_smem, d_smem: [n, D]; shape: (64, n). The
  backward's first step: (S, dP) = (Q K^T, dO V^T), or transposed (S^T,
  dP^T) = (K Q^T, V dO^T).
  """
  def both(x_ref, y_ref):
    plgpu.wgmma(x_ref, a_smem, plgpu.transpose_ref(b_smem, (1, 0)))
    plgpu.wgmma(y_ref, c_smem, plgpu.transpose_ref(d_smem, (1, 0)))
    return x_ref[...], y_ref[...]

  return pl.run_scoped(both, plgpu.ACC(shape, jnp.float32),
                       plgpu.ACC(shape, jnp.float32))


def copy_q_tile(gmem, q_smem, ids_smem, index, barrier, *, b, rows, h):
  """TMA of one consumer's Q tile with its q ids and positions: 3 arrivals on `barrier`.

  gmem: (q [B, Tq, H, D], q_seg, q_pos int32 [B, Tq]); rows: a pl.ds of 64
  rows; q_smem: [64, D]; ids_smem: int32 [n, 2, 64], written at `index`.
  Does not wait.
  """
  q_ref, q_seg_ref, q_pos_ref = gmem
  plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem, barrier)
  plgpu.copy_gmem_to_smem(q_seg_ref.at[b, rows], ids_smem.at[index, 0], barrier)
  plgpu.copy_gmem_to_smem(q_pos_ref.at[b, rows], ids_smem.at[index, 1], barrier)


def online_softmax(s, m, l, mask=None, *, logit_scale=1.0):
  """One kv tile of the base-2 online softmax: (p, m_new, l_new, alpha).

  s: float32 [64, n] raw logits (q . k); logit_scale: scale * log2(e),
  applied inside, so that the exponent s * logit_scale - m is one FMA per
  element (the row max is taken on the raw logits and scaled per row). m, l:
  [64] row max (scaled, base 2) and row sum so far; mask: bool [64, n] or None
  (no masking). p is float32 [64, n]; the caller rescales acc by alpha [64].
  A logit at or below MASKED_LOGIT is masked (also mosaic_codes' CODE_BIAS):
  its exponent is at most MASKED_LOGIT * logit_scale - m, whose exp2 is
  exactly 0 for any logit_scale above 1e-20.
  """
  if mask is not None:
    s = jnp.where(mask, s, MASKED_LOGIT)
  raw_max = jnp.max(s, axis=1)
  tile_max = jnp.where(raw_max <= MASKED_LOGIT, MASKED_LOGIT, raw_max * logit_scale)
  m_new = jnp.maximum(m, tile_max)
  # A row that has seen nothing keeps m_new == MASKED_LOGIT; shifting it
  # by 0 instead makes its masked p exactly 0 (see segment_attention).
  shift = jnp.where(m_new == MASKED_LOGIT, 0.0, m_new)
  alpha = jnp.exp2(m - shift)
  p = jnp.exp2(s * logit_scale - broadcast_rows(shift, s.shape))
  l_new = l * alpha + jnp.sum(p, axis=1)
  return p, m_new, l_new, alpha


def store_output(acc, m, l, o_smem, lse_smem, o_gmem, lse_gmem):
  """Forward epilogue: out = acc / l and lse (natural log) of 64 rows, TMA-stored.

  acc: float32 [64, D]; m, l: [64] (base 2). Rows with l == 0 saw nothing:
  out 0 (acc times 0: such a row's acc may hold any finite values) and
  EMPTY_LSE. o_smem: [64, D] (the out dtype), lse_smem: float32
  [64]; o_gmem, lse_gmem: their global destinations. Issues the stores
  without waiting for them.
  """
  seen = l > 0.0
  l = jnp.where(seen, l, 1.0)
  inverse = jnp.where(seen, 1.0 / l, 0.0)
  # + 0.0: a row of padding (finite acc times 0) comes out +0, not -0.
  o_smem[...] = (acc * broadcast_rows(inverse, acc.shape) + 0.0).astype(o_smem.dtype)
  # Base 2, then one product: m * LN2 + log(l), with log(l) = lg2(l) * LN2 under
  # approx_math, may be fused into an FMA either way, and kernels that inline this
  # store in several places then differ in the last bit of lse.
  lse_smem[...] = jnp.where(seen, (m + jnp.log2(l)) * LN2, EMPTY_LSE)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(o_smem, o_gmem)
  plgpu.copy_smem_to_gmem(lse_smem, lse_gmem)
