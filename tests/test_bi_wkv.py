"""Bi-WKV op: exactness against the O(T^2) formula, gradients, dtypes, long sequences, compile/export."""
import importlib
import subprocess
import sys
import textwrap

import pytest
import torch

from bi_wkv_reference import bi_wkv_reference, bi_wkv_reference_mp, bi_wkv_reference_rows
from rwkvunet.ops import bi_wkv, bi_wkv_torch


def make_inputs(B, T, C, dtype=torch.float64, seed=0, requires_grad=False):
    """decay, first in [-10, 10] (w = decay / T), k in [-20, 20], v standard normal: the op's stated domain."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(C, generator=g, dtype=torch.float64) * 20 - 10) / T
    u = (torch.rand(C, generator=g, dtype=torch.float64) * 20 - 10) / T
    k = torch.rand(B, T, C, generator=g, dtype=torch.float64) * 40 - 20
    v = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    out = [x.to(dtype).requires_grad_(requires_grad) for x in (w, u, k, v)]
    return out


def rel_err(y, ref):
    # y is a convex combination of v, so its natural scale is max|ref|; elementwise relative error is
    # meaningless where the weighted mean cancels to ~0
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("T", [1, 2, 3, 7, 64, 197, 500])
def test_float64_matches_formula(T):
    w, u, k, v = make_inputs(2, T, 6, seed=T)
    assert rel_err(bi_wkv(w, u, k, v), bi_wkv_reference(w, u, k, v)) < 1e-10


@pytest.mark.parametrize("T", [1, 5, 64, 300])
def test_float32_matches_formula(T):
    w, u, k, v = make_inputs(2, T, 8, seed=100 + T)
    ref = bi_wkv_reference(w, u, k, v)
    y = bi_wkv(*(x.float() for x in (w, u, k, v)))
    assert y.dtype == torch.float32
    assert rel_err(y, ref) < 1e-5


def test_extremes_of_the_domain():
    """All channels at the corners of the domain: strongest growth/decay and the widest key range."""
    T, C = 256, 4
    w = torch.tensor([10.0, -10.0, 10.0, -10.0], dtype=torch.float64) / T
    u = torch.tensor([-10.0, 10.0, 10.0, -10.0], dtype=torch.float64) / T
    k = torch.where(torch.rand(1, T, C) > 0.5, 20.0, -20.0).double()
    v = torch.randn(1, T, C, dtype=torch.float64)
    ref = bi_wkv_reference(w, u, k, v)
    assert rel_err(bi_wkv(w, u, k, v), ref) < 1e-10
    assert rel_err(bi_wkv(w.float(), u.float(), k.float(), v.float()), ref) < 1e-5


def test_gradcheck_float64():
    inputs = make_inputs(2, 6, 3, requires_grad=True)
    assert torch.autograd.gradcheck(bi_wkv, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)
    assert torch.autograd.gradgradcheck(bi_wkv, make_inputs(1, 4, 2, requires_grad=True), atol=1e-6)


def test_gradients_match_reference_autograd_long():
    """All four gradients at T ~ 1000 against autograd through the direct formula."""
    T = 1000
    ours = make_inputs(1, T, 3, seed=7, requires_grad=True)
    theirs = [x.detach().clone().requires_grad_(True) for x in ours]
    gy = torch.randn(1, T, 3, dtype=torch.float64)
    (bi_wkv(*ours) * gy).sum().backward()
    (bi_wkv_reference(*theirs) * gy).sum().backward()
    for name, a, b in zip("wukv", ours, theirs):
        err = ((a.grad - b.grad).abs().max() / b.grad.abs().max()).item()
        assert err < 1e-9, f"d{name}: {err}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_float32(dtype):
    w, u, k, v = make_inputs(2, 128, 8, seed=3)
    k = k / 4  # keep exp(k) inside float16's range of the *inputs* (the op itself accumulates in float32)
    half = [x.to(dtype) for x in (w, u, k, v)]
    y = bi_wkv(*half)
    assert y.dtype == dtype
    # float32 evaluation of the very same (rounded) inputs: only the final rounding to `dtype` may differ
    y32 = bi_wkv(*(x.float() for x in half))
    eps = torch.finfo(dtype).eps
    assert ((y.float() - y32).abs() <= eps * y32.abs() + 1e-6).all()


def test_long_sequence_float32_is_exact_and_linear_memory():
    """T = 16384 (1024x1024 at stride 8) in float32 on the CPU, checked on sampled rows against the formula."""
    T, C = 16384, 576
    w, u, k, v = make_inputs(1, T, C, dtype=torch.float32, seed=11)
    y = bi_wkv(w, u, k, v)
    rows = [0, 1, 4095, 8191, 16382, 16383]
    ref = bi_wkv_reference_rows(w, u, k, v, rows)
    assert rel_err(y[:, rows], ref) < 1e-5


def _peak_bytes_fwd_bwd(T: int, C: int = 64) -> int:
    code = textwrap.dedent(f"""
        import torch
        from rwkvunet.ops import bi_wkv
        torch.manual_seed(0)
        T, C = {T}, {C}
        w = torch.zeros(C, requires_grad=True); u = torch.zeros(C, requires_grad=True)
        k = torch.randn(1, T, C, requires_grad=True); v = torch.randn(1, T, C, requires_grad=True)
        def rss(field):
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field)) * 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current size: imports do not hide the op's peak
        base = rss("VmRSS:")
        bi_wkv(w / T, u / T, k, v).sum().backward()
        print(rss("VmHWM:") - base)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_memory_is_linear_in_T():
    """Forward + backward peak memory grows about 4x from T = 4096 to 16384 (a T x T term would be 16x), and at
    T = 16384 stays far below one T x T float32 matrix (1 GiB)."""
    small, large = _peak_bytes_fwd_bwd(4096), _peak_bytes_fwd_bwd(16384)
    assert large < 16384 * 16384 * 4 / 2, f"peak grew by {large / 2**20:.0f} MiB"
    assert large / small < 6, f"{small / 2**20:.0f} MiB -> {large / 2**20:.0f} MiB"


