"""How many steps a run takes, and when it reports: one plan that the worker loop and the sweep's
ASHA scheduler both read (a ``max_t`` computed elsewhere would break when the two drift apart)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from clp_ray.config import TrainConfig
from clp_ray.data import steps_per_epoch


@dataclass(frozen=True)
class StepPlan:
    micro_per_epoch: int  # micro-batches each rank runs per epoch
    accum: int  # micro-batches per optimizer step
    total_opt: int  # optimizer steps of the whole run
    eval_every: int  # optimizer steps between dev evaluations (and checkpoints, and reports)

    @property
    def total_micro(self) -> int:
        return self.total_opt * self.accum

    @property
    def reports(self) -> int:
        """How many times a full run reports (ASHA's ``time_attr`` counts these)."""
        return math.ceil(self.total_opt / self.eval_every)


def plan_steps(num_train: int, world: int, t: TrainConfig) -> StepPlan:
    """The plan for ``num_train`` training records over ``world`` ranks: ``train.max_steps`` or
    ``train.epochs`` worth of optimizer steps, a dev evaluation every ``train.eval_every_steps``
    (default: once per epoch)."""
    micro = steps_per_epoch(max(num_train, 1), world, t.per_device_batch_size)
    accum = t.gradient_accumulation_steps
    total_opt = t.max_steps or max(1, (t.epochs * micro) // accum)
    return StepPlan(micro, accum, total_opt, t.eval_every_steps or max(1, micro // accum))


def lr_lambda(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """Linear warm-up over ``warmup_ratio`` of the steps, then linear decay to 0."""
    warmup = int(round(total_steps * warmup_ratio))

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return f
