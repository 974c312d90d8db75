"""jpack.packing and jpack.varlen: the packed-row contract, the packers,
statistics, format round trips, and the varlen entry point."""

from __future__ import annotations

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jpack import packing
from jpack.varlen import varlen_attention

doc_lengths = st.lists(st.integers(1, 70), min_size=1, max_size=40)


def make_docs(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 1000, size=n).astype(np.int32) for n in lengths]


def documents_in(rows: packing.PackedRows) -> list[tuple[int, ...]]:
  """Every document run of every row, as a tuple of tokens."""
  out = []
  for toks, seg in zip(rows.tokens, rows.segment_ids):
    for d in range(1, seg.max() + 1):
      out.append(tuple(toks[seg == d].tolist()))
  return out


def expected_chunks(docs, row_length):
  return sorted(tuple(d[i:i + row_length].tolist()) for d in docs
                for i in range(0, len(d), row_length))


def check_contract(rows: packing.PackedRows):
  """The invariants every PackedRows must satisfy (module doc)."""
  seg = rows.segment_ids
  assert rows.tokens.dtype == seg.dtype == rows.positions.dtype == np.int32
  assert rows.loss_mask.dtype == bool
  packing._check_packed_segment_ids(seg, "segment_ids")  # raises if not packed form
  np.testing.assert_array_equal(rows.positions, packing.positions_from_segment_ids(seg))
  for r in range(rows.num_rows):
    for d in range(1, seg[r].max() + 1):
      np.testing.assert_array_equal(rows.positions[r, seg[r] == d],
                                    np.arange((seg[r] == d).sum()))
    for t in range(rows.row_length):
      nxt = seg[r, t + 1] if t + 1 < rows.row_length else -1
      assert rows.loss_mask[r, t] == (seg[r, t] != 0 and nxt == seg[r, t])
  assert (rows.tokens[seg == 0] == 0).all()


# ----------------------------------------------------------------------------
# Packers


@given(lengths=doc_lengths, row_length=st.sampled_from([8, 32, 64]),
       balance=st.sampled_from(["tokens", "attention"]),
       max_docs=st.sampled_from([None, 1, 3]))
def test_pack_documents_keeps_every_token_once(lengths, row_length, balance, max_docs):
  docs = make_docs(lengths)
  rows = packing.pack_documents(docs, row_length, balance=balance,
                                max_docs_per_row=max_docs, seed=1)
  check_contract(rows)
  assert sorted(documents_in(rows)) == expected_chunks(docs, row_length)
  if max_docs is not None:
    assert rows.segment_ids.max(initial=0) <= max_docs


@given(lengths=doc_lengths, row_length=st.sampled_from([8, 32]))
def test_best_fit_leaves_at_most_one_row_half_empty(lengths, row_length):
  # Any-fit packers: had two rows been at most half full, the chunk that opened
  # the second would have fitted in the first.
  rows = packing.pack_documents(make_docs(lengths), row_length)
  used = (rows.segment_ids != 0).sum(axis=1)
  assert (used <= row_length // 2).sum() <= 1


def test_best_fit_fills_the_tightest_row():
  # 6 and 5 open rows with 4 and 5 free; the 4 goes to the row with 4 free.
  rows = packing.pack_documents(make_docs([6, 5, 4]), 10, seed=None)
  assert packing.lengths_from_segment_ids(rows.segment_ids)[0].tolist() == [6, 4]
  assert packing.lengths_from_segment_ids(rows.segment_ids)[1].tolist() == [5]


def test_pack_documents_is_deterministic_for_a_seed():
  docs = make_docs(np.random.default_rng(0).integers(1, 50, 200))
  a = packing.pack_documents(docs, 64, seed=3)
  b = packing.pack_documents(docs, 64, seed=3)
  c = packing.pack_documents(docs, 64, seed=4)
  for x, y in zip(a.as_dict().values(), b.as_dict().values()):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a.tokens, c.tokens)
  assert sorted(documents_in(a)) == sorted(documents_in(c))


def test_split_chunks_restart_positions_and_lose_one_target_per_split():
  doc = np.arange(1, 26, dtype=np.int32)  # 25 tokens, rows of 10: chunks 10, 10, 5
  rows = packing.pack_documents([doc], 10, seed=None)
  assert sorted(documents_in(rows)) == expected_chunks([doc], 10)
  assert rows.positions.max() == 9
  assert rows.loss_mask.sum() == 24 - 2  # 24 next-token targets, 2 cut by the splits


