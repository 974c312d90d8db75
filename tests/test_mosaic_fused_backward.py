"""The fused Mosaic GPU backward (pallas_kernels.mosaic_fused_backward), against the reference.

On every machine: the kernel lowers for CUDA for each supported option
(head_dim 64/128, bf16/fp16, causal or not, sliding window, GQA groups 1/2/4,
q chunks against longer or shorter kv rows, one or two consumers, 64- and
128-row q tiles, 1 to 3 stages), its dQ accumulator is an aliased input that
the kernel adds into with TMA reductions, and inputs it cannot run are
refused with a message naming the argument. Its numbers are only checked on a
GPU (the Mosaic GPU interpreter cannot run these kernels).

On a GPU (marker `gpu`): dQ, dK, dV against jax.vjp of the float32 reference
on the same rounded inputs, with an lse cotangent too, and against the
two-kernel Mosaic backward (mosaic_backward) on the same inputs and residuals
(rel <= 2e-2 each); nothing NaN; queries that see nothing (padding included)
get dQ exactly 0 and keys that no query sees get dK = dV = 0; two runs agree
up to the rounding of the unordered float32 dQ additions.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from helpers import (ALL_KINDS, Layout, assert_close, assert_finite, chunk_layouts,
                     random_inputs, rel_err, self_layouts)
from test_gpu import GpuCase
from test_mosaic_backward import (_blind_queries, _check_zeros, _reference_and_residuals,
                                  _unseen_keys, mosaic_backward_grads)
from jpack import masks
from pallas_kernels import mosaic_fused_backward
from pallas_kernels.config import TileConfig

TOL = 2e-2  # bfloat16 / float16 against the float32 reference (and the two kernels)
TILE = mosaic_fused_backward.DEFAULT_FUSED_TILE


@functools.partial(jax.jit, static_argnames=("causal", "window", "scale", "tile"))
def fused_backward_grads(q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos, *,
                         causal, window, scale, tile=TILE):
  """(dq, dk, dv) of the fused kernel, tile plan included; lengths multiples of the tile."""
  kv_ranges = masks.make_tile_plan(q_seg, kv_seg, q_pos, kv_pos, block_q=tile.block_minor,
                                   block_k=tile.block_major, causal=causal,
                                   sliding_window=window).kv_ranges
  return mosaic_fused_backward.backward_fused(
      q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos, kv_ranges, tile=tile,
      scale=scale, causal=causal, sliding_window=window)


# ----------------------------------------------------------------------------
# CPU: lowering for CUDA, and input checks


@dataclasses.dataclass(frozen=True)
class LowerCase:
  name: str
  dtype: str = "bfloat16"
  head_dim: int = 128
  heads: int = 4
  kv_heads: int = 4
  q_len: int = 512
  kv_len: int = 512
  causal: bool = True
  window: int | None = None
  tile: TileConfig = TILE


LOWER_CASES = [
    LowerCase("default"),
    LowerCase("d64", head_dim=64),
    LowerCase("float16", dtype="float16"),
    LowerCase("float16-d64", dtype="float16", head_dim=64),
    LowerCase("bidirectional", causal=False),
    LowerCase("window", window=100),
    LowerCase("window-bidirectional-d64", window=100, causal=False, head_dim=64),
    LowerCase("gqa-4:2", kv_heads=2),
    LowerCase("gqa-4:1", kv_heads=1),
    LowerCase("gqa-8:2-d64", heads=8, kv_heads=2, head_dim=64),
    LowerCase("q256-kv768", q_len=256, kv_len=768),
    LowerCase("q768-kv256-d64", q_len=768, kv_len=256, head_dim=64),
    LowerCase("one-consumer-64x64", tile=TileConfig(64, 64, num_stages=2)),
    LowerCase("one-consumer-64x64-d64-gqa", heads=8, kv_heads=2, head_dim=64,
              tile=TileConfig(64, 64, num_stages=2)),
    LowerCase("one-stage", tile=TileConfig(128, 64, num_stages=1)),
    LowerCase("one-stage-gqa-window-float16", dtype="float16", kv_heads=1, window=100,
              tile=TileConfig(128, 64, num_stages=1)),
    LowerCase("three-stages-d64", head_dim=64, tile=TileConfig(128, 64, num_stages=3)),
    LowerCase("d64-128x128", head_dim=64, tile=TileConfig(128, 128, num_stages=2)),
    LowerCase("d64-128x128-gqa-bidirectional", head_dim=64, heads=8, kv_heads=2,
              causal=False, tile=TileConfig(128, 128, num_stages=1)),
]


def _lower(case: LowerCase):
  b = 2
  dt = jnp.dtype(case.dtype)
  q = jax.ShapeDtypeStruct((b, case.q_len, case.heads, case.head_dim), dt)
  kv = jax.ShapeDtypeStruct((b, case.kv_len, case.kv_heads, case.head_dim), dt)
  stat = jax.ShapeDtypeStruct((b, case.heads, case.q_len), jnp.float32)
  q_ids = jax.ShapeDtypeStruct((b, case.q_len), jnp.int32)
  kv_ids = jax.ShapeDtypeStruct((b, case.kv_len), jnp.int32)
  plan = jax.ShapeDtypeStruct((b, case.kv_len // case.tile.block_major, 4), jnp.int32)
  fn = functools.partial(mosaic_fused_backward.backward_fused, tile=case.tile, scale=0.1,
                         causal=case.causal, sliding_window=case.window)
  return jax.jit(fn).trace(q, kv, kv, q, stat, stat, q_ids, kv_ids, q_ids, kv_ids,
                           plan).lower(lowering_platforms=("cuda",))


@functools.lru_cache(maxsize=None)
def _lowered_text(case: LowerCase) -> str:
  return _lower(case).as_text()


@pytest.mark.parametrize("case", LOWER_CASES, ids=lambda c: c.name)
def test_lowers_for_cuda(case):
  assert "mosaic_gpu" in _lowered_text(case)


@pytest.mark.parametrize("case", LOWER_CASES[:2], ids=lambda c: c.name)
def test_dq_accumulator_is_aliased(case):
  # The float32 dQ accumulator (an input, zeros) is the kernel's updated output.
  assert "output_operand_aliases" in _lowered_text(case)


@pytest.mark.parametrize("case", LOWER_CASES[:2], ids=lambda c: c.name)
def test_dq_is_added_with_tma_reductions(case):
  # The inline PTX of the serialized kernel: the TMA bulk reduce-add.
  assert "cp.reduce.async.bulk.tensor" in _lowered_text(case)
  assert ".add." in _lowered_text(case)


def test_lowers_with_its_tile_plan():
  q = jax.ShapeDtypeStruct((2, 512, 4, 64), jnp.bfloat16)
  stat = jax.ShapeDtypeStruct((2, 4, 512), jnp.float32)
  ids = jax.ShapeDtypeStruct((2, 512), jnp.int32)
  lowered = fused_backward_grads.trace(
      q, q, q, q, stat, stat, ids, ids, ids, ids, causal=True, window=None,
      scale=0.1).lower(lowering_platforms=("cuda",))
  assert lowered.as_text().count("mosaic_gpu") >= 1


def test_three_stages_at_d128_exceed_shared_memory():
  # K, V 64 KiB, 3 stages of Q and dO 96 KiB, dS 32 KiB, dQ staging 32 KiB.
  case = LowerCase("too-big", tile=TileConfig(128, 64, num_stages=3))
  with pytest.raises(ValueError, match="shared memory"):
    _lower(case)


def _shapes(dtype="bfloat16", head_dim=128, q_len=256, kv_len=256):
  q = jax.ShapeDtypeStruct((1, q_len, 2, head_dim), jnp.dtype(dtype))
  k = jax.ShapeDtypeStruct((1, kv_len, 2, head_dim), jnp.dtype(dtype))
  return q, k


def _kv_plan(tile, kv_len=256):
  return jax.ShapeDtypeStruct((1, kv_len // tile.block_major, 4), jnp.int32)


@pytest.mark.parametrize("dtype, head_dim, tile, match", [
    ("float32", 128, TILE, "bfloat16 or float16"),
    ("bfloat16", 32, TILE, "head_dim"),
    ("bfloat16", 256, TILE, "fused backward supports head_dim 64 or 128"),
    ("bfloat16", 128, TileConfig(32, 64), "block_major"),
    ("bfloat16", 128, TileConfig(256, 64), "block_major"),
    ("bfloat16", 128, TileConfig(128, 32), "block_minor"),
    ("bfloat16", 128, TileConfig(128, 128), "tile.block_minor = 128"),  # registers
    ("bfloat16", 64, TileConfig(64, 128), "tile.block_minor = 128"),  # one consumer
])
def test_unsupported_inputs_are_rejected(dtype, head_dim, tile, match):
  q, k = _shapes(dtype, head_dim)
  with pytest.raises(ValueError, match=match):
    mosaic_fused_backward.check_fused_inputs(q, k, _kv_plan(tile), tile)


def test_128_row_q_tiles_are_accepted_at_d64():
  q, k = _shapes(head_dim=64)
  tile = TileConfig(128, 128)
  mosaic_fused_backward.check_fused_inputs(q, k, _kv_plan(tile), tile)


def test_lengths_must_fit_the_tile():
  tile = TileConfig(128, 64)
  q, k = _shapes(q_len=256, kv_len=192)  # Tk: a multiple of 64, not of 128
  with pytest.raises(ValueError, match=r"\(Tk, Tq\).*multiples"):
    mosaic_fused_backward.check_fused_inputs(q, k, _kv_plan(tile, 128), tile)
  q, k = _shapes(q_len=192, kv_len=256)  # Tq = 192 is a multiple of block_minor = 64
  mosaic_fused_backward.check_fused_inputs(q, k, _kv_plan(tile), tile)


def test_tile_lists_are_rejected():
  q, k = _shapes()
  lists = jax.ShapeDtypeStruct((1, 1, 2, 5), jnp.int32)  # [B, Hp, n_tiles, L]
  with pytest.raises(ValueError, match="kv_ranges must be a range plan"):
    mosaic_fused_backward.check_fused_inputs(q, k, lists, TILE)


def test_a_plan_of_another_tiling_is_rejected():
  q, k = _shapes()
  plan = jax.ShapeDtypeStruct((1, 4, 4), jnp.int32)  # 64-key tiles, not 128
  with pytest.raises(ValueError, match=r"kv_ranges.*\(1, 2, 4\)"):
    mosaic_fused_backward.check_fused_inputs(q, k, plan, TILE)


def _call(**kw):
  x = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
  stat = jnp.zeros((1, 2, 256), jnp.float32)
  ids = jnp.zeros((1, 256), jnp.int32)
  return mosaic_fused_backward.backward_fused(
      x, x, x, x, stat, stat, ids, ids, ids, ids, jnp.zeros((1, 2, 4), jnp.int32),
      tile=TILE, scale=0.1, causal=True, sliding_window=None, **kw)


@pytest.mark.parametrize("general", [
    dict(dense=jnp.ones((1, 1, 256, 256), jnp.int8)),
    dict(rule=lambda q_pos, q_seg, kv_pos, kv_seg, kv_doc: kv_pos <= q_pos),
])
def test_general_masks_are_rejected(general):
  with pytest.raises(ValueError, match="document masks only"):
    _call(**general)


def test_interpret_mode_is_refused():
  with pytest.raises(NotImplementedError, match="interpret"):
    _call(interpret=True)


# ----------------------------------------------------------------------------
# GPU: numbers against the reference and the two-kernel backward


@dataclasses.dataclass(frozen=True)
class FusedCase(GpuCase):
  """A case of tests/test_gpu.py, with the fused kernel's tiling."""
  tile: TileConfig = TILE


