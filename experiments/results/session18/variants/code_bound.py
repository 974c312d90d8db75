# Session 18 (perf_notes entry 34): run from the repository root at 54b3210 (or with the
# session's tensor_core_ids.patch applied, for codes_without_tma.py); writes .whl/v_*.py,
# modules for fwd_probe.py --baseline.
"""v_biasbound.py: main's persistent forward (padding_rows=False) with, on every masked
step, a second wgmma (k=16) of a q code [64, 16] (registers) against a zeroed code buffer
[stages, block_k, 16] (smem), and no segment-id compares: the cost side of masking the
ids on the tensor cores (results wrong: no id mask)."""
import inspect, sys
sys.path.insert(0, ".")
from pallas_kernels import mosaic_common as mc
s = open("pallas_kernels/mosaic_persistent.py").read()

def rep(old, new, count=1):
  global s
  assert s.count(old) == count, (old, s.count(old))
  s = s.replace(old, new)

# scratch: the code buffer, after the kv ids
rep('''      plgpu.SMEM((stages, 2, bk), jnp.int32),
  )
  args = (items.table''', '''      plgpu.SMEM((stages, 2, bk), jnp.int32),
      plgpu.SMEM((stages, bk, 16), jnp.bfloat16, transforms=mma_transforms(jnp.bfloat16, 32)),
  )
  args = (items.table''')
rep('''  (q_bufs, q_ids_smem, lse_smem, k_smem, v_smem, kv_ids_smem, *claimed_smem), barriers = scratch''',
    '''  (q_bufs, q_ids_smem, lse_smem, k_smem, v_smem, kv_ids_smem, code_smem, *claimed_smem), barriers = scratch''')
# zero the code buffer once (consumers), before anything
rep('''    # The pingpong consumers' meeting point (docstring); nothing without it.''',
    '''    @pl.when(wg == 0)
    def _zero_codes():
      for st in range(num_stages):
        code_smem.at[st][...] = plgpu.layout_cast(jnp.zeros((block_k, 16), jnp.bfloat16), plgpu.Layout.WGMMA)
      plgpu.commit_smem()

    # The pingpong consumers' meeting point (docstring); nothing without it.''')
# q code per item
rep('''        q_ids = tuple(row_vector(q_ids_smem.at[buf, i][...]) for i in range(2))
''', '''        q_ids = tuple(row_vector(q_ids_smem.at[buf, i][...]) for i in range(2))
        code_cols = plgpu.layout_cast(lax.broadcasted_iota(jnp.int32, (WG_ROWS, 16), 1),
                                      plgpu.Layout.WGMMA)
        q_code = jnp.where(code_cols == broadcast_rows(q_ids[0] & 15, (WG_ROWS, 16)),
                           0.0, -2.0**100).astype(jnp.bfloat16)
''')
rep('''            plgpu.wgmma(acc_ref, q_smem,
                        plgpu.transpose_ref(part(k_smem.at[slot]), (1, 0)))
''', '''            plgpu.wgmma(acc_ref, q_smem,
                        plgpu.transpose_ref(part(k_smem.at[slot]), (1, 0)))
            if masked is not False:
              plgpu.wgmma(acc_ref, q_code,
                          plgpu.transpose_ref(part(code_smem.at[slot]), (1, 0)))
''')
dm = inspect.getsource(mc.doc_mask).replace("  if compare != \"positions\":\n", "  if False:\n")
s += ("\n\n# ---- variant biasbound\nfrom pallas_kernels.mosaic_common import COMPARES, col_vector, broadcast_cols, MASKED_LOGIT\n"
      + dm + "\n" + inspect.getsource(mc.tile_doc_mask) + "\n" + inspect.getsource(mc.mask_tile) + "\n")
open(".whl/v_biasbound.py", "w").write(s)
