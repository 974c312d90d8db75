"""Session 16 (needs load_claims.patch, beside this file, applied): a CPU model of the
persistent forward's end on the main packed layout (B=4, T=8192, 16 heads, 132 CTAs)
with items dealt "load" or "load+claims" (the last CLAIMED_ROUNDS rounds claimed at
run time, costliest first).

Item times in cycles: session 15's fit (perf_notes entry 31: 1930 per item, 2732 per
full tile, 3043 per masked one, -454 per skipped half tile), times (1 + e), e a
per-item residual of 2% systematic and 2% run-to-run noise (about entry 31's 926 and
700 cycles on a mean item of ~40000). Each CTA runs its items back to back and claims
item n + 2 at the start of item n (as the kernel's producer does, claims "start") or
at its end (load_claims_late.patch, claims "end"). Prints the makespan relative to
"load" and the CTAs' idle share at the end (mean over CTAs of (last end - own end) /
last end), averaged over 10 noise draws.
"""
import heapq
import sys

import numpy as np
import jax.numpy as jnp

sys.path.insert(0, ".")
from experiments.layouts import packed_segment_ids  # noqa: E402
from jpack import masks  # noqa: E402
from pallas_kernels import mosaic_persistent as mp  # noqa: E402

B, T, H, CTAS = 4, 8192, 16, 132


def item_cycles(plan):
  r = np.asarray(plan.q_ranges)
  lo, flo, fhi, hi = (r[..., i] for i in range(4))
  full = np.maximum(fhi - flo, 0)
  masked = np.maximum(hi - lo, 0) - full
  skipped = np.asarray(mp._skipped_halves(plan.q_spans))
  c = np.where(hi > lo, 1930 + 2732 * full + 3043 * masked - 454 * skipped, 0)
  return np.broadcast_to(c[:, None, :], (B, H, r.shape[1])).reshape(-1).astype(float)


def run(positions, start, busy, times, claim_at):
  """(makespan, end idle) of CTAs walking `positions`: dealt rows < start, then claims."""
  row_time = np.zeros(len(times))
  row_time[positions] = times
  dealt = start // CTAS
  pending, clock = [], np.zeros(CTAS)  # pending: (claim time, cta, item n) in time order
  for c in range(CTAS):
    t = 0.0
    for n in range(dealt):
      begin, t = t, t + row_time[c + n * CTAS]
      if n + 2 >= dealt:
        heapq.heappush(pending, (begin if claim_at == "start" else t, c, n + 2))
    for n in range(min(dealt, 2), 2):  # items 0 and 1 claimed before the loop
      heapq.heappush(pending, (0.0, c, n))
    clock[c] = t
  next_row = start
  while pending:
    t_claim, c, n = heapq.heappop(pending)
    if next_row >= busy:
      continue
    row, next_row = next_row, next_row + 1
    begin = max(clock[c], t_claim)
    clock[c] = begin + row_time[row]
    heapq.heappush(pending, (begin if claim_at == "start" else clock[c], c, n + 2))
  return clock.max(), np.mean(clock.max() - clock) / clock.max()


def main():
  rng = np.random.default_rng(0)
  for seed in (0, 1):
    seg = jnp.asarray(packed_segment_ids(B, T, mean_len=1024.0, seed=seed))
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), seg.shape)
    plan = masks.make_tile_plan(seg, seg, pos, pos, block_q=128, block_k=128, causal=True,
                                sliding_window=None)
    base = item_cycles(plan)
    systematic = rng.normal(0, 0.02, base.shape)
    draws = [base * (1 + systematic + rng.normal(0, 0.02, base.shape)) for _ in range(10)]
    busy = int((base > 0).sum())
    positions = np.asarray(mp.reading_positions(plan.q_ranges, H, CTAS, spans=plan.q_spans,
                                                dealing="load"))
    load = np.mean([run(positions, busy, busy, t, "start") for t in draws], axis=0)
    line = [f"seed {seed}: load end idle {load[1]:.4f};"]
    for rounds in (2, 4, 6, 8, 10, 16):
      mp.CLAIMED_ROUNDS = rounds
      positions = np.asarray(mp.reading_positions(plan.q_ranges, H, CTAS, spans=plan.q_spans,
                                                  dealing="load+claims"))
      start = int(mp.claims_start(jnp.int32(busy), CTAS))
      for claim_at in ("start", "end"):
        span, idle = np.mean([run(positions, start, busy, t, claim_at) for t in draws], axis=0)
        line.append(f"{rounds} rounds, claims at {claim_at}: {span / load[0]:.4f} ({idle:.4f})")
    print(" ".join(line))


if __name__ == "__main__":
  main()
