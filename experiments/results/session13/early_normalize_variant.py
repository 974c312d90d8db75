"""An unmeasured variant of the persistent forward for the next session (perf_notes
entry 29, Next): an item's output normalised at the item's end, the deferred store
carrying it in the output dtype.

Every kernel compiled in session 13 had one wgmma wait injected by ptxas (its C7517
note, "around line 1606" of the PTX). A likely place: the deferred store in an
item's first step reads the previous item's accumulator, registers a wgmma defined,
right after this step's QK^T issue, so ptxas waits for that QK^T first, which holds
the store, and the meeting behind it, back by the QK^T's latency once per item. Here
the item's end turns (acc, m, l) into (acc / l in the output dtype, lse): ordinary
instructions, after the PV's wait, define what the store reads (and the carried
output takes 32 registers instead of 64). Bitwise the same outputs.

Run from the repository root: writes .whl/v_early_normalize.py. Measure as
named_split_variant.py says, and check the --dump ptxas report for C7517.
"""

src = open("pallas_kernels/mosaic_persistent.py").read()

REPLACEMENTS = [
    # The deferred store writes an output normalised beforehand.
    ("""      acc, m, l, buf, b, qt, h, has = pending

      @pl.when(has == 1)
      def _store():
        with jax.named_scope("c_store"):
          store_output(acc, m, l, *out_refs(buf, b, qt, h))
""",
     """      out, lse, buf, b, qt, h, has = pending

      @pl.when(has == 1)
      def _store():
        with jax.named_scope("c_store"):
          _store_normalized(out, lse, *out_refs(buf, b, qt, h))
"""),
    ("""        return acc, m, l, buf, b, qt, h, jnp.int32(1)
""",
     """        return (*_normalized(acc, m, l, dtype), buf, b, qt, h, jnp.int32(1))
"""),
    ("""        return (zeros_acc(o_shape), *empty_row_stats(), buf, b, qt, h, jnp.int32(0))
""",
     """        return (*_normalized(zeros_acc(o_shape), *empty_row_stats(), dtype), buf, b, qt, h,
                jnp.int32(0))
"""),
    ("""    nothing = (zeros_acc(o_shape), *empty_row_stats(), *(jnp.int32(0),) * 5)
""",
     """    nothing = (*_normalized(zeros_acc(o_shape), *empty_row_stats(), dtype),
               *(jnp.int32(0),) * 5)
"""),
]
for old, new in REPLACEMENTS:
  assert src.count(old) == 1, old
  src = src.replace(old, new)

HELPER = '''

def _normalized(acc, m, l, dtype):
  """(acc / l in dtype, lse float32 [64]): store_output's values, to be stored later."""
  from pallas_kernels.mosaic_common import LN2
  from pallas_kernels.segment_attention import EMPTY_LSE
  seen = l > 0.0
  l = jnp.where(seen, l, 1.0)
  out = (acc * broadcast_rows(1.0 / l, acc.shape)).astype(dtype)
  return out, jnp.where(seen, m * LN2 + jnp.log(l), EMPTY_LSE)


def _store_normalized(out, lse, o_smem, lse_smem, o_gmem, lse_gmem):
  """store_output's stores, of values _normalized made."""
  o_smem[...] = out
  lse_smem[...] = lse
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(o_smem, o_gmem)
  plgpu.copy_smem_to_gmem(lse_smem, lse_gmem)


def persistent_forward('''
src = src.replace("\n\ndef persistent_forward(", HELPER, 1)
open(".whl/v_early_normalize.py", "w").write(src)
