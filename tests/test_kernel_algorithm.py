"""The chunked algorithm of the CUDA Bi-WKV kernel, emulated in float64 PyTorch.

``src/bi-wkv/bi_wkv_cuda/bi_wkv.cu`` cannot run without a GPU, so its algorithm is written out here step
for step (one loop iteration = one CUDA thread's work, vectorised over batch and channel) and checked
against the exact formula and autograd through :func:`rwkvunet.ops.bi_wkv.bi_wkv_torch`. The names follow
the CUDA source: per chunk of ``CHUNK`` tokens a local pass gives summaries, a scan over chunks gives each
chunk its incoming states, and a second local pass gives outputs. The backward pass is the same machinery
run on ``lambda_t = -log D_t`` with values ``g_t`` and ``h_t = -g_t y_t``; ``dw`` uses the gap identity
``sum_{i<m<t} = sum_m (prefix of i) x (suffix of t)``.
"""
from __future__ import annotations

import pytest
import torch

from rwkvunet.ops.bi_wkv import bi_wkv_torch

NEG = -1e30  # "empty state" scale, finite so that NEG - NEG == 0 and exp(NEG - x) == 0


def _reference(w, u, k, v):
    """Direct O(T^2) evaluation of the formula in float64."""
    T = k.shape[1]
    t = torch.arange(T, dtype=torch.float64)
    dist = (t[:, None] - t[None, :]).abs()  # (t, i)
    logw = -(dist[None, :, :, None] - 1) * w + k[:, None, :, :]  # (B, t, i, C)
    eye = torch.eye(T, dtype=torch.bool)[None, :, :, None]
    logw = torch.where(eye, (u + k)[:, None, :, :].expand_as(logw), logw)
    m = logw.amax(dim=2, keepdim=True)
    e = torch.exp(logw - m)
    return (e * v[:, None]).sum(2) / e.sum(2)


def _chunks(T, L):
    return [(t0, min(t0 + L, T)) for t0 in range(0, T, L)]


def _refs(lam, w, n):
    """Chunk maxima of the causal (lam_i + i w) and anti-causal (lam_i + (n-1-i) w) log-weights."""
    mf = torch.stack([lam[i] + i * w for i in range(n)]).amax(0)
    mb = torch.stack([lam[i] + (n - 1 - i) * w for i in range(n)]).amax(0)
    return mf, mb


def _summaries(lam, x, z, w, n):
    mf, mb = _refs(lam, w, n)
    ef = [torch.exp(lam[i] + i * w - mf) for i in range(n)]
    eb = [torch.exp(lam[i] + (n - 1 - i) * w - mb) for i in range(n)]
    sf = (mf - (n - 1) * w, sum(e * a for e, a in zip(ef, x)), sum(e * a for e, a in zip(ef, z)))
    sb = (mb - (n - 1) * w, sum(e * a for e, a in zip(eb, x)), sum(e * a for e, a in zip(eb, z)))
    return sf, sb


def _combine(s1, s2):
    m = torch.maximum(s1[0], s2[0])
    c1, c2 = torch.exp(s1[0] - m), torch.exp(s2[0] - m)
    return m, s1[1] * c1 + s2[1] * c2, s1[2] * c1 + s2[2] * c2


def _scan(sum_f, sum_b, lengths, w):
    """Kernel ``scan``: incoming causal and anti-causal states of every chunk."""
    empty = (torch.full_like(w, NEG).expand_as(sum_f[0][1]), torch.zeros_like(sum_f[0][1]), torch.zeros_like(sum_f[0][1]))
    nc = len(lengths)
    in_f, in_b = [None] * nc, [None] * nc
    st = empty
    for j in range(nc):
        in_f[j] = st
        st = _combine((st[0] - lengths[j] * w, st[1], st[2]), sum_f[j])
    st = empty
    for j in reversed(range(nc)):
        in_b[j] = st
        st = _combine((st[0] - lengths[j] * w, st[1], st[2]), sum_b[j])
    return in_f, in_b


def _walk(lam, x, z, w, order, inc):
    """Exclusive states (a_t, b_t, log-scale m_t) of one chunk, visiting tokens in ``order``: before each
    token the sums seen from its neighbour; stepping past a token decays them by exp(-w) and adds it on the
    running maximum (kernel ``Walk``)."""
    m, a, b = inc
    out = [None] * len(order)
    for i in order:
        out[i] = (a, b, m)
        moved = m - w
        top = torch.maximum(moved, lam[i])
        c_old, c_new = torch.exp(moved - top), torch.exp(lam[i] - top)
        a, b, m = a * c_old + x[i] * c_new, b * c_old + z[i] * c_new, top
    return out


def _causal_pass(lam, x, z, w, n, inc):
    return _walk(lam, x, z, w, range(n), inc)


def _anticausal_pass(lam, x, z, w, n, inc):
    return _walk(lam, x, z, w, range(n - 1, -1, -1), inc)


