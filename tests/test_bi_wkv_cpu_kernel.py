"""The fused Bi-WKV CPU kernel: values and gradients against the float64 formula, dispatch, fallbacks."""
import warnings

import pytest
import torch

from bi_wkv_reference import bi_wkv_reference
from rwkvunet.ops import bi_wkv, bi_wkv_torch
from rwkvunet.ops import cpu_kernel as ck
from rwkvunet.ops.bi_wkv import _fast_path_is_exact
from test_bi_wkv import make_inputs, rel_err


def _grad_scales(v, gy):
    """Bounds on |y| and each gradient (|dy_t/dv_i| <= 1, |v_i - y_t| <= 2 max|v|): errors are judged against
    these, since a gradient that is tiny by cancellation has no meaningful relative error."""
    T = v.shape[1]
    g = gy.abs().sum(1).max().item()
    vmax = v.abs().max().item()
    return {"w": 2 * vmax * g * T, "u": 2 * vmax * g, "k": 2 * vmax * g, "v": g}


# (B, T, C): one token, two, channel counts off the 16-channel groups, batches, a long sequence
SHAPES = [(1, 1, 5), (2, 2, 33), (3, 64, 40), (1, 300, 70), (2, 1000, 9)]


@pytest.mark.parametrize("B,T,C", SHAPES)
def test_forward_matches_formula(cpu_kernel_module, B, T, C):
    w, u, k, v = make_inputs(B, T, C, seed=T + C)
    if not _fast_path_is_exact(w.float(), u.float(), k.float()):
        k = k / 2  # inside the kernel's domain (the caller sends other inputs to the exact scan)
    ref = bi_wkv_reference(w, u, k, v)
    y, log_d = cpu_kernel_module.forward(*(x.float().contiguous() for x in (w, u, k, v)), True)
    assert y.dtype == torch.float32 and y.shape == (B, T, C)
    assert rel_err(y, ref) < 1e-5  # the PyTorch implementation's float32 bound (test_bi_wkv)
    # log D: the log of the denominator of y_t (direct float64 sum)
    t = torch.arange(T, dtype=torch.float64)
    dist = (t[:, None] - t[None, :]).abs()
    expo = -(dist - 1)[None, :, :, None] * w.double() + k.double()[:, None]
    expo = torch.where((dist == 0)[None, :, :, None], (u.double() + k.double())[:, None].expand_as(expo), expo)
    assert (log_d.double() - torch.logsumexp(expo, dim=2)).abs().max() < 1e-5


def test_forward_at_the_edge_of_its_domain(cpu_kernel_module):
    """Spans near the caller's limit of 60 and values near float32's range: the sums are taken relative to each
    token, so a side's ratio reaches exp(60); the output must still be finite and as exact as anywhere else."""
    g = torch.Generator().manual_seed(1)
    T, C = 600, 20
    k = torch.randn(1, T, C, generator=g, dtype=torch.float64) * 2
    k[0, 7] += 25  # one dominant token: every other token sits about exp(-30) below it
    w = (torch.rand(C, generator=g, dtype=torch.float64) * 2 - 1) * 0.01
    u = torch.randn(C, generator=g, dtype=torch.float64)
    span = (k.max() - k.min()) + w.abs().max() * (T + 1) + u.abs().max()
    assert 40 < span <= 60
    for scale in (1.0, 1e30):
        v = torch.randn(1, T, C, generator=g, dtype=torch.float64) * scale
        y, _ = cpu_kernel_module.forward(*(x.float().contiguous() for x in (w, u, k, v)), True)
        assert torch.isfinite(y).all()
        assert rel_err(y, bi_wkv_reference(w, u, k, v)) < 1e-5


@pytest.mark.parametrize("B,T,C", SHAPES[1:])
def test_gradients_match_formula(cpu_kernel_module, B, T, C):
    w, u, k, v = make_inputs(B, T, C, seed=2 * T + C)
    if not _fast_path_is_exact(w.float(), u.float(), k.float()):
        k = k / 2
    gy = torch.randn(B, T, C, dtype=torch.float64)
    ours = [x.float().requires_grad_(True) for x in (w, u, k, v)]
    (ck.bi_wkv_cpu(*ours) * gy.float()).sum().backward()
    if T <= 300:
        theirs = [x.clone().requires_grad_(True) for x in (w, u, k, v)]
        (bi_wkv_reference(*theirs) * gy).sum().backward()
    else:  # the O(T^2) formula is too large here: float64 autograd through the PyTorch implementation
        theirs = [x.clone().requires_grad_(True) for x in (w, u, k, v)]
        (bi_wkv_torch(*theirs) * gy).sum().backward()
    scales = _grad_scales(v, gy)
    for name, a, b in zip("wukv", ours, theirs):
        err = (a.grad.double() - b.grad).abs().max().item() / scales[name]
        assert err < 1e-6, f"d{name}: {err:.2e} of its scale"


