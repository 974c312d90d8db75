"""Mask rules: attention masks as functions of token positions and ids.

    from jpack import mask_rules as mr
    out = flash_attention(q, k, v, segment_ids=seg, causal=False,
                          mask=mr.prefix_lm(64) | mr.sliding_window(256))

A rule says, for a query token and a key token, whether the query may attend
the key. It is what FlexAttention's mask_mod is to PyTorch: no dense array is
made; the tile plan evaluates the rule once per tile pair (all pairs, in
chunks of q tiles), and the kernel evaluates it again on the tiles that are
neither empty nor full. Rules compose with `&`, `|` and `~`.

What a rule sees of each side is a `Tokens` of int32 arrays that broadcast
against each other (queries [..., n, 1] against keys [..., 1, m] or the
transpose): `pos`, the masking positions (q_positions / kv_positions, by
default the index in the row), and `seg`, the segment ids. flash_attention
ANDs every rule with its own segment-id, causal and sliding-window mask, so a
rule never widens what those allow; pass causal=False for rules such as
prefix_lm that are not causal.

Rules are frozen dataclasses: hashable, compared by value, so equal rules
share compiled kernels.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["MaskRule", "Tokens", "causal", "document", "document_starts",
           "prefix_lm", "rule", "sliding_window"]


class Tokens(NamedTuple):
  """One side's tokens as a rule sees them: int32 arrays of one shape.

  pos: masking positions. seg: segment ids (0 = padding).
  doc_start: keys only, and only for rules that need_doc_start: position of
    the first token of the key's document (see `document_starts`); else None.
  """
  pos: jax.Array
  seg: jax.Array
  doc_start: jax.Array | None = None


class MaskRule:
  """A predicate of (query tokens, key tokens): rule(q, kv) -> bool array.

  Subclasses are frozen dataclasses implementing __call__ with elementwise,
  broadcasting jnp operations only (they run inside the Pallas kernel).
  """
  needs_doc_start: bool = False
  # True if the rule allows keys after the query (prefix_lm): pointless, and
  # so refused, under flash_attention's causal=True, which would hide them.
  sees_ahead: bool = False

  def __call__(self, q: Tokens, kv: Tokens) -> jax.Array:
    raise NotImplementedError

  def __and__(self, other):
    return _Combined(operator.and_, self, _as_rule(other, "&"))

  def __or__(self, other):
    return _Combined(operator.or_, self, _as_rule(other, "|"))

  def __invert__(self):
    return _Not(self)


def _as_rule(x, op):
  if not isinstance(x, MaskRule):
    raise TypeError(f"a MaskRule can only be combined with {op} with another "
                    f"MaskRule, got {type(x).__name__}")
  return x


def _positive_int(name, x, minimum):
  if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {x!r}")
  return int(x)


@dataclasses.dataclass(frozen=True)
class _Combined(MaskRule):
  """a & b or a | b (op: operator.and_ or operator.or_)."""
  op: Callable
  a: MaskRule
  b: MaskRule

  @property
  def needs_doc_start(self):
    return self.a.needs_doc_start or self.b.needs_doc_start

  @property
  def sees_ahead(self):
    return self.a.sees_ahead or self.b.sees_ahead

  def __call__(self, q, kv):
    return self.op(self.a(q, kv), self.b(q, kv))


@dataclasses.dataclass(frozen=True)
class _Not(MaskRule):
  a: MaskRule

  @property
  def needs_doc_start(self):
    return self.a.needs_doc_start

  @property
  def sees_ahead(self):
    return self.a.sees_ahead

  def __call__(self, q, kv):
    return ~self.a(q, kv)


@dataclasses.dataclass(frozen=True)
class _Causal(MaskRule):
  def __call__(self, q, kv):
    return kv.pos <= q.pos


@dataclasses.dataclass(frozen=True)
class _SlidingWindow(MaskRule):
  window: int

  def __call__(self, q, kv):
    return q.pos - kv.pos < self.window


@dataclasses.dataclass(frozen=True)
class _PrefixLM(MaskRule):
  prefix: int
  needs_doc_start = True
  sees_ahead = True

  def __call__(self, q, kv):
    return (kv.pos <= q.pos) | (kv.pos - kv.doc_start < self.prefix)


@dataclasses.dataclass(frozen=True)
class _Document(MaskRule):
  def __call__(self, q, kv):
    return (q.seg == kv.seg) & (q.seg != 0)


@dataclasses.dataclass(frozen=True)
class _Fn(MaskRule):
  fn: Callable

  def __call__(self, q, kv):
    return self.fn(q.pos, kv.pos, q.seg, kv.seg)


def causal() -> MaskRule:
  """Keys at later positions are hidden: pos_kv <= pos_q."""
  return _Causal()


def sliding_window(window: int) -> MaskRule:
  """Keys `window` or more positions back are hidden: pos_q - pos_kv < window.

  Like flash_attention's sliding_window argument, it hides nothing ahead of
  the query; combine with causal() for a causal window.
  """
  return _SlidingWindow(_positive_int("sliding_window: window", window, 1))


def prefix_lm(prefix: int) -> MaskRule:
  """Bidirectional over the first `prefix` positions of each document, causal after.

  A key is visible if it is at or before the query, or among the first
  `prefix` positions of its document (pos_kv - doc_start_kv < prefix). With
  segment ids ANDed in, a query sees only its own document's prefix. Pass
  causal=False to flash_attention: with causal=True it raises, since the
  causal mask would hide the prefix again.
  """
  return _PrefixLM(_positive_int("prefix_lm: prefix", prefix, 0))


def document() -> MaskRule:
  """Same non-padding segment: seg_q == seg_kv != 0 (what segment ids always impose)."""
  return _Document()


def rule(fn: Callable) -> MaskRule:
  """A user rule: fn(q_idx, kv_idx, q_seg, kv_seg) -> bool.

  q_idx, kv_idx are masking positions and q_seg, kv_seg segment ids, int32
  arrays that broadcast against each other. fn must use elementwise jnp
  operations (comparisons, arithmetic, bitwise ops, jnp.where) and may close
  over Python numbers, not over arrays: it is traced inside the Pallas kernel.
  Pass a module-level function (or the same object every time) so that
  equal rules hash equal and compiled kernels are reused.

  Example, a strided ("dilated") pattern:
      rule(lambda qi, ki, qs, ks: (qi - ki) % 4 == 0)
  """
  if not callable(fn):
    raise TypeError(f"rule: fn must be callable, got {type(fn).__name__}")
  return _Fn(fn)


def document_starts(segment_ids, positions):
  """First position of each token's document: the least position of its id in the row.

  Args:
    segment_ids, positions: int32 [B, T].

  Returns:
    int32 [B, T]. Exact for any ids (documents need not be contiguous); for a
    chunk of a row (context parallelism) it is the first position within the
    chunk. Costs a sort of each row.
  """
  length = segment_ids.shape[1]

  def one_row(seg, pos):
    order = jnp.argsort(seg, stable=True)
    seg_sorted, pos_sorted = seg[order], pos[order]
    new_run = jnp.concatenate([jnp.ones(1, bool), seg_sorted[1:] != seg_sorted[:-1]])
    run = jnp.cumsum(new_run) - 1
    first = jax.ops.segment_min(pos_sorted, run, num_segments=length)[run]
    return jnp.zeros_like(pos).at[order].set(first)

  return jax.vmap(one_row)(segment_ids, positions)
