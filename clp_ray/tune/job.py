"""The tune job (``jobs/tune.py``): checks, the base model's test result, the sweep, the best
trial on the held-out test split, the registry and ``@champion``."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from clp_ray.config import ExperimentConfig
from clp_ray.data.samples import check_data_language
from clp_ray.errors import ClpRayError, ConfigError
from clp_ray.evaluation import (
    EvalResult,
    RetrievalSet,
    compare,
    evaluate_config,
    evaluate_sets,
    load_beir,
    load_result,
    save_result,
)
from clp_ray.evaluation.dev_set import DevSetInfo
from clp_ray.model.embedder import Embedder
from clp_ray.model.prefix_cache import for_inference
from clp_ray.model.source import load_embedder, num_encoder_layers
from clp_ray.tracking.registry import Promotion, load_registered_embedder, log_embedder_model, promote_if_better
from clp_ray.tracking.runs import Tracker, ending, git_commit, metric_key, registered_model_name, resume_or_start_run
from clp_ray.train.prefix_fill import prefill
from clp_ray.train.preflight import (
    PreparedRun,
    check_moe_layers,
    check_resources,
    model_settings,
    prepare,
    resolve_model_path,
    run_lock,
)
from clp_ray.train.run import ensure_ray
from clp_ray.tune.plots import write_sweep_plots
from clp_ray.tune.space import apply_params, check_space, searches_moe
from clp_ray.tune.sweep import METRIC, TrialSummary, check_concurrency, run_sweep, sweep_name
from clp_ray.util.storage import local_folder

log = logging.getLogger(__name__)


@dataclass
class TuneOutcome:
    sweep: str
    trials: list[TrialSummary]
    best: TrialSummary
    best_config: ExperimentConfig
    test_metrics: dict[str, float]
    registered_name: str
    version: str
    promotion: Promotion
    parent_run_id: str
    base_test_metrics: dict[str, float] = field(default_factory=dict)
    p_value_vs_base: Optional[float] = None  # paired t-test on per-query test nDCG@10, best trial vs base
    data_files: list[str] = field(default_factory=list)  # the training files read (folders expanded)
    dev_set: Optional[DevSetInfo] = None  # what the trials were selected on
    base_dev_metrics: dict[str, float] = field(default_factory=dict)  # the untrained model on the dev set


@dataclass
class _Context:
    """What the job's later steps share."""

    cfg: ExperimentConfig
    prep: PreparedRun
    layers: int
    test_set: RetrievalSet
    out_dir: Path  # <train.output_dir>/<sweep name>


def _base_eval_path(cfg: ExperimentConfig, data: RetrievalSet) -> Path:
    key = json.dumps({"model": cfg.model.name_or_path, "tiny": cfg.model.tiny.model_dump(),
                      "settings": model_settings(cfg).settings.to_dict(), "eval_set": data.content_hash(),
                      "top_k": cfg.eval.top_k, "mode": cfg.eval.mode, "hybrid_weights": cfg.eval.hybrid_weights.model_dump(),
                      "rerank_depth": cfg.eval.rerank_depth, "format": 1}, sort_keys=True)
    return Path(cfg.train.output_dir).resolve() / "base_eval" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def base_model_results(cfg: ExperimentConfig, sets: list[RetrievalSet]) -> list[EvalResult]:
    """The untrained model's result on each of ``sets`` (the test split, the dev set; per-query
    scores kept for the paired test), cached on disk per (model, its settings, evaluation set,
    depth, mode): a resumed or repeated sweep does not pay again. Sets over one corpus share one
    corpus encoding."""
    paths = [_base_eval_path(cfg, s) for s in sets]
    results = [load_result(p) for p in paths]
    todo = [i for i, r in enumerate(results) if r is None]
    for i in set(range(len(sets))) - set(todo):
        log.info("base model's metrics on %s from %s", sets[i].name, paths[i])
    if todo:
        log.info("evaluating the base model (no training) on %s", " and ".join(sets[i].name for i in todo))
        embedder = load_embedder(cfg.model)
        for_inference(embedder, cfg)  # the trials' dev evaluations then run only the top of the corpus encode
        fresh = evaluate_sets(embedder, [sets[i] for i in todo], cfg.eval, show_progress=True)
        for i, res in zip(todo, fresh):
            save_result(res, paths[i])
            results[i] = res
    return results


