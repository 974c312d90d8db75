"""Fingerprints of the Mosaic GPU kernels as lowered for CUDA, to tell which changed.

    JAX_TRACEBACK_IN_LOCATIONS_LIMIT=0 PYTHONPATH=. python experiments/kernel_fingerprints.py

Lowers (no GPU needed) every case of the lowering tests of the backward modules
(tests/test_mosaic_backward.py: dQ, dQ with delta, dK/dV; grid, persistent, split;
tests/test_mosaic_fused_backward.py) and the forward schedules on one packed
layout (at D = 128 on the default tile; the persistent ones also with one Q buffer
pair; at D = 256 on mosaic_common.WIDE_HEAD_FORWARD_TILE, the persistent one also with
its items dealt beforehand), and prints one line per kernel: its name and a hash of its StableHLO
without debug info (the Mosaic GPU module is serialized inside it). Run it at two
commits and diff the outputs: a kernel whose line is unchanged is the same
program, so GPU tests passed by it at the older commit hold at the newer one.
Cases that do not fit shared memory print their error's type (the tests expect it).
With JAX_TRACEBACK_IN_LOCATIONS_LIMIT unset, source lines still enter the hashes.
"""

from __future__ import annotations

import hashlib
import os
import sys

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", "tests")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import test_mosaic  # noqa: E402
import test_mosaic_backward  # noqa: E402
import test_mosaic_fused_backward  # noqa: E402
from experiments import layouts  # noqa: E402
from pallas_kernels import mosaic_attention, mosaic_common  # noqa: E402

FORWARD_SCHEDULES = ("serial", "pipelined", "pingpong", "persistent", "persistent-pingpong")


def fingerprint(lower) -> str:
  """12 hex digits of the lowered StableHLO of `lower()`, or the error type it raises."""
  try:
    text = lower().as_text(debug_info=False)
  except ValueError as exc:  # a tile that does not fit: the tests expect this error
    return f"error {type(exc).__name__}"
  return hashlib.sha1(text.encode()).hexdigest()[:12]


def forward_lowering(schedule: str, head_dim=128, tile=mosaic_attention.DEFAULT_TILE,
                     q_pairs=None, dealing=None):
  batch, length, heads = 1, 1024, 2
  seg = jnp.asarray(layouts.packed_segment_ids(batch, length, seed=0, mean_len=300))
  pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  x = jax.ShapeDtypeStruct((batch, length, heads, head_dim), jnp.bfloat16)
  fn = jax.jit(lambda q, k, v, s, p: test_mosaic.mosaic_forward(
      q, k, v, s, s, p, p, causal=True, window=None, scale=head_dim**-0.5,
      tile=tile, schedule=schedule, q_pairs=q_pairs, dealing=dealing))
  return lambda: fn.trace(x, x, x, seg, pos).lower(lowering_platforms=("cuda",))


def main() -> None:
  for schedule in FORWARD_SCHEDULES:
    print("forward", schedule, fingerprint(forward_lowering(schedule)), flush=True)
  for schedule in FORWARD_SCHEDULES[3:]:
    print("forward q_pairs=1", schedule, fingerprint(forward_lowering(schedule, q_pairs=1)),
          flush=True)
  for schedule in FORWARD_SCHEDULES:
    print("forward d256", schedule, fingerprint(forward_lowering(
        schedule, 256, mosaic_common.WIDE_HEAD_FORWARD_TILE)), flush=True)
  print("forward d256 persistent dealt by load", fingerprint(forward_lowering(
      "persistent", 256, mosaic_common.WIDE_HEAD_FORWARD_TILE, dealing="load")), flush=True)
  backward = test_mosaic_backward
  for case in backward.LOWER_CASES:
    for kernel in ("dq", "dq-and-delta", "dkdv"):
      for schedule in ("grid", "persistent", "split"):
        if schedule == "split" and (case, kernel) not in backward.SPLIT_LOWERINGS:
          continue
        print("backward", case.name, kernel, schedule,
              fingerprint(lambda: backward._lower(case, kernel, schedule)), flush=True)
  fused = test_mosaic_fused_backward
  for case in fused.LOWER_CASES:
    print("fused-backward", case.name, fingerprint(lambda: fused._lower(case)), flush=True)


if __name__ == "__main__":
  main()
