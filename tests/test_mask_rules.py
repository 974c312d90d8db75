"""Mask rules (jpack.mask_rules) and general masks at the API, on the reference.

Rules are checked against numpy transcriptions of their definitions on
hypothesis layouts. The reference (implementation="xla", the oracle the
kernels are tested against) is checked for what mask= means: ANDed with
segment ids, causal and sliding window; every supported dense shape; a rule
equal to the dense mask it describes; plans equal to passing the mask. Bad
input is rejected with a message naming the argument.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from helpers import (allowed_np, arange_positions, assert_close, chunk_layouts,
                     dense_masks, random_inputs, rel_err, self_layouts)
from jpack import mask_rules as mr
from jpack import masks
from jpack.attention import (EMPTY_LSE, KernelConfig, flash_attention,
                             make_attention_plan, reference_attention)

B, T, H, KV_H, D = 2, 64, 4, 2, 32
SEEDS = st.integers(0, 2**31 - 1)


def strided(q_idx, kv_idx, q_seg, kv_seg):
  """A user rule: every third key back, within the same parity of segment."""
  return ((q_idx - kv_idx) % 3 == 0) & ((q_seg + kv_seg) % 2 == 0)


def doc_starts_np(seg, pos):
  """Least position of each token's id in its row (brute force)."""
  same = seg[:, :, None] == seg[:, None, :]
  return np.where(same, pos[:, None, :], np.iinfo(np.int32).max).min(-1)


def _np_rule(name):
  """numpy (q_pos, kv_pos, q_seg, kv_seg, kv_doc_start) -> bool, all broadcast."""
  return {
      "causal": lambda qp, kp, qs, ks, kd: kp <= qp,
      "window": lambda qp, kp, qs, ks, kd: qp - kp < 8,
      "prefix_lm": lambda qp, kp, qs, ks, kd: (kp <= qp) | (kp - kd < 5),
      "document": lambda qp, kp, qs, ks, kd: (qs == ks) & (qs != 0),
      "user": lambda qp, kp, qs, ks, kd: ((qp - kp) % 3 == 0) & ((qs + ks) % 2 == 0),
  }[name]


BASE_RULES = {"causal": mr.causal(), "window": mr.sliding_window(8),
              "prefix_lm": mr.prefix_lm(5), "document": mr.document(),
              "user": mr.rule(strided)}
# (rule, numpy oracle): each rule alone, and combinations with & | ~.
RULES = {name: (r, _np_rule(name)) for name, r in BASE_RULES.items()}
RULES.update({
    "prefix_lm|window": (
        BASE_RULES["prefix_lm"] | BASE_RULES["window"],
        lambda *a: _np_rule("prefix_lm")(*a) | _np_rule("window")(*a)),
    "causal&~user": (
        BASE_RULES["causal"] & ~BASE_RULES["user"],
        lambda *a: _np_rule("causal")(*a) & ~_np_rule("user")(*a)),
    "document&(window|user)": (
        BASE_RULES["document"] & (BASE_RULES["window"] | BASE_RULES["user"]),
        lambda *a: _np_rule("document")(*a) & (_np_rule("window")(*a) | _np_rule("user")(*a))),
})


def rule_np(name, layout):
  """bool [B, Tq, Tk]: the rule alone (no segment ids), numpy."""
  q_pos = layout.q_positions[:, :, None].astype(np.int64)
  kv_pos = layout.kv_positions[:, None, :].astype(np.int64)
  kd = doc_starts_np(layout.kv_segment_ids, layout.kv_positions)[:, None, :]
  return RULES[name][1](q_pos, kv_pos, layout.q_segment_ids[:, :, None],
                        layout.kv_segment_ids[:, None, :], kd)


@functools.lru_cache(maxsize=None)
def _allowed_fn(rule, causal, window):
  def f(q_seg, kv_seg, q_pos, kv_pos):
    starts = mr.document_starts(kv_seg, kv_pos) if rule.needs_doc_start else None
    return masks.general_allowed(q_seg, kv_seg, q_pos, kv_pos, causal=causal,
                                 sliding_window=window, rule=rule, kv_doc_starts=starts)
  return jax.jit(f)


LAYOUTS = (self_layouts(B, T) | self_layouts(B, T, positions="custom")
           | chunk_layouts(B, 48, 80))


# ----------------------------------------------------------------------------
# Rules


@pytest.mark.parametrize("name", list(RULES))
@given(layout=LAYOUTS, causal=st.booleans())
def test_rule_is_anded_with_segments_and_causal(name, layout, causal):
  got = _allowed_fn(RULES[name][0], causal, None)(*layout.arrays())
  want = allowed_np(layout, causal=causal) & rule_np(name, layout)
  np.testing.assert_array_equal(np.asarray(got)[:, 0], want)


