"""Session 15: per-item residuals of the load model on the two B=4 tail profiles (rebalanced,
unbalanced: the same items in the same rounds), their correlation across the runs (0.85) and
the features that explain them (the consumers' skipped half tiles); writes the measured
item costs to /tmp/truth.pkl for simulate_item_models.py. Run after extracting the traces to
/tmp/prof (session15 profile_tail_b4_packed.log). Scratch analysis, kept for the numbers."""
import collections, glob, json, sys
import jax.numpy as jnp, numpy as np
sys.path.insert(0, ".")
from experiments import fwd_probe as fp
from jpack import masks
from pallas_kernels import mosaic_persistent as mp
C = 1980/2.1
seg = jnp.asarray(fp.layout("packed", 0, 4)[0]); pos = jnp.broadcast_to(jnp.arange(8192, dtype=jnp.int32), (4, 8192))
plan = masks.make_tile_plan(seg, seg, pos, pos, block_q=128, block_k=128, causal=True, sliding_window=None)
path = glob.glob("/tmp/prof/packed-*load_baseline/*.json")[0]
table = np.asarray(mp.work_items(plan.q_ranges, 16, plan.q_compares, spans=plan.q_spans, dealing="load", num_ctas=132).table)
ev = json.load(open(path))["traceEvents"]; t0 = min(e["ts"] for e in ev if "ts" in e)
by = collections.defaultdict(list)
for e in ev:
  if e.get("ph") in ("B","E"): by[(e["pid"], e["tid"])].append(e)
rows=[]; ends={}; sm={}
for (pid,tid),es in by.items():
  es.sort(key=lambda e:e["ts"])
  st=[e["ts"] for e in es if e["name"]=="c_wait_q" and e["ph"]=="B"]
  dn=[e["ts"] for e in es if e["name"]=="c_done" and e["ph"]=="B"]
  if not dn: continue
  cta=(tid-1)//3; wg=(tid-1)%3; sm[cta]=pid-1
  ends.setdefault(cta,[]).append((dn[0]-t0)*C)
  m=st+dn
  for n in range(len(st)):
    r=table[cta+n*132]; b,qt,h,lo,flo,fhi,hi,comp,spans=r
    full=max(fhi-flo,0); masked=max(hi-lo,0)-full
    rows.append((cta,wg,n,b,h,qt,full,masked,(m[n+1]-m[n])*C, (m[n]-t0)*C))
A=np.array(rows,float); busy=(A[:,6]+A[:,7])>0
X=np.c_[np.ones(busy.sum()),A[busy,6],A[busy,7]]; y=A[busy,8]
coef=np.linalg.lstsq(X,y,rcond=None)[0]; res=y-X@coef
print("coef",coef.round(), "resid std", res.std().round(), "mean item", y.mean().round(), "rel", (res.std()/y.mean()).round(3))
B=A[busy]
for name,col in [("round n",2),("batch",3),("head",4),("qtile",5)]:
  vals=np.unique(B[:,col]); means=[res[B[:,col]==v].mean() for v in vals]
  print(name, "resid mean by value: spread", np.round(np.std(means),0), np.round(means[:12],0))
# per CTA: sum of residuals
cta_res=collections.defaultdict(float)
for r,row in zip(res,B):
  if row[1]==1: cta_res[int(row[0])]+=r
cr=np.array(list(cta_res.values())); e=np.array([np.mean(ends[c]) for c in cta_res])
print("per-CTA residual sum std", cr.std().round(), "as share of end", (cr.std()/e.mean()).round(4), "corr with end", np.corrcoef(cr,e)[0,1].round(3))
# first item cost
print("first item extra: mean resid n=0", res[B[:,2]==0].mean().round(), "n=1", res[B[:,2]==1].mean().round(), "last busy")
# resid by start time decile
t=B[:,9]; q=np.quantile(t,np.linspace(0,1,11))
print("resid by start-time decile", [int(res[(t>=q[i])&(t<q[i+1])].mean()) for i in range(10)])

