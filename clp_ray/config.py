"""The experiment configuration: one typed pydantic tree, loaded from layered YAML files.

Resolution order (later wins): ``configs/base.yaml`` -> ``configs/lang/<lang>.yaml`` ->
``configs/profiles/<profile>.yaml`` -> each ``--set dotted.key=value`` in order. Every leaf remembers
the file and line it came from, so a validation error reads
``configs/lang/hi.yaml:4: loss.temperature: Input should be greater than 0 (got -1)``.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator, model_validator

from clp_ray import bounded_yaml
from clp_ray.errors import ConfigError
from clp_ray.moe_spec import ROUTER_DEFAULTS, TopOneGate

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"


def default_config_dir() -> Path:
    """``$CLP_RAY_CONFIG_DIR`` or the repository's ``configs/`` next to the package."""
    return Path(os.environ.get("CLP_RAY_CONFIG_DIR", PACKAGE_DIR.parent / "configs"))


# Seeds feed torch, numpy and Python's random: one range all of them take.
Seed = Annotated[int, Field(ge=0, lt=2**32)]


class _Section(BaseModel):
    # Unknown keys are errors, not silently ignored typos; assignments are validated too; no
    # infinities or NaN where a number is expected (.inf would pass a `ge=0` bound).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_scalars(cls, value: Any, info: ValidationInfo) -> Any:
        """No booleans where a number is expected (pydantic would make ``true`` 1) and no numbers
        where a boolean is (``2`` would be True)."""
        kinds = _scalar_kinds(cls.model_fields[info.field_name].annotation)
        if isinstance(value, bool) and kinds and bool not in kinds:
            raise ValueError(f"expected {' or '.join(k.__name__ for k in kinds)}, not a boolean")
        if kinds == {bool} and not isinstance(value, bool) and isinstance(value, (int, float)):
            raise ValueError("expected true or false, not a number")
        return value


def _scalar_kinds(annotation: Any) -> set[type]:
    """The int/float/bool types an annotation admits (through Optional, Annotated, unions)."""
    if annotation in (int, float, bool):
        return {annotation}
    return {k for arg in get_args(annotation) for k in _scalar_kinds(arg)}


class TinyModelConfig(_Section):
    """A seeded random XLM-R-shaped encoder for tests and the offline profile (no hub access)."""

    hidden_size: int = Field(64, ge=8, le=128)
    num_layers: int = Field(4, ge=1, le=12)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(128, ge=8)
    vocab_size: int = Field(4000, ge=300, le=50000)
    max_position_embeddings: int = Field(514, ge=16)
    seed: Seed = 0
    # BGE-M3's sparse and ColBERT heads (random, seeded) beside the encoder, in the hub layout
    m3_heads: bool = False

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        return self


# The model settings that decide what vector a text gets (clp_ray.model_settings.EmbedSettings).
MODEL_SETTINGS = ("pooling", "normalize", "query_max_len", "passage_max_len", "query_prefix", "passage_prefix")


class ModelConfig(_Section):
    # "tiny" builds TinyModelConfig's encoder offline; anything else is a hub id or a local folder.
    name_or_path: str = "BAAI/bge-m3"
    # How the model embeds. None (unset): what the model folder says (clp_ray.json, or its
    # sentence-transformers files), else the defaults (cls, true, 64, 256, no prefixes). A value set
    # in a config file applies only to the model that file (or an earlier one) names; see build_config.
    pooling: Optional[Literal["cls", "mean"]] = None
    normalize: Optional[bool] = None
    query_max_len: Optional[int] = Field(None, ge=4, le=8192)
    passage_max_len: Optional[int] = Field(None, ge=4, le=8192)
    query_prefix: Optional[str] = None  # e.g. "query: " for E5 models; "" for none
    passage_prefix: Optional[str] = None  # e.g. "passage: "
    gradient_checkpointing: bool = False
    # BGE-M3's sparse and ColBERT heads (sparse_linear.pt, colbert_linear.pt), where the model has
    # them: keep = train the dense path only and carry the heads unchanged into every saved model;
    # unified = train dense + sparse + ColBERT together (loss.m3; a model without heads gets new ones).
    m3_heads: Literal["keep", "unified"] = "keep"
    tiny: TinyModelConfig = TinyModelConfig()

    def explicit_settings(self) -> dict[str, Any]:
        """The settings the user set for this model (the rest come from the folder or defaults)."""
        return {k: getattr(self, k) for k in MODEL_SETTINGS if getattr(self, k) is not None}


