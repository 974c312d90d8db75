"""The Mosaic GPU forward kernel (pallas_kernels.mosaic_attention), against the reference.

On every machine: the kernel lowers for CUDA for each supported option and
each schedule (mosaic_attention.SCHEDULES), the persistent one also with one,
two or more CTAs than work items; the persistent schedule array runs every
item once, (batch, head)-major windows, heaviest first within a window. Mosaic
GPU builds its MLIR (layouts, wgmma shapes, TMA slices, barriers) at lowering
time, so this catches most API and shape errors without a GPU; unsupported
inputs are rejected with a message. The Mosaic GPU interpreter cannot run this
kernel (JAX 0.10.2's has no plgpu.load, no wgmma with a register or transposed
operand, no run_state), so its numbers are only checked on a GPU.

On a GPU (marker `gpu`): out and lse against the float32 reference on the same
rounded inputs (rel <= 2e-2 for bfloat16/float16), exact zeros and EMPTY_LSE
for queries that see nothing, nothing NaN; fixed layouts at realistic sizes
and hypothesis layouts at one small shape, for every forward schedule.

Through the public API, flash_attention(implementation="mosaic") (the Mosaic
forward and backward kernels; what "auto" runs on a Hopper GPU): on every
machine, its input checks, what "auto" picks, and its lowering for CUDA under
jit, forward and jax.grad. On a GPU, the public path runs tests/test_gpu.py's
cases (parametrised over "pallas" and "mosaic").
"""

from __future__ import annotations

import dataclasses
import functools
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from helpers import (ALL_KINDS, Layout, allowed_np, assert_close, assert_finite,
                     chunk_layouts, random_inputs, self_layouts)
from test_gpu import GpuCase
from jpack import attention, mask_rules, masks
from jpack.attention import (EMPTY_LSE, KernelConfig, flash_attention, flash_attention_bwd,
                             make_attention_plan, reference_attention)
from pallas_kernels import (item_order, mosaic_attention, mosaic_backward, mosaic_common,
                            mosaic_persistent)
from pallas_kernels.config import COMPARE_SPLIT_BITS, GROUP_SPAN_BITS, SPAN_HALF_BITS, TileConfig

TOL = 2e-2  # bfloat16 / float16 against the float32 reference


SCHEDULES = mosaic_attention.SCHEDULES
schedules = pytest.mark.parametrize("schedule", SCHEDULES)


@functools.partial(jax.jit, static_argnames=("causal", "window", "scale", "tile",
                                             "schedule", "num_ctas", "dealing", "q_pairs"))
def mosaic_forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, *, causal, window, scale,
                   tile, schedule=None, num_ctas=None, dealing=None, q_pairs=None):
  """(out, lse) of the Mosaic kernel, with its tile plan (ranges, q_compares, q_spans);
  lengths multiples of the tile. dealing: make the persistent kernel's work items
  beforehand, dealt so (mosaic_persistent.DEALINGS); None: the kernel makes them.
  q_pairs: the persistent kernel's Q buffer pairs (None: as many as fit)."""
  plan = masks.make_tile_plan(q_seg, kv_seg, q_pos, kv_pos, block_q=tile.block_major,
                              block_k=tile.block_minor, causal=causal,
                              sliding_window=window)
  words = dict(q_compares=plan.q_compares, q_spans=plan.q_spans)
  if dealing is not None:
    words = dict(items=mosaic_persistent.work_items(
        plan.q_ranges, q.shape[2], plan.q_compares, num_ctas=num_ctas, spans=plan.q_spans,
        dealing=dealing, coded_ids=(q_seg, kv_seg, tile.block_minor)))
  return mosaic_attention.forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, plan.q_ranges,
                                  tile=tile, scale=scale, causal=causal,
                                  sliding_window=window, schedule=schedule,
                                  num_ctas=num_ctas, q_pairs=q_pairs, **words)


# ----------------------------------------------------------------------------
# CPU: lowering for CUDA, and input checks


@dataclasses.dataclass(frozen=True)
class LowerCase:
  name: str
  dtype: str = "bfloat16"
  head_dim: int = 128
  heads: int = 4
  kv_heads: int = 4
  causal: bool = True
  window: int | None = None
  q_len: int = 512  # kv_len is 512
  tile: TileConfig = mosaic_attention.DEFAULT_TILE


LOWER_CASES = [
    LowerCase("default"),
    LowerCase("d64", head_dim=64),
    LowerCase("float16", dtype="float16"),
    LowerCase("bidirectional", causal=False),
    LowerCase("window", window=100),
    LowerCase("window-bidirectional", window=100, causal=False),
    LowerCase("gqa-4:1", kv_heads=1),
    LowerCase("one-consumer-64x64", tile=TileConfig(64, 64, num_stages=2)),
    LowerCase("128x64-3-stages", tile=TileConfig(128, 64, num_stages=3)),
    LowerCase("one-stage", tile=TileConfig(128, 64, num_stages=1)),
    LowerCase("d64-64x128", head_dim=64, tile=TileConfig(64, 128, num_stages=2)),
    LowerCase("chunk-q256-kv512", q_len=256),
    LowerCase("one-consumer-gqa-window-float16", dtype="float16", kv_heads=2, window=100,
              tile=TileConfig(64, 64, num_stages=1)),
    LowerCase("d256", head_dim=256, tile=mosaic_common.WIDE_HEAD_TILE),
    LowerCase("d256-gqa-window-float16", dtype="float16", head_dim=256, kv_heads=2,
              window=100, tile=mosaic_common.WIDE_HEAD_TILE),
    LowerCase("d256-128x64", head_dim=256, tile=mosaic_common.WIDE_HEAD_FORWARD_TILE),
    LowerCase("d256-128x64-gqa-window-float16", dtype="float16", head_dim=256, kv_heads=2,
              window=100, tile=mosaic_common.WIDE_HEAD_FORWARD_TILE),
]


def _one_stage_pingpong(schedule, tile):
  """Whether forward refuses this: persistent-pingpong's two consumers need 2 stages."""
  return (schedule == "persistent-pingpong" and tile.block_major == 128
          and tile.num_stages < 2)


def _assert_lowers(lower, schedule, tile):
  """lower() gives Mosaic GPU MLIR, or a ValueError naming num_stages if refused."""
  if _one_stage_pingpong(schedule, tile):
    with pytest.raises(ValueError, match="num_stages"):
      lower()
  else:
    assert "mosaic_gpu" in lower().as_text()


# Every case on the schedules that run by default (the persistent one, and the
# grid one for long rows); the others on cases that change their structure
# (tiles, stages, consumers, head dims), since masks and dtypes are shared code.
# Each lowering takes about a second on CPU, and CI has 20 minutes.
STRUCTURE_CASES = ("default", "128x64-3-stages", "d64-64x128",
                   "one-consumer-gqa-window-float16", "d256", "d256-128x64")
LOWERINGS = [(case, schedule) for schedule in SCHEDULES for case in LOWER_CASES
             if schedule in (mosaic_attention.DEFAULT_SCHEDULE, mosaic_attention.GRID_SCHEDULE,
                             mosaic_attention.WIDE_HEAD_SCHEDULE)
             or case.name in STRUCTURE_CASES]


@pytest.mark.parametrize("case, schedule", LOWERINGS,
                         ids=[f"{c.name}-{s}" for c, s in LOWERINGS])
def test_lowers_for_cuda(case, schedule):
  b, t = 2, 512
  q = jax.ShapeDtypeStruct((b, case.q_len, case.heads, case.head_dim),
                           jnp.dtype(case.dtype))
  kv = jax.ShapeDtypeStruct((b, t, case.kv_heads, case.head_dim), jnp.dtype(case.dtype))
  q_ids = jax.ShapeDtypeStruct((b, case.q_len), jnp.int32)
  ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
  _assert_lowers(lambda: mosaic_forward.trace(
      q, kv, kv, q_ids, ids, q_ids, ids, causal=case.causal, window=case.window,
      scale=0.1, tile=case.tile, schedule=schedule).lower(lowering_platforms=("cuda",)),
      schedule, case.tile)


# The persistent kernel with a CTA count other than the default: more CTAs than
# work items (the extra ones idle), and one or two CTAs walking many items each
# (2 x 512/128 x 4 = 32 items at 128-row tiles, 64 at 64-row tiles).
PERSISTENT = [s for s in SCHEDULES if s.startswith("persistent")]


# One consumer (64-row tiles) has no pingpong: both schedules are the same kernel.
# The head-dim-256 case has one Q buffer pair (mosaic_persistent.q_buffer_pairs).
CTA_CASES = [(case, schedule) for case in (
    LowerCase("default"), LowerCase("one-consumer-64x64", tile=TileConfig(64, 64, num_stages=2)),
    LowerCase("one-stage-gqa", kv_heads=1, tile=TileConfig(128, 64, num_stages=1)),
    LowerCase("d256-128x64", head_dim=256, tile=mosaic_common.WIDE_HEAD_FORWARD_TILE))
    for schedule in PERSISTENT
    if case.tile.block_major > 64 or schedule == "persistent"]


@pytest.mark.parametrize("num_ctas, dealing", [(1, None), (5, None), (100, None),
                                               (1, "dynamic"), (100, "dynamic")])
@pytest.mark.parametrize("case, schedule", CTA_CASES,
                         ids=[f"{c.name}-{s}" for c, s in CTA_CASES])
