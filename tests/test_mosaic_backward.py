"""The Mosaic GPU backward kernels (pallas_kernels.mosaic_backward), against the reference.

On every machine: dQ and dK/dV lower for CUDA for each supported option
(Mosaic GPU builds its MLIR, wgmma shapes, TMA slices and barriers at lowering
time, so this catches most API and shape errors without a GPU), and inputs
they cannot run are refused with a message. Their numbers are only checked on
a GPU (see tests/test_mosaic.py for why the interpreter cannot run them).

On a GPU (marker `gpu`): dQ, dK, dV against jax.vjp of the float32 reference
on the same rounded inputs, with an lse cotangent too (rel <= 2e-2); lse and
out (for delta) come from the float32 reference, so only the backward kernels
are under test. Nothing NaN; queries that see nothing get dQ exactly 0 and
keys that no query sees get dK = dV = 0.
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

from helpers import (ALL_KINDS, Layout, allowed_np, assert_close, assert_finite,
                     chunk_layouts, random_inputs, self_layouts)
from test_gpu import GpuCase
from jpack import masks
from jpack.attention import reference_attention
from pallas_kernels import (mosaic_backward, mosaic_common, mosaic_persistent,
                            mosaic_split_backward)
from pallas_kernels.config import TileConfig

TOL = 2e-2  # bfloat16 / float16 against the float32 reference
DQ_TILE, DKDV_TILE = mosaic_backward.DEFAULT_DQ_TILE, mosaic_backward.DEFAULT_DKDV_TILE
WIDE = mosaic_common.WIDE_HEAD_TILE  # the tiles at head_dim 256
WIDE_DQ = mosaic_common.WIDE_HEAD_DQ_TILE  # jpack's dQ tile there (32-key tiles)


def _plans(q_seg, kv_seg, q_pos, kv_pos, *, causal, window, dq_tile, dkdv_tile):
  """(the dQ tiling's plan, the dK/dV tiling's plan): jpack.masks.TilePlan."""
  plan = functools.partial(masks.make_tile_plan, q_seg, kv_seg, q_pos, kv_pos,
                           causal=causal, sliding_window=window)
  return (plan(block_q=dq_tile.block_major, block_k=dq_tile.block_minor),
          plan(block_q=dkdv_tile.block_minor, block_k=dkdv_tile.block_major))


@functools.partial(jax.jit, static_argnames=("causal", "window", "scale", "dq_tile",
                                             "dkdv_tile", "schedule", "num_ctas"))
def mosaic_backward_grads(q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos, *,
                          causal, window, scale, dq_tile=DQ_TILE, dkdv_tile=DKDV_TILE,
                          schedule=None, num_ctas=None):
  """(dq, dk, dv) of the Mosaic kernels, tile plans (ranges and compares) included;
  lengths multiples of the tiles.

  schedule, num_ctas: both kernels' (mosaic_backward.SCHEDULES; None: the default).
  """
  dq_plan, dkdv_plan = _plans(q_seg, kv_seg, q_pos, kv_pos, causal=causal,
                              window=window, dq_tile=dq_tile, dkdv_tile=dkdv_tile)
  args = (q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos)
  opts = dict(scale=scale, causal=causal, sliding_window=window, schedule=schedule,
              num_ctas=num_ctas)
  dq = mosaic_backward.backward_dq(*args, dq_plan.q_ranges, tile=dq_tile,
                                   q_compares=dq_plan.q_compares, **opts)
  dk, dv = mosaic_backward.backward_dkdv(*args, dkdv_plan.kv_ranges, tile=dkdv_tile,
                                         kv_compares=dkdv_plan.kv_compares, **opts)
  return dq, dk, dv


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
  dq_tile: TileConfig = DQ_TILE
  dkdv_tile: TileConfig = DKDV_TILE


LOWER_CASES = [
    LowerCase("default"),
    LowerCase("d64", head_dim=64),
    LowerCase("float16", dtype="float16"),
    LowerCase("float16-d64", dtype="float16", head_dim=64),
    LowerCase("bidirectional", causal=False),
    LowerCase("window", window=100),
    LowerCase("window-bidirectional", window=100, causal=False, head_dim=64),
    LowerCase("gqa-4:1", kv_heads=1),
    LowerCase("gqa-8:2-d64", heads=8, kv_heads=2, head_dim=64),
    LowerCase("q256-kv768", q_len=256, kv_len=768),
    LowerCase("q768-kv256-d64", q_len=768, kv_len=256, head_dim=64),
    LowerCase("one-consumer-64x64", dq_tile=TileConfig(64, 64, num_stages=2),
              dkdv_tile=TileConfig(64, 64, num_stages=2)),
    LowerCase("one-consumer-gqa-d64", heads=8, kv_heads=2, head_dim=64,
              dq_tile=TileConfig(64, 128, num_stages=2),
              dkdv_tile=TileConfig(64, 128, num_stages=2)),
    LowerCase("dq-128x128", dq_tile=TileConfig(128, 128, num_stages=2)),
    LowerCase("three-stages", dq_tile=TileConfig(128, 64, num_stages=3),
              dkdv_tile=TileConfig(128, 64, num_stages=3)),
    LowerCase("one-stage", dq_tile=TileConfig(128, 64, num_stages=1),
              dkdv_tile=TileConfig(128, 64, num_stages=1)),
    LowerCase("d64-128x128", head_dim=64, dq_tile=TileConfig(128, 128, num_stages=2),
              dkdv_tile=TileConfig(128, 128, num_stages=2)),
    LowerCase("d256", head_dim=256, dq_tile=WIDE, dkdv_tile=WIDE),
    LowerCase("d256-gqa-8:2-window-float16", dtype="float16", head_dim=256, heads=8,
              kv_heads=2, window=100, dq_tile=WIDE, dkdv_tile=WIDE),
    LowerCase("d256-one-stage", head_dim=256, dq_tile=TileConfig(64, 64, num_stages=1),
              dkdv_tile=TileConfig(64, 64, num_stages=1)),
    LowerCase("d256-dq-128x32", head_dim=256, dq_tile=WIDE_DQ, dkdv_tile=WIDE),
    LowerCase("dq-128x32-d64-gqa-window", head_dim=64, heads=8, kv_heads=2, window=100,
              dq_tile=TileConfig(128, 32, num_stages=3), dkdv_tile=WIDE),
]


def _lower(case: LowerCase, kernel: str, schedule=None):
  b = 2
  dt = jnp.dtype(case.dtype)
  q = jax.ShapeDtypeStruct((b, case.q_len, case.heads, case.head_dim), dt)
  kv = jax.ShapeDtypeStruct((b, case.kv_len, case.kv_heads, case.head_dim), dt)
  stat = jax.ShapeDtypeStruct((b, case.heads, case.q_len), jnp.float32)
  q_ids = jax.ShapeDtypeStruct((b, case.q_len), jnp.int32)
  kv_ids = jax.ShapeDtypeStruct((b, case.kv_len), jnp.int32)
  q_tiles = case.q_len // case.dq_tile.block_major
  kv_tiles = case.kv_len // case.dkdv_tile.block_major
  opts = dict(scale=0.1, causal=case.causal, sliding_window=case.window,
              schedule=schedule)
  # The plan rows and their compares (the masked tiles that need one compare).
  q_plan = (jax.ShapeDtypeStruct((b, q_tiles, 4), jnp.int32),
            jax.ShapeDtypeStruct((b, q_tiles), jnp.int32))
  kv_plan = (jax.ShapeDtypeStruct((b, kv_tiles, 4), jnp.int32),
             jax.ShapeDtypeStruct((b, kv_tiles), jnp.int32))
  if kernel == "dq-and-delta":  # (..., lse, out, dlse, ...) in place of (lse, delta)
    fn = lambda *a: mosaic_backward.backward_dq_and_delta(  # noqa: E731
        *a[:-1], tile=case.dq_tile, q_compares=a[-1], **opts)
    return jax.jit(fn).trace(q, kv, kv, q, stat, q, stat, q_ids, kv_ids, q_ids, kv_ids,
                             *q_plan).lower(lowering_platforms=("cuda",))
  if kernel == "dq":
    fn = lambda *a: mosaic_backward.backward_dq(  # noqa: E731
        *a[:-1], tile=case.dq_tile, q_compares=a[-1], **opts)
    plan = q_plan
  else:
    fn = lambda *a: mosaic_backward.backward_dkdv(  # noqa: E731
        *a[:-1], tile=case.dkdv_tile, kv_compares=a[-1], **opts)
    plan = kv_plan
  return jax.jit(fn).trace(q, kv, kv, q, stat, stat, q_ids, kv_ids, q_ids, kv_ids,
                           *plan).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("kernel", ["dq", "dkdv"])
@pytest.mark.parametrize("case", LOWER_CASES, ids=lambda c: c.name)
def test_lowers_for_cuda(case, kernel):
  assert "mosaic_gpu" in _lower(case, kernel, "grid").as_text()


# The persistent kernels share the grid kernels' steps (masks, windows,
# dtypes), so they lower on the cases that change their own code: head dims,
# GQA, one consumer, stages, 128-key tiles, lengths, and tiles that do not fit.
PERSISTENT_LOWER_CASES = [c for c in LOWER_CASES if c.name in (
    "default", "d64", "float16-d64", "gqa-4:1", "gqa-8:2-d64", "q768-kv256-d64",
    "one-consumer-64x64", "one-consumer-gqa-d64", "dq-128x128", "three-stages",
    "one-stage", "d64-128x128", "d256", "d256-one-stage")]


# dQ without delta is dQ with delta less its delta step: a few cases suffice.
PERSISTENT_LOWERINGS = [(case, kernel) for case in PERSISTENT_LOWER_CASES
                        for kernel in ("dq", "dq-and-delta", "dkdv")
                        if kernel != "dq" or case.name in ("default", "one-consumer-gqa-d64",
                                                           "one-stage")]


@pytest.mark.parametrize("case, kernel", PERSISTENT_LOWERINGS,
                         ids=[f"{c.name}-{k}" for c, k in PERSISTENT_LOWERINGS])
def test_persistent_lowers_for_cuda(case, kernel):
  tile, streamed = ((case.dkdv_tile, case.q_len) if kernel == "dkdv"
                    else (case.dq_tile, case.kv_len))
  streamed = jax.ShapeDtypeStruct((2, streamed, 1, case.head_dim), jnp.dtype(case.dtype))
  if not mosaic_backward.persistent_fits(tile, streamed):
    with pytest.raises(ValueError, match="shared memory"):
      _lower(case, kernel, "persistent")
  else:
    text = _lower(case, kernel, "persistent").as_text()
    assert "mosaic_gpu" in text
    assert "dot_general" not in text  # dq-and-delta: delta inside the kernel, not in XLA


# The split kernels (mosaic_split_backward) run the 64 x 64 tiles, at any head dim.
SPLIT_LOWERINGS = [(case, kernel) for case in LOWER_CASES
                   if mosaic_backward.splits(case.dq_tile)
                   and mosaic_backward.splits(case.dkdv_tile)
                   for kernel in ("dq", "dq-and-delta", "dkdv")]


@pytest.mark.parametrize("case, kernel", SPLIT_LOWERINGS,
                         ids=[f"{c.name}-{k}" for c, k in SPLIT_LOWERINGS])
def test_split_lowers_for_cuda(case, kernel):
  text = _lower(case, kernel, "split").as_text()
  assert text.count("mosaic_gpu") >= 1
  # dq-and-delta: the split dQ kernel takes delta from XLA, as the grid one.
  assert ("stablehlo.dot_general" in text) == (kernel == "dq-and-delta")


def test_split_lowerings_cover_head_dims_stages_gqa_and_windows():
  names = {case.name for case, _ in SPLIT_LOWERINGS}
  assert {"d256", "d256-one-stage", "d256-gqa-8:2-window-float16",
          "one-consumer-64x64"} <= names


def test_head_dim_256_defaults_to_the_split_dkdv_kernel():
  wide = mosaic_common.WIDE_HEAD_TILE
  q = lambda d: jax.ShapeDtypeStruct((1, 8192, 1, d), jnp.bfloat16)  # noqa: E731
  assert mosaic_backward.default_schedule(wide, q(256), "dkdv") == "split"
  assert mosaic_backward.default_schedule(wide, q(256), "dq") == "grid"
  for kernel in ("dq", "dkdv"):
    assert mosaic_backward.default_schedule(DQ_TILE, q(256), kernel) == "grid"
    assert mosaic_backward.default_schedule(wide, q(128), kernel) != "split"


def _wide_args(n_tiles):
  """Arguments of backward_dq / backward_dkdv at head_dim 256 up to the plan (T = 256, a
  plan of n_tiles rows): what the input checks see before any kernel is built."""
  x = jnp.zeros((1, 256, 2, 256), jnp.bfloat16)
  stat = jnp.zeros((1, 2, 256), jnp.float32)
  ids = jnp.ones((1, 256), jnp.int32)
  return (x, x, x, x, stat, stat, ids, ids, ids, ids, jnp.zeros((1, n_tiles, 4), jnp.int32))


@pytest.mark.parametrize("kernel", ["backward_dq", "backward_dkdv"])
def test_split_needs_its_tile(kernel):
  with pytest.raises(ValueError, match="schedule='split' needs a 64 x 64 tile"):
    getattr(mosaic_backward, kernel)(
        *_wide_args(2), tile=TileConfig(128, 64), scale=0.1, causal=True,
        sliding_window=None, schedule="split")


@pytest.mark.parametrize("schedule", ["persistent", "split"])
def test_32_key_dq_tiles_run_on_the_grid_only(schedule):
  args = _wide_args(2)
  opts = dict(tile=WIDE_DQ, scale=0.1, causal=True, sliding_window=None)
  with pytest.raises(ValueError, match="block_minor = 32 runs on schedule='grid' only"):
    mosaic_backward.backward_dq(*args, schedule=schedule, **opts)
  assert mosaic_backward.default_schedule(WIDE_DQ, args[0], "dq") == "grid"
  with pytest.raises(ValueError, match="block_minor must be one of"):  # dK/dV: not 32
    mosaic_backward.backward_dkdv(*args, **opts)


def test_split_needs_a_head_dim_in_halves_of_whole_swizzle_tiles():
  with pytest.raises(ValueError, match="head_dim a multiple of 64"):
    mosaic_split_backward.check_split_tile(mosaic_split_backward.SPLIT_TILE, 96)


@pytest.mark.parametrize("name", ["default", "d64-128x128"])
def test_dq_and_delta_on_the_grid_lowers_with_the_delta_in_xla(name):
  case = next(c for c in LOWER_CASES if c.name == name)
  text = _lower(case, "dq-and-delta", "grid").as_text()
  assert "mosaic_gpu" in text and "stablehlo.dot_general" in text  # rowsum(out * do)


def test_lowers_with_its_tile_plans():
  q = jax.ShapeDtypeStruct((2, 512, 4, 64), jnp.bfloat16)
  stat = jax.ShapeDtypeStruct((2, 4, 512), jnp.float32)
  ids = jax.ShapeDtypeStruct((2, 512), jnp.int32)
  lowered = mosaic_backward_grads.trace(
      q, q, q, q, stat, stat, ids, ids, ids, ids, causal=True, window=None,
      scale=0.1).lower(lowering_platforms=("cuda",))
  assert lowered.as_text().count("mosaic_gpu") >= 2


def _shapes(dtype="bfloat16", head_dim=128, q_len=256, kv_len=256):
  q = jax.ShapeDtypeStruct((1, q_len, 2, head_dim), jnp.dtype(dtype))
  k = jax.ShapeDtypeStruct((1, kv_len, 2, head_dim), jnp.dtype(dtype))
  return q, k


@pytest.mark.parametrize("kv_major", [False, True], ids=["dq", "dkdv"])
@pytest.mark.parametrize("dtype, head_dim, tile, match", [
    ("float32", 128, DQ_TILE, "bfloat16 or float16"),
    ("bfloat16", 32, DQ_TILE, "head_dim"),
    ("bfloat16", 96, DQ_TILE, "head_dim"),
    ("bfloat16", 512, DQ_TILE, "head_dim"),
    ("bfloat16", 128, TileConfig(32, 64), "block_major"),
    ("bfloat16", 128, TileConfig(256, 64), "block_major"),
    ("bfloat16", 128, TileConfig(128, 32), "block_minor"),
])
def test_unsupported_inputs_are_rejected(kv_major, dtype, head_dim, tile, match):
  q, k = _shapes(dtype, head_dim)
  plan = jax.ShapeDtypeStruct((1, 256 // tile.block_major, 4), jnp.int32)
  with pytest.raises(ValueError, match=match):
    mosaic_backward.check_backward_inputs(q, k, plan, tile, kv_major=kv_major)


def test_lengths_must_fit_the_tiles_of_each_kernel():
  q, k = _shapes(q_len=192, kv_len=256)  # 192: a multiple of 64, not of 128
  tile = TileConfig(128, 64)
  with pytest.raises(ValueError, match="multiples"):
    mosaic_backward.check_backward_inputs(
        q, k, jax.ShapeDtypeStruct((1, 1, 4), jnp.int32), tile, kv_major=False)
  mosaic_backward.check_backward_inputs(  # dK/dV: Tk = 256 major, Tq = 192 minor
      q, k, jax.ShapeDtypeStruct((1, 2, 4), jnp.int32), tile, kv_major=True)


@pytest.mark.parametrize("kv_major", [False, True], ids=["dq", "dkdv"])
def test_tile_lists_are_rejected(kv_major):
  q, k = _shapes()
  lists = jax.ShapeDtypeStruct((1, 1, 2, 5), jnp.int32)  # [B, Hp, n_tiles, L]
  with pytest.raises(ValueError, match="range plan"):
    mosaic_backward.check_backward_inputs(q, k, lists, DQ_TILE, kv_major=kv_major)


def test_a_plan_of_another_tiling_is_rejected():
  q, k = _shapes()
  plan = jax.ShapeDtypeStruct((1, 4, 4), jnp.int32)  # 64-row tiles, not 128
  with pytest.raises(ValueError, match=r"\(1, 2, 4\)"):
    mosaic_backward.check_backward_inputs(q, k, plan, DQ_TILE, kv_major=False)


@pytest.mark.parametrize("kernel, name", [("backward_dq", "q_compares"),
                                          ("backward_dkdv", "kv_compares")])
def test_compares_of_the_wrong_shape_are_rejected(kernel, name):
  x = jnp.zeros((1, 256, 2, 128), jnp.bfloat16)
  stat = jnp.zeros((1, 2, 256), jnp.float32)
  ids = jnp.ones((1, 256), jnp.int32)
  with pytest.raises(ValueError, match=name):
    getattr(mosaic_backward, kernel)(
        x, x, x, x, stat, stat, ids, ids, ids, ids, jnp.zeros((1, 2, 4), jnp.int32),
        tile=DQ_TILE, scale=0.1, causal=True, sliding_window=None,
        **{name: jnp.zeros((1, 3), jnp.int32)})


def _work_items(n_items, num_ctas=4, busy=None):
  return mosaic_persistent.WorkItems(jnp.zeros((n_items, 9), jnp.int32), num_ctas, busy)


@pytest.mark.parametrize("kernel", ["backward_dq", "backward_dkdv"])
@pytest.mark.parametrize("options, match", [
    (dict(items=_work_items(4), schedule="grid"), "items.*schedule='persistent'"),
    (dict(items=_work_items(5), schedule="persistent"),
     r"items: the table must be int32 \(4, 9\)"),
    (dict(items=_work_items(4), schedule="persistent", num_ctas=3), "num_ctas"),
    (dict(items=_work_items(4, busy=jnp.ones((1,), jnp.int32)), schedule="persistent"),
     "items: dealt 'dynamic'.*only the forward"),
], ids=["grid", "wrong-table", "other-num-ctas", "claimed"])
def test_work_items_that_do_not_fit_the_call_are_rejected(kernel, options, match):
  x = jnp.zeros((1, 256, 2, 128), jnp.bfloat16)
  stat = jnp.zeros((1, 2, 256), jnp.float32)
  ids = jnp.ones((1, 256), jnp.int32)
  with pytest.raises(ValueError, match=match):  # 2 plan rows x 2 heads: 4 items
    getattr(mosaic_backward, kernel)(
        x, x, x, x, stat, stat, ids, ids, ids, ids, jnp.zeros((1, 2, 4), jnp.int32),
        tile=DQ_TILE, scale=0.1, causal=True, sliding_window=None, **options)


@pytest.mark.parametrize("kernel", ["backward_dq", "backward_dkdv"])
@pytest.mark.parametrize("general", [
    dict(dense=jnp.ones((1, 1, 256, 256), jnp.int8)),
    dict(rule=lambda q_pos, q_seg, kv_pos, kv_seg, kv_doc: kv_pos <= q_pos),
])
def test_general_masks_are_rejected(kernel, general):
  x = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
  stat = jnp.zeros((1, 2, 256), jnp.float32)
  ids = jnp.zeros((1, 256), jnp.int32)
  with pytest.raises(ValueError, match="document masks only"):
    getattr(mosaic_backward, kernel)(
        x, x, x, x, stat, stat, ids, ids, ids, ids, jnp.zeros((1, 2, 4), jnp.int32),
        tile=DQ_TILE, scale=0.1, causal=True, sliding_window=None, **general)


@pytest.mark.parametrize("kernel", ["backward_dq", "backward_dkdv"])
def test_interpret_mode_is_refused(kernel):
  x = jnp.zeros((1, 128, 1, 64), jnp.bfloat16)
  stat = jnp.zeros((1, 1, 128), jnp.float32)
  ids = jnp.zeros((1, 128), jnp.int32)
  with pytest.raises(NotImplementedError, match="interpret"):
    getattr(mosaic_backward, kernel)(
        x, x, x, x, stat, stat, ids, ids, ids, ids, jnp.zeros((1, 1, 4), jnp.int32),
        tile=DQ_TILE, scale=0.1, causal=True, sliding_window=None, interpret=True)


def test_tiles_beyond_shared_memory_fail_to_lower():
  # dQ, D = 128: Q and dO 64 KiB, plus 3 stages of 128-key K and V (192 KiB).
  case = LowerCase("too-big", dq_tile=TileConfig(128, 128, num_stages=3))
  with pytest.raises(ValueError, match="shared memory"):
    _lower(case, "dq")


# ----------------------------------------------------------------------------
# GPU: numbers against the reference


@dataclasses.dataclass(frozen=True)
class BackwardCase(GpuCase):
  """A case of tests/test_gpu.py, with the Mosaic backward tilings."""
  dq_tile: TileConfig = DQ_TILE
  dkdv_tile: TileConfig = DKDV_TILE


GPU_CASES = [
    BackwardCase("packed-d128"),
    BackwardCase("packed-d64", head_dim=64),
    BackwardCase("padded-d64", layout="padded", head_dim=64),
    BackwardCase("padded-d128", layout="padded"),
    BackwardCase("empty-row-d128", layout="with_empty_row"),
    BackwardCase("repeated-ids-d64", layout="repeated", head_dim=64, q_len=1024,
                 kv_len=1024),
    BackwardCase("gqa-4:1", heads=4, kv_heads=1),
    BackwardCase("gqa-8:2-d64", heads=8, kv_heads=2, head_dim=64),
    BackwardCase("gqa-8:2-padded-d128", layout="padded", heads=8, kv_heads=2),
    BackwardCase("bidirectional", causal=False),
    BackwardCase("window-256-d64", window=256, head_dim=64),
    BackwardCase("window-100-bidirectional", window=100, causal=False, head_dim=64),
    BackwardCase("chunk-q1024-kv3072", q_len=1024, kv_len=3072, chunk_offset=1536),
    BackwardCase("one-document-T4096", layout="one_document", batch=1, q_len=4096,
                 kv_len=4096),
    BackwardCase("float16", dtype="float16"),
    BackwardCase("float16-d64-padded", dtype="float16", head_dim=64, layout="padded"),
    BackwardCase("large-logits-x50", layout="padded", scale_mult=50.0),
    BackwardCase("one-consumer-64x64", layout="padded",
                 dq_tile=TileConfig(64, 64, num_stages=2),
                 dkdv_tile=TileConfig(64, 64, num_stages=2)),
    BackwardCase("one-stage-gqa-8:2", layout="with_empty_row", heads=8, kv_heads=2,
                 dq_tile=TileConfig(128, 64, num_stages=1),
                 dkdv_tile=TileConfig(128, 64, num_stages=1)),
    BackwardCase("three-stages-d64", head_dim=64, layout="padded",
                 dq_tile=TileConfig(128, 128, num_stages=3),
                 dkdv_tile=TileConfig(128, 64, num_stages=3)),
    BackwardCase("dkdv-64x128-d64", head_dim=64, layout="padded", heads=8, kv_heads=2,
                 dq_tile=TileConfig(64, 128, num_stages=2),
                 dkdv_tile=TileConfig(64, 128, num_stages=2)),
    BackwardCase("packed-d256", head_dim=256, dq_tile=WIDE, dkdv_tile=WIDE),
    BackwardCase("padded-gqa-4:1-d256", layout="padded", heads=4, kv_heads=1,
                 head_dim=256, dq_tile=WIDE, dkdv_tile=WIDE),
    BackwardCase("window-100-bidirectional-float16-d256", window=100, causal=False,
                 dtype="float16", head_dim=256, dq_tile=WIDE, dkdv_tile=WIDE),
    BackwardCase("one-stage-d256", layout="with_empty_row", head_dim=256,
                 dq_tile=TileConfig(64, 64, num_stages=1),
                 dkdv_tile=TileConfig(64, 64, num_stages=1)),
    # jpack's dQ tile at head_dim 256 (32 keys), with the dK/dV tile of the grid.
    BackwardCase("packed-d256-dq-128x32", head_dim=256, dq_tile=WIDE_DQ, dkdv_tile=WIDE),
    BackwardCase("empty-row-gqa-8:2-window-100-float16-d256-dq-128x32",
                 layout="with_empty_row", heads=8, kv_heads=2, window=100, causal=False,
                 dtype="float16", head_dim=256, dq_tile=WIDE_DQ, dkdv_tile=WIDE),
    BackwardCase("padded-d64-dq-128x32-three-stages", layout="padded", head_dim=64,
                 dq_tile=TileConfig(128, 32, num_stages=3), dkdv_tile=WIDE),
]
BY_NAME = {c.name: c for c in GPU_CASES}


def _schedules(case):
  """The backward schedules a case runs: the grid; the persistent one where it fits
  shared memory (and dQ's tile is not of 32 keys); the split one where both tiles
  are its 64 x 64."""
  q = jax.ShapeDtypeStruct((1, case.q_len, 1, case.head_dim), jnp.dtype(case.dtype))
  fits = (mosaic_backward.persistent_fits(case.dq_tile, q)
          and mosaic_backward.persistent_fits(case.dkdv_tile, q)
          and case.dq_tile.block_minor >= 64)  # 32-key dQ tiles: the grid only
  splits = mosaic_backward.splits(case.dq_tile) and mosaic_backward.splits(case.dkdv_tile)
  return ("grid",) + ("persistent",) * fits + ("split",) * splits


gpu_cases = pytest.mark.parametrize(
    "case, schedule", [(c, s) for c in GPU_CASES for s in _schedules(c)],
    ids=lambda x: x.name if isinstance(x, BackwardCase) else x)


def _reference_and_residuals(q, k, v, do, dlse, layout: Layout, *, causal, window,
                             scale):
  """(want dict of float32 dq, dk, dv; lse; delta) from the float32 reference.

  The vjp takes both cotangents (do, dlse); delta = rowsum(out * do) - dlse,
  as jpack.attention hands it to the kernels.
  """
  f32 = lambda x: x.astype(jnp.float32)

  def f(q, k, v):
    return reference_attention(q, k, v, **layout.kwargs(), causal=causal,
                               sliding_window=window, scale=scale,
                               return_residuals=True)

  (out, lse), vjp = jax.vjp(f, f32(q), f32(k), f32(v))
  dq, dk, dv = vjp((f32(do), dlse))
  delta = jnp.einsum("bqhd,bqhd->bhq", out, f32(do)) - dlse
  return dict(dq=dq, dk=dk, dv=dv), lse, delta


def _run(layout: Layout, seed, *, heads, kv_heads, head_dim, dtype, causal, window,
         scale, dq_tile, dkdv_tile, schedule=None, num_ctas=None):
  """(got, want): dicts of float32 numpy dq [B, Tq, H, D], dk, dv [B, Tk, Hkv, D]."""
  q_len, kv_len = layout.q_segment_ids.shape[1], layout.kv_segment_ids.shape[1]
  q, k, v, do, dlse = random_inputs(
      seed, batch=layout.q_segment_ids.shape[0], q_len=q_len, kv_len=kv_len,
      heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=jnp.dtype(dtype))
  want, lse, delta = _reference_and_residuals(q, k, v, do, dlse, layout, causal=causal,
                                              window=window, scale=scale)
  dq, dk, dv = mosaic_backward_grads(q, k, v, do, lse, delta, *layout.arrays(),
                                     causal=causal, window=window, scale=scale,
                                     dq_tile=dq_tile, dkdv_tile=dkdv_tile,
                                     schedule=schedule, num_ctas=num_ctas)
  as_np = lambda d: {n: np.asarray(x.astype(jnp.float32)) for n, x in d.items()}
  return as_np(dict(dq=dq, dk=dk, dv=dv)), as_np(want)


@functools.lru_cache(maxsize=None)
def run_case(name, schedule, num_ctas=None):
  """(got, want, layout) of one fixed case (fresh seed per case name)."""
  case = BY_NAME[name]
  layout = case.make_layout()
  got, want = _run(layout, zlib.crc32(name.encode()) & 0x7FFFFFFF, heads=case.heads,
                   kv_heads=case.kv_heads, head_dim=case.head_dim, dtype=case.dtype,
                   causal=case.causal, window=case.window,
                   scale=case.scale or 1.0 / np.sqrt(case.head_dim),
                   dq_tile=case.dq_tile, dkdv_tile=case.dkdv_tile, schedule=schedule,
                   num_ctas=num_ctas)
  return got, want, layout


def _blind_queries(layout, causal, window):
  """bool [B, Tq]: queries that may attend to nothing."""
  return ~allowed_np(layout, causal=causal, sliding_window=window).any(axis=2)


def _unseen_keys(layout, causal, window):
  """bool [B, Tk]: keys that no query may attend to."""
  return ~allowed_np(layout, causal=causal, sliding_window=window).any(axis=1)


def _check_zeros(got, layout, causal, window):
  blind = _blind_queries(layout, causal, window)
  assert np.all(got["dq"][blind] == 0.0), "dq of queries that see nothing"
  unseen = _unseen_keys(layout, causal, window)
  for name in ("dk", "dv"):
    assert np.all(got[name][unseen] == 0.0), f"{name} of keys no query sees"


@pytest.mark.gpu
@gpu_cases
@pytest.mark.parametrize("grad", ["dq", "dk", "dv"])
def test_gradient_matches_reference(case, schedule, grad):
  got, want, _ = run_case(case.name, schedule)
  assert_close(grad, got[grad], want[grad], TOL)


@pytest.mark.gpu
@gpu_cases
def test_nothing_is_nan_or_inf(case, schedule):
  got, _, _ = run_case(case.name, schedule)
  for name, x in got.items():
    assert_finite(name, x)


@pytest.mark.gpu
@gpu_cases
def test_queries_that_see_nothing_get_zero_dq(case, schedule):
  got, _, layout = run_case(case.name, schedule)
  blind = _blind_queries(layout, case.causal, case.window)
  assert np.all(got["dq"][blind] == 0.0)


@pytest.mark.gpu
@gpu_cases
def test_keys_no_query_sees_get_zero_dk_dv(case, schedule):
  got, _, layout = run_case(case.name, schedule)
  unseen = _unseen_keys(layout, case.causal, case.window)
  assert np.all(got["dk"][unseen] == 0.0)
  assert np.all(got["dv"][unseen] == 0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("num_ctas", [1, 3, 1000])
@pytest.mark.parametrize("name", ["empty-row-d128", "gqa-8:2-padded-d128",
                                  "one-document-T4096"])
def test_persistent_with_any_number_of_ctas_matches_reference(name, num_ctas):
  # 1 CTA walks every item; 3 interleave unevenly; 1000 leaves most CTAs idle.
  got, want, layout = run_case(name, "persistent", num_ctas)
  case = BY_NAME[name]
  for grad in ("dq", "dk", "dv"):
    assert_finite(grad, got[grad])
    assert_close(grad, got[grad], want[grad], TOL)
  _check_zeros(got, layout, case.causal, case.window)


@functools.partial(jax.jit, static_argnames=("causal", "window", "scale", "tile",
                                             "schedule"))
def _dq_and_delta(q, k, v, do, lse, out, dlse, q_seg, kv_seg, q_pos, kv_pos, *, causal,
                  window, scale, tile, schedule):
  plan = masks.make_tile_plan(q_seg, kv_seg, q_pos, kv_pos, block_q=tile.block_major,
                              block_k=tile.block_minor, causal=causal, sliding_window=window)
  return mosaic_backward.backward_dq_and_delta(
      q, k, v, do, lse, out, dlse, q_seg, kv_seg, q_pos, kv_pos, plan.q_ranges, tile=tile,
      scale=scale, causal=causal, sliding_window=window, schedule=schedule,
      q_compares=plan.q_compares)


DQ_AND_DELTA_CASES = [(name, schedule) for name in (
    "packed-d128", "empty-row-d128", "gqa-8:2-d64", "one-consumer-64x64", "one-stage-gqa-8:2",
    "float16", "chunk-q1024-kv3072", "three-stages-d64", "packed-d256",
    "packed-d256-dq-128x32")
    for schedule in _schedules(BY_NAME[name])]


@pytest.mark.gpu
@pytest.mark.parametrize("name, schedule", DQ_AND_DELTA_CASES,
                         ids=[f"{n}-{s}" for n, s in DQ_AND_DELTA_CASES])
def test_dq_and_delta_match_reference(name, schedule):
  # delta = rowsum(out * do) - dlse from out and dlse: computed inside the
  # persistent dQ kernel, or before the grid one.
  case = BY_NAME[name]
  layout = case.make_layout()
  q_len, kv_len = layout.q_segment_ids.shape[1], layout.kv_segment_ids.shape[1]
  q, k, v, do, dlse = random_inputs(
      (zlib.crc32(name.encode()) + 7) & 0x7FFFFFFF, batch=layout.q_segment_ids.shape[0],
      q_len=q_len, kv_len=kv_len, heads=case.heads, kv_heads=case.kv_heads,
      head_dim=case.head_dim, dtype=jnp.dtype(case.dtype))
  scale = 1.0 / np.sqrt(case.head_dim)
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  (out, lse), vjp = jax.vjp(lambda q, k, v: reference_attention(
      q, k, v, **layout.kwargs(), causal=case.causal, scale=scale, return_residuals=True),
      f32(q), f32(k), f32(v))
  want_dq = vjp((f32(do), dlse))[0]
  out = out.astype(q.dtype)
  dq, delta = _dq_and_delta(q, k, v, do, lse, out, dlse, *layout.arrays(),
                            causal=case.causal, window=case.window, scale=scale,
                            tile=case.dq_tile, schedule=schedule)
  assert_finite("dq", np.asarray(f32(dq)))
  assert_finite("delta", np.asarray(delta))
  assert_close("dq", np.asarray(f32(dq)), np.asarray(want_dq), TOL)
  seen = ~_blind_queries(layout, case.causal, case.window)  # [B, Tq]
  want_delta = np.asarray(jnp.einsum("bqhd,bqhd->bhq", f32(out), f32(do)) - dlse)
  got_delta = np.asarray(delta)
  seen = np.broadcast_to(seen[:, None, :], got_delta.shape)
  assert_close("delta", got_delta[seen], want_delta[seen], 1e-5)


# Hypothesis layouts at one small shape: the kernels compile once per option set.
B, T = 2, 256
SEEDS = st.integers(0, 2**31 - 1)
SMALL = dict(heads=4, kv_heads=2, head_dim=64, dtype="bfloat16",
             dq_tile=TileConfig(64, 64, num_stages=2),
             dkdv_tile=TileConfig(64, 64, num_stages=2))


def _check_layout(layout: Layout, seed, *, causal, window=None, schedule=None):
  got, want = _run(layout, seed, causal=causal, window=window,
                   scale=1.0 / np.sqrt(SMALL["head_dim"]), schedule=schedule, **SMALL)
  for name in ("dq", "dk", "dv"):
    assert_finite(name, got[name])
    assert_close(name, got[name], want[name], TOL)
  _check_zeros(got, layout, causal, window)


@pytest.mark.gpu
@pytest.mark.parametrize("schedule", mosaic_backward.SCHEDULES)
@pytest.mark.parametrize("causal", [True, False])
@settings(max_examples=15)
@given(layout=self_layouts(B, T, ALL_KINDS) | self_layouts(B, T, positions="custom"),
       seed=SEEDS)
def test_self_attention_layouts_match_reference(causal, schedule, layout, seed):
  _check_layout(layout, seed, causal=causal, schedule=schedule)


@pytest.mark.gpu
@settings(max_examples=15)
@given(layout=chunk_layouts(B, 128, 256), seed=SEEDS)
def test_chunk_layouts_with_window_match_reference(layout, seed):
  _check_layout(layout, seed, causal=True, window=64)