GPU_CASES = [
    FusedCase("packed-d128"),
    FusedCase("packed-d64", head_dim=64),
    FusedCase("padded-d64", layout="padded", head_dim=64),
    FusedCase("padded-d128", layout="padded"),
    FusedCase("empty-row-d128", layout="with_empty_row"),
    FusedCase("repeated-ids-d64", layout="repeated", head_dim=64, q_len=1024,
              kv_len=1024),
    FusedCase("gqa-4:1", heads=4, kv_heads=1),
    FusedCase("gqa-4:2-padded", layout="padded", heads=4, kv_heads=2),
    FusedCase("gqa-8:2-d64", heads=8, kv_heads=2, head_dim=64),
    FusedCase("gqa-8:2-padded-d128", layout="padded", heads=8, kv_heads=2),
    FusedCase("bidirectional", causal=False),
    FusedCase("bidirectional-padded-d64", layout="padded", causal=False, head_dim=64),
    FusedCase("window-256-d64", window=256, head_dim=64),
    FusedCase("window-100-bidirectional", window=100, causal=False),
    FusedCase("chunk-q1024-kv3072", q_len=1024, kv_len=3072, chunk_offset=1536),
    FusedCase("chunk-q1024-kv3072-padded-d64", layout="padded", q_len=1024, kv_len=3072,
              chunk_offset=1024, head_dim=64),
    FusedCase("one-document-T4096", layout="one_document", batch=1, q_len=4096,
              kv_len=4096),
    FusedCase("float16", dtype="float16"),
    FusedCase("float16-d64-padded", dtype="float16", head_dim=64, layout="padded"),
    FusedCase("large-logits-x50", layout="padded", scale_mult=50.0),
    FusedCase("one-consumer-64x64", layout="padded", tile=TileConfig(64, 64, num_stages=2)),
    FusedCase("one-consumer-64x64-d64-gqa-8:2", layout="with_empty_row", heads=8,
              kv_heads=2, head_dim=64, tile=TileConfig(64, 64, num_stages=2)),
    FusedCase("one-stage-gqa-8:2", layout="with_empty_row", heads=8, kv_heads=2,
              tile=TileConfig(128, 64, num_stages=1)),
    FusedCase("three-stages-d64", head_dim=64, layout="padded",
              tile=TileConfig(128, 64, num_stages=3)),
    FusedCase("128x128-d64", head_dim=64, layout="padded",
              tile=TileConfig(128, 128, num_stages=2)),
    FusedCase("128x128-d64-gqa-8:2-window", head_dim=64, heads=8, kv_heads=2, window=256,
              tile=TileConfig(128, 128, num_stages=1)),
]
BY_NAME = {c.name: c for c in GPU_CASES}
gpu_cases = pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.name)
GRADS = ("dq", "dk", "dv")