def test_attention_balance_evens_out_row_costs():
  rng = np.random.default_rng(0)
  docs = make_docs(np.clip(rng.lognormal(4.0, 1.0, 3000), 1, 1000).astype(int))
  by_tokens = packing.pack_documents(docs, 1024, balance="tokens")
  by_cost = packing.pack_documents(docs, 1024, balance="attention")
  s_tokens = packing.packing_stats(by_tokens.segment_ids)
  s_cost = packing.packing_stats(by_cost.segment_ids)
  assert s_cost.cost_cv < 0.9 * s_tokens.cost_cv
  assert s_cost.padding_fraction <= s_tokens.padding_fraction + 0.02


def test_balanced_shard_order_evens_out_devices():
  rng = np.random.default_rng(1)
  docs = make_docs(np.clip(rng.lognormal(4.0, 1.2, 800), 1, 512).astype(int))
  rows = packing.pack_documents(docs, 512, seed=0)
  n = rows.num_rows - rows.num_rows % 8
  seg = rows.segment_ids[:n]
  order = packing.balanced_shard_order(seg, 8)
  assert sorted(order.tolist()) == list(range(n))
  costs = packing.row_attention_costs(seg)
  naive = costs.reshape(8, -1).sum(1)
  balanced = costs[order].reshape(8, -1).sum(1)
  assert balanced.max() / balanced.mean() < naive.max() / naive.mean()
  assert balanced.max() / balanced.mean() < 1.05


@given(lengths=doc_lengths, buffer_rows=st.sampled_from([1, 4, 16]),
       rows_per_batch=st.sampled_from([1, 3]), max_docs=st.sampled_from([None, 2]))
def test_pack_stream_keeps_every_token_once(lengths, buffer_rows, rows_per_batch, max_docs):
  docs = make_docs(lengths)
  batches = list(packing.pack_stream(iter(docs), 32, buffer_rows=buffer_rows,
                                     rows_per_batch=rows_per_batch,
                                     max_docs_per_row=max_docs))
  assert all(b.num_rows == rows_per_batch for b in batches[:-1])
  assert 1 <= batches[-1].num_rows <= rows_per_batch
  rows = packing.PackedRows.concatenate(batches)
  check_contract(rows)
  assert sorted(documents_in(rows)) == expected_chunks(docs, 32)
  assert (rows.segment_ids != 0).any(axis=1).all()  # no empty rows


def test_pack_stream_holds_a_bounded_buffer():
  def endless():  # would never end if the packer read it all before yielding
    rng = np.random.default_rng(0)
    while True:
      yield rng.integers(0, 100, size=int(rng.integers(1, 40)))

  stream = packing.pack_stream(endless(), 64, buffer_rows=8, rows_per_batch=4)
  first = [next(stream) for _ in range(5)]
  assert all(b.num_rows == 4 for b in first)
  stats = packing.packing_stats(packing.PackedRows.concatenate(first).segment_ids)
  assert stats.padding_fraction < 0.1


def test_pad_documents_is_one_document_per_row():
  docs = make_docs([3, 10, 25])
  rows = packing.pad_documents(docs, 10)
  check_contract(rows)
  assert rows.num_rows == 1 + 1 + 3
  assert rows.segment_ids.max() == 1


# ----------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("pack", [
    lambda d, **kw: packing.pack_documents(d, 16, **kw),
    lambda d, **kw: list(packing.pack_stream(d, 16, **kw)),
    lambda d, **kw: packing.pad_documents(d, 16, **kw),
], ids=["offline", "stream", "padded"])
@pytest.mark.parametrize("docs, kwargs, match", [
    ([np.arange(3), np.array([], np.int32)], {}, r"documents\[1\] is empty"),
    ([np.arange(40)], {"split_long": False}, r"documents\[0\] has 40 tokens.*row_length=16"),
    ([np.array([1, 2, 300])], {"vocab_size": 258}, r"documents\[0\] has token id 300"),
    ([np.array([1, -2])], {}, r"documents\[0\] has token id -2"),
    ([np.array([0.5, 1.0])], {}, r"documents\[0\] must hold integer"),
    ([np.zeros((2, 2), np.int32)], {}, r"documents\[0\] must be a 1-D"),
    ([], {}, r"documents is empty"),
])
def test_bad_documents_raise(pack, docs, kwargs, match):
  with pytest.raises(ValueError, match=match):
    pack(docs, **kwargs)


@pytest.mark.parametrize("row_length", [0, 1, 2.5, True])
def test_bad_row_length_raises(row_length):
  with pytest.raises(ValueError, match="row_length"):
    packing.pack_documents([np.arange(3)], row_length)


def test_length_one_documents_pack_without_targets():
  rows = packing.pack_documents([np.array([7])] * 5, 8, seed=None)
  check_contract(rows)
  assert rows.segment_ids[0].tolist() == [1, 2, 3, 4, 5, 0, 0, 0]
  assert not rows.loss_mask.any()


