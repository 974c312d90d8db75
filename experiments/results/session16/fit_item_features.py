"""Session 16: per-item times of the persistent forward (B=4 packed profiles of
session14/tail_variant.py's kernel: fwd_probe --profile, seeds 0, 0 again, 1) against
item features, to find what the load model (_item_costs) misses. Usage:
fit_item_features.py DIR_SEED0_A DIR_SEED0_B DIR_SEED1 (profile directories)."""
import collections
import glob
import json
import sys

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, ".")
from experiments import fwd_probe as fp  # noqa: E402
from jpack import masks  # noqa: E402
from pallas_kernels import mosaic_persistent as mp  # noqa: E402
from pallas_kernels.config import COMPARE_SPLIT_BITS  # noqa: E402

CYCLES_PER_TS = 1980 / 2.1
CTAS, H = 132, 16


def plan_of(seed):
  seg = jnp.asarray(fp.layout("packed", seed, 4)[0])
  pos = jnp.broadcast_to(jnp.arange(8192, dtype=jnp.int32), (4, 8192))
  return masks.make_tile_plan(seg, seg, pos, pos, block_q=128, block_k=128, causal=True,
                              sliding_window=None)


def features(row, n):
  """Feature vector of one table row (b, qt, h, lo, flo, fhi, hi, compares, spans)."""
  _, _, _, lo, flo, fhi, hi, comp, spans = (int(x) for x in row)
  full = max(fhi - flo, 0)
  ids_len, pos_len = comp & (2**COMPARE_SPLIT_BITS - 1), comp >> COMPARE_SPLIT_BITS
  kinds = collections.Counter()
  for j in range(lo, hi):
    if flo <= j < fhi:
      continue
    kinds["ids" if j < lo + ids_len else "pos" if j >= hi - pos_len else "both"] += 1
  skipped = halves = 0
  for g in range(2):
    span = (spans >> (16 * g)) & 0xFFFF
    front, back = span & 0xFF, span >> 8
    skipped += front // 2 + back // 2
    halves += front % 2 + back % 2
  return dict(one=1, full=full, both=kinds["both"], ids=kinds["ids"], pos=kinds["pos"],
              skipped=skipped, halves=halves, first_full=int(flo <= lo < fhi),
              round0=int(n == 0))


def item_times(profile_dir, table):
  """[(features, cycles)] of every busy item in a profile (two consumers averaged)."""
  path, = glob.glob(f"{profile_dir}/*/*.json")
  events = json.load(open(path))["traceEvents"]
  t0 = min(e["ts"] for e in events if "ts" in e)
  by = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "B":
      by[(e["pid"], e["tid"])].append(e)
  per_item = collections.defaultdict(list)
  for (_, tid), es in by.items():
    es.sort(key=lambda e: e["ts"])
    starts = [e["ts"] for e in es if e["name"] == "c_wait_q"]
    done = [e["ts"] for e in es if e["name"] == "c_done"]
    if not done:
      continue
    cta = (tid - 1) // 3
    marks = starts + done[:1]
    for n in range(len(starts)):
      per_item[(cta, n)].append((marks[n + 1] - marks[n]) * CYCLES_PER_TS)
  rows = []
  for (cta, n), ts in per_item.items():
    row = table[cta + n * CTAS]
    rows.append((tuple(int(x) for x in row[:3]), features(row, n), float(np.mean(ts))))
  return rows


def main():
  names = ["one", "full", "both", "ids", "pos", "skipped", "halves", "first_full", "round0"]
  sets = []
  for d, seed in zip(sys.argv[1:4], (0, 0, 1)):
    plan = plan_of(seed)
    table = np.asarray(mp.work_items(plan.q_ranges, H, plan.q_compares, spans=plan.q_spans,
                                     dealing="load", num_ctas=CTAS).table)
    rows = item_times(d, table)
    x = np.array([[f[k] for k in names] for _, f, _ in rows], float)
    y = np.array([t for _, _, t in rows])
    sets.append((dict((k, i) for i, (k, _, _) in enumerate(rows)), x, y))
    print(d, len(rows), "items, mean", y.mean().round(0))
  (_, xa, ya), (keys_b, xb, yb), (_, x1, y1) = sets
  keys_a = sets[0][0]
  # Noise: the same items in the two seed-0 profiles.
  common = [k for k in keys_a if k in keys_b]
  da = np.array([ya[keys_a[k]] - yb[keys_b[k]] for k in common])
  print(f"run-to-run: std of (a - b) / sqrt 2 = {da.std() / np.sqrt(2):.0f} cycles")
  models = {
      "session15 (item, full, masked, skipped halves)": (
          ["one", "full", "masked", "halves_all"], None),
      "compares split": (["one", "full", "both", "ids", "pos", "halves_all"], None),
      "all features": (names, None),
  }
  def cols(x, want):
    col = dict((k, x[:, i]) for i, k in enumerate(names))
    col["masked"] = col["both"] + col["ids"] + col["pos"]
    col["halves_all"] = 2 * col["skipped"] + col["halves"]
    return np.stack([col[k] for k in want], 1)
  for title, (want, _) in models.items():
    coef = np.linalg.lstsq(cols(xa, want), ya, rcond=None)[0]
    res = lambda x, y: y - cols(x, want) @ coef  # noqa: E731
    print(f"{title}: " + ", ".join(f"{k} {c:.0f}" for k, c in zip(want, coef)))
    print(f"  residual std: fit {res(xa, ya).std():.0f}, repeat {res(xb, yb).std():.0f}, "
          f"seed 1 {res(x1, y1).std():.0f}")
    ra, rb = res(xa, ya), res(xb, yb)
    both = [(ra[keys_a[k]], rb[keys_b[k]]) for k in common]
    print(f"  residual correlation across the two seed-0 profiles: "
          f"{np.corrcoef(np.array(both).T)[0, 1]:.3f}")


if __name__ == "__main__":
  main()


def decompose(profile_dir, seed):
  """Share of the residual variance (all features) that CTA, round and head means explain."""
  names = ["one", "full", "both", "ids", "pos", "skipped", "halves", "first_full", "round0"]
  plan = plan_of(seed)
  table = np.asarray(mp.work_items(plan.q_ranges, H, plan.q_compares, spans=plan.q_spans,
                                   dealing="load", num_ctas=CTAS).table)
  path, = glob.glob(f"{profile_dir}/*/*.json")
  rows = item_times(profile_dir, table)
  x = np.array([[f[k] for k in names] for _, f, _ in rows], float)
  y = np.array([t for _, _, t in rows])
  res = y - x @ np.linalg.lstsq(x, y, rcond=None)[0]
  where = {tuple(int(v) for v in table[p][:3]): p for p in range(len(table))}
  pos = np.array([where[k] for k, _, _ in rows])
  groups = {"cta": pos % CTAS, "round": pos // CTAS,
            "head (b, h)": np.array([k[0] * H + k[2] for k, _, _ in rows])}
  for name, g in groups.items():
    means = np.bincount(g, res) / np.maximum(np.bincount(g), 1)
    print(f"{profile_dir} {name}: explains {np.var(means[g]) / np.var(res):.3f} of the "
          f"residual variance (std of the group means {means[np.bincount(g) > 0].std():.0f})")
  return res, pos