def test_channel_groups_equal_one_pass(monkeypatch, torch_cpu_path):
    """Large CPU inputs run in groups of channels (the PyTorch implementation); values and all four gradients
    equal one pass."""
    op = importlib.import_module("rwkvunet.ops.bi_wkv")  # the package exports a function of the same name

    ours = make_inputs(2, 300, 20, dtype=torch.float32, seed=9, requires_grad=True)
    theirs = [x.detach().clone().requires_grad_(True) for x in ours]
    monkeypatch.setattr(op, "_CHUNK_ELEMENTS", 2 * 300 * 8)  # groups of 8, 8 and 4 channels
    assert op._cpu_channel_chunk(ours[2]) == 8
    y = bi_wkv(*ours)
    ref = bi_wkv_torch(*theirs)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-6)
    gy = torch.randn_like(ref)
    (y * gy).sum().backward()
    (ref * gy).sum().backward()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_torch_impl_is_the_cpu_path(monkeypatch):
    """CPU tensors never consult the CUDA kernel lookup."""
    import rwkvunet.ops.kernel_hub as hub

    def boom():
        raise AssertionError("kernel lookup for CPU tensors")

    monkeypatch.setattr(hub, "cuda_bi_wkv", boom)
    w, u, k, v = make_inputs(1, 9, 4)
    torch.testing.assert_close(bi_wkv(w, u, k, v), bi_wkv_torch(w, u, k, v), rtol=0, atol=0)


def test_shape_errors_name_the_problem():
    w, u, k, v = make_inputs(1, 9, 4)
    with pytest.raises(ValueError, match=r"\(B, T, C\)"):
        bi_wkv(w, u, k[0], v[0])
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        bi_wkv(w[:3], u, k, v)


def test_compile_fullgraph_and_export(torch_cpu_path):
    """Compiled and exported graphs run the PyTorch implementation: the compiled one equals it run eagerly, the
    exported one (inference: the relative form) the formula, to float32's bound."""
    w, u, k, v = make_inputs(2, 50, 8, dtype=torch.float32, requires_grad=True)
    eager = bi_wkv(w, u, k, v)
    compiled = torch.compile(bi_wkv, fullgraph=True, backend="aot_eager")
    y = compiled(w, u, k, v)
    torch.testing.assert_close(y, eager, rtol=1e-6, atol=1e-6)
    y.sum().backward()  # the traced backward runs too

    class Mix(torch.nn.Module):
        def forward(self, w, u, k, v):
            return bi_wkv(w, u, k, v)

    args = tuple(x.detach() for x in (w, u, k, v))
    T = torch.export.Dim("T", min=3, max=4096)
    B = torch.export.Dim("B", min=1, max=64)
    prog = torch.export.export(Mix(), args, dynamic_shapes=(None, None, {0: B, 1: T}, {0: B, 1: T}))
    # without gradients the graph holds the relative form (other float32 rounding): judged against the formula
    assert rel_err(prog.module()(*args), bi_wkv_reference(*args)) < 1e-5
    w2, u2, k2, v2 = make_inputs(1, 77, 8, dtype=torch.float32, seed=5)
    assert rel_err(prog.module()(w2, u2, k2, v2), bi_wkv_reference(w2, u2, k2, v2)) < 1e-5


