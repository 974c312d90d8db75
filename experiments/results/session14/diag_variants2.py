src = open("pallas_kernels/mosaic_persistent.py").read()
def variant(name, pairs, s=None):
  s = s or src
  for old, new in pairs:
    assert s.count(old) == 1, (name, old)
    s = s.replace(old, new)
  open(f".whl/d_{name}.py", "w").write(s)
  return s
HELPER = '''

def _smem_only(acc, m, l, o_smem, lse_smem, o_gmem, lse_gmem):
  del o_gmem, lse_gmem
  from pallas_kernels.mosaic_common import LN2
  from pallas_kernels.segment_attention import EMPTY_LSE
  seen = l > 0.0
  l = jnp.where(seen, l, 1.0)
  o_smem[...] = (acc * broadcast_rows(1.0 / l, acc.shape)).astype(o_smem.dtype)
  lse_smem[...] = jnp.where(seen, m * LN2 + jnp.log(l), EMPTY_LSE)
  plgpu.commit_smem()


def persistent_forward('''
variant("notma", [("""          store_output(acc, m, l, *out_refs(buf, b, qt, h))
""", """          _smem_only(acc, m, l, *out_refs(buf, b, qt, h))
"""), ("\n\ndef persistent_forward(", HELPER)])
variant("scopes", [
  ("""          lambda n, carry: work(n0 + n, _received_row(rows, n0 + n), carry, nothing), carry)""",
   """          lambda n, carry: work(n0 + n, _scoped_row(rows, n0 + n), carry, nothing), carry)"""),
  ("""          plgpu.barrier_arrive(kv_consumed.at[slot])  # once per step, every consumer""",
   """          with jax.named_scope("c_arrive"):
            plgpu.barrier_arrive(kv_consumed.at[slot])  # once per step, every consumer"""),
  ("""      pending = lax.cond(hi > lo, attend, write_empty, pending)""",
   """      with jax.named_scope("c_cond"):
        pending = lax.cond(hi > lo, attend, write_empty, pending)"""),
  ("""        acc, m, l = three_runs(lo, full_lo, full_hi, hi, visit, carry, compares=compares,
                               start=lo + 1)""",
   """        with jax.named_scope("c_runs"):
          acc, m, l = three_runs(lo, full_lo, full_hi, hi, visit, carry, compares=compares,
                                 start=lo + 1)"""),
  ("\n\ndef persistent_forward(", '''

def _scoped_row(rows, n):
  with jax.named_scope("c_row"):
    return _received_row(rows, n)


def persistent_forward('''),
])
