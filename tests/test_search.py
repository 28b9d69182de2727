import re

import optuna
import pytest

from clp_ray.config import load_config
from clp_ray.errors import ConfigError
from clp_ray.tune import SearchSpace, apply_params, check_space, points_to_evaluate


def sample(cfg, n=30, layers=4):
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0), direction="maximize")
    space = SearchSpace(cfg, layers)
    out = []
    for i in range(n):
        trial = study.ask()
        space(trial)
        out.append(trial.params)
        study.tell(trial, float(i % 7))
    return out


def test_space_bounds_and_moe_parameters():
    cfg = load_config("hi", "tiny")
    for p in sample(cfg):
        assert 0 <= p["lam"] <= 0.5 and 0.01 <= p["temperature"] <= 0.1
        assert p["num_experts"] in (2, 4, 8) and p["top_k"] in (1, 2) and 0 <= p["moe_layer"] <= 3
        trial_cfg = apply_params(cfg, p)
        assert trial_cfg.moe.layers == [p["moe_layer"]] and trial_cfg.loss.lam == p["lam"]
        assert trial_cfg.train.learning_rate == p["learning_rate"]


def test_conditional_space_never_emits_moe_params_when_moe_is_off():
    cfg = load_config("hi", "tiny", ["moe.enabled=false", "moe.train_only=all"])
    for p in sample(cfg):
        assert not {"num_experts", "top_k", "moe_layer"} & set(p)
        assert apply_params(cfg, p).moe.enabled is False
    assert "num_experts" not in points_to_evaluate(cfg, 4)[0]


def test_block_mode_keeps_the_block_inside_the_model():
    cfg = load_config("hi", "tiny", ["search.layer_mode=block", "search.block_size=2"])
    for p in sample(cfg, layers=4):
        layers = apply_params(cfg, p).moe.layers
        assert len(layers) == 2 and layers[0] + 1 == layers[1] and layers[1] <= 3


def test_paper_point_is_evaluated_first():
    cfg = load_config("hi", "tiny")
    (point,) = points_to_evaluate(cfg, 4)
    assert point == {"lam": 0.1, "temperature": 0.02, "learning_rate": 1e-3, "num_experts": 2, "top_k": 1, "moe_layer": 3}
    assert apply_params(cfg, point).moe.site == "intermediate"


def test_invalid_space_is_a_config_error():
    with pytest.raises(ConfigError, match=r"search.top_k = \[1, 4\] \(--set search.top_k=\[1, 4\]\) has a value above "
                                         r"the smallest of search.num_experts = \[2, 4\] \(--set search.num_experts=\[2, 4\]\)"):
        check_space(load_config("hi", "tiny", ["search.num_experts=[2, 4]", "search.top_k=[1, 4]"]), 4)
    with pytest.raises(ConfigError, match="lower bound"):
        load_config("hi", "tiny", ["search.lam=[0.5, 0.1]"])
    # Ranges and choices obey the limits of the settings they feed: they fail when the config loads,
    # not as a traceback (empty choices) or as a sweep whose every trial errors (top_k 0, lr 0).
    bad = {
        "search.num_experts=[]": "search.num_experts: List should have at least 1 item",
        "search.top_k=[0]": "search.top_k.0: Input should be greater than or equal to 1",
        "search.num_experts=[2, 128]": "search.num_experts.1: Input should be less than or equal to 64",
        "search.learning_rate=[0, 1e-3]": "search.learning_rate.0: Input should be greater than 0",
        "search.temperature=[0, 0.1]": "search.temperature.0: Input should be greater than 0",
        "search.lam=[0.1, 2]": "search.lam.1: Input should be less than or equal to 1",
    }
    for assignment, message in bad.items():
        with pytest.raises(ConfigError, match=f"--set {re.escape(assignment)}: {re.escape(message)}"):
            load_config("hi", "tiny", [assignment])


@pytest.mark.ray  # starts Ray: run apart from the rest (scripts/test.sh)
@pytest.mark.timeout(300)
def test_interrupted_tune_run_is_told_apart_from_a_finished_one(tmp_path):
    """Ctrl+C makes Tune save its state and return normally, the stopped trials marked TERMINATED
    in the returned results like finished ones; run_sweep tells them apart by the saved state."""
    import os
    import signal
    import threading
    import time
    from pathlib import Path

    import ray
    from ray import tune

    from clp_ray.tune import unfinished_trials

    marks = tmp_path / "marks"
    marks.mkdir()

    def marking_trainable(config):  # nested: pickled by value (workers cannot import this test module)
        Path(config["marks"], f"{config['i']}").write_text("")
        for step in range(300):  # ~30 s unless stopped
            tune.report({"step": step})
            time.sleep(0.1)


    def interrupt_when_both_run():
        deadline = time.time() + 120
        while len(list(marks.iterdir())) < 2 and time.time() < deadline:
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGINT)  # Tune's handler (main thread) catches it

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        space = {"i": tune.grid_search([0, 1]), "marks": str(marks)}
        run = tune.RunConfig(name="stopped", storage_path=str(tmp_path / "runs"), verbose=0)
        threading.Thread(target=interrupt_when_both_run, daemon=True).start()
        results = tune.Tuner(marking_trainable, param_space=space, run_config=run).fit()
        assert results.num_terminated == 2  # looks finished...
        assert len(unfinished_trials(str(tmp_path / "runs" / "stopped"))) == 2  # ...but was stopped

        quick = tune.with_parameters(lambda config: tune.report({"step": 0}))
        run = tune.RunConfig(name="done", storage_path=f"file://{tmp_path / 'runs'}", verbose=0)
        assert tune.Tuner(quick, run_config=run).fit().num_terminated == 1
        assert unfinished_trials(f"file://{tmp_path / 'runs' / 'done'}") == []
    finally:
        ray.shutdown()


