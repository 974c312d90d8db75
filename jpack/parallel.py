"""Context parallelism: one packed row split along the sequence over a mesh axis.

    from jpack.parallel import context_parallel_attention
    out = context_parallel_attention(q, k, v, mesh=mesh, segment_ids=seg)

Every device holds T / n consecutive tokens of each row (n = size of the
`context` mesh axis) and computes attention for its own queries against all
keys, exactly as one device would for the whole row:

- "ring": at step s every device receives the K/V chunk (with its segment ids
  and positions) of the device s places to its left, by `lax.ppermute`; every
  step's partial (out, lse) is merged through lse. Chunk pairs whose documents
  or positions cannot meet (per-block min/max of ids and positions) skip the
  attention call under `lax.cond`, and a step that no device needs skips the
  transfer too.
- "all_gather": K/V, ids and positions are all-gathered, then one attention call
  of the local queries against the whole row (Llama 3; cheap with GQA).

Backward: the ring's is hand-written (custom VJP). It keeps q, k, v and the
merged (out, lse), fetches each needed K/V chunk again, takes that chunk's
exact share of the gradients from the merged (out, lse)
(`jpack.attention.flash_attention_bwd`) and sends dK/dV back to the chunk's
owner. All-gather's is JAX autodiff (dK/dV return by a reduce-scatter).

Masking uses positions that are indices in the *original* row. Causal rows put
more work on later devices; `load_balance` reorders tokens in a zigzag (device
d holds chunks d and 2n-1-d of 2n) so that every device does the same work,
and `restore_order` undoes it. Permute tokens, segment ids, positions (and
targets, loss masks, RoPE positions) once at the input: every per-token layer
is indifferent to the order, and attention sees the true positions.

A query that sees nothing (padding, or a chunk pair where nothing meets) gets
output 0, lse EMPTY_LSE and zero gradients, as in `jpack.attention`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jpack import masks
from jpack.attention import (EMPTY_LSE, KernelConfig, flash_attention,
                             flash_attention_bwd)

__all__ = [
    "ContextParallel", "all_gather_attention_shard", "attention_pair_counts",
    "context_parallel_attention", "flop_imbalance", "load_balance",
    "merge_partials", "restore_order", "ring_attention_shard", "ring_schedule",
    "zigzag_order",
]

Strategy = Literal["ring", "all_gather"]
STRATEGIES = ("ring", "all_gather")
_SKIP_BLOCKS = 16  # at most this many min/max blocks per shard decide a skip


# ----------------------------------------------------------------------------
# Options shared by the per-shard functions


@dataclasses.dataclass(frozen=True)
class _Options:
  """Static attention options, hashable (they key the compiled shard_map)."""
  causal: bool = True
  sliding_window: int | None = None
  scale: float | None = None
  implementation: str = "auto"
  config: KernelConfig | None = None
  interpret: bool = False

  def attend(self, q, k, v, q_seg, kv_seg, q_pos, kv_pos):
    """(out [B, Tq, H, D], lse [B, H, Tq]) of q against one K/V chunk."""
    return flash_attention(
        q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg, q_positions=q_pos,
        kv_positions=kv_pos, causal=self.causal,
        sliding_window=self.sliding_window, scale=self.scale,
        implementation=self.implementation, return_residuals=True,
        config=self.config, interpret=self.interpret)

  def attend_bwd(self, q, k, v, q_seg, kv_seg, q_pos, kv_pos, out, lse, do, dlse):
    """(dq, dk, dv): this K/V chunk's share of the gradients of (out, lse)."""
    return flash_attention_bwd(
        q, k, v, out, lse, do, dlse=dlse, q_segment_ids=q_seg,
        kv_segment_ids=kv_seg, q_positions=q_pos, kv_positions=kv_pos,
        causal=self.causal, sliding_window=self.sliding_window, scale=self.scale,
        implementation=self.implementation, config=self.config,
        interpret=self.interpret)


# ----------------------------------------------------------------------------
# Per-shard attention (call inside shard_map over `axis_name`)


def _chunk_stats(segment_ids, positions) -> masks.TileStats:
  """Min/max of ids and positions over a few blocks of one shard: [B, nb]."""
  block = segment_ids.shape[1] // math.gcd(segment_ids.shape[1], _SKIP_BLOCKS)
  return masks.tile_stats(segment_ids, positions, block)


