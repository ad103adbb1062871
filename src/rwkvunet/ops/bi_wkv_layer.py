"""Bi-WKV as a module, so that ``kernels.kernelize`` can swap its forward for a Hub kernel's layer.

``BiWKV()(w, u, k, v)`` is :func:`rwkvunet.ops.bi_wkv.bi_wkv` (which itself picks the CUDA kernel or the
PyTorch op). The class carries the marks of ``kernels.use_kernel_forward_from_hub("BiWKV")``, so a kernel
mapping for ``"BiWKV"`` (the ``layers.BiWKV`` of ``rwkv-unet/bi-wkv``, or any layer with the same
``forward(w, u, k, v)``) replaces this forward under ``kernelize``; without kernelize nothing changes.

``import rwkvunet`` never imports ``kernels`` (it costs about half a second and pulls in huggingface_hub):
when ``kernels`` is installed but not yet imported, the class gets the two attributes the decorator sets
(``kernel_layer_name`` and ``kernel_condition``); when it is already imported, the decorator itself is used.

No ``from __future__ import annotations`` here: TorchScript resolves the ignored forward's annotations.
"""

import importlib.util
import sys

import torch
from torch import nn

from .bi_wkv import bi_wkv

__all__ = ["LAYER_NAME", "BiWKV", "kernels_available"]

LAYER_NAME = "BiWKV"
"""Name of the layer in kernels' mappings; the Hub kernel's ``layers`` module defines a class of this name."""


def kernels_available() -> bool:
    """Whether the optional ``kernels`` package can be imported (checked without importing it)."""
    if "kernels" in sys.modules:
        return sys.modules["kernels"] is not None
    try:
        return importlib.util.find_spec("kernels") is not None
    except (ImportError, ValueError):
        return False


def _always(module: nn.Module) -> bool:
    return True


def _use_kernel_forward_from_hub(cls: type) -> type:
    """``kernels.use_kernel_forward_from_hub(LAYER_NAME)`` when kernels is importable, else the class as is."""
    if not kernels_available():
        return cls
    kernels = sys.modules.get("kernels")
    if kernels is not None and hasattr(kernels, "use_kernel_forward_from_hub"):
        return kernels.use_kernel_forward_from_hub(LAYER_NAME)(cls)
    cls.kernel_layer_name = LAYER_NAME  # what the decorator sets (kernels >= 0.14; the condition since 0.17)
    cls.kernel_condition = staticmethod(_always)
    return cls


@_use_kernel_forward_from_hub
class BiWKV(nn.Module):
    """Stateless Bi-WKV: ``forward(w, u, k, v) -> y`` with ``w``, ``u`` (C,) and ``k``, ``v`` (B, T, C)."""

    @torch.jit.ignore  # bi_wkv's dispatch reads devices, dtypes and values, which TorchScript cannot compile
    def forward(self, w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return bi_wkv(w, u, k, v)
