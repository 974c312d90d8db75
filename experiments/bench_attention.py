"""Benchmark jpack's packed (document-masked) attention against its peers, side by side.

Problem: rows packed full with documents of lognormal lengths (``layouts.packed_segment_ids``:
mean ~1024 tokens, at least 16), bf16 inputs from ``jax.random``, document-causal mask
(token i attends to j iff seg[i] == seg[j] != 0 and j <= i).

Shapes:
  main     B=4, T=8192, H=16, D=128, bf16, causal (``--gqa``: kv heads = H/4)
  --long   one row (B=1) of T in 16384, 32768, 65536, 131072, jpack forward+backward
           only (``--long-peers`` adds others), each T in a fresh subprocess so that
           ``peak_bytes_in_use`` is per T
  --smoke  B=1, T=256, H=2, D=64, few reps; runs on CPU (jpack with
           implementation="xla"; GPU-only peers are skipped with a reason)
  check    before timing, every peer's output and gradients are compared with the
           float32 reference on a small case (B=1, T=1024, H=2, D=128, same layout
           generator with mean document length T/4): relative error
           ||a - b|| / ||b|| over valid (non-padding) rows; > --tol marks the peer WRONG.

Peers (``--peers``, comma list):
  jpack          jpack.attention.flash_attention(implementation="auto"): what a user gets;
                 on an H100 the Mosaic GPU kernels, on other GPUs the Triton ones, "xla" off GPU
  jpack_triton   flash_attention(implementation="pallas"): the Triton kernels
  jpack_mosaic   flash_attention(implementation="mosaic"): the Mosaic GPU kernels (Hopper)
  jpack_planned  flash_attention(plan=make_attention_plan(...)), "auto": the plan made once
                 outside the timed call, as a model shares it across layers and as the
                 other peers get their layouts (the note gives the plan's own time); its
                 persistent work items are dealt to the CTAs by load (balance_by_load)
  reference      jpack.attention.reference_attention (float32 jnp oracle)
  cudnn_dense    jax.nn.dot_product_attention(implementation="cudnn") with a dense
                 [B, 1, T, T] boolean document-causal mask built inside the jitted call
  cudnn_packed   cuDNN sequence packing through jax._src.cudnn.fused_attention_stablehlo
                 (q/kv_seqlen [B, M], q/kv_offsets [B, M+1], -1 in unused slots)
  pallas_mha     jax.experimental.pallas.ops.gpu.attention.mha(segment_ids=..., causal=True)
                 (no padding notion; kv heads repeated under GQA)
  torch_flex     FlexAttention with a document-causal BlockMask (subprocess)
  torch_varlen   torch.nn.attention.varlen.varlen_attn (subprocess)

Timing: jitted forward, and jitted jax.grad of sum(out * cotangent) w.r.t. q, k, v;
``--warmup`` runs each, then ``--reps`` rounds of the forwards and then ``--reps``
rounds of the forward+backward calls; a round takes one sample of every JAX peer's
call, in an order rotated round by round, and a sample is the mean of 10 calls
dispatched back to back (``experiments/timing.py``), in ms. So the GPU's clock drifts
fall on all JAX peers alike, and the forwards do not run under the backward passes'
power draw (time_jax_peers). Reported: the median and the 10th
and 90th percentiles of the samples; ratios to jpack are the median (and percentiles)
of the per-round ratios. Torch peers run in their own process, before the JAX peers,
timed with CUDA events around 10 back-to-back calls (median of ``--reps``); their
ratios are ratios of medians. Useful TFLOP/s count only the document-causal work
(``layouts.causal_doc_flops``; fwd+bwd = 3.5x fwd).

Writes ``--out-json`` and a bar chart ``--out-png``; prints a markdown table last.
"""

from __future__ import annotations

import os

# JAX must not take the whole GPU: the torch peers run in a subprocess beside it, and
# peak_bytes_in_use should reflect what the program needs. Set before importing jax.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments import timing  # noqa: E402
from experiments.layouts import (  # noqa: E402
    FWD_BWD_FLOPS_FACTOR,
    causal_doc_flops,
    packed_segment_ids,
    segment_lengths,
    segment_runs,
)

JAX_PEERS = ("jpack", "jpack_planned", "jpack_triton", "jpack_mosaic", "reference", "cudnn_dense",
             "cudnn_packed", "pallas_mha")
TORCH_PEERS = ("torch_flex", "torch_varlen")
ALL_PEERS = JAX_PEERS + TORCH_PEERS
GPU_ONLY_PEERS = ("jpack_triton", "jpack_mosaic", "cudnn_dense", "cudnn_packed", "pallas_mha") + TORCH_PEERS
LONG_SEQ_LENS = (16384, 32768, 65536, 131072)
SMOKE_LONG_SEQ_LENS = (256, 512)
LONG_RESULT_TAG = "JPACK_LONG_RESULT "
DEFAULT_OUT_JSON = os.path.join(REPO_ROOT, "experiments", "results", "bench_attention.json")
DEFAULT_OUT_PNG = os.path.join(REPO_ROOT, "experiments", "results", "bench_attention.png")


# =========================================================================== problem