def _can_meet(q_stats, kv_stats, opts: _Options):
  """Scalar bool: some query block of the shard may attend to some key block.

  Per-block (not per-shard) min/max, so that a zigzag shard, two distant
  halves of the row, still skips the chunks that neither half can see.
  """
  visit, _ = masks.tile_occupancy(q_stats, kv_stats, causal=opts.causal,
                                  sliding_window=opts.sliding_window)
  return jnp.any(visit)


def _empty_result(q):
  """(zeros like q, EMPTY_LSE [B, H, Tq]): the partial result of a skipped chunk.

  Built from q (zeros_like/full_like), so it varies over the mesh axes like
  the other lax.cond branch even where shard_map checks that.
  """
  lse = jnp.full_like(jnp.swapaxes(q[..., 0], 1, 2), EMPTY_LSE, jnp.float32)
  return jnp.zeros_like(q), lse


def merge_partials(outs, lses):
  """Exact attention over the union of key chunks, from per-chunk results.

  Args:
    outs: [S, B, T, H, D], S partial outputs, each normalised over its chunk.
    lses: float32 [S, B, H, T], EMPTY_LSE where a chunk had nothing to attend to.

  Returns:
    (out [B, T, H, D] in outs' dtype, lse float32 [B, H, T]). Rows empty in
    every chunk get out 0 and lse EMPTY_LSE; their gradients are 0, not NaN.
  """
  acc = (outs[0].astype(jnp.float32), lses[0])
  for s in range(1, outs.shape[0]):
    acc = _merge_pair(acc, (outs[s], lses[s]))
  return acc[0].astype(outs.dtype), acc[1]


def _merge_pair(a, b):
  """(out float32 [B, T, H, D], lse [B, H, T]) over the keys of partials a and b."""
  (out_a, lse_a), (out_b, lse_b) = a, b
  # The shift m cancels out of the result, so it needs no gradient.
  m = lax.stop_gradient(jnp.maximum(lse_a, lse_b))
  w_a, w_b = jnp.exp(lse_a - m), jnp.exp(lse_b - m)  # an empty side: exp(-1e30 - m) = 0
  total = w_a + w_b  # >= 1: the larger term is exp(0)
  lse = jnp.where(m > EMPTY_LSE, m + jnp.log(total), EMPTY_LSE)
  as_out = lambda w: jnp.swapaxes(w / total, 1, 2)[..., None]  # [B, T, H, 1]
  out = (as_out(w_a) * out_a.astype(jnp.float32)
         + as_out(w_b) * out_b.astype(jnp.float32))
  return out, lse


@dataclasses.dataclass(frozen=True)
class _Ring:
  """Static description of one ring: mesh axis, its size, attention options."""
  axis_name: str
  num_shards: int
  opts: _Options

  def shifted(self, x, s):
    """x of the device s places to the left (a ppermute by s)."""
    n = self.num_shards
    return lax.ppermute(x, self.axis_name, [(j, (j + s) % n) for j in range(n)])

  def unshifted(self, x, s):
    """The inverse of `shifted`: x back to the device s places to the right."""
    return self.shifted(x, self.num_shards - s)


def _ring(q, k, v, q_seg, kv_seg, q_pos, kv_pos, *, axis_name, num_shards,
          opts: _Options):
  """`ring_attention_shard` with its options gathered in `opts`.

  Step s attends to the K/V of the device s places to the left, sent there
  directly (one ppermute by s), and merges the partial result into a running
  (out, lse) in float32. Each device decides from per-block min/max whether
  its queries can meet that chunk; a step that no device needs skips its
  transfer and its merge as well, so rows whose documents never cross a shard
  boundary move no K/V and cost what one device's share would.

  The backward is hand-written (custom VJP): it keeps only q, k, v, out and
  lse, fetches each needed chunk again, takes that chunk's share of the
  gradients from the final (out, lse), and sends dK/dV back to their owner.
  """
  mine, needed = _ring_steps(q_seg, q_pos, kv_seg, kv_pos,
                             axis_name=axis_name, num_shards=num_shards, opts=opts)
  return _ring_attention(_Ring(axis_name, num_shards, opts), q, k, v,
                         (q_seg, kv_seg, q_pos, kv_pos), mine, needed)


