"""Bi-WKV: the bidirectional, distance-decayed attention of Vision-RWKV.

    y_t = ( sum_{i!=t} exp(-(|t-i|-1) w + k_i) v_i + exp(u + k_t) v_t )
        / ( sum_{i!=t} exp(-(|t-i|-1) w + k_i)     + exp(u + k_t) )

The PyTorch implementation splits the sum into a causal prefix, an anti-causal suffix and the token itself.
Because the decay is a pure exponential in the distance, each directional sum is an exclusive cumulative sum
of ``exp(+-i w + k_i)`` rescaled by ``exp(-+t w)``: linear time, O(B*T*C) memory, no T x T matrix, any T.
Every exponent is shifted by its running maximum (per batch and channel), so nothing overflows while
``|w| * T + range(k)`` stays below the accumulation dtype's exponent range (about 80 in float32, 700 in
float64); trained models sit far inside it (``|w| * T = |spatial_decay|`` is below 10).

It is plain traceable torch code, so autograd, ``torch.compile(fullgraph=True)`` and ``torch.export`` go
through it. :func:`bi_wkv` is the single dispatch point: CUDA tensors go to the compiled kernel when one
is available (see :mod:`rwkvunet.ops.kernel_hub`), everything else to :func:`bi_wkv_torch`.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["bi_wkv", "bi_wkv_torch"]


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _exclusive_cumsum(x: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """Sum of the strictly earlier (or, with ``reverse``, strictly later) tokens along dim 1.

    Built by shifting rather than subtracting the token itself, so no cancellation can occur.
    """
    if reverse:
        c = x.flip(1).cumsum(1).flip(1)
        return torch.cat([c[:, 1:], torch.zeros_like(c[:, :1])], dim=1)
    c = x.cumsum(1)
    return torch.cat([torch.zeros_like(c[:, :1]), c[:, :-1]], dim=1)


def _bi_wkv_no_grad(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """:func:`bi_wkv_torch` for inference: the same stabilised sums (equal up to the order of the last three
    additions), computed in a few buffers in place.

    The anti-causal sums are the causal sums of the time-reversed sequence, so both directions go through one
    (2, B, T, C) stack, numerators and denominators through one cumulative sum, and exclusive sums are read as
    shifted views of the inclusive ones. On a CPU this takes about half the time of the autograd-friendly form.
    """
    out_dtype = v.dtype
    acc = _accumulate_dtype(torch.promote_types(k.dtype, v.dtype))
    w, u, k, v = w.to(acc), u.to(acc), k.to(acc), v.to(acc)
    B, T, C = k.shape
    iw = torch.arange(T, device=k.device, dtype=acc).unsqueeze(-1) * w  # (T, C)

    # sums[0] numerators, sums[1] denominators; [:, 0] forward in time, [:, 1] reversed
    sums = torch.empty((2, 2, B, T, C), device=k.device, dtype=acc)
    e = sums[1]
    torch.add(k, iw, out=e[0])
    torch.add(k.flip(1), iw, out=e[1])
    m = e.amax(dim=2, keepdim=True)  # (2, B, 1, C): running maxima of both directions
    e.sub_(m).exp_()
    torch.mul(e[0], v, out=sums[0, 0])
    torch.mul(e[1], v.flip(1), out=sums[0, 1])
    sums.cumsum_(3)  # inclusive; the exclusive sum at t is the inclusive one at t - 1
    backward = sums[:, 1].flip(2)  # suffix sums over i >= t, back in forward time

    # log-scales of the two directions and of the token itself, then one common maximum per output
    log_f = (m[0] + w) - iw  # m_f - (t - 1) w
    log_b = (m[1] - (T - 2) * w) + iw  # m_b + (t + 1) w, with m_b = m[1] - (T - 1) w
    log_s = u + k
    top = torch.maximum(log_f, log_b)
    torch.maximum(top, log_s, out=top)
    s_f, s_b, s_s = log_f.sub_(top).exp_(), log_b.sub_(top).exp_(), log_s.sub_(top).exp_()

    out = torch.empty((2, B, T, C), device=k.device, dtype=acc)  # numerator, denominator
    torch.mul(s_s, v, out=out[0])
    out[1].copy_(s_s)
    out[:, :, 1:].addcmul_(s_f[:, 1:], sums[:, 0, :, :-1])  # tokens before t
    out[:, :, :-1].addcmul_(s_b[:, :-1], backward[:, :, 1:])  # tokens after t
    return torch.div(out[0], out[1]).to(out_dtype)


def bi_wkv_torch(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact Bi-WKV in PyTorch. ``w``, ``u``: (C,); ``k``, ``v``: (B, T, C). Returns (B, T, C) in v's dtype."""
    if not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and any(x.requires_grad for x in (w, u, k, v))):
        return _bi_wkv_no_grad(w, u, k, v)
    out_dtype = v.dtype
    acc = _accumulate_dtype(torch.promote_types(k.dtype, v.dtype))
    w, u, k, v = w.to(acc), u.to(acc), k.to(acc), v.to(acc)
    T = k.shape[1]
    pos = torch.arange(T, device=k.device, dtype=acc).unsqueeze(-1)  # (T, 1)
    iw = pos * w  # (T, C)

    # causal part: sum_{i<t} exp(-(t-1-i) w + k_i) v_i = exp(m_f - (t-1) w) * sum_{i<t} exp(i w + k_i - m_f) v_i
    x_f = k + iw
    m_f = x_f.amax(dim=1, keepdim=True).detach()
    e_f = torch.exp(x_f - m_f)
    num_f = _exclusive_cumsum(e_f * v)
    den_f = _exclusive_cumsum(e_f)
    log_f = m_f - (iw - w)  # m_f - (t-1) w

    # anti-causal part: sum_{i>t} exp(-(i-t-1) w + k_i) v_i = exp(m_b + (t+1) w) * sum_{i>t} exp(-i w + k_i - m_b) v_i
    x_b = k - iw
    m_b = x_b.amax(dim=1, keepdim=True).detach()
    e_b = torch.exp(x_b - m_b)
    num_b = _exclusive_cumsum(e_b * v, reverse=True)
    den_b = _exclusive_cumsum(e_b, reverse=True)
    log_b = m_b + (iw + w)  # m_b + (t+1) w

    # the token itself, then one common scale per output so the three parts combine without overflow
    log_s = u + k
    top = torch.maximum(torch.maximum(log_f, log_b), log_s).detach()
    s_f, s_b, s_s = torch.exp(log_f - top), torch.exp(log_b - top), torch.exp(log_s - top)
    num = s_f * num_f + s_b * num_b + s_s * v
    den = s_f * den_f + s_b * den_b + s_s
    return (num / den).to(out_dtype)