@dataclasses.dataclass(frozen=True)
class Problem:
    """One attention problem: a packed layout and the head shape applied to it.

    segment_ids: int32 [B, T] (numpy). q: [B, T, heads, head_dim]; k, v: [B, T, kv_heads, head_dim].
    """

    segment_ids: np.ndarray
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool = True

    @property
    def batch(self) -> int:
        return int(self.segment_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.segment_ids.shape[1])

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def fwd_flops(self) -> float:
        """Useful forward FLOPs (document-causal work only)."""
        return causal_doc_flops(self.segment_ids, self.heads, self.head_dim, causal=self.causal)

    def describe(self) -> dict:
        lengths = [n for row in self.segment_ids for n in segment_lengths(row)]
        return {
            "batch": self.batch, "seq_len": self.seq_len, "heads": self.heads,
            "kv_heads": self.kv_heads, "head_dim": self.head_dim, "causal": self.causal,
            "dtype": "bfloat16", "docs": len(lengths),
            "mean_doc_len": float(np.mean(lengths)) if lengths else 0.0,
            "max_doc_len": int(max(lengths)) if lengths else 0,
        }


@dataclasses.dataclass
class Inputs:
    """bf16 q [B, T, H, D], k/v [B, T, Hkv, D], cotangent [B, T, H, D]; int32 segment ids [B, T]."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    cot: jax.Array
    segment_ids: jax.Array


def random_inputs(problem: Problem, seed: int) -> Inputs:
    """Random normal bf16 inputs for ``problem`` (never zeros)."""
    kq, kk, kv, kc = jax.random.split(jax.random.key(seed), 4)
    b, t, d = problem.batch, problem.seq_len, problem.head_dim
    bf16 = jnp.bfloat16
    return Inputs(
        q=jax.random.normal(kq, (b, t, problem.heads, d), bf16),
        k=jax.random.normal(kk, (b, t, problem.kv_heads, d), bf16),
        v=jax.random.normal(kv, (b, t, problem.kv_heads, d), bf16),
        cot=jax.random.normal(kc, (b, t, problem.heads, d), bf16),
        segment_ids=jnp.asarray(problem.segment_ids, jnp.int32),
    )


# =========================================================================== peers
# A builder takes a Problem and returns (attend, extra, note): attend(q, k, v, *extra)
# -> out [B, T, H, D]; ``extra`` holds the peer's layout arrays (device arrays, passed
# as jit arguments so that the layout is data, not a compile-time constant).


def on_gpu() -> bool:
    return jax.devices()[0].platform == "gpu"


def build_jpack(problem: Problem, seg: jax.Array, implementation: str = "auto"):
    """jpack.attention.flash_attention with this implementation."""
    from jpack import attention

    def attend(q, k, v, segment_ids):
        return attention.flash_attention(q, k, v, segment_ids=segment_ids,
                                         causal=problem.causal, scale=problem.scale,
                                         implementation=implementation)

    note = f"implementation={implementation}"
    if implementation == "auto":  # say what "auto" ran
        q = jax.ShapeDtypeStruct((1, 1, problem.heads, problem.head_dim), jnp.bfloat16)
        note += f" (runs {attention._resolve_implementation('auto', q, None, None, None)!r})"
    return attend, (seg,), note


def build_jpack_planned(problem: Problem, seg: jax.Array):
    """flash_attention(plan=...), the plan made once outside the timed call.

    What a model does: one make_attention_plan per batch, reused by every layer. It is
    also how the other peers are timed: cuDNN's offsets, FlexAttention's BlockMask and
    varlen's cu_seqlens are all made outside their timed calls.
    """
    from jpack import attention

    shape = lambda heads: jax.ShapeDtypeStruct(  # noqa: E731
        (problem.batch, problem.seq_len, heads, problem.head_dim), jnp.bfloat16)
    make = jax.jit(lambda seg: attention.make_attention_plan(
        shape(problem.heads), shape(problem.kv_heads), segment_ids=seg,
        causal=problem.causal))
    plan = make(seg)
    plan_ms = timing.median_ms(make, seg)

    def attend(q, k, v, plan):
        return attention.flash_attention(q, k, v, plan=plan, causal=problem.causal,
                                         scale=problem.scale)

    return attend, (plan,), (f"plan for {plan.implementation!r} made once, not timed "
                             f"({plan_ms:.3f} ms as a jitted call of its own)")


def build_reference(problem: Problem, seg: jax.Array):
    """jpack.attention.reference_attention: float32 jnp, materialises [B, H, T, T]."""
    from jpack.attention import reference_attention

    def attend(q, k, v, segment_ids):
        return reference_attention(q, k, v, segment_ids=segment_ids, causal=problem.causal,
                                   scale=problem.scale)

    return attend, (seg,), "float32, dense logits"


def dense_document_mask(segment_ids: jax.Array, causal: bool) -> jax.Array:
    """segment_ids: int32 [B, T] -> bool [B, 1, T, T], True where query i may attend key j."""
    seg_q = segment_ids[:, :, None]
    seg_k = segment_ids[:, None, :]
    mask = (seg_q == seg_k) & (seg_q != 0)
    if causal:
        t = segment_ids.shape[1]
        mask = mask & jnp.tril(jnp.ones((t, t), bool))[None]
    return mask[:, None]


def build_cudnn_dense(problem: Problem, seg: jax.Array):
    """jax.nn.dot_product_attention(implementation="cudnn") with a dense document mask."""

    def attend(q, k, v, segment_ids):
        mask = dense_document_mask(segment_ids, problem.causal)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=problem.scale,
                                            is_causal=False, implementation="cudnn")

    return attend, (seg,), "mask [B,1,T,T] built in the jitted call"


def cudnn_packed_layout(segment_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Segment ids -> cuDNN sequence-packing arrays of jax's fused attention.

    For each row, its documents (runs of nonzero ids) in order: ``seqlen[b, i]`` the
    length of document i, ``offsets[b, i]`` its first token (relative to the row);
    unused slots are -1, and ``offsets`` has one slot more than ``seqlen`` (always -1
    here: the source shifts all non-negative entries of all rows to the left and fills
    the tail with B*T, which ends the last document). M is at least 2, because jax
    only takes the packed path when M > 1.

    segment_ids: int [B, T].
    Returns: (seqlen int32 [B, M], offsets int32 [B, M + 1]).
    """
    docs = [[(start, length) for sid, start, length in segment_runs(row) if sid != 0]
            for row in np.asarray(segment_ids)]
    max_docs = max(2, max(len(d) for d in docs))
    seqlen = np.full((len(docs), max_docs), -1, np.int32)
    offsets = np.full((len(docs), max_docs + 1), -1, np.int32)
    for b, row_docs in enumerate(docs):
        for i, (start, length) in enumerate(row_docs):
            seqlen[b, i] = length
            offsets[b, i] = start
    return seqlen, offsets