def _ring_forward(ring: _Ring, q, k, v, ids, mine, needed):
  q_seg, kv_seg, q_pos, kv_pos = ids

  def attend_if_mine(s, kv):
    return lax.cond(mine[s], lambda kv: ring.opts.attend(q, kv[0], kv[1], q_seg, kv[2],
                                                         q_pos, kv[3]),
                    lambda kv: _empty_result(q), kv)

  def fetch_attend_merge(s, acc):
    return _merge_pair(acc, attend_if_mine(s, ring.shifted((k, v, kv_seg, kv_pos), s)))

  out, lse = attend_if_mine(0, (k, v, kv_seg, kv_pos))
  acc = (out.astype(jnp.float32), lse)
  # Every device agrees on `needed`, so all take the same side of each cond
  # around a collective.
  for s in range(1, ring.num_shards):
    acc = lax.cond(needed[s], functools.partial(fetch_attend_merge, s),
                   lambda acc: acc, acc)
  return acc[0].astype(q.dtype), acc[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_attention(ring: _Ring, q, k, v, ids, mine, needed):
  return _ring_forward(ring, q, k, v, ids, mine, needed)


def _ring_attention_fwd(ring: _Ring, q, k, v, ids, mine, needed):
  out, lse = _ring_forward(ring, q, k, v, ids, mine, needed)
  return (out, lse), (q, k, v, ids, mine, needed, out, lse)


def _ring_attention_bwd(ring: _Ring, residuals, cotangents):
  q, k, v, ids, mine, needed, out, lse = residuals
  do, dlse = cotangents
  q_seg, kv_seg, q_pos, kv_pos = ids
  f32 = lambda x: x.astype(jnp.float32)

  def grads_if_mine(s, k, v, kv_seg, kv_pos):
    def grads():
      return tuple(map(f32, ring.opts.attend_bwd(q, k, v, q_seg, kv_seg, q_pos,
                                                 kv_pos, out, lse, do, dlse)))
    zeros = lambda: (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32),
                     jnp.zeros(v.shape, jnp.float32))
    return lax.cond(mine[s], grads, zeros)

  def fetch_grads_return(s, acc):
    dq, dk, dv = grads_if_mine(s, *ring.shifted((k, v, kv_seg, kv_pos), s))
    dk, dv = ring.unshifted((dk, dv), s)  # dK/dV go home to their chunk's owner
    return acc[0] + dq, acc[1] + dk, acc[2] + dv

  acc = grads_if_mine(0, k, v, kv_seg, kv_pos)
  for s in range(1, ring.num_shards):
    acc = lax.cond(needed[s], functools.partial(fetch_grads_return, s),
                   lambda acc: acc, acc)
  dq, dk, dv = acc
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None)


_ring_attention.defvjp(_ring_attention_fwd, _ring_attention_bwd)


def _ring_steps(q_seg, q_pos, kv_seg, kv_pos, *, axis_name, num_shards, opts):
  """(mine, needed): bool [n] each, per ring step s.

  mine[s]: this device's queries may meet the keys of device (me - s) mod n.
  needed[s]: some device of the mesh has mine[s]; the same on every device
  (a psum over all manual mesh axes), so collectives under it stay matched.
  """
  kv_all = jax.tree.map(lambda x: lax.all_gather(x, axis_name),
                        _chunk_stats(kv_seg, kv_pos))  # [n, B, nb]
  q_stats = _chunk_stats(q_seg, q_pos)
  me = lax.axis_index(axis_name)
  mine = jnp.stack([
      _can_meet(q_stats, jax.tree.map(lambda x: x[(me - s) % num_shards], kv_all), opts)
      for s in range(num_shards)])
  axes = tuple(jax.sharding.get_abstract_mesh().manual_axes) or (axis_name,)
  return mine, lax.psum(mine.astype(jnp.int32), axes) > 0


def _all_gather(q, k, v, q_seg, kv_seg, q_pos, kv_pos, *, axis_name, num_shards,
                opts: _Options):
  """`all_gather_attention_shard` with its options gathered in `opts`."""
  del num_shards
  gather = functools.partial(lax.all_gather, axis_name=axis_name, axis=1, tiled=True)
  return opts.attend(q, gather(k), gather(v), q_seg, gather(kv_seg), q_pos,
                     gather(kv_pos))