def _mix(F, G, u, k, v):
    """Output and log-denominator of one token from its causal, anti-causal and own parts."""
    lf = torch.where(F[1] > 0, F[2], torch.full_like(F[2], NEG))
    lb = torch.where(G[1] > 0, G[2], torch.full_like(G[2], NEG))
    ls = u + k
    top = torch.maximum(torch.maximum(lf, lb), ls)
    sf, sb, ss = torch.exp(lf - top), torch.exp(lb - top), torch.exp(ls - top)
    num = F[0] * sf + G[0] * sb + v * ss
    den = F[1] * sf + G[1] * sb + ss
    return num / den, top + torch.log(den)


def _forward_token_states(w, u, kc, vc, n, inc_f, inc_b):
    one = [torch.ones_like(a) for a in kc]
    G = _anticausal_pass(kc, vc, one, w, n, inc_b)
    F = _causal_pass(kc, vc, one, w, n, inc_f)
    mixed = [_mix(F[i], G[i], u, kc[i], vc[i]) for i in range(n)]
    return F, G, [m[0] for m in mixed], [m[1] for m in mixed]


def emulate(w, u, k, v, gy, L):
    """Forward (y) and backward (dw, du, dk, dv) exactly as the CUDA kernels compute them."""
    B, T, C = k.shape
    chunks = _chunks(T, L)
    lengths = [t1 - t0 for t0, t1 in chunks]
    col = lambda x, t0, n: [x[:, t0 + i] for i in range(n)]  # noqa: E731

    # forward: kernel `summarize`, kernel `scan`, kernel `output`
    sums = [_summaries(col(k, t0, t1 - t0), col(v, t0, t1 - t0), [torch.ones_like(k[:, 0])] * (t1 - t0), w, t1 - t0)
            for t0, t1 in chunks]
    fin, bin_ = _scan([s[0] for s in sums], [s[1] for s in sums], lengths, w)
    y = torch.empty_like(v)
    for j, (t0, t1) in enumerate(chunks):
        _, _, yc, _ = _forward_token_states(w, u, col(k, t0, t1 - t0), col(v, t0, t1 - t0), t1 - t0, fin[j], bin_[j])
        for i, yi in enumerate(yc):
            y[:, t0 + i] = yi

    # backward kernel `grad_summarize`: lambda = -log D, values g and h = -g y
    bsums = []
    for j, (t0, t1) in enumerate(chunks):
        n = t1 - t0
        kc, vc, gc = col(k, t0, n), col(v, t0, n), col(gy, t0, n)
        _, _, yc, logd = _forward_token_states(w, u, kc, vc, n, fin[j], bin_[j])
        lam, hc = [-d for d in logd], [-g * yy for g, yy in zip(gc, yc)]
        bsums.append(_summaries(lam, gc, hc, w, n))
    pin, qin = _scan([s[0] for s in bsums], [s[1] for s in bsums], lengths, w)

    # backward kernel `grad_output`: dk, dv per token; dw, du partials per (b, chunk, c). Every dw term
    # carries its own scale with exp(-w) folded in (it is the weight of one pair of tokens, at most 1).
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dw_part, du_part = torch.zeros_like(k[:, 0]), torch.zeros_like(k[:, 0])
    for j, (t0, t1) in enumerate(chunks):
        n = t1 - t0
        kc, vc, gc = col(k, t0, n), col(v, t0, n), col(gy, t0, n)
        F, G, yc, logd = _forward_token_states(w, u, kc, vc, n, fin[j], bin_[j])
        lam, hc = [-d for d in logd], [-g * yy for g, yy in zip(gc, yc)]
        P = _causal_pass(lam, gc, hc, w, n, pin[j])  # sums over t < i of p_t, q_t
        Q = _anticausal_pass(lam, gc, hc, w, n, qin[j])  # sums over t > i
        for i in range(n):
            e0 = torch.exp(u + kc[i] - logd[i])
            e1, e2 = torch.exp(kc[i] + P[i][2]), torch.exp(kc[i] + Q[i][2])
            dvi = e0 * gc[i] + e1 * P[i][0] + e2 * Q[i][0]
            dv[:, t0 + i] = dvi
            dk[:, t0 + i] = vc[i] * dvi + e0 * hc[i] + e1 * P[i][1] + e2 * Q[i][1]
            du_part = du_part + e0 * (gc[i] * vc[i] + hc[i])
            dw_part = dw_part - (G[i][0] * P[i][0] + G[i][1] * P[i][1]) * torch.exp(G[i][2] + P[i][2] - w)
            dw_part = dw_part - (F[i][0] * Q[i][0] + F[i][1] * Q[i][1]) * torch.exp(F[i][2] + Q[i][2] - w)
    dw = dw_part.sum(0)
    du = du_part.sum(0)
    return y, dw, du, dk, dv


