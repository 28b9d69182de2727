"""The config sections of the jobs (search, tracking, evaluation, mining, Ray, ablation, serving)
and :class:`ExperimentConfig`, the whole tree."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import Field, PrivateAttr, model_validator

from clp_ray.config.base import Section, Seed
from clp_ray.config.sections import DataConfig, DeepSpeedConfig, HybridWeights, LossConfig, ModelConfig, MoEConfig, TrainConfig


class SearchConfig(Section):
    # Trials the sweep runs (Optuna's TPE picks each one's settings).
    num_samples: int = Field(16, ge=1)
    # Trials running at once; None: as many as the cluster's CPUs/GPUs hold.
    max_concurrent_trials: Optional[int] = Field(None, ge=1)
    # Seed of the Optuna sampler: the same seed proposes the same trials.
    seed: Seed = 0
    # Bounds and choices obey the same limits as the settings they feed (loss.*, moe.*,
    # train.learning_rate), so a bad range fails here instead of in every trial.
    lam: tuple[Annotated[float, Field(ge=0, le=1)], Annotated[float, Field(ge=0, le=1)]] = (0.0, 0.5)
    # Range τ is searched over (log scale).
    temperature: tuple[Annotated[float, Field(gt=0, le=1)], Annotated[float, Field(gt=0, le=1)]] = (0.01, 0.1)
    # Expert counts the sweep chooses from (with search_moe).
    num_experts: list[Annotated[int, Field(ge=1, le=64)]] = Field(default_factory=lambda: [2, 4, 8], min_length=1)
    # Router top-k values the sweep chooses from (each kept <= num_experts).
    top_k: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 2], min_length=1)
    # Range the learning rate is searched over (log scale).
    learning_rate: tuple[Annotated[float, Field(gt=0, le=1)], Annotated[float, Field(gt=0, le=1)]] = (5e-6, 5e-5)
    # Search the MoE settings (experts, top-k, layer); false keeps moe.* fixed.
    search_moe: bool = True
    # single: search one MoE layer index; block: a run of block_size consecutive layers.
    layer_mode: Literal["single", "block"] = "single"
    # Layers per MoE block under layer_mode block.
    block_size: int = Field(2, ge=1)
    # Dev evaluations a trial always gets before ASHA may stop it.
    asha_grace_period: int = Field(1, ge=1)
    # ASHA keeps 1 in this many trials at each rung.
    asha_reduction_factor: int = Field(2, ge=2)

    @model_validator(mode="after")
    def _ranges_ordered(self) -> SearchConfig:
        for name in ("lam", "temperature", "learning_rate"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name}: lower bound {lo} is above upper bound {hi}")
        return self


class TrackingConfig(Section):
    # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory.
    tracking_uri: Optional[str] = None
    # MLflow experiments are named <prefix>-<lang>.
    experiment_prefix: str = "clp-ray"
    # Registered models are named <prefix>-<lang> (its @champion is the best).
    registered_model_prefix: str = "clp-ray"
    # Where new MLflow experiments keep artifacts (e.g. s3://...); None: the tracking server's default.
    artifact_location: Optional[str] = None


class EvalConfig(Section):
    # BEIR-layout folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv), or pkg://<bundled asset>.
    data_dir: Optional[str] = None
    # The qrels split reported as the test metric (never used for selection).
    test_split: str = "test"
    # Texts per forward pass while encoding the corpus and queries.
    batch_size: int = Field(64, ge=1)
    # Corpus vectors scored per block in exact search (bounds memory).
    chunk_size: int = Field(4096, ge=1)
    # Passages retrieved per query (the run file's depth; Recall@100 needs >= 100).
    top_k: int = Field(100, ge=10)
    # Where miracl://<lang> reads MIRACL's published files: the Hugging Face hub (hf://datasets,
    # cached on disk) or a local folder with the same layout (miracl/miracl/..., miracl/miracl-corpus/...).
    miracl_root: str = "hf://datasets"
    # How a (query, passage) pair is scored: dense, or with BGE-M3's heads sparse (lexical
    # weights), colbert (multi-vector MaxSim) or hybrid (hybrid_weights' sum of the three).
    mode: Literal["dense", "sparse", "colbert", "hybrid"] = "dense"
    # Weights of the three scores in hybrid mode.
    hybrid_weights: HybridWeights = HybridWeights()
    # None: exact search of the full corpus in every mode. N: sparse/colbert/hybrid re-rank each
    # query's dense top-N (for corpora whose ColBERT token vectors do not fit in memory).
    rerank_depth: Optional[int] = Field(None, ge=1)
    # The dev set that ASHA prunes on, that picks the best trial and that training reports
    # (clp_ray/evaluation/dev_set.py); always searched against the full evaluation corpus:
    #   qrels:   data_dir's qrels/<dev_split>.tsv (queries never trained on);
    #   heldout: queries held out of the training records (data.dev_fraction, data.dev_split),
    #            searched against data_dir's corpus plus every training passage;
    #   auto:    qrels when data_dir has a dev_split other than test_split, else heldout.
    dev_source: Literal["auto", "qrels", "heldout"] = "auto"
    # The qrels split the dev set reads under dev_source qrels/auto.
    dev_split: str = "dev"
    # None: the whole corpus. N: a seeded subsample, every judged passage plus N others (for
    # corpora too large to search at every evaluation, e.g. MIRACL's).
    dev_corpus_sample: Optional[int] = Field(None, ge=0)

    @model_validator(mode="after")
    def _depth_covers_top_k(self) -> EvalConfig:
        if self.rerank_depth is not None and self.rerank_depth < self.top_k:
            raise ValueError(f"rerank_depth ({self.rerank_depth}) must be >= top_k ({self.top_k}): "
                             "a re-ranked list holds only rerank_depth passages")
        return self


class GeneratorConfig(Section):
    """Writes a query for a mined negative that no judged query is relevant to."""

    kind: Literal["none", "openai"] = "none"  # none: keep only negatives with a known query
    base_url: str = "https://api.openai.com/v1"  # any OpenAI-compatible chat-completions endpoint
    # Chat model the generator asks.
    model: str = "gpt-4o-mini"
    # Environment variable holding the API key (never the key itself).
    api_key_env: str = "OPENAI_API_KEY"
    # Requests in flight at once.
    concurrency: int = Field(4, ge=1, le=64)
    # Retries of a failed request (with backoff).
    max_retries: int = Field(3, ge=0)
    # Seconds before a request counts as failed.
    timeout_s: float = Field(30.0, gt=0)
    cache_dir: str = "outputs/generator_cache"  # a re-run never pays twice for the same prompt
    # Stop instead of dropping negatives silently: after this many passages in a row got no query,
    # or when more than max_failure_rate of them got none. Authentication errors stop at once.
    max_consecutive_failures: int = Field(10, ge=1)
    # Stop when more than this share of passages got no query.
    max_failure_rate: float = Field(0.05, ge=0, le=1)
    # Prompt template; {passage} is replaced by the passage text.
    prompt: str = ("Write one short search query, in the language of the passage, that this passage answers. "
                   "Reply with the query only.\n\nPassage:\n{passage}")


class MiningConfig(Section):
    # Candidates retrieved per query before sampling negatives.
    top_k: int = Field(100, ge=2)
    rank_window: tuple[int, int] = (10, 100)  # 1-based ranks [first, last] to sample negatives from
    # Hard negatives kept per query.
    negatives_per_query: int = Field(7, ge=1)
    # False-negative guard: skip candidates scoring >= margin x the positive (relative) or
    # >= positive - margin (absolute).
    margin: float = Field(0.95, ge=0)
    # relative: margin is a factor of the positive's score; absolute: a difference.
    margin_mode: Literal["relative", "absolute"] = "relative"
    # Seed of the negative sampling.
    seed: Seed = 13
    # local: encode and search in this process; ray: Ray Data batch jobs over an actor pool
    # (`actors` actors, one GPU each when ray.use_gpu), for corpora that need the cluster.
    engine: Literal["local", "ray"] = "local"
    # Ray Data actors under engine ray.
    actors: int = Field(2, ge=1)
    # Queries for negatives that no judged query is relevant to.
    generator: GeneratorConfig = GeneratorConfig()

    @model_validator(mode="after")
    def _window_ok(self) -> MiningConfig:
        lo, hi = self.rank_window
        if not 1 <= lo <= hi:
            raise ValueError(f"rank_window {list(self.rank_window)} must satisfy 1 <= first <= last")
        if hi > self.top_k:
            raise ValueError(f"rank_window last rank {hi} exceeds top_k {self.top_k}")
        return self


class RayConfig(Section):
    address: Optional[str] = None  # None: connect to a running cluster if any, else start locally
    # Ray Train workers (ranks) per training run.
    num_workers: int = Field(2, ge=1)
    # One GPU per worker (set by the gpu profile).
    use_gpu: bool = False
    # CPUs each worker reserves.
    cpus_per_worker: float = Field(1, gt=0)
    # GPUs each worker reserves (fractions share a GPU).
    gpus_per_worker: float = Field(0, ge=0)
    # Custom Ray resources each worker reserves (e.g. {accelerator_type:H100: 0.001}).
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    # Start Ray's dashboard with a local ray.init.
    include_dashboard: bool = True
    # Local ray.init only: CPUs to offer (None: all). Ignored when connecting to a cluster.
    num_cpus: Optional[int] = Field(None, ge=1)
    # An autoscaling cluster can grow, so "more workers than the cluster holds now" is no error.
    autoscaling: bool = False


ARM_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"
METRIC_NAMES = ("ndcg@10", "ndcg@5", "recall@100", "mrr@10")


class ArmConfig(Section):
    """One arm of the ablation: a name and the config overrides that make it (dotted keys, or
    nested mappings); ``train: false`` evaluates the model as loaded."""

    # Arm name in the table and in run names.
    name: str = Field(pattern=ARM_NAME)
    # Train the arm (false: evaluate the model as loaded).
    train: bool = True
    # Config keys the arm changes, e.g. {loss.lam: 0.0}.
    overrides: dict[str, Any] = Field(default_factory=dict)


def _paper_arms() -> list[ArmConfig]:
    return [ArmConfig(name="base", train=False),
            ArmConfig(name="cl", overrides={"loss.lam": 0.0, "moe.enabled": False}),
            ArmConfig(name="clp", overrides={"moe.enabled": False}),
            ArmConfig(name="clp_moe", overrides={"moe.enabled": True})]


class AblationConfig(Section):
    """``jobs/ablate.py``: the arms, seeds per trained arm, the metrics of the table (the first one
    is the table's Δ column and the plot's), and the arm every other one is compared against."""

    # The arms; the default is the paper's base, cl, clp and clp_moe.
    arms: list[ArmConfig] = Field(default_factory=_paper_arms, min_length=1)
    # Training seeds per trained arm (train.seed, +1, ...); the table shows mean and spread.
    seeds: int = Field(3, ge=1, le=100)
    # Metrics of the table and of the paired tests.
    metrics: list[Literal["ndcg@10", "ndcg@5", "recall@100", "mrr@10"]] = Field(
        default_factory=lambda: list(METRIC_NAMES), min_length=1)
    # The arm every other one is compared against (paired t-test, Holm-adjusted).
    baseline_arm: str = "cl"
    max_concurrent_runs: Optional[int] = Field(None, ge=1)  # None: as many as the cluster holds

    @model_validator(mode="after")
    def _arms_consistent(self) -> AblationConfig:
        names = [a.name for a in self.arms]
        dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if dup:
            raise ValueError(f"duplicate arm name {dup!r}")
        if self.baseline_arm not in names:
            raise ValueError(f"ablation.baseline_arm {self.baseline_arm!r} is not an arm (arms: {', '.join(names)})")
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError("ablation.metrics lists a metric twice")
        return self


LANG_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"


class ServeConfig(Section):
    """``jobs/serve.py`` / ``serve run``: the Ray Serve app answering ``POST /v1/embeddings`` with
    every language's ``@alias`` model (one deployment, one model per language multiplexed in it)."""

    langs: list[Annotated[str, Field(pattern=LANG_NAME)]] = Field(default_factory=list)  # []: the config's lang
    # Registry alias each language's model is served from.
    alias: str = Field("champion", min_length=1)
    # Address the HTTP proxy binds (127.0.0.1: this machine only).
    host: str = "127.0.0.1"
    # HTTP port of the proxy.
    port: int = Field(8000, ge=1, le=65535)
    # Replicas of the embedding deployment.
    num_replicas: int = Field(1, ge=1)
    # CPUs each replica reserves.
    num_cpus: float = Field(1, gt=0)
    # GPUs each replica reserves.
    num_gpus: float = Field(0, ge=0)
    # Requests a replica holds at once before Serve queues them.
    max_ongoing_requests: int = Field(64, ge=1)
    # @serve.batch: requests of one replica embedded in one forward pass (grouped per model)
    max_batch_size: int = Field(32, ge=1)
    # Seconds a replica waits to fill a batch.
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    encode_batch_size: int = Field(64, ge=1)  # texts per forward pass inside one batch
    # Texts one request may embed (more is a 400).
    max_inputs_per_request: int = Field(256, ge=1)
    # How often each replica asks MLflow where @alias points; a new version is loaded, then served.
    poll_interval_s: float = Field(30.0, gt=0)
    # LRU of loaded models per replica (None: 2 per language, so old and new fit during a switch);
    # versions a request pins (clp-ray-hi/3, clp-ray-hi@challenger) load into it on demand.
    max_models_per_replica: Optional[int] = Field(None, ge=1)
    # Environment variable holding the accepted API keys (comma- or whitespace-separated).
    api_keys_env: Optional[str] = Field("CLP_RAY_API_KEYS", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    # File of accepted API keys, one per line (# comments); adds to api_keys_env's.
    api_keys_file: Optional[str] = None
    # Refuse to start without keys (None: required unless host is a loopback address).
    require_api_keys: Optional[bool] = None
    # Request bodies over this many bytes are a 413 before they are parsed.
    max_request_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    # Characters of all a request's texts together (more is a 413; each text is also truncated at its kind's max length).
    max_chars_per_request: int = Field(1_000_000, ge=1)
    # Requests each HTTP proxy queues for the deployment beyond max_ongoing_requests per replica (more: 503).
    max_queued_requests: int = Field(256, ge=1)
    # Retry-After (seconds) on those 503s; the openai client waits this long and retries.
    retry_after_s: float = Field(1.0, ge=0)


class ExperimentConfig(Section):
    # It names runs, output folders, MLflow experiments and registered models: no path characters.
    lang: str = Field("hi", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    # The encoder and how it embeds.
    model: ModelConfig = ModelConfig()
    # MoE upcycling: which layers, how many experts, what trains.
    moe: MoEConfig = MoEConfig()
    # The CLP loss (and BGE-M3's unified loss).
    loss: LossConfig = LossConfig()
    # Training data: files, record rules, groups, dev split.
    data: DataConfig = DataConfig()
    # The training loop.
    train: TrainConfig = TrainConfig()
    # DeepSpeed ZeRO.
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    # The hyperparameter sweep (jobs/tune.py).
    search: SearchConfig = SearchConfig()
    # MLflow tracking and registry.
    tracking: TrackingConfig = TrackingConfig()
    # Evaluation sets, search and the dev set selection runs on.
    eval: EvalConfig = EvalConfig()
    # Hard-negative mining (jobs/mine.py).
    mining: MiningConfig = MiningConfig()
    # The Ray cluster and the training workers.
    ray: RayConfig = RayConfig()
    # The ablation (jobs/ablate.py).
    ablation: AblationConfig = AblationConfig()
    # The Ray Serve embeddings app (jobs/serve.py).
    serve: ServeConfig = ServeConfig()

    # Per dotted key, the file:line or --set that wrote it (set by load_config). Not part of the
    # config's value: equality, the hash and the dump ignore it; a config rebuilt from a dict has none.
    _where: Optional[dict[str, str]] = PrivateAttr(default=None)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ExperimentConfig) and self.__dict__ == other.__dict__

    def cite(self, key: str) -> str:
        """``key = value (where it was set)``, for checks that run after loading because they span
        several keys or need the model: ``moe.layers = [99] (--set moe.layers=[99])``,
        ``loss.lam = 0.1 (configs/base.yaml:28)``, ``moe.top_k = 1 (defaults)``; no origin when it is
        unknown (a config rebuilt from a dict)."""
        value: Any = self.to_dict()
        for part in key.split("."):
            value = value[part]
        shown = f"{key} = {value if isinstance(value, str) else json.dumps(value)}"
        if self._where is None:
            return shown
        # The exact key only: a section header's line would be wrong for a key left to its default.
        return f"{shown} ({self._where.get(key, 'defaults')})"

    def origin(self, key: str) -> str:
        """Where ``key`` was set: ``configs/base.yaml:28``, ``--set ...``, ``defaults``; ``config``
        when unknown (a config rebuilt from a dict)."""
        return "config" if self._where is None else self._where.get(key, "defaults")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def config_hash(self) -> str:
        """A short stable hash of the resolved config, for naming runs and sweeps."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]

    def flat(self) -> dict[str, Any]:
        """Dotted-key view (``loss.temperature``), e.g. for MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, node: Any) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = node

        walk("", self.to_dict())
        return out
