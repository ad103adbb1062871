"""Bi-WKV: the bidirectional, distance-decayed attention of Vision-RWKV.

    y_t = ( sum_{i!=t} exp(-(|t-i|-1) w + k_i) v_i + exp(u + k_t) v_t )
        / ( sum_{i!=t} exp(-(|t-i|-1) w + k_i)     + exp(u + k_t) )

The PyTorch implementation splits the sum into a causal prefix, an anti-causal suffix and the token itself.
Because the decay is a pure exponential in the distance, each directional sum is an exclusive cumulative sum
of ``exp(+-i w + k_i)`` rescaled by ``exp(-+t w)``: linear time, O(B*T*C) memory, no T x T matrix, any T.
Every exponent is shifted by its maximum over the sequence (per batch and channel). That is exact while
``range(k) + |w| * (T + 1) + |u|`` stays well inside the accumulation dtype's exponent range (checked
against 60 in float32, 600 in float64); trained models sit far inside it (``|w| * T = |spatial_decay|`` is
below 10). Outside it, terms that matter would underflow, so such inputs go through a log-space parallel
scan instead: every partial sum carries its own running maximum, the way RWKV's kernels carry theirs,
accumulated in float64. That is exact for every finite input, and a few times slower.

It is plain traceable torch code, so autograd, ``torch.compile(fullgraph=True)`` and ``torch.export`` go
through it. :func:`bi_wkv` is the single dispatch point: CUDA tensors go to the compiled kernel when one
is available (see :mod:`rwkvunet.ops.kernel_hub`), float32 CPU inference to the fused CPU kernel when it can be
built (see :mod:`rwkvunet.ops.cpu_kernel`; the same sums, where they are exact), everything else to
:func:`bi_wkv_torch`.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["bi_wkv", "bi_wkv_torch"]


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# Largest exponent spread the max-shifted sums take: exp(-60) is far above float32's smallest normal number
# (exp(-87)), exp(-600) above float64's (exp(-708)), so no term that matters can underflow.
_FAST_SPAN = {torch.float32: 60.0, torch.float64: 600.0}


def _host_reads_are_free(k: torch.Tensor) -> bool:
    """The fast-path check reads three numbers back: free on the CPU, a stall on a GPU, where (without the
    kernel) the exact scan runs instead so that forward and backward never wait for the device."""
    return k.device.type == "cpu"


def _fast_path_is_exact(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the max-shifted sums are exact for these inputs.

    At output t every part (before t, after t, t itself) is scaled by exp(-top), and the part that sets
    ``top`` is at least exp(-span) of the largest one, span = range(k) + |w| (T + 1) + |u|. Non-finite
    inputs give False. Reads three scalars back: free on the CPU, a sync on a GPU.
    """
    acc = _accumulate_dtype(torch.promote_types(k.dtype, torch.promote_types(w.dtype, u.dtype)))
    lo, hi = torch.aminmax(k.to(acc))
    span = (hi - lo) + w.to(acc).abs().amax() * (k.shape[1] + 1) + u.to(acc).abs().amax()
    return bool(span <= _FAST_SPAN[acc])


