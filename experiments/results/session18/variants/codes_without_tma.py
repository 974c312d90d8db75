# Session 18 (perf_notes entry 34): run from the repository root at 54b3210 (or with the
# session's tensor_core_ids.patch applied, for codes_without_tma.py); writes .whl/v_*.py,
# modules for fwd_probe.py --baseline.
import sys
s = open("pallas_kernels/mosaic_persistent.py").read()
def rep(old, new):
  global s
  assert s.count(old) == 1, old
  s = s.replace(old, new)
rep('''          copy_kv_tile((k_ref, v_ref, kv_seg_ref, kv_pos_ref, codes_ref),
                       (k_smem, v_smem, kv_ids_smem, codes_smem), kv_ready.at[slot], slot,''',
'''          copy_kv_tile((k_ref, v_ref, kv_seg_ref, kv_pos_ref),
                       (k_smem, v_smem, kv_ids_smem), kv_ready.at[slot], slot,''')
rep('''      plgpu.Barrier(num_arrivals=5, num_barriers=stages),''', '''      plgpu.Barrier(num_arrivals=4, num_barriers=stages),''')
rep('''    # The pingpong consumers' meeting point (docstring); nothing without it.''',
    '''    @pl.when(wg == 0)
    def _zero_codes():
      for st in range(num_stages):
        codes_smem.at[st][...] = plgpu.layout_cast(jnp.zeros((block_k, 16), jnp.bfloat16), plgpu.Layout.WGMMA)
      plgpu.commit_smem()

    # The pingpong consumers' meeting point (docstring); nothing without it.''')
open(".whl/v_codes_notma.py", "w").write(s)
