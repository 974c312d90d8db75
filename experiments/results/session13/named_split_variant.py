"""An unmeasured variant of the persistent forward for the next session (perf_notes
entry 29, Next): the pingpong rendezvous on hardware named barriers, split into a
non-blocking signal and a wait.

Session 13's "named" variant met on one named barrier (`bar.sync 15, 256` by both
consumers): ptxas then injected a wgmma wait before the meeting after the QK^T
issue (C7517), so the partner's PV waited for this consumer's QK^T to finish, and
the step ran 19-31% slower. Here each meeting is `bar.arrive` on this consumer's
own barrier (the signal: non-blocking, like FA3's warp-scheduler barriers) and then
`bar.sync` on the partner's: an injected wait can only delay this consumer's own
wait, which needs its QK^T result anyway. Four barriers (ids 8-11: Mosaic GPU uses
0 and one per warpgroup from 1): consumer w signals on 8 + 2 w + p and waits on
8 + 2 (1 - w) + p, p the parity of the meeting's index (meetings pair by index:
consumer 1 starts one behind), so a barrier's next signal comes only after its
receiver has passed the previous one (the receiver's wait precedes, in its own
program order, the signal the sender waits for before signalling again).

Run from the repository root: writes .whl/v_named_split.py, a copy of
pallas_kernels/mosaic_persistent.py with that meeting. Measure with
`fwd_probe.py --baseline .whl/v_named_split.py --variants V,V+baseline --layouts
packed,full` (V = persistent-pingpong+compares+spans+load), carrying .whl, or with
more versions in the same rounds (`--baseline a.py,b.py`, variants V+baseline and
V+baseline2); look for C7517 in the --dump ptxas report.
"""

src = open("pallas_kernels/mosaic_persistent.py").read()

REPLACEMENTS = [
    ("    meet = functools.partial(rendezvous, sched[0]) if sched else lambda: None\n",
     "    meet = _named_meet if sched else lambda site: None  # noqa: E731\n"),
    ("      pl.when(wg == 1)(meet)  # consumer 1", "      pl.when(wg == 1)(lambda: meet(1))  # consumer 1"),
    ("          meet()\n          if first_step:\n            release_previous_item()\n          meet()\n",
     "          meet(0)\n          if first_step:\n            release_previous_item()\n          meet(1)\n"),
    ("            meet()  # QK^T issued", "            meet(0)  # QK^T issued"),
    ("              meet()  # softmax done", "              meet(1)  # softmax done"),
    ("      pl.when(wg == 0)(meet)  # pairs", "      pl.when(wg == 0)(lambda: meet(0))  # pairs"),
]
for old, new in REPLACEMENTS:
  assert src.count(old) == 1, old
  src = src.replace(old, new)

HELPER = '''

NAMED_BARRIER_BASE = 8


def _named_meet(site):
  """A consumer's meeting at `site` (0: after its QK^T issue, 1: after its softmax;
  consumer 1's first meeting counts as 1, consumer 0's last as 0)."""
  from jax.experimental.mosaic.gpu import utils as mgpu_utils
  from jaxlib.mlir import ir
  from jaxlib.mlir.dialects import arith, llvm

  @plgpu.inline_mgpu()
  def meet(ctx):
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    c = lambda v: arith.constant(i32, v)  # noqa: E731
    w = mgpu_utils.warpgroup_idx(sync=True)
    parity = arith.remui(arith.addi(w, c(site)), c(2))
    mine = arith.addi(c(NAMED_BARRIER_BASE), arith.addi(arith.muli(w, c(2)), parity))
    theirs = arith.addi(c(NAMED_BARRIER_BASE),
                        arith.addi(arith.muli(arith.subi(c(1), w), c(2)), parity))
    void = ir.Type.parse("!llvm.void")
    llvm.inline_asm(void, [mine], "bar.arrive $0, 256;", "r", has_side_effects=True)
    llvm.inline_asm(void, [theirs], "bar.sync $0, 256;", "r", has_side_effects=True)

  meet()


def persistent_forward('''
src = src.replace("\n\ndef persistent_forward(", HELPER, 1)
open(".whl/v_named_split.py", "w").write(src)
