"""Train a byte-level decoder-only LM on packed rows with jpack attention.

    python -m experiments.train_lm                       # CPU defaults, a few minutes
    python -m experiments.train_lm --packing padded      # one document per row
    python -m experiments.train_lm --packing concat      # no document masking
    python -m experiments.train_lm --preset h100         # fills an H100
    python -m experiments.train_lm --resume              # continue the run in --out
    python -m experiments.train_lm --context-parallel 4  # each row split over 4 devices

Writes to --out (default runs/lm_<packing>): metrics.jsonl (one record per
log step and per eval), summary.json, loss_curve.png, doc_lengths.png, ckpt/.
"Useful" tokens are the non-padding ones; tokens/s counts them after the
first (compiling) step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
import zlib
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `experiments` importable
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from experiments import lm_data, lm_model  # noqa: E402
from jpack import packing  # noqa: E402

PRESETS = {
    # A 2-core CPU: 0.46M parameters, 2k tokens per step, about two minutes
    # of training (the XLA reference attention dominates there).
    "cpu": dict(corpus="docstrings", seq_len=256, batch_size=8, steps=250, warmup=25,
                lr=3e-3, d_model=128, layers=2, heads=4, kv_heads=2, mlp_dim=384,
                dtype="float32", eval_every=50, eval_batches=4, log_every=10,
                ckpt_every=125),
    # One H100: ~140M parameters, bf16, 64k tokens per step.
    "h100": dict(corpus="docstrings", seq_len=2048, batch_size=32, steps=500, warmup=50,
                 lr=6e-4, d_model=1024, layers=12, heads=8, kv_heads=4, mlp_dim=2816,
                 dtype="bfloat16", eval_every=100, eval_batches=4, log_every=10,
                 ckpt_every=250),
}

# Arguments that must match for --resume to continue the same run.
_RUN_KEYS = ("corpus", "data", "eval_fraction", "max_docs", "packing", "balance",
             "seq_len", "batch_size", "steps", "warmup", "lr", "weight_decay", "seed",
             "d_model", "layers", "heads", "kv_heads", "mlp_dim", "dtype", "attention",
             "remat")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                 help="default values of the options marked [preset]")
  d = p.add_argument_group("data")
  d.add_argument("--corpus", choices=["docstrings", "files", "both"],
                 help="standard-library corpus [preset]")
  d.add_argument("--data", help="a folder of text files to use instead of the corpus")
  d.add_argument("--eval-fraction", type=float, default=0.05)
  d.add_argument("--max-docs", type=int, help="use only the first N training documents")
  d.add_argument("--packing", choices=["packed", "padded", "concat"], default="packed")
  d.add_argument("--balance", choices=["tokens", "attention"], default="tokens",
                 help="packed rows: fill rows (tokens) or even out sum(l^2) (attention)")
  d.add_argument("--seq-len", type=int, help="row length [preset]")
  d.add_argument("--batch-size", type=int, help="rows per step [preset]")
  d.add_argument("--no-grain", action="store_true", help="use the numpy loader")
  m = p.add_argument_group("model")
  for name in ("d-model", "layers", "heads", "kv-heads", "mlp-dim"):
    m.add_argument(f"--{name}", type=int, help="[preset]")
  m.add_argument("--dtype", choices=["float32", "bfloat16"], help="[preset]")
  m.add_argument("--attention", choices=["auto", "pallas", "xla"], default="auto",
                 help="jpack implementation (auto: Pallas on GPU, XLA reference on CPU)")
  m.add_argument("--remat", action="store_true", help="recompute blocks in backward")
  c = p.add_argument_group("context parallelism")
  c.add_argument("--context-parallel", type=int, default=1, metavar="N",
                 help="split every row along the sequence over N devices "
                      "(jpack.parallel.ContextParallel, zigzag load balancing); "
                      "--seq-len must be divisible by 2N. Same losses as N=1 to float "
                      "tolerance. --resume may change N (the math is the same; the "
                      "losses then match the uninterrupted run to float tolerance, not "
                      "bit for bit). On CPU, fake N devices with "
                      "XLA_FLAGS=--xla_force_host_platform_device_count=N")
  c.add_argument("--cp-strategy", choices=["ring", "all_gather"], default="ring",
                 help="ring: K/V travel around the devices; all_gather: every device "
                      "gathers the row's K/V (default ring)")
  t = p.add_argument_group("training")
  t.add_argument("--steps", type=int, help="total steps (sets the LR schedule) [preset]")
  t.add_argument("--warmup", type=int, help="[preset]")
  t.add_argument("--lr", type=float, help="peak learning rate [preset]")
  t.add_argument("--weight-decay", type=float, default=0.1)
  t.add_argument("--seed", type=int, default=0)
  t.add_argument("--eval-every", type=int, help="[preset]")
  t.add_argument("--eval-batches", type=int, help="[preset]")
  t.add_argument("--log-every", type=int, help="[preset]")
  t.add_argument("--ckpt-every", type=int, help="0 = only at the end [preset]")
  t.add_argument("--out", help="output folder (default runs/lm_<packing>)")
  t.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
  t.add_argument("--stop-after", type=int, help="stop (with a checkpoint) after this step")
  t.add_argument("--max-minutes", type=float, help="stop (checkpoint, eval) after this long")
  t.add_argument("--no-progress", action="store_true", help="log lines, no progress bar")
  args = p.parse_args(argv)
  for key, value in PRESETS[args.preset].items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  args.out = Path(args.out or f"runs/lm_{args.packing}")
  for name in ("seq_len", "batch_size", "steps", "eval_batches", "log_every"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1")
  if args.seq_len < 2:
    p.error("--seq-len must be >= 2 (a row of one token has no target)")
  if args.context_parallel < 1:
    p.error("--context-parallel must be >= 1")
  if args.seq_len % (2 * args.context_parallel):
    p.error(f"--seq-len {args.seq_len} must be divisible by 2 * --context-parallel = "
            f"{2 * args.context_parallel} (zigzag load balancing cuts each row into "
            f"{2 * args.context_parallel} chunks)")
  return args


def log(msg: str):
  print(msg, flush=True)


# ----------------------------------------------------------------------------
# Data


def load_corpus(args) -> lm_data.Corpus:
  if args.data:
    docs, skipped = lm_data.folder_documents(args.data)
    desc = f"--data {args.data}: {len(docs)} files ({skipped} skipped)"
  else:
    docs = lm_data.stdlib_documents(args.corpus)
    desc = f"standard library {args.corpus}"
  return lm_data.split(docs, args.eval_fraction, desc, max_docs=args.max_docs)


def eval_batches(corpus: lm_data.Corpus, args) -> list[dict]:
  """Held-out documents packed with segment masking (the exact per-document
  loss, whatever --packing trains with); fixed for a corpus and seq_len."""
  rows = packing.pack_documents(corpus.eval, args.seq_len, seed=0,
                                vocab_size=lm_data.VOCAB_SIZE)
  n = min(rows.num_rows, args.eval_batches * args.batch_size)
  rows = rows.take(np.arange(n))
  pad = -n % args.batch_size  # empty rows: no targets, no effect on the loss
  if pad:
    empty = packing.PackedRows(*(np.zeros((pad, args.seq_len), a.dtype)
                                 for a in dataclasses.astuple(rows)))
    rows = packing.PackedRows.concatenate([rows, empty])
  return [lm_data.with_targets(rows.take(np.arange(i, i + args.batch_size)).as_dict())
          for i in range(0, rows.num_rows, args.batch_size)]


# ----------------------------------------------------------------------------
# Steps


def make_context_parallel(args):
  """jpack.parallel.ContextParallel over args.context_parallel devices, or None."""
  if args.context_parallel == 1:
    return None
  from jpack import parallel  # noqa: PLC0415
  n, have = args.context_parallel, jax.device_count()
  if n > have:
    hint = (f" (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count={n})"
            if jax.default_backend() == "cpu" else "")
    raise SystemExit(f"--context-parallel {n}: only {have} devices{hint}")
  return parallel.ContextParallel.create(context=n, strategy=args.cp_strategy,
                                         implementation=args.attention)


def make_steps(graphdef, state_sharding=None):
  """Jitted (train_step, eval_step). state_sharding: where the state lives
  (context parallelism: replicated on the mesh); the new state is pinned there
  so that every step sees the same input shardings (one compilation)."""
  def train_step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)

    def mean_loss(m):
      total, count = lm_model.loss_sum(m, batch)
      return total / jnp.maximum(count, 1.0), count

    (loss, _), grads = nnx.value_and_grad(mean_loss, has_aux=True)(model)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), {"loss": loss, "grad_norm": optax.tree.norm(grads)}

  def eval_step(state, batch):
    model, _ = nnx.merge(graphdef, state)
    return lm_model.loss_sum(model, batch)

  if state_sharding is None:
    return jax.jit(train_step, donate_argnums=0), jax.jit(eval_step)
  return (jax.jit(train_step, donate_argnums=0, out_shardings=state_sharding),
          jax.jit(eval_step, out_shardings=state_sharding))


def evaluate(eval_step, state, batches) -> float:
  total = count = 0.0
  for b in batches:
    s, n = eval_step(state, b)
    total, count = total + float(s), count + float(n)
  return total / max(count, 1.0)


# ----------------------------------------------------------------------------
# Checkpoints


class Checkpoints:
  """Orbax checkpoints of (model, optimizer) state plus JSON run metadata."""

  def __init__(self, folder: Path):
    import orbax.checkpoint as ocp  # noqa: PLC0415 - optional dependency
    self.ocp = ocp
    self.manager = ocp.CheckpointManager(
        folder.resolve(), options=ocp.CheckpointManagerOptions(max_to_keep=2))

  def save(self, step: int, state, meta: dict):
    self.manager.save(step, args=self.ocp.args.Composite(
        state=self.ocp.args.StandardSave(nnx.to_pure_dict(state)),
        meta=self.ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()

  def latest_step(self):
    return self.manager.latest_step()

  def restore(self, step: int, state):
    """state restored in place, each array with the sharding it has now (so a
    checkpoint written with another --context-parallel restores too)."""
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        nnx.to_pure_dict(state))
    out = self.manager.restore(step, args=self.ocp.args.Composite(
        state=self.ocp.args.StandardRestore(target), meta=self.ocp.args.JsonRestore()))
    nnx.replace_by_pure_dict(state, out["state"])
    return state, out["meta"]


def _run_signature(args, data_hash: int, loader: str) -> dict:
  sig = {k: getattr(args, k) for k in _RUN_KEYS}
  sig.update(data_hash=data_hash, loader=loader)
  return sig


# ----------------------------------------------------------------------------
# Output


def write_plots(out: Path, records: list[dict], doc_lengths: np.ndarray, title: str):
  try:
    import matplotlib  # noqa: PLC0415 - optional dependency
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
  except ImportError:
    log("matplotlib is not installed: no PNGs written")
    return
  train = [r for r in records if "loss" in r]
  evals = [r for r in records if "eval_loss" in r]
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot([r["useful_tokens"] for r in train], [r["loss"] for r in train], label="train")
  ax.plot([r["useful_tokens"] for r in evals], [r["eval_loss"] for r in evals], "o-",
          label="eval (held out, per document)")
  ax.set(xlabel="useful tokens seen", ylabel="loss (nats/token)", title=title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out / "loss_curve.png", dpi=120)
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.hist(doc_lengths, bins=np.geomspace(1, max(doc_lengths.max(), 2), 40))
  ax.set(xscale="log", xlabel="document length (tokens)", ylabel="documents",
         title="training documents")
  fig.tight_layout()
  fig.savefig(out / "doc_lengths.png", dpi=120)
  plt.close(fig)


class Progress:
  """tqdm bar when available (and wanted), else a log line per update."""

  def __init__(self, total: int, initial: int, enabled: bool):
    self.bar = None
    if enabled:
      try:
        from tqdm import tqdm  # noqa: PLC0415 - optional dependency
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
      except ImportError:
        log("tqdm is not installed: logging lines instead of a progress bar")
    self.total = total

  def update(self, step: int, n: int, loss: float, tokens_per_s: float | None):
    rate = "-" if tokens_per_s is None else f"{tokens_per_s:,.0f}"
    if self.bar is not None:
      self.bar.update(n)
      self.bar.set_postfix(loss=f"{loss:.4f}", useful_tok_s=rate)
    else:
      log(f"step {step}/{self.total}  loss {loss:.4f}  useful tokens/s {rate}")

  def close(self):
    if self.bar is not None:
      self.bar.close()


# ----------------------------------------------------------------------------
# Main


def main(argv=None) -> dict:
  args = parse_args(argv)
  out = args.out
  out.mkdir(parents=True, exist_ok=True)
  log(f"jax {jax.__version__} on {jax.devices()[0].platform}; out {out}")

  corpus = load_corpus(args)
  lengths = np.array([len(d) for d in corpus.train])
  log(f"corpus: {corpus.description}: {len(corpus.train)} train / {len(corpus.eval)} "
      f"eval documents, {lengths.sum():,} train tokens")
  log(lm_data.length_histogram(lengths))
  rows = lm_data.make_rows(corpus.train, args.seq_len, args.packing, balance=args.balance,
                           seed=args.seed)
  log(f"{args.packing} rows: {packing.packing_stats(rows.segment_ids)}")
  loader = lm_data.BatchLoader(rows, args.batch_size, args.seed,
                               use_grain=False if args.no_grain else None)
  log(f"data loader: {loader.name}"
      + ("" if loader.name == "grain" else
         " (grain not installed)" if not args.no_grain else " (--no-grain)"))
  cp = make_context_parallel(args)
  shard = (lambda b: b) if cp is None else cp.shard_batch  # noqa: E731
  evals = [shard(b) for b in eval_batches(corpus, args)]
  if cp is not None:
    log(f"context parallelism: each row over {cp.num_shards} devices "
        f"({args.cp_strategy}, zigzag), {args.seq_len // cp.num_shards} tokens per device")
  data_hash = zlib.crc32(rows.tokens.tobytes() + rows.segment_ids.tobytes())

  cfg = lm_model.LMConfig(
      vocab_size=lm_data.VOCAB_SIZE, d_model=args.d_model, num_layers=args.layers,
      num_heads=args.heads, num_kv_heads=args.kv_heads, mlp_dim=args.mlp_dim,
      max_seq_len=args.seq_len, dtype=args.dtype, attention=args.attention,
      remat=args.remat)
  model = lm_model.LM(cfg, attention_fn=None if cp is None else cp.attention,
                      rngs=nnx.Rngs(args.seed))
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  log(f"model: {n_params:,} parameters, {cfg}")
  optimizer = nnx.Optimizer(model, lm_model.make_optimizer(
      args.lr, args.warmup, args.steps, weight_decay=args.weight_decay), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  del model, optimizer
  state_sharding = None
  if cp is not None:
    state = cp.replicate(state)
    state_sharding = jax.sharding.NamedSharding(cp.mesh, jax.sharding.PartitionSpec())
  train_step, eval_step = make_steps(graphdef, state_sharding)

  signature = _run_signature(args, data_hash, loader.name)
  ckpt_dir = out / "ckpt"
  if not args.resume and ckpt_dir.exists():
    log(f"a fresh run (no --resume): removing the old checkpoints in {ckpt_dir}")
    shutil.rmtree(ckpt_dir)
  ckpt = None
  try:
    ckpt = Checkpoints(ckpt_dir)
  except ImportError:
    if args.resume:
      raise SystemExit("--resume needs orbax-checkpoint (pip install -e '.[examples]')")
    log("orbax-checkpoint is not installed: no checkpoints")

  step, tokens_seen, useful_seen, records = 0, 0, 0, []
  metrics_path = out / "metrics.jsonl"
  if args.resume:
    last = ckpt.latest_step()
    if last is None:
      raise SystemExit(f"--resume: no checkpoint in {ckpt_dir}")
    state, meta = ckpt.restore(last, state)  # keeps the (replicated) shardings
    diff = {k: (meta["signature"].get(k), v) for k, v in signature.items()
            if meta["signature"].get(k) != v}
    if diff:
      raise SystemExit(f"--resume: the run in {out} differs (checkpoint, now): {diff}")
    step, tokens_seen, useful_seen = meta["step"], meta["tokens_seen"], meta["useful_seen"]
    if metrics_path.exists():
      records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
      records = [r for r in records if r["step"] <= step]
    log(f"resumed at step {step}")
  metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))
  metrics_file = metrics_path.open("a")

  def record(r):
    records.append(r)
    metrics_file.write(json.dumps(r) + "\n")
    metrics_file.flush()

  def save():
    if ckpt is not None:
      ckpt.save(step, state, dict(step=step, tokens_seen=tokens_seen,
                                  useful_seen=useful_seen, signature=signature,
                                  context_parallel=args.context_parallel))

  progress = Progress(args.steps, step, enabled=not args.no_progress)
  start = time.perf_counter()
  # Throughput counts training steps only: not the first (compiling) step of
  # this process, not eval, not checkpointing. `since` is when the clock last
  # started; `bank` waits for the queued steps and adds their time.
  clock = dict(train_s=0.0, useful=0, tokens=0, since=None)

  def bank():
    jax.block_until_ready(state)
    now = time.perf_counter()
    if clock["since"] is not None:
      clock["train_s"] += now - clock["since"]
    clock["since"] = now

  window = []
  stop = min(args.steps, args.stop_after or args.steps)
  last_logged = step
  while step < stop:
    batch = loader.batch(step)
    useful = int((batch["segment_ids"] != 0).sum())
    first = clock["since"] is None
    state, metrics = train_step(state, shard(batch))
    step += 1
    tokens_seen += batch["tokens"].size
    useful_seen += useful
    window.append(metrics)
    if first:  # compiling step: start the clock once it is done
      bank()
    else:
      clock["useful"] += useful
      clock["tokens"] += batch["tokens"].size
    out_of_time = (args.max_minutes is not None
                   and time.perf_counter() - start >= 60 * args.max_minutes)
    if step % args.log_every == 0 or step == stop or out_of_time:
      losses = [float(m["loss"]) for m in window]
      bank()
      timed = clock["train_s"] > 0 and clock["tokens"] > 0
      rate = clock["useful"] / clock["train_s"] if timed else None
      record(dict(step=step, loss=losses[-1], loss_mean=float(np.mean(losses)),
                  grad_norm=float(window[-1]["grad_norm"]), tokens=tokens_seen,
                  useful_tokens=useful_seen, useful_tokens_per_s=rate,
                  tokens_per_s=clock["tokens"] / clock["train_s"] if timed else None,
                  elapsed_s=time.perf_counter() - start))
      progress.update(step, step - last_logged, losses[-1], rate)
      last_logged, window = step, []
    do_eval = step % args.eval_every == 0 or step == args.steps or out_of_time
    do_save = (args.ckpt_every and step % args.ckpt_every == 0) or step == stop or out_of_time
    if do_eval or do_save:
      bank()
      if do_eval:
        record(dict(step=step, eval_loss=evaluate(eval_step, state, evals),
                    tokens=tokens_seen, useful_tokens=useful_seen))
      if do_save:
        save()
      clock["since"] = time.perf_counter()
    if out_of_time:
      log(f"--max-minutes {args.max_minutes} reached at step {step}")
      break
  progress.close()
  metrics_file.close()

  train_records = [r for r in records if r.get("useful_tokens_per_s") is not None]
  eval_records = [r for r in records if "eval_loss" in r]
  summary = dict(
      packing=args.packing, attention=args.attention, context_parallel=args.context_parallel,
      cp_strategy=args.cp_strategy if args.context_parallel > 1 else None,
      step=step, steps=args.steps,
      seq_len=args.seq_len, batch_size=args.batch_size, parameters=n_params,
      device=jax.devices()[0].device_kind, loader=loader.name,
      padding_fraction=packing.packing_stats(rows.segment_ids).padding_fraction,
      useful_tokens=useful_seen, tokens=tokens_seen,
      useful_tokens_per_s=train_records[-1]["useful_tokens_per_s"] if train_records else None,
      tokens_per_s=train_records[-1]["tokens_per_s"] if train_records else None,
      final_loss=train_records[-1]["loss"] if train_records else None,
      eval_loss=eval_records[-1]["eval_loss"] if eval_records else None)
  (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  write_plots(out, records, lengths, f"{args.packing}, T={args.seq_len}")
  rate = summary["useful_tokens_per_s"]
  log(f"done: step {step}, eval loss {summary['eval_loss']}, useful tokens/s "
      f"{'-' if rate is None else f'{rate:,.0f}'}; wrote {out}")
  return summary


if __name__ == "__main__":
  main()