class RouterConfig(_Section):
    # Defaults and meaning: clp_ray.moe_spec.RouterSettings (declared once, for every MoE entry point).
    balance_coef: float = Field(ROUTER_DEFAULTS.balance_coef, ge=0)
    z_coef: float = Field(ROUTER_DEFAULTS.z_coef, ge=0)
    jitter: float = Field(ROUTER_DEFAULTS.jitter, ge=0, lt=1)
    top1_gate: TopOneGate = ROUTER_DEFAULTS.top1_gate


class MoEConfig(_Section):
    enabled: bool = True
    # Encoder layer indices to upcycle; negative indices count from the last layer.
    layers: list[int] = Field(default_factory=lambda: [-1], min_length=1)
    site: Literal["intermediate", "output"] = "intermediate"
    num_experts: int = Field(2, ge=1, le=64)
    top_k: int = Field(1, ge=1)
    # moe: experts + routers; site: moe.site of moe.layers (dense or MoE); ffn: every FFN; all
    train_only: Literal["moe", "site", "ffn", "all"] = "moe"
    router: RouterConfig = RouterConfig()

    @model_validator(mode="after")
    def _top_k_fits(self) -> MoEConfig:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        return self


class HybridWeights(_Section):
    """``hybrid`` score = dense·s_dense + sparse·s_sparse + colbert·s_colbert (BGE-M3's 1 / 0.3 / 1)."""

    dense: float = Field(1.0, ge=0)
    sparse: float = Field(0.3, ge=0)
    colbert: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _some_weight(self) -> HybridWeights:
        if not (self.dense or self.sparse or self.colbert):
            raise ValueError("at least one hybrid weight must be > 0")
        return self


class M3LossConfig(_Section):
    """Unified M3 training (``model.m3_heads: unified``): clp_ray/m3_loss.py."""

    # Modes whose hard negatives get the CLP penalty (pulled towards their own query), weight loss.lam.
    penalty_modes: list[Literal["dense", "sparse", "colbert"]] = Field(default_factory=lambda: ["dense"])
    self_distill: bool = True  # the ensemble's scores teach each mode (BGE-M3's self-knowledge distillation)
    ensemble_weights: HybridWeights = HybridWeights()  # the ensemble score the distillation learns from
    sparse_loss_weight: float = Field(0.1, ge=0)  # BGE-M3 scales the sparse terms by 0.1


class LossConfig(_Section):
    temperature: float = Field(0.02, gt=0, le=1)
    lam: float = Field(0.1, ge=0, le=1)
    cross_device_negatives: bool = True
    m3: M3LossConfig = M3LossConfig()


class DataConfig(_Section):
    # JSONL files or folders: local paths, fsspec URLs (s3://...) or pkg://<bundled asset>.
    train_paths: list[str] = Field(default_factory=list)
    train_group_size: int = Field(8, ge=1, le=256)
    on_bad_record: Literal["error", "skip"] = "error"
    # Records identical to an earlier one (a file given twice, repeated lines): keep (and warn),
    # drop, or treat as bad records.
    on_duplicate: Literal["keep", "drop", "error"] = "keep"
    max_line_bytes: int = Field(1_000_000, ge=64)
    dev_fraction: float = Field(0.1, ge=0, lt=1)
    # How the dev split is carved from the training records: "queries" (query-disjoint; dev
    # queries may share positive documents with training queries) or "documents" (no dev
    # positive is a training positive: dev predicts a document-disjoint test set).
    dev_split: Literal["queries", "documents"] = "queries"
    seed: Seed = 42
    # Texts per length-sorted padded sub-batch when encoding a training batch (0: pad the whole
    # batch to its longest text). Smaller = less padding, larger = bigger matmuls.
    length_bucket_size: int = Field(16, ge=0)


