"""Session 17: entry 32's first pipelined variant (session16/pipelined_full_run.py, its
pl.run_state over two ACC.init values), with the ring slots computed outside the
run_state bodies. JAX 0.11.2's Mosaic GPU lowering of a run_state body has no
constants: `lax.rem(..., stages)` inside it, with `stages` a concrete int32, failed
with "Shaped arrays must be represented by ir.Values, got: 2" (the 2 is num_stages).
Writes .whl/d_pipe3.py (run from the repository root, after pipelined_full_run.py)."""
import runpy

runpy.run_path("experiments/results/session16/pipelined_full_run.py")
src = open(".whl/d_pipe.py").read()
for old, new in (
    ("""        def issue_qk(j, s_ref):
          slot = lax.rem(t0 + (j - lo), stages)
""", """        def issue_qk(slot, s_ref):
"""),
    ("""          def prologue(s_ref):
            issue_qk(begin, s_ref)""", """          first_slot = lax.rem(t0 + (begin - lo), stages)

          def prologue(s_ref):
            issue_qk(first_slot, s_ref)"""),
    ("""            zeros_s = zeros_acc(s_shape)
""", """            zeros_s = zeros_acc(s_shape)
            next_slot = lax.rem(t0 + (j + 1 - lo), stages)
"""),
    ("issue_qk(j + 1, s_ref)", "issue_qk(next_slot, s_ref)")):
  assert src.count(old) == 1, old
  src = src.replace(old, new)
open(".whl/d_pipe3.py", "w").write(src)
