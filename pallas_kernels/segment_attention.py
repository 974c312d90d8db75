"""Segment-masked flash attention: Pallas kernels with the Triton lowering.

Three kernels: forward (out, lse), dQ, and dK/dV. Each program owns one tile
and loops only over the tiles its plan row names (see `jpack.masks`): the
range [lo, hi), inside which [full_lo, full_hi) needs no mask arithmetic.

Shapes (all already padded by the caller):
  q, do: [B, Tq, H, D]; k, v: [B, Tk, Hkv, D], H % Hkv == 0, D a power of two;
  q_seg, q_pos: int32 [B, Tq]; kv_seg, kv_pos: int32 [B, Tk];
  lse, delta: float32 [B, H, Tq]; q_ranges: int32 [B, Tq/bq, 4];
  kv_ranges: int32 [B, Tk/bk, 4].

Softmax runs in base 2 (exp2 of logits scaled by log2(e)); lse is stored in
natural log. Masked logits get a finite sentinel (-1e30). A row that has seen
nothing yet is shifted by 0 rather than by its max (forward), or by +1e30
rather than its lse (backward), so its masked probabilities are exactly 0: it
stays finite, yields zeros and contributes nothing to any gradient.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.config import TileConfig

LOG2E = math.log2(math.e)
MASKED_LOGIT = -1e30  # finite, so max/subtract never meet inf - inf
EMPTY_LSE = -1e30  # lse of a query row that attends to nothing


def _dot(a, b, *, transpose_b=False):
  """a @ b (or a @ b.T) with float32 accumulation; exact float32 for float32 inputs."""
  dims = (((1,), (1 if transpose_b else 0,)), ((), ()))
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, dims, precision=precision,
                         preferred_element_type=jnp.float32)


def _tile_mask(q_seg, q_pos, kv_seg, kv_pos, *, causal, sliding_window,
               kv_major=False):
  """bool [bq, bk] of allowed pairs in one tile ([bk, bq] if kv_major)."""
  q_axis = 0 if kv_major else 1  # the axis inserted into the q vectors
  q_seg, q_pos = jnp.expand_dims(q_seg, q_axis), jnp.expand_dims(q_pos, q_axis)
  kv_seg = jnp.expand_dims(kv_seg, 1 - q_axis)
  kv_pos = jnp.expand_dims(kv_pos, 1 - q_axis)
  mask = (q_seg == kv_seg) & (q_seg != 0)
  if causal:
    mask &= kv_pos <= q_pos
  if sliding_window is not None:
    mask &= q_pos - kv_pos < sliding_window
  return mask


def _masked_logits(s, masked, tile_mask):
  """s with disallowed pairs set to MASKED_LOGIT, where the traced bool `masked` says so."""
  return lax.cond(masked, lambda s: jnp.where(tile_mask(), s, MASKED_LOGIT),
                  lambda s: s, s)


def _loop(ranges_ref, visit, carry):
  """Runs visit(j, carry, masked) over the tiles [lo, hi) of one plan row.

  One loop, with the mask arithmetic behind a branch that the unmasked run
  [full_lo, full_hi) skips. (Three separate loops measured slower: each has its
  own pipeline prologue, and most programs visit only a handful of tiles.)
  """
  lo, full_lo, full_hi, hi = (ranges_ref[n] for n in range(4))
  return lax.fori_loop(
      lo, hi, lambda j, c: visit(j, c, masked=(j < full_lo) | (j >= full_hi)),
      carry)


class _QMajorSpecs(NamedTuple):
  """Block specs for a grid (q tile i, batch b, q head h) over [B, Tq, H, D] queries."""
  ranges: pl.BlockSpec  # this q tile's plan row
  q_tile: pl.BlockSpec  # [bq, D] of q, do, out, dq
  kv_all: pl.BlockSpec  # [Tk, D] of this head's kv head
  row_stat: pl.BlockSpec  # [bq] of lse, delta
  q_ids: pl.BlockSpec  # [bq] of q ids, positions
  kv_ids: pl.BlockSpec  # [Tk] of kv ids, positions


def _q_major_specs(q, k, block_q) -> _QMajorSpecs:
  head_dim, tk = q.shape[3], k.shape[1]
  group = q.shape[2] // k.shape[2]
  return _QMajorSpecs(
      ranges=pl.BlockSpec((None, None, 4), lambda i, b, h: (b, i, 0)),
      q_tile=pl.BlockSpec((None, block_q, None, head_dim),
                          lambda i, b, h: (b, i, h, 0)),
      kv_all=pl.BlockSpec((None, tk, None, head_dim),
                          lambda i, b, h: (b, 0, h // group, 0)),
      row_stat=pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i)),
      q_ids=pl.BlockSpec((None, block_q), lambda i, b, h: (b, i)),
      kv_ids=pl.BlockSpec((None, tk), lambda i, b, h: (b, 0)),
  )


# ----------------------------------------------------------------------------
# Forward


def _forward_kernel(ranges_ref, q_ref, k_ref, v_ref, q_seg_ref, q_pos_ref,
                    kv_seg_ref, kv_pos_ref, o_ref, lse_ref, *, scale, causal,
                    sliding_window, block_k):
  q = q_ref[...]
  block_q, head_dim = q.shape
  q_seg, q_pos = q_seg_ref[...], q_pos_ref[...]
  logit_scale = scale * LOG2E

  def visit(j, carry, masked):
    acc, m, l = carry
    cols = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
    s = _masked_logits(
        _dot(q, k_ref[cols, :], transpose_b=True) * logit_scale, masked,
        lambda: _tile_mask(q_seg, q_pos, kv_seg_ref[cols], kv_pos_ref[cols],
                           causal=causal, sliding_window=sliding_window))
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    # A row that has seen nothing keeps m_new == MASKED_LOGIT; shifting it by
    # 0 instead makes its masked p exactly 0 without a per-element select.
    shift = jnp.where(m_new == MASKED_LOGIT, 0.0, m_new)
    alpha = jnp.exp2(m - shift)
    p = jnp.exp2(s - shift[:, None])
    v = v_ref[cols, :]
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
    return acc, m_new, l * alpha + jnp.sum(p, axis=1)

  carry = (jnp.zeros((block_q, head_dim), jnp.float32),
           jnp.full((block_q,), MASKED_LOGIT, jnp.float32),
           jnp.zeros((block_q,), jnp.float32))
  acc, m, l = _loop(ranges_ref, visit, carry)
  seen = l > 0.0
  l = jnp.where(seen, l, 1.0)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, (m + jnp.log2(l)) / LOG2E, EMPTY_LSE)


def forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, q_ranges, *, tile: TileConfig,
            scale, causal, sliding_window, interpret=False):
  """Returns (out [B, Tq, H, D] in q.dtype, lse float32 [B, H, Tq])."""
  batch, tq, heads, _ = q.shape
  bq, bk = tile.block_major, tile.block_minor
  kernel = functools.partial(_forward_kernel, scale=scale, causal=causal,
                             sliding_window=sliding_window, block_k=bk)
  spec = _q_major_specs(q, k, bq)
  return pl.pallas_call(
      kernel,
      grid=(tq // bq, batch, heads),
      in_specs=[spec.ranges, spec.q_tile, spec.kv_all, spec.kv_all,
                spec.q_ids, spec.q_ids, spec.kv_ids, spec.kv_ids],
      out_specs=[spec.q_tile, spec.row_stat],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, tq), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=tile.num_warps,
                                           num_stages=tile.num_stages),
      interpret=interpret,
      name="jpack_attention_fwd",
  )(q_ranges, q, k, v, q_seg, q_pos, kv_seg, kv_pos)


# ----------------------------------------------------------------------------
# Backward: dQ


def _bwd_shift(lse):
  """Base-2 lse for the backward; rows that saw nothing get +1e30 so p = 0."""
  return jnp.where(lse == EMPTY_LSE, -MASKED_LOGIT, lse * LOG2E)


def _dq_kernel(ranges_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               q_seg_ref, q_pos_ref, kv_seg_ref, kv_pos_ref, dq_ref, *, scale,
               causal, sliding_window, block_k):
  q, do = q_ref[...], do_ref[...]
  lse2 = _bwd_shift(lse_ref[...])
  delta = delta_ref[...]
  q_seg, q_pos = q_seg_ref[...], q_pos_ref[...]
  logit_scale = scale * LOG2E

  def visit(j, dq, masked):
    cols = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
    k, v = k_ref[cols, :], v_ref[cols, :]
    s = _masked_logits(
        _dot(q, k, transpose_b=True) * logit_scale, masked,
        lambda: _tile_mask(q_seg, q_pos, kv_seg_ref[cols], kv_pos_ref[cols],
                           causal=causal, sliding_window=sliding_window))
    p = jnp.exp2(s - lse2[:, None])
    ds = p * (_dot(do, v, transpose_b=True) - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)

  dq = _loop(ranges_ref, visit, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def backward_dq(q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos,
                q_ranges, *, tile: TileConfig, scale, causal, sliding_window,
                interpret=False):
  """dQ [B, Tq, H, D] in q.dtype. delta: float32 [B, H, Tq] = rowsum(o*do) - dlse."""
  batch, tq, heads, _ = q.shape
  bq, bk = tile.block_major, tile.block_minor
  kernel = functools.partial(_dq_kernel, scale=scale, causal=causal,
                             sliding_window=sliding_window, block_k=bk)
  spec = _q_major_specs(q, k, bq)
  return pl.pallas_call(
      kernel,
      grid=(tq // bq, batch, heads),
      in_specs=[spec.ranges, spec.q_tile, spec.kv_all, spec.kv_all, spec.q_tile,
                spec.row_stat, spec.row_stat, spec.q_ids, spec.q_ids,
                spec.kv_ids, spec.kv_ids],
      out_specs=spec.q_tile,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=tile.num_warps,
                                           num_stages=tile.num_stages),
      interpret=interpret,
      name="jpack_attention_dq",
  )(q_ranges, q, k, v, do, lse, delta, q_seg, q_pos, kv_seg, kv_pos)


# ----------------------------------------------------------------------------
# Backward: dK and dV


def _dkdv_kernel(ranges_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                 q_seg_ref, q_pos_ref, kv_seg_ref, kv_pos_ref, dk_ref, dv_ref,
                 *, scale, causal, sliding_window, block_q, group):
  k, v = k_ref[...], v_ref[...]
  kv_seg, kv_pos = kv_seg_ref[...], kv_pos_ref[...]
  logit_scale = scale * LOG2E

  def one_head(r, carry):
    # The q heads r of this kv head's group share K/V; their grads add up here.
    def visit(i, carry, masked):
      dk, dv = carry
      rows = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
      q, do = q_ref[rows, r, :], do_ref[rows, r, :]
      lse2 = _bwd_shift(lse_ref[r, rows])
      # Transposed scores [bk, bq]: keys on rows, so no transposes of dk/dv.
      s_t = _masked_logits(
          _dot(k, q, transpose_b=True) * logit_scale, masked,
          lambda: _tile_mask(q_seg_ref[rows], q_pos_ref[rows], kv_seg, kv_pos,
                             causal=causal, sliding_window=sliding_window,
                             kv_major=True))
      p_t = jnp.exp2(s_t - lse2[None, :])
      dv = dv + _dot(p_t.astype(do.dtype), do)
      dp_t = _dot(v, do, transpose_b=True)
      ds_t = p_t * (dp_t - delta_ref[r, rows][None, :])
      return dk + _dot(ds_t.astype(q.dtype), q), dv

    return _loop(ranges_ref, visit, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, group, one_head, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def backward_dkdv(q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos,
                  kv_ranges, *, tile: TileConfig, scale, causal, sliding_window,
                  interpret=False):
  """(dK, dV) [B, Tk, Hkv, D] in k.dtype, summed over each kv head's q heads."""
  batch, tq, heads, head_dim = q.shape
  tk, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  bk, bq = tile.block_major, tile.block_minor
  kernel = functools.partial(_dkdv_kernel, scale=scale, causal=causal,
                             sliding_window=sliding_window, block_q=bq,
                             group=group)
  kv_tile = pl.BlockSpec((None, bk, None, head_dim), lambda j, b, h: (b, j, h, 0))
  q_group = pl.BlockSpec((None, tq, group, head_dim),
                         lambda j, b, h: (b, 0, h, 0))
  stat_group = pl.BlockSpec((None, group, tq), lambda j, b, h: (b, h, 0))
  q_ids = pl.BlockSpec((None, tq), lambda j, b, h: (b, 0))
  kv_ids = pl.BlockSpec((None, bk), lambda j, b, h: (b, j))
  return pl.pallas_call(
      kernel,
      grid=(tk // bk, batch, kv_heads),
      in_specs=[
          pl.BlockSpec((None, None, 4), lambda j, b, h: (b, j, 0)),
          q_group, kv_tile, kv_tile, q_group, stat_group, stat_group,
          q_ids, q_ids, kv_ids, kv_ids,
      ],
      out_specs=[kv_tile, kv_tile],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=plgpu.CompilerParams(num_warps=tile.num_warps,
                                           num_stages=tile.num_stages),
      interpret=interpret,
      name="jpack_attention_dkdv",
  )(kv_ranges, q, k, v, do, lse, delta, q_seg, q_pos, kv_seg, kv_pos)
