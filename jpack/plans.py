"""Tile plans for a batch: the mask inputs padded for the kernels, and which tiles to visit.

`make_plan` pads a call's mask inputs to the kernels' tile multiple and plans
every kernel tiling of a `KernelConfig` (forward, dQ, dK/dV) with `jpack.masks`:
range plans for document masks, tile lists for general masks. The result, an
`AttentionPlan`, is what `jpack.attention.make_attention_plan` returns and what
`flash_attention(plan=...)` reuses across layers; `check_plan` says whether a
plan fits a call.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jpack import masks
from jpack._mask_inputs import MaskInputs, MaskSpec
from pallas_kernels.config import KernelConfig

__all__ = ["AttentionPlan", "check_plan", "kv_major", "make_plan", "pad_axis", "q_major"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Plans:
  """Tile plans for the three kernels' tilings: ranges for document masks,
  lists for general masks; and the work items (pallas_kernels.
  mosaic_persistent.WorkItems) of those kernels that run persistent Mosaic
  GPU schedules, None for the others (jpack.attention adds them)."""
  forward: masks.TilePlan | masks.TileLists
  dq: masks.TilePlan | masks.TileLists
  dkdv: masks.TilePlan | masks.TileLists
  forward_items: Any = None
  dq_items: Any = None
  dkdv_items: Any = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionPlan:
  """The mask of one attention shape, ready for the kernels; reusable across layers.

  Made by `make_attention_plan`; pass it as flash_attention(q, k, v,
  plan=plan, causal=...) in every layer that shares the mask, so the tile plan
  (for a general mask: one evaluation of every pair) is computed once. It is a
  pytree: pass it through jit and scan like any array argument.

  Attributes:
    ids: segment ids, positions and the general mask, padded to the kernels'
      tile multiple (the dense mask as int8).
    tiles: the tile plans of the forward, dQ and dK/dV tilings.
    spec, config: the static mask options and the kernel tiling.
    q_shape, k_shape: the q and k shapes it was made for.
    implementation: the kernels it was planned for, "pallas" or "mosaic"
      (for "mosaic", config holds the Mosaic kernels' tiles).
  """
  ids: MaskInputs
  tiles: _Plans
  spec: MaskSpec = dataclasses.field(metadata=dict(static=True))
  config: KernelConfig = dataclasses.field(metadata=dict(static=True))
  q_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  k_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  implementation: str = dataclasses.field(metadata=dict(static=True))

  def unpadded_ids(self) -> MaskInputs:
    """The mask inputs cut back to the q and k lengths, dense mask as bool."""
    tq, tk = self.q_shape[1], self.k_shape[1]
    ids = self.ids
    return MaskInputs(
        ids.q_segment_ids[:, :tq], ids.kv_segment_ids[:, :tk],
        ids.q_positions[:, :tq], ids.kv_positions[:, :tk],
        None if ids.kv_doc_starts is None else ids.kv_doc_starts[:, :tk],
        None if ids.dense is None else ids.dense[..., :tq, :tk].astype(bool))


# ----------------------------------------------------------------------------
# Planning


def pad_axis(x, axis, size):
  """x zero-padded at the end of `axis` to `size`."""
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def _round_up(n, m):
  return -(-n // m) * m


def _tilings(config: KernelConfig):
  """(block_q, block_k) of the forward, dQ and dK/dV kernels."""
  return ((config.forward.block_major, config.forward.block_minor),
          (config.dq.block_major, config.dq.block_minor),
          (config.dkdv.block_minor, config.dkdv.block_major))


def _q_rows(ids: MaskInputs, start, n) -> MaskInputs:
  """The mask inputs of query rows [start, start + n) (start may be traced)."""
  rows = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, start, n, axis)  # noqa: E731
  return dataclasses.replace(
      ids, q_segment_ids=rows(ids.q_segment_ids, 1), q_positions=rows(ids.q_positions, 1),
      dense=None if ids.dense is None else rows(ids.dense, 2))


def _make_plans(ids: MaskInputs, spec: MaskSpec, config: KernelConfig) -> _Plans:
  """Tile plans of padded mask inputs, one per distinct tiling.

  Document masks get range plans from per-tile statistics. A general mask is
  evaluated pair by pair once, at the finest of the three tilings (q tiles in
  chunks, so memory stays bounded), and coarsened for the others.
  """
  tilings = _tilings(config)
  general = spec.rule is not None or ids.dense is not None
  if general:
    fine = (min(b[0] for b in tilings), min(b[1] for b in tilings))
    any_, all_ = masks.tile_any_all(
        lambda start, n: _q_rows(ids, start, n).allowed(spec),
        q_len=ids.q_segment_ids.shape[1], block_q=fine[0], block_k=fine[1])
  cache = {}
  for blocks in tilings:
    if blocks in cache:
      continue
    if general:
      cache[blocks] = masks.make_tile_lists(any_, all_, block=fine, block_q=blocks[0],
                                            block_k=blocks[1])
    else:
      cache[blocks] = masks.make_tile_plan(
          ids.q_segment_ids, ids.kv_segment_ids, ids.q_positions, ids.kv_positions,
          block_q=blocks[0], block_k=blocks[1], causal=spec.causal,
          sliding_window=spec.sliding_window)
  return _Plans(*(cache[b] for b in tilings))


def make_plan(q_shape, k_shape, ids: MaskInputs, spec: MaskSpec,
              config: KernelConfig, implementation: str) -> AttentionPlan:
  """Pads the mask inputs to the kernels' granularity and plans the tiles.

  Every tiling of `config` is planned; `implementation` only labels the plan
  (the kernels' choice of tiles is already in config).

  Sequence padding gets segment id 0 (so it is masked out); the dense mask
  becomes int8 (the kernels load it as bytes).
  """
  tq_pad = _round_up(q_shape[1], config.row_multiple)
  tk_pad = _round_up(k_shape[1], config.row_multiple)
  dense = ids.dense
  if dense is not None:
    dense = pad_axis(pad_axis(dense.astype(jnp.int8), 2, tq_pad), 3, tk_pad)
  kv_doc_starts = ids.kv_doc_starts
  if kv_doc_starts is not None:
    kv_doc_starts = pad_axis(kv_doc_starts, 1, tk_pad)
  ids = MaskInputs(
      pad_axis(ids.q_segment_ids, 1, tq_pad), pad_axis(ids.kv_segment_ids, 1, tk_pad),
      pad_axis(ids.q_positions, 1, tq_pad), pad_axis(ids.kv_positions, 1, tk_pad),
      kv_doc_starts, dense)
  return AttentionPlan(ids, _make_plans(ids, spec, config), spec, config,
                       tuple(q_shape), tuple(k_shape), implementation)


def q_major(plan):
  """The plan rows of q tiles: ranges or lists."""
  return plan.q_lists if isinstance(plan, masks.TileLists) else plan.q_ranges


def kv_major(plan):
  """The plan rows of kv tiles: ranges or lists."""
  return plan.kv_lists if isinstance(plan, masks.TileLists) else plan.kv_ranges


# ----------------------------------------------------------------------------
# Checking a plan against a call

_PLAN_HOLDS = ("segment_ids", "q_segment_ids", "kv_segment_ids", "q_positions",
               "kv_positions", "sliding_window", "mask")


def check_plan(plan, q, k, causal, config, given, implementation):
  """Raises unless `plan` was made for these shapes and options.

  given: the call's mask arguments by name (those the plan holds must be None).
  implementation: what the call runs, "auto" resolved; "xla" (the reference)
    reads only the plan's mask inputs, so it takes a plan made for any kernels.
  """
  if not isinstance(plan, AttentionPlan):
    raise TypeError(f"plan must be an AttentionPlan (from make_attention_plan), "
                    f"got {type(plan).__name__}")
  passed = [name for name in _PLAN_HOLDS if given[name] is not None]
  if passed:
    raise ValueError(f"plan: {', '.join(passed)} must be given to make_attention_plan "
                     "only; the plan holds them")
  if bool(causal) != plan.spec.causal:
    raise ValueError(f"plan: it was made with causal={plan.spec.causal}, but "
                     f"flash_attention got causal={causal}")
  if (tuple(q.shape), tuple(k.shape)) != (plan.q_shape, plan.k_shape):
    raise ValueError(f"plan: it was made for q {plan.q_shape} and k {plan.k_shape}, "
                     f"got q {tuple(q.shape)} and k {tuple(k.shape)}")
  if implementation != "xla" and implementation != plan.implementation:
    raise ValueError(f"plan: it was made for implementation={plan.implementation!r}, but "
                     f"this call runs implementation={implementation!r}; make it with "
                     f"make_attention_plan(..., implementation={implementation!r})")
  if config is not None and config != plan.config:
    raise ValueError("plan: it was made for another config; pass config to "
                     "make_attention_plan only")
