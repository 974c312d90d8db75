"""One-shot GPU check of the Mosaic GPU forward kernel: correctness, then timing.

    PYTHONPATH=. python experiments/mosaic_check.py             # forward, on an H100
    PYTHONPATH=. python experiments/mosaic_check.py --only bwd  # backward

1. Correctness: `pallas_kernels.mosaic_attention.forward` against the float32
   reference (`jpack.attention.reference_attention`) on small layouts: bf16 and
   fp16, D = 64 and 128, causal and not, a sliding window, padding rows and an
   all-padding row, GQA, a q chunk against a longer kv row, several tilings.
   Per case: rel errors of out and lse (rows that see something), NaN/inf
   counts, whether rows that see nothing have out exactly 0 and lse EMPTY_LSE.
   Unprefixed cases run the "serial" schedule; cases named "<schedule>:<case>"
   run another one of mosaic_attention.SCHEDULES;
   "persistent@<n>:<case>" runs the persistent kernel on n CTAs (1 and 3: many
   items per CTA; 1000: more CTAs than items).
2. Timing on the main shape (B=4, T=8192, H=16, D=128, bf16, causal, lognormal
   packed documents as in experiments/bench_attention.py): the Triton forward
   (flash_attention(implementation="pallas")) and the Mosaic forward for every
   schedule x tiling (128x128 2 stages, 128x64 2 and 3 stages; serial 64x64
   too), both jitted with their tile plan inside, median of samples of 10
   back-to-back calls (experiments/timing.py); plus the Mosaic output against
   Triton's on the whole main shape and against the reference on one row, 2 heads.
   `--only time` runs this part alone (about 10 kernels to compile).

3. Backward (`--only bwd`, or `bwd-correct` / `bwd-time` for one half):
   `pallas_kernels.mosaic_backward.backward_dq` and `backward_dkdv` against
   jax.vjp of the float32 reference (with an lse cotangent) on small layouts
   like 1.; per case: rel errors of dq, dk, dv, NaN/inf counts, whether
   queries that see nothing get dq exactly 0 and unseen keys dk = dv = 0.
   Then on the main shape: the Triton backward (segment_attention.backward_dq
   and backward_dkdv, default KernelConfig) and the Mosaic backward for a few
   tilings, dq and dk/dv kernels timed separately (each with its tile plan,
   lse and delta given), Mosaic grads against Triton's on the whole shape and
   against the reference on one row, 2 heads.
   The fused backward (`pallas_kernels.mosaic_fused_backward.backward_fused`:
   dQ, dK, dV in one kernel) runs in the same two parts: correctness cases
   named "fused-..." (the same comparisons, plus each grad against the
   two-kernel Mosaic backward on the same inputs) and timed entries
   "mosaic-fused-bwd-<tiling>" (plan, kernel and the dq cast in one jitted
   call: fused_ms = bwd_ms). To compare the three backwards:
       python experiments/mosaic_check.py --only bwd --cases \
           fused-packed-d128,bwd-packed-d128,triton-bwd,mosaic-bwd-default,mosaic-fused-bwd-default

Without --only, 1. and 2. run (as before); each part runs on its own within
the total budget, so run the backward as its own command.

Every case runs in a worker subprocess that prints one JSON line per result, so
an exception is a result and a hung kernel (a barrier that never completes)
costs one timeout, not the run: the parent kills the worker and starts a new
one at the next case. Writes $OUT/mosaic_check.json when OUT is set, and prints
a summary. No internet, no grain needed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import functools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

CASE_TIMEOUT_S = 150  # compile + run of one case; longer means a hang
TOTAL_BUDGET_S = 540  # stay under a 600 s command limit

# name: (layout, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype, causal,
#        window, chunk_offset, tile (block_q, block_k, stages) or None = default)
CORRECTNESS_CASES = {
    "packed-d128": ("packed", 2, 1024, 1024, 4, 4, 128, "bfloat16", True, None, None, None),
    "packed-d64": ("packed", 2, 1024, 1024, 4, 4, 64, "bfloat16", True, None, None, None),
    "padded-d128": ("padded", 2, 1024, 1024, 4, 4, 128, "bfloat16", True, None, None, None),
    "empty-row-d64": ("empty_row", 2, 1024, 1024, 2, 2, 64, "bfloat16", True, None, None,
                      None),
    "float16-d128": ("padded", 2, 1024, 1024, 4, 4, 128, "float16", True, None, None, None),
    "float16-d64": ("packed", 2, 1024, 1024, 4, 4, 64, "float16", True, None, None, None),
    "bidirectional": ("padded", 2, 1024, 1024, 4, 4, 128, "bfloat16", False, None, None,
                      None),
    "gqa-8:2-d64": ("padded", 2, 1024, 1024, 8, 2, 64, "bfloat16", True, None, None, None),
    "gqa-4:1-d128": ("packed", 2, 1024, 1024, 4, 1, 128, "bfloat16", True, None, None, None),
    "window-100": ("padded", 2, 1024, 1024, 4, 4, 64, "bfloat16", True, 100, None, None),
    "window-100-bidir": ("packed", 2, 1024, 1024, 4, 4, 128, "bfloat16", False, 100, None,
                         None),
    "repeated-ids": ("repeated", 2, 512, 512, 2, 2, 64, "bfloat16", True, None, None, None),
    "chunk-q512-kv1536": ("padded", 2, 512, 1536, 4, 4, 128, "bfloat16", True, None, 768,
                          None),
    "tile-64x64-s2": ("padded", 2, 1024, 1024, 4, 4, 128, "bfloat16", True, None, None,
                      (64, 64, 2)),
    "tile-128x64-s3": ("padded", 2, 1024, 1024, 4, 4, 128, "bfloat16", True, None, None,
                       (128, 64, 3)),
    "tile-128x64-s1": ("padded", 2, 1024, 1024, 4, 4, 64, "bfloat16", True, None, None,
                       (128, 64, 1)),
    "tile-64x128-s2": ("packed", 2, 1024, 1024, 4, 4, 64, "bfloat16", False, None, None,
                       (64, 128, 2)),
}
# The new schedules on a few of those cases (both consumer counts, one stage,
# an empty row, a q chunk, a window, float16): name "<schedule>:<case>".
SCHEDULES = ("serial", "pipelined", "pingpong", "persistent",
             "persistent-pingpong")  # mosaic_attention's
SCHEDULED_CASES = ("packed-d128", "empty-row-d64", "chunk-q512-kv1536", "tile-128x64-s1",
                   "tile-64x64-s2", "window-100-bidir", "float16-d64")

def _stages_ok(schedule, case):
  """persistent-pingpong refuses one stage with two consumers (a ValueError)."""
  return not (schedule == "persistent-pingpong" and case == "tile-128x64-s1")


for _schedule in SCHEDULES[1:]:
  for _case in SCHEDULED_CASES + ("tile-128x64-s3",):
    if _stages_ok(_schedule, _case):
      CORRECTNESS_CASES[f"{_schedule}:{_case}"] = CORRECTNESS_CASES[_case]
# The persistent kernels on 1 or 3 CTAs (many items per CTA) and on more CTAs than items.
for _schedule in SCHEDULES[3:]:
  for _ctas, _case in [(1, "empty-row-d64"), (3, "packed-d128"), (3, "tile-64x64-s2"),
                       (3, "chunk-q512-kv1536"), (1000, "tile-128x64-s1"),
                       (1000, "tile-128x64-s3")]:
    if _stages_ok(_schedule, _case):
      CORRECTNESS_CASES[f"{_schedule}@{_ctas}:{_case}"] = CORRECTNESS_CASES[_case]
TOL = 2e-2

# Backward cases: as CORRECTNESS_CASES, the last field being the tilings
# ((dq block_q, block_k, stages), (dkdv block_k, block_q, stages)) or None.
_DQ64, _KV64 = (64, 64, 2), (64, 64, 2)
BWD_CORRECTNESS_CASES = {
    "bwd-packed-d128": ("packed", 2, 1024, 1024, 4, 4, 128, "bfloat16", True, None, None,
                        None),
    "bwd-packed-d64": ("packed", 2, 1024, 1024, 4, 4, 64, "bfloat16", True, None, None,
                       None),
    "bwd-padded-d128": ("padded", 2, 1024, 1024, 4, 4, 128, "bfloat16", True, None, None,
                        None),
    "bwd-empty-row-d64": ("empty_row", 2, 1024, 1024, 2, 2, 64, "bfloat16", True, None,
                          None, None),
    "bwd-float16-d128": ("padded", 2, 1024, 1024, 4, 4, 128, "float16", True, None, None,
                         None),
    "bwd-bidirectional": ("padded", 2, 1024, 1024, 4, 4, 128, "bfloat16", False, None,
                          None, None),
    "bwd-gqa-8:2-d64": ("padded", 2, 1024, 1024, 8, 2, 64, "bfloat16", True, None, None,
                        None),
    "bwd-gqa-8:2-d128": ("packed", 2, 1024, 1024, 8, 2, 128, "bfloat16", True, None, None,
                         None),
    "bwd-window-100": ("padded", 2, 1024, 1024, 4, 4, 64, "bfloat16", True, 100, None,
                       None),
    "bwd-window-100-bidir": ("packed", 2, 1024, 1024, 4, 4, 128, "bfloat16", False, 100,
                             None, None),
    "bwd-repeated-ids": ("repeated", 2, 512, 512, 2, 2, 64, "bfloat16", True, None, None,
                         None),
    "bwd-chunk-q512-kv1536": ("padded", 2, 512, 1536, 4, 4, 128, "bfloat16", True, None,
                              768, None),
    "bwd-tile-64x64": ("padded", 2, 1024, 1024, 4, 2, 128, "bfloat16", True, None, None,
                       (_DQ64, _KV64)),
    "bwd-tile-s1": ("padded", 2, 1024, 1024, 4, 4, 128, "bfloat16", True, None, None,
                    ((128, 64, 1), (128, 64, 1))),
    "bwd-tile-s3-d64": ("packed", 2, 1024, 1024, 4, 4, 64, "bfloat16", False, None, None,
                        ((128, 128, 3), (128, 64, 3))),
}
# The fused backward (mosaic_fused_backward: dQ, dK, dV in one kernel), named
# "fused-...": the last field is its tile (block_major, block_minor, stages) or
# None (DEFAULT_FUSED_TILE). Same comparisons as the bwd cases, plus each grad
# against the two-kernel Mosaic backward (default tiles) on the same inputs.
FUSED_BWD_CORRECTNESS_CASES = {
    "fused-packed-d128": ("packed", 2, 1024, 1024, 4, 4, 128, "bfloat16", True, None, None,
                          None),
    "fused-packed-d64": ("packed", 2, 1024, 1024, 4, 4, 64, "bfloat16", True, None, None,
                         None),
    "fused-empty-row-d64": ("empty_row", 2, 1024, 1024, 2, 2, 64, "bfloat16", True, None,
                            None, None),
    "fused-float16-d128": ("padded", 2, 1024, 1024, 4, 4, 128, "float16", True, None, None,
                           None),
    "fused-bidirectional": ("padded", 2, 1024, 1024, 4, 4, 128, "bfloat16", False, None,
                            None, None),
    "fused-gqa-8:2-d64": ("padded", 2, 1024, 1024, 8, 2, 64, "bfloat16", True, None, None,
                          None),
    "fused-gqa-4:1-d128": ("packed", 2, 1024, 1024, 4, 1, 128, "bfloat16", True, None, None,
                           None),
    "fused-window-100-bidir": ("packed", 2, 1024, 1024, 4, 4, 128, "bfloat16", False, 100,
                               None, None),
    "fused-repeated-ids": ("repeated", 2, 512, 512, 2, 2, 64, "bfloat16", True, None, None,
                           None),
    "fused-chunk-q512-kv1536": ("padded", 2, 512, 1536, 4, 4, 128, "bfloat16", True, None,
                                768, None),
    "fused-tile-64x64": ("padded", 2, 1024, 1024, 4, 2, 128, "bfloat16", True, None, None,
                         (64, 64, 2)),
    "fused-tile-s1": ("padded", 2, 1024, 1024, 4, 4, 128, "bfloat16", True, None, None,
                      (128, 64, 1)),
    "fused-tile-128x128-d64": ("packed", 2, 1024, 1024, 4, 4, 64, "bfloat16", False, None,
                               None, (128, 128, 2)),
}
BWD_CORRECTNESS_CASES.update(FUSED_BWD_CORRECTNESS_CASES)
BWD_TIMED_TILES = {f"mosaic-bwd-{name}": tiles for name, tiles in [
    ("default", None),
    ("dq128x128", ((128, 128, 2), (128, 64, 2))),
    ("s3", ((128, 64, 3), (128, 64, 3))),
    ("64x64", (_DQ64, _KV64)),
]}
# The fused kernel on the main shape (plan, kernel and the dq cast, one jitted call).
FUSED_BWD_TIMED_TILES = {f"mosaic-fused-bwd-{name}": tile for name, tile in [
    ("default", None),
    ("64x64", (64, 64, 2)),
    ("s1", (128, 64, 1)),
]}

MAIN = dict(batch=4, seq_len=8192, heads=16, head_dim=128, seed=0, mean_len=1024.0)
# name -> (block_q, block_k, stages, schedule), tiling-major so that a run cut
# short still compares the schedules; the serial names are as before.
TIMED_TILES = {
    (f"mosaic-{bq}x{bk}-s{s}" if sched == "serial" else f"mosaic-{sched}-{bq}x{bk}-s{s}"):
    (bq, bk, s, sched)
    for bq, bk, s in [(128, 128, 2), (128, 64, 2), (128, 64, 3)]
    for sched in ("serial", "persistent", "pingpong", "pipelined", "persistent-pingpong")
}
TIMED_TILES["mosaic-64x64-s2"] = (64, 64, 2, "serial")
# The persistent schedule's window (mosaic_persistent.WINDOW_ROUNDS; "all": one
# global sort by work, the first version): name -> window_rounds.
PERSISTENT_WINDOWS = {"w1": 1, "w4": 4, "all": None}
for _w in PERSISTENT_WINDOWS:
  for _schedule in SCHEDULES[3:]:
    TIMED_TILES[f"mosaic-{_schedule}-{_w}-128x128-s2"] = (128, 128, 2, f"{_schedule}:{_w}")
# The plan alone (masks.make_tile_plan at 128x128), which every timed call includes,
# and a few kernels timed with the plan made beforehand (name + NO_PLAN).
PLAN_CASE = "plan-128x128"
NO_PLAN = "+noplan"
for _name in ("mosaic-128x128-s2", "mosaic-pingpong-128x128-s2",
              "mosaic-persistent-pingpong-w1-128x128-s2"):
  TIMED_TILES[_name + NO_PLAN] = TIMED_TILES[_name]
TARGET_FWD_MS = 0.45



def schedule_of_case(name):
  """(schedule, num_ctas or None) of a CORRECTNESS_CASES name "[<schedule>[@<n>]:]<case>"."""
  prefix, _, ctas = name.split(":")[0].partition("@")
  schedule = prefix if prefix in SCHEDULES else "serial"
  return schedule, int(ctas) if ctas else None


# ----------------------------------------------------------------------------
# Worker side (imports JAX)


def _segment_ids(kind, batch, length, seed):
  """int32 [batch, length] ids: packed lognormal documents, with padding variants."""
  import numpy as np

  from experiments.layouts import packed_segment_ids

  rng = np.random.default_rng(seed)
  if kind == "repeated":  # non-contiguous documents, padding scattered in between
    return rng.integers(0, 4, size=(batch, length)).astype(np.int32)
  ids = packed_segment_ids(batch, length, seed=seed, mean_len=max(16, length // 6))
  if kind in ("padded", "empty_row"):
    for row in ids:
      row[length - length // 5:] = 0  # padding at the end
      gap = int(rng.integers(0, length // 2))
      row[gap:gap + length // 10] = 0  # and a gap in the middle
    if kind == "empty_row":
      ids[0] = 0
  return ids


def _rel_err(a, b):
  import numpy as np
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  den = np.linalg.norm(b.ravel())
  num = np.linalg.norm((a - b).ravel())
  return float(num / den) if den > 0 else float(num)


def _mosaic_fn(causal, window, scale, tile, schedule="serial", num_ctas=None):
  """jitted (q, k, v, q_seg, kv_seg, q_pos, kv_pos, plan=None) -> (out, lse).

  The plan (masks.TilePlan) is made inside unless given.

  The persistent schedules' work items (mosaic_persistent.work_items) are
  made inside too, from the plan.
  """
  import jax

  from jpack import masks
  from pallas_kernels import mosaic_attention

  @jax.jit
  def run(q, k, v, q_seg, kv_seg, q_pos, kv_pos, plan=None):
    if plan is None:
      plan = masks.make_tile_plan(q_seg, kv_seg, q_pos, kv_pos, block_q=tile.block_major,
                                  block_k=tile.block_minor, causal=causal,
                                  sliding_window=window)
    return mosaic_attention.forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, plan.q_ranges,
                                    tile=tile, scale=scale, causal=causal,
                                    sliding_window=window, schedule=schedule,
                                    num_ctas=num_ctas)

  return run


def _tile(spec):
  from pallas_kernels import mosaic_attention
  from pallas_kernels.config import TileConfig
  return mosaic_attention.DEFAULT_TILE if spec is None else TileConfig(
      spec[0], spec[1], num_stages=spec[2])


def run_correctness_case(name):
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jpack.attention import EMPTY_LSE, reference_attention
  from jpack.masks import allowed_mask

  (kind, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype, causal, window, off,
   tile_spec) = CORRECTNESS_CASES[name]
  schedule, num_ctas = schedule_of_case(name)
  tile = _tile(tile_spec)
  kv_seg = _segment_ids(kind, batch, kv_len, seed=7)
  kv_pos = np.broadcast_to(np.arange(kv_len, dtype=np.int32), (batch, kv_len))
  off = off or 0
  q_seg, q_pos = kv_seg[:, off:off + q_len], kv_pos[:, off:off + q_len]
  ids = [jnp.asarray(np.ascontiguousarray(x), jnp.int32)
         for x in (q_seg, kv_seg, q_pos, kv_pos)]
  keys = jax.random.split(jax.random.key(len(name)), 3)
  dt = jnp.dtype(dtype)
  q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), jnp.float32).astype(dt)
  k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dt)
  v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dt)
  scale = 1.0 / np.sqrt(head_dim)
  t0 = time.perf_counter()
  out, lse = jax.block_until_ready(
      _mosaic_fn(causal, window, scale, tile, schedule, num_ctas)(q, k, v, *ids))
  seconds = time.perf_counter() - t0
  f32 = lambda x: x.astype(jnp.float32)
  want_out, want_lse = reference_attention(
      f32(q), f32(k), f32(v), q_segment_ids=ids[0], kv_segment_ids=ids[1],
      q_positions=ids[2], kv_positions=ids[3], causal=causal, sliding_window=window,
      scale=scale, return_residuals=True)
  out, lse = np.asarray(f32(out)), np.asarray(lse)
  want_out, want_lse = np.asarray(want_out), np.asarray(want_lse)
  seen_q = np.asarray(allowed_mask(*ids, causal=causal, sliding_window=window)).any(axis=2)
  seen = np.broadcast_to(seen_q[:, None, :], lse.shape)
  out_err = _rel_err(out, want_out)
  lse_err = _rel_err(lse[seen], want_lse[seen])
  result = dict(
      tile=list((tile.block_major, tile.block_minor, tile.num_stages)), schedule=schedule,
      num_ctas=num_ctas,
      first_call_s=round(seconds, 2),
      out_err=out_err, lse_err=lse_err,
      nonfinite=int((~np.isfinite(out)).sum() + (~np.isfinite(lse)).sum()),
      blind_rows=int((~seen_q).sum()),
      blind_out_exact_zero=bool(np.all(out[~seen_q] == 0.0)),
      blind_lse_is_empty=bool(np.all(lse[~seen] == np.float32(EMPTY_LSE))),
  )
  result["ok"] = bool(out_err <= TOL and lse_err <= TOL and result["nonfinite"] == 0
                      and result["blind_out_exact_zero"] and result["blind_lse_is_empty"])
  return result


@functools.lru_cache(maxsize=None)
def _main_inputs():
  """(q, k, v, seg, pos, useful forward FLOPs) of the main shape, made once per worker."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from experiments.layouts import causal_doc_flops, packed_segment_ids

  b, t, h, d = MAIN["batch"], MAIN["seq_len"], MAIN["heads"], MAIN["head_dim"]
  seg = packed_segment_ids(b, t, seed=MAIN["seed"], mean_len=MAIN["mean_len"])
  kq, kk, kv = jax.random.split(jax.random.key(MAIN["seed"]), 3)
  bf16 = jnp.bfloat16
  q = jax.random.normal(kq, (b, t, h, d), bf16)
  k = jax.random.normal(kk, (b, t, h, d), bf16)
  v = jax.random.normal(kv, (b, t, h, d), bf16)
  seg = jnp.asarray(seg, jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return q, k, v, seg, pos, causal_doc_flops(np.asarray(seg), h, d)


@functools.lru_cache(maxsize=None)
def _triton_forward(scale):
  """jitted (q, k, v, seg) -> out: the public Pallas (Triton) path."""
  import jax

  from jpack.attention import flash_attention
  return jax.jit(lambda q, k, v, seg: flash_attention(
      q, k, v, segment_ids=seg, causal=True, scale=scale, implementation="pallas"))


@functools.lru_cache(maxsize=None)
def _triton_main_out(scale):
  """float32 numpy out of the Triton forward on the main shape, computed once per worker."""
  import jax.numpy as jnp
  import numpy as np

  q, k, v, seg, _, _ = _main_inputs()
  return np.asarray(_triton_forward(scale)(q, k, v, seg).astype(jnp.float32))


@contextlib.contextmanager
def _persistent_window(window_rounds):
  """mosaic_persistent.WINDOW_ROUNDS = window_rounds while tracing ("default": unchanged)."""
  from pallas_kernels import mosaic_persistent
  default = mosaic_persistent.WINDOW_ROUNDS
  if window_rounds != "default":
    mosaic_persistent.WINDOW_ROUNDS = window_rounds
  try:
    yield
  finally:
    mosaic_persistent.WINDOW_ROUNDS = default


def run_timing_case(name):
  """name: "triton", PLAN_CASE or a key of TIMED_TILES."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from experiments import timing
  from jpack.attention import reference_attention

  q, k, v, seg, pos, flops = _main_inputs()
  scale = 1.0 / np.sqrt(q.shape[-1])
  result = {}
  if name == "triton":
    fn, args = _triton_forward(scale), (q, k, v, seg)
  elif name == PLAN_CASE:
    from jpack import masks
    plan = jax.jit(lambda seg, pos: masks.make_tile_plan(
        seg, seg, pos, pos, block_q=128, block_k=128, causal=True,
        sliding_window=None).q_ranges)
    return dict(plan_ms=timing.median_ms(plan, seg, pos, warmup=3, reps=20))
  else:
    *spec, schedule = TIMED_TILES[name]
    result.update(tile=spec, schedule=schedule)
    window = "default"
    if ":" in schedule:  # a window variant of a persistent schedule
      schedule, variant = schedule.split(":")
      window = PERSISTENT_WINDOWS[variant]
    tile = _tile(spec)
    mosaic = _mosaic_fn(True, None, scale, tile, schedule)
    plan = None  # made inside each call, as flash_attention does
    if name.endswith(NO_PLAN):
      from jpack import masks
      plan = masks.make_tile_plan(seg, seg, pos, pos, block_q=tile.block_major,
                                  block_k=tile.block_minor, causal=True,
                                  sliding_window=None)
    fn = jax.jit(lambda q, k, v, seg, pos: mosaic(q, k, v, seg, seg, pos, pos, plan)[0])
    args = (q, k, v, seg, pos)
    with _persistent_window(window):
      out = np.asarray(fn(*args).astype(jnp.float32))  # traced (and compiled) here
    result["nonfinite"] = int((~np.isfinite(out)).sum())
    # Against the float32 reference on one row and two heads (dense logits fit).
    f32 = lambda x: x[:1, :, :2].astype(jnp.float32)
    want = reference_attention(f32(q), f32(k), f32(v), segment_ids=seg[:1], causal=True,
                               scale=scale)
    result["rel_err_vs_reference_row0_heads01"] = _rel_err(out[:1, :, :2], want)
    try:
      result["rel_err_vs_triton"] = _rel_err(out, _triton_main_out(scale))
    except Exception as exc:  # noqa: BLE001
      result["rel_err_vs_triton"] = f"triton failed: {type(exc).__name__}: {exc}"[:300]
  ms = timing.median_ms(fn, *args, warmup=3, reps=20)
  result.update(fwd_ms=ms, tflops=flops / (ms * 1e-3) / 1e12)
  return result


def _bwd_tiles(spec):
  """(dq tile, dkdv tile) of a BWD tiling spec (None = the defaults)."""
  from pallas_kernels import mosaic_backward
  from pallas_kernels.config import TileConfig
  if spec is None:
    return mosaic_backward.DEFAULT_DQ_TILE, mosaic_backward.DEFAULT_DKDV_TILE
  return tuple(TileConfig(a, b, num_stages=s) for a, b, s in spec)


@functools.lru_cache(maxsize=None)
def _bwd_fns(kernels, causal, window, scale, dq_tile, dkdv_tile):
  """jitted (dq_fn, dkdv_fn) of a kernel module (mosaic_backward or segment_attention).

  Both take (q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos) and make
  their tile plan inside.
  """
  import jax

  from jpack import masks

  def plan(q_seg, kv_seg, q_pos, kv_pos, block_q, block_k):
    return masks.make_tile_plan(q_seg, kv_seg, q_pos, kv_pos, block_q=block_q,
                                block_k=block_k, causal=causal, sliding_window=window)

  opts = dict(scale=scale, causal=causal, sliding_window=window)

  @jax.jit
  def dq_fn(q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos):
    ranges = plan(q_seg, kv_seg, q_pos, kv_pos, dq_tile.block_major,
                  dq_tile.block_minor).q_ranges
    return kernels.backward_dq(q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos,
                               ranges, tile=dq_tile, **opts)

  @jax.jit
  def dkdv_fn(q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos):
    ranges = plan(q_seg, kv_seg, q_pos, kv_pos, dkdv_tile.block_minor,
                  dkdv_tile.block_major).kv_ranges
    return kernels.backward_dkdv(q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos,
                                 ranges, tile=dkdv_tile, **opts)

  return dq_fn, dkdv_fn


def _fused_tile(spec):
  """The fused kernel's tile of a spec (block_major, block_minor, stages); None = default."""
  from pallas_kernels import mosaic_fused_backward
  from pallas_kernels.config import TileConfig
  if spec is None:
    return mosaic_fused_backward.DEFAULT_FUSED_TILE
  return TileConfig(spec[0], spec[1], num_stages=spec[2])


@functools.lru_cache(maxsize=None)
def _fused_fn(causal, window, scale, tile):
  """jitted (q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos) -> (dq, dk, dv).

  mosaic_fused_backward.backward_fused with its tile plan (the dK/dV plan)
  made inside; dq comes out in q.dtype (the float32 accumulator's cast included).
  """
  import jax

  from jpack import masks
  from pallas_kernels import mosaic_fused_backward

  @jax.jit
  def fused(q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos):
    ranges = masks.make_tile_plan(q_seg, kv_seg, q_pos, kv_pos, block_q=tile.block_minor,
                                  block_k=tile.block_major, causal=causal,
                                  sliding_window=window).kv_ranges
    return mosaic_fused_backward.backward_fused(
        q, k, v, do, lse, delta, q_seg, kv_seg, q_pos, kv_pos, ranges, tile=tile,
        scale=scale, causal=causal, sliding_window=window)

  return fused


def _reference_grads(q, k, v, do, dlse, ids, causal, window, scale):
  """(dict of float32 numpy dq, dk, dv; lse; delta) from jax.vjp of the float32 reference."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jpack.attention import reference_attention

  f32 = lambda x: x.astype(jnp.float32)

  def f(q, k, v):
    return reference_attention(q, k, v, q_segment_ids=ids[0], kv_segment_ids=ids[1],
                               q_positions=ids[2], kv_positions=ids[3], causal=causal,
                               sliding_window=window, scale=scale, return_residuals=True)

  (out, lse), vjp = jax.vjp(f, f32(q), f32(k), f32(v))
  dq, dk, dv = vjp((f32(do), dlse))
  delta = jnp.einsum("bqhd,bqhd->bhq", out, f32(do)) - dlse
  return {n: np.asarray(x) for n, x in dict(dq=dq, dk=dk, dv=dv).items()}, lse, delta


def run_bwd_correctness_case(name):
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jpack.masks import allowed_mask
  from pallas_kernels import mosaic_backward

  (kind, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype, causal, window, off,
   tiles_spec) = BWD_CORRECTNESS_CASES[name]
  fused = name in FUSED_BWD_CORRECTNESS_CASES
  tiles = (_fused_tile(tiles_spec),) if fused else _bwd_tiles(tiles_spec)
  kv_seg = _segment_ids(kind, batch, kv_len, seed=7)
  kv_pos = np.broadcast_to(np.arange(kv_len, dtype=np.int32), (batch, kv_len))
  off = off or 0
  q_seg, q_pos = kv_seg[:, off:off + q_len], kv_pos[:, off:off + q_len]
  ids = [jnp.asarray(np.ascontiguousarray(x), jnp.int32)
         for x in (q_seg, kv_seg, q_pos, kv_pos)]
  keys = jax.random.split(jax.random.key(len(name) + 1000), 5)
  dt = jnp.dtype(dtype)
  normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32)
  q = normal(keys[0], (batch, q_len, heads, head_dim)).astype(dt)
  k = normal(keys[1], (batch, kv_len, kv_heads, head_dim)).astype(dt)
  v = normal(keys[2], (batch, kv_len, kv_heads, head_dim)).astype(dt)
  do = normal(keys[3], (batch, q_len, heads, head_dim)).astype(dt)
  dlse = normal(keys[4], (batch, heads, q_len))
  scale = 1.0 / np.sqrt(head_dim)
  want, lse, delta = _reference_grads(q, k, v, do, dlse, ids, causal, window, scale)
  args = (q, k, v, do, lse, delta, *ids)
  as_np = lambda grads: {n: np.asarray(x.astype(jnp.float32))
                         for n, x in zip(("dq", "dk", "dv"), grads)}
  two_kernel_fns = _bwd_fns(mosaic_backward, causal, window, scale,
                            *(_bwd_tiles(None) if fused else tiles))
  t0 = time.perf_counter()
  if fused:
    dq, dk, dv = jax.block_until_ready(_fused_fn(causal, window, scale, tiles[0])(*args))
  else:
    dq = jax.block_until_ready(two_kernel_fns[0](*args))
    dk, dv = jax.block_until_ready(two_kernel_fns[1](*args))
  seconds = time.perf_counter() - t0
  got = as_np((dq, dk, dv))
  allowed = np.asarray(allowed_mask(*ids, causal=causal, sliding_window=window))
  blind_q, unseen_k = ~allowed.any(axis=2), ~allowed.any(axis=1)  # [B, Tq], [B, Tk]
  result = dict(
      tiles=[list((t.block_major, t.block_minor, t.num_stages)) for t in tiles],
      first_call_s=round(seconds, 2),
      **{f"{n}_err": _rel_err(got[n], want[n]) for n in ("dq", "dk", "dv")},
      nonfinite=int(sum((~np.isfinite(x)).sum() for x in got.values())),
      blind_rows=int(blind_q.sum()), unseen_keys=int(unseen_k.sum()),
      blind_dq_exact_zero=bool(np.all(got["dq"][blind_q] == 0.0)),
      unseen_dkdv_exact_zero=bool(np.all(got["dk"][unseen_k] == 0.0)
                                  and np.all(got["dv"][unseen_k] == 0.0)),
  )
  errs = [f"{n}_err" for n in ("dq", "dk", "dv")]
  if fused:  # and against the two-kernel Mosaic backward on the same inputs
    two = as_np((two_kernel_fns[0](*args), *two_kernel_fns[1](*args)))
    result.update({f"{n}_err_vs_two_kernel": _rel_err(got[n], two[n]) for n in two})
    errs += [f"{n}_err_vs_two_kernel" for n in two]
  result["ok"] = bool(all(result[e] <= TOL for e in errs)
                      and result["nonfinite"] == 0 and result["blind_dq_exact_zero"]
                      and result["unseen_dkdv_exact_zero"])
  return result


@functools.lru_cache(maxsize=None)
def _main_bwd_inputs():
  """(do, lse, delta) of the main shape: lse from the Triton forward, dlse = 0."""
  import jax
  import jax.numpy as jnp

  from jpack.attention import flash_attention

  q, k, v, seg, _, _ = _main_inputs()
  scale = 1.0 / (q.shape[-1] ** 0.5)
  do = jax.random.normal(jax.random.key(MAIN["seed"] + 1), q.shape, jnp.bfloat16)
  out, lse = jax.jit(lambda q, k, v, seg: flash_attention(
      q, k, v, segment_ids=seg, causal=True, scale=scale, implementation="pallas",
      return_residuals=True))(q, k, v, seg)
  delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), do.astype(jnp.float32))
  return do, lse, delta


@functools.lru_cache(maxsize=None)
def _triton_main_grads():
  """dict of float32 numpy dq, dk, dv of the Triton backward on the main shape."""
  import jax.numpy as jnp
  import numpy as np

  from pallas_kernels import segment_attention
  from pallas_kernels.config import KernelConfig

  q, k, v, seg, pos, _ = _main_inputs()
  do, lse, delta = _main_bwd_inputs()
  config = KernelConfig.for_head_dim(q.shape[-1])
  dq_fn, dkdv_fn = _bwd_fns(segment_attention, True, None, 1.0 / np.sqrt(q.shape[-1]),
                            config.dq, config.dkdv)
  args = (q, k, v, do, lse, delta, seg, seg, pos, pos)
  grads = (dq_fn(*args), *dkdv_fn(*args))
  return {n: np.asarray(x.astype(jnp.float32)) for n, x in zip(("dq", "dk", "dv"), grads)}


def run_bwd_timing_case(name):
  """name: "triton-bwd", a key of BWD_TIMED_TILES or of FUSED_BWD_TIMED_TILES.

  The kernels of one backward are timed one jitted call each (dq and dkdv for
  the two-kernel ones, fused for the fused one); bwd_ms is their sum.
  """
  import jax.numpy as jnp
  import numpy as np

  from experiments import timing
  from pallas_kernels import mosaic_backward, segment_attention
  from pallas_kernels.config import KernelConfig

  q, k, v, seg, pos, flops = _main_inputs()
  do, lse, delta = _main_bwd_inputs()
  scale = 1.0 / np.sqrt(q.shape[-1])
  args = (q, k, v, do, lse, delta, seg, seg, pos, pos)
  if name in FUSED_BWD_TIMED_TILES:
    tiles = (_fused_tile(FUSED_BWD_TIMED_TILES[name]),)
    calls = dict(fused=_fused_fn(True, None, scale, tiles[0]))
  else:
    if name == "triton-bwd":
      config = KernelConfig.for_head_dim(q.shape[-1])
      kernels, tiles = segment_attention, (config.dq, config.dkdv)
    else:
      kernels, tiles = mosaic_backward, _bwd_tiles(BWD_TIMED_TILES[name])
    calls = dict(zip(("dq", "dkdv"), _bwd_fns(kernels, True, None, scale, *tiles)))

  def grads(*a):
    """(dq, dk, dv) of the calls, in order."""
    out = []
    for call in calls.values():
      x = call(*a)
      out.extend(x if isinstance(x, tuple) else (x,))
    return out

  result = dict(tiles=[list((t.block_major, t.block_minor, t.num_stages)) for t in tiles])
  if name != "triton-bwd":
    as_np = lambda x: np.asarray(x.astype(jnp.float32))
    got = dict(zip(("dq", "dk", "dv"), map(as_np, grads(*args))))
    result["nonfinite"] = int(sum((~np.isfinite(x)).sum() for x in got.values()))
    try:
      want = _triton_main_grads()
      for n in got:
        result[f"{n}_err_vs_triton"] = _rel_err(got[n], want[n])
    except Exception as exc:  # noqa: BLE001
      result["err_vs_triton"] = f"triton failed: {type(exc).__name__}: {exc}"[:300]
    # Against the float32 reference on one row and two heads (dense logits fit).
    cut = lambda x: x[:1, :, :2]
    ids = (seg[:1], seg[:1], pos[:1], pos[:1])
    sub = [cut(x) for x in (q, k, v, do)]
    dlse = jnp.zeros((1, 2, q.shape[1]), jnp.float32)
    ref, sub_lse, sub_delta = _reference_grads(*sub, dlse, ids, True, None, scale)
    for n, x in zip(("dq", "dk", "dv"), grads(*sub, sub_lse, sub_delta, *ids)):
      result[f"{n}_err_vs_reference_row0_heads01"] = _rel_err(as_np(x), ref[n])
  for part, call in calls.items():
    result[f"{part}_ms"] = timing.median_ms(call, *args, warmup=3, reps=20)
  bwd_ms = sum(result[f"{part}_ms"] for part in calls)
  bwd_flops = 2.5 * flops  # experiments.layouts.BACKWARD_FLOPS_FACTOR
  result.update(bwd_ms=bwd_ms, bwd_tflops=bwd_flops / (bwd_ms * 1e-3) / 1e12)
  return result


RUNNERS = {"correct": "run_correctness_case", "time": "run_timing_case",
           "bwd-correct": "run_bwd_correctness_case", "bwd-time": "run_bwd_timing_case"}


def worker(kind, names):
  runner = globals()[RUNNERS[kind]]
  for name in names:
    print(json.dumps(dict(event="start", kind=kind, case=name)), flush=True)
    try:
      result = dict(status="ok", **runner(name))
    except Exception as exc:  # noqa: BLE001 - a failure is a result
      tb = traceback.format_exc()
      result = dict(status="error", error=f"{type(exc).__name__}: {exc}"[:2000],
                    traceback_tail=tb[-3000:])
    print(json.dumps(dict(event="done", kind=kind, case=name, **result)), flush=True)


# ----------------------------------------------------------------------------
# Parent side (no JAX): workers, timeouts, summary


def _pump(proc):
  """(queue of the worker's stdout lines, then None at exit; deque of its last stderr lines)."""
  lines: queue.Queue = queue.Queue()
  stderr_tail: collections.deque = collections.deque(maxlen=40)

  def pump_stdout():
    for line in proc.stdout:
      lines.put(line)
    lines.put(None)

  threading.Thread(target=pump_stdout, daemon=True).start()
  threading.Thread(target=stderr_tail.extend, args=(proc.stderr,), daemon=True).start()
  return lines, stderr_tail


def _die_with_parent():
  """In a worker before exec: SIGKILL when the parent dies (Linux prctl PR_SET_PDEATHSIG).

  Workers run in their own session (so that a hung one's group can be
  killed), which an outer `timeout` or a killed parent would not reach: a
  left-over worker then holds the GPU. Elsewhere this does nothing.
  """
  try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except OSError:
    pass


def _run_workers(kind, names, deadline, results, case_timeout=CASE_TIMEOUT_S):
  """Runs `names` in workers, a fresh worker after a hang; fills results[name]."""
  todo = list(names)
  while todo:
    if time.monotonic() > deadline:
      for name in todo:
        results[name] = dict(status="skipped", error="out of the total time budget")
      return
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, *todo]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_die_with_parent,
                            cwd=REPO_ROOT)
    lines, stderr_tail = _pump(proc)
    current, last = None, time.monotonic()
    while True:
      limit = min(last + case_timeout, deadline)
      try:
        line = lines.get(timeout=max(0.1, limit - time.monotonic()))
      except queue.Empty:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        why = "hung" if time.monotonic() < deadline else "out of the total time budget"
        if current is not None:
          results[current] = dict(status="timeout", error=f"no result after "
                                  f"{time.monotonic() - last:.0f} s ({why})")
          todo.remove(current)
          print(f"  {kind} {current}: TIMEOUT ({why})", flush=True)
        else:
          for name in todo:
            results[name] = dict(status="timeout", error="worker never started a case")
          todo = []
        break
      if line is None:  # worker exited
        proc.wait()
        if current is not None:  # crashed inside a case (e.g. a CUDA error abort)
          results[current] = dict(status="crash", error=f"worker exited with "
                                  f"{proc.returncode}", stderr_tail="".join(stderr_tail)[-3000:])
          todo.remove(current)
          print(f"  {kind} {current}: CRASH (exit {proc.returncode})", flush=True)
        elif todo:
          for name in todo:
            results[name] = dict(status="crash", error=f"worker exited with "
                                 f"{proc.returncode} before this case",
                                 stderr_tail="".join(stderr_tail)[-3000:])
          todo = []
        break
      try:
        msg = json.loads(line)
      except json.JSONDecodeError:
        continue  # stray output
      last = time.monotonic()
      if msg.get("event") == "start":
        current = msg["case"]
      elif msg.get("event") == "done":
        name = msg.pop("case")
        for key in ("event", "kind"):
          msg.pop(key)
        results[name] = msg
        todo.remove(name)
        current = None
        print(f"  {kind} {name}: {_one_line(msg)}", flush=True)