_SHARD_FUNCTIONS = dict(ring=_ring, all_gather=_all_gather)


def ring_attention_shard(q, k, v, q_segment_ids, kv_segment_ids, q_positions,
                         kv_positions, *, axis_name, num_shards, **options):
  """Ring attention for the local shard; call inside shard_map over axis_name.

  Args:
    q: [B, Tl, H, D]; k, v: [B, Tl, Hkv, D], this device's tokens.
    q_segment_ids, q_positions, kv_segment_ids, kv_positions: int32 [B, Tl];
      positions are indices in the whole row (after any load balancing).
    num_shards: size of axis_name (static).
    options: causal, sliding_window, scale, implementation, config, interpret,
      as for `flash_attention`.

  Returns:
    (out [B, Tl, H, D], lse float32 [B, H, Tl]) of the local queries against
    the whole row.
  """
  return _ring(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
               axis_name=axis_name, num_shards=num_shards, opts=_Options(**options))


def all_gather_attention_shard(q, k, v, q_segment_ids, kv_segment_ids,
                               q_positions, kv_positions, *, axis_name, **options):
  """All-gather attention for the local shard; call inside shard_map.

  Same arguments and results as `ring_attention_shard`, without num_shards.
  K/V, ids and positions of the whole row are gathered; the kernel's tile plan
  skips the tiles that cannot meet.
  """
  return _all_gather(q, k, v, q_segment_ids, kv_segment_ids, q_positions,
                     kv_positions, axis_name=axis_name, num_shards=None,
                     opts=_Options(**options))


# ----------------------------------------------------------------------------
# Input checks


def _check_mesh(mesh, axis_name, batch_axis, head_axis):
  """Resolved batch axis (None: batch not sharded), or a clear error."""
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  names = tuple(mesh.axis_names)
  if axis_name not in names:
    raise ValueError(f"axis_name {axis_name!r} is not an axis of mesh, whose "
                     f"axes are {names}")
  if batch_axis is None:
    batch_axis = "data" if "data" in names and axis_name != "data" else None
  for arg, name in (("batch_axis", batch_axis), ("head_axis", head_axis)):
    if name is not None and name not in names:
      raise ValueError(f"{arg} {name!r} is not an axis of mesh, whose axes are {names}")
    if name is not None and name == axis_name:
      raise ValueError(f"{arg} must differ from axis_name, both are {name!r}")
  return batch_axis


def _check_shapes(q, k, v, mesh, axis_name, batch_axis, head_axis):
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"{name} must have shape [batch, seq, heads, head_dim], "
                       f"got {getattr(x, 'shape', type(x).__name__)}")
  batch, seq = q.shape[:2]
  if k.shape[:2] != (batch, seq) or v.shape[:2] != (batch, seq):
    raise ValueError(
        "context-parallel attention is self-attention: q, k and v need the same "
        f"[batch, seq], got q {q.shape}, k {k.shape}, v {v.shape}")
  n = mesh.shape[axis_name]
  if seq % n:
    raise ValueError(f"q: sequence length {seq} is not divisible by the size "
                     f"{n} of mesh axis {axis_name!r}")
  if batch_axis is not None and batch % mesh.shape[batch_axis]:
    raise ValueError(f"q: batch size {batch} is not divisible by the size "
                     f"{mesh.shape[batch_axis]} of mesh axis {batch_axis!r}")
  if head_axis is not None:
    size = mesh.shape[head_axis]
    if q.shape[2] % size or k.shape[2] % size:
      raise ValueError(f"q heads {q.shape[2]} and k/v heads {k.shape[2]} must "
                       f"be divisible by the size {size} of mesh axis {head_axis!r}")


def _ids_or_default(name, x, batch, seq, default):
  """x as int32 [batch, seq] (default() when None), or a clear error."""
  if x is None:
    return default()
  if not hasattr(x, "shape"):
    x = jnp.asarray(x)
  if x.shape != (batch, seq):
    raise ValueError(f"{name} must have the tokens' shape [batch, seq] = "
                     f"{(batch, seq)}, got {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{name} must be an integer array (int32), got {x.dtype}")
  return x if x.dtype == jnp.int32 else x.astype(jnp.int32)


