"""The MoE benchmarks run end to end (tiny shapes) and print their rows of ratios."""

import importlib.util
import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_moe_overhead_benchmark_prints_every_row(tmp_path):
    run = subprocess.run([sys.executable, "benchmarks/moe_overhead.py", "--hidden", "16", "--intermediate", "32",
                          "--tokens", "64", "--repeats", "3", "--threads", "1", "--summary", str(tmp_path / "s.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "caching allocator" in run.stdout and "1 threads" in run.stdout
    assert "median of 3 rounds (naive loop 3)" in run.stdout  # the naive loop's 5 capped at --repeats
    # The header names the CPU and the ISA torch runs on: ratios differ from one VM to the next.
    assert f"({torch.backends.cpu.get_cpu_capability()}), 1 threads" in run.stdout
    rows = [line.split() for line in run.stdout.splitlines() if re.match(r"\s*[248]\s+[12]\s", line)]
    assert [(r[0], r[1]) for r in rows] == [(e, k) for e in "248" for k in "12"]
    for r in rows:  # three ratios per row, all positive
        ratios = [float(v.rstrip("x")) for v in r if v.endswith("x")]
        assert len(ratios) == 3 and all(v > 0 for v in ratios)
        lo, hi = map(float, re.fullmatch(r"(\d+\.\d+)-(\d+\.\d+)", r[5]).groups())  # the FFN ratio's CI
        assert lo <= ratios[0] <= hi
    verdict = re.search(r"targets .*: (PASS|FAIL)$", run.stdout.strip()).group(1)
    summary = json.loads((tmp_path / "s.json").read_text())  # the same rows and verdict, machine-readable
    assert summary["targets_met"] == (verdict == "PASS") and summary["tokens"] == 64
    assert [(r["experts"], r["top_k"]) for r in summary["rows"]] == [(e, k) for e in (2, 4, 8) for k in (1, 2)]
    for printed, row in zip(rows, summary["rows"]):
        assert float(printed[4].rstrip("x")) == round(row["ffn_ratio"], 4)
        assert row["ffn_ratio_ci95"][0] <= row["ffn_ratio"] <= row["ffn_ratio_ci95"][1]


def load_moe_overhead():
    spec = importlib.util.spec_from_file_location("moe_overhead", ROOT / "benchmarks" / "moe_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_median_ci_takes_the_textbook_order_statistics_and_covers_the_median():
    median_ci = load_moe_overhead().median_ci
    values = [float(i) for i in range(1, 101)]  # order statistic j is j itself
    assert median_ci(values[:30]) == (10.0, 21.0)  # the 95% ranks for n = 30 and n = 100
    assert median_ci(values) == (40.0, 61.0)
    assert median_ci(values[:3]) == (1.0, 3.0)  # too few for 95%: the whole range
    # Its coverage: every interval's tail is at most 2.5%, so >= 95% of samples contain the median;
    # exactly P(j <= Binomial(30, 1/2) <= 20) = 95.7% for n = 30.
    exact = sum(math.comb(30, i) for i in range(10, 21)) / 2 ** 30
    rng = random.Random(0)
    hits = 0
    for _ in range(4000):
        lo, hi = median_ci([rng.expovariate(1.0) for _ in range(30)])  # skewed, median ln 2
        hits += lo <= math.log(2) <= hi
    assert abs(hits / 4000 - exact) < 0.012 and exact >= 0.95


def test_moe_overhead_benchmark_in_bf16_says_the_target_is_for_fp32():
    run = subprocess.run([sys.executable, "benchmarks/moe_overhead.py", "--hidden", "16", "--intermediate", "32",
                          "--tokens", "64", "--repeats", "2", "--threads", "1", "--dtype", "bf16"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert ", bf16, forward+backward" in run.stdout
    assert "[the issue sets them for CPU fp32; cpu bf16 is for reference]" in run.stdout
    no_gpu = subprocess.run([sys.executable, "benchmarks/moe_overhead.py", "--device", "cuda"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert no_gpu.returncode == 2 and "--device cuda: no CUDA GPU is visible to torch" in no_gpu.stderr


def test_moe_overhead_benchmark_rejects_bad_round_counts():
    for args, message in [(["--repeats", "3", "--naive-repeats", "4"], "--naive-repeats 4: must be at most --repeats 3"),
                          (["--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
                          (["--threads", "-1"], "argument --threads: must be >= 0, got -1")]:
        bad = subprocess.run([sys.executable, "benchmarks/moe_overhead.py", *args],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_moe_step_benchmark_prints_each_policy_and_expert_count(tmp_path):
    run = subprocess.run([sys.executable, "benchmarks/moe_step.py", "--device", "cpu", "--dtype", "fp32",
                          "--batch", "2", "--seq", "8", "--layers", "2", "--hidden", "64", "--intermediate", "128",
                          "--experts", "2", "4", "--repeats", "2", "--min-length", "2",
                          "--summary", str(tmp_path / "s.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    padding = int(re.search(r"2x8 tokens \((\d+)% padding\)", run.stdout).group(1))
    lengths = torch.randint(2, 9, (2,), generator=torch.Generator().manual_seed(0))  # 6 and 5 of 8
    assert padding == round(100 * (1 - lengths.sum().item() / 16))
    rows = [line.split() for line in run.stdout.splitlines() if re.match(r"\s*(moe|all)\s+\d", line)]
    assert [(r[0], r[1]) for r in rows] == [("moe", "2"), ("moe", "4"), ("all", "2"), ("all", "4")]
    assert all(float(r[-1].rstrip("x")) > 0 for r in rows)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert [(r["train_only"], r["experts"]) for r in summary["rows"]] == [("moe", 2), ("moe", 4), ("all", 2), ("all", 4)]
    assert [float(r[-1].rstrip("x")) for r in rows] == [round(r["ratio"], 3) for r in summary["rows"]]


def test_moe_step_benchmark_rejects_bad_sizes_and_a_missing_gpu():
    def run(*args, **env):
        return subprocess.run([sys.executable, "benchmarks/moe_step.py", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, env={**os.environ, **env})

    for args, message in [(["--device", "cuda"], "--device cuda: no CUDA GPU is visible to torch"),
                          (["--hidden", "32"], "--hidden 32: must be a multiple of 64"),
                          (["--batch", "0"], "argument --batch: must be >= 1, got 0"),
                          (["--seq", "8", "--min-length", "9"], "--min-length 9: must be at most --seq 8")]:
        p = run(*args, CUDA_VISIBLE_DEVICES="")
        assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr


def _train_e2e():
    spec = importlib.util.spec_from_file_location("train_e2e", ROOT / "benchmarks" / "train_e2e.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_train_e2e_steady_state_rate_leaves_out_the_warmup():
    bench = _train_e2e()
    # Step ends at 10 s (slow first step), then one every 2 s: after 3 warm-up steps, 32 queries per 2 s.
    stamps = [10.0, 13.0, 15.0, 17.0, 19.0, 21.0]
    assert bench.rate(stamps, 3) == bench.BATCH * 2 / 4.0
    assert bench.rate(stamps, 100) == bench.BATCH * 1 / 2.0  # the warm-up is capped: two stamps remain
    # The paper setting over 3 epochs of 2 steps: the rate from the end of the first epoch (step 2).
    paper = type("A", (), {"setting": "paper", "epochs": 3})()
    assert bench.rate(stamps, 1, paper) == bench.BATCH * 3 / 6.0


def test_train_e2e_counts_clp_rays_dev_evaluations(tmp_path):
    bench = _train_e2e()
    log = tmp_path / "train.log"
    log.write_text("x rank0 dev evaluation at step 0: 613 queries over 1519 passages in 41.1 s (nDCG@10 0.16)\n"
                   "other line\n(RayTrainWorker) dev evaluation at step 30: 613 queries over 1519 passages in 7.7 s (x)\n")
    assert bench.eval_seconds(log) == pytest.approx(48.8)


def test_train_e2e_rejects_bad_arguments():
    for args, message in ((["--clp-workers", "3"], "--clp-workers 3 does not divide the batch of 32"),
                          (["--steps", "2"], "argument --steps: must be >= 4, got 2"),
                          (["--rounds", "0"], "argument --rounds: must be >= 1, got 0")):
        run = subprocess.run([sys.executable, "benchmarks/train_e2e.py", *args], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 2 and message in run.stderr, run.stderr


def test_train_e2e_before_arm_is_a_worktree_of_that_commit_and_a_bad_rev_stops_first(tmp_path):
    bench = _train_e2e()
    path = bench.before_checkout(tmp_path, "HEAD")
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        assert path.name == f"src-{head[:12]}" and (path / "jobs" / "train.py").read_bytes() == subprocess.run(
            ["git", "show", "HEAD:jobs/train.py"], cwd=ROOT, capture_output=True).stdout
        assert bench.before_checkout(tmp_path, "HEAD") == path  # reused, not re-created
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, check=True)
    run = subprocess.run([sys.executable, "benchmarks/train_e2e.py", "--before", "no-such-rev", "--work",
                          str(tmp_path / "w")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "--before no-such-rev: not a commit of this repository" in run.stderr
    assert not (tmp_path / "w" / "mined-dev.jsonl").exists()  # stopped before mining


def test_train_e2e_report_compares_against_the_best_peer_and_the_code_before(capsys):
    bench = _train_e2e()
    M = bench.Measured

    def rnd(clp_rate, st_rate, before_rate):
        return {"clp-ray (1 worker)": M("clp-ray (1 worker)", 100.0, 30.0, clp_rate, 7.0, 60, 20.0),
                "sentence-transformers": M("sentence-transformers", 80.0, 15.0, st_rate, 4.0, 60),
                "clp-ray before abc (1 worker)": M("clp-ray before abc (1 worker)", 120.0, 60.0, before_rate, 8.0, 60)}

    args = type("A", (), {"steps": 60, "setting": "full", "epochs": 3, "precision": "fp32"})()
    out = bench.report([rnd(6.0, 5.0, 4.0), rnd(5.5, 5.0, 5.0)], args)
    assert out["peer"] == "sentence-transformers"  # the code before is not a peer
    assert out["ratios_clp_over_peer"] == {"examples_per_s": [1.2, 1.1], "wall_time": [1.25, 1.25],
                                           "wall_time_without_eval": [1.0, 1.0]}
    assert out["ratios_after_over_before"]["examples_per_s"] == [1.5, 1.1]
    assert out["ratios_after_over_before"]["first_step_s"] == [0.5, 0.5]
    assert "examples_per_s 1.30x (range 1.10-1.50)" in capsys.readouterr().out


def test_train_mfu_counts_the_step_flops_of_both_train_only_policies(tmp_path):
    """A small CPU shape: the counted FLOPs match the dense arithmetic (all: forward + backward of
    every layer; moe: the backward stops at the last layer, so fewer FLOPs), tokens are exact."""
    out = tmp_path / "mfu.json"
    run = subprocess.run([sys.executable, "benchmarks/train_mfu.py", "--device", "cpu", "--layers", "2", "--hidden", "64",
                          "--intermediate", "128", "--queries", "2", "--group", "2", "--query-len", "8",
                          "--passage-len", "16", "--steps", "2", "--peak-tflops", "1", "--summary", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {r["train_only"]: r for r in json.loads(out.read_text())["rows"]}
    # 2 queries + 2x2 passages + 2 negative queries (lam 0.1), each full length (+2 special tokens fit the cut).
    assert rows["all"]["tokens_per_step"] == 2 * 8 + 4 * 16 + 2 * 8
    h, i, layers = 64, 128, 2
    tokens = rows["all"]["tokens_per_step"]
    dense_forward = 2 * tokens * layers * (4 * h * h + 2 * h * i)  # Q, K, V, O and the FFN's two Linears
    assert rows["all"]["tflop_per_step"] * 1e12 >= 3 * dense_forward  # + attention scores, the upcycled router
    assert rows["moe"]["tflop_per_step"] < rows["all"]["tflop_per_step"]
    # The frozen-prefix cache: the step runs the last of the 2 layers only.
    assert rows["moe-cached"]["tflop_per_step"] < 0.75 * rows["moe"]["tflop_per_step"]
    assert rows["moe-cached"]["tokens_per_step"] == rows["moe"]["tokens_per_step"]
    assert rows["moe"]["trainable_params"] < rows["all"]["trainable_params"]
    for r in rows.values():
        assert r["mfu"] == r["tflops"] / 1.0 and r["tokens_per_s"] == tokens / r["step_s"]
    assert "train_only=all" in run.stdout and "MFU" in run.stdout


@pytest.mark.slow
def test_serve_throughput_benchmark_measures_mlflow_serve_and_checks_its_arguments(tmp_path):
    """The mlflow side end to end on the tiny model (the Ray Serve side starts Ray: run by hand,
    see benchmarks/RESULTS.md); percentiles and the summary's shape."""
    script = ROOT / "benchmarks" / "serve_throughput.py"
    bad = subprocess.run([sys.executable, str(script), "--levels", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--levels must be positive" in bad.stderr
    summary = tmp_path / "s.json"
    p = subprocess.run([sys.executable, str(script), "--model", "tiny", "--servers", "mlflow", "--levels", "1,2",
                        "--duration", "1.5", "--work", str(tmp_path / "w"), "--summary", str(summary)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(summary.read_text())
    rows = out["results"]["mlflow"]
    assert [r["clients"] for r in rows] == [1, 2] and all(r["requests"] > 5 and r["errors"] == 0 for r in rows)
    assert all(0 < r["p50_ms"] <= r["p99_ms"] for r in rows) and out["errors"] == 0


def test_serve_throughput_percentile_interpolates_between_order_statistics():
    spec = importlib.util.spec_from_file_location("serve_throughput", ROOT / "benchmarks" / "serve_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_throughput"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    percentile = module.percentile

    assert percentile([4, 1, 3, 2], 0.5) == 2.5 and percentile([1, 2, 3, 4, 5], 0.99) == pytest.approx(4.96)
    assert percentile([7], 0.99) == 7


def _serve_benchmark_module():
    spec = importlib.util.spec_from_file_location("serve_throughput", ROOT / "benchmarks" / "serve_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_throughput"] = module
    spec.loader.exec_module(module)
    return module


def test_serve_throughput_gives_infinity_a_sentence_transformers_3_folder_and_the_openai_wire_format(tmp_path,
                                                                                                   tiny_path):
    import base64

    import numpy as np

    from clp_ray.model.embedder import Embedder

    mod = _serve_benchmark_module()
    src = Embedder.from_pretrained(tiny_path).save_pretrained(tmp_path / "model")
    dst = mod.st3_folder(src, tmp_path / "st3")
    pool = json.loads((dst / "1_Pooling/config.json").read_text())
    dim = json.loads((src / "1_Pooling/config.json").read_text())["embedding_dimension"]
    assert pool["word_embedding_dimension"] == dim and pool["pooling_mode_mean_tokens"] != pool["pooling_mode_cls_token"]
    assert set(json.loads((dst / "sentence_bert_config.json").read_text())) == {"max_seq_length", "do_lower_case"}
    assert (dst / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    path, body, vectors = mod.endpoints("query: ")["infinity"]
    assert path == "/v1/embeddings" and body(["x"]) == {"model": "clp-ray-hi", "input": ["query: x"],
                                                         "encoding_format": "base64"}
    v = np.array([0.25, -1.0, 3.5], dtype="<f4")
    assert vectors({"data": [{"embedding": base64.b64encode(v.tobytes()).decode()}]}) == [v.tolist()]
    mod.INFINITY = tmp_path / "missing" / "infinity_emb"
    assert mod.main(["--servers", "infinity"]) == 2


def test_grad_cache_memory_benchmark_runs_both_modes_per_batch(tmp_path):
    summary = tmp_path / "s.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "grad_cache_memory.py"), "--device", "cpu",
                        "--batches", "4,8", "--chunk", "3", "--layers", "1", "--hidden", "64", "--intermediate", "128",
                        "--seq-p", "16", "--seq-q", "8", "--repeats", "1", "--uncached-up-to", "4",
                        "--summary", str(summary)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(summary.read_text())
    assert [(r["batch"], r["cached"]) for r in out["rows"]] == [(4, False), (4, True), (8, True)]
    assert all(r["peak_mib"] >= 0 and r["examples_per_s"] > 0 for r in out["rows"])
    assert out["cached_memory_growth"]["from"] == 4 and out["cached_step_cost"]["batch"] == 4
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "grad_cache_memory.py"), "--group", "1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--group must be >= 2" in bad.stderr


def test_dev_selection_scores_each_set_as_if_evaluated_alone(tmp_path, tiny_path):
    """The benchmark's two dev sets are the old records-only one and the full-corpus one, and its
    shared-corpus scoring equals evaluating the dev and test sets one by one."""
    from clp_ray.evaluation import evaluate_config

    spec = importlib.util.spec_from_file_location("dev_selection", ROOT / "benchmarks" / "dev_selection.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = bench.sweep_config("tiny", 6, 1, tmp_path)
    old, full, test = bench.dev_sets(cfg)
    assert len(old.queries) == 38 and len(old.corpus) < 200  # the held-out records over their own passages
    assert full.info.source == "qrels" and full.info.corpus_size == len(test.corpus) == 1519 and full.info.queries == 920
    got = bench.score(str(tiny_path), old, full, test, cfg.eval)
    from clp_ray.model.embedder import Embedder

    emb = Embedder.from_pretrained(tiny_path)
    alone = {"records": old, "full_corpus": full.retrieval, "test": test}
    for name, data in alone.items():
        assert got[name] == pytest.approx(evaluate_config(emb, data, cfg.eval).metrics["ndcg@10"], abs=1e-9), name
    assert bench.spearman([1, 2, 3, 4], [10, 20, 40, 30])["rho"] == pytest.approx(0.8)
