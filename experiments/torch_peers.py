"""PyTorch attention peers for ``bench_attention.py``, run in their own process.

JAX and PyTorch each want the GPU's memory for themselves, so the benchmark runs this
script with ``sys.executable`` in a subprocess and talks to it through files:

    python experiments/torch_peers.py --workdir DIR

reads
    DIR/spec.json             {"peers", "heads", "kv_heads", "head_dim", "causal",
                               "scale", "warmup", "reps", "seed"} of the timed problem
                              (the check case has its own head counts, same ratio)
    DIR/main_segment_ids.npy  int32 [B, T]   layout of the timed problem
    DIR/check.npz             q, k, v, cot float32 [B, T, H(kv), D] and
                              segment_ids int32 [B, T] of the small correctness case
                              (and mask bool [B, T, T] for a dense general mask)
    DIR/main_mask.npy         bool [B, T, T], only for a dense general mask
and writes
    DIR/torch_results.json    {"torch_version", "device", "peers": {name: {...}}}
    DIR/check_<peer>.npz      out, dq, dk, dv float32 [B, T, H(kv), D] on the check case

It never compares against a reference itself: the benchmark does that, in one place.

Peers:
    torch_flex    FlexAttention (compiled) with a document-causal BlockMask; q/k/v in
                  its native [B, H, T, D] layout. Building the BlockMask is done once per
                  layout, outside the timed region (as a model reuses it across layers);
                  its cost is reported in the note. spec["mask"] (from bench_masks.py)
                  ANDs a general mask into the mask_mod: {"kind": "dense"} (the
                  mask arrays above), {"kind": "prefix_lm", "prefix": p} or
                  {"kind": "causal_window", "window": w}; spec["check_mask"], when
                  given, is the same for the (smaller) check case.
    torch_varlen  ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention varlen) on
                  [B*T, H, D] with cumulative document offsets; forward only through
                  ``aten._flash_attention_forward`` where varlen_attn is missing.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time
from typing import Callable

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.layouts import segment_runs  # noqa: E402

TORCH_PEERS = ("torch_flex", "torch_varlen")


# --------------------------------------------------------------------------- timing


def median_cuda_ms(fn: Callable[[], object], warmup: int, reps: int) -> float:
    """Median over ``reps`` samples of ``fn``'s time in ms, timed with CUDA events.

    Each sample is 10 calls back to back, as the JAX peers are timed.
    """
    import torch

    for _ in range(max(1, warmup)):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 10)
    return float(statistics.median(times))


# --------------------------------------------------------------------------- layouts


def cumulative_runs(segment_ids: np.ndarray) -> tuple[np.ndarray, int]:
    """FlashAttention varlen offsets for rows flattened to one token axis.

    Every maximal run of equal ids (padding runs included, so that offsets stay
    contiguous; their outputs are ignored) becomes one sequence.

    segment_ids: int [B, T].
    Returns: (cu_seqlens int32 [n_runs + 1] over the B*T flattened tokens, max run length).
    """
    ids = np.asarray(segment_ids)
    lengths = [length for row in ids for _, _, length in segment_runs(row)]
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return cu, int(max(lengths))


# --------------------------------------------------------------------------- peers
# Each builder takes (segment_ids int32 [B, T] as a CUDA tensor, numpy copy, spec) and
# returns (attend, layout, note): attend(q, k, v) -> out, all in ``layout``
# ("bhtd" = [B, H, T, D], "flat" = [B*T, H, D]); q/k/v/out come from/return to
# [B, T, H, D] through ``to_layout`` / ``from_layout``.


def document_starts(seg_np: np.ndarray) -> np.ndarray:
    """int [B, T] -> the first index of each token's id in its row (as jpack.mask_rules)."""
    starts = np.zeros_like(seg_np)
    for b, row in enumerate(seg_np):
        for sid in np.unique(row):
            idx = np.flatnonzero(row == sid)
            starts[b, idx] = idx[0]
    return starts