def build_cudnn_packed(problem: Problem, seg: jax.Array):
    """cuDNN flash attention with sequence packing (Hopper+, cuDNN >= 9.6)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa

    mask_type = cudnn_fa.MaskType.CAUSAL if problem.causal else cudnn_fa.MaskType.NO_MASK
    seqlen, offsets = (jnp.asarray(x) for x in cudnn_packed_layout(problem.segment_ids))

    def attend(q, k, v, seqlen, offsets):
        return cudnn_fa.dot_product_attention(
            q, k, v, q_seqlen=seqlen, kv_seqlen=seqlen, q_offsets=offsets, kv_offsets=offsets,
            scale=problem.scale, mask_type=mask_type, qkv_layout="BTNH")

    return attend, (seqlen, offsets), f"mask_type={mask_type.name}, {seqlen.shape[1]} doc slots/row"


def build_pallas_mha(problem: Problem, seg: jax.Array):
    """jax.experimental.pallas.ops.gpu.attention.mha with segment ids (id 0 is a segment too)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import attention as pallas_attention

    groups = problem.heads // problem.kv_heads

    def attend(q, k, v, segment_ids):
        if groups > 1:
            k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        return pallas_attention.mha(q, k, v, segment_ids, sm_scale=problem.scale,
                                    causal=problem.causal)

    note = "kv heads repeated (no GQA)" if groups > 1 else ""
    return attend, (seg,), note


JAX_BUILDERS: dict[str, Callable] = {
    "jpack": build_jpack,
    "jpack_triton": functools.partial(build_jpack, implementation="pallas"),
    "jpack_mosaic": functools.partial(build_jpack, implementation="mosaic"),
    "jpack_planned": build_jpack_planned,
    "reference": build_reference,
    "cudnn_dense": build_cudnn_dense,
    "cudnn_packed": build_cudnn_packed,
    "pallas_mha": build_pallas_mha,
}


def unavailable_reason(name: str) -> str | None:
    """Why peer ``name`` cannot run in this process/machine, or None."""
    if name in GPU_ONLY_PEERS and not on_gpu():
        return f"unavailable: needs a CUDA GPU (platform is {jax.devices()[0].platform})"
    if name in TORCH_PEERS and importlib.util.find_spec("torch") is None:
        return "unavailable: torch not importable"
    return None


# =========================================================================== jitted steps


def forward_fn(attend: Callable) -> Callable:
    """jit of attend(q, k, v, *extra) -> out."""
    return jax.jit(attend)


def forward_backward_fn(attend: Callable) -> Callable:
    """jit of (q, k, v, cot, *extra) -> (dq, dk, dv), grads of sum(out * cot)."""

    def loss(q, k, v, cot, *extra):
        out = attend(q, k, v, *extra)
        return jnp.sum(out.astype(jnp.float32) * cot.astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def median_ms(fn: Callable, args: tuple, warmup: int, reps: int) -> float:
    """Median device ms of ``fn(*args)`` (see ``experiments.timing.median_ms``)."""
    return timing.median_ms(fn, *args, warmup=warmup, reps=reps)


# =========================================================================== correctness


def relative_error(actual: np.ndarray, expected: np.ndarray, valid: np.ndarray) -> float:
    """||a - b|| / ||b|| in float32 over valid rows.

    actual, expected: [B, T, ...]; valid: bool [B, T] (non-padding tokens).
    """
    a = np.asarray(actual, np.float32)[valid]
    b = np.asarray(expected, np.float32)[valid]
    if not np.all(np.isfinite(a)):
        return float("nan")
    return float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), 1e-30))


@dataclasses.dataclass
class Oracle:
    """Reference output and grads on the check case, float32 numpy [B, T, H(kv), D]."""

    out: np.ndarray
    dq: np.ndarray
    dk: np.ndarray
    dv: np.ndarray
    valid: np.ndarray  # bool [B, T]


def compute_oracle(problem: Problem, inputs: Inputs) -> Oracle:
    """Float32 reference_attention output and grads on ``inputs`` (bf16 values, f32 math)."""
    attend, extra, _ = build_reference(problem, inputs.segment_ids)
    f32 = [x.astype(jnp.float32) for x in (inputs.q, inputs.k, inputs.v, inputs.cot)]
    out = forward_fn(attend)(*f32[:3], *extra)
    dq, dk, dv = forward_backward_fn(attend)(*f32, *extra)
    as_np = lambda x: np.asarray(x, np.float32)  # noqa: E731
    return Oracle(as_np(out), as_np(dq), as_np(dk), as_np(dv), problem.segment_ids != 0)


