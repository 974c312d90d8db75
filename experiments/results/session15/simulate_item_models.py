"""Session 15: CTA loads under the measured item costs (/tmp/truth.pkl from fit_item_model.py)
when the items are dealt by load with other cost models (scratch analysis)."""
import pickle, sys, numpy as np, jax.numpy as jnp
sys.path.insert(0,'.')
from experiments import fwd_probe as fp
from jpack import masks
from pallas_kernels import mosaic_persistent as mp
truth=pickle.load(open('/tmp/truth.pkl','rb'))
seg = jnp.asarray(fp.layout("packed", 0, 4)[0]); pos = jnp.broadcast_to(jnp.arange(8192, dtype=jnp.int32), (4, 8192))
plan = masks.make_tile_plan(seg, seg, pos, pos, block_q=128, block_k=128, causal=True, sliding_window=None)
spans=np.asarray(plan.q_spans)
orig=mp._item_costs
def costs_new(item, full_c, masked_c, skip_c):
  def f(ranges, heads):
    r=np.asarray(ranges); lo,flo,fhi,hi=(r[...,i] for i in range(4))
    full=np.maximum(fhi-flo,0); masked=np.maximum(hi-lo,0)-full
    sk=sum(((spans>>(16*g))&0xFF)+((spans>>(16*g+8))&0xFF) for g in range(2))
    c=np.where(hi>lo, item+full_c*full+masked_c*masked+skip_c*sk, 0)
    return jnp.asarray(np.broadcast_to(c[:,None,:],(4,heads,r.shape[1])).reshape(-1).astype(np.int32))
  return f
for name, fn in [(f"14/20/{m}/{k}", costs_new(14,20,m,k)) for m in (23,24,25,26,27) for k in (-2,-3,-4,-5)]:
  mp._item_costs=fn
  tab=np.asarray(mp.work_items(plan.q_ranges,16,plan.q_compares,spans=plan.q_spans,dealing="load",num_ctas=132).table)
  loads=np.zeros(132)
  for i,r in enumerate(tab):
    k=(int(r[0]),int(r[1]),int(r[2]))
    if k in truth: loads[i%132]+=truth[k]
  print(name, "truth max/mean %.4f idle %.4f" % (loads.max()/loads.mean(), np.mean(loads.max()-loads)/loads.max()))
mp._item_costs=orig
