"""Learning-rate schedule: optional linear warm-up, then cosine annealing to the minimum lr."""
from __future__ import annotations

import math

import torch


def cosine_factor(step: int, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> float:
    """Multiplier of the base lr after ``step`` optimizer steps (1 at the end of warm-up, ``min_ratio`` at the end)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                    min_lr: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` (its state is a step count, so it saves and resumes exactly) from each group's lr to
    ``min_lr``."""
    if total_steps < 1:
        raise ValueError(f"the schedule needs at least one step, got {total_steps}")
    lambdas = []
    for group in optimizer.param_groups:
        base = group.get("initial_lr", group["lr"])
        ratio = min_lr / base if base > 0 else 0.0
        lambdas.append(lambda step, r=ratio: cosine_factor(step, total_steps, warmup_steps, r))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
