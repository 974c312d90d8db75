"""Session 24: the claimed ("dynamic") forward at D = 256 on 128 x 64 tiles (one Q buffer
pair, schedule "persistent") by WINDOW_ROUNDS x tail, against "load" (session 23's
dyn_sweep.py with the new tile and schedule).

    PYTHONPATH=. python experiments/results/session24/dyn_sweep.py"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, ".")
from experiments import fwd_probe, timing
from experiments.fwd_probe import HEADS, SEQ_LEN, layout
from jpack import masks
from pallas_kernels import mosaic_attention, mosaic_common, mosaic_persistent as mp
from pallas_kernels.config import TileConfig

D = 256
tile = mosaic_common.WIDE_HEAD_FORWARD_TILE
B = 4
keys = jax.random.split(jax.random.key(0), 3)
q, k, v = (jax.random.normal(key, (B, SEQ_LEN, HEADS, D), jnp.bfloat16) for key in keys)
pos = jnp.broadcast_to(jnp.arange(SEQ_LEN, dtype=jnp.int32), (B, SEQ_LEN))
seg_np, causal = layout("packed", batch=B)
seg = jnp.asarray(seg_np)
plan = masks.make_tile_plan(seg, seg, pos, pos, block_q=tile.block_major, block_k=tile.block_minor,
                            causal=causal, sliding_window=None)
fn = fwd_probe.kernel(tile, "persistent", D ** -0.5, causal)
configs = [("load", 1, 0.3)] + [("dynamic", 1, t) for t in (0.0, 0.05, 0.1, 0.2, 0.3)] + [
    ("dynamic", 2, t) for t in (0.0, 0.1)]
timed, outs = {}, {}
for dealing, w, t in configs:
  mp.WINDOW_ROUNDS = w
  items = mp.work_items(plan.q_ranges, HEADS, plan.q_compares, spans=plan.q_spans, dealing=dealing,
                        coded_ids=(seg, seg, tile.block_minor), tail=t)
  name = f"{dealing} w{w} t{t}"
  args = (q, k, v, seg, pos, plan.q_ranges, None, None, items)
  outs[name] = np.asarray(fn(*args).astype(jnp.float32))
  timed[name] = (fn, args)
samples = timing.interleaved_samples(timed, 20)
first = samples["load w1 t0.3"]
ref = outs["load w1 t0.3"]
for name, vals in samples.items():
  p10, ms, p90 = timing.quantiles(vals)
  ratio = timing.quantiles(timing.round_ratios(vals, first))[1]
  same = bool(np.array_equal(outs[name], ref))
  print(json.dumps(dict(config=name, ms=round(ms, 4), p10_p90=[round(p10, 4), round(p90, 4)], vs_load=round(ratio, 4), same_out=same)))
