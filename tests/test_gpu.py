"""flash_attention's compiled Pallas kernels on a real GPU, against the reference.

Skipped without a CUDA GPU (conftest). Default KernelConfig, no interpreter.
Each case runs forward and backward once (cached) and the tests check one
property each: low-precision kernels against the float32 reference on the
same rounded inputs (rel <= 2e-2), float32 kernels (exact float32 dots) to
1e-4, finite values everywhere, exact zeros where nothing is attended.
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

from helpers import (Layout, allowed_np, arange_positions, assert_close,
                     assert_finite, fixed_segment_ids, random_inputs)
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


CASES = [
    GpuCase("packed-d128"),
    GpuCase("packed-d64", head_dim=64),
    GpuCase("packed-d32", head_dim=32),
    GpuCase("packed-d96", head_dim=96),
    GpuCase("packed-d256", head_dim=256, q_len=1024, kv_len=1024),
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
]
BY_NAME = {c.name: c for c in CASES}


@functools.lru_cache(maxsize=None)
def run_case(name):
  """(kernel, reference, layout): dicts of float32 numpy out, lse, dq, dk, dv."""
  case = BY_NAME[name]
  layout = case.make_layout()
  seed = zlib.crc32(name.encode()) & 0x7FFFFFFF
  q, k, v, do, dlse = random_inputs(
      seed, batch=case.batch, q_len=case.q_len, kv_len=case.kv_len,
      heads=case.heads, kv_heads=case.kv_heads, head_dim=case.head_dim,
      dtype=jnp.dtype(case.dtype))

  def results(implementation, q, k, v, do):
    def f(q, k, v):
      return flash_attention(q, k, v, **layout.kwargs(), causal=case.causal,
                             sliding_window=case.window, scale=case.scale,
                             implementation=implementation, return_residuals=True)

    (out, lse), vjp = jax.vjp(f, q, k, v)
    dq, dk, dv = vjp((do, dlse))
    return dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv)

  as_np = lambda d: {n: np.asarray(x.astype(jnp.float32)) for n, x in d.items()}
  got = as_np(jax.jit(functools.partial(results, "pallas"))(q, k, v, do))
  f32 = lambda x: x.astype(jnp.float32)
  want = as_np(jax.jit(functools.partial(results, "xla"))(
      f32(q), f32(k), f32(v), f32(do)))
  return got, want, layout


def _allowed(case, layout):
  return allowed_np(layout, causal=case.causal, sliding_window=case.window)


def _seen_rows(case, layout):
  return np.broadcast_to(_allowed(case, layout).any(axis=2)[:, None, :],
                         (case.batch, case.heads, case.q_len))


cases = pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)


def test_runs_on_gpu():
  assert jax.default_backend() == "gpu"


@cases
def test_output_matches_reference(case):
  got, want, _ = run_case(case.name)
  assert_close("out", got["out"], want["out"], TOL[jnp.dtype(case.dtype)])


@cases
def test_lse_matches_reference(case):
  got, want, layout = run_case(case.name)
  seen = _seen_rows(case, layout)
  assert_close("lse", got["lse"][seen], want["lse"][seen], TOL[jnp.dtype(case.dtype)])
  np.testing.assert_array_equal(got["lse"][~seen], np.float32(EMPTY_LSE))


@cases
def test_gradients_match_reference(case):
  got, want, _ = run_case(case.name)
  for name in ("dq", "dk", "dv"):
    assert_close(name, got[name], want[name], TOL[jnp.dtype(case.dtype)])


@cases
def test_nothing_is_nan_or_inf(case):
  got, _, _ = run_case(case.name)
  for name, x in got.items():
    assert_finite(name, x)


@cases
def test_queries_that_see_nothing_have_zero_output_and_dq(case):
  got, _, layout = run_case(case.name)
  blind = ~_allowed(case, layout).any(axis=2)
  assert np.all(got["out"][blind] == 0.0)
  assert np.all(got["dq"][blind] == 0.0)


@cases
def test_keys_no_query_sees_get_zero_dk_dv(case):
  got, _, layout = run_case(case.name)
  unseen = ~_allowed(case, layout).any(axis=1)
  assert np.all(got["dk"][unseen] == 0.0)
  assert np.all(got["dv"][unseen] == 0.0)
