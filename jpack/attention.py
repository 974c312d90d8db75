"""Attention for packed rows: public API, input checks, dispatch, reference.

    from jpack.attention import flash_attention
    out = flash_attention(q, k, v, segment_ids=segment_ids)   # q: [B, T, H, D]

Query i attends to key j iff

    seg_q[i] == seg_kv[j] != 0
    and (not causal or pos_kv[j] <= pos_q[i])
    and (sliding_window is None or pos_q[i] - pos_kv[j] < sliding_window)
    and (mask is None or mask allows (i, j)),

where `mask` is a dense boolean array or a rule of `jpack.mask_rules`.

Segment id 0 marks padding. A query that can attend to nothing (padding, or a
document cut off by a window or a chunk boundary) gets output exactly 0, lse
EMPTY_LSE, and contributes exactly 0 to every gradient. Nothing is NaN.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jpack import mask_rules, masks, plans
from jpack._mask_inputs import MaskInputs, MaskSpec
from jpack.plans import AttentionPlan, pad_axis
from pallas_kernels import segment_attention as kernels
from pallas_kernels.config import KernelConfig, TileConfig

__all__ = [
    "EMPTY_LSE", "AttentionPlan", "KernelConfig", "TileConfig", "flash_attention",
    "flash_attention_bwd", "make_attention_plan", "reference_attention",
]

EMPTY_LSE = kernels.EMPTY_LSE
"""lse (natural log) of a query row that attends to nothing: -1e30, finite.

