"""The optimizer of a fine-tuning run: AdamW with weight decay on the weight matrices and kernels only, and optional
learning-rate multipliers for the RWKV mixing parameters and for the decoder side of the segmenter."""
from __future__ import annotations

import torch

#: Parameters never decayed besides biases and norm weights: the RWKV decay, bonus and token-shift mixes, which
#: set how far each channel looks, not how strongly it responds.
NO_DECAY_KEYS = ("spatial_decay", "spatial_first", "spatial_mix_")


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether weight decay applies: matrices and kernels (2-D and up) except the RWKV mixing parameters."""
    return param.ndim >= 2 and not any(key in name for key in NO_DECAY_KEYS)


def is_rwkv_mixing(name: str) -> bool:
    """The RWKV decay, bonus and token-shift mixes (every such parameter, in the encoder or after it)."""
    return any(key in name for key in NO_DECAY_KEYS)


def encoder_prefix(model: torch.nn.Module) -> str:
    """The name prefix of the encoder's parameters: ``encoder.`` for RWKV-UNet, ``unet.encoder.`` for the smp
    reference; everything else (bridge, decoder, head) is the decoder side."""
    return "unet.encoder." if hasattr(model, "unet") and hasattr(model.unet, "encoder") else "encoder."


def lr_scale(name: str, prefix: str, rwkv_lr_scale: float = 1.0, decoder_lr_scale: float = 1.0) -> float:
    """The multiplier of the base lr for one parameter: the RWKV mixes take ``rwkv_lr_scale`` wherever they are,
    the rest outside the encoder ``decoder_lr_scale``."""
    if is_rwkv_mixing(name):
        return rwkv_lr_scale
    return 1.0 if name.startswith(prefix) else decoder_lr_scale


def parameter_groups(model: torch.nn.Module, weight_decay: float, lr: float | None = None,
                     rwkv_lr_scale: float = 1.0, decoder_lr_scale: float = 1.0) -> list[dict]:
    """AdamW groups by (weight decay, lr multiplier): decayed weights, and biases, norm weights and RWKV decay /
    bonus / mixes without decay, each split further only where a multiplier differs from 1 (with both at 1: the
    two groups, decayed first). Each group records its ``lr_scale``, and its ``lr`` when ``lr`` is given."""
    prefix = encoder_prefix(model)
    groups: dict[tuple[bool, float], list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            key = (not decays(name, param), lr_scale(name, prefix, rwkv_lr_scale, decoder_lr_scale))
            groups.setdefault(key, []).append(param)
    out = []
    for (no_decay, scale), params in sorted(groups.items(), key=lambda item: (item[0][0], item[0][1] != 1.0)):
        group = {"params": params, "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale}
        if lr is not None:
            group["lr"] = lr * scale
        out.append(group)
    return out


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, rwkv_lr_scale: float = 1.0,
                    decoder_lr_scale: float = 1.0) -> torch.optim.Optimizer:
    groups = parameter_groups(model, weight_decay, lr, rwkv_lr_scale, decoder_lr_scale)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
