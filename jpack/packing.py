"""Documents -> fixed-length packed rows; statistics; conversions to other formats.

numpy only (no jax), so it can run in data-loading workers.

A packed batch (`PackedRows`) holds four int32/bool arrays of shape [rows, T]:

  tokens       the token ids; 0 in padding.
  segment_ids  1, 2, ..., n for the documents of a row in order, 0 for padding
               (jpack's, grain's and MaxText's convention). Padding is always at
               the end of a row.
  positions    the position of the token inside its document, restarting at 0
               in every document: the positions for RoPE. (The positions that
               `jpack.attention` uses for the causal mask are a different thing:
               the token's index in the row, its default.)
  loss_mask    True at t iff the target tokens[t + 1] is in the same document
               as tokens[t]: no document learns to predict the start of the next
               one, padding predicts nothing, the last token of a row has no target.

Documents longer than a row are split into chunks of `row_length` tokens (the
last chunk shorter), as in "Fewer Truncations Improve Language Modeling"
(Ding et al., 2024). Each chunk is then packed as a document of its own: its
positions restart at 0, because it cannot attend to the previous chunk anyway
(that chunk is in another row), so the model only ever sees positions it could
have seen in an unsplit document of length <= row_length. The one target lost
per split is the first token of the next chunk.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
from collections.abc import Iterable, Iterator, Sequence
from typing import Literal

import numpy as np

__all__ = [
    "PackedRows", "PackingStats", "pack_documents", "pack_stream", "pad_documents",
    "packing_stats", "row_attention_costs", "balanced_shard_order",
    "positions_from_segment_ids", "loss_mask_from_segment_ids",
    "lengths_from_segment_ids", "segment_ids_from_lengths",
    "cu_seqlens_from_segment_ids", "segment_ids_from_cu_seqlens",
    "attention_mask_in_length_from_segment_ids",
    "segment_ids_from_attention_mask_in_length",
    "to_grain_features", "from_grain_features",
]

Balance = Literal["tokens", "attention"]


# ----------------------------------------------------------------------------
# The packed batch


@dataclasses.dataclass(frozen=True)
class PackedRows:
  """A batch of packed rows. Every array is [num_rows, row_length].

  tokens, segment_ids, positions: int32; loss_mask: bool. See the module doc.
  """
  tokens: np.ndarray
  segment_ids: np.ndarray
  positions: np.ndarray
  loss_mask: np.ndarray

  @property
  def num_rows(self) -> int:
    return self.tokens.shape[0]

  @property
  def row_length(self) -> int:
    return self.tokens.shape[1]

  def __len__(self) -> int:
    return self.num_rows

  def take(self, index) -> PackedRows:
    """The rows at `index` (an int array, a slice or a boolean mask), as a batch."""
    if isinstance(index, (int, np.integer)):
      index = [index]
    return PackedRows(*(a[index] for a in dataclasses.astuple(self)))

  def as_dict(self) -> dict[str, np.ndarray]:
    return dataclasses.asdict(self)

  @classmethod
  def concatenate(cls, parts: Sequence[PackedRows]) -> PackedRows:
    """Rows of several batches (same row length), in order."""
    if not parts:
      raise ValueError("parts must hold at least one PackedRows")
    return cls(*(np.concatenate(a, axis=0) for a in zip(*(dataclasses.astuple(p) for p in parts))))

  @classmethod
  def from_segment_ids(cls, tokens, segment_ids) -> PackedRows:
    """Rows from tokens and packed segment ids; positions and loss mask derived."""
    segment_ids = _check_packed_segment_ids(segment_ids, "segment_ids")
    tokens = np.asarray(tokens)
    if tokens.shape != segment_ids.shape:
      raise ValueError(f"tokens must have the shape of segment_ids {segment_ids.shape}, "
                       f"got {tokens.shape}")
    return cls(np.where(segment_ids != 0, tokens, 0).astype(np.int32), segment_ids,
               positions_from_segment_ids(segment_ids),
               loss_mask_from_segment_ids(segment_ids))


def positions_from_segment_ids(segment_ids) -> np.ndarray:
  """Per-document positions (0 at each document start, 0 in padding).

  segment_ids: int [R, T] with documents as contiguous runs. Returns int32 [R, T].
  """
  seg = np.asarray(segment_ids)
  _, t = seg.shape
  index = np.broadcast_to(np.arange(t), seg.shape)
  starts = np.ones(seg.shape, bool)
  starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
  run_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
  return np.where(seg != 0, index - run_start, 0).astype(np.int32)


def loss_mask_from_segment_ids(segment_ids) -> np.ndarray:
  """True at t iff t + 1 is in the same (non-padding) document. bool [R, T]."""
  seg = np.asarray(segment_ids)
  mask = np.zeros(seg.shape, bool)
  mask[:, :-1] = (seg[:, :-1] != 0) & (seg[:, 1:] == seg[:, :-1])
  return mask


def _rows_from_chunks(rows: Sequence[Sequence[np.ndarray]], row_length: int) -> PackedRows:
  """PackedRows from, per row, its document chunks (1-D int arrays) in order."""
  n = len(rows)
  tokens = np.zeros((n, row_length), np.int32)
  seg = np.zeros((n, row_length), np.int32)
  pos = np.zeros((n, row_length), np.int32)
  for r, chunks in enumerate(rows):
    start = 0
    for d, chunk in enumerate(chunks, start=1):
      stop = start + len(chunk)
      tokens[r, start:stop] = chunk
      seg[r, start:stop] = d
      pos[r, start:stop] = np.arange(len(chunk))
      start = stop
  return PackedRows(tokens, seg, pos, loss_mask_from_segment_ids(seg))


# ----------------------------------------------------------------------------
# Input checks


def _check_row_length(row_length) -> int:
  if isinstance(row_length, bool) or not isinstance(row_length, (int, np.integer)) \
      or row_length < 2:
    raise ValueError(f"row_length must be an int >= 2 (a row of 1 token has no "
                     f"target), got {row_length!r}")
  return int(row_length)


def _check_max_docs(max_docs_per_row):
  if max_docs_per_row is None:
    return None
  if isinstance(max_docs_per_row, bool) or not isinstance(
      max_docs_per_row, (int, np.integer)) or max_docs_per_row < 1:
    raise ValueError(f"max_docs_per_row must be a positive int or None, got "
                     f"{max_docs_per_row!r}")
  return int(max_docs_per_row)


def _check_document(doc, index: int, vocab_size: int | None) -> np.ndarray:
  """documents[index] as an int32 1-D array, or a ValueError that names it."""
  arr = np.asarray(doc)
  where = f"documents[{index}]"
  if arr.ndim != 1:
    raise ValueError(f"{where} must be a 1-D array of token ids, got shape {arr.shape}")
  if arr.size == 0:
    raise ValueError(f"{where} is empty; drop empty documents before packing "
                     "(e.g. filter(len, documents))")
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"{where} must hold integer token ids, got dtype {arr.dtype}")
  lo, hi = int(arr.min()), int(arr.max())
  limit = np.iinfo(np.int32).max if vocab_size is None else vocab_size - 1
  if lo < 0 or hi > limit:
    bad = lo if lo < 0 else hi
    raise ValueError(f"{where} has token id {bad}, outside [0, {limit}]"
                     + ("" if vocab_size is None else f" (vocab_size={vocab_size})"))
  return arr.astype(np.int32, copy=False)


def _chunks(doc: np.ndarray, index: int, row_length: int, split_long: bool):
  if len(doc) <= row_length:
    return [doc]
  if not split_long:
    raise ValueError(f"documents[{index}] has {len(doc)} tokens, more than "
                     f"row_length={row_length}; pass split_long=True to split it")
  return [doc[i:i + row_length] for i in range(0, len(doc), row_length)]


def _check_packed_segment_ids(segment_ids, name: str) -> np.ndarray:
  """int32 [R, T] segment ids in packed form, or a ValueError.

  Packed form: each row is documents 1, 2, ..., n as contiguous runs from the
  start of the row, then padding (0) to its end.
  """
  seg = np.asarray(segment_ids)
  if seg.ndim != 2:
    raise ValueError(f"{name} must have shape [rows, row_length], got {seg.shape}")
  if not np.issubdtype(seg.dtype, np.integer):
    raise ValueError(f"{name} must be integers, got dtype {seg.dtype}")
  steps = np.diff(seg, axis=1)
  pad = seg == 0
  ok = (seg[:, :1] <= 1).all() and (seg >= 0).all()
  # Inside the documents ids go up by 0 or 1; after the first 0 only 0s follow.
  ok = ok and ((steps == 0) | (steps == 1) | (pad[:, 1:] & ~pad[:, :-1])).all()
  ok = ok and not (pad[:, :-1] & ~pad[:, 1:]).any()
  if not ok:
    raise ValueError(
        f"{name} must be in packed form: per row, documents numbered 1, 2, ... as "
        "contiguous runs from the row start, then 0 (padding) to the row end")
  return seg.astype(np.int32, copy=False)


# ----------------------------------------------------------------------------
# Offline packing


def pack_documents(
    documents: Iterable,
    row_length: int,
    *,
    max_docs_per_row: int | None = None,
    balance: Balance = "tokens",
    split_long: bool = True,
    vocab_size: int | None = None,
    seed: int | None = 0,
) -> PackedRows:
  """Packs documents into rows with best-fit decreasing (after splitting long ones).

  Args:
    documents: iterable of 1-D integer token arrays (or lists), each non-empty.
    row_length: T, tokens per row (>= 2).
    max_docs_per_row: optional cap on the documents (chunks) in one row.
    balance: "tokens": best-fit decreasing, few rows, full rows first.
      "attention": the same number of rows (more only where needed), but each
      document goes to the row with the lowest attention cost sum(l^2) among
      those it fits in, so rows carry close attention work.
    split_long: split documents longer than a row into row_length chunks
      (see the module doc); if False, such a document is an error.
    vocab_size: if given, token ids must be < vocab_size.
    seed: rows are returned in an order shuffled with this seed (None: the
      packer's order, longest documents first). The packing itself is
      deterministic: ties go to the earlier document and the earlier row.

  Returns:
    PackedRows [num_rows, row_length].
  """
  row_length = _check_row_length(row_length)
  max_docs = _check_max_docs(max_docs_per_row)
  if balance not in ("tokens", "attention"):
    raise ValueError(f"balance must be 'tokens' or 'attention', got {balance!r}")
  chunks = []
  for i, doc in enumerate(documents):
    chunks += _chunks(_check_document(doc, i, vocab_size), i, row_length, split_long)
  if not chunks:
    raise ValueError("documents is empty: nothing to pack")
  lengths = np.array([len(c) for c in chunks], np.int64)
  rows = _best_fit_decreasing(lengths, row_length, max_docs)
  if balance == "attention":
    rows = _attention_balanced(lengths, row_length, max_docs, num_rows=len(rows))
  if seed is not None:
    rows = [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]
  return _rows_from_chunks([[chunks[i] for i in row] for row in rows], row_length)


def _best_fit_decreasing(lengths, row_length, max_docs) -> list[list[int]]:
  """Indices of `lengths` per row. Best fit: the open row with the least room
  that still fits; ties to the lowest row number. Open rows are kept in heaps
  keyed by their free room; the sorted list of distinct free sizes is at most
  T long, so bisect/insort on it stays cheap."""
  order = np.argsort(-lengths, kind="stable")
  rows: list[list[int]] = []
  free: list[int] = []
  by_free: dict[int, list[int]] = {}  # free room -> heap of open row numbers
  free_sizes: list[int] = []  # sorted distinct keys of by_free

  def take(size):  # the lowest open row with exactly `size` free
    heap = by_free[size]
    r = heapq.heappop(heap)
    if not heap:
      del by_free[size]
      del free_sizes[bisect.bisect_left(free_sizes, size)]
    return r

  def open_(r):
    if free[r] == 0 or (max_docs is not None and len(rows[r]) >= max_docs):
      return
    if free[r] not in by_free:
      by_free[free[r]] = []
      bisect.insort(free_sizes, free[r])
    heapq.heappush(by_free[free[r]], r)

  for i in order:
    n = int(lengths[i])
    k = bisect.bisect_left(free_sizes, n)
    if k == len(free_sizes):
      rows.append([int(i)])
      free.append(row_length - n)
      open_(len(rows) - 1)
      continue
    r = take(free_sizes[k])
    rows[r].append(int(i))
    free[r] -= n
    open_(r)
  return rows


def _attention_balanced(lengths, row_length, max_docs, num_rows) -> list[list[int]]:
  """Longest first, each chunk to the row of least sum(l^2) that has room
  (ties: lowest row number); opens a row only when none has room."""
  order = np.argsort(-lengths, kind="stable")
  cost = np.zeros(num_rows, np.float64)
  free = np.full(num_rows, row_length, np.int64)
  count = np.zeros(num_rows, np.int64)
  rows: list[list[int]] = [[] for _ in range(num_rows)]
  cap = np.iinfo(np.int64).max if max_docs is None else max_docs
  for i in order:
    n = int(lengths[i])
    fits = (free >= n) & (count < cap)
    if fits.any():
      r = int(np.argmin(np.where(fits, cost, np.inf)))
    else:
      r = len(rows)
      rows.append([])
      cost = np.append(cost, 0.0)
      free = np.append(free, row_length)
      count = np.append(count, 0)
    rows[r].append(int(i))
    cost[r] += float(n) ** 2
    free[r] -= n
    count[r] += 1
  return [row for row in rows if row]


def pad_documents(
    documents: Iterable,
    row_length: int,
    *,
    split_long: bool = True,
    vocab_size: int | None = None,
) -> PackedRows:
  """One document (or chunk of a long one) per row, padded: the unpacked baseline.

  Same arguments as `pack_documents`; rows in document order.
  """
  row_length = _check_row_length(row_length)
  rows = []
  for i, doc in enumerate(documents):
    rows += [[c] for c in _chunks(_check_document(doc, i, vocab_size), i, row_length,
                                  split_long)]
  if not rows:
    raise ValueError("documents is empty: nothing to pack")
  return _rows_from_chunks(rows, row_length)


# ----------------------------------------------------------------------------
# Streaming packing


def pack_stream(
    documents: Iterable,
    row_length: int,
    *,
    buffer_rows: int = 64,
    rows_per_batch: int = 1,
    max_docs_per_row: int | None = None,
    split_long: bool = True,
    vocab_size: int | None = None,
) -> Iterator[PackedRows]:
  """Packs a stream of documents holding at most `buffer_rows` open rows.

  Each document (chunk) goes best-fit into the open rows; when none has room
  and the buffer is full, the fullest open row (ties: the oldest) is emitted
  first. Rows that become full are emitted at once. Memory is
  O(buffer_rows * row_length) whatever the corpus size. Deterministic: the
  output depends only on the input order.

  Yields:
    PackedRows of `rows_per_batch` rows, in emission order; the last one may
    hold fewer rows.
  """
  row_length = _check_row_length(row_length)
  max_docs = _check_max_docs(max_docs_per_row)
  for name, value in (("buffer_rows", buffer_rows), ("rows_per_batch", rows_per_batch)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  cap = np.iinfo(np.int64).max if max_docs is None else max_docs
  free = np.zeros(buffer_rows, np.int64)  # room per slot; slot unused if not in `age`
  count = np.zeros(buffer_rows, np.int64)
  age = np.full(buffer_rows, np.iinfo(np.int64).max)  # opening order; max = empty slot
  chunks: list[list[np.ndarray]] = [[] for _ in range(buffer_rows)]
  ready: list[list[np.ndarray]] = []
  opened = 0

  def emit(s):
    ready.append(chunks[s])
    chunks[s] = []
    age[s] = np.iinfo(np.int64).max

  for i, doc in enumerate(documents):
    for chunk in _chunks(_check_document(doc, i, vocab_size), i, row_length, split_long):
      n = len(chunk)
      used = age != np.iinfo(np.int64).max
      fits = used & (free >= n) & (count < cap)
      if fits.any():
        # least room first, then oldest
        s = int(np.lexsort((age, np.where(fits, free, np.iinfo(np.int64).max)))[0])
      else:
        if used.all():
          emit(int(np.lexsort((age, free))[0]))
        s = int(np.argmax(age))  # an empty slot
        age[s], free[s], count[s] = opened, row_length, 0
        opened += 1
      chunks[s].append(chunk)
      free[s] -= n
      count[s] += 1
      if free[s] == 0 or count[s] >= cap:
        emit(s)
      while len(ready) >= rows_per_batch:
        yield _rows_from_chunks(ready[:rows_per_batch], row_length)
        del ready[:rows_per_batch]
  for s in np.argsort(age, kind="stable"):
    if age[s] != np.iinfo(np.int64).max:
      emit(int(s))
  if opened == 0:
    raise ValueError("documents is empty: nothing to pack")
  while ready:
    yield _rows_from_chunks(ready[:rows_per_batch], row_length)
    del ready[:rows_per_batch]


# ----------------------------------------------------------------------------
# Statistics and balance


def _run_lengths(segment_ids) -> tuple[np.ndarray, np.ndarray]:
  """(row index, length) of every document run. segment_ids: int [R, T]."""
  seg = np.asarray(segment_ids)
  r, t = seg.shape
  flat = np.concatenate([seg, np.zeros((r, 1), seg.dtype)], axis=1)  # separator
  change = np.ones(flat.shape, bool)
  change[:, 1:] = flat[:, 1:] != flat[:, :-1]
  starts = np.flatnonzero(change.ravel())
  lengths = np.diff(np.append(starts, flat.size))
  ids = flat.ravel()[starts]
  keep = ids != 0
  return starts[keep] // (t + 1), lengths[keep]


def row_attention_costs(segment_ids) -> np.ndarray:
  """sum(l^2) over the documents of each row. segment_ids: int [R, T] -> float64 [R]."""
  seg = np.asarray(segment_ids)
  rows, lengths = _run_lengths(seg)
  return np.bincount(rows, weights=lengths.astype(np.float64) ** 2,
                     minlength=seg.shape[0])


@dataclasses.dataclass(frozen=True)
class PackingStats:
  """Summary of a packed batch.

  padding_fraction: padding tokens / all tokens.
  docs_per_row_*: documents (chunks) per row.
  attention_fraction: causal attention FLOPs inside documents, sum l(l+1)/2,
    over those of dense causal attention on the same rows, R * T(T+1)/2.
  cost_max_over_mean: max over rows of sum(l^2) / its mean (1.0 = balanced;
    bounded below by the longest document's l^2 / mean).
  cost_cv: standard deviation over rows of sum(l^2) / its mean.
  """
  num_rows: int
  row_length: int
  num_documents: int
  num_tokens: int
  padding_fraction: float
  docs_per_row_mean: float
  docs_per_row_max: int
  attention_fraction: float
  cost_max_over_mean: float
  cost_cv: float

  def __str__(self):
    return (f"{self.num_rows} rows x {self.row_length}: {self.num_documents} docs, "
            f"{self.num_tokens} tokens, padding {self.padding_fraction:.1%}, "
            f"docs/row {self.docs_per_row_mean:.2f} (max {self.docs_per_row_max}), "
            f"attention FLOPs {self.attention_fraction:.1%} of dense causal, "
            f"row cost max/mean {self.cost_max_over_mean:.2f}, cv {self.cost_cv:.2f}")


def packing_stats(segment_ids) -> PackingStats:
  """Statistics of segment ids int [R, T] (documents as contiguous runs)."""
  seg = np.asarray(segment_ids)
  if seg.ndim != 2 or seg.shape[0] == 0:
    raise ValueError(f"segment_ids must have shape [rows, row_length] with rows >= 1, "
                     f"got {seg.shape}")
  r, t = seg.shape
  rows, lengths = _run_lengths(seg)
  per_row = np.bincount(rows, minlength=r)
  costs = row_attention_costs(seg)
  mean_cost = costs.mean()
  tokens = int(lengths.sum())
  return PackingStats(
      num_rows=r, row_length=t, num_documents=len(lengths), num_tokens=tokens,
      padding_fraction=1.0 - tokens / (r * t),
      docs_per_row_mean=float(per_row.mean()), docs_per_row_max=int(per_row.max()),
      attention_fraction=float((lengths * (lengths + 1)).sum() / (r * t * (t + 1))),
      cost_max_over_mean=float(costs.max() / mean_cost) if mean_cost > 0 else 1.0,
      cost_cv=float(costs.std() / mean_cost) if mean_cost > 0 else 0.0)


def balanced_shard_order(segment_ids, num_shards: int) -> np.ndarray:
  """A row order that gives each of `num_shards` equal contiguous slices close
  total attention cost sum(l^2) (for a batch split over devices on axis 0).

  Greedy: rows by decreasing cost, each to the shard with the least total cost
  that still has a free slot. segment_ids: int [R, T], R % num_shards == 0.
  Returns an int64 permutation [R]: batch[order] is the balanced batch.
  """
  costs = row_attention_costs(segment_ids)
  r = len(costs)
  if isinstance(num_shards, bool) or not isinstance(num_shards, (int, np.integer)) \
      or num_shards < 1 or r % num_shards:
    raise ValueError(f"num_shards must be a positive int dividing the number of rows "
                     f"({r}), got {num_shards!r}")
  per = r // num_shards
  total = np.zeros(num_shards)
  slots: list[list[int]] = [[] for _ in range(num_shards)]
  for i in np.argsort(-costs, kind="stable"):
    open_ = np.array([len(s) < per for s in slots])
    s = int(np.argmin(np.where(open_, total, np.inf)))
    slots[s].append(int(i))
    total[s] += costs[i]
  return np.concatenate([np.array(s, np.int64) for s in slots])


# ----------------------------------------------------------------------------
# Conversions


def lengths_from_segment_ids(segment_ids) -> list[np.ndarray]:
  """Per row, the lengths of its documents in order. segment_ids: packed int [R, T]."""
  seg = _check_packed_segment_ids(segment_ids, "segment_ids")
  rows, lengths = _run_lengths(seg)
  return np.split(lengths.astype(np.int32), np.cumsum(np.bincount(rows, minlength=len(seg)))[:-1])


def segment_ids_from_lengths(lengths: Sequence[Sequence[int]], row_length: int) -> np.ndarray:
  """Packed segment ids int32 [R, T] from per-row document lengths (all > 0)."""
  if isinstance(row_length, bool) or not isinstance(row_length, (int, np.integer)) \
      or row_length < 1:
    raise ValueError(f"row_length must be a positive int, got {row_length!r}")
  seg = np.zeros((len(lengths), row_length), np.int32)
  for r, row in enumerate(lengths):
    row = np.asarray(row, np.int64)
    if (row <= 0).any() or row.sum() > row_length:
      raise ValueError(f"lengths[{r}] must be positive and sum to at most row_length="
                       f"{row_length}, got {row.tolist()}")
    seg[r, :row.sum()] = np.repeat(np.arange(1, len(row) + 1), row)
  return seg


def cu_seqlens_from_segment_ids(segment_ids) -> tuple[np.ndarray, np.ndarray, int]:
  """FlashAttention varlen layout of a packed batch (as its `unpad_input`).

  Returns:
    cu_seqlens: int32 [num_docs + 1], document boundaries in the flat stream of
      non-padding tokens, starting at 0.
    indices: int64 [total_tokens], flat positions (row * T + t) of those tokens:
      `x.reshape(R * T, ...)[indices]` unpads any [R, T, ...] array.
    max_seqlen: int, the longest document.
  """
  seg = _check_packed_segment_ids(segment_ids, "segment_ids")
  lengths = np.concatenate(lengths_from_segment_ids(seg))
  cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
  indices = np.flatnonzero(seg.ravel() != 0).astype(np.int64)
  return cu, indices, int(lengths.max(initial=0))


def segment_ids_from_cu_seqlens(cu_seqlens, indices, num_rows: int,
                                row_length: int) -> np.ndarray:
  """Inverse of `cu_seqlens_from_segment_ids`: packed segment ids int32 [R, T]."""
  cu = np.asarray(cu_seqlens, np.int64)
  indices = np.asarray(indices, np.int64)
  if cu.ndim != 1 or len(cu) < 1 or cu[0] != 0 or (np.diff(cu) < 0).any() \
      or cu[-1] != len(indices):
    raise ValueError("cu_seqlens must be 1-D, start at 0, be non-decreasing and end at "
                     f"len(indices)={len(indices)}")
  if len(indices) and (indices.min() < 0 or indices.max() >= num_rows * row_length):
    raise ValueError(f"indices must lie in [0, num_rows * row_length = "
                     f"{num_rows * row_length})")
  doc_of_token = np.repeat(np.arange(len(cu) - 1), np.diff(cu))
  flat = np.zeros(num_rows * row_length, np.int64)
  flat[indices] = doc_of_token + 1
  seg = flat.reshape(num_rows, row_length)
  # Renumber 1..n within each row, in order of appearance.
  starts = (seg != 0) & np.concatenate(
      [np.ones((num_rows, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  out = np.where(seg != 0, np.cumsum(starts, axis=1), 0).astype(np.int32)
  return _check_packed_segment_ids(out, "the segment ids made from cu_seqlens/indices")


def attention_mask_in_length_from_segment_ids(segment_ids) -> np.ndarray:
  """FlashAttention's `attention_mask_in_length` (the input of its
  `unpad_input_for_concatenated_sequences`): int32 [R, T], row r holds its
  document lengths first, then zeros."""
  seg = _check_packed_segment_ids(segment_ids, "segment_ids")
  out = np.zeros(seg.shape, np.int32)
  for r, lengths in enumerate(lengths_from_segment_ids(seg)):
    out[r, :len(lengths)] = lengths
  return out


def segment_ids_from_attention_mask_in_length(attention_mask_in_length) -> np.ndarray:
  """Inverse of `attention_mask_in_length_from_segment_ids`."""
  m = np.asarray(attention_mask_in_length)
  if m.ndim != 2 or not np.issubdtype(m.dtype, np.integer) or (m < 0).any():
    raise ValueError("attention_mask_in_length must be a non-negative int array "
                     f"[rows, row_length], got {m.dtype} {m.shape}")
  nonzero = m != 0
  if (nonzero[:, 1:] & ~nonzero[:, :-1]).any():
    raise ValueError("attention_mask_in_length: each row must hold its lengths first, "
                     "then only zeros")
  return segment_ids_from_lengths([row[row != 0] for row in m], m.shape[1])


def to_grain_features(rows: PackedRows, key: str = "inputs") -> dict[str, np.ndarray]:
  """grain's packed-example features: {key, key_segment_ids, key_positions}."""
  return {key: rows.tokens, f"{key}_segment_ids": rows.segment_ids,
          f"{key}_positions": rows.positions}


def from_grain_features(features, key: str = "inputs") -> PackedRows:
  """PackedRows from grain's packed features (batched [R, T] or one row [T]).

  Checks that `<key>_positions` restart at 0 in every document, as jpack's do.
  """
  missing = [k for k in (key, f"{key}_segment_ids", f"{key}_positions") if k not in features]
  if missing:
    raise ValueError(f"features lacks {missing} (has {sorted(features)})")
  tokens, seg, pos = (np.asarray(features[k]) for k in
                      (key, f"{key}_segment_ids", f"{key}_positions"))
  if seg.ndim == 1:
    tokens, seg, pos = tokens[None], seg[None], pos[None]
  rows = PackedRows.from_segment_ids(tokens, seg)
  if pos.shape != seg.shape or not np.array_equal(np.where(seg != 0, pos, 0), rows.positions):
    raise ValueError(f"features[{key + '_positions'!r}] must restart at 0 in every document")
  return rows
