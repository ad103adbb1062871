# /// script
# requires-python = ">=3.10"
# dependencies = ["kernels", "torch"]
# ///
"""Bi-WKV with the kernel built in this folder (``kernel-builder build``), checked against its formula."""
from pathlib import Path

import kernels
import torch

kernel = kernels.get_local_kernel(Path(__file__).resolve().parent)  # the folder holding build/
device = "cuda"

B, T, C = 2, 196, 64
w = torch.randn(C, device=device) / T  # per-channel decay
u = torch.randn(C, device=device) / T  # per-channel bonus of the own token
k = torch.randn(B, T, C, device=device, dtype=torch.bfloat16)
v = torch.randn_like(k)
y = kernel.bi_wkv(w, u, k, v)  # (B, T, C), bfloat16
print(f"y: {tuple(y.shape)} {y.dtype}")

# the formula in float64: y_t = sum_i softmax_i(l_ti) v_i, l_ti = -(|t-i|-1) w + k_i, and u + k_t for i = t
t = torch.arange(T, device=device)
dist = (t[:, None] - t[None, :]).abs().double()
logits = -(dist - 1)[:, :, None] * w.double() + k.double()[:, None]
eye = torch.eye(T, dtype=torch.bool, device=device)[None, :, :, None]
logits = torch.where(eye, (u.double() + k.double())[:, :, None].expand_as(logits), logits)
expected = (torch.softmax(logits, dim=2) * v.double()[:, None]).sum(2)
torch.testing.assert_close(y.double(), expected, rtol=2e-2, atol=2e-2)

# the same op as a layer, as kernels.kernelize puts it in place of a model's BiWKV module
layer = kernel.layers.BiWKV()
torch.testing.assert_close(layer(w, u, k, v), y)
print("Success!")
