"""Packed-row layouts for benchmarks: segment ids, run lengths and useful FLOPs,
and general masks (clustered graphs).

numpy only, so that every process (JAX, torch) can draw the same layouts.

Conventions (as in jpack): ``segment_ids`` is int32 ``[B, T]``; 0 marks padding and
the documents of each row are numbered 1, 2, ... from the left.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "lognormal_doc_lengths",
    "packed_segment_ids",
    "segment_lengths",
    "segment_runs",
    "causal_doc_flops",
    "BACKWARD_FLOPS_FACTOR",
    "FWD_BWD_FLOPS_FACTOR",
    "cluster_sizes",
    "clustered_graph_mask",
    "tile_density",
]

# Backward attention does 5 matmuls to the forward's 2: 2.5x the forward FLOPs.
BACKWARD_FLOPS_FACTOR = 2.5
FWD_BWD_FLOPS_FACTOR = 1.0 + BACKWARD_FLOPS_FACTOR


def lognormal_doc_lengths(
    rng: np.random.Generator, seq_len: int, mu: float, sigma: float, min_len: int
) -> list[int]:
    """Document lengths that fill one row of ``seq_len`` tokens exactly.

    Lengths are ``max(min_len, round(lognormal(mu, sigma)))``, drawn until the row is
    full; the last document is cut so that the lengths sum to ``seq_len`` (it may then
    be shorter than ``min_len``).

    Returns: list of positive ints summing to ``seq_len``.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    lengths: list[int] = []
    remaining = seq_len
    while remaining > 0:
        length = max(min_len, int(round(rng.lognormal(mu, sigma))))
        length = min(length, remaining)
        lengths.append(length)
        remaining -= length
    return lengths


def packed_segment_ids(
    batch: int,
    seq_len: int,
    *,
    seed: int = 0,
    mean_len: float = 1024,
    sigma: float = 1.0,
    min_len: int = 16,
) -> np.ndarray:
    """Rows packed full with lognormal-length documents.

    ``mu = ln(mean_len) - 0.5``, so with ``sigma = 1`` the lognormal's mean is about
    ``mean_len`` (``exp(mu + sigma**2 / 2)``). Rows are drawn one after another from
    ``numpy.random.default_rng(seed)``.

    Returns: int32 ``[batch, seq_len]``, ids 1..n_docs in each row, no padding.
    """
    rng = np.random.default_rng(seed)
    mu = math.log(mean_len) - 0.5
    rows = []
    for _ in range(batch):
        lengths = lognormal_doc_lengths(rng, seq_len, mu, sigma, min_len)
        ids = np.arange(1, len(lengths) + 1, dtype=np.int32)
        rows.append(np.repeat(ids, lengths))
    return np.stack(rows).astype(np.int32)


def segment_runs(segment_ids_row: np.ndarray) -> list[tuple[int, int, int]]:
    """Maximal runs of equal ids in one row, padding (id 0) included.

    segment_ids_row: int ``[T]``.
    Returns: list of ``(segment_id, start, length)`` from left to right.
    """
    row = np.asarray(segment_ids_row)
    if row.ndim != 1:
        raise ValueError(f"segment_ids_row must be 1-D [T], got shape {row.shape}")
    if row.size == 0:
        return []
    change = np.flatnonzero(row[1:] != row[:-1]) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [row.size]])
    return [(int(row[s]), int(s), int(e - s)) for s, e in zip(starts, ends)]


def segment_lengths(segment_ids_row: np.ndarray) -> list[int]:
    """Run lengths of the documents (nonzero ids) of one row.

    segment_ids_row: int ``[T]``.
    Returns: lengths of the runs of nonzero ids, left to right.
    """
    return [length for sid, _, length in segment_runs(segment_ids_row) if sid != 0]


def causal_doc_flops(
    segment_ids: np.ndarray, num_heads: int, head_dim: int, *, causal: bool = True
) -> float:
    """Forward FLOPs of the useful attention work of a packed batch.

    Two matmuls (QK^T and PV) of ``2 * D`` FLOPs per (query, key) pair that may attend:
    ``4 * D * H * l * (l + 1) / 2`` per document of length ``l`` when causal (diagonal
    included), ``4 * D * H * l * l`` otherwise; summed over documents and rows.
    Backward is ``BACKWARD_FLOPS_FACTOR`` (2.5) times this, forward+backward
    ``FWD_BWD_FLOPS_FACTOR`` (3.5) times.

    segment_ids: int ``[B, T]`` (or ``[T]``); num_heads: query heads.
    """
    ids = np.atleast_2d(np.asarray(segment_ids))
    pairs = 0
    for row in ids:
        for length in segment_lengths(row):
            pairs += length * (length + 1) // 2 if causal else length * length
    return 4.0 * head_dim * num_heads * float(pairs)


# --------------------------------------------------------------------------- general masks


def cluster_sizes(rng: np.random.Generator, n: int, mean: float) -> list[int]:
    """Lognormal cluster sizes (sigma 0.5, at least 1) that sum to ``n``."""
    mu = math.log(mean) - 0.125
    sizes, left = [], n
    while left > 0:
        size = min(left, max(1, int(round(rng.lognormal(mu, 0.5)))))
        sizes.append(size)
        left -= size
    return sizes


def clustered_graph_mask(
    batch: int,
    n: int,
    *,
    seed: int = 0,
    mean_cluster: float = 160,
    neighbours: int = 1,
    p_in: float = 0.3,
    p_out: float = 0.05,
    self_loops: bool = True,
) -> np.ndarray:
    """Adjacency of random clustered graphs, nodes numbered cluster by cluster.

    Each row is one graph of ``n`` nodes in clusters of lognormal sizes (mean
    ``mean_cluster``). Two nodes of one cluster are linked with probability
    ``p_in``; each cluster is paired with ``neighbours`` random other clusters
    (both ways), whose node pairs are linked with probability ``p_out``; no
    other pair is linked. Symmetric; with ``self_loops`` every node sees itself.
    With the defaults at n = 8192, about 10% of the 64 x 64 tiles hold an edge,
    and about 15% of the pairs inside those.

    Returns: bool [batch, n, n].
    """
    rng = np.random.default_rng(seed)
    out = np.zeros((batch, n, n), bool)
    for b in range(batch):
        sizes = cluster_sizes(rng, n, mean_cluster)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        pairs = {(c, c): p_in for c in range(len(sizes))}
        for c in range(len(sizes)):
            for d in rng.choice(len(sizes), size=min(neighbours, len(sizes)), replace=False):
                if d != c:
                    pairs[min(c, d), max(c, d)] = p_out
        for (c, d), p in pairs.items():
            rows, cols = slice(starts[c], starts[c + 1]), slice(starts[d], starts[d + 1])
            block = rng.random((sizes[c], sizes[d]), dtype=np.float32) < p
            out[b, rows, cols] |= block
            out[b, cols, rows] |= block.T
        if self_loops:
            out[b, np.arange(n), np.arange(n)] = True
    return out


def tile_density(mask: np.ndarray, block: int = 64) -> float:
    """Fraction of block x block tiles of a bool [..., Tq, Tk] mask with any True."""
    *lead, tq, tk = mask.shape
    tiles = mask.reshape(*lead, tq // block, block, tk // block, block).any(axis=(-3, -1))
    return float(tiles.mean())
