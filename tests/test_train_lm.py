"""The example LM: packed training is exact (loss and gradients equal the sum
over documents run alone), concat is not, training lowers the loss, --resume
continues exactly, and bad input is refused."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

# experiments/ is not an installed package; make it importable under bare `pytest` too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import lm_data, lm_model, train_lm  # noqa: E402
from jpack import packing  # noqa: E402

TINY = lm_model.LMConfig(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                         max_seq_len=64, attention="xla")
TINY_ARGS = ["--d-model", "32", "--layers", "1", "--heads", "4", "--kv-heads", "2",
             "--mlp-dim", "64", "--seq-len", "64", "--batch-size", "8", "--attention",
             "xla", "--no-progress", "--lr", "1e-2", "--warmup", "5", "--eval-fraction", "0.2"]


def random_docs(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, lm_data.VOCAB_SIZE, size=n).astype(np.int32) for n in lengths]


@functools.partial(jax.jit, static_argnums=0)
def _loss_and_grads(graphdef, state, batch):
  return jax.value_and_grad(lambda st: lm_model.loss_sum(nnx.merge(graphdef, st), batch)[0])(
      state)


def loss_and_grads(graphdef, state, rows: packing.PackedRows):
  """Summed loss and its gradient (float64 numpy) for a batch of rows."""
  batch = lm_data.with_targets(rows.as_dict())
  loss, grads = _loss_and_grads(graphdef, state, {k: jnp.asarray(v) for k, v in batch.items()})
  return float(loss), jax.tree.map(lambda g: np.asarray(g, np.float64), grads)


def rel_err(a, b):
  return float(np.linalg.norm(np.ravel(a) - np.ravel(b)) / np.linalg.norm(np.ravel(b)))


class TestExactness:
  """Packed rows change nothing but speed: for a float32 model the loss and
  the parameter gradients of a packed batch equal the sums over its documents
  run alone (each in a batch of its own, without padding)."""

  # 1-token documents have no target and must contribute exactly nothing.
  LENGTHS = [1, 9, 30, 9, 1, 64, 30, 9, 30, 1, 9]

  @pytest.fixture(scope="class")
  @classmethod
  def setup(cls):
    docs = random_docs(cls.LENGTHS)
    rows = packing.pack_documents(docs, 64, seed=0)
    assert rows.num_rows < len(docs)  # several documents share rows
    graphdef, state = nnx.split(lm_model.LM(TINY, rngs=nnx.Rngs(0)))
    # Each document alone: one row of its own, no padding. Documents of equal
    # length share a call (rows never interact), which saves compilations.
    loss, grads = 0.0, jax.tree.map(lambda x: np.zeros(x.shape, np.float64), state)
    for n in sorted(set(cls.LENGTHS)):
      same = np.stack([d for d in docs if len(d) == n])
      l, g = loss_and_grads(graphdef, state, packing.PackedRows.from_segment_ids(
          same, np.ones(same.shape, np.int32)))
      loss += l
      grads = jax.tree.map(np.add, grads, g)
    return graphdef, state, rows, loss, grads

  def test_packed_loss_and_gradients_equal_documents_alone(self, setup):
    graphdef, state, rows, loss_alone, grads_alone = setup
    loss, grads = loss_and_grads(graphdef, state, rows)
    assert abs(loss - loss_alone) / abs(loss_alone) <= 1e-5
    for (path, g), g_alone in zip(jax.tree_util.tree_leaves_with_path(grads),
                                  jax.tree.leaves(grads_alone)):
      assert rel_err(g, g_alone) <= 1e-5, jax.tree_util.keystr(path)

  def test_remat_changes_nothing(self, setup):
    graphdef, state, rows, _, _ = setup
    loss, grads = loss_and_grads(graphdef, state, rows)
    remat_graphdef, remat_state = nnx.split(lm_model.LM(
        dataclasses.replace(TINY, remat=True), rngs=nnx.Rngs(0)))
    loss_r, grads_r = loss_and_grads(remat_graphdef, remat_state, rows)
    assert abs(loss_r - loss) / loss <= 1e-6
    for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
      assert rel_err(g_r, g) <= 1e-6

  def test_concat_fails_the_same_check(self, setup):
    graphdef, state, rows, loss_alone, grads_alone = setup
    concat = lm_data.erase_boundaries(rows)
    loss, grads = loss_and_grads(graphdef, state, concat)
    assert abs(loss - loss_alone) / abs(loss_alone) > 1e-3
    # Same targets as packed, only attention/positions across documents:
    # still wrong, so the check sees the contamination itself.
    same_targets = packing.PackedRows(concat.tokens, concat.segment_ids, concat.positions,
                                      rows.loss_mask)
    loss, grads = loss_and_grads(graphdef, state, same_targets)
    assert abs(loss - loss_alone) / abs(loss_alone) > 1e-3
    assert rel_err(np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)]),
                   np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads_alone)])) > 1e-3


# ----------------------------------------------------------------------------
# Training runs through the CLI


SENTENCES = [
    b"the quick brown fox jumps over the lazy dog. ",
    b"def add(a, b):\n    return a + b\n",
    b"packing puts many short documents into one row. ",
    b"attention stays inside each document. ",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("data")
  rng = np.random.default_rng(0)
  for i in range(40):
    parts = [SENTENCES[j] for j in rng.integers(0, len(SENTENCES), rng.integers(1, 4))]
    (folder / f"doc{i:02d}.txt").write_bytes(b"".join(parts))
  (folder / "empty.txt").write_bytes(b"")
  (folder / "blob.bin").write_bytes(b"\x00\x01\x02" * 10)
  return folder


def read_metrics(out):
  return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_short_training_run_lowers_the_loss(data_dir, tmp_path, capsys):
  out = tmp_path / "run"
  summary = train_lm.main(["--data", str(data_dir), "--out", str(out), "--steps", "40",
                           "--log-every", "5", "--eval-every", "20", "--eval-batches", "2",
                           "--ckpt-every", "0", *TINY_ARGS])
  log = capsys.readouterr().out
  assert "40 files (2 skipped)" in log and "document lengths" in log
  records = read_metrics(out)
  train = [r["loss_mean"] for r in records if "loss_mean" in r]
  evals = [r["eval_loss"] for r in records if "eval_loss" in r]
  assert len(evals) == 2 and len(train) == 8
  assert train[-1] < 0.6 * train[0]
  assert evals[-1] < evals[0] < np.log(lm_data.VOCAB_SIZE)
  assert summary["eval_loss"] == evals[-1] and summary["useful_tokens_per_s"] > 0
  if importlib.util.find_spec("matplotlib") is not None:  # optional ([examples])
    assert (out / "loss_curve.png").stat().st_size > 0
    assert (out / "doc_lengths.png").stat().st_size > 0


@pytest.mark.parametrize("mode", ["padded", "concat"])
def test_other_packing_modes_train(data_dir, tmp_path, mode):
  summary = train_lm.main(["--data", str(data_dir), "--out", str(tmp_path / mode),
                           "--packing", mode, "--steps", "4", "--log-every", "2",
                           "--eval-every", "4", "--eval-batches", "1", "--ckpt-every", "0",
                           *TINY_ARGS])
  assert np.isfinite(summary["eval_loss"]) and np.isfinite(summary["final_loss"])
  if mode == "padded":
    assert summary["padding_fraction"] > 0.2
  else:
    assert summary["padding_fraction"] < 0.05


def test_resume_continues_exactly(data_dir, tmp_path):
  pytest.importorskip("orbax.checkpoint")
  common = ["--data", str(data_dir), "--steps", "8", "--log-every", "1", "--eval-every",
            "4", "--eval-batches", "1", "--ckpt-every", "0", *TINY_ARGS]
  train_lm.main([*common, "--out", str(tmp_path / "full")])
  train_lm.main([*common, "--out", str(tmp_path / "cut"), "--stop-after", "5"])
  train_lm.main([*common, "--out", str(tmp_path / "cut"), "--resume"])
  full, cut = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
  key = lambda r: (r["step"], "eval_loss" in r)  # noqa: E731
  assert [key(r) for r in cut] == [key(r) for r in full]
  for a, b in zip(full, cut):
    for name in ("loss", "grad_norm", "eval_loss", "tokens", "useful_tokens"):
      assert a.get(name) == b.get(name), (a["step"], name)
  # A different run, or no checkpoint at all, is refused before training.
  with pytest.raises(SystemExit, match="seed"):
    train_lm.main([*common, "--out", str(tmp_path / "cut"), "--resume", "--seed", "1"])
  with pytest.raises(SystemExit, match="no checkpoint"):
    train_lm.main([*common, "--out", str(tmp_path / "nothing"), "--resume"])


def test_context_parallel_trains_like_one_device(data_dir, tmp_path):
  """--context-parallel 4 (ring, zigzag) gives the losses of one device; a
  checkpoint it writes resumes with one device. Four fake CPU devices need
  XLA_FLAGS before JAX starts, hence a child process."""
  pytest.importorskip("orbax.checkpoint")
  common = ["--data", str(data_dir), "--steps", "3", "--log-every", "1", "--eval-every",
            "2", "--eval-batches", "1", "--ckpt-every", "0", *TINY_ARGS]
  one = train_lm.main([*common, "--out", str(tmp_path / "one")])
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(
      [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=4"]))
  run = subprocess.run(
      [sys.executable, "-m", "experiments.train_lm", *common, "--out", str(tmp_path / "cp"),
       "--context-parallel", "4", "--stop-after", "2"],
      cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
      timeout=300)
  assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
  assert "each row over 4 devices (ring, zigzag), 16 tokens per device" in run.stdout
  cp = read_metrics(tmp_path / "cp")
  assert json.loads((tmp_path / "cp" / "summary.json").read_text())["context_parallel"] == 4
  # The same run resumed on one device: a different N is allowed.
  resumed = train_lm.main([*common, "--out", str(tmp_path / "cp"), "--resume"])
  assert resumed["context_parallel"] == 1
  full, cut = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "cp")
  key = lambda r: (r["step"], "eval_loss" in r)  # noqa: E731
  assert [key(r) for r in cut] == [key(r) for r in full]
  assert [key(r) for r in cp] == [(1, False), (2, False), (2, True)]
  for a, b in zip(full, cut):
    for name in ("loss", "grad_norm", "eval_loss"):
      if name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-5, err_msg=f"{a['step']} {name}")
    assert a["useful_tokens"] == b["useful_tokens"]
  assert one["eval_loss"] == full[-1]["eval_loss"]


# ----------------------------------------------------------------------------
# Data pieces


def test_batch_loader_is_a_pure_function_of_the_step():
  rows = packing.pack_documents(random_docs([5, 9, 20, 3, 7, 30, 2, 11]), 16, seed=0)
  for use_grain in (False, None):
    a = lm_data.BatchLoader(rows, 3, seed=7, use_grain=use_grain)
    b = lm_data.BatchLoader(rows, 3, seed=7, use_grain=use_grain)
    steps = [a.indices(s).tolist() for s in range(10)]
    assert steps == [b.indices(s).tolist() for s in reversed(range(10))][::-1]
    flat = np.concatenate(steps)
    n = rows.num_rows
    for epoch in range(len(flat) // n):  # every row exactly once per epoch
      assert sorted(flat[epoch * n:(epoch + 1) * n].tolist()) == list(range(n))
    assert steps != [lm_data.BatchLoader(rows, 3, seed=8, use_grain=use_grain).indices(s)
                     .tolist() for s in range(10)]


def test_concat_rows_ignore_document_boundaries():
  docs = [lm_data.encode(b"ab"), lm_data.encode(b"cde")]
  rows = lm_data.concat_documents(docs, 4)
  assert rows.tokens.ravel().tolist() == [256, 97, 98, 257, 256, 99, 100, 101, 257, 0, 0, 0]
  assert rows.segment_ids.ravel().tolist() == [1] * 9 + [0] * 3
  assert rows.loss_mask[0].tolist() == [True, True, True, False]  # EOS -> BOS is a target
  assert rows.positions[1].tolist() == [0, 1, 2, 3]


def test_heldout_split_is_by_source_and_stable():
  docs = [(f"file{i}.py", b"x" * (i + 1)) for i in range(200)]
  corpus = lm_data.split(docs, 0.1, "test")
  again = lm_data.split(list(reversed(docs)), 0.1, "test")
  assert sorted(len(d) for d in corpus.eval) == sorted(len(d) for d in again.eval)
  assert 5 <= len(corpus.eval) <= 40 and len(corpus.train) + len(corpus.eval) == 200


def test_stdlib_docstrings_are_short_documents():
  root, files = lm_data._stdlib_files()
  assert len(files) > 100 and not any("site-packages" in f.parts for f in files)
  some = [f for f in files
          if f.relative_to(root).as_posix() in ("argparse.py", "textwrap.py", "json/__init__.py")]
  assert len(some) == 3
  docs = [d for f in some for d in lm_data._docstrings(f.read_bytes())]
  lengths = np.array([len(d) for d in docs])
  assert len(docs) > 20 and np.median(lengths) < 1000
  assert lm_data._docstrings(b"def f(:\n") == []  # unparsable source: no documents
  assert "\n" in lm_data.length_histogram(lengths + 2)


# ----------------------------------------------------------------------------
# Bad input


def test_data_folder_without_usable_files(tmp_path):
  (tmp_path / "empty.txt").write_bytes(b"  \n")
  (tmp_path / "blob.bin").write_bytes(b"\x00" * 100)
  with pytest.raises(ValueError, match="no usable text files"):
    lm_data.folder_documents(tmp_path)
  with pytest.raises(ValueError, match="not a directory"):
    lm_data.folder_documents(tmp_path / "missing")
  with pytest.raises(ValueError, match="no usable text files"):
    train_lm.main(["--data", str(tmp_path), "--out", str(tmp_path / "out"), *TINY_ARGS])


def test_data_folder_with_one_file_cannot_be_split(tmp_path):
  (tmp_path / "only.txt").write_bytes(b"hello")
  with pytest.raises(ValueError, match="at least 2 files"):
    lm_data.split(lm_data.folder_documents(tmp_path)[0], 0.1, "--data")


def test_token_ids_outside_the_vocabulary_are_refused():
  bad = [np.array([256, 300, 257], np.int32)]
  for mode in ("packed", "padded"):
    with pytest.raises(ValueError, match="token id 300"):
      lm_data.make_rows(bad, 16, mode)


def test_context_parallel_bad_input(data_dir, tmp_path):
  with pytest.raises(SystemExit):  # 64 is not divisible by 2 * 3
    train_lm.parse_args(["--seq-len", "64", "--context-parallel", "3"])
  with pytest.raises(SystemExit):
    train_lm.parse_args(["--context-parallel", "0"])
  with pytest.raises(SystemExit, match="only 1 devices .*device_count=2"):
    train_lm.main(["--data", str(data_dir), "--out", str(tmp_path), *TINY_ARGS,
                   "--context-parallel", "2"])
  batch = packing.pack_documents(random_docs([5, 9]), 16).as_dict()  # no targets
  with pytest.raises(ValueError, match="lm_data.with_targets"):
    lm_model.loss_sum(lm_model.LM(TINY, rngs=nnx.Rngs(0)), batch)


def test_row_length_the_model_does_not_support():
  model = lm_model.LM(TINY, rngs=nnx.Rngs(0))
  tokens = jnp.zeros((1, 65), jnp.int32)
  with pytest.raises(ValueError, match="max_seq_len=64"):
    model(tokens, jnp.ones_like(tokens), jnp.zeros_like(tokens))
  with pytest.raises(SystemExit):
    train_lm.parse_args(["--seq-len", "1"])


def test_bad_model_config():
  with pytest.raises(ValueError, match="divisible by num_heads"):
    lm_model.LMConfig(d_model=30, num_heads=4)
  with pytest.raises(ValueError, match="dtype"):
    lm_model.LMConfig(dtype="int8")
