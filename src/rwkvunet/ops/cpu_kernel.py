"""The fused Bi-WKV CPU kernel (``csrc/bi_wkv_cpu.cpp``), built on this machine the first time it is needed.

The same extension holds the weight gradient of strided depthwise convolutions (``depthwise_weight_grad``, used by
:class:`rwkvunet.layers.DepthwiseConv2d` in CPU training).

The PyTorch implementation of Bi-WKV goes some twenty times through memory; the kernel computes the same
max-shifted sums (float64 running sums, as ``torch.cumsum`` keeps them) in two passes with the channels in SIMD
lanes, three to six times faster, and RWKV-UNet's CPU inference about a fifth faster as a whole. It is compiled
with ``torch.utils.cpp_extension`` (a C++ compiler and ``ninja``, a dependency of rwkvunet) for the instruction
set torch itself uses here, once per machine and source version, into ``~/.cache/rwkvunet/cpu_kernel``
(``RWKVUNET_CACHE`` moves it). The environment variable ``RWKVUNET_CPU_KERNEL`` chooses:

``auto`` (default)
    build and use it when a C++ compiler and ninja are there; otherwise, silently, the PyTorch implementation.
    A build that fails warns once and falls back.
``off``
    never build or use it; the other CPU fast paths of the model (its own depthwise-convolution backward, the
    spatial mix's cached oneDNN matmuls) are switched off too, so that every operation is PyTorch's own.

Only float32 CPU inputs whose sums the fast path computes exactly go through it (the caller checks); the
results equal the PyTorch implementation's to float32 rounding (tested against float64).
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

__all__ = ["ENV_VAR", "SOURCE", "bi_wkv_cpu", "cpu_kernel", "kernel_setting", "build_flags", "clear_cache"]

ENV_VAR = "RWKVUNET_CPU_KERNEL"
SOURCE = Path(__file__).with_name("csrc") / "bi_wkv_cpu.cpp"

_loaded: dict[str, Optional[ModuleType]] = {}


OFF_VALUES = ("off", "0", "false", "no", "torch")


def kernel_setting() -> str:
    """``off`` when ``RWKVUNET_CPU_KERNEL`` is off, 0, false, no or torch; ``auto`` otherwise."""
    return "off" if os.environ.get(ENV_VAR, "").strip().lower() in OFF_VALUES else "auto"


def build_flags() -> list[str]:
    """Compiler flags: optimised, vectorizable loops (no fast-math), for the SIMD level torch runs at here, and
    OpenMP where torch's threads are OpenMP's (``at::parallel_for`` is inline code around ``#pragma omp
    parallel``: compiled without ``-fopenmp`` it runs on one thread)."""
    flags = ["-O3", "-fno-math-errno", "-fopenmp-simd"]
    if uses_openmp():
        flags.append("-fopenmp")
    if platform.machine().lower() in ("x86_64", "amd64"):
        capability = torch.backends.cpu.get_cpu_capability()
        if capability == "AVX512":
            flags += ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mavx2", "-mfma",
                      "-mprefer-vector-width=512"]
        elif capability == "AVX2":
            flags += ["-mavx2", "-mfma"]
    return flags


def uses_openmp() -> bool:
    """Whether the kernel is built with OpenMP: on Linux (GCC, and the libgomp torch ships and has loaded, which
    the extension then shares) when torch's intra-op threads are OpenMP's."""
    return sys.platform.startswith("linux") and torch.backends.openmp.is_available() and (
        "OpenMP" in torch.__config__.parallel_info())


def _cache_root() -> Path:
    return Path(os.environ.get("RWKVUNET_CACHE", "~/.cache/rwkvunet")).expanduser() / "cpu_kernel"


def _build_tag(flags: list[str]) -> str:
    """Name of one build: the source, the flags, torch and Python versions (a change means a new build)."""
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(" ".join(flags).encode())
    h.update(f"{torch.__version__} {sys.version_info[:2]} {platform.machine()}".encode())
    return "rwkvunet_bi_wkv_cpu_" + h.hexdigest()[:12]


def _toolchain_missing() -> Optional[str]:
    try:
        import ninja  # noqa: F401
    except ImportError:
        if shutil.which("ninja") is None:
            return "ninja is not installed"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) on the PATH"
    return None


def _first_line(err: Exception) -> str:
    """A build error's first line (compiler output follows it), or its type when it has no message."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _build() -> ModuleType:
    """The kernel built with :func:`build_flags`; where the compiler refuses ``-fopenmp``, built without it (on one
    thread it is still several times faster than the PyTorch form), with a warning."""
    flags = build_flags()
    try:
        return _load(flags)
    except Exception as err:
        if "-fopenmp" not in flags:
            raise
        module = _load([f for f in flags if f != "-fopenmp"])
        reason = _first_line(err)
        warnings.warn(f"Bi-WKV: the CPU kernel was built without OpenMP, so it runs on one thread ({reason})",
                      RuntimeWarning, stacklevel=4)
        return module