def build_flex(seg_t, seg_np, spec, mask_np=None):
    """FlexAttention with a document(-causal) BlockMask, ANDed with spec["mask"];
    layout [B, H, T, D]. mask_np: bool [B, T, T] for a dense general mask."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    causal = spec["causal"]
    general = spec.get("mask")
    kind = None if general is None else general["kind"]
    batch, seq_len = seg_np.shape
    if kind == "dense":
        dense_t = torch.from_numpy(np.ascontiguousarray(
            mask_np.reshape(batch, seq_len, seq_len))).to("cuda")
    if kind == "prefix_lm":
        starts_t = torch.from_numpy(document_starts(seg_np)).to("cuda")

    def mask_mod(b, h, q_idx, kv_idx):
        q_doc = seg_t[b, q_idx]
        allowed = (q_doc == seg_t[b, kv_idx]) & (q_doc != 0)
        if causal:
            allowed = allowed & (kv_idx <= q_idx)
        if kind == "dense":
            allowed = allowed & dense_t[b, q_idx, kv_idx]
        elif kind == "prefix_lm":
            allowed = allowed & ((kv_idx <= q_idx)
                                 | (kv_idx - starts_t[b, kv_idx] < general["prefix"]))
        elif kind == "causal_window":
            allowed = allowed & (kv_idx <= q_idx) & (q_idx - kv_idx < general["window"])
        return allowed

    torch.cuda.synchronize()
    start = time.perf_counter()
    block_mask = create_block_mask(mask_mod, batch, None, seq_len, seq_len, device="cuda")
    torch.cuda.synchronize()
    mask_ms = (time.perf_counter() - start) * 1e3
    compiled = torch.compile(flex_attention, dynamic=False)
    gqa = spec["heads"] != spec["kv_heads"]

    def attend(q, k, v):
        return compiled(q, k, v, block_mask=block_mask, scale=spec["scale"], enable_gqa=gqa)

    note = f"BlockMask built once, not timed ({mask_ms:.1f} ms)"
    return attend, "bhtd", note


def _varlen_function():
    """The installed varlen entry point: (callable, kind) or raises RuntimeError."""
    import torch

    try:
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn, "varlen_attn"
    except ImportError:
        pass
    fn = getattr(torch.nn.attention, "varlen_attn", None)
    if fn is not None:
        return fn, "varlen_attn"
    if hasattr(torch.ops.aten, "_flash_attention_forward"):
        return torch.ops.aten._flash_attention_forward, "aten_flash_forward"
    raise RuntimeError("unavailable: no torch.nn.attention.varlen.varlen_attn, "
                       "torch.nn.attention.varlen_attn or aten._flash_attention_forward")


def build_varlen(seg_t, seg_np, spec, mask_np=None):
    """FlashAttention varlen over all rows flattened; layout [B*T, H, D]."""
    import torch

    if spec.get("mask") is not None:
        raise RuntimeError("unavailable: varlen_attn takes no general mask")
    fn, kind = _varlen_function()
    cu_np, max_len = cumulative_runs(seg_np)
    cu = torch.from_numpy(cu_np).to("cuda")
    causal, scale = spec["causal"], spec["scale"]
    notes = []

    if kind == "varlen_attn":
        params = inspect.signature(fn).parameters
        kwargs = {"scale": scale} if "scale" in params else {}
        if "is_causal" in params:
            kwargs["is_causal"] = causal
        else:
            kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
        if "enable_gqa" in params and spec["heads"] != spec["kv_heads"]:
            kwargs["enable_gqa"] = True

        def attend(q, k, v):
            return fn(q, k, v, cu, cu, max_len, max_len, **kwargs)
    else:
        notes.append("aten._flash_attention_forward: forward only")

        def attend(q, k, v):
            return fn(q, k, v, cu, cu, max_len, max_len, 0.0, causal, False, scale=scale)[0]

    return attend, "flat", "; ".join(notes)


BUILDERS = {"torch_flex": build_flex, "torch_varlen": build_varlen}


# --------------------------------------------------------------------------- layouts in/out


def to_layout(x, layout: str):
    """[B, T, H, D] -> the peer's layout (contiguous)."""
    if layout == "bhtd":
        return x.transpose(1, 2).contiguous()
    b, t, h, d = x.shape
    return x.reshape(b * t, h, d).contiguous()


