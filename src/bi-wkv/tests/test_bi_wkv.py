"""GPU tests of the Bi-WKV kernel against a float64 evaluation of its formula.

    y_t = ( sum_{i!=t} exp(-(|t-i|-1) w + k_i) v_i + exp(u + k_t) v_t )
        / ( sum_{i!=t} exp(-(|t-i|-1) w + k_i)     + exp(u + k_t) )

The reference takes every weight in log space (a softmax over i in float64), so it stays exact where the
exponents are far beyond float range (|w| T up to 1e4, keys of +-80). The kernel is loaded the way users load
it, with ``get_kernel``; kernel-builder's dev and test shells point LOCAL_KERNELS at the local build.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Bi-WKV kernel needs a CUDA device")


@pytest.fixture(scope="module")
def bi_wkv():
    import kernels

    return kernels.get_kernel("rwkv-unet/bi-wkv", version=1, trust_remote_code=["rwkv-unet/bi-wkv"])


def reference(w, u, k, v):
    """y in float64 from the formula, through log-space weights (differentiable)."""
    w, u, k, v = (t.double() for t in (w, u, k, v))
    T = k.shape[1]
    t = torch.arange(T, device=k.device)
    dist = (t[:, None] - t[None, :]).abs().double()  # (T, T): |t - i|
    logits = -(dist - 1)[:, :, None] * w + k[:, None, :, :]  # (B, T, T, C): row t, column i
    own = (u + k)[:, :, None, :].expand_as(logits)  # the i = t term
    eye = torch.eye(T, dtype=torch.bool, device=k.device)[None, :, :, None]
    logits = torch.where(eye, own, logits)
    return (torch.softmax(logits, dim=2) * v[:, None, :, :]).sum(2)


def make_inputs(B, T, C, dtype, decay=10.0, key=20.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(C, generator=g) * 2 - 1) * decay / T
    u = (torch.rand(C, generator=g) * 2 - 1) * decay / T
    k = (torch.rand(B, T, C, generator=g) * 2 - 1) * key
    v = torch.randn(B, T, C, generator=g)
    gy = torch.randn(B, T, C, generator=g)
    return [x.cuda() for x in (w, u)] + [x.to("cuda", dtype) for x in (k, v, gy)]


def run(fn, w, u, k, v, gy):
    leaves = [x.clone().requires_grad_() for x in (w, u, k, v)]
    y = fn(*leaves)
    return [y.detach(), *torch.autograd.grad(y, leaves, gy.to(y.dtype))]


def check(got, want, w, v, gy, tol):
    """Errors relative to natural scales: max|v| for y; sum|g| max|v| for k, u; times T for w; sum|g| for v."""
    T = v.shape[1]
    gsum, vmax = gy.double().abs().sum(1).max().item(), v.double().abs().max().item()
    scales = {"y": vmax, "w": 2 * vmax * gsum * T, "u": 2 * vmax * gsum, "k": 2 * vmax * gsum, "v": gsum}
    for name, g, r in zip("y w u k v".split(), got, want):
        assert torch.isfinite(g).all(), name
        err = ((g.double() - r).abs().max() / scales[name]).item()
        assert err < tol, (name, err, tol)


# T = 1, partial chunks, the fused forward (T <= 1024) and the chunked one beyond, C not a multiple of 8
@pytest.mark.parametrize("shape", [(1, 1, 3), (2, 37, 5), (2, 196, 64), (1, 1024, 8), (1, 1100, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_float64_formula(bi_wkv, shape, dtype):
    w, u, k, v, gy = make_inputs(*shape, dtype)
    got = run(bi_wkv.bi_wkv, w, u, k, v, gy)
    want = [reference(w, u, k, v)]
    leaves = [x.double().requires_grad_() for x in (w, u, k, v)]
    want += torch.autograd.grad(reference(*leaves), leaves, gy.double())
    check(got, [want[0], *want[1:]], w, v, gy, 1e-4 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("decay", [120.0, -120.0, 1e3, -1e3, 1e4, -1e4])
@pytest.mark.parametrize("shape", [(2, 37, 4), (1, 100, 4), (1, 1100, 3)])
def test_extreme_values(bi_wkv, shape, decay):
    """|w| T far beyond float32's exponent range, keys at +-80: float32's resolution of the exponents
    (about |w| T * 6e-8) is the only error allowed."""
    B, T, C = shape
    g = torch.Generator().manual_seed(1)
    w = (torch.tensor([1.0, 0.3, 0.05, 1.0][:C]) * decay / T).cuda()
    u = torch.tensor([0.0, 80.0, -80.0, 5.0][:C]).cuda()
    k = (torch.where(torch.rand(B, T, C, generator=g) > 0.5, 80.0, -80.0) + torch.randn(B, T, C, generator=g)).cuda()
    v, gy = torch.randn(B, T, C, generator=g).cuda(), torch.randn(B, T, C, generator=g).cuda()
    got = run(bi_wkv.bi_wkv, w, u, k, v, gy)
    leaves = [x.double().requires_grad_() for x in (w, u, k, v)]
    ref = reference(*leaves)
    want = [ref.detach(), *torch.autograd.grad(ref, leaves, gy.double())]
    check(got, want, w, v, gy, 64 * torch.finfo(torch.float32).eps * (1 + abs(decay)))


def test_deterministic(bi_wkv):
    w, u, k, v, gy = make_inputs(3, 300, 40, torch.float32)
    first, second = run(bi_wkv.bi_wkv, w, u, k, v, gy), run(bi_wkv.bi_wkv, w, u, k, v, gy)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_inference_keeps_no_state(bi_wkv):
    w, u, k, v, _ = make_inputs(2, 100, 16, torch.float32)
    y, state = bi_wkv._ops.ops.bi_wkv_forward(w, u, k, v, False)
    assert state.numel() == 0
    y_train, state_train = bi_wkv._ops.ops.bi_wkv_forward(w, u, k, v, True)
    assert state_train.shape == (6, 2, 7, 16) and torch.equal(y, y_train)


def test_layer_matches_function(bi_wkv):
    w, u, k, v, _ = make_inputs(2, 50, 8, torch.bfloat16)
    torch.testing.assert_close(bi_wkv.layers.BiWKV()(w, u, k, v), bi_wkv.bi_wkv(w, u, k, v), rtol=0, atol=0)
