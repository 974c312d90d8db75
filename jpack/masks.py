"""The mask and the tile plan.

The mask: query i may attend to key j iff

    seg_q[i] == seg_kv[j] != 0
    and (not causal or pos_kv[j] <= pos_q[i])
    and (sliding_window is None or pos_q[i] - pos_kv[j] < sliding_window)
    and (a general mask, if given: a dense boolean array or a rule of
         `jpack.mask_rules`, allows (i, j)).

The tile plan says, for each tile of queries, which tiles of keys can contain an
allowed pair, and which of those contain only allowed pairs (so the kernel may
skip the mask arithmetic there). Two kinds:

- ranges (`TilePlan`), for document masks: computed from per-tile min/max of
  segment ids and positions, which is always correct whatever the ids are, and
  tight when documents are contiguous runs, as packing makes them. O(tiles).
- lists (`TileLists`), for general masks: every pair is evaluated once, in
  chunks of q tiles (O(Tq * Tk) elementwise work, O(chunk * Tk) memory), and
  each tile row lists exactly its non-empty tiles, so scattered (clustered)
  masks cost only their non-empty tiles.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jpack.mask_rules import Tokens
from pallas_kernels.config import COMPARE_SPLIT_BITS, GROUP_SPAN_BITS, SPAN_HALF_BITS

_INT_MAX = jnp.iinfo(jnp.int32).max
_INT_MIN = jnp.iinfo(jnp.int32).min


def allowed_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions, *,
                 causal: bool, sliding_window: int | None):
  """Dense boolean mask of allowed (query, key) pairs.

  Args:
    q_segment_ids, q_positions: int32 [B, Tq].
    kv_segment_ids, kv_positions: int32 [B, Tk].

  Returns:
    bool [B, Tq, Tk].
  """
  qs, ks = q_segment_ids[:, :, None], kv_segment_ids[:, None, :]
  mask = (qs == ks) & (qs != 0)
  qp, kp = q_positions[:, :, None], kv_positions[:, None, :]
  if causal:
    mask &= kp <= qp
  if sliding_window is not None:
    mask &= qp - kp < sliding_window
  return mask


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TileStats:
  """Per-tile summary of segment ids and positions; all int32 [B, num_tiles].

  Padding (id 0) is left out of every statistic; a tile of padding only has
  seg_min > seg_max. `uniform` is true when every token of the tile belongs to
  the same (non-padding) document.
  """
  seg_min: jax.Array
  seg_max: jax.Array
  pos_min: jax.Array
  pos_max: jax.Array
  uniform: jax.Array


def tile_stats(segment_ids, positions, block: int) -> TileStats:
  """Summarise [B, T] ids and positions per tile of `block` tokens (T % block == 0)."""
  b, t = segment_ids.shape
  seg = segment_ids.reshape(b, t // block, block)
  pos = positions.reshape(b, t // block, block)
  valid = seg != 0
  seg_min = jnp.min(jnp.where(valid, seg, _INT_MAX), axis=-1)
  seg_max = jnp.max(jnp.where(valid, seg, _INT_MIN), axis=-1)
  return TileStats(
      seg_min=seg_min,
      seg_max=seg_max,
      pos_min=jnp.min(jnp.where(valid, pos, _INT_MAX), axis=-1),
      pos_max=jnp.max(jnp.where(valid, pos, _INT_MIN), axis=-1),
      uniform=jnp.all(valid, axis=-1) & (seg_min == seg_max),
  )


def coarsen_stats(stats: TileStats, factor: int) -> TileStats:
  """The statistics of tiles `factor` times larger, from those of the smaller tiles.

  Combined from strided slices (elementwise), so that a compiled plan reduces
  the tokens once, at the finest tiling, and XLA fuses this into its users.
  """
  if factor == 1:
    return stats
  parts = lambda x: [x[:, i::factor] for i in range(factor)]  # noqa: E731
  seg_min = functools.reduce(jnp.minimum, parts(stats.seg_min))
  seg_max = functools.reduce(jnp.maximum, parts(stats.seg_max))
  # Uniform parts have seg_min == seg_max; the whole is uniform iff all parts
  # are and they share one id.
  uniform = functools.reduce(jnp.logical_and, parts(stats.uniform)) & (seg_min == seg_max)
  return TileStats(seg_min=seg_min, seg_max=seg_max,
                   pos_min=functools.reduce(jnp.minimum, parts(stats.pos_min)),
                   pos_max=functools.reduce(jnp.maximum, parts(stats.pos_max)),
                   uniform=uniform)


def _pairwise(q: TileStats, kv: TileStats):
  """({name: [B, nq, 1]}, {name: [B, 1, nk]}): the statistics, broadcastable per tile pair."""
  return ({f.name: getattr(q, f.name)[:, :, None] for f in dataclasses.fields(q)},
          {f.name: getattr(kv, f.name)[:, None, :] for f in dataclasses.fields(kv)})


def tile_occupancy(q: TileStats, kv: TileStats, *, causal: bool,
                   sliding_window: int | None):
  """Which (q tile, kv tile) pairs can attend, and which are fully allowed.

  Returns:
    (visit, full): bool [B, nq, nk] each; full implies visit. `visit` is false
    only where no pair of the two tiles can be allowed; `full` is true only
    where every pair is allowed.
  """
  qd, kd = _pairwise(q, kv)
  visit = (qd["seg_min"] <= kd["seg_max"]) & (kd["seg_min"] <= qd["seg_max"])
  full = qd["uniform"] & kd["uniform"] & (qd["seg_min"] == kd["seg_min"])
  if causal:
    visit &= kd["pos_min"] <= qd["pos_max"]
    full &= kd["pos_max"] <= qd["pos_min"]
  if sliding_window is not None:
    visit &= qd["pos_min"] - kd["pos_max"] < sliding_window
    full &= qd["pos_max"] - kd["pos_min"] < sliding_window
  return visit, full & visit


def visit_ranges(visit, full):
  """Compress per-pair flags into loop bounds, one row per major tile.

  Args:
    visit, full: bool [B, n_major, n_minor].

  Returns:
    int32 [B, n_major, 4]: (lo, full_lo, full_hi, hi). The kernel visits minor
    tiles [lo, hi), with the mask in [lo, full_lo) and [full_hi, hi) and
    without it in [full_lo, full_hi), where every pair is allowed. Full tiles
    outside that first run are visited with the mask: correct, only slower.
  """
  n = visit.shape[-1]
  idx = jnp.arange(n, dtype=jnp.int32)
  # The first run of full tiles ends at the first falling edge (a tile that is not
  # full after one that is), or at hi: so all four bounds come from one pass.
  after_full = jnp.pad(full[..., :-1], [(0, 0)] * (full.ndim - 1) + [(1, 0)])
  (lo, full_lo, run_end), (hi,) = min_max_last(
      mins=(jnp.where(visit, idx, n), jnp.where(full, idx, n),
            jnp.where(after_full & ~full, idx, n)),
      maxs=(jnp.where(visit, idx + 1, 0),))
  any_visit, any_full = lo < n, full_lo < n
  lo = jnp.where(any_visit, lo, 0)
  full_hi = jnp.where(any_full, jnp.minimum(run_end, hi), hi)
  full_lo = jnp.where(any_full, full_lo, hi)
  return jnp.stack([lo, full_lo, full_hi, hi], axis=-1).astype(jnp.int32)


def min_max_last(mins=(), maxs=()):
  """(mins, maxs): the minimum of each array of `mins` and the maximum of each of
  `maxs` over the last axis; int32 arrays of one shape.

  One variadic reduction: XLA runs it as one kernel, where separate reductions
  of one input were split over several kernels (perf_notes entry 37).
  """
  mins, maxs = tuple(mins), tuple(maxs)
  k = len(mins)

  def combine(a, b):
    return (tuple(jnp.minimum(x, y) for x, y in zip(a[:k], b[:k]))
            + tuple(jnp.maximum(x, y) for x, y in zip(a[k:], b[k:])))

  out = jax.lax.reduce(mins + maxs, (jnp.int32(_INT_MAX),) * k
                       + (jnp.int32(_INT_MIN),) * len(maxs), combine,
                       ((mins + maxs)[0].ndim - 1,))
  return tuple(out[:k]), tuple(out[k:])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TilePlan:
  """Loop bounds for one tiling (block_q x block_k) of one attention call.

  Attributes:
    q_ranges: int32 [B, nq, 4], per q tile the kv tiles to visit (forward, dQ).
    kv_ranges: int32 [B, nk, 4], per kv tile the q tiles to visit (dK/dV).
    q_compares: int32 [B, nq], per q tile the masked kv tiles that need only
      one of the mask's two compares (`compare_splits`).
    kv_compares: int32 [B, nk], the same per kv tile (its masked q tiles).
    q_spans: int32 [B, nq], per q tile and group of GROUP_ROWS rows the half
      kv tiles at either end of its range that the group cannot attend
      (`group_spans`).
  The ranges use the (lo, full_lo, full_hi, hi) layout of `visit_ranges`.
  """
  q_ranges: jax.Array
  kv_ranges: jax.Array
  q_compares: jax.Array
  kv_compares: jax.Array
  q_spans: jax.Array
  block_q: int = dataclasses.field(metadata=dict(static=True))
  block_k: int = dataclasses.field(metadata=dict(static=True))


def make_tile_plan(q_segment_ids, kv_segment_ids, q_positions, kv_positions, *,
                   block_q: int, block_k: int, causal: bool,
                   sliding_window: int | None) -> TilePlan:
  """Tile plan for [B, Tq] / [B, Tk] ids and positions (Tq % block_q == 0, Tk % block_k == 0).

  Costs O(B * Tq/block_q * Tk/block_k) elementwise work, far below attention.
  The ids and positions are read once, at token_tilings (the group spans'
  finer tiles), and the plan's tile statistics combined from those.
  """
  read_q, read_k = token_tilings(block_q, block_k)
  q_fine = tile_stats(q_segment_ids, q_positions, read_q)
  kv_fine = tile_stats(kv_segment_ids, kv_positions, read_k)
  q = coarsen_stats(q_fine, block_q // read_q)
  kv = coarsen_stats(kv_fine, block_k // read_k)
  visit, full = tile_occupancy(q, kv, causal=causal,
                               sliding_window=sliding_window)
  q_ranges = visit_ranges(visit, full)
  kv_ranges = visit_ranges(visit.transpose(0, 2, 1), full.transpose(0, 2, 1))
  q_compares, kv_compares = compare_splits(q, kv, q_ranges, kv_ranges, causal=causal,
                                           sliding_window=sliding_window)
  q_spans = (_spans_of_stats(q_fine, kv_fine, q_ranges, causal=causal,
                             sliding_window=sliding_window)
             if _group_rows(block_q, block_k) else jnp.zeros(q_ranges.shape[:2], jnp.int32))
  return TilePlan(q_ranges=q_ranges, kv_ranges=kv_ranges, q_compares=q_compares,
                  kv_compares=kv_compares, q_spans=q_spans, block_q=block_q,
                  block_k=block_k)


GROUP_ROWS = 64
"""The row groups of group_spans: one consumer warpgroup's rows in the Mosaic kernels."""


