"""Loading the Bi-WKV kernel through the kernels hub, offline, and falling back to the PyTorch op.

A CPU stand-in takes the place of the compiled library: a kernel folder in the kernels build layout
(``build/<variant>/`` with metadata.json) holding the real Python package of ``src/bi-wkv/torch-ext/bi_wkv``
and an ``_ops.py`` that defines the two ops with CPU implementations. So the real loading path of kernels
0.17 (LOCAL_KERNELS, get_local_kernel, the offline Hub cache by repo id and version) and the package's
own glue (fake implementations, autograd registration, the kernelize layer) are exercised without a GPU.
"""
from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import uuid
import warnings
from pathlib import Path

import pytest
import torch

from rwkvunet.hub import KERNEL_REPO_ID, KERNEL_VERSION
from rwkvunet.ops import kernel_hub
from rwkvunet.ops.bi_wkv import bi_wkv, bi_wkv_torch

kernels = pytest.importorskip("kernels")

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "bi-wkv" / "torch-ext" / "bi_wkv"

STANDIN_OPS = '''"""CPU stand-in for the compiled Bi-WKV library (tests only)."""
import torch

from rwkvunet.ops.bi_wkv import bi_wkv_torch

NAMESPACE = "{namespace}"
_lib = torch.library.Library(NAMESPACE, "DEF")
_lib.define("bi_wkv_forward(Tensor w, Tensor u, Tensor k, Tensor v, bool need_state) -> (Tensor, Tensor)")
_lib.define(
    "bi_wkv_backward(Tensor w, Tensor u, Tensor k, Tensor v, Tensor state, Tensor grad_y) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)


def _forward(w, u, k, v, need_state):
    B, T, C = k.shape
    y = bi_wkv_torch(w, u, k, v).to(k.dtype)
    return y, k.new_zeros((6, B, -(-T // 16), C) if need_state else (0,), dtype=torch.float32)


def _backward(w, u, k, v, state, grad_y):
    with torch.enable_grad():
        leaves = [t.detach().double().requires_grad_() for t in (w, u, k, v)]
        grads = torch.autograd.grad(bi_wkv_torch(*leaves), leaves, grad_y.double())
    return tuple(g.to(t.dtype) for g, t in zip(grads, (w, u, k, v)))


_lib.impl("bi_wkv_forward", _forward, "CPU")
_lib.impl("bi_wkv_backward", _backward, "CPU")
ops = getattr(torch.ops, NAMESPACE)


def add_op_namespace_prefix(op_name: str):
    return f"{{NAMESPACE}}::{{op_name}}"
'''


def _variant() -> tuple[str, str]:
    """Build variant name for this machine's torch, and the kernels backend type."""
    from kernels.backends import _backend

    backend = _backend()
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    abi = "cxx11" if torch.compiled_with_cxx11_abi() else "cxx98"
    return f"torch{major}{minor}-{abi}-{backend.variant_str}-{platform.machine()}-linux", backend.name


def make_standin(root: Path) -> Path:
    """A kernel folder ``root/build/<variant>/`` with the real package and CPU stand-in ops; returns root."""
    variant, backend = _variant()
    namespace = f"_bi_wkv_standin_{uuid.uuid4().hex[:8]}"
    target = root / "build" / variant
    target.mkdir(parents=True)
    for py in PACKAGE.glob("*.py"):
        shutil.copy2(py, target / py.name)
    (target / "_ops.py").write_text(STANDIN_OPS.format(namespace=namespace))
    metadata = {"id": namespace, "name": "bi-wkv", "version": KERNEL_VERSION, "license": "Apache-2.0",
                "python-depends": [], "backend": {"type": backend}}
    (target / "metadata.json").write_text(json.dumps(metadata))
    return root


def make_hub_cache(cache: Path) -> Path:
    """An offline Hugging Face cache holding the stand-in as ``rwkv-unet/bi-wkv`` branch ``v1``.

    Kernel repos are cached as ``kernels--<org>--<name>`` (repo type "kernel"); kernels 0.17 reads version
    refs from a ``models--`` folder too, but snapshot_download(repo_type="kernel") only finds ``kernels--``.
    """
    sha = uuid.uuid4().hex + uuid.uuid4().hex[:8]
    repo = cache / f"kernels--{KERNEL_REPO_ID.replace('/', '--')}"
    make_standin(repo / "snapshots" / sha)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / f"v{KERNEL_VERSION}").write_text(sha)
    return cache


