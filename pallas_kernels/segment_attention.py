"""Segment-masked flash attention: Pallas kernels with the Triton lowering.

Three kernels: forward (out, lse), dQ, and dK/dV. Each program owns one tile
and loops only over the tiles its plan row names (see `jpack.masks`), in one
of two forms, told apart by rank:

  ranges, int32 [B, n_major, 4]: the range [lo, hi), inside which
    [full_lo, full_hi) needs no mask arithmetic (document masks);
  lists, int32 [B, Hp, n_major, L]: a count n, then n entries
    2 * tile + needs_mask (general masks, whose tiles may be scattered);
    Hp is 1, or H for a per-head dense mask.

Shapes (all already padded by the caller):
  q, do: [B, Tq, H, D]; k, v: [B, Tk, Hkv, D], H % Hkv == 0, D a power of two;
  q_seg, q_pos: int32 [B, Tq]; kv_seg, kv_pos: int32 [B, Tk];
  lse, delta: float32 [B, H, Tq]; q_plan: [B, Tq/bq, 4] or [B, Hp, Tq/bq, L];
  kv_plan: [B, Tk/bk, 4] or [B, Hp, Tk/bk, L].

A general mask is ANDed into the tiles that need the mask: a dense int8
[B or 1, 1 or H, Tq, Tk] array (nonzero = allowed), whose [bq, bk] block is
loaded only for those tiles, and/or a rule, an elementwise function
rule(q_pos, q_seg, kv_pos, kv_seg, kv_doc) -> bool evaluated on the tile
(kv_doc: int32 [B, Tk] per-key data the rule reads, or None).

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
               rule=None, kv_doc=None, dense=None, kv_major=False):
  """bool [bq, bk] of allowed pairs in one tile ([bk, bq] if kv_major).

  rule, kv_doc: the general rule and its per-key data ([bk]); dense: the
  tile's block of the dense mask, int8 [bq, bk] whatever kv_major.
  """
  q_axis = 0 if kv_major else 1  # the axis inserted into the q vectors
  q_seg, q_pos = jnp.expand_dims(q_seg, q_axis), jnp.expand_dims(q_pos, q_axis)
  kv_seg = jnp.expand_dims(kv_seg, 1 - q_axis)
  kv_pos = jnp.expand_dims(kv_pos, 1 - q_axis)
  mask = (q_seg == kv_seg) & (q_seg != 0)
  if causal:
    mask &= kv_pos <= q_pos
  if sliding_window is not None:
    mask &= q_pos - kv_pos < sliding_window
  if rule is not None:
    kv_doc = None if kv_doc is None else jnp.expand_dims(kv_doc, 1 - q_axis)
    mask &= rule(q_pos, q_seg, kv_pos, kv_seg, kv_doc)
  if dense is not None:
    mask &= (dense.T if kv_major else dense) != 0
  return mask


def _masked_logits(s, masked, tile_mask):
  """s with disallowed pairs set to MASKED_LOGIT, where the traced bool `masked` says so."""
  return lax.cond(masked, lambda s: jnp.where(tile_mask(), s, MASKED_LOGIT),
                  lambda s: s, s)


def _loop(plan_row, visit, carry, *, lists):
  """Runs visit(j, carry, masked) over the tiles of one plan row.

  plan_row(n) reads entry n of the row. Ranges: one loop over [lo, hi), with
  the mask arithmetic behind a branch that the unmasked run [full_lo,
  full_hi) skips. (Three separate loops measured slower: each has its own
  pipeline prologue, and most programs visit only a handful of tiles.)
  Lists: one loop over the listed tiles, masked where the entry says so.
  """
  if lists:
    def step(t, c):
      entry = plan_row(t + 1)
      return visit(entry >> 1, c, masked=(entry & 1) == 1)

    return lax.fori_loop(0, plan_row(0), step, carry)
  lo, full_lo, full_hi, hi = (plan_row(n) for n in range(4))
  return lax.fori_loop(
      lo, hi, lambda j, c: visit(j, c, masked=(j < full_lo) | (j >= full_hi)),
      carry)


def _is_lists(plan):
  return plan.ndim == 4


def _pallas_call(kernel, inputs, in_specs, optional, **kwargs):
  """pallas_call of kernel(*input_refs, *optional_refs, *output_refs).

  optional: (array or None, BlockSpec) pairs; an absent array is not passed to
  the call, and the kernel gets None for its ref.
  """
  present = [x is not None for x, _ in optional]

  def with_nones(*refs):
    fixed, rest = refs[:len(inputs)], list(refs[len(inputs):])
    return kernel(*fixed, *(rest.pop(0) if p else None for p in present), *rest)

  return pl.pallas_call(
      with_nones, in_specs=in_specs + [sp for x, sp in optional if x is not None],
      **kwargs)(*inputs, *(x for x, _ in optional if x is not None))


def _load(ref, *idx):
  """ref[idx], or None for an absent optional ref."""
  return None if ref is None else ref[idx]


class _QMajorSpecs(NamedTuple):
  """Block specs for a grid (q tile i, batch b, q head h) over [B, Tq, H, D] queries."""
  plan: pl.BlockSpec  # this q tile's plan row
  q_tile: pl.BlockSpec  # [bq, D] of q, do, out, dq
  kv_all: pl.BlockSpec  # [Tk, D] of this head's kv head
  row_stat: pl.BlockSpec  # [bq] of lse, delta
  q_ids: pl.BlockSpec  # [bq] of q ids, positions
  kv_ids: pl.BlockSpec  # [Tk] of kv ids, positions (and the rule's kv data)
  dense: pl.BlockSpec | None  # [bq, Tk] of the dense mask, if any


def _q_major_specs(q, k, block_q, plan, dense) -> _QMajorSpecs:
  head_dim, tk = q.shape[3], k.shape[1]
  group = q.shape[2] // k.shape[2]
  if _is_lists(plan):
    per_head = plan.shape[1] > 1
    plan_spec = pl.BlockSpec((None, None, None, plan.shape[3]),
                             lambda i, b, h: (b, h if per_head else 0, i, 0))
  else:
    plan_spec = pl.BlockSpec((None, None, 4), lambda i, b, h: (b, i, 0))
  dense_spec = None
  if dense is not None:
    by_batch, by_head = dense.shape[0] > 1, dense.shape[1] > 1
    dense_spec = pl.BlockSpec(
        (None, None, block_q, tk),
        lambda i, b, h: (b if by_batch else 0, h if by_head else 0, i, 0))
  return _QMajorSpecs(
      plan=plan_spec,
      q_tile=pl.BlockSpec((None, block_q, None, head_dim),
                          lambda i, b, h: (b, i, h, 0)),
      kv_all=pl.BlockSpec((None, tk, None, head_dim),
                          lambda i, b, h: (b, 0, h // group, 0)),
      row_stat=pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i)),
      q_ids=pl.BlockSpec((None, block_q), lambda i, b, h: (b, i)),
      kv_ids=pl.BlockSpec((None, tk), lambda i, b, h: (b, 0)),
      dense=dense_spec,
  )


# ----------------------------------------------------------------------------
# Forward


def _forward_kernel(plan_ref, q_ref, k_ref, v_ref, q_seg_ref, q_pos_ref,
                    kv_seg_ref, kv_pos_ref, kv_doc_ref, dense_ref, o_ref, lse_ref,
                    *, scale, causal, sliding_window, rule, lists, block_k):
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
                           causal=causal, sliding_window=sliding_window, rule=rule,
                           kv_doc=_load(kv_doc_ref, cols),
                           dense=_load(dense_ref, slice(None), cols)))
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
  acc, m, l = _loop(plan_ref.__getitem__, visit, carry, lists=lists)
  seen = l > 0.0
  l = jnp.where(seen, l, 1.0)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, (m + jnp.log2(l)) / LOG2E, EMPTY_LSE)


def forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, q_plan, *, tile: TileConfig,
            scale, causal, sliding_window, rule=None, kv_doc=None, dense=None,
            interpret=False):
  """Returns (out [B, Tq, H, D] in q.dtype, lse float32 [B, H, Tq])."""
  batch, tq, heads, _ = q.shape
  bq, bk = tile.block_major, tile.block_minor
  spec = _q_major_specs(q, k, bq, q_plan, dense)
  inputs = [q_plan, q, k, v, q_seg, q_pos, kv_seg, kv_pos]
  in_specs = [spec.plan, spec.q_tile, spec.kv_all, spec.kv_all,
              spec.q_ids, spec.q_ids, spec.kv_ids, spec.kv_ids]
  kernel = functools.partial(_forward_kernel, scale=scale, causal=causal,
                             sliding_window=sliding_window, rule=rule,
                             lists=_is_lists(q_plan), block_k=bk)
  return _pallas_call(
      kernel, inputs, in_specs, [(kv_doc, spec.kv_ids), (dense, spec.dense)],
      grid=(tq // bq, batch, heads),
      out_specs=[spec.q_tile, spec.row_stat],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, tq), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=tile.num_warps,
                                           num_stages=tile.num_stages),
      interpret=interpret,
      name="jpack_attention_fwd",
  )


# ----------------------------------------------------------------------------
# Backward: dQ


def backward_delta(out, do, dlse):
  """delta = rowsum(out * do) - dlse: float32 [B, H, Tq] of out, do [B, Tq, H, D].

  The backward's per-row term (d lse_i / d s_ij = p_ij folds the lse
  cotangent dlse [B, H, Tq] in).
  """
  return jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32),
                    do.astype(jnp.float32)) - dlse


def _bwd_shift(lse):
  """Base-2 lse for the backward; rows that saw nothing get +1e30 so p = 0."""
  return jnp.where(lse == EMPTY_LSE, -MASKED_LOGIT, lse * LOG2E)


def _dq_kernel(plan_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               q_seg_ref, q_pos_ref, kv_seg_ref, kv_pos_ref, kv_doc_ref, dense_ref,
               dq_ref, *, scale, causal, sliding_window, rule, lists, block_k):
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
                           causal=causal, sliding_window=sliding_window, rule=rule,
                           kv_doc=_load(kv_doc_ref, cols),
                           dense=_load(dense_ref, slice(None), cols)))
    p = jnp.exp2(s - lse2[:, None])
    ds = p * (_dot(do, v, transpose_b=True) - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)

  dq = _loop(plan_ref.__getitem__, visit, jnp.zeros(q.shape, jnp.float32),
             lists=lists)
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def backward_dq(q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos,
                q_plan, *, tile: TileConfig, scale, causal, sliding_window,
                rule=None, kv_doc=None, dense=None, interpret=False):
  """dQ [B, Tq, H, D] in q.dtype. delta: float32 [B, H, Tq] = rowsum(o*do) - dlse."""
  batch, tq, heads, _ = q.shape
  bq, bk = tile.block_major, tile.block_minor
  spec = _q_major_specs(q, k, bq, q_plan, dense)
  inputs = [q_plan, q, k, v, do, lse, delta, q_seg, q_pos, kv_seg, kv_pos]
  in_specs = [spec.plan, spec.q_tile, spec.kv_all, spec.kv_all, spec.q_tile,
              spec.row_stat, spec.row_stat, spec.q_ids, spec.q_ids,
              spec.kv_ids, spec.kv_ids]
  kernel = functools.partial(_dq_kernel, scale=scale, causal=causal,
                             sliding_window=sliding_window, rule=rule,
                             lists=_is_lists(q_plan), block_k=bk)
  return _pallas_call(
      kernel, inputs, in_specs, [(kv_doc, spec.kv_ids), (dense, spec.dense)],
      grid=(tq // bq, batch, heads),
      out_specs=spec.q_tile,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=tile.num_warps,
                                           num_stages=tile.num_stages),
      interpret=interpret,
      name="jpack_attention_dq",
  )


# ----------------------------------------------------------------------------
# Backward: dK and dV


def _dkdv_kernel(plan_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                 q_seg_ref, q_pos_ref, kv_seg_ref, kv_pos_ref, kv_doc_ref, dense_ref,
                 dk_ref, dv_ref, *, scale, causal, sliding_window, rule, lists,
                 plan_per_head, dense_per_head, block_q, group):
  k, v = k_ref[...], v_ref[...]
  kv_seg, kv_pos = kv_seg_ref[...], kv_pos_ref[...]
  kv_doc = _load(kv_doc_ref, slice(None))
  logit_scale = scale * LOG2E

  def one_head(r, carry):
    # The q heads r of this kv head's group share K/V; their grads add up here.
    def visit(i, carry, masked):
      dk, dv = carry
      rows = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
      q, do = q_ref[rows, r, :], do_ref[rows, r, :]
      lse2 = _bwd_shift(lse_ref[r, rows])
      # Transposed scores [bk, bq]: keys on rows, so no transposes of dk/dv.
      dense_rows = (r, rows) if dense_per_head else (rows,)
      s_t = _masked_logits(
          _dot(k, q, transpose_b=True) * logit_scale, masked,
          lambda: _tile_mask(q_seg_ref[rows], q_pos_ref[rows], kv_seg, kv_pos,
                             causal=causal, sliding_window=sliding_window,
                             rule=rule, kv_doc=kv_doc,
                             dense=_load(dense_ref, *dense_rows, slice(None)),
                             kv_major=True))
      p_t = jnp.exp2(s_t - lse2[None, :])
      dv = dv + _dot(p_t.astype(do.dtype), do)
      dp_t = _dot(v, do, transpose_b=True)
      ds_t = p_t * (dp_t - delta_ref[r, rows][None, :])
      return dk + _dot(ds_t.astype(q.dtype), q), dv

    plan_row = (lambda n: plan_ref[r, n]) if plan_per_head else plan_ref.__getitem__
    return _loop(plan_row, visit, carry, lists=lists)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, group, one_head, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _heads_spec(x, lead_block, tail_block, index):
  """BlockSpec over [B or 1, 1 or H, ...] taking a kv head's group of q heads.

  x: a plan (lists) or dense mask whose axis 1 is 1 or the q heads; the block
  is (None, lead_block or None, *tail_block); index(j) gives the trailing
  block indices of kv tile j.
  """
  by_batch, per_head = x.shape[0] > 1, x.shape[1] > 1
  return pl.BlockSpec(
      (None, lead_block if per_head else None, *tail_block),
      lambda j, b, h: (b if by_batch else 0, h if per_head else 0, *index(j)))


def backward_dkdv(q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos,
                  kv_plan, *, tile: TileConfig, scale, causal, sliding_window,
                  rule=None, kv_doc=None, dense=None, interpret=False):
  """(dK, dV) [B, Tk, Hkv, D] in k.dtype, summed over each kv head's q heads."""
  batch, tq, heads, head_dim = q.shape
  tk, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  bk, bq = tile.block_major, tile.block_minor
  lists = _is_lists(kv_plan)
  kv_tile = pl.BlockSpec((None, bk, None, head_dim), lambda j, b, h: (b, j, h, 0))
  q_group = pl.BlockSpec((None, tq, group, head_dim),
                         lambda j, b, h: (b, 0, h, 0))
  stat_group = pl.BlockSpec((None, group, tq), lambda j, b, h: (b, h, 0))
  q_ids = pl.BlockSpec((None, tq), lambda j, b, h: (b, 0))
  kv_ids = pl.BlockSpec((None, bk), lambda j, b, h: (b, j))
  if lists:  # kv tile j's rows of the group's q heads (or the one shared row)
    plan_spec = _heads_spec(kv_plan, group, (None, kv_plan.shape[3]),
                            lambda j: (j, 0))
  else:
    plan_spec = pl.BlockSpec((None, None, 4), lambda j, b, h: (b, j, 0))
  inputs = [kv_plan, q, k, v, do, lse, delta, q_seg, q_pos, kv_seg, kv_pos]
  in_specs = [plan_spec, q_group, kv_tile, kv_tile, q_group, stat_group, stat_group,
              q_ids, q_ids, kv_ids, kv_ids]
  optional = [(kv_doc, kv_ids),  # the dense mask's [Tq, bk] strip of kv tile j:
              (dense, None if dense is None else _heads_spec(
                  dense, group, (tq, bk), lambda j: (0, j)))]
  kernel = functools.partial(
      _dkdv_kernel, scale=scale, causal=causal, sliding_window=sliding_window,
      rule=rule, lists=lists, plan_per_head=lists and kv_plan.shape[1] > 1,
      dense_per_head=dense is not None and dense.shape[1] > 1, block_q=bq, group=group)
  return _pallas_call(
      kernel, inputs, in_specs, optional,
      grid=(tk // bk, batch, kv_heads),
      out_specs=[kv_tile, kv_tile],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=plgpu.CompilerParams(num_warps=tile.num_warps,
                                           num_stages=tile.num_stages),
      interpret=interpret,
      name="jpack_attention_dkdv",
  )
