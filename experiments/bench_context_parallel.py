"""Benchmark context-parallel attention (jpack.parallel) against one GPU.

One row (B=1) of T tokens, H=16, D=128, bf16, causal, split over n GPUs of one
host along the sequence. For each T, layout and n:

  layouts   long      one document of T tokens
            packed8k  T / 8192 documents of 8192 tokens
            lognormal8k  (optional) lognormal lengths, mean 8192
                      (experiments.layouts.packed_segment_ids), crossing shards
  n = 1     jpack.attention.flash_attention on one GPU (the baseline)
  n > 1     context_parallel_attention, strategy ring and all_gather, tokens in
            row order ("contiguous") and zigzag-balanced ("balanced";
            --zigzag-rounds chunks the row finer)

Timed: jitted forward + backward (jax.vjp of the attention, cotangent given),
median of --reps runs after --warmup. Speed-up = baseline time / time. Each
context-parallel run is also checked against the baseline: relative error
||a - b|| / ||b|| of dq, dk, dv (max of the three). Imbalance: per-device
attention FLOPs max / mean (`jpack.parallel.flop_imbalance`, exact pair
counts); "ring" is the sum over ring steps of the busiest device's work over
the mean per-device work (the ring waits for the slowest device every step).

Results go to --out-json after every row, so a run cut short keeps what it
measured; a markdown table is printed at the end.

--smoke runs a tiny version on CPU with 8 fake host devices
(implementation="xla", float32), to check that the script works.
--imbalance-only prints the imbalance table without running attention.
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # must happen before JAX starts
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import traceback  # noqa: E402

import numpy as np  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from experiments import timing  # noqa: E402
from experiments.layouts import (FWD_BWD_FLOPS_FACTOR, causal_doc_flops,  # noqa: E402
                                 packed_segment_ids)
from jpack import parallel  # noqa: E402
from jpack.attention import flash_attention  # noqa: E402

LAYOUTS = ("long", "packed8k", "lognormal8k")
DEFAULT_OUT = os.path.join(REPO_ROOT, "experiments", "results", "bench_context_parallel.json")
SMOKE_OUT = os.path.join(REPO_ROOT, "experiments", "results", "bench_context_parallel_smoke.json")
WRONG_ABOVE = {"bfloat16": 5e-2, "float32": 1e-4}


# =========================================================================== layouts


def segment_ids(layout: str, seq_len: int, doc_len: int, seed: int = 0) -> np.ndarray:
    """int32 [1, T] segment ids of one benchmark row."""
    if layout == "long":
        return np.ones((1, seq_len), np.int32)
    if layout == "packed8k":
        if seq_len % doc_len:
            raise ValueError(f"T={seq_len} is not a multiple of the document length {doc_len}")
        return np.repeat(np.arange(1, seq_len // doc_len + 1, dtype=np.int32), doc_len)[None]
    if layout == "lognormal8k":
        return packed_segment_ids(1, seq_len, seed=seed, mean_len=doc_len)
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def imbalance(seg: np.ndarray, n: int, balanced: bool, rounds: int) -> dict:
    """flop_imbalance of the row as the n devices hold it."""
    pos = np.arange(seg.shape[1], dtype=np.int32)[None]
    if balanced:
        seg, pos = (parallel.load_balance(x, n, rounds=rounds) for x in (seg, pos))
    result = parallel.flop_imbalance(seg, pos, num_shards=n, causal=True)
    return dict(device=result["device"], ring=result["ring"])


# =========================================================================== timing


@dataclasses.dataclass
class Row:
    layout: str
    seq_len: int
    devices: int
    strategy: str  # "single" for the one-device baseline
    balanced: bool
    ms: float | None = None
    speedup: float | None = None
    tflops_per_device: float | None = None
    imbalance: float | None = None
    ring_imbalance: float | None = None
    rel_err: float | None = None
    error: str | None = None


def fwd_bwd(attend):
    """Jitted (q, k, v, do, seg, pos) -> (dq, dk, dv) of attend(q, k, v, seg, pos)."""
    def run(q, k, v, do, seg, pos):
        _, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, seg, pos), q, k, v)
        return vjp(do)
    return jax.jit(run)


def single_device_step(args):
    return fwd_bwd(lambda q, k, v, seg, pos: flash_attention(
        q, k, v, segment_ids=seg, causal=True, implementation=args.implementation))


def context_parallel_step(args, mesh, strategy):
    return fwd_bwd(lambda q, k, v, seg, pos: parallel.context_parallel_attention(
        q, k, v, mesh=mesh, segment_ids=seg, positions=pos, strategy=strategy,
        causal=True, implementation=args.implementation))


@jax.jit
def _rel_err(a, b):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.linalg.norm(a - b) / jnp.linalg.norm(b)


def max_rel_err(got, want, n, balanced, rounds):
    """Max over dq, dk, dv of the relative error against the baseline, on its device."""
    errs = []
    for g, w in zip(got, want):
        g = jax.device_put(g, w.sharding)
        if balanced:
            g = jax.jit(lambda x: parallel.restore_order(x, n, rounds=rounds))(g)
        errs.append(float(_rel_err(g, w)))
    return max(errs)


def inputs(args, seq_len):
    """q, k, v, do on the first device, standard normal in args.dtype."""
    keys = jax.random.split(jax.random.key(args.seed), 4)
    dtype = jnp.dtype(args.dtype)
    q_shape = (1, seq_len, args.heads, args.head_dim)
    kv_shape = (1, seq_len, args.kv_heads, args.head_dim)
    make = jax.jit(lambda key, shape: jax.random.normal(key, shape, jnp.float32).astype(dtype),
                   static_argnums=1)
    return (make(keys[0], q_shape), make(keys[1], kv_shape), make(keys[2], kv_shape),
            make(keys[3], q_shape))


def place(x, mesh, n, balanced, rounds):
    """x [1, T, ...] on the mesh, sharded along T (zigzag order if balanced)."""
    sharding = NamedSharding(mesh, P(None, "context"))
    if balanced:
        return jax.jit(lambda x: parallel.load_balance(x, n, rounds=rounds),
                       out_shardings=sharding)(x)
    return jax.device_put(x, sharding)


def bench_one_seq_len(args, seq_len, layout, record):
    devices = jax.devices()
    seg_np = segment_ids(layout, seq_len, args.doc_len, args.seed)
    useful = causal_doc_flops(seg_np, args.heads, args.head_dim) * FWD_BWD_FLOPS_FACTOR
    q, k, v, do = inputs(args, seq_len)
    seg = jnp.asarray(seg_np)
    pos = jnp.arange(seq_len, dtype=jnp.int32)[None]
    base_ms, base_grads = None, None

    def finish(row, ms):
        row.ms = ms
        row.tflops_per_device = useful / (ms * 1e-3) / row.devices / 1e12
        if base_ms is not None:
            row.speedup = base_ms / ms

    if 1 in args.devices:
        row = Row(layout, seq_len, 1, "single", False, imbalance=1.0, ring_imbalance=1.0)
        try:
            step = single_device_step(args)
            base_ms = timing.median_ms(step, q, k, v, do, seg, pos, warmup=args.warmup,
                                       reps=args.reps, calls=1)
            if args.check:
                base_grads = step(q, k, v, do, seg, pos)
            finish(row, base_ms)
        except Exception as exc:  # noqa: BLE001 - keep going, record the failure
            row.error = short_error(exc)
        record(row)

    for n in (n for n in args.devices if n > 1):
        if n > len(devices):
            print(f"skipping n={n}: only {len(devices)} devices", flush=True)
            continue
        mesh = Mesh(np.array(devices[:n]), ("context",))
        for balanced in args.balance:
            imb = imbalance(seg_np, n, balanced, args.zigzag_rounds)
            placed = None
            for strategy in args.strategies:
                row = Row(layout, seq_len, n, strategy, balanced, imbalance=imb["device"],
                          ring_imbalance=imb["ring"])
                try:
                    if placed is None:
                        placed = [place(x, mesh, n, balanced, args.zigzag_rounds)
                                  for x in (q, k, v, do, seg, pos)]
                    step = context_parallel_step(args, mesh, strategy)
                    ms = timing.median_ms(step, *placed, warmup=args.warmup, reps=args.reps,
                                          calls=1)
                    finish(row, ms)
                    if base_grads is not None:
                        row.rel_err = max_rel_err(step(*placed), base_grads, n, balanced,
                                                  args.zigzag_rounds)
                except Exception as exc:  # noqa: BLE001
                    row.error = short_error(exc)
                record(row)
            del placed


def short_error(exc: BaseException) -> str:
    lines = traceback.format_exception_only(type(exc), exc)
    return " ".join(" ".join(lines).split())[:400]


# =========================================================================== report


def fmt(x, spec):
    return "—" if x is None else format(x, spec)


def markdown_table(rows: list[Row], wrong_above: float) -> str:
    head = ("| layout | T | GPUs | strategy | tokens | fwd+bwd ms | speed-up vs 1 GPU "
            "| TFLOP/s per GPU | imbalance max/mean | ring imbalance | rel err vs 1 GPU |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        err = fmt(r.rel_err, ".1e")
        if r.rel_err is not None and r.rel_err > wrong_above:
            err += " WRONG"
        tokens = "—" if r.devices == 1 else ("balanced" if r.balanced else "contiguous")
        ms = f"error: {r.error}" if r.error else fmt(r.ms, ".1f")
        lines.append(
            f"| {r.layout} | {r.seq_len} | {r.devices} | {r.strategy} | {tokens} | {ms} "
            f"| {fmt(r.speedup, '.2f')} | {fmt(r.tflops_per_device, '.0f')} "
            f"| {fmt(r.imbalance, '.3f')} | {fmt(r.ring_imbalance, '.3f')} | {err} |")
    return "\n".join(lines)


def imbalance_table(args) -> str:
    lines = ["| layout | T | GPUs | imbalance contiguous | imbalance balanced "
             "| ring contiguous | ring balanced |", "|---|---|---|---|---|---|---|"]
    for seq_len in args.seq_lens:
        for layout in args.layouts:
            seg = segment_ids(layout, seq_len, args.doc_len, args.seed)
            for n in (n for n in args.devices if n > 1):
                c = imbalance(seg, n, False, 1)
                b = imbalance(seg, n, True, args.zigzag_rounds)
                lines.append(f"| {layout} | {seq_len} | {n} | {c['device']:.3f} | "
                             f"{b['device']:.3f} | {c['ring']:.3f} | {b['ring']:.3f} |")
    return "\n".join(lines)


# =========================================================================== main


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int_list, default=[131072, 262144, 524288],
                   help="comma list of row lengths T (default 131072,262144,524288)")
    p.add_argument("--devices", type=int_list, default=[1, 2, 4],
                   help="comma list of GPU counts n, run in this order; 1 is the baseline "
                        "and must come first for speed-ups (default 1,2,4)")
    p.add_argument("--layouts", default="long,packed8k",
                   help=f"comma list of {', '.join(LAYOUTS)} (default long,packed8k)")
    p.add_argument("--doc-len", type=int, default=8192, help="document length of packed8k")
    p.add_argument("--strategies", default="ring,all_gather", help="comma list")
    p.add_argument("--balance", choices=["both", "on", "off"], default="both",
                   help="zigzag load balancing: both (default), on or off")
    p.add_argument("--zigzag-rounds", type=int, default=1,
                   help="rounds of 2n chunks in the balanced order (jpack.parallel.zigzag_order)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--implementation", choices=["auto", "pallas", "mosaic", "xla"],
                   default="auto", help="attention inside each device (as flash_attention's)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs (the first compiles)")
    p.add_argument("--reps", type=int, default=3, help="timed runs; the median is reported")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip comparing gradients with the one-GPU baseline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-json", default=None, help=f"default {DEFAULT_OUT}")
    p.add_argument("--imbalance-only", action="store_true",
                   help="print the imbalance table and exit (no attention runs)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny CPU run on 8 fake host devices (T=512,1024, H=2, D=16, "
                        "float32, xla, doc length 64)")
    args = p.parse_args(argv)
    args.layouts = [x for x in args.layouts.split(",") if x]
    args.strategies = [x for x in args.strategies.split(",") if x]
    for layout in args.layouts:
        if layout not in LAYOUTS:
            p.error(f"--layouts: unknown layout {layout!r}")
    for strategy in args.strategies:
        if strategy not in parallel.STRATEGIES:
            p.error(f"--strategies: unknown strategy {strategy!r}")
    if args.smoke:
        args.seq_lens, args.devices, args.heads, args.kv_heads = [512, 1024], [1, 2, 4], 2, 1
        args.head_dim, args.dtype, args.doc_len = 16, "float32", 64
        args.implementation, args.warmup, args.reps = "xla", 1, 1
    args.kv_heads = args.kv_heads or args.heads
    args.balance = {"both": [False, True], "on": [True], "off": [False]}[args.balance]
    args.out_json = args.out_json or (SMOKE_OUT if args.smoke else DEFAULT_OUT)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.imbalance_only:
        print(imbalance_table(args))
        return 0
    device = jax.devices()[0]
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=f"{len(jax.devices())}x {device.device_kind}", platform=device.platform,
                jax_version=jax.__version__, heads=args.heads, kv_heads=args.kv_heads,
                head_dim=args.head_dim, dtype=args.dtype, causal=True, batch=1,
                implementation=args.implementation, warmup=args.warmup, reps=args.reps,
                zigzag_rounds=args.zigzag_rounds)
    rows: list[Row] = []
    os.makedirs(os.path.dirname(os.path.abspath(args.out_json)), exist_ok=True)

    def record(row: Row):
        rows.append(row)
        print(json.dumps(dataclasses.asdict(row)), flush=True)
        with open(args.out_json, "w") as f:
            json.dump(dict(meta, rows=[dataclasses.asdict(r) for r in rows]), f, indent=2)

    print(f"{meta['date']} {meta['device']}, jax {meta['jax_version']}: B=1, H={args.heads}, "
          f"Hkv={args.kv_heads}, D={args.head_dim}, {args.dtype}, causal", flush=True)
    for seq_len in args.seq_lens:
        for layout in args.layouts:
            bench_one_seq_len(args, seq_len, layout, record)
    print(f"wrote {args.out_json}\n")
    print(f"{meta['date']}, {meta['device']}, jax {meta['jax_version']}: one row, "
          f"H={args.heads}, Hkv={args.kv_heads}, D={args.head_dim}, {args.dtype}, causal\n")
    print(markdown_table(rows, WRONG_ABOVE[args.dtype]))
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
