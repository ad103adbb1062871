"""Shared test helpers: where the fidelity fixtures are, and tiny models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """The development data folder: $RWKVUNET_SHARED, or ``shared/`` beside the repository."""
    return Path(os.environ.get("RWKVUNET_SHARED", REPO.parent / "shared"))


def require_shared(*parts: str) -> Path:
    """Path under the shared folder; skips when it is absent on a user's clone, fails under CI."""
    path = shared_dir().joinpath(*parts)
    if not path.exists():
        msg = f"{path} not found (set RWKVUNET_SHARED to the folder holding fixtures/)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg + "; CI must run the fidelity tests")
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def fixture_file():
    """Loader for ``fixtures/official_{variant}.safetensors`` as a dict of tensors."""
    from safetensors.torch import load_file

    cache = {}

    def load(variant: str):
        if variant not in cache:
            cache[variant] = load_file(str(require_shared("fixtures", f"official_{variant}.safetensors")))
        return cache[variant]

    return load


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _use_cpu_kernel(monkeypatch, setting: str) -> None:
    from rwkvunet.ops import cpu_kernel

    monkeypatch.setenv(cpu_kernel.ENV_VAR, setting)
    cpu_kernel.clear_cache()
    monkeypatch.setattr(cpu_kernel, "_loaded", {})  # whatever a test looks up is forgotten after it


@pytest.fixture
def torch_cpu_path(monkeypatch):
    """Every CPU operation by PyTorch's own implementation (the Bi-WKV kernel and the other CPU fast paths off)."""
    _use_cpu_kernel(monkeypatch, "off")


@pytest.fixture
def cpu_kernel_module(monkeypatch):
    """The built fused Bi-WKV CPU kernel; a test needing it skips when no C++ toolchain is there, and fails under
    CI, which installs one."""
    from rwkvunet.ops import cpu_kernel

    _use_cpu_kernel(monkeypatch, "auto")
    module = cpu_kernel.cpu_kernel()
    if module is None:
        reason = cpu_kernel._toolchain_missing() or "the build failed"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"the Bi-WKV CPU kernel is not available ({reason}); CI must test it")
        pytest.skip(f"the Bi-WKV CPU kernel is not available ({reason})")
    return module


@pytest.fixture
def online_hub(monkeypatch):
    """huggingface_hub as on a machine with a network and a token (nothing is sent: tests patch the calls)."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")


@pytest.fixture
def unreachable_hub(online_hub, monkeypatch):
    """An upload that gets as far as creating the repo and fails there, as when the network is down."""
    from huggingface_hub import HfApi

    def unreachable(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(HfApi, "create_repo", unreachable)
