"""Peak memory and examples/s of one CLP training step with and without gradient caching.

The worker's step (``CLPObjective``: InfoNCE over in-batch + hard negatives, λ = 0.1 so the
negatives' own queries are encoded too, MoE last layer with its router losses; AdamW over every
parameter) on a random XLM-R encoder, at growing per-device batch sizes (queries; each with
``--group`` passages and ``--group - 1`` negative queries), with ``train.grad_cache`` off and on
(``--chunk`` sequences per chunk). Each (batch, mode) runs in a fresh process: on CPU its peak RSS
(VmHWM, reset before the measured steps) above the RSS before them, on a GPU ``torch.cuda.max_memory_allocated`` (bf16, BGE-M3 shape).

Targets: with caching, peak memory flat (within 1.2x) from batch 32 to 512 at a fixed chunk size;
the cached step at most 1.35x the uncached step's time at a batch that fits both.

    python benchmarks/grad_cache_memory.py [--device cpu|cuda] [--batches 32,64,128,256,512] [--chunk 32]
           [--uncached-up-to 512] [--layers L --hidden H --intermediate I] [--summary F]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from encoder_shape import add_shape_args, check_shape_args, positive  # benchmarks/ (the script's folder)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clp_ray.cli import add_summary_arg  # noqa: E402
from clp_ray.util.atomic import write_json  # noqa: E402

TARGET_FLAT = 1.2
TARGET_COST = 1.35


def reset_peak_rss() -> None:
    """Make the kernel's peak RSS (VmHWM) start again from the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def one(args) -> dict:
    """One (batch, cached) measurement in this process."""
    from transformers import AutoModel, XLMRobertaConfig

    from clp_ray.loss.objective import CLPObjective
    from clp_ray.loss.settings import LossSettings
    from clp_ray.model.embedder import Embedder
    from clp_ray.model.moe import upcycle

    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = XLMRobertaConfig(vocab_size=8192, hidden_size=args.hidden, num_hidden_layers=args.layers,
                           num_attention_heads=max(1, args.hidden // 64), intermediate_size=args.intermediate,
                           max_position_embeddings=args.seq_p + 2)
    torch.manual_seed(0)
    encoder = AutoModel.from_config(cfg, add_pooling_layer=False)
    upcycle(encoder, [-1], num_experts=2)
    emb = Embedder(encoder.to(dev, dtype), tokenizer=None, pooling="cls").train()
    obj = CLPObjective(emb, LossSettings(temperature=0.05, lam=0.1, cross_device=False),
                       chunk_size=args.chunk if args.cached else None)
    opt = torch.optim.AdamW(emb.parameters(), lr=1e-5)
    b, g = args.batch, args.group

    def inputs(n, seq):
        ids = torch.randint(5, cfg.vocab_size, (n, seq), device=dev)
        lengths = torch.randint(seq // 2, seq + 1, (n,), generator=torch.Generator().manual_seed(n))
        mask = (torch.arange(seq) < lengths.unsqueeze(1)).long().to(dev)
        return {"input_ids": ids, "attention_mask": mask}

    batch = (inputs(b, args.seq_q), inputs(b * g, args.seq_p), inputs(b * (g - 1), args.seq_q))

    def step():
        opt.zero_grad(set_to_none=True)
        obj(*batch).loss.backward()
        opt.step()

    step()  # warm-up: optimizer state allocated, kernels chosen
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        base = peak_rss_mib()  # = the RSS now, in the units the peak is read in
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:  # the peak of the measured steps above the process's size before them; the kernel's
        # per-thread RSS counters lag by a few pages, so a step that allocates nearly nothing can
        # read a hair below the base: that is 0
        peak = max(0.0, peak_rss_mib() - base)
    step_s = sorted(times)[len(times) // 2]
    return {"batch": b, "cached": args.cached, "peak_mib": round(peak, 1), "step_s": round(step_s, 4),
            "examples_per_s": round(b / step_s, 2)}


def measure(args, batch: int, cached: bool) -> dict:
    cmd = [sys.executable, __file__, "--one", "--batch", str(batch), "--device", args.device, "--layers", str(args.layers),
           "--hidden", str(args.hidden), "--intermediate", str(args.intermediate), "--group", str(args.group),
           "--chunk", str(args.chunk), "--seq-q", str(args.seq_q), "--seq-p", str(args.seq_p),
           "--repeats", str(args.repeats)] + (["--cached"] if cached else [])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        tail = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"
        return {"batch": batch, "cached": cached, "error": tail}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(ap)
    ap.set_defaults(layers=None, hidden=None, intermediate=None)
    ap.add_argument("--batches", default="32,64,128,256,512")
    ap.add_argument("--uncached-up-to", type=positive, default=None, help="largest batch run without caching (default: all)")
    ap.add_argument("--group", type=positive, default=2, help="passages per query (1 positive + hard negatives)")
    ap.add_argument("--chunk", type=positive, default=32)
    ap.add_argument("--seq-q", type=positive, default=32)
    ap.add_argument("--seq-p", type=positive, default=None)
    ap.add_argument("--repeats", type=positive, default=3)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=positive, default=32, help=argparse.SUPPRESS)
    ap.add_argument("--cached", action="store_true", help=argparse.SUPPRESS)
    add_summary_arg(ap)
    args = ap.parse_args()
    gpu = args.device == "cuda"
    # BGE-M3's shape on a GPU; on 2 CPU cores a small encoder (the memory ratios are what matters).
    args.layers = args.layers or (24 if gpu else 2)
    args.hidden = args.hidden or (1024 if gpu else 128)
    args.intermediate = args.intermediate or (4096 if gpu else 512)
    args.seq_p = args.seq_p or (256 if gpu else 128)
    check_shape_args(ap, args)
    if args.group < 2:
        ap.error("--group must be >= 2 (a positive and at least one hard negative)")
    if args.one:
        print(json.dumps(one(args)))
        return 0
    try:
        batches = sorted({int(x) for x in args.batches.split(",")})
        assert batches and batches[0] >= 1
    except (ValueError, AssertionError):
        ap.error("--batches must be positive integers, comma-separated")
    rows = []
    for b in batches:
        for cached in (False, True):
            if not cached and args.uncached_up_to and b > args.uncached_up_to:
                continue
            rows.append(measure(args, b, cached))
            print(json.dumps(rows[-1]), flush=True)
    summary = report(args, rows)
    if args.summary:
        write_json(args.summary, summary)
    return 0


def report(args, rows: list[dict]) -> dict:
    ok = [r for r in rows if "error" not in r]
    cached = {r["batch"]: r for r in ok if r["cached"]}
    plain = {r["batch"]: r for r in ok if not r["cached"]}
    print(f"\n{'batch':>6} {'uncached MiB':>13} {'cached MiB':>11} {'uncached ex/s':>14} {'cached ex/s':>12}")
    for b in sorted({r["batch"] for r in rows}):
        u, c = plain.get(b), cached.get(b)
        cell = lambda r, k: f"{r[k]:.1f}" if r else "-"  # noqa: E731
        print(f"{b:>6} {cell(u, 'peak_mib'):>13} {cell(c, 'peak_mib'):>11} {cell(u, 'examples_per_s'):>14} "
              f"{cell(c, 'examples_per_s'):>12}")
    summary = {"device": args.device, "shape": {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate},
               "group": args.group, "chunk": args.chunk, "seq": [args.seq_q, args.seq_p], "rows": rows}
    if cached:
        lo, hi = min(cached), max(cached)
        growth = cached[hi]["peak_mib"] / max(cached[lo]["peak_mib"], 1e-9)
        summary["cached_memory_growth"] = {"from": lo, "to": hi, "ratio": growth,
                                           "target_met": bool(growth <= TARGET_FLAT)}
        print(f"\ncached peak memory, batch {hi} / batch {lo}: {growth:.2f}x (target <= {TARGET_FLAT}x)")
    both = sorted(set(cached) & set(plain))
    if both:
        b = both[-1]
        cost = cached[b]["step_s"] / plain[b]["step_s"]
        summary["cached_step_cost"] = {"batch": b, "ratio": cost, "target_met": bool(cost <= TARGET_COST),
                                       "memory_saving": plain[b]["peak_mib"] / max(cached[b]["peak_mib"], 1e-9)}
        print(f"cached step time / uncached at batch {b}: {cost:.2f}x (target <= {TARGET_COST}x); "
              f"memory {plain[b]['peak_mib']:.0f} -> {cached[b]['peak_mib']:.0f} MiB")
    return summary


if __name__ == "__main__":
    sys.exit(main())
