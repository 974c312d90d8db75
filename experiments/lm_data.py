"""Data for the example LM: a corpus that ships with Python, byte tokens,
a fixed held-out split, packed/padded/concat rows, and a random-access loader.

Corpus (nothing downloaded):
  docstrings  the docstrings of the standard library's modules, classes and
              functions: many short documents (median ~90 bytes).
  files       the standard library's .py files: long documents.
  --data DIR  every non-empty text file under DIR (recursively) is a document.

Tokens: bytes 0..255, BOS = 256, EOS = 257; each document is BOS bytes EOS.
Held-out split: by a hash (crc32) of the source file's path, so it doesn't move
when the corpus grows or is read in another order, and a file's docstrings are
never split between train and eval.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import sysconfig
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jpack import packing

BOS, EOS = 256, 257
VOCAB_SIZE = 258
_SKIP_DIRS = {"site-packages", "__pycache__", "test", "tests", "idle_test"}


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Token arrays (int32 1-D, with BOS/EOS) of the train and eval documents."""
  train: list[np.ndarray]
  eval: list[np.ndarray]
  description: str


def encode(text: bytes) -> np.ndarray:
  """BOS + bytes + EOS as int32 [len(text) + 2]."""
  return np.concatenate([[BOS], np.frombuffer(text, np.uint8), [EOS]]).astype(np.int32)


def _stdlib_files() -> tuple[Path, list[Path]]:
  """(stdlib root, its .py files outside tests and site-packages, sorted)."""
  root = Path(sysconfig.get_paths()["stdlib"])
  files = []
  for d, dirs, names in os.walk(root):
    dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS)
    files += [Path(d) / n for n in sorted(names) if n.endswith(".py")]
  return root, files


def _docstrings(source: bytes) -> list[bytes]:
  try:
    tree = ast.parse(source)
  except (SyntaxError, ValueError):
    return []
  out = []
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      doc = ast.get_docstring(node, clean=True)
      if doc:
        out.append(doc.encode("utf-8", "replace"))
  return out


def stdlib_documents(kind: str) -> list[tuple[str, bytes]]:
  """(source file, document bytes) pairs from the standard library.

  kind: "docstrings", "files" or "both".
  """
  if kind not in ("docstrings", "files", "both"):
    raise ValueError(f"corpus must be 'docstrings', 'files' or 'both', got {kind!r}")
  docs = []
  root, files = _stdlib_files()
  for path in files:
    source = path.read_bytes()
    if not source.strip():
      continue
    key = str(path.relative_to(root))
    if kind in ("files", "both"):
      docs.append((key, source))
    if kind in ("docstrings", "both"):
      docs += [(key, d) for d in _docstrings(source)]
  return docs


def folder_documents(folder: str | os.PathLike) -> tuple[list[tuple[str, bytes]], int]:
  """Every non-empty, non-binary regular file under `folder` as one document.

  Returns ((relative path, bytes) pairs sorted by path, number of files
  skipped). A file is binary if its first 8 KiB hold a NUL byte.
  """
  root = Path(folder)
  if not root.is_dir():
    raise ValueError(f"--data {folder}: not a directory")
  docs, skipped = [], 0
  for path in sorted(p for p in root.rglob("*") if p.is_file()):
    try:
      data = path.read_bytes()
    except OSError:
      skipped += 1
      continue
    if not data.strip() or b"\0" in data[:8192]:
      skipped += 1
      continue
    docs.append((str(path.relative_to(root)), data))
  if not docs:
    raise ValueError(f"--data {folder}: no usable text files (found {skipped} empty, "
                     "binary or unreadable files)")
  return docs, skipped


def is_heldout(key: str, eval_fraction: float) -> bool:
  return zlib.crc32(key.encode()) % 10_000 < eval_fraction * 10_000


def split(docs: Sequence[tuple[str, bytes]], eval_fraction: float, description: str,
          max_docs: int | None = None) -> Corpus:
  """Tokenise and split by source key. If no key falls in the held-out share
  (tiny folders), the key with the smallest hash is held out; a corpus with a
  single source can't be split and is an error."""
  if not 0.0 < eval_fraction < 1.0:
    raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
  keys = sorted({k for k, _ in docs})
  if len(keys) < 2:
    raise ValueError(f"{description}: need documents from at least 2 files to hold "
                     f"some out for eval, got {len(keys)}")
  held = {k for k in keys if is_heldout(k, eval_fraction)}
  if not held:
    held = {min(keys, key=lambda k: zlib.crc32(k.encode()))}
  if held == set(keys):
    held.discard(max(keys, key=lambda k: zlib.crc32(k.encode())))
  train = [encode(d) for k, d in docs if k not in held]
  evals = [encode(d) for k, d in docs if k in held]
  if max_docs is not None:
    train = train[:max_docs]
  return Corpus(train, evals, description)


