"""Times item_order.ranked_table (the in-call plan's Triton item table) at several
programs' sizes and warp counts, on the benchmark's layout, under Nsight Compute:

    ncu --csv --metrics gpu__time_duration.sum --log-file table.csv \\
        python experiments/item_table_probe.py
    python experiments/item_table_probe.py --summarize table.csv

B=4, T=8192, 16 heads, 128x128 tiles, causal, lognormal documents (seed 0);
dealing "dynamic" on 132 CTAs, as the in-call forward makes it. Each variant
runs `CALLS` times, and must give bit for bit the first variant's table.
`--variants 32x4,16x8` picks them (items per program x warps).
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

CALLS = 3
DEFAULT_VARIANTS = "32x4,16x4,64x4,32x8,16x8,32x2"


def _variants(text: str) -> list[tuple[int, int]]:
  return [tuple(int(x) for x in v.split("x")) for v in text.split(",")]


def run(variants) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from experiments.layouts import packed_segment_ids
  from jpack import masks
  from pallas_kernels import item_order, mosaic_persistent as mp

  seg = jnp.asarray(packed_segment_ids(4, 8192, seed=0, mean_len=1024.0))
  pos = jnp.broadcast_to(jnp.arange(8192, dtype=jnp.int32), seg.shape)
  plan = masks.make_tile_plan(seg, seg, pos, pos, block_q=128, block_k=128, causal=True,
                              sliding_window=None)
  batch, n_rows, heads = 4, plan.q_ranges.shape[1], 16
  n = batch * n_rows * heads
  window_items, tail = mp._windows(n, n_rows, 132, mp.WINDOW_ROUNDS, "dynamic")
  head = mp._head_items(n, window_items, tail)
  first = None
  for block, warps in variants:
    item_order.BLOCK_ITEMS, item_order.NUM_WARPS = block, warps
    table = jax.jit(functools.partial(item_order.ranked_table, heads=heads,
                                      window_items=window_items, head=head, num_ctas=None))
    for _ in range(CALLS):
      out = table(plan.q_ranges, plan.q_compares, plan.q_spans)[0].block_until_ready()
    first = np.asarray(out) if first is None else first
    if not np.array_equal(first, np.asarray(out)):
      raise AssertionError(f"{block}x{warps}: another table than {variants[0]}")
    print(f"{block}x{warps}: ran", flush=True)


def summarize(path: str, variants) -> None:
  with open(path) as f:
    lines = [line for line in f if line.startswith('"')]  # skip ncu's own messages
  to_us = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}
  times = [float(r["Metric Value"].replace(",", "")) * to_us[r["Metric Unit"]]
           for r in csv.DictReader(lines)
           if r["Kernel Name"].startswith("ranked_item_table")
           and r["Metric Name"] == "gpu__time_duration.sum"]
  if len(times) != CALLS * len(variants):
    raise ValueError(f"expected {CALLS * len(variants)} table kernels in {path}, "
                     f"found {len(times)}")
  for k, (block, warps) in enumerate(variants):
    calls = times[CALLS * k:CALLS * (k + 1)]
    print(f"{block:4d} items x {warps} warps: " + " ".join(f"{t:.1f}" for t in calls) + " us")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--variants", default=DEFAULT_VARIANTS)
  p.add_argument("--summarize", default=None, help="an ncu --csv log to summarize")
  args = p.parse_args()
  variants = _variants(args.variants)
  summarize(args.summarize, variants) if args.summarize else run(variants)


if __name__ == "__main__":
  main()
