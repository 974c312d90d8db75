"""Session 13's four variants of the persistent forward (A/B against this session's
kernel with fwd_probe --baseline; results in ab_*.log, perf_notes entry 29).

Run from the repository root at the commit that landed the deferred store: writes
.whl/v_{late,latesum,named,latesum_named}.py, each a copy of
pallas_kernels/mosaic_persistent.py with
  late:    the accumulator's rescale by alpha after the second meeting (before the PV);
  latesum: that, and the row sum of p under the PV's wgmma;
  named:   the rendezvous on a hardware named barrier (bar.sync 15, 256) instead of
           an mbarrier;
  latesum_named: both. None paid: see perf_notes entry 29.
"""
import re, sys
src = open("pallas_kernels/mosaic_persistent.py").read()

OLD_SOFTMAX = """            p, m_new, l, alpha = online_softmax(s, m, l, logit_scale=logit_scale)
            acc = acc * broadcast_rows(alpha, acc.shape)
          if first_step:
            release_previous_item()
          if sched:
            acc, l, m_new, p = lax.optimization_barrier((acc, l, m_new, p))
            with jax.named_scope("c_meet"):
              meet()  # softmax done; the other consumer issued its QK^T

          with jax.named_scope("c_pv"):
            acc = mma_accumulate(acc, p, part(v_smem.at[slot]), dtype)
          return acc, m_new, l
"""
assert OLD_SOFTMAX in src

LATE = """            p, m_new, l, alpha = online_softmax(s, m, l, logit_scale=logit_scale)
          if first_step:
            release_previous_item()
          if sched:
            l, m_new, p, alpha = lax.optimization_barrier((l, m_new, p, alpha))
            with jax.named_scope("c_meet"):
              meet()  # softmax done; the other consumer issued its QK^T

          with jax.named_scope("c_pv"):
            acc = acc * broadcast_rows(alpha, acc.shape)
            acc = mma_accumulate(acc, p, part(v_smem.at[slot]), dtype)
          return acc, m_new, l
"""

LATESUM = """            p, m_new, alpha = _softmax_without_sum(s, m, logit_scale)
          if first_step:
            release_previous_item()
          if sched:
            m_new, p, alpha = lax.optimization_barrier((m_new, p, alpha))
            with jax.named_scope("c_meet"):
              meet()  # softmax done; the other consumer issued its QK^T

          with jax.named_scope("c_pv"):
            def pv(acc_ref):
              acc_ref[...] = acc * broadcast_rows(alpha, acc.shape)
              plgpu.wgmma(acc_ref, p.astype(dtype), part(v_smem.at[slot]))
              l_new = l * alpha + jnp.sum(p, axis=1)  # under the PV
              return acc_ref[...], l_new
            acc, l = pl.run_scoped(pv, plgpu.ACC(acc.shape, jnp.float32))
          return acc, m_new, l
"""

HELPER = '''

def _softmax_without_sum(s, m, logit_scale):
  """online_softmax without the row sum: (p, m_new, alpha)."""
  from pallas_kernels.mosaic_common import MASKED_LOGIT
  raw_max = jnp.max(s, axis=1)
  tile_max = jnp.where(raw_max == MASKED_LOGIT, MASKED_LOGIT, raw_max * logit_scale)
  m_new = jnp.maximum(m, tile_max)
  shift = jnp.where(m_new == MASKED_LOGIT, 0.0, m_new)
  alpha = jnp.exp2(m - shift)
  p = jnp.exp2(s * logit_scale - broadcast_rows(shift, s.shape))
  return p, m_new, alpha


@plgpu.inline_mgpu()
def _named_rendezvous(ctx):
  """Both consumer warpgroups (256 threads) meet at hardware barrier 15."""
  del ctx
  from jaxlib.mlir import ir
  from jaxlib.mlir.dialects import llvm
  llvm.inline_asm(ir.Type.parse("!llvm.void"), [], "bar.sync 15, 256;", "",
                  has_side_effects=True)


def persistent_forward('''

OLD_MEET = "    meet = functools.partial(rendezvous, sched[0]) if sched else lambda: None\n"
NAMED_MEET = "    meet = (lambda: _named_rendezvous()) if sched else lambda: None  # noqa: E731\n"
assert OLD_MEET in src

def variant(late=None, named=False):
  s = src
  if late:
    s = s.replace(OLD_SOFTMAX, late)
  if named:
    s = s.replace(OLD_MEET, NAMED_MEET)
  s = s.replace("\n\ndef persistent_forward(", HELPER, 1)
  return s

for name, kw in dict(late=dict(late=LATE), latesum=dict(late=LATESUM),
                     named=dict(named=True), latesum_named=dict(late=LATESUM, named=True)).items():
  open(f".whl/v_{name}.py", "w").write(variant(**kw))
