"""Benchmark jpack's general masks (issue 5) against cuDNN with the dense mask and FlexAttention.

Rows (main shape B=4, T=8192, H=16, D=128, bf16, non-causal unless the rule is):
  graph          dense [B, T, T] adjacency of random clustered graphs
                 (``layouts.clustered_graph_mask``: ~10% of 64x64 tiles non-empty,
                 ragged inside), one document per row
  random-10%     dense [B, 1, T, T], each pair allowed with probability 0.1: no tile
                 is empty (the worst case for tile skipping)
  prefix-lm      rule ``prefix_lm(--prefix)`` on packed rows (lognormal documents,
                 mean --mean-doc-len), bidirectional over each document's prefix
  sliding-window rule ``causal() & sliding_window(--window)``, one document per row
  (``--rows`` picks some)

Peers (``--peers``):
  jpack          flash_attention(plan=make_attention_plan(...)): the plan (tile lists,
                 and the int8 copy of a dense mask) is made once per batch, outside the
                 timed call, as a model reuses it across layers; its time is in the note
  jpack_builtin  sliding-window row only: causal=True, sliding_window=W (range plan)
  cudnn_dense    jax.nn.dot_product_attention(implementation="cudnn") with the dense
                 [B, 1, T, T] mask (a rule's mask materialised once, outside the timing)
  torch_flex     FlexAttention, mask_mod = document mask & the same mask or rule
                 (``torch_peers.py``, subprocess; BlockMask built once, not timed)
  reference      jpack.reference_attention (float32; runs out of memory at the main shape)

Off GPU (``--smoke``: B=1, T=256, H=2, D=64) jpack runs its Pallas kernels in the
interpreter, so the whole path runs on CPU; GPU-only peers are skipped with a reason.

Check: before timing, each peer's output and gradients are compared with the float32
reference on a small case (B=1, T=1024, H=2, same row kind at that size) over the
query rows that see at least one key; relative error above --tol marks it WRONG.
Timing as ``bench_attention.py`` (median of --reps samples of 10 back-to-back calls).
Useful TFLOP/s count the allowed pairs only (4 * D * H per pair forward, 3.5x that
forward+backward).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments import bench_attention as ba  # noqa: E402
from experiments.layouts import (  # noqa: E402
    FWD_BWD_FLOPS_FACTOR,
    clustered_graph_mask,
    packed_segment_ids,
    tile_density,
)
from jpack import mask_rules as mr  # noqa: E402
from jpack import masks  # noqa: E402
from jpack.attention import (  # noqa: E402
    KernelConfig,
    flash_attention,
    make_attention_plan,
    reference_attention,
)

ROWS = ("graph", "random-10%", "prefix-lm", "sliding-window")
PEERS = ("jpack", "jpack_builtin", "cudnn_dense", "torch_flex", "reference")
GPU_ONLY = ("cudnn_dense", "torch_flex")
DEFAULT_OUT_JSON = os.path.join(REPO_ROOT, "experiments", "results", "bench_masks.json")


# =========================================================================== problems


@dataclasses.dataclass
class MaskProblem:
    """One row at one size. segment_ids int32 [B, T]; dense bool [B, 1, T, T] or None;
    rule a MaskRule or None; torch_mask: spec["mask"] for torch_peers.py."""

    row: str
    segment_ids: np.ndarray
    heads: int
    head_dim: int
    dense: np.ndarray | None = None
    rule: mr.MaskRule | None = None
    torch_mask: dict | None = None
    window: int | None = None  # the window of the sliding-window row (jpack_builtin)

    @property
    def batch(self) -> int:
        return int(self.segment_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.segment_ids.shape[1])

    @property
    def scale(self) -> float:
        return 1.0 / float(np.sqrt(self.head_dim))

    def mask_arg(self):
        """The mask= of flash_attention: the dense array or the rule."""
        return self.rule if self.dense is None else jnp.asarray(self.dense)


def make_problem(row: str, batch: int, seq_len: int, heads: int, head_dim: int, args,
                 seed: int) -> MaskProblem:
    """Row ``row`` at this size; cluster sizes scale with T (graph), so the tile density
    stays about the same."""
    ones = np.ones((batch, seq_len), np.int32)
    if row == "graph":
        dense = clustered_graph_mask(batch, seq_len, seed=seed,
                                     mean_cluster=max(4.0, 160 * seq_len / 8192))[:, None]
        return MaskProblem(row, ones, heads, head_dim, dense=dense,
                           torch_mask={"kind": "dense"})
    if row == "random-10%":
        rng = np.random.default_rng(seed)
        dense = np.stack([rng.random((seq_len, seq_len), dtype=np.float32) < 0.1
                          for _ in range(batch)])[:, None]
        return MaskProblem(row, ones, heads, head_dim, dense=dense,
                           torch_mask={"kind": "dense"})
    if row == "prefix-lm":
        mean = min(args.mean_doc_len, seq_len / 4)
        seg = packed_segment_ids(batch, seq_len, seed=seed, mean_len=mean)
        prefix = max(1, int(args.prefix * mean / args.mean_doc_len))
        return MaskProblem(row, seg, heads, head_dim, rule=mr.prefix_lm(prefix),
                           torch_mask={"kind": "prefix_lm", "prefix": prefix})
    if row == "sliding-window":
        window = max(1, args.window * seq_len // args.seq_len)
        return MaskProblem(row, ones, heads, head_dim,
                           rule=mr.causal() & mr.sliding_window(window),
                           torch_mask={"kind": "causal_window", "window": window},
                           window=window)
    raise ValueError(row)


def allowed_mask(problem: MaskProblem) -> jax.Array:
    """bool [B, 1, T, T]: the whole mask (segment ids AND the general mask), on device."""
    seg = jnp.asarray(problem.segment_ids)
    pos = jnp.broadcast_to(jnp.arange(problem.seq_len, dtype=jnp.int32), seg.shape)
    rule = problem.rule
    starts = mr.document_starts(seg, pos) if rule is not None and rule.needs_doc_start else None

    @jax.jit
    def f(seg, pos, dense, starts):
        return masks.general_allowed(seg, seg, pos, pos, causal=False, sliding_window=None,
                                     dense=dense, rule=rule, kv_doc_starts=starts)

    dense = None if problem.dense is None else jnp.asarray(problem.dense)
    return f(seg, pos, dense, starts)


def useful_fwd_flops(allowed: jax.Array, problem: MaskProblem) -> float:
    """4 * D * H per allowed pair."""
    pairs = float(jnp.sum(allowed, dtype=jnp.float32))
    return 4.0 * problem.head_dim * problem.heads * pairs


# =========================================================================== peers
# A builder takes (problem, allowed) and returns (attend, extra, note):
# attend(q, k, v, *extra) -> out [B, T, H, D], as in bench_attention.


def build_jpack(problem: MaskProblem, allowed, args):
    """flash_attention with a plan made once (timed separately)."""
    kernel = (dict(implementation="pallas") if ba.on_gpu() else
              dict(implementation="pallas", interpret=True))
    shape = jax.ShapeDtypeStruct((problem.batch, problem.seq_len, problem.heads,
                                  problem.head_dim), jnp.bfloat16)
    config = None if ba.on_gpu() else KernelConfig.uniform(16)

    def plan_of(seg, mask):
        return make_attention_plan(shape, shape, segment_ids=seg, mask=mask, causal=False,
                                   config=config)

    seg = jnp.asarray(problem.segment_ids)
    if problem.dense is not None:
        planner = jax.jit(plan_of)
        plan_args = (seg, jnp.asarray(problem.dense))
    else:
        planner = jax.jit(lambda seg: plan_of(seg, problem.rule))
        plan_args = (seg,)
    plan = planner(*plan_args)
    plan_ms = ba.median_ms(planner, plan_args, args.warmup, args.reps)

    def attend(q, k, v, plan):
        return flash_attention(q, k, v, plan=plan, causal=False, scale=problem.scale,
                               **kernel)

    mode = "interpreted" if not ba.on_gpu() else "pallas"
    return attend, (plan,), f"{mode}; plan {plan_ms:.3f} ms once per batch, not timed"


def build_jpack_builtin(problem: MaskProblem, allowed, args):
    """The sliding-window row through causal=True, sliding_window=W (document-mask path)."""
    if problem.window is None:
        raise RuntimeError("unavailable: only the sliding-window row has a builtin form")
    kernel = (dict(implementation="pallas") if ba.on_gpu() else
              dict(implementation="pallas", interpret=True, config=KernelConfig.uniform(16)))

    def attend(q, k, v, seg):
        return flash_attention(q, k, v, segment_ids=seg, causal=True,
                               sliding_window=problem.window, scale=problem.scale, **kernel)

    return attend, (jnp.asarray(problem.segment_ids),), "range plan, made in the call"


def build_cudnn_dense(problem: MaskProblem, allowed, args):
    """cuDNN with the whole mask as a dense [B, 1, T, T] argument."""

    def attend(q, k, v, mask):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=problem.scale,
                                            implementation="cudnn")

    return attend, (allowed,), "dense mask [B,1,T,T] passed in"


def build_reference(problem: MaskProblem, allowed, args):
    """reference_attention (float32) with the dense mask or the rule."""

    def attend(q, k, v, seg, *dense):
        return reference_attention(q, k, v, segment_ids=seg, causal=False, scale=problem.scale,
                                   mask=dense[0] if dense else problem.rule)

    extra = (jnp.asarray(problem.segment_ids),)
    if problem.dense is not None:
        extra += (jnp.asarray(problem.dense),)
    return attend, extra, "float32, dense logits"


BUILDERS: dict[str, Callable] = {
    "jpack": build_jpack,
    "jpack_builtin": build_jpack_builtin,
    "cudnn_dense": build_cudnn_dense,
    "reference": build_reference,
}


# =========================================================================== correctness


@dataclasses.dataclass
class Check:
    """The small case: inputs, the float32 oracle, and the rows that see something."""

    problem: MaskProblem
    inputs: ba.Inputs
    oracle: ba.Oracle
    allowed: jax.Array


def make_check(row: str, args) -> Check:
    problem = make_problem(row, 1, args.check_seq_len, args.check_heads, args.head_dim, args,
                           seed=args.seed + 1)
    allowed = allowed_mask(problem)
    inputs = random_inputs(problem, args.seed + 1)
    attend, extra, _ = build_reference(problem, allowed, args)
    f32 = [x.astype(jnp.float32) for x in (inputs.q, inputs.k, inputs.v, inputs.cot)]
    out = ba.forward_fn(attend)(*f32[:3], *extra)
    dq, dk, dv = ba.forward_backward_fn(attend)(*f32, *extra)
    as_np = lambda x: np.asarray(x, np.float32)  # noqa: E731
    seen = np.asarray(allowed).any(axis=(1, 3))  # [B, T]: rows that see a key
    return Check(problem, inputs, ba.Oracle(as_np(out), as_np(dq), as_np(dk), as_np(dv), seen),
                 allowed)


def random_inputs(problem: MaskProblem, seed: int) -> ba.Inputs:
    kq, kk, kv, kc = jax.random.split(jax.random.key(seed), 4)
    shape = (problem.batch, problem.seq_len, problem.heads, problem.head_dim)
    q, k, v, cot = (jax.random.normal(key, shape, jnp.bfloat16) for key in (kq, kk, kv, kc))
    return ba.Inputs(q, k, v, cot, jnp.asarray(problem.segment_ids))


# =========================================================================== running


def run_jax_peer(name: str, check: Check, main: MaskProblem, main_allowed, main_inputs,
                 args) -> ba.PeerResult:
    result = ba.PeerResult(name)
    builder = BUILDERS[name]
    try:
        attend, extra, _ = builder(check.problem, check.allowed, args)
        ci = check.inputs
        out = ba.forward_fn(attend)(ci.q, ci.k, ci.v, *extra)
        grads = ba.forward_backward_fn(attend)(ci.q, ci.k, ci.v, ci.cot, *extra)
        result.out_err, result.grad_err = ba.output_errors(check.oracle, out, *grads)
    except Exception as exc:  # noqa: BLE001 - a failing peer is a result
        message = ba.short_error(exc)
        result.status = message.split(": ", 1)[1] if "unavailable" in message else (
            f"error (check): {message}")
        return result
    ba.mark_correctness(result, args.tol)
    try:
        attend, extra, note = builder(main, main_allowed, args)
    except Exception as exc:  # noqa: BLE001
        result.status = f"error: {ba.short_error(exc)}"
        return result
    result.add_note(note)
    mi = main_inputs
    result.fwd_ms, fwd_error = ba.try_median_ms(ba.forward_fn(attend), (mi.q, mi.k, mi.v, *extra),
                                                args)
    result.fwd_bwd_ms, bwd_error = ba.try_median_ms(
        ba.forward_backward_fn(attend), (mi.q, mi.k, mi.v, mi.cot, *extra), args)
    for label, error in (("fwd", fwd_error), ("fwd+bwd", bwd_error)):
        if error:
            result.add_note(f"{label} failed: {error}")
    return result


def run_torch_flex(check: Check, main: MaskProblem, args) -> ba.PeerResult:
    """torch_peers.py in a subprocess with the row's mask; its check outputs judged here."""
    script = os.path.join(REPO_ROOT, "experiments", "torch_peers.py")
    with tempfile.TemporaryDirectory(prefix="jpack_masks_torch_") as workdir:
        spec = {"peers": ["torch_flex"], "heads": main.heads, "kv_heads": main.heads,
                "head_dim": main.head_dim, "causal": False, "scale": main.scale,
                "warmup": args.warmup, "reps": args.reps, "seed": args.seed,
                "mask": main.torch_mask, "check_mask": check.problem.torch_mask}
        with open(os.path.join(workdir, "spec.json"), "w") as f:
            json.dump(spec, f)
        np.save(os.path.join(workdir, "main_segment_ids.npy"), main.segment_ids)
        ci = check.inputs
        as_np = lambda x: np.asarray(x, np.float32)  # noqa: E731
        extra = {}
        if main.dense is not None:
            np.save(os.path.join(workdir, "main_mask.npy"), main.dense[:, 0])
            extra["mask"] = check.problem.dense[:, 0]
        np.savez(os.path.join(workdir, "check.npz"), q=as_np(ci.q), k=as_np(ci.k),
                 v=as_np(ci.v), cot=as_np(ci.cot), segment_ids=check.problem.segment_ids,
                 **extra)
        try:
            subprocess.run([sys.executable, script, "--workdir", workdir], capture_output=True,
                           text=True, timeout=args.torch_timeout)
        except subprocess.TimeoutExpired:
            return ba.PeerResult("torch_flex", status="error: torch subprocess timed out")
        path = os.path.join(workdir, "torch_results.json")
        if not os.path.exists(path):
            return ba.PeerResult("torch_flex", status="error: torch subprocess wrote no result")
        with open(path) as f:
            raw = json.load(f)["peers"].get("torch_flex", {})
        return ba.torch_result("torch_flex", raw, workdir, check.oracle, args.tol)


