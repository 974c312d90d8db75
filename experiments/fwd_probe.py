"""Probe the Mosaic GPU forward kernel: variants x layouts, kernel only, on a GPU.

    PYTHONPATH=. python experiments/fwd_probe.py \\
        --variants persistent-pingpong,pingpong,serial@128x64s3 --layouts packed,dense,full

A variant is "schedule[@BQxBKsS][+compares][+spans|+lasthalf][+DEALING]": a
schedule of mosaic_attention.SCHEDULES, an optional tiling (default
mosaic_attention.DEFAULT_TILE), "+compares": pass the plan's q_compares
(masked tiles that need one compare), "+spans": its q_spans (the kv tiles
and half tiles each consumer skips; both persistent schedules only),
"+lasthalf": q_spans cut to the last tile's first half (session 8's
halves, for comparison), "+snake", "+load" or "+dynamic": the persistent
kernel's work items made beforehand, dealt so (mosaic_persistent.DEALINGS;
without one they are made in the timed call, dealt "snake"), "+unbalanced":
with "+load", the deal without its rebalancing swaps
(mosaic_persistent.REBALANCE_SWEEPS = 0, for comparison), and "+baseline"
(or "+baselineK"): the persistent schedules run the `persistent_forward` of the
module file given by --baseline (its K-th, from 1; --baseline takes a
comma-separated list) instead of this checkout's (another version of
pallas_kernels/mosaic_persistent.py, e.g. `git show
HEAD:pallas_kernels/mosaic_persistent.py`, against this checkout's
mosaic_common), so that several versions of the kernel are timed in the same
rounds and their outputs compared. Layouts, all
B=4 (--batch), T=8192, H=16, D=128 (--head-dim) bfloat16 (the main shape of
bench_attention.py):
  packed  lognormal documents of mean length 1024, causal (the main case);
  padded  packed, the last 700 tokens of each row padding (segment id 0);
  dense   one document per row, causal (long loops, masks on the diagonal);
  full    one document per row, not causal (every tile full: the loop alone);
  blocks  documents of 1024 tokens, not causal (short loops, no masks);
  blocksc documents of 1024 tokens, causal (short loops, masks on the diagonal).

Per (layout, variant): the median time of the kernel with its tile plan made
beforehand, the layout's variants timed in interleaved rounds
(experiments/timing.py: `--reps` rounds, each one sample of every variant, so
clock drifts fall on all alike), the 10th/90th percentiles, the median of the
per-round ratios to the first variant, useful TFLOP/s (document-masked work) and
executed TFLOP/s (every visited tile counted whole), and the relative error
of the output against the layout's first variant; the first variant is
checked against the float32 reference on row 0, heads 0-1. One JSON line per
result on stdout (and in $OUT/fwd_probe.json when OUT is set).

--dump DIR writes each variant's ptxas report (registers, spills) and SASS
(Mosaic GPU's MOSAIC_GPU_DUMP_PTXAS / MOSAIC_GPU_DUMP_SASS, printed by the
compiler) to DIR/<variant>.txt when it compiles. The SASS needs nvdisasm
in the CUDA root jaxlib uses, which the GPU machine lacks; the compiled kernel
is left in /tmp/mosaic-gpu-*/kernel.bin either way, for `nvdisasm -c` elsewhere.

--profile DIR runs each variant once with Mosaic GPU's on-device profiler
(plgpu.CompilerParams profile_space / profile_dir: a timestamp at the entry
and exit of every jax.named_scope region of the kernel, per warpgroup), writes
the Perfetto trace to DIR and prints, per warpgroup role and region, the
share of the time and the median cycles spent in it (summarize_trace), and
what a consumer spends between kv steps within items and across them
(item_boundaries); no timing then: the profiler's shared-memory stores
perturb it. The regions live in shared memory next to the kernel's buffers
(48 bytes per region: three warpgroups; with the default tile --profile-space
590 fits with items dealt ahead, 570 with claimed ones), and a CTA that
records more regions than that writes past them (an illegal address at
--batch 4): profile with --batch 1.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import importlib.util
import json
import os
import re
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
import numpy as np  # noqa: E402

from experiments import timing  # noqa: E402
from experiments.layouts import causal_doc_flops, packed_segment_ids  # noqa: E402
from jpack import masks  # noqa: E402
from jpack.attention import reference_attention  # noqa: E402
from pallas_kernels import mosaic_attention, mosaic_common, mosaic_persistent  # noqa: E402
from pallas_kernels.config import GROUP_SPAN_BITS, SPAN_HALF_BITS, TileConfig  # noqa: E402

BATCH, SEQ_LEN, HEADS, HEAD_DIM = 4, 8192, 16, 128
LAYOUTS = ("packed", "padded", "dense", "full", "blocks", "blocksc")
OPTIONS = ("compares", "spans", "lasthalf", *mosaic_persistent.DEALINGS, "unbalanced",
           "baseline")
"""Variant options: pass the plan's q_compares, its q_spans (persistent schedules),
or its q_spans cut by last_half_only; make the work items beforehand, dealt so
(dealt by load without rebalancing: "unbalanced"); run the --baseline module's
persistent kernel ("baselineK": the K-th module given)."""


def baseline_index(options):
  """Index into --baseline's modules of a variant's "baseline[K]" option, or None."""
  found = [o for o in options if re.fullmatch(r"baseline\d*", o)]
  if len(found) > 1:
    raise ValueError(f"a variant runs one baseline, got {sorted(found)}")
  if not found:
    return None
  index = int(found[0][len("baseline"):] or 1) - 1
  if index < 0:
    raise ValueError(f"baseline options count from 1, got {found[0]!r}")
  return index


def layout(name, seed=0, batch=None):
  """(segment ids int32 [B, T], causal) of a layout (module docstring)."""
  batch = batch or BATCH
  if name in ("packed", "padded"):
    seg = packed_segment_ids(batch, SEQ_LEN, seed=seed, mean_len=1024.0)
    if name == "padded":
      seg[:, -700:] = 0
    return seg, True
  ones = np.ones((batch, SEQ_LEN), np.int32)
  if name in ("dense", "full"):
    return ones, name == "dense"
  if name in ("blocks", "blocksc"):
    return 1 + np.arange(SEQ_LEN, dtype=np.int32)[None].repeat(batch, 0) // 1024, \
        name == "blocksc"
  raise ValueError(f"layout must be one of {LAYOUTS}, got {name!r}")


def parse_variant(text):
  """(schedule, TileConfig, options: frozenset) of "schedule[@BQxBKsS][+option...]",
  options among OPTIONS."""
  text, *options = text.split("+")
  if unknown := {o for o in options if o not in OPTIONS and not re.fullmatch(r"baseline\d+", o)}:
    raise ValueError(f"variant options are {OPTIONS} (or baselineK), got {sorted(unknown)}")
  baseline_index(options)
  if {"spans", "lasthalf"} <= set(options):
    raise ValueError("variant options spans and lasthalf exclude each other")
  if "unbalanced" in options and "load" not in options:
    raise ValueError("variant option unbalanced needs load")
  if len(set(options) & set(mosaic_persistent.DEALINGS)) > 1:
    raise ValueError(f"variant options {mosaic_persistent.DEALINGS} exclude each other")
  schedule, _, tiling = text.partition("@")
  if schedule not in mosaic_attention.SCHEDULES:
    raise ValueError(f"schedule must be one of {mosaic_attention.SCHEDULES}, got {schedule!r}")
  tile = mosaic_attention.DEFAULT_TILE
  if tiling:
    bq, rest = tiling.split("x")
    bk, stages = rest.split("s")
    tile = TileConfig(int(bq), int(bk), num_stages=int(stages))
  return schedule, tile, frozenset(options)


@contextlib.contextmanager
def compiler_dump(path):
  """Mosaic GPU's ptxas report and SASS of kernels compiled inside, into `path` (None: off)."""
  if path is None:
    yield
    return
  names = ("MOSAIC_GPU_DUMP_PTXAS", "MOSAIC_GPU_DUMP_SASS")
  sys.stdout.flush()
  saved_fd = os.dup(1)
  with open(path, "w") as f:
    os.dup2(f.fileno(), 1)
    os.environ.update({n: "1" for n in names})
    try:
      yield
    finally:
      sys.stdout.flush()
      os.dup2(saved_fd, 1)
      os.close(saved_fd)
      for n in names:
        os.environ.pop(n, None)


