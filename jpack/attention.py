"""Attention for packed rows: public API, input checks, dispatch, reference.

    from jpack.attention import flash_attention
    out = flash_attention(q, k, v, segment_ids=segment_ids)   # q: [B, T, H, D]

Query i attends to key j iff

    seg_q[i] == seg_kv[j] != 0
    and (not causal or pos_kv[j] <= pos_q[i])
    and (sliding_window is None or pos_q[i] - pos_kv[j] < sliding_window).

Segment id 0 marks padding. A query that can attend to nothing (padding, or a
document cut off by a window or a chunk boundary) gets output exactly 0, lse
EMPTY_LSE, and contributes exactly 0 to every gradient. Nothing is NaN.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jpack import masks
from pallas_kernels import segment_attention as kernels
from pallas_kernels.config import KernelConfig, TileConfig

__all__ = [
    "EMPTY_LSE", "KernelConfig", "TileConfig", "flash_attention",
    "flash_attention_bwd", "reference_attention",
]

EMPTY_LSE = kernels.EMPTY_LSE
"""lse (natural log) of a query row that attends to nothing: -1e30, finite.

Finite so that merging partial results through lse (ring attention) never
meets inf - inf; exp(EMPTY_LSE - anything real) is exactly 0.
"""

Implementation = Literal["auto", "pallas", "xla"]
_FLOAT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
_MAX_KERNEL_HEAD_DIM = 256


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _MaskInputs:
  """Segment ids and positions, int32: q_* [B, Tq], kv_* [B, Tk]."""
  q_segment_ids: jax.Array
  kv_segment_ids: jax.Array
  q_positions: jax.Array
  kv_positions: jax.Array


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


def _mask_inputs(q, k, segment_ids, q_segment_ids, kv_segment_ids,
                 q_positions, kv_positions) -> _MaskInputs:
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
  return _MaskInputs(q_seg, kv_seg, q_pos, kv_pos)


def _check_options(causal, sliding_window, scale):
  if not isinstance(causal, (bool, np.bool_)):
    raise TypeError(f"causal must be a bool, got {causal!r}")
  if sliding_window is not None and (
      not isinstance(sliding_window, (int, np.integer)) or isinstance(sliding_window, bool)
      or sliding_window < 1):
    raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
  if scale is not None and not isinstance(scale, (int, float, np.floating)):
    raise TypeError(f"scale must be a Python float or None, got {type(scale).__name__}")


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


def _resolve_implementation(implementation, head_dim, interpret, config):
  """'pallas' or 'xla', plus whether the kernel runs in the Pallas interpreter."""
  if implementation not in ("auto", "pallas", "xla"):
    raise ValueError(f"implementation must be 'auto', 'pallas' or 'xla', got {implementation!r}")
  backend = jax.default_backend()
  if implementation == "auto":
    implementation = "pallas" if backend == "gpu" else "xla"
  if implementation == "xla":
    return "xla", False
  if head_dim > _MAX_KERNEL_HEAD_DIM:
    raise ValueError(f"head_dim {head_dim} is larger than the Pallas kernel supports "
                     f"({_MAX_KERNEL_HEAD_DIM}); use implementation='xla'")
  _check_config(config, interpret)
  if interpret:
    return "pallas", True
  if backend != "gpu":
    raise ValueError(
        f"implementation='pallas' needs a CUDA GPU, but JAX's backend is {backend!r}; "
        "use implementation='xla', or interpret=True to run the kernel in the "
        "(slow) Pallas interpreter")
  return "pallas", False


# ----------------------------------------------------------------------------
# Reference


def _reference(q, k, v, ids: _MaskInputs, *, causal, sliding_window, scale):
  """Plain-jnp attention in float32. Returns (out [B, Tq, H, D], lse [B, H, Tq])."""
  batch, tq, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  group = heads // kv_heads
  qf = q.astype(jnp.float32).reshape(batch, tq, kv_heads, group, head_dim)
  s = jnp.einsum("bqhgd,bkhd->bhgqk", qf, k.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST) * scale
  allowed = masks.allowed_mask(ids.q_segment_ids, ids.kv_segment_ids,
                               ids.q_positions, ids.kv_positions, causal=causal,
                               sliding_window=sliding_window)[:, None, None]
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


def _reference_backward(q, k, v, out, lse, do, dlse, ids: _MaskInputs, *,
                        causal, sliding_window, scale):
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
  allowed = masks.allowed_mask(ids.q_segment_ids, ids.kv_segment_ids,
                               ids.q_positions, ids.kv_positions, causal=causal,
                               sliding_window=sliding_window)[:, None, None]
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
# Pallas path


@dataclasses.dataclass(frozen=True)
class _KernelOptions:
  scale: float
  causal: bool
  sliding_window: int | None
  config: KernelConfig
  interpret: bool

  def kernel_kwargs(self):
    return dict(scale=self.scale, causal=self.causal,
                sliding_window=self.sliding_window, interpret=self.interpret)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Plans:
  """Tile plans for the three kernels' tilings."""
  forward: masks.TilePlan
  dq: masks.TilePlan
  dkdv: masks.TilePlan