@given(layout=self_layouts(B, T) | self_layouts(B, T, positions="custom"))
def test_document_starts_are_the_first_position_of_each_id(layout):
  got = jax.jit(mr.document_starts)(layout.q_segment_ids, layout.q_positions)
  np.testing.assert_array_equal(
      np.asarray(got), doc_starts_np(layout.q_segment_ids, layout.q_positions))


def test_prefix_lm_on_a_small_example():
  # doc 1 (4 tokens), doc 2 (3 tokens), padding; prefix of 2.
  seg = np.array([[1, 1, 1, 1, 2, 2, 2, 0]], np.int32)
  pos = arange_positions(1, 8)
  got = np.asarray(_allowed_fn(mr.prefix_lm(2), False, None)(seg, seg, pos, pos))[0, 0]
  want = np.array([[1, 1, 0, 0, 0, 0, 0, 0],
                   [1, 1, 0, 0, 0, 0, 0, 0],
                   [1, 1, 1, 0, 0, 0, 0, 0],
                   [1, 1, 1, 1, 0, 0, 0, 0],
                   [0, 0, 0, 0, 1, 1, 0, 0],
                   [0, 0, 0, 0, 1, 1, 0, 0],
                   [0, 0, 0, 0, 1, 1, 1, 0],
                   [0, 0, 0, 0, 0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(got, want)


def test_rules_compare_and_hash_by_value():
  assert mr.prefix_lm(4) | mr.causal() == mr.prefix_lm(4) | mr.causal()
  assert hash(mr.sliding_window(3) & mr.rule(strided)) == hash(
      mr.sliding_window(3) & mr.rule(strided))
  assert mr.prefix_lm(4) != mr.prefix_lm(5)


# ----------------------------------------------------------------------------
# mask= on the reference


def _qkv(seed, q_len=T, kv_len=T):
  q, k, v, _, _ = random_inputs(seed, batch=B, q_len=q_len, kv_len=kv_len,
                                heads=H, kv_heads=KV_H, head_dim=D)
  return q, k, v


@functools.lru_cache(maxsize=None)
def _reference_fn(**options):
  """jit(reference_attention) returning (out, lse).

  Arrays (ids, a dense mask) are traced arguments; options, rules included, static.
  """
  return jax.jit(lambda q, k, v, kw: reference_attention(
      q, k, v, return_residuals=True, **kw, **options))


def attention_np(q, k, v, allowed, scale):
  """float64 numpy attention under allowed [B, H, Tq, Tk]; empty rows give 0, EMPTY_LSE."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  s = np.where(allowed, s, -np.inf)
  m = np.max(s, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  p = np.exp(s - m)
  l = p.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", p / np.where(l > 0, l, 1.0), v)
  lse = np.where(l[..., 0] > 0, m[..., 0] + np.log(np.where(l > 0, l, 1.0))[..., 0],
                 EMPTY_LSE)
  return out, lse


@settings(max_examples=15)
@given(layout=self_layouts(B, T), mask=dense_masks((B, H, T, T)), causal=st.booleans(),
       seed=SEEDS)
def test_reference_with_a_per_head_mask_matches_numpy(layout, mask, causal, seed):
  q, k, v = _qkv(seed)
  out, lse = _reference_fn(causal=causal)(q, k, v, dict(**layout.kwargs(), mask=mask))
  allowed = allowed_np(layout, causal=causal)[:, None] & mask
  want_out, want_lse = attention_np(q, k, v, allowed, 1 / np.sqrt(D))
  assert rel_err(out, want_out) <= 1e-5
  seen = allowed.any(-1)
  assert rel_err(np.asarray(lse)[seen], want_lse[seen]) <= 1e-5
  np.testing.assert_array_equal(np.asarray(lse)[~seen], np.float32(EMPTY_LSE))
  assert np.all(np.asarray(out).transpose(0, 2, 1, 3)[~seen] == 0.0)


@settings(max_examples=10)
@given(mask=dense_masks((1, 1, T, T)), seed=SEEDS)
def test_dense_mask_shapes_broadcast_alike(mask, seed):
  """[B, Tq, Tk], [B, 1, Tq, Tk], [B, H, Tq, Tk] and [1, 1, Tq, Tk] of one mask agree."""
  q, k, v = _qkv(seed)
  f = _reference_fn(causal=False)
  want = f(q, k, v, dict(mask=np.broadcast_to(mask, (B, H, T, T))))
  for m in (mask, np.broadcast_to(mask, (B, 1, T, T)), np.broadcast_to(mask[:, 0], (B, T, T))):
    got = f(q, k, v, dict(mask=m))
    for g, w in zip(got, want):
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("name", ["prefix_lm|window", "causal&~user", "user"])
@settings(max_examples=10)
@given(layout=self_layouts(B, T) | chunk_layouts(B, 48, 80), causal=st.booleans(),
       seed=SEEDS)
def test_a_rule_equals_the_dense_mask_it_describes(name, layout, causal, seed):
  causal &= not RULES[name][0].sees_ahead  # causal=True refuses prefix_lm
  q, k, v = _qkv(seed, *layout.q_segment_ids.shape[1:], *layout.kv_segment_ids.shape[1:])
  f = _reference_fn(causal=causal)
  got = _reference_fn(causal=causal, mask=RULES[name][0])(q, k, v, layout.kwargs())
  want = f(q, k, v, dict(**layout.kwargs(), mask=rule_np(name, layout)))
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@given(layout=self_layouts(B, T), seed=SEEDS)
def test_rules_for_causal_and_window_equal_the_options(layout, seed):
  q, k, v = _qkv(seed)
  ids = layout.kwargs()
  want = _reference_fn(causal=True, sliding_window=8)(q, k, v, ids)
  all_true = dict(ids, mask=np.ones((B, T, T), bool))
  for options, arrays in (
      (dict(causal=False, mask=mr.causal() & mr.sliding_window(8)), ids),
      (dict(causal=True, mask=mr.sliding_window(8)), ids),
      (dict(causal=True, sliding_window=8), all_true)):
    got = _reference_fn(**options)(q, k, v, arrays)
    for g, w in zip(got, want):
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


# ----------------------------------------------------------------------------
# Plans


PLAN_MASKS = {
    "rule": lambda: mr.prefix_lm(5) | mr.rule(strided),
    "dense": lambda: np.random.default_rng(0).random((B, H, T, T)) < 0.3,
    "none": lambda: None,
}
PLAN_OPTIONS = dict(causal=False, sliding_window=24)


@functools.lru_cache(maxsize=None)
def _through_a_plan(rule):
  """jit: reference_attention of a plan made from (ids, dense mask or `rule`)."""
  def f(q, k, v, ids, dense):
    plan = make_attention_plan(q, k, **ids, mask=rule if dense is None else dense,
                               **PLAN_OPTIONS, config=KernelConfig.uniform(16))
    return reference_attention(q, k, v, plan=plan, causal=False, return_residuals=True)
  return jax.jit(f)


@pytest.mark.parametrize("kind", list(PLAN_MASKS))
@given(layout=self_layouts(B, T), seed=SEEDS)
def test_a_plan_gives_what_its_arguments_give(kind, layout, seed):
  q, k, v = _qkv(seed)
  mask = PLAN_MASKS[kind]()
  rule, dense = (mask, None) if isinstance(mask, mr.MaskRule) else (None, mask)
  if rule is None:
    want = _reference_fn(**PLAN_OPTIONS)(q, k, v, dict(layout.kwargs(), mask=dense))
  else:
    want = _reference_fn(**PLAN_OPTIONS, mask=rule)(q, k, v, layout.kwargs())
  got = _through_a_plan(rule)(q, k, v, layout.kwargs(), dense)
  for name, g, w in zip(("out", "lse"), got, want):
    assert_close(name, g, w, 1e-6)  # fused differently: rounding may differ


def test_a_plan_is_computed_once_for_many_layers(monkeypatch):
  """Kernel layers given a plan do no planning of their own; given the mask, each plans."""
  plannings = []
  tile_any_all = masks.tile_any_all

  def counted(*args, **kwargs):
    plannings.append(1)
    return tile_any_all(*args, **kwargs)

  monkeypatch.setattr(masks, "tile_any_all", counted)
  q, k, v = _qkv(0)
  options = dict(segment_ids=np.ones((B, T), np.int32), mask=mr.prefix_lm(5), causal=False)
  kernel = dict(implementation="pallas", interpret=True, config=KernelConfig.uniform(16))

  def layers(q, plan=None):
    for _ in range(3):
      if plan is None:
        q = flash_attention(q, k, v, **options, **kernel)
      else:
        q = flash_attention(q, k, v, plan=plan, causal=False, **kernel)
    return q

  jax.make_jaxpr(lambda q: layers(q, make_attention_plan(
      q, k, **options, config=KernelConfig.uniform(16))))(q)
  assert len(plannings) == 1
  jax.make_jaxpr(layers)(q)
  assert len(plannings) == 1 + 3


# ----------------------------------------------------------------------------
# Bad input: errors name the argument


def _not_bool(q_idx, kv_idx, q_seg, kv_seg):
  return q_idx - kv_idx


def _python_if(q_idx, kv_idx, q_seg, kv_seg):
  return q_idx > 0 if q_idx > kv_idx else q_idx < 0


_TABLE = jnp.full((1,), 3, jnp.int32)  # broadcasts, but is an array


def _closes_over_an_array(q_idx, kv_idx, q_seg, kv_seg):
  return kv_idx < _TABLE


def _reduces(q_idx, kv_idx, q_seg, kv_seg):
  return jnp.any(kv_idx <= q_idx, axis=-1)


def _bad_calls():
  q, k, v = _qkv(0)
  seg = np.ones((B, T), np.int32)
  plan = make_attention_plan(q, k, segment_ids=seg, mask=mr.causal(), causal=False,
                             config=KernelConfig.uniform(16))
  mask = np.ones((B, T, T), bool)
  yield "mask int", lambda: reference_attention(q, k, v, mask=mask.astype(np.int32)), TypeError, r"mask must be a boolean array, got dtype int32"
  yield "mask float", lambda: reference_attention(q, k, v, mask=jnp.ones((B, T, T))), TypeError, r"mask must be a boolean array"
  yield "mask 2-D", lambda: reference_attention(q, k, v, mask=mask[0]), ValueError, r"mask must have shape \[batch, q_len, kv_len\] = \(2, 64, 64\)"
  yield "mask wrong kv_len", lambda: reference_attention(q, k, v, mask=mask[:, :, :32]), ValueError, r"mask must have shape .* got \(2, 64, 32\)"
  yield "mask heads 3", lambda: reference_attention(q, k, v, mask=np.ones((B, 3, T, T), bool)), ValueError, r"\[batch, 1 or heads, q_len, kv_len\] = \(2, 4, 64, 64\)"
  yield "mask a list", lambda: reference_attention(q, k, v, mask=[[True]]), TypeError, r"mask must be a boolean array .* or a jpack.mask_rules.MaskRule, got list"
  yield "rule returns ints", lambda: reference_attention(q, k, v, mask=mr.rule(_not_bool)), TypeError, r"mask: the rule must return booleans, got int32"
  yield "rule with a Python if", lambda: reference_attention(q, k, v, mask=mr.rule(_python_if)), TypeError, r"mask: the rule could not be traced"
  yield "rule closes over an array", lambda: reference_attention(q, k, v, mask=mr.rule(_closes_over_an_array)), ValueError, r"mask: the rule closes over arrays"
  yield "rule reduces", lambda: reference_attention(q, k, v, mask=mr.rule(_reduces)), ValueError, r"mask: the rule must be elementwise"
  yield "rule of a non-callable", lambda: mr.rule(3), TypeError, r"rule: fn must be callable"
  yield "prefix_lm under causal=True", lambda: reference_attention(q, k, v, mask=mr.prefix_lm(4) | mr.causal()), ValueError, r"mask: the rule lets queries see later keys \(prefix_lm\).*pass causal=False"
  yield "prefix_lm plan under causal=True", lambda: make_attention_plan(q, k, mask=mr.prefix_lm(4)), ValueError, r"mask: the rule lets queries see later keys"
  yield "prefix_lm negative", lambda: mr.prefix_lm(-1), ValueError, r"prefix_lm: prefix must be an int >= 0"
  yield "sliding_window rule 0", lambda: mr.sliding_window(0), ValueError, r"sliding_window: window must be an int >= 1"
  yield "rule & bool array", lambda: mr.causal() & mask, TypeError, r"combined with & with another MaskRule"
  yield "plan not a plan", lambda: reference_attention(q, k, v, plan="plan"), TypeError, r"plan must be an AttentionPlan"
  yield "plan and segment_ids", lambda: reference_attention(q, k, v, plan=plan, causal=False, segment_ids=seg), ValueError, r"plan: segment_ids must be given to make_attention_plan only"
  yield "plan and mask", lambda: reference_attention(q, k, v, plan=plan, causal=False, mask=mask), ValueError, r"plan: mask must be given"
  yield "plan with another causal", lambda: reference_attention(q, k, v, plan=plan), ValueError, r"plan: it was made with causal=False, but flash_attention got causal=True"
  yield "plan for other shapes", lambda: reference_attention(q[:, :32], k, v, plan=plan, causal=False), ValueError, r"plan: it was made for q \(2, 64, 4, 32\)"
  yield "plan with another config", lambda: flash_attention(q, k, v, plan=plan, causal=False, config=KernelConfig.uniform(32), implementation="pallas", interpret=True), ValueError, r"plan: it was made for another config"


BAD_CALLS = list(_bad_calls())


@pytest.mark.parametrize("call,error,match", [c[1:] for c in BAD_CALLS],
                         ids=[c[0] for c in BAD_CALLS])
def test_bad_input_is_rejected_with_a_message_naming_it(call, error, match):
  with pytest.raises(error, match=match):
    call()