def trace_regions(path, warpgroups=3):
  """{warpgroup trace: (role, [(region, begin, end), ...])} of a profiler trace: each
  warpgroup's outermost regions in order, times in cycles.

  Roles: "consumer" (warpgroups 0 .. warpgroups - 2 of a CTA) and "producer"
  (the last). Mosaic GPU's profiler stamps events with the SM clock, written as
  ts = (start + cycles) / 1000, so ts * 1000 counts cycles.
  """
  with open(path) as f:
    events = json.load(f)["traceEvents"]
  by_tid = collections.defaultdict(list)
  for e in events:
    by_tid[e["tid"]].append(e)
  traces = {}
  for tid, evs in by_tid.items():
    role = "producer" if (tid - 1) % warpgroups == warpgroups - 1 else "consumer"
    regions, stack = [], []
    for e in evs:
      if e["ph"] == "B":
        stack.append(e)
      elif stack:
        begin = stack.pop()
        if not stack:
          regions.append((begin["name"], 1000 * begin["ts"], 1000 * e["ts"]))
    traces[tid] = (role, regions)
  return traces


def summarize_trace(path, warpgroups=3):
  """{role: {region: (share of the warpgroups' time, median cycles)}} of a profiler
  trace (trace_regions); a warpgroup's time runs from its first region to its last."""
  spans = {"consumer": collections.defaultdict(list), "producer": collections.defaultdict(list)}
  total = collections.Counter()
  for role, regions in trace_regions(path, warpgroups).values():
    if regions:
      total[role] += regions[-1][2] - regions[0][1]
    for name, begin, end in regions:
      spans[role][name].append(end - begin)
  return {role: {name: (round(sum(d) / total[role], 4), round(float(np.median(d))))
                 for name, d in sorted(spans[role].items(), key=lambda kv: -sum(kv[1]))}
          for role in spans if total[role]}