def _as_np(grads):
  return {n: np.asarray(x.astype(jnp.float32)) for n, x in zip(GRADS, grads)}


def _run(layout: Layout, seed, *, heads, kv_heads, head_dim, dtype, causal, window,
         scale, tile, two_kernel=False):
  """dicts of float32 numpy dq [B, Tq, H, D], dk, dv [B, Tk, Hkv, D]: (fused, reference)
  and, if two_kernel, the two-kernel Mosaic backward's on the same inputs too."""
  q_len, kv_len = layout.q_segment_ids.shape[1], layout.kv_segment_ids.shape[1]
  q, k, v, do, dlse = random_inputs(
      seed, batch=layout.q_segment_ids.shape[0], q_len=q_len, kv_len=kv_len,
      heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=jnp.dtype(dtype))
  want, lse, delta = _reference_and_residuals(q, k, v, do, dlse, layout, causal=causal,
                                              window=window, scale=scale)
  args = (q, k, v, do, lse, delta, *layout.arrays())
  opts = dict(causal=causal, window=window, scale=scale)
  got = _as_np(fused_backward_grads(*args, tile=tile, **opts))
  want = {n: np.asarray(x) for n, x in want.items()}
  if not two_kernel:
    return got, want
  return got, want, _as_np(mosaic_backward_grads(*args, **opts))