Finite so that merging partial results through lse (ring attention) never
meets inf - inf; exp(EMPTY_LSE - anything real) is exactly 0.
"""

Implementation = Literal["auto", "pallas", "mosaic", "xla"]
_MOSAIC_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_MOSAIC_HEAD_DIMS = (64, 128, 256)
"""What the Mosaic kernels cover; "auto" runs them there on a Hopper GPU."""
_FLOAT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
_MAX_KERNEL_HEAD_DIM = 256


# ----------------------------------------------------------------------------
# Input checks


def _check_qkv(q, k, v):
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not hasattr(x, "shape") or x.ndim != 4:
      raise ValueError(
          f"{name} must have shape [batch, seq, heads, head_dim], got "
          f"{getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in _FLOAT_DTYPES:
      raise TypeError(f"{name} must be bfloat16, float16 or float32, got {x.dtype}")
  if not q.dtype == k.dtype == v.dtype:
    raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape [batch, kv_seq, kv_heads, "
                     f"head_dim], got k {k.shape} and v {v.shape}")
  if q.shape[0] != k.shape[0]:
    raise ValueError(f"q and k must have the same batch size, got q {q.shape} and k {k.shape}")
  if q.shape[3] != k.shape[3]:
    raise ValueError(f"q and k must have the same head_dim, got q {q.shape} and k {k.shape}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"q heads ({q.shape[2]}) must be a multiple of k/v heads "
                     f"({k.shape[2]}) (grouped-query attention)")


def _check_ids(name, x, batch, seq):
  """int32 [batch, seq] view of an id/position argument, or a clear error."""
  if not hasattr(x, "shape"):
    x = jnp.asarray(x)
  if x.shape != (batch, seq):
    raise ValueError(f"{name} must have shape [batch, seq] = {(batch, seq)}, got {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{name} must be an integer array (int32), got {x.dtype}")
  return x.astype(jnp.int32)


def _check_rule(rule: mask_rules.MaskRule):
  """Traces the rule on small int32 arrays; raises if it is unfit for the kernel."""
  n, m = 3, 5  # odd sizes, so that a rule that is not elementwise shows it
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
  q = mask_rules.Tokens(i32(n, 1), i32(n, 1))
  kv = mask_rules.Tokens(i32(1, m), i32(1, m),
                         i32(1, m) if rule.needs_doc_start else None)
  try:
    jaxpr, out = jax.make_jaxpr(rule, return_shape=True)(q, kv)
  except Exception as exc:  # noqa: BLE001 - any tracing failure is the user's rule
    raise TypeError(f"mask: the rule could not be traced with int32 arrays "
                    f"({type(exc).__name__}: {exc}); a rule must use elementwise "
                    "jnp operations, without Python control flow on its inputs") from exc
  if not isinstance(out, jax.ShapeDtypeStruct) or out.dtype != jnp.bool_:
    got = out.dtype if isinstance(out, jax.ShapeDtypeStruct) else type(out).__name__
    raise TypeError(f"mask: the rule must return booleans, got {got}")
  try:
    pair_shape = jnp.broadcast_shapes(out.shape, (n, m))
  except ValueError:
    pair_shape = None
  if pair_shape != (n, m):
    raise ValueError(f"mask: the rule must be elementwise: queries [{n}, 1] against "
                     f"keys [1, {m}] gave shape {out.shape}")
  if jaxpr.consts:
    raise ValueError("mask: the rule closes over arrays (shapes "
                     f"{[np.shape(c) for c in jaxpr.consts]}); it runs inside the "
                     "kernel and may close over Python numbers only")


def _general_mask(mask, batch, heads, tq, tk):
  """(rule or None, dense bool [B or 1, 1 or H, Tq, Tk] or None) from `mask`."""
  if mask is None:
    return None, None
  if isinstance(mask, mask_rules.MaskRule):
    _check_rule(mask)
    return mask, None
  if not hasattr(mask, "shape") or not hasattr(mask, "dtype"):
    raise TypeError("mask must be a boolean array [batch, q_len, kv_len] (or "
                    "[batch, 1 or heads, q_len, kv_len]) or a jpack.mask_rules.MaskRule, "
                    f"got {type(mask).__name__}")
  if mask.dtype != jnp.bool_:
    raise TypeError(f"mask must be a boolean array, got dtype {mask.dtype}")
  shape = tuple(mask.shape)
  if len(shape) == 3:
    shape = (shape[0], 1) + shape[1:]
  if (len(shape) != 4 or shape[0] not in (1, batch) or shape[1] not in (1, heads)
      or shape[2:] != (tq, tk)):
    raise ValueError(
        f"mask must have shape [batch, q_len, kv_len] = {(batch, tq, tk)} or "
        f"[batch, 1 or heads, q_len, kv_len] = {(batch, heads, tq, tk)} (batch may "
        f"be 1), got {tuple(mask.shape)}")
  return None, jnp.asarray(mask).reshape(shape)


def _mask_inputs(q, k, segment_ids, q_segment_ids, kv_segment_ids,
                 q_positions, kv_positions, mask=None):
  """(MaskInputs, rule or None) of the arguments, checked."""
  batch, tq, tk = q.shape[0], q.shape[1], k.shape[1]
  if segment_ids is not None:
    if q_segment_ids is not None or kv_segment_ids is not None:
      raise ValueError("pass either segment_ids or q_segment_ids/kv_segment_ids, not both")
    if tq != tk:
      raise ValueError(f"segment_ids needs equal q and kv lengths (got {tq} and {tk}); "
                       "pass q_segment_ids and kv_segment_ids instead")
    q_segment_ids = kv_segment_ids = segment_ids
  elif (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("q_segment_ids and kv_segment_ids must be given together")
  names = ("segment_ids" if segment_ids is not None else "q_segment_ids",
           "segment_ids" if segment_ids is not None else "kv_segment_ids")
  if q_segment_ids is None:
    q_seg = jnp.ones((batch, tq), jnp.int32)
    kv_seg = jnp.ones((batch, tk), jnp.int32)
  else:
    q_seg = _check_ids(names[0], q_segment_ids, batch, tq)
    kv_seg = _check_ids(names[1], kv_segment_ids, batch, tk)
  if q_positions is None:
    q_pos = jnp.broadcast_to(jnp.arange(tq, dtype=jnp.int32), (batch, tq))
  else:
    q_pos = _check_ids("q_positions", q_positions, batch, tq)
  if kv_positions is None:
    kv_pos = jnp.broadcast_to(jnp.arange(tk, dtype=jnp.int32), (batch, tk))
  else:
    kv_pos = _check_ids("kv_positions", kv_positions, batch, tk)
  rule, dense = _general_mask(mask, batch, q.shape[2], tq, tk)
  kv_doc_starts = (mask_rules.document_starts(kv_seg, kv_pos)
                   if rule is not None and rule.needs_doc_start else None)
  return MaskInputs(q_seg, kv_seg, q_pos, kv_pos, kv_doc_starts, dense), rule


def _check_options(causal, sliding_window, scale):
  if not isinstance(causal, (bool, np.bool_)):
    raise TypeError(f"causal must be a bool, got {causal!r}")
  if sliding_window is not None and (
      not isinstance(sliding_window, (int, np.integer)) or isinstance(sliding_window, bool)
      or sliding_window < 1):
    raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
  if scale is not None and not isinstance(scale, (int, float, np.floating)):
    raise TypeError(f"scale must be a Python float or None, got {type(scale).__name__}")
  if scale is not None and not (math.isfinite(scale) and scale > 0):
    # The kernels take the row max of the unscaled logits (mosaic_common.online_softmax).
    raise ValueError(f"scale must be a positive finite float, got {scale!r}")


def _check_config(config, interpret):
  if config is None:
    return
  if not isinstance(config, KernelConfig):
    raise TypeError(f"config must be a KernelConfig, got {type(config).__name__}")
  tiles = (config.forward, config.dq, config.dkdv)
  smallest = min(min(t.block_major, t.block_minor) for t in tiles)
  if not interpret and smallest < 16:
    # Triton's matrix instructions need at least 16 rows/columns.
    raise ValueError(f"config: GPU tiles must be at least 16 wide, got {smallest}; "
                     "smaller tiles only run with interpret=True")


def _is_hopper() -> bool:
  """Whether JAX's first device is an sm90 GPU (the Mosaic kernels use wgmma, sm90a only)."""
  return getattr(jax.devices()[0], "compute_capability", None) == "9.0"


def _auto_on_gpu(q, mask, plan, config) -> str:
  """What "auto" runs on a GPU.

  The plan's kernels if a plan is given; else Mosaic GPU on a Hopper GPU for
  what it covers (bf16/fp16, head_dim 64/128/256, document masks, default tiles:
  faster there, experiments/perf_notes.md), else the Triton kernels. A
  config holds one implementation's tiles, so with one "auto" means "pallas".
  """
  if plan is not None:
    return plan.implementation
  if (config is None and mask is None and q.dtype in _MOSAIC_DTYPES
      and q.shape[3] in _MOSAIC_HEAD_DIMS and _is_hopper()):
    return "mosaic"
  return "pallas"


