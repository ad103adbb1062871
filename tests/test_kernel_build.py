"""The kernel-builder project in src/bi-wkv: a valid build.toml, and CUDA sources that compile with nvcc.

The compile test (``-m cuda_build``, a few minutes on two cores) builds the extension with
torch.utils.cpp_extension into the kernels build layout and loads it with ``kernels.get_local_kernel``;
no GPU is needed for that: the ops register, their fake implementations run on meta tensors, and CPU
tensors are refused with the dispatcher's error.
"""
from __future__ import annotations

import importlib.util
import re
import shutil
import time
import tomllib
from pathlib import Path

import pytest
import torch

from rwkvunet.hub import KERNEL_REPO_ID, KERNEL_VERSION

KERNEL = Path(__file__).resolve().parents[1] / "src" / "bi-wkv"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bi_wkv_{name}", KERNEL / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_toml_has_what_kernel_builder_needs():
    config = tomllib.loads((KERNEL / "build.toml").read_text())
    general = config["general"]
    assert general["name"] == KERNEL_REPO_ID.split("/")[1] == "bi-wkv"
    assert general["version"] == KERNEL_VERSION
    assert general["backends"] == ["cuda"]
    assert general["hub"]["repo-id"] == KERNEL_REPO_ID
    package = KERNEL / "torch-ext" / general["name"].replace("-", "_")
    assert (package / "__init__.py").is_file() and (package / "layers.py").is_file()
    for src in config["torch"]["src"]:
        assert (KERNEL / src).is_file(), src
    (cuda,) = [k for k in config["kernel"].values() if k["backend"] == "cuda"]
    assert cuda["depends"] == ["torch"]
    caps = cuda["cuda-capabilities"]
    bases = [c.replace("+PTX", "") for c in caps]
    assert {"8.0", "9.0", "10.0", "12.0"} <= set(bases)  # A100, H100, B200, RTX 50xx
    assert bases == sorted(bases, key=lambda c: tuple(map(int, c.split("."))))
    assert caps[-1].endswith("+PTX")  # newer GPUs (sm_100+ on older toolkits, sm_12x and later) JIT the PTX
    for src in cuda["src"]:
        assert (KERNEL / src).is_file(), src
    for name in ("README.md", "CARD.md", "example.py", "flake.nix", "tests/__init__.py", "tests/test_bi_wkv.py"):
        assert (KERNEL / name).is_file(), name


def test_flake_uses_kernel_builders_generator():
    flake = (KERNEL / "flake.nix").read_text()
    assert 'kernel-builder.url = "github:huggingface/kernels"' in flake
    assert "kernel-builder.lib.genKernelFlakeOutputs" in flake and "path = ./.;" in flake


