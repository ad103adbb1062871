"""What bounds a benchmark figure: a few steps under ``torch.profiler``, their operators grouped by the kind of
work they do.

Matrix products and convolutions are bound by arithmetic; normalisation, elementwise operations and copies by
memory traffic (and, for small tensors, by the cost of launching an operation); the Bi-WKV scans by their
sequential dependency along the tokens. The shares say which of these a model's time goes to, the table
under them which operators.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch

__all__ = ["CATEGORIES", "categorise", "profile_steps", "format_shares", "rows_for_file"]

# (category, operator name fragments), first match wins (upsample_bilinear2d is data movement, not linear)
CATEGORIES: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("bi-wkv scan", ("wkv", "cumsum")),
    ("data movement", ("copy", "cat", "flip", "clone", "contiguous", "_to_copy", "upsample", "pad", "index",
                       "fill", "zero", "stack", "roll", "gather", "scatter")),
    ("matmul/conv", ("mm", "matmul", "linear", "conv", "addmm", "baddbmm", "_scaled_dot_product")),
    ("normalisation", ("layer_norm", "batch_norm", "group_norm")),
    ("optimizer", ("_foreach", "adam", "_fused_adam")),
)
OTHER = "elementwise and other"


def categorise(name: str) -> str:
    """Category of one profiler event name (``aten::mm`` -> ``matmul/conv``)."""
    op = name.lower()  # namespace included: a custom op such as bi_wkv::forward is told by it
    for category, fragments in CATEGORIES:
        if any(f in op for f in fragments):
            return category
    return OTHER


def profile_steps(step: Callable[[], None], steps: int, device: torch.device) -> Tuple[str, Dict[str, float]]:
    """Run ``step`` ``steps`` times under the profiler; returns the operator table (top 25 by self time) and
    each category's share of the operators' self time (CUDA kernel time on a GPU, CPU time otherwise)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    cuda = device.type == "cuda"
    if cuda:
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    time_of = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    totals: Dict[str, float] = {}
    for e in events:
        if not e.key.startswith(("aten::", "bi_wkv::")) and not (cuda and "wkv" in e.key.lower()):
            continue  # Python frames, annotations and launch calls: their operators are counted themselves
            # (bi_wkv:: ranges are the CPU kernel's own work, which no aten operator records)
        category = categorise(e.key)
        totals[category] = totals.get(category, 0.0) + time_of(e)
    total = sum(totals.values()) or 1.0
    shares = {k: round(v / total, 4) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = events.table(sort_by=sort_by, row_limit=25)
    return table, shares


def format_shares(shares: Dict[str, float]) -> str:
    return ", ".join(f"{k} {100 * v:.0f}%" for k, v in shares.items())
    ("matmul/conv", ("mm", "matmul", "linear", "conv", "addmm", "baddbmm", "_scaled_dot_product")),
    ("normalisation", ("layer_norm", "batch_norm", "group_norm")),
    ("optimizer", ("_foreach", "adam", "_fused_adam")),


def rows_for_file(title: str, shares: Dict[str, float], table: str) -> List[str]:
    return [title, "", "share of operator time: " + format_shares(shares), "", table]
