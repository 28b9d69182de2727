"""Tokens/s and model FLOPs utilisation of ``jobs/train.py``'s training step on a BGE-M3-shaped encoder.

The step a Ray Train worker runs (:meth:`clp_ray.train.worker.TrainWorker.step`): the Collator's
batches, :class:`~clp_ray.loss.objective.CLPObjective` (CLP loss at λ 0.1, the negatives' own queries
encoded) under the DeepSpeed engine clp-ray builds (:func:`~clp_ray.train.deepspeed_config.
deepspeed_config` + :func:`~clp_ray.train.engine.build_engine`: ZeRO-2, bf16 on a GPU) on one
device, without Ray. The encoder has XLM-R large's geometry (BGE-M3's: 24 layers, hidden 1024,
intermediate 4096, 16 heads) with random weights and the tiny model's tokenizer (a 4,000-token
vocabulary instead of 250,002: no matmul changes, the embedding table is smaller). Each query
has ``--group`` passages (1 positive + hard negatives) of ``--passage-len`` tokens, queries
``--query-len``; every text fills its length, so no FLOP is spent on padding.

FLOPs are counted, not estimated: ``torch.utils.flop_counter`` over one whole step (forward,
backward; matmuls and attention). MFU = counted FLOPs per step / seconds per step / ``--peak-tflops``
(H200 bf16 dense: ~790 TFLOP/s, the device notes' figure). Each ``--train-only`` policy is measured
as its own engine: ``all`` (every weight trains: 3x the forward FLOPs) and ``moe`` (the paper's
recipe: only the upcycled last layer trains, so the backward stops there and the step is mostly
forward passes) and ``moe-cached`` (the same with the frozen-prefix cache, as ``jobs/train.py`` runs
it: the step runs the trainable top only; its FLOPs and MFU are the trainable part's).

    python benchmarks/train_mfu.py [--device cuda] [--queries 16] [--group 8] [--passage-len 256]
                                   [--train-only all moe moe-cached] [--steps 10] [--summary FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from encoder_shape import add_shape_args, check_shape_args, positive  # noqa: E402  (benchmarks/, the script's folder)

from clp_ray.cli import add_summary_arg, int_at_least  # noqa: E402
from clp_ray.util.atomic import write_json  # noqa: E402


def words(n_tokens: int, seed: int) -> str:
    """A text that tokenizes to at least ``n_tokens`` tokens (truncation cuts it to the length)."""
    import random

    rnd = random.Random(seed)
    return " ".join(rnd.choice(("page", "menu", "insert", "table", "style", "cell", "文書", "표", "서식"))
                    for _ in range(n_tokens * 2))


def build_objective(args, train_only: str):
    """The Embedder (random BGE-M3-shaped encoder, MoE upcycled as configured) in the CLP objective."""
    from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaModel

    from clp_ray.config import load_config
    from clp_ray.config.moe_spec import MoESpec
    from clp_ray.loss.objective import CLPObjective
    from clp_ray.loss.settings import LossSettings
    from clp_ray.model.embedder import Embedder
    from clp_ray.model.moe import apply_spec, apply_train_only
    from clp_ray.model.tiny import tiny_model_path

    cfg = load_config("hi", None, [f"moe.train_only={train_only}", f"data.train_group_size={args.group}",
                                   f"train.per_device_batch_size={args.queries}", f"ray.use_gpu={args.device == 'cuda'}",
                                   f"train.precision={args.precision}", "ray.num_workers=1"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path())
    torch.manual_seed(0)
    enc_cfg = XLMRobertaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, num_hidden_layers=args.layers,
                               num_attention_heads=args.hidden // 64, intermediate_size=args.intermediate,
                               max_position_embeddings=max(args.passage_len, args.query_len) + 2,
                               pad_token_id=tokenizer.pad_token_id)
    encoder = XLMRobertaModel(enc_cfg, add_pooling_layer=False)
    emb = Embedder(encoder, tokenizer, pooling="cls", normalize=True, query_max_len=args.query_len,
                   passage_max_len=args.passage_len)
    if cfg.moe.enabled:
        apply_spec(emb.encoder, MoESpec.from_config(cfg.moe))
    apply_train_only(emb, train_only, layers=cfg.moe.layers, site=cfg.moe.site)
    return cfg, CLPObjective(emb, LossSettings.from_config(cfg))


def batch(args, collate, step: int):
    from clp_ray.data import Group

    groups = [Group(query=words(args.query_len, step * 1000 + i),
                    passages=[words(args.passage_len, step * 1000 + i * 50 + j) for j in range(args.group)],
                    neg_queries=[words(args.query_len, step * 1000 + i * 50 + j + 25) for j in range(args.group - 1)])
              for i in range(args.queries)]
    return collate(groups)


def measure(args, train_only: str) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from clp_ray.data import Collator
    from clp_ray.model.prefix_cache import attach
    from clp_ray.train.deepspeed_config import deepspeed_config
    from clp_ray.train.engine import build_engine, num_tokens, to_device

    cached = train_only == "moe-cached"  # the paper's setting with the frozen-prefix cache: the trainable top only
    cfg, objective = build_objective(args, "moe" if cached else train_only)
    dev = torch.device(args.device)
    engine, _ = build_engine(objective, deepspeed_config(cfg, 1), cfg, total_opt=args.steps + 2)
    if cached:  # after the engine, as the worker does: the weights as DeepSpeed cast them
        attach(objective.embedder, None)
    collate = Collator.for_embedder(objective.embedder, cfg.data.length_bucket_size)
    batches = [batch(args, collate, s) for s in range(2)]
    tokens = sum(num_tokens(batches[0][k]) for k in ("query", "passage", "neg_query"))

    def step(b):
        out = engine(*(to_device(b[k], dev) for k in ("query", "passage", "neg_query")))
        engine.backward(out.loss)
        engine.step()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    step(batches[0])  # allocations, kernels' first use
    if cached:
        step(batches[1])  # both batches' prefix states computed: the counted and timed steps read them
    with FlopCounterMode(display=False) as counter:
        step(batches[1])
    flops = counter.get_total_flops()
    times = []
    for s in range(args.steps):
        sync()
        t = time.perf_counter()
        step(batches[s % 2])
        sync()
        times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    row = {"train_only": train_only, "tokens_per_step": tokens, "tflop_per_step": flops / 1e12, "step_s": sec,
           "tokens_per_s": tokens / sec, "tflops": flops / sec / 1e12,
           "mfu": flops / sec / (args.peak_tflops * 1e12) if args.peak_tflops else None,
           "trainable_params": sum(p.numel() for p in objective.parameters() if p.requires_grad),
           "peak_gpu_mem_gib": peak_mem}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the next policy's peak is its own (this engine is freed on return)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(ap)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--queries", type=positive, default=16, help="queries per step (per device)")
    ap.add_argument("--group", type=int_at_least(2), default=8, help="passages per query: 1 positive + hard negatives")
    ap.add_argument("--query-len", type=int_at_least(8), default=64)
    ap.add_argument("--passage-len", type=int_at_least(8), default=256)
    ap.add_argument("--train-only", nargs="+", choices=["all", "moe", "moe-cached"], default=["all", "moe", "moe-cached"],
                    help="moe-cached: train_only moe with the frozen-prefix cache (the step runs the trainable top only)")
    ap.add_argument("--steps", type=int_at_least(2), default=10, help="timed steps (median)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's dense peak for --precision (default: 790 on cuda, the H200's bf16 figure)")
    add_summary_arg(ap)
    args = ap.parse_args()
    check_shape_args(ap, args)
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    if args.peak_tflops is None and args.device == "cuda":
        args.peak_tflops = 790.0
    # One process is its own "distributed" world, as a one-worker Ray Train run is.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if args.device == "cuda" else "cpu")
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29561", "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(k, v)
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if args.device == "cuda" else "gloo")
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(f"{name}, {args.precision}, ZeRO-2; {args.layers} layers x {args.hidden} (intermediate {args.intermediate}); "
          f"{args.queries} queries x {args.group} passages of {args.passage_len} tokens, queries {args.query_len}",
          flush=True)
    rows = []
    for policy in args.train_only:
        rows.append(measure(args, policy))
        r = rows[-1]
        mfu = f", MFU {r['mfu']:.1%} of {args.peak_tflops:g} TFLOP/s" if r["mfu"] is not None else ""
        print(f"train_only={policy:<10} {r['trainable_params'] / 1e6:7.1f}M trainable: {r['step_s'] * 1e3:8.1f} ms/step, "
              f"{r['tokens_per_s']:10.0f} tokens/s, {r['tflop_per_step']:.4g} TFLOP/step, {r['tflops']:.4g} TFLOP/s{mfu}",
              flush=True)
    if args.summary:
        write_json(args.summary, {"device": name, "precision": args.precision, "args": {
            k: v for k, v in vars(args).items() if k != "summary"}, "rows": rows})


if __name__ == "__main__":
    main()