def _inputs(B, T, C, decay_scale=10.0, k_scale=20.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(B * 1000 + T * 10 + C)
    w = (torch.rand(C, generator=g, dtype=dtype) * 2 - 1) * decay_scale / T
    u = (torch.rand(C, generator=g, dtype=dtype) * 2 - 1) * decay_scale / T
    k = (torch.rand(B, T, C, generator=g, dtype=dtype) * 2 - 1) * k_scale
    v = torch.randn(B, T, C, generator=g, dtype=dtype)
    gy = torch.randn(B, T, C, generator=g, dtype=dtype)
    return w, u, k, v, gy


@pytest.mark.parametrize("B,T,C,L", [(2, 37, 3, 8), (1, 16, 2, 16), (2, 5, 3, 16), (1, 50, 4, 4), (1, 1, 2, 16)])
def test_chunked_algorithm_matches_formula_and_autograd(B, T, C, L):
    w, u, k, v, gy = _inputs(B, T, C)
    y, dw, du, dk, dv = emulate(w, u, k, v, gy, L)
    torch.testing.assert_close(y, _reference(w, u, k, v), rtol=1e-10, atol=1e-10)

    leaves = [t.clone().requires_grad_() for t in (w, u, k, v)]
    ref = bi_wkv_torch(*leaves)
    grads = torch.autograd.grad(ref, leaves, gy)
    for name, got, want in zip("w u k v".split(), (dw, du, dk, dv), grads):
        scale = want.abs().max().clamp_min(1e-30)
        assert ((got - want).abs().max() / scale) < 1e-9, name


def test_chunked_algorithm_in_float32_meets_the_kernel_tolerance():
    """At the edge of the supported range (|spatial_decay|, |spatial_first| = 10, k in [-20, 20]) the
    algorithm run in float32, as the kernel accumulates, stays within 1e-4 of the float64 result,
    relative to each output's largest magnitude (near-zero entries have no meaningful relative error)."""
    T = 200
    w, u, k, v, gy = _inputs(2, T, 4)
    w = torch.tensor([10.0, -10.0, 0.0, 3.0], dtype=torch.float64) / T
    u = torch.tensor([10.0, -10.0, 0.0, -3.0], dtype=torch.float64) / T
    got = emulate(*(t.float() for t in (w, u, k, v, gy)), 16)
    leaves = [t.clone().requires_grad_() for t in (w, u, k, v)]
    ref = bi_wkv_torch(*leaves)
    want = (ref, *torch.autograd.grad(ref, leaves, gy))
    for name, g, r in zip("y w u k v".split(), got, want):
        assert torch.isfinite(g).all(), name
        assert ((g.double() - r).abs().max() / r.abs().max()) < 1e-4, name


@pytest.mark.parametrize("decay", [120.0, -120.0, 1e4, -1e4])
@pytest.mark.parametrize("k_scale,u_value,dtype", [(700.0, 700.0, torch.float64), (80.0, -80.0, torch.float32)])
def test_chunked_algorithm_is_exact_at_extreme_values(decay, k_scale, u_value, dtype):
    """|w| * T up to 1e4, keys at +-700 (float64) or +-80 (float32), bonus at the same size: the algorithm
    in float64 matches the formula to 1e-12 of each quantity's natural scale; in float32 (as the kernel
    runs) to 64 * eps32 * (1 + |w| T), the resolution of float32 exponents that large."""
    B, T, C, L = 2, 45, 3, 8
    g = torch.Generator().manual_seed(int(abs(decay)) + int(k_scale))
    w = torch.tensor([1.0, 0.3, 0.02], dtype=torch.float64) * decay / T
    u = torch.tensor([u_value, 0.0, -u_value / 2], dtype=torch.float64)
    k = torch.where(torch.rand(B, T, C, generator=g) > 0.5, k_scale, -k_scale).double()
    k = k + torch.randn(B, T, C, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    gy = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    x = [t.to(dtype) for t in (w, u, k, v, gy)]
    got = emulate(*x, L)
    leaves = [t.double().requires_grad_() for t in x[:4]]
    ref = bi_wkv_torch(*leaves)
    want = (ref, *torch.autograd.grad(ref, leaves, x[4].double()))
    gsum, vmax = x[4].abs().double().sum(1).max().item(), x[3].abs().max().item()
    scales = {"y": vmax, "w": 2 * vmax * gsum * T, "u": 2 * vmax * gsum, "k": 2 * vmax * gsum, "v": gsum}
    tol = 1e-12 if dtype == torch.float64 else 64 * torch.finfo(torch.float32).eps * (1 + abs(decay))
    for name, a, b in zip("y w u k v".split(), got, want):
        assert torch.isfinite(a).all(), name
        err = ((a.double() - b).abs().max() / scales[name]).item()
        assert err < tol, (name, err, tol)