def test_persistent_lowers_for_cuda_with_any_number_of_ctas(case, num_ctas, dealing,
                                                            schedule):
  b, t = 2, 512
  q = jax.ShapeDtypeStruct((b, case.q_len, case.heads, case.head_dim),
                           jnp.dtype(case.dtype))
  kv = jax.ShapeDtypeStruct((b, t, case.kv_heads, case.head_dim), jnp.dtype(case.dtype))
  ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
  lower = lambda: mosaic_forward.trace(  # noqa: E731
      q, kv, kv, ids, ids, ids, ids, causal=case.causal, window=case.window, scale=0.1,
      tile=case.tile, schedule=schedule, num_ctas=num_ctas, dealing=dealing).lower(
          lowering_platforms=("cuda",))
  if _one_stage_pingpong(schedule, case.tile) or dealing is None:
    _assert_lowers(lower, schedule, case.tile)
    return
  # The claims: an atomic fetch-and-add in the kernel, a counter aliased to an output.
  text = lower().as_text()
  assert "mosaic_gpu" in text and "atom.add.u32" in text and "output_operand_aliases" in text


def _random_ranges(seed, batch, n_q, n_k):
  """int32 [batch, n_q, 4] plan rows with random (lo, full_lo, full_hi, hi), some empty."""
  rng = np.random.default_rng(seed)
  bounds = np.sort(rng.integers(0, n_k + 1, size=(batch, n_q, 4)), axis=-1)
  bounds[rng.random((batch, n_q)) < 0.2] = 0  # empty rows
  return jnp.asarray(bounds, jnp.int32)


