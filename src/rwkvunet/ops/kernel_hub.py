"""Where the compiled CUDA Bi-WKV kernel comes from.

The kernel is built with kernel-builder from ``src/bi-wkv`` and published as the Hub kernel
``rwkv-unet/bi-wkv`` (version 1); the optional ``kernels`` package loads it. The environment variable
``RWKVUNET_BI_WKV`` chooses the source:

``auto`` (default)
    ``kernels.get_kernel("rwkv-unet/bi-wkv", version=1)``: downloaded once into the Hugging Face cache, read
    from that cache only when ``HF_HUB_OFFLINE`` is set, and overridable with kernels' ``LOCAL_KERNELS``.
``torch``
    never load a kernel; CUDA tensors use the PyTorch implementation.
a folder
    ``kernels.get_local_kernel(folder)`` on a folder holding ``build/<variant>/``, as kernel-builder or
    ``src/bi-wkv/scripts/build_local.py`` produce it (development and offline machines).

When the kernel cannot be had (``kernels`` not installed, no network, no build for this torch/CUDA, ...)
CUDA tensors fall back to the PyTorch implementation with a single warning that names the reason. The
lookup runs once per setting and its result is cached; ``import rwkvunet`` never imports ``kernels``.

Independently of this lookup, :class:`rwkvunet.ops.bi_wkv_layer.BiWKV` carries kernels' layer marks, so
``kernels.kernelize`` with a mapping for ``"BiWKV"`` can put the kernel package's ``layers.BiWKV`` in its place.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

from ..hub import KERNEL_REPO_ID, KERNEL_VERSION
from .bi_wkv import bi_wkv_torch

__all__ = ["ENV_VAR", "clear_cache", "cuda_bi_wkv", "kernel_setting", "load_kernel"]

ENV_VAR = "RWKVUNET_BI_WKV"

BiWKVFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_resolved: dict[str, Optional[BiWKVFn]] = {}

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernel_setting() -> str:
    """The value of ``RWKVUNET_BI_WKV``: ``auto``, ``torch`` or a kernel folder."""
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return "auto"
    return value.lower() if value.lower() in ("auto", "torch") else value


def _env_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def _hub_offline_if_requested():
    """Honour ``HF_HUB_OFFLINE`` even when it was set after huggingface_hub read its constants."""
    from huggingface_hub import constants

    if not _env_offline() or constants.HF_HUB_OFFLINE:
        yield
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False


def load_kernel(setting: Optional[str] = None):
    """The Bi-WKV kernel module for ``setting`` (default: the environment's); raises with the reason."""
    setting = kernel_setting() if setting is None else setting
    if setting == "torch":
        raise RuntimeError(f"{ENV_VAR}=torch disables the CUDA kernel")
    try:
        import kernels
    except ImportError as err:
        raise ImportError(
            "the optional `kernels` package is not installed (pip install 'rwkvunet[kernels]')"
        ) from err
    with _hub_offline_if_requested():
        if setting == "auto":
            return kernels.get_kernel(KERNEL_REPO_ID, version=KERNEL_VERSION, trust_remote_code=[KERNEL_REPO_ID])
        path = Path(setting).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"{ENV_VAR}={setting!r} is not 'auto', 'torch' or an existing kernel folder (one holding build/)"
            )
        return kernels.get_local_kernel(path)


def _for_kernel_dtypes(kernel_fn: BiWKVFn) -> BiWKVFn:
    """The kernel for the dtypes it has (float32, float16, bfloat16); the PyTorch op for others (float64)."""

    @functools.wraps(kernel_fn)
    def bi_wkv_cuda(w, u, k, v):
        if torch.promote_types(k.dtype, v.dtype) in _KERNEL_DTYPES:
            return kernel_fn(w, u, k, v)
        return bi_wkv_torch(w, u, k, v)

    return bi_wkv_cuda


def _lookup(setting: str) -> Optional[BiWKVFn]:
    if setting == "torch":
        return None
    source = f"{KERNEL_REPO_ID} v{KERNEL_VERSION}" if setting == "auto" else setting
    try:
        fn = getattr(load_kernel(setting), "bi_wkv", None)
        if not callable(fn):
            raise AttributeError("the kernel module has no bi_wkv function")
    except Exception as err:  # any failure means: use the PyTorch op
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        warnings.warn(
            f"Bi-WKV: the CUDA kernel ({source}) could not be loaded, so CUDA tensors use the PyTorch "
            f"implementation. Reason: {type(err).__name__}: {reason} (set {ENV_VAR}=torch to choose the PyTorch "
            "implementation without this warning)",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
    return _for_kernel_dtypes(fn)


@torch.compiler.assume_constant_result
def _looked_up(setting: str) -> bool:
    """Runs the lookup once per setting; a compiled graph runs it at trace time and keeps the answer."""
    if setting not in _resolved:
        _resolved[setting] = _lookup(setting)
    return _resolved[setting] is not None


def cuda_bi_wkv() -> Optional[BiWKVFn]:
    """The kernel's Bi-WKV function for CUDA tensors, or None to use the PyTorch op.

    Looked up on first use and cached per ``RWKVUNET_BI_WKV`` value; under torch.compile the lookup runs
    while tracing and its result is a constant, so it never breaks a graph.
    """
    setting = kernel_setting()
    _looked_up(setting)
    return _resolved[setting]


def clear_cache() -> None:
    """Forget looked-up kernels (the next CUDA call looks again, warning again if it fails)."""
    _resolved.clear()
