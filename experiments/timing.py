"""Device timing for JAX functions, shared by the benchmark and tuning scripts."""

from __future__ import annotations

import time
from typing import Callable, Mapping

import jax
import numpy as np

CALLS_PER_SAMPLE = 10


def sample_ms(fn: Callable, args: tuple, calls: int = CALLS_PER_SAMPLE) -> float:
  """ms per call of `calls` calls of fn(*args) dispatched back to back.

  Waits only for the last call, so host dispatch overlaps device work, as in
  a training loop.
  """
  start = time.perf_counter()
  for _ in range(calls):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) * 1e3 / calls


def median_ms(fn: Callable, *args, warmup: int = 3, reps: int = 20,
              calls: int = CALLS_PER_SAMPLE) -> float:
  """Median over `reps` samples (sample_ms) of fn(*args), after `warmup` calls
  (the first compiles)."""
  for _ in range(max(1, warmup)):
    jax.block_until_ready(fn(*args))
  return float(np.median([sample_ms(fn, args, calls) for _ in range(reps)]))


def interleaved_samples(timed: Mapping[str, tuple[Callable, tuple]], reps: int,
                        calls: int = CALLS_PER_SAMPLE) -> dict[str, list[float]]:
  """`reps` samples (sample_ms) of each entry's fn(*args), taken in rounds.

  timed: name -> (fn, args), already compiled (warmed up) by the caller.
  Round r samples every entry once, starting at entry r mod n, so that drifts
  of the GPU's clock (boost, power, temperature) fall on all entries alike
  and sample r of two entries can be compared (round_ratios). Returns name ->
  list of `reps` ms.
  """
  names = list(timed)
  samples = {name: [] for name in names}
  for r in range(reps):
    for i in range(len(names)):
      name = names[(r + i) % len(names)]
      fn, args = timed[name]
      samples[name].append(sample_ms(fn, args, calls))
  return samples


def round_ratios(samples: list[float], baseline: list[float]) -> list[float]:
  """samples[r] / baseline[r] for each round r of interleaved_samples."""
  if len(samples) != len(baseline):
    raise ValueError(f"samples ({len(samples)}) and baseline ({len(baseline)}) must come "
                     "from the same rounds")
  return [a / b for a, b in zip(samples, baseline)]


def quantiles(values: list[float]) -> tuple[float, float, float]:
  """(10th percentile, median, 90th percentile) of values."""
  p10, p50, p90 = np.percentile(np.asarray(values, np.float64), (10, 50, 90))
  return float(p10), float(p50), float(p90)
