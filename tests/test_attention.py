"""flash_attention: the Pallas kernels (interpreted on CPU) against the reference.

Every example draws a packed layout (segment ids, positions) with hypothesis
and fresh random inputs from a drawn seed, runs forward and backward through
the kernel and through `reference_attention`, and checks one property.
Layouts are data: the kernel call is jitted with the ids as traced arguments,
so each (shape, options) case compiles once and is reused across examples.

Relative error is ||got - want|| / ||want||; float32 must agree to 1e-5.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from helpers import (ALL_KINDS, CONTIGUOUS_KINDS, Layout, allowed_np,
                     arange_positions, assert_close, assert_finite,
                     chunk_layouts, random_inputs, rel_err, self_layouts)
from jpack.attention import (EMPTY_LSE, KernelConfig, TileConfig,
                             flash_attention, flash_attention_bwd,
                             reference_attention)

B = 2
CONFIG = KernelConfig.uniform(16)
F32_TOL = 1e-5
LOW_PRECISION_TOL = 2e-2
SEEDS = st.integers(0, 2**31 - 1)


@dataclasses.dataclass(frozen=True)
class Case:
  """Static shape and options of one kernel configuration."""
  name: str
  q_len: int = 64
  kv_len: int = 64
  heads: int = 2
  kv_heads: int = 2
  head_dim: int = 32
  causal: bool = True
  window: int | None = None
  positions: str = "arange"  # "arange" | "custom"
  chunk: bool = False  # q and kv are different chunks of one row
  scale_mult: float = 1.0  # multiplies the default scale 1/sqrt(head_dim)
  config: KernelConfig = CONFIG

  @property
  def scale(self):
    return None if self.scale_mult == 1.0 else self.scale_mult / math.sqrt(self.head_dim)

  @property
  def tol(self):
    """float32 tolerance: rounding in the softmax and its gradient grows with the logits
    (x50 logits reach a few hundred: dk errors of 1.2e-5 seen), so it scales with them."""
    return F32_TOL * max(1.0, self.scale_mult / 10)

  def layouts(self, kinds=ALL_KINDS):
    if self.chunk:
      return chunk_layouts(B, self.q_len, self.kv_len, kinds)
    assert self.q_len == self.kv_len
    return self_layouts(B, self.q_len, kinds, positions=self.positions)

  def allowed(self, layout):
    return allowed_np(layout, causal=self.causal, sliding_window=self.window)


CASES = [
    Case("causal"),
    Case("bidirectional", causal=False),
    Case("gqa-4:2", heads=4, kv_heads=2),
    Case("mqa-4:1", heads=4, kv_heads=1, causal=False),
    Case("odd-T37", q_len=37, kv_len=37),
    Case("chunk-q48-kv80", q_len=48, kv_len=80, chunk=True),
    Case("chunk-q48-kv80-bidirectional", q_len=48, kv_len=80, chunk=True, causal=False),
    Case("window-8", window=8),
    Case("window-20-bidirectional", window=20, causal=False),
    Case("custom-positions", positions="custom"),
    Case("head_dim-64", head_dim=64),
    Case("head_dim-96", head_dim=96, heads=1, kv_heads=1),  # padded to 128 inside
    Case("large-logits-x50", scale_mult=50.0),
    # Rectangular tiles, different per kernel (the dK/dV plan is transposed),
    # and q/kv lengths that are not multiples of any tile.
    Case("mixed-tiles-chunk-q37-kv53", q_len=37, kv_len=53, chunk=True,
         heads=4, kv_heads=2, config=KernelConfig(
             forward=TileConfig(64, 16), dq=TileConfig(16, 32),
             dkdv=TileConfig(32, 16))),
]
CASE_IDS = [c.name for c in CASES]
BY_NAME = {c.name: c for c in CASES}


# ----------------------------------------------------------------------------
# Running one example


@functools.lru_cache(maxsize=None)
def attention_fn(implementation, causal, window, scale, residuals=True,
                 config=CONFIG):
  """Jitted (q, k, v, do, dlse, *ids) -> dict(out, lse, dq, dk, dv).

  The gradients are those of sum(out * do) + sum(lse * dlse) (or of
  sum(out * do) alone when residuals=False).
  """
  extra = dict(interpret=True, config=config) if implementation == "pallas" else {}

  def run(q, k, v, do, dlse, q_seg, kv_seg, q_pos, kv_pos):
    def f(q, k, v):
      return flash_attention(
          q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
          q_positions=q_pos, kv_positions=kv_pos, causal=causal,
          sliding_window=window, scale=scale, implementation=implementation,
          return_residuals=residuals, **extra)

    res, vjp = jax.vjp(f, q, k, v)
    if residuals:
      out, lse = res
      dq, dk, dv = vjp((do, dlse))
    else:
      out, lse = res, jnp.zeros_like(dlse)
      dq, dk, dv = vjp(do)
    return dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv)

  return jax.jit(run)


def run_both(case: Case, layout: Layout, seed, *, dtype=jnp.float32,
             residuals=True):
  """(kernel, reference) results as dicts of numpy arrays.

  The reference runs in float32 on the same (rounded) inputs.
  """
  q, k, v, do, dlse = random_inputs(
      seed, batch=B, q_len=case.q_len, kv_len=case.kv_len, heads=case.heads,
      kv_heads=case.kv_heads, head_dim=case.head_dim, dtype=dtype)
  ids = layout.arrays()
  got = attention_fn("pallas", case.causal, case.window, case.scale, residuals,
                     case.config)(q, k, v, do, dlse, *ids)
  f32 = lambda x: x.astype(jnp.float32)
  want = attention_fn("xla", case.causal, case.window, case.scale, residuals)(
      f32(q), f32(k), f32(v), f32(do), dlse, *ids)
  as_np = lambda d: {n: np.asarray(x.astype(jnp.float32)) for n, x in d.items()}
  return as_np(got), as_np(want)


def seen_rows(case, layout):
  """bool [B, Tq]: queries that may attend to at least one key."""
  return case.allowed(layout).any(axis=2)


def seen_keys(case, layout):
  """bool [B, Tk]: keys that at least one query may attend to."""
  return case.allowed(layout).any(axis=1)


def lse_rows(case, rows):
  """[B, Tq] row mask -> [B, H, Tq] for lse."""
  return np.broadcast_to(rows[:, None, :], (B, case.heads, rows.shape[1]))


def case_params(names=None):
  cases = CASES if names is None else [BY_NAME[n] for n in names]
  return pytest.mark.parametrize("case", cases, ids=lambda c: c.name)


# ----------------------------------------------------------------------------
# Agreement with the reference (float32)


@case_params()
@given(data=st.data(), seed=SEEDS)
def test_output_matches_reference(case, data, seed):
  layout = data.draw(case.layouts())
  got, want = run_both(case, layout, seed)
  assert_close("out", got["out"], want["out"], case.tol)


@case_params()
@given(data=st.data(), seed=SEEDS)
def test_lse_matches_reference(case, data, seed):
  layout = data.draw(case.layouts())
  got, want = run_both(case, layout, seed)
  seen = lse_rows(case, seen_rows(case, layout))
  assert_close("lse", got["lse"][seen], want["lse"][seen], case.tol)


@case_params()
@given(data=st.data(), seed=SEEDS)
def test_lse_of_rows_that_see_nothing_is_empty_lse(case, data, seed):
  layout = data.draw(case.layouts())
  got, want = run_both(case, layout, seed)
  empty = lse_rows(case, ~seen_rows(case, layout))
  np.testing.assert_array_equal(got["lse"][empty], np.float32(EMPTY_LSE))
  np.testing.assert_array_equal(want["lse"][empty], np.float32(EMPTY_LSE))


@case_params()
@given(data=st.data(), seed=SEEDS)
def test_gradients_match_reference(case, data, seed):
  """dq, dk, dv of a loss that uses both out and lse."""
  layout = data.draw(case.layouts())
  got, want = run_both(case, layout, seed)
  for name in ("dq", "dk", "dv"):
    assert_close(name, got[name], want[name], case.tol)


@case_params(["gqa-4:2", "chunk-q48-kv80"])
@settings(max_examples=10)
@given(data=st.data(), seed=SEEDS)
def test_gradients_of_output_alone_match_reference(case, data, seed):
  """Without return_residuals: the loss sees out only."""
  layout = data.draw(case.layouts())
  got, want = run_both(case, layout, seed, residuals=False)
  for name in ("out", "dq", "dk", "dv"):
    assert_close(name, got[name], want[name], case.tol)


# ----------------------------------------------------------------------------
# Rows and keys that take no part


@case_params()
@given(data=st.data(), seed=SEEDS)
def test_nothing_is_nan_or_inf(case, data, seed):
  layout = data.draw(case.layouts())
  got, _ = run_both(case, layout, seed)
  for name, x in got.items():
    assert_finite(name, x)


@case_params()
@given(data=st.data(), seed=SEEDS)
def test_padding_queries_output_exactly_zero(case, data, seed):
  layout = data.draw(case.layouts())
  got, _ = run_both(case, layout, seed)
  pad = layout.q_segment_ids == 0
  assert np.all(got["out"][pad] == 0.0)


@case_params()
@given(data=st.data(), seed=SEEDS)
def test_queries_that_see_nothing_have_zero_output_and_zero_dq(case, data, seed):
  """Padding, and queries cut off by a window or a chunk boundary."""
  layout = data.draw(case.layouts())
  got, _ = run_both(case, layout, seed)
  blind = ~seen_rows(case, layout)
  assert np.all(got["out"][blind] == 0.0)
  assert np.all(got["dq"][blind] == 0.0)


@case_params()
@given(data=st.data(), seed=SEEDS)
def test_keys_no_query_sees_get_zero_dk_dv(case, data, seed):
  layout = data.draw(case.layouts())
  got, _ = run_both(case, layout, seed)
  unseen = ~seen_keys(case, layout)
  assert np.all(got["dk"][unseen] == 0.0)
  assert np.all(got["dv"][unseen] == 0.0)


# ----------------------------------------------------------------------------
# Half precision (looser tolerance, reference in float32 on the rounded inputs)

LOW_PRECISION = [pytest.param(jnp.bfloat16, id="bfloat16"),
                 pytest.param(jnp.float16, id="float16")]


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@settings(max_examples=10)
@given(data=st.data(), seed=SEEDS)
def test_half_precision_forward_matches_reference(dtype, data, seed):
  case = BY_NAME["gqa-4:2"]
  layout = data.draw(case.layouts())
  got, want = run_both(case, layout, seed, dtype=dtype)
  seen = lse_rows(case, seen_rows(case, layout))
  assert_close("out", got["out"], want["out"], LOW_PRECISION_TOL)
  assert_close("lse", got["lse"][seen], want["lse"][seen], LOW_PRECISION_TOL)
  assert np.all(got["out"][~seen_rows(case, layout)] == 0.0)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@settings(max_examples=10)
@given(data=st.data(), seed=SEEDS)
def test_half_precision_gradients_match_reference(dtype, data, seed):
  case = BY_NAME["gqa-4:2"]
  layout = data.draw(case.layouts())
  got, want = run_both(case, layout, seed, dtype=dtype)
  for name in ("dq", "dk", "dv"):
    assert_finite(name, got[name])
    assert_close(name, got[name], want[name], LOW_PRECISION_TOL)


# ----------------------------------------------------------------------------
# The xla implementation and "auto"


def _xla_inputs(seed, q_len=64, kv_len=64):
  q, k, v, _, _ = random_inputs(seed, batch=B, q_len=q_len, kv_len=kv_len,
                                heads=4, kv_heads=2, head_dim=32)
  return q, k, v


@functools.lru_cache(maxsize=None)
def _public_fn(fn, **options):
  """jit(fn) with layout arrays as traced keyword arguments."""
  return jax.jit(lambda q, k, v, ids: fn(q, k, v, **ids, **options))


@pytest.mark.parametrize("causal", [True, False])
@given(layout=chunk_layouts(B, 48, 80) | self_layouts(B, 48, positions="custom"),
       seed=SEEDS)
def test_xla_implementation_is_the_reference(causal, layout, seed):
  q, k, v = _xla_inputs(seed, 48, layout.kv_segment_ids.shape[1])
  got = _public_fn(flash_attention, causal=causal, implementation="xla",
                   return_residuals=True)(q, k, v, layout.kwargs())
  want = _public_fn(reference_attention, causal=causal,
                    return_residuals=True)(q, k, v, layout.kwargs())
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="auto runs the GPU kernels on a GPU")
@given(layout=self_layouts(B, 64), seed=SEEDS)
def test_auto_on_cpu_is_the_reference(layout, seed):
  q, k, v = _xla_inputs(seed)
  got = _public_fn(flash_attention, implementation="auto")(q, k, v, layout.kwargs())
  want = _public_fn(reference_attention)(q, k, v, layout.kwargs())
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@given(layout=self_layouts(B, 64), seed=SEEDS)
def test_segment_ids_means_the_same_ids_for_queries_and_keys(layout, seed):
  q, k, v = _xla_inputs(seed)
  seg = layout.q_segment_ids
  got = _public_fn(reference_attention)(q, k, v, dict(segment_ids=seg))
  want = _public_fn(reference_attention)(
      q, k, v, dict(q_segment_ids=seg, kv_segment_ids=seg))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("causal", [True, False])
def test_defaults_are_one_document_and_row_positions(causal):
  q, k, v = _xla_inputs(0)
  ones = np.ones((B, 64), np.int32)
  pos = arange_positions(B, 64)
  got = reference_attention(q, k, v, causal=causal)
  want = reference_attention(q, k, v, segment_ids=ones, q_positions=pos,
                             kv_positions=pos, causal=causal)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_return_residuals_false_returns_only_the_output():
  q, k, v = _xla_inputs(0)
  out = flash_attention(q, k, v, implementation="xla")
  assert isinstance(out, jax.Array) and out.shape == q.shape and out.dtype == q.dtype
  out2, lse = flash_attention(q, k, v, implementation="xla", return_residuals=True)
  assert lse.shape == (B, 4, 64) and lse.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out), np.asarray(out2))


def _per_document_attention(q, k, v, seg, *, causal):
  """Numpy oracle: attention run separately on each document of each row.

  q: [B, T, H, D]; k, v: [B, T, Hkv, D]; seg: [B, T] contiguous documents.
  """
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  out = np.zeros_like(q)
  for b in range(q.shape[0]):
    for d in np.unique(seg[b][seg[b] != 0]):
      idx = np.nonzero(seg[b] == d)[0]
      s = np.einsum("qhd,khd->hqk", q[b, idx], k[b, idx]) / np.sqrt(q.shape[3])
      if causal:
        s = np.where(np.tril(np.ones((idx.size, idx.size), bool)), s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      out[b, idx] = np.einsum("hqk,khd->qhd", p, v[b, idx])
  return out


@functools.lru_cache(maxsize=None)
def _packed_fn(implementation, causal):
  extra = dict(interpret=True, config=CONFIG) if implementation == "pallas" else {}
  return jax.jit(lambda q, k, v, seg: flash_attention(
      q, k, v, segment_ids=seg, causal=causal, implementation=implementation,
      **extra))


@pytest.mark.parametrize("implementation,causal", [
    ("xla", True), ("xla", False), ("pallas", True)])
@given(layout=self_layouts(B, 64, CONTIGUOUS_KINDS), seed=SEEDS)
def test_packed_rows_equal_documents_attended_alone(implementation, causal, layout, seed):
  q, k, v = _xla_inputs(seed)
  got = _packed_fn(implementation, causal)(q, k, v, layout.q_segment_ids)
  want = _per_document_attention(q, k, v, layout.q_segment_ids, causal=causal)
  assert rel_err(got, want) <= F32_TOL


# ----------------------------------------------------------------------------
# Backward from given residuals (flash_attention_bwd)


@functools.lru_cache(maxsize=None)
def _backward_fn(case, impl, kv_start, kv_stop):
  """Jitted flash_attention_bwd for keys [kv_start, kv_stop) against all queries:
  (q, k, v, out, lse, do, dlse, q_seg, kv_seg, q_pos, kv_pos) -> (dq, dk, dv)."""
  extra = dict(interpret=True, config=case.config) if impl == "pallas" else {}
  kv = slice(kv_start, kv_stop)

  def run(q, k, v, out, lse, do, dlse, q_seg, kv_seg, q_pos, kv_pos):
    return flash_attention_bwd(
        q, k[:, kv], v[:, kv], out, lse, do, dlse=dlse, q_segment_ids=q_seg,
        kv_segment_ids=kv_seg[:, kv], q_positions=q_pos,
        kv_positions=kv_pos[:, kv], causal=case.causal,
        sliding_window=case.window, scale=case.scale, implementation=impl, **extra)

  return jax.jit(run)


def _grads_from_residuals(case, layout, impl, q, k, v, out, lse, do, dlse,
                          kv=(None, None)):
  return _backward_fn(case, impl, *kv)(q, k, v, out, lse, do, dlse, *layout.arrays())


def _reference_results(case, layout, q, k, v, do, dlse):
  """The reference's out, lse and vjp (dq, dk, dv) of sum(out*do) + sum(lse*dlse)."""
  return attention_fn("xla", case.causal, case.window, case.scale)(
      q, k, v, do, dlse, *layout.arrays())