def base_model_result(cfg: ExperimentConfig, test_set: RetrievalSet) -> EvalResult:
    """:func:`base_model_results` of one set."""
    return base_model_results(cfg, [test_set])[0]


base_model_test = base_model_result  # the name it had before it scored the dev set too


def run_tune_job(cfg: ExperimentConfig, *, fresh: bool = False) -> TuneOutcome:
    """Everything that can fail on user input fails first, before any cluster work."""
    check_data_language(cfg)  # before the model is resolved (the offline rebuild takes seconds)
    cfg = resolve_model_path(cfg)
    layers = num_encoder_layers(cfg.model)
    check_space(cfg, layers)
    if not searches_moe(cfg):  # otherwise every trial gets its layers from the search space
        check_moe_layers(cfg, layers)
    if not cfg.eval.data_dir:
        raise ConfigError("eval.data_dir is not set: the best trial is evaluated on its held-out test split")
    prep = prepare(cfg, name=sweep_name)
    test_set = load_beir(cfg.eval.data_dir, cfg.eval.test_split, miracl_root=cfg.eval.miracl_root)
    with run_lock(cfg, prep.name):  # before any cluster work: a second identical command stops here
        ensure_ray(cfg)
        check_resources(cfg)
        check_concurrency(cfg)
        ctx = _Context(cfg, prep, layers, test_set, Path(cfg.train.output_dir).resolve() / prep.name)
        return _sweep_and_register(ctx, fresh)


def _open_parent(ctx: _Context, fresh: bool) -> Tracker:
    cfg, prep = ctx.cfg, ctx.prep

    def on_start(tracker: Tracker) -> None:
        tracker.log_params({**{f"search.{k}": v for k, v in cfg.search.model_dump().items()},
                            "model.name_or_path": cfg.model.name_or_path, "data.content_hash": prep.data_hash,
                            **prep.settings_params(), **(prep.dev.info.as_params() if prep.dev else {})})
        tracker.log_text(cfg.to_yaml(), "config.yaml")
        tracker.log_text(json.dumps(prep.model_settings, indent=2), "model_settings.json")

    return resume_or_start_run(
        cfg, ctx.out_dir / "mlflow_parent_run_id", prep.name, resume=not fresh, on_start=on_start,
        tags={"clp_ray.kind": "sweep", "clp_ray.data_hash": prep.data_hash, "clp_ray.git_commit": git_commit()})


