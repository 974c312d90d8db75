"""jpack.nn: the NNX attention module and the attention_fn for the stock
flax.nnx.MultiHeadAttention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jpack import masks
from jpack import nn as jnn
from jpack.attention import flash_attention

T = 16
# Two rows: three documents then padding; one document filling the row.
SEGMENTS = np.array([[1] * 5 + [2] * 7 + [3] * 3 + [0], [1] * T], np.int32)
DOCS = [(0, 0, 5), (0, 5, 12), (0, 12, 15), (1, 0, 16)]  # (row, start, stop)


def inputs(features=32, seed=0):
  return jax.random.normal(jax.random.key(seed), (2, T, features), jnp.float32)


def dense_mask(seg, causal):
  pos = jnp.broadcast_to(jnp.arange(seg.shape[1]), seg.shape)
  return masks.allowed_mask(jnp.asarray(seg), jnp.asarray(seg), pos, pos, causal=causal,
                            sliding_window=None)[:, None]  # [B, 1, T, T]


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@nnx.jit
def call(module, x, segment_ids=None, positions=None):
  """module(x, ...) compiled: eager calls dispatch op by op, which is slow."""
  return module(x, segment_ids=segment_ids, positions=positions)


def test_document_positions():
  pos = jnn.document_positions(jnp.asarray(SEGMENTS))
  assert pos[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 0]
  assert pos[1].tolist() == list(range(T))


def test_rope_is_relative():
  # <rope(q, i), rope(k, j)> depends on i - j only.
  q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 8))
  def dot(i, j):
    return jnp.sum(jnn.apply_rope(q, jnp.array([[i]]), 100.0)
                   * jnn.apply_rope(k, jnp.array([[j]]), 100.0))
  np.testing.assert_allclose(dot(3, 1), dot(12, 10), rtol=1e-5)
  assert not np.isclose(dot(3, 1), dot(3, 2))


@pytest.mark.parametrize("kv_heads, rope", [(4, 10_000.0), (2, 10_000.0), (1, None)])
def test_packed_row_equals_each_document_alone(kv_heads, rope):
  attn = jnn.Attention(32, 4, num_kv_heads=kv_heads, rope_theta=rope, implementation="xla",
                       rngs=nnx.Rngs(0))
  x = inputs()
  packed = call(attn, x, jnp.asarray(SEGMENTS))
  for row, a, b in DOCS:
    alone = call(attn, x[row:row + 1, a:b])
    np.testing.assert_allclose(packed[row, a:b], alone[0], rtol=1e-5, atol=1e-6)


def test_gqa_equals_mha_with_repeated_kv_heads():
  gqa = jnn.Attention(32, 4, num_kv_heads=2, implementation="xla", rngs=nnx.Rngs(0))
  mha = jnn.Attention(32, 4, implementation="xla", rngs=nnx.Rngs(1))
  mha.query.kernel[...] = gqa.query.kernel[...]
  mha.out.kernel[...] = gqa.out.kernel[...]
  for name in ("key", "value"):  # kv head h serves query heads 2h and 2h + 1
    w = getattr(gqa, name).kernel[...].reshape(32, 2, 1, 8)
    getattr(mha, name).kernel[...] = jnp.repeat(w, 2, axis=2).reshape(32, 32)
  x, seg = inputs(), jnp.asarray(SEGMENTS)
  np.testing.assert_allclose(call(gqa, x, seg), call(mha, x, seg), rtol=1e-5, atol=1e-6)


def test_positions_override_and_rope_shift():
  attn = jnn.Attention(32, 4, implementation="xla", rngs=nnx.Rngs(0))
  x = inputs()[:1]
  pos = jnp.arange(T)[None]
  # RoPE is relative, so shifting every position leaves the output unchanged.
  np.testing.assert_allclose(call(attn, x, None, pos), call(attn, x, None, pos + 7),
                             rtol=1e-4, atol=1e-5)


def flat(tree):
  return np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)])


def test_gradients_under_nnx_jit_match_plain_jax():
  attn = jnn.Attention(32, 4, num_kv_heads=2, implementation="xla", rngs=nnx.Rngs(0))
  x, seg = inputs(), jnp.asarray(SEGMENTS)
  loss = lambda m, x, seg: jnp.sum(m(x, segment_ids=seg) ** 2)  # noqa: E731
  got = nnx.jit(nnx.grad(loss))(attn, x, seg)
  graphdef, params = nnx.split(attn)
  expected = jax.jit(jax.grad(lambda p: loss(nnx.merge(graphdef, p), x, seg)))(params)
  assert rel_err(flat(got), flat(expected)) < 1e-6
  assert np.isfinite(flat(got)).all()
  for leaf in jax.tree.leaves(got):  # every projection gets a gradient
    assert np.abs(leaf).sum() > 0


def test_padding_gets_no_gradient():
  attn = jnn.Attention(32, 4, implementation="xla", rngs=nnx.Rngs(0))
  seg = jnp.asarray(SEGMENTS)
  valid = (seg != 0)[..., None]
  grad_x = nnx.jit(nnx.grad(
      lambda x, m: jnp.sum(jnp.where(valid, m(x, segment_ids=seg), 0.0) ** 2)))(inputs(), attn)
  assert (np.asarray(grad_x)[SEGMENTS == 0] == 0).all()
  assert (np.abs(np.asarray(grad_x)[SEGMENTS != 0]).sum(-1) > 0).all()


def test_pallas_kernel_matches_xla_in_the_module():
  attn = jnn.Attention(32, 2, num_kv_heads=1, implementation="xla", rngs=nnx.Rngs(0))
  kernel = jnn.Attention(32, 2, num_kv_heads=1, implementation="pallas", interpret=True,
                         rngs=nnx.Rngs(0))
  x, seg = inputs(), jnp.asarray(SEGMENTS)
  np.testing.assert_allclose(call(kernel, x, seg), call(attn, x, seg), rtol=2e-5, atol=2e-5)


def test_attention_fn_replaces_flash_attention():
  """attention_fn gets q [B, T, H, D], k/v [B, T, Hkv, D] and the module's
  keywords; what it returns is what the output projection sees."""
  seen = []

  def spy(q, k, v, **kwargs):
    seen.append((q.shape, k.shape, v.shape, sorted(kwargs)))
    return flash_attention(q, k, v, **kwargs)

  def make(**kwargs):  # same weights every time
    return jnn.Attention(32, 4, num_kv_heads=2, implementation="xla", rngs=nnx.Rngs(0),
                         **kwargs)

  plain, spied = make(), make(attention_fn=spy)
  x, seg = inputs(), jnp.asarray(SEGMENTS)
  np.testing.assert_array_equal(call(spied, x, seg), call(plain, x, seg))
  assert seen == [((2, T, 4, 8), (2, T, 2, 8), (2, T, 2, 8),
                   ["causal", "config", "implementation", "interpret", "segment_ids"])]
  zeros = make(attention_fn=lambda q, k, v, **_: jnp.zeros_like(q))
  np.testing.assert_array_equal(call(zeros, x, seg), 0.0)  # no bias: out(0) = 0
  with pytest.raises(ValueError, match="attention_fn must be callable"):
    jnn.Attention(32, 4, attention_fn="ring", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_heads=4, num_kv_heads=3), "multiple of num_kv_heads"),
    (dict(num_heads=3), "divisible by num_heads"),
    (dict(num_heads=4, head_dim=7), "even for RoPE"),
    (dict(num_heads=0), "num_heads"),
    (dict(num_heads=4, implementation="cuda"), "implementation"),
])
def test_attention_bad_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    jnn.Attention(32, rngs=nnx.Rngs(0), **kwargs)


def test_attention_bad_call():
  attn = jnn.Attention(32, 4, implementation="xla", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="segment_ids must have shape"):
    attn(inputs(), segment_ids=jnp.ones((2, T - 1), jnp.int32))
  with pytest.raises(ValueError, match="x must have shape"):
    attn(inputs()[0])


# ----------------------------------------------------------------------------
# attention_fn for the stock module


def stock_pair(kv_heads, attention_fn, **kwargs):
  make = lambda **kw: nnx.MultiHeadAttention(  # noqa: E731
      num_heads=4, in_features=32, num_kv_heads=kv_heads, decode=False,
      rngs=nnx.Rngs(0), **kwargs, **kw)
  return make(), make(attention_fn=attention_fn)


@nnx.jit(static_argnums=3)
def call_stock(module, x, mask=None, is_causal=False):
  return module(x, mask=mask, is_causal=is_causal)


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_fn_matches_stock_module_with_dense_mask(kv_heads, causal):
  stock, ours = stock_pair(kv_heads, jnn.make_attention_fn(implementation="xla"))
  x, seg = inputs(), jnp.asarray(SEGMENTS)
  expected = call_stock(stock, x, dense_mask(seg, causal))
  got = call_stock(ours, x, jnn.SegmentMask(seg), causal)
  valid = SEGMENTS != 0  # the stock module gives padding rows a uniform average
  np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(expected)[valid],
                             rtol=1e-5, atol=1e-6)


def test_attention_fn_causal_argument_overrides_is_causal():
  stock, ours = stock_pair(4, jnn.make_attention_fn(causal=True, implementation="xla"))
  x, seg = inputs(), jnp.asarray(SEGMENTS)
  valid = SEGMENTS != 0
  got = call_stock(ours, x, jnn.SegmentMask(seg), False)
  expected = call_stock(stock, x, dense_mask(seg, True))
  np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(expected)[valid],
                             rtol=1e-5, atol=1e-6)


def test_attention_fn_without_mask_is_one_document():
  stock, ours = stock_pair(4, jnn.make_attention_fn(implementation="xla"))
  x = inputs()
  np.testing.assert_allclose(call_stock(ours, x), call_stock(stock, x), rtol=1e-5, atol=1e-6)


def test_attention_fn_under_jit_and_grad():
  stock, ours = stock_pair(2, jnn.make_attention_fn(causal=True, implementation="xla"))
  x, seg = inputs(), jnp.asarray(SEGMENTS)
  valid = jnp.asarray(SEGMENTS != 0)[..., None]

  def loss(m, mask):
    return jnp.sum(jnp.where(valid, m(x, mask=mask), 0.0) ** 2)

  got = nnx.jit(nnx.grad(loss))(ours, jnn.SegmentMask(seg))
  expected = nnx.jit(nnx.grad(loss))(stock, dense_mask(seg, True))
  assert rel_err(flat(got), flat(expected)) < 1e-5


def test_attention_fn_refuses_what_it_cannot_do():
  _, ours = stock_pair(4, jnn.make_attention_fn(implementation="xla"))
  x, seg = inputs(), jnp.asarray(SEGMENTS)
  with pytest.raises(ValueError, match="mask: .*SegmentMask"):
    ours(x, mask=dense_mask(seg, True))
  with pytest.raises(ValueError, match="sow_weights"):
    ours(x, mask=jnn.SegmentMask(seg), sow_weights=True)
  _, dropout = stock_pair(4, jnn.make_attention_fn(implementation="xla"), dropout_rate=0.1)
  with pytest.raises(ValueError, match="dropout_rate"):
    dropout(x, mask=jnn.SegmentMask(seg), deterministic=False)
  with pytest.raises(ValueError, match="causal"):
    jnn.make_attention_fn(causal="yes")


def test_attention_fn_allows_dropout_rate_when_deterministic():
  stock, ours = stock_pair(4, jnn.make_attention_fn(implementation="xla"), dropout_rate=0.1)
  x = inputs()
  got = nnx.jit(lambda m, x: m(x, deterministic=True))(ours, x)
  expected = nnx.jit(lambda m, x: m(x, deterministic=True))(stock, x)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
