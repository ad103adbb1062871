"""Test-only reference: the Bi-WKV formula evaluated directly, O(T^2), in float64."""
import torch


def bi_wkv_reference(w, u, k, v):
    """y_t = (sum_{i!=t} e^{-(|t-i|-1)w + k_i} v_i + e^{u+k_t} v_t) / (same without v), straight from DESIGN 3.1."""
    w, u, k, v = (x.double() for x in (w, u, k, v))
    B, T, C = k.shape
    t = torch.arange(T, dtype=torch.float64)
    dist = (t[:, None] - t[None, :]).abs()  # (t, i)
    expo = -(dist - 1)[None, :, :, None] * w + k[:, None, :, :]  # (B, t, i, C)
    self_term = (u + k)[:, None, :, :].expand(B, T, T, C)
    expo = torch.where((dist == 0)[None, :, :, None], self_term, expo)
    expo = expo - expo.amax(dim=2, keepdim=True).detach()
    weight = torch.exp(expo)
    return (weight * v[:, None]).sum(2) / weight.sum(2)


def bi_wkv_reference_rows(w, u, k, v, rows):
    """The formula for a few output positions only (O(T) each), for checking very long sequences."""
    w, u, k, v = (x.double() for x in (w, u, k, v))
    T = k.shape[1]
    i = torch.arange(T, dtype=torch.float64)
    out = []
    for t in rows:
        expo = -((i - t).abs() - 1)[None, :, None] * w + k
        expo[:, t] = u + k[:, t]
        expo = expo - expo.amax(dim=1, keepdim=True)
        weight = torch.exp(expo)
        out.append((weight * v).sum(1) / weight.sum(1))
    return torch.stack(out, dim=1)


def bi_wkv_reference_mp(w, u, k, v, grad_y, digits=60):
    """The formula and its vector-Jacobian product in mpmath at ``digits`` decimal digits, for small inputs.

    Independent of torch's arithmetic and of any max-shifting: exp() of exponents like -1e4 or 700 is exact
    here. Uses the closed forms a_ti = weight_ti / D_t, dy_t/dv_i = a_ti, dy_t/dk_i = a_ti (v_i - y_t),
    dy_t/du = a_tt (v_t - y_t), dy_t/dw = sum_{i!=t} a_ti (1 - |t-i|) (v_i - y_t).
    Returns float64 tensors y, dw, du, dk, dv.
    """
    import mpmath

    mp = mpmath.mp.clone() if hasattr(mpmath.mp, "clone") else mpmath.mp
    mp.dps = digits
    w, u, k, v, g = (x.double().tolist() for x in (w, u, k, v, grad_y))
    B, T, C = len(k), len(k[0]), len(w)
    y = [[[0.0] * C for _ in range(T)] for _ in range(B)]
    dk = [[[0.0] * C for _ in range(T)] for _ in range(B)]
    dv = [[[0.0] * C for _ in range(T)] for _ in range(B)]
    dw, du = [mp.mpf(0)] * C, [mp.mpf(0)] * C
    for b in range(B):
        for c in range(C):
            wc, uc = mp.mpf(w[c]), mp.mpf(u[c])
            kk = [mp.mpf(k[b][i][c]) for i in range(T)]
            vv = [mp.mpf(v[b][i][c]) for i in range(T)]
            gk, gv = [mp.mpf(0)] * T, [mp.mpf(0)] * T
            for t in range(T):
                wt = [mp.exp(uc + kk[i]) if i == t else mp.exp(-(abs(t - i) - 1) * wc + kk[i]) for i in range(T)]
                den = mp.fsum(wt)
                a = [x / den for x in wt]
                yt = mp.fsum(ai * vi for ai, vi in zip(a, vv))
                y[b][t][c] = float(yt)
                gt = mp.mpf(g[b][t][c])
                for i in range(T):
                    gv[i] += gt * a[i]
                    gk[i] += gt * a[i] * (vv[i] - yt)
                    if i == t:
                        du[c] += gt * a[i] * (vv[i] - yt)
                    else:
                        dw[c] += gt * a[i] * (1 - abs(t - i)) * (vv[i] - yt)
            for i in range(T):
                dk[b][i][c], dv[b][i][c] = float(gk[i]), float(gv[i])
    as_t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return as_t(y), as_t([float(x) for x in dw]), as_t([float(x) for x in du]), as_t(dk), as_t(dv)