def _one_line(r):
  if r.get("status") != "ok":
    return f"{r.get('status', '?').upper()}: {r.get('error', '')[:300]}"
  keys = ("ok", "out_err", "lse_err", "dq_err", "dk_err", "dv_err", "nonfinite",
          "blind_out_exact_zero", "blind_lse_is_empty", "blind_dq_exact_zero",
          "unseen_dkdv_exact_zero", *(f"{n}_err_vs_two_kernel" for n in ("dq", "dk", "dv")),
          "plan_ms", "fwd_ms", "tflops", "dq_ms", "dkdv_ms", "fused_ms", "bwd_ms",
          "bwd_tflops", "rel_err_vs_triton", "rel_err_vs_reference_row0_heads01",
          *(f"{n}_err_vs_{w}" for w in ("triton", "reference_row0_heads01")
            for n in ("dq", "dk", "dv")), "first_call_s")
  fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
  return " ".join(f"{k}={fmt(r[k])}" for k in keys if k in r)


def _environment():
  try:
    out = subprocess.run([sys.executable, "-c",
                          "import jax; d = jax.devices()[0]; print(jax.__version__); "
                          "print(d.platform); print(getattr(d, 'device_kind', ''))"],
                         capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    version, platform, kind = (out.stdout.splitlines() + ["?"] * 3)[:3]
    return dict(jax=version, platform=platform, device=kind)
  except Exception as exc:  # noqa: BLE001
    return dict(error=str(exc))


PARTS = {  # --only value -> the parts it runs, in order
    "correct": ("correct",), "time": ("time",), "bwd-correct": ("bwd-correct",),
    "bwd-time": ("bwd-time",), "bwd": ("bwd-correct", "bwd-time"),
}
# part -> (summary key, title, case names)
PART_INFO = {
    "correct": ("correctness", "correctness (Mosaic forward vs float32 reference)",
                list(CORRECTNESS_CASES)),
    "time": ("timing", "timing on the main shape (forward, plan included)",
             ["triton", PLAN_CASE, *TIMED_TILES]),
    "bwd-correct": ("bwd_correctness", "correctness (Mosaic backward vs jax.vjp of the "
                    "float32 reference)", list(BWD_CORRECTNESS_CASES)),
    "bwd-time": ("bwd_timing", "timing on the main shape (backward kernels, plan "
                 "included, lse and delta given)",
                 ["triton-bwd", "mosaic-bwd-default", "mosaic-fused-bwd-default",
                  *(n for n in [*BWD_TIMED_TILES, *FUSED_BWD_TIMED_TILES]
                    if not n.endswith("-default"))]),
}
PART_RESERVE_S = 150  # kept for each later part when an earlier one runs long


def _tally(results):
  """("passed/total", sorted names not ok) of a correctness part's results."""
  passed = {n for n, r in results.items() if r.get("ok")}
  return f"{len(passed)}/{len(results)}", sorted(set(results) - passed)


def _summarise(summary, parts):
  out = {}
  if "correctness" in summary:
    passed, failed = _tally(summary["correctness"])
    out.update(correctness_passed=passed, failed=failed)
  if "timing" in summary:
    timed = {n: r["fwd_ms"] for n, r in summary["timing"].items() if "fwd_ms" in r}
    best = min((n for n in timed if n != "triton"), key=timed.get, default=None)
    out.update(triton_fwd_ms=timed.get("triton"), best_mosaic=best,
               best_mosaic_fwd_ms=timed.get(best),
               meets_target=bool(best and timed[best] <= TARGET_FWD_MS))
  if "bwd_correctness" in summary:
    passed, failed = _tally(summary["bwd_correctness"])
    out.update(bwd_correctness_passed=passed, bwd_failed=failed)
  if "bwd_timing" in summary:
    timed = {n: r["bwd_ms"] for n, r in summary["bwd_timing"].items() if "bwd_ms" in r}
    best = min((n for n in timed if n != "triton-bwd"), key=timed.get, default=None)
    out.update(triton_bwd_ms=timed.get("triton-bwd"), best_mosaic_bwd=best,
               best_mosaic_bwd_ms=timed.get(best))
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--worker", choices=tuple(RUNNERS), help=argparse.SUPPRESS)
  p.add_argument("--only", choices=tuple(PARTS),
                 help="run one part: forward correctness or timing, or the backward "
                      "(bwd = bwd-correct then bwd-time); default: both forward parts")
  p.add_argument("--case-timeout", type=float, default=CASE_TIMEOUT_S,
                 help=f"seconds without a result after which a case counts as hung "
                      f"(default {CASE_TIMEOUT_S})")
  p.add_argument("--cases", default=None,
                 help="comma list of case names (of the parts run) to run only those")
  p.add_argument("cases_for_worker", nargs="*", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    worker(args.worker, args.cases_for_worker)
    return

  start = time.monotonic()
  deadline = start + TOTAL_BUDGET_S
  parts = PARTS[args.only] if args.only else ("correct", "time")
  summary = dict(environment=_environment(), tolerance=TOL, main_shape=MAIN,
                 target_fwd_ms=TARGET_FWD_MS)
  print(f"environment: {summary['environment']}", flush=True)
  for n, part in enumerate(parts):
    key, title, names = PART_INFO[part]
    summary[key] = {}
    print(f"{title}:", flush=True)
    later = len(parts) - n - 1
    if args.cases:
      names = [n for n in names if n in args.cases.split(",")]
    _run_workers(part, names, deadline - PART_RESERVE_S * later, summary[key],
                 args.case_timeout)

  summary["summary"] = dict(_summarise(summary, parts),
                            wall_s=round(time.monotonic() - start, 1))
  print(json.dumps(summary["summary"], indent=1))
  if out_dir := os.environ.get("OUT"):
    os.makedirs(out_dir, exist_ok=True)
    backward = all(part.startswith("bwd") for part in parts)
    path = os.path.join(out_dir, "mosaic_check_bwd.json" if backward
                        else "mosaic_check.json")
    with open(path, "w") as f:
      json.dump(summary, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
  main()