def _normalise_entry(entry):
  if isinstance(entry, tuple):
    return entry[0] if len(entry) == 1 else (entry or None)
  return entry


def _known_spec(x):
  """x's PartitionSpec over [batch, seq], or None where JAX does not know it.

  Known for committed concrete arrays and, under jit, on meshes with Explicit
  axes; an Auto-mode tracer carries no sharding.
  """
  if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
    sharding = x.sharding
  else:
    sharding = getattr(jax.typeof(x), "sharding", None)
    if sharding is None or not any(
        t == AxisType.Explicit for t in getattr(sharding.mesh, "axis_types", ())):
      return None
  if not isinstance(sharding, NamedSharding):
    return None
  spec = tuple(sharding.spec) + (None,) * 2
  return tuple(_normalise_entry(e) for e in spec[:2])


def _check_sharded_like_tokens(q, named_ids):
  """ValueError if an id array is known to be sharded unlike q over [batch, seq]."""
  q_spec = _known_spec(q)
  if q_spec is None:
    return
  for name, x in named_ids:
    spec = _known_spec(x) if x is not None else None
    if spec is not None and spec != q_spec:
      raise ValueError(
          f"{name} must be sharded like the tokens over [batch, seq]: q has "
          f"PartitionSpec{q_spec} there, {name} has PartitionSpec{spec}")


def _place(x, mesh, spec):
  """x resharded to spec when the mesh axes of spec are Explicit (shard_map
  needs its inputs there); with Auto axes shard_map reshards by itself."""
  used = {a for e in spec if e is not None for a in (e if isinstance(e, tuple) else (e,))}
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  if used and all(types[a] == AxisType.Explicit for a in used):
    return jax.sharding.reshard(x, NamedSharding(mesh, spec))
  return x


# ----------------------------------------------------------------------------
# Public API


@functools.lru_cache(maxsize=64)
def _sharded_attention(mesh, axis_name, batch_axis, head_axis, strategy,
                       opts: _Options):
  """jit(shard_map(per-shard attention)) for one mesh layout and option set."""
  tokens = P(batch_axis, axis_name, head_axis, None)
  ids = P(batch_axis, axis_name)
  lse = P(batch_axis, head_axis, axis_name)
  local = functools.partial(
      _SHARD_FUNCTIONS[strategy], axis_name=axis_name,
      num_shards=mesh.shape[axis_name], opts=opts)
  # check_vma=False: pallas_call's outputs carry no varying-axes type, which
  # the check would demand. Every output here is sharded, none replicated, so
  # the check has nothing to protect.
  fn = jax.shard_map(local, mesh=mesh, in_specs=(tokens,) * 3 + (ids,) * 4,
                     out_specs=(tokens, lse), check_vma=False)

  def place_and_run(q, k, v, seg, pos):
    q, k, v = (_place(x, mesh, tokens) for x in (q, k, v))
    seg, pos = _place(seg, mesh, ids), _place(pos, mesh, ids)
    return fn(q, k, v, seg, seg, pos, pos)

  return jax.jit(place_and_run)


