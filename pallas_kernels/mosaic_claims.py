"""Work items claimed at run time: a global counter that the persistent kernels' CTAs draw from.

A persistent kernel whose items are dealt "dynamic" (mosaic_persistent.DEALINGS)
does not read a fixed share of the item table: each CTA's producer claims the
next item index from a counter in global memory (fetch-and-add), so a CTA that
finishes early takes more items and none waits for a slow one. Dealing by a
cost model (dealing "load") guesses the run times; claiming follows them.

The protocol, per CTA (the CTA's items are n = 0, 1, ..., in claim order):
  claim(n):  the producer warpgroup: one thread adds 1 to the counter and
             writes the value it read to claimed[n % CLAIM_SLOTS]; then every
             producer thread arrives at ready[n % CLAIM_SLOTS] (an arrival
             releases the thread's earlier writes, so the index is visible to
             whoever waits for the barrier's phase).
  claimed(n): any warpgroup: waits for ready[n % CLAIM_SLOTS], reads the index.
The kernel decides when to claim (how far ahead of use) and proves that a slot
is read by everyone before it is written again (mosaic_persistent).

Pallas Mosaic GPU has atomic reductions (plgpu.atomic_add) but none that
returns the old value, hence the inline PTX (`atom.add`).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, llvm

__all__ = ["CLAIM_SLOTS", "claim", "claimed"]

CLAIM_SLOTS = 4
"""Claimed indices in flight per CTA: the producer claims item n + 2 while the
consumers may still read the index of item n - 1 (mosaic_persistent)."""

CLAIM_WARP = 1
"""The producer's warp that claims: not warp 0, which issues the TMA copies, so
that those need not wait for the atomic's round trip to L2 (measured within noise
of warp 0: perf_notes entry 27)."""

_SHARED = 3  # the NVPTX address space of shared memory


@plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType()))
def _fetch_add_one(ctx, counter, dst):
  """One thread of the warpgroup: dst[0] = counter[0]; counter[0] += 1 (atomically).
  The thread waits for the old value (before its store), its warp with it."""
  del ctx
  counter_ptr, dst_ptr = mgpu_utils.memref_ptr(counter), mgpu_utils.memref_ptr(dst)
  shared = llvm.PointerType(dst_ptr.type).address_space == _SHARED
  store = "st.shared.u32" if shared else "st.u32"
  i32 = ir.IntegerType.get_signless(32)
  warp = arith.remui(mgpu_utils.warp_idx(), arith.constant(i32, 4))
  one_thread = arith.andi(  # one lane of warp CLAIM_WARP of the warpgroup
      arith.cmpi(arith.CmpIPredicate.eq, warp, arith.constant(i32, CLAIM_WARP)),
      mgpu_utils.single_thread_predicate(mgpu_utils.ThreadSubset.WARP))
  llvm.inline_asm(
      ir.Type.parse("!llvm.void"), [counter_ptr, dst_ptr, one_thread],
      "{\n .reg .b32 old;\n @$2 atom.add.u32 old, [$0], 1;\n"
      f" @$2 {store} [$1], old;\n}}",
      "l," + ("r" if shared else "l") + ",b", has_side_effects=True)


def claim(counter_ref, claimed_smem, ready, n):
  """The producer warpgroup claims its CTA's item n (module docstring).

  counter_ref: int32 [1] in global memory, zero at the launch; claimed_smem:
  int32 [CLAIM_SLOTS] in shared memory; ready: CLAIM_SLOTS barriers of one
  arrival (per warpgroup).
  """
  slot = lax.rem(n, jnp.int32(CLAIM_SLOTS))
  _fetch_add_one(counter_ref, claimed_smem.at[pl.ds(slot, 1)])
  plgpu.barrier_arrive(ready.at[slot])


def claimed(claimed_smem, ready, n):
  """int32: the index claimed for the CTA's item n, once its claim has landed."""
  slot = lax.rem(n, jnp.int32(CLAIM_SLOTS))
  plgpu.barrier_wait(ready.at[slot])
  return claimed_smem[slot]
