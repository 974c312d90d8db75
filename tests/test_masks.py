"""The mask rule and the tile plan (jpack.masks), against numpy brute force.

The oracle is the dense mask: a tile pair must be visited iff some pair of
tokens in it may attend. The plan may visit more (it is built from per-tile
min/max), never less; for contiguous packed layouts it is exact. Tiles the plan
runs without the mask (the (full_lo, full_hi) run) must be entirely allowed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from experiments.layouts import clustered_graph_mask
from helpers import (CONTIGUOUS_KINDS, Layout, aligned_documents, allowed_np,
                     arange_positions, chunk_layouts, dense_masks, ids_from_runs,
                     self_layouts)
from jpack import masks
from pallas_kernels.config import GROUP_SPAN_BITS, SPAN_HALF_BITS
from jpack.attention import KernelConfig, TileConfig, make_attention_plan

B, T = 2, 64            # self-attention layouts
TQ, TK = 48, 80         # q chunk vs kv chunk (context-parallel style)

BLOCKS_SELF = [(16, 16), (16, 8), (8, 16), (32, 16)]
BLOCKS_CHUNK = [(16, 16), (16, 8), (8, 16)]
# (causal, sliding_window)
OPTIONS = [(True, None), (False, None), (True, 8), (False, 24), (True, 1)]


def _opt_id(opt):
  causal, window = opt
  return ("causal" if causal else "bidir") + ("" if window is None else f"-w{window}")


def _blk_id(blocks):
  return f"bq{blocks[0]}-bk{blocks[1]}"


@functools.lru_cache(maxsize=None)
def _plan_fn(block_q, block_k, causal, sliding_window):
  return jax.jit(functools.partial(
      masks.make_tile_plan, block_q=block_q, block_k=block_k, causal=causal,
      sliding_window=sliding_window))


def plan_np(layout: Layout, block_q, block_k, causal, sliding_window):
  """(q_ranges [B, nq, 4], kv_ranges [B, nk, 4]) as numpy."""
  plan = _plan_fn(block_q, block_k, causal, sliding_window)(*layout.arrays())
  return np.asarray(plan.q_ranges), np.asarray(plan.kv_ranges)


def brute_force_tiles(layout, block_q, block_k, causal, sliding_window):
  """(any_allowed, all_allowed): bool [B, nq, nk] from the dense mask."""
  ok = allowed_np(layout, causal=causal, sliding_window=sliding_window)
  b, tq, tk = ok.shape
  tiles = ok.reshape(b, tq // block_q, block_q, tk // block_k, block_k)
  return tiles.any(axis=(2, 4)), tiles.all(axis=(2, 4))


def range_sets(ranges, n_minor):
  """(visited, unmasked): bool [B, n_major, n_minor] named by the ranges."""
  idx = np.arange(n_minor)
  lo, full_lo, full_hi, hi = (ranges[..., i:i + 1] for i in range(4))
  return (idx >= lo) & (idx < hi), (idx >= full_lo) & (idx < full_hi)


def plan_sets(layout, block_q, block_k, causal, sliding_window):
  """Visited/unmasked tile sets of both views, all as [B, nq, nk]."""
  q_ranges, kv_ranges = plan_np(layout, block_q, block_k, causal, sliding_window)
  nq, nk = q_ranges.shape[1], kv_ranges.shape[1]
  q_visit, q_full = range_sets(q_ranges, nk)
  kv_visit, kv_full = range_sets(kv_ranges, nq)
  return dict(q_visit=q_visit, q_full=q_full,
              kv_visit=kv_visit.transpose(0, 2, 1),
              kv_full=kv_full.transpose(0, 2, 1))


def _layouts(kind, blocks):
  """Strategy for the layout families the plan is checked on."""
  if kind == "self":
    return self_layouts(B, T)
  if kind == "self-custom-positions":
    return self_layouts(B, T, positions="custom")
  assert kind == "chunk"
  return chunk_layouts(B, TQ, TK)


LAYOUT_CASES = ([("self", b) for b in BLOCKS_SELF]
                + [("self-custom-positions", (16, 16)),
                   ("self-custom-positions", (8, 16))]
                + [("chunk", b) for b in BLOCKS_CHUNK])
LAYOUT_IDS = [f"{k}-{_blk_id(b)}" for k, b in LAYOUT_CASES]


# ----------------------------------------------------------------------------
# The mask rule


def test_allowed_mask_on_a_small_example():
  # Row: doc 1 (2 tokens), doc 2 (2 tokens), padding.
  seg = np.array([[1, 1, 2, 2, 0]], np.int32)
  pos = arange_positions(1, 5)
  got = np.asarray(masks.allowed_mask(seg, seg, pos, pos, causal=True,
                                      sliding_window=None))[0]
  want = np.array([[1, 0, 0, 0, 0],
                   [1, 1, 0, 0, 0],
                   [0, 0, 1, 0, 0],
                   [0, 0, 1, 1, 0],
                   [0, 0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("opt", OPTIONS, ids=_opt_id)
@given(layout=st.one_of(self_layouts(B, T), self_layouts(B, T, positions="custom"),
                        chunk_layouts(B, TQ, TK)))
def test_allowed_mask_follows_the_rule(opt, layout):
  causal, window = opt
  got = masks.allowed_mask(*layout.arrays(), causal=causal, sliding_window=window)
  np.testing.assert_array_equal(
      np.asarray(got), allowed_np(layout, causal=causal, sliding_window=window))


# ----------------------------------------------------------------------------
# Soundness: the plan never skips work and never drops the mask wrongly


@pytest.mark.parametrize("kind,blocks", LAYOUT_CASES, ids=LAYOUT_IDS)
@given(opt=st.sampled_from(OPTIONS), data=st.data())
def test_plan_visits_every_tile_with_an_allowed_pair(kind, blocks, opt, data):
  layout = data.draw(_layouts(kind, blocks))
  any_allowed, _ = brute_force_tiles(layout, *blocks, *opt)
  sets = plan_sets(layout, *blocks, *opt)
  for view in ("q_visit", "kv_visit"):
    missed = any_allowed & ~sets[view]
    assert not missed.any(), f"{view} skips tiles {np.argwhere(missed).tolist()}"


@pytest.mark.parametrize("kind,blocks", LAYOUT_CASES, ids=LAYOUT_IDS)
@given(opt=st.sampled_from(OPTIONS), data=st.data())
def test_unmasked_tiles_are_fully_allowed(kind, blocks, opt, data):
  layout = data.draw(_layouts(kind, blocks))
  _, all_allowed = brute_force_tiles(layout, *blocks, *opt)
  sets = plan_sets(layout, *blocks, *opt)
  for view in ("q_full", "kv_full"):
    wrong = sets[view] & ~all_allowed
    assert not wrong.any(), f"{view} unmasks tiles {np.argwhere(wrong).tolist()}"


@pytest.mark.parametrize("kind,blocks", LAYOUT_CASES, ids=LAYOUT_IDS)
@given(opt=st.sampled_from(OPTIONS), data=st.data())
def test_ranges_are_ordered(kind, blocks, opt, data):
  """0 <= lo <= full_lo <= full_hi <= hi <= n_minor in both views."""
  layout = data.draw(_layouts(kind, blocks))
  q_ranges, kv_ranges = plan_np(layout, *blocks, *opt)
  for ranges, n_minor in ((q_ranges, kv_ranges.shape[1]),
                          (kv_ranges, q_ranges.shape[1])):
    lo, full_lo, full_hi, hi = np.moveaxis(ranges, -1, 0)
    assert (0 <= lo).all() and (lo <= full_lo).all()
    assert (full_lo <= full_hi).all() and (full_hi <= hi).all()
    assert (hi <= n_minor).all()


def _compare_spans(layout, block_q, block_k, causal, sliding_window, view="q"):
  """(ranges [B, n, 4], ids_len, positions_len [B, n], ids_only, positions_only: bool
  [B, Tq, Tk], the token pairs in the tiles where the view's compares say one compare
  suffices): view "q" (q_compares: ids-only tiles first in a row) or "kv"
  (kv_compares: positions-only tiles first)."""
  plan = _plan_fn(block_q, block_k, causal, sliding_window)(*layout.arrays())
  ranges, compares = (np.asarray(getattr(plan, f"{view}_ranges")),
                      np.asarray(getattr(plan, f"{view}_compares")))
  ids_len, positions_len = compares & 0xFFFF, compares >> 16
  first, last = (ids_len, positions_len) if view == "q" else (positions_len, ids_len)
  idx = np.arange(layout.kv_segment_ids.shape[1] // block_k if view == "q"
                  else layout.q_segment_ids.shape[1] // block_q)  # the minor tiles
  lo, hi = ranges[..., 0:1], ranges[..., 3:4]
  spans = ((idx >= lo) & (idx < lo + first[..., None]),
           (idx >= hi - last[..., None]) & (idx < hi))
  if view == "kv":  # [B, nk, nq] -> [B, nq, nk], and ids-only is the last span
    spans = tuple(x.transpose(0, 2, 1) for x in spans[::-1])
  tokens = lambda tiles: tiles.repeat(block_q, 1).repeat(block_k, 2)  # noqa: E731
  return (ranges, ids_len, positions_len, tokens(spans[0]), tokens(spans[1]))


@pytest.mark.parametrize("view", ["q", "kv"])
@pytest.mark.parametrize("kind,blocks", LAYOUT_CASES, ids=LAYOUT_IDS)
@given(opt=st.sampled_from(OPTIONS), data=st.data())
def test_one_compare_suffices_where_the_compares_say_so(kind, blocks, view, opt, data):
  """Pair by pair: the ids compare alone, or the position compares alone, give the mask."""
  layout = data.draw(_layouts(kind, blocks))
  causal, window = opt
  ranges, ids_len, positions_len, ids_span, positions_span = _compare_spans(
      layout, *blocks, *opt, view=view)
  assert (ids_len <= ranges[..., 3] - ranges[..., 0]).all()
  assert (positions_len <= ranges[..., 3] - ranges[..., 0]).all()
  allowed = allowed_np(layout, causal=causal, sliding_window=window)
  ids_only = allowed_np(layout, causal=False)
  no_ids = Layout(np.ones_like(layout.q_segment_ids), np.ones_like(layout.kv_segment_ids),
                  layout.q_positions, layout.kv_positions)
  positions_only = allowed_np(no_ids, causal=causal, sliding_window=window)
  assert (allowed == ids_only)[ids_span].all()
  assert (allowed == positions_only)[positions_span].all()


@functools.lru_cache(maxsize=None)
def _group_spans_fn(block_q, block_k, causal, sliding_window, rows):
  return jax.jit(functools.partial(
      masks.group_spans, block_q=block_q, block_k=block_k, causal=causal,
      sliding_window=sliding_window, rows=rows))


def _group_spans(layout, block_q, block_k, causal, sliding_window, rows):
  """(ranges [B, nq, 4], front, back: int [B, nq, groups]) of masks.group_spans, decoded."""
  plan = _plan_fn(block_q, block_k, causal, sliding_window)(*layout.arrays())
  words = np.asarray(_group_spans_fn(block_q, block_k, causal, sliding_window, rows)(
      *layout.arrays(), plan.q_ranges)).astype(np.int64) & 0xFFFFFFFF
  group = np.stack([words >> (GROUP_SPAN_BITS * g) & 0xFFFF
                    for g in range(block_q // rows)], axis=-1)
  half_mask = 2**SPAN_HALF_BITS - 1
  return np.asarray(plan.q_ranges), group & half_mask, group >> SPAN_HALF_BITS


def _exact_spans(layout, ranges, block_q, block_k, causal, sliding_window, rows):
  """(front, back) [B, nq, groups] from the dense mask, uncapped: the halves at
  either end of each range that a row group attends nothing of."""
  ok = allowed_np(layout, causal=causal, sliding_window=sliding_window)
  b, tq, tk = ok.shape
  seen = ok.reshape(b, tq // block_q, block_q // rows, rows, 2 * tk // block_k,
                    block_k // 2).any(axis=(3, 5))  # [B, nq, groups, 2 nk]
  front, back = (np.zeros(seen.shape[:3], int) for _ in range(2))
  for i, j, g in np.ndindex(*seen.shape[:3]):
    lo, hi = 2 * ranges[i, j, 0], 2 * ranges[i, j, 3]
    halves = np.flatnonzero(seen[i, j, g, lo:hi])
    front[i, j, g] = halves[0] if len(halves) else max(hi - lo, 0)
    back[i, j, g] = hi - lo - 1 - halves[-1] if len(halves) else 0
  return front, back


@pytest.mark.parametrize("kind,blocks", LAYOUT_CASES, ids=LAYOUT_IDS)
@given(opt=st.sampled_from(OPTIONS), data=st.data())
def test_group_spans_name_only_halves_the_group_cannot_attend(kind, blocks, opt, data):
  """Pair by pair: no row of a group attends a key of its front or back halves."""
  layout = data.draw(_layouts(kind, blocks))
  block_q, block_k = blocks
  rows = max(1, block_q // 2)
  ranges, front, back = _group_spans(layout, block_q, block_k, *opt, rows=rows)
  exact_front, exact_back = _exact_spans(layout, ranges, block_q, block_k, *opt, rows=rows)
  assert (front <= exact_front).all() and (back <= exact_back).all()
  assert not front[ranges[..., 3] <= ranges[..., 0]].any()  # empty rows: nothing
  assert not back[ranges[..., 3] <= ranges[..., 0]].any()


@pytest.mark.parametrize("blocks", BLOCKS_SELF, ids=[_blk_id(b) for b in BLOCKS_SELF])
@given(opt=st.sampled_from(OPTIONS), data=st.data())
def test_group_spans_are_exact_on_contiguous_documents(blocks, opt, data):
  """Documents as contiguous runs, positions along the row: the spans miss nothing."""
  layout = data.draw(self_layouts(B, T, kinds=CONTIGUOUS_KINDS))
  block_q, block_k = blocks
  rows = max(1, block_q // 2)
  ranges, front, back = _group_spans(layout, block_q, block_k, *opt, rows=rows)
  exact_front, exact_back = _exact_spans(layout, ranges, block_q, block_k, *opt, rows=rows)
  np.testing.assert_array_equal(front, exact_front)
  np.testing.assert_array_equal(back, exact_back)


def test_group_spans_of_a_diagonal_tile_and_of_a_document_starting_in_the_tile():
  """16-token row groups of 32-row q tiles, 32-key kv tiles (16-key halves), causal.

  One document of 64 tokens: on each diagonal tile group 0 sees only the first
  half (back = 1). Documents of 48 and 16 tokens (positions per document): q
  tile 1 (rows 32-63) has range kv tiles [0, 2); its group 0 (rows 32-47, doc
  1) sees keys 0-47, its group 1 (rows 48-63, doc 2) only keys 48-63."""
  pos = arange_positions(1, 64)
  seg = np.ones((1, 64), np.int32)
  ranges, front, back = _group_spans(Layout(seg, seg, pos, pos), 32, 32, True, None, rows=16)
  np.testing.assert_array_equal(ranges[0, :, 3], [1, 2])
  np.testing.assert_array_equal(back[0], [[1, 0], [1, 0]])
  np.testing.assert_array_equal(front[0], [[0, 0], [0, 0]])
  _, _, back = _group_spans(Layout(seg, seg, pos, pos), 32, 32, False, None, rows=16)
  np.testing.assert_array_equal(back[0], [[0, 0], [0, 0]])  # bidirectional: all seen
  seg = np.array([[1] * 48 + [2] * 16], np.int32)
  pos = np.concatenate([np.arange(48), np.arange(16)])[None].astype(np.int32)
  ranges, front, back = _group_spans(Layout(seg, seg, pos, pos), 32, 32, True, None, rows=16)
  np.testing.assert_array_equal(ranges[0, 1, [0, 3]], [0, 2])
  np.testing.assert_array_equal(front[0, 1], [0, 3])
  np.testing.assert_array_equal(back[0, 1], [1, 0])


def test_group_spans_are_capped():
  """Group 1 of the last q tile (doc 2) attends nothing of the 402 halves before it:
  its front is capped at 255. Group 0 (doc 1) sees none of the last kv tile."""
  seg = np.array([[1] * 1608 + [2] * 8], np.int32)
  pos = np.concatenate([np.arange(1608), np.arange(8)])[None].astype(np.int32)
  ranges, front, back = _group_spans(Layout(seg, seg, pos, pos), 16, 8, True, None, rows=8)
  np.testing.assert_array_equal(ranges[0, -1, [0, 3]], [0, 202])
  np.testing.assert_array_equal(front[0, -1], [0, 255])
  np.testing.assert_array_equal(back[0, -1], [2, 0])


@given(layout=self_layouts(B, T, positions="custom"), factor=st.sampled_from([2, 4]))
def test_coarsened_stats_are_the_stats_of_the_larger_tiles(layout, factor):
  seg, pos = layout.q_segment_ids, layout.q_positions
  fine = masks.coarsen_stats(masks.tile_stats(seg, pos, 4), factor)
  coarse = masks.tile_stats(seg, pos, 4 * factor)
  for name in ("seg_min", "seg_max", "pos_min", "pos_max", "uniform"):
    np.testing.assert_array_equal(getattr(fine, name), getattr(coarse, name), err_msg=name)


def test_min_max_last_is_one_pass_of_minima_and_maxima():
  rng = np.random.default_rng(0)
  x, y, z = (jnp.asarray(rng.integers(-1000, 1000, (3, 5, 17)), jnp.int32) for _ in range(3))
  (low_x, low_y), (high_z,) = masks.min_max_last(mins=(x, y), maxs=(z,))
  np.testing.assert_array_equal(low_x, jnp.min(x, axis=-1))
  np.testing.assert_array_equal(low_y, jnp.min(y, axis=-1))
  np.testing.assert_array_equal(high_z, jnp.max(z, axis=-1))


@pytest.mark.parametrize("blocks", [(128, 128), (128, 64), (64, 128)],
                         ids=[_blk_id(b) for b in [(128, 128), (128, 64), (64, 128)]])
@pytest.mark.parametrize("opt", [(True, None), (False, 100)], ids=_opt_id)
@given(data=st.data())
def test_a_plan_read_at_a_finer_tiling_is_the_plan_of_its_own_tiles(blocks, opt, data):
  """make_tile_plan reads the tokens once, at its group spans' tiling (token_tilings:
  64-row groups, half kv tiles), and combines its tiles' statistics from those: the
  plan is what each part computes from statistics read at its own tiles."""
  layout = data.draw(self_layouts(2, 512, positions=data.draw(st.sampled_from(
      ["arange", "custom"]))))
  (block_q, block_k), (causal, window) = blocks, opt
  assert masks.token_tilings(block_q, block_k) == (64, block_k // 2)
  plan = _plan_fn(block_q, block_k, causal, window)(*layout.arrays())
  seg, _, pos, _ = layout.arrays()
  q, kv = masks.tile_stats(seg, pos, block_q), masks.tile_stats(seg, pos, block_k)
  visit, full = masks.tile_occupancy(q, kv, causal=causal, sliding_window=window)
  q_ranges = masks.visit_ranges(visit, full)
  kv_ranges = masks.visit_ranges(visit.transpose(0, 2, 1), full.transpose(0, 2, 1))
  compares = masks.compare_splits(q, kv, q_ranges, kv_ranges, causal=causal,
                                  sliding_window=window)
  spans = masks.group_spans(seg, seg, pos, pos, q_ranges, block_q=block_q, block_k=block_k,
                            causal=causal, sliding_window=window)
  for got, want in ((plan.q_ranges, q_ranges), (plan.kv_ranges, kv_ranges),
                    (plan.q_compares, compares[0]), (plan.kv_compares, compares[1]),
                    (plan.q_spans, spans)):
    np.testing.assert_array_equal(got, want)


def test_packed_documents_need_one_compare_per_masked_tile():
  """Documents of 40 and 24 tokens, positions along the row, 16 x 16 tiles, causal.

  Every masked tile but the diagonal one that holds the document boundary (q
  tile 2, kv tile 2) needs one compare: the ids below the diagonal, the
  positions on a diagonal inside one document."""
  seg = np.array([[1] * 40 + [2] * 24], np.int32)
  pos = arange_positions(1, 64)
  ranges, ids_len, positions_len, _, _ = _compare_spans(Layout(seg, seg, pos, pos),
                                                        16, 16, True, None)
  np.testing.assert_array_equal(ranges[0], [[0, 1, 1, 1], [0, 0, 1, 2], [0, 3, 3, 3],
                                            [2, 4, 4, 4]])
  np.testing.assert_array_equal(ids_len[0], [0, 1, 2, 1])  # kv tiles 0; 0, 1; 2
  np.testing.assert_array_equal(positions_len[0], [1, 2, 0, 1])  # diagonals in one doc
  # Positions restarting at each document: kv tile 2 (positions up to 39) is no
  # longer below q tile 3 (positions 8..23).
  pos = np.concatenate([np.arange(40), np.arange(24)])[None].astype(np.int32)
  _, ids_len, _, _, _ = _compare_spans(Layout(seg, seg, pos, pos), 16, 16, True, None)
  assert ids_len[0, 3] == 0


def test_kv_rows_of_packed_documents_need_one_compare_per_masked_tile():
  """The same documents seen from the kv tiles (dK/dV): the diagonal first (positions
  only inside one document), the q tiles after a document's end last (ids only)."""
  seg = np.array([[1] * 40 + [2] * 24], np.int32)
  pos = arange_positions(1, 64)
  ranges, ids_len, positions_len, _, _ = _compare_spans(Layout(seg, seg, pos, pos),
                                                        16, 16, True, None, view="kv")
  np.testing.assert_array_equal(ranges[0], [[0, 1, 2, 3], [1, 3, 3, 3], [2, 4, 4, 4],
                                            [3, 4, 4, 4]])
  np.testing.assert_array_equal(ids_len[0], [2, 1, 1, 0])  # q tiles after the diagonal
  np.testing.assert_array_equal(positions_len[0], [2, 1, 0, 1])  # diagonals in one doc