def _resolve_implementation(implementation, q, mask, plan, config):
  """'pallas', 'mosaic' or 'xla': what a call runs, "auto" resolved (see _auto_on_gpu)."""
  if implementation not in ("auto", "pallas", "mosaic", "xla"):
    raise ValueError("implementation must be 'auto', 'pallas', 'mosaic' or 'xla', got "
                     f"{implementation!r}")
  if implementation == "auto":
    if jax.default_backend() != "gpu":
      return "xla"
    return _auto_on_gpu(q, mask, plan, config)
  return implementation


def _check_mosaic(q, config, general_mask):
  """Raises, naming the argument, for what the Mosaic GPU forward cannot do."""
  if q.dtype not in _MOSAIC_DTYPES:
    raise ValueError("q, k, v: implementation='mosaic' needs bfloat16 or float16, got "
                     f"{q.dtype}; use implementation='pallas' for float32")
  if q.shape[3] not in _MOSAIC_HEAD_DIMS:
    raise ValueError(f"q: implementation='mosaic' supports head_dim 64, 128 or 256, got "
                     f"{q.shape[3]}; use implementation='pallas'")
  if general_mask:
    raise ValueError("mask: implementation='mosaic' supports document masks only "
                     "(segment ids, positions, causal, sliding_window); use "
                     "implementation='pallas' for mask=")
  if config is not None:
    from pallas_kernels import mosaic_attention, mosaic_common  # lazily, see _kernels
    d = q.shape[3]
    for name, kv_major in (("forward", False), ("dq", False), ("dkdv", True)):
      tile = getattr(config, name)
      q_len, k_len = ((tile.block_minor, tile.block_major) if kv_major
                      else (tile.block_major, tile.block_minor))
      try:  # lengths are padded to the tile, so only the tile itself is checked
        mosaic_attention.check_supported(
            jax.ShapeDtypeStruct((1, q_len, 1, d), q.dtype),
            jax.ShapeDtypeStruct((1, k_len, 1, d), q.dtype), tile, kv_major=kv_major,
            block_minors=(mosaic_common.DQ_BLOCK_MINORS if name == "dq"
                          else mosaic_common.BLOCK_MINORS))
      except ValueError as exc:
        raise ValueError(f"config: with implementation='mosaic', config.{name} is a "
                         f"Mosaic kernel's tile: {exc}") from None


def _check_kernel_call(implementation, q, config, general_mask, interpret):
  """Raises unless the kernels can run this call; returns whether they are interpreted."""
  head_dim = q.shape[3]
  if head_dim > _MAX_KERNEL_HEAD_DIM:
    raise ValueError(f"head_dim {head_dim} is larger than the Pallas kernel supports "
                     f"({_MAX_KERNEL_HEAD_DIM}); use implementation='xla'")
  _check_config(config, interpret)
  if implementation == "mosaic":
    _check_mosaic(q, config, general_mask)
    if interpret:
      raise ValueError("interpret: implementation='mosaic' has no interpreter (the Mosaic "
                       "GPU interpreter cannot run its kernel); use implementation="
                       "'pallas' with interpret=True off-GPU")
  if interpret:
    return True
  backend = jax.default_backend()
  if backend != "gpu":
    hint = ("use implementation='xla', or interpret=True to run the kernel in the "
            "(slow) Pallas interpreter" if implementation == "pallas" else
            "use implementation='xla', or 'pallas' with interpret=True, off-GPU")
    raise ValueError(f"implementation={implementation!r} needs a CUDA GPU, but JAX's "
                     f"backend is {backend!r}; {hint}")
  return False


# ----------------------------------------------------------------------------
# Reference


def _allowed_by_group(ids: MaskInputs, spec: MaskSpec, group):
  """bool [B, Hkv or 1, group or 1, Tq, Tk]: allowed pairs, heads split as the logits'."""
  allowed = ids.allowed(spec)  # [B, 1 or H, Tq, Tk]
  return allowed.reshape(allowed.shape[0], -1, group if allowed.shape[1] > 1 else 1,
                         *allowed.shape[2:])


def _reference(q, k, v, ids: MaskInputs, spec: MaskSpec, *, scale):
  """Plain-jnp attention in float32. Returns (out [B, Tq, H, D], lse [B, H, Tq])."""
  batch, tq, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  group = heads // kv_heads
  qf = q.astype(jnp.float32).reshape(batch, tq, kv_heads, group, head_dim)
  s = jnp.einsum("bqhgd,bkhd->bhgqk", qf, k.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST) * scale
  allowed = _allowed_by_group(ids, spec, group)
  # The row max is a constant shift (no gradient needed); masked entries go
  # through exp(-inf) = 0, so neither values nor gradients see inf or NaN.
  m = jax.lax.stop_gradient(
      jnp.max(jnp.where(allowed, s, kernels.MASKED_LOGIT), axis=-1, keepdims=True))
  p = jnp.exp(jnp.where(allowed, s - m, -jnp.inf))
  l = jnp.sum(p, axis=-1, keepdims=True)
  seen = l > 0
  l = jnp.where(seen, l, 1.0)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", p / l, v.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  lse = jnp.where(seen, m + jnp.log(l), EMPTY_LSE)[..., 0]
  return (out.reshape(q.shape).astype(q.dtype),
          lse.reshape(batch, heads, tq))