@pytest.mark.parametrize("T", [1, 2, 5, 256])
def test_inference_path_equals_autograd_path(T):
    """Without gradients the op runs an in-place form; it computes the same sums as the differentiable one."""
    w, u, k, v = make_inputs(3, T, 7, seed=40 + T)
    with torch.no_grad():
        fast = bi_wkv_torch(w, u, k, v)
    slow = bi_wkv_torch(*(x.clone().requires_grad_(True) for x in (w, u, k, v))).detach()
    assert rel_err(fast, slow) < 1e-13
    w32, u32, k32, v32 = (x.float() for x in (w, u, k, v))
    with torch.no_grad():
        fast32 = bi_wkv_torch(w32, u32, k32, v32)
    assert rel_err(fast32, slow) < 1e-5


@pytest.mark.parametrize("T", [1, 2, 5, 256])
def test_relative_form_equals_autograd_path(T):
    """Compiled and exported inference graphs take each side relative to the token itself; the same sums."""
    op = importlib.import_module("rwkvunet.ops.bi_wkv")
    w, u, k, v = make_inputs(3, T, 7, seed=60 + T)
    slow = bi_wkv_torch(*(x.clone().requires_grad_(True) for x in (w, u, k, v))).detach()
    assert rel_err(op._bi_wkv_relative(w, u, k, v), slow) < 1e-12
    assert rel_err(op._bi_wkv_relative(*(x.float() for x in (w, u, k, v))), slow) < 1e-5