# ----------------------------------------------------------------------------
# The two views agree


@pytest.mark.parametrize("kind,blocks", LAYOUT_CASES, ids=LAYOUT_IDS)
@given(opt=st.sampled_from(OPTIONS), data=st.data())
def test_range_endpoints_are_visited_by_the_transposed_view(kind, blocks, opt, data):
  """The first and last tile of each row of one view are in the other view."""
  layout = data.draw(_layouts(kind, blocks))
  q_ranges, kv_ranges = plan_np(layout, *blocks, *opt)
  sets = plan_sets(layout, *blocks, *opt)
  for ranges, other, transpose in ((q_ranges, sets["kv_visit"], False),
                                   (kv_ranges, sets["q_visit"], True)):
    other = other.transpose(0, 2, 1) if transpose else other
    for b, i in zip(*np.nonzero(ranges[..., 3] > ranges[..., 0])):
      lo, hi = ranges[b, i, 0], ranges[b, i, 3]
      assert other[b, i, lo] and other[b, i, hi - 1], (b, i, lo, hi)


@pytest.mark.parametrize("kind,blocks", LAYOUT_CASES, ids=LAYOUT_IDS)
@given(opt=st.sampled_from(OPTIONS), data=st.data())
def test_unmasked_tiles_of_one_view_are_visited_by_the_other(kind, blocks, opt, data):
  layout = data.draw(_layouts(kind, blocks))
  sets = plan_sets(layout, *blocks, *opt)
  assert not (sets["q_full"] & ~sets["kv_visit"]).any()
  assert not (sets["kv_full"] & ~sets["q_visit"]).any()