def _exclusive_cumsum(x: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """Sum of the strictly earlier (or, with ``reverse``, strictly later) tokens along dim 1.

    Built by shifting rather than subtracting the token itself, so no cancellation can occur.
    """
    if reverse:
        c = x.flip(1).cumsum(1).flip(1)
        return torch.cat([c[:, 1:], torch.zeros_like(c[:, :1])], dim=1)
    c = x.cumsum(1)
    return torch.cat([torch.zeros_like(c[:, :1]), c[:, :-1]], dim=1)


@torch.library.custom_op("rwkvunet::exclusive_cumsum", mutates_args=())
def exclusive_cumsum(x: torch.Tensor, reverse: bool) -> torch.Tensor:
    """:func:`_exclusive_cumsum` as one operator, which ONNX export writes as one CumSum (whose exclusive and
    reverse forms are attributes) instead of flips, a cumulative sum, a slice and a concatenation."""
    return _exclusive_cumsum(x, reverse)


@exclusive_cumsum.register_fake
def _(x: torch.Tensor, reverse: bool) -> torch.Tensor:
    return torch.empty_like(x)


_CUMSUM_AS_ONE_OP = False  # set while an ONNX export that translates exclusive_cumsum runs


@contextlib.contextmanager
def exclusive_cumsum_as_one_op():
    """Within: exported graphs take :func:`exclusive_cumsum` as one operator. For exporters that translate it
    (``rwkvunet.onnx_export``); other consumers of an exported program keep plain ATen operators."""
    global _CUMSUM_AS_ONE_OP
    previous, _CUMSUM_AS_ONE_OP = _CUMSUM_AS_ONE_OP, True
    try:
        yield
    finally:
        _CUMSUM_AS_ONE_OP = previous


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
    """Exact Bi-WKV in PyTorch. ``w``, ``u``: (C,); ``k``, ``v``: (B, T, C). Returns (B, T, C) in v's dtype.

    Max-shifted cumulative sums where they are provably exact, the log-space scan otherwise. A compiled
    graph always takes the cumulative sums (a data-dependent choice would break the graph).
    """
    if k.numel() == 0:
        return _empty_sequence(w, u, k, v)
    compiling = torch.compiler.is_compiling()
    if not compiling and not (_host_reads_are_free(k) and _fast_path_is_exact(w, u, k)):
        return bi_wkv_scan(w, u, k, v)
    if not (torch.is_grad_enabled() and any(x.requires_grad for x in (w, u, k, v))):
        return _bi_wkv_relative(w, u, k, v) if compiling else _bi_wkv_no_grad(w, u, k, v)
    return _bi_wkv_cumsum(w, u, k, v)


def _empty_sequence(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """No tokens: an empty output that still depends on every input, so gradients (zeros, empty) come back."""
    dtype = torch.promote_types(torch.promote_types(w.dtype, u.dtype), torch.promote_types(k.dtype, v.dtype))
    return (v.to(dtype) + (k + w + u) * 0).to(v.dtype)


def _bi_wkv_cumsum(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The differentiable max-shifted form (exact under :func:`_fast_path_is_exact`)."""
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


def _bi_wkv_relative(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The max-shifted sums for compiled and exported inference graphs, with both sides taken relative to the
    token itself.

    A causal term i weighs exp(k_i - k_t - (t - 1 - i) w - u) = g e_f(i) / e_f(t) against the token's own
    exp(u + k_t), with g = exp(w - u) and e_f the max-shifted term the cumulative sum adds anyway (the
    anti-causal side alike), so y_t = (v_t + s_f N_f + s_b N_b) / (1 + s_f D_f + s_b D_b) with s = g / e(t):
    no common scale to find and three fewer exponentials than :func:`_bi_wkv_cumsum`, the same values to
    float rounding. Under :func:`_fast_path_is_exact` every s is at most exp(60), so the denominator stays far
    inside float32, and each side enters as its share of the denominator times its sum, bounded by max |v|.
    Inference only: 1 / e(t) would give gradients far larger than the values.
    """
    out_dtype = v.dtype
    acc = _accumulate_dtype(torch.promote_types(k.dtype, v.dtype))
    w, u, k, v = w.to(acc), u.to(acc), k.to(acc), v.to(acc)
    iw = torch.arange(k.shape[1], device=k.device, dtype=acc).unsqueeze(-1) * w  # (T, C)
    x_f, x_b = k + iw, k - iw
    e_f = torch.exp(x_f - x_f.amax(dim=1, keepdim=True))
    e_b = torch.exp(x_b - x_b.amax(dim=1, keepdim=True))
    g = torch.exp(w - u)
    s_f, s_b = g / e_f, g / e_b
    cumsum = exclusive_cumsum if (_CUMSUM_AS_ONE_OP and torch.compiler.is_exporting()) else _exclusive_cumsum
    inv = 1.0 / (1.0 + s_f * cumsum(e_f, False) + s_b * cumsum(e_b, True))
    y = inv * v + (s_f * inv) * cumsum(e_f * v, False) + (s_b * inv) * cumsum(e_b * v, True)
    return y.to(out_dtype)


# --- the log-space scan: exact for every finite input ----------------------------------------------------
# A state (m, a, b) stands for the sums exp(m) * (a, b) of a run of tokens, weighted as seen from the run's
# last token. m is the largest exponent (detached: the value does not depend on it, so gradients are exact),
# so the dominant term has coefficient 1 and b >= 1 for every non-empty run: nothing overflows or vanishes.

def _combine(m1: torch.Tensor, a1: torch.Tensor, b1: torch.Tensor,
             m2: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor):
    """Sum of two states on one scale (the left one already decayed to the right one's last token)."""
    m = torch.maximum(m1, m2).detach()
    c1, c2 = torch.exp(m1 - m), torch.exp(m2 - m)
    return m, a1 * c1 + a2 * c2, b1 * c1 + b2 * c2


def _pad_to_even(m, a, b, lengths):
    """Appends an empty state (m = -inf, zero sums, no tokens) to an odd number of states."""
    if m.shape[1] % 2 == 0:
        return m, a, b, lengths
    pad = lambda x, value: torch.cat([x, torch.full_like(x[:, :1], value)], dim=1)  # noqa: E731
    return pad(m, float("-inf")), pad(a, 0.0), pad(b, 0.0), torch.cat([lengths, lengths.new_zeros(1, 1)])


def _exclusive_scan(m, a, b, w, lengths):
    """States of all tokens strictly before each of the n runs (N, n, C), seen from the token before the run.

    Work-efficient (Blelloch) recursion: neighbouring runs are paired, the pairs scanned, and each run's
    state read from its pair's. ``lengths`` (n, 1) counts tokens per run: a state decays by exp(-w) a token.
    """
    N, n, C = m.shape
    if n == 1:  # nothing before the only run; "- 0 * w" keeps w in the graph (its gradient is 0 at T = 1)
        return torch.full_like(m, float("-inf")) - 0 * w, torch.zeros_like(a), torch.zeros_like(b)
    m, a, b, lengths = _pad_to_even(m, a, b, lengths)
    left, right = lengths[0::2], lengths[1::2]
    pm, pa, pb = _combine(m[:, 0::2] - right * w, a[:, 0::2], b[:, 0::2], m[:, 1::2], a[:, 1::2], b[:, 1::2])
    em, ea, eb = _exclusive_scan(pm, pa, pb, w, left + right)
    om, oa, ob = _combine(em - left * w, ea, eb, m[:, 0::2], a[:, 0::2], b[:, 0::2])
    interleave = lambda x, y: torch.stack([x, y], dim=2).reshape(N, -1, C)[:, :n]  # noqa: E731
    return interleave(em, om), interleave(ea, oa), interleave(eb, ob)


def bi_wkv_scan(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bi-WKV by a log-space parallel scan in float64: exact for every finite input, O(B*T*C) memory.

    The anti-causal sums are the causal sums of the reversed sequence, so both directions share one scan.
    """
    out_dtype = v.dtype
    w, u, k, v = (x.to(torch.float64) for x in (w, u, k, v))
    B, T, C = k.shape
    keys, values = torch.cat([k, k.flip(1)]), torch.cat([v, v.flip(1)])
    m = keys.detach()
    one = torch.exp(keys - m)  # 1, carrying the gradient of k
    lengths = torch.ones(T, 1, dtype=torch.float64, device=k.device)
    sm, sa, sb = _exclusive_scan(m, values * one, one, w, lengths)
    mf, af, bf = sm[:B], sa[:B], sb[:B]  # tokens i < t, weights exp(k_i - (t - 1 - i) w)
    mb, ab, bb = sm[B:].flip(1), sa[B:].flip(1), sb[B:].flip(1)  # tokens i > t
    ms = u + k
    top = torch.maximum(torch.maximum(mf, mb), ms).detach()
    sf, sb_, ss = torch.exp(mf - top), torch.exp(mb - top), torch.exp(ms - top)
    y = (af * sf + ab * sb_ + v * ss) / (bf * sf + bb * sb_ + ss)
    return y.to(out_dtype)


def bi_wkv(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bi-WKV on (B, T, C) keys and values with per-channel decay ``w`` and bonus ``u``.

    The one dispatch point: CUDA tensors use the compiled kernel when it can be had, all others (and CUDA
    tensors when it cannot) the exact PyTorch implementation.
    """
    _check_inputs(w, u, k, v)
    B, T, C = k.shape
    if k.numel() == 0:  # T = 0 (or an empty batch): nothing to mix
        return _empty_sequence(w, u, k, v)
    if k.is_cuda:
        from .kernel_hub import cuda_bi_wkv

        fn = cuda_bi_wkv()
        if fn is not None:
            return fn(w, u, k, v)
    if _cpu_kernel_may_apply(w, u, k, v):
        from .cpu_kernel import bi_wkv_cpu, cpu_kernel

        if cpu_kernel() is not None and _host_reads_are_free(k) and _fast_path_is_exact(w, u, k):
            return bi_wkv_cpu(w, u, k, v)
    step = _cpu_channel_chunk(k)
    if step < C:
        # channels are independent: large inputs go through in cache-sized groups of channels
        parts = [_bi_wkv_torch_path(w[c:c + step], u[c:c + step], k[..., c:c + step].contiguous(),
                                    v[..., c:c + step].contiguous()) for c in range(0, C, step)]
        return torch.cat(parts, dim=-1)
    return _bi_wkv_torch_path(w, u, k, v)


def _check_inputs(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """ValueError naming the expected shapes and dtypes (tensor metadata only: nothing is read back)."""
    if not all(torch.is_tensor(x) for x in (w, u, k, v)):
        raise ValueError("bi_wkv expects tensors w, u of shape (C,) and k, v of shape (B, T, C); got "
                         + ", ".join(type(x).__name__ for x in (w, u, k, v)))
    if k.ndim != 3 or v.shape != k.shape:
        raise ValueError(f"bi_wkv expects k and v of one shape (B, T, C); got {tuple(k.shape)} and {tuple(v.shape)}")
    C = k.shape[-1]
    if w.shape != (C,) or u.shape != (C,):
        raise ValueError(f"bi_wkv expects w and u of shape ({C},) for k, v of shape (B, T, {C}); got "
                         f"{tuple(w.shape)} and {tuple(u.shape)}")
    bad = [f"{name}: {x.dtype}" for name, x in zip("wukv", (w, u, k, v)) if not x.is_floating_point()]
    if bad:
        raise ValueError(f"bi_wkv expects floating-point w, u (C,) and k, v (B, T, C); got {', '.join(bad)}")
    if len({x.device for x in (w, u, k, v)}) > 1:
        raise ValueError("bi_wkv expects w, u, k, v on one device; got "
                         + ", ".join(f"{n}: {x.device}" for n, x in zip("wukv", (w, u, k, v))))


def _cpu_kernel_may_apply(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Eager float32 CPU calls: what the fused CPU kernel computes (not traced or compiled)."""
    return (k.device.type == "cpu" and all(x.dtype == torch.float32 for x in (w, u, k, v))
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing())


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