def context_parallel_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mesh: Mesh,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    axis_name: str = "context",
    batch_axis: str | None = None,
    head_axis: str | None = None,
    strategy: Strategy = "ring",
    causal: bool = True,
    sliding_window: int | None = None,
    scale: float | None = None,
    implementation: str = "auto",
    config: KernelConfig | None = None,
    interpret: bool = False,
    return_residuals: bool = False,
):
  """`flash_attention` self-attention with the sequence split over a mesh axis.

  Args:
    q: [B, T, H, D]; k, v: [B, T, Hkv, D] (whole rows; under jit typically
      sharded NamedSharding(mesh, P("data", "context"))). T % n == 0 for n the
      size of mesh axis axis_name.
    mesh: the device mesh.
    segment_ids: int [B, T], 0 = padding, sharded like the tokens. Default one
      document per row.
    positions: int [B, T] positions for the causal/window rule: each token's
      index in the original row (after `load_balance`, the balanced arange).
      Default arange(T), right only without load balancing.
    axis_name: mesh axis that splits the sequence.
    batch_axis: mesh axis that splits the batch; default "data" if the mesh has
      one, else the batch is not split.
    head_axis: optional mesh axis that splits heads (tensor parallelism).
    strategy: "ring" or "all_gather".
    causal, sliding_window, scale, implementation, config, interpret: as in
      `flash_attention`; implementation selects the attention run per shard
      ("xla", "pallas", "mosaic" or "auto", as there).
    return_residuals: also return lse, float32 [B, H, T].

  Returns:
    out [B, T, H, D] sharded like q (or (out, lse)), equal to
    `flash_attention` on the whole rows with the same ids and positions.
  """
  batch_axis = _check_mesh(mesh, axis_name, batch_axis, head_axis)
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
  _check_shapes(q, k, v, mesh, axis_name, batch_axis, head_axis)
  _check_sharded_like_tokens(q, (("segment_ids", segment_ids),
                                 ("positions", positions)))
  batch, seq = q.shape[:2]
  seg = _ids_or_default("segment_ids", segment_ids, batch, seq,
                        lambda: jnp.ones((batch, seq), jnp.int32))
  pos = _ids_or_default(
      "positions", positions, batch, seq,
      lambda: jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq)))
  if not isinstance(causal, (bool, np.bool_)):
    raise TypeError(f"causal must be a bool, got {causal!r}")
  opts = _Options(bool(causal), sliding_window,
                  None if scale is None else float(scale), implementation,
                  config, bool(interpret))
  out, lse = _sharded_attention(mesh, axis_name, batch_axis, head_axis,
                                strategy, opts)(q, k, v, seg, pos)
  return (out, lse) if return_residuals else out


# ----------------------------------------------------------------------------
# Load balancing


def zigzag_order(seq_len: int, num_shards: int, rounds: int = 1) -> np.ndarray:
  """Token order that balances causal work: int64 [seq_len], a permutation.

  The row is cut into `rounds` rounds of 2n chunks; in every round shard d
  gets chunks d and 2n-1-d, one early (cheap under a causal mask) and one late
  (expensive). One round balances one long document exactly; more rounds
  (finer chunks) balance rows of many documents of mixed lengths better.
  Balanced position t holds original token order[t].
  """
  if num_shards < 1 or rounds < 1:
    raise ValueError(f"num_shards and rounds must be positive, got {num_shards} and {rounds}")
  if seq_len % (2 * num_shards * rounds):
    raise ValueError(
        f"sequence length {seq_len} must be divisible by 2 * num_shards * rounds = "
        f"{2 * num_shards * rounds} for zigzag load balancing")
  chunks = np.arange(seq_len).reshape(rounds, 2 * num_shards, -1)
  pairs = np.stack([chunks[:, :num_shards], chunks[:, ::-1][:, :num_shards]], axis=2)
  return pairs.transpose(1, 0, 2, 3).reshape(-1)  # [shard, round, pair, token]


def _take(x, index, axis):
  if isinstance(x, np.ndarray):
    return np.take(x, index, axis=axis)
  return jnp.take(x, jnp.asarray(index, jnp.int32), axis=axis)


def _seq_len(x, axis):
  if not hasattr(x, "shape") or x.ndim <= axis:
    raise ValueError(f"x must have a sequence axis {axis}, got "
                     f"{getattr(x, 'shape', type(x).__name__)}")
  return x.shape[axis]


def load_balance(x, num_shards: int, *, axis: int = 1, rounds: int = 1):
  """x with its sequence axis in zigzag order (numpy in, numpy out).

  Apply to tokens, targets, segment ids, loss masks, RoPE positions and the
  masking positions arange(T) alike, before sharding over the context axis.
  x: [..., T, ...] with T on `axis`, T % (2 * num_shards * rounds) == 0.
  """
  return _take(x, zigzag_order(_seq_len(x, axis), num_shards, rounds), axis)


def restore_order(x, num_shards: int, *, axis: int = 1, rounds: int = 1):
  """Inverse of `load_balance`: x in the original token order."""
  order = zigzag_order(_seq_len(x, axis), num_shards, rounds)
  return _take(x, np.argsort(order), axis)


# ----------------------------------------------------------------------------
# Work per device


