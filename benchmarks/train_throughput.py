"""Training throughput: clp-ray's contrastive step vs sentence-transformers, and CLP vs plain CL.

All on the CPU, single process, same backbone (a random MiniLM-sized XLM-R: hidden 384, 6 layers,
with the offline tiny tokenizer), same bundled data, batch size, group size (1 positive + G-1 hard
negatives), sequence lengths (queries 32, passages 128), mean pooling, temperature 0.05, AdamW.

- clp-ray plain (lam = 0): ``CLPObjective`` forward + backward + AdamW step — the worker's step
  without DeepSpeed (one process has nothing to shard).
- sentence-transformers: ``SentenceTransformerTrainer`` + ``MultipleNegativesRankingLoss``
  (scale 1/tau) on columns anchor, positive, negative_1..negative_{G-1}: the same InfoNCE.
- clp-ray CLP (lam = 0.1): the same step plus encoding each negative's own query for the penalty.

Examples/s are measured after warm-up steps, the three runs interleaved in rounds.
Targets: clp-ray plain >= 1.2x sentence-transformers; CLP <= 1.30x the time of plain CL.

    python benchmarks/train_throughput.py [--steps 12] [--batch 16] [--group 4] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from clp_ray.cli import add_summary_arg
from clp_ray.util.atomic import write_json

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.disable(logging.WARNING)


def build_backbone(out: Path) -> Path:
    from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaModel

    from clp_ray.model.tiny import tiny_model_path

    tok = AutoTokenizer.from_pretrained(tiny_model_path())
    cfg = XLMRobertaConfig(vocab_size=len(tok), hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                           intermediate_size=1536, max_position_embeddings=514, type_vocab_size=1,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    XLMRobertaModel(cfg, add_pooling_layer=False).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def load_records(n: int) -> list[dict]:
    from clp_ray.config import resolve_path

    with open(resolve_path("pkg://ko_help/train.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f][:n]


def clp_ray_rate(backbone: Path, records: list[dict], args, lam: float) -> float:
    from clp_ray.data import Collator, sample_group
    from clp_ray.loss.objective import CLPObjective
    from clp_ray.loss.settings import LossSettings
    from clp_ray.model.embedder import Embedder
    from clp_ray.model.settings import EmbedSettings

    torch.manual_seed(0)
    emb = Embedder.from_pretrained(backbone, pooling="mean", query_max_len=32, passage_max_len=128)
    module = CLPObjective(emb, LossSettings(temperature=0.05, lam=lam, cross_device=False)).train()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    collate = Collator(emb.tokenizer, EmbedSettings(query_max_len=32, passage_max_len=128), bucket_size=args.bucket)
    times = []
    for step in range(args.warmup + args.steps):
        chunk = records[(step * args.batch) % len(records):][: args.batch]
        batch = collate([sample_group(r, args.group, seed=0, epoch=0, index=i) for i, r in enumerate(chunk)])
        t = time.perf_counter()  # like the trainer callback below: batch already collated
        loss = module(batch["query"], batch["passage"], batch["neg_query"]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
    return args.batch / statistics.median(times)


def sentence_transformers_rate(backbone: Path, records: list[dict], args) -> float:
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        losses,
    )
    from sentence_transformers.models import Normalize, Pooling, Transformer
    from transformers import TrainerCallback

    from clp_ray.data import sample_group

    torch.manual_seed(0)
    tr = Transformer(str(backbone), max_seq_length=128)
    model = SentenceTransformer(modules=[tr, Pooling(tr.get_embedding_dimension(), "mean"), Normalize()], device="cpu")
    rows = []
    for step in range(args.warmup + args.steps):
        chunk = records[(step * args.batch) % len(records):][: args.batch]
        for i, r in enumerate(chunk):
            g = sample_group(r, args.group, seed=0, epoch=0, index=i)
            rows.append({"anchor": g.query, "positive": g.passages[0],
                         **{f"negative_{j}": n for j, n in enumerate(g.passages[1:], 1)}})
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if state.global_step > args.warmup:
                times.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as out:
        targs = SentenceTransformerTrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps, learning_rate=1e-4,
            save_strategy="no", report_to="none", logging_steps=10_000, use_cpu=True, seed=0,
            dataloader_drop_last=True, disable_tqdm=True)
        trainer = SentenceTransformerTrainer(model=model, args=targs, train_dataset=Dataset.from_list(rows),
                                             loss=losses.MultipleNegativesRankingLoss(model, scale=20.0), callbacks=[Timer()])
        trainer.train()
    return args.batch / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--bucket", type=int, default=16, help="data.length_bucket_size for clp-ray (0: pad whole batch)")
    add_summary_arg(ap)
    args = ap.parse_args()
    records = load_records(500)
    with tempfile.TemporaryDirectory() as tmp:
        backbone = build_backbone(Path(tmp) / "backbone")
        rates: dict[str, list[float]] = {"plain": [], "st": [], "clp": []}
        for _ in range(args.rounds):  # interleaved so machine drift hits all three alike
            rates["plain"].append(clp_ray_rate(backbone, records, args, lam=0.0))
            rates["st"].append(sentence_transformers_rate(backbone, records, args))
            rates["clp"].append(clp_ray_rate(backbone, records, args, lam=0.1))
    r = {k: statistics.median(v) for k, v in rates.items()}
    vs_st = r["plain"] / r["st"]
    clp_cost = r["plain"] / r["clp"]  # time per example, CLP relative to plain CL
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; backbone hidden 384 x 6 layers; "
          f"batch {args.batch}, group {args.group}, q/p len 32/128; median of {args.rounds} rounds x {args.steps} steps")
    print(f"  sentence-transformers MNRL   {r['st']:8.1f} examples/s")
    print(f"  clp-ray plain CL (lam=0)     {r['plain']:8.1f} examples/s")
    print(f"  clp-ray CLP (lam=0.1)        {r['clp']:8.1f} examples/s")
    print(f"clp-ray plain / sentence-transformers: {vs_st:.2f}x  (target >= 1.20x: {'PASS' if vs_st >= 1.2 else 'FAIL'})")
    print(f"CLP time / plain CL time:              {clp_cost:.2f}x  (target <= 1.30x: {'PASS' if clp_cost <= 1.3 else 'FAIL'})")
    if args.summary:
        write_json(args.summary, {"torch": torch.__version__, "threads": torch.get_num_threads(), "batch": args.batch,
                                  "group": args.group, "steps": args.steps, "rounds": args.rounds,
                                  "examples_per_s": r, "plain_over_sentence_transformers": vs_st,
                                  "clp_time_over_plain": clp_cost})


if __name__ == "__main__":
    main()
