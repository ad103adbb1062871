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