def _reference_backward(q, k, v, out, lse, do, dlse, ids: MaskInputs,
                        spec: MaskSpec, *, scale):
  """(dq, dk, dv) in plain jnp, float32 math, given out and lse [B, H, Tq].

  p = exp(s - lse) on allowed pairs, so an lse taken over more keys than
  k/v hold (a ring step) gives this chunk's share of the gradients.
  """
  batch, tq, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  group = heads // kv_heads
  f32 = lambda x: x.astype(jnp.float32)
  hp = jax.lax.Precision.HIGHEST
  qf = f32(q).reshape(batch, tq, kv_heads, group, head_dim)
  dof = f32(do).reshape(qf.shape)
  s = jnp.einsum("bqhgd,bkhd->bhgqk", qf, f32(k), precision=hp) * scale
  allowed = _allowed_by_group(ids, spec, group)
  lse = lse.reshape(batch, kv_heads, group, tq)[..., None]
  p = jnp.exp(jnp.where(allowed, s - lse, -jnp.inf))  # rows with EMPTY_LSE see nothing
  delta = (jnp.einsum("bqhgd,bqhgd->bhgq", f32(out).reshape(qf.shape), dof)
           - dlse.reshape(batch, kv_heads, group, tq))[..., None]
  dv = jnp.einsum("bhgqk,bqhgd->bkhd", p, dof, precision=hp)
  ds = p * (jnp.einsum("bqhgd,bkhd->bhgqk", dof, f32(v), precision=hp) - delta)
  dq = jnp.einsum("bhgqk,bkhd->bqhgd", ds, f32(k), precision=hp) * scale
  dk = jnp.einsum("bhgqk,bqhgd->bkhd", ds, qf, precision=hp) * scale
  return (dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype),
          dv.astype(v.dtype))


# ----------------------------------------------------------------------------
# Kernel path


@dataclasses.dataclass(frozen=True)
class _Kernels:
  """The kernels of one implementation, with segment_attention's signatures, except
  backward_dq_and_delta: backward_dq given out and dlse in place of delta, returning
  (dq, delta) (delta = rowsum(out * do) - dlse, which backward_dkdv takes)."""
  forward: Callable  # -> (out, lse), tiled by config.forward
  # (q, k, v, do, lse, out, dlse, ids..., plan) -> (dq, delta), tiled by config.dq
  backward_dq_and_delta: Callable
  backward_dkdv: Callable  # -> (dk, dv), tiled by config.dkdv
  default_config: Callable[[int], KernelConfig]  # head_dim -> tilings


def _dq_after_delta(backward_dq):
  """backward_dq_and_delta of a backward_dq: delta computed first, in XLA."""
  def dq_and_delta(q, k, v, do, lse, out, dlse, *ids_and_plan, **kwargs):
    delta = kernels.backward_delta(out, do, dlse)
    return backward_dq(q, k, v, do, lse, delta, *ids_and_plan, **kwargs), delta

  return dq_and_delta


@functools.cache
def _kernels(implementation) -> _Kernels:
  """The kernels behind "pallas" and "mosaic"."""
  if implementation == "pallas":
    return _Kernels(kernels.forward, _dq_after_delta(kernels.backward_dq),
                    kernels.backward_dkdv, KernelConfig.for_head_dim)
  # Imported on first use: Mosaic GPU's MLIR bindings add ~0.2 s to `import jpack.attention`.
  from pallas_kernels import mosaic_attention, mosaic_backward
  return _Kernels(mosaic_attention.forward, mosaic_backward.backward_dq_and_delta,
                  mosaic_backward.backward_dkdv, _mosaic_config)


def _mosaic_config(head_dim) -> KernelConfig:
  """The Mosaic kernels' default tiles: at head_dim 256 mosaic_common's
  WIDE_HEAD_FORWARD_TILE, WIDE_HEAD_DQ_TILE and WIDE_HEAD_TILE (dK/dV); else their
  modules' DEFAULT_TILE, DEFAULT_DQ_TILE and DEFAULT_DKDV_TILE."""
  from pallas_kernels import mosaic_attention, mosaic_backward, mosaic_common
  if head_dim > 128:
    return KernelConfig(forward=mosaic_common.WIDE_HEAD_FORWARD_TILE,
                        dq=mosaic_common.WIDE_HEAD_DQ_TILE, dkdv=mosaic_common.WIDE_HEAD_TILE)
  return KernelConfig(forward=mosaic_attention.DEFAULT_TILE,
                      dq=mosaic_backward.DEFAULT_DQ_TILE,
                      dkdv=mosaic_backward.DEFAULT_DKDV_TILE)


@dataclasses.dataclass(frozen=True)
class _KernelOptions:
  scale: float
  spec: MaskSpec
  config: KernelConfig
  interpret: bool
  implementation: str  # "pallas" or "mosaic": a key of _kernels

  def kernel_kwargs(self, ids: MaskInputs):
    """Keyword arguments of the kernels: options, and the general mask of `ids` if any."""
    rule = self.spec.rule
    kernel_rule = None if rule is None else (
        lambda q_pos, q_seg, kv_pos, kv_seg, kv_doc: rule(
            mask_rules.Tokens(q_pos, q_seg), mask_rules.Tokens(kv_pos, kv_seg, kv_doc)))
    general = dict(rule=kernel_rule, kv_doc=ids.kv_doc_starts, dense=ids.dense)
    return dict(scale=self.scale, causal=self.spec.causal,
                sliding_window=self.spec.sliding_window, interpret=self.interpret,
                **{name: x for name, x in general.items() if x is not None})