def output_errors(oracle: Oracle, out, dq, dk, dv) -> tuple[float, float]:
    """(output error, max gradient error) against the oracle over valid rows."""
    out_err = relative_error(out, oracle.out, oracle.valid)
    grad_err = max(relative_error(g, ref, oracle.valid)
                   for g, ref in ((dq, oracle.dq), (dk, oracle.dk), (dv, oracle.dv)))
    return out_err, grad_err


# =========================================================================== results


@dataclasses.dataclass
class PeerResult:
    """One peer's row of the report. Times in ms; errors relative (see relative_error)."""

    name: str
    status: str = "ok"  # "ok" | "WRONG" | "error: ..." | "unavailable: ..."
    out_err: float | None = None
    grad_err: float | None = None
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    fwd_tflops: float | None = None
    fwd_bwd_tflops: float | None = None
    fwd_vs_jpack: float | None = None
    fwd_bwd_vs_jpack: float | None = None
    # interleaved timing (JAX peers): 10th and 90th percentiles, and the samples
    fwd_p10_p90: list[float] | None = None
    fwd_bwd_p10_p90: list[float] | None = None
    fwd_vs_jpack_p10_p90: list[float] | None = None
    fwd_bwd_vs_jpack_p10_p90: list[float] | None = None
    fwd_samples: list[float] | None = None
    fwd_bwd_samples: list[float] | None = None
    note: str = ""

    def add_note(self, text: str) -> None:
        if text:
            self.note = f"{self.note}; {text}" if self.note else text


