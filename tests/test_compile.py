"""torch.compile(fullgraph=True): the segmenter and the Bi-WKV op trace without graph breaks and compute what
eager mode computes.

The segmenter is captured whole by Dynamo (``backend="eager"`` runs the captured graph as is: the check is
that there is one graph, in evaluation and in a training step, and that it computes what eager mode does;
Inductor's code generation for the whole model takes minutes on a small CPU). The Bi-WKV op goes through
Inductor itself, forward and backward, against the O(T^2) float64 formula.
"""
import copy

import pytest
import torch

from bi_wkv_reference import bi_wkv_reference
from timm.utils import reparameterize_model

from rwkvunet import RWKVUNetConfig, RWKVUNetForSemanticSegmentation
from rwkvunet.ops import bi_wkv


@pytest.fixture(scope="module")
def tiny_t():
    torch.manual_seed(0)
    # no stochastic depth: the compiled and eager training steps must draw nothing at random
    config = RWKVUNetConfig(variant="t", num_labels=3, in_channels=1, drop_path_rate=0.0, ccm_drop_path_rate=0.0)
    model = RWKVUNetForSemanticSegmentation(config)
    # non-trivial norm statistics, so that folding them into the convolutions (reparameterize_model) is exercised
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_segmenter_eval_fullgraph_matches_eager(tiny_t):
    torch._dynamo.reset()
    model = tiny_t.eval()
    x = torch.randn(2, 1, 40, 56)  # padded to 48 x 64 inside, logits cropped back
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        want = model(pixel_values=x).logits
        got = compiled(pixel_values=x).logits
    assert got.shape == (2, 3, 40, 56)
    assert rel(got, want) < 1e-6


def test_reparameterized_segmenter_fullgraph_matches_eager(tiny_t):
    """The BatchNorm-folded copy that inference uses compiles without graph breaks and matches the unfolded model."""
    torch._dynamo.reset()
    model = tiny_t.eval()
    compiled = torch.compile(reparameterize_model(model), fullgraph=True, backend="eager")
    x = torch.randn(1, 1, 48, 48)
    with torch.no_grad():
        want = model(pixel_values=x).logits
        got = compiled(pixel_values=x).logits
    assert rel(got, want) < 1e-5


def test_segmenter_training_step_fullgraph_matches_eager(tiny_t, torch_cpu_path):
    """Compiled graphs run Bi-WKV's PyTorch implementation; the eager step runs it too, so that the two compare at
    float32 rounding (the CPU kernel is tested against float64 itself)."""
    torch._dynamo.reset()
    eager = copy.deepcopy(tiny_t).train()
    model = copy.deepcopy(tiny_t).train()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = torch.randn(2, 1, 32, 48)
    labels = torch.randint(0, 3, (2, 32, 48))
    want = eager(pixel_values=x, labels=labels).loss
    got = compiled(pixel_values=x, labels=labels).loss
    want.backward()
    got.backward()
    assert abs(got.item() - want.item()) < 1e-5 * abs(want.item())
    grads = dict(eager.named_parameters())
    checked = 0
    # some gradients are zero up to rounding (a norm's bias before a BatchNorm): a tensor's error is judged against
    # its largest entry, or a millionth of the largest gradient in the model if that is larger
    floor = 1e-6 * max(p.grad.abs().max().item() for p in eager.parameters() if p.grad is not None)
    for name, p in model.named_parameters():
        g_ref = grads[name].grad
        assert (p.grad is None) == (g_ref is None), name
        if g_ref is not None and g_ref.abs().max() > 0:
            err = (p.grad - g_ref).abs().max().item() / max(g_ref.abs().max().item(), floor)
            assert err < 1e-4, name
            checked += 1
    assert checked > 100  # the whole network got gradients, including the spatial-mix parameters
    # the training-mode norms updated their statistics the same way
    for (name, b), b_ref in zip(model.named_buffers(), eager.buffers()):
        if b.is_floating_point():
            assert torch.allclose(b, b_ref, rtol=1e-5, atol=1e-6), name


def test_bi_wkv_inductor_fullgraph_forward_backward_float64():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    B, T, C = 2, 37, 5
    w = ((torch.rand(C, generator=g, dtype=torch.float64) * 20 - 10) / T).requires_grad_()
    u = ((torch.rand(C, generator=g, dtype=torch.float64) * 20 - 10) / T).requires_grad_()
    k = (torch.rand(B, T, C, generator=g, dtype=torch.float64) * 40 - 20).requires_grad_()
    v = torch.randn(B, T, C, generator=g, dtype=torch.float64).requires_grad_()
    compiled = torch.compile(bi_wkv, fullgraph=True)
    y = compiled(w, u, k, v)
    ref = bi_wkv_reference(w, u, k, v)
    assert rel(y, ref) < 1e-10
    cot = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((y * cot).sum(), (w, u, k, v))
    want = torch.autograd.grad((ref * cot).sum(), (w, u, k, v))
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-9
