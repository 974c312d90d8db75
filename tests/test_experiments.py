"""The GPU check scripts' own plumbing, on CPU: mosaic_check.py, fwd_probe.py, bwd_probe.py.

Their case tables must name only calls the kernels accept (a refused case
costs a GPU run), mosaic_check's workers must not outlive it (a left-over
worker keeps the GPU busy for the next command), and fwd_probe's layouts and
profile summary must say what its docstring says.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bwd_probe, fwd_probe, item_table_probe, mosaic_check
from pallas_kernels import item_order, mosaic_attention, mosaic_persistent


def _forward_shapes(name):
  """jax.eval_shape of the Mosaic forward a correctness case runs (tracing checks it all)."""
  (_, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype, causal, window, _,
   tile_spec) = mosaic_check.CORRECTNESS_CASES[name]
  schedule, num_ctas = mosaic_check.schedule_of_case(name)
  tile = mosaic_check._tile(tile_spec)
  dt = jnp.dtype(dtype)
  q = jax.ShapeDtypeStruct((batch, q_len, heads, head_dim), dt)
  kv = jax.ShapeDtypeStruct((batch, kv_len, kv_heads, head_dim), dt)
  q_ids = jax.ShapeDtypeStruct((batch, q_len), jnp.int32)
  kv_ids = jax.ShapeDtypeStruct((batch, kv_len), jnp.int32)
  ranges = jax.ShapeDtypeStruct((batch, q_len // tile.block_major, 4), jnp.int32)
  return jax.eval_shape(
      lambda *a: mosaic_attention.forward(*a, tile=tile, scale=0.1, causal=causal,
                                          sliding_window=window, schedule=schedule,
                                          num_ctas=num_ctas),
      q, kv, kv, q_ids, kv_ids, q_ids, kv_ids, ranges)


@pytest.mark.parametrize("name", sorted(mosaic_check.CORRECTNESS_CASES))
def test_every_correctness_case_is_a_call_the_forward_accepts(name):
  out, lse = _forward_shapes(name)
  batch, q_len, heads = (mosaic_check.CORRECTNESS_CASES[name][i] for i in (1, 2, 4))
  assert lse.shape == (batch, heads, q_len) and out.shape[:3] == (batch, q_len, heads)


def test_case_names_give_their_schedule_and_cta_count():
  assert mosaic_check.schedule_of_case("packed-d128") == ("serial", None)
  assert mosaic_check.schedule_of_case("pingpong:packed-d128") == ("pingpong", None)
  assert (mosaic_check.schedule_of_case("persistent-pingpong@3:packed-d128")
          == ("persistent-pingpong", 3))


def test_every_timed_forward_names_a_schedule():
  for name, (*_, schedule) in mosaic_check.TIMED_TILES.items():
    base, _, window = schedule.partition(":")
    assert base in mosaic_attention.SCHEDULES, name
    assert not window or window in mosaic_check.PERSISTENT_WINDOWS, name


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="PR_SET_PDEATHSIG is Linux-only (elsewhere workers may outlive)")
def test_workers_die_with_their_parent():
  # A parent that starts a worker the way mosaic_check does, prints its pid, then sleeps.
  parent_code = (
      "import subprocess, sys, time\n"
      "from experiments.mosaic_check import _die_with_parent\n"
      "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],\n"
      "                     start_new_session=True, preexec_fn=_die_with_parent)\n"
      "print(w.pid, flush=True)\n"
      "time.sleep(60)\n")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE,
                            text=True, cwd=repo)
  worker = int(parent.stdout.readline())
  parent.kill()
  parent.wait()
  deadline = time.monotonic() + 10
  while time.monotonic() < deadline:
    try:
      with open(f"/proc/{worker}/status") as f:
        state = next(line for line in f if line.startswith("State:"))
    except FileNotFoundError:
      return  # gone (reaped)
    if "Z" in state.split()[1]:
      return  # dead, not yet reaped by its new parent
    time.sleep(0.1)
  os.kill(worker, 9)
  pytest.fail(f"worker {worker} still running 10 s after its parent was killed")


def test_fwd_probe_variants_parse_into_schedules_tiles_and_options():
  assert fwd_probe.parse_variant("pingpong") == ("pingpong", mosaic_attention.DEFAULT_TILE,
                                                 frozenset())
  schedule, tile, options = fwd_probe.parse_variant("serial@128x64s3")
  assert schedule == "serial" and not options
  assert (tile.block_major, tile.block_minor, tile.num_stages) == (128, 64, 3)
  assert fwd_probe.parse_variant("persistent-pingpong+compares") == (
      "persistent-pingpong", mosaic_attention.DEFAULT_TILE, frozenset({"compares"}))
  assert fwd_probe.parse_variant("persistent+spans+compares")[2] == {"compares", "spans"}
  with pytest.raises(ValueError, match="exclude"):
    fwd_probe.parse_variant("persistent+spans+lasthalf")
  assert fwd_probe.parse_variant("persistent+spans+dynamic")[2] == {"spans", "dynamic"}
  with pytest.raises(ValueError, match="exclude"):
    fwd_probe.parse_variant("persistent+load+dynamic")
  assert fwd_probe.parse_variant("persistent+load+unbalanced")[2] == {"load", "unbalanced"}
  with pytest.raises(ValueError, match="unbalanced needs load"):
    fwd_probe.parse_variant("persistent+snake+unbalanced")
  with pytest.raises(ValueError, match="schedule"):
    fwd_probe.parse_variant("eager")
  with pytest.raises(ValueError, match="compares"):
    fwd_probe.parse_variant("pingpong+fast")


@pytest.mark.parametrize("name", fwd_probe.LAYOUTS)
def test_fwd_probe_layouts_are_packed_rows_of_the_main_shape(name):
  seg, causal = fwd_probe.layout(name, batch=2)
  assert seg.shape == (2, fwd_probe.SEQ_LEN) and seg.dtype == np.int32
  assert causal == (name not in ("full", "blocks"))
  assert (seg[:, -700:] == 0).all() == (name == "padded")
  if name in ("dense", "full"):
    assert (seg == 1).all()
  if name in ("blocks", "blocksc"):
    assert len(np.unique(seg[0])) == fwd_probe.SEQ_LEN // 1024


def test_fwd_probe_patched_sets_module_attributes_inside_only():
  before = mosaic_persistent.REBALANCE_SWEEPS
  with pytest.raises(RuntimeError):
    with fwd_probe._patched(mosaic_persistent, REBALANCE_SWEEPS=0):
      assert mosaic_persistent.REBALANCE_SWEEPS == 0
      raise RuntimeError("left early")
  assert mosaic_persistent.REBALANCE_SWEEPS == before


def test_fwd_probe_last_half_only_keeps_a_groups_back_at_most_one():
  def word(front0, back0, front1, back1):
    return (front0 | back0 << 8 | (front1 | back1 << 8) << 16) - (1 << 32) * (back1 >= 128)
  spans = jnp.asarray([[word(0, 1, 0, 0), word(3, 2, 1, 0), word(255, 0, 2, 255)]],
                      jnp.int32)
  np.testing.assert_array_equal(fwd_probe.last_half_only(spans),
                                [[word(0, 1, 0, 0), word(0, 1, 0, 0), word(0, 0, 0, 1)]])


def test_fwd_probe_summarizes_a_profile_per_role(tmp_path):
  # Warpgroups 0, 1 consume, 2 produces (tid = 1 + warpgroup for CTA 0).
  events = []
  for tid, name, start, end in [(1, "c_qk", 0, 2), (1, "c_pv", 5, 10), (2, "c_qk", 0, 10),
                                (3, "p_load_kv", 0, 1), (3, "p_wait_slot", 1, 10)]:
    events += [dict(name=name, ph="B", ts=start, pid=1, tid=tid),
               dict(name=name, ph="E", ts=end, pid=1, tid=tid)]
  path = tmp_path / "trace.json"
  path.write_text(json.dumps(dict(traceEvents=events)))
  shares = fwd_probe.summarize_trace(str(path))
  # Consumers: 20 time units in all; c_qk 2 + 10, c_pv 5; medians in cycles (x 1000).
  assert shares["consumer"] == {"c_qk": (0.6, 6000), "c_pv": (0.25, 5000)}
  assert shares["producer"] == {"p_wait_slot": (0.9, 9000), "p_load_kv": (0.1, 1000)}


def test_fwd_probe_measures_steps_within_and_across_items(tmp_path):
  # Consumer 0 (tid 1): item A's steps at 0 and 10, then its store, item B's first
  # step; the producer (tid 3) is ignored. Times in units of 1000 cycles.
  regions = [(1, "c_softmax", 0, 2), (1, "c_pv", 2, 4), (1, "c_wait_kv", 5, 6),
             (1, "c_qk", 6, 7), (1, "c_softmax_masked", 10, 12), (1, "c_pv", 12, 14),
             (1, "c_store", 14, 17), (1, "c_wait_q", 17, 18), (1, "c_qk", 18, 20),
             (1, "c_softmax", 22, 23), (3, "p_load_kv", 0, 30)]
  events = []
  for tid, name, start, end in regions:
    events += [dict(name=name, ph="B", ts=start, pid=1, tid=tid),
               dict(name=name, ph="E", ts=end, pid=1, tid=tid)]
  path = tmp_path / "trace.json"
  path.write_text(json.dumps(dict(traceEvents=events)))
  assert fwd_probe.item_boundaries(str(path)) == dict(
      within=6000, across=8000, items=1,
      regions_across={"c_qk": 2000, "c_store": 3000, "c_wait_q": 1000})


def test_fwd_probe_runs_variants_and_times_them(monkeypatch):
  # The kernel swapped for the jnp reference (no GPU here) on a small shape.
  from jpack.attention import reference_attention
  monkeypatch.setattr(fwd_probe, "SEQ_LEN", 1024)
  monkeypatch.setattr(fwd_probe, "HEADS", 2)
  monkeypatch.setattr(fwd_probe, "kernel", lambda tile, schedule, scale, causal: jax.jit(
      lambda q, k, v, seg, pos, ranges, compares, spans, items: reference_attention(
          q, k, v, segment_ids=seg, causal=causal, scale=scale).astype(q.dtype)))
  args = type("Args", (), dict(dump=None, profile=None, reps=2, seed=0))()
  shape = (1, 1024, 2, fwd_probe.HEAD_DIM)
  q, k, v = (jax.random.normal(key, shape, jnp.bfloat16)
             for key in jax.random.split(jax.random.key(1), 3))
  pos = jnp.arange(1024, dtype=jnp.int32)[None]
  seg = jnp.asarray(fwd_probe.layout("blocksc", batch=1)[0])
  first, out, first_call = fwd_probe.run_variant(
      "pingpong", "pingpong", mosaic_attention.DEFAULT_TILE, frozenset(), "blocksc",
      (q, k, v, seg, pos), args, None)
  assert first["rel_err_vs_reference_row0"] < 1e-2 and first["rel_err_vs_first"] == 0.0
  assert first["nonfinite"] == 0 and first["tiles"] == 8 * 9 // 2 * 2
  again, _, again_call = fwd_probe.run_variant(
      "persistent+compares+spans+dynamic", "persistent", mosaic_attention.DEFAULT_TILE,
      frozenset({"compares", "spans", "dynamic"}), "blocksc", (q, k, v, seg, pos), args, out)
  assert again["rel_err_vs_first"] == 0.0 and "rel_err_vs_reference_row0" not in again
  first["variant"], again["variant"] = "pingpong", "persistent+compares+spans+dynamic"
  failed = dict(layout="blocksc", variant="broken", error="ValueError: refused")
  fwd_probe.time_variants([first, again, failed],
                          {"pingpong": first_call,
                           "persistent+compares+spans+dynamic": again_call}, reps=3)
  for result in (first, again):
    p10, p90 = result["ms_p10_p90"]
    assert 0 < p10 <= result["ms"] <= p90 and "useful_flops" not in result
    assert result["executed_tflops"] >= result["useful_tflops"] >= 0
  assert first["vs_first"] == 1.0 and again["vs_first"] > 0 and "ms" not in failed


def test_fwd_probe_baseline_runs_the_persistent_kernel_of_another_module(tmp_path,
                                                                       monkeypatch):
  # A "version" of mosaic_persistent whose kernel only says that it was called.
  monkeypatch.setattr(fwd_probe, "SEQ_LEN", 1024)
  monkeypatch.setattr(fwd_probe, "HEADS", 2)
  source = pathlib.Path(mosaic_persistent.__file__).read_text()
  path = tmp_path / "baseline.py"
  path.write_text(source + "\n\ndef persistent_forward(*args, **kwargs):\n"
                  "  raise RuntimeError('the baseline ran')\n")
  baseline = fwd_probe.load_baseline(str(path))
  assert baseline.WorkItems is mosaic_persistent.WorkItems
  args = type("Args", (), dict(dump=None, profile=None, reps=2, seed=0, baseline=[baseline]))()
  shape = (1, 1024, 2, fwd_probe.HEAD_DIM)
  q = k = v = jnp.ones(shape, jnp.bfloat16)
  pos = jnp.arange(1024, dtype=jnp.int32)[None]
  seg = jnp.asarray(fwd_probe.layout("blocksc", batch=1)[0])
  own = mosaic_attention.persistent_forward
  with pytest.raises(RuntimeError, match="the baseline ran"):
    fwd_probe.run_variant("persistent+baseline", "persistent", mosaic_attention.DEFAULT_TILE,
                          frozenset({"baseline"}), "blocksc", (q, k, v, seg, pos), args, None)
  assert mosaic_attention.persistent_forward is own  # restored after the variant
  assert fwd_probe.parse_variant("persistent-pingpong+load+baseline")[2] == {"load",
                                                                             "baseline"}
  # The second of two modules: +baseline2; one module given: baseline2 is refused.
  path2 = tmp_path / "second.py"
  path2.write_text(source + "\n\ndef persistent_forward(*args, **kwargs):\n"
                   "  raise RuntimeError('the second baseline ran')\n")
  args.baseline = [baseline, fwd_probe.load_baseline(str(path2), "second_baseline")]
  with pytest.raises(RuntimeError, match="the second baseline ran"):
    fwd_probe.run_variant("persistent+baseline2", "persistent", mosaic_attention.DEFAULT_TILE,
                          fwd_probe.parse_variant("persistent+baseline2")[2], "blocksc",
                          (q, k, v, seg, pos), args, None)
  with pytest.raises(ValueError, match="one baseline"):
    fwd_probe.parse_variant("persistent+baseline+baseline2")
  for missing in ([baseline], None):
    args.baseline = missing
    with pytest.raises(ValueError, match="--baseline"):
      fwd_probe.run_variant("persistent+baseline2", "persistent",
                            mosaic_attention.DEFAULT_TILE, frozenset({"baseline2"}), "blocksc",
                            (q, k, v, seg, pos), args, None)


def test_bwd_probe_variants_parse_into_schedules_and_cta_counts():
  assert bwd_probe.parse_variant("grid") == ("grid", None, False)
  assert bwd_probe.parse_variant("persistent:3") == ("persistent", 3, False)
  assert bwd_probe.parse_variant("persistent+delta") == ("persistent", None, True)
  with pytest.raises(ValueError, match="schedule"):
    bwd_probe.parse_variant("pingpong")
  with pytest.raises(ValueError, match="delta"):
    bwd_probe.parse_variant("grid+fused")


def test_bwd_probe_runs_variants_and_times_them(monkeypatch):
  # The kernels swapped for the reference's vjp (no GPU here) on a small shape.
  def fake_kernels(schedule, num_ctas, fuse_delta, causal, scale, head_dim):
    def grads(q, k, v, do, lse, delta_or_out, seg, pos, ranges):
      return tuple(g.astype(q.dtype) for g in bwd_probe.reference_grads(
          q, k, v, do, seg, causal, scale).values())

    def dq(*args):  # args[5]: out with fuse_delta, else delta
      if fuse_delta:
        return grads(*args)[0], bwd_probe.backward_delta(args[5], args[3], 0.0)
      return grads(*args)[0]

    delta_fn = None if fuse_delta else jax.jit(
        lambda out, do: bwd_probe.backward_delta(out, do, 0.0))
    return delta_fn, jax.jit(dq), jax.jit(lambda *a: grads(*a)[1:])

  monkeypatch.setattr(bwd_probe, "kernels", fake_kernels)
  monkeypatch.setattr(bwd_probe, "residuals", functools.partial(
      bwd_probe.residuals, reference=True))
  monkeypatch.setattr(bwd_probe, "HEADS", 2)
  shape = (1, 512, 2, bwd_probe.HEAD_DIM)
  q, k, v, do = (jax.random.normal(key, shape, jnp.bfloat16)
                 for key in jax.random.split(jax.random.key(2), 4))
  pos = jnp.arange(512, dtype=jnp.int32)[None]
  seg = jnp.asarray(fwd_probe.layout("blocksc", batch=1)[0][:, :512])  # one document
  inputs = (q, k, v, do, seg, pos)
  first, grads = bwd_probe.run_variant("grid", None, False, inputs, True, None, reps=1)
  for name in bwd_probe.GRADS:
    assert first[f"{name}_err_vs_reference_row0"] < 1e-2
  assert first["nonfinite"] == 0 and first["bwd_ms"] == pytest.approx(
      first["delta_ms"] + first["dq_ms"] + first["dkdv_ms"], abs=1e-3)
  flops = 2.5 * 4 * 128 * 2 * 512 * 513 / 2  # 2 heads, one causal document of 512
  assert first["useful_tflops"] == pytest.approx(flops / first["bwd_ms"] / 1e9, abs=0.1)
  again, _ = bwd_probe.run_variant("persistent", 3, True, inputs, True, grads, reps=1)
  assert again["dq_err_vs_first"] == 0.0 and "dq_err_vs_reference_row0" not in again
  assert "delta_ms" not in again and again["bwd_ms"] == pytest.approx(
      again["dq_ms"] + again["dkdv_ms"], abs=1e-3)


def test_item_table_probe_runs_variants_and_summarizes_ncu_times(monkeypatch, tmp_path,
                                                                 capsys):
  # Interpreted here (one call per variant); the variants must agree bit for bit.
  monkeypatch.setattr(item_table_probe, "CALLS", 1)
  monkeypatch.setattr(item_order, "ranked_table",
                      functools.partial(item_order.ranked_table, interpret=True))
  monkeypatch.setattr(item_order, "BLOCK_ITEMS", item_order.BLOCK_ITEMS)
  monkeypatch.setattr(item_order, "NUM_WARPS", item_order.NUM_WARPS)
  variants = item_table_probe._variants("512x4,1024x8")
  assert variants == [(512, 4), (1024, 8)]
  item_table_probe.run(variants)
  assert "1024x8: ran" in capsys.readouterr().out
  header = '"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"\n'
  rows = [f'"{i}","{name}","gpu__time_duration.sum","{unit}","{value}"\n' for i, (name, unit, value)
          in enumerate([("ranked_item_table", "usecond", "8.0"), ("loop_fusion", "usecond", "2"),
                        ("ranked_item_table", "nsecond", "5,500")])]
  log = tmp_path / "table.csv"
  log.write_text("==PROF== Connected to process\n" + header + "".join(rows))
  item_table_probe.summarize(str(log), variants)
  out = capsys.readouterr().out
  assert " 512 items x 4 warps: 8.0 us" in out and "1024 items x 8 warps: 5.5 us" in out


def test_bench_jpack_planned_matches_jpack_planning_in_the_call():
  """bench_attention's jpack_planned peer (the plan made once, passed to every
  call) computes what the jpack peer (planning inside the call) does."""
  from experiments import bench_attention as bench
  from experiments.layouts import packed_segment_ids

  problem = bench.Problem(np.asarray(packed_segment_ids(2, 256, seed=3, mean_len=64)),
                          heads=4, kv_heads=2, head_dim=64)
  inputs = bench.random_inputs(problem, seed=5)
  args = (inputs.q, inputs.k, inputs.v, inputs.cot)
  results = []
  for builder in (bench.build_jpack, bench.build_jpack_planned):
    attend, extra, note = builder(problem, inputs.segment_ids)
    results.append((bench.forward_fn(attend)(*args[:3], *extra),
                    *bench.forward_backward_fn(attend)(*args, *extra)))
  assert "made once" in note
  for got, want in zip(*results):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=1e-6, atol=1e-6)


def test_interleaved_samples_rotate_the_order_round_by_round(monkeypatch):
  """Each round samples every entry once, starting one entry later than the last round."""
  from experiments import timing

  order = []
  monkeypatch.setattr(timing, "sample_ms", lambda fn, args, calls: fn(*args))
  timed = {name: ((lambda n: order.append(n) or len(order)), (name,)) for name in "abc"}
  samples = timing.interleaved_samples(timed, reps=4)
  assert order == list("abc" "bca" "cab" "abc")
  assert samples == {"a": [1, 6, 8, 10], "b": [2, 4, 9, 11], "c": [3, 5, 7, 12]}
  assert timing.round_ratios(samples["b"], samples["a"]) == [2, 4 / 6, 9 / 8, 11 / 10]
  with pytest.raises(ValueError, match="same rounds"):
    timing.round_ratios([1.0], [1.0, 2.0])


def test_bench_times_peers_in_rounds_and_takes_ratios_per_round():
  """time_jax_peers fills medians, percentiles and samples; fill_throughput's ratio
  to jpack is the median of per-round ratios (not the ratio of medians), and the
  ratio of medians for a peer without samples (the torch peers)."""
  from experiments import bench_attention as bench

  double = jax.jit(lambda x: x * 2)
  x = jnp.ones((8,))
  prepared = {name: (bench.PeerResult(name), {"fwd": (double, (x,)), "fwd_bwd": (double, (x,))})
              for name in ("jpack", "cudnn_packed")}
  bench.time_jax_peers(prepared, reps=5)
  for result, _ in prepared.values():
    assert len(result.fwd_samples) == len(result.fwd_bwd_samples) == 5
    p10, p90 = result.fwd_p10_p90
    assert p10 <= result.fwd_ms <= p90
    assert result.fwd_ms == pytest.approx(np.median(result.fwd_samples))

  jpack = bench.PeerResult("jpack", fwd_ms=2.0, fwd_samples=[1.0, 2.0, 4.0])
  peer = bench.PeerResult("cudnn_packed", fwd_ms=2.0, fwd_samples=[1.5, 2.2, 4.8])
  torch_peer = bench.PeerResult("torch_flex", fwd_ms=3.0)
  bench.fill_throughput([jpack, peer, torch_peer], fwd_flops=1e9)
  assert peer.fwd_vs_jpack == pytest.approx(1.2)  # per round 1.5, 1.1, 1.2
  assert peer.fwd_vs_jpack_p10_p90 == pytest.approx([1.12, 1.44])
  assert torch_peer.fwd_vs_jpack == 1.5 and torch_peer.fwd_vs_jpack_p10_p90 is None
  assert jpack.fwd_tflops == pytest.approx(1e9 / 2e-3 / 1e12)
  assert "1.200 (1.120-1.440)" in bench.markdown_table([jpack, peer, torch_peer])


def test_bench_times_every_forward_before_any_forward_backward(monkeypatch):
  """The forwards' rounds run first, then the forward+backward rounds (a forward
  sampled between backward passes would run under their power draw)."""
  from experiments import bench_attention as bench
  from experiments import timing

  order = []
  monkeypatch.setattr(timing, "sample_ms", lambda fn, args, calls: fn(*args))
  record = lambda name, part: (lambda: order.append((name, part)) or 1.0)  # noqa: E731
  prepared = {name: (bench.PeerResult(name), {part: (record(name, part), ())
                                              for part in ("fwd", "fwd_bwd")})
              for name in ("jpack", "jpack_planned", "cudnn_packed")}
  del prepared["cudnn_packed"][1]["fwd_bwd"]  # a part that failed to compile is left out
  bench.time_jax_peers(prepared, reps=3)
  parts = [part for _, part in order]
  assert parts == ["fwd"] * 9 + ["fwd_bwd"] * 6
  assert order[:3] == [("jpack", "fwd"), ("jpack_planned", "fwd"), ("cudnn_packed", "fwd")]
  assert order[3] == ("jpack_planned", "fwd")  # the next round starts one peer later
  assert prepared["cudnn_packed"][0].fwd_bwd_samples is None
  assert len(prepared["jpack"][0].fwd_bwd_samples) == 3


def test_gpu_shards_group_a_cases_tests_and_deal_the_heaviest_groups_first():
  from experiments import gpu_shards

  ids = ["t/a.py::test_out[c1-s]", "t/a.py::test_lse[c1-s]", "t/a.py::test_out[c2-s]",
         "t/a.py::test_plain", "t/b.py::test_out[c1-s]", "t/a.py::test_nan[c1-s]"]
  groups = gpu_shards.group_node_ids(ids)
  assert groups == [["t/a.py::test_out[c1-s]", "t/a.py::test_lse[c1-s]",
                     "t/a.py::test_nan[c1-s]"],
                    ["t/a.py::test_out[c2-s]"], ["t/a.py::test_plain"],
                    ["t/b.py::test_out[c1-s]"]]
  # --drop: a parameter that does not change what compiles (the gradient checked).
  grads = ["t/a.py::test_grad[dq-c1-s]", "t/a.py::test_grad[dk-c1-s]",
           "t/a.py::test_nan[c1-s]", "t/a.py::test_grad[dq-c2-s]"]
  assert gpu_shards.group_node_ids(grads, drop=r"(?<=\[)d[qkv]-") == [grads[:3], grads[3:]]
  assert len(gpu_shards.group_node_ids(grads)) == 4
  shards = gpu_shards.deal(groups, 2)
  # The 3-test group (weight 1.3) first to shard 0, then the singles (1.1) to the
  # least loaded: shard 1, shard 1, then shard 0 (1.3 < 2.2).
  assert shards == [groups[0] + groups[3], groups[1] + groups[2]]
  assert gpu_shards.deal(groups, 9) == [groups[0], groups[1], groups[2], groups[3]]
  log = ("t/a.py::test_out[c1-s] PASSED                    [ 50%]\n"
         "t/a.py::test_plain FAILED [100%]\nFAILED t/a.py::test_plain - assert 0\n"
         "t/b.py::test_x SKIPPED (needs a CUDA GPU)        [100%]\n")
  assert gpu_shards.outcomes(log) == {"t/a.py::test_out[c1-s]": "PASSED",
                                      "t/a.py::test_plain": "FAILED",
                                      "t/b.py::test_x": "SKIPPED"}


def test_gpu_shards_runs_a_selection_in_processes_and_resumes_what_passed(tmp_path,
                                                                           monkeypatch):
  from experiments import gpu_shards

  (tmp_path / "test_demo.py").write_text(
      "import pytest\n"
      "@pytest.mark.parametrize('case', ['a', 'b', 'c'])\n"
      "def test_one(case):\n  assert case in 'abc'\n"
      "@pytest.mark.parametrize('case', ['a', 'b', 'c'])\n"
      "def test_two(case):\n  assert case != 'c'\n")
  monkeypatch.chdir(tmp_path)
  logs = tmp_path / "logs"
  assert gpu_shards.main(["--processes", "2", "--logs", str(logs), "--", "test_demo.py"]) == 1
  results = dict(line.split() for line in (logs / "results.txt").read_text().splitlines())
  assert len(results) == 6 and results.pop("test_demo.py::test_two[c]") == "FAILED"
  assert set(results.values()) == {"PASSED"}
  assert sorted(p.name for p in logs.iterdir()) == ["results.txt", "shard_0.log",
                                                    "shard_1.log"]
  # Resuming: only the failed test runs again.
  (tmp_path / "done.txt").write_text((logs / "results.txt").read_text())
  assert gpu_shards.main(["--processes", "2", "--logs", str(tmp_path / "again"), "--done",
                          str(tmp_path / "done.txt"), "--", "test_demo.py"]) == 1
  assert (tmp_path / "again" / "results.txt").read_text() == "test_demo.py::test_two[c] FAILED\n"


def test_kernel_fingerprints_tell_kernels_apart_and_report_tiles_that_do_not_fit():
  from experiments import kernel_fingerprints
  import test_mosaic_backward

  serial = kernel_fingerprints.forward_lowering("serial")
  first = kernel_fingerprints.fingerprint(serial)
  assert len(first) == 12 and int(first, 16) >= 0
  assert kernel_fingerprints.fingerprint(serial) == first  # the same program, the same hash
  assert kernel_fingerprints.fingerprint(kernel_fingerprints.forward_lowering("pingpong")) != first
  too_big = next(c for c in test_mosaic_backward.LOWER_CASES if c.name == "three-stages")
  assert kernel_fingerprints.fingerprint(
      lambda: test_mosaic_backward._lower(too_big, "dkdv", "persistent")) == "error ValueError"