class TrainConfig(_Section):
    epochs: int = Field(1, ge=1)
    max_steps: Optional[int] = Field(None, ge=1)
    per_device_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-5, gt=0, le=1)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    # "auto": bf16 on GPU, fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    max_grad_norm: float = Field(1.0, ge=0)  # 0 disables clipping
    eval_every_steps: Optional[int] = Field(None, ge=1)  # optimizer steps; None: once per epoch
    log_every_steps: int = Field(10, ge=1)
    seed: Seed = 42
    max_failures: int = Field(1, ge=-1)
    checkpoints_to_keep: int = Field(2, ge=1)
    output_dir: str = "outputs"
    # Stable name => re-running the same command resumes; None: train-<lang>-<config hash>.
    run_name: Optional[str] = None
    storage_path: Optional[str] = None  # Ray Train storage; None: <output_dir>/ray_results
    # Gradient caching: every encoder call runs in chunks of grad_cache_chunk_size sequences, only
    # one chunk's activations alive at a time (each chunk's forward runs twice): contrastive batches
    # far larger than the GPU holds, with the same gradients (clp_ray/objective.py).
    grad_cache: bool = False
    grad_cache_chunk_size: int = Field(32, ge=1)
    # Test hook: raise on this rank at this optimizer step, once per run (fault-tolerance tests).
    debug_fail_at_step: Optional[int] = Field(None, ge=1)
    debug_fail_rank: int = Field(1, ge=0)


class DeepSpeedConfig(_Section):
    stage: Literal[0, 1, 2, 3] = 2
    config_dir: Optional[str] = None  # None: <config dir>/deepspeed
    offload_optimizer: bool = False  # ZeRO-Offload of optimizer state to CPU (stage >= 1)
    # Merged (recursively) over configs/deepspeed/zero<stage>.json, e.g. {zero_optimization: {...}}.
    overrides: dict[str, Any] = Field(default_factory=dict)


class SearchConfig(_Section):
    num_samples: int = Field(16, ge=1)
    max_concurrent_trials: Optional[int] = Field(None, ge=1)
    seed: Seed = 0
    # Bounds and choices obey the same limits as the settings they feed (loss.*, moe.*,
    # train.learning_rate), so a bad range fails here instead of in every trial.
    lam: tuple[Annotated[float, Field(ge=0, le=1)], Annotated[float, Field(ge=0, le=1)]] = (0.0, 0.5)
    temperature: tuple[Annotated[float, Field(gt=0, le=1)], Annotated[float, Field(gt=0, le=1)]] = (0.01, 0.1)
    num_experts: list[Annotated[int, Field(ge=1, le=64)]] = Field(default_factory=lambda: [2, 4, 8], min_length=1)
    top_k: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 2], min_length=1)
    learning_rate: tuple[Annotated[float, Field(gt=0, le=1)], Annotated[float, Field(gt=0, le=1)]] = (5e-6, 5e-5)
    search_moe: bool = True
    layer_mode: Literal["single", "block"] = "single"
    block_size: int = Field(2, ge=1)
    asha_grace_period: int = Field(1, ge=1)
    asha_reduction_factor: int = Field(2, ge=2)

    @model_validator(mode="after")
    def _ranges_ordered(self) -> SearchConfig:
        for name in ("lam", "temperature", "learning_rate"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name}: lower bound {lo} is above upper bound {hi}")
        return self


class TrackingConfig(_Section):
    # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory.
    tracking_uri: Optional[str] = None
    experiment_prefix: str = "clp-ray"
    registered_model_prefix: str = "clp-ray"
    artifact_location: Optional[str] = None