def _row_pair_counts(seg, pos, num_shards, causal, sliding_window):
  """Allowed (query, key) pairs of one row between shards: int64 [n, n]."""
  t = seg.shape[0]
  shard = np.arange(t) // (t // num_shards)
  pos = pos.astype(np.int64) - int(pos.min())
  span = int(pos.max()) + 2
  # One sortable key per token: documents apart, positions ordered inside.
  # Per query, the allowed keys of a shard are one interval of its sorted keys.
  key = seg.astype(np.int64) * span + pos
  valid = seg != 0
  q_key, q_shard = key[valid], shard[valid]
  doc_start = seg[valid].astype(np.int64) * span
  counts = np.zeros((num_shards, num_shards), np.int64)
  for kv_shard in range(num_shards):
    keys = np.sort(key[(shard == kv_shard) & valid])
    lo = np.searchsorted(keys, doc_start, side="left")
    hi = np.searchsorted(keys, q_key if causal else doc_start + span - 1, side="right")
    if sliding_window is not None:
      lo = np.maximum(lo, np.searchsorted(keys, q_key - sliding_window + 1, side="left"))
    pairs = np.maximum(hi - lo, 0)
    counts[:, kv_shard] = np.bincount(q_shard, weights=pairs, minlength=num_shards)
  return counts


def attention_pair_counts(segment_ids, positions=None, *, num_shards: int,
                          causal: bool = True,
                          sliding_window: int | None = None) -> np.ndarray:
  """Allowed (query, key) pairs between contiguous sequence shards.

  Attention FLOPs are 4 * H * D per pair forward (x3.5 forward+backward), so
  these counts are the attention work of each (query shard, key shard) pair.

  Args:
    segment_ids, positions: int [B, T] as given to the devices (already
      load-balanced if so); positions default arange(T).
  Returns:
    int64 [num_shards, num_shards]: [d, e] = pairs of queries on shard d with
    keys on shard e, summed over rows.
  """
  seg = np.atleast_2d(np.asarray(segment_ids))
  pos = (np.broadcast_to(np.arange(seg.shape[1]), seg.shape) if positions is None
         else np.atleast_2d(np.asarray(positions)))
  if seg.shape[1] % num_shards:
    raise ValueError(f"segment_ids: sequence length {seg.shape[1]} is not "
                     f"divisible by num_shards {num_shards}")
  return sum(_row_pair_counts(s, p, num_shards, causal, sliding_window)
             for s, p in zip(seg, pos))


def flop_imbalance(segment_ids, positions=None, *, num_shards: int,
                   causal: bool = True, sliding_window: int | None = None):
  """Per-device attention-work imbalance of a sequence split.

  Returns dict with
    "device": max / mean over devices of each device's attention FLOPs (the
      all-gather strategy's critical path; 1.0 is perfect);
    "ring": sum over ring steps of the busiest device's FLOPs in that step,
      over the mean per-device total (the ring synchronises every step);
    "per_device": float64 [num_shards], each device's share of the FLOPs.
  """
  counts = attention_pair_counts(segment_ids, positions, num_shards=num_shards,
                                 causal=causal, sliding_window=sliding_window)
  per_device = counts.sum(axis=1).astype(np.float64)
  mean = per_device.mean()
  if mean == 0:
    return dict(device=1.0, ring=1.0, per_device=per_device)
  d = np.arange(num_shards)
  ring_critical = sum(counts[d, (d - s) % num_shards].max() for s in range(num_shards))
  return dict(device=float(per_device.max() / mean),
              ring=float(ring_critical / mean),
              per_device=per_device / per_device.sum())


def ring_schedule(segment_ids, positions=None, *, num_shards: int,
                  causal: bool = True, sliding_window: int | None = None):
  """Which chunk pairs the ring attends to; the others skip the attention call.

  Args:
    segment_ids, positions: int [B, T] as given to the devices (the rows one
      device group holds); positions default arange(T).

  Returns:
    bool numpy [num_shards, num_shards]: [d, e] is true when device d's
    queries call attention on shard e's keys (at ring step (d - e) mod n).
  """
  seg = jnp.asarray(segment_ids, jnp.int32)
  batch, seq = seg.shape
  if seq % num_shards:
    raise ValueError(f"segment_ids: sequence length {seq} is not divisible by "
                     f"num_shards {num_shards}")
  pos = (jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), seg.shape)
         if positions is None else jnp.asarray(positions, jnp.int32))
  opts = _Options(causal=bool(causal), sliding_window=sliding_window)
  shards = [_chunk_stats(*(x.reshape(batch, num_shards, -1)[:, d] for x in (seg, pos)))
            for d in range(num_shards)]
  return np.array([[bool(_can_meet(qs, ks, opts)) for ks in shards] for qs in shards])


