"""Device timing for JAX functions, shared by the benchmark and tuning scripts."""

from __future__ import annotations

import time
from typing import Callable

import jax
import numpy as np

CALLS_PER_SAMPLE = 10


def median_ms(fn: Callable, *args, warmup: int = 3, reps: int = 20,
              calls: int = CALLS_PER_SAMPLE) -> float:
  """Median device time of fn(*args) in ms.

  Each sample dispatches `calls` calls back to back and waits for the last,
  so host dispatch overlaps device work, as in a training loop; the first
  warm-up call compiles.
  """
  for _ in range(max(1, warmup)):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) * 1e3 / calls)
  return float(np.median(times))