class EvalConfig(_Section):
    # BEIR-layout folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv), or pkg://<bundled asset>.
    data_dir: Optional[str] = None
    test_split: str = "test"
    batch_size: int = Field(64, ge=1)
    chunk_size: int = Field(4096, ge=1)
    top_k: int = Field(100, ge=10)
    # Where miracl://<lang> reads MIRACL's published files: the Hugging Face hub (hf://datasets,
    # cached on disk) or a local folder with the same layout (miracl/miracl/..., miracl/miracl-corpus/...).
    miracl_root: str = "hf://datasets"
    # How a (query, passage) pair is scored: dense, or with BGE-M3's heads sparse (lexical
    # weights), colbert (multi-vector MaxSim) or hybrid (hybrid_weights' sum of the three).
    mode: Literal["dense", "sparse", "colbert", "hybrid"] = "dense"
    hybrid_weights: HybridWeights = HybridWeights()
    # None: exact search of the full corpus in every mode. N: sparse/colbert/hybrid re-rank each
    # query's dense top-N (for corpora whose ColBERT token vectors do not fit in memory).
    rerank_depth: Optional[int] = Field(None, ge=1)
    # The dev set that ASHA prunes on, that picks the best trial and that training reports
    # (clp_ray/dev_set.py); always searched against the full evaluation corpus:
    #   qrels:   data_dir's qrels/<dev_split>.tsv (queries never trained on);
    #   heldout: queries held out of the training records (data.dev_fraction, data.dev_split),
    #            searched against data_dir's corpus plus every training passage;
    #   auto:    qrels when data_dir has a dev_split other than test_split, else heldout.
    dev_source: Literal["auto", "qrels", "heldout"] = "auto"
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


class GeneratorConfig(_Section):
    """Writes a query for a mined negative that no judged query is relevant to."""

    kind: Literal["none", "openai"] = "none"  # none: keep only negatives with a known query
    base_url: str = "https://api.openai.com/v1"  # any OpenAI-compatible chat-completions endpoint
    model: str = "gpt-4o-mini"
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = Field(4, ge=1, le=64)
    max_retries: int = Field(3, ge=0)
    timeout_s: float = Field(30.0, gt=0)
    cache_dir: str = "outputs/generator_cache"  # a re-run never pays twice for the same prompt
    # Stop instead of dropping negatives silently: after this many passages in a row got no query,
    # or when more than max_failure_rate of them got none. Authentication errors stop at once.
    max_consecutive_failures: int = Field(10, ge=1)
    max_failure_rate: float = Field(0.05, ge=0, le=1)
    prompt: str = ("Write one short search query, in the language of the passage, that this passage answers. "
                   "Reply with the query only.\n\nPassage:\n{passage}")


class MiningConfig(_Section):
    top_k: int = Field(100, ge=2)
    rank_window: tuple[int, int] = (10, 100)  # 1-based ranks [first, last] to sample negatives from
    negatives_per_query: int = Field(7, ge=1)
    # False-negative guard: skip candidates scoring >= margin x the positive (relative) or
    # >= positive - margin (absolute).
    margin: float = Field(0.95, ge=0)
    margin_mode: Literal["relative", "absolute"] = "relative"
    seed: Seed = 13
    # local: encode and search in this process; ray: Ray Data batch jobs over an actor pool
    # (`actors` actors, one GPU each when ray.use_gpu), for corpora that need the cluster.
    engine: Literal["local", "ray"] = "local"
    actors: int = Field(2, ge=1)
    generator: GeneratorConfig = GeneratorConfig()

    @model_validator(mode="after")
    def _window_ok(self) -> MiningConfig:
        lo, hi = self.rank_window
        if not 1 <= lo <= hi:
            raise ValueError(f"rank_window {list(self.rank_window)} must satisfy 1 <= first <= last")
        if hi > self.top_k:
            raise ValueError(f"rank_window last rank {hi} exceeds top_k {self.top_k}")
        return self


class RayConfig(_Section):
    address: Optional[str] = None  # None: connect to a running cluster if any, else start locally
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    include_dashboard: bool = True
    # Local ray.init only: CPUs to offer (None: all). Ignored when connecting to a cluster.
    num_cpus: Optional[int] = Field(None, ge=1)
    # An autoscaling cluster can grow, so "more workers than the cluster holds now" is no error.
    autoscaling: bool = False


ARM_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"
METRIC_NAMES = ("ndcg@10", "ndcg@5", "recall@100", "mrr@10")


class ArmConfig(_Section):
    """One arm of the ablation: a name and the config overrides that make it (dotted keys, or
    nested mappings); ``train: false`` evaluates the model as loaded."""

    name: str = Field(pattern=ARM_NAME)
    train: bool = True
    overrides: dict[str, Any] = Field(default_factory=dict)