def test_bad_options_raise():
  with pytest.raises(ValueError, match="max_docs_per_row"):
    packing.pack_documents([np.arange(3)], 8, max_docs_per_row=0)
  with pytest.raises(ValueError, match="balance"):
    packing.pack_documents([np.arange(3)], 8, balance="flops")
  with pytest.raises(ValueError, match="buffer_rows"):
    list(packing.pack_stream([np.arange(3)], 8, buffer_rows=0))
  with pytest.raises(ValueError, match="num_shards"):
    packing.balanced_shard_order(np.ones((6, 4), np.int32), 4)


# ----------------------------------------------------------------------------
# Statistics


def test_packing_stats_by_hand():
  seg = np.array([[1, 1, 2, 0], [1, 1, 1, 1]], np.int32)
  s = packing.packing_stats(seg)
  assert (s.num_rows, s.row_length, s.num_documents, s.num_tokens) == (2, 4, 3, 7)
  assert s.padding_fraction == pytest.approx(1 / 8)
  assert s.docs_per_row_mean == 1.5 and s.docs_per_row_max == 2
  # causal pairs inside documents: 3 + 1 + 10 over dense causal 2 * 10
  assert s.attention_fraction == pytest.approx(14 / 20)
  np.testing.assert_array_equal(packing.row_attention_costs(seg), [5.0, 16.0])
  assert s.cost_max_over_mean == pytest.approx(16 / 10.5)


# ----------------------------------------------------------------------------
# Conversions


@st.composite
def packed_segment_ids(draw):
  rows, t = draw(st.integers(1, 4)), draw(st.sampled_from([1, 7, 16]))
  out = np.zeros((rows, t), np.int32)
  for r in range(rows):
    pos, d = 0, 1
    while pos < t and draw(st.booleans()):
      n = draw(st.integers(1, t - pos))
      out[r, pos:pos + n] = d
      pos, d = pos + n, d + 1
  return out


@given(seg=packed_segment_ids())
def test_lengths_round_trip(seg):
  lengths = packing.lengths_from_segment_ids(seg)
  assert [int(x.sum()) for x in lengths] == (seg != 0).sum(1).tolist()
  np.testing.assert_array_equal(packing.segment_ids_from_lengths(lengths, seg.shape[1]), seg)


@given(seg=packed_segment_ids())
def test_cu_seqlens_round_trip(seg):
  cu, indices, max_len = packing.cu_seqlens_from_segment_ids(seg)
  lengths = np.concatenate(packing.lengths_from_segment_ids(seg))
  np.testing.assert_array_equal(np.diff(cu), lengths)
  assert max_len == lengths.max(initial=0)
  assert len(indices) == cu[-1] == (seg != 0).sum()
  back = packing.segment_ids_from_cu_seqlens(cu, indices, *seg.shape)
  np.testing.assert_array_equal(back, seg)


def test_cu_seqlens_unpads_like_flash_attention():
  seg = np.array([[1, 1, 2, 0], [1, 1, 1, 0]], np.int32)
  x = np.arange(8).reshape(2, 4) * 10
  cu, indices, max_len = packing.cu_seqlens_from_segment_ids(seg)
  assert cu.tolist() == [0, 2, 3, 6] and max_len == 3
  assert x.reshape(-1)[indices].tolist() == [0, 10, 20, 40, 50, 60]


@given(seg=packed_segment_ids())
def test_attention_mask_in_length_round_trip(seg):
  m = packing.attention_mask_in_length_from_segment_ids(seg)
  assert m.shape == seg.shape
  np.testing.assert_array_equal(packing.segment_ids_from_attention_mask_in_length(m), seg)


def test_attention_mask_in_length_by_hand():
  seg = np.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 2, 2, 0]], np.int32)
  m = packing.attention_mask_in_length_from_segment_ids(seg)
  assert m.tolist() == [[2, 3, 0, 0, 0, 0], [3, 2, 0, 0, 0, 0]]


@given(lengths=doc_lengths)
def test_grain_features_round_trip(lengths):
  rows = packing.pack_documents(make_docs(lengths), 32, seed=0)
  feats = packing.to_grain_features(rows, key="targets")
  assert set(feats) == {"targets", "targets_segment_ids", "targets_positions"}
  back = packing.from_grain_features(feats, key="targets")
  for a, b in zip(rows.as_dict().values(), back.as_dict().values()):
    np.testing.assert_array_equal(a, b)