def _inputs(B=2, T=21, C=5, dtype=torch.float32):
    w = (torch.rand(C) * 2 - 1) * 10 / T
    u = (torch.rand(C) * 2 - 1) * 10 / T
    k = (torch.rand(B, T, C) * 2 - 1).to(dtype) * 5
    v = torch.randn(B, T, C).to(dtype)
    return w, u, k, v


@pytest.fixture
def fresh(monkeypatch):
    """No cached lookup, no LOCAL_KERNELS, the default setting."""
    monkeypatch.delenv(kernel_hub.ENV_VAR, raising=False)
    monkeypatch.delenv("LOCAL_KERNELS", raising=False)
    kernel_hub.clear_cache()
    yield
    kernel_hub.clear_cache()


@pytest.fixture
def offline_cache(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE with HF_HUB_CACHE at an empty temporary folder."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("KERNELS_CACHE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _assert_is_kernel_bi_wkv(fn):
    """fn is a kernel package's bi_wkv: same values and gradients as the PyTorch op, through its autograd."""
    w, u, k, v = _inputs()
    leaves = [t.clone().requires_grad_() for t in (w, u, k, v)]
    y = fn(*leaves)
    assert fn.__module__.startswith("_bi_wkv_standin_")
    torch.testing.assert_close(y, bi_wkv_torch(w, u, k, v), rtol=1e-5, atol=1e-6)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, gy)
    ref_leaves = [t.clone().requires_grad_() for t in (w, u, k, v)]
    want = torch.autograd.grad(bi_wkv_torch(*ref_leaves), ref_leaves, gy)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_get_local_kernel_loads_the_package_from_the_build_layout(tmp_path):
    module = kernels.get_local_kernel(make_standin(tmp_path / "kernel"))
    _assert_is_kernel_bi_wkv(module.bi_wkv)
    assert module.CHUNK == 16


