import sys, numpy as np, jax.numpy as jnp
sys.path.insert(0,'.')
from experiments import fwd_probe as fp
from jpack import masks
from pallas_kernels import mosaic_persistent as mp
for lay, seed in [('packed',0),('packed',1),('packed',2),('blocksc',0),('dense',0)]:
  seg = jnp.asarray(fp.layout(lay, seed, 4)[0]); causal = fp.layout(lay, seed, 4)[1]
  pos = jnp.broadcast_to(jnp.arange(8192, dtype=jnp.int32), (4, 8192))
  plan = masks.make_tile_plan(seg, seg, pos, pos, block_q=128, block_k=128, causal=causal, sliding_window=None)
  r = np.asarray(plan.q_ranges)
  lo, flo, fhi, hi = (r[...,i] for i in range(4))
  full = np.maximum(fhi-flo,0); masked = np.maximum(hi-lo,0)-full
  true = np.broadcast_to(np.where(hi>lo, 1915 + 2736*full + 3046*masked, 0)[:,None,:], (4,16,r.shape[1])).reshape(-1).astype(float)
  model = np.asarray(mp._item_costs(plan.q_ranges, 16)).astype(float)
  positions = np.asarray(mp.reading_positions(plan.q_ranges, 16, 132, dealing='load'))
  n = len(positions); R = -(-n//132)
  grid = np.full((R*132,), -1); grid[positions] = np.arange(n); grid = grid.reshape(R,132)
  def loads(g, c):
    cc = np.where(g>=0, c[np.maximum(g,0)], 0); return cc, cc.sum(0)
  out=[]
  g = grid.copy()
  for it in range(9):
    cc, L = loads(g, model); _, Lt = loads(g, true)
    out.append('%d:%.4f/%.4f' % (it, L.max()/L.mean(), Lt.max()/Lt.mean()))
    order = np.argsort(L, kind='stable'); P = 66
    A, B = order[::-1][:P], order[:P]
    gap = L[A] - L[B]                       # [P]
    d = cc[:, A] - cc[:, B]                 # [R, P]
    ok = (d > 0) & (d < gap) & (cc[:, A] > 0) & (cc[:, B] > 0)
    score = np.where(ok, np.abs(gap/2 - d), np.inf)
    rr = score.argmin(0)
    do = np.isfinite(score[rr, np.arange(P)])
    for p in np.nonzero(do)[0]:
      g[rr[p], A[p]], g[rr[p], B[p]] = g[rr[p], B[p]], g[rr[p], A[p]]
  print(lay, seed, ' '.join(out))