@functools.lru_cache(maxsize=None)
def run_case(name):
  """(fused, reference, two-kernel, layout) of one fixed case (fresh seed per case name)."""
  case = BY_NAME[name]
  layout = case.make_layout()
  got, want, two = _run(layout, zlib.crc32(f"fused:{name}".encode()) & 0x7FFFFFFF,
                        heads=case.heads, kv_heads=case.kv_heads,
                        head_dim=case.head_dim, dtype=case.dtype, causal=case.causal,
                        window=case.window,
                        scale=case.scale or 1.0 / np.sqrt(case.head_dim), tile=case.tile,
                        two_kernel=True)
  return got, want, two, layout


@pytest.mark.gpu
@gpu_cases
@pytest.mark.parametrize("grad", GRADS)
def test_gradient_matches_reference(case, grad):
  got, want, _, _ = run_case(case.name)
  assert_close(grad, got[grad], want[grad], TOL)


@pytest.mark.gpu
@gpu_cases
@pytest.mark.parametrize("grad", GRADS)
def test_gradient_matches_two_kernel_backward(case, grad):
  got, _, two, _ = run_case(case.name)
  assert_close(grad, got[grad], two[grad], TOL)


@pytest.mark.gpu
@gpu_cases
def test_nothing_is_nan_or_inf(case):
  got, _, _, _ = run_case(case.name)
  for name, x in got.items():
    assert_finite(name, x)


