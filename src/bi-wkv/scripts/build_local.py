"""Build the Bi-WKV kernel with torch.utils.cpp_extension into the kernels build layout.

kernel-builder (Nix) makes the Hub builds; this is the quick path for development machines, CI compile
checks and GPU validation. It compiles ``bi_wkv_cuda/bi_wkv.cu`` and ``torch-ext/torch_binding.cpp`` with the
local nvcc and lays the result out as kernel-builder does::

    OUT/build/torch{XY}-cxx11-cu{XY}-{arch}-linux/
        __init__.py  layers.py  _ops.py  _bi_wkv_<hash>.*.so  metadata.json

so that ``kernels.get_local_kernel(OUT)`` (or ``LOCAL_KERNELS=rwkv-unet/bi-wkv=OUT``) loads it. The op
namespace ``_bi_wkv_<hash>`` is unique to the sources, like kernel-builder's.

    python src/bi-wkv/scripts/build_local.py OUT [--arch 9.0]

Without ``--arch`` (and without TORCH_CUDA_ARCH_LIST) it builds for the visible GPU, or, on a machine
without one, for build.toml's ``cuda-capabilities`` that this nvcc supports (PTX on the highest).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parents[1]
SOURCES = ["torch-ext/torch_binding.cpp", "bi_wkv_cuda/bi_wkv.cu"]
PACKAGE_DIR = KERNEL_DIR / "torch-ext" / "bi_wkv"

# kernel-builder generates this header; the same macros for a plain torch extension build
REGISTRATION_H = """#pragma once
#include <Python.h>

#define _CONCAT(A, B) A##B
#define CONCAT(A, B) _CONCAT(A, B)
#define _STRINGIFY(A) #A
#define STRINGIFY(A) _STRINGIFY(A)

#define TORCH_LIBRARY_EXPAND(NAME, MODULE) TORCH_LIBRARY(NAME, MODULE)

#define REGISTER_EXTENSION(NAME)                                                    \\
  PyMODINIT_FUNC CONCAT(PyInit_, NAME)() {                                         \\
    static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, STRINGIFY(NAME), nullptr, 0, nullptr}; \\
    return PyModule_Create(&module);                                               \\
  }
"""

OPS_PY = '''import torch
from . import {name}
ops = torch.ops.{name}


def add_op_namespace_prefix(op_name: str):
    """Prefix op by namespace."""
    return f"{name}::{{op_name}}"
'''


def source_hash() -> str:
    h = hashlib.sha256()
    for rel in SOURCES + ["torch-ext/torch_binding.h", "bi_wkv_cuda/bi_wkv_kernels.cuh"]:
        h.update((KERNEL_DIR / rel).read_bytes())
    return h.hexdigest()[:10]


def variant_name() -> str:
    """The build variant of the running torch, e.g. ``torch214-cxx11-cu130-x86_64-linux``."""
    import torch

    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    if torch.version.cuda is None:
        raise RuntimeError("building the Bi-WKV kernel needs a CUDA build of torch (torch.version.cuda is None)")
    cu_major, cu_minor = torch.version.cuda.split(".")[:2]
    abi = "cxx11" if torch.compiled_with_cxx11_abi() else "cxx98"
    return f"torch{major}{minor}-{abi}-cu{cu_major}{cu_minor}-{platform.machine()}-linux"


def _nvcc() -> str:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"


def default_archs() -> str:
    """TORCH_CUDA_ARCH_LIST when none is given: the visible GPU's capability, else build.toml's list.

    torch derives the list from the visible GPUs and fails on a machine without one; the distributable
    set is build.toml's capabilities that this nvcc can target, with PTX on the highest so newer GPUs
    can run it.
    """
    import tomllib

    import torch

    if torch.cuda.is_available():
        return "{}.{}".format(*torch.cuda.get_device_capability())
    config = tomllib.loads((KERNEL_DIR / "build.toml").read_text())
    (kernel,) = [k for k in config["kernel"].values() if k.get("backend") == "cuda"]
    wanted = [c.replace("+PTX", "") for c in kernel["cuda-capabilities"]]
    listed = subprocess.run([_nvcc(), "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout
    supported = {f"{int(n) // 10}.{int(n) % 10}" for n in re.findall(r"compute_(\d+)", listed)}
    archs = [c for c in wanted if c in supported]
    if not archs:
        raise RuntimeError(f"nvcc supports none of build.toml's cuda-capabilities {wanted}")
    archs[-1] += "+PTX"
    return ";".join(archs)


def _compile(name: str, build_dir: Path, verbose: bool) -> Path:
    """Compile in a child process, so this process never loads (and registers) the library itself."""
    (build_dir / "registration.h").write_text(REGISTRATION_H)
    threads = int(os.environ.get("NVCC_THREADS", "0"))  # nvcc compiles the archs in parallel; 0: one per core
    code = f"""
import torch.utils.cpp_extension as ce
ce.load(name={name!r}, sources={[str(KERNEL_DIR / s) for s in SOURCES]!r},
        extra_include_paths={[str(build_dir), str(KERNEL_DIR / "torch-ext")]!r},
        extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo", "--threads={threads}"],
        build_directory={str(build_dir)!r}, verbose={verbose!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    libs = sorted(p for p in build_dir.iterdir() if p.name.startswith(name) and p.suffix == ".so")
    if not libs:
        raise RuntimeError(f"the build left no {name}*.so in {build_dir}")
    return libs[0]


def build(out: Path, arch: str | None = None, verbose: bool = False) -> Path:
    """Compile and lay out one build variant under ``out/build``; returns the variant folder."""
    out = Path(out)
    name = f"_bi_wkv_{source_hash()}"
    if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and Path("/usr/local/cuda/bin/nvcc").exists():
        os.environ["CUDA_HOME"] = "/usr/local/cuda"  # torch would guess from `which nvcc`, which may be a copy
    if arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    elif not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = default_archs()
    build_dir = out / "cpp_extension"
    build_dir.mkdir(parents=True, exist_ok=True)
    lib = _compile(name, build_dir, verbose)

    variant = out / "build" / variant_name()
    if variant.exists():
        shutil.rmtree(variant)
    variant.mkdir(parents=True)
    for py in PACKAGE_DIR.glob("*.py"):
        shutil.copy2(py, variant / py.name)
    shutil.copy2(lib, variant / f"{name}.so")
    (variant / "_ops.py").write_text(OPS_PY.format(name=name))
    archs = [a.strip() for a in os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(",", ";").split(";") if a.strip()]
    metadata = {
        "id": name,
        "name": "bi-wkv",
        "version": 1,
        "license": "Apache-2.0",
        "python-depends": [],
        "backend": {"type": "cuda", "archs": archs},
    }
    (variant / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return variant


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to hold build/<variant>/")
    parser.add_argument("--arch", default=None, help="TORCH_CUDA_ARCH_LIST for nvcc, e.g. 9.0 (default: torch's)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    variant = build(args.out, args.arch, args.verbose)
    print(f"built {variant} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
