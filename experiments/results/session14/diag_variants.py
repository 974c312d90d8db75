# Diagnostic (incorrect-output) variants of the working tree's persistent kernel, timing only.
src = open("pallas_kernels/mosaic_persistent.py").read()
def variant(name, pairs):
  s = src
  for old, new in pairs:
    assert s.count(old) == 1, (name, old)
    s = s.replace(old, new)
  open(f".whl/d_{name}.py", "w").write(s)
# no store of the output at all (garbage out)
variant("nostore", [("""      @pl.when(has == 1)
      def _store():""", """      @pl.when(has == 2)
      def _store():""")])
# the first step runs the full step's code (wrong on masked first tiles)
variant("firstfull", [("""        carry = visit(lo, (zeros_acc(o_shape), *empty_row_stats()), masked=first_masked,
                      first_step=True)""", """        carry = visit(lo, (zeros_acc(o_shape), *empty_row_stats()), masked=False,
                      first_step=True)""")])
# both
s0 = src
src = open(".whl/d_nostore.py").read()
variant("both", [("""        carry = visit(lo, (zeros_acc(o_shape), *empty_row_stats()), masked=first_masked,
                      first_step=True)""", """        carry = visit(lo, (zeros_acc(o_shape), *empty_row_stats()), masked=False,
                      first_step=True)""")])
