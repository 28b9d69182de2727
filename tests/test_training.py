"""Ray Train + DeepSpeed end to end on CPU (2 workers, gloo)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_in_process

from clp_ray.config import load_config
from clp_ray.errors import ClpRayError
from clp_ray.model.moe import moe_layers

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900), pytest.mark.ray]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from clp_ray.train import ensure_ray

    ensure_ray(load_config("ko", "tiny", ["ray.num_cpus=4"]))
    yield
    ray.shutdown()


def make_cfg(tmp_path, data, *sets):
    return load_config("ko", "tiny", [
        f"data.train_paths=[{data}]", "data.train_group_size=2", "data.dev_fraction=0.2",
        "train.per_device_batch_size=4", "train.learning_rate=0.01", "train.warmup_ratio=0",
        "train.log_every_steps=1", f"train.output_dir={tmp_path / 'out'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "eval.batch_size=64", *sets])


def initial_embedder(cfg):
    from clp_ray.model.source import load_embedder

    torch.manual_seed(cfg.train.seed)
    return load_embedder(cfg.model, cfg.moe)


def dev_set_of(cfg):
    """The dev set the trainer is given (the bundled sample's dev queries over its full corpus)."""
    from clp_ray.data import load_records, validate
    from clp_ray.evaluation.dev_set import build_dev_set, training_split

    report = validate(cfg.data.train_paths, require_neg_q=cfg.loss.lam > 0, group_size=cfg.data.train_group_size)
    ds = load_records(report, require_neg_q=cfg.loss.lam > 0, group_size=cfg.data.train_group_size, max_line_bytes=cfg.data.max_line_bytes)
    return build_dev_set(cfg, *training_split(ds, cfg))


def dev_metrics_of(model_path, cfg):
    """Re-evaluate a saved model on the exact dev set the trainer used."""
    from clp_ray.evaluation import evaluate
    from clp_ray.model.embedder import Embedder

    dev = dev_set_of(cfg)
    assert dev.info.source == "qrels" and dev.info.corpus_size == 1519  # the full corpus, not the records' passages
    emb = Embedder.from_pretrained(model_path)
    res = evaluate(emb, dev.retrieval, batch_size=cfg.eval.batch_size, chunk_size=cfg.eval.chunk_size, top_k=cfg.eval.top_k)
    return emb, res.metrics


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stage_trains_moe_only(stage, tmp_path, small_data, ray_local):
    from mlflow import MlflowClient

    from clp_ray.train import run_training

    cfg = make_cfg(tmp_path, small_data, f"deepspeed.stage={stage}", "train.epochs=6", "train.eval_every_steps=10",
                   "moe.train_only=moe",
                   # partition even the tiny model's small tensors so ZeRO-3 really shards them
                   "deepspeed.overrides={zero_optimization: {stage3_param_persistence_threshold: 0}}")
    result = run_training(cfg)
    assert result.metrics["step"] == 30 and result.metrics["final"] is True

    # Loss decreases (the same 40 training examples every epoch: the dev queries come from qrels).
    history = MlflowClient(cfg.tracking.tracking_uri).get_metric_history(result.mlflow_run_id, "train/loss")
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5

    # Frozen parameters exactly unchanged, MoE parameters changed.
    before = dict(initial_embedder(cfg).named_parameters())
    trained, metrics = dev_metrics_of(result.model_path, cfg)
    moe_names = {f"encoder.{n}.{p}" for n, m in moe_layers(trained.encoder) for p, _ in m.named_parameters()}
    assert moe_names
    for name, p in trained.named_parameters():
        if name in moe_names:
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"

    # The reloaded model reproduces the dev metrics the trainer reported.
    for k, v in metrics.items():
        assert result.metrics[f"dev_{k}"] == pytest.approx(v, abs=1e-9)

    # Every rank's shard is in the checkpoint.
    files = {p.name for p in (Path(result.checkpoint_path) / "ds").iterdir()}
    for rank in (0, 1):
        assert f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in files
        if stage == 3:
            assert f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" in files
        assert (Path(result.checkpoint_path) / f"rng_rank{rank}.pt").exists()

    if stage == 3:  # the frozen-prefix cache is off under ZeRO-3
        assert "prefix_computed" not in result.metrics
        return
    # The frozen-prefix cache: the prefix ran once per sequence; the later epochs and the dev
    # evaluations read it back, and so does a second run (another trial) on the same folder.
    m = result.metrics
    print("prefix cache, first run:", m["prefix_computed"], "computed,", m["prefix_hits"], "hits")
    assert m["prefix_hits"] > 3 * m["prefix_computed"] > 0
    again = run_training(make_cfg(tmp_path, small_data, "train.max_steps=5", "train.learning_rate=0.02",
                                  "moe.train_only=moe"))
    print("prefix cache, second run:", again.metrics["prefix_computed"], "computed,", again.metrics["prefix_hits"], "hits")
    assert again.metrics["prefix_computed"] == 0 and again.metrics["prefix_hits"] > 0


def test_fault_injection_resume_and_rerun(tmp_path, small_data, ray_local, tiny_path, monkeypatch):
    from mlflow import MlflowClient

    from clp_ray.model.embedder import Embedder
    from clp_ray.train import run_training

    # The model is a relative folder (a copy of the tiny one): the Train workers run in another
    # working directory, so this only works because the driver makes the path absolute.
    shutil.copytree(tiny_path, tmp_path / "base-model")
    monkeypatch.chdir(tmp_path)
    # Only the MoE layer trains (the paper's setting): checkpoints hold the trained parameters only,
    # and a resume takes the frozen ones from the model itself.
    common = ["train.max_steps=6", "train.eval_every_steps=2", "model.name_or_path=base-model", "moe.train_only=moe"]
    clean = run_training(make_cfg(tmp_path / "clean", small_data, *common))
    assert clean.metrics["step"] == 6 and clean.metrics["attempt"] == 1

    # A failure on rank 1 at step 3 restarts once from the step-2 checkpoint.
    faulty = run_training(make_cfg(tmp_path / "faulty", small_data, *common, "train.debug_fail_at_step=3", "train.max_failures=1"))
    assert faulty.metrics["attempt"] == 2 and faulty.metrics["resumed_from_step"] == 2
    assert faulty.metrics["step"] == clean.metrics["step"] == 6
    texts = ["셀 보호", "Insert rows", "차트 편집"]
    a, b = Embedder.from_pretrained(clean.model_path), Embedder.from_pretrained(faulty.model_path)
    torch.testing.assert_close(a.encode(texts), b.encode(texts), rtol=0, atol=1e-5)  # resumed exactly

    # Without retries the failure stops the run; re-running the same command resumes it, and
    # re-running a finished run returns its result without training.
    cfg = make_cfg(tmp_path / "rerun", small_data, *common, "train.debug_fail_at_step=3", "train.max_failures=0")
    with pytest.raises(ClpRayError, match="injected failure on rank 1 at step 3"):
        run_training(cfg)
    resumed = run_training(cfg)
    assert (resumed.metrics["attempt"], resumed.metrics["resumed_from_step"], resumed.metrics["step"]) == (2, 2, 6)
    tracking = MlflowClient(cfg.tracking.tracking_uri)
    assert tracking.get_run(resumed.mlflow_run_id).info.status == "FINISHED"

    def no_fit(*a, **k):
        raise AssertionError("a finished run started the trainer again")

    monkeypatch.setattr("clp_ray.train.run.fit", no_fit)
    again = run_training(cfg)  # finished: its result comes back from the run storage, no workers start
    assert (again.metrics, again.checkpoint_path, again.model_path) == (resumed.metrics, resumed.checkpoint_path, resumed.model_path)
    assert again.mlflow_run_id == resumed.mlflow_run_id  # the same MLflow run
    assert tracking.get_run(again.mlflow_run_id).info.status == "FINISHED"


def run_train_job(*args):
    return subprocess.run([sys.executable, "jobs/train.py", "--lang", "ko", "--profile", "tiny", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


def train_in_process(*args):
    """jobs/train.py in this process (``run_in_process`` asserts that Ray never started)."""
    return run_in_process("train.py", "--lang", "ko", "--profile", "tiny", *args)


def test_bad_input_fails_before_workers_start(tmp_path):
    p = train_in_process("--set", f"data.train_paths=[{tmp_path / 'missing.jsonl'}]")
    assert p.returncode == 2 and "missing.jsonl: no such file or folder" in p.stderr
    assert "Traceback" not in p.stderr and "RayTrainWorker" not in p.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "pos": ["p"], "neg": ["n"], "neg_q": ["m"]}\n{"query": ""}\n')
    p = train_in_process("--set", f"data.train_paths=[{bad}]")
    assert p.returncode == 2 and f"{bad}:2: query: empty string" in p.stderr
    # The model's layer count is known on the driver: a bad MoE layer index fails before Ray starts.
    p = train_in_process("--set", "moe.layers=[0, 4]")
    assert p.returncode == 2 and "Traceback" not in p.stderr and "RayTrainWorker" not in p.stderr
    assert ("error: moe.layers = [0, 4] (--set moe.layers=[0, 4]): MoE layer index 4 is out of range for an "
            "encoder with 4 layers (valid: 0..3 or -4..-1); model.name_or_path = tiny (configs/profiles/tiny.yaml:") in p.stderr
    (tmp_path / "a-file").write_text("")
    p = train_in_process("--set", f"train.output_dir={tmp_path / 'a-file' / 'runs'}")
    assert p.returncode == 2 and "Traceback" not in p.stderr and "Started a local Ray instance" not in p.stderr
    assert (f"error: train.output_dir = {tmp_path / 'a-file' / 'runs'} (--set train.output_dir={tmp_path / 'a-file' / 'runs'}): "
            f"cannot write to {tmp_path / 'a-file' / 'runs'} ({tmp_path / 'a-file'} is a file, not a folder)") in p.stderr
    p = train_in_process("--set", f"model.name_or_path={tmp_path / 'no-model'}")
    assert p.returncode == 2 and "Started a local Ray instance" not in p.stderr
    assert (f"error: model.name_or_path = {tmp_path / 'no-model'} (--set model.name_or_path={tmp_path / 'no-model'}): "
            f"model folder {tmp_path / 'no-model'} not found") in p.stderr
    # Sparse/ColBERT evaluation of a model without BGE-M3's heads (and not training new ones).
    p = train_in_process("--set", "eval.mode=hybrid")
    assert p.returncode == 2 and "Started a local Ray instance" not in p.stderr
    assert ("error: eval.mode = hybrid (--set eval.mode=hybrid) needs BGE-M3's sparse and ColBERT heads "
            "(sparse_linear.pt, colbert_linear.pt), which model.name_or_path = tiny") in p.stderr
    p = train_in_process("--set", f"model.name_or_path={tmp_path}")
    assert p.returncode == 2 and f"{tmp_path} is not a model folder: it has no config.json" in p.stderr
    assert "Started a local Ray instance" not in p.stderr
    # The MLflow store and the run storage are checked by the job itself, before Ray starts.
    p = train_in_process("--set", "tracking.tracking_uri=bogus://x")
    assert p.returncode == 2 and "Started a local Ray instance" not in p.stderr
    assert "tracking.tracking_uri = bogus://x (--set tracking.tracking_uri=bogus://x): cannot use this MLflow" in p.stderr
    p = train_in_process("--set", f"train.storage_path={tmp_path / 'a-file' / 'runs'}")
    assert p.returncode == 2 and "Started a local Ray instance" not in p.stderr
    assert f"cannot write to {tmp_path / 'a-file' / 'runs'} ({tmp_path / 'a-file'} is a file, not a folder)" in p.stderr
    p = run_train_job("--set", "ray.num_workers=64", "--set", "ray.num_cpus=2", "--set", f"train.output_dir={tmp_path}",
                      "--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
    assert p.returncode == 2, p.stderr[-3000:]
    assert "ray.num_workers = 64 workers need 64 CPU (cluster has 2)" in p.stderr
    assert "RayTrainWorker" not in p.stderr


def test_deepspeed_config_fills_auto_values_and_rejects_bad_files(tmp_path):
    from clp_ray.errors import ConfigError
    from clp_ray.train import deepspeed_config

    cfg = load_config("ko", "tiny", ["train.per_device_batch_size=3", "train.gradient_accumulation_steps=2",
                                      "deepspeed.stage=2", f"deepspeed.config_dir={tmp_path}"])
    (tmp_path / "zero2.json").write_text('{"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",'
                                         ' "zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}}')
    ds = deepspeed_config(cfg, world_size=4)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (24, 3, 2)
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False  # fp32 on the local profile
    bad = {
        # json keeps the last of two equal keys: the first zero_optimization block would vanish.
        '{"zero_optimization": {"stage": 2, "overlap_comm": true}, "zero_optimization": {"stage": 2}}':
            r"zero2.json: duplicate key 'zero_optimization'",
        '[{"zero_optimization": {}}]': r"zero2.json: expected a JSON object \(DeepSpeed config\), got list",
        '{\n"zero_optimization": {,}\n}': r"zero2.json:2: invalid JSON",
        '{"optimizer": {"params": {"lr": "auto"}}}': r"values left as 'auto' that clp-ray does not fill: optimizer.params.lr",
    }
    for text, message in bad.items():
        (tmp_path / "zero2.json").write_text(text)
        with pytest.raises(ConfigError, match=message):
            deepspeed_config(cfg, world_size=4)


@pytest.mark.parametrize("stage", [2, 3])
def test_grad_cache_training_ends_with_the_same_weights(stage, tmp_path, small_data, ray_local, tiny_path):
    """A few optimizer steps with and without train.grad_cache (chunks of 3 that divide neither the
    4 queries nor the 8 passages per rank) reach the same weights, a resume after a worker loss
    included; dropout off, since whole-batch masks cannot be drawn chunk by chunk
    (tests/test_grad_cache.py checks the replay with it on)."""
    import json

    from clp_ray.model.embedder import Embedder
    from clp_ray.train import run_training

    model = tmp_path / "no_dropout"
    shutil.copytree(tiny_path, model)
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(config))
    weights = {}
    for cached in (False, True):
        # With ZeRO-2 the cached run also loses a worker at step 3 and resumes from step 2.
        failure = ["train.debug_fail_at_step=3", "train.max_failures=1"] if cached and stage == 2 else []
        cfg = make_cfg(tmp_path / str(cached), small_data, f"model.name_or_path={model}", f"deepspeed.stage={stage}",
                       "train.max_steps=4", "train.eval_every_steps=2", "moe.train_only=all", "moe.num_experts=2",
                       "moe.router.balance_coef=0.1", f"train.grad_cache={str(cached).lower()}",
                       "train.grad_cache_chunk_size=3", *failure,
                       # Adam turns float-noise gradients (rows of unseen tokens: 0 in one run, 1e-9 in
                       # the other) into steps of up to lr: a small lr keeps that under the tolerance.
                       "train.learning_rate=0.0005",
                       "deepspeed.overrides={zero_optimization: {stage3_param_persistence_threshold: 0}}")
        result = run_training(cfg)
        assert result.metrics["step"] == 4 and result.metrics["attempt"] == (2 if failure else 1)
        weights[cached] = dict(Embedder.from_pretrained(result.model_path).named_parameters())
    assert weights[True].keys() == weights[False].keys()
    diffs = {name: float((weights[True][name] - p).abs().max()) for name, p in weights[False].items()}
    assert max(diffs.values()) <= 1e-4, sorted(diffs.items(), key=lambda kv: -kv[1])[:5]
    start = dict(Embedder.from_pretrained(model).named_parameters())
    assert any(not torch.equal(p, start[n]) for n, p in weights[False].items() if n in start)  # it trained


def test_m3_heads_keep_under_zero3_and_unified_training(tmp_path, small_data, ray_local):
    """BGE-M3's heads through training. ``keep`` under ZeRO-3 (every tensor sharded): the heads are
    gathered and saved byte for byte as loaded, while the encoder trains. ``unified`` with gradient
    caching and hybrid dev evaluation: the heads train, the loss terms are logged, and the saved
    model reproduces the hybrid dev metrics the trainer reported."""
    from mlflow import MlflowClient

    from clp_ray.model.embedder import Embedder
    from clp_ray.model.m3 import COLBERT_FILE, SPARSE_FILE
    from clp_ray.model.tiny import tiny_model_path
    from clp_ray.train import run_training

    source = tiny_model_path(load_config("ko", "tiny", ["model.tiny.m3_heads=true"]).model.tiny)
    common = ["model.tiny.m3_heads=true", "train.max_steps=4", "train.eval_every_steps=2", "moe.train_only=all"]
    keep = run_training(make_cfg(tmp_path / "keep", small_data, *common, "deepspeed.stage=3",
                                 "deepspeed.overrides={zero_optimization: {stage3_param_persistence_threshold: 0}}"))
    kept = Path(keep.model_path)
    for f in (SPARSE_FILE, COLBERT_FILE):
        assert (kept / f).read_bytes() == (source / f).read_bytes()
    start = Embedder.from_pretrained(source)
    trained = Embedder.from_pretrained(kept)
    assert not torch.equal(trained.encoder.embeddings.word_embeddings.weight, start.encoder.embeddings.word_embeddings.weight)
    # ... and on through the registry: the pyfunc's heads are those bytes too
    import mlflow
    from conftest import register_model

    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    register_model(uri, kept)
    mlflow.set_tracking_uri(uri)
    artifact = Path(mlflow.artifacts.download_artifacts("models:/clp-ray-hi@champion"))
    assert next(artifact.rglob(COLBERT_FILE)).read_bytes() == (source / COLBERT_FILE).read_bytes()
    texts = ["셀 보호 해제", "차트 데이터 범위"]
    served = mlflow.pyfunc.load_model("models:/clp-ray-hi@champion").predict(texts, params={"output": "sparse"})
    assert served == [{str(t): w for t, w in row.items()} for row in trained.encode(texts, kind="query", output="sparse")]

    cfg = make_cfg(tmp_path / "unified", small_data, *common, "model.m3_heads=unified", "deepspeed.stage=2",
                   "train.grad_cache=true", "train.grad_cache_chunk_size=3", "eval.mode=hybrid")
    unified = run_training(cfg)
    heads = Embedder.from_pretrained(unified.model_path).heads
    assert not torch.equal(heads.sparse_linear.weight, start.heads.sparse_linear.weight)
    assert not torch.equal(heads.colbert_linear.weight, start.heads.colbert_linear.weight)
    client = MlflowClient(cfg.tracking.tracking_uri)
    logged = client.get_run(unified.mlflow_run_id).data.metrics
    for k in ("dense", "sparse", "colbert", "ensemble", "distill"):
        assert f"train/m3_{k}" in logged
    from clp_ray.evaluation import evaluate_config

    res = evaluate_config(Embedder.from_pretrained(unified.model_path), dev_set_of(cfg).retrieval, cfg.eval)
    assert unified.metrics["dev_ndcg@10"] == pytest.approx(res.metrics["ndcg@10"], abs=1e-9)


def test_prefix_fill_as_a_ray_data_job(tmp_path, small_data, ray_local):
    """Many texts: the fill runs as Ray Data actors writing shards into the shared folder; a second
    fill (the next job on the same folder) finds every text there."""
    from clp_ray.train import prefix_fill
    from clp_ray.train.preflight import prepare

    cfg = make_cfg(tmp_path, small_data, "moe.train_only=moe", "train.prefix_fill_ray_min_texts=0", "train.epochs=2")
    prep = prepare(cfg)
    records, _ = prefix_fill.training_split(
        prefix_fill.load_records(prep.data, require_neg_q=True, group_size=2, max_line_bytes=cfg.data.max_line_bytes),
        cfg, prep.dev.info.source)
    n = sum(len(v) for v in prefix_fill.training_texts(cfg, records).values())
    computed = prefix_fill.prefill(cfg, prep)
    assert 0.9 * n <= computed <= n  # distinct texts; a few may truncate to one token sequence
    shards = list(Path(prep.prefix_cache).glob("*/*.safetensors"))
    assert len(shards) >= 1
    assert prefix_fill.prefill(cfg, prep) == 0