def item_boundaries(path, warpgroups=3):
  """Median cycles a consumer spends between kv steps, within items and across them.

  Per consumer warpgroup of a profiler trace (trace_regions), the time from
  the end of each "c_pv" region to the start of the next "c_softmax*" region:
  "within" when no "c_store" lies between (the next kv tile of the same item),
  "across" when one does (the item's epilogue, the next item's Q wait, its
  first K/V wait and QK^T). Also the median cycles of the regions met across
  item boundaries. Returns {"within": cycles, "across": cycles, "items": n,
  "regions_across": {region: median cycles}}.
  """
  within, across = [], []
  met = collections.defaultdict(list)
  for role, regions in trace_regions(path, warpgroups).values():
    if role != "consumer":
      continue
    pv_end, seen = None, []
    for name, begin, end in regions:
      if name.startswith("c_softmax") and pv_end is not None:
        crossed = any(n == "c_store" for n, _ in seen)
        (across if crossed else within).append(begin - pv_end)
        for n, d in seen if crossed else ():
          met[n].append(d)
        pv_end = None
      if name == "c_pv":
        pv_end, seen = end, []
      elif pv_end is not None:
        seen.append((name, end - begin))
  med = lambda xs: round(float(np.median(xs))) if xs else None  # noqa: E731
  return dict(within=med(within), across=med(across), items=len(across),
              regions_across={k: med(v) for k, v in sorted(met.items())})


def load_baseline(path, name="baseline_mosaic_persistent"):
  """The module at `path` (a version of pallas_kernels/mosaic_persistent.py), loaded
  beside this checkout's as `name`. Its work items are this checkout's WorkItems (the
  probe makes them with mosaic_persistent.work_items; the table layout must match)."""
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  module.WorkItems = mosaic_persistent.WorkItems
  return module


@contextlib.contextmanager
def persistent_kernel_of(module):
  """mosaic_attention's persistent schedules run module.persistent_forward inside
  (None: this checkout's)."""
  saved = mosaic_attention.persistent_forward
  if module is not None:
    mosaic_attention.persistent_forward = module.persistent_forward
  try:
    yield
  finally:
    mosaic_attention.persistent_forward = saved


@contextlib.contextmanager
def _patched(module, **values):
  """module's attributes set to `values` inside, restored after."""
  saved = {name: getattr(module, name) for name in values}
  for name, value in values.items():
    setattr(module, name, value)
  try:
    yield
  finally:
    for name, value in saved.items():
      setattr(module, name, value)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def last_half_only(spans):
  """q_spans [B, nq] with each group's front 0 and back at most 1: the consumers
  skip nothing but the last tile's second half (session 8's halves)."""
  cut = jnp.zeros_like(spans)
  for g in range(2):
    shift = GROUP_SPAN_BITS * g + SPAN_HALF_BITS
    back = lax.shift_right_logical(spans, shift) & (2**SPAN_HALF_BITS - 1)
    cut |= jnp.minimum(back, 1) << shift
  return cut