def item_costs(path, sweeps):
  saved=mp.REBALANCE_SWEEPS; mp.REBALANCE_SWEEPS=sweeps
  tab=np.asarray(mp.work_items(plan.q_ranges,16,plan.q_compares,spans=plan.q_spans,dealing="load",num_ctas=132).table)
  mp.REBALANCE_SWEEPS=saved
  ev=json.load(open(path))["traceEvents"]
  by=collections.defaultdict(list)
  for e in ev:
    if e.get("ph") in ("B","E"): by[(e["pid"],e["tid"])].append(e)
  out={}
  for (pid,tid),es in by.items():
    es.sort(key=lambda e:e["ts"])
    st=[e["ts"] for e in es if e["name"]=="c_wait_q" and e["ph"]=="B"]
    dn=[e["ts"] for e in es if e["name"]=="c_done" and e["ph"]=="B"]
    if not dn or (tid-1)%3!=1: continue
    cta=(tid-1)//3; m=st+dn
    for n in range(len(st)):
      r=tab[cta+n*132]
      out[(int(r[0]),int(r[1]),int(r[2]))]=((m[n+1]-m[n])*C, r)
  return out
a=item_costs(glob.glob("/tmp/prof/packed-*load_baseline/*.json")[0],6)
b=item_costs(glob.glob("/tmp/prof/packed-*unbalanced_baseline/*.json")[0],0)
keys=[k for k in a if k in b and (a[k][1][6]>a[k][1][3])]
xa=np.array([a[k][0] for k in keys]); xb=np.array([b[k][0] for k in keys])
F=np.array([[1,max(a[k][1][5]-a[k][1][4],0),max(a[k][1][6]-a[k][1][3],0)-max(a[k][1][5]-a[k][1][4],0)] for k in keys],float)
ra=xa-F@coef; rb=xb-F@coef
print("items", len(keys), "corr of residuals across the two runs", np.corrcoef(ra,rb)[0,1].round(3))
# features: spans, compares
sp=np.array([a[k][1][8] for k in keys]); cp=np.array([a[k][1][7] for k in keys])
print("resid by spans!=0:", ra[sp!=0].mean().round(), ra[sp==0].mean().round(), " n", (sp!=0).sum())
r0 = np.array([a[k][1] for k in keys])
# round index of each item in run a: recompute via positions is complex; use cold start mask = items of head<3 & batch 0
def dec(s,g): 
  x=(s>>(16*g))&0xFFFF; return x&0xFF, x>>8
lo,flo,fhi,hi=r0[:,3],r0[:,4],r0[:,5],r0[:,6]
full=np.maximum(fhi-flo,0); masked=(hi-lo)-full
f0,b0=dec(r0[:,8],0); f1,b1=dec(r0[:,8],1)
skip=f0+b0+f1+b1; diff=np.abs((f0+b0)-(f1+b1))
warm=~((r0[:,0]==0)&(r0[:,2]<3))
feats={"skip halves":skip,"group diff":diff,"compares":r0[:,7],"masked":masked,"full":full,"maxskip":np.maximum(f0+b0,f1+b1),"minskip":np.minimum(f0+b0,f1+b1)}
y=(xa+xb)/2
X=np.c_[np.ones(len(y)),full,masked][warm]
base=np.linalg.lstsq(X,y[warm],rcond=None)[0]; res=y[warm]-X@base
print("base",base.round(),"resid std",res.std().round())
for n,f in feats.items(): print(n, "corr with resid", np.corrcoef(f[warm],res)[0,1].round(3))
X2=np.c_[X, skip[warm], diff[warm]]
c2=np.linalg.lstsq(X2,y[warm],rcond=None)[0]; r2=y[warm]-X2@c2
print("with skip, diff:", c2.round(), "resid std", r2.std().round())
# noise floor: half diff between the two runs
print("run-to-run item noise std", ((xa-xb)[warm]/np.sqrt(2)).std().round())
# alternative feature sets
g0=2*(hi-lo)-(f0+b0); g1=2*(hi-lo)-(f1+b1)  # halves each group runs
for name, cols in [("full,masked,skip", [full,masked,skip]), ("full,masked,skip,diff",[full,masked,skip,diff]),
                   ("full,masked,maxskip,minskip",[full,masked,np.maximum(f0+b0,f1+b1),np.minimum(f0+b0,f1+b1)]),
                   ("full,masked,maxrun", [full,masked,np.maximum(g0,g1)])]:
  Xc=np.c_[np.ones(len(y)),*cols][warm]; cc=np.linalg.lstsq(Xc,y[warm],rcond=None)[0]
  print(name, (20*cc/cc[1]).round(2), "resid", (y[warm]-Xc@cc).std().round())
# truth for simulation: measured mean costs of every item (cold ones included)
truth = {k: (a[k][0]+b[k][0])/2 for k in keys}
import pickle; pickle.dump(truth, open("/tmp/truth.pkl","wb"))
