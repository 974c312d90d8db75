"""flash_attention with general masks: the kernels (interpreted) against the reference.

Each case fixes the shapes and the kind of mask (dense with its broadcast
shape, or a rule); hypothesis draws the data: segment ids and positions, the
dense mask (random of varied density, block patterns, empty rows and columns,
random clustered graphs) and the inputs. Forward and backward run through the
tile-list kernels and through `reference_attention` on the same mask.
float32 must agree to 1e-5 (||got - want|| / ||want||).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from helpers import (Layout, allowed_np, arange_positions, assert_close,
                     assert_finite, chunk_layouts, dense_masks, fixed_segment_ids,
                     random_inputs, self_layouts)
from jpack import mask_rules as mr
from jpack import masks
from jpack.attention import (EMPTY_LSE, KernelConfig, TileConfig, flash_attention,
                             flash_attention_bwd, make_attention_plan)

B = 2
F32_TOL = 1e-5
SEEDS = st.integers(0, 2**31 - 1)
MIXED_TILES = KernelConfig(forward=TileConfig(32, 16), dq=TileConfig(16, 32),
                           dkdv=TileConfig(32, 16))


def strided(q_idx, kv_idx, q_seg, kv_seg):
  """A user rule: keys a multiple of 3 positions away."""
  return (q_idx - kv_idx) % 3 == 0


@dataclasses.dataclass(frozen=True)
class Case:
  """Static shapes and mask kind of one kernel configuration."""
  name: str
  mask_heads: int | None = None  # dense mask [mask_batch, mask_heads, Tq, Tk]
  mask_batch: int = B
  rule: mr.MaskRule | None = None
  q_len: int = 64
  kv_len: int = 64
  heads: int = 4
  kv_heads: int = 2
  head_dim: int = 32
  causal: bool = False
  window: int | None = None
  config: KernelConfig = KernelConfig.uniform(16)

  def layouts(self):
    if self.q_len != self.kv_len:
      return chunk_layouts(B, self.q_len, self.kv_len)
    return self_layouts(B, self.q_len)

  def masks(self):
    if self.mask_heads is None:
      return st.none()
    shape = (self.mask_batch, self.mask_heads, self.q_len, self.kv_len)
    kinds = ("density", "blocks", "empty_rows_cols") + (
        ("graph",) if self.q_len == self.kv_len else ())
    return dense_masks(shape, kinds)


CASES = [
    Case("dense-one-head-mask", mask_heads=1),
    Case("dense-per-head-mask-causal", mask_heads=4, causal=True),
    Case("dense-batch1-chunk-q48-kv80-mixed-tiles", mask_heads=1, mask_batch=1,
         q_len=48, kv_len=80, window=40, config=MIXED_TILES),
    Case("rule-prefix_lm|user", rule=mr.prefix_lm(5) | mr.rule(strided)),
    Case("rule-window&~user-causal", rule=mr.sliding_window(20) & ~mr.rule(strided),
         causal=True, heads=2, kv_heads=1),
    Case("rule-prefix_lm-chunk-mixed-tiles", rule=mr.prefix_lm(9), q_len=48,
         kv_len=80, config=MIXED_TILES),
]
case_params = pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)


@functools.lru_cache(maxsize=None)
def attention_fn(case: Case, implementation):
  """Jitted (q, k, v, do, dlse, ids, mask) -> dict(out, lse, dq, dk, dv)."""
  extra = (dict(interpret=True, config=case.config)
           if implementation == "pallas" else {})

  def run(q, k, v, do, dlse, ids, mask):
    def f(q, k, v):
      return flash_attention(
          q, k, v, **ids, mask=case.rule if mask is None else mask,
          causal=case.causal, sliding_window=case.window,
          implementation=implementation, return_residuals=True, **extra)

    (out, lse), vjp = jax.vjp(f, q, k, v)
    dq, dk, dv = vjp((do, dlse))
    return dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv)

  return jax.jit(run)


def run_both(case, layout, mask, seed):
  """(kernel, reference, allowed bool [B, H or 1, Tq, Tk]) as numpy."""
  q, k, v, do, dlse = random_inputs(
      seed, batch=B, q_len=case.q_len, kv_len=case.kv_len, heads=case.heads,
      kv_heads=case.kv_heads, head_dim=case.head_dim)
  ids = layout.kwargs()
  got = attention_fn(case, "pallas")(q, k, v, do, dlse, ids, mask)
  want = attention_fn(case, "xla")(q, k, v, do, dlse, ids, mask)
  as_np = lambda d: {n: np.asarray(x) for n, x in d.items()}  # noqa: E731
  return as_np(got), as_np(want)


def allowed(case, layout, mask):
  """bool [B, H, Tq, Tk]: the whole mask (a rule evaluated by jpack.masks)."""
  base = allowed_np(layout, causal=case.causal, sliding_window=case.window)[:, None]
  if mask is not None:
    return np.broadcast_to(base & mask, (B, case.heads, case.q_len, case.kv_len))
  starts = mr.document_starts(*map(jnp.asarray, (layout.kv_segment_ids,
                                                 layout.kv_positions)))
  rule = np.asarray(masks.general_allowed(
      *layout.arrays(), causal=False, sliding_window=None, rule=case.rule,
      kv_doc_starts=starts))
  return np.broadcast_to(base & rule, (B, case.heads, case.q_len, case.kv_len))


@case_params
@settings(max_examples=10)
@given(data=st.data(), seed=SEEDS)
def test_output_lse_and_gradients_match_reference(case, data, seed):
  layout, mask = data.draw(case.layouts()), data.draw(case.masks())
  got, want = run_both(case, layout, mask, seed)
  seen = allowed(case, layout, mask).any(-1)
  assert_close("out", got["out"], want["out"], F32_TOL)
  assert_close("lse", got["lse"][seen], want["lse"][seen], F32_TOL)
  for name in ("dq", "dk", "dv"):
    assert_close(name, got[name], want[name], F32_TOL)


@case_params
@settings(max_examples=10)
@given(data=st.data(), seed=SEEDS)
def test_what_nothing_attends_is_exactly_zero_and_never_nan(case, data, seed):
  """Rows with no allowed key: out 0, lse EMPTY_LSE, dq 0; keys no query sees: dk = dv = 0."""
  layout, mask = data.draw(case.layouts()), data.draw(case.masks())
  got, _ = run_both(case, layout, mask, seed)
  for name, x in got.items():
    assert_finite(name, x)
  ok = allowed(case, layout, mask)  # [B, H, Tq, Tk]
  blind = ~ok.any(-1)  # [B, H, Tq]
  np.testing.assert_array_equal(got["lse"][blind], np.float32(EMPTY_LSE))
  assert np.all(got["out"].transpose(0, 2, 1, 3)[blind] == 0.0)
  assert np.all(got["dq"].transpose(0, 2, 1, 3)[blind] == 0.0)
  group = case.heads // case.kv_heads
  unseen = ~ok.reshape(B, case.kv_heads, group, case.q_len, case.kv_len).any(axis=(2, 3))
  for name in ("dk", "dv"):
    assert np.all(got[name].transpose(0, 2, 1, 3)[unseen] == 0.0)


def test_a_plan_runs_the_kernels_as_the_mask_does():
  """flash_attention(plan=make_attention_plan(...)) == flash_attention(mask=...), grads too."""
  case = CASES[1]
  seg, pos = fixed_segment_ids("padded", B, 64), arange_positions(B, 64)
  layout = Layout(seg, seg, pos, pos)
  mask = np.random.default_rng(0).random((B, 4, 64, 64)) < 0.2
  q, k, v, do, dlse = random_inputs(0, batch=B, q_len=64, kv_len=64, heads=4,
                                    kv_heads=2, head_dim=32)
  want = attention_fn(case, "pallas")(q, k, v, do, dlse, layout.kwargs(), mask)
  plan = make_attention_plan(q, k, **layout.kwargs(), mask=mask, causal=True,
                             config=case.config)

  @jax.jit
  def planned(q, k, v, plan):
    def f(q, k, v):
      return flash_attention(q, k, v, plan=plan, causal=True, implementation="pallas",
                             interpret=True, return_residuals=True)
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp((do, dlse))

  (out, lse), grads = planned(q, k, v, plan)
  for name, g in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(want[name]), err_msg=name)


@functools.lru_cache(maxsize=None)
def _bwd_fn(case: Case, implementation):
  """Jitted flash_attention_bwd from given residuals: (q, k, v, out, lse, do, dlse, ids, mask)."""
  extra = (dict(interpret=True, config=case.config)
           if implementation == "pallas" else {})
  return jax.jit(lambda q, k, v, out, lse, do, dlse, ids, mask: flash_attention_bwd(
      q, k, v, out, lse, do, dlse=dlse, **ids, mask=case.rule if mask is None else mask,
      causal=case.causal, sliding_window=case.window, implementation=implementation,
      **extra))


@pytest.mark.parametrize("implementation", ["pallas", "xla"])
@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=lambda c: c.name)
@settings(max_examples=5)
@given(data=st.data(), seed=SEEDS)
def test_backward_from_residuals_takes_the_mask_too(case, implementation, data, seed):
  """flash_attention_bwd(..., mask=) gives the gradients of flash_attention(..., mask=)."""
  layout, mask = data.draw(case.layouts()), data.draw(case.masks())
  q, k, v, do, dlse = random_inputs(
      seed, batch=B, q_len=case.q_len, kv_len=case.kv_len, heads=case.heads,
      kv_heads=case.kv_heads, head_dim=case.head_dim)
  want = attention_fn(case, "xla")(q, k, v, do, dlse, layout.kwargs(), mask)
  got = _bwd_fn(case, implementation)(q, k, v, want["out"], want["lse"], do, dlse,
                                      layout.kwargs(), mask)
  for name, g in zip(("dq", "dk", "dv"), got):
    assert_close(name, g, want[name], F32_TOL)
