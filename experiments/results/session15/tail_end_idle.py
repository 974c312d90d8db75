"""End idle of the persistent forward's CTAs from a tail_variant profile (fwd_probe
--profile with session14/tail_variant.py as --baseline): per CTA, when its consumers
reach c_done; idle = mean over CTAs of (last end - CTA end) / last end. Also the
per-item costs fitted on the trace and the model's spread, for the items dealt with
and without the rebalancing swaps. The item tables are made again with this checkout's
mosaic_persistent: run it with the code that the profile ran. Usage:
tail_end_idle.py PROFILE_DIR."""
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

CYCLES_PER_TS = 1980 / 2.1  # the profiler's timestamps in cycles at 1980 MHz
seg = jnp.asarray(fp.layout("packed", 0, 4)[0])
pos = jnp.broadcast_to(jnp.arange(8192, dtype=jnp.int32), (4, 8192))
plan = masks.make_tile_plan(seg, seg, pos, pos, block_q=128, block_k=128, causal=True,
                            sliding_window=None)
for path in sorted(glob.glob(f"{sys.argv[1]}/packed-*load*/*.json")):
  sweeps = 0 if "unbalanced" in path else mp.REBALANCE_SWEEPS
  with fp._patched(mp, REBALANCE_SWEEPS=sweeps):
    table = np.asarray(mp.work_items(plan.q_ranges, 16, plan.q_compares, spans=plan.q_spans,
                                     dealing="load", num_ctas=132).table)
  events = json.load(open(path))["traceEvents"]
  t0 = min(e["ts"] for e in events if "ts" in e)
  by = collections.defaultdict(list)
  for e in events:
    if e.get("ph") in ("B", "E"):
      by[(e["pid"], e["tid"])].append(e)
  end, rows = collections.defaultdict(list), []
  for (pid, tid), es in by.items():
    es.sort(key=lambda e: e["ts"])
    starts = [e["ts"] for e in es if e["name"] == "c_wait_q" and e["ph"] == "B"]
    done = [e["ts"] for e in es if e["name"] == "c_done" and e["ph"] == "B"]
    if not done:
      continue
    cta = (tid - 1) // 3
    end[cta].append((done[0] - t0) * CYCLES_PER_TS)
    marks = starts + done
    for n in range(len(starts)):
      b, qt, h, lo, flo, fhi, hi = table[cta + n * 132][:7]
      full = max(fhi - flo, 0)
      rows.append(((marks[n + 1] - marks[n]) * CYCLES_PER_TS, full, max(hi - lo, 0) - full))
  e = np.array([np.mean(v) for v in end.values()])
  a = np.array([r for r in rows if r[1] + r[2] > 0], float)
  coef = np.linalg.lstsq(np.c_[np.ones(len(a)), a[:, 1:]], a[:, 0], rcond=None)[0]
  print(f"{'unbalanced' if sweeps == 0 else 'rebalanced'}: {len(e)} CTAs, end idle "
        f"{np.mean(e.max() - e) / e.max():.4f} of the kernel, slowest / median end "
        f"{e.max() / np.median(e):.4f}, fastest / median {e.min() / np.median(e):.4f}; "
        f"fitted cycles item/full/masked {coef.round(0)}")
