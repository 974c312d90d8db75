"""Lower a mosaic_persistent variant for CUDA on this CPU machine: python lower_variant.py PATH"""
import sys, time
import jax, jax.numpy as jnp, numpy as np
sys.path[:0] = [".", "tests"]
from experiments import fwd_probe, layouts
from test_mosaic import mosaic_forward
from pallas_kernels import mosaic_attention
path = sys.argv[1]
mod = None if path == "main" else fwd_probe.load_baseline(path, "variant_mod")
B, T, H, D = 1, 1024, 2, 128
seg = jnp.asarray(layouts.packed_segment_ids(B, T, seed=0, mean_len=300))
pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
x = jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16)
t0 = time.time()
with fwd_probe.persistent_kernel_of(mod):
  f = jax.jit(lambda q, k, v, s, p: mosaic_forward(q, k, v, s, s, p, p, causal=True, window=None,
      scale=D**-0.5, tile=mosaic_attention.DEFAULT_TILE, schedule="persistent-pingpong", dealing="load"))
  low = f.trace(x, x, x, seg, pos).lower(lowering_platforms=("cuda",))
print(path, "lowered in %.1f s" % (time.time() - t0), len(low.as_text()))