def short_error(exc: BaseException, limit: int = 200) -> str:
    """One line naming the exception, at most about ``limit`` characters."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first[:limit]}"


def mark_correctness(result: PeerResult, tol: float) -> None:
    """Sets status WRONG when an error is above ``tol`` (or NaN); keeps error statuses."""
    if result.status != "ok":
        return
    errors = [e for e in (result.out_err, result.grad_err) if e is not None]
    if any(not (e <= tol) for e in errors):  # NaN counts as wrong
        result.status = "WRONG"


def fill_throughput(results: list[PeerResult], fwd_flops: float) -> None:
    """Useful TFLOP/s from times, and times relative to jpack's.

    Where both peers have interleaved samples, the ratio is the median of the
    per-round ratios (with their 10th/90th percentiles); else the ratio of medians.
    """
    jpack = next((r for r in results if r.name == "jpack"), None)
    for r in results:
        if r.fwd_ms:
            r.fwd_tflops = fwd_flops / (r.fwd_ms * 1e-3) / 1e12
        if r.fwd_bwd_ms:
            r.fwd_bwd_tflops = FWD_BWD_FLOPS_FACTOR * fwd_flops / (r.fwd_bwd_ms * 1e-3) / 1e12
        if jpack is None:
            continue
        for part in ("fwd", "fwd_bwd"):
            mine, base = getattr(r, f"{part}_samples"), getattr(jpack, f"{part}_samples")
            if mine and base and len(mine) == len(base):
                p10, median, p90 = timing.quantiles(timing.round_ratios(mine, base))
                setattr(r, f"{part}_vs_jpack", median)
                setattr(r, f"{part}_vs_jpack_p10_p90", [p10, p90])
            elif getattr(r, f"{part}_ms") and getattr(jpack, f"{part}_ms"):
                ratio = getattr(r, f"{part}_ms") / getattr(jpack, f"{part}_ms")
                setattr(r, f"{part}_vs_jpack", ratio)


# =========================================================================== running JAX peers


def prepare_jax_peer(name: str, check: Problem, check_inputs: Inputs, oracle: Oracle,
                     main: Problem, main_inputs: Inputs, args) -> tuple[PeerResult, dict]:
    """Checks peer ``name`` on the small case, then builds and warms up its main-shape calls.

    Returns (result, timed): timed maps "fwd" and "fwd_bwd" to (jitted fn, args) for
    time_jax_peers; a call that fails to compile or run (e.g. OOM) is left out, noted.
    """
    result = PeerResult(name)
    builder = JAX_BUILDERS[name]
    try:
        attend, extra, _ = builder(check, check_inputs.segment_ids)
        ci = check_inputs
        out = forward_fn(attend)(ci.q, ci.k, ci.v, *extra)
        grads = forward_backward_fn(attend)(ci.q, ci.k, ci.v, ci.cot, *extra)
        result.out_err, result.grad_err = output_errors(oracle, out, *grads)
        del out, grads
    except Exception as exc:  # noqa: BLE001 - a failing peer is a result, not a crash
        result.status = f"error (check): {short_error(exc)}"
        return result, {}
    mark_correctness(result, args.tol)

    mi = main_inputs
    try:
        attend, extra, note = builder(main, mi.segment_ids)
    except Exception as exc:  # noqa: BLE001
        result.status = f"error: {short_error(exc)}"
        return result, {}
    result.add_note(note)
    calls = {"fwd": (forward_fn(attend), (mi.q, mi.k, mi.v, *extra)),
             "fwd_bwd": (forward_backward_fn(attend), (mi.q, mi.k, mi.v, mi.cot, *extra))}
    timed, errors = {}, []
    for part, (fn, fn_args) in calls.items():
        try:
            for _ in range(max(1, args.warmup)):
                jax.block_until_ready(fn(*fn_args))
            timed[part] = (fn, fn_args)
        except Exception as exc:  # noqa: BLE001
            errors.append(short_error(exc))
            result.add_note(f"{part.replace('_', '+')} failed: {errors[-1]}")
    if not timed:
        result.status = f"error: {errors[0][:80]}"
    return result, timed


TIMED_PARTS = ("fwd", "fwd_bwd")


def time_jax_peers(prepared: dict[str, tuple[PeerResult, dict]], reps: int) -> None:
    """Times the prepared calls part by part: every peer's forward in interleaved rounds
    (timing.interleaved_samples), then every peer's forward+backward in rounds of their
    own; fills each result's medians, percentiles and samples.

    Why not one round of both parts: a forward sampled between backward passes runs
    under their power draw (the H100 at its ~700 W cap, the SM clock pulled from 1980
    to as low as 1485 MHz: results/session10/smi_during_bench.csv), so its time would
    depend on which parts are benchmarked next to it.
    """
    samples = {}
    for part in TIMED_PARTS:
        timed = {(name, part): calls[part] for name, (_, calls) in prepared.items()
                 if part in calls}
        samples.update(timing.interleaved_samples(timed, reps))
    for (name, part), values in samples.items():
        result = prepared[name][0]
        p10, median, p90 = timing.quantiles(values)
        setattr(result, f"{part}_ms", median)
        setattr(result, f"{part}_p10_p90", [p10, p90])
        setattr(result, f"{part}_samples", values)


def try_median_ms(fn: Callable, fn_args: tuple, args) -> tuple[float | None, str | None]:
    """(median ms, None), or (None, error line) when compiling or running fails (e.g. OOM)."""
    try:
        return median_ms(fn, fn_args, args.warmup, args.reps), None
    except Exception as exc:  # noqa: BLE001
        return None, short_error(exc)


# =========================================================================== torch peers


def run_torch_peers(names: list[str], check: Problem, check_inputs: Inputs, oracle: Oracle,
                    main: Problem, args) -> tuple[list[PeerResult], str | None]:
    """Runs ``experiments/torch_peers.py`` in a subprocess; checks its outputs here.

    Returns: (one PeerResult per name, torch version or None).
    """
    script = os.path.join(REPO_ROOT, "experiments", "torch_peers.py")
    with tempfile.TemporaryDirectory(prefix="jpack_torch_") as workdir:
        write_torch_inputs(workdir, names, check_inputs, check, main, args)
        try:
            proc = subprocess.run([sys.executable, script, "--workdir", workdir],
                                  capture_output=True, text=True, timeout=args.torch_timeout)
        except subprocess.TimeoutExpired:
            status = f"error: torch subprocess timed out after {args.torch_timeout:.0f}s"
            return [PeerResult(n, status=status) for n in names], None
        results_path = os.path.join(workdir, "torch_results.json")
        if not os.path.exists(results_path):
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or ["no output"]
            status = f"error: torch subprocess exited {proc.returncode}: {tail[0][:300]}"
            return [PeerResult(n, status=status) for n in names], None
        with open(results_path) as f:
            report = json.load(f)
        results = [torch_result(n, report["peers"].get(n, {}), workdir, oracle, args.tol)
                   for n in names]
    return results, report.get("torch_version")


def write_torch_inputs(workdir: str, names: list[str], check_inputs: Inputs, check: Problem,
                       main: Problem, args) -> None:
    """Writes spec.json (main problem), main_segment_ids.npy and check.npz for torch_peers.py."""
    spec = {"peers": names, "heads": main.heads, "kv_heads": main.kv_heads,
            "head_dim": main.head_dim, "causal": main.causal, "scale": main.scale,
            "warmup": args.warmup, "reps": args.reps, "seed": args.seed}
    with open(os.path.join(workdir, "spec.json"), "w") as f:
        json.dump(spec, f)
    np.save(os.path.join(workdir, "main_segment_ids.npy"), main.segment_ids)
    ci = check_inputs
    as_np = lambda x: np.asarray(x, np.float32)  # noqa: E731  (bf16 values, exact in f32)
    np.savez(os.path.join(workdir, "check.npz"), q=as_np(ci.q), k=as_np(ci.k), v=as_np(ci.v),
             cot=as_np(ci.cot), segment_ids=check.segment_ids)


def torch_result(name: str, raw: dict, workdir: str, oracle: Oracle, tol: float) -> PeerResult:
    """PeerResult from torch_peers.py's report entry and its saved check outputs."""
    result = PeerResult(name, status=raw.get("status", "error: no result"),
                        fwd_ms=raw.get("fwd_ms"), fwd_bwd_ms=raw.get("fwd_bwd_ms"))
    result.add_note(raw.get("note", ""))
    path = os.path.join(workdir, f"check_{name}.npz")
    if os.path.exists(path):
        saved = np.load(path)
        result.out_err, result.grad_err = output_errors(
            oracle, saved["out"], saved["dq"], saved["dk"], saved["dv"])
    mark_correctness(result, tol)
    return result


# =========================================================================== long rows


def run_long(args, heads: int, kv_heads: int, head_dim: int) -> list[dict]:
    """One fresh subprocess per (T, peer): time fwd and fwd+bwd, read peak device memory."""
    rows = []
    for seq_len in args.long_seq_lens:
        for peer in args.long_peers:
            cmd = [sys.executable, os.path.abspath(__file__), "--long-worker", str(seq_len),
                   "--long-worker-peer", peer, "--heads", str(heads), "--kv-heads", str(kv_heads),
                   "--head-dim", str(head_dim), "--seed", str(args.seed),
                   "--mean-doc-len", str(args.mean_doc_len), "--warmup", str(args.long_warmup),
                   "--reps", str(args.long_reps)]
            if not args.causal:
                cmd.append("--non-causal")
            print(f"[long] T={seq_len} {peer} ...", flush=True)
            rows.append(run_long_subprocess(cmd, seq_len, peer, args.long_timeout))
    return rows


