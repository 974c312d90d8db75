"""The persistent forward's segment-id codes (pallas_kernels.mosaic_codes), on the CPU.

The kernel masks a masked tile's segment ids with one more wgmma (key codes times
a per-row operand) and keeps only the compares that coded_compares asks for. These
tests emulate that masking tile by tile in numpy, over the plan's visited tiles,
and check it against the document mask on the same layouts as the GPU tests;
they also check the codes' arithmetic and the work items that carry them. The
kernel itself runs in test_mosaic.py (GPU).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from helpers import ALL_KINDS, Layout, allowed_np, chunk_layouts, self_layouts
from jpack import masks
from pallas_kernels import mosaic_codes, mosaic_persistent
from pallas_kernels.config import COMPARE_SPLIT_BITS
from pallas_kernels.segment_attention import MASKED_LOGIT


def _positions_allow(layout, b, rows, cols, causal, window):
  qp = layout.q_positions[b, rows][:, None].astype(np.int64)
  kp = layout.kv_positions[b, cols][None, :].astype(np.int64)
  ok = np.ones((qp.shape[0], kp.shape[1]), bool)
  if causal:
    ok &= kp <= qp
  if window is not None:
    ok &= qp - kp < window
  return ok


def coded_kernel_mask(layout: Layout, *, block_q, block_k, causal, window):
  """bool [B, Tq, Tk]: the pairs the coded persistent forward lets through, emulated:
  per visited tile, the full run unmasked; a masked tile by its coded_compares kind:
  ids-only by the codes alone (residues equal), positions-only by the position
  compares, the others by both compares."""
  plan = masks.make_tile_plan(*layout.arrays(), block_q=block_q, block_k=block_k,
                              causal=causal, sliding_window=window)
  q_seg, kv_seg = layout.q_segment_ids, layout.kv_segment_ids
  words = np.asarray(mosaic_codes.coded_compares(
      jnp.asarray(q_seg), jnp.asarray(kv_seg), plan.q_ranges, plan.q_compares, block_k))
  q_res = np.mod(q_seg, mosaic_codes.CODE_RESIDUES)
  kv_res = np.where(kv_seg == 0, mosaic_codes.CODE_RESIDUES,
                    np.mod(kv_seg, mosaic_codes.CODE_RESIDUES))
  out = np.zeros((q_seg.shape[0], q_seg.shape[1], kv_seg.shape[1]), bool)
  for b, i in np.ndindex(*words.shape):
    lo, full_lo, full_hi, hi = np.asarray(plan.q_ranges[b, i])
    ids_len = words[b, i] & (2**COMPARE_SPLIT_BITS - 1)
    positions_len = words[b, i] >> COMPARE_SPLIT_BITS
    rows = slice(i * block_q, (i + 1) * block_q)
    for j in range(lo, hi):
      cols = slice(j * block_k, (j + 1) * block_k)
      if full_lo <= j < full_hi:
        out[b, rows, cols] = True
        continue
      if j < lo + ids_len:  # "ids": the codes
        ok = q_res[b, rows][:, None] == kv_res[b, cols][None, :]
      else:  # "positions" or "both" (padding rows unmasked: padding_rows=False)
        ok = _positions_allow(layout, b, rows, cols, causal, window)
        if j < hi - positions_len:
          ok &= q_seg[b, rows][:, None] == kv_seg[b, cols][None, :]
      out[b, rows, cols] = ok
  return out


def _assert_masks_documents(layout, *, block_q, block_k, causal, window=None):
  got = coded_kernel_mask(layout, block_q=block_q, block_k=block_k, causal=causal,
                          window=window)
  want = allowed_np(layout, causal=causal, sliding_window=window)
  real = layout.q_segment_ids != 0  # rows of padding are written as empty at the store
  np.testing.assert_array_equal(got[real], want[real])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block_q, block_k", [(128, 128), (128, 64), (64, 64)])
@settings(max_examples=25, deadline=None)
@given(layout=self_layouts(2, 512, ALL_KINDS) | self_layouts(2, 512, positions="custom"))
def test_coded_tiles_mask_exactly_the_documents(causal, block_q, block_k, layout):
  _assert_masks_documents(layout, block_q=block_q, block_k=block_k, causal=causal)


@settings(max_examples=25, deadline=None)
@given(layout=chunk_layouts(2, 256, 512), window=st.sampled_from([None, 1, 64, 300]))
def test_coded_chunk_tiles_with_a_window_mask_exactly_the_documents(layout, window):
  _assert_masks_documents(layout, block_q=128, block_k=128, causal=True, window=window)


@pytest.mark.parametrize("ids", ["large", "negative", "sparse", "fifteen_apart"])
def test_ids_far_apart_keep_their_compares_and_still_mask_exactly(ids):
  """Ids that share residues inside one tile pair (large, negative, 16 apart, or
  1 .. 16 with 16's rows reading a kv tile of 1 .. 15) make their rows keep the
  compares; the codes alone never decide there."""
  rng = np.random.default_rng(7)
  runs = np.repeat(np.arange(1, 41), 13)[:512]
  seg = {"large": runs * 1_000_003 + 2**30, "negative": -runs * 15, "sparse": runs * 16,
         "fifteen_apart": np.concatenate([np.repeat(np.arange(1, 16), 8),
                                          np.full(392, 16)])}[ids].astype(np.int64)
  seg = np.where(rng.random(512) < 0.05, 0, seg).astype(np.int32)[None]
  pos = np.arange(512, dtype=np.int32)[None]
  layout = Layout(seg, seg, pos, pos)
  plan = masks.make_tile_plan(*layout.arrays(), block_q=128, block_k=128, causal=True,
                              sliding_window=None)
  words = np.asarray(mosaic_codes.coded_compares(jnp.asarray(seg), jnp.asarray(seg),
                                                 plan.q_ranges, plan.q_compares, 128))
  assert np.any(np.asarray(plan.q_compares) & (2**COMPARE_SPLIT_BITS - 1) > 0)
  assert np.all(words & (2**COMPARE_SPLIT_BITS - 1) == 0)  # no row left to the codes
  _assert_masks_documents(layout, block_q=128, block_k=128, causal=True)


def test_rows_of_few_documents_leave_their_ids_to_the_codes():
  """Consecutive ids (what packing makes): every row keeps its compares word, its
  ids-only tiles left to the codes."""
  seg = np.repeat(np.arange(1, 9), 128)[None].astype(np.int32)  # 8 documents of 128
  seg = np.roll(seg, 64, axis=1)  # boundaries inside the tiles
  seg[0, :64] = 8
  pos = np.arange(1024, dtype=np.int32)[None]
  plan = masks.make_tile_plan(jnp.asarray(seg), jnp.asarray(seg), jnp.asarray(pos),
                              jnp.asarray(pos), block_q=128, block_k=128, causal=True,
                              sliding_window=None)
  words = np.asarray(mosaic_codes.coded_compares(jnp.asarray(seg), jnp.asarray(seg),
                                                 plan.q_ranges, plan.q_compares, 128))
  assert np.any(np.asarray(plan.q_compares) & (2**COMPARE_SPLIT_BITS - 1) > 0)
  np.testing.assert_array_equal(words, plan.q_compares)


def test_a_code_product_ends_a_score_at_the_bias_or_leaves_it_exact():
  """What the kernel's float32 accumulator gets: s + A @ C^T with bf16 A, C."""
  rng = np.random.default_rng(0)
  q_seg = np.array([0, 1, 2, 16, -4, 2**31 - 1, -2**31, 30], np.int32)
  kv_seg = np.array([0, 1, 2, 16, -4, 2**31 - 1, -2**31, 30, 15, 17], np.int32)
  res = np.mod(q_seg.astype(np.int64), 15)
  a = np.where(np.arange(16)[None] == res[:, None], 0.0, mosaic_codes.CODE_BIAS)
  a = np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32))
  c = np.asarray(mosaic_codes.key_codes(jnp.asarray(kv_seg)[None])[0].astype(jnp.float32))
  s = (rng.standard_normal((8, 10)) * 1e4).astype(np.float32)
  got = s + (a @ c.T).astype(np.float32)
  kv_res = np.where(kv_seg == 0, 15, np.mod(kv_seg.astype(np.int64), 15))
  match = res[:, None] == kv_res[None, :]
  np.testing.assert_array_equal(got[match], s[match])
  assert np.all(got[~match] == np.float32(mosaic_codes.CODE_BIAS))
  assert mosaic_codes.CODE_BIAS <= MASKED_LOGIT  # the online softmax masks it
  assert np.all(c.sum(axis=1) == 1) and np.all(c[kv_seg == 0, 15] == 1)


