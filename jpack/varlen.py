"""Attention on a flat token stream with `cu_seqlens`, as FlashAttention's varlen.

    from jpack.varlen import varlen_attention
    out = varlen_attention(q, k, v, cu_seqlens)   # q: [total_tokens, heads, head_dim]

The stream is handed to `jpack.attention.flash_attention` as one packed row
whose segment ids come from `cu_seqlens`, so the same kernels (and the same
tile skipping: work grows with sum(l^2), not total_tokens^2) do the work.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jpack.attention import KernelConfig, flash_attention

__all__ = ["segment_ids_from_cu_seqlens", "varlen_attention"]


def segment_ids_from_cu_seqlens(cu_seqlens: jax.Array, total_tokens: int) -> jax.Array:
  """Segment ids of a flat stream: int32 [total_tokens].

  Token t of document i (cu_seqlens[i] <= t < cu_seqlens[i + 1]) gets id i + 1;
  tokens at or after cu_seqlens[-1] get 0 (padding). Works on traced arrays.
  """
  cu = jnp.asarray(cu_seqlens, jnp.int32)
  t = jnp.arange(total_tokens, dtype=jnp.int32)
  doc = jnp.searchsorted(cu[1:], t, side="right").astype(jnp.int32)
  return jnp.where(t < cu[-1], doc + 1, 0)


def _check_cu_seqlens(cu_seqlens, total_tokens):
  if not hasattr(cu_seqlens, "shape"):
    cu_seqlens = np.asarray(cu_seqlens)
  if cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 1:
    raise ValueError(f"cu_seqlens must be 1-D [num_docs + 1], got shape {cu_seqlens.shape}")
  if not jnp.issubdtype(cu_seqlens.dtype, jnp.integer):
    raise ValueError(f"cu_seqlens must be integers (int32), got {cu_seqlens.dtype}")
  try:
    cu = np.asarray(cu_seqlens)
  except jax.errors.TracerArrayConversionError:
    return cu_seqlens  # traced: values can't be checked here
  if cu[0] != 0 or (np.diff(cu) < 0).any() or cu[-1] > total_tokens:
    raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at most at "
                     f"total_tokens={total_tokens}, got {cu.tolist()}")
  return cu_seqlens


def varlen_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cu_seqlens: jax.Array,
    *,
    causal: bool = True,
    sliding_window: int | None = None,
    scale: float | None = None,
    implementation: str = "auto",
    config: KernelConfig | None = None,
    interpret: bool = False,
    return_residuals: bool = False,
):
  """Attention inside each document of a flat token stream.

  Args:
    q: [total_tokens, heads, head_dim].
    k, v: [total_tokens, kv_heads, head_dim] (heads % kv_heads == 0).
    cu_seqlens: int [num_docs + 1]: document i is tokens
      cu_seqlens[i]:cu_seqlens[i + 1]; starts at 0; tokens past cu_seqlens[-1]
      are padding (output 0).
    causal, sliding_window, scale, implementation, config, interpret: as
      `jpack.attention.flash_attention`. Note: implementation="xla" (the
      default off GPU) builds a dense total_tokens^2 score matrix.
    return_residuals: also return lse float32 [heads, total_tokens].

  Returns:
    out [total_tokens, heads, head_dim], or (out, lse).
  """
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not hasattr(x, "shape") or x.ndim != 3:
      raise ValueError(f"{name} must have shape [total_tokens, heads, head_dim], got "
                       f"{getattr(x, 'shape', type(x).__name__)}")
  if k.shape[0] != q.shape[0]:
    raise ValueError(f"q and k must have the same total_tokens, got {q.shape} and {k.shape}")
  total = q.shape[0]
  cu_seqlens = _check_cu_seqlens(cu_seqlens, total)
  seg = segment_ids_from_cu_seqlens(cu_seqlens, total)[None]
  result = flash_attention(
      q[None], k[None], v[None], segment_ids=seg, causal=causal,
      sliding_window=sliding_window, scale=scale, implementation=implementation,
      config=config, interpret=interpret, return_residuals=return_residuals)
  if return_residuals:
    out, lse = result
    return out[0], lse[0]
  return result[0]