@pytest.mark.parametrize("opt", OPTIONS, ids=_opt_id)
@given(data=st.data())
def test_views_are_transposes_for_contiguous_layouts(opt, data):
  layout = data.draw(self_layouts(B, T, kinds=CONTIGUOUS_KINDS))
  sets = plan_sets(layout, 16, 16, *opt)
  np.testing.assert_array_equal(sets["q_visit"], sets["kv_visit"])


# ----------------------------------------------------------------------------
# Tightness: for packed (contiguous) layouts the plan visits exactly the tiles
# that hold an allowed pair.

def _exact_layouts(kind):
  if kind == "self":
    return self_layouts(B, T, kinds=CONTIGUOUS_KINDS)
  return chunk_layouts(B, TQ, TK, kinds=CONTIGUOUS_KINDS)


EXACT_CASES = ([("self", b) for b in BLOCKS_SELF]
               + [("chunk", b) for b in BLOCKS_CHUNK])


@pytest.mark.parametrize("kind,blocks", EXACT_CASES,
                         ids=[f"{k}-{_blk_id(b)}" for k, b in EXACT_CASES])
@given(opt=st.sampled_from(OPTIONS), data=st.data())
def test_plan_is_exact_for_contiguous_layouts(kind, blocks, opt, data):
  """Visited tiles == tiles with an allowed pair.

  Exact for the view whose minor tile is at least as large as its major tile
  (a smaller minor tile can sit wholly inside padding between two documents
  of one major tile; the [lo, hi) range then includes it).
  """
  layout = data.draw(_exact_layouts(kind))
  any_allowed, _ = brute_force_tiles(layout, *blocks, *opt)
  sets = plan_sets(layout, *blocks, *opt)
  block_q, block_k = blocks
  if block_q <= block_k:
    np.testing.assert_array_equal(sets["q_visit"], any_allowed)
  if block_k <= block_q:
    np.testing.assert_array_equal(sets["kv_visit"], any_allowed)