def test_kernel_tests_reference_is_the_formula():
    """The self-contained float64 reference of src/bi-wkv/tests agrees with the PyTorch op, extremes included."""
    from rwkvunet.ops.bi_wkv import bi_wkv_torch

    spec = importlib.util.spec_from_file_location("bi_wkv_kernel_tests", KERNEL / "tests" / "test_bi_wkv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    g = torch.Generator().manual_seed(0)
    for decay, key in ((10.0, 20.0), (1e3, 80.0)):
        w = (torch.rand(5, generator=g, dtype=torch.float64) * 2 - 1) * decay / 37
        u = (torch.rand(5, generator=g, dtype=torch.float64) * 2 - 1) * decay / 37
        k = (torch.rand(2, 37, 5, generator=g, dtype=torch.float64) * 2 - 1) * key
        v = torch.randn(2, 37, 5, generator=g, dtype=torch.float64)
        torch.testing.assert_close(module.reference(w, u, k, v), bi_wkv_torch(w, u, k, v), rtol=1e-10, atol=1e-10)


def test_kernel_package_files_compile():
    for path in [KERNEL / "example.py", *(KERNEL / "tests").glob("*.py"), *(KERNEL / "torch-ext").rglob("*.py")]:
        compile(path.read_text(), str(path), "exec")


def test_build_toml_parses_with_kernels_own_validator():
    rust = pytest.importorskip("kernels._rust")
    build = rust.Build.open(KERNEL)
    assert [str(b).lower() for b in build.general.backends] == ["cuda"]


def test_chunk_length_agrees_between_cuda_source_and_package():
    cu = (KERNEL / "bi_wkv_cuda" / "bi_wkv_kernels.cuh").read_text()
    py = (KERNEL / "torch-ext" / "bi_wkv" / "__init__.py").read_text()
    (cu_chunk,) = re.findall(r"constexpr int CHUNK = (\d+);", cu)
    (py_chunk,) = re.findall(r"^CHUNK = (\d+)$", py, re.M)
    assert cu_chunk == py_chunk


def test_binding_registers_ops_under_the_build_namespace():
    binding = (KERNEL / "torch-ext" / "torch_binding.cpp").read_text()
    assert "TORCH_LIBRARY_EXPAND(TORCH_EXTENSION_NAME, ops)" in binding
    assert "REGISTER_EXTENSION(TORCH_EXTENSION_NAME)" in binding
    package = (KERNEL / "torch-ext" / "bi_wkv" / "__init__.py").read_text()
    assert "from ._ops import add_op_namespace_prefix, ops" in package


@pytest.mark.cuda_build
def test_cuda_sources_compile_and_load_through_kernels(tmp_path):
    if torch.version.cuda is None:
        pytest.skip("compiling the CUDA extension needs a CUDA build of torch")
    if shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists():
        pytest.fail("nvcc not found: the cuda_build tests need the CUDA toolkit")
    kernels = pytest.importorskip("kernels")
    start = time.perf_counter()
    variant = _script("build_local").build(tmp_path, arch="9.0")
    print(f"nvcc build: {time.perf_counter() - start:.0f} s")
    assert sorted(p.name for p in variant.iterdir() if p.suffix == ".py") == ["__init__.py", "_ops.py", "layers.py"]

    module = kernels.get_local_kernel(tmp_path)
    namespace = module._ops.add_op_namespace_prefix("x").split("::")[0]
    assert namespace.startswith("_bi_wkv_")
    schema = str(getattr(torch.ops, namespace).bi_wkv_backward.default._schema)
    assert "Tensor state, Tensor grad_y) -> (Tensor, Tensor, Tensor, Tensor)" in schema

    w = torch.zeros(5, device="meta")
    k = torch.zeros(2, 37, 5, device="meta", dtype=torch.bfloat16)
    y = module.bi_wkv(w, w, k, k)
    assert y.shape == k.shape and y.dtype == torch.bfloat16
    with pytest.raises(NotImplementedError, match="CPU"):
        module.bi_wkv(torch.zeros(5), torch.zeros(5), torch.zeros(2, 3, 5), torch.zeros(2, 3, 5))


def test_gpu_validation_script_runs_its_cpu_parts(capsys):
    """Argument parsing, the float64 references and the tables, with the PyTorch op standing in."""
    validate = _script("validate_gpu")
    with pytest.raises(SystemExit):
        validate.parse_args(["--iters", "5"])
    w, u, k, v, _ = validate.make_inputs((2, 50, 3), torch.float32, "cpu")
    exact = validate.direct_formula(w, u, k, v)
    torch.testing.assert_close(validate.float64_reference(w, u, k, v, torch.ones_like(v))[0], exact,
                               rtol=1e-12, atol=1e-12)
    assert validate.main(["--dry-run", "--iters", "20", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    for title in ("Parity", "Determinism", "compute-sanitizer", "torch integration", "Timings", "Long sequences"):
        assert f"### {title}" in out
    assert "| (2, 64, 32)   | bfloat16 | dk     |" in out and "FAIL" not in out
