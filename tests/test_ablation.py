"""jobs/ablate.py: arms x seeds trained on the same data, the table's numbers against their
sources (the runs, a re-evaluation, scipy, a hand-made Holm), resuming, and bad arms."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import ir_measures
import pytest
from conftest import run_in_process
from scipy import stats

from clp_ray.ablation.stats import compare_arms, comparison_pairs, holm, paired_p_value, seed_average, spread
from clp_ray.config import load_config
from clp_ray.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
METRICS = ["ndcg@10", "ndcg@5", "recall@100", "mrr@10"]
ARMS = "ablation.arms=[{name: base, train: false}, {name: cl, overrides: {loss.lam: 0.0}}, {name: clp}]"


def hand_holm(ps: list[float]) -> list[float]:
    """Holm's step-down adjustment written out: the i-th smallest p times (m - i), running max, cap 1."""
    m = len(ps)
    order = sorted(range(m), key=lambda i: ps[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out


def test_holm_matches_a_hand_computation():
    ps = [0.01, 0.04, 0.03, 0.005, 0.5, 0.04]
    assert holm(ps) == pytest.approx(hand_holm(ps))
    assert holm([]) == []


def test_paired_test_and_seed_average_against_scipy():
    a = {"q1": 0.1, "q2": 0.5, "q3": 0.9, "q4": 0.3}
    b = {"q1": 0.2, "q2": 0.5, "q3": 1.0, "q4": 0.6}
    assert paired_p_value(a, b) == pytest.approx(stats.ttest_rel([0.1, 0.5, 0.9, 0.3], [0.2, 0.5, 1.0, 0.6]).pvalue)
    assert paired_p_value(a, dict(a)) == 1.0
    avg = seed_average([a, b])
    assert avg == pytest.approx({"q1": 0.15, "q2": 0.5, "q3": 0.95, "q4": 0.45})
    s = spread([0.5, 0.7, 0.6])
    assert (s.mean, s.std) == pytest.approx((0.6, statistics.stdev([0.5, 0.7, 0.6])))
    assert spread([0.4]).std == 0.0
    pairs = comparison_pairs(["base", "cl", "clp", "clp_moe"], "cl", "base")
    assert pairs == [("clp", "cl"), ("clp_moe", "cl"), ("cl", "base"), ("clp", "base"), ("clp_moe", "base")]
    assert comparison_pairs(["base", "cl", "clp"], "base", "base") == [("cl", "base"), ("clp", "base")]
    out = compare_arms({"x": {"m": a}, "y": {"m": b}, "z": {"m": avg}}, [("x", "y"), ("z", "y")], ["m"])
    raw = [paired_p_value(a, b), paired_p_value(avg, b)]
    assert [c.p_holm for c in out] == pytest.approx(hand_holm(raw))
    assert out[0].diff == pytest.approx(statistics.fmean(a.values()) - statistics.fmean(b.values()))


def test_default_arms_are_the_papers_four():
    from clp_ray.ablation.arms import resolve_arms

    cfg = load_config("ko", "local")
    arms = {a.name: a for a in resolve_arms(cfg)}
    assert list(arms) == ["base", "cl", "clp", "clp_moe"] and cfg.ablation.baseline_arm == "cl"
    assert not arms["base"].train and all(arms[n].train for n in ("cl", "clp", "clp_moe"))
    assert arms["cl"].cfg.loss.lam == 0.0 and arms["clp"].cfg.loss.lam == arms["clp_moe"].cfg.loss.lam == cfg.loss.lam > 0
    assert not arms["cl"].cfg.moe.enabled and not arms["clp"].cfg.moe.enabled and arms["clp_moe"].cfg.moe.enabled
    # MoE off while the profile trains only MoE layers: the dense weights the MoE arm upcycles train.
    assert arms["cl"].cfg.moe.train_only == arms["clp"].cfg.moe.train_only == "site"
    assert arms["clp_moe"].cfg.moe.train_only == "moe"


@pytest.mark.parametrize("arms, expected", [
    ("[{name: cl, overrides: {loss.lamm: 0.0}}]", "ablation.arms[0] (cl).overrides"),
    ("[{name: cl, overrides: {data.train_group_size: 4}}]", "data.train_group_size: an arm cannot change it"),
    ("[{name: cl, overrides: {train: {epochs: 3}}}]", "train.epochs: an arm cannot change it"),
])
def test_bad_arm_overrides_fail_with_the_key_path(arms, expected):
    from clp_ray.ablation.arms import resolve_arms

    cfg = load_config("ko", "tiny", [f"ablation.arms={arms}", "ablation.baseline_arm=cl"])
    with pytest.raises(ConfigError) as e:
        resolve_arms(cfg)
    assert expected in str(e.value) and "--set ablation.arms=" in str(e.value)
    if "lamm" in arms:
        assert "loss.lamm: unknown key (did you mean lam?)" in str(e.value)


@pytest.mark.parametrize("sets, expected", [
    (["ablation.arms=[]"], "ablation.arms: List should have at least 1 item"),
    (["ablation.arms=[{name: cl}, {name: cl, overrides: {loss.lam: 0.2}}]"], "duplicate arm name 'cl'"),
    (["ablation.baseline_arm=nope"], "ablation.baseline_arm 'nope' is not an arm (arms: base, cl, clp, clp_moe)"),
    (["ablation.arms=[{name: cl, overrides: {loss.lamm: 0.0}}]", "ablation.baseline_arm=cl"],
     "loss.lamm: unknown key (did you mean lam?)"),
])
def test_bad_arms_exit_2_before_any_training(tmp_path, sets, expected):
    p = run_in_process("ablate.py", "--lang", "ko", "--profile", "tiny", "--set", f"train.output_dir={tmp_path}",
                       *[a for s in sets for a in ("--set", s)])
    assert p.returncode == 2, p.stderr[-2000:]
    assert expected in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "ray_results").exists()  # nothing trained, Ray never started


def _per_query_from_run_file(run_file: str, qrels) -> dict[str, dict[str, float]]:
    """Per-query scores recomputed from a TREC run file with ir_measures directly."""
    names = {"ndcg@10": "nDCG@10", "ndcg@5": "nDCG@5", "recall@100": "R@100", "mrr@10": "RR@10"}
    measures = {k: ir_measures.parse_measure(v) for k, v in names.items()}
    run = {}
    for r in ir_measures.read_trec_run(run_file):
        run.setdefault(r.query_id, {})[r.doc_id] = r.score
    out = {k: {q: 0.0 for q in qrels} for k in names}
    by = {m: k for k, m in measures.items()}
    for row in ir_measures.iter_calc(list(measures.values()), qrels, run):
        out[by[row.measure]][row.query_id] = row.value
    return out


@pytest.mark.slow
@pytest.mark.ray  # starts Ray: run apart from the rest (scripts/test.sh)
@pytest.mark.timeout(1200)
def test_ablation_end_to_end_numbers_and_resume(tmp_path, small_data):
    import ray
    from mlflow import MlflowClient

    from clp_ray.ablation import run_ablation_job
    from clp_ray.evaluation import evaluate, load_beir
    from clp_ray.model.embedder import Embedder
    from clp_ray.train import ensure_ray

    sets = [f"data.train_paths=[{small_data}]", "data.train_group_size=2", "train.per_device_batch_size=4",
            "train.max_steps=3", "train.epochs=1", f"train.output_dir={tmp_path / 'out'}", ARMS,
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "ablation.seeds=2", "ray.num_cpus=5"]
    cfg = load_config("ko", "tiny", sets)
    ensure_ray(cfg)
    try:
        out = run_ablation_job(cfg)
    finally:
        ray.shutdown()
    s = out.summary()
    assert [a["name"] for a in s["arms"]] == ["base", "cl", "clp"] and out.trained_now == 4
    assert [len(a["runs"]) for a in s["arms"]] == [1, 2, 2]
    test_set = load_beir(cfg.eval.data_dir, "test")
    for arm in s["arms"]:
        for m in METRICS:  # the table's means are the runs' means
            vals = [r["metrics"][m] for r in arm["runs"]]
            assert arm["metrics"][m]["mean"] == pytest.approx(statistics.fmean(vals), abs=1e-12)
            assert arm["metrics"][m]["std"] == pytest.approx(statistics.stdev(vals) if len(vals) > 1 else 0.0, abs=1e-12)
    seeds = [r["seed"] for r in s["arms"][1]["runs"]]
    assert seeds == [cfg.train.seed, cfg.train.seed + 1] and s["arms"][0]["runs"][0]["seed"] is None
    for arm in s["arms"][1:]:  # each run's metrics are its saved model's
        for r in arm["runs"]:
            again = evaluate(Embedder.from_pretrained(r["model_path"]), test_set, batch_size=cfg.eval.batch_size)
            assert again.metrics == pytest.approx(r["metrics"], abs=1e-6)
    assert s["arms"][1]["runs"][0]["metrics"] != s["arms"][1]["runs"][1]["metrics"]  # the seeds differ

    # p-values: scipy on the seed-averaged per-query scores, rebuilt from the run files; Holm by hand.
    pq = {a["name"]: [_per_query_from_run_file(r["run_file"], test_set.qrels) for r in a["runs"]] for a in s["arms"]}
    for m in METRICS:
        comps = [c for c in s["comparisons"] if c["metric"] == m]
        assert [(c["arm"], c["against"]) for c in comps] == [("clp", "cl"), ("cl", "base"), ("clp", "base")]
        raw = []
        for c in comps:
            xa = seed_average([r[m] for r in pq[c["arm"]]])
            xb = seed_average([r[m] for r in pq[c["against"]]])
            q = sorted(xa)
            p = stats.ttest_rel([xa[i] for i in q], [xb[i] for i in q]).pvalue
            assert c["p_value"] == pytest.approx(p, rel=1e-6)
            assert c["diff"] == pytest.approx(statistics.fmean(xa.values()) - statistics.fmean(xb.values()), abs=1e-9)
            raw.append(c["p_value"])
        assert [c["p_holm"] for c in comps] == pytest.approx(hand_holm(raw))

    table = Path(s["table_path"]).read_text()
    assert "| clp | 2 |" in table and "Δ nDCG@10 vs cl" in table
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    arts = {a.path for a in client.list_artifacts(out.mlflow_parent_run_id, "ablation")}
    assert arts == {"ablation/ablation.md", "ablation/ablation.csv", "ablation/ablation.png"}
    parent = client.get_run(out.mlflow_parent_run_id)
    assert {"clp_ray.data_hash", "clp_ray.eval_set_hash", "clp_ray.git_commit"} <= set(parent.data.tags)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{out.mlflow_parent_run_id}'")
    assert len(children) == 5 and all(c.info.status == "FINISHED" for c in children)
    assert all("test_ndcg_at_10" in c.data.metrics for c in children)

    # The same command again, from the CLI: nothing trains, Ray never starts (run_in_process asserts
    # it), the same numbers come back.
    summary = tmp_path / "summary.json"
    p = run_in_process("ablate.py", "--lang", "ko", "--profile", "tiny", "--summary", str(summary),
                       *[a for x in sets for a in ("--set", x)])
    assert p.returncode == 0, p.stderr[-3000:]
    again = json.loads(summary.read_text())
    assert again["trained_now"] == 0 and again["arms"] == s["arms"] and again["comparisons"] == s["comparisons"]
    assert again["mlflow_parent_run_id"] == s["mlflow_parent_run_id"]
    assert "[ablation] trained" not in p.stdout


def test_no_trained_arm_and_a_repeated_metric_fail_before_any_work(tmp_path):
    import ray

    from clp_ray.ablation import run_ablation_job

    cfg = load_config("ko", "tiny", ["ablation.arms=[{name: base, train: false}]", "ablation.baseline_arm=base",
                                     f"train.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"--set ablation.arms=.*: ablation.arms: no arm trains"):
        run_ablation_job(cfg)
    assert not ray.is_initialized() and not any(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="ablation.metrics lists a metric twice"):
        load_config("ko", "tiny", ["ablation.metrics=[ndcg@10, ndcg@10]"])


@pytest.mark.parametrize("raised, status", [(None, "FINISHED"), (KeyboardInterrupt, "KILLED"), (ValueError, "FAILED")])
def test_parent_runs_end_with_the_blocks_outcome(raised, status):
    from clp_ray.errors import JobInterrupted
    from clp_ray.tracking.runs import ending

    class Fake:
        ended = None

        def end(self, s):
            self.ended = s

    t = Fake()
    if raised is None:
        with ending(t):
            pass
    else:
        with pytest.raises(raised), ending(t):
            raise raised()
    assert t.ended == status
    t2 = Fake()
    with pytest.raises(JobInterrupted), ending(t2):
        raise JobInterrupted("stopped")
    assert t2.ended == "KILLED"