def run_row(row: str, args) -> dict:
    main = make_problem(row, args.batch, args.seq_len, args.heads, args.head_dim, args,
                        seed=args.seed)
    check = make_check(row, args)
    main_allowed = allowed_mask(main)
    flops = useful_fwd_flops(main_allowed, main)
    density = tile_density(np.asarray(main_allowed), 64) if main.seq_len % 64 == 0 else None
    print(f"[{row}] useful fwd {flops / 1e12:.3f} TFLOP, 64x64 tiles non-empty: "
          f"{density if density is None else f'{100 * density:.1f}%'}", flush=True)
    results = {}
    for name in args.peers:
        reason = None
        if name in GPU_ONLY and not ba.on_gpu():
            reason = f"unavailable: needs a CUDA GPU (platform is {jax.devices()[0].platform})"
        if name == "jpack_builtin" and main.window is None:
            continue
        if reason:
            results[name] = ba.PeerResult(name, status=reason)
        elif name == "torch_flex":
            print(f"  [torch] {name} ...", flush=True)
            results[name] = run_torch_flex(check, main, args)
    main_inputs = random_inputs(main, args.seed)
    for name in args.peers:
        if name in results or (name == "jpack_builtin" and main.window is None):
            continue
        print(f"  [jax] {name} ...", flush=True)
        results[name] = run_jax_peer(name, check, main, main_allowed, main_inputs, args)
    ordered = [results[n] for n in args.peers if n in results]
    ba.fill_throughput(ordered, flops)
    cudnn = results.get("cudnn_dense")
    return {"row": row, "useful_fwd_flops": flops, "tile_density_64": density,
            "mask": main.torch_mask, "results": ordered,
            "jpack_speedup_vs_cudnn": speedups(results.get("jpack"), cudnn)}


