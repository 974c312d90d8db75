"""flash_attention's compiled kernels on a real GPU, against the reference.

Skipped without a CUDA GPU (conftest). Default tilings, no interpreter.
Every case runs through implementation="pallas" (the Triton kernels) and,
where the Mosaic GPU kernels cover it (bf16/fp16, head_dim 64/128/256, no general
mask) and the GPU is a Hopper, through implementation="mosaic" ("auto" there).
Each (case, implementation) runs forward and backward once (cached) and the
tests check one property each: low-precision kernels against the float32
reference on the same rounded inputs (rel <= 2e-2), float32 kernels (exact
float32 dots) to 1e-4, finite values everywhere, exact zeros where nothing is
attended. Cases with a general mask (issue 5: dense arrays, rules) run the
tile-list kernels; their masks come from GENERAL_MASKS.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.layouts import clustered_graph_mask
from helpers import (Layout, allowed_np, arange_positions, assert_close,
                     assert_finite, dense_mask_np, fixed_segment_ids, random_inputs)
from jpack import mask_rules as mr
from jpack import attention, masks
from jpack.attention import EMPTY_LSE, flash_attention

pytestmark = pytest.mark.gpu

TOL = {jnp.dtype(jnp.bfloat16): 2e-2, jnp.dtype(jnp.float16): 2e-2,
       jnp.dtype(jnp.float32): 1e-4}


@dataclasses.dataclass(frozen=True)
class GpuCase:
  name: str
  layout: str = "packed"  # a kind of helpers.fixed_segment_ids
  batch: int = 2
  q_len: int = 2048
  kv_len: int = 2048
  heads: int = 4
  kv_heads: int = 4
  head_dim: int = 128
  causal: bool = True
  window: int | None = None
  chunk_offset: int | None = None  # q = tokens [off, off + q_len) of the kv row
  dtype: str = "bfloat16"
  scale_mult: float = 1.0
  mask: str | None = None  # a key of GENERAL_MASKS

  @property
  def scale(self):
    return None if self.scale_mult == 1.0 else self.scale_mult / math.sqrt(self.head_dim)

  def make_layout(self) -> Layout:
    kv_seg = fixed_segment_ids(self.layout, self.batch, self.kv_len, seed=7)
    kv_pos = arange_positions(self.batch, self.kv_len)
    if self.chunk_offset is None:
      assert self.q_len == self.kv_len
      return Layout(kv_seg, kv_seg, kv_pos, kv_pos)
    off = self.chunk_offset
    return Layout(kv_seg[:, off:off + self.q_len], kv_seg,
                  kv_pos[:, off:off + self.q_len], kv_pos)


def _strided(q_idx, kv_idx, q_seg, kv_seg):
  return (q_idx - kv_idx) % 4 == 0


# name -> (case -> the mask= argument): bool numpy arrays or rules.
GENERAL_MASKS = {
    "graph": lambda c: clustered_graph_mask(c.batch, c.q_len, seed=3, mean_cluster=40),
    "random-10%": lambda c: np.random.default_rng(3).random(
        (c.batch, 1, c.q_len, c.kv_len)) < 0.1,
    "per-head-blocks": lambda c: dense_mask_np("blocks", 3, (c.batch, c.heads, c.q_len,
                                                             c.kv_len)),
    "empty-rows-cols": lambda c: dense_mask_np("empty_rows_cols", 3,
                                               (1, 1, c.q_len, c.kv_len)),
    "prefix_lm-100": lambda c: mr.prefix_lm(100),
    "causal-window-256": lambda c: mr.causal() & mr.sliding_window(256),
    "prefix_lm|strided": lambda c: mr.prefix_lm(64) | (mr.rule(_strided) & ~mr.causal()),
}

CASES = [
    GpuCase("packed-d128"),
    GpuCase("packed-d64", head_dim=64),
    GpuCase("packed-d32", head_dim=32),
    GpuCase("packed-d96", head_dim=96),
    GpuCase("packed-d256", head_dim=256, q_len=1024, kv_len=1024),
    GpuCase("gqa-8:2-window-256-d256", heads=8, kv_heads=2, head_dim=256, window=256,
            q_len=1024, kv_len=1024),
    GpuCase("padded-d64", layout="padded", head_dim=64),
    GpuCase("empty-row-d128", layout="with_empty_row"),
    GpuCase("repeated-ids-d64", layout="repeated", head_dim=64, q_len=1024, kv_len=1024),
    GpuCase("gqa-4:1", heads=4, kv_heads=1),
    GpuCase("gqa-8:2", heads=8, kv_heads=2, head_dim=64),
    GpuCase("bidirectional", causal=False),
    GpuCase("window-256", window=256, head_dim=64),
    GpuCase("window-100-bidirectional", window=100, causal=False, head_dim=64),
    GpuCase("chunk-q1024-kv3072", q_len=1024, kv_len=3072, chunk_offset=1536),
    GpuCase("odd-T1000", q_len=1000, kv_len=1000),
    GpuCase("odd-T1500", q_len=1500, kv_len=1500, head_dim=64),
    GpuCase("one-document-T4096", layout="one_document", batch=1, q_len=4096,
            kv_len=4096),
    GpuCase("float16", dtype="float16"),
    GpuCase("float32-d64", dtype="float32", head_dim=64, q_len=1024, kv_len=1024),
    GpuCase("float32-d128", dtype="float32", q_len=1024, kv_len=1024),
    GpuCase("large-logits-x50", scale_mult=50.0, layout="padded"),
    # General masks (tile lists)
    GpuCase("mask-graph-d128", layout="one_document", causal=False, mask="graph"),
    GpuCase("mask-random-10%-d128", layout="one_document", causal=False,
            mask="random-10%"),
    GpuCase("mask-per-head-gqa-8:2-causal", heads=8, kv_heads=2, head_dim=64,
            mask="per-head-blocks"),
    GpuCase("mask-empty-rows-cols-padded-odd-T1000", layout="padded", q_len=1000,
            kv_len=1000, causal=False, mask="empty-rows-cols"),
    GpuCase("mask-prefix_lm-packed", causal=False, mask="prefix_lm-100"),
    GpuCase("mask-causal-window-rule-d64", causal=False, head_dim=64,
            mask="causal-window-256"),
    GpuCase("mask-prefix_lm|strided-chunk", q_len=1024, kv_len=3072, chunk_offset=1536,
            causal=False, mask="prefix_lm|strided"),
    GpuCase("mask-graph-float32", layout="one_document", causal=False, mask="graph",
            dtype="float32", q_len=1024, kv_len=1024),
]


def mosaic_covers(case: GpuCase) -> bool:
  """Whether implementation="mosaic" can run the case (else it raises)."""
  return (case.mask is None and case.dtype in ("bfloat16", "float16")
          and case.head_dim in (64, 128, 256))


@functools.lru_cache(maxsize=None)
def case_results(case: GpuCase, implementation: str):
  """(kernel, reference, allowed) of a case run by `implementation`: dicts of
  float32 numpy out, lse, dq, dk, dv, and the whole mask, bool [B, H, Tq, Tk]."""
  layout = case.make_layout()
  mask = None if case.mask is None else GENERAL_MASKS[case.mask](case)
  seed = zlib.crc32(case.name.encode()) & 0x7FFFFFFF
  q, k, v, do, dlse = random_inputs(
      seed, batch=case.batch, q_len=case.q_len, kv_len=case.kv_len,
      heads=case.heads, kv_heads=case.kv_heads, head_dim=case.head_dim,
      dtype=jnp.dtype(case.dtype))

  def results(implementation, q, k, v, do):
    def f(q, k, v):
      return flash_attention(q, k, v, **layout.kwargs(), causal=case.causal,
                             sliding_window=case.window, scale=case.scale, mask=mask,
                             implementation=implementation, return_residuals=True)

    (out, lse), vjp = jax.vjp(f, q, k, v)
    dq, dk, dv = vjp((do, dlse))
    return dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv)

  as_np = lambda d: {n: np.asarray(x.astype(jnp.float32)) for n, x in d.items()}
  got = as_np(jax.jit(functools.partial(results, implementation))(q, k, v, do))
  f32 = lambda x: x.astype(jnp.float32)
  want = as_np(jax.jit(functools.partial(results, "xla"))(
      f32(q), f32(k), f32(v), f32(do)))
  return got, want, _allowed(case, layout, mask)


def _allowed(case, layout, mask):
  """bool [B, H, Tq, Tk]: the whole mask (a rule evaluated by jpack.masks)."""
  allowed = allowed_np(layout, causal=case.causal, sliding_window=case.window)[:, None]
  if isinstance(mask, mr.MaskRule):
    starts = mr.document_starts(*map(jnp.asarray, (layout.kv_segment_ids,
                                                   layout.kv_positions)))
    mask = np.asarray(masks.general_allowed(
        *layout.arrays(), causal=False, sliding_window=None, rule=mask,
        kv_doc_starts=starts))
  if mask is not None:
    allowed = allowed & mask.reshape(mask.shape[0], -1, *mask.shape[-2:])
  return np.broadcast_to(allowed, (case.batch, case.heads, case.q_len, case.kv_len))


RUNS = ([(c, "pallas") for c in CASES]
        + [(c, "mosaic") for c in CASES if mosaic_covers(c)])
cases = pytest.mark.parametrize("case, implementation", RUNS,
                                ids=[f"{impl}-{c.name}" for c, impl in RUNS])


def run_case(case: GpuCase, implementation: str):
  """case_results, skipping Mosaic runs off Hopper (its kernels need sm90)."""
  if implementation == "mosaic" and not attention._is_hopper():
    pytest.skip("implementation='mosaic' needs a Hopper (sm90) GPU")
  return case_results(case, implementation)


def test_runs_on_gpu():
  assert jax.default_backend() == "gpu"


@cases
def test_output_matches_reference(case, implementation):
  got, want, _ = run_case(case, implementation)
  assert_close("out", got["out"], want["out"], TOL[jnp.dtype(case.dtype)])


@cases
def test_lse_matches_reference(case, implementation):
  got, want, allowed = run_case(case, implementation)
  seen = allowed.any(axis=3)
  assert_close("lse", got["lse"][seen], want["lse"][seen], TOL[jnp.dtype(case.dtype)])
  np.testing.assert_array_equal(got["lse"][~seen], np.float32(EMPTY_LSE))


@cases
def test_gradients_match_reference(case, implementation):
  got, want, _ = run_case(case, implementation)
  for name in ("dq", "dk", "dv"):
    assert_close(name, got[name], want[name], TOL[jnp.dtype(case.dtype)])


@cases
def test_nothing_is_nan_or_inf(case, implementation):
  got, _, _ = run_case(case, implementation)
  for name, x in got.items():
    assert_finite(name, x)


@cases
def test_queries_that_see_nothing_have_zero_output_and_dq(case, implementation):
  got, _, allowed = run_case(case, implementation)
  blind = ~allowed.any(axis=3)  # [B, H, Tq]
  assert np.all(got["out"].transpose(0, 2, 1, 3)[blind] == 0.0)
  assert np.all(got["dq"].transpose(0, 2, 1, 3)[blind] == 0.0)


@cases
def test_keys_no_query_sees_get_zero_dk_dv(case, implementation):
  got, _, allowed = run_case(case, implementation)
  group = case.heads // case.kv_heads
  unseen = ~allowed.reshape(case.batch, case.kv_heads, group, case.q_len,
                            case.kv_len).any(axis=(2, 3))  # [B, Hkv, Tk]
  assert np.all(got["dk"].transpose(0, 2, 1, 3)[unseen] == 0.0)
  assert np.all(got["dv"].transpose(0, 2, 1, 3)[unseen] == 0.0)


@pytest.mark.parametrize("implementation, head_dim", [("pallas", 128), ("mosaic", 128),
                                                     ("mosaic", 256)])
def test_a_plan_made_once_gives_what_each_call_computes_alone(implementation, head_dim):
  """Two layers sharing one make_attention_plan (with the Mosaic plan: the
  persistent kernels' work items made with it, dealt by load where the calls claim
  theirs) give bitwise the outputs and gradients of calls that plan for themselves."""
  if implementation == "mosaic" and not attention._is_hopper():
    pytest.skip("implementation='mosaic' needs a Hopper (sm90) GPU")
  case = GpuCase("plan-reuse", heads=8, kv_heads=2, q_len=4096, kv_len=4096,
                 head_dim=head_dim)
  layout = case.make_layout()
  q, k, v, do, _ = random_inputs(7, batch=case.batch, q_len=case.q_len,
                                 kv_len=case.kv_len, heads=case.heads,
                                 kv_heads=case.kv_heads, head_dim=case.head_dim,
                                 dtype=jnp.bfloat16)
  ids = {name: jnp.asarray(x) for name, x in layout.kwargs().items()}

  def two_layers(q, k, v, ids, reuse):
    kwargs = (dict(plan=attention.make_attention_plan(q, k, **ids,
                                                      implementation=implementation))
              if reuse else ids)
    first = flash_attention(q, k, v, implementation=implementation, **kwargs)
    return flash_attention(first, k, v, implementation=implementation, **kwargs)

  def run(reuse, ids):
    out, vjp = jax.vjp(lambda q, k, v: two_layers(q, k, v, ids, reuse), q, k, v)
    return (out, *vjp(do))

  planned, alone = (jax.jit(run, static_argnums=0)(reuse, ids) for reuse in (True, False))
  for name, a, b in zip(("out", "dq", "dk", "dv"), planned, alone):
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)),
                                  np.asarray(b.astype(jnp.float32)), err_msg=name)
    assert_finite(name, np.asarray(a.astype(jnp.float32)))
