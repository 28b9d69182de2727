"""The config sections of training: model, MoE, loss, data, train, DeepSpeed."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from clp_ray.config.base import Section, Seed
from clp_ray.config.moe_spec import ROUTER_DEFAULTS, TopOneGate


class TinyModelConfig(Section):
    """A seeded random XLM-R-shaped encoder for tests and the offline profile (no hub access)."""

    # Width of the encoder's hidden states.
    hidden_size: int = Field(64, ge=8, le=128)
    # Transformer layers.
    num_layers: int = Field(4, ge=1, le=12)
    # Attention heads (must divide hidden_size).
    num_heads: int = Field(4, ge=1)
    # Width of each FFN's inner layer (what MoE upcycles).
    intermediate_size: int = Field(128, ge=8)
    # Tokens kept from the bundled XLM-R tokenizer's vocabulary.
    vocab_size: int = Field(4000, ge=300, le=50000)
    # Longest sequence (positions) the encoder takes.
    max_position_embeddings: int = Field(514, ge=16)
    # Seed of the random weights: the same seed builds the same model.
    seed: Seed = 0
    # BGE-M3's sparse and ColBERT heads (random, seeded) beside the encoder, in the hub layout
    m3_heads: bool = False

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        return self


# The model settings that decide what vector a text gets (clp_ray.model.settings.EmbedSettings).
MODEL_SETTINGS = ("pooling", "normalize", "query_max_len", "passage_max_len", "query_prefix", "passage_prefix")


class ModelConfig(Section):
    # "tiny" builds TinyModelConfig's encoder offline; anything else is a hub id or a local folder.
    name_or_path: str = "BAAI/bge-m3"
    # How the model embeds. None (unset): what the model folder says (clp_ray.json, or its
    # sentence-transformers files), else the defaults (cls, true, 64, 256, no prefixes). A value set
    # in a config file applies only to the model that file (or an earlier one) names; see build_config.
    pooling: Optional[Literal["cls", "mean"]] = None
    # L2-normalise embeddings (cosine scores); None: the folder's setting, else true.
    normalize: Optional[bool] = None
    # Tokens a query is cut to; None: the folder's setting, else 64.
    query_max_len: Optional[int] = Field(None, ge=4, le=8192)
    # Tokens a passage is cut to; None: the folder's setting, else 256.
    passage_max_len: Optional[int] = Field(None, ge=4, le=8192)
    query_prefix: Optional[str] = None  # e.g. "query: " for E5 models; "" for none
    passage_prefix: Optional[str] = None  # e.g. "passage: "
    # Recompute activations in the backward pass: less memory, about a third more compute.
    gradient_checkpointing: bool = False
    # BGE-M3's sparse and ColBERT heads (sparse_linear.pt, colbert_linear.pt), where the model has
    # them: keep = train the dense path only and carry the heads unchanged into every saved model;
    # unified = train dense + sparse + ColBERT together (loss.m3; a model without heads gets new ones).
    m3_heads: Literal["keep", "unified"] = "keep"
    # The offline random encoder built when name_or_path is "tiny".
    tiny: TinyModelConfig = TinyModelConfig()

    def explicit_settings(self) -> dict[str, Any]:
        """The settings the user set for this model (the rest come from the folder or defaults)."""
        return {k: getattr(self, k) for k in MODEL_SETTINGS if getattr(self, k) is not None}


class RouterConfig(Section):
    """The router's auxiliary losses; defaults and meaning are declared once, in
    :class:`clp_ray.config.moe_spec.RouterSettings`, for every MoE entry point."""

    # Weight of the Switch Transformer load-balancing loss.
    balance_coef: float = Field(ROUTER_DEFAULTS.balance_coef, ge=0)
    # Weight of the ST-MoE router z-loss (keeps router logits small).
    z_coef: float = Field(ROUTER_DEFAULTS.z_coef, ge=0)
    # Multiplicative noise on router inputs while training (Switch Transformer); 0 disables.
    jitter: float = Field(ROUTER_DEFAULTS.jitter, ge=0, lt=1)
    # With top_k 1: how the chosen expert's output is scaled (its probability, or 1).
    top1_gate: TopOneGate = ROUTER_DEFAULTS.top1_gate


class MoEConfig(Section):
    # Upcycle moe.layers into experts; false trains the dense model.
    enabled: bool = True
    # Encoder layer indices to upcycle; negative indices count from the last layer.
    layers: list[int] = Field(default_factory=lambda: [-1], min_length=1)
    # Which FFN Linear becomes the experts: intermediate.dense or output.dense.
    site: Literal["intermediate", "output"] = "intermediate"
    # Experts per MoE layer, each a copy of the dense weights at upcycling.
    num_experts: int = Field(2, ge=1, le=64)
    # Experts each token is routed to (at most num_experts).
    top_k: int = Field(1, ge=1)
    # moe: experts + routers; site: moe.site of moe.layers (dense or MoE); ffn: every FFN; all
    train_only: Literal["moe", "site", "ffn", "all"] = "moe"
    # The router's auxiliary losses and noise.
    router: RouterConfig = RouterConfig()

    @model_validator(mode="after")
    def _top_k_fits(self) -> MoEConfig:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        return self


class HybridWeights(Section):
    """``hybrid`` score = dense·s_dense + sparse·s_sparse + colbert·s_colbert (BGE-M3's 1 / 0.3 / 1)."""

    # Weight of the dense (CLS/mean vector) score.
    dense: float = Field(1.0, ge=0)
    # Weight of the sparse (lexical) score.
    sparse: float = Field(0.3, ge=0)
    # Weight of the ColBERT (multi-vector) score.
    colbert: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _some_weight(self) -> HybridWeights:
        if not (self.dense or self.sparse or self.colbert):
            raise ValueError("at least one hybrid weight must be > 0")
        return self


class M3LossConfig(Section):
    """Unified M3 training (``model.m3_heads: unified``): clp_ray/loss/m3.py."""

    # Modes whose hard negatives get the CLP penalty (pulled towards their own query), weight loss.lam.
    penalty_modes: list[Literal["dense", "sparse", "colbert"]] = Field(default_factory=lambda: ["dense"])
    self_distill: bool = True  # the ensemble's scores teach each mode (BGE-M3's self-knowledge distillation)
    ensemble_weights: HybridWeights = HybridWeights()  # the ensemble score the distillation learns from
    sparse_loss_weight: float = Field(0.1, ge=0)  # BGE-M3 scales the sparse terms by 0.1


class LossConfig(Section):
    # InfoNCE temperature τ (the CLP paper's 0.02).
    temperature: float = Field(0.02, gt=0, le=1)
    # CLP weight λ: loss = (1-λ)·InfoNCE + λ·mean(1 - cos(neg, neg_q)); 0 is plain contrastive learning.
    lam: float = Field(0.1, ge=0, le=1)
    # Score each query against every rank's passages (all-gather), not only its own rank's.
    cross_device_negatives: bool = True
    # BGE-M3 unified training (model.m3_heads: unified).
    m3: M3LossConfig = M3LossConfig()


class DataConfig(Section):
    # JSONL files or folders: local paths, fsspec URLs (s3://...) or pkg://<bundled asset>.
    train_paths: list[str] = Field(default_factory=list)
    # Passages per query in a batch: one positive and train_group_size - 1 hard negatives.
    train_group_size: int = Field(8, ge=1, le=256)
    # A record that breaks the rules: error stops with the problems listed; skip drops it (rejects file, counts).
    on_bad_record: Literal["error", "skip"] = "error"
    # Records identical to an earlier one (a file given twice, repeated lines): keep (and warn),
    # drop, or treat as bad records.
    on_duplicate: Literal["keep", "drop", "error"] = "keep"
    # Longest JSONL line read; a longer one is a bad record, never held whole in memory.
    max_line_bytes: int = Field(1_000_000, ge=64)
    # Share of training records held out as dev queries (eval.dev_source heldout); 0 holds none out.
    dev_fraction: float = Field(0.1, ge=0, lt=1)
    # How the dev split is carved from the training records: "queries" (query-disjoint; dev
    # queries may share positive documents with training queries) or "documents" (no dev
    # positive is a training positive: dev predicts a document-disjoint test set).
    dev_split: Literal["queries", "documents"] = "queries"
    # Seed of the dev split and of group sampling.
    seed: Seed = 42
    # Texts per length-sorted padded sub-batch when encoding a training batch (0: pad the whole
    # batch to its longest text). Smaller = less padding, larger = bigger matmuls.
    length_bucket_size: int = Field(16, ge=0)


class TrainConfig(Section):
    # Passes over the training records.
    epochs: int = Field(1, ge=1)
    # Stop after this many optimizer steps (None: run every epoch).
    max_steps: Optional[int] = Field(None, ge=1)
    # Queries per rank per micro-batch (each with train_group_size passages).
    per_device_batch_size: int = Field(8, ge=1)
    # Micro-batches per optimizer step.
    gradient_accumulation_steps: int = Field(1, ge=1)
    # Peak AdamW learning rate (after warmup).
    learning_rate: float = Field(1e-5, gt=0, le=1)
    # AdamW weight decay.
    weight_decay: float = Field(0.01, ge=0)
    # Share of the steps the learning rate warms up linearly over, then decays linearly.
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    # "auto": DeepSpeed bf16 on GPU; on a CPU with native bf16 (AVX512-BF16 or AMX) bf16 autocast with
    # fp32 weights, gradients and optimizer (clp_ray/train/precision.py); fp32 on other CPUs.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    max_grad_norm: float = Field(1.0, ge=0)  # 0 disables clipping
    eval_every_steps: Optional[int] = Field(None, ge=1)  # optimizer steps; None: once per epoch
    # Optimizer steps between logged losses and router statistics.
    log_every_steps: int = Field(10, ge=1)
    # Seed of model initialisation (new experts, heads) and batch order.
    seed: Seed = 42
    # Worker-group restarts Ray Train makes from the last checkpoint (-1: unlimited).
    max_failures: int = Field(1, ge=-1)
    # Newest checkpoints kept in storage (older ones are deleted).
    checkpoints_to_keep: int = Field(2, ge=1)
    # Folder for run outputs: models, summaries, Ray results (a fsspec URL for a cluster).
    output_dir: str = "outputs"
    # Stable name => re-running the same command resumes; None: train-<lang>-<config hash>.
    run_name: Optional[str] = None
    storage_path: Optional[str] = None  # Ray Train storage; None: <output_dir>/ray_results
    # Frozen-prefix cache: when only the top of the encoder trains (train_only moe or site, as in the
    # paper), the hidden states entering the lowest trainable layer are computed once per text and
    # reused by every step, epoch, trial, arm and dev/test evaluation; the frozen prefix runs without
    # dropout (a feature extractor). Exact otherwise (clp_ray/model/prefix_cache.py).
    prefix_cache: bool = True
    # Where the cache's shards live, keyed by the prefix weights' hash (None: <output_dir>/prefix_cache,
    # or $CLP_RAY_CACHE/prefix when output_dir is remote). On a cluster, a node-local or shared folder.
    prefix_cache_dir: Optional[str] = None
    # Fill the cache with every text the training epochs will meet before the workers start (once
    # per job, not once per concurrent trial); off: the first epoch fills it as it goes.
    prefix_fill: bool = True
    # From this many texts the fill runs as a Ray Data job (an actor per worker's resources), below in-process.
    prefix_fill_ray_min_texts: int = Field(100_000, ge=0)
    # Gradient caching: every encoder call runs in chunks of grad_cache_chunk_size sequences, only
    # one chunk's activations alive at a time (each chunk's forward runs twice): contrastive batches
    # far larger than the GPU holds, with the same gradients (clp_ray/loss/objective.py).
    grad_cache: bool = False
    # Sequences per encoder chunk under grad_cache.
    grad_cache_chunk_size: int = Field(32, ge=1)
    # Test hook: raise on this rank at this optimizer step, once per run (fault-tolerance tests).
    debug_fail_at_step: Optional[int] = Field(None, ge=1)
    # Rank that raises at debug_fail_at_step.
    debug_fail_rank: int = Field(1, ge=0)


class DeepSpeedConfig(Section):
    # ZeRO stage: 0 plain data parallel, 1 optimizer state, 2 + gradients, 3 + parameters sharded.
    stage: Literal[0, 1, 2, 3] = 2
    config_dir: Optional[str] = None  # None: <config dir>/deepspeed
    offload_optimizer: bool = False  # ZeRO-Offload of optimizer state to CPU (stage >= 1)
    # Merged (recursively) over configs/deepspeed/zero<stage>.json, e.g. {zero_optimization: {...}}.
    overrides: dict[str, Any] = Field(default_factory=dict)
