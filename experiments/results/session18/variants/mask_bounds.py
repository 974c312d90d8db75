# Session 18 (perf_notes entry 34): run from the repository root at 54b3210 (or with the
# session's tensor_core_ids.patch applied, for codes_without_tma.py); writes .whl/v_*.py,
# modules for fwd_probe.py --baseline.
"""Variants of mosaic_persistent.py whose masked steps drop parts of the document mask
(timing bounds; 'noqpad' is exact on layouts without padding)."""
import inspect, sys
sys.path.insert(0, ".")
from pallas_kernels import mosaic_common as mc

base = open("pallas_kernels/mosaic_persistent.py").read()
src = {n: inspect.getsource(getattr(mc, n)) for n in ("doc_mask", "tile_doc_mask", "mask_tile")}
from pallas_kernels.mosaic_common import COMPARES  # noqa

def variant(name, doc_mask_src):
  code = base + "\n\n# ---- variant " + name + "\nfrom pallas_kernels.mosaic_common import COMPARES, col_vector, broadcast_cols, MASKED_LOGIT\n" \
      + doc_mask_src + "\n" + src["tile_doc_mask"] + "\n" + src["mask_tile"] + "\n"
  open(f".whl/v_{name}.py", "w").write(code)

dm = src["doc_mask"]
noqpad = dm.replace("mask = (qs == ks) & (qs != 0)", "mask = qs == ks")
assert noqpad != dm
variant("noqpad", noqpad)
noids = dm.replace("  if compare != \"positions\":\n", "  if False:\n")
assert noids != dm
variant("noids", noids)
nomask = dm.replace("  mask = None\n", "  return None\n  mask = None\n")
assert nomask != dm
variant("nomask", nomask)
