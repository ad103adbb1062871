"""Numerical ops: Bi-WKV (PyTorch implementation and the dispatch point for the CUDA kernel)."""
from .bi_wkv import bi_wkv, bi_wkv_torch

__all__ = ["bi_wkv", "bi_wkv_torch"]
