"""Does the sweep's dev metric pick the trial that is best on the test split?

A real sweep (``clp_ray.tune.run_sweep``: Ray Tune + Optuna over Ray Train trials, no ASHA
pruning so that every trial ends with a model) on the bundled Korean sample, each trial trained
on the records left after the old document-disjoint dev split, so that both dev sets below are
unseen by every trial. Every trial's final model is then scored on

- ``records`` — the dev set selection used before: the held-out records' queries over a corpus of
  only those records' own positives and negatives (``clp_ray.evaluation.dev_set.dev_retrieval_set``);
- ``full_corpus`` — today's default (``eval.dev_source: auto`` = qrels): the sample's dev queries
  over the full corpus (``clp_ray.evaluation.dev_set.build_dev_set``);
- the test split (the same corpus; dev and test queries are scored from one corpus encoding).

and the Spearman correlation between each dev set's nDCG@10 and the test nDCG@10 over the trials
is reported (scipy), with each dev set's size and its spread over the trials.

    python benchmarks/dev_selection.py [--trials 6] [--epochs 1] [--profile local] [--space profile|wide]
                                       [--work DIR] [--summary FILE]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clp_ray.cli import add_summary_arg, int_at_least  # noqa: E402
from clp_ray.util.atomic import write_json  # noqa: E402

log = logging.getLogger("dev_selection")


# The profile's own ranges hold only good settings (trials within ~0.008 test nDCG@10 of each
# other: noise for 900 queries); the wide ones also hold clearly worse ones, to see whether a dev
# set ranks models that really differ.
WIDE_SPACE = ["search.learning_rate=[1.0e-4, 1.0e-2]", "search.temperature=[0.01, 0.2]", "search.lam=[0.0, 0.5]"]


def sweep_config(profile: str, trials: int, epochs: int, work: Path, space: str = "profile"):
    from clp_ray.config import load_config

    return load_config("ko", profile, [*(WIDE_SPACE if space == "wide" else []),
        # Train on the old split's training records; the held-out records are the old dev set.
        "eval.dev_source=heldout", "data.dev_split=documents",
        # The trials' own dev reports are not what is measured here: judged passages only, cheap.
        "eval.dev_corpus_sample=0",
        f"search.num_samples={trials}", "search.max_concurrent_trials=1", "search.asha_grace_period=1000",
        f"train.epochs={epochs}", f"train.output_dir={work / 'out'}",
        f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}"])


def train_trials(cfg):
    """The sweep's trials (every one trained to the end), the held-out records and the training records."""
    from clp_ray.model.source import num_encoder_layers
    from clp_ray.train import ensure_ray, prepare, resolve_model_path
    from clp_ray.tune.sweep import run_sweep, sweep_name

    cfg = resolve_model_path(cfg)
    prep = prepare(cfg, name=sweep_name)
    ensure_ray(cfg)
    trials = run_sweep(cfg, prep=prep, num_layers=num_encoder_layers(cfg.model), fresh=True)
    return cfg, [t for t in trials if t.model_path]


def dev_sets(cfg):
    """(the records-only dev set, the full-corpus dev set, the test set)."""
    from clp_ray.data import load_records, validate
    from clp_ray.evaluation import load_beir
    from clp_ray.evaluation.dev_set import build_dev_set, dev_retrieval_set, training_split
    from clp_ray.loss.settings import LossSettings

    report = validate(cfg.data.train_paths, require_neg_q=LossSettings.from_config(cfg).require_neg_q, group_size=cfg.data.train_group_size)
    records = load_records(report, require_neg_q=LossSettings.from_config(cfg).require_neg_q, group_size=cfg.data.train_group_size,
                           max_line_bytes=cfg.data.max_line_bytes)
    train, heldout = training_split(records, cfg, "heldout")
    new_cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"dev_source": "auto", "dev_corpus_sample": None})})
    full = build_dev_set(new_cfg, train, heldout, "qrels")  # left out: dev queries that are training queries
    return dev_retrieval_set(heldout), full, load_beir(cfg.eval.data_dir, cfg.eval.test_split)


def score(model_path: str, old, full, test, e) -> dict[str, float]:
    """nDCG@10 on the three sets; the full-corpus dev set and the test split share one corpus encoding."""
    from clp_ray.evaluation import evaluate_config, evaluate_sets
    from clp_ray.model.embedder import Embedder

    emb = Embedder.from_pretrained(model_path)
    assert full.retrieval.corpus == test.corpus
    dev_res, test_res = evaluate_sets(emb, [full.retrieval, test], e)
    return {"records": evaluate_config(emb, old, e).metrics["ndcg@10"], "full_corpus": dev_res.metrics["ndcg@10"],
            "test": test_res.metrics["ndcg@10"]}


def spearman(xs: list[float], ys: list[float]) -> dict[str, float]:
    from scipy import stats

    r = stats.spearmanr(xs, ys)
    return {"rho": float(r.statistic), "p_value": float(r.pvalue)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int_at_least(3), default=6)
    ap.add_argument("--epochs", type=int_at_least(1), default=1)
    ap.add_argument("--profile", default="local", help="local (multilingual-e5-small) or tiny (plumbing only)")
    ap.add_argument("--space", choices=("profile", "wide"), default="profile",
                    help="the profile's search ranges, or wider ones that include clearly worse settings")
    ap.add_argument("--work", type=Path, default=None, help="folder for the sweep (default: a temporary one)")
    add_summary_arg(ap)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dev-selection-") as tmp:
        work = args.work or Path(tmp)
        cfg, trials = train_trials(sweep_config(args.profile, args.trials, args.epochs, work, args.space))
        old, full, test = dev_sets(cfg)
        rows = [{"trial_id": t.trial_id, "params": t.params, **score(t.model_path, old, full, test, cfg.eval)} for t in trials]
    test_scores = [r["test"] for r in rows]
    sets = {"records": {"queries": len(old.queries), "corpus_size": len(old.corpus)},
            "full_corpus": {"queries": full.info.queries, "corpus_size": full.info.corpus_size}}
    for name, s in sets.items():
        dev = [r[name] for r in rows]
        s.update(spearman(dev, test_scores), spread=max(dev) - min(dev),
                 picks_test_rank=1 + sorted(test_scores, reverse=True).index(rows[dev.index(max(dev))]["test"]))
    print(f"\n{'trial':<10} {'lam':>6} {'tau':>6} {'lr':>8} {'dev records':>12} {'dev full':>9} {'test':>7}")
    for r in rows:
        p = r["params"]
        print(f"{r['trial_id']:<10} {p['lam']:>6.3f} {p['temperature']:>6.3f} {p['learning_rate']:>8.2e} "
              f"{r['records']:>12.4f} {r['full_corpus']:>9.4f} {r['test']:>7.4f}")
    for name, s in sets.items():
        print(f"dev set {name:<12} ({s['queries']} queries over {s['corpus_size']} passages): Spearman rho vs test "
              f"{s['rho']:+.3f} (p {s['p_value']:.3g}), spread {s['spread']:.4f}, its best trial is #{s['picks_test_rank']} on test")
    summary = {"trials": rows, "dev_sets": sets, "epochs": args.epochs, "profile": args.profile, "space": args.space,
               "test_spread": max(test_scores) - min(test_scores), "wall_s": time.perf_counter() - started}
    if args.summary:
        write_json(args.summary, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
