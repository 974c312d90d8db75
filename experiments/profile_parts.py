"""Time kernel variants on a GPU: loop modes x tilings, forward and fwd+bwd."""
import sys
import jax, jax.numpy as jnp, numpy as np
from experiments.layouts import packed_segment_ids, causal_doc_flops
from experiments.timing import median_ms
from experiments.tune_kernels import inputs, check, functions
from jpack.attention import KernelConfig, TileConfig
import pallas_kernels.segment_attention as K

B, T, H, D = 4, 8192, 16, 128
seg = jnp.asarray(packed_segment_ids(B, T))
q, k, v, do = inputs(jax.random.key(0), B, T, H, H, D, jnp.bfloat16)
flops = causal_doc_flops(np.asarray(seg), H, D)
fwd_tiles = [TileConfig(64, 64, 4, 3), TileConfig(128, 64, 4, 2), TileConfig(128, 64, 8, 2), TileConfig(128, 128, 8, 2), TileConfig(128, 32, 4, 3)]
bwd_tiles = [TileConfig(64, 64, 4, 2), TileConfig(64, 64, 4, 3), TileConfig(128, 64, 8, 2), TileConfig(64, 128, 8, 2), TileConfig(32, 64, 4, 2)]
for mode in sys.argv[1].split(","):
  K.LOOP_MODE = mode
  for ft, bt in zip(fwd_tiles, bwd_tiles):
    cfg = KernelConfig(forward=ft, dq=bt, dkdv=bt)
    err = check(cfg, D, 1)
    fwd, fwd_bwd = functions(cfg, seg)
    tf, tfb = median_ms(fwd, q, k, v), median_ms(fwd_bwd, q, k, v, do)
    print(f"{mode:6s} fwd {ft.block_major}x{ft.block_minor}/{ft.num_warps}w{ft.num_stages}s {tf:.3f} ms ({flops/tf/1e9:.0f} TF/s) | "
          f"bwd {bt.block_major}x{bt.block_minor}/{bt.num_warps}w{bt.num_stages}s fwd+bwd {tfb:.3f} ms ({3.5*flops/tfb/1e9:.0f} TF/s) err {err:.1e}", flush=True)