# ----------------------------------------------------------------------------
# Training loops


@dataclasses.dataclass(frozen=True)
class ContextParallel:
  """Everything a training loop needs to split its rows over a context axis.

      cp = ContextParallel.create(context=4)          # mesh ("data", "context")
      params = cp.replicate(params)
      batch = cp.shard_batch(batch)   # {name: [B, T, ...]} numpy, targets included
      ...inside the jitted model, in place of flash_attention:
      out = cp.attention(q, k, v, segment_ids=batch["segment_ids"])

  With load_balance, `shard_batch` puts every per-token array in zigzag order
  and `attention` masks with the matching positions (the zigzag of arange(T),
  a constant). Per-token work (embeddings, MLPs, RoPE with its own positions,
  a masked loss sum) does not care about the order, so it is kept from input
  to loss; only work that looks at neighbours along the sequence, such as
  shifting tokens into next-token targets, must happen before `shard_batch`.
  batch_axis: the mesh axis that splits the batch (None: not split);
  zigzag_rounds: see `zigzag_order`.
  """
  mesh: Mesh
  axis_name: str = "context"
  batch_axis: str | None = "data"
  strategy: Strategy = "ring"
  load_balance: bool = True
  zigzag_rounds: int = 1
  implementation: str = "auto"

  @classmethod
  def create(cls, context: int, data: int = 1, devices=None, **kwargs):
    """Mesh ("data", "context") of data * context devices (default the first)."""
    devices = jax.devices() if devices is None else list(devices)
    if context < 1 or data < 1 or context * data > len(devices):
      raise ValueError(f"context={context} x data={data} devices requested, "
                       f"{len(devices)} available")
    grid = np.asarray(devices[:data * context], dtype=object).reshape(data, context)
    return cls(Mesh(grid, ("data", "context")), **kwargs)

  @property
  def num_shards(self) -> int:
    return self.mesh.shape[self.axis_name]

  @property
  def token_sharding(self) -> NamedSharding:
    """Sharding of [B, T, ...] per-token arrays."""
    return NamedSharding(self.mesh, P(self.batch_axis, self.axis_name))

  def shard(self, x):
    """x [B, T, ...] (numpy), load-balanced if enabled, placed on the mesh."""
    if self.load_balance:
      x = load_balance(np.asarray(x), self.num_shards, rounds=self.zigzag_rounds)
    return jax.device_put(x, self.token_sharding)

  def shard_batch(self, batch):
    """`shard` on every leaf of a pytree of [B, T, ...] arrays."""
    return jax.tree.map(self.shard, batch)

  def replicate(self, tree):
    """A pytree (parameters, optimiser state) placed whole on every device."""
    return jax.device_put(tree, NamedSharding(self.mesh, P()))

  def unshard(self, x):
    """Per-token x [B, T, ...] from the mesh back in the original order (numpy)."""
    x = np.asarray(x)
    if self.load_balance:
      return restore_order(x, self.num_shards, rounds=self.zigzag_rounds)
    return x

  def attention(self, q, k, v, *, segment_ids=None, positions=None, **kwargs):
    """`context_parallel_attention` on this mesh, for tokens placed by `shard`.

    q: [B, T, H, D]; k, v: [B, T, Hkv, D]; segment_ids: int [B, T].
    positions default to the token order `shard` made (arange(T), reordered).
    kwargs: causal, sliding_window, scale, implementation, config, interpret,
    return_residuals, as for `flash_attention`.
    """
    if positions is None and self.load_balance:
      order = zigzag_order(q.shape[1], self.num_shards, self.zigzag_rounds)
      order = jnp.asarray(order, jnp.int32)
      positions = jnp.broadcast_to(order, q.shape[:2])
    return context_parallel_attention(
        q, k, v, mesh=self.mesh, segment_ids=segment_ids, positions=positions,
        axis_name=self.axis_name, batch_axis=self.batch_axis,
        strategy=self.strategy,
        **{"implementation": self.implementation, **kwargs})
