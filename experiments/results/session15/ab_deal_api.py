"""Two deals of the persistent kernels' work items, through the public API: plans made
by make_attention_plan (dealt by load) under two settings of mosaic_persistent, the
forward and forward+backward timed in interleaved rounds (the forwards' rounds, then
the forward+backward ones), on bench_attention's main shape. Session 15, perf_notes
entry 31.

  ab_deal_api.py rebalance [--gqa] [--seeds 0,1]   swaps (REBALANCE_SWEEPS) vs none
  ab_deal_api.py model [--gqa] [--seeds 0,1]       the load model with the consumers'
                                                    skipped halves vs session 14's
"""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, ".")
from experiments import timing  # noqa: E402
from experiments.fwd_probe import _patched  # noqa: E402
from experiments.layouts import packed_segment_ids  # noqa: E402
from jpack import attention  # noqa: E402
from pallas_kernels import mosaic_persistent  # noqa: E402

COMPARISONS = {  # name -> {variant: mosaic_persistent attributes}, baseline first
    "rebalance": {"unbalanced": dict(REBALANCE_SWEEPS=0), "rebalanced": {}},
    "model": {"session14_model": dict(ITEM_COST=6, FULL_TILE_COST=20, MASKED_TILE_COST=23,
                                      SKIPPED_HALF_COST=0),
              "skipped_halves_model": {}},
}
comparison = COMPARISONS[sys.argv[1]]
gqa = "--gqa" in sys.argv
seeds = [int(s) for s in (sys.argv[sys.argv.index("--seeds") + 1].split(",")
                          if "--seeds" in sys.argv else ["0"])]
B, T, H, D = 4, 8192, 16, 128
KV = 4 if gqa else 16
keys = jax.random.split(jax.random.key(0), 4)
q = jax.random.normal(keys[0], (B, T, H, D), jnp.bfloat16)
k, v = (jax.random.normal(kk, (B, T, KV, D), jnp.bfloat16) for kk in keys[1:3])
cot = jax.random.normal(keys[3], (B, T, H, D), jnp.bfloat16)


def plan_with(seg, settings):
  with _patched(mosaic_persistent, **settings):
    return jax.jit(lambda seg: attention.make_attention_plan(q, k, segment_ids=seg))(seg)


attend = lambda q, k, v, plan: attention.flash_attention(q, k, v, plan=plan)  # noqa: E731
fwd = jax.jit(attend)
grad = jax.jit(jax.grad(lambda q, k, v, c, plan: jnp.sum(
    attend(q, k, v, plan).astype(jnp.float32) * c.astype(jnp.float32)), argnums=(0, 1, 2)))
for seed in seeds:
  seg = jnp.asarray(packed_segment_ids(B, T, mean_len=1024.0, seed=seed))
  plans = {name: plan_with(seg, settings) for name, settings in comparison.items()}
  base, new = plans
  outs = {}
  for name, plan in plans.items():
    for _ in range(3):
      outs[name] = (jax.block_until_ready(fwd(q, k, v, plan)),
                    jax.block_until_ready(grad(q, k, v, cot, plan)))
  same = all(np.array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))
             for a, b in zip(jax.tree.leaves(outs[base]), jax.tree.leaves(outs[new])))
  for part, fn, args in (("fwd", fwd, (q, k, v)), ("fwd_bwd", grad, (q, k, v, cot))):
    samples = timing.interleaved_samples({n: (fn, (*args, p)) for n, p in plans.items()},
                                         reps=30)
    ratio = timing.quantiles(timing.round_ratios(samples[new], samples[base]))
    print(json.dumps({"part": part, "seed": seed, "gqa": gqa, "bitwise_equal": same,
                      **{n: round(timing.quantiles(s)[1], 4) for n, s in samples.items()},
                      f"{new}_vs_{base}": [round(x, 4) for x in ratio]}), flush=True)
