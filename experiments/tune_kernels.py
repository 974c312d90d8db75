"""Sweep kernel tilings on a GPU: check each against the reference, then time it.

    python experiments/tune_kernels.py --kernel forward --head-dim 128
    python experiments/tune_kernels.py --kernel all

Prints one line per candidate: tiling, relative error on a small case, median
forward and forward+backward ms on the benchmark layout (B=4, T=8192, H=16).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np

from experiments.layouts import causal_doc_flops, packed_segment_ids
from experiments.timing import median_ms
from jpack.attention import KernelConfig, TileConfig, flash_attention, reference_attention


def inputs(key, batch, seq, heads, kv_heads, head_dim, dtype):
  kq, kk, kv, kg = jax.random.split(key, 4)
  q = jax.random.normal(kq, (batch, seq, heads, head_dim), dtype)
  k = jax.random.normal(kk, (batch, seq, kv_heads, head_dim), dtype)
  v = jax.random.normal(kv, (batch, seq, kv_heads, head_dim), dtype)
  do = jax.random.normal(kg, (batch, seq, heads, head_dim), dtype)
  return q, k, v, do


def functions(config, seg):
  def fwd(q, k, v):
    return flash_attention(q, k, v, segment_ids=seg, implementation="pallas",
                           config=config)

  def fwd_bwd(q, k, v, do):
    out, vjp = jax.vjp(fwd, q, k, v)
    return out, vjp(do)

  return jax.jit(fwd), jax.jit(fwd_bwd)


def rel(a, b):
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def check(config, head_dim, kv_heads_div):
  """Max relative error (out, dq, dk, dv) vs the reference on a small bf16 case."""
  seg = jnp.asarray(packed_segment_ids(1, 2048, seed=1, mean_len=256))
  q, k, v, do = inputs(jax.random.key(7), 1, 2048, 4, 4 // kv_heads_div,
                       head_dim, jnp.bfloat16)
  fwd, fwd_bwd = functions(config, seg)
  out, grads = fwd_bwd(q, k, v, do)
  ref = lambda q, k, v: reference_attention(q, k, v, segment_ids=seg)
  ref_out, vjp = jax.vjp(ref, q, k, v)
  ref_grads = vjp(do)
  errs = [rel(out, ref_out)] + [rel(a, b) for a, b in zip(grads, ref_grads)]
  return max(errs)


def candidates(kernel, head_dim):
  base = KernelConfig.for_head_dim(head_dim)
  blocks = [(128, 128), (128, 64), (64, 64), (64, 128), (128, 32), (64, 32), (32, 64)]
  warps, stages = [4, 8], [2, 3]
  kernels = ["forward", "dq", "dkdv"] if kernel == "all" else [kernel]
  yield base
  for name in kernels:
    for (bm, bn), w, s in itertools.product(blocks, warps, stages):
      tile = TileConfig(bm, bn, num_warps=w, num_stages=s)
      if tile != getattr(base, name):
        yield dataclasses.replace(base, **{name: tile})


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--kernel", default="all", choices=["forward", "dq", "dkdv", "all"])
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=8192)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--gqa", type=int, default=1, help="q heads per kv head")
  p.add_argument("--limit", type=int, default=1000, help="max candidates")
  p.add_argument("--out", default=None, help="write JSON lines here")
  args = p.parse_args()
  seg = jnp.asarray(packed_segment_ids(args.batch, args.seq))
  flops = causal_doc_flops(np.asarray(seg), args.heads, args.head_dim)
  q, k, v, do = inputs(jax.random.key(0), args.batch, args.seq, args.heads,
                       args.heads // args.gqa, args.head_dim, jnp.bfloat16)
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, useful fwd "
        f"GFLOP {flops / 1e9:.1f}", flush=True)
  out = open(args.out, "w") if args.out else None
  for config in itertools.islice(candidates(args.kernel, args.head_dim), args.limit):
    try:
      err = check(config, args.head_dim, args.gqa)
      fwd, fwd_bwd = functions(config, seg)
      t_f = median_ms(fwd, q, k, v)
      # A forward-only sweep leaves the backward untimed (its tiling is fixed).
      t_fb = (float("nan") if args.kernel == "forward"
              else median_ms(fwd_bwd, q, k, v, do))
    except Exception as e:  # a tiling the compiler rejects: report, go on
      print(f"{config}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
      continue
    row = dict(config=str(config), err=err, fwd_ms=t_f, fwd_bwd_ms=t_fb,
               fwd_tflops=flops / t_f / 1e9, fwd_bwd_tflops=3.5 * flops / t_fb / 1e9)
    print(f"fwd {t_f:7.3f} ms  fwd+bwd {t_fb:7.3f} ms  err {err:.1e}  {config}",
          flush=True)
    if out:
      out.write(json.dumps(row) + "\n")
      out.flush()


if __name__ == "__main__":
  main()
