"""Serving throughput: the Ray Serve app (jobs/serve.py) vs Infinity and `mlflow models serve`, same model.

One registered version (``--model``: the local profile's multilingual-e5-small by default, or
``tiny``) in a fresh SQLite store; each server is started in turn (never two at once: they would
share the CPUs), warmed up, then loaded by 1, 8 and 32 concurrent clients (threads with keep-alive
connections), each sending one query per request for ``--duration`` seconds. Per server and level:
requests/s, p50 and p99 latency, errors. The servers' answers to the same texts are compared first
(the same model must give the same vectors).

- ``ray_serve``: as the local profile runs it, one replica per core, one torch thread each; driven
  with the official ``openai`` client's wire format (``encoding_format: base64``).
- ``infinity``: Infinity (``infinity-emb``, the embedding server users pick) serving the same
  exported sentence-transformers folder, from its own environment (``benchmarks/infinity_env.sh``:
  its pins clash with clp-ray's). It runs sentence-transformers 3, so it gets a copy of the folder
  with the module configs in that version's keys, and the queries with the model's query prefix
  (Infinity does not apply prompts); same wire format as ``ray_serve``.
- ``mlflow``: ``mlflow models serve`` on the registered pyfunc (its own protocol).

Targets: Ray Serve >= 1.0x Infinity's requests/s at 32 clients and <= its p99 at 8 clients; >= 2x
mlflow's requests/s at 32 clients (batching is the point); its own p99 <= 2x its p50 at 8 clients.

    bash benchmarks/infinity_env.sh        # once: .venv-infinity
    python benchmarks/serve_throughput.py [--model tiny] [--levels 1,8,32] [--duration 15] [--servers ...] [--summary F]
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clp_ray.cli import add_summary_arg  # noqa: E402
from clp_ray.util.atomic import write_json  # noqa: E402

log = logging.getLogger("serve_throughput")
SERVERS = ("ray_serve", "infinity", "mlflow")
TARGET_RPS_RATIO = 2.0  # over mlflow
TARGET_RPS_RATIO_INFINITY = 1.0
TARGET_P99_OVER_P50 = 2.0
INFINITY = ROOT / ".venv-infinity" / "bin" / "infinity_emb"


@dataclass
class Level:
    clients: int
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    mean_batch_size: Optional[float] = None  # requests per forward pass (Ray Serve's /stats)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) by linear interpolation between order statistics."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class Client:
    """One keep-alive connection posting JSON; ``post`` -> (status, parsed body)."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        self.conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = self.conn.getresponse()
        raw = r.read()
        try:
            return r.status, json.loads(raw or b"{}")
        except ValueError:  # a proxy's plain-text error page
            return r.status, {"text": raw.decode(errors="replace")[:500]}

    def get(self, path: str) -> dict:
        self.conn.request("GET", path)
        return json.loads(self.conn.getresponse().read())