def test_relative_form_at_its_bound_with_huge_values():
    """Ratios to the token reach exp(60) at the fast path's bound; with values near float32's range the output
    must still be finite and exact (each side enters as its share of the denominator times its sum)."""
    op = importlib.import_module("rwkvunet.ops.bi_wkv")
    T, C, limit = 50, 3, 60.0
    w = torch.tensor([0.45, -0.45, 0.0], dtype=torch.float64) * limit / (T + 1)
    u = torch.tensor([-0.05, 0.05, 0.0], dtype=torch.float64) * limit
    k = torch.zeros(2, T, C, dtype=torch.float64)
    k[:, ::7] = 0.5 * limit
    for scale in (1.0, 1e30):
        v = torch.randn(2, T, C, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * scale
        x = [t.float() for t in (w, u, k, v)]
        assert op._fast_path_is_exact(x[0], x[1], x[2])
        y = op._bi_wkv_relative(*x)
        assert torch.isfinite(y).all()
        assert rel_err(y, bi_wkv_reference(w, u, k, v)) < 1e-5


def test_compiled_inference_takes_the_relative_form(monkeypatch):
    op = importlib.import_module("rwkvunet.ops.bi_wkv")
    calls = []
    monkeypatch.setattr(op, "_bi_wkv_relative", lambda *a: calls.append(1) or op._bi_wkv_cumsum(*a))
    w, u, k, v = make_inputs(1, 20, 4, dtype=torch.float32)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(bi_wkv_torch, fullgraph=True, backend="aot_eager")(w, u, k, v)
    assert calls, "a compiled graph without gradients should take the relative form"


# --- extreme inputs: exact for every finite w, u, k, v ---------------------------------------------------

def _grad_scales(v, gy):
    """Bounds on |y| and on each gradient, from |dy_t/dv_i| = a_ti <= 1 and |v_i - y_t| <= 2 max|v|: an error
    is judged against these, since a gradient that is tiny by cancellation has no meaningful relative error."""
    T = v.shape[1]
    g = gy.abs().sum(1).max().item()
    vmax = v.abs().max().item()
    return {"y": vmax, "w": 2 * vmax * g * T, "u": 2 * vmax * g, "k": 2 * vmax * g, "v": g}


def _forward_and_grads(fn, w, u, k, v, gy):
    leaves = [x.clone().requires_grad_(True) for x in (w, u, k, v)]
    y = fn(*leaves)
    return (y.detach(), *torch.autograd.grad(y, leaves, gy.to(y.dtype)))


# (T, spatial decay |w| * T, k range, u): large growth and decay, |w| * T up to 1e4, keys at +-700, bonus +-700
FLOAT64_EXTREMES = [(5, 120.0, 300.0, 0.0), (5, -120.0, 300.0, 50.0), (6, 1e4, 700.0, -700.0),
                    (7, -1e4, 700.0, 700.0), (4, 1e3, 0.0, -700.0), (8, -1e3, 5.0, 0.0)]


@pytest.mark.parametrize("T,decay,k_range,u_value", FLOAT64_EXTREMES)
def test_extreme_float64_against_mpmath(T, decay, k_range, u_value):
    """Forward and all four gradients against the formula in 60-digit arithmetic: absolute errors within
    1e-13 of each quantity's natural scale (float64 eps times the few operations each value passes through)."""
    g = torch.Generator().manual_seed(T)
    C = 2
    w = torch.tensor([decay, decay / 3], dtype=torch.float64) / T
    u = torch.tensor([u_value, -u_value / 2], dtype=torch.float64)
    k = (torch.rand(2, T, C, generator=g, dtype=torch.float64) * 2 - 1) * k_range
    v = torch.randn(2, T, C, generator=g, dtype=torch.float64)
    gy = torch.randn(2, T, C, generator=g, dtype=torch.float64)
    want = bi_wkv_reference_mp(w, u, k, v, gy)
    got = _forward_and_grads(bi_wkv, w, u, k, v, gy)
    scales = _grad_scales(v, gy)
    for name, a, b in zip("y w u k v".split(), got, want):
        assert torch.isfinite(a).all(), name
        err = (a - b).abs().max().item() / scales[name]
        assert err < 1e-13, (name, err)


@pytest.mark.parametrize("decay", [120.0, -120.0, 1e4, -1e4, 800.0])
@pytest.mark.parametrize("T", [64, 197])
def test_extreme_float32_against_float64_formula(T, decay):
    """float32 inputs with keys at +-80, bonus +-80 and |w| * T up to 1e4: y within 1e-6 of max|v| of the
    float64 formula of the same inputs (the exact path accumulates in float64, so only y's final rounding to
    float32 remains), gradients within 1e-6 of their natural scale."""
    g = torch.Generator().manual_seed(T + int(decay))
    C = 4
    w = (torch.tensor([1.0, 0.5, 0.1, 1.0]) * decay / T).float()
    u = torch.tensor([0.0, 80.0, -80.0, 5.0])
    k = torch.where(torch.rand(2, T, C, generator=g) > 0.5, 80.0, -80.0) + torch.randn(2, T, C, generator=g)
    v = torch.randn(2, T, C, generator=g)
    gy = torch.randn(2, T, C, generator=g)
    got = _forward_and_grads(bi_wkv, w, u, k, v, gy)
    want = _forward_and_grads(bi_wkv_reference, *(x.double() for x in (w, u, k, v)), gy.double())
    scales = _grad_scales(v.double(), gy.double())
    for name, a, b in zip("y w u k v".split(), got, want):
        assert torch.isfinite(a).all(), name
        err = (a.double() - b).abs().max().item() / scales[name]
        assert err < 1e-6, (name, err)
    with torch.no_grad():
        fast = bi_wkv(w, u, k, v)  # the in-place inference path
    assert rel_err(fast, want[0]) < 1e-6


def test_spatial_decay_of_120_is_finite_and_exact():
    """A spatial mix with spatial_decay = 120 on a 14 x 14 grid (w * T = 120), keys of a trained model's size."""
    T, C = 196, 8
    w = torch.full((C,), 120.0 / T)
    u = torch.full((C,), 2.0 / T)
    k, v = torch.randn(1, T, C) * 3, torch.randn(1, T, C)
    y = bi_wkv(w, u, k, v)
    assert torch.isfinite(y).all()
    assert rel_err(y, bi_wkv_reference(w, u, k, v)) < 1e-6


@pytest.mark.parametrize("dtype,limit", [(torch.float32, 60.0), (torch.float64, 600.0)])
def test_fast_path_is_exact_up_to_its_bound(dtype, limit):
    """Inputs just inside the bound run the max-shifted cumulative sums (no scan), and are exact there."""
    op = importlib.import_module("rwkvunet.ops.bi_wkv")
    T, C = 50, 3
    # worst cases for the shared maximum: strongest decay, strongest growth, and a key range at the limit
    w = torch.tensor([0.45, -0.45, 0.0], dtype=torch.float64) * limit / (T + 1)
    u = torch.tensor([-0.05, 0.05, 0.0], dtype=torch.float64) * limit
    k = torch.zeros(2, T, C, dtype=torch.float64)
    k[:, ::7] = 0.5 * limit  # range(k) = limit / 2
    v = torch.randn(2, T, C, dtype=torch.float64)
    x = [t.to(dtype) for t in (w, u, k, v)]
    assert op._fast_path_is_exact(x[0], x[1], x[2])
    assert not op._fast_path_is_exact(x[0] * 1.2, x[1], x[2])
    ref = bi_wkv_reference(*x)
    with torch.no_grad():
        assert rel_err(bi_wkv(*x), ref) < (1e-5 if dtype == torch.float32 else 1e-12)
    assert rel_err(bi_wkv(*(t.clone().requires_grad_() for t in x)).detach(), ref) < (
        1e-5 if dtype == torch.float32 else 1e-12)


def test_scan_gradcheck_float64():
    """The exact scan's gradients (its own, not the cumulative sums') by finite differences."""
    op = importlib.import_module("rwkvunet.ops.bi_wkv")
    g = torch.Generator().manual_seed(3)
    w = torch.tensor([3.0, -2.0, 0.1], dtype=torch.float64).requires_grad_()
    u = torch.tensor([5.0, -5.0, 0.0], dtype=torch.float64).requires_grad_()
    k = (torch.randn(2, 7, 3, generator=g, dtype=torch.float64) * 4).requires_grad_()
    v = torch.randn(2, 7, 3, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(op.bi_wkv_scan, (w, u, k, v), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_scan_agrees_with_cumulative_sums_inside_the_bound():
    op = importlib.import_module("rwkvunet.ops.bi_wkv")
    w, u, k, v = make_inputs(2, 333, 5, seed=21)
    assert rel_err(op.bi_wkv_scan(w, u, k, v), bi_wkv_torch(w, u, k, v)) < 1e-12


def test_extreme_channel_groups(monkeypatch, torch_cpu_path):
    """Large CPU inputs run in groups of channels; each group picks its own path."""
    op = importlib.import_module("rwkvunet.ops.bi_wkv")
    monkeypatch.setattr(op, "_CHUNK_ELEMENTS", 2 * 100 * 4)
    w, u, k, v = make_inputs(2, 100, 10, dtype=torch.float32, seed=4)
    w[:4] = 5.0  # the first group needs the exact scan, the others do not
    assert rel_err(bi_wkv(w, u, k, v), bi_wkv_reference(w, u, k, v)) < 1e-5


# --- empty and invalid inputs ------------------------------------------------------------------------------

@pytest.mark.parametrize("requires_grad", [False, True])
def test_empty_sequence_gives_empty_outputs_and_gradients(requires_grad):
    w, u = torch.zeros(4, requires_grad=requires_grad), torch.zeros(4, requires_grad=requires_grad)
    k, v = torch.zeros(2, 0, 4, requires_grad=requires_grad), torch.zeros(2, 0, 4, requires_grad=requires_grad)
    y = bi_wkv(w, u, k, v)
    assert y.shape == (2, 0, 4) and y.dtype == torch.float32
    assert bi_wkv_torch(w, u, k, v).shape == (2, 0, 4)
    if requires_grad:
        grads = torch.autograd.grad(y.sum(), (w, u, k, v))
        assert [tuple(g.shape) for g in grads] == [(4,), (4,), (2, 0, 4), (2, 0, 4)]
        assert all((g == 0).all() for g in grads)


@pytest.mark.parametrize("bad", ["int_k", "bool_v", "int_w", "list_u"])
def test_dtype_errors_name_the_expected_inputs(bad):
    w, u, k, v = make_inputs(1, 9, 4, dtype=torch.float32)
    if bad == "int_k":
        k = k.long()
    elif bad == "bool_v":
        v = v > 0
    elif bad == "int_w":
        w = w.int()
    else:
        u = u.tolist()
    with pytest.raises(ValueError, match=r"w, u .*\(C,\) and k, v .*\(B, T, C\)"):
        bi_wkv(w, u, k, v)