def test_from_grain_features_reads_grains_own_packer():
  grain = pytest.importorskip("grain")
  docs = [{"inputs": np.arange(1, n + 1, dtype=np.int32)} for n in (3, 5, 2, 7, 4)]
  ds = grain.experimental.FirstFitPackIterDataset(
      grain.MapDataset.source(docs).to_iter_dataset(), length_struct={"inputs": 8},
      num_packing_bins=2)
  for example in ds:
    rows = packing.from_grain_features(example, key="inputs")
    check_contract(rows)


@pytest.mark.parametrize("bad", [
    np.array([[1, 0, 1]]),  # document after padding
    np.array([[2, 2, 0]]),  # does not start at 1
    np.array([[1, 3, 0]]),  # skips an id
    np.array([[1, 2, 1]]),  # a document comes back
])
def test_conversions_refuse_non_packed_segment_ids(bad):
  with pytest.raises(ValueError, match="packed form"):
    packing.cu_seqlens_from_segment_ids(bad)
  with pytest.raises(ValueError, match="packed form"):
    packing.lengths_from_segment_ids(bad)


def test_conversion_bad_input():
  with pytest.raises(ValueError, match="lengths"):
    packing.segment_ids_from_lengths([[3, 4]], 6)
  with pytest.raises(ValueError, match="cu_seqlens"):
    packing.segment_ids_from_cu_seqlens([1, 3], np.arange(3), 1, 4)
  with pytest.raises(ValueError, match="attention_mask_in_length"):
    packing.segment_ids_from_attention_mask_in_length(np.array([[0, 2, 0]]))
  with pytest.raises(ValueError, match="inputs_positions"):
    packing.from_grain_features({"inputs": np.ones(3), "inputs_segment_ids": np.ones(3)})
  with pytest.raises(ValueError, match="restart"):
    packing.from_grain_features({"inputs": np.ones(3, np.int32),
                                 "inputs_segment_ids": np.array([1, 1, 2]),
                                 "inputs_positions": np.array([0, 1, 2])})


# ----------------------------------------------------------------------------
# Varlen entry point


def causal_attention_numpy(q, k, v):
  """One document: q [l, H, D], k/v [l, Hkv, D] -> [l, H, D], float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  rep = q.shape[1] // k.shape[1]
  k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
  s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1])
  s = np.where(np.tril(np.ones(s.shape[1:], bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_varlen_attention_matches_each_document_alone(kv_heads, implementation):
  lengths = [5, 1, 17, 9]
  total = sum(lengths) + 3  # 3 trailing padding tokens
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (total, 4, 16), jnp.float32)
  k = jax.random.normal(keys[1], (total, kv_heads, 16), jnp.float32)
  v = jax.random.normal(keys[2], (total, kv_heads, 16), jnp.float32)
  cu = jnp.array(np.concatenate([[0], np.cumsum(lengths)]), jnp.int32)
  attend = jax.jit(functools.partial(varlen_attention, implementation=implementation,
                                     interpret=implementation == "pallas"))
  out = np.asarray(attend(q, k, v, cu))
  for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
    np.testing.assert_allclose(out[a:b], causal_attention_numpy(q[a:b], k[a:b], v[a:b]),
                               rtol=2e-5, atol=2e-5)
  assert (out[cu[-1]:] == 0).all()


def test_varlen_attention_works_with_traced_and_concrete_cu_seqlens():
  q = jax.random.normal(jax.random.key(1), (12, 2, 8))
  cu = jnp.array([0, 4, 12], jnp.int32)
  traced = jax.jit(lambda q, cu: varlen_attention(q, q, q, cu, implementation="xla"))(q, cu)
  concrete = jax.jit(lambda q: varlen_attention(q, q, q, cu, implementation="xla"))(q)
  np.testing.assert_array_equal(traced, concrete)
  np.testing.assert_allclose(traced[4:], causal_attention_numpy(q[4:], q[4:], q[4:]),
                             rtol=2e-5, atol=2e-5)


def test_varlen_attention_bad_input():
  q = jnp.zeros((8, 2, 8))
  with pytest.raises(ValueError, match="cu_seqlens"):
    varlen_attention(q, q, q, jnp.array([1, 8]))
  with pytest.raises(ValueError, match="cu_seqlens"):
    varlen_attention(q, q, q, jnp.array([0, 9]))
  with pytest.raises(ValueError, match="q must have shape"):
    varlen_attention(q[None], q, q, jnp.array([0, 8]))


def test_import_jpack_stays_light():
  code = ("import sys, jpack, jpack.packing, jpack.nn, jpack.varlen\n"
          "bad = [m for m in ('torch', 'grain', 'matplotlib') if m in sys.modules]\n"
          "assert not bad, bad\n")
  subprocess.run([sys.executable, "-c", code], check=True)