def load(port: int, path: str, make_body, texts: list[str], clients: int, duration: float) -> Level:
    """``clients`` threads posting one text per request for ``duration`` seconds."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    start = time.monotonic() + 0.2
    end = start + duration

    def run(i: int) -> None:
        c, n = Client(port), i
        while time.monotonic() < start:
            time.sleep(0.005)
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                status, _ = c.post(path, make_body([texts[n % len(texts)]]))
            except OSError:
                status, c = 0, Client(port)
            if status == 200:
                latencies[i].append(time.monotonic() - t0)
            else:
                errors[i] += 1
            n += clients

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = [x for per in latencies for x in per]
    seconds = time.monotonic() - start
    return Level(clients, len(done), sum(errors), round(seconds, 2), len(done) / seconds,
                 percentile(done, 0.5) * 1e3, percentile(done, 0.99) * 1e3)


# ---------------------------------------------------------------------------------- servers


def register(model: str, work: Path) -> str:
    from clp_ray.config import load_config
    from clp_ray.model.embedder import Embedder
    from clp_ray.model.source import resolve_source
    from clp_ray.tracking.registry import log_embedder_model, promote_if_better
    from clp_ray.tracking.runs import start_run

    uri = f"sqlite:///{work / 'mlflow.db'}"
    folder = Embedder.from_pretrained(resolve_source(model)).save_pretrained(work / "model")
    cfg = load_config("hi", "tiny", [f"tracking.tracking_uri={uri}"])
    tracker = start_run(cfg, "serve-benchmark")
    mv = log_embedder_model(tracker, folder, registered_name="clp-ray-hi", tags={"test_ndcg_at_10": 0.5})
    tracker.end()
    promote_if_better(uri, "clp-ray-hi", mv.version)
    return uri


def _env() -> dict:
    bin_dir = Path(sys.executable).parent  # uvicorn, mlflow and ray from this environment
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0"}


def start_server(kind: str, uri: str, port: int, work: Path, cpus: int, replicas: int = 1) -> subprocess.Popen:
    logf = open(work / f"{kind}.log", "w")
    if kind == "mlflow":
        cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", "models:/clp-ray-hi@champion",
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
        env = {**_env(), "MLFLOW_TRACKING_URI": uri}
    elif kind == "infinity":
        cmd = [str(INFINITY), "v2", "--model-id", str(st3_folder(work / "model", work / "model-st3")),
               "--served-model-name", "clp-ray-hi", "--url-prefix", "/v1", "--engine", "torch", "--device", "cpu",
               "--host", "127.0.0.1", "--port", str(port), "--no-bettertransformer"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"}
    else:
        cmd = [sys.executable, str(ROOT / "jobs/serve.py"), "--lang", "hi", "--profile", "tiny", "--port", str(port),
               "--set", f"tracking.tracking_uri={uri}", "--set", f"serve.num_cpus={cpus}",
               "--set", f"serve.num_replicas={replicas}", "--set", f"ray.num_cpus={cpus * replicas}",
               "--summary", str(work / "ray_serve.json")]
        env = _env()
    return subprocess.Popen(cmd, cwd=work, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(proc: subprocess.Popen, port: int, path: str, body: dict, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering")
        try:
            if Client(port).post(path, body)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no answer on port {port} within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def st3_folder(src: Path, dst: Path) -> Path:
    """A copy of the sentence-transformers folder ``src`` that sentence-transformers 3 (Infinity's)
    loads: its module configs in that version's keys (the weights and tokenizer are the same files)."""
    import shutil

    shutil.rmtree(dst, ignore_errors=True)  # a reused --work may hold another model's copy
    shutil.copytree(src, dst)
    bert = json.loads((dst / "sentence_bert_config.json").read_text())
    (dst / "sentence_bert_config.json").write_text(json.dumps({k: bert[k] for k in ("max_seq_length", "do_lower_case")}))
    pool = json.loads((dst / "1_Pooling/config.json").read_text())
    mode = pool["pooling_mode"]
    (dst / "1_Pooling/config.json").write_text(json.dumps({
        "word_embedding_dimension": pool["embedding_dimension"], "pooling_mode_mean_tokens": mode == "mean",
        "pooling_mode_cls_token": mode == "cls", "include_prompt": pool.get("include_prompt", True)}))
    return dst


def _openai_vectors(out: dict) -> list:
    import base64

    import numpy as np

    return [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4").tolist() for d in out["data"]]


def _openai_body(prefix: str = ""):
    # What openai.OpenAI().embeddings.create(model=..., input=[...]) sends with its defaults.
    return lambda texts: {"model": "clp-ray-hi", "input": [prefix + t for t in texts], "encoding_format": "base64"}


def endpoints(query_prefix: str) -> dict:
    """Per server: path, request body for some texts, the vectors in its answer."""
    return {
        "mlflow": ("/invocations", lambda texts: {"inputs": texts}, lambda out: out["predictions"]),
        "ray_serve": ("/v1/embeddings", _openai_body(), _openai_vectors),
        "infinity": ("/v1/embeddings", _openai_body(query_prefix), _openai_vectors),
    }


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(kind: str, uri: str, work: Path, texts: list[str], levels: list[int], duration: float,
            cpus: int, replicas: int = 1) -> tuple[list[Level], list, float]:
    """Start ``kind``, check its answer to ``texts[:4]``, load it at each level, stop it."""
    prefix = json.loads((work / "model" / "clp_ray.json").read_text())["query_prefix"]
    path, make_body, vectors_of = endpoints(prefix)[kind]
    port = free_port()
    t0 = time.monotonic()
    proc = start_server(kind, uri, port, work, cpus, replicas)
    try:
        wait_ready(proc, port, path, make_body(texts[:1]))
        started = time.monotonic() - t0
        status, out = Client(port).post(path, make_body(texts[:4]))
        assert status == 200, out
        probe = vectors_of(out)
        load(port, path, make_body, texts, max(levels), min(3.0, duration))  # warm-up
        results = []
        for clients in levels:
            before = Client(port).get("/stats") if kind == "ray_serve" else None
            r = load(port, path, make_body, texts, clients, duration)
            if before is not None:
                after = Client(port).get("/stats")
                r.mean_batch_size = (after["requests"] - before["requests"]) / max(1, after["batches"] - before["batches"])
            results.append(r)
            log.info("%-9s %2d clients: %7.1f req/s  p50 %7.1f ms  p99 %7.1f ms  (%d requests, %d errors)",
                     kind, clients, r.rps, r.p50_ms, r.p99_ms, r.requests, r.errors)
        return results, probe, started
    finally:
        stop_server(proc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="intfloat/multilingual-e5-small", help="model to register and serve (or 'tiny')")
    ap.add_argument("--levels", default="1,8,32", help="concurrent clients, comma-separated")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of load per level")
    ap.add_argument("--servers", default=",".join(SERVERS), help="which servers to measure")
    # The local profile's layout: one 1-thread replica per core (mlflow's one process uses every core).
    ap.add_argument("--cpus", type=int, default=1, help="CPUs (torch threads) per Ray Serve replica")
    ap.add_argument("--replicas", type=int, default=max(1, os.cpu_count() or 2), help="Ray Serve replicas")
    ap.add_argument("--work", default=None, help="folder for the store and logs (default: a temporary one)")
    add_summary_arg(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        levels = sorted({int(x) for x in args.levels.split(",")})
        servers = [s.strip() for s in args.servers.split(",")]
        if not levels or min(levels) < 1 or args.duration <= 0 or set(servers) - set(SERVERS):
            raise ValueError
    except ValueError:
        print(f"error: --levels must be positive integers, --duration > 0, --servers among {', '.join(SERVERS)}",
              file=sys.stderr)
        return 2
    if "infinity" in servers and not INFINITY.exists():
        print(f"error: Infinity is not installed at {INFINITY}: run `bash benchmarks/infinity_env.sh` (its own "
              "environment), or leave it out with --servers ray_serve,mlflow", file=sys.stderr)
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="serve-bench-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    texts = bundled_queries()
    uri = register(args.model, work)
    results, probes, startup = {}, {}, {}
    for kind in servers:
        results[kind], probes[kind], startup[kind] = measure(kind, uri, work, texts, levels, args.duration, args.cpus,
                                                             args.replicas)
    summary = report(args, levels, results, probes, startup)
    if args.summary:
        write_json(args.summary, summary)
    return 0


def bundled_queries() -> list[str]:
    from clp_ray.config import resolve_path

    with open(resolve_path("pkg://ko_help/queries.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def report(args, levels, results, probes, startup) -> dict:
    import numpy as np

    summary = {"model": args.model, "levels": levels, "duration_s": args.duration, "cpus": args.cpus,
               "replicas": args.replicas,
               "startup_s": {k: round(v, 1) for k, v in startup.items()},
               "results": {k: [asdict(r) for r in v] for k, v in results.items()}}
    if "ray_serve" in probes and len(probes) > 1:  # every server's vectors against Ray Serve's
        summary["max_abs_diff_vs_ray_serve"] = {k: float(np.abs(np.array(v) - np.array(probes["ray_serve"])).max())
                                                for k, v in probes.items() if k != "ray_serve"}
        if "mlflow" in probes:
            summary["max_abs_diff_between_servers"] = summary["max_abs_diff_vs_ray_serve"]["mlflow"]
    print(f"\n{'server':<10} {'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'batch':>6}")
    for kind, rows in results.items():
        for r in rows:
            batch = f"{r.mean_batch_size:6.1f}" if r.mean_batch_size is not None else f"{'-':>6}"
            print(f"{kind:<10} {r.clients:>7} {r.rps:>8.1f} {r.p50_ms:>8.1f} {r.p99_ms:>8.1f} {r.errors:>6} {batch}")
    by = {k: {r.clients: r for r in v} for k, v in results.items()}
    top, mid = max(levels), (8 if 8 in levels else None)
    if {"ray_serve", "mlflow"} <= set(by):
        ratio = by["ray_serve"][top].rps / by["mlflow"][top].rps
        summary["rps_ratio_ray_over_mlflow"] = {str(c): by["ray_serve"][c].rps / by["mlflow"][c].rps for c in levels}
        summary["target_rps_ratio_met"] = bool(top == 32 and ratio >= TARGET_RPS_RATIO)
        print(f"\nRay Serve / mlflow req/s at {top} clients: {ratio:.2f}x (target >= {TARGET_RPS_RATIO}x at 32)")
    if {"ray_serve", "infinity"} <= set(by):
        ratio = by["ray_serve"][top].rps / by["infinity"][top].rps
        summary["rps_ratio_ray_over_infinity"] = {str(c): by["ray_serve"][c].rps / by["infinity"][c].rps for c in levels}
        summary["target_rps_ratio_infinity_met"] = bool(top == 32 and ratio >= TARGET_RPS_RATIO_INFINITY)
        print(f"\nRay Serve / Infinity req/s at {top} clients: {ratio:.2f}x (target >= {TARGET_RPS_RATIO_INFINITY}x at 32)")
        if mid:
            p99 = (by["ray_serve"][mid].p99_ms, by["infinity"][mid].p99_ms)
            summary["p99_ms_at_8"] = {"ray_serve": p99[0], "infinity": p99[1]}
            summary["target_p99_vs_infinity_met"] = bool(p99[0] <= p99[1])
            print(f"p99 at 8 clients: Ray Serve {p99[0]:.1f} ms, Infinity {p99[1]:.1f} ms (target: Ray Serve <= Infinity)")
    if "ray_serve" in by and mid:
        tail = by["ray_serve"][mid].p99_ms / by["ray_serve"][mid].p50_ms
        summary["ray_p99_over_p50_at_8"] = tail
        summary["target_tail_met"] = bool(tail <= TARGET_P99_OVER_P50)
        print(f"Ray Serve p99 / p50 at 8 clients: {tail:.2f} (target <= {TARGET_P99_OVER_P50})")
    summary["errors"] = sum(r.errors for rows in results.values() for r in rows)
    return summary


if __name__ == "__main__":
    sys.exit(main())