BWD_CASES = ["causal", "gqa-4:2", "chunk-q48-kv80", "window-8"]


@case_params(BWD_CASES)
@pytest.mark.parametrize("impl", ["xla", "pallas"])
@given(data=st.data(), seed=SEEDS)
def test_backward_from_residuals_is_the_vjp(case, impl, data, seed):
  layout = data.draw(case.layouts())
  q, k, v, do, dlse = random_inputs(
      seed, batch=B, q_len=case.q_len, kv_len=case.kv_len, heads=case.heads,
      kv_heads=case.kv_heads, head_dim=case.head_dim)
  want = _reference_results(case, layout, q, k, v, do, dlse)
  got = _grads_from_residuals(case, layout, impl, q, k, v, want["out"], want["lse"],
                              do, dlse)
  for name, x in zip(("dq", "dk", "dv"), got):
    assert_finite(name, x)
    assert_close(name, x, want[name], case.tol)


@case_params(BWD_CASES)
@pytest.mark.parametrize("impl", ["xla", "pallas"])
@given(data=st.data(), seed=SEEDS)
def test_chunks_of_keys_get_their_share_from_the_whole_rows_residuals(case, impl, data, seed):
  # Ring attention's backward: each chunk of keys, given the (out, lse) over
  # all keys, yields its dK/dV and a part of dQ; the parts add up to the vjp.
  layout = data.draw(case.layouts())
  q, k, v, do, dlse = random_inputs(
      seed, batch=B, q_len=case.q_len, kv_len=case.kv_len, heads=case.heads,
      kv_heads=case.kv_heads, head_dim=case.head_dim)
  want = _reference_results(case, layout, q, k, v, do, dlse)
  cut = case.kv_len // 3
  parts = [_grads_from_residuals(case, layout, impl, q, k, v, want["out"], want["lse"],
                                 do, dlse, kv) for kv in ((0, cut), (cut, None))]
  assert_close("dq", parts[0][0] + parts[1][0], want["dq"], case.tol)
  assert_close("dk", jnp.concatenate([parts[0][1], parts[1][1]], 1), want["dk"], case.tol)
  assert_close("dv", jnp.concatenate([parts[0][2], parts[1][2]], 1), want["dv"], case.tol)


