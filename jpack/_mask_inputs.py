"""The mask of one attention call, as data: shared by the reference and the tile plans."""

from __future__ import annotations

import dataclasses

import jax

from jpack import mask_rules, masks


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MaskInputs:
  """The arrays the mask is computed from.

  Segment ids and positions, int32: q_* [B, Tq], kv_* [B, Tk]; and, for a
  general mask, kv_doc_starts int32 [B, Tk] (for rules that need it) and the
  dense mask [B or 1, 1 or H, Tq, Tk] (bool; int8 once padded for the kernels).
  """
  q_segment_ids: jax.Array
  kv_segment_ids: jax.Array
  q_positions: jax.Array
  kv_positions: jax.Array
  kv_doc_starts: jax.Array | None = None
  dense: jax.Array | None = None

  def allowed(self, spec: MaskSpec):
    """bool [B, Hm, Tq, Tk] of allowed pairs (Hm: the dense mask's heads, else 1)."""
    return masks.general_allowed(
        self.q_segment_ids, self.kv_segment_ids, self.q_positions,
        self.kv_positions, causal=spec.causal, sliding_window=spec.sliding_window,
        dense=None if self.dense is None else self.dense.astype(bool),
        rule=spec.rule, kv_doc_starts=self.kv_doc_starts)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """The static part of the mask: options and the rule (hashable)."""
  causal: bool
  sliding_window: int | None
  rule: mask_rules.MaskRule | None = None
