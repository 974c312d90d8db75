import glob, collections, json, sys
import numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, '.')
from experiments import fwd_probe as fp
from jpack import masks
from pallas_kernels import mosaic_persistent as mp
from pallas_kernels.config import GROUP_SPAN_BITS, SPAN_HALF_BITS
lay = sys.argv[1]
seg = jnp.asarray(fp.layout(lay, 0, 4)[0]); causal = fp.layout(lay, 0, 4)[1]
pos = jnp.broadcast_to(jnp.arange(8192, dtype=jnp.int32), (4, 8192))
plan = masks.make_tile_plan(seg, seg, pos, pos, block_q=128, block_k=128, causal=causal, sliding_window=None)
items = mp.work_items(plan.q_ranges, 16, plan.q_compares, spans=plan.q_spans, dealing="load", num_ctas=132)
table = np.asarray(items.table)
C = 1980/2.1
p = glob.glob(f'/tmp/prof/{lay}-*load*/*.json')[0]
ev = json.load(open(p))['traceEvents']
by = collections.defaultdict(list)
for e in ev:
  if e.get('ph') in 'BE': by[(e['pid'], e['tid'])].append(e)
pids = sorted({k[0] for k in by}); print('pids', pids[:5], '...', len(pids))
t0 = min(e['ts'] for e in ev if 'ts' in e)
rows = []; cta_end = {}
def feats(r):
  b, qt, h, lo, flo, fhi, hi, comp, spans = r[:9]
  full = max(fhi - flo, 0); masked = max(hi - lo, 0) - full
  return full, masked
for (pid, tid), es in by.items():
  es.sort(key=lambda e: e['ts'])
  q = [e['ts'] for e in es if e['name'] == 'c_wait_q' and e['ph'] == 'B']
  done = [e['ts'] for e in es if e['name'] == 'c_done' and e['ph'] == 'B']
  if not done: continue
  cta = (tid - 1) // 3
  cta_end.setdefault(cta, []).append((done[0] - t0) * C)
  marks = q + done
  for n in range(len(q)):
    r = table[cta + n * 132]
    full, masked = feats(r)
    rows.append((cta, n, (marks[n+1] - marks[n]) * C, full, masked))
A = np.array(rows, float)
busy = (A[:, 3] + A[:, 4]) > 0
X = np.c_[np.ones(busy.sum()), A[busy, 3], A[busy, 4]]
coef, *_ = np.linalg.lstsq(X, A[busy, 2], rcond=None)
print('fit item/full/masked cycles:', coef.round(0), ' in twentieths of a full tile:', (20 * coef / coef[1]).round(1))
resid = A[busy, 2] - X @ coef; print('resid rel', np.std(resid) / np.mean(A[busy, 2]))
# per-CTA modelled vs actual
model = mp._item_costs(plan.q_ranges, 16)
end = {c: np.mean(v) for c, v in cta_end.items()}
ctas = sorted(end)
mod = []
for c in ctas:
  rr = table[c::132]
  f = [feats(r) for r in rr]
  mod.append((sum(6 + 20*a + 23*b for a, b in f if a + b), sum(coef[0] + coef[1]*a + coef[2]*b for a, b in f if a + b), len([1 for a,b in f if a+b])))
mod = np.array(mod); e = np.array([end[c] for c in ctas])
print('model spread (max/mean):', mod[:,0].max()/mod[:,0].mean(), ' refit model spread', mod[:,1].max()/mod[:,1].mean(), ' actual end max/mean', e.max()/e.mean())
print('corr actual vs model', np.corrcoef(e, mod[:,0])[0,1], ' vs refit', np.corrcoef(e, mod[:,1])[0,1], ' vs busy count', np.corrcoef(e, mod[:,2])[0,1])
i = np.argsort(e)[-5:]; print('slowest CTAs', [ctas[j] for j in i], e[i].round(), mod[i,0], mod[i,2])
j = np.argsort(e)[:3]; print('fastest', [ctas[x] for x in j], e[j].round(), mod[j,0], mod[j,2])
