"""Whole-encoder step time with an upcycled layer vs the dense encoder (for GPUs; runs anywhere).

``moe_overhead.py`` times one FFN, where on a GPU fixed per-call costs dominate. This times what a
training step pays: forward + backward of a BGE-M3-shaped encoder (XLM-R large geometry: 24 layers,
hidden 1024, intermediate 4096; random weights, small vocabulary) on ``--batch`` x ``--seq`` tokens,
dense vs the last layer's ``intermediate.dense`` upcycled (top-1) for each E, under each train-only
policy (``moe``: only the MoE layer trains, as in the paper, so the backward stops there; ``all``).
As in training, each sequence has padding (real length drawn from ``[--min-length, --seq]``, seeded;
default from half the sequence), the MoE layers see the attention mask (``token_mask``) and the
router losses join the loss. Parameters are cast to ``--dtype`` as DeepSpeed's bf16 mode does.
Ratios are medians of back-to-back pairs in alternating order.

    python benchmarks/moe_step.py [--device cuda] [--dtype bf16] [--batch 64] [--seq 256] [--layers 24]
                                  [--min-length N]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from encoder_shape import add_shape_args, check_shape_args, positive  # benchmarks/ (the script's folder)

from clp_ray.cli import add_summary_arg
from clp_ray.util.atomic import write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(ap)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--batch", type=positive, default=64)
    ap.add_argument("--seq", type=positive, default=256)
    ap.add_argument("--min-length", type=positive, default=None,
                    help="shortest real sequence length (default: half of --seq; --seq: no padding)")
    ap.add_argument("--experts", type=positive, nargs="+", default=[2, 8])
    ap.add_argument("--repeats", type=positive, default=10)
    add_summary_arg(ap)
    args = ap.parse_args()
    check_shape_args(ap, args)
    min_length = args.min_length or max(1, args.seq // 2)
    if min_length > args.seq:
        ap.error(f"--min-length {min_length}: must be at most --seq {args.seq}")
    from transformers import AutoModel, XLMRobertaConfig

    from clp_ray.loss.router import router_loss
    from clp_ray.model.moe import apply_train_only, token_mask, upcycle

    dev, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cfg = XLMRobertaConfig(vocab_size=8192, hidden_size=args.hidden, num_hidden_layers=args.layers,
                           num_attention_heads=args.hidden // 64, intermediate_size=args.intermediate,
                           max_position_embeddings=args.seq + 2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    dense = AutoModel.from_config(cfg, add_pooling_layer=False).to(dev, dtype).train()
    ids = torch.randint(5, cfg.vocab_size, (args.batch, args.seq), device=dev)
    lengths = torch.randint(min_length, args.seq + 1, (args.batch,), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(args.seq) < lengths.unsqueeze(1)).long().to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step(model) -> float:
        sync()
        t = time.perf_counter()
        with token_mask(model, mask):  # as the Embedder's forward does; no-ops on the dense model
            h = model(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
        (h.float().pow(2).mean() + router_loss(model)).backward()
        sync()
        return time.perf_counter() - t

    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, {args.dtype}, {args.layers} layers {args.hidden}/{args.intermediate}, "
          f"{args.batch}x{args.seq} tokens ({1 - mask.float().mean().item():.0%} padding), forward+backward, "
          f"median of {args.repeats} pairs")
    print(f"{'train_only':>10} {'E':>2} {'dense':>9} {'moe':>9} {'moe/dense':>10}")
    rows = []
    for policy in ("moe", "all"):
        for e in args.experts:
            moe = copy.deepcopy(dense)
            upcycle(moe, [-1], num_experts=e, top_k=1)
            moe.to(dev, dtype)
            apply_train_only(moe, policy)
            # The dense model trains the same parameters: the last layer's FFN Linear under "moe".
            for p in dense.parameters():
                p.requires_grad_(policy == "all")
            if policy == "moe":
                dense.encoder.layer[-1].intermediate.dense.requires_grad_(True)
            for m in (dense, moe):
                step(m)  # warm-up
            times: dict[str, list[float]] = {"dense": [], "moe": []}
            for r in range(args.repeats):
                for name in ("dense", "moe") if r % 2 == 0 else ("moe", "dense"):
                    times[name].append(step(dense if name == "dense" else moe))
                for m in (dense, moe):
                    m.zero_grad(set_to_none=True)
            ratio = statistics.median(a / b for a, b in zip(times["moe"], times["dense"]))
            rows.append({"train_only": policy, "experts": e, "dense_ms": statistics.median(times["dense"]) * 1e3,
                         "moe_ms": statistics.median(times["moe"]) * 1e3, "ratio": ratio})
            print(f"{policy:>10} {e:>2} {statistics.median(times['dense']) * 1e3:>7.1f}ms "
                  f"{statistics.median(times['moe']) * 1e3:>7.1f}ms {ratio:>9.3f}x")
            del moe
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    if args.summary:
        write_json(args.summary, {"machine": where, "torch": torch.__version__, "dtype": args.dtype, "layers": args.layers,
                                  "batch": args.batch, "seq": args.seq, "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
