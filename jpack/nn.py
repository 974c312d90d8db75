"""Flax NNX modules on top of `jpack.attention`.

Two ways in:

* `Attention`: self-attention for packed rows (q/k/v/out projections, GQA,
  RoPE from per-document positions); segment ids are passed at call time.

      attn = Attention(in_features=512, num_heads=8, num_kv_heads=2, rngs=nnx.Rngs(0))
      y = attn(x, segment_ids=segment_ids)          # x: [B, T, 512]

* `make_attention_fn`: an `attention_fn` for the stock
  `flax.nnx.MultiHeadAttention`. Segment ids reach it through the module's
  `mask=` argument wrapped in a `SegmentMask` (the stock module hands `mask`
  to `attention_fn` untouched):

      mha = nnx.MultiHeadAttention(num_heads=8, in_features=512,
                                   attention_fn=make_attention_fn(causal=True), ...)
      y = mha(x, mask=SegmentMask(segment_ids))

Positions: RoPE positions (`positions`) restart at 0 in every document. The
causal mask uses the token's index in the row (flash_attention's default), a
different thing; these modules never mix the two.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jpack.attention import KernelConfig, flash_attention

__all__ = ["Attention", "SegmentMask", "apply_rope", "document_positions",
           "make_attention_fn"]


def document_positions(segment_ids: jax.Array) -> jax.Array:
  """Position of each token inside its document (0 at every document start).

  segment_ids: int [B, T], documents as contiguous runs. Returns int32 [B, T]
  (padding gets positions too; they are never used).
  """
  seg = jnp.asarray(segment_ids)
  t = jnp.arange(seg.shape[1], dtype=jnp.int32)
  starts = jnp.concatenate(
      [jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  run_start = jax.lax.cummax(jnp.where(starts, t, 0), axis=1)
  return t - run_start


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding ("rotate half" layout) of x: [B, T, H, D] at positions [B, T].

  Computed in float32 and cast back to x.dtype. D must be even.
  """
  half = x.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [B, T, 1, D/2]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., :half], xf[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def _check_positive(name, value):
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")


class Attention(nnx.Module):
  """Multi-head self-attention over packed rows.

  Args:
    in_features: F, the last dim of the input.
    num_heads: H, query heads.
    num_kv_heads: key/value heads (GQA; H % num_kv_heads == 0). Default H.
    head_dim: D, default F // H. Must be even when RoPE is on.
    out_features: output width, default F.
    rope_theta: RoPE base; None turns RoPE off.
    causal: causal attention inside each document.
    implementation, config, interpret: passed to `flash_attention`
      ("auto": the Pallas kernel on GPU, the XLA reference elsewhere), or to
      `attention_fn`.
    attention_fn: what computes attention; None: `jpack.attention.flash_attention`.
      Called as `attention_fn(q, k, v, segment_ids=..., causal=...,
      implementation=..., config=..., interpret=...)` with q [B, T, H, D],
      k, v [B, T, Hkv, D] (after RoPE, all in the computation dtype) and
      segment_ids int [B, T] or None; must return [B, T, H, D]. E.g.
      `jpack.parallel.ContextParallel.attention` for context parallelism. If it
      reorders tokens (zigzag load balancing), pass RoPE `positions` at call
      time: the default derives them from runs of segment_ids, which assumes
      row order.
    dtype: computation dtype of q/k/v and the attention (e.g. bfloat16);
      default: the input's dtype after promotion with the params.
    param_dtype: dtype of the weights.
    use_bias: biases in the projections.
  """

  def __init__(self, in_features: int, num_heads: int, *, num_kv_heads: int | None = None,
               head_dim: int | None = None, out_features: int | None = None,
               rope_theta: float | None = 10_000.0, causal: bool = True,
               implementation: str = "auto", config: KernelConfig | None = None,
               interpret: bool = False, attention_fn: Callable[..., jax.Array] | None = None,
               dtype: Any = None, param_dtype: Any = jnp.float32,
               use_bias: bool = False,
               kernel_init: Callable = nnx.initializers.lecun_normal(),
               rngs: nnx.Rngs):
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    for name, value in (("in_features", in_features), ("num_heads", num_heads),
                        ("num_kv_heads", num_kv_heads)):
      _check_positive(name, value)
    if num_heads % num_kv_heads:
      raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                       f"({num_kv_heads})")
    if head_dim is None:
      if in_features % num_heads:
        raise ValueError(f"in_features ({in_features}) must be divisible by num_heads "
                         f"({num_heads}), or pass head_dim")
      head_dim = in_features // num_heads
    _check_positive("head_dim", head_dim)
    if rope_theta is not None and head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    if implementation not in ("auto", "pallas", "mosaic", "xla"):
      raise ValueError(f"implementation must be 'auto', 'pallas', 'mosaic' or 'xla', got "
                       f"{implementation!r}")
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.rope_theta, self.causal = rope_theta, bool(causal)
    if attention_fn is not None and not callable(attention_fn):
      raise ValueError(f"attention_fn must be callable or None, got {attention_fn!r}")
    self.implementation, self.config, self.interpret = implementation, config, interpret
    self.attention_fn = attention_fn
    self.dtype = dtype
    linear = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=kernel_init, rngs=rngs)
    self.query = nnx.Linear(in_features, num_heads * head_dim, **linear)
    self.key = nnx.Linear(in_features, num_kv_heads * head_dim, **linear)
    self.value = nnx.Linear(in_features, num_kv_heads * head_dim, **linear)
    self.out = nnx.Linear(num_heads * head_dim, out_features or in_features, **linear)

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    """x: [B, T, F]; segment_ids: int [B, T] (0 = padding; default: one
    document); positions: int [B, T] RoPE positions (default: restart at 0 in
    every document of segment_ids). Returns [B, T, out_features]; padding
    tokens get the output bias (0 without bias)."""
    if x.ndim != 3:
      raise ValueError(f"x must have shape [batch, seq, features], got {x.shape}")
    b, t, _ = x.shape
    for name, ids in (("segment_ids", segment_ids), ("positions", positions)):
      if ids is not None and tuple(ids.shape) != (b, t):
        raise ValueError(f"{name} must have shape [batch, seq] = {(b, t)}, got {ids.shape}")
    q = self.query(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.key(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.value(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    if self.rope_theta is not None:
      if positions is None:
        positions = (document_positions(segment_ids) if segment_ids is not None
                     else jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
      q = apply_rope(q, positions, self.rope_theta)
      k = apply_rope(k, positions, self.rope_theta)
    # flash_attention wants one float dtype for q, k, v.
    dtype = self.dtype or jnp.result_type(q.dtype, k.dtype, v.dtype)
    out = (self.attention_fn or flash_attention)(
        q.astype(dtype), k.astype(dtype), v.astype(dtype), segment_ids=segment_ids,
        causal=self.causal, implementation=self.implementation, config=self.config,
        interpret=self.interpret)
    return self.out(out.reshape(b, t, self.num_heads * self.head_dim))


# ----------------------------------------------------------------------------
# attention_fn for flax.nnx.MultiHeadAttention


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SegmentMask:
  """Segment ids for `make_attention_fn`, passed as the stock module's `mask=`.

  segment_ids: int [B, T] (0 = padding, documents 1, 2, ...). For attention
  between different q and kv sequences pass q_segment_ids / kv_segment_ids
  instead ([B, Tq] and [B, Tk]).
  """
  segment_ids: jax.Array | None = None
  q_segment_ids: jax.Array | None = None
  kv_segment_ids: jax.Array | None = None


def make_attention_fn(*, causal: bool | None = None, implementation: str = "auto",
                      config: KernelConfig | None = None,
                      interpret: bool = False) -> Callable[..., jax.Array]:
  """An `attention_fn` for `flax.nnx.MultiHeadAttention` backed by jpack.

  Args:
    causal: True/False forces causal or bidirectional attention; None follows
      the `is_causal` that the module passes (its `__call__` argument).
    implementation, config, interpret: passed to `flash_attention`.

  The returned function takes query [B, Tq, H, D], key/value [B, Tk, Hkv, D]
  and the stock keywords. `mask` must be None (one document per row, no
  padding) or a `SegmentMask`; a dense boolean mask is refused (it cannot be
  mapped onto the kernels), as are attention dropout while not deterministic,
  `bias`, and `sow_weights` (there are no attention weights to sow).
  `precision` is ignored (the reference runs in float32; kernels in q's dtype).
  """
  if causal is not None and not isinstance(causal, bool):
    raise ValueError(f"causal must be True, False or None, got {causal!r}")

  def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True,
                   dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
                   precision=None, module=None, is_causal=False, **unused):
    del broadcast_dropout, dropout_rng, precision, unused
    if query.ndim != 4:
      raise ValueError(f"query must have shape [batch, seq, heads, head_dim] (one batch "
                       f"dim), got {query.shape}")
    if bias is not None:
      raise ValueError("bias: jpack's attention_fn takes no attention bias")
    if dropout_rate > 0.0 and not deterministic:
      raise ValueError(f"dropout_rate={dropout_rate} with deterministic=False: jpack's "
                       "attention_fn has no attention dropout; set dropout_rate=0.0")
    if module is not None:
      raise ValueError("sow_weights=True: jpack never forms attention weights to sow")
    if mask is None:
      ids = {}
    elif isinstance(mask, SegmentMask):
      ids = {k: v for k, v in dataclasses.asdict(mask).items() if v is not None}
    else:
      raise ValueError(
          "mask: jpack's attention_fn takes segment ids, not a dense mask; pass "
          "mask=jpack.nn.SegmentMask(segment_ids) to the module call")
    dtype = dtype or jnp.result_type(query.dtype, key.dtype, value.dtype)
    query, key, value = (x.astype(dtype) for x in (query, key, value))
    return flash_attention(query, key, value, **ids,
                           causal=bool(is_causal) if causal is None else causal,
                           implementation=implementation, config=config,
                           interpret=interpret)

  return attention_fn