def speedups(jpack, cudnn) -> dict | None:
    """cuDNN time / jpack time, forward and forward+backward (the issue's target: >= 3)."""
    if jpack is None or cudnn is None:
        return None
    ratio = lambda a, b: b / a if a and b else None  # noqa: E731
    return {"fwd": ratio(jpack.fwd_ms, cudnn.fwd_ms),
            "fwd_bwd": ratio(jpack.fwd_bwd_ms, cudnn.fwd_bwd_ms)}


# =========================================================================== CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--rows", default=",".join(ROWS), help="comma list of " + ",".join(ROWS).replace("%", "%%"))
    p.add_argument("--peers", default="jpack,jpack_builtin,cudnn_dense,torch_flex",
                   help=f"comma list of {','.join(PEERS)}")
    p.add_argument("--mean-doc-len", type=float, default=1024.0, help="prefix-lm row documents")
    p.add_argument("--prefix", type=int, default=256, help="prefix-lm row: prefix length")
    p.add_argument("--window", type=int, default=1024, help="sliding-window row: window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--tol", type=float, default=2e-2)
    p.add_argument("--check-seq-len", type=int, default=1024)
    p.add_argument("--check-heads", type=int, default=2)
    p.add_argument("--torch-timeout", type=float, default=1800.0)
    p.add_argument("--smoke", action="store_true",
                   help="B=1, T=256, H=2, D=64, check T=128, 1 warmup, 2 reps; CPU ok")
    p.add_argument("--out-json", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.seq_len, args.heads, args.head_dim = 1, 256, 2, 64
        args.check_seq_len, args.warmup, args.reps = 128, 1, 2
    args.rows = [r for r in args.rows.split(",") if r]
    args.peers = [x for x in args.peers.split(",") if x]
    for r in args.rows:
        if r not in ROWS:
            p.error(f"unknown row {r!r}; choose from {','.join(ROWS)}")
    for x in args.peers:
        if x not in PEERS:
            p.error(f"unknown peer {x!r}; choose from {','.join(PEERS)}")
    if args.out_json is None:
        args.out_json = DEFAULT_OUT_JSON.replace(".json", "_smoke.json" if args.smoke else ".json")
    return args


def markdown(rows: list[dict]) -> str:
    lines = ["| row | peer | status | out err | grad err | fwd ms | fwd+bwd ms | fwd TFLOP/s "
             "| fwd+bwd TFLOP/s | note |", "|" + "---|" * 10]
    for r in rows:
        for x in r["results"]:
            lines.append(
                f"| {r['row']} | {x.name} | {x.status} | {ba.fmt(x.out_err, '.1e')} "
                f"| {ba.fmt(x.grad_err, '.1e')} | {ba.fmt(x.fwd_ms, '.3f')} "
                f"| {ba.fmt(x.fwd_bwd_ms, '.3f')} | {ba.fmt(x.fwd_tflops, '.3g')} "
                f"| {ba.fmt(x.fwd_bwd_tflops, '.3g')} | {x.note} |")
    speed = [f"{r['row']}: fwd {ba.fmt(s['fwd'])}x, fwd+bwd {ba.fmt(s['fwd_bwd'])}x"
             for r in rows if (s := r["jpack_speedup_vs_cudnn"]) and any(s.values())]
    if speed:
        lines.append("\njpack vs cuDNN dense mask (cuDNN ms / jpack ms): " + "; ".join(speed))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}; "
          f"B={args.batch} T={args.seq_len} H={args.heads} D={args.head_dim} bf16", flush=True)
    rows = [run_row(row, args) for row in args.rows]
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.device_kind, "platform": device.platform,
        "jax_version": jax.__version__, "torch_version": ba.torch_version_without_import(),
        "shape": {"batch": args.batch, "seq_len": args.seq_len, "heads": args.heads,
                  "head_dim": args.head_dim, "dtype": "bfloat16"},
        "options": {"prefix": args.prefix, "window": args.window,
                    "mean_doc_len": args.mean_doc_len, "seed": args.seed},
        "timing": {"warmup": args.warmup, "reps": args.reps, "statistic": "median"},
        "fwd_bwd_flops_factor": FWD_BWD_FLOPS_FACTOR,
        "rows": [dict(r, results=[dataclasses.asdict(x) for x in r["results"]]) for r in rows],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out_json)), exist_ok=True)
    with open(args.out_json, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out_json}\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
