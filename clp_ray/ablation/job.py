"""The ablation job (``jobs/ablate.py``): the paper's table — base model, CL, CLP, CLP + MoE, or the
arms the ``ablation`` config section names — on one language's data, over seeds, with paired
significance tests.

Every check that can fail on user input runs first (arms, overrides, MoE layers, data, storage,
MLflow), before any cluster work. Finished runs are kept per run (``<train.output_dir>/
ablation_runs/<run>/``), so re-running the command trains and evaluates only what is missing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from clp_ray.ablation.arms import Arm, RunSpec, base_arm, plan_runs, resolve_arms
from clp_ray.ablation.report import write_report
from clp_ray.ablation.results import AblationOutcome, ArmResult, RunResult, TrainedRun
from clp_ray.ablation.runs import train_runs
from clp_ray.ablation.stats import compare_arms, comparison_pairs
from clp_ray.config import ExperimentConfig
from clp_ray.data.samples import check_data_language
from clp_ray.errors import ConfigError
from clp_ray.evaluation import RetrievalSet, evaluate_config, format_metrics, load_beir
from clp_ray.model.embedder import Embedder
from clp_ray.model.prefix_cache import for_inference
from clp_ray.model.source import load_embedder, num_encoder_layers
from clp_ray.tracking.runs import Tracker, ending, git_commit, resume_or_start_run, start_run
from clp_ray.train.prefix_fill import fill_key, prefill
from clp_ray.train.preflight import (
    PreparedRun,
    check_consistency,
    check_moe_layers,
    check_resources,
    prepare,
    resolve_model_path,
    run_hash,
    run_lock,
)
from clp_ray.train.run import ensure_ray
from clp_ray.util.storage import local_folder

log = logging.getLogger(__name__)


def ablation_name(cfg: ExperimentConfig, data_hash: str) -> str:
    return f"ablate-{cfg.lang}-{run_hash(cfg, data_hash)}"


@dataclass
class _Context:
    cfg: ExperimentConfig
    arms: list[Arm]
    runs: list[RunSpec]
    prep: PreparedRun
    test_set: RetrievalSet
    out_dir: Path  # <train.output_dir>/<ablation name>
    runs_dir: Path  # <train.output_dir>/ablation_runs

    def folder(self, run: str) -> Path:
        return self.runs_dir / run


def _check_arms(cfg: ExperimentConfig) -> list[Arm]:
    arms = resolve_arms(cfg)
    layers = num_encoder_layers(cfg.model)
    for arm in arms:
        if arm.train:
            check_consistency(arm.cfg)
            check_moe_layers(arm.cfg, layers)
    if not any(a.train for a in arms):
        raise ConfigError(f"{cfg.origin('ablation.arms')}: ablation.arms: no arm trains (every arm has train: false)")
    return arms


def run_ablation_job(cfg: ExperimentConfig) -> AblationOutcome:
    check_data_language(cfg)  # before the model is resolved (the offline rebuild takes seconds)
    cfg = resolve_model_path(cfg)
    arms = _check_arms(cfg)
    if not cfg.eval.data_dir:
        raise ConfigError("eval.data_dir is not set: every arm is evaluated on its held-out test split")
    prep = prepare(cfg, name=ablation_name)
    test_set = load_beir(cfg.eval.data_dir, cfg.eval.test_split, miracl_root=cfg.eval.miracl_root)
    out = Path(cfg.train.output_dir).resolve()
    ctx = _Context(cfg, arms, plan_runs(cfg, arms, prep.data_hash), prep, test_set, out / prep.name, out / "ablation_runs")
    with run_lock(cfg, prep.name):  # a second identical command stops here
        done, todo = _progress(ctx)
        if todo:  # a re-run with every model trained needs no cluster
            ensure_ray(cfg)
            check_resources(cfg)
        parent = _open_parent(ctx)
        log.info("ablation %s: %d arms, %d runs, MLflow parent run %s", prep.name, len(arms), len(ctx.runs), parent.run_id)
        with ending(parent):
            return _run(ctx, parent, done, todo)


def _open_parent(ctx: _Context) -> Tracker:
    cfg, prep = ctx.cfg, ctx.prep

    def on_start(tracker: Tracker) -> None:
        tracker.log_params({**cfg.flat(), **prep.settings_params(), "data.content_hash": prep.data_hash,
                            "eval.set_hash": ctx.test_set.content_hash()})
        tracker.log_text(cfg.to_yaml(), "config.yaml")

    return resume_or_start_run(cfg, ctx.out_dir / "mlflow_parent_run_id", prep.name, on_start=on_start, tags={
        "clp_ray.kind": "ablation", "clp_ray.data_hash": prep.data_hash, "clp_ray.eval_set_hash": ctx.test_set.content_hash(),
        "clp_ray.git_commit": git_commit()})


def _progress(ctx: _Context) -> tuple[dict[str, Optional[RunResult]], list[RunSpec]]:
    """The runs already evaluated (from their folders) and those still to train."""
    h = ctx.test_set.content_hash()
    done = {s.name: RunResult.load(ctx.folder(s.name), h) for s in ctx.runs}
    todo = [s for s in ctx.runs if s.train and done[s.name] is None and TrainedRun.load(ctx.folder(s.name)) is None]
    log.info("ablation %s: %d of %d runs already finished, %d to train", ctx.prep.name,
             sum(r is not None for r in done.values()), len(ctx.runs), len(todo))
    return done, todo


def _run(ctx: _Context, parent: Tracker, done: dict[str, Optional[RunResult]], todo: list[RunSpec]) -> AblationOutcome:
    if todo:
        filled = set()
        for s in todo:  # the arms and seeds with one frozen prefix and one set of texts share one fill
            key = fill_key(s.cfg)
            if key not in filled:
                filled.add(key)
                prefill(s.cfg, ctx.prep)
        train_runs(todo, ctx.cfg, data=ctx.prep.data, storage=ctx.prep.storage, name=ctx.prep.name, parent=parent,
                   folder_of=ctx.folder, dev=ctx.prep.dev)
    for s in ctx.runs:
        if done[s.name] is None:
            done[s.name] = _evaluate_run(ctx, s, parent)
    arm_results = [ArmResult(a.name, a.overrides, a.train, [done[s.name] for s in ctx.runs if s.arm == a.name])
                   for a in ctx.arms]
    return _report(ctx, parent, arm_results, trained_now=len(todo))


def _evaluate_run(ctx: _Context, spec: RunSpec, parent: Tracker) -> RunResult:
    """The run's model (trained, or the arm's model as loaded) on the full test split, with its TREC
    run file; its metrics go to its MLflow child run (one is opened for an untrained arm)."""
    folder, e = ctx.folder(spec.name), ctx.cfg.eval
    if spec.train:
        trained = TrainedRun.load(folder)
        model_path = trained.model_path
        embedder = Embedder.from_pretrained(local_folder(model_path, folder))
        tracker = Tracker(parent.uri, trained.mlflow_run_id) if trained.mlflow_run_id else None
    else:
        model_path, embedder = spec.cfg.model.name_or_path, load_embedder(spec.cfg.model)
        tracker = Tracker(parent.uri, _untrained_child(ctx, spec, parent))
    for_inference(embedder, spec.cfg)  # arms that freeze one prefix share its states
    log.info("evaluating %s (arm %s, seed %s) on %s", spec.name, spec.arm, spec.seed, ctx.test_set.name)
    res = evaluate_config(embedder, ctx.test_set, e, run_file=folder / "test.trec", show_progress=True)
    log.info("%s: %s", spec.name, format_metrics(res.metrics))
    result = RunResult(spec.arm, spec.seed, spec.name, str(model_path), str(folder / "test.trec"), res.metrics,
                       res.per_query, ctx.test_set.content_hash(), tracker.run_id if tracker else None)
    if tracker:
        tracker.log_metrics({f"test_{k}": v for k, v in res.metrics.items()})
        tracker.set_tags({"clp_ray.status": "evaluated"})
        tracker.end("FINISHED")
    result.save(folder)
    return result


def _untrained_child(ctx: _Context, spec: RunSpec, parent: Tracker) -> str:
    t = start_run(spec.cfg, spec.name, parent_run_id=parent.run_id,
                  tags={"clp_ray.kind": "ablation_run", "clp_ray.ablation_run": spec.name, "clp_ray.arm": spec.arm})
    t.log_params({"model.name_or_path": spec.cfg.model.name_or_path, "ablation.arm": spec.arm, "ablation.train": False})
    return t.run_id


def _report(ctx: _Context, parent: Tracker, arms: list[ArmResult], trained_now: int) -> AblationOutcome:
    cfg = ctx.cfg
    metrics, baseline, base = list(cfg.ablation.metrics), cfg.ablation.baseline_arm, base_arm(cfg)
    per_query = {a.name: {m: a.per_query(m) for m in metrics} for a in arms}
    comparisons = compare_arms(per_query, comparison_pairs([a.name for a in arms], baseline, base), metrics)
    md, table, plot = write_report(arms, comparisons, metrics, baseline, base, ctx.out_dir / "report")
    parent.log_artifacts(str(ctx.out_dir / "report"), "ablation")  # ablation.md, ablation.csv, ablation.png
    parent.log_metrics({f"{a.name}_{m}": a.metric(m).mean for a in arms for m in metrics})
    return AblationOutcome(ctx.prep.name, arms, comparisons, metrics, baseline, base, str(md), str(table), str(plot),
                           parent.run_id, trained_now)
