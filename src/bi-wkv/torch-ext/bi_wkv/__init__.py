"""Bi-WKV, the bidirectional distance-decayed attention of Vision-RWKV, as CUDA kernels.

``bi_wkv(w, u, k, v)`` takes per-channel ``w``, ``u`` of shape (C,) and ``k``, ``v`` of shape (B, T, C)
(float32, float16 or bfloat16; any B, T, C) and returns y of shape (B, T, C) in v's dtype:

    y_t = ( sum_{i!=t} exp(-(|t-i|-1) w + k_i) v_i + exp(u + k_t) v_t )
        / ( sum_{i!=t} exp(-(|t-i|-1) w + k_i)     + exp(u + k_t) )

It is differentiable in all four inputs (deterministic gradients), runs on the current CUDA stream and has
fake implementations, so ``torch.compile(fullgraph=True)`` and ``torch.export`` trace through it.
"""
from __future__ import annotations

import torch

from ._ops import add_op_namespace_prefix, ops

__all__ = ["CHUNK", "bi_wkv", "layers"]

CHUNK = 16
"""Tokens per chunk of the parallel scan; fixes the shape of the state kept for the backward pass."""


def _num_chunks(T: int) -> int:
    return (T + CHUNK - 1) // CHUNK


@torch.library.register_fake(add_op_namespace_prefix("bi_wkv_forward"))
def _forward_fake(w, u, k, v, need_state):
    B, T, C = k.shape
    shape = (6, B, _num_chunks(T), C) if need_state else (0,)
    return torch.empty_like(k), k.new_empty(shape, dtype=torch.float32)


@torch.library.register_fake(add_op_namespace_prefix("bi_wkv_backward"))
def _backward_fake(w, u, k, v, state, grad_y):
    return torch.empty_like(w), torch.empty_like(u), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    w, u, k, v, _ = inputs
    _, state = output
    ctx.mark_non_differentiable(state)  # scratch for the backward pass, not a function of the inputs
    ctx.save_for_backward(w, u, k, v, state)


def _backward(ctx, grad_y, grad_state):
    w, u, k, v, state = ctx.saved_tensors
    if state.numel() == 0 and k.numel() != 0:
        raise RuntimeError("bi_wkv: the forward pass ran with need_state=False, so it kept no state for backward")
    if grad_y is None:
        grad_y = torch.zeros_like(k)
    return (*ops.bi_wkv_backward(w, u, k, v, state, grad_y.to(k.dtype).contiguous()), None)


torch.library.register_autograd(
    add_op_namespace_prefix("bi_wkv_forward"), _backward, setup_context=_setup_context
)


def bi_wkv(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bi-WKV of ``k``, ``v`` (B, T, C) with decay ``w`` and bonus ``u`` (C,); y in v's dtype.

    ``w`` and ``u`` are used in float32, ``k`` and ``v`` in their common dtype (all accumulation is float32).
    """
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"bi_wkv expects k and v of one shape (B, T, C); got {tuple(k.shape)} and {tuple(v.shape)}")
    dtype = torch.promote_types(k.dtype, v.dtype)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"bi_wkv supports float32, float16 and bfloat16 keys and values; got {k.dtype} and {v.dtype}")
    # the chunk states are only kept (and written) when autograd will run the backward pass
    need_state = torch.is_grad_enabled() and any(t.requires_grad for t in (w, u, k, v))
    y, _ = ops.bi_wkv_forward(
        w.float().contiguous(), u.float().contiguous(), k.to(dtype).contiguous(), v.to(dtype).contiguous(),
        need_state,
    )
    return y.to(v.dtype)


from . import layers  # noqa: E402  (layers uses bi_wkv)