@pytest.mark.gpu
@gpu_cases
def test_queries_that_see_nothing_get_zero_dq(case):
  got, _, _, layout = run_case(case.name)
  blind = _blind_queries(layout, case.causal, case.window)
  assert np.all(got["dq"][blind] == 0.0)


@pytest.mark.gpu
@gpu_cases
def test_keys_no_query_sees_get_zero_dk_dv(case):
  got, _, _, layout = run_case(case.name)
  unseen = _unseen_keys(layout, case.causal, case.window)
  assert np.all(got["dk"][unseen] == 0.0)
  assert np.all(got["dv"][unseen] == 0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["packed-d128", "gqa-8:2-d64", "128x128-d64"])
def test_repeated_runs_agree_up_to_rounding(name):
  # dQ's float32 additions land in any order: equal up to rounding, maybe not bitwise.
  case = BY_NAME[name]
  layout = case.make_layout()
  runs = [_run(layout, 11, heads=case.heads, kv_heads=case.kv_heads,
               head_dim=case.head_dim, dtype=case.dtype, causal=case.causal,
               window=case.window, scale=1.0 / np.sqrt(case.head_dim),
               tile=case.tile)[0] for _ in range(2)]
  for n in GRADS:
    assert rel_err(runs[0][n], runs[1][n]) <= 1e-2, n


# Hypothesis layouts at one small shape: the kernel compiles once per option set.
B, T = 2, 256
SEEDS = st.integers(0, 2**31 - 1)
SMALL = dict(heads=4, kv_heads=2, head_dim=64, dtype="bfloat16", tile=TILE)


def _check_layout(layout: Layout, seed, *, causal, window=None):
  got, want = _run(layout, seed, causal=causal, window=window,
                   scale=1.0 / np.sqrt(SMALL["head_dim"]), **SMALL)
  for name in GRADS:
    assert_finite(name, got[name])
    assert_close(name, got[name], want[name], TOL)
  _check_zeros(got, layout, causal, window)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@settings(max_examples=15)
@given(layout=self_layouts(B, T, ALL_KINDS) | self_layouts(B, T, positions="custom"),
       seed=SEEDS)
def test_self_attention_layouts_match_reference(causal, layout, seed):
  _check_layout(layout, seed, causal=causal)


@pytest.mark.gpu
@settings(max_examples=15)
@given(layout=chunk_layouts(B, 128, 256), seed=SEEDS)
def test_chunk_layouts_with_window_match_reference(layout, seed):
  _check_layout(layout, seed, causal=True, window=64)