def _plan_extras(opts, plan, items, compares_name):
  """The Mosaic kernels' extra plan arguments: {"items": the plan's work items}
  for a persistent kernel, else {compares_name: the plan's q_compares or
  kv_compares} (the item table holds them), else {}.

  The compares let masked tiles skip a compare the plan rules out; the Triton
  kernels and tile lists (general masks) have neither."""
  if items is not None:
    return {"items": items}
  if opts.implementation == "mosaic" and isinstance(plan, masks.TilePlan):
    return {compares_name: getattr(plan, compares_name)}
  return {}


def _kernel_forward(opts, q, k, v, ids, tiles):
  return _kernels(opts.implementation).forward(
      q, k, v, ids.q_segment_ids, ids.kv_segment_ids, ids.q_positions, ids.kv_positions,
      plans.q_major(tiles.forward), tile=opts.config.forward, **opts.kernel_kwargs(ids),
      **_plan_extras(opts, tiles.forward, tiles.forward_items, "q_compares"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernel_attention(opts, q, k, v, ids, tiles):
  return _kernel_forward(opts, q, k, v, ids, tiles)


def _kernel_attention_fwd(opts, q, k, v, ids, tiles):
  out, lse = _kernel_forward(opts, q, k, v, ids, tiles)
  return (out, lse), (q, k, v, ids, tiles, out, lse)


def _kernel_backward(opts, q, k, v, ids, tiles, out, lse, do, dlse):
  # d lse_i / d s_ij = p_ij, so an lse cotangent folds into delta
  # (rowsum(out * do) - dlse), which the dQ step computes and dK/dV reads.
  do = do.astype(q.dtype)
  ids_args = (ids.q_segment_ids, ids.kv_segment_ids, ids.q_positions, ids.kv_positions)
  impl = _kernels(opts.implementation)
  dq, delta = impl.backward_dq_and_delta(
      q, k, v, do, lse, out, dlse, *ids_args, plans.q_major(tiles.dq), tile=opts.config.dq,
      **opts.kernel_kwargs(ids), **_plan_extras(opts, tiles.dq, tiles.dq_items, "q_compares"))
  dk, dv = impl.backward_dkdv(q, k, v, do, lse, delta, *ids_args,
                              plans.kv_major(tiles.dkdv), tile=opts.config.dkdv,
                              **opts.kernel_kwargs(ids),
                              **_plan_extras(opts, tiles.dkdv, tiles.dkdv_items,
                                             "kv_compares"))
  return dq, dk, dv


def _kernel_attention_bwd(opts, residuals, cotangents):
  q, k, v, ids, tiles, out, lse = residuals
  do, dlse = cotangents
  return _kernel_backward(opts, q, k, v, ids, tiles, out, lse, do, dlse) + (None, None)


_kernel_attention.defvjp(_kernel_attention_fwd, _kernel_attention_bwd)


def _padded_head_dim(head_dim):
  """The kernels' head_dim: a power of two >= 16 (zero columns change neither
  q.k nor the kept output columns)."""
  return max(16, 1 << (head_dim - 1).bit_length())


def _padded_qkv(q, k, v, plan: AttentionPlan):
  """q, k, v padded to the plan's lengths, head_dim to _padded_head_dim."""
  tq_pad, tk_pad = plan.ids.q_segment_ids.shape[1], plan.ids.kv_segment_ids.shape[1]
  d = _padded_head_dim(q.shape[3])
  q = pad_axis(pad_axis(q, 1, tq_pad), 3, d)
  k = pad_axis(pad_axis(k, 1, tk_pad), 3, d)
  v = pad_axis(pad_axis(v, 1, tk_pad), 3, d)
  return q, k, v


def _kernels_padded(q, k, v, plan: AttentionPlan, opts: _KernelOptions):
  """Pads q, k, v to the plan's lengths, runs the kernels, cuts the padding off."""
  tq, head_dim = q.shape[1], q.shape[3]
  out, lse = _kernel_attention(opts, *_padded_qkv(q, k, v, plan), plan.ids, plan.tiles)
  return out[:, :tq, :, :head_dim], lse[:, :, :tq]


def _kernels_backward_padded(q, k, v, out, lse, do, dlse, plan: AttentionPlan,
                             opts: _KernelOptions):
  """The kernels' backward from given residuals, padded like `_kernels_padded`."""
  tq, tk, head_dim = q.shape[1], k.shape[1], q.shape[3]
  qp, k, v = _padded_qkv(q, k, v, plan)
  like_q = lambda x: pad_axis(pad_axis(x, 1, qp.shape[1]), 3, qp.shape[3])  # noqa: E731
  # Padded rows: segment id 0, so they see nothing; EMPTY_LSE says the same.
  lse = jnp.pad(lse, ((0, 0), (0, 0), (0, qp.shape[1] - tq)), constant_values=EMPTY_LSE)
  dlse = pad_axis(dlse, 2, qp.shape[1])
  dq, dk, dv = _kernel_backward(opts, qp, k, v, plan.ids, plan.tiles,
                                like_q(out), lse, like_q(do), dlse)
  return (dq[:, :tq, :, :head_dim], dk[:, :tk, :, :head_dim],
          dv[:, :tk, :, :head_dim])


def _make_plan(q, k, ids, spec, config, implementation,
               balance_by_load=False) -> AttentionPlan:
  """plans.make_plan, plus the work items of the Mosaic kernels that run persistent:
  dealt by load (balance_by_load), else the forward's claimed at run time and the
  backward's dealt in snake order (mosaic_persistent.DEALINGS)."""
  plan = plans.make_plan(q.shape, k.shape, ids, spec, config, implementation)
  if implementation != "mosaic" or not isinstance(plan.tiles.forward, masks.TilePlan):
    return plan
  dealings = ("load", "load") if balance_by_load else ("dynamic", "snake")
  return dataclasses.replace(plan, tiles=_mosaic_work_items(plan, q.dtype, *dealings))


def _mosaic_work_items(plan: AttentionPlan, dtype, forward_dealing, backward_dealing):
  """The plan's tiles with the work items of its persistent Mosaic kernels.

  Each persistent kernel ranks its items (B * H * row tiles of them) and
  gathers their table: made here, once per plan, a plan reused across layers
  saves them in every layer. Which kernels run persistent is decided as the
  kernels decide it (their default_schedule), for the padded shapes. The
  forward's items are dealt by forward_dealing, the backward's by
  backward_dealing (the backward kernels cannot claim theirs at run time).
  """
  from pallas_kernels import mosaic_attention, mosaic_backward, mosaic_persistent
  batch, _, heads, head_dim = plan.q_shape
  d = _padded_head_dim(head_dim)
  q = jax.ShapeDtypeStruct((batch, plan.ids.q_segment_ids.shape[1], heads, d), dtype)
  k = jax.ShapeDtypeStruct((batch, plan.ids.kv_segment_ids.shape[1], plan.k_shape[2], d),
                           dtype)
  config, tiles = plan.config, plan.tiles
  work = functools.partial(mosaic_persistent.work_items, dealing=backward_dealing)
  forward = mosaic_attention.default_schedule(config.forward, k).startswith("persistent")
  dq = mosaic_backward.default_schedule(config.dq, k, "dq") == "persistent"
  dkdv = mosaic_backward.default_schedule(config.dkdv, q, "dkdv") == "persistent"
  return dataclasses.replace(
      tiles,
      forward_items=(mosaic_persistent.work_items(
          tiles.forward.q_ranges, heads, tiles.forward.q_compares, spans=tiles.forward.q_spans,
          dealing=forward_dealing, tail=mosaic_persistent.claimed_tail(d),
          coded_ids=(plan.ids.q_segment_ids, plan.ids.kv_segment_ids,
                     config.forward.block_minor)) if forward else None),
      dq_items=work(tiles.dq.q_ranges, heads, tiles.dq.q_compares) if dq else None,
      dkdv_items=(work(tiles.dkdv.kv_ranges, k.shape[2], tiles.dkdv.kv_compares)
                  if dkdv else None))


# ----------------------------------------------------------------------------
# Public API


def make_attention_plan(
    q,
    k,
    *,
    segment_ids: jax.Array | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    mask: jax.Array | mask_rules.MaskRule | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    config: KernelConfig | None = None,
    implementation: Literal["auto", "pallas", "mosaic"] = "auto",
    balance_by_load: bool = True,
) -> AttentionPlan:
  """The mask and tile plan of flash_attention, computed once for many layers.

      plan = make_attention_plan(q, k, segment_ids=seg, mask=graph, causal=False)
      for layer in layers:   # same q/k shapes, same mask
        out = flash_attention(q_l, k_l, v_l, plan=plan, causal=False)

  Args:
    q, k: arrays (or jax.ShapeDtypeStruct) of the shapes the layers pass.
    segment_ids ... sliding_window: as for `flash_attention`.
    config: the kernel tiling (default: as for `flash_attention`).
    implementation: the kernels to plan for, as `flash_attention`'s:
      "pallas", "mosaic", or "auto" (what `flash_attention`'s "auto" would
      run on a GPU for these q, mask and config: "mosaic" on Hopper where it
      can, else "pallas").
      A plan only runs with the kernels it was made for; the reference
      ("xla") takes any plan.
    balance_by_load: with the Mosaic kernels, deal the persistent kernels'
      work items to their CTAs by modelled load (round by round, the
      costliest item to the least loaded CTA), as a call without a plan does
      not: there the forward's CTAs claim their items while they run
      (mosaic_claims) and the backward's are dealt in snake order. Same
      outputs; on an H100 the persistent forward runs 1-10% faster on packed
      documents than with snake dealing (about as fast as with claims),
      while making the plan costs about 0.2 ms more per persistent kernel
      (a sequential scan over rounds of 132 items): worth it for a plan
      shared by several layers.

  Cost: O(B * Tq/bq * Tk/bk) for document masks; a general mask evaluates
  every (query, key) pair once (O(B * H_mask * Tq * Tk) elementwise work, in
  chunks of q tiles of bounded memory), which is what reuse saves.
  """
  _check_qkv(q, k, k)
  _check_options(causal, sliding_window, None)
  if config is not None and not isinstance(config, KernelConfig):
    raise TypeError(f"config must be a KernelConfig, got {type(config).__name__}")
  if implementation not in ("auto", "pallas", "mosaic"):
    raise ValueError("implementation must be 'auto', 'pallas' or 'mosaic' (the kernels "
                     f"to plan for), got {implementation!r}")
  target = (_auto_on_gpu(q, mask, None, config) if implementation == "auto"
            else implementation)
  ids, rule = _mask_inputs(q, k, segment_ids, q_segment_ids, kv_segment_ids,
                           q_positions, kv_positions, mask)
  if target == "mosaic":
    _check_mosaic(q, config, general_mask=rule is not None or ids.dense is not None)
  spec = _mask_spec(causal, sliding_window, rule)
  return _make_plan(q, k, ids, spec, config or _kernels(target).default_config(q.shape[3]),
                    target, balance_by_load=balance_by_load)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    mask: jax.Array | mask_rules.MaskRule | None = None,
    plan: AttentionPlan | None = None,
    scale: float | None = None,
    implementation: Implementation = "auto",
    return_residuals: bool = False,
    config: KernelConfig | None = None,
    interpret: bool = False,
):
  """Attention restricted to documents of packed rows, and to a general mask.

  Args:
    q: [B, Tq, H, D] bfloat16, float16 or float32.
    k, v: [B, Tk, Hkv, D], same dtype; H % Hkv == 0 (GQA/MQA, never repeated).
    segment_ids: int [B, T] document ids (0 = padding), for Tq == Tk.
    q_segment_ids, kv_segment_ids: int [B, Tq] and [B, Tk], instead of
      segment_ids (e.g. a q chunk against a kv chunk). Default: one document.
    q_positions, kv_positions: int [B, Tq] / [B, Tk] positions used by the
      causal and window rules (not RoPE positions). Default: index in the row.
    causal: keys at later positions are hidden.
    sliding_window: if set, keys at positions <= pos_q - sliding_window are hidden.
    mask: a general mask ANDed with all of the above: a dense boolean array
      [B, Tq, Tk] or [B, 1 or H, Tq, Tk] (batch may be 1), or a rule of
      `jpack.mask_rules` (causal(), sliding_window(w), prefix_lm(p),
      document(), rule(fn), combined with & | ~). The kernels skip its empty
      tiles, run its full tiles unmasked and mask the rest.
    plan: an `AttentionPlan` from `make_attention_plan`, instead of the ids,
      positions, sliding_window and mask (which it holds) and config; causal
      must be what the plan was made with. Saves planning in every layer.
    scale: logit scale, a positive finite float; default 1/sqrt(D).
    implementation: "pallas" (the GPU kernels, Triton lowering), "mosaic"
      (the Mosaic GPU kernels, forward and backward: Hopper, sm90), "xla"
      (the plain-jnp reference, float32 math, memory O(Tq*Tk)), or "auto":
      off GPU "xla"; on GPU the plan's kernels if a plan is given, else
      "mosaic" on a Hopper GPU for what it covers (bfloat16/float16, head_dim
      64, 128 or 256, no `mask`, no `config`), else "pallas". Naming "mosaic" for
      anything it does not cover raises ValueError.
    return_residuals: also return lse, float32 [B, H, Tq], natural log,
      EMPTY_LSE for rows that attend to nothing.
    config: kernel tiling (default: KernelConfig.for_head_dim(D); for
      "mosaic", the Mosaic kernels' tiles mosaic_attention.DEFAULT_TILE,
      mosaic_backward.DEFAULT_DQ_TILE and DEFAULT_DKDV_TILE, or mosaic_common's
      WIDE_HEAD_FORWARD_TILE, WIDE_HEAD_DQ_TILE and WIDE_HEAD_TILE at head_dim
      256: block_major 64 or 128, block_minor 64 or 128, or 32 for dq).
    interpret: run the Pallas kernel in the Pallas interpreter (CPU tests;
      "pallas" only).

  Returns:
    out [B, Tq, H, D] in q.dtype, or (out, lse) with return_residuals.
  """
  _check_qkv(q, k, v)
  _check_options(causal, sliding_window, scale)
  impl = _resolve_implementation(implementation, q, mask, plan, config)
  spec, ids, plan, config = _mask_and_plan(
      q, k, dict(segment_ids=segment_ids, q_segment_ids=q_segment_ids,
                 kv_segment_ids=kv_segment_ids, q_positions=q_positions,
                 kv_positions=kv_positions),
      causal=causal, sliding_window=sliding_window, mask=mask, plan=plan, config=config,
      implementation=impl)
  head_dim = q.shape[3]
  scale = float(1.0 / math.sqrt(head_dim) if scale is None else scale)
  if impl == "xla":
    out, lse = _reference(q, k, v, ids, spec, scale=scale)
  else:
    opts, plan = _kernel_setup(q, k, ids, plan, spec, scale, config, interpret, impl)
    out, lse = _kernels_padded(q, k, v, plan, opts)
  return (out, lse) if return_residuals else out


def _mask_and_plan(q, k, id_args, *, causal, sliding_window, mask, plan, config,
                   implementation):
  """(spec, unpadded mask inputs, plan or None, config) of a call's mask arguments.

  With a plan, the ids and mask come from it (after checking it fits the call);
  without, from the arguments.
  """
  if plan is not None:
    plans.check_plan(plan, q, k, causal, config,
                     dict(id_args, sliding_window=sliding_window, mask=mask),
                     implementation)
    return plan.spec, plan.unpadded_ids(), plan, plan.config
  ids, rule = _mask_inputs(q, k, **id_args, mask=mask)
  return _mask_spec(causal, sliding_window, rule), ids, None, config


def _mask_spec(causal, sliding_window, rule) -> MaskSpec:
  if causal and rule is not None and rule.sees_ahead:
    raise ValueError("mask: the rule lets queries see later keys (prefix_lm), which "
                     "causal=True would hide again (leaving plain causal attention); "
                     "pass causal=False: prefix_lm is causal after the prefix")
  return MaskSpec(bool(causal), None if sliding_window is None else int(sliding_window),
                  rule)


def _kernel_setup(q, k, ids, plan, spec, scale, config, interpret, implementation):
  """(kernel options, plan) once the kernels are known to fit the call.

  The plan is the given one, or one made from the mask inputs.
  """
  general_mask = spec.rule is not None or ids.dense is not None
  interpret = _check_kernel_call(implementation, q, config, general_mask, interpret)
  config = config or _kernels(implementation).default_config(q.shape[3])
  if plan is None:
    plan = _make_plan(q, k, ids, spec, config, implementation)
  return _KernelOptions(scale=scale, spec=spec, config=config, interpret=interpret,
                        implementation=implementation), plan


def _check_residual(name, x, shape):
  if not hasattr(x, "shape") or tuple(x.shape) != tuple(shape):
    raise ValueError(f"{name} must have shape {tuple(shape)}, got "
                     f"{getattr(x, 'shape', type(x).__name__)}")


def flash_attention_bwd(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    out: jax.Array,
    lse: jax.Array,
    do: jax.Array,
    *,
    dlse: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    mask: jax.Array | mask_rules.MaskRule | None = None,
    plan: AttentionPlan | None = None,
    scale: float | None = None,
    implementation: Implementation = "auto",
    config: KernelConfig | None = None,
    interpret: bool = False,
):
  """Gradients of attention from its residuals, without running the forward.

  Returns (dq, dk, dv) of sum(out * do) + sum(lse * dlse), where (out, lse)
  is the attention of q over a set of keys that contains k/v. With the
  (out, lse) of `flash_attention(q, k, v, ...)` itself this is its VJP; with
  the (out, lse) over a whole row, it is the exact share of one chunk of keys
  (the backward of ring attention).

  Args:
    q, k, v, the mask arguments (mask and plan included), implementation,
      config, interpret: as for `flash_attention` (the dQ and dK/dV kernels
      of the implementation run, tiled by config.dq and config.dkdv).
    out: [B, Tq, H, D]; lse: float32 [B, H, Tq] (EMPTY_LSE: the row sees nothing).
    do: [B, Tq, H, D] cotangent of out; dlse: float32 [B, H, Tq] or None (zeros).

  Returns:
    dq [B, Tq, H, D] in q.dtype; dk, dv [B, Tk, Hkv, D] in k.dtype.
  """
  _check_qkv(q, k, v)
  _check_options(causal, sliding_window, scale)
  row_stat = (q.shape[0], q.shape[2], q.shape[1])
  _check_residual("out", out, q.shape)
  _check_residual("do", do, q.shape)
  _check_residual("lse", lse, row_stat)
  if dlse is None:
    dlse = jnp.zeros(row_stat, jnp.float32)
  _check_residual("dlse", dlse, row_stat)
  impl = _resolve_implementation(implementation, q, mask, plan, config)
  spec, ids, plan, config = _mask_and_plan(
      q, k, dict(segment_ids=segment_ids, q_segment_ids=q_segment_ids,
                 kv_segment_ids=kv_segment_ids, q_positions=q_positions,
                 kv_positions=kv_positions),
      causal=causal, sliding_window=sliding_window, mask=mask, plan=plan, config=config,
      implementation=impl)
  head_dim = q.shape[3]
  scale = float(1.0 / math.sqrt(head_dim) if scale is None else scale)
  lse, dlse = lse.astype(jnp.float32), dlse.astype(jnp.float32)
  if impl == "xla":
    return _reference_backward(q, k, v, out, lse, do, dlse, ids, spec, scale=scale)
  opts, plan = _kernel_setup(q, k, ids, plan, spec, scale, config, interpret, impl)
  return _kernels_backward_padded(q, k, v, out, lse, do, dlse, plan, opts)


def reference_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    mask: jax.Array | mask_rules.MaskRule | None = None,
    plan: AttentionPlan | None = None,
    scale: float | None = None,
    return_residuals: bool = False,
):
  """The semantics of `flash_attention`, in plain jnp with float32 math.

  Same arguments and results as `flash_attention(..., implementation="xla")`.
  This is the oracle the kernels are tested against.
  """
  return flash_attention(
      q, k, v, segment_ids=segment_ids, q_segment_ids=q_segment_ids,
      kv_segment_ids=kv_segment_ids, q_positions=q_positions,
      kv_positions=kv_positions, causal=causal, sliding_window=sliding_window,
      mask=mask, plan=plan, scale=scale, implementation="xla",
      return_residuals=return_residuals)