def group_spans(q_segment_ids, kv_segment_ids, q_positions, kv_positions, q_ranges, *,
                block_q: int, block_k: int, causal: bool, sliding_window: int | None,
                rows: int = GROUP_ROWS):
  """int32 [B, nq]: per q tile and group of `rows` rows, the half kv tiles at either
  end of the tile's kv range [lo, hi) that the group's rows cannot attend.

  Group g has bits [GROUP_SPAN_BITS * g, ... + 16) (pallas_kernels.config):
  front + (back << SPAN_HALF_BITS), where the group attends nothing in the
  first `front` and the last `back` halves (block_k / 2 keys each) of the
  range's 2 * (hi - lo). A consumer may skip those kv tiles and run a tile
  whose other half it needs on that half only: the rows of a document that
  starts inside the q tile skip the earlier documents' tiles, the first rows
  of a diagonal tile see only its first half. A group that attends nothing
  in the range has front = 2 * (hi - lo), back = 0. Each is capped at 255 (a
  smaller count only leaves masked work to do). Decided by tile_occupancy at
  the finer tiling (rows x block_k / 2), so sound like the plan itself; 0 for
  an empty row, and for every row when block_q is not a multiple of rows, an
  odd block_k, or more than two groups (32 bits).
  """
  if not _group_rows(block_q, block_k, rows):
    return jnp.zeros(q_ranges.shape[:2], jnp.int32)
  return _spans_of_stats(tile_stats(q_segment_ids, q_positions, rows),
                         tile_stats(kv_segment_ids, kv_positions, block_k // 2), q_ranges,
                         causal=causal, sliding_window=sliding_window)


def token_tilings(block_q: int, block_k: int) -> tuple[int, int]:
  """(q tokens, kv tokens) per tile at which make_tile_plan reads the ids and
  positions: group_spans' row groups and half kv tiles where they apply (the
  plan's own tiles are combined from those), else the tiles themselves."""
  rows = _group_rows(block_q, block_k)
  return (rows, block_k // 2) if rows else (block_q, block_k)


def _group_rows(block_q: int, block_k: int, rows: int = GROUP_ROWS) -> int:
  """`rows` if group_spans can encode row groups of that size for this tiling, else 0."""
  groups = block_q // rows
  return 0 if block_q % rows or block_k % 2 or groups * GROUP_SPAN_BITS > 32 else rows


def _spans_of_stats(q_groups: TileStats, kv_halves: TileStats, q_ranges, *, causal: bool,
                    sliding_window: int | None):
  """group_spans from the statistics of the row groups [B, nq * groups] and of the
  half kv tiles [B, 2 nk].

  Reduced over the kv tiles ([B, nq, nk], each tile's two halves side by side),
  the shape of compare_splits' reductions, so that XLA may run them in one kernel.
  """
  batch, n_q = q_ranges.shape[:2]
  groups = q_groups.seg_min.shape[1] // n_q
  n_k = kv_halves.seg_min.shape[1] // 2
  tile = jnp.arange(n_k, dtype=jnp.int32)
  lo, hi = (2 * q_ranges[..., i, None] for i in (0, 3))  # [B, nq, 1], in halves
  big = 2 * n_k
  firsts, lasts = [], []  # per group: [B, nq, nk], the group's first / last half seen
  for g in range(groups):
    q = TileStats(*(x[:, g::groups] for x in dataclasses.astuple(q_groups)))
    seen = []  # per half h: bool [B, nq, nk], the group attends keys of half 2 t + h
    for h in range(2):
      kv = TileStats(*(x[:, h::2] for x in dataclasses.astuple(kv_halves)))
      visit, _ = tile_occupancy(q, kv, causal=causal, sliding_window=sliding_window)
      half = 2 * tile + h
      seen.append(visit & (half >= lo) & (half < hi))
    firsts.append(jnp.where(seen[0], 2 * tile, jnp.where(seen[1], 2 * tile + 1, big)))
    lasts.append(jnp.where(seen[1], 2 * tile + 1, jnp.where(seen[0], 2 * tile, -1)))
  firsts, lasts = min_max_last(mins=firsts, maxs=lasts)
  lo, hi = lo[..., 0], hi[..., 0]
  cap = 2**SPAN_HALF_BITS - 1
  word = jnp.zeros((batch, n_q), jnp.int32)
  for g, (first, last) in enumerate(zip(firsts, lasts)):
    any_seen = first < big
    front = jnp.minimum(jnp.where(any_seen, first - lo, hi - lo), cap)
    back = jnp.minimum(jnp.where(any_seen, hi - 1 - last, 0), cap)
    word |= (front | back << SPAN_HALF_BITS) << (GROUP_SPAN_BITS * g)
  return word


def compare_splits(q: TileStats, kv: TileStats, q_ranges, kv_ranges, *, causal: bool,
                   sliding_window: int | None):
  """(q_compares int32 [B, nq], kv_compares int32 [B, nk]): the masked tiles of each
  plan row that need only one of the mask's two compares.

  Each is ids_len + (positions_len << COMPARE_SPLIT_BITS) (pallas_kernels.
  config). ids_len tiles have all their kv positions at or below all their q
  positions (and within the window), so their mask is the segment-id compare
  alone (typical below the diagonal, with positions that grow along the row);
  positions_len tiles lie inside one document (no padding), so their mask is
  the position compares alone (typical of a diagonal tile). In a q row
  (q_ranges) the ids_len tiles are the first ones from lo and the
  positions_len tiles the last ones up to hi; in a kv row (kv_ranges) the
  positions_len tiles come first (the diagonal) and the ids_len tiles last.
  Every tile of such a span qualifies, visited or not (the kernels visit them
  all), by the same statistics as the plan; 0 and 0 for an empty row.
  """
  qd, kd = _pairwise(q, kv)
  # A tile of padding only (seg_min > seg_max) is masked by the ids compare alone.
  ids_suffice = (qd["seg_min"] > qd["seg_max"]) | (kd["seg_min"] > kd["seg_max"])
  below = jnp.ones_like(ids_suffice)
  if causal:
    below &= kd["pos_max"] <= qd["pos_min"]
  if sliding_window is not None:
    below &= qd["pos_max"] - kd["pos_min"] < sliding_window
  ids_suffice |= below
  positions_suffice = qd["uniform"] & kd["uniform"] & (qd["seg_min"] == kd["seg_min"])
  ids_q, positions_q = _span_lengths(ids_suffice, positions_suffice, q_ranges)
  positions_kv, ids_kv = _span_lengths(positions_suffice.transpose(0, 2, 1),
                                       ids_suffice.transpose(0, 2, 1), kv_ranges)
  def pack(ids, positions):
    return (ids | (positions << COMPARE_SPLIT_BITS)).astype(jnp.int32)

  return pack(ids_q, positions_q), pack(ids_kv, positions_kv)


def _span_lengths(first, last, ranges):
  """(prefix, suffix) int32 [B, n_major]: how many tiles from lo have `first` all true,
  and how many up to hi have `last` all true.

  first, last: bool [B, n_major, n_minor]; ranges: int32 [B, n_major, 4].
  """
  idx = jnp.arange(first.shape[-1], dtype=jnp.int32)
  lo, hi = ranges[..., 0], ranges[..., 3]
  in_row = (idx >= lo[..., None]) & (idx < hi[..., None])
  (prefix_end,), (suffix_last,) = min_max_last(
      mins=(jnp.where(in_row & ~first, idx, hi[..., None]),),
      maxs=(jnp.where(in_row & ~last, idx, lo[..., None] - 1),))
  return prefix_end - lo, hi - 1 - suffix_last


def visited_tiles(ranges):
  """Number of tiles a plan visits: int, summed over batch and major tiles."""
  return jnp.sum(ranges[..., 3] - ranges[..., 0])


# ----------------------------------------------------------------------------
# General masks: a dense boolean array and/or a rule, ANDed with the above


def general_allowed(q_segment_ids, kv_segment_ids, q_positions, kv_positions, *,
                    causal: bool, sliding_window: int | None, dense=None,
                    rule=None, kv_doc_starts=None):
  """Dense boolean mask of allowed pairs, a general mask included.

  Args:
    q_segment_ids, q_positions: int32 [B, Tq].
    kv_segment_ids, kv_positions, kv_doc_starts: int32 [B, Tk]; kv_doc_starts
      only if the rule needs_doc_start.
    dense: bool [B or 1, Hm, Tq, Tk], or None.
    rule: a `jpack.mask_rules.MaskRule`, or None.

  Returns:
    bool [B, Hm, Tq, Tk] (Hm = 1 without a dense mask).
  """
  mask = allowed_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                      causal=causal, sliding_window=sliding_window)
  if rule is not None:
    q = Tokens(q_positions[:, :, None], q_segment_ids[:, :, None])
    kv = Tokens(
        kv_positions[:, None, :], kv_segment_ids[:, None, :],
        None if kv_doc_starts is None else kv_doc_starts[:, None, :])
    mask &= rule(q, kv)
  mask = mask[:, None]
  if dense is not None:
    mask &= dense
  return mask


def _steps(n_tiles, pairs_per_tile, max_pairs):
  """Largest divisor of n_tiles whose tiles hold at most max_pairs pairs (>= 1)."""
  fits = [d for d in range(1, n_tiles + 1)
          if n_tiles % d == 0 and d * pairs_per_tile <= max_pairs]
  return max(fits, default=1)


def tile_any_all(allowed_rows, *, q_len: int, block_q: int, block_k: int,
                 max_pairs: int = 1 << 24):
  """Per-tile occupancy of a mask given row by row, in bounded memory.

  Args:
    allowed_rows: (start, n) -> bool [B, H, n, Tk], rows [start, start + n)
      of the mask (start traced, n static).
    q_len: Tq, a multiple of block_q (Tk a multiple of block_k).
    max_pairs: rows are evaluated in chunks of whole q tiles of at most about
      this many pairs (B * H * rows * Tk), so memory stays O(max_pairs).

  Returns:
    (any, all): bool [B, H, Tq/block_q, Tk/block_k]; whether some / every pair
    of the tile is allowed.
  """
  n_q = q_len // block_q
  b, h, _, tk = jax.eval_shape(lambda: allowed_rows(0, block_q)).shape
  per_step = _steps(n_q, b * h * block_q * tk, max_pairs)
  rows = per_step * block_q

  def step(c):
    a = allowed_rows(c * rows, rows).reshape(b, h, per_step, block_q,
                                             tk // block_k, block_k)
    return jnp.any(a, axis=(3, 5)), jnp.all(a, axis=(3, 5))

  def merge(x):  # [steps, B, H, per_step, nk] -> [B, H, nq, nk]
    return jnp.moveaxis(x, 0, 2).reshape(b, h, n_q, tk // block_k)

  any_, all_ = jax.lax.map(step, jnp.arange(n_q // per_step))
  return merge(any_), merge(all_)


def coarsen_tiles(any_, all_, factor_q: int, factor_k: int):
  """Occupancy of tiles factor_q x factor_k times larger: [..., nq, nk] -> [..., nq/fq, nk/fk]."""
  *lead, nq, nk = any_.shape
  shape = (*lead, nq // factor_q, factor_q, nk // factor_k, factor_k)
  axes = (len(lead) + 1, len(lead) + 3)
  return (jnp.any(any_.reshape(shape), axis=axes),
          jnp.all(all_.reshape(shape), axis=axes))


def tile_lists(visit, full):
  """Per major tile, the minor tiles to visit, as a list.

  Args:
    visit, full: bool [..., n_major, n_minor]; full implies visit.

  Returns:
    int32 [..., n_major, n_minor + 1]: entry 0 is the count n; entries 1..n
    are 2 * minor_tile + needs_mask in ascending minor_tile (needs_mask = not
    full). Entries past n are not meant to be read.
  """
  n = visit.shape[-1]
  idx = jnp.arange(n, dtype=jnp.int32)
  entry = jnp.where(visit, 2 * idx + (~full).astype(jnp.int32), 2 * n)
  count = jnp.sum(visit, axis=-1, dtype=jnp.int32)
  return jnp.concatenate([count[..., None], jnp.sort(entry, axis=-1)], axis=-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TileLists:
  """Tile lists for one tiling (block_q x block_k) of a general mask.

  Attributes:
    q_lists: int32 [B, Hp, nq, nk + 1], per q tile the kv tiles to visit
      (forward, dQ), in the layout of `tile_lists`.
    kv_lists: int32 [B, Hp, nk, nq + 1], per kv tile the q tiles (dK/dV).
  Hp is the number of heads of a per-head dense mask, else 1.
  """
  q_lists: jax.Array
  kv_lists: jax.Array
  block_q: int = dataclasses.field(metadata=dict(static=True))
  block_k: int = dataclasses.field(metadata=dict(static=True))


def make_tile_lists(any_, all_, *, block: tuple[int, int], block_q: int,
                    block_k: int) -> TileLists:
  """TileLists at block_q x block_k from occupancy at the finer `block` (bq, bk)."""
  visit, full = coarsen_tiles(any_, all_, block_q // block[0], block_k // block[1])
  return TileLists(
      q_lists=tile_lists(visit, full),
      kv_lists=tile_lists(jnp.swapaxes(visit, -1, -2), jnp.swapaxes(full, -1, -2)),
      block_q=block_q, block_k=block_k)


def listed_tiles(lists):
  """Number of tiles a list plan visits: int, summed over everything."""
  return jnp.sum(lists[..., 0])
