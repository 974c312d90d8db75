# Tail variant of HEAD's persistent kernel: only "c_wait_q" and a final "c_done" scope.
src = open("pallas_kernels/mosaic_persistent.py").read()
src = src.replace("jax.named_scope(", "_scope(")
old = """    flush(pending)
    if sched:
      pl.when(wg == 0)(meet)  # pairs with consumer 1's last one
    plgpu.wait_smem_to_gmem(0)
"""
assert src.count(old) == 1
src = src.replace(old, """    with jax.named_scope("c_done"):
      flush(pending)
      if sched:
        pl.when(wg == 0)(meet)  # pairs with consumer 1's last one
      plgpu.wait_smem_to_gmem(0)
""")
src = src.replace("\n\ndef persistent_forward(", '''

def _scope(name):
  import contextlib
  return jax.named_scope(name) if name == "c_wait_q" else contextlib.nullcontext()


def persistent_forward(''', 1)
open(".whl/d_tail.py", "w").write(src)
