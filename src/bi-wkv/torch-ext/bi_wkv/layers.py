"""Layers for ``kernels.kernelize``: drop-in forwards for a project's Bi-WKV module."""
from __future__ import annotations

import torch
from torch import nn

from . import bi_wkv as _bi_wkv


class BiWKV(nn.Module):
    """Stateless Bi-WKV: ``forward(w, u, k, v) -> y`` with ``w``, ``u`` (C,) and ``k``, ``v`` (B, T, C)."""

    can_torch_compile = True
    has_backward = True

    def forward(self, w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _bi_wkv(w, u, k, v)
