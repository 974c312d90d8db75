"""Context parallelism (jpack.parallel) against the single-device reference.

Needs 8 JAX devices: `tests/test_parallel.py` runs this file in a child
process with XLA_FLAGS=--xla_force_host_platform_device_count=8 (the flag must
be set before JAX starts, and the main pytest process has started JAX long
before). To run it directly:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python -m pytest -q tests/parallel_cases.py

Every property example draws a packed layout and fresh inputs, runs forward
and backward with the row split over 8 devices (shards of 16 tokens, so
documents span several shards), and compares with `reference_attention` on the
whole rows. Layouts are data: each (strategy, causal, load balance) case
compiles once. Inside the shards the attention is implementation="xla".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from helpers import (ALL_KINDS, CONTIGUOUS_KINDS, Layout, allowed_np,
                     assert_close, assert_finite, custom_positions,
                     ids_from_runs, random_inputs, segment_ids)
from jpack import parallel
from jpack.attention import (EMPTY_LSE, KernelConfig, flash_attention,
                             reference_attention)

N = 8
if len(jax.devices()) < N:
  raise RuntimeError(
      f"parallel_cases.py needs {N} JAX devices, found {len(jax.devices())}: run "
      "it through tests/test_parallel.py, or set XLA_FLAGS="
      f"--xla_force_host_platform_device_count={N} before starting Python")

B, T, H, HKV, D = 2, 128, 2, 1, 16  # GQA 2:1; shards of T / N = 16 tokens
F32_TOL = 1e-5
SEEDS = st.integers(0, 2**31 - 1)
EMPTY = np.float32(EMPTY_LSE)  # lse arrays are float32
STRATEGIES = ("ring", "all_gather")
MESH = Mesh(np.array(jax.devices()[:N]), ("context",))


def arange_positions(batch=B, seq=T):
  return np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()


# ----------------------------------------------------------------------------
# Running one example


def vjp_results(attend, q, k, v, do, dlse):
  """dict(out, lse, dq, dk, dv) of attend(q, k, v) -> (out, lse) and its VJP."""
  (out, lse), vjp = jax.vjp(attend, q, k, v)
  dq, dk, dv = vjp((do, dlse))
  return dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv)


def as_numpy(results):
  return {name: np.asarray(x) for name, x in results.items()}


@functools.lru_cache(maxsize=None)
def attention_fn(strategy, causal, balanced, window=None):
  """Jitted (q, k, v, do, dlse, seg, pos) -> dict(out, lse, dq, dk, dv).

  strategy None is the single-device reference. Arguments and results are in
  the original token order; with `balanced` the function itself reorders
  everything into zigzag order around the context-parallel call, so the
  gradients also flow through load_balance / restore_order. Gradients are
  those of sum(out * do) + sum(lse * dlse).
  """

  def attend(q, k, v, seg, pos):
    if strategy is None:
      return reference_attention(q, k, v, segment_ids=seg, q_positions=pos,
                                 kv_positions=pos, causal=causal,
                                 sliding_window=window, return_residuals=True)
    if balanced:
      q, k, v, seg, pos = (parallel.load_balance(x, N) for x in (q, k, v, seg, pos))
    out, lse = parallel.context_parallel_attention(
        q, k, v, mesh=MESH, segment_ids=seg, positions=pos, strategy=strategy,
        causal=causal, sliding_window=window, implementation="xla",
        return_residuals=True)
    if balanced:
      out, lse = parallel.restore_order(out, N), parallel.restore_order(lse, N, axis=2)
    return out, lse

  def run(q, k, v, do, dlse, seg, pos):
    return vjp_results(lambda q, k, v: attend(q, k, v, seg, pos), q, k, v, do, dlse)

  return jax.jit(run)


def run_both(strategy, causal, balanced, seg, seed, pos=None, window=None):
  """(context parallel, reference) results as dicts of numpy arrays."""
  inputs = random_inputs(seed, batch=B, q_len=T, kv_len=T, heads=H,
                         kv_heads=HKV, head_dim=D)
  ids = (jnp.asarray(seg, jnp.int32),
         jnp.asarray(arange_positions() if pos is None else pos, jnp.int32))
  got = attention_fn(strategy, causal, balanced, window)(*inputs, *ids)
  want = attention_fn(None, causal, False, window)(*inputs, *ids)
  return as_numpy(got), as_numpy(want)


def check_equal(got, want):
  """Same outputs, lse and gradients to F32_TOL; nothing NaN or inf."""
  for name in ("out", "dq", "dk", "dv"):
    assert_finite(name, got[name])
    assert_close(name, got[name], want[name], F32_TOL)
  empty = want["lse"] == EMPTY
  assert_finite("lse", got["lse"])
  np.testing.assert_array_equal(got["lse"][empty], EMPTY)
  assert_close("lse", got["lse"][~empty], want["lse"][~empty], F32_TOL)


# ----------------------------------------------------------------------------
# Equal to one device


CASES = [(s, c, lb) for s in STRATEGIES for c in (True, False) for lb in (False, True)]
CASE_IDS = [f"{s}-{'causal' if c else 'bidirectional'}-{'balanced' if lb else 'contiguous'}"
            for s, c, lb in CASES]


@pytest.mark.parametrize("strategy,causal,balanced", CASES, ids=CASE_IDS)
@given(seg=segment_ids(B, T, ALL_KINDS), seed=SEEDS)
def test_forward_and_gradients_match_reference(strategy, causal, balanced, seg, seed):
  check_equal(*run_both(strategy, causal, balanced, seg, seed))


def _layout(*rows):
  return np.stack([ids_from_runs(r, T) for r in rows])


NAMED_LAYOUTS = {
    # One document per row, crossing every shard boundary.
    "one_document_per_row": _layout([(T, False)], [(T, False)]),
    # Documents spanning 2-5 shards, cut mid-shard.
    "documents_spanning_shards": _layout([(37, False), (70, False), (21, False)],
                                         [(90, False), (38, False)]),
    # Padding runs, including whole shards of padding (queries that see
    # nothing on a whole device) and a row that is nothing but padding.
    "padding_runs": _layout([(20, False), (40, True), (30, False), (38, True)],
                            [(T, True)]),
    # Many tiny documents, several per shard, one-token ones included.
    "many_tiny_documents": _layout([(1, False)] * 10 + [(3, False)] * 39,
                                   [(5, False), (1, True)] * 21 + [(2, False)]),
}


@pytest.mark.parametrize("strategy,causal,balanced", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("layout", list(NAMED_LAYOUTS))
def test_named_layouts_match_reference(strategy, causal, balanced, layout):
  check_equal(*run_both(strategy, causal, balanced, NAMED_LAYOUTS[layout], seed=7))


@pytest.mark.parametrize("strategy", STRATEGIES)
@given(seg=segment_ids(B, T, ALL_KINDS), pos=custom_positions(B, T),
       seed=SEEDS, window=st.sampled_from([None, 24]))
def test_any_positions_and_windows_match_reference(strategy, seg, pos, seed, window):
  # Positions need not increase: skipping on per-block min/max stays exact.
  check_equal(*run_both(strategy, True, False, seg, seed, pos=pos, window=window))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_queries_that_see_nothing_get_zero_output_and_zero_gradients(strategy):
  seg = NAMED_LAYOUTS["padding_runs"]
  got, want = run_both(strategy, True, True, seg, seed=3)
  padding = seg == 0  # [B, T]
  assert padding[0, 24:56].all() and padding[1].all()  # whole shards of it
  np.testing.assert_array_equal(got["out"][padding], 0.0)
  np.testing.assert_array_equal(got["dq"][padding], 0.0)
  np.testing.assert_array_equal(got["dk"][padding], 0.0)
  np.testing.assert_array_equal(got["dv"][padding], 0.0)
  np.testing.assert_array_equal(got["lse"].transpose(0, 2, 1)[padding], EMPTY)
  check_equal(got, want)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_pallas_kernels_inside_the_shards_match_reference(strategy):
  # The GPU path, in the Pallas interpreter: the kernels' custom VJP under
  # shard_map, lax.scan and lax.cond.
  q, k, v, do, dlse = random_inputs(9, batch=B, q_len=T, kv_len=T, heads=H,
                                    kv_heads=HKV, head_dim=D)
  seg = jnp.asarray(NAMED_LAYOUTS["padding_runs"])
  got = vjp_results(jax.jit(lambda q, k, v: parallel.context_parallel_attention(
      q, k, v, mesh=MESH, segment_ids=seg, strategy=strategy,
      implementation="pallas", interpret=True, config=KernelConfig.uniform(16),
      return_residuals=True)), q, k, v, do, dlse)
  want = vjp_results(lambda q, k, v: reference_attention(
      q, k, v, segment_ids=seg, return_residuals=True), q, k, v, do, dlse)
  check_equal(as_numpy(got), as_numpy(want))


def test_bfloat16_ring_matches_float32_reference():
  q, k, v, do, _ = random_inputs(5, batch=B, q_len=T, kv_len=T, heads=H,
                                 kv_heads=HKV, head_dim=D)
  seg = jnp.asarray(NAMED_LAYOUTS["documents_spanning_shards"])
  bf = lambda x: x.astype(jnp.bfloat16)
  got = jax.jit(functools.partial(
      parallel.context_parallel_attention, mesh=MESH, implementation="xla"))(
          bf(q), bf(k), bf(v), segment_ids=seg)
  assert got.dtype == jnp.bfloat16
  f32 = lambda x: bf(x).astype(jnp.float32)
  want = reference_attention(f32(q), f32(k), f32(v), segment_ids=seg)
  assert_close("out", got.astype(jnp.float32), want, 2e-2)


# ----------------------------------------------------------------------------
# Skipping chunk pairs


def allowed_pairs_per_shard_pair(seg, pos, *, causal, window=None):
  """int [N, N]: allowed (query, key) pairs, queries on shard d, keys on shard e."""
  allowed = allowed_np(Layout(seg, seg, pos, pos), causal=causal, sliding_window=window)
  return allowed.reshape(B, N, T // N, N, T // N).sum(axis=(0, 2, 4))


def test_causal_ring_skips_the_chunks_after_the_queries():
  one_document = np.ones((B, T), np.int32)
  schedule = parallel.ring_schedule(one_document, num_shards=N, causal=True)
  np.testing.assert_array_equal(schedule, np.tri(N, dtype=bool))


def test_ring_skips_chunks_without_a_shared_document():
  # One document per pair of shards: each device meets only its pair.
  seg = np.repeat(np.arange(1, N // 2 + 1), 2 * T // N)[None].repeat(B, 0)
  schedule = parallel.ring_schedule(seg, num_shards=N, causal=False)
  np.testing.assert_array_equal(schedule, np.kron(np.eye(N // 2), np.ones((2, 2))) > 0)


def test_zigzag_ring_still_skips_what_neither_half_can_see():
  # Documents inside shards: after zigzag a device holds two far-apart halves,
  # and only per-block statistics still see that other shards are strangers.
  seg = np.repeat(np.arange(1, 2 * N + 1), T // (2 * N))[None].repeat(B, 0)
  balanced = parallel.load_balance(seg, N)
  positions = parallel.load_balance(arange_positions(), N)
  schedule = parallel.ring_schedule(balanced, positions, num_shards=N, causal=True)
  np.testing.assert_array_equal(schedule, np.eye(N, dtype=bool))


@given(seg=segment_ids(B, T, ALL_KINDS), pos=custom_positions(B, T),
       causal=st.booleans(), window=st.sampled_from([None, 3, 30]))
def test_ring_never_skips_a_chunk_pair_that_has_an_allowed_pair(seg, pos, causal, window):
  schedule = parallel.ring_schedule(seg, pos, num_shards=N, causal=causal,
                                    sliding_window=window)
  meets = allowed_pairs_per_shard_pair(seg, pos, causal=causal, window=window) > 0
  assert not (meets & ~schedule).any()


@given(seg=segment_ids(B, T, CONTIGUOUS_KINDS))
def test_ring_skips_every_chunk_pair_of_contiguous_documents_that_cannot_meet(seg):
  # With documents as contiguous runs, per-block min/max is tight at block
  # granularity: a pair is visited only if two of its blocks can meet.
  schedule = parallel.ring_schedule(seg, num_shards=N, causal=True)
  meets = allowed_pairs_per_shard_pair(seg, arange_positions(), causal=True) > 0
  np.testing.assert_array_equal(schedule, meets)


@functools.lru_cache(maxsize=None)
def _ring_steps_fn():
  """jit: (seg, pos) [B, T] -> (mine [B, 4, 4], needed [B, 4, 4]) on a
  (data 2 x context 4) mesh, rows split over data: [row, device, step]."""
  mesh = jax.make_mesh((2, 4), ("data", "context"), axis_types=(AxisType.Auto,) * 2)

  def local(seg, pos):
    mine, needed = parallel._ring_steps(
        seg, pos, seg, pos, axis_name="context", num_shards=4,
        opts=parallel._Options(causal=True))
    return mine[None, None], needed[None, None]

  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("data", "context"),
                               out_specs=P("data", "context"), check_vma=False))


@given(seg=segment_ids(B, T, ALL_KINDS))
def test_ring_transfers_exactly_the_chunks_some_device_needs(seg):
  # Device d at step s attends to device (d - s) mod 4's chunk when the schedule
  # says so; the transfer of step s happens iff any device of the whole mesh
  # (both rows) needs it, and every device agrees on that.
  mine, needed = _ring_steps_fn()(jnp.asarray(seg), jnp.asarray(arange_positions()))
  steps = np.arange(4)
  for row in range(B):
    schedule = parallel.ring_schedule(seg[row:row + 1], num_shards=4, causal=True)
    want = schedule[steps[:, None], (steps[:, None] - steps[None, :]) % 4]
    np.testing.assert_array_equal(np.asarray(mine)[row], want)
  any_device = np.asarray(mine).any(axis=(0, 1))
  np.testing.assert_array_equal(np.asarray(needed), np.broadcast_to(any_device, (B, 4, 4)))


def test_shard_aligned_documents_need_no_transfers():
  seg = np.repeat(np.arange(1, 9), T // 8)[None].repeat(B, 0)  # 2 documents per shard
  _, needed = _ring_steps_fn()(jnp.asarray(seg, jnp.int32), jnp.asarray(arange_positions()))
  np.testing.assert_array_equal(np.asarray(needed)[0, 0], [True, False, False, False])


# ----------------------------------------------------------------------------
# Load balancing


@pytest.mark.parametrize("rounds", [1, 4])
@pytest.mark.parametrize("as_jax", [False, True], ids=["numpy", "jax"])
def test_restore_order_inverts_load_balance(as_jax, rounds):
  x = np.arange(3 * T * 2).reshape(3, T, 2)
  if as_jax:
    x = jnp.asarray(x)
  balanced = parallel.load_balance(x, N, rounds=rounds)
  assert sorted(np.asarray(balanced)[0, :, 0]) == sorted(np.asarray(x)[0, :, 0])
  np.testing.assert_array_equal(parallel.restore_order(balanced, N, rounds=rounds), x)


def test_zigzag_gives_shard_d_chunks_d_and_2n_minus_1_minus_d():
  order = parallel.zigzag_order(16, 4).reshape(4, 2, 2)  # [shard, half, token]
  np.testing.assert_array_equal(order[:, :, 0] // 2, [[0, 7], [1, 6], [2, 5], [3, 4]])


def test_zigzag_rounds_repeat_the_pattern_on_finer_chunks():
  order = parallel.zigzag_order(16, 2, rounds=2).reshape(2, 4, 2)  # [shard, chunk, token]
  np.testing.assert_array_equal(order[:, :, 0] // 2, [[0, 3, 4, 7], [1, 2, 5, 6]])


@given(seg=segment_ids(B, T, ALL_KINDS), pos=custom_positions(B, T),
       causal=st.booleans(), window=st.sampled_from([None, 4, 50]))
def test_pair_counts_count_the_allowed_pairs(seg, pos, causal, window):
  counts = parallel.attention_pair_counts(seg, pos, num_shards=N, causal=causal,
                                          sliding_window=window)
  np.testing.assert_array_equal(
      counts, allowed_pairs_per_shard_pair(seg, pos, causal=causal, window=window))


def test_zigzag_balances_one_long_causal_document():
  seq = 1 << 16
  one_document = np.ones((1, seq), np.int32)
  before = parallel.flop_imbalance(one_document, num_shards=N)
  after = parallel.flop_imbalance(
      parallel.load_balance(one_document, N),
      parallel.load_balance(arange_positions(1, seq), N), num_shards=N)
  # Device d does (2d + 1) / (2N) of the work: max / mean = (2N - 1) / N.
  assert before["device"] == pytest.approx((2 * N - 1) / N, rel=1e-3)
  assert after["device"] == pytest.approx(1.0, abs=1e-12)
  assert after["ring"] == pytest.approx(1.0, abs=1e-12)


def test_shard_aligned_documents_are_balanced_either_way():
  seq = 1 << 16
  seg = np.repeat(np.arange(1, 4 * N + 1), seq // (4 * N))[None]
  assert parallel.flop_imbalance(seg, num_shards=N)["device"] == pytest.approx(1.0)
  after = parallel.flop_imbalance(parallel.load_balance(seg, N),
                                  parallel.load_balance(arange_positions(1, seq), N),
                                  num_shards=N)
  assert after["device"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------
# Meshes, jit and shardings


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit],
                         ids=["auto", "explicit"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_jit_with_named_sharding_over_data_and_context(axis_type, strategy):
  mesh = jax.make_mesh((2, 4), ("data", "context"), axis_types=(axis_type,) * 2)
  tokens = NamedSharding(mesh, P("data", "context"))
  q, k, v, _, _ = random_inputs(11, batch=B, q_len=T, kv_len=T, heads=H,
                                kv_heads=HKV, head_dim=D)
  seg = NAMED_LAYOUTS["documents_spanning_shards"]
  want = reference_attention(q, k, v, segment_ids=seg)

  @jax.jit
  def attend(q, k, v, seg):
    return parallel.context_parallel_attention(
        q, k, v, mesh=mesh, segment_ids=seg, strategy=strategy,
        implementation="xla")

  got = attend(*(jax.device_put(x, tokens) for x in (q, k, v, seg)))
  assert got.sharding.spec[:2] == ("data", "context")
  assert_close("out", got, want, F32_TOL)


def test_heads_split_over_a_model_axis():
  mesh = jax.make_mesh((4, 2), ("context", "model"), axis_types=(AxisType.Auto,) * 2)
  q, k, v, do, dlse = random_inputs(12, batch=B, q_len=T, kv_len=T, heads=4,
                                    kv_heads=2, head_dim=D)
  seg = jnp.asarray(NAMED_LAYOUTS["many_tiny_documents"])
  got = vjp_results(jax.jit(lambda q, k, v: parallel.context_parallel_attention(
      q, k, v, mesh=mesh, segment_ids=seg, head_axis="model", implementation="xla",
      return_residuals=True)), q, k, v, do, dlse)
  want = vjp_results(lambda q, k, v: reference_attention(
      q, k, v, segment_ids=seg, return_residuals=True), q, k, v, do, dlse)
  check_equal(as_numpy(got), as_numpy(want))


def _tiny_lm_losses(context_parallel, steps=3):
  """Losses of a one-layer attention LM trained with SGD on packed rows.

  context_parallel: a ContextParallel, or None for plain single-device
  attention. Everything else (data, init, optimiser) is identical.
  """
  vocab, dim, heads, head_dim, seq = 32, 16, 2, 8, 64
  rng = np.random.default_rng(0)
  seg = np.stack([ids_from_runs([(23, False), (30, False), (11, True)], seq),
                  ids_from_runs([(64, False)], seq)])
  tokens = rng.integers(0, vocab, (2, seq + 1)).astype(np.int32)
  starts = np.maximum.accumulate(
      np.where(np.diff(seg, axis=1, prepend=-1) != 0, np.arange(seq), 0), axis=1)
  batch = dict(
      # Next-token targets are made before the batch is reordered.
      inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=seg,
      doc_positions=np.arange(seq) - starts,  # restart at 0 in every document
      # Targets that cross a document boundary or sit in padding are ignored.
      loss_mask=((seg != 0) & (seg == np.roll(seg, -1, axis=1))).astype(np.float32))
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  params = dict(embed=normal(vocab, dim), pos_embed=normal(seq, dim) / 4,
                qkv=normal(dim, 3, heads, head_dim) / 4,
                proj=normal(heads, head_dim, dim) / 4)

  if context_parallel is None:
    attend = functools.partial(flash_attention, implementation="xla")
  else:
    batch = context_parallel.shard_batch(batch)
    params = context_parallel.replicate(params)
    attend = functools.partial(context_parallel.attention, implementation="xla")

  def loss_fn(params, batch):
    x = params["embed"][batch["inputs"]] + params["pos_embed"][batch["doc_positions"]]
    q, k, v = jnp.einsum("btd,dshe->sbthe", x, params["qkv"])
    x = x + jnp.einsum("bthe,hed->btd",
                       attend(q, k, v, segment_ids=batch["segment_ids"]), params["proj"])
    logits = x @ params["embed"].T
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return jnp.sum(ce * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])

  @jax.jit
  def step(params, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    return jax.tree.map(lambda p, g: p - 0.2 * g, params, grads), loss

  losses = []
  for _ in range(steps):
    params, loss = step(params, batch)
    losses.append(float(loss))
  return np.array(losses)


def test_context_parallel_lm_trains_like_one_device():
  cp = parallel.ContextParallel.create(context=4, data=2, strategy="ring",
                                       zigzag_rounds=2)
  want = _tiny_lm_losses(None)
  got = _tiny_lm_losses(cp)
  assert np.all(np.diff(want) < 0)  # it does learn
  np.testing.assert_allclose(got, want, rtol=F32_TOL)


# ----------------------------------------------------------------------------
# Bad input


def _qkv(seq=T):
  q, k, v, _, _ = random_inputs(1, batch=B, q_len=seq, kv_len=seq, heads=H,
                                kv_heads=HKV, head_dim=D)
  return q, k, v


def test_sequence_not_divisible_by_devices_is_rejected():
  with pytest.raises(ValueError, match=r"q: sequence length 100 .* 'context'"):
    parallel.context_parallel_attention(*_qkv(100), mesh=MESH)


def test_mesh_without_the_axis_is_rejected():
  mesh = Mesh(np.array(jax.devices()[:N]), ("sequence",))
  with pytest.raises(ValueError, match=r"axis_name 'context' is not an axis of mesh"):
    parallel.context_parallel_attention(*_qkv(), mesh=mesh)


def test_batch_axis_missing_from_mesh_is_rejected():
  with pytest.raises(ValueError, match=r"batch_axis 'data' is not an axis"):
    parallel.context_parallel_attention(*_qkv(), mesh=MESH, batch_axis="data")


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit],
                         ids=["auto", "explicit"])
def test_segment_ids_sharded_unlike_the_tokens_are_rejected(axis_type):
  mesh = jax.make_mesh((2, 4), ("data", "context"), axis_types=(axis_type,) * 2)
  q, k, v = (jax.device_put(x, NamedSharding(mesh, P("data", "context"))) for x in _qkv())
  seg = jax.device_put(jnp.ones((B, T), jnp.int32), NamedSharding(mesh, P(None, "data")))
  with pytest.raises(ValueError, match=r"segment_ids must be sharded like the tokens"):
    parallel.context_parallel_attention(q, k, v, mesh=mesh, segment_ids=seg)


def test_segment_ids_of_the_local_shard_only_are_rejected():
  with pytest.raises(ValueError, match=r"segment_ids must have the tokens' shape"):
    parallel.context_parallel_attention(
        *_qkv(), mesh=MESH, segment_ids=jnp.ones((B, T // N), jnp.int32))


def test_positions_of_the_wrong_shape_are_rejected():
  with pytest.raises(ValueError, match=r"positions must have the tokens' shape"):
    parallel.context_parallel_attention(
        *_qkv(), mesh=MESH, positions=jnp.zeros((T,), jnp.int32))


def test_unknown_strategy_is_rejected():
  with pytest.raises(ValueError, match=r"strategy must be one of"):
    parallel.context_parallel_attention(*_qkv(), mesh=MESH, strategy="tree")


def test_load_balance_needs_two_chunks_per_device():
  with pytest.raises(ValueError, match=r"divisible by 2 \* num_shards \* rounds = 16"):
    parallel.load_balance(np.zeros((B, 120)), N)