def _paper_arms() -> list[ArmConfig]:
    return [ArmConfig(name="base", train=False),
            ArmConfig(name="cl", overrides={"loss.lam": 0.0, "moe.enabled": False}),
            ArmConfig(name="clp", overrides={"moe.enabled": False}),
            ArmConfig(name="clp_moe", overrides={"moe.enabled": True})]


class AblationConfig(_Section):
    """``jobs/ablate.py``: the arms, seeds per trained arm, the metrics of the table (the first one
    is the table's Δ column and the plot's), and the arm every other one is compared against."""

    arms: list[ArmConfig] = Field(default_factory=_paper_arms, min_length=1)
    seeds: int = Field(3, ge=1, le=100)
    metrics: list[Literal["ndcg@10", "ndcg@5", "recall@100", "mrr@10"]] = Field(
        default_factory=lambda: list(METRIC_NAMES), min_length=1)
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


class ServeConfig(_Section):
    """``jobs/serve.py`` / ``serve run``: the Ray Serve app answering ``POST /v1/embeddings`` with
    every language's ``@alias`` model (one deployment, one model per language multiplexed in it)."""

    langs: list[Annotated[str, Field(pattern=LANG_NAME)]] = Field(default_factory=list)  # []: the config's lang
    alias: str = Field("champion", min_length=1)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1, gt=0)
    num_gpus: float = Field(0, ge=0)
    max_ongoing_requests: int = Field(64, ge=1)
    # @serve.batch: requests of one replica embedded in one forward pass (grouped per model)
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    encode_batch_size: int = Field(64, ge=1)  # texts per forward pass inside one batch
    max_inputs_per_request: int = Field(256, ge=1)
    # How often each replica asks MLflow where @alias points; a new version is loaded, then served.
    poll_interval_s: float = Field(30.0, gt=0)
    # LRU of loaded models per replica (None: 2 per language, so old and new fit during a switch).
    max_models_per_replica: Optional[int] = Field(None, ge=1)


