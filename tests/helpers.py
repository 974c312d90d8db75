"""Shared test helpers: packed-row layouts (hypothesis strategies), random
inputs, a numpy mask oracle, and error measures.

Layouts are *data*: every strategy here draws segment ids and positions for a
fixed (batch, length), so kernels jitted over those arrays compile once per
shape and are reused across hypothesis examples.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

from experiments.layouts import clustered_graph_mask

# ----------------------------------------------------------------------------
# Layouts


@dataclasses.dataclass(frozen=True)
class Layout:
  """Segment ids and positions of one attention call, int32 numpy arrays.

  q_segment_ids, q_positions: [B, Tq]; kv_segment_ids, kv_positions: [B, Tk].
  """
  q_segment_ids: np.ndarray
  kv_segment_ids: np.ndarray
  q_positions: np.ndarray
  kv_positions: np.ndarray

  def kwargs(self):
    """Keyword arguments for flash_attention / reference_attention."""
    return dict(q_segment_ids=self.q_segment_ids,
                kv_segment_ids=self.kv_segment_ids,
                q_positions=self.q_positions, kv_positions=self.kv_positions)

  def arrays(self):
    """(q_seg, kv_seg, q_pos, kv_pos) as jnp int32, for jitted callables."""
    return tuple(jnp.asarray(a, jnp.int32) for a in (
        self.q_segment_ids, self.kv_segment_ids, self.q_positions,
        self.kv_positions))


def ids_from_runs(runs, length) -> np.ndarray:
  """Row of segment ids from (run_length, is_padding) runs.

  Documents get ids 1, 2, 3, ... in order; padding runs get 0. The row is cut
  to `length`, or filled with padding up to it.
  """
  ids, next_id = [], 1
  for n, pad in runs:
    if pad:
      ids += [0] * n
    else:
      ids += [next_id] * n
      next_id += 1
  ids = (ids + [0] * length)[:length]
  return np.asarray(ids, np.int32)


def _runs(lengths):
  """(length, is_padding) runs of documents only."""
  return [(n, False) for n in lengths]


def one_document(length):
  return st.just(np.ones(length, np.int32))


def one_token_documents(length):
  return st.just(np.arange(1, length + 1, dtype=np.int32))


@st.composite
def padding_at_end(draw, length):
  """Some documents, then padding to the end of the row."""
  n_pad = draw(st.integers(1, length - 1))
  lengths = draw(st.lists(st.integers(1, length), min_size=1, max_size=4))
  ids = ids_from_runs(_runs(lengths), length - n_pad)
  return np.concatenate([ids, np.zeros(n_pad, np.int32)])


@st.composite
def padding_in_middle(draw, length):
  """document(s), padding, document(s), (maybe padding)."""
  a = draw(st.integers(1, length // 2))
  gap = draw(st.integers(1, length // 2))
  b = draw(st.integers(1, length))
  tail_pad = draw(st.booleans())
  runs = [(a, False), (gap, True), (b, False)]
  if tail_pad:
    runs.append((draw(st.integers(1, 8)), True))
  return ids_from_runs(runs, length)


@st.composite
def straddling_tiles(draw, length, block=16):
  """Documents whose boundaries fall inside tiles of `block` tokens."""
  lengths = draw(st.lists(
      st.tuples(st.integers(0, 2), st.integers(1, block - 1)).map(
          lambda t: t[0] * block + t[1]),
      min_size=1, max_size=length))
  return ids_from_runs(_runs(lengths), length)


@st.composite
def repeated_ids(draw, length):
  """Non-contiguous documents: the same id in several places (1,2,1,2...).

  Either a periodic pattern of `n_ids` ids with runs of `run` tokens, or ids
  drawn at random per token (padding scattered in between).
  """
  if draw(st.booleans()):
    run = draw(st.integers(1, 8))
    n_ids = draw(st.integers(2, 3))
    return (1 + (np.arange(length) // run) % n_ids).astype(np.int32)
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  return rng.integers(0, 4, size=length).astype(np.int32)


def all_padding(length):
  return st.just(np.zeros(length, np.int32))


@st.composite
def random_runs(draw, length):
  """Random run lengths, each run a new document or padding."""
  runs = draw(st.lists(
      st.tuples(st.integers(1, length),
                st.sampled_from([False, False, False, True])),  # 1 in 4 pads
      min_size=1, max_size=12))
  return ids_from_runs(runs, length)


@st.composite
def aligned_documents(draw, length, block):
  """Documents whose lengths are multiples of `block` (length % block == 0)."""
  n_tiles = length // block
  sizes, left = [], n_tiles
  while left:
    n = draw(st.integers(1, left))
    sizes.append(n)
    left -= n
  return ids_from_runs(_runs([n * block for n in sizes]), length)


# Kinds in which every document is one contiguous run and ids increase along
# the row (what packing produces).
CONTIGUOUS_KINDS = ("one_document", "one_token_documents", "padding_at_end",
                    "padding_in_middle", "straddling_tiles", "all_padding",
                    "random_runs")
ALL_KINDS = CONTIGUOUS_KINDS + ("repeated_ids",)

_KIND_STRATEGIES = dict(
    one_document=one_document, one_token_documents=one_token_documents,
    padding_at_end=padding_at_end, padding_in_middle=padding_in_middle,
    straddling_tiles=straddling_tiles, repeated_ids=repeated_ids,
    all_padding=all_padding, random_runs=random_runs)


def row_ids(length, kinds=ALL_KINDS):
  """Strategy: one row of segment ids, int32 [length], of one of `kinds`."""
  return st.one_of([_KIND_STRATEGIES[k](length) for k in kinds])


@st.composite
def segment_ids(draw, batch, length, kinds=ALL_KINDS):
  """Strategy: int32 [batch, length]; each row drawn independently."""
  return np.stack([draw(row_ids(length, kinds)) for _ in range(batch)])


@st.composite
def custom_positions(draw, batch, length):
  """Strategy: int32 [batch, length] positions that are not arange.

  Increasing with random gaps and offsets, or arbitrary values in [0, 2T).
  """
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  if draw(st.booleans()):
    steps = rng.integers(0, 4, size=(batch, length))
    pos = np.cumsum(steps, axis=1) + rng.integers(0, length, size=(batch, 1))
  else:
    pos = rng.integers(0, 2 * length, size=(batch, length))
  return pos.astype(np.int32)


def arange_positions(batch, length, offset=0):
  return np.broadcast_to(np.arange(offset, offset + length, dtype=np.int32),
                         (batch, length)).copy()


@st.composite
def self_layouts(draw, batch, length, kinds=ALL_KINDS, positions="arange"):
  """Strategy: Layout for self-attention (q and kv are the same tokens)."""
  seg = draw(segment_ids(batch, length, kinds))
  if positions == "arange":
    pos = arange_positions(batch, length)
  else:
    pos = draw(custom_positions(batch, length))
  return Layout(seg, seg, pos, pos)


@st.composite
def chunk_layouts(draw, batch, q_len, kv_len, kinds=ALL_KINDS):
  """Strategy: Layout for a q chunk against a kv chunk of one longer row.

  Like one step of context parallelism: a row of q_len + kv_len tokens is laid
  out, the queries are tokens [q_off, q_off + q_len), the keys tokens
  [kv_off, kv_off + kv_len); positions are indices in the full row, so the
  chunks may overlap, or the queries may sit before or after the keys.
  """
  full = q_len + kv_len
  seg = draw(segment_ids(batch, full, kinds))
  q_off = draw(st.integers(0, full - q_len))
  kv_off = draw(st.integers(0, full - kv_len))
  pos = arange_positions(batch, full)
  return Layout(seg[:, q_off:q_off + q_len], seg[:, kv_off:kv_off + kv_len],
                pos[:, q_off:q_off + q_len], pos[:, kv_off:kv_off + kv_len])


# ----------------------------------------------------------------------------
# General masks (dense boolean arrays), drawn from a seed


MASK_KINDS = ("density", "blocks", "empty_rows_cols", "graph")
DENSITIES = (0.0, 0.01, 0.1, 0.5, 0.9, 1.0)


def _blocks(rng, q_len, kv_len):
  """A few random rectangles (tile-aligned or not), each full or half full."""
  m = np.zeros((q_len, kv_len), bool)
  for _ in range(rng.integers(1, 5)):
    r0, c0 = rng.integers(0, q_len), rng.integers(0, kv_len)
    r1, c1 = rng.integers(r0 + 1, q_len + 1), rng.integers(c0 + 1, kv_len + 1)
    m[r0:r1, c0:c1] |= rng.random((r1 - r0, c1 - c0)) < rng.choice([0.5, 1.0])
  return m


def dense_mask_np(kind, seed, shape) -> np.ndarray:
  """bool `shape` = [..., Tq, Tk] of one family of MASK_KINDS, from `seed`.

  density: each pair allowed with a probability of DENSITIES; blocks: random
  rectangles; empty_rows_cols: half density with a quarter of the rows and of
  the columns emptied; graph: adjacency of random clustered graphs (Tq == Tk).
  """
  rng = np.random.default_rng(seed)
  *lead, q_len, kv_len = shape
  n = math.prod(lead)
  if kind == "density":
    m = rng.random((n, q_len, kv_len)) < rng.choice(DENSITIES)
  elif kind == "blocks":
    m = np.stack([_blocks(rng, q_len, kv_len) for _ in range(n)])
  elif kind == "empty_rows_cols":
    m = rng.random((n, q_len, kv_len)) < 0.5
    m[rng.random((n, q_len)) < 0.25] = False
    m.transpose(0, 2, 1)[rng.random((n, kv_len)) < 0.25] = False
  elif kind == "graph":
    assert q_len == kv_len
    m = clustered_graph_mask(n, q_len, seed=seed, mean_cluster=rng.integers(4, 17),
                             p_in=rng.choice([0.3, 1.0]), p_out=0.2,
                             self_loops=bool(rng.integers(2)))
  else:
    raise ValueError(kind)
  return m.reshape(shape)


@st.composite
def dense_masks(draw, shape, kinds=MASK_KINDS):
  """Strategy: bool numpy `shape` = [..., Tq, Tk] of one of `kinds`."""
  return dense_mask_np(draw(st.sampled_from(kinds)),
                       draw(st.integers(0, 2**31 - 1)), shape)


# ----------------------------------------------------------------------------
# Mask oracle (numpy, literal transcription of the rule)


def allowed_np(layout: Layout, *, causal, sliding_window=None) -> np.ndarray:
  """bool [B, Tq, Tk]: query i may attend to key j."""
  qs = layout.q_segment_ids[:, :, None]
  ks = layout.kv_segment_ids[:, None, :]
  qp = layout.q_positions[:, :, None].astype(np.int64)
  kp = layout.kv_positions[:, None, :].astype(np.int64)
  ok = (qs == ks) & (qs != 0)
  if causal:
    ok &= kp <= qp
  if sliding_window is not None:
    ok &= qp - kp < sliding_window
  return ok


# ----------------------------------------------------------------------------
# Inputs and error measures


@functools.partial(jax.jit, static_argnums=1)
def _standard_normal(seed, size):
  return jax.random.normal(jax.random.key(seed), (size,), jnp.float32)


def random_normals(seed, shapes, dtypes):
  """Standard-normal numpy arrays of the given shapes and dtypes.

  Drawn with jax.random as one flat vector whose size is rounded up to a power
  of two, so a handful of compilations serve every shape in the suite.
  """
  sizes = [math.prod(s) for s in shapes]
  flat = np.asarray(_standard_normal(np.uint32(seed),
                                     max(1 << 16, 1 << (sum(sizes) - 1).bit_length())))
  out, start = [], 0
  for shape, size, dtype in zip(shapes, sizes, dtypes):
    out.append(flat[start:start + size].reshape(shape).astype(dtype))
    start += size
  return out


def random_inputs(seed, *, batch, q_len, kv_len, heads, kv_heads, head_dim,
                  dtype=jnp.float32):
  """Fresh standard-normal (q, k, v, do, dlse) for one example, as jax arrays.

  q, do: [B, Tq, H, D]; k, v: [B, Tk, Hkv, D]; dlse: float32 [B, H, Tq].
  q, k, v, do are in `dtype`; dlse (a cotangent of float32 lse) is float32.
  seed: int in [0, 2**31).
  """
  q_shape = (batch, q_len, heads, head_dim)
  kv_shape = (batch, kv_len, kv_heads, head_dim)
  dt = jnp.dtype(dtype)
  arrays = random_normals(
      seed, (q_shape, kv_shape, kv_shape, q_shape, (batch, heads, q_len)),
      (dt, dt, dt, dt, jnp.dtype(jnp.float32)))
  return tuple(jnp.asarray(a) for a in arrays)


def rel_err(a, b) -> float:
  """||a - b|| / ||b|| in float64.

  If b is all zero (e.g. dq when every document is one token long: p = 1,
  ds = p * (do.v - do.out) = 0 exactly in the reference, rounding noise in a
  kernel), the RMS of a - b instead: the tests' inputs are unit-scale, so
  that is the same yardstick as a relative error.
  """
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  num = np.linalg.norm((a - b).ravel())
  den = np.linalg.norm(b.ravel())
  return float(num / den) if den > 0 else float(num / np.sqrt(max(a.size, 1)))


def assert_close(name, got, want, tol):
  err = rel_err(got, want)
  assert err <= tol, f"{name}: relative error {err:.3g} > {tol:g}"


def assert_finite(name, x):
  x = np.asarray(x, np.float32)
  bad = ~np.isfinite(x)
  assert not bad.any(), f"{name}: {bad.sum()} non-finite values"


# ----------------------------------------------------------------------------
# Fixed (seeded) layouts for large shapes, where hypothesis is too costly


def packed_row(rng, length, *, median_len, pad_frac=0.0):
  """One packed row: lognormal document lengths, then `pad_frac` padding.

  Documents are contiguous with ids 1, 2, ...; the last one is cut to fit.
  """
  n_valid = length - int(round(pad_frac * length))
  lengths = []
  while sum(lengths) < n_valid:
    lengths.append(max(1, int(rng.lognormal(np.log(median_len), 1.0))))
  return np.concatenate([ids_from_runs([(n, False) for n in lengths], n_valid),
                         np.zeros(length - n_valid, np.int32)])


def fixed_segment_ids(kind, batch, length, seed=0) -> np.ndarray:
  """int32 [batch, length] ids of a named layout family (seeded numpy).

  kinds: "packed" (lognormal lengths), "padded" (packed, padding at the end
  and a gap in the middle), "repeated" (non-contiguous ids), "one_document",
  "with_empty_row" (packed rows and one row of padding only).
  """
  rng = np.random.default_rng(seed)
  rows = []
  for b in range(batch):
    if kind == "packed":
      row = packed_row(rng, length, median_len=max(8, length // 8))
    elif kind == "padded":
      row = packed_row(rng, length, median_len=max(8, length // 6), pad_frac=0.2)
      gap = rng.integers(0, length // 2)
      row[gap:gap + length // 10] = 0
    elif kind == "repeated":
      row = rng.integers(0, 4, size=length).astype(np.int32)
    elif kind == "one_document":
      row = np.ones(length, np.int32)
    elif kind == "with_empty_row":
      row = (np.zeros(length, np.int32) if b == 0
             else packed_row(rng, length, median_len=max(8, length // 8)))
    else:
      raise ValueError(kind)
    rows.append(row)
  return np.stack(rows).astype(np.int32)
