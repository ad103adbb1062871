"""The Bi-WKV CUDA kernel on a GPU: parity with the float64 formula, determinism, dtypes, errors.

Run with ``-m gpu``. The kernel is built once per session with ``src/bi-wkv/scripts/build_local.py`` (nvcc
needed), unless ``RWKVUNET_BI_WKV`` names an existing kernel folder. The full-size parity and timing table
is ``src/bi-wkv/scripts/validate_gpu.py``.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from rwkvunet.ops.bi_wkv import bi_wkv_torch

pytestmark = [pytest.mark.gpu, pytest.mark.cuda_build]

KERNEL = Path(__file__).resolve().parents[1] / "src" / "bi-wkv"


@pytest.fixture(scope="session")
def kernel_dir(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device")
    folder = os.environ.get("RWKVUNET_BI_WKV", "")
    if folder not in ("", "auto", "torch"):
        return Path(folder)
    spec = importlib.util.spec_from_file_location("bi_wkv_build_local", KERNEL / "scripts" / "build_local.py")
    build_local = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_local)
    out = tmp_path_factory.mktemp("bi_wkv")
    build_local.build(out, arch="{}.{}".format(*torch.cuda.get_device_capability()))
    return out


@pytest.fixture(scope="session")
def kernel(kernel_dir):
    import kernels

    return kernels.get_local_kernel(kernel_dir)


def _inputs(B, T, C, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(C, generator=g) * 20 - 10) / T
    u = (torch.rand(C, generator=g) * 20 - 10) / T
    k = torch.rand(B, T, C, generator=g) * 40 - 20
    v = torch.randn(B, T, C, generator=g)
    gy = torch.randn(B, T, C, generator=g)
    return [t.cuda() for t in (w, u)] + [t.to("cuda", dtype) for t in (k, v, gy)]


def _run(fn, w, u, k, v, gy):
    leaves = [t.clone().requires_grad_() for t in (w, u, k, v)]
    y = fn(*leaves)
    return [y.detach(), *torch.autograd.grad(y, leaves, gy)]


def _rel(got, ref):
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype,limit", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
@pytest.mark.parametrize(  # fused forward up to T = 1024, chunked beyond
    "shape", [(2, 64, 32), (1, 1, 3), (3, 37, 5), (2, 196, 48), (1, 1024, 40), (2, 1100, 24)]
)
def test_matches_float64_formula(kernel, shape, dtype, limit):
    w, u, k, v, gy = _inputs(*shape, dtype)
    got = _run(kernel.bi_wkv, w, u, k, v, gy)
    want = _run(bi_wkv_torch, *(t.double() for t in (w, u, k, v, gy)))
    for name, g, r in zip("y w u k v".split(), got, want):
        assert g.dtype == (dtype if name in "ykv" else torch.float32)
        assert torch.isfinite(g).all(), name
        assert _rel(g, r) <= limit, name


def test_gradients_are_deterministic(kernel):
    w, u, k, v, gy = _inputs(8, 300, 96, torch.float32, seed=3)
    first, second = _run(kernel.bi_wkv, w, u, k, v, gy), _run(kernel.bi_wkv, w, u, k, v, gy)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_runs_on_the_current_stream(kernel):
    w, u, k, v, _ = _inputs(2, 100, 32, torch.float32)
    reference = kernel.bi_wkv(w, u, k, v)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        y = kernel.bi_wkv(w, u, k, v)
    stream.synchronize()
    assert torch.equal(y, reference)


def test_compiles_fullgraph(kernel):
    w, u, k, v, gy = _inputs(2, 100, 32, torch.bfloat16)
    compiled = torch.compile(kernel.bi_wkv, fullgraph=True)
    for got, want in zip(_run(compiled, w, u, k, v, gy), _run(kernel.bi_wkv, w, u, k, v, gy)):
        torch.testing.assert_close(got, want)


def test_bad_inputs_raise_clear_errors(kernel):
    w, u, k, v, _ = _inputs(2, 10, 4, torch.float32)
    ops = kernel._ops.ops
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.bi_wkv_forward(w, u, k.transpose(0, 1), v.transpose(0, 1), True)
    with pytest.raises(RuntimeError, match="share a dtype"):
        ops.bi_wkv_forward(w, u, k, v.half(), True)
    with pytest.raises(RuntimeError, match="float32"):
        ops.bi_wkv_forward(w.half(), u, k, v, True)
    with pytest.raises(RuntimeError, match=r"w and u must be \(4,\)"):
        ops.bi_wkv_forward(w[:3], u, k, v, True)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        ops.bi_wkv_forward(w, u, k.cpu(), v, True)


def test_package_dispatch_uses_the_kernel(kernel_dir, kernel, monkeypatch):
    from rwkvunet.ops import kernel_hub
    from rwkvunet.ops.bi_wkv import bi_wkv

    monkeypatch.setenv(kernel_hub.ENV_VAR, str(kernel_dir))
    kernel_hub.clear_cache()
    w, u, k, v, _ = _inputs(2, 50, 8, torch.float32)
    assert torch.equal(bi_wkv(w, u, k, v), kernel.bi_wkv(w, u, k, v))
    kernel_hub.clear_cache()


def test_no_state_is_kept_for_inference(kernel):
    """Under no_grad the op returns an empty state (the fused forward writes none), with the same y."""
    w, u, k, v, _ = _inputs(2, 100, 16, torch.float32)
    y_free, free = kernel._ops.ops.bi_wkv_forward(w, u, k, v, False)
    y_kept, kept = kernel._ops.ops.bi_wkv_forward(w, u, k, v, True)
    assert free.numel() == 0 and kept.shape == (6, 2, 7, 16) and torch.equal(y_free, y_kept)
    y_long, state = kernel._ops.ops.bi_wkv_forward(*_inputs(1, 1100, 3, torch.float32)[:4], False)  # chunked path
    assert state.numel() == 0 and torch.isfinite(y_long).all()


def test_kernel_builder_tests_pass(kernel_dir, monkeypatch):
    """src/bi-wkv/tests (what kernel-builder runs) against this build, through LOCAL_KERNELS."""
    monkeypatch.setenv("LOCAL_KERNELS", f"rwkv-unet/bi-wkv={kernel_dir}")
    assert pytest.main(["-q", "-p", "no:cacheprovider", str(KERNEL / "tests")]) == 0