def length_histogram(lengths: Sequence[int], width: int = 40) -> str:
  """Text histogram of document lengths in power-of-two buckets."""
  lengths = np.asarray(lengths)
  top = int(np.ceil(np.log2(max(lengths.max(), 2))))
  edges = 2 ** np.arange(0, top + 1)
  counts = np.histogram(lengths, bins=np.append(edges, edges[-1] * 2))[0][:len(edges)]
  lines = [f"document lengths (tokens): n={len(lengths)}, median {int(np.median(lengths))}, "
           f"mean {lengths.mean():.0f}, max {lengths.max()}"]
  for lo, c in zip(edges, counts):
    if c:
      bar = "#" * max(1, round(width * c / counts.max()))
      lines.append(f"  {lo:>7}-{2 * lo - 1:<7} {c:>7} {bar}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# Rows


def concat_documents(documents: Sequence[np.ndarray], row_length: int) -> packing.PackedRows:
  """The contamination baseline: documents concatenated into one stream, cut
  into rows, and no document boundaries: segment id 1 for every token (0 for
  the tail padding of the last row), positions = index in the row, and every
  next token is a target, across document boundaries too."""
  stream = np.concatenate(documents).astype(np.int32)
  rows = -(-len(stream) // row_length)
  tokens = np.zeros(rows * row_length, np.int32)
  tokens[:len(stream)] = stream
  seg = (np.arange(rows * row_length) < len(stream)).astype(np.int32)
  return erase_boundaries(packing.PackedRows.from_segment_ids(
      tokens.reshape(rows, row_length), seg.reshape(rows, row_length)))


def erase_boundaries(rows: packing.PackedRows) -> packing.PackedRows:
  """The same rows as one document each: what attention without segment
  masking sees (the "concat" baseline)."""
  valid = rows.segment_ids != 0
  seg = valid.astype(np.int32)
  return packing.PackedRows(
      rows.tokens, seg,
      np.where(valid, np.arange(rows.row_length, dtype=np.int32), 0),
      packing.loss_mask_from_segment_ids(seg))


def make_rows(documents: Sequence[np.ndarray], row_length: int, mode: str, *,
              balance: str = "tokens", seed: int = 0) -> packing.PackedRows:
  """Rows for a training mode: "packed", "padded" or "concat"."""
  if mode == "packed":
    return packing.pack_documents(documents, row_length, balance=balance, seed=seed,
                                  vocab_size=VOCAB_SIZE)
  if mode == "padded":
    return packing.pad_documents(documents, row_length, vocab_size=VOCAB_SIZE)
  if mode == "concat":
    return concat_documents(documents, row_length)
  raise ValueError(f"packing must be 'packed', 'padded' or 'concat', got {mode!r}")


# ----------------------------------------------------------------------------
# Loader


def with_targets(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """batch plus "targets" int32 [B, T]: tokens[:, t + 1] at t (0 at the end).

  Next-token targets look at the neighbour along the sequence, so they are made
  here, in row order, before anything reorders the tokens (context-parallel
  zigzag). loss_mask already says which targets count (t + 1 in the same
  document, not padding).
  """
  tokens = np.asarray(batch["tokens"])
  targets = np.zeros_like(tokens, dtype=np.int32)
  targets[:, :-1] = tokens[:, 1:]
  return {**batch, "targets": targets}



class BatchLoader:
  """Random-access batches of rows: batch(step) is a pure function of
  (rows, batch_size, seed, step), which is what makes --resume exact.

  Rows are shuffled once per epoch with a fresh permutation; batches may cross
  epoch boundaries. Uses grain's MapDataset (source -> shuffle -> repeat ->
  batch) when grain is importable and use_grain is not False, else the same
  pipeline in numpy (grain and numpy give different, each deterministic, orders).
  """

  def __init__(self, rows: packing.PackedRows, batch_size: int, seed: int,
               use_grain: bool | None = None):
    if batch_size < 1 or batch_size > rows.num_rows:
      raise ValueError(f"batch_size must be in [1, {rows.num_rows}] (the number of "
                       f"rows), got {batch_size}")
    self.rows, self.batch_size, self.seed = rows, batch_size, seed
    self._grain = None
    if use_grain is not False:
      try:
        import grain  # noqa: PLC0415 - optional dependency
      except ImportError:
        if use_grain:
          raise
      else:
        self._grain = (grain.MapDataset.range(rows.num_rows).shuffle(seed=seed)
                       .repeat(None).batch(batch_size, drop_remainder=True))
    self.name = "grain" if self._grain is not None else "numpy"

  def indices(self, step: int) -> np.ndarray:
    """Row indices of batch `step`: int64 [batch_size]."""
    if self._grain is not None:
      return np.asarray(self._grain[step], np.int64)
    n = self.rows.num_rows
    flat = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
    out = np.empty(self.batch_size, np.int64)
    for epoch in np.unique(flat // n):
      perm = np.random.default_rng([self.seed, int(epoch)]).permutation(n)
      sel = flat // n == epoch
      out[sel] = perm[flat[sel] % n]
    return out

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """{tokens, targets, segment_ids, positions, loss_mask}, each [batch_size, T]."""
    return with_targets(self.rows.take(self.indices(step)).as_dict())