def kernel(tile, schedule, scale, causal):
  """jitted (q, k, v, seg, pos, q_ranges, q_compares or None, q_spans or None, items or
  None) -> out of the Mosaic forward (self-attention)."""
  return jax.jit(lambda q, k, v, seg, pos, ranges, compares, spans, items: (
      mosaic_attention.forward(q, k, v, seg, seg, pos, pos, ranges, tile=tile, scale=scale,
                               causal=causal, sliding_window=None, schedule=schedule,
                               q_compares=compares, q_spans=spans, items=items)[0]))


def run_variant(name, schedule, tile, options, layout_name, inputs, args, first_out):
  """(result dict, out float32 numpy, call) of one variant on one layout (module docstring).

  inputs: (q, k, v, segment ids, positions) of the layout; first_out: the
  layout's first output (None: this is the first, checked against the reference).
  call: (jitted fn, args), compiled, for time_variants; None when profiling.
  The result has the tile counts; time_variants adds the times.
  """
  q, k, v, seg, pos = inputs
  seg_np, causal = layout(layout_name, args.seed, q.shape[0])
  head_dim = q.shape[3]
  scale = 1.0 / np.sqrt(head_dim)
  plan = masks.make_tile_plan(seg, seg, pos, pos, block_q=tile.block_major,
                              block_k=tile.block_minor, causal=causal, sliding_window=None)
  ranges = np.asarray(plan.q_ranges)
  tiles = int((ranges[..., 3] - ranges[..., 0]).clip(0).sum()) * HEADS
  compares = plan.q_compares if "compares" in options else None
  spans = (plan.q_spans if "spans" in options
           else last_half_only(plan.q_spans) if "lasthalf" in options else None)
  items = None
  if dealing := next(iter(options & set(mosaic_persistent.DEALINGS)), None):
    sweeps = 0 if "unbalanced" in options else mosaic_persistent.REBALANCE_SWEEPS
    # This checkout's kernel masks ids with codes (mosaic_codes); a baseline module
    # older than that (no key_codes) reads plain compares.
    index = baseline_index(options)
    coded = ((seg, seg, tile.block_minor)
             if index is None or hasattr(args.baseline[index], "key_codes") else None)
    with _patched(mosaic_persistent, REBALANCE_SWEEPS=sweeps):
      items = mosaic_persistent.work_items(plan.q_ranges, HEADS, compares, spans=spans,
                                           dealing=dealing, coded_ids=coded)
    compares = spans = None  # the items hold them
  fn, fn_args = kernel(tile, schedule, scale, causal), (
      *inputs, plan.q_ranges, compares, spans, items)
  result = {}
  # File names of letters, digits, "_", "-" and "." only ("@" and "+" are not
  # carried back from the GPU machine).
  file_name = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
  dump = args.dump and os.path.join(args.dump, file_name + ".txt")
  trace_dir = args.profile and os.path.join(args.profile, f"{layout_name}-{file_name}")
  if trace_dir:
    os.makedirs(trace_dir, exist_ok=True)
    mosaic_common.PROFILE = dict(profile_space=args.profile_space, profile_dir=trace_dir)
  baseline = None
  if (index := baseline_index(options)) is not None:
    if index >= len(args.baseline or ()):
      raise ValueError(f"variant option baseline{index + 1} needs at least {index + 1} "
                       f"files in --baseline")
    baseline = args.baseline[index]
  try:
    with compiler_dump(dump or None), persistent_kernel_of(baseline):
      out = np.asarray(fn(*fn_args).astype(jnp.float32))  # compiles (and profiles) here
  finally:
    mosaic_common.PROFILE = {}
  if first_out is None:
    f32 = lambda x: x[:1, :, :2].astype(jnp.float32)
    want = reference_attention(f32(q), f32(k), f32(v), segment_ids=seg[:1], causal=causal,
                               scale=scale)
    result["rel_err_vs_reference_row0"] = rel_err(out[:1, :, :2], want)
  result["rel_err_vs_first"] = rel_err(out, out if first_out is None else first_out)
  result["nonfinite"] = int((~np.isfinite(out)).sum())
  if trace_dir:
    jax.effects_barrier()
    trace = max(glob.glob(os.path.join(trace_dir, "*.json")), key=os.path.getmtime)
    warpgroups = 1 + tile.block_major // 64
    result.update(trace=trace, regions=summarize_trace(trace, warpgroups),
                  item_boundaries=item_boundaries(trace, warpgroups))
    return result, out, None
  result.update(tiles=tiles, useful_flops=causal_doc_flops(seg_np, HEADS, head_dim, causal=causal),
                executed_flops=4.0 * tiles * tile.block_major * tile.block_minor * head_dim)
  return result, out, (fn, fn_args)


