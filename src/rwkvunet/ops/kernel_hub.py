"""Where the compiled CUDA Bi-WKV kernel is looked up (filled in by the kernel integration)."""
from __future__ import annotations


def cuda_bi_wkv():
    """The kernel's Bi-WKV function for CUDA tensors, or None to use the PyTorch op."""
    return None