# ----------------------------------------------------------------------------
# Bad input: errors name the argument

_f32 = jnp.float32


def _qkv(b=1, tq=32, tk=32, h=2, hkv=2, d=32, dtype=_f32):
  return (jnp.ones((b, tq, h, d), dtype), jnp.ones((b, tk, hkv, d), dtype),
          jnp.ones((b, tk, hkv, d), dtype))


def _ids(b=1, t=32, dtype=jnp.int32):
  return jnp.ones((b, t), dtype)


def _bad_calls():
  q, k, v = _qkv()
  q_cpu_pallas = dict(implementation="pallas", interpret=True, config=CONFIG)
  yield "q rank 3", lambda: flash_attention(q[0], k, v), ValueError, r"q must have shape \[batch, seq, heads, head_dim\]"
  yield "k rank 5", lambda: flash_attention(q, k[None], v), ValueError, r"k must have shape"
  yield "v rank 3", lambda: flash_attention(q, k, v[0]), ValueError, r"v must have shape"
  yield "batch mismatch", lambda: flash_attention(q, *_qkv(b=2)[1:]), ValueError, r"same batch size"
  yield "head_dim mismatch", lambda: flash_attention(q, *_qkv(d=64)[1:]), ValueError, r"same head_dim"
  yield "k/v shape mismatch", lambda: flash_attention(q, k, _qkv(tk=16)[2]), ValueError, r"k and v must have the same shape"
  yield "kv heads do not divide q heads", lambda: flash_attention(*_qkv(h=3)), ValueError, r"q heads \(3\) must be a multiple of k/v heads \(2\)"
  yield "float segment_ids", lambda: flash_attention(q, k, v, segment_ids=_ids(dtype=_f32)), TypeError, r"segment_ids must be an integer array"
  yield "float q_positions", lambda: flash_attention(q, k, v, q_positions=_ids(dtype=_f32)), TypeError, r"q_positions must be an integer array"
  yield "segment_ids wrong shape", lambda: flash_attention(q, k, v, segment_ids=_ids(t=31)), ValueError, r"segment_ids must have shape \[batch, seq\] = \(1, 32\)"
  yield "segment_ids 1-D", lambda: flash_attention(q, k, v, segment_ids=jnp.ones(32, jnp.int32)), ValueError, r"segment_ids must have shape"
  yield "kv_segment_ids wrong shape", lambda: flash_attention(q, k, v, q_segment_ids=_ids(), kv_segment_ids=_ids(t=16)), ValueError, r"kv_segment_ids must have shape"
  yield "q_positions wrong shape", lambda: flash_attention(q, k, v, q_positions=_ids(b=2)), ValueError, r"q_positions must have shape"
  yield "kv_positions wrong shape", lambda: flash_attention(q, k, v, kv_positions=_ids(t=33)), ValueError, r"kv_positions must have shape"
  yield "segment_ids and q_segment_ids", lambda: flash_attention(q, k, v, segment_ids=_ids(), q_segment_ids=_ids()), ValueError, r"either segment_ids or q_segment_ids/kv_segment_ids"
  yield "only q_segment_ids", lambda: flash_attention(q, k, v, q_segment_ids=_ids()), ValueError, r"q_segment_ids and kv_segment_ids must be given together"
  yield "only kv_segment_ids", lambda: flash_attention(q, k, v, kv_segment_ids=_ids()), ValueError, r"q_segment_ids and kv_segment_ids must be given together"
  yield "segment_ids with Tq != Tk", lambda: flash_attention(*_qkv(tq=16), segment_ids=_ids()), ValueError, r"segment_ids needs equal q and kv lengths.*q_segment_ids and kv_segment_ids"
  yield "head_dim 512 with pallas", lambda: flash_attention(*_qkv(d=512), **q_cpu_pallas), ValueError, r"head_dim 512 .*implementation='xla'"
  yield "unknown implementation", lambda: flash_attention(q, k, v, implementation="triton"), ValueError, r"implementation must be 'auto', 'pallas', 'mosaic' or 'xla', got 'triton'"
  yield "sliding_window=0", lambda: flash_attention(q, k, v, sliding_window=0), ValueError, r"sliding_window must be a positive int"
  yield "sliding_window float", lambda: flash_attention(q, k, v, sliding_window=8.0), ValueError, r"sliding_window must be a positive int"
  yield "scale 0", lambda: flash_attention(q, k, v, scale=0.0), ValueError, r"scale must be a positive finite float, got 0.0"
  yield "scale negative", lambda: flash_attention(q, k, v, scale=-0.125), ValueError, r"scale must be a positive finite float"
  yield "scale inf", lambda: flash_attention(q, k, v, scale=float("inf")), ValueError, r"scale must be a positive finite float"
  yield "scale nan", lambda: flash_attention(q, k, v, scale=float("nan")), ValueError, r"scale must be a positive finite float"
  yield "causal not a bool", lambda: flash_attention(q, k, v, causal=1), TypeError, r"causal must be a bool"
  yield "causal a string", lambda: flash_attention(q, k, v, causal="yes"), TypeError, r"causal must be a bool"
  yield "mismatched dtypes", lambda: flash_attention(q, k.astype(jnp.bfloat16), v), TypeError, r"q, k, v must share a dtype"
  yield "integer q", lambda: flash_attention(q.astype(jnp.int32), k, v), TypeError, r"q must be bfloat16, float16 or float32"
  yield "int8 k", lambda: flash_attention(q, k.astype(jnp.int8), v), TypeError, r"k must be bfloat16, float16 or float32"
  yield "config not a KernelConfig", lambda: flash_attention(q, k, v, implementation="pallas", interpret=True, config=16), TypeError, r"config must be a KernelConfig"
  yield "GPU tiles narrower than 16", lambda: flash_attention(q, k, v, implementation="pallas", config=KernelConfig.uniform(8)), ValueError, r"config: GPU tiles must be at least 16 wide, got 8"


