"""(Needs load_claims.patch or load_claims_late.patch, beside this file, applied: the
logs ab_claims_*.log and ab_claims_late_packed.log.) The persistent forward's work
items dealt by load vs by load with the last rounds
claimed at run time ("load+claims", mosaic_persistent.CLAIMED_ROUNDS), through the
public API on bench_attention's main shape: plans from make_attention_plan, whose
forward items are remade under each setting; forwards (and, with --fwd-bwd,
forward+backward) timed in interleaved rounds, ratios per round to "load". Session 16,
perf_notes entry 32.

  ab_claims_api.py [--seeds 0,1] [--rounds 10,16] [--dynamic] [--layout packed|full]
                   [--fwd-bwd]
--dynamic adds the forward's items all claimed (dealing "dynamic", as in a call
without a plan).
"""
import dataclasses
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


def arg(name, default):
  return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


seeds = [int(s) for s in arg("--seeds", "0").split(",")]
claimed_rounds = [int(s) for s in arg("--rounds", "10").split(",")]
layout = arg("--layout", "packed")
B, T, H, D = 4, 8192, 16, 128
keys = jax.random.split(jax.random.key(0), 4)
q, k, v, cot = (jax.random.normal(kk, (B, T, H, D), jnp.bfloat16) for kk in keys)
VARIANTS = {"load": ("load", None),
            **{f"claims{r}": ("load+claims", r) for r in claimed_rounds},
            **({"dynamic": ("dynamic", None)} if "--dynamic" in sys.argv else {})}


def plan_with(seg, dealing, rounds):
  def make(seg):
    plan = attention.make_attention_plan(q, k, segment_ids=seg)
    tiles = attention._mosaic_work_items(plan, q.dtype, dealing, "load")
    return dataclasses.replace(plan, tiles=tiles)
  settings = {} if rounds is None else dict(CLAIMED_ROUNDS=rounds)
  with _patched(mosaic_persistent, **settings):
    return jax.jit(make)(seg)


attend = lambda q, k, v, plan: attention.flash_attention(q, k, v, plan=plan)  # noqa: E731
fwd = jax.jit(attend)
grad = jax.jit(jax.grad(lambda q, k, v, c, plan: jnp.sum(
    attend(q, k, v, plan).astype(jnp.float32) * c.astype(jnp.float32)), argnums=(0, 1, 2)))
parts = [("fwd", fwd, (q, k, v))] + ([("fwd_bwd", grad, (q, k, v, cot))]
                                     if "--fwd-bwd" in sys.argv else [])
for seed in seeds:
  seg = (jnp.ones((B, T), jnp.int32) if layout == "full" else
         jnp.asarray(packed_segment_ids(B, T, mean_len=1024.0, seed=seed)))
  plans = {name: plan_with(seg, *setting) for name, setting in VARIANTS.items()}
  claims = {n: [int(x) for x in p.tiles.forward_items.claims]
            for n, p in plans.items() if p.tiles.forward_items.dynamic}
  for part, fn, args in parts:
    outs = {}
    for name, plan in plans.items():
      for _ in range(3):
        outs[name] = jax.block_until_ready(fn(*args, plan))
    same = {n: all(np.array_equal(np.asarray(a.astype(jnp.float32)),
                                  np.asarray(b.astype(jnp.float32)))
                   for a, b in zip(jax.tree.leaves(o), jax.tree.leaves(outs["load"])))
            for n, o in outs.items()}
    samples = timing.interleaved_samples({n: (fn, (*args, p)) for n, p in plans.items()},
                                         reps=30)
    print(json.dumps({
        "part": part, "layout": layout, "seed": seed, "claims": claims,
        "bitwise_equal": same,
        "ms": {n: round(timing.quantiles(s)[1], 4) for n, s in samples.items()},
        "vs_load": {n: [round(x, 4) for x in timing.quantiles(
            timing.round_ratios(s, samples["load"]))] for n, s in samples.items()
            if n != "load"}}), flush=True)
