"""Session 16 variant of mosaic_persistent.py (written to .whl/d_pipe.py, for fwd_probe
--baseline): in each item's run of full kv tiles, a consumer issues the next tile's
QK^T right behind this tile's PV (one wait for both), so the PV's round trip and the
K/V wait leave its chain (perf_notes "Next": untried). Per full tile j, after the
prologue's QK^T(first):
    softmax(S_j), acc *= alpha; meet; PV(j) and QK^T(j + 1) issued; meet; wait both
and the run's last tile: softmax; meet; PV. Two meetings per tile as before (the
pairing stays: a consumer's softmax under the other's matmuls)."""
src = open("pallas_kernels/mosaic_persistent.py").read()
old = """        acc, m, l = three_runs(lo, full_lo, full_hi, hi, visit, carry, compares=compares,
                               start=lo + 1)
        return acc, m, l, buf, b, qt, h, jnp.int32(1)
"""
new = """        def masked_visit(j, carry):
          return visit(j, carry, masked=tile_compares(j, lo, hi, compares))

        start = lo + 1
        f_lo, f_hi = jnp.maximum(full_lo, start), jnp.maximum(full_hi, start)
        carry = lax.fori_loop(start, f_lo, masked_visit, carry)
        carry = lax.cond(f_hi > f_lo, functools.partial(full_run, f_lo, f_hi),
                         lambda c: c, carry)
        acc, m, l = lax.fori_loop(f_hi, hi, masked_visit, carry)
        return acc, m, l, buf, b, qt, h, jnp.int32(1)

      def slot_of(j, t0, lo):
        return lax.rem(t0 + (j - lo), stages)
"""
assert src.count(old) == 1
src = src.replace(old, new)

# full_run lives inside attend (it needs q_smem, t0, lo, meet); define it before the
# first step's visit.
old = """        # The first tile runs the masked step's code, its compare chosen at run
        # time: none if the plan says the tile is full."""
new = """        def issue_qk(j, s_ref):
          slot = lax.rem(t0 + (j - lo), stages)
          with jax.named_scope("c_wait_kv"):
            plgpu.barrier_wait(kv_ready.at[slot])
          plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))

        def softmax_and_meet(s, acc, m, l):
          with jax.named_scope("c_softmax"):
            p, m_new, l, alpha = online_softmax(s, m, l, logit_scale=logit_scale)
            acc = acc * broadcast_rows(alpha, acc.shape)
          if sched:
            acc, l, m_new, p = lax.optimization_barrier((acc, l, m_new, p))
            with jax.named_scope("c_meet"):
              meet()  # softmax done; the other consumer issued its matmuls
          return p, acc, m_new, l

        def full_run(begin, stop, carry):
          \"\"\"Full tiles [begin, stop), stop > begin: QK^T(j + 1) behind PV(j).\"\"\"
          acc, m, l = carry
          s_shape = (WG_ROWS, block_k)

          def prologue(s_ref):
            issue_qk(begin, s_ref)
            meet()  # QK^T issued
            return s_ref[...]

          with jax.named_scope("c_qk"):
            s = pl.run_scoped(prologue, plgpu.ACC(s_shape, jnp.float32))

          def body(j, carry):
            acc, m, l, s = carry
            slot = lax.rem(t0 + (j - lo), stages)
            p, acc, m, l = softmax_and_meet(s, acc, m, l)
            zeros_s = zeros_acc(s_shape)

            def pv_qk(refs):
              acc_ref, s_ref = refs
              plgpu.wgmma(acc_ref, p.astype(dtype), v_smem.at[slot])
              issue_qk(j + 1, s_ref)
              meet()  # matmuls issued

            with jax.named_scope("c_pv_qk"):
              acc, s = pl.run_state(pv_qk)((plgpu.ACC.init(acc), plgpu.ACC.init(zeros_s)))
            plgpu.barrier_arrive(kv_consumed.at[slot])
            return acc, m, l, s

          acc, m, l, s = lax.fori_loop(begin, stop - 1, body, (acc, m, l, s))
          slot = lax.rem(t0 + (stop - 1 - lo), stages)
          p, acc, m, l = softmax_and_meet(s, acc, m, l)
          with jax.named_scope("c_pv"):
            acc = mma_accumulate(acc, p, v_smem.at[slot], dtype)
          plgpu.barrier_arrive(kv_consumed.at[slot])
          return acc, m, l

        # The first tile runs the masked step's code, its compare chosen at run
        # time: none if the plan says the tile is full."""
assert src.count(old) == 1
src = src.replace(old, new)
# Variant 2 (.whl/d_pipe2.py): both accumulators as run_scoped refs, the O accumulator
# written from registers first (no run_state over two ACC.init values).
src2 = src
for old2, new2 in (
    ("def pv_qk(refs):\n              acc_ref, s_ref = refs\n",
     "def pv_qk(acc_ref, s_ref):\n              acc_ref[...] = acc\n"),
    ("meet()  # matmuls issued\n\n",
     "meet()  # matmuls issued\n              return acc_ref[...], s_ref[...]\n\n"),
    ("acc, s = pl.run_state(pv_qk)((plgpu.ACC.init(acc), plgpu.ACC.init(zeros_s)))\n",
     "acc, s = pl.run_scoped(pv_qk, plgpu.ACC(acc.shape, jnp.float32),\n"
     "                                     plgpu.ACC(s_shape, jnp.float32))\n")):
  assert src2.count(old2) == 1, old2
  src2 = src2.replace(old2, new2)
assert src2 != src
src2 = src2.replace("            zeros_s = zeros_acc(s_shape)\n", "")
# slot_of helper added above is unused; drop it.
src = src.replace("""
      def slot_of(j, t0, lo):
        return lax.rem(t0 + (j - lo), stages)
""", "")
src2 = src2.replace("""
      def slot_of(j, t0, lo):
        return lax.rem(t0 + (j - lo), stages)
""", "")
open(".whl/d_pipe.py", "w").write(src)
open(".whl/d_pipe2.py", "w").write(src2)