# ----------------------------------------------------------------------------
# Padding


@pytest.mark.parametrize("kind,blocks", LAYOUT_CASES, ids=LAYOUT_IDS)
@given(opt=st.sampled_from(OPTIONS), data=st.data())
def test_padding_tiles_visit_nothing(kind, blocks, opt, data):
  """A q tile (kv tile) of padding only has an empty range."""
  layout = data.draw(_layouts(kind, blocks))
  q_ranges, kv_ranges = plan_np(layout, *blocks, *opt)
  block_q, block_k = blocks
  b_, tq = layout.q_segment_ids.shape
  q_pad = (layout.q_segment_ids.reshape(b_, tq // block_q, block_q) == 0).all(-1)
  tk = layout.kv_segment_ids.shape[1]
  kv_pad = (layout.kv_segment_ids.reshape(b_, tk // block_k, block_k) == 0).all(-1)
  np.testing.assert_array_equal(q_ranges[q_pad][:, 3] - q_ranges[q_pad][:, 0], 0)
  np.testing.assert_array_equal(kv_ranges[kv_pad][:, 3] - kv_ranges[kv_pad][:, 0], 0)


@pytest.mark.parametrize("opt", OPTIONS, ids=_opt_id)
def test_all_padding_row_visits_nothing(opt):
  seg = np.zeros((B, T), np.int32)
  seg[1] = 1  # the other row is one document, so the batch is not trivial
  pos = arange_positions(B, T)
  q_ranges, kv_ranges = plan_np(Layout(seg, seg, pos, pos), 16, 16, *opt)
  assert int(masks.visited_tiles(q_ranges[:1])) == 0
  assert int(masks.visited_tiles(kv_ranges[:1])) == 0
  assert int(masks.visited_tiles(q_ranges[1:])) > 0


# ----------------------------------------------------------------------------
# Work: with documents aligned to tiles, the visited-tile count follows from
# the document lengths alone, far below the dense count.

BLOCK = 16
N_TILES = 16  # T = 256
DOC_TILES = [  # document lengths in tiles, each list sums to N_TILES
    [16], [8, 8], [4, 4, 4, 4], [1] * 16, [2] * 8, [8, 4, 2, 1, 1], [3, 5, 7, 1],
]


def _aligned_layout(doc_tiles, pad_tiles=0):
  t = (sum(doc_tiles) + pad_tiles) * BLOCK
  ids = ids_from_runs([(n * BLOCK, False) for n in doc_tiles], t)[None]
  pos = arange_positions(1, t)
  return Layout(ids, ids, pos, pos)


def _counts(layout, causal, window):
  q_ranges, kv_ranges = plan_np(layout, BLOCK, BLOCK, causal, window)
  visited = int(masks.visited_tiles(q_ranges))
  unmasked = int(np.sum(q_ranges[..., 2] - q_ranges[..., 1]))
  return visited, unmasked, int(masks.visited_tiles(kv_ranges))


@pytest.mark.parametrize("doc_tiles", DOC_TILES, ids=str)
def test_causal_visited_tiles_follow_document_lengths(doc_tiles):
  visited, unmasked, visited_kv = _counts(_aligned_layout(doc_tiles), True, None)
  assert visited == sum(n * (n + 1) // 2 for n in doc_tiles)
  assert visited_kv == visited
  # strictly-below-diagonal tiles of each document need no mask
  assert unmasked == sum(n * (n - 1) // 2 for n in doc_tiles)


@pytest.mark.parametrize("doc_tiles", DOC_TILES, ids=str)
def test_bidirectional_visited_tiles_follow_document_lengths(doc_tiles):
  visited, unmasked, visited_kv = _counts(_aligned_layout(doc_tiles), False, None)
  assert visited == visited_kv == sum(n * n for n in doc_tiles)
  assert unmasked == visited


@pytest.mark.parametrize("window_tiles", [1, 2, 5])
@pytest.mark.parametrize("doc_tiles", DOC_TILES, ids=str)
def test_windowed_visited_tiles_follow_document_lengths(doc_tiles, window_tiles):
  # q tile i of a document sees kv tiles i - window_tiles .. i of it.
  window = window_tiles * BLOCK
  visited, _, visited_kv = _counts(_aligned_layout(doc_tiles), True, window)
  want = sum(min(i, window_tiles) + 1 for n in doc_tiles for i in range(n))
  assert visited == visited_kv == want


@given(ids=aligned_documents(N_TILES * BLOCK, BLOCK))
def test_causal_visited_tiles_for_random_aligned_documents(ids):
  lengths = np.bincount(ids)[1:] // BLOCK
  pos = arange_positions(1, ids.size)
  layout = Layout(ids[None], ids[None], pos, pos)
  visited, _, _ = _counts(layout, True, None)
  assert visited == sum(int(n) * (int(n) + 1) // 2 for n in lengths)


def test_padding_tiles_add_no_work():
  doc_tiles = [4, 2]
  visited, _, visited_kv = _counts(_aligned_layout(doc_tiles, pad_tiles=10), True, None)
  assert visited == visited_kv == 10 + 3


def test_tile_skipping_cuts_work_far_below_dense():
  """64 documents of 2 tiles in a row of 128 tiles: 192 tiles, not 8256."""
  n_tiles, doc = 128, 2
  visited, _, visited_kv = _counts(_aligned_layout([doc] * (n_tiles // doc)), True, None)
  dense_causal = n_tiles * (n_tiles + 1) // 2
  assert visited == visited_kv == (n_tiles // doc) * doc * (doc + 1) // 2
  assert visited * 40 < dense_causal


# ----------------------------------------------------------------------------
# General masks: occupancy evaluated pair by pair, and tile lists


def occupancy_np(allowed, block_q, block_k):
  """(any, all) bool [..., nq, nk] of bool [..., Tq, Tk]."""
  *lead, tq, tk = allowed.shape
  tiles = allowed.reshape(*lead, tq // block_q, block_q, tk // block_k, block_k)
  return tiles.any(axis=(-3, -1)), tiles.all(axis=(-3, -1))


def lists_np(visit, full):
  """Per major tile: (count, [(minor tile, needs_mask), ...] ascending)."""
  out = {}
  for idx in np.ndindex(visit.shape[:-1]):
    cols = np.nonzero(visit[idx])[0]
    out[idx] = (len(cols), [(int(c), bool(~full[idx][c])) for c in cols])
  return out


def decode_lists(lists):
  """The same from an int32 [..., n_major, n_minor + 1] tile list."""
  out = {}
  for idx in np.ndindex(lists.shape[:-1]):
    n = int(lists[idx][0])
    out[idx] = (n, [(int(e) // 2, bool(e % 2)) for e in lists[idx][1:n + 1]])
  return out


MASK_SHAPE = (B, 2, T, T)  # per-head masks


@functools.lru_cache(maxsize=None)
def _any_all_fn(block_q, block_k, max_pairs):
  def f(mask):
    rows = lambda start, n: jax.lax.dynamic_slice_in_dim(mask, start, n, 2)  # noqa: E731
    return masks.tile_any_all(rows, q_len=T, block_q=block_q, block_k=block_k,
                              max_pairs=max_pairs)
  return jax.jit(f)


@pytest.mark.parametrize("max_pairs", [1 << 24, 2 * 16 * T * 2],
                         ids=["one-step", "chunks-of-one-q-tile"])
@pytest.mark.parametrize("blocks", [(16, 16), (8, 16), (16, 8)], ids=_blk_id)
@given(mask=dense_masks(MASK_SHAPE))
def test_tile_occupancy_of_a_dense_mask_is_exact(blocks, max_pairs, mask):
  got = _any_all_fn(*blocks, max_pairs)(mask)
  for g, w in zip(got, occupancy_np(mask, *blocks)):
    np.testing.assert_array_equal(np.asarray(g), w)


@given(mask=dense_masks(MASK_SHAPE))
def test_coarsened_occupancy_equals_occupancy_of_larger_tiles(mask):
  fine = occupancy_np(mask, 8, 8)
  got = masks.coarsen_tiles(*fine, 2, 4)
  for g, w in zip(got, occupancy_np(mask, 16, 32)):
    np.testing.assert_array_equal(np.asarray(g), w)


@given(mask=dense_masks(MASK_SHAPE))
def test_tile_lists_name_exactly_the_nonempty_tiles_in_order(mask):
  visit, full = occupancy_np(mask, 16, 16)
  got = jax.jit(masks.tile_lists)(visit, full)
  assert got.shape == visit.shape[:-1] + (visit.shape[-1] + 1,)
  assert decode_lists(np.asarray(got)) == lists_np(visit, full)


@functools.lru_cache(maxsize=None)
def _list_plan_fn(causal):
  config = KernelConfig(forward=TileConfig(32, 16), dq=TileConfig(16, 16),
                        dkdv=TileConfig(32, 8))
  shape = jax.ShapeDtypeStruct((B, T, 2, 16), jnp.float32)
  return jax.jit(lambda ids, mask: make_attention_plan(
      shape, shape, **ids, mask=mask, causal=causal, config=config))


@pytest.mark.parametrize("causal", [False, True])
@given(mask=dense_masks((B, 1, T, T)), data=st.data())
def test_list_plans_of_every_tiling_follow_the_whole_mask(causal, mask, data):
  """Plan of segment ids AND causal AND a dense mask, per kernel tiling, both views.

  Tilings forward 32x16, dQ 16x16, dK/dV 8x32 (q x kv): planned at 8x16, coarsened.
  """
  layout = data.draw(self_layouts(B, T))
  plan = _list_plan_fn(causal)(layout.kwargs(), mask)
  allowed = allowed_np(layout, causal=causal)[:, None] & mask
  for lists, blocks, view in ((plan.tiles.forward, (32, 16), "q_lists"),
                              (plan.tiles.dq, (16, 16), "q_lists"),
                              (plan.tiles.dkdv, (8, 32), "kv_lists")):
    visit, full = occupancy_np(allowed, *blocks)
    if view == "kv_lists":
      visit, full = visit.swapaxes(-1, -2), full.swapaxes(-1, -2)
    assert decode_lists(np.asarray(getattr(lists, view))) == lists_np(visit, full)


def test_clustered_graph_visits_few_tiles():
  """Random clustered graph, 8192 nodes, 64x64 tiles: the plan visits ~10% of them."""
  n = 8192
  graph = clustered_graph_mask(1, n, seed=0)
  shape = jax.ShapeDtypeStruct((1, n, 1, 64), jnp.bfloat16)
  plan = make_attention_plan(shape, shape, mask=graph, causal=False,
                             config=KernelConfig.uniform(64))
  visit, full = occupancy_np(graph, 64, 64)
  visited = int(masks.listed_tiles(plan.tiles.forward.q_lists))
  assert visited == visit.sum() == int(masks.listed_tiles(plan.tiles.forward.kv_lists))
  assert visited * 8 < visit.size
  assert full.sum() < visited  # ragged: most visited tiles need the mask