def _bad_backward_calls():
  q, k, v = _qkv()
  lse = jnp.zeros((1, 2, 32), _f32)
  yield "bwd out wrong shape", lambda: flash_attention_bwd(q, k, v, q[:, :16], lse, q), ValueError, r"out must have shape \(1, 32, 2, 32\)"
  yield "bwd do wrong shape", lambda: flash_attention_bwd(q, k, v, q, lse, q[..., :16]), ValueError, r"do must have shape \(1, 32, 2, 32\)"
  yield "bwd lse wrong shape", lambda: flash_attention_bwd(q, k, v, q, lse[:, :, :16], q), ValueError, r"lse must have shape \(1, 2, 32\)"
  yield "bwd dlse wrong shape", lambda: flash_attention_bwd(q, k, v, q, lse, q, dlse=lse[0]), ValueError, r"dlse must have shape \(1, 2, 32\)"
  yield "bwd float segment_ids", lambda: flash_attention_bwd(q, k, v, q, lse, q, segment_ids=_ids(dtype=_f32)), TypeError, r"segment_ids must be an integer array"
  yield "bwd scale negative", lambda: flash_attention_bwd(q, k, v, q, lse, q, scale=-1.0), ValueError, r"scale must be a positive finite float"


BAD_CALLS = list(_bad_calls()) + list(_bad_backward_calls())


@pytest.mark.parametrize("call,error,match", [c[1:] for c in BAD_CALLS],
                         ids=[c[0] for c in BAD_CALLS])
def test_bad_input_is_rejected_with_a_message_naming_it(call, error, match):
  with pytest.raises(error, match=match):
    call()


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="needs a backend without a GPU")
def test_pallas_without_interpret_on_cpu_says_it_needs_a_gpu():
  with pytest.raises(ValueError, match=r"implementation='pallas' needs a CUDA GPU.*interpret=True"):
    flash_attention(*_qkv(), implementation="pallas")