def _make_plans(ids: _MaskInputs, opts: _KernelOptions) -> _Plans:
  cache = {}

  def plan(block_q, block_k):
    if (block_q, block_k) not in cache:
      cache[block_q, block_k] = masks.make_tile_plan(
          ids.q_segment_ids, ids.kv_segment_ids, ids.q_positions,
          ids.kv_positions, block_q=block_q, block_k=block_k,
          causal=opts.causal, sliding_window=opts.sliding_window)
    return cache[block_q, block_k]

  cfg = opts.config
  return _Plans(
      forward=plan(cfg.forward.block_major, cfg.forward.block_minor),
      dq=plan(cfg.dq.block_major, cfg.dq.block_minor),
      dkdv=plan(cfg.dkdv.block_minor, cfg.dkdv.block_major),
  )


def _kernel_forward(opts, q, k, v, ids, plans):
  return kernels.forward(q, k, v, ids.q_segment_ids, ids.kv_segment_ids,
                         ids.q_positions, ids.kv_positions, plans.forward.q_ranges,
                         tile=opts.config.forward, **opts.kernel_kwargs())


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernel_attention(opts, q, k, v, ids, plans):
  return _kernel_forward(opts, q, k, v, ids, plans)


def _kernel_attention_fwd(opts, q, k, v, ids, plans):
  out, lse = _kernel_forward(opts, q, k, v, ids, plans)
  return (out, lse), (q, k, v, ids, plans, out, lse)


def _kernel_backward(opts, q, k, v, ids, plans, out, lse, do, dlse):
  # d lse_i / d s_ij = p_ij, so an lse cotangent folds into delta.
  delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32),
                     do.astype(jnp.float32)) - dlse
  args = (q, k, v, do.astype(q.dtype), lse, delta, ids.q_segment_ids,
          ids.kv_segment_ids, ids.q_positions, ids.kv_positions)
  dq = kernels.backward_dq(*args, plans.dq.q_ranges, tile=opts.config.dq,
                           **opts.kernel_kwargs())
  dk, dv = kernels.backward_dkdv(*args, plans.dkdv.kv_ranges,
                                 tile=opts.config.dkdv, **opts.kernel_kwargs())
  return dq, dk, dv


def _kernel_attention_bwd(opts, residuals, cotangents):
  q, k, v, ids, plans, out, lse = residuals
  do, dlse = cotangents
  return _kernel_backward(opts, q, k, v, ids, plans, out, lse, do, dlse) + (None, None)


_kernel_attention.defvjp(_kernel_attention_fwd, _kernel_attention_bwd)