class ExperimentConfig(_Section):
    # It names runs, output folders, MLflow experiments and registered models: no path characters.
    lang: str = Field("hi", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    model: ModelConfig = ModelConfig()
    moe: MoEConfig = MoEConfig()
    loss: LossConfig = LossConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    search: SearchConfig = SearchConfig()
    tracking: TrackingConfig = TrackingConfig()
    eval: EvalConfig = EvalConfig()
    mining: MiningConfig = MiningConfig()
    ray: RayConfig = RayConfig()
    ablation: AblationConfig = AblationConfig()
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


# --------------------------------------------------------------------------------------------
# Layered loading with provenance.


class _Layer:
    """One source of settings: its data and, per dotted key, where that key was written.
    ``user_set``: a ``--set`` (or ``--model``) on the command line rather than a config file."""

    def __init__(self, data: dict[str, Any], where: dict[str, str], user_set: bool = False):
        self.data = data
        self.where = where
        self.user_set = user_set


def _node_lines(node: yaml.Node, path: str, source: str, where: dict[str, str]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{path}.{key_node.value}" if path else str(key_node.value)
            line = f"{source}:{key_node.start_mark.line + 1}"
            if key in where:  # YAML loaders keep the last one: a whole section would vanish silently
                raise ConfigError(f"{line}: {key}: duplicate key (first set at {where[key]})")
            where[key] = line
            _node_lines(value_node, key, source, where)


def load_yaml_layer(path: Path) -> _Layer:
    shown = _display_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{shown}: cannot read config file: {e.strerror or e}") from None
    try:
        data, node = bounded_yaml.compose_and_load(text)
    except bounded_yaml.YAMLBombError as e:
        raise ConfigError(f"{shown}: refused: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{shown}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    except (ValueError, RecursionError) as e:  # e.g. an integer of thousands of digits
        raise ConfigError(f"{shown}: unusable value: {_first_line(e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{shown}:1: top level must be a mapping of sections, got {type(data).__name__}")
    where: dict[str, str] = {}
    if node is not None:
        _node_lines(node, "", shown, where)
    return _Layer(data, where)


def parse_set(assignment: str) -> _Layer:
    """``train.learning_rate=3e-5`` -> a layer; the value is parsed as a YAML scalar/flow value."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {assignment!r}: expected dotted.key=value")
    try:
        value = bounded_yaml.safe_load(raw) if raw.strip() else ""
    except bounded_yaml.YAMLBombError as e:
        raise ConfigError(f"--set {_shorten(assignment)!r}: refused: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {_shorten(assignment)!r}: value is not valid YAML: {e}") from None
    except (ValueError, RecursionError) as e:  # e.g. an integer of thousands of digits
        raise ConfigError(f"--set {_shorten(assignment)!r}: unusable value: {_first_line(e)}") from None
    data: dict[str, Any] = {}
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    where = {".".join(parts[: i + 1]): f"--set {_shorten(assignment)}" for i in range(len(parts))}
    return _Layer(data, where, user_set=True)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        return f"<{type(value).__name__} too long to show>"


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _merge(base: dict[str, Any], overlay: dict[str, Any], where: dict[str, str], overlay_where: dict[str, str], prefix: str = "") -> None:
    for key, value in overlay.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, where, overlay_where, path)
        else:
            base[key] = copy.deepcopy(value)
            # Forget provenance of keys the overlay replaced wholesale.
            for k in [k for k in where if k.startswith(path + ".")]:
                del where[k]
            for k, v in overlay_where.items():
                if k == path or k.startswith(path + "."):
                    where[k] = v
        if path in overlay_where:
            where[path] = overlay_where[path]


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def known_languages(config_dir: Path | None = None) -> list[str]:
    return sorted(p.stem for p in ((config_dir or default_config_dir()) / "lang").glob("*.yaml"))


def known_profiles(config_dir: Path | None = None) -> list[str]:
    return sorted(p.stem for p in ((config_dir or default_config_dir()) / "profiles").glob("*.yaml"))


def _format_error(err: dict[str, Any], where: dict[str, str]) -> str:
    loc = [str(p) for p in err["loc"]]
    dotted = ".".join(loc) or "<root>"
    source = None
    for n in range(len(loc), 0, -1):  # longest prefix that some layer wrote
        source = where.get(".".join(loc[:n]))
        if source:
            break
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key" + _key_hint(err["loc"])
    elif err["type"] == "missing":
        msg = "required key is missing"
    elif "input" in err and not isinstance(err["input"], dict):
        msg = f"{msg} (got {_shorten(_safe_repr(err['input']))})"
    return f"{source or 'defaults'}: {dotted}: {msg}"


def _key_hint(loc: tuple) -> str:
    """`` (did you mean X?)`` for a near miss, else the section's valid keys; '' if unknown."""
    section: Any = ExperimentConfig
    for part in loc[:-1]:  # walk down to the section that holds the unknown key
        field = section.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return ""
        candidates = [field.annotation, *get_args(field.annotation)]  # Optional[Section] too
        section = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if section is None:
            return ""
    keys = list(section.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), keys, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else f"; valid keys here: {', '.join(keys)}"


def _stale_model_settings(layers: list[_Layer]) -> list[str]:
    """The ``model.*`` settings (pooling, max lengths, prefixes, ...) whose last writer is a config
    file that comes before the layer naming the model: they describe that file's model (BGE-M3 in
    base.yaml, the profile's model), not the one named later (``--set model.name_or_path=DIR``,
    ``--model DIR``), so that model's own folder decides them. ``--set`` values always apply."""
    def model_part(layer: _Layer) -> dict:
        part = layer.data.get("model")
        return part if isinstance(part, dict) else {}

    named_at = max((i for i, layer in enumerate(layers) if "name_or_path" in model_part(layer)), default=-1)
    stale = []
    for key in MODEL_SETTINGS:
        last = max((i for i, layer in enumerate(layers) if key in model_part(layer)), default=None)
        if last is not None and last < named_at and not layers[last].user_set:
            stale.append(key)
    return stale


def build_config(layers: list[_Layer]) -> ExperimentConfig:
    data: dict[str, Any] = {}
    where: dict[str, str] = {}
    for layer in layers:
        _merge(data, layer.data, where, layer.where)
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    for key in _stale_model_settings(layers):
        value, origin = model.pop(key, None), where.pop(f"model.{key}", "?")
        log.info("model.%s = %r (%s) describes another model than model.name_or_path = %s (%s): left to that "
                 "model's own folder", key, value, origin, model.get("name_or_path"), where.get("model.name_or_path"))
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as e:
        lines = [_format_error(err, where) for err in e.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
    cfg._where = where
    return cfg


def apply_overrides(cfg: ExperimentConfig, overrides: dict[str, Any], origin: str) -> ExperimentConfig:
    """``cfg`` with ``overrides`` (``{"loss.lam": 0.0}`` or nested mappings) applied and validated
    as a ``--set`` would be; errors name ``origin`` and the key path."""
    data: dict[str, Any] = {}
    where: dict[str, str] = {}
    for key, value in overrides.items():
        parts = str(key).split(".")
        if not all(parts):
            raise ConfigError(f"{origin}: {key!r}: expected a dotted key")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{origin}: {key}: conflicts with another override of {part}")
        node[parts[-1]] = value
        where.update({".".join(parts[: i + 1]): origin for i in range(len(parts))})
    return build_config([_Layer(cfg.to_dict(), dict(cfg._where or {})), _Layer(data, where, user_set=True)])


def _unknown(kind: str, name: str, folder: Path, known: list[str]) -> ConfigError:
    where = f"not a file in {_display_path(folder)}" if "/" in name or "\\" in name else f"no {_display_path(folder / f'{name}.yaml')}"
    return ConfigError(f"unknown {kind} {name!r}: {where}; known {kind}s: {', '.join(known) or '(none)'}")


def load_config(
    lang: str | None = None,
    profile: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    config_dir: str | os.PathLike | None = None,
    extra_files: list[str | os.PathLike] | tuple = (),
    model: Optional[str] = None,
) -> ExperimentConfig:
    """Resolve base -> lang -> profile -> extra files -> ``--set`` overrides into a validated config.

    ``model``: a model named on the command line (``--model REF``) as the last layer; the model
    settings written for the config's own model then no longer apply (:func:`_stale_model_settings`).
    """
    cdir = Path(config_dir) if config_dir else default_config_dir()
    base = cdir / "base.yaml"
    if not base.exists():
        raise ConfigError(f"{_display_path(base)}: base config not found (config dir {cdir})")
    layers = [load_yaml_layer(base)]
    if lang is not None:
        # Only a file in lang/ itself: "../profiles/local" would exist, and the language names runs,
        # output folders and MLflow experiments.
        if lang not in known_languages(cdir):
            raise _unknown("language", lang, cdir / "lang", known_languages(cdir))
        layers.append(load_yaml_layer(cdir / "lang" / f"{lang}.yaml"))
        layers.append(_Layer({"lang": lang}, {"lang": f"--lang {lang}"}))
    if profile is not None:
        if profile not in known_profiles(cdir):
            raise _unknown("profile", profile, cdir / "profiles", known_profiles(cdir))
        layers.append(load_yaml_layer(cdir / "profiles" / f"{profile}.yaml"))
    layers.extend(load_yaml_layer(Path(f)) for f in extra_files)
    _check_set_conflicts(overrides)
    layers.extend(parse_set(s) for s in overrides)
    if model is not None:
        layers.append(_Layer({"model": {"name_or_path": model}}, {"model.name_or_path": f"--model {model}"}, user_set=True))
    return build_config(layers)


def _check_set_conflicts(overrides) -> None:
    """``--set ray=5 --set ray.num_workers=2``: one replaces the other whole; name both."""
    keys = [(s.partition("=")[0].strip(), s) for s in overrides]
    for i, (a, sa) in enumerate(keys):
        for b, sb in keys[i + 1:]:
            if a != b and (b.startswith(a + ".") or a.startswith(b + ".")):
                raise ConfigError(f"--set {_shorten(sa)!r} and --set {_shorten(sb)!r} conflict: one sets a key inside "
                                  "the other, so the later would silently replace the earlier; keep one")


def resolve_path(path: str | os.PathLike) -> str:
    """Resolve a config path: ``pkg://x`` names the package's bundled assets (so the offline
    profile works from any directory); URLs and other paths are returned as given."""
    p = str(path)
    if p.startswith("pkg://"):
        return str(ASSETS_DIR / p.removeprefix("pkg://"))
    return p