def test_gradients_are_deterministic(cpu_kernel_module):
    w, u, k, v = make_inputs(3, 200, 45, dtype=torch.float32, seed=1)
    gy = torch.randn(3, 200, 45)
    grads = []
    for _ in range(2):
        leaves = [x.clone().requires_grad_(True) for x in (w, u, k, v)]
        (ck.bi_wkv_cpu(*leaves) * gy).sum().backward()
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def _count_kernel_calls(monkeypatch):
    calls = []
    real = ck.bi_wkv_cpu
    monkeypatch.setattr(ck, "bi_wkv_cpu", lambda *a: calls.append(1) or real(*a))
    return calls


def test_dispatch_float32_cpu_goes_to_the_kernel(cpu_kernel_module, monkeypatch):
    calls = _count_kernel_calls(monkeypatch)
    w, u, k, v = make_inputs(2, 50, 8, dtype=torch.float32, seed=3)
    with torch.no_grad():
        y = bi_wkv(w, u, k, v)
    assert len(calls) == 1 and rel_err(y, bi_wkv_reference(w, u, k, v)) < 1e-5
    leaves = [x.clone().requires_grad_(True) for x in (w, u, k, v)]
    bi_wkv(*leaves).sum().backward()  # training goes through it too (forward and backward)
    assert len(calls) == 2 and all(x.grad is not None for x in leaves)


def test_dispatch_leaves_other_calls_to_pytorch(cpu_kernel_module, monkeypatch):
    calls = _count_kernel_calls(monkeypatch)
    w, u, k, v = make_inputs(2, 50, 8, seed=3)
    bi_wkv(w, u, k, v)  # float64
    bi_wkv(*(x.bfloat16() for x in (w, u, k, v)))  # half precision
    w32, u32, k32, v32 = (x.float() for x in (w, u, k, v))
    torch.compile(bi_wkv, fullgraph=True, backend="aot_eager")(w32, u32, k32, v32)  # compiled graphs
    torch.jit.trace(lambda k_, v_: bi_wkv(w32, u32, k_, v_), (k32, v32), check_trace=False)  # traced graphs
    assert calls == []
    # beyond the max-shifted sums' exact range: the exact log-space scan, not the kernel
    w_far = torch.full_like(w32, 5.0)
    y = bi_wkv(w_far, u32, k32, v32)
    assert calls == [] and rel_err(y, bi_wkv_reference(w_far, u32, k32, v32)) < 1e-5


