"""Probe the Mosaic GPU backward kernels: schedules x layouts, kernels only, on a GPU.

    PYTHONPATH=. python experiments/bwd_probe.py --variants grid,persistent \\
        --layouts packed,dense,full

A variant is "schedule[:num_ctas][+delta]": a schedule of
mosaic_backward.SCHEDULES for both kernels and, for "persistent", an optional
CTA count (default one per SM), run with jpack's default tiles for the head
dim (`tiles`: mosaic_backward.DEFAULT_DQ_TILE and DEFAULT_DKDV_TILE, or
mosaic_common.WIDE_HEAD_DQ_TILE and WIDE_HEAD_TILE at --head-dim 256); "+delta" runs the dQ
step as backward_dq_and_delta (delta = rowsum(out * do) computed inside the
persistent dQ kernel), the others compute delta first in XLA
(segment_attention.backward_delta). The layouts are fwd_probe's (B=4 by
--batch, T=8192, H=16, D=128 bfloat16, the main shape of bench_attention.py);
--gqa makes the keys and values 4 heads, --head-dim sets D.

Per (layout, variant): the median times of the delta step (XLA; 0 with
"+delta"), of the dQ kernel (with delta for "+delta") and of the dK/dV kernel,
each with its tile plan made beforehand (experiments/timing.py), their sum,
useful TFLOP/s of the sum (2.5 x the document-masked forward work), and the
relative error of dq, dk, dv against the layout's first variant; the first
variant is checked against the float32 reference on row 0, heads 0-1 (out and
lse from the reference there; elsewhere from the Triton forward). One JSON
line per result on stdout (and $OUT/bwd_probe.json when OUT is set).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import timing  # noqa: E402
from experiments.fwd_probe import HEAD_DIM, HEADS, SEQ_LEN, layout, rel_err  # noqa: E402
from experiments.layouts import BACKWARD_FLOPS_FACTOR, causal_doc_flops  # noqa: E402
from jpack import masks  # noqa: E402
from jpack.attention import flash_attention, reference_attention  # noqa: E402
from pallas_kernels import mosaic_backward, mosaic_common  # noqa: E402
from pallas_kernels.segment_attention import backward_delta  # noqa: E402

GRADS = ("dq", "dk", "dv")


def parse_variant(text):
  """(schedule, num_ctas or None, fuse_delta) of "schedule[:num_ctas][+delta]"."""
  text, plus, extra = text.partition("+")
  if plus and extra != "delta":
    raise ValueError(f"a variant ends in '+delta' or nothing, got '+{extra}'")
  schedule, _, ctas = text.partition(":")
  if schedule not in mosaic_backward.SCHEDULES:
    raise ValueError(f"schedule must be one of {mosaic_backward.SCHEDULES}, "
                     f"got {schedule!r}")
  return schedule, int(ctas) if ctas else None, bool(plus)


def tiles(head_dim):
  """(dQ tile, dK/dV tile) that jpack runs at this head dim."""
  if head_dim > 128:
    return mosaic_common.WIDE_HEAD_DQ_TILE, mosaic_common.WIDE_HEAD_TILE
  return mosaic_backward.DEFAULT_DQ_TILE, mosaic_backward.DEFAULT_DKDV_TILE


@functools.lru_cache(maxsize=None)
def kernels(schedule, num_ctas, fuse_delta, causal, scale, head_dim):
  """jitted (delta_fn, dq_fn, dkdv_fn).

  delta_fn(out, do) -> delta (XLA), or None with fuse_delta; dq_fn(q, k, v,
  do, lse, delta, seg, pos, ranges) -> dq, or with fuse_delta dq_fn(q, k, v,
  do, lse, out, seg, pos, ranges) -> (dq, delta); dkdv_fn(q, k, v, do, lse,
  delta, seg, pos, ranges) -> (dk, dv).
  """
  opts = dict(scale=scale, causal=causal, sliding_window=None, schedule=schedule,
              num_ctas=num_ctas)
  tile, dkdv_tile = tiles(head_dim)

  @jax.jit
  def dq_fn(q, k, v, do, lse, delta_or_out, seg, pos, ranges):
    if fuse_delta:
      return mosaic_backward.backward_dq_and_delta(
          q, k, v, do, lse, delta_or_out, jnp.zeros_like(lse), seg, seg, pos, pos, ranges,
          tile=tile, **opts)
    return mosaic_backward.backward_dq(q, k, v, do, lse, delta_or_out, seg, seg, pos, pos,
                                       ranges, tile=tile, **opts)

  @jax.jit
  def dkdv_fn(q, k, v, do, lse, delta, seg, pos, ranges):
    return mosaic_backward.backward_dkdv(q, k, v, do, lse, delta, seg, seg, pos, pos,
                                         ranges, tile=dkdv_tile, **opts)

  delta_fn = None if fuse_delta else jax.jit(lambda out, do: backward_delta(out, do, 0.0))
  return delta_fn, dq_fn, dkdv_fn


def plans(seg, pos, causal, head_dim):
  """(q_ranges of the dQ tiling, kv_ranges of the dK/dV tiling)."""
  dq_tile, dkdv_tile = tiles(head_dim)
  plan = functools.partial(masks.make_tile_plan, seg, seg, pos, pos, causal=causal,
                           sliding_window=None)
  return (plan(block_q=dq_tile.block_major, block_k=dq_tile.block_minor).q_ranges,
          plan(block_q=dkdv_tile.block_minor, block_k=dkdv_tile.block_major).kv_ranges)


def residuals(q, k, v, seg, causal, scale, reference=False):
  """(out in q.dtype, lse) of the forward: the Triton kernels', or the float32 reference's."""
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  if reference:
    out, lse = reference_attention(f32(q), f32(k), f32(v), segment_ids=seg, causal=causal,
                                   scale=scale, return_residuals=True)
  else:
    out, lse = jax.jit(lambda q, k, v, seg: flash_attention(
        q, k, v, segment_ids=seg, causal=causal, scale=scale, implementation="pallas",
        return_residuals=True))(q, k, v, seg)
  return out.astype(q.dtype), lse


def reference_grads(q, k, v, do, seg, causal, scale):
  """dict of float32 dq, dk, dv of the float32 reference (dlse = 0)."""
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  _, vjp = jax.vjp(lambda q, k, v: reference_attention(
      q, k, v, segment_ids=seg, causal=causal, scale=scale), f32(q), f32(k), f32(v))
  return dict(zip(GRADS, vjp(f32(do))))


def run_variant(schedule, num_ctas, fuse_delta, inputs, causal, first, reps=20):
  """(result dict, grads dict of float32 numpy) of one variant on one layout.

  inputs: (q, k, v, do, segment ids, positions); first: the layout's first
  grads (None: this is the first, checked against the reference); reps:
  timing samples of each step.
  """
  q, k, v, do, seg, pos = inputs
  head_dim = q.shape[3]
  scale = 1.0 / np.sqrt(head_dim)
  delta_fn, dq_fn, dkdv_fn = kernels(schedule, num_ctas, fuse_delta, causal, scale,
                                     head_dim)

  def backward(q, k, v, do, seg, pos, out, lse, q_ranges, kv_ranges):
    """(dq, dk, dv), and the calls to time: [(name, fn, args)]."""
    if fuse_delta:
      calls = [("dq", dq_fn, (q, k, v, do, lse, out, seg, pos, q_ranges))]
      dq, delta = dq_fn(*calls[0][2])
    else:
      calls = [("delta", delta_fn, (out, do))]
      delta = delta_fn(out, do)
      calls.append(("dq", dq_fn, (q, k, v, do, lse, delta, seg, pos, q_ranges)))
      dq = dq_fn(*calls[-1][2])
    calls.append(("dkdv", dkdv_fn, (q, k, v, do, lse, delta, seg, pos, kv_ranges)))
    return (dq, *dkdv_fn(*calls[-1][2])), calls

  as_np = lambda x: np.asarray(x.astype(jnp.float32))  # noqa: E731
  out, lse = residuals(q, k, v, seg, causal, scale)
  got, calls = backward(q, k, v, do, seg, pos, out, lse, *plans(seg, pos, causal, head_dim))
  grads = dict(zip(GRADS, map(as_np, got)))
  result = dict(nonfinite=int(sum((~np.isfinite(g)).sum() for g in grads.values())))
  if first is None:
    # Row 0, q heads 0-1 and their kv heads (dense logits fit).
    kv_heads = max(1, 2 * k.shape[2] // q.shape[2])
    sub = [x[:1, :, :n] for x, n in zip((q, k, v, do), (2, kv_heads, kv_heads, 2))]
    sub_ids = (seg[:1], pos[:1])
    sub_res = residuals(*sub[:3], seg[:1], causal, scale, reference=True)
    sub_got, _ = backward(*sub, *sub_ids, *sub_res, *plans(*sub_ids, causal, head_dim))
    want = reference_grads(*sub, seg[:1], causal, scale)
    for name, g in zip(GRADS, sub_got):
      result[f"{name}_err_vs_reference_row0"] = rel_err(as_np(g), want[name])
  else:
    for name in GRADS:
      result[f"{name}_err_vs_first"] = rel_err(grads[name], first[name])
  times = {name: timing.median_ms(fn, *args, warmup=3, reps=reps) for name, fn, args in calls}
  flops = BACKWARD_FLOPS_FACTOR * causal_doc_flops(np.asarray(seg), HEADS, head_dim,
                                                   causal=causal)
  bwd_ms = sum(times.values())
  result.update({f"{name}_ms": round(ms, 4) for name, ms in times.items()},
                bwd_ms=round(bwd_ms, 4), useful_tflops=round(flops / bwd_ms / 1e9, 1))
  return result, grads


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--variants", default="grid,persistent,persistent+delta")
  p.add_argument("--layouts", default="packed")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--gqa", action="store_true", help="4 kv heads (16 q heads)")
  p.add_argument("--head-dim", type=int, default=HEAD_DIM)
  p.add_argument("--reps", type=int, default=20)
  args = p.parse_args()
  variants = [(v, *parse_variant(v)) for v in args.variants.split(",")]
  keys = jax.random.split(jax.random.key(0), 4)
  shape = (args.batch, SEQ_LEN, HEADS, args.head_dim)
  kv_shape = shape[:2] + (4 if args.gqa else HEADS, args.head_dim)
  q, do = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys[:2])
  k, v = (jax.random.normal(key, kv_shape, jnp.bfloat16) for key in keys[2:])
  pos = jnp.broadcast_to(jnp.arange(SEQ_LEN, dtype=jnp.int32), (args.batch, SEQ_LEN))
  results = []
  for layout_name in args.layouts.split(","):
    seg, causal = layout(layout_name, batch=args.batch)
    inputs = (q, k, v, do, jnp.asarray(seg), pos)
    first = None
    for name, schedule, num_ctas, fuse_delta in variants:
      result = dict(layout=layout_name, variant=name, gqa=args.gqa, head_dim=args.head_dim)
      try:
        found, grads = run_variant(schedule, num_ctas, fuse_delta, inputs, causal,
                                   first, reps=args.reps)
        result.update(found)
        first = grads if first is None else first
      except Exception as exc:  # noqa: BLE001 - a failed variant is a result
        result["error"] = f"{type(exc).__name__}: {exc}"[:400]
      print(json.dumps(result), flush=True)
      results.append(result)
  if out_dir := os.environ.get("OUT"):
    with open(os.path.join(out_dir, "bwd_probe.json"), "w") as f:
      json.dump(dict(device=jax.devices()[0].device_kind, results=results), f, indent=1)


if __name__ == "__main__":
  main()