def run_long_subprocess(cmd: list[str], seq_len: int, peer: str, timeout: float) -> dict:
    """Runs one long worker; returns its JSON result or an error row."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"seq_len": seq_len, "peer": peer, "status": f"error: timeout after {timeout}s"}
    for line in proc.stdout.splitlines():
        if line.startswith(LONG_RESULT_TAG):
            return json.loads(line[len(LONG_RESULT_TAG):])
    tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or ["no output"]
    return {"seq_len": seq_len, "peer": peer,
            "status": f"error: worker exited {proc.returncode}: {tail[0][:300]}"}


def long_worker(args) -> None:
    """Body of one long subprocess: prints LONG_RESULT_TAG + JSON on stdout."""
    seq_len, peer = args.long_worker, args.long_worker_peer
    problem = Problem(packed_segment_ids(1, seq_len, seed=args.seed, mean_len=args.mean_doc_len),
                      args.heads, args.kv_heads, args.head_dim, args.causal)
    row: dict[str, Any] = {"seq_len": seq_len, "peer": peer, "status": "ok",
                           "docs": problem.describe()["docs"]}
    try:
        inputs = random_inputs(problem, args.seed)
        attend, extra, note = JAX_BUILDERS[peer](problem, inputs.segment_ids)
        row["note"] = note
        row["input_bytes"] = int(sum(x.nbytes for x in (inputs.q, inputs.k, inputs.v, inputs.cot)))
        row["fwd_ms"] = median_ms(forward_fn(attend), (inputs.q, inputs.k, inputs.v, *extra),
                                  args.warmup, args.reps)
        row["fwd_bwd_ms"] = median_ms(forward_backward_fn(attend),
                                      (inputs.q, inputs.k, inputs.v, inputs.cot, *extra),
                                      args.warmup, args.reps)
        flops = problem.fwd_flops()
        row["fwd_tflops"] = flops / (row["fwd_ms"] * 1e-3) / 1e12
        row["fwd_bwd_tflops"] = FWD_BWD_FLOPS_FACTOR * flops / (row["fwd_bwd_ms"] * 1e-3) / 1e12
    except Exception as exc:  # noqa: BLE001
        row["status"] = f"error: {short_error(exc)}"
    stats = jax.devices()[0].memory_stats() or {}
    row["peak_bytes"] = stats.get("peak_bytes_in_use")
    if row["peak_bytes"]:
        row["peak_bytes_per_token"] = row["peak_bytes"] / seq_len
    print(LONG_RESULT_TAG + json.dumps(row), flush=True)


# =========================================================================== report


def fmt(x: float | None, spec: str = ".2f") -> str:
    """``x`` formatted with ``spec``; "-" when missing."""
    return "-" if x is None else format(x, spec)


def with_spread(value: float | None, spread: list[float] | None, spec: str) -> str:
    """``value`` formatted with ``spec``, then "(p10-p90)" when the spread is known."""
    text = fmt(value, spec)
    if value is None or not spread:
        return text
    return f"{text} ({fmt(spread[0], spec)}-{fmt(spread[1], spec)})"


def markdown_table(results: list[PeerResult]) -> str:
    """The main comparison as a markdown table: medians, with (10th-90th percentile)
    of the interleaved samples or per-round ratios where the peer has them."""
    head = ("| peer | status | out err | grad err | fwd ms | fwd TFLOP/s | fwd+bwd ms "
            "| fwd+bwd TFLOP/s | fwd / jpack | fwd+bwd / jpack | note |")
    lines = [head, "|" + "---|" * 11]
    for r in results:
        lines.append(
            f"| {r.name} | {r.status} | {fmt(r.out_err, '.1e')} | {fmt(r.grad_err, '.1e')} "
            f"| {with_spread(r.fwd_ms, r.fwd_p10_p90, '.3f')} | {fmt(r.fwd_tflops, '.3g')} "
            f"| {with_spread(r.fwd_bwd_ms, r.fwd_bwd_p10_p90, '.3f')} "
            f"| {fmt(r.fwd_bwd_tflops, '.3g')} "
            f"| {with_spread(r.fwd_vs_jpack, r.fwd_vs_jpack_p10_p90, '.3f')} "
            f"| {with_spread(r.fwd_bwd_vs_jpack, r.fwd_bwd_vs_jpack_p10_p90, '.3f')} | {r.note} |")
    return "\n".join(lines)


def long_markdown_table(rows: list[dict]) -> str:
    """Long-row results: time, throughput and peak device memory per T."""
    lines = ["| T | peer | status | docs | fwd ms | fwd+bwd ms | fwd+bwd TFLOP/s "
             "| peak GiB | peak bytes/token |", "|" + "---|" * 9]
    for r in rows:
        peak = r.get("peak_bytes") if r["status"] == "ok" else None  # not a peak if it failed
        lines.append(
            f"| {r['seq_len']} | {r['peer']} | {r['status']} | {r.get('docs', '-')} "
            f"| {fmt(r.get('fwd_ms'), '.3f')} | {fmt(r.get('fwd_bwd_ms'), '.3f')} "
            f"| {fmt(r.get('fwd_bwd_tflops'), '.3g')} | {fmt(peak / 2**30 if peak else None, '.3f')} "
            f"| {fmt(peak / r['seq_len'] if peak else None, '.0f')} |")
    return "\n".join(lines)


def write_png(results: list[PeerResult], path: str, title: str) -> None:
    """Grouped bar chart of fwd and fwd+bwd ms per peer (log scale when spread is wide)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in results if r.fwd_ms or r.fwd_bwd_ms]
    if not shown:
        return
    x = np.arange(len(shown))
    width = 0.4
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(shown)), 4.5))
    for offset, attr, label in ((-width / 2, "fwd_ms", "fwd"), (width / 2, "fwd_bwd_ms", "fwd+bwd")):
        values = [getattr(r, attr) or 0.0 for r in shown]
        bars = ax.bar(x + offset, values, width, label=label)
        ax.bar_label(bars, labels=[fmt(v or None, ".2f") for v in values], fontsize=7)
    times = [t for r in shown for t in (r.fwd_ms, r.fwd_bwd_ms) if t]
    if max(times) / min(times) > 30:
        ax.set_yscale("log")
    ax.set_xticks(x, [r.name + ("\n(WRONG)" if r.status == "WRONG" else "") for r in shown],
                  fontsize=8)
    ax.set_ylabel("median ms (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def torch_version_without_import() -> str | None:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


# =========================================================================== CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4, help="rows B (default 4)")
    p.add_argument("--seq-len", type=int, default=8192, help="tokens per row T (default 8192)")
    p.add_argument("--heads", type=int, default=16, help="query heads H (default 16)")
    p.add_argument("--kv-heads", type=int, default=None, help="kv heads (default H, or H/4 with --gqa)")
    p.add_argument("--head-dim", type=int, default=128, help="head dim D (default 128)")
    p.add_argument("--gqa", action="store_true", help="grouped-query attention: kv heads = H/4")
    p.add_argument("--non-causal", dest="causal", action="store_false",
                   help="document mask without causality (default: causal)")
    p.add_argument("--mean-doc-len", type=float, default=1024.0,
                   help="mean document length of the lognormal layout (default 1024)")
    p.add_argument("--seed", type=int, default=0, help="seed of layouts and inputs")
    p.add_argument("--peers", default=",".join(ALL_PEERS),
                   help=f"comma list from {','.join(ALL_PEERS)} (default: all)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs (the first compiles)")
    p.add_argument("--reps", type=int, default=30, help="timed runs; the median is reported")
    p.add_argument("--tol", type=float, default=2e-2, help="relative error above which a peer is WRONG")
    p.add_argument("--check-seq-len", type=int, default=1024, help="T of the correctness case")
    p.add_argument("--check-heads", type=int, default=2,
                   help="H of the correctness case (raised to the GQA group size with --gqa)")
    p.add_argument("--long", action="store_true",
                   help="also run one long row per T of --long-seq-lens, fresh process each")
    p.add_argument("--long-seq-lens", default=",".join(map(str, LONG_SEQ_LENS)),
                   help="comma list of T for --long")
    p.add_argument("--long-peers", default="jpack", help="peers for --long (default jpack)")
    p.add_argument("--long-warmup", type=int, default=2)
    p.add_argument("--long-reps", type=int, default=5)
    p.add_argument("--long-timeout", type=float, default=900.0, help="seconds per long subprocess")
    p.add_argument("--torch-timeout", type=float, default=1800.0, help="seconds for the torch subprocess")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes (B=1, T=256, H=2, D=64), 1 warmup, 3 reps; CPU ok")
    p.add_argument("--out-json", default=None,
                   help=f"default {os.path.relpath(DEFAULT_OUT_JSON, REPO_ROOT)} "
                        "(with --smoke: bench_attention_smoke.json beside it)")
    p.add_argument("--out-png", default=None,
                   help=f"default {os.path.relpath(DEFAULT_OUT_PNG, REPO_ROOT)} (likewise)")
    p.add_argument("--no-png", action="store_true", help="skip the bar chart")
    p.add_argument("--long-worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--long-worker-peer", default="jpack", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    finish_args(p, args, argv or sys.argv[1:])
    return args


def finish_args(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> None:
    """Applies --smoke and --gqa, parses lists, validates."""
    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    if args.smoke:
        smoke = {"--batch": ("batch", 1), "--seq-len": ("seq_len", 256), "--heads": ("heads", 2),
                 "--head-dim": ("head_dim", 64), "--warmup": ("warmup", 1), "--reps": ("reps", 3),
                 "--mean-doc-len": ("mean_doc_len", 64.0), "--check-seq-len": ("check_seq_len", 256),
                 "--long-seq-lens": ("long_seq_lens", ",".join(map(str, SMOKE_LONG_SEQ_LENS))),
                 "--long-reps": ("long_reps", 2), "--long-warmup": ("long_warmup", 1)}
        for flag, (attr, value) in smoke.items():
            if flag not in given:
                setattr(args, attr, value)
    suffix = "_smoke" if args.smoke else ""
    if args.out_json is None:
        args.out_json = DEFAULT_OUT_JSON.replace(".json", f"{suffix}.json")
    if args.out_png is None:
        args.out_png = DEFAULT_OUT_PNG.replace(".png", f"{suffix}.png")
    if args.kv_heads is None:
        if args.gqa and args.heads < 4 and "--heads" not in given:
            args.heads = 4
        args.kv_heads = args.heads // 4 if args.gqa else args.heads
    if args.kv_heads <= 0 or args.heads % args.kv_heads:
        parser.error(f"--heads ({args.heads}) must be a multiple of kv heads ({args.kv_heads})")
    group = args.heads // args.kv_heads
    args.check_heads = max(args.check_heads, group)
    args.check_heads += (-args.check_heads) % group
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    args.long_peers = [p.strip() for p in args.long_peers.split(",") if p.strip()]
    for name in args.peers:
        if name not in ALL_PEERS:
            parser.error(f"unknown peer {name!r}; choose from {','.join(ALL_PEERS)}")
    for name in args.long_peers:
        if name not in JAX_PEERS:
            parser.error(f"--long-peers takes JAX peers only ({','.join(JAX_PEERS)}), got {name!r}")
    args.long_seq_lens = [int(t) for t in str(args.long_seq_lens).split(",") if t]


def build_problems(args) -> tuple[Problem, Problem]:
    """(main problem, small correctness problem), both from packed_segment_ids."""
    main = Problem(packed_segment_ids(args.batch, args.seq_len, seed=args.seed,
                                      mean_len=args.mean_doc_len),
                   args.heads, args.kv_heads, args.head_dim, args.causal)
    group = args.heads // args.kv_heads
    check_mean = min(args.mean_doc_len, args.check_seq_len / 4)
    check = Problem(packed_segment_ids(1, args.check_seq_len, seed=args.seed + 1,
                                       mean_len=check_mean),
                    args.check_heads, args.check_heads // group, args.head_dim, args.causal)
    return main, check


def run_benchmark(args) -> dict:
    """Runs every selected peer; returns the JSON-ready report."""
    device = jax.devices()[0]
    main, check = build_problems(args)
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}", flush=True)
    print(f"main: {main.describe()}\ncheck: {check.describe()}", flush=True)

    check_inputs = random_inputs(check, args.seed + 1)
    oracle = compute_oracle(check, check_inputs)

    results: dict[str, PeerResult] = {}
    for name in args.peers:
        reason = unavailable_reason(name)
        if reason:
            print(f"[skip] {name}: {reason}", flush=True)
            results[name] = PeerResult(name, status=reason)

    # Torch first, while this process holds only the small check arrays.
    torch_names = [n for n in args.peers if n in TORCH_PEERS and n not in results]
    torch_version = torch_version_without_import()
    if torch_names:
        print(f"[torch] {','.join(torch_names)} in a subprocess ...", flush=True)
        torch_results, reported = run_torch_peers(torch_names, check, check_inputs, oracle, main, args)
        torch_version = reported or torch_version
        results.update({r.name: r for r in torch_results})

    main_inputs = random_inputs(main, args.seed)
    prepared = {}
    for name in args.peers:
        if name in results:
            continue
        print(f"[jax] {name}: check, compile, warm up ...", flush=True)
        prepared[name] = prepare_jax_peer(name, check, check_inputs, oracle, main, main_inputs,
                                          args)
        results[name] = prepared[name][0]
    print(f"[jax] timing {len(prepared)} peers in {args.reps} interleaved rounds per part ...",
          flush=True)
    time_jax_peers(prepared, args.reps)
    for name in prepared:
        r = results[name]
        print(f"      {name}: {r.status} fwd={fmt(r.fwd_ms, '.3f')} ms "
              f"fwd+bwd={fmt(r.fwd_bwd_ms, '.3f')} ms", flush=True)
    del main_inputs, prepared

    ordered = [results[n] for n in args.peers]
    fwd_flops = main.fwd_flops()
    fill_throughput(ordered, fwd_flops)
    long_rows = run_long(args, args.heads, args.kv_heads, args.head_dim) if args.long else []

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.device_kind, "platform": device.platform,
        "jax_version": jax.__version__, "torch_version": torch_version,
        "shape": main.describe(), "check_shape": check.describe(),
        "layout": {"generator": "packed_segment_ids", "seed": args.seed,
                   "mean_doc_len": args.mean_doc_len, "sigma": 1.0, "min_len": 16},
        "timing": {"warmup": args.warmup, "reps": args.reps, "statistic": "median",
                   "calls_per_sample": timing.CALLS_PER_SAMPLE,
                   "jax_peers": "interleaved rounds (timing.interleaved_samples), "
                                "the forwards' rounds, then the forward+backward ones"},
        "tolerance": args.tol,
        "useful_fwd_flops": fwd_flops, "useful_fwd_bwd_flops": FWD_BWD_FLOPS_FACTOR * fwd_flops,
        "peers": [dataclasses.asdict(r) for r in ordered],
        "long": long_rows,
        "_results": ordered,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.long_worker is not None:
        long_worker(args)
        return 0
    report = run_benchmark(args)
    results = report.pop("_results")

    os.makedirs(os.path.dirname(os.path.abspath(args.out_json)), exist_ok=True)
    with open(args.out_json, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out_json}")
    if not args.no_png:
        s = report["shape"]
        title = (f"{report['device']}: B={s['batch']} T={s['seq_len']} H={s['heads']} "
                 f"Hkv={s['kv_heads']} D={s['head_dim']} bf16 "
                 f"{'causal' if s['causal'] else 'non-causal'}, {s['docs']} docs")
        try:
            write_png(results, args.out_png, title)
            print(f"wrote {args.out_png}")
        except Exception as exc:  # noqa: BLE001 - the chart is optional
            print(f"no chart: {short_error(exc)}")

    if report["long"]:
        print("\n" + long_markdown_table(report["long"]))
    s = report["shape"]
    print(f"\n{report['device']}, jax {report['jax_version']}, torch {report['torch_version']}: "
          f"B={s['batch']} T={s['seq_len']} H={s['heads']} Hkv={s['kv_heads']} D={s['head_dim']} "
          f"bf16 {'causal' if s['causal'] else 'non-causal'}, {s['docs']} docs "
          f"(mean {s['mean_doc_len']:.0f}), useful fwd {report['useful_fwd_flops'] / 1e12:.3f} TFLOP\n")
    print(markdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