def bi_wkv(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bi-WKV on (B, T, C) keys and values with per-channel decay ``w`` and bonus ``u``.

    The one dispatch point: CUDA tensors use the compiled kernel when it can be had, all others (and CUDA
    tensors when it cannot) the exact PyTorch implementation.
    """
    if k.ndim != 3 or v.shape != k.shape:
        raise ValueError(f"bi_wkv expects k and v of one shape (B, T, C); got {tuple(k.shape)} and {tuple(v.shape)}")
    C = k.shape[-1]
    if w.shape != (C,) or u.shape != (C,):
        raise ValueError(f"bi_wkv expects w and u of shape ({C},); got {tuple(w.shape)} and {tuple(u.shape)}")
    if k.is_cuda:
        from .kernel_hub import cuda_bi_wkv

        fn = cuda_bi_wkv()
        if fn is not None:
            return fn(w, u, k, v)
    step = _cpu_channel_chunk(k)
    if step < C:
        # channels are independent: large inputs go through in cache-sized groups of channels
        parts = [_bi_wkv_torch_path(w[c:c + step], u[c:c + step], k[..., c:c + step].contiguous(),
                                    v[..., c:c + step].contiguous()) for c in range(0, C, step)]
        return torch.cat(parts, dim=-1)
    return _bi_wkv_torch_path(w, u, k, v)


_CHUNK_ELEMENTS = 1 << 20  # about 4 MiB of float32 per (B, T, channels) tensor: the scans stay in cache


def _cpu_channel_chunk(k: torch.Tensor) -> int:
    """Channels per group for eager CPU calls (all of them when the input is small, compiled or on a GPU)."""
    B, T, C = k.shape
    if k.device.type != "cpu" or torch.compiler.is_compiling() or B * T * C <= _CHUNK_ELEMENTS:
        return C
    return max(8, _CHUNK_ELEMENTS // (B * T))


def _bi_wkv_torch_path(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and any(x.requires_grad for x in (w, u, k, v)):
        # autograd would keep some twenty (B, T, C) intermediates of the scans for the backward pass; keep only
        # the inputs and recompute them there instead (same values: the recomputation is deterministic)
        return checkpoint(bi_wkv_torch, w, u, k, v, use_reentrant=False, preserve_rng_state=False)
    return bi_wkv_torch(w, u, k, v)