def _sweep_and_register(ctx: _Context, fresh: bool) -> TuneOutcome:
    """The MLflow parent run around the base model, the sweep, the test and the registry."""
    parent = _open_parent(ctx, fresh)
    log.info("sweep %s: %d trials, MLflow parent run %s", ctx.prep.name, ctx.cfg.search.num_samples, parent.run_id)
    with ending(parent):  # KILLED on an interrupt: the next run of the same command continues this run
        # Every trial's untrained dev metrics too, computed once here (an upcycled model equals
        # its dense base at init), not once per trial on its workers.
        base, base_dev = base_model_results(ctx.cfg, [ctx.test_set, ctx.prep.dev.retrieval])
        parent.log_metrics({**{f"base_test_{k}": v for k, v in base.metrics.items()},
                            **{f"base_dev_{k}": v for k, v in base_dev.metrics.items()}})
        ctx.prep.dev_init = {f"dev_{k}": v for k, v in base_dev.metrics.items()}
        prefill(ctx.cfg, ctx.prep)  # every trial's epochs read the frozen prefix's states
        trials = run_sweep(ctx.cfg, prep=ctx.prep, num_layers=ctx.layers, fresh=fresh, parent_tracker=parent)
        best, best_model, res = _test_best(ctx, trials)
        vs_base = compare(base, res, "ndcg@10")
        log.info("test nDCG@10: best trial %.4f, base model %.4f (paired t-test p = %.3g)", vs_base.mean_b,
                 vs_base.mean_a, vs_base.p_value)
        parent.log_metrics({f"best_{METRIC}": best.dev_metric, **{f"test_{k}": v for k, v in res.metrics.items()},
                            "p_value_vs_base": vs_base.p_value})
        write_sweep_plots(trials, ctx.cfg, ctx.layers, ctx.out_dir / "plots")
        parent.log_artifacts(ctx.out_dir / "plots", "plots")
        version, promotion = _register(ctx, parent, best, best_model, res, base, vs_base.p_value)
    return TuneOutcome(ctx.prep.name, trials, best, apply_params(ctx.cfg, best.params), res.metrics,
                       registered_model_name(ctx.cfg), version, promotion, parent.run_id, base.metrics,
                       vs_base.p_value, ctx.prep.data_files, ctx.prep.dev.info, base_dev.metrics)


def _test_best(ctx: _Context, trials: list[TrialSummary]) -> tuple[TrialSummary, Path, EvalResult]:
    """The best completed trial by dev metric, its model (a local copy when the trials' storage is
    remote) and its result on the held-out test split."""
    completed = [t for t in trials if t.status == "completed" and t.model_path]
    if not completed:
        raise ClpRayError(f"no trial of sweep {ctx.prep.name} completed "
                          f"({', '.join(f'{t.trial_id}: {t.status}' for t in trials)})")
    best = max(completed, key=lambda t: t.dev_metric if t.dev_metric is not None else -1.0)
    log.info("best trial %s: %s = %.4f; evaluating on %s", best.trial_id, METRIC, best.dev_metric, ctx.test_set.name)
    best_model = local_folder(best.model_path, ctx.out_dir)
    e = ctx.cfg.eval
    embedder = Embedder.from_pretrained(best_model)
    for_inference(embedder, apply_params(ctx.cfg, best.params))
    res = evaluate_config(embedder, ctx.test_set, e, show_progress=True)
    return best, best_model, res


def _register(ctx: _Context, parent: Tracker, best: TrialSummary, best_model: Path, res: EvalResult,
              base: EvalResult, p_value: float) -> tuple[str, Promotion]:
    """A new version of ``clp-ray-<lang>`` with its lineage tags, then the promotion rule."""
    cfg, e = ctx.cfg, ctx.cfg.eval
    reg_name = registered_model_name(cfg)
    tags: dict[str, Any] = {
        **{f"param.{k}": v for k, v in best.params.items()}, "moe.layers": apply_params(cfg, best.params).moe.layers,
        f"dev_{metric_key('ndcg@10')}": best.dev_metric, **{f"test_{metric_key(k)}": v for k, v in res.metrics.items()},
        **{f"base_test_{metric_key(k)}": v for k, v in base.metrics.items()}, "p_value_vs_base": p_value,
        "data_hash": ctx.prep.data_hash, "eval_set_hash": ctx.test_set.content_hash(), "git_commit": git_commit(),
        "trial_id": best.trial_id, "sweep": ctx.prep.name}
    mv = log_embedder_model(parent, best_model, registered_name=reg_name, tags=tags)

    def rescore(model_uri: str) -> float:
        emb = load_registered_embedder(model_uri, parent.uri)
        for_inference(emb, cfg)
        return evaluate_config(emb, ctx.test_set, e).metrics["ndcg@10"]

    promotion = promote_if_better(parent.uri, reg_name, mv.version, rescore=rescore, base_score=base.metrics["ndcg@10"])
    parent.set_tags({"clp_ray.registered_version": mv.version, "clp_ray.promotion": promotion.reason})
    return mv.version, promotion
