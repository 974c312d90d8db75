"""Where one jpack forward+backward step spends its device time, kernel by kernel.

Runs the benchmark's jitted step (bench_attention.forward_backward_fn of jpack
"auto": grads of sum(out * cot), main shape B=4, T=8192, H=16, D=128 bf16,
causal, lognormal documents; with --forward its forward_fn, the forward
alone, plan made inside; --head-dim sets D) `--steps` times after compiling, so that Nsight
Compute can time each kernel:

    ncu --csv --metrics gpu__time_duration.sum --log-file ncu.csv \\
        python experiments/step_kernels.py --steps 3
    python experiments/step_kernels.py --summarize ncu.csv --steps 3

The summary takes the last step's kernels (those after the last marker
kernel, a population count launched before each timed step) and prints each
kernel's time, grouped by name, and the step's total. ncu runs
the kernels one at a time, so the total leaves out the overlap of
back-to-back kernels and the launch gaps of a real step.
"""

from __future__ import annotations

import argparse
import collections
import csv
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)


def run_steps(steps: int, batch: int = 4, seq_len: int = 8192, forward: bool = False,
              head_dim: int = 128) -> None:
  """Compile the step (the forward alone if `forward`), then run it `steps` times, each
  after a marker kernel."""
  import jax
  import jax.numpy as jnp
  from jax import lax

  from experiments.bench_attention import (Problem, build_jpack, forward_backward_fn,
                                           forward_fn)
  from experiments.layouts import packed_segment_ids

  problem = Problem(packed_segment_ids(batch, seq_len, seed=0, mean_len=1024.0),
                    heads=16, kv_heads=16, head_dim=head_dim)
  attend, extra, _ = build_jpack(problem, jnp.asarray(problem.segment_ids))
  step = forward_fn(attend) if forward else forward_backward_fn(attend)
  shape = (batch, seq_len, 16, head_dim)
  q, k, v, cot = (jax.random.normal(key, shape, jnp.bfloat16)
                  for key in jax.random.split(jax.random.key(0), 4))
  marker = jax.jit(lambda x: lax.population_count(x))  # a kernel of its own name
  bits = jnp.arange(1024, dtype=jnp.uint32)
  args = (q, k, v, *extra) if forward else (q, k, v, cot, *extra)
  jax.block_until_ready(step(*args))  # compiles
  for _ in range(steps):
    jax.block_until_ready(marker(bits))
    jax.block_until_ready(step(*args))


MARKER = "popcnt"
"""In the name of the marker kernel that run_steps launches before each step."""


def summarize(path: str, steps: int) -> list[tuple[str, int, float]]:
  """[(kernel name, calls, total us)] of the last step in an ncu --csv log, largest first."""
  with open(path) as f:
    lines = [line for line in f if line.startswith('"')]  # skip ncu's own messages
  rows = [r for r in csv.DictReader(lines) if r.get("Metric Name") == "gpu__time_duration.sum"]
  scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}
  times = [(r["Kernel Name"], float(r["Metric Value"].replace(",", "")) *
            scale[r["Metric Unit"]]) for r in rows]
  markers = [i for i, (name, _) in enumerate(times) if MARKER in name]
  if len(markers) != steps:
    raise ValueError(f"expected {steps} marker kernels ({MARKER}) in {path}, "
                     f"found {len(markers)}")
  last = times[markers[-1] + 1:]
  total = collections.defaultdict(float)
  calls = collections.Counter()
  for name, us in last:
    total[name] += us
    calls[name] += 1
  return sorted(((n, calls[n], total[n]) for n in total), key=lambda x: -x[2])


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--forward", action="store_true", help="the forward alone")
  p.add_argument("--head-dim", type=int, default=128, help="D (default 128)")
  p.add_argument("--summarize", default=None, help="an ncu --csv log to summarize")
  args = p.parse_args()
  if args.summarize is None:
    run_steps(args.steps, forward=args.forward, head_dim=args.head_dim)
    return
  table = summarize(args.summarize, args.steps)
  for name, calls, us in table:
    print(f"{us:9.1f} us  {calls:3d}x  {name[:110]}")
  print(f"{sum(us for _, _, us in table):9.1f} us  total of the last step")


if __name__ == "__main__":
  main()