def test_concurrent_trials_must_fit_the_cluster(monkeypatch):
    """Two 2-worker trials need 2 x (2 + 0.01) CPUs: with 4, the second one only ever waited for
    its placement group, timed out after 60 s and retried, so the trials ran one after another."""
    import ray

    from clp_ray.errors import ConfigError
    from clp_ray.tune import check_concurrency, max_concurrent

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    cfg = load_config("hi", "tiny", ["ray.num_cpus=4"])
    with pytest.raises(ConfigError, match=r"search.max_concurrent_trials = 2 \(configs/profiles/tiny.yaml:\d+\): 2 trials at "
                                          r"once need 4.02 CPU \(cluster has 4\)"):
        check_concurrency(cfg)
    assert max_concurrent(load_config("hi", "tiny", ["search.max_concurrent_trials=null"])) == 1
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 5.0})
    check_concurrency(cfg)
    assert max_concurrent(load_config("hi", "tiny", ["search.max_concurrent_trials=null"])) == 2
    check_concurrency(load_config("hi", "cluster"))  # autoscaling: the cluster grows to fit


def test_base_model_test_result_is_cached_per_model_and_set(tmp_path, monkeypatch):
    import clp_ray.tune.job
    from clp_ray.evaluation import RetrievalSet
    from clp_ray.tune import base_model_test

    data = RetrievalSet(corpus={"d1": "셀 보호", "d2": "행 삽입", "d3": "차트"}, queries={"q1": "보호", "q2": "삽입"},
                        qrels={"q1": {"d1": 1}, "q2": {"d2": 1}}, name="toy")
    cfg = load_config("hi", "tiny", [f"train.output_dir={tmp_path}", "eval.top_k=10"])
    first = base_model_test(cfg, data)
    assert set(first.per_query["ndcg@10"]) == {"q1", "q2"}

    def no_evaluation(*a, **k):
        raise AssertionError("evaluated again")

    monkeypatch.setattr(clp_ray.tune.job, "evaluate_sets", no_evaluation)
    again = base_model_test(cfg, data)
    assert again.metrics == first.metrics and again.per_query == first.per_query
    other = RetrievalSet(corpus=data.corpus, queries={"q1": "보호"}, qrels={"q1": {"d1": 1}}, name="toy")
    with pytest.raises(AssertionError, match="evaluated again"):
        base_model_test(cfg, other)  # another evaluation set: another entry


def test_sets_over_one_corpus_are_scored_from_one_encoding_as_if_alone(tiny_embedder, monkeypatch):
    import clp_ray.evaluation.evaluator as ev

    corpus = {"d1": "셀 보호", "d2": "행 삽입", "d3": "차트", "d4": "피벗 표"}
    test = ev.RetrievalSet(corpus, {"q1": "보호", "q2": "삽입"}, {"q1": {"d1": 1}, "q2": {"d2": 1, "d4": 2}}, name="test")
    dev = ev.RetrievalSet(dict(corpus), {"q1": "차트 만들기", "q3": "표"}, {"q1": {"d3": 1}, "q3": {"d4": 1}}, name="dev")
    e = load_config("ko", "tiny").eval
    alone = [ev.evaluate_config(tiny_embedder, s, e) for s in (test, dev)]
    calls = []
    real = ev.evaluate_config
    monkeypatch.setattr(ev, "evaluate_config", lambda emb, data, cfg, **kw: calls.append(data.name) or real(emb, data, cfg, **kw))
    together = ev.evaluate_sets(tiny_embedder, [test, dev], e)
    assert calls == ["test+dev"]  # one encoding of the corpus; the same query id in both sets kept apart
    for a, b in zip(alone, together):
        assert b.metrics == pytest.approx(a.metrics, abs=1e-6) and set(b.run) == set(a.run)
        assert {q: pytest.approx(v, abs=1e-6) for q, v in b.per_query["ndcg@10"].items()} == a.per_query["ndcg@10"]
    other = ev.RetrievalSet({"d1": "셀 보호"}, {"q1": "보호"}, {"q1": {"d1": 1}}, name="other")
    calls.clear()
    ev.evaluate_sets(tiny_embedder, [test, other], e)
    assert calls == ["test", "other"]  # different corpora: one by one