def test_environment_folder_setting_uses_get_local_kernel(fresh, monkeypatch, tmp_path):
    monkeypatch.setenv(kernel_hub.ENV_VAR, str(make_standin(tmp_path / "kernel")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fn = kernel_hub.cuda_bi_wkv()
    _assert_is_kernel_bi_wkv(fn)
    assert kernel_hub.cuda_bi_wkv() is fn  # cached


def test_float64_goes_to_the_pytorch_op(fresh, monkeypatch, tmp_path):
    """The kernel has float32, float16 and bfloat16; float64 keeps the exact PyTorch op."""
    monkeypatch.setenv(kernel_hub.ENV_VAR, str(make_standin(tmp_path / "kernel")))
    fn = kernel_hub.cuda_bi_wkv()
    calls = []
    monkeypatch.setattr(fn.__wrapped__.__globals__["ops"], "bi_wkv_forward", lambda *a: calls.append(a))
    w, u, k, v = (t.double() for t in _inputs())
    torch.testing.assert_close(fn(w, u, k, v), bi_wkv_torch(w, u, k, v))
    assert calls == []


def test_local_kernels_override_is_found_by_repo_id(fresh, monkeypatch, offline_cache, tmp_path):
    monkeypatch.setenv("LOCAL_KERNELS", f"{KERNEL_REPO_ID}={make_standin(tmp_path / 'kernel')}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fn = kernel_hub.cuda_bi_wkv()
    _assert_is_kernel_bi_wkv(fn)


def test_offline_hub_cache_is_found_by_repo_id_and_version(fresh, offline_cache):
    make_hub_cache(offline_cache)
    module = kernels.get_kernel(KERNEL_REPO_ID, version=KERNEL_VERSION, trust_remote_code=[KERNEL_REPO_ID])
    _assert_is_kernel_bi_wkv(module.bi_wkv)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_is_kernel_bi_wkv(kernel_hub.cuda_bi_wkv())


def test_offline_environment_variable_alone_keeps_the_lookup_off_the_network(fresh, monkeypatch, tmp_path):
    """HF_HUB_OFFLINE set after huggingface_hub was imported still means: cache only."""
    from huggingface_hub import constants

    make_hub_cache(tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def no_network(*args, **kwargs):
        raise AssertionError("the Hub was contacted although HF_HUB_OFFLINE is set")

    monkeypatch.setattr("huggingface_hub.HfApi.list_repo_refs", no_network)
    monkeypatch.setattr("huggingface_hub.HfApi.list_repo_tree", no_network)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_is_kernel_bi_wkv(kernel_hub.cuda_bi_wkv())
    assert constants.HF_HUB_OFFLINE is False  # restored


def test_missing_kernel_falls_back_with_one_warning(fresh, offline_cache):
    with pytest.warns(RuntimeWarning, match=r"rwkv-unet/bi-wkv v1.*PyTorch implementation.*Reason: \w+"):
        assert kernel_hub.cuda_bi_wkv() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernel_hub.cuda_bi_wkv() is None  # cached: no second lookup, no second warning


def test_missing_local_folder_falls_back_naming_the_folder(fresh, monkeypatch, tmp_path):
    monkeypatch.setenv(kernel_hub.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.warns(RuntimeWarning, match="nowhere.*not 'auto', 'torch' or an existing kernel folder"):
        assert kernel_hub.cuda_bi_wkv() is None


def test_folder_without_a_build_for_this_machine_falls_back(fresh, monkeypatch, tmp_path):
    (tmp_path / "kernel" / "build" / "torch20-cxx11-cu118-aarch64-linux").mkdir(parents=True)
    monkeypatch.setenv(kernel_hub.ENV_VAR, str(tmp_path / "kernel"))
    with pytest.warns(RuntimeWarning, match="Cannot find a build variant"):
        assert kernel_hub.cuda_bi_wkv() is None


def test_without_kernels_package_falls_back_with_one_warning(fresh, monkeypatch):
    monkeypatch.setitem(sys.modules, "kernels", None)  # `import kernels` raises ImportError
    with pytest.warns(RuntimeWarning, match=r"kernels.*not installed.*rwkvunet\[kernels\]"):
        assert kernel_hub.cuda_bi_wkv() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernel_hub.cuda_bi_wkv() is None


def test_torch_setting_never_imports_kernels(fresh, monkeypatch):
    monkeypatch.setitem(sys.modules, "kernels", None)
    monkeypatch.setenv(kernel_hub.ENV_VAR, "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernel_hub.cuda_bi_wkv() is None


def test_cpu_tensors_never_look_up_the_kernel(fresh, monkeypatch):
    def fail():
        raise AssertionError("kernel lookup for CPU tensors")

    monkeypatch.setattr(kernel_hub, "cuda_bi_wkv", fail)
    w, u, k, v = _inputs()
    torch.testing.assert_close(bi_wkv(w, u, k, v), bi_wkv_torch(w, u, k, v))
    compiled = torch.compile(bi_wkv, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(w, u, k, v), bi_wkv_torch(w, u, k, v))


@pytest.mark.parametrize("looked_up_before", [True, False])
def test_lookup_is_a_constant_under_torch_compile(fresh, monkeypatch, tmp_path, looked_up_before):
    """A compiled caller takes the kernel function without a graph break, whether or not it was looked up."""
    monkeypatch.setenv(kernel_hub.ENV_VAR, str(make_standin(tmp_path / "kernel")))
    if looked_up_before:
        kernel_hub.cuda_bi_wkv()

    def f(w, u, k, v):
        fn = kernel_hub.cuda_bi_wkv()
        return fn(w, u, k, v) * 2

    w, u, k, v = _inputs()
    out = torch.compile(f, fullgraph=True, backend="eager")(w, u, k, v)
    torch.testing.assert_close(out, 2 * bi_wkv_torch(w, u, k, v), rtol=1e-5, atol=1e-6)


def test_failed_lookup_under_torch_compile_falls_back_without_a_graph_break(fresh, monkeypatch, tmp_path):
    monkeypatch.setenv(kernel_hub.ENV_VAR, str(tmp_path / "nowhere"))

    def f(w, u, k, v):
        fn = kernel_hub.cuda_bi_wkv()
        return bi_wkv_torch(w, u, k, v) if fn is None else fn(w, u, k, v)

    w, u, k, v = _inputs()
    with pytest.warns(RuntimeWarning, match="nowhere"):
        out = torch.compile(f, fullgraph=True, backend="eager")(w, u, k, v)
    torch.testing.assert_close(out, bi_wkv_torch(w, u, k, v))


def test_kernel_package_compiles_fullgraph_with_its_fake_and_autograd(tmp_path):
    module = kernels.get_local_kernel(make_standin(tmp_path / "kernel"))
    w, u, k, v = _inputs(dtype=torch.bfloat16)
    compiled = torch.compile(module.bi_wkv, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (w, u, k, v)]
    y = compiled(*leaves)
    assert y.dtype == torch.bfloat16 and y.shape == k.shape
    torch.testing.assert_close(y.float(), bi_wkv_torch(w, u, k.float(), v.float()), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == t.dtype for t in leaves)
    # the fake implementations give the shapes the CUDA op returns
    y_meta, state = module._ops.ops.bi_wkv_forward(*(t.to("meta") for t in (w, u, k, v)), True)
    assert y_meta.shape == k.shape and state.shape == (6, 2, 2, 5) and state.dtype == torch.float32
    _, no_state = module._ops.ops.bi_wkv_forward(*(t.to("meta") for t in (w, u, k, v)), False)
    assert no_state.shape == (0,)


def test_kernel_package_keeps_no_state_without_backward(tmp_path, monkeypatch):
    """Inference (no_grad, or no input needing grad) asks the op for no chunk states; training does."""
    module = kernels.get_local_kernel(make_standin(tmp_path / "kernel"))
    forward = module._ops.ops.bi_wkv_forward
    asked = []

    def spy(*args):
        asked.append(args[-1])
        return forward(*args)

    monkeypatch.setattr(module._ops.ops, "bi_wkv_forward", spy)
    w, u, k, v = _inputs()
    with torch.no_grad():
        module.bi_wkv(w, u, k, v.requires_grad_())
    module.bi_wkv(w, u, k, v.detach())
    assert asked == [False, False]
    module.bi_wkv(w, u, k, v.detach().requires_grad_())
    assert asked[-1] is True


def test_kernel_state_output_is_not_differentiable(tmp_path):
    """The op's state is scratch for its backward: autograd must not track it as an output."""
    module = kernels.get_local_kernel(make_standin(tmp_path / "kernel"))
    w, u, k, v = (t.clone().requires_grad_() for t in _inputs())
    y, state = module._ops.ops.bi_wkv_forward(w, u, k, v, True)
    assert y.requires_grad and not state.requires_grad
    (y.sum() + state.sum()).backward()  # a loss that touches the state still backpropagates through y
    assert all(t.grad is not None for t in (w, u, k, v))


def test_kernelize_swaps_in_the_hub_layer(tmp_path):
    from kernels import LocalLayerRepository, Mode, kernelize, use_kernel_forward_from_hub, use_kernel_mapping

    @use_kernel_forward_from_hub("BiWKV")
    class BiWKV(torch.nn.Module):
        def forward(self, w, u, k, v):
            raise AssertionError("the hub layer should have replaced this forward")

    root = make_standin(tmp_path / "kernel")
    mapping = {"BiWKV": {"cpu": LocalLayerRepository(repo_path=root, layer_name="BiWKV")}}
    with use_kernel_mapping(mapping, inherit_mapping=False):
        model = kernelize(torch.nn.Sequential(BiWKV()), mode=Mode.TRAINING | Mode.TORCH_COMPILE, device="cpu")
    w, u, k, v = _inputs()
    leaves = [t.clone().requires_grad_() for t in (w, u, k, v)]
    y = torch.compile(model[0], fullgraph=True, backend="aot_eager")(*leaves)
    torch.testing.assert_close(y, bi_wkv_torch(w, u, k, v), rtol=1e-5, atol=1e-6)
    y.sum().backward()
    assert all(t.grad is not None for t in leaves)


def test_import_rwkvunet_does_not_import_kernels():
    code = "import sys, rwkvunet, rwkvunet.ops.bi_wkv, rwkvunet.ops.kernel_hub; assert 'kernels' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_kernel_package_exports_with_torch_export(tmp_path):
    module = kernels.get_local_kernel(make_standin(tmp_path / "kernel"))

    class Mix(torch.nn.Module):
        def forward(self, w, u, k, v):
            return module.bi_wkv(w, u, k, v)

    args = tuple(_inputs())
    program = torch.export.export(Mix(), args)
    assert "bi_wkv_forward" in program.graph_module.code
    torch.testing.assert_close(program.module()(*args), bi_wkv_torch(*args), rtol=1e-5, atol=1e-6)


def test_model_layer_is_the_exact_op_and_carries_the_hub_marks():
    from rwkvunet.ops.bi_wkv_layer import LAYER_NAME, BiWKV

    w, u, k, v = _inputs()
    torch.testing.assert_close(BiWKV()(w, u, k, v), bi_wkv(w, u, k, v), rtol=0, atol=0)
    assert BiWKV.kernel_layer_name == LAYER_NAME == "BiWKV"
    assert BiWKV.kernel_condition(BiWKV()) is True
    # the marks are those kernels' own decorator sets
    @kernels.use_kernel_forward_from_hub("BiWKV")
    class Decorated(torch.nn.Module):
        def forward(self, w, u, k, v):
            return w

    assert Decorated.kernel_layer_name == BiWKV.kernel_layer_name
    assert Decorated.kernel_condition(Decorated()) == BiWKV.kernel_condition(BiWKV())
    assert list(BiWKV().state_dict()) == []  # checkpoints of modules holding it do not change


def test_kernelize_swaps_the_model_layer_for_the_kernels_layer(tmp_path):
    """The route a user takes: a kernel mapping for "BiWKV" and kernelize on a model holding rwkvunet's layer."""
    from kernels import LocalLayerRepository, Mode, kernelize, use_kernel_mapping

    from rwkvunet.ops.bi_wkv_layer import BiWKV

    root = make_standin(tmp_path / "kernel")
    model = torch.nn.ModuleDict({"mix": BiWKV()})
    mapping = {"BiWKV": {"cpu": LocalLayerRepository(repo_path=root, layer_name="BiWKV")}}
    with use_kernel_mapping(mapping, inherit_mapping=False):
        model = kernelize(model, mode=Mode.TRAINING, device="cpu")
    w, u, k, v = _inputs()
    leaves = [t.clone().requires_grad_() for t in (w, u, k, v)]
    y = model["mix"](*leaves)
    assert y.grad_fn is not None and "bi_wkv_forward" in y.grad_fn.name()  # the kernel package's op ran
    torch.testing.assert_close(y, bi_wkv_torch(w, u, k, v), rtol=1e-5, atol=1e-6)
    y.sum().backward()
    assert all(t.grad is not None for t in leaves)


def test_model_layer_without_kernels_is_a_plain_module():
    code = (
        "import sys; sys.modules['kernels'] = None\n"
        "import torch\n"
        "from rwkvunet.ops.bi_wkv import bi_wkv_torch\n"
        "from rwkvunet.ops.bi_wkv_layer import BiWKV, kernels_available\n"
        "assert not kernels_available() and not hasattr(BiWKV, 'kernel_layer_name')\n"
        "w, k = torch.rand(4), torch.rand(2, 3, 4)\n"
        "torch.testing.assert_close(BiWKV()(w, w, k, k + 1), bi_wkv_torch(w, w, k, k + 1))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_importing_the_model_layer_does_not_import_kernels():
    code = "import sys, rwkvunet.ops.bi_wkv_layer as m; assert 'kernels' not in sys.modules; assert m.BiWKV.kernel_layer_name"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_model_layer_scripts_as_an_opaque_call():
    """A module holding BiWKV still scripts with TorchScript: its forward is an ignored Python call."""
    from rwkvunet.ops.bi_wkv_layer import BiWKV

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bi_wkv = BiWKV()

        def forward(self, w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return self.bi_wkv(w, u, k, v) * 2

    w, u, k, v = _inputs()
    scripted = torch.jit.script(Holder())
    torch.testing.assert_close(scripted(w, u, k, v), 2 * bi_wkv_torch(w, u, k, v), rtol=1e-5, atol=1e-6)
