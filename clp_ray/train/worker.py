"""The Ray Train worker loop: one :class:`TrainWorker` per rank.

Setup: the Embedder (MoE upcycled, the train-only policy applied), the CLP objective, the data
(reloaded from the validated files, the dev split carved the same way on every rank), a
:class:`~clp_ray.train.schedule.StepPlan` and the DeepSpeed engine. Then :meth:`TrainWorker.run`:
:meth:`restore` from the latest checkpoint if any, and per micro-batch :meth:`step`; after each
optimizer step :meth:`log` (rank 0, MLflow) and, every eval period, :meth:`evaluate_and_checkpoint`
— every rank computes the dev metrics, saves its DeepSpeed shard, RNG state and data position into
one checkpoint directory, and all report together. A restart resumes at the next micro-batch, so
a resumed run takes the same optimizer steps as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import ray.train
import ray.train.torch
import torch

from clp_ray.data import Collator, load_records, rank_batches, sample_group
from clp_ray.evaluation import evaluate_config
from clp_ray.evaluation.dev_set import build_dev_set, training_split
from clp_ray.evaluation.rank_encode import RankShardedEncoder
from clp_ray.loss.objective import CLPObjective, ObjectiveOutput
from clp_ray.loss.settings import LossSettings
from clp_ray.model.moe import apply_train_only, effective_train_only
from clp_ray.model.prefix_cache import attach as attach_prefix_cache
from clp_ray.model.source import load_embedder
from clp_ray.tracking.runs import Tracker
from clp_ray.train.engine import build_engine, num_tokens, rng_state, save_final_model, set_rng_state, to_device
from clp_ray.train.heads import apply_heads_policy
from clp_ray.train.payload import WorkerPayload
from clp_ray.train.precision import autocast, autocast_dtype
from clp_ray.train.precision import describe as describe_precision
from clp_ray.train.schedule import plan_steps
from clp_ray.util.redact import install_log_filter

log = logging.getLogger(__name__)

CKPT_TAG = "ds"
STATE_FILE = "train_state.json"
MODEL_DIR = "model"


@dataclass
class RunState:
    """Where the run is; saved with every checkpoint (rank 0's copy)."""

    micro_step: int = 0
    global_step: int = 0
    attempt: int = 0
    dev_init: Optional[dict[str, float]] = None  # the untrained model's dev metrics


@dataclass
class Window:
    """Sums over the optimizer steps since the last MLflow log line."""

    loss: float = 0.0
    contrastive: float = 0.0
    penalty: float = 0.0
    router_loss: float = 0.0
    n: int = 0
    examples: int = 0
    tokens: int = 0
    components: dict[str, float] = field(default_factory=dict)  # unified M3 training's loss terms
    started: float = field(default_factory=time.perf_counter)

    def add(self, out: ObjectiveOutput, examples: int, tokens: int) -> None:
        self.loss += float(out.loss.detach())
        self.contrastive += float(out.contrastive.detach())
        self.penalty += float(out.penalty.detach())
        self.router_loss += float(out.router_loss.detach())
        for k, v in out.components.items():
            self.components[k] = self.components.get(k, 0.0) + float(v.detach())
        self.n += 1
        self.examples += examples
        self.tokens += tokens

    def metrics(self) -> dict[str, float]:
        dt, n = max(time.perf_counter() - self.started, 1e-9), max(self.n, 1)
        return {"train/loss": self.loss / n, "train/contrastive": self.contrastive / n,
                "train/penalty": self.penalty / n, "train/router_loss": self.router_loss / n,
                "train/examples_per_s": self.examples / dt, "train/tokens_per_s": self.tokens / dt,
                **{f"train/m3_{k}": v / n for k, v in self.components.items()}}


class TrainWorker:
    def __init__(self, payload: WorkerPayload):
        import deepspeed  # heavy, and picks its accelerator on first use: workers only

        self.payload, self.cfg = payload, payload.cfg
        self.loss = LossSettings.from_config(payload.cfg)  # the one loss-settings object (objective, data)
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{self.rank} %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
        install_log_filter()
        self._build_model()
        self._load_data()
        self.autocast = autocast_dtype(self.cfg.train.precision, self.device)
        self.plan = plan_steps(len(self.train_ds), self.world, self.cfg.train)
        self.engine, self.scheduler = build_engine(self.objective, payload.ds_config, self.cfg, self.plan.total_opt)
        self.prefix = self._attach_prefix_cache()
        self.stage3 = payload.ds_config["zero_optimization"]["stage"] == 3
        self.tracker = Tracker(payload.tracking.uri, payload.tracking.run_id) if payload.tracking and self.rank == 0 else None
        self.state, self.window, self.resumed_from = RunState(), Window(), 0

    def _build_model(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)  # the same on every rank: the upcycled routers start identical
        random.seed(cfg.train.seed)
        self.embedder = load_embedder(cfg.model, cfg.moe, source=self.payload.model_source)
        apply_train_only(self.embedder, effective_train_only(cfg.moe), layers=cfg.moe.layers, site=cfg.moe.site)
        self.trainable, self.total_params = apply_heads_policy(self.embedder, cfg.model.m3_heads)
        if cfg.model.gradient_checkpointing:
            self.embedder.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        chunk = cfg.train.grad_cache_chunk_size if cfg.train.grad_cache else None
        self.objective = CLPObjective(self.embedder, self.loss, chunk_size=chunk)

    def _attach_prefix_cache(self):
        """After the engine: its namespace hashes the weights as the steps see them (DeepSpeed's bf16
        casts them), so states computed in one precision never serve another."""
        if not self.payload.prefix_cache:
            return None
        if self.payload.ds_config["zero_optimization"]["stage"] == 3:
            log.info("frozen-prefix cache: off under ZeRO-3 (the prefix's weights are partitioned)")
            return None
        return attach_prefix_cache(self.embedder, self.payload.prefix_cache)

    def _load_data(self) -> None:
        d, dev = self.cfg.data, self.payload.dev
        records = load_records(self.payload.data, require_neg_q=self.loss.require_neg_q, group_size=d.train_group_size,
                               max_line_bytes=d.max_line_bytes)
        # The same split as the driver's (seeded), so the dev queries never train.
        self.train_ds, heldout = training_split(records, self.cfg, dev.info.source if dev else None)
        self.dev_set = (dev or build_dev_set(self.cfg, self.train_ds, heldout)).retrieval
        self.collate = Collator.for_embedder(self.embedder, d.length_bucket_size)  # the model's prefixes and lengths
        self._batches: tuple[int, list[list[int]]] = (-1, [])

    # ---------------------------------------------------------------- steps

    def restore(self) -> None:
        """Continue from the latest checkpoint, if any: engine, run state and this rank's RNG."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint:
            with checkpoint.as_directory() as d:
                # Checkpoints hold the trained parameters only; the frozen ones are the model's own,
                # loaded from the same source (the run name pins the config, hence the source).
                self.engine.load_checkpoint(d, tag=CKPT_TAG, load_module_strict=False, load_optimizer_states=True,
                                            load_lr_scheduler_states=True)
                self.state = RunState(**json.loads((Path(d) / STATE_FILE).read_text()))
                set_rng_state(torch.load(Path(d) / f"rng_rank{self.rank}.pt", weights_only=False))
        self.state.attempt += 1
        self.resumed_from = self.state.global_step
        chunk = self.objective.chunk_size
        log.info("start: attempt %d at optimizer step %d/%d (%d micro-batches/epoch/rank, %d trainable of %d params, "
                 "%d torch threads, %s, %s)", self.state.attempt, self.resumed_from, self.plan.total_opt,
                 self.plan.micro_per_epoch, self.trainable, self.total_params, torch.get_num_threads(),
                 f"gradient caching in chunks of {chunk} sequences" if chunk else "no gradient caching",
                 describe_precision(self.cfg.train.precision, self.autocast, self.payload.ds_config))
        if self.state.dev_init is None:
            self.state.dev_init = self.payload.dev_init or self.evaluate()
            if self.tracker:
                self.tracker.log_metrics({f"{k}_init": v for k, v in self.state.dev_init.items()}, step=0)

    def step(self) -> ObjectiveOutput:
        """One micro-batch: forward, backward and (every ``accum`` micro-batches) the optimizer step."""
        epoch, i = divmod(self.state.micro_step, self.plan.micro_per_epoch)
        groups = [sample_group(self.train_ds[j], self.cfg.data.train_group_size, seed=self.cfg.data.seed, epoch=epoch,
                               index=j) for j in self._epoch_batches(epoch)[i]]
        batch = self.collate(groups)
        with autocast(self.autocast, self.device):
            out = self.engine(*(to_device(batch[k], self.device) for k in ("query", "passage", "neg_query")))
        self.engine.backward(out.loss)
        self.engine.step()
        self.state.micro_step += 1
        tokens = sum(num_tokens(batch[k]) for k in ("query", "passage", "neg_query"))
        self.window.add(out, len(groups) * self.world, tokens * self.world)
        return out

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._batches[0] != epoch:
            t, d = self.cfg.train, self.cfg.data
            self._batches = (epoch, rank_batches(len(self.train_ds), rank=self.rank, world=self.world,
                                                 batch_size=t.per_device_batch_size, seed=d.seed, epoch=epoch))
        return self._batches[1]

    def log(self, out: ObjectiveOutput) -> None:
        """Rank 0's MLflow metrics every ``train.log_every_steps`` optimizer steps (and the last)."""
        step = self.state.global_step
        if self.tracker and (step % self.cfg.train.log_every_steps == 0 or step == self.plan.total_opt):
            self.tracker.log_metrics({**self.window.metrics(), "train/lr": self.scheduler.get_last_lr()[0],
                                      **out.router_stats}, step=step)
            self.window = Window()

    def evaluate(self) -> dict[str, float]:
        self.engine.eval()
        # Each rank encodes its share of the dev texts (ZeRO-3 needs every rank in every forward).
        encoder = self.embedder if self.stage3 else RankShardedEncoder(self.embedder, self.rank, self.world)
        started = time.perf_counter()
        res = evaluate_config(encoder, self.dev_set, self.cfg.eval)
        if self.rank == 0:
            log.info("dev evaluation at step %d: %d queries over %d passages in %.1f s (nDCG@10 %.4f)",
                     self.state.global_step, res.num_queries, res.num_docs, time.perf_counter() - started,
                     res.metrics["ndcg@10"])
        if self.prefix is not None:  # every rank evaluates: share this period's new prefix states
            self.prefix.sync()
            s = self.prefix.stats
            log.info("frozen-prefix cache: %d sequences computed, %d served from the cache, %d stored", s.computed,
                     s.hits, len(self.prefix))
        self.engine.train()
        return {f"dev_{k}": v for k, v in res.metrics.items()}

    def evaluate_and_checkpoint(self, final: bool, **extra: Any) -> dict[str, Any]:
        """Dev metrics, then one checkpoint (every rank's shard) reported with them."""
        s = self.state
        metrics = {**self.evaluate(), "step": s.global_step, "final": final, "attempt": s.attempt,
                   "resumed_from_step": self.resumed_from, **extra, **self._prefix_counts(),
                   **{f"{k}_init": v for k, v in (s.dev_init or {}).items()}}
        if self.tracker:
            self.tracker.log_metrics({k: v for k, v in metrics.items() if k.startswith("dev_")}, step=s.global_step)
        with tempfile.TemporaryDirectory(prefix="clp-ckpt-") as tmp:
            # Without the frozen parameters (with train_only=moe, 99% of the model: the E5 local
            # profile's checkpoint shrinks from 470 MB to 5 MB, written and copied every eval period).
            self.engine.save_checkpoint(tmp, tag=CKPT_TAG, exclude_frozen_parameters=True)
            torch.save(rng_state(), Path(tmp) / f"rng_rank{self.rank}.pt")
            if self.rank == 0:
                (Path(tmp) / STATE_FILE).write_text(json.dumps(asdict(s)))
            if final:
                save_final_model(self.embedder, Path(tmp) / MODEL_DIR, self.rank, self.stage3)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        return metrics

    def _prefix_counts(self) -> dict[str, int]:
        """Sequences run through the frozen prefix and served from the cache, summed over the ranks
        (this attempt so far); empty without the cache."""
        if self.prefix is None:
            return {}
        counts = torch.tensor([self.prefix.stats.computed, self.prefix.stats.hits], dtype=torch.int64,
                              device=self.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        return {"prefix_computed": int(counts[0]), "prefix_hits": int(counts[1])}

    def _maybe_fail(self) -> None:
        """The fault-tolerance test hook: raise once per run on the chosen rank and step."""
        t, step = self.cfg.train, self.state.global_step
        if t.debug_fail_at_step == step and self.rank == t.debug_fail_rank:
            marker = Path(self.payload.run_dir) / ".debug_failure_injected"
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(str(step))
                raise RuntimeError(f"debug_fail_at_step: injected failure on rank {self.rank} at step {step}")

    def run(self) -> None:
        self.restore()
        self.engine.train()
        last: dict[str, Any] = {}
        while self.state.micro_step < self.plan.total_micro:
            out = self.step()
            if self.state.micro_step % self.plan.accum:
                continue
            self.state.global_step += 1
            self._maybe_fail()
            self.log(out)
            final = self.state.micro_step >= self.plan.total_micro
            if self.state.global_step % self.plan.eval_every == 0 or final:
                epoch = (self.state.micro_step - 1) // self.plan.micro_per_epoch
                last = self.evaluate_and_checkpoint(final, epoch=epoch, train_loss=float(out.loss.detach()))
        if not last.get("final"):
            # Resumed from a finished run's last checkpoint: nothing left to train; report once so the
            # run has a final checkpoint with the model in it.
            self.evaluate_and_checkpoint(True)


def train_worker(config: dict) -> None:
    """Ray Train's per-worker entry point (``train_loop_config = payload.as_loop_config()``)."""
    TrainWorker(config["payload"]).run()