def _load(flags: list[str]) -> ModuleType:
    import logging

    # its import logs a warning about CUDA_HOME on machines without CUDA, irrelevant to a CPU build
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load
    finally:
        logger.setLevel(level)

    name = _build_tag(flags)
    folder = _cache_root() / name
    folder.mkdir(parents=True, exist_ok=True)
    if not any(folder.glob(f"{name}*.so")) and not any(folder.glob(f"{name}*.pyd")):
        print("rwkvunet: building the Bi-WKV CPU kernel for this machine (once, about half a minute; "
              f"{ENV_VAR}=off skips it)", file=sys.stderr, flush=True)
    return load(name, [str(_source_in(folder))], extra_cflags=flags, build_directory=str(folder), verbose=False,
                extra_ldflags=["-fopenmp"] if "-fopenmp" in flags else None)


def _source_in(folder: Path) -> Path:
    """The kernel source, copied into its build folder: ninja rebuilds whenever the compile command changes,
    and the command names the source's path, so every installation of the same source (a clone, a wheel in
    another virtualenv) builds from this one copy and shares one build instead of rebuilding it in turns."""
    copy = folder / SOURCE.name
    text = SOURCE.read_bytes()
    if not copy.is_file() or copy.read_bytes() != text:
        tmp = folder / f".{SOURCE.name}.{os.getpid()}"
        tmp.write_bytes(text)
        os.replace(tmp, copy)  # atomic: a process building at the same time reads one whole file
    return copy


def cpu_kernel() -> Optional[ModuleType]:
    """The built kernel module, or None when it is switched off or cannot be had (looked up once)."""
    setting = kernel_setting()
    if setting in _loaded:
        return _loaded[setting]
    module = None
    if setting == "auto" and _toolchain_missing() is None:
        try:
            module = _build()
        except Exception as err:  # any build or load failure means: use the PyTorch implementation
            reason = _first_line(err)
            warnings.warn(f"Bi-WKV: the CPU kernel could not be built, so the PyTorch implementation runs instead "
                          f"({reason}); set {ENV_VAR}=off to skip the attempt", RuntimeWarning, stacklevel=3)
    _loaded[setting] = module
    return module


def clear_cache() -> None:
    """Forget the lookup (the next call builds or loads again)."""
    _loaded.clear()


class _BiWKVCpu(torch.autograd.Function):
    """The kernel's forward and backward; saves y and log D (the denominators) for the backward."""

    @staticmethod
    def forward(ctx, w, u, k, v):
        needs_grad = any(ctx.needs_input_grad)
        with torch.profiler.record_function("bi_wkv::cpu_forward"):  # named in profiles (the bench's shares)
            y, log_d = cpu_kernel().forward(w, u, k, v, needs_grad)
        if needs_grad:
            ctx.save_for_backward(w, u, k, v, y, log_d)
        return y

    @staticmethod
    def backward(ctx, grad):
        w, u, k, v, y, log_d = ctx.saved_tensors
        with torch.profiler.record_function("bi_wkv::cpu_backward"):
            dw, du, dk, dv = cpu_kernel().backward(w, u, k, v, y, log_d, grad.contiguous())
        return dw.sum(0), du.sum(0), dk, dv  # per-batch sums added in a fixed order: deterministic


def bi_wkv_cpu(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bi-WKV by the CPU kernel (float32 CPU tensors; :func:`cpu_kernel` must have returned a module), with
    autograd. The caller makes sure the max-shifted sums are exact for these inputs."""
    w, u, k, v = w.contiguous(), u.contiguous(), k.contiguous(), v.contiguous()
    if not (torch.is_grad_enabled() and any(x.requires_grad for x in (w, u, k, v))):
        with torch.profiler.record_function("bi_wkv::cpu_forward"):  # inference: no autograd node to build
            return cpu_kernel().forward(w, u, k, v, False)[0]
    return _BiWKVCpu.apply(w, u, k, v)
