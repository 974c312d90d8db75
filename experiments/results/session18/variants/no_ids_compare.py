# Session 18 (perf_notes entry 34): run from the repository root at 54b3210 (or with the
# session's tensor_core_ids.patch applied, for codes_without_tma.py); writes .whl/v_*.py,
# modules for fwd_probe.py --baseline.
import inspect, sys
sys.path.insert(0, ".")
from pallas_kernels import mosaic_common as mc
base = open("pallas_kernels/mosaic_persistent.py").read()
dm = inspect.getsource(mc.doc_mask)
noids = dm.replace("  if compare != \"positions\":\n", "  if False:\n")
assert noids != dm
code = (base + "\n\n# ---- variant noids2\nfrom pallas_kernels.mosaic_common import COMPARES, col_vector, broadcast_cols, MASKED_LOGIT\n"
        + noids + "\n" + inspect.getsource(mc.tile_doc_mask) + "\n" + inspect.getsource(mc.mask_tile) + "\n")
open(".whl/v_noids2.py", "w").write(code)
