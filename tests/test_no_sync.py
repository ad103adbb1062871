"""The forward and backward passes never read a tensor's value on the host.

On a GPU every such read (``.item()``, ``bool(t)``, ``nonzero``, data-dependent shapes) stalls the CPU until
the GPU catches up. All of them dispatch to one of a few operators, so watching for those while the model
runs on the CPU finds them without a GPU (``training/gpu_sync_check.py`` checks the CUDA run itself).
"""
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rwkvunet import RWKVUNetConfig, RWKVUNetForSemanticSegmentation
from rwkvunet.models.rwkv_unet.modeling_rwkv_unet import segmentation_loss

_HOST_READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::unique_consecutive", "aten::_unique2",
               "aten::masked_select", "aten::equal", "aten::is_nonzero"}


class HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in _HOST_READS:
            self.seen.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_loss_backward_read_nothing_on_the_host(mode, monkeypatch):
    # on a GPU without the kernel, Bi-WKV skips its (CPU-only) fast-path check and runs the exact scan
    monkeypatch.setattr(sys.modules["rwkvunet.ops.bi_wkv"], "_host_reads_are_free", lambda k: False)
    torch.manual_seed(0)
    model = RWKVUNetForSemanticSegmentation(RWKVUNetConfig(variant="t", num_labels=4))
    model.train(mode == "train")
    x = torch.randn(2, 3, 64, 48)
    labels = torch.randint(0, 4, (2, 64, 48))
    reads = HostReads()
    with reads:
        logits = model(pixel_values=x).logits
        loss = segmentation_loss(logits, labels, model.config)
        loss.backward()
    assert reads.seen == []
    with torch.no_grad(), reads:
        model.eval()(pixel_values=x)
    assert reads.seen == []


def test_the_watch_sees_a_host_read():
    reads = HostReads()
    with reads:
        bool(torch.ones(1).sum() > 0)
    assert reads.seen == ["aten::_local_scalar_dense"]


def test_the_cpu_fast_path_check_is_the_only_host_read():
    """On the CPU the fast-path check reads its bound back (free there); nothing else in the model does."""
    model = RWKVUNetForSemanticSegmentation(RWKVUNetConfig(variant="t", num_labels=4)).eval()
    reads = HostReads()
    with torch.no_grad(), reads:
        model(pixel_values=torch.randn(1, 3, 32, 32))
    assert reads.seen and set(reads.seen) == {"aten::_local_scalar_dense"}
    assert len(reads.seen) == sum(1 for m in model.modules() if type(m).__name__ == "SpatialMix")