@pytest.mark.parametrize("value", ["off", "0", "False", " no "])
def test_switched_off_by_the_environment(monkeypatch, value):
    import rwkvunet.layers as L

    monkeypatch.setenv(ck.ENV_VAR, value)
    assert not L.cpu_fast_paths()
    monkeypatch.setattr(ck, "_loaded", {})
    monkeypatch.setattr(ck, "_build", lambda: pytest.fail("built although switched off"))
    assert ck.cpu_kernel() is None
    w, u, k, v = make_inputs(1, 20, 4, dtype=torch.float32)
    torch.testing.assert_close(bi_wkv(w, u, k, v), bi_wkv_torch(w, u, k, v), rtol=0, atol=0)


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setenv(ck.ENV_VAR, "auto")
    monkeypatch.setattr(ck, "_loaded", {})
    monkeypatch.setattr(ck, "_toolchain_missing", lambda: None)

    def broken():
        raise RuntimeError("Error building extension 'rwkvunet_bi_wkv_cpu'\nlong compiler output")

    monkeypatch.setattr(ck, "_build", broken)
    w, u, k, v = make_inputs(1, 20, 4, dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match=r"could not be built.*Error building extension.*RWKVUNET_CPU_KERNEL=off"):
        y = bi_wkv(w, u, k, v)
    torch.testing.assert_close(y, bi_wkv_torch(w, u, k, v), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bi_wkv(w, u, k, v)  # once per process


def test_compiler_without_openmp_builds_the_kernel_on_one_thread(monkeypatch):
    """A compiler that refuses -fopenmp still gets the kernel (single-threaded), with one warning saying so."""
    monkeypatch.setattr(ck, "build_flags", lambda: ["-O3", "-fopenmp"])
    tried = []

    def load(flags):
        tried.append(list(flags))
        if "-fopenmp" in flags:
            raise RuntimeError("Error building extension: unrecognized command-line option '-fopenmp'")
        return "module"

    monkeypatch.setattr(ck, "_load", load)
    with pytest.warns(RuntimeWarning, match=r"without OpenMP.*one thread.*-fopenmp"):
        assert ck._build() == "module"
    assert tried == [["-O3", "-fopenmp"], ["-O3"]]
    monkeypatch.setattr(ck, "build_flags", lambda: ["-O3"])  # without OpenMP in the flags a failure is final
    monkeypatch.setattr(ck, "_load", lambda flags: (_ for _ in ()).throw(RuntimeError("no compiler")))
    with pytest.raises(RuntimeError, match="no compiler"):
        ck._build()


def test_missing_toolchain_is_silent(monkeypatch):
    monkeypatch.setenv(ck.ENV_VAR, "auto")
    monkeypatch.setattr(ck, "_loaded", {})
    monkeypatch.setattr(ck, "_toolchain_missing", lambda: "no C++ compiler (c++) on the PATH")
    monkeypatch.setattr(ck, "_build", lambda: pytest.fail("built without a toolchain"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ck.cpu_kernel() is None


def test_kernels_use_torchs_threads(cpu_kernel_module):
    """at::parallel_for is inline code around an OpenMP pragma: a build without -fopenmp ran every kernel on one
    thread. With two of torch's threads, two tasks must run on two."""
    if not ck.uses_openmp():
        pytest.skip("torch's threads are not OpenMP's here: the kernel is built without it")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert cpu_kernel_module.parallel_threads(64) == 2
        torch.set_num_threads(1)
        assert cpu_kernel_module.parallel_threads(64) == 1
    finally:
        torch.set_num_threads(threads)


def test_build_flags_follow_torchs_instruction_set(monkeypatch):
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert "-mavx2" in ck.build_flags() and not any("avx512" in f for f in ck.build_flags())
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert not any(f.startswith("-mavx") for f in ck.build_flags())
    assert "-ffast-math" not in ck.build_flags()  # IEEE semantics kept: exactness tests hold
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert not any(f.startswith("-m") for f in ck.build_flags())


def test_model_outputs_and_gradients_as_exact_as_the_pytorch_path(cpu_kernel_module, monkeypatch):
    """A whole RWKV-UNet-T in float32, kernel and PyTorch path, against the same model in float64: logits agree,
    and every parameter gradient of one loss is about as close to float64 as the PyTorch path's (some, like the
    stem BatchNorm's weight, are sums that cancel and are only a few digits exact in float32 on either path)."""
    import copy

    from rwkvunet.models.rwkv_unet import RWKVUNetConfig, RWKVUNetForSemanticSegmentation

    torch.manual_seed(0)
    model = RWKVUNetForSemanticSegmentation(RWKVUNetConfig(variant="t", num_labels=3))
    x, labels = torch.randn(2, 3, 48, 64), torch.randint(0, 3, (2, 48, 64))

    def run(m, setting, dtype):
        monkeypatch.setenv(ck.ENV_VAR, setting)
        with torch.no_grad():
            logits = m.eval()(pixel_values=x.to(dtype)).logits.double()  # before training changes BN statistics
        m.train().zero_grad()
        torch.manual_seed(1)  # the same drop-path draws
        m(pixel_values=x.to(dtype), labels=labels).loss.backward()
        return logits, {n: p.grad.double() for n, p in m.named_parameters() if p.grad is not None}

    ref_logits, ref = run(copy.deepcopy(model).double(), "off", torch.float64)
    kernel_logits, kernel = run(copy.deepcopy(model), "auto", torch.float32)
    torch_logits, torch_path = run(copy.deepcopy(model), "off", torch.float32)
    assert rel_err(kernel_logits, ref_logits) < 1e-5 and rel_err(torch_logits, ref_logits) < 1e-5
    assert kernel.keys() == ref.keys() == torch_path.keys()
    floor = 1e-6 * max(g.abs().max().item() for g in ref.values())  # gradients that are zero up to rounding

    def err(grads, name):
        return (grads[name] - ref[name]).abs().max().item() / max(ref[name].abs().max().item(), floor)

    # rounding errors are random: per tensor within a few times the PyTorch path's, on average about equal
    errors = {n: (err(kernel, n), err(torch_path, n)) for n in ref}
    worse = {n: e for n, e in errors.items() if e[0] > max(4 * e[1], 1e-4)}
    assert not worse, worse
    mean_kernel, mean_torch = (sum(e[i] for e in errors.values()) / len(errors) for i in (0, 1))
    assert mean_kernel < 1.5 * mean_torch + 1e-6, (mean_kernel, mean_torch)


def test_installations_of_the_same_source_share_one_build(cpu_kernel_module, tmp_path, monkeypatch):
    """A second copy of the same source (another clone or virtualenv) loads the existing build: its compile
    command is the same, so ninja does not rebuild (the library file is untouched)."""
    import shutil

    from rwkvunet.ops import cpu_kernel as ck

    folder = ck._cache_root() / ck._build_tag(ck.build_flags())
    (library,) = folder.glob("rwkvunet_bi_wkv_cpu_*.so")
    before = library.stat().st_mtime_ns
    other = tmp_path / "elsewhere" / "csrc" / ck.SOURCE.name
    other.parent.mkdir(parents=True)
    shutil.copyfile(ck.SOURCE, other)
    monkeypatch.setattr(ck, "SOURCE", other)
    ck._build()
    assert library.stat().st_mtime_ns == before
    assert (folder / ck.SOURCE.name).read_bytes() == other.read_bytes()