def _pad_axis(x, axis, size):
  """x zero-padded at the end of `axis` to `size`."""
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def _round_up(n, m):
  return -(-n // m) * m


def _padded(q, k, v, ids: _MaskInputs, opts: _KernelOptions):
  """q, k, v, ids padded to the kernels' granularity.

  Sequence padding gets segment id 0 (so it is masked out); head_dim is padded
  with zeros to a power of two >= 16, which changes neither q.k nor the kept
  output columns.
  """
  d = max(16, 1 << (q.shape[3] - 1).bit_length())
  tq_pad = _round_up(q.shape[1], opts.config.row_multiple)
  tk_pad = _round_up(k.shape[1], opts.config.row_multiple)
  q = _pad_axis(_pad_axis(q, 1, tq_pad), 3, d)
  k = _pad_axis(_pad_axis(k, 1, tk_pad), 3, d)
  v = _pad_axis(_pad_axis(v, 1, tk_pad), 3, d)
  ids = _MaskInputs(
      _pad_axis(ids.q_segment_ids, 1, tq_pad), _pad_axis(ids.kv_segment_ids, 1, tk_pad),
      _pad_axis(ids.q_positions, 1, tq_pad), _pad_axis(ids.kv_positions, 1, tk_pad))
  return q, k, v, ids


def _pallas(q, k, v, ids: _MaskInputs, opts: _KernelOptions):
  """Pads to the kernels' granularity, runs them, and cuts the padding off."""
  tq, head_dim = q.shape[1], q.shape[3]
  q, k, v, ids = _padded(q, k, v, ids, opts)
  out, lse = _kernel_attention(opts, q, k, v, ids, _make_plans(ids, opts))
  return out[:, :tq, :, :head_dim], lse[:, :, :tq]


def _pallas_backward(q, k, v, out, lse, do, dlse, ids: _MaskInputs,
                     opts: _KernelOptions):
  """The kernels' backward from given residuals, padded like `_pallas`."""
  tq, tk, head_dim = q.shape[1], k.shape[1], q.shape[3]
  qp, k, v, ids = _padded(q, k, v, ids, opts)
  like_q = lambda x: _pad_axis(_pad_axis(x, 1, qp.shape[1]), 3, qp.shape[3])
  # Padded rows: segment id 0, so they see nothing; EMPTY_LSE says the same.
  lse = jnp.pad(lse, ((0, 0), (0, 0), (0, qp.shape[1] - tq)), constant_values=EMPTY_LSE)
  dlse = _pad_axis(dlse, 2, qp.shape[1])
  dq, dk, dv = _kernel_backward(opts, qp, k, v, ids, _make_plans(ids, opts),
                                like_q(out), lse, like_q(do), dlse)
  return (dq[:, :tq, :, :head_dim], dk[:, :tk, :, :head_dim],
          dv[:, :tk, :, :head_dim])


# ----------------------------------------------------------------------------
# Public API


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
    scale: float | None = None,
    implementation: Implementation = "auto",
    return_residuals: bool = False,
    config: KernelConfig | None = None,
    interpret: bool = False,
):
  """Attention restricted to documents of packed rows.

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
    scale: logit scale, default 1/sqrt(D).
    implementation: "pallas" (GPU kernel), "xla" (the plain-jnp reference,
      float32 math, memory O(Tq*Tk)), or "auto" (pallas on GPU, else xla).
    return_residuals: also return lse, float32 [B, H, Tq], natural log,
      EMPTY_LSE for rows that attend to nothing.
    config: kernel tiling (default: KernelConfig.for_head_dim(D)).
    interpret: run the Pallas kernel in the Pallas interpreter (CPU tests).

  Returns:
    out [B, Tq, H, D] in q.dtype, or (out, lse) with return_residuals.
  """
  _check_qkv(q, k, v)
  _check_options(causal, sliding_window, scale)
  ids = _mask_inputs(q, k, segment_ids, q_segment_ids, kv_segment_ids,
                     q_positions, kv_positions)
  head_dim = q.shape[3]
  scale = float(1.0 / math.sqrt(head_dim) if scale is None else scale)
  impl, interpret = _resolve_implementation(implementation, head_dim, interpret, config)
  if impl == "xla":
    out, lse = _reference(q, k, v, ids, causal=bool(causal),
                          sliding_window=sliding_window, scale=scale)
  else:
    opts = _kernel_options(scale, causal, sliding_window, config, head_dim, interpret)
    out, lse = _pallas(q, k, v, ids, opts)
  return (out, lse) if return_residuals else out


def _kernel_options(scale, causal, sliding_window, config, head_dim, interpret):
  return _KernelOptions(
      scale=scale, causal=bool(causal),
      sliding_window=None if sliding_window is None else int(sliding_window),
      config=config or KernelConfig.for_head_dim(head_dim), interpret=interpret)


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
    q, k, v and the mask arguments: as for `flash_attention`.
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
  ids = _mask_inputs(q, k, segment_ids, q_segment_ids, kv_segment_ids,
                     q_positions, kv_positions)
  head_dim = q.shape[3]
  scale = float(1.0 / math.sqrt(head_dim) if scale is None else scale)
  impl, interpret = _resolve_implementation(implementation, head_dim, interpret, config)
  lse, dlse = lse.astype(jnp.float32), dlse.astype(jnp.float32)
  if impl == "xla":
    return _reference_backward(q, k, v, out, lse, do, dlse, ids, causal=bool(causal),
                               sliding_window=sliding_window, scale=scale)
  opts = _kernel_options(scale, causal, sliding_window, config, head_dim, interpret)
  return _pallas_backward(q, k, v, out, lse, do, dlse, ids, opts)


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
      scale=scale, implementation="xla", return_residuals=return_residuals)
