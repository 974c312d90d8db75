"""A small decoder-only transformer in Flax NNX on jpack's attention.

Pre-norm blocks: RMSNorm -> jpack.nn.Attention (GQA, RoPE from per-document
positions) -> RMSNorm -> gated MLP (SiLU). Byte-level vocabulary.

Batch arrays ([B, T]): tokens, targets (the next token, made by the data
pipeline: `lm_data.with_targets`), segment_ids (0 = padding), positions
(RoPE, per document), loss_mask (the target at t counts). Every one is
per-token, so the model never looks at neighbours along the sequence: rows
may arrive reordered (zigzag load balancing for context parallelism).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jpack.nn import Attention


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Model shape. max_seq_len: longest row the model accepts (RoPE itself has
  no limit; the cap makes a wrong --seq-len an error, not a silent change)."""
  vocab_size: int = 258
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  mlp_dim: int = 384
  max_seq_len: int = 256
  rope_theta: float = 10_000.0
  dtype: str = "float32"  # computation dtype; params stay float32
  attention: str = "auto"  # jpack implementation: auto | pallas | xla
  remat: bool = False  # recompute each block in the backward pass (saves memory)

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                 "mlp_dim", "max_seq_len"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if self.d_model % self.num_heads:
      raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads "
                       f"({self.num_heads})")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


class MLP(nnx.Module):
  """Gated MLP: down(silu(gate(x)) * up(x)). x: [B, T, d] -> [B, T, d]."""

  def __init__(self, d_model: int, hidden: int, *, dtype, rngs: nnx.Rngs):
    kw = dict(use_bias=False, dtype=dtype, rngs=rngs)
    self.gate = nnx.Linear(d_model, hidden, **kw)
    self.up = nnx.Linear(d_model, hidden, **kw)
    self.down = nnx.Linear(hidden, d_model, **kw)

  def __call__(self, x):
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
  def __init__(self, cfg: LMConfig, *, attention_fn: Callable | None = None,
               rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    self.attn_norm = nnx.RMSNorm(cfg.d_model, dtype=dtype, rngs=rngs)
    self.attn = Attention(cfg.d_model, cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                          rope_theta=cfg.rope_theta, causal=True,
                          implementation=cfg.attention, attention_fn=attention_fn,
                          dtype=dtype, rngs=rngs)
    self.mlp_norm = nnx.RMSNorm(cfg.d_model, dtype=dtype, rngs=rngs)
    self.mlp = MLP(cfg.d_model, cfg.mlp_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x, segment_ids, positions):
    """x: [B, T, d]; segment_ids, positions: int32 [B, T]."""
    x = x + self.attn(self.attn_norm(x), segment_ids=segment_ids, positions=positions)
    return x + self.mlp(self.mlp_norm(x))


class LM(nnx.Module):
  """tokens [B, T] -> logits float32 [B, T, vocab].

  attention_fn: passed to every `jpack.nn.Attention` (None: flash_attention),
  e.g. `ContextParallel.attention` to split rows over devices.
  """

  def __init__(self, cfg: LMConfig, *, attention_fn: Callable | None = None,
               rngs: nnx.Rngs):
    self.cfg = cfg
    dtype = jnp.dtype(cfg.dtype)
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([Block(cfg, attention_fn=attention_fn, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = nnx.RMSNorm(cfg.d_model, dtype=dtype, rngs=rngs)
    self.head = nnx.Linear(cfg.d_model, cfg.vocab_size, use_bias=False, dtype=dtype,
                           rngs=rngs)

  def __call__(self, tokens, segment_ids, positions):
    if tokens.ndim != 2 or tokens.shape[1] > self.cfg.max_seq_len:
      raise ValueError(f"tokens must be [batch, seq] with seq <= max_seq_len="
                       f"{self.cfg.max_seq_len}, got {tokens.shape}")
    x = self.embed(tokens)
    for block in self.blocks:
      if self.cfg.remat:
        x = nnx.remat(lambda blk, h: blk(h, segment_ids, positions))(block, x)
      else:
        x = block(x, segment_ids, positions)
    return self.head(self.final_norm(x)).astype(jnp.float32)


def loss_sum(model: LM, batch: dict) -> tuple[jax.Array, jax.Array]:
  """(sum of next-token cross-entropy over loss_mask, number of targets).

  batch: tokens, targets, segment_ids, positions, loss_mask, each [B, T]
  (`lm_data.with_targets` adds targets). The summed loss is what makes
  "packed == documents run alone" exact: it is additive over documents.
  """
  if "targets" not in batch:
    raise ValueError("batch has no 'targets': build them in the data pipeline "
                     "(lm_data.with_targets), before any reordering of the tokens")
  logits = model(batch["tokens"], batch["segment_ids"], batch["positions"])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  mask = batch["loss_mask"].astype(jnp.float32)
  return jnp.sum(ce * mask), jnp.sum(mask)


def make_optimizer(lr: float, warmup_steps: int, total_steps: int, *,
                   weight_decay: float = 0.1, min_lr_ratio: float = 0.1,
                   clip_norm: float = 1.0) -> optax.GradientTransformation:
  """AdamW, linear warmup to `lr`, cosine decay to lr * min_lr_ratio at
  total_steps, global-norm clipping. Weight decay on matrices only."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=max(warmup_steps, 1),
      decay_steps=max(total_steps, warmup_steps + 1), end_value=lr * min_lr_ratio)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
  return optax.chain(
      optax.clip_by_global_norm(clip_norm),
      optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=weight_decay, mask=decay_mask))
