"""The optimizer of a fine-tuning run: AdamW with weight decay on the weight matrices and kernels only."""
from __future__ import annotations

import torch

#: Parameters never decayed besides biases and norm weights: the RWKV decay, bonus and token-shift mixes, which
#: set how far each channel looks, not how strongly it responds.
NO_DECAY_KEYS = ("spatial_decay", "spatial_first", "spatial_mix_")


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether weight decay applies: matrices and kernels (2-D and up) except the RWKV mixing parameters."""
    return param.ndim >= 2 and not any(key in name for key in NO_DECAY_KEYS)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weights, and biases, norm weights and RWKV decay / bonus / mixes without decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if decays(name, param) else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, weight_decay=weight_decay)
