"""The DeepSpeed engine a worker trains with, and the state a checkpoint holds besides its shard.

``deepspeed`` is imported inside the functions on purpose: it is heavy, and it picks its
accelerator when first used, which only the workers (with ``DS_ACCELERATOR`` set by the driver)
should do.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from clp_ray.config import ExperimentConfig
from clp_ray.data import Bucketed
from clp_ray.model.moe import moe_layers, trainable_parameters
from clp_ray.train.schedule import lr_lambda


def build_engine(module: nn.Module, ds_config: dict, cfg: ExperimentConfig, total_opt: int):
    """The DeepSpeed engine and LR scheduler over ``module``: torch AdamW on the trainable
    parameters only (frozen ones get no optimizer state), linear warm-up then decay over
    ``total_opt`` optimizer steps. Needs an initialised process group (``deepspeed.init_distributed``)."""
    import deepspeed  # heavy, and picks its accelerator on first use: workers only

    t_cfg = cfg.train
    if ds_config["zero_optimization"]["stage"] == 3:
        # The MoE layer reads its experts' weights itself (clp_ray.model.grouped_linear) instead of calling
        # the expert modules: ZeRO-3 must gather them whenever the MoE layer runs.
        for _, layer in moe_layers(module):
            for p in layer.experts.parameters():
                deepspeed.zero.register_external_parameter(layer, p)
    optimizer = torch.optim.AdamW(trainable_parameters(module), lr=t_cfg.learning_rate, weight_decay=t_cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_opt, t_cfg.warmup_ratio))
    engine, _, _, scheduler = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine, scheduler


def save_final_model(embedder, out: Path, rank: int, stage3: bool) -> None:
    """Rank 0 writes the Embedder folder; under ZeRO-3 every rank must take part in gathering it."""
    if stage3:
        import deepspeed  # only under ZeRO-3, inside a worker

        with deepspeed.zero.GatheredParameters(list(embedder.parameters()), modifier_rank=None):
            if rank == 0:
                embedder.save_pretrained(out)
    elif rank == 0:
        embedder.save_pretrained(out)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def to_device(batch: Optional[dict | Bucketed], device) -> Optional[dict | Bucketed]:
    if batch is None or not isinstance(batch, dict):
        return None if batch is None else batch.to(device)
    return {k: v.to(device) for k, v in batch.items()}


def num_tokens(batch: Optional[dict | Bucketed]) -> int:
    if batch is None:
        return 0
    return int(batch["attention_mask"].sum()) if isinstance(batch, dict) else batch.num_tokens
