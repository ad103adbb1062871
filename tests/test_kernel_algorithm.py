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


def _causal_pass(lam, x, z, w, n, ref, inc):
    """Exclusive causal states (a_t, b_t, log-scale l_t) of one chunk, left to right."""
    r = torch.maximum(inc[0] - w, ref)
    c_in, c_loc = torch.exp(inc[0] - w - r), torch.exp(ref - r)
    acc_a, acc_b, out = 0.0, 0.0, []
    for i in range(n):
        out.append((inc[1] * c_in + acc_a * c_loc, inc[2] * c_in + acc_b * c_loc, r - (i - 1) * w))
        e = torch.exp(lam[i] + i * w - ref)
        acc_a, acc_b = acc_a + e * x[i], acc_b + e * z[i]
    return out


def _anticausal_pass(lam, x, z, w, n, ref, inc):
    """Exclusive anti-causal states of one chunk, right to left."""
    r = torch.maximum(inc[0] - w, ref)
    c_in, c_loc = torch.exp(inc[0] - w - r), torch.exp(ref - r)
    acc_a, acc_b, out = 0.0, 0.0, [None] * n
    for i in reversed(range(n)):
        out[i] = (inc[1] * c_in + acc_a * c_loc, inc[2] * c_in + acc_b * c_loc, r - (n - i - 2) * w)
        e = torch.exp(lam[i] + (n - 1 - i) * w - ref)
        acc_a, acc_b = acc_a + e * x[i], acc_b + e * z[i]
    return out


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
    mf, mb = _refs(kc, w, n)
    G = _anticausal_pass(kc, vc, one, w, n, mb, inc_b)
    F = _causal_pass(kc, vc, one, w, n, mf, inc_f)
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

    # backward kernel `grad_summarize`: lambda = -log D, values g and h = -g y; chunk references kept
    bsums, brefs = [], []
    for j, (t0, t1) in enumerate(chunks):
        n = t1 - t0
        kc, vc, gc = col(k, t0, n), col(v, t0, n), col(gy, t0, n)
        _, _, yc, logd = _forward_token_states(w, u, kc, vc, n, fin[j], bin_[j])
        lam, hc = [-d for d in logd], [-g * yy for g, yy in zip(gc, yc)]
        bsums.append(_summaries(lam, gc, hc, w, n))
        brefs.append(_refs(lam, w, n))
    pin, qin = _scan([s[0] for s in bsums], [s[1] for s in bsums], lengths, w)

    # backward kernel `grad_output`: dk, dv per token; dw, du partials per (b, chunk, c). As in the CUDA
    # source, the anti-causal sums of p and q (step 3) are fixed by their incoming state and reference, so
    # their weights and the dw term that pairs them with the causal forward sums are accumulated in step 2.
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dw_part, du_part = torch.zeros_like(k[:, 0]), torch.zeros_like(k[:, 0])
    for j, (t0, t1) in enumerate(chunks):
        n = t1 - t0
        kc, vc, gc = col(k, t0, n), col(v, t0, n), col(gy, t0, n)
        F, G, yc, logd = _forward_token_states(w, u, kc, vc, n, fin[j], bin_[j])
        lam, hc = [-d for d in logd], [-g * yy for g, yy in zip(gc, yc)]
        P = _causal_pass(lam, gc, hc, w, n, brefs[j][0], pin[j])  # sums over t < j of p_t, q_t
        q_in, q_ref = qin[j], brefs[j][1]
        r_q = torch.maximum(q_in[0] - w, q_ref)
        c_in, c_loc = torch.exp(q_in[0] - w - r_q), torch.exp(q_ref - r_q)
        dv_p, dk_p, wg, wh, e2 = [], [], [], [], []
        dw_gp = dw_fq = sum_fa = sum_fb = 0.0
        for i in range(n):
            e0 = torch.exp(u + kc[i] - logd[i])
            e1 = torch.exp(kc[i] + P[i][2])
            dv_p.append(e0 * gc[i] + e1 * P[i][0])
            dk_p.append(e0 * hc[i] + e1 * P[i][1])
            du_part = du_part + e0 * (gc[i] * vc[i] + hc[i])
            dw_gp = dw_gp + G[i][0] * P[i][0] + G[i][1] * P[i][1]
            eq = torch.exp(lam[i] + (n - 1 - i) * w - q_ref)
            wg.append(eq * gc[i])
            wh.append(eq * hc[i])
            e2.append(torch.exp(kc[i] + r_q - (n - i - 2) * w))
            dw_fq = dw_fq + wg[i] * sum_fa + wh[i] * sum_fb
            sum_fa, sum_fb = sum_fa + F[i][0], sum_fb + F[i][1]
        r_f, r_b, r_p = F[0][2] - w, G[0][2] + (n - 2) * w, P[0][2] - w  # the walks' scales at i = 0
        shift = -(n - 3) * w
        dw_part = dw_part + dw_gp * torch.exp(r_b + r_p + shift)
        dw_part = dw_part + (c_in * (q_in[1] * sum_fa + q_in[2] * sum_fb) + c_loc * dw_fq) * torch.exp(r_f + r_q + shift)
        acc_a = acc_b = 0.0
        for i in reversed(range(n)):
            dvi = dv_p[i] + e2[i] * (q_in[1] * c_in + acc_a * c_loc)
            dk[:, t0 + i] = vc[i] * dvi + dk_p[i] + e2[i] * (q_in[2] * c_in + acc_b * c_loc)
            dv[:, t0 + i] = dvi
            acc_a, acc_b = acc_a + wg[i], acc_b + wh[i]
    dw = -torch.exp(-w) * dw_part.sum(0)
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