def time_variants(results, calls, reps):
  """Adds ms (median), ms_p10_p90, vs_first (median per-round ratio to the first
  timed variant) and TFLOP/s to each result of one layout; calls: name -> (fn,
  args) of the variants that ran (timing.interleaved_samples)."""
  for fn, fn_args in calls.values():
    for _ in range(2):
      jax.block_until_ready(fn(*fn_args))
  samples = timing.interleaved_samples(calls, reps)
  first = next(iter(samples.values()), None)
  for result in results:
    if result["variant"] not in samples:
      continue
    values = samples[result["variant"]]
    p10, ms, p90 = timing.quantiles(values)
    ratio = timing.quantiles(timing.round_ratios(values, first))[1]
    result.update(ms=round(ms, 4), ms_p10_p90=[round(p10, 4), round(p90, 4)],
                  vs_first=round(ratio, 4),
                  useful_tflops=round(result.pop("useful_flops") / ms / 1e9, 1),
                  executed_tflops=round(result.pop("executed_flops") / ms / 1e9, 1))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--variants", default=mosaic_attention.DEFAULT_SCHEDULE)
  p.add_argument("--layouts", default="packed")
  p.add_argument("--reps", type=int, default=20)
  p.add_argument("--dump", default=None, help="directory for ptxas reports and SASS")
  p.add_argument("--profile", default=None, help="directory for profiler traces")
  p.add_argument("--profile-space", type=int, default=300,
                 help="profiled regions per warpgroup (shared memory: 16 bytes each)")
  p.add_argument("--batch", type=int, default=BATCH)
  p.add_argument("--head-dim", type=int, default=HEAD_DIM, help="D (default 128)")
  p.add_argument("--seed", type=int, default=0, help="the packed layouts' documents")
  p.add_argument("--baseline", default=None,
                 help="versions of mosaic_persistent.py, comma-separated, for the variants "
                      "with option +baseline (the first) or +baselineK (the K-th)")
  args = p.parse_args()
  args.baseline = args.baseline and [
      load_baseline(path, f"baseline_mosaic_persistent_{i + 1}")
      for i, path in enumerate(args.baseline.split(","))]
  variants = [(v, *parse_variant(v)) for v in args.variants.split(",")]
  if len({v[0] for v in variants}) < len(variants):
    p.error(f"--variants names a variant twice: {args.variants} (rounds interleave them anyway)")
  for d in (args.dump, args.profile):
    if d:
      os.makedirs(d, exist_ok=True)
  shape = (args.batch, SEQ_LEN, HEADS, args.head_dim)
  q, k, v = (jax.random.normal(key, shape, jnp.bfloat16)
             for key in jax.random.split(jax.random.key(0), 3))
  pos = jnp.broadcast_to(jnp.arange(SEQ_LEN, dtype=jnp.int32), (args.batch, SEQ_LEN))
  results = []
  for layout_name in args.layouts.split(","):
    inputs = (q, k, v, jnp.asarray(layout(layout_name, args.seed, args.batch)[0]), pos)
    first_out, calls, layout_results = None, {}, []
    for name, schedule, tile, options in variants:
      result = dict(layout=layout_name, seed=args.seed, variant=name)
      try:
        found, out, call = run_variant(name, schedule, tile, options, layout_name, inputs, args,
                                       first_out)
        result.update(found)
        first_out = out if first_out is None else first_out
        if call is not None:
          calls[name] = call
      except Exception as exc:  # noqa: BLE001 - a failed variant is a result
        result["error"] = f"{type(exc).__name__}: {exc}"[:400]
      layout_results.append(result)
    time_variants(layout_results, calls, args.reps)
    for result in layout_results:
      print(json.dumps(result), flush=True)
    results.extend(layout_results)
  if out_dir := os.environ.get("OUT"):
    with open(os.path.join(out_dir, "fwd_probe.json"), "w") as f:
      json.dump(dict(device=jax.devices()[0].device_kind, results=results), f, indent=1)


if __name__ == "__main__":
  main()