def _work_of_items(ranges, heads, items):
  """Work (hi - lo) of encoded items (b * n_q + qt) * heads + h."""
  r = np.asarray(ranges)
  return (r[..., 3] - r[..., 0]).reshape(-1)[np.asarray(items) // heads]


# Plan rows (lo, full_lo, full_hi, hi) and compares (ids_len + positions_len << bits).
THREE_RUNS_ROWS = [(0, 0, 6, 6, None), (2, 3, 7, 9, None), (1, 1, 1, 5, 0), (0, 2, 5, 8, None),
                   (3, 5, 8, 11, 2 + (3 << COMPARE_SPLIT_BITS)), (4, 4, 4, 4, None),
                   (0, 8, 8, 8, 1 + (2 << COMPARE_SPLIT_BITS))]


@pytest.mark.parametrize("kv_major", [False, True])
@pytest.mark.parametrize("row", THREE_RUNS_ROWS)
def test_three_runs_from_a_later_start_visits_the_rest_as_the_whole_row(row, kv_major):
  """The persistent forward peels an item's first tile off (three_runs(start=lo + 1)):
  the tiles after it must be visited once each, in order, each told masked or full
  (and its compare) as in the whole row."""
  lo, full_lo, full_hi, hi, compares = row
  compares = None if compares is None else jnp.int32(compares)

  def kinds(start):
    def visit(j, carry, *, masked):
      order, kind = carry
      code = 5 if masked is False else 4 if masked is True else masked
      return order.at[j].set(jnp.max(order) + 1), kind.at[j].set(code)
    empty = jnp.full((16,), -1, jnp.int32)
    return mosaic_common.three_runs(jnp.int32(lo), jnp.int32(full_lo), jnp.int32(full_hi),
                                    jnp.int32(hi), visit, (empty, empty), compares,
                                    kv_major=kv_major, start=start)

  whole_order, whole = (np.asarray(x) for x in kinds(None))
  np.testing.assert_array_equal(whole_order[lo:hi], np.arange(hi - lo))  # each once, in order
  for start in range(lo, hi + 1):
    order, kind = (np.asarray(x) for x in kinds(jnp.int32(start)))
    np.testing.assert_array_equal(order[start:hi], np.arange(hi - start))
    np.testing.assert_array_equal(kind[start:hi], whole[start:hi])
    assert (kind[:start] == -1).all() and (kind[hi:] == -1).all()


@pytest.mark.parametrize("compare", ["both", "ids"])
@pytest.mark.parametrize("kv_major", [False, True])
def test_doc_mask_without_padding_rows_differs_only_on_padding_pairs(compare, kv_major):
  """padding_rows=False (the persistent forward, which writes rows of id 0 as empty
  at its store) lets exactly the pairs of a padding query and a padding key through;
  every other pair is masked as the rule says."""
  rng = np.random.default_rng(5)
  q_seg, kv_seg = (jnp.asarray(rng.integers(0, 3, n), jnp.int32) for n in (64, 32))
  q_pos, kv_pos = (jnp.asarray(rng.integers(0, 50, n), jnp.int32) for n in (64, 32))
  shape = (32, 64) if kv_major else (64, 32)
  masks_by = {padding_rows: np.asarray(mosaic_common.doc_mask(
      q_seg, q_pos, kv_seg, kv_pos, shape, kv_major=kv_major, causal=True,
      sliding_window=None, compare=compare, padding_rows=padding_rows))
      for padding_rows in (True, False)}
  want = allowed_np(Layout(*(np.asarray(x)[None] for x in (q_seg, kv_seg, q_pos, kv_pos))),
                    causal=compare == "both")[0]
  if kv_major:
    want = want.T
  np.testing.assert_array_equal(masks_by[True], want)
  padding_pair = ((np.asarray(q_seg)[None, :] == 0) & (np.asarray(kv_seg)[:, None] == 0)
                  if kv_major else
                  (np.asarray(q_seg)[:, None] == 0) & (np.asarray(kv_seg)[None, :] == 0))
  differ = masks_by[True] != masks_by[False]
  assert differ.any() and not (differ & ~padding_pair).any()


@pytest.mark.parametrize("num_ctas", [1, 3, 7, 64, 132, 1000])
@pytest.mark.parametrize("seed", [0, 1])
def test_persistent_schedule_global_sort_runs_every_item_once_heaviest_first(seed, num_ctas):
  batch, n_q, n_k, heads = 3, 16, 16, 5
  ranges = _random_ranges(seed, batch, n_q, n_k)
  schedule = np.asarray(mosaic_persistent.persistent_schedule(ranges, heads, num_ctas,
                                                              window_rounds=None))
  n_items = batch * n_q * heads
  assert schedule.dtype == np.int32
  np.testing.assert_array_equal(np.sort(schedule), np.arange(n_items))  # each item once
  work = _work_of_items(ranges, heads, schedule)
  # Round r (positions [r * num_ctas, (r + 1) * num_ctas)) is no lighter than round r + 1.
  rounds = [work[i:i + num_ctas] for i in range(0, n_items, num_ctas)]
  for heavier, lighter in zip(rounds, rounds[1:]):
    assert heavier.min() >= lighter.max()
  # Every CTA walks its items (positions c, c + num_ctas, ...) heaviest first.
  for c in range(min(num_ctas, n_items)):
    assert np.all(np.diff(work[c::num_ctas]) <= 0)


@pytest.mark.parametrize("n, window_items, tail_windows", [
    (1, 1, 0), (100, 15, 0), (100, 15, 3), (100, 15, 7), (100, 15, 9), (4096, 192, 0),
    (4096, 192, 6), (9000, 9000, 0), (9000, 900, 9), (300, 1000, 0), (300, 1000, 1)])
def test_ranks_order_by_emptiness_window_and_descending_work(n, window_items, tail_windows):
  # Both paths: pairs counted inside windows, and a sort (9000^2 pairs > RANK_MAX_PAIRS);
  # the last tail_windows windows (all of them, or more) form one.
  rng = np.random.default_rng(n + tail_windows)
  work = rng.integers(-2, 70000 if n == 100 else 12, n).astype(np.int32)  # ties, clipping
  rank, busy = mosaic_persistent._ranks(jnp.asarray(work), window_items, tail_windows)
  windows = -(-n // window_items)
  window = np.minimum(np.arange(n) // window_items, max(windows - tail_windows, 0))
  order = np.lexsort((-np.clip(work, 0, 2**16 - 1), window, work <= 0))
  np.testing.assert_array_equal(np.asarray(rank)[order], np.arange(n))
  assert int(busy) == np.sum(work > 0)


TABLE_CASES = [(*shape, dealing, mosaic_persistent.CLAIMED_TAIL) for shape in [
    (1, 1, 1, 1), (2, 8, 3, 5), (3, 16, 5, 7), (4, 64, 16, 132), (3, 5, 2, 1000),
    (2, 150, 2, 132), (1, 300, 1, 40),  # rows of a batch in one block, in two
    (40, 3, 2, 132)]  # batches in a loop
    for dealing in ("dynamic", "snake")] + [
    (2, 128, 4, 132, "dynamic", mosaic_persistent.WIDE_CLAIMED_TAIL),  # head_dim 256's tail
    (3, 16, 5, 7, "dynamic", 0.0)]


@pytest.mark.parametrize("batch, n_rows, heads, num_ctas, dealing, tail", TABLE_CASES)
def test_the_triton_item_table_is_the_xla_one(batch, n_rows, heads, num_ctas, dealing, tail):
  """item_order.ranked_table (what work_items runs on a GPU; here interpreted) gives
  bit for bit the table and busy count of the XLA ranks and scatter: work ties,
  work above the clip, empty rows and reversed ranges."""
  rng = np.random.default_rng(batch * 1000 + n_rows * 10 + heads)
  lo = rng.integers(0, 20, (batch, n_rows))
  width = rng.integers(-1, 10, (batch, n_rows)) * (rng.random((batch, n_rows)) > 0.3)
  width[rng.random((batch, n_rows)) < 0.1] = 70000
  ranges = jnp.asarray(np.stack([lo, lo, lo + width // 2, lo + width], -1), jnp.int32)
  compares = jnp.asarray(rng.integers(0, 1000, (batch, n_rows)), jnp.int32)
  spans = jnp.asarray(rng.integers(-2**31, 2**31 - 1, (batch, n_rows)), jnp.int32)
  want = mosaic_persistent.work_items(ranges, heads, compares, num_ctas, spans,
                                      dealing=dealing, tail=tail)
  n = batch * n_rows * heads
  window_items, tail_windows = mosaic_persistent._windows(
      n, n_rows, num_ctas, mosaic_persistent.WINDOW_ROUNDS, dealing, tail)
  table, busy = item_order.ranked_table(
      ranges, compares, spans, heads=heads, window_items=window_items,
      head=mosaic_persistent._head_items(n, window_items, tail_windows),
      num_ctas=None if dealing == "dynamic" else num_ctas, interpret=True)
  np.testing.assert_array_equal(table, want.table)
  assert int(busy[0]) == heads * int(np.sum(width > 0))
  if dealing == "dynamic":
    np.testing.assert_array_equal(busy, want.busy)


def test_the_claimed_tail_is_shorter_at_head_dim_256():
  # The benchmark's layout: 4 x 16 (batch, head) pairs of 64 q tiles (128 rows), 132
  # CTAs, windows of three pairs; the tail claims the last 20% of the 22 windows at
  # D = 256, 30% at D <= 128.
  assert mosaic_persistent.claimed_tail(64) == mosaic_persistent.claimed_tail(128) == 0.3
  assert mosaic_persistent.claimed_tail(256) == mosaic_persistent.WIDE_CLAIMED_TAIL == 0.2
  windows = lambda d: mosaic_persistent._windows(  # noqa: E731
      4096, 64, 132, 1, "dynamic", mosaic_persistent.claimed_tail(d))
  assert windows(256) == (192, 4) and windows(128) == (192, 7)
  assert mosaic_persistent._windows(4096, 64, 132, 1, "snake", 0.2) == (192, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("dealing, heads, num_ctas", [("dynamic", 16, None), ("snake", 16, None),
                                                      ("snake", 4, 7), ("dynamic", 1, 132)])
def test_work_items_on_a_gpu_are_the_xla_table(dealing, heads, num_ctas, monkeypatch):
  """On a GPU work_items tables its items with the Triton kernel (compiled, not
  interpreted): bit for bit the XLA path's table, on the benchmark's layout."""
  from experiments.layouts import packed_segment_ids
  from jpack import masks
  seg = jnp.asarray(packed_segment_ids(4, 8192, seed=3, mean_len=1024.0))
  pos = jnp.broadcast_to(jnp.arange(8192, dtype=jnp.int32), seg.shape)
  plan = masks.make_tile_plan(seg, seg, pos, pos, block_q=128, block_k=128, causal=True,
                              sliding_window=None)
  make = functools.partial(mosaic_persistent.work_items, plan.q_ranges, heads,
                           plan.q_compares, num_ctas, plan.q_spans, dealing=dealing)
  assert mosaic_persistent._triton_table(plan.q_ranges, heads)
  got = jax.jit(make)()
  monkeypatch.setattr(mosaic_persistent, "_triton_table", lambda *_: False)
  want = jax.jit(make)()
  np.testing.assert_array_equal(got.table, want.table)
  if dealing == "dynamic":
    np.testing.assert_array_equal(got.busy, want.busy)


@pytest.mark.gpu
def test_layers_planning_in_the_call_share_one_item_table():
  """Two layers that pass the same segment ids plan once per jitted step: XLA merges
  the plans' identical kernels, the Triton item table included."""
  q = jax.random.normal(jax.random.key(7), (1, 1024, 2, 128), jnp.bfloat16)
  seg = jnp.repeat(jnp.arange(1, 5, dtype=jnp.int32), 256)[None]

  def layers(q, n):
    for _ in range(n):
      q = flash_attention(q, q, q, segment_ids=seg, implementation="mosaic")
    return q

  def tables(n):
    text = jax.jit(functools.partial(layers, n=n)).lower(q).compile().as_text()
    return text.count("ranked_item_table")

  assert tables(1) > 0
  assert tables(2) == tables(1)


def test_work_items_take_the_triton_table_on_gpus_up_to_its_pair_limit(monkeypatch):
  """The Triton table where it runs (a GPU) and within MAX_ITEM_ROW_PAIRS; the XLA
  path elsewhere (it sorts when the windows' pairs are too many)."""
  small, large = jnp.zeros((4, 64, 4), jnp.int32), jnp.zeros((4, 1024, 4), jnp.int32)
  assert not mosaic_persistent._triton_table(small, 16)  # the CPU
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert mosaic_persistent._triton_table(small, 16)
  assert (4 * 1024)**2 * 16 > item_order.MAX_ITEM_ROW_PAIRS
  assert not mosaic_persistent._triton_table(large, 16)
  with pytest.raises(ValueError, match="dealing must be one of"):
    mosaic_persistent.work_items(small, 16, dealing="lpt")
  with pytest.raises(ValueError, match="MAX_ITEM_ROW_PAIRS"):
    item_order.ranked_table(large, *[jnp.zeros((4, 1024), jnp.int32)] * 2, heads=16,
                            window_items=2048, head=4 * 1024 * 16, num_ctas=None,
                            interpret=True)


def test_the_triton_item_table_rejects_windows_of_partial_pairs():
  ranges = jnp.zeros((1, 4, 4), jnp.int32)
  zeros = jnp.zeros((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="whole \\(batch, head\\) pairs"):
    item_order.ranked_table(ranges, zeros, zeros, heads=2, window_items=6, head=8,
                            num_ctas=None, interpret=True)


def _rounds(items, num_ctas):
  """Sets of the items of each round of num_ctas positions."""
  return [set(np.asarray(items)[i:i + num_ctas].tolist()) for i in range(0, len(items), num_ctas)]


@pytest.mark.parametrize("num_ctas, window_rounds", [(1, 1), (3, 2), (7, 2), (20, 1),
                                                    (64, 2), (1000, 2)])
@pytest.mark.parametrize("seed, dealing", [(0, "snake"), (1, "snake"), (0, "load")])
def test_persistent_schedule_windows_keep_heads_together(seed, dealing, num_ctas,
                                                         window_rounds):
  batch, n_q, n_k, heads = 3, 16, 16, 5
  ranges = _random_ranges(seed, batch, n_q, n_k)
  schedule = np.asarray(mosaic_persistent.persistent_schedule(
      ranges, heads, num_ctas, window_rounds=window_rounds, dealing=dealing))
  n_items = batch * n_q * heads
  np.testing.assert_array_equal(np.sort(schedule), np.arange(n_items))  # each item once
  # The rounds hold the items of the order: busy items window after window
  # ((batch, head) pairs), heaviest first within a window (ties by item), then
  # the empty ones; only the CTA an item goes to within its round is dealt by load.
  items = np.arange(n_items)
  b, h, qt = np.unravel_index(items, (batch, heads, n_q))  # (batch, head)-major, rows fastest
  encoded = (b * n_q + qt) * heads + h
  work = _work_of_items(ranges, heads, encoded)
  pairs = max(1, -(-window_rounds * num_ctas // n_q))  # (batch, head) pairs per window
  window = (b * heads + h) // pairs
  want = encoded[np.lexsort((-work, window, work <= 0))]
  assert _rounds(schedule, num_ctas) == _rounds(want, num_ctas)


def _deal_reference(rank, cost, num_ctas):
  """numpy list scheduling in rounds (mosaic_persistent._deal_by_load's contract)."""
  n = len(rank)
  by_rank = np.argsort(rank)
  load = np.zeros(num_ctas, np.int64)
  positions = np.empty(n, np.int64)
  for start in range(0, n, num_ctas):
    chunk = by_rank[start:start + num_ctas]  # items of this round, by rank
    items = chunk[np.lexsort((np.arange(len(chunk)), -cost[chunk]))]  # costliest first
    avail = np.arange(len(chunk))  # the CTAs whose position exists
    ctas = avail[np.lexsort((avail, load[avail]))]  # least loaded first
    load[ctas] += cost[items]
    positions[items] = start + ctas
  return positions


@pytest.mark.parametrize("n, num_ctas", [(1, 1), (10, 3), (131, 7), (500, 64), (40, 132)])
@pytest.mark.parametrize("seed", [0, 1])
def test_deal_by_load_gives_each_rounds_costliest_item_to_the_least_loaded_cta(
    seed, n, num_ctas):
  rng = np.random.default_rng(seed)
  rank = rng.permutation(n)
  cost = rng.integers(0, 6, n) * rng.integers(1, 30, n)  # zeros and ties
  got = np.asarray(mosaic_persistent._deal_by_load(jnp.asarray(rank, jnp.int32),
                                                    jnp.asarray(cost, jnp.int32), num_ctas))
  np.testing.assert_array_equal(got, _deal_reference(rank, cost, num_ctas))
  np.testing.assert_array_equal(got // num_ctas, rank // num_ctas)  # rounds by rank


@pytest.mark.parametrize("n, num_ctas", [(1, 1), (10, 1), (40, 132), (131, 7), (500, 64),
                                         (4096, 132)])
@pytest.mark.parametrize("seed", [0, 1])
def test_rebalance_swaps_busy_items_within_their_rounds_and_evens_the_loads(
    seed, n, num_ctas):
  rng = np.random.default_rng(seed)
  rank = rng.permutation(n)
  cost = rng.integers(0, 4, n) * rng.integers(1, 200, n)  # a quarter empty, ties
  dealt = mosaic_persistent._deal_by_load(jnp.asarray(rank, jnp.int32),
                                          jnp.asarray(cost, jnp.int32), num_ctas)
  got = np.asarray(mosaic_persistent._rebalance(dealt, jnp.asarray(cost, jnp.int32),
                                                num_ctas, sweeps=6))
  dealt = np.asarray(dealt)
  np.testing.assert_array_equal(np.sort(got), np.arange(n))  # each position once
  np.testing.assert_array_equal(got // num_ctas, dealt // num_ctas)  # the same rounds
  np.testing.assert_array_equal(got[cost == 0], dealt[cost == 0])  # empty items stay
  def max_load(positions):
    return np.bincount(positions % num_ctas, weights=cost, minlength=num_ctas).max()
  assert max_load(got) <= max_load(dealt)
  if n == 4096:  # 31 rounds of 132: room to even the loads out
    load = np.bincount(got % num_ctas, weights=cost, minlength=num_ctas)
    assert load.max() / load.mean() < 1.02 < max_load(dealt) / load.mean()


def test_item_costs_count_the_tiles_and_the_half_tiles_the_consumers_skip():
  """Model: ITEM_COST + FULL_TILE_COST per full tile + MASKED_TILE_COST per masked one
  - SKIPPED_HALF_COST per half tile a consumer skips (both groups of q_spans); an
  empty row costs nothing, and no spans means no skips."""
  mp = mosaic_persistent
  # Row 0: tiles [0, 4), full [1, 3): 2 full, 2 masked. Row 1: empty.
  ranges = jnp.asarray([[[0, 1, 3, 4], [2, 2, 2, 2]]], jnp.int32)  # [B=1, n=2, 4]
  field = lambda front, back: front + (back << SPAN_HALF_BITS)  # noqa: E731
  spans = jnp.asarray([[field(1, 2) + (field(0, 1) << GROUP_SPAN_BITS), 0]], jnp.int32)
  busy = mp.ITEM_COST + 2 * mp.FULL_TILE_COST + 2 * mp.MASKED_TILE_COST
  np.testing.assert_array_equal(mp._item_costs(ranges, 3, spans),
                                [busy - 4 * mp.SKIPPED_HALF_COST, 0] * 3)
  np.testing.assert_array_equal(mp._item_costs(ranges, 1), [busy, 0])
  # A group's fields of 255 (q_spans' cap) in both groups, the top bit set.
  full_fields = jnp.asarray([[-1, 0]], jnp.int32)
  np.testing.assert_array_equal(mp._skipped_halves(full_fields), [[4 * 255, 0]])


def test_deal_by_load_balances_the_main_layout_better_than_snake_dealing(monkeypatch):
  """A layout of the benchmark's kind (B=4, T=8192, 16 heads, 132 CTAs, seed 1): dealt by
  load, the modelled CTA loads are within 1% of their mean (8% without the rebalancing
  swaps), closer than in snake order (11% here, up to 20% on other seeds; perf_notes
  entries 26 and 30)."""
  from experiments.layouts import packed_segment_ids
  from jpack import masks
  seg = jnp.asarray(packed_segment_ids(4, 8192, seed=1, mean_len=1024.0))
  pos = jnp.broadcast_to(jnp.arange(8192, dtype=jnp.int32), seg.shape)
  plan = masks.make_tile_plan(seg, seg, pos, pos, block_q=128, block_k=128, causal=True,
                              sliding_window=None)
  heads, ctas = 16, 132
  cost = np.asarray(mosaic_persistent._item_costs(plan.q_ranges, heads, plan.q_spans))
  def spread(positions):
    load = np.bincount(np.asarray(positions) % ctas, weights=cost, minlength=ctas)
    return load.max() / load.mean()
  deal = functools.partial(mosaic_persistent.reading_positions, plan.q_ranges, heads, ctas,
                           spans=plan.q_spans)
  dealt, snake = spread(deal(dealing="load")), spread(deal(dealing="snake"))
  assert dealt < 1.01 and dealt < snake - 0.02
  monkeypatch.setattr(mosaic_persistent, "REBALANCE_SWEEPS", 0)
  assert spread(deal(dealing="load")) > 1.05
  with pytest.raises(ValueError, match="dealing must be one of"):
    mosaic_persistent.reading_positions(plan.q_ranges, heads, ctas, dealing="lpt")


@pytest.mark.parametrize("seed, num_ctas", [(0, 1), (1, 7), (2, 132)])
def test_dynamic_dealing_keeps_the_rank_order_and_counts_the_busy_items(seed, num_ctas):
  """Items to be claimed at run time sit in rank order (busy ones first, the order
  the CTAs claim them in; the tail's windows merged) and come with the number of busy
  ones."""
  batch, n_q, n_k, heads = 3, 16, 16, 5
  ranges = _random_ranges(seed, batch, n_q, n_k)
  work = np.asarray(jnp.broadcast_to((ranges[..., 3] - ranges[..., 0])[:, None, :],
                                     (batch, heads, n_q))).reshape(-1)
  # Windows of whole (batch, head) pairs, the last CLAIMED_TAIL of them merged.
  window = min(-(-num_ctas // n_q) * n_q, len(work))
  windows = -(-len(work) // window)
  tail = round(mosaic_persistent.CLAIMED_TAIL * windows)
  window_of = np.minimum(np.arange(len(work)) // window, windows - tail)
  order = np.lexsort((np.arange(len(work)), -work, window_of, work <= 0))
  want = np.empty(len(work), np.int64)
  want[order] = np.arange(len(work))
  np.testing.assert_array_equal(
      mosaic_persistent.reading_positions(ranges, heads, num_ctas, dealing="dynamic"), want)
  items = mosaic_persistent.work_items(ranges, heads, num_ctas=num_ctas, dealing="dynamic")
  busy = int((work > 0).sum())
  assert items.dynamic and items.busy.shape == (1,) and int(items.busy[0]) == busy
  table = np.asarray(items.table)
  assert np.all(table[:busy, 6] > table[:busy, 3]) and np.all(table[busy:, 6] <= table[busy:, 3])
  dealt = mosaic_persistent.work_items(ranges, heads, num_ctas=num_ctas, dealing="snake")
  assert not dealt.dynamic and dealt.busy is None
  # The same items (rows), only in another order.
  np.testing.assert_array_equal(np.unique(table, axis=0), np.unique(dealt.table, axis=0))


@pytest.mark.parametrize("num_ctas", [1, 3, 7, 64, 1000])
@pytest.mark.parametrize("window_rounds", [1, None])
@pytest.mark.parametrize("dealing", ["snake", "load"])
def test_persistent_schedule_gives_every_cta_its_empty_items_last(num_ctas, window_rounds,
                                                                   dealing):
  batch, n_q, n_k, heads = 3, 16, 16, 5
  ranges = _random_ranges(2, batch, n_q, n_k)
  schedule = np.asarray(mosaic_persistent.persistent_schedule(
      ranges, heads, num_ctas, window_rounds=window_rounds, dealing=dealing))
  work = _work_of_items(ranges, heads, schedule)
  assert (work == 0).any()
  for c in range(min(num_ctas, len(schedule))):
    empty = work[c::num_ctas] == 0
    assert not np.any(empty[:-1] & ~empty[1:])  # never an empty item before a busy one


def test_persistent_schedule_orders_items_head_major():
  # One batch row, 3 q tiles of work 2, 5, 0, two heads: items (qt * 2 + h).
  ranges = jnp.asarray([[[0, 0, 0, 2], [0, 0, 0, 5], [0, 0, 0, 0]]], jnp.int32)
  one_pair = mosaic_persistent.persistent_schedule(ranges, heads=2, num_ctas=1,
                                                   window_rounds=1)
  # Windows of one (batch, head) pair: head 0's busy q tiles by work, then head
  # 1's, then the empty ones (q tile 2 of both heads).
  np.testing.assert_array_equal(one_pair, [2, 0, 3, 1, 4, 5])
  snake = mosaic_persistent.persistent_schedule(ranges, heads=2, num_ctas=4,
                                                window_rounds=None)
  # Global sort (2, 3, 0, 1, 4, 5) by work, round 0 in order, round 1 (4, 5) reversed.
  np.testing.assert_array_equal(snake, [2, 3, 0, 1, 5, 4])
  dealt = mosaic_persistent.persistent_schedule(ranges, heads=2, num_ctas=4,
                                                window_rounds=None, dealing="load")
  # By load: round 0 to CTAs 0-3 (all unloaded: costliest first, in CTA order),
  # round 1's empty items 4, 5 to CTAs 0, 1 (equal loads: lower CTA first).
  np.testing.assert_array_equal(dealt, [2, 3, 0, 1, 4, 5])


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("with_plan_words", [False, True])
def test_item_table_holds_each_items_coordinates_plan_row_compares_and_spans(
    seed, with_plan_words):
  batch, n_q, n_k, heads = 2, 8, 8, 3
  ranges = _random_ranges(seed, batch, n_q, n_k)
  rng = np.random.default_rng(seed)
  compares, spans = (jnp.asarray(rng.integers(-2**31, 2**31, (batch, n_q)), jnp.int32)
                     for _ in range(2))
  schedule = np.asarray(mosaic_persistent.persistent_schedule(ranges, heads, 4))
  positions = mosaic_persistent.reading_positions(ranges, heads, 4)
  table = np.asarray(mosaic_persistent.item_table(
      ranges, positions, heads, *((compares, spans) if with_plan_words else ())))
  assert table.shape == (batch * n_q * heads, 9) and table.dtype == np.int32
  for row, item in zip(table, schedule):
    b, qt, h = item // heads // n_q, item // heads % n_q, item % heads
    words = [int(compares[b, qt]), int(spans[b, qt])] if with_plan_words else [0, 0]
    np.testing.assert_array_equal(row, [b, qt, h, *np.asarray(ranges)[b, qt], *words])


def _small_forward(**options):
  """mosaic_attention.forward on one 128-token row (default tile, causal), with `options`."""
  x = jnp.zeros((1, 128, 1, 64), jnp.bfloat16)
  ids = jnp.zeros((1, 128), jnp.int32)
  return mosaic_attention.forward(x, x, x, ids, ids, ids, ids,
                                  jnp.zeros((1, 1, 4), jnp.int32),
                                  tile=mosaic_attention.DEFAULT_TILE, scale=0.1, causal=True,
                                  sliding_window=None, **options)


@pytest.mark.parametrize("name", ["q_compares", "q_spans"])
def test_plan_words_of_the_wrong_shape_are_rejected(name):
  with pytest.raises(ValueError, match=name):
    _small_forward(**{name: jnp.zeros((1, 2), jnp.int32)})


def _work_items(n_items, num_ctas=1):
  return mosaic_persistent.WorkItems(jnp.zeros((n_items, 9), jnp.int32), num_ctas)


@pytest.mark.parametrize("options, match", [
    (dict(items=_work_items(1), schedule="pingpong"), "items.*persistent schedule"),
    (dict(items=_work_items(2)), r"items: the table must be int32 \(1, 9\)"),
    (dict(items=_work_items(1), q_compares=jnp.zeros((1, 1), jnp.int32)),
     "items: give the compares and spans to work_items"),
    (dict(items=_work_items(1), q_spans=jnp.zeros((1, 1), jnp.int32)),
     "items: give the compares and spans to work_items"),
    (dict(items=_work_items(1), num_ctas=2), "num_ctas: the items were dealt to 1 CTAs"),
], ids=["grid", "wrong-table", "with-compares", "with-spans", "other-num-ctas"])
def test_work_items_that_do_not_fit_the_call_are_rejected(options, match):
  with pytest.raises(ValueError, match=match):
    _small_forward(**options)


def test_work_items_are_the_item_table_of_the_schedule():
  ranges = _random_ranges(3, 2, 8, 8)
  compares = jnp.asarray(np.random.default_rng(3).integers(0, 2**20, (2, 8)), jnp.int32)
  items = mosaic_persistent.work_items(ranges, 3, compares, num_ctas=5)
  want = mosaic_persistent.item_table(
      ranges, mosaic_persistent.reading_positions(ranges, 3, 5), 3, compares)
  assert items.num_ctas == 5
  np.testing.assert_array_equal(items.table, want)
  default = mosaic_persistent.work_items(ranges, 3)  # min(SMs, 48 items) CTAs
  assert default.num_ctas == min(mosaic_persistent.num_sms(), 48)


def test_num_sms_without_a_gpu_is_the_h100_default():
  if jax.default_backend() == "gpu":
    assert mosaic_persistent.num_sms() >= 1
  else:
    assert mosaic_persistent.num_sms() == mosaic_persistent.DEFAULT_NUM_SMS == 132


@pytest.mark.parametrize("schedule, num_ctas", [("serial", 4), ("pingpong", 4),
                                                ("persistent", 0),
                                                ("persistent-pingpong", 0)])
def test_num_ctas_needs_the_persistent_schedule(schedule, num_ctas):
  with pytest.raises(ValueError, match="num_ctas"):
    _small_forward(schedule=schedule, num_ctas=num_ctas)


def test_unknown_schedule_is_rejected():
  with pytest.raises(ValueError, match="schedule"):
    _small_forward(schedule="eager")


@pytest.mark.parametrize("dtype, head_dim, tile, match", [
    ("float32", 128, mosaic_attention.DEFAULT_TILE, "bfloat16 or float16"),
    ("bfloat16", 32, mosaic_attention.DEFAULT_TILE, "head_dim"),
    ("bfloat16", 96, mosaic_attention.DEFAULT_TILE, "head_dim"),
    ("bfloat16", 512, mosaic_attention.DEFAULT_TILE, "head_dim"),
    ("bfloat16", 128, TileConfig(32, 64), "block_major"),
    ("bfloat16", 128, TileConfig(256, 64), "block_major"),
    ("bfloat16", 128, TileConfig(128, 32), "block_minor"),
])
def test_unsupported_inputs_are_rejected(dtype, head_dim, tile, match):
  q = jax.ShapeDtypeStruct((1, 256, 2, head_dim), jnp.dtype(dtype))
  with pytest.raises(ValueError, match=match):
    mosaic_attention.check_supported(q, q, tile)


@schedules
def test_tiles_beyond_shared_memory_fail_to_lower(schedule):
  q = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((1, 256), jnp.int32)
  with pytest.raises(ValueError, match="shared memory"):
    mosaic_forward.trace(q, q, q, ids, ids, ids, ids, causal=True, window=None, scale=0.1,
                         tile=TileConfig(128, 128, num_stages=3),
                         schedule=schedule).lower(lowering_platforms=("cuda",))


def test_default_schedule_is_the_grid_where_the_persistent_kernel_does_not_fit():
  q = lambda d: jax.ShapeDtypeStruct((1, 256, 2, d), jnp.bfloat16)  # noqa: E731
  ids = jax.ShapeDtypeStruct((1, 256), jnp.int32)
  wide = TileConfig(128, 64, num_stages=2)  # one pair of 128 x 256 Q buffers: 64 KiB
  widest = TileConfig(128, 128, num_stages=2)  # a 256 KiB K/V ring at head_dim 256
  assert mosaic_attention.default_schedule(widest, q(256)) == mosaic_attention.GRID_SCHEDULE
  assert (mosaic_attention.default_schedule(wide, q(256))
          == mosaic_attention.WIDE_HEAD_SCHEDULE == "persistent")
  assert mosaic_attention.default_schedule(wide, q(128)) == mosaic_attention.DEFAULT_SCHEDULE
  assert (mosaic_attention.default_schedule(mosaic_common.WIDE_HEAD_TILE, q(256))
          == mosaic_attention.WIDE_HEAD_SCHEDULE)
  # Two pairs of Q buffers where they fit beside the ring, else one.
  assert mosaic_persistent.q_buffer_pairs(wide, q(256)) == 1
  assert mosaic_persistent.q_buffer_pairs(wide, q(128)) == 2
  assert mosaic_persistent.q_buffer_pairs(mosaic_common.WIDE_HEAD_TILE, q(256)) == 2
  lower = lambda schedule, tile, q_pairs=None: mosaic_forward.trace(  # noqa: E731
      q(256), q(256), q(256), ids, ids, ids, ids, causal=True, window=None, scale=0.1,
      tile=tile, schedule=schedule, q_pairs=q_pairs).lower(lowering_platforms=("cuda",))
  with pytest.raises(ValueError, match="shared memory"):
    lower(mosaic_attention.WIDE_HEAD_SCHEDULE, wide, q_pairs=2)
  with pytest.raises(ValueError, match="shared memory"):
    lower(mosaic_attention.WIDE_HEAD_SCHEDULE, widest)
  assert "mosaic_gpu" in lower(None, wide).as_text()


@pytest.mark.parametrize("schedule, q_pairs", [("pingpong", 1), ("persistent", 3),
                                               ("persistent-pingpong", 0)])
def test_q_pairs_needs_a_persistent_schedule_and_one_or_two(schedule, q_pairs):
  x = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((1, 256), jnp.int32)
  with pytest.raises(ValueError, match="q_pairs must be None, 1 or 2"):
    mosaic_forward.trace(x, x, x, ids, ids, ids, ids, causal=True, window=None, scale=0.1,
                         tile=SMALL_TILE, schedule=schedule, q_pairs=q_pairs)


def test_interpret_mode_is_refused():
  x = jnp.zeros((1, 128, 1, 64), jnp.bfloat16)
  ids = jnp.zeros((1, 128), jnp.int32)
  with pytest.raises(NotImplementedError, match="interpret"):
    mosaic_attention.forward(x, x, x, ids, ids, ids, ids, jnp.zeros((1, 1, 4), jnp.int32),
                             tile=mosaic_attention.DEFAULT_TILE, scale=0.1, causal=True,
                             sliding_window=None, interpret=True)


# ----------------------------------------------------------------------------
# GPU: numbers against the reference


@dataclasses.dataclass(frozen=True)
class MosaicCase(GpuCase):
  """A case of tests/test_gpu.py, with the Mosaic kernel's tiling."""
  tile: TileConfig = mosaic_attention.DEFAULT_TILE


GPU_CASES = [
    MosaicCase("packed-d128"),
    MosaicCase("packed-d64", head_dim=64),
    MosaicCase("padded-d64", layout="padded", head_dim=64),
    MosaicCase("empty-row-d128", layout="with_empty_row"),
    MosaicCase("repeated-ids-d64", layout="repeated", head_dim=64, q_len=1024, kv_len=1024),
    MosaicCase("gqa-4:1", heads=4, kv_heads=1),
    MosaicCase("gqa-8:2-d64", heads=8, kv_heads=2, head_dim=64),
    MosaicCase("bidirectional", causal=False),
    MosaicCase("window-256-d64", window=256, head_dim=64),
    MosaicCase("window-100-bidirectional", window=100, causal=False, head_dim=64),
    MosaicCase("chunk-q1024-kv3072", q_len=1024, kv_len=3072, chunk_offset=1536),
    MosaicCase("one-document-T4096", layout="one_document", batch=1, q_len=4096,
               kv_len=4096),
    MosaicCase("float16", dtype="float16"),
    MosaicCase("large-logits-x50", layout="padded", scale_mult=50.0),
    MosaicCase("tile-64x64-1-stage", layout="padded", tile=TileConfig(64, 64, num_stages=1)),
    MosaicCase("tile-128x64-3-stages", layout="padded", tile=TileConfig(128, 64, num_stages=3)),
    MosaicCase("tile-64x128-d64", layout="padded", head_dim=64,
               tile=TileConfig(64, 128, num_stages=2)),
    MosaicCase("packed-d256", head_dim=256, tile=mosaic_common.WIDE_HEAD_TILE),
    MosaicCase("padded-gqa-4:1-d256", layout="padded", heads=4, kv_heads=1, head_dim=256,
               tile=mosaic_common.WIDE_HEAD_TILE),
    MosaicCase("window-100-bidirectional-float16-d256", window=100, causal=False,
               dtype="float16", head_dim=256, tile=mosaic_common.WIDE_HEAD_TILE),
    # The forward's tile at head_dim 256: one Q buffer pair in the persistent kernel.
    MosaicCase("packed-d256-128x64", head_dim=256, tile=mosaic_common.WIDE_HEAD_FORWARD_TILE),
    MosaicCase("padded-gqa-4:1-d256-128x64", layout="padded", heads=4, kv_heads=1,
               head_dim=256, tile=mosaic_common.WIDE_HEAD_FORWARD_TILE),
    MosaicCase("window-100-bidirectional-float16-d256-128x64", window=100, causal=False,
               dtype="float16", head_dim=256, tile=mosaic_common.WIDE_HEAD_FORWARD_TILE),
]
BY_NAME = {c.name: c for c in GPU_CASES}
gpu_cases = pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.name)


@functools.lru_cache(maxsize=None)
def run_case(name, schedule, num_ctas=None, dealing=None, q_pairs=None):
  """(kernel, reference, layout): dicts of float32 numpy out [B, Tq, H, D], lse [B, H, Tq];
  dealing and q_pairs as in mosaic_forward."""
  case = BY_NAME[name]
  layout = case.make_layout()
  seed = zlib.crc32(name.encode()) & 0x7FFFFFFF
  q, k, v, _, _ = random_inputs(
      seed, batch=case.batch, q_len=case.q_len, kv_len=case.kv_len, heads=case.heads,
      kv_heads=case.kv_heads, head_dim=case.head_dim, dtype=jnp.dtype(case.dtype))
  scale = case.scale or 1.0 / np.sqrt(case.head_dim)
  out, lse = mosaic_forward(q, k, v, *layout.arrays(), causal=case.causal,
                            window=case.window, scale=scale, tile=case.tile,
                            schedule=schedule, num_ctas=num_ctas, dealing=dealing,
                            q_pairs=q_pairs)
  f32 = lambda x: x.astype(jnp.float32)
  want_out, want_lse = reference_attention(
      f32(q), f32(k), f32(v), **layout.kwargs(), causal=case.causal,
      sliding_window=case.window, scale=scale, return_residuals=True)
  as_np = lambda x: np.asarray(f32(x))
  return (dict(out=as_np(out), lse=as_np(lse)),
          dict(out=as_np(want_out), lse=as_np(want_lse)), layout)


def _allowed(case, layout):
  return allowed_np(layout, causal=case.causal, sliding_window=case.window)


@pytest.mark.gpu
@schedules
@gpu_cases
def test_output_matches_reference(case, schedule):
  got, want, _ = run_case(case.name, schedule)
  assert_close("out", got["out"], want["out"], TOL)


@pytest.mark.gpu
@schedules
@gpu_cases
def test_lse_matches_reference(case, schedule):
  got, want, layout = run_case(case.name, schedule)
  seen = np.broadcast_to(_allowed(case, layout).any(axis=2)[:, None, :],
                         got["lse"].shape)
  assert_close("lse", got["lse"][seen], want["lse"][seen], TOL)
  np.testing.assert_array_equal(got["lse"][~seen], np.float32(EMPTY_LSE))


@pytest.mark.gpu
@schedules
@gpu_cases
def test_nothing_is_nan_or_inf(case, schedule):
  got, _, _ = run_case(case.name, schedule)
  for name, x in got.items():
    assert_finite(name, x)


@pytest.mark.gpu
@schedules
@gpu_cases
def test_queries_that_see_nothing_output_exactly_zero(case, schedule):
  got, _, layout = run_case(case.name, schedule)
  blind = ~_allowed(case, layout).any(axis=2)
  assert np.all(got["out"][blind] == 0.0)


# The persistent kernel with few CTAs (many items each: the Q buffers and the
# K/V ring cycle through many items) and with more CTAs than items.
@pytest.mark.gpu
@pytest.mark.parametrize("schedule", PERSISTENT)
@pytest.mark.parametrize("num_ctas", [1, 3, 1000])
@pytest.mark.parametrize("name", ["empty-row-d128", "gqa-4:1", "window-100-bidirectional",
                                  "chunk-q1024-kv3072", "tile-64x64-1-stage",
                                  "tile-128x64-3-stages"])
def test_persistent_with_any_number_of_ctas_matches_reference(name, num_ctas, schedule):
  case = BY_NAME[name]
  got, want, layout = run_case(name, schedule, num_ctas)
  assert_close("out", got["out"], want["out"], TOL)
  allowed = _allowed(case, layout)
  seen = np.broadcast_to(allowed.any(axis=2)[:, None, :], got["lse"].shape)
  assert_close("lse", got["lse"][seen], want["lse"][seen], TOL)
  np.testing.assert_array_equal(got["lse"][~seen], np.float32(EMPTY_LSE))
  assert np.all(got["out"][~allowed.any(axis=2)] == 0.0)
  for key, x in got.items():
    assert_finite(key, x)


# Work items claimed at run time (dealing "dynamic"): every item still runs once, on
# one CTA, through the same code, so the outputs are bitwise those of dealt items.
@pytest.mark.gpu
@pytest.mark.parametrize("schedule", PERSISTENT)
@pytest.mark.parametrize("num_ctas", [None, 3])
@pytest.mark.parametrize("name", ["packed-d128", "empty-row-d128", "gqa-4:1",
                                  "tile-64x64-1-stage"])
def test_claimed_items_give_bitwise_the_outputs_of_dealt_items(name, num_ctas, schedule):
  dealt, want, _ = run_case(name, schedule, num_ctas, dealing="load")
  claimed, _, _ = run_case(name, schedule, num_ctas, dealing="dynamic")
  for key in ("out", "lse"):
    np.testing.assert_array_equal(claimed[key], dealt[key], err_msg=key)
  assert_close("out", claimed["out"], want["out"], TOL)


# One Q buffer pair (the persistent kernel's shared memory at head_dim 256) forced
# where two fit: each item's output staged in its last K/V slot, the next Q loaded
# after the last QK^T. The arithmetic is that of two pairs, so the outputs are
# bitwise theirs: with items claimed in the call (each store awaited at its item's
# end), and dealt ahead (awaited in the next item's first step, defer_store) on 3
# CTAs (many items each, so the handoffs and held-back slots cycle) and on more
# CTAs than items.
ONE_PAIR_RUNS = [(None, None), (3, "load"), (1000, "load")]


@pytest.mark.gpu
@pytest.mark.parametrize("schedule", PERSISTENT)
@pytest.mark.parametrize("num_ctas, dealing", ONE_PAIR_RUNS)
@pytest.mark.parametrize("name", ["packed-d128", "empty-row-d128", "gqa-4:1",
                                  "window-100-bidirectional", "chunk-q1024-kv3072",
                                  "tile-64x64-1-stage", "tile-128x64-3-stages"])
def test_one_q_pair_gives_bitwise_the_outputs_of_two(name, num_ctas, dealing, schedule):
  two, want, _ = run_case(name, schedule, num_ctas, dealing, q_pairs=2)
  one, _, _ = run_case(name, schedule, num_ctas, dealing, q_pairs=1)
  for key in ("out", "lse"):
    np.testing.assert_array_equal(one[key], two[key], err_msg=key)
  assert_close("out", one["out"], want["out"], TOL)
  assert_finite("out", one["out"])


@pytest.mark.gpu
def test_claimed_items_restart_in_every_call():
  """Each call's counter starts at zero: two kernels in one jitted function (their
  items made once) and the same function called again give the outputs of items
  dealt ahead."""
  case = BY_NAME["packed-d128"]
  layout = case.make_layout()
  q, k, v, _, _ = random_inputs(11, batch=case.batch, q_len=case.q_len, kv_len=case.kv_len,
                                heads=case.heads, kv_heads=case.kv_heads,
                                head_dim=case.head_dim, dtype=jnp.bfloat16)
  seg, _, pos, _ = layout.arrays()
  tile = case.tile
  plan = masks.make_tile_plan(seg, seg, pos, pos, block_q=tile.block_major,
                              block_k=tile.block_minor, causal=True, sliding_window=None)

  def two_calls(q, k, v, dealing):
    items = mosaic_persistent.work_items(plan.q_ranges, case.heads, plan.q_compares,
                                         spans=plan.q_spans, dealing=dealing,
                                         coded_ids=(seg, seg, tile.block_minor))
    attend = lambda q: mosaic_attention.forward(  # noqa: E731
        q, k, v, seg, seg, pos, pos, plan.q_ranges, tile=tile, scale=0.125, causal=True,
        sliding_window=None, schedule="persistent-pingpong", items=items)[0]
    first = attend(q)
    return first, attend(first)

  claimed = jax.jit(functools.partial(two_calls, dealing="dynamic"))
  want = jax.jit(functools.partial(two_calls, dealing="snake"))(q, k, v)
  for _ in range(3):
    for got, expected in zip(claimed(q, k, v), want):
      np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)),
                                    np.asarray(expected.astype(jnp.float32)))


# Hypothesis layouts at one small shape: the kernel compiles once per option set.
B, T = 2, 256
SEEDS = st.integers(0, 2**31 - 1)


SMALL_TILE = TileConfig(64, 64, num_stages=2)


def _check_layout(layout: Layout, seed, *, causal, schedule, window=None, heads=4,
                  kv_heads=2, head_dim=64, tile=SMALL_TILE, q_pairs=None):
  q_len, kv_len = layout.q_segment_ids.shape[1], layout.kv_segment_ids.shape[1]
  q, k, v, _, _ = random_inputs(seed, batch=B, q_len=q_len, kv_len=kv_len, heads=heads,
                                kv_heads=kv_heads, head_dim=head_dim,
                                dtype=jnp.bfloat16)
  scale = 1.0 / np.sqrt(head_dim)
  out, lse = mosaic_forward(q, k, v, *layout.arrays(), causal=causal, window=window,
                            scale=scale, tile=tile, schedule=schedule, q_pairs=q_pairs)
  f32 = lambda x: x.astype(jnp.float32)
  want_out, want_lse = reference_attention(
      f32(q), f32(k), f32(v), **layout.kwargs(), causal=causal, sliding_window=window,
      scale=scale, return_residuals=True)
  out, lse = np.asarray(f32(out)), np.asarray(lse)
  assert_finite("out", out)
  assert_close("out", out, np.asarray(want_out), TOL)
  seen = allowed_np(layout, causal=causal, sliding_window=window).any(axis=2)
  assert np.all(out[~seen] == 0.0)
  seen = np.broadcast_to(seen[:, None, :], lse.shape)
  assert_close("lse", lse[seen], np.asarray(want_lse)[seen], TOL)
  np.testing.assert_array_equal(lse[~seen], np.float32(EMPTY_LSE))


@pytest.mark.gpu
@schedules
@pytest.mark.parametrize("causal", [True, False])
@settings(max_examples=15)
@given(layout=self_layouts(B, T, ALL_KINDS) | self_layouts(B, T, positions="custom"),
       seed=SEEDS)
def test_self_attention_layouts_match_reference(causal, schedule, layout, seed):
  _check_layout(layout, seed, causal=causal, schedule=schedule)


@pytest.mark.gpu
@schedules
@settings(max_examples=15)
@given(layout=chunk_layouts(B, 128, 256), seed=SEEDS)
def test_chunk_layouts_with_window_match_reference(schedule, layout, seed):
  _check_layout(layout, seed, causal=True, window=64, schedule=schedule)


@pytest.mark.gpu
@schedules
@settings(max_examples=10)
@given(layout=self_layouts(B, T, ALL_KINDS), seed=SEEDS)
def test_two_consumer_layouts_match_reference(schedule, layout, seed):
  """128-row tiles: two consumer warpgroups (the pingpong rendezvous), one stage
  (two for persistent-pingpong, which needs them)."""
  stages = 2 if schedule == "persistent-pingpong" else 1
  _check_layout(layout, seed, causal=True, schedule=schedule,
                tile=TileConfig(128, 64, num_stages=stages))


# One Q buffer pair (as at head_dim 256): one consumer on one stage, two consumers
# apart, and taking turns on 128-key tiles (whose half tiles the spans skip).
ONE_PAIR_KERNELS = [("persistent", TileConfig(64, 64, num_stages=1)),
                    ("persistent", TileConfig(128, 64, num_stages=2)),
                    ("persistent-pingpong", TileConfig(128, 128, num_stages=2))]


@pytest.mark.gpu
@pytest.mark.parametrize("schedule, tile", ONE_PAIR_KERNELS,
                         ids=[f"{s}-{t.block_major}x{t.block_minor}x{t.num_stages}"
                              for s, t in ONE_PAIR_KERNELS])
@settings(max_examples=10)
@given(layout=self_layouts(B, T, ALL_KINDS), seed=SEEDS)
def test_one_q_pair_layouts_match_reference(schedule, tile, layout, seed):
  _check_layout(layout, seed, causal=True, schedule=schedule, tile=tile, q_pairs=1)


# ----------------------------------------------------------------------------
# The public API: flash_attention(implementation="mosaic")


def _api_inputs(b=2, t=1000, heads=4, kv_heads=2, d=128, dtype=jnp.bfloat16):
  """Shapes of a call: q, k (= v) and ids; T = 1000 is padded to the tiles."""
  return (jax.ShapeDtypeStruct((b, t, heads, d), jnp.dtype(dtype)),
          jax.ShapeDtypeStruct((b, t, kv_heads, d), jnp.dtype(dtype)),
          jax.ShapeDtypeStruct((b, t), jnp.int32))


def _kernel_calls(lowered):
  """[(kind, name)] of the lowered GPU kernels: kind "mosaic_gpu" or "xla.gpu.triton"."""
  calls = []
  for line in lowered.as_text().splitlines():
    kind = re.search(r"custom_call @\S*?(mosaic_gpu|xla\.gpu\.triton)", line)
    if kind:
      name = re.search(r'name = "([^"]*)"', line)
      calls.append((kind.group(1), name.group(1) if name else ""))
  return calls


def _custom_calls(lowered):
  """The kinds of the attention kernels (all but the plan's Triton item tables)."""
  return {kind for kind, name in _kernel_calls(lowered) if name != "ranked_item_table"}


def _item_tables(lowered):
  return sum(name == "ranked_item_table" for _, name in _kernel_calls(lowered))


@pytest.fixture
def pretend_gpu(monkeypatch):
  """jax.default_backend() says "gpu", so that flash_attention plans for CUDA on CPU."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")


@pytest.mark.parametrize("options", [
    dict(),
    dict(causal=False),
    dict(sliding_window=100),
], ids=["causal", "bidirectional", "window"])
def test_api_lowers_for_cuda_forward_and_grad(pretend_gpu, options):
  q, kv, ids = _api_inputs()

  def fwd(q, k, v, seg):
    return flash_attention(q, k, v, segment_ids=seg, implementation="mosaic", **options)

  def loss(q, k, v, seg):
    return jnp.sum(fwd(q, k, v, seg).astype(jnp.float32))

  lower = lambda f: jax.jit(f).trace(q, kv, kv, ids).lower(  # noqa: E731
      lowering_platforms=("cuda",))
  assert _custom_calls(lower(fwd)) == {"mosaic_gpu"}
  # Planned in the call, on a GPU: work items tabled by the Triton kernel (the
  # forward's, and dQ's until XLA drops what the forward does not use).
  assert _item_tables(lower(fwd)) >= 1
  # Gradients: the Mosaic forward, then the Mosaic dQ and dK/dV kernels.
  assert _custom_calls(lower(jax.grad(loss, argnums=(0, 1, 2)))) == {"mosaic_gpu"}


def test_api_lowers_for_cuda_with_a_plan_and_d64(pretend_gpu):
  q, kv, ids = _api_inputs(t=512, d=64, kv_heads=1, dtype=jnp.float16)

  def loss(q, k, v, seg):
    plan = make_attention_plan(q, k, segment_ids=seg, implementation="mosaic")
    out = flash_attention(q, k, v, plan=plan, implementation="mosaic")
    return jnp.sum(out.astype(jnp.float32))

  lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(
      q, kv, kv, ids).lower(lowering_platforms=("cuda",))
  assert _custom_calls(lowered) == {"mosaic_gpu"}


@pytest.fixture
def pretend_hopper(pretend_gpu, monkeypatch):
  """As pretend_gpu, and the device is an sm90 GPU: "auto" may pick Mosaic."""
  monkeypatch.setattr(attention, "_is_hopper", lambda: True)


def _auto_calls(q, kv, ids, **kw):
  """Custom calls of flash_attention(implementation="auto") and its gradient, for CUDA."""
  def loss(q, k, v, seg):
    out = flash_attention(q, k, v, segment_ids=seg, **kw)
    return jnp.sum(out.astype(jnp.float32))

  return _custom_calls(jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(
      q, kv, kv, ids).lower(lowering_platforms=("cuda",)))


def test_auto_on_hopper_runs_mosaic_where_it_can(pretend_hopper):
  q, kv, ids = _api_inputs()
  assert _auto_calls(q, kv, ids) == {"mosaic_gpu"}
  f32 = [jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, kv)]
  assert _auto_calls(*f32, ids) == {"xla.gpu.triton"}  # float32: Triton
  q96, kv96, _ = _api_inputs(d=96)
  assert _auto_calls(q96, kv96, ids) == {"xla.gpu.triton"}  # head_dim 96: Triton
  q256, kv256, _ = _api_inputs(d=256)
  assert _auto_calls(q256, kv256, ids) == {"mosaic_gpu"}
  assert _auto_calls(q, kv, ids, causal=False,  # a general mask: Triton
                     mask=mask_rules.prefix_lm(16)) == {"xla.gpu.triton"}
  assert _auto_calls(q, kv, ids, config=KernelConfig.for_head_dim(128)) == {
      "xla.gpu.triton"}  # a config holds Triton tiles unless "mosaic" is named


def test_auto_off_hopper_runs_triton(pretend_gpu, monkeypatch):
  monkeypatch.setattr(attention, "_is_hopper", lambda: False)
  q, kv, ids = _api_inputs()
  assert _auto_calls(q, kv, ids) == {"xla.gpu.triton"}


def test_auto_follows_the_plan(pretend_hopper):
  q, kv, ids = _api_inputs(t=512)

  def calls(plan_implementation):
    def loss(q, k, v, seg):
      plan = make_attention_plan(q, k, segment_ids=seg, implementation=plan_implementation)
      return jnp.sum(flash_attention(q, k, v, plan=plan).astype(jnp.float32))

    return _custom_calls(jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(
        q, kv, kv, ids).lower(lowering_platforms=("cuda",)))

  assert calls("auto") == {"mosaic_gpu"}
  assert calls("pallas") == {"xla.gpu.triton"}


def test_a_mosaic_plan_tiles_the_forward_with_the_mosaic_tile():
  q, kv, ids = _api_inputs(t=1000)
  plan = jax.eval_shape(lambda seg: make_attention_plan(
      q, kv, segment_ids=seg, implementation="mosaic"), ids)
  assert plan.implementation == "mosaic"
  assert plan.config == KernelConfig(forward=mosaic_attention.DEFAULT_TILE,
                                     dq=mosaic_backward.DEFAULT_DQ_TILE,
                                     dkdv=mosaic_backward.DEFAULT_DKDV_TILE)
  assert (plan.tiles.forward.block_q, plan.tiles.forward.block_k) == (128, 128)
  assert plan.tiles.dq.block_q == mosaic_backward.DEFAULT_DQ_TILE.block_major
  assert plan.ids.q_segment_ids.shape == (2, 1024)  # padded to the largest tile


@pytest.mark.parametrize("t, persistent, balance", [(1000, True, True), (1000, True, False),
                                                   (40000, False, True)])
def test_a_mosaic_plan_holds_the_work_items_of_its_persistent_kernels(t, persistent, balance):
  """The forward and dQ kernels run persistent at T = 1000 (their items come
  with the plan, made once, dealt by load unless balance_by_load=False: then
  the forward's are claimed at run time, dQ's dealt in snake order), the grid
  at T = 40000 (>16 MB of K/V per head); dK/dV runs the grid by default."""
  q, kv, _ = _api_inputs(t=t, kv_heads=1)
  rng = np.random.default_rng(t)
  ids = jnp.asarray(np.cumsum(rng.random((2, t)) < 0.004, axis=1) + 1, jnp.int32)
  make = lambda ids: make_attention_plan(q, kv, segment_ids=ids,  # noqa: E731
                                         implementation="mosaic", balance_by_load=balance)
  plan = (jax.jit(make) if persistent else functools.partial(jax.eval_shape, make))(ids)
  tiles, heads = plan.tiles, q.shape[2]
  assert tiles.dkdv_items is None
  if not persistent:
    assert tiles.forward_items is None and tiles.dq_items is None
    return
  coded_ids = (plan.ids.q_segment_ids, plan.ids.kv_segment_ids,
               plan.config.forward.block_minor)
  for items, rows, spans, dealing, coded in (
      (tiles.forward_items, tiles.forward, tiles.forward.q_spans,
       "load" if balance else "dynamic", coded_ids),
      (tiles.dq_items, tiles.dq, None, "load" if balance else "snake", None)):
    want = mosaic_persistent.work_items(rows.q_ranges, heads, rows.q_compares,
                                        spans=spans, dealing=dealing, coded_ids=coded)
    assert items.num_ctas == want.num_ctas and items.dynamic == want.dynamic
    np.testing.assert_array_equal(items.table, want.table)
    if want.dynamic:
      np.testing.assert_array_equal(items.busy, want.busy)
    assert (items.codes is None) == (coded is None)
    if coded is not None:
      np.testing.assert_array_equal(items.codes, want.codes)


def _mosaic_bad_calls():
  x = lambda d=128, dtype=jnp.bfloat16: jnp.zeros((1, 256, 2, d), dtype)  # noqa: E731
  q = x()
  seg = jnp.ones((1, 256), jnp.int32)
  mosaic = dict(implementation="mosaic")
  dense = jnp.ones((1, 256, 256), bool)
  pallas_plan = make_attention_plan(q, q, segment_ids=seg)
  mosaic_plan = make_attention_plan(q, q, segment_ids=seg, **mosaic)
  yield ("float32", lambda: flash_attention(*[x(dtype=jnp.float32)] * 3, **mosaic),
         r"q, k, v: implementation='mosaic' needs bfloat16 or float16, got float32")
  yield ("head_dim 96", lambda: flash_attention(*[x(96)] * 3, **mosaic),
         r"q: implementation='mosaic' supports head_dim 64, 128 or 256, got 96")
  yield ("head_dim 32", lambda: flash_attention(*[x(32)] * 3, **mosaic),
         r"head_dim 64, 128 or 256, got 32")
  yield ("dense mask", lambda: flash_attention(q, q, q, mask=dense, **mosaic),
         r"mask: implementation='mosaic' supports document masks only")
  yield ("mask rule", lambda: flash_attention(q, q, q, causal=False, **mosaic,
                                              mask=mask_rules.prefix_lm(16)),
         r"mask: implementation='mosaic' supports document masks only")
  yield ("interpret", lambda: flash_attention(q, q, q, interpret=True, **mosaic),
         r"interpret: implementation='mosaic' has no interpreter")
  yield ("config tile", lambda: flash_attention(
      q, q, q, config=KernelConfig.uniform(32), **mosaic),
         r"config: with implementation='mosaic', config.forward is a Mosaic "
         r"kernel's tile: tile.block_major must be 64 or 128")
  yield ("config dkdv tile", lambda: flash_attention(q, q, q, config=KernelConfig(
      forward=mosaic_attention.DEFAULT_TILE, dq=mosaic_backward.DEFAULT_DQ_TILE,
      dkdv=TileConfig(128, 32)), **mosaic),
         r"config: with implementation='mosaic', config.dkdv is a Mosaic kernel's "
         r"tile: tile.block_minor must be one of")
  yield ("config forward 32-key tile", lambda: flash_attention(q, q, q, config=KernelConfig(
      forward=TileConfig(128, 32), dq=mosaic_common.WIDE_HEAD_DQ_TILE,
      dkdv=mosaic_backward.DEFAULT_DKDV_TILE), **mosaic),
         r"config: with implementation='mosaic', config.forward is a Mosaic kernel's "
         r"tile: tile.block_minor must be one of \(64, 128\)")
  yield ("pallas plan", lambda: flash_attention(q, q, q, plan=pallas_plan, **mosaic),
         r"plan: it was made for implementation='pallas', but this call runs "
         r"implementation='mosaic'")
  yield ("mosaic plan", lambda: flash_attention(q, q, q, plan=mosaic_plan,
                                                implementation="pallas", interpret=True),
         r"plan: it was made for implementation='mosaic', but this call runs "
         r"implementation='pallas'")
  yield ("plan with a mask", lambda: make_attention_plan(q, q, mask=dense, **mosaic),
         r"mask: implementation='mosaic' supports document masks only")
  yield ("plan float32", lambda: make_attention_plan(*[x(dtype=jnp.float32)] * 2, **mosaic),
         r"needs bfloat16 or float16, got float32")
  yield ("plan for xla", lambda: make_attention_plan(q, q, implementation="xla"),
         r"implementation must be 'auto', 'pallas' or 'mosaic' \(the kernels to plan "
         r"for\), got 'xla'")
  lse = jnp.zeros((1, 2, 256), jnp.float32)
  yield ("bwd float32", lambda: flash_attention_bwd(
      *[x(dtype=jnp.float32)] * 4, lse, x(dtype=jnp.float32), **mosaic),
         r"needs bfloat16 or float16, got float32")
  yield ("bwd interpret", lambda: flash_attention_bwd(
      q, q, q, q, lse, q, interpret=True, **mosaic),
         r"interpret: implementation='mosaic' has no interpreter")


MOSAIC_BAD_CALLS = list(_mosaic_bad_calls())


def test_api_mosaic_tiles_at_head_dim_256():
  # The forward on 128 x 64 tiles (one Q buffer pair), dQ on 32-key tiles (two consumers
  # with [64, 256] accumulators), dK/dV on 64 x 64 (the split kernels).
  from jpack import attention
  config = attention._mosaic_config(256)
  assert config.dq == mosaic_common.WIDE_HEAD_DQ_TILE == TileConfig(128, 32, num_stages=2)
  assert config.forward == mosaic_common.WIDE_HEAD_FORWARD_TILE == TileConfig(128, 64, num_stages=2)
  assert config.dkdv == mosaic_common.WIDE_HEAD_TILE == TileConfig(64, 64, num_stages=2)
  assert attention._mosaic_config(128).dq == mosaic_backward.DEFAULT_DQ_TILE


@pytest.mark.parametrize("call,match", [c[1:] for c in MOSAIC_BAD_CALLS],
                         ids=[c[0] for c in MOSAIC_BAD_CALLS])
def test_api_rejects_what_mosaic_cannot_do(call, match):
  with pytest.raises(ValueError, match=match):
    call()


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="needs a backend without a GPU")
def test_api_mosaic_off_gpu_says_it_needs_a_gpu():
  x = jnp.zeros((1, 256, 2, 128), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"implementation='mosaic' needs a CUDA GPU, but "
                     r"JAX's backend is 'cpu'"):
    flash_attention(x, x, x, implementation="mosaic")


def test_the_reference_runs_a_mosaic_plan():
  q, k, v, _, _ = random_inputs(0, batch=1, q_len=200, kv_len=200, heads=2, kv_heads=2,
                                head_dim=64, dtype=jnp.bfloat16)
  seg = jnp.asarray(np.repeat([[1, 2]], 100, axis=1), jnp.int32)
  plan = make_attention_plan(q, k, segment_ids=seg, implementation="mosaic")
  np.testing.assert_array_equal(
      flash_attention(q, k, v, plan=plan, implementation="xla"),
      reference_attention(q, k, v, segment_ids=seg))


@pytest.mark.parametrize("seq_len, stages, want", [
    (8192, 2, "persistent-pingpong"),  # 4 MB of K/V per head
    (32768, 2, "persistent-pingpong"),  # 16 MB: at the threshold
    (131072, 2, "pingpong"),  # 64 MB: the grid order keeps K/V in L2
    (8192, 1, "pingpong"),  # persistent-pingpong needs 2 stages
])
def test_default_schedule_by_stages_and_kv_bytes(seq_len, stages, want):
  k = jax.ShapeDtypeStruct((1, seq_len, 4, 128), jnp.bfloat16)
  tile = TileConfig(128, 128, num_stages=stages)
  assert mosaic_attention.default_schedule(tile, k) == want
  assert want in (mosaic_attention.DEFAULT_SCHEDULE, mosaic_attention.GRID_SCHEDULE)


@pytest.mark.parametrize("scale", [0.0, -0.1, 1e-30, float("nan")])
def test_forward_refuses_a_scale_its_masking_cannot_take(scale):
  q = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((1, 256), jnp.int32)
  ranges = jax.ShapeDtypeStruct((1, 2, 4), jnp.int32)
  with pytest.raises(ValueError, match="scale must be >= 1e-20"):
    jax.eval_shape(lambda *a: mosaic_attention.forward(
        *a, tile=mosaic_attention.DEFAULT_TILE, scale=scale, causal=True,
        sliding_window=None), q, q, q, ids, ids, ids, ids, ranges)