def from_layout(x, layout: str, batch: int):
    """The peer's layout -> [B, T, H, D]."""
    if layout == "bhtd":
        return x.transpose(1, 2)
    bt, h, d = x.shape
    return x.reshape(batch, bt // batch, h, d)


def repeat_kv(x, groups: int, layout: str):
    """Repeat kv heads ``groups`` times along the head axis of ``layout``."""
    return x.repeat_interleave(groups, dim=1 if layout == "bhtd" else -2)


# --------------------------------------------------------------------------- running one peer


def run_peer(name: str, spec: dict, main_seg: np.ndarray, check: dict, workdir: str,
             main_mask: np.ndarray | None = None) -> dict:
    """Check one peer on the small case (saving its outputs), then time it.

    Returns: {"status", "fwd_ms", "fwd_bwd_ms", "note"}; status "ok", "error: ..." or
    "unavailable: ...".
    """
    import torch

    result = {"status": "ok", "fwd_ms": None, "fwd_bwd_ms": None, "note": ""}
    try:
        # The check case is smaller: its prefix/window are scaled to it (spec["check_mask"]).
        check_spec = dict(spec, mask=spec.get("check_mask", spec.get("mask")))
        attend, layout, _ = make_attend(name, check["segment_ids"], check_spec, check.get("mask"))
        out, grads, check_note = run_check(attend, layout, check, spec)
        np.savez(os.path.join(workdir, f"check_{name}.npz"), out=out, **grads)
        del attend
        attend, layout, note = make_attend(name, main_seg, spec, main_mask)
        result["fwd_ms"], result["fwd_bwd_ms"], time_note = time_peer(attend, layout, main_seg, spec)
        result["note"] = "; ".join(n for n in (note, check_note, time_note) if n)
    except Exception as exc:  # noqa: BLE001 - any failure is a result to report
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        result["status"] = message if message.startswith("unavailable") else (
            f"error: {type(exc).__name__}: {message[:300]}")
    finally:
        torch.cuda.empty_cache()
    return result


def make_attend(name: str, seg_np: np.ndarray, spec: dict, mask_np: np.ndarray | None = None):
    """Builds peer ``name`` for layout ``seg_np`` (int32 [B, T]) and a dense mask, if any."""
    import torch

    seg_t = torch.from_numpy(np.ascontiguousarray(seg_np, dtype=np.int32)).to("cuda")
    return BUILDERS[name](seg_t, seg_np, spec, mask_np)


def _inputs_in_layout(q, k, v, layout: str, spec: dict):
    """Moves bf16 [B, T, H(kv), D] tensors to ``layout``; repeats kv heads if needed."""
    q, k, v = (to_layout(x, layout) for x in (q, k, v))
    if spec.get("_repeat_kv"):
        groups = spec["heads"] // spec["kv_heads"]
        k, v = repeat_kv(k, groups, layout), repeat_kv(v, groups, layout)
    return q, k, v


def _forward_backward(attend, q, k, v, cot):
    """Grads of sum(out * cot) w.r.t. (q, k, v); inputs already require grad."""
    import torch

    out = attend(q, k, v)
    return torch.autograd.grad(out, (q, k, v), cot)


def run_check(attend, layout: str, check: dict, spec: dict):
    """Output and grads on the check case, as float32 numpy [B, T, H(kv), D].

    Falls back to repeating kv heads when the peer refuses grouped heads.
    Returns: (out, {"dq", "dk", "dv"}, note).
    """
    import torch

    batch = check["q"].shape[0]
    as_bf16 = {n: torch.from_numpy(check[n]).to("cuda", torch.bfloat16) for n in ("q", "k", "v", "cot")}
    note = ""
    try:
        q, k, v = _inputs_in_layout(as_bf16["q"], as_bf16["k"], as_bf16["v"], layout, spec)
        with torch.no_grad():
            attend(q, k, v)
    except Exception:  # noqa: BLE001
        if spec["heads"] == spec["kv_heads"] or spec.get("_repeat_kv"):
            raise
        spec["_repeat_kv"] = True
        note = "kv heads repeated (no native GQA)"
        q, k, v = _inputs_in_layout(as_bf16["q"], as_bf16["k"], as_bf16["v"], layout, spec)
    with torch.no_grad():
        out = attend(q, k, v)
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    cot = to_layout(as_bf16["cot"], layout)
    try:
        dq, dk, dv = _forward_backward(attend, *leaves, cot)
    except Exception as exc:  # noqa: BLE001 - forward-only peers
        note = "; ".join(n for n in (note, f"no backward: {type(exc).__name__}") if n)
        dq = dk = dv = None

    def back(x, heads):
        if x is None:
            return np.full(check["q"].shape[:2] + (heads, check["q"].shape[-1]), np.nan, np.float32)
        x = from_layout(x, layout, batch)
        if x.shape[2] != heads:  # repeated kv heads: sum the group's gradients back
            x = x.reshape(x.shape[0], x.shape[1], heads, -1, x.shape[-1]).sum(3)
        return x.float().cpu().numpy()

    heads, kv_heads = check["q"].shape[2], check["k"].shape[2]
    out_np = from_layout(out, layout, batch).float().cpu().numpy()
    grads = {"dq": back(dq, heads), "dk": back(dk, kv_heads), "dv": back(dv, kv_heads)}
    return out_np, grads, note


def time_peer(attend, layout: str, seg_np: np.ndarray, spec: dict):
    """Median fwd and fwd+bwd ms on random bf16 inputs for layout ``seg_np`` [B, T].

    Returns: (fwd_ms, fwd_bwd_ms or None, note).
    """
    import torch

    batch, seq_len = seg_np.shape
    gen = torch.Generator(device="cuda").manual_seed(spec["seed"])

    def randn(heads):
        return torch.randn(batch, seq_len, heads, spec["head_dim"], device="cuda",
                           dtype=torch.bfloat16, generator=gen)

    q, k, v = _inputs_in_layout(randn(spec["heads"]), randn(spec["kv_heads"]),
                                randn(spec["kv_heads"]), layout, spec)
    cot = to_layout(randn(spec["heads"]), layout)

    def forward():
        with torch.no_grad():
            return attend(q, k, v)

    fwd_ms = median_cuda_ms(forward, spec["warmup"], spec["reps"])
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    try:
        fwd_bwd_ms = median_cuda_ms(lambda: _forward_backward(attend, *leaves, cot),
                                    spec["warmup"], spec["reps"])
        note = ""
    except Exception as exc:  # noqa: BLE001
        fwd_bwd_ms, note = None, f"fwd+bwd failed: {type(exc).__name__}: {str(exc)[:200]}"
    return fwd_ms, fwd_bwd_ms, note


# --------------------------------------------------------------------------- main


def unavailable_reason() -> str | None:
    """Why no torch peer can run here, or None."""
    try:
        import torch
    except ImportError as exc:
        return f"unavailable: torch not importable ({exc})"
    if not torch.cuda.is_available():
        return "unavailable: torch sees no CUDA GPU"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="folder with spec.json and layouts")
    args = parser.parse_args(argv)

    with open(os.path.join(args.workdir, "spec.json")) as f:
        spec = json.load(f)
    main_seg = np.load(os.path.join(args.workdir, "main_segment_ids.npy"))
    check = dict(np.load(os.path.join(args.workdir, "check.npz")))
    mask_path = os.path.join(args.workdir, "main_mask.npy")
    main_mask = np.load(mask_path) if os.path.exists(mask_path) else None

    report = {"torch_version": None, "device": None, "peers": {}}
    reason = unavailable_reason()
    if reason is None:
        import torch

        report["torch_version"] = torch.__version__
        report["device"] = torch.cuda.get_device_name()
        for name in spec["peers"]:
            spec.pop("_repeat_kv", None)
            print(f"[torch_peers] {name} ...", file=sys.stderr, flush=True)
            report["peers"][name] = run_peer(name, spec, main_seg, check, args.workdir,
                                             main_mask)
    else:
        report["peers"] = {name: {"status": reason} for name in spec["peers"]}

    with open(os.path.join(args.workdir, "torch_results.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