def test_forward_items_carry_the_key_codes_and_are_checked_for_them():
  seg = jnp.asarray(np.repeat(np.arange(1, 5), 64)[None], jnp.int32)
  plan = masks.make_tile_plan(seg, seg, seg * 0, seg * 0, block_q=128, block_k=128,
                              causal=False, sliding_window=None)
  coded = (seg, seg, 128)
  items = mosaic_persistent.work_items(plan.q_ranges, 2, plan.q_compares, coded_ids=coded)
  assert items.codes.shape == (1, 256, mosaic_codes.CODE_DIMS)
  np.testing.assert_array_equal(items.codes, mosaic_codes.key_codes(seg))
  resolve = lambda items, coded_ids: mosaic_persistent.resolve_work_items(  # noqa: E731
      items, plan.q_ranges, 2, None, None, coded_ids=coded_ids, can_claim=True)
  assert resolve(items, coded) is items
  plain = mosaic_persistent.work_items(plan.q_ranges, 2, plan.q_compares)
  with pytest.raises(ValueError, match="carry key codes"):
    resolve(plain, coded)
  with pytest.raises(ValueError, match="key codes must be bfloat16"):
    resolve(mosaic_persistent.WorkItems(items.table, items.num_ctas,
                                        codes=items.codes[:, :128]), coded)
  with pytest.raises(ValueError, match="without coded_ids"):
    resolve(items, None)
