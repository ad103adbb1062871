"""Building blocks against plain references: BatchNorm folding (reparameterize), the token shift, and the CPU
allocator setting."""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rwkvunet.layers import ConvNormAct, IRBlock, q_shift


def _randomise_bn(module: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))


def _unfused(block: ConvNormAct, x: torch.Tensor, pre_norm=None) -> torch.Tensor:
    """conv -> BN -> act as three float64 modules, nothing folded."""
    x = x.double()
    if pre_norm is not None:
        x = F.batch_norm(x, pre_norm.running_mean.double(), pre_norm.running_var.double(),
                         pre_norm.weight.double(), pre_norm.bias.double(), False, 0.0, pre_norm.eps)
    c, n = block.conv, block.norm
    y = F.conv2d(x, c.weight.double(), None, c.stride, c.padding, c.dilation, c.groups)
    y = F.batch_norm(y, n.running_mean.double(), n.running_var.double(), n.weight.double(), n.bias.double(),
                     False, 0.0, n.eps)
    return block.act(y)


@pytest.mark.parametrize("kernel_size,groups,with_pre_norm", [(1, 1, True), (5, 8, False), (1, 1, False)])
def test_folded_conv_matches_unfused_float64(kernel_size, groups, with_pre_norm):
    torch.manual_seed(0)
    block = ConvNormAct(8, 8, kernel_size, groups=groups)
    pre = nn.BatchNorm2d(8, eps=1e-6) if with_pre_norm else None
    _randomise_bn(block)
    if pre is not None:
        _randomise_bn(pre, seed=1)
        pre.eval()
    block.eval()
    x = torch.randn(2, 8, 12, 10)
    ref = _unfused(block, x, pre)
    with torch.no_grad():
        unfused = block(pre(x) if pre is not None else x)
    folded = copy.deepcopy(block)
    folded.reparameterize(pre_norm=pre)
    assert isinstance(folded.norm, nn.Identity) and folded.conv.bias is not None
    with torch.no_grad():
        got = folded(x)
    # float32 conv of O(1) values over at most 25 * 8 terms: a few ulps of the output scale
    for out in (got, unfused):
        assert (out.double() - ref).abs().max().item() <= 2e-5 * ref.abs().max().item()


def test_reparameterize_is_idempotent_and_keeps_dtype_and_layout():
    block = ConvNormAct(6, 6, 5, groups=6).double().to(memory_format=torch.channels_last)
    _randomise_bn(block)
    block.eval().reparameterize()
    weight = block.conv.weight.detach().clone()
    block.reparameterize()  # already folded: nothing left to do
    assert torch.equal(block.conv.weight, weight)
    assert block.conv.weight.dtype == torch.float64
    assert block.conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_pre_norm_is_refused_where_it_cannot_fold():
    block = ConvNormAct(4, 4, 3)
    with pytest.raises(ValueError, match="1x1 conv"):
        block.reparameterize(pre_norm=nn.BatchNorm2d(4))


def test_forward_keeps_no_state():
    """A forward pass leaves the module's __dict__ as it was: no per-call caches, nothing to pickle away."""
    block = ConvNormAct(4, 4, 1).eval()
    before = set(block.__dict__)
    with torch.no_grad():
        block(torch.randn(1, 4, 3, 3))
    assert set(block.__dict__) == before
    assert "__getstate__" not in type(block).__dict__


def test_eval_mode_forward_trains_the_conv_and_norm():
    """The unfolded eval-mode forward is conv -> BatchNorm: eval-mode fine-tuning reaches both."""
    torch.manual_seed(0)
    block = ConvNormAct(4, 4, 3)
    _randomise_bn(block)
    block.eval()
    x = torch.randn(1, 4, 6, 6)
    block(x).square().sum().backward()
    assert block.conv.weight.grad is not None and block.conv.weight.grad.abs().sum() > 0
    assert block.norm.weight.grad is not None and block.norm.weight.grad.abs().sum() > 0


def _q_shift_reference(x: torch.Tensor, grid) -> torch.Tensor:
    """The quad-directional shift written pixel by pixel."""
    B, T, C = x.shape
    H, W = grid
    m = x.reshape(B, H, W, C)
    out = torch.zeros_like(m)
    c1, c2, c3 = int(C * 0.25), int(C * 0.5), int(C * 0.75)
    for i in range(H):
        for j in range(W):
            if j >= 1:
                out[:, i, j, :c1] = m[:, i, j - 1, :c1]
            if j + 1 < W:
                out[:, i, j, c1:c2] = m[:, i, j + 1, c1:c2]
            if i >= 1:
                out[:, i, j, c2:c3] = m[:, i - 1, j, c2:c3]
            if i + 1 < H:
                out[:, i, j, c3:] = m[:, i + 1, j, c3:]
    return out.reshape(B, T, C)


@pytest.mark.parametrize("grid,C", [((4, 5), 8), ((3, 7), 10), ((1, 6), 4), ((5, 1), 12)])
def test_q_shift_matches_pixelwise_reference(grid, C):
    x = torch.randn(2, grid[0] * grid[1], C, dtype=torch.float64)
    assert torch.equal(q_shift(x, grid), _q_shift_reference(x, grid))


@pytest.mark.parametrize("grid,C", [((4, 5), 8), ((3, 7), 10), ((1, 6), 4), ((5, 1), 12)])
def test_q_shift_gradient_matches_pixelwise_reference(grid, C):
    """Training takes the shift's own backward (the reverse shift): the gradient equals autograd's through the
    pixel-by-pixel reference, bit for bit (each input's gradient is one output gradient or zero)."""
    x = torch.randn(2, grid[0] * grid[1], C, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, grid[0] * grid[1], C, dtype=torch.float64)
    y = q_shift(x, grid)
    nodes, todo = [], [y.grad_fn]
    while todo:
        node = todo.pop()
        nodes.append(type(node).__name__)
        todo += [n for n, _ in node.next_functions if n is not None]
    assert "_QShiftBackward" in nodes and "CopySlices" not in nodes  # one node, not a chain of slice copies
    (ours,) = torch.autograd.grad(y, x, g)
    (expected,) = torch.autograd.grad(_q_shift_reference(x, grid), x, g)
    assert torch.equal(ours, expected)


# --- the CPU allocator setting ----------------------------------------------------------------------------
def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.pop("RWKVUNET_CPU_ALLOCATOR", None)
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=300)


_FAULTS = """
import resource, torch
from rwkvunet.ops.cpu_memory import cpu_allocator_state
import rwkvunet
enc = rwkvunet.models.encoder.RWKVUNetEncoder(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), expansions=(1, 1, 1, 1),
                                             num_classes=0).eval()
with torch.no_grad():
    enc(torch.randn(1, 3, 32, 32))
before = cpu_allocator_state()  # a forward pass leaves malloc alone
rwkvunet.keep_freed_cpu_memory()
with torch.no_grad():
    # 40 MiB blocks: above glibc's largest automatic mmap threshold (32 MiB), below the raised one
    for _ in range(3):
        torch.empty(10 << 20).fill_(1.0)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.empty(10 << 20).fill_(1.0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
print(before, cpu_allocator_state(), faults)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is Linux-only")
def test_keep_freed_cpu_memory_keeps_freed_memory_for_reuse():
    tuned = _run_python(_FAULTS)
    assert tuned.returncode == 0, tuned.stderr
    before, state, faults = tuned.stdout.split()
    if state == "unsupported":  # a Linux without glibc (musl): nothing to tune, and nothing was changed
        assert before == "untouched"
        return
    assert (before, state) == ("untouched", "tuned")
    assert int(faults) < 1000  # 5 x 40 MiB reused: no fresh pages (10,240 faults per block otherwise)

    system = _run_python(_FAULTS, RWKVUNET_CPU_ALLOCATOR="system")
    assert system.returncode == 0, system.stderr
    _, state, system_faults = system.stdout.split()
    assert state == "system"
    if _transparent_huge_pages() == "always":  # fresh mappings may come as 2 MiB pages: fewer, larger faults
        assert int(system_faults) > int(faults)
    else:
        assert int(system_faults) >= 5 * 9000  # every block mapped afresh and faulted in page by page


def _transparent_huge_pages() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "unknown"
    return text[text.index("[") + 1:text.index("]")] if "[" in text else "unknown"


def test_unknown_allocator_setting_is_refused_with_the_choices():
    bad = _run_python("""
        from rwkvunet.ops.cpu_memory import keep_freed_cpu_memory
        keep_freed_cpu_memory()
    """, RWKVUNET_CPU_ALLOCATOR="jemalloc")
    assert bad.returncode != 0
    assert "RWKVUNET_CPU_ALLOCATOR='jemalloc'" in bad.stderr and "'system'" in bad.stderr


def _depthwise_case(B, C, H, W, k, stride, channels_last):
    """A DepthwiseConv2d with the blocks' padding and an input that requires grad (channels-last or NCHW)."""
    import math

    from rwkvunet.layers import DepthwiseConv2d

    pad = math.ceil((k - stride) / 2)
    conv = DepthwiseConv2d(C, C, k, stride, pad, groups=C, bias=False)
    x = torch.randn(B, C, H, W)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return conv, x.requires_grad_(True), pad


@pytest.mark.parametrize("B,C,H,W,k,stride,channels_last", [
    (2, 8, 17, 13, 5, 1, True), (1, 12, 7, 9, 9, 1, True), (3, 6, 20, 20, 9, 1, False), (2, 5, 11, 10, 5, 2, True),
])
def test_depthwise_conv_gradients_match_float64(B, C, H, W, k, stride, channels_last):
    """The depthwise convolution's own CPU weight gradient (and the input gradient) against float64 autograd
    through F.conv2d; the forward is the plain convolution."""
    from rwkvunet.layers import _depthwise_weight_grad

    conv, x, pad = _depthwise_case(B, C, H, W, k, stride, channels_last)
    y = conv(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    xd = x.detach().double().requires_grad_(True)
    wd = conv.weight.detach().double().requires_grad_(True)
    yd = F.conv2d(xd, wd, None, stride, pad, 1, C)
    yd.backward(gy.double())
    torch.testing.assert_close(y.double(), yd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv.weight.grad.double(), wd.grad, rtol=1e-5, atol=1e-4)
    # called directly (at a stride: the CPU kernel when built, else the phase split): the same taps
    direct = _depthwise_weight_grad(x.detach(), gy, (k, k), (stride, stride), (pad, pad))
    torch.testing.assert_close(direct.double(), wd.grad, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("B,C,H,W,k,stride,channels_last", [
    (1, 96, 64, 64, 5, 2, True), (2, 20, 17, 13, 5, 2, True), (3, 7, 9, 10, 3, 2, False), (1, 16, 10, 11, 5, 3, True),
    (2, 33, 12, 12, 9, 2, True),
])
def test_strided_depthwise_weight_grad_by_the_cpu_kernel(cpu_kernel_module, B, C, H, W, k, stride, channels_last):
    """At a stride the depthwise convolution trains through its own backward when the CPU kernel is built; the
    kernel's weight gradient against float64 autograd (float32 accumulation over at most H x W / 64 pixels
    per part, parts added in float64: a few float32 ulps of the largest tap), the input gradient oneDNN's."""
    conv, x, pad = _depthwise_case(B, C, H, W, k, stride, channels_last)
    assert conv._own_backward_applies(x)
    y = conv(x)
    assert type(y.grad_fn).__name__ == "_DepthwiseConvBackward"
    gy = torch.randn_like(y)
    y.backward(gy)
    xd = x.detach().double().requires_grad_(True)
    wd = conv.weight.detach().double().requires_grad_(True)
    F.conv2d(xd, wd, None, stride, pad, 1, C).backward(gy.double())
    scale = wd.grad.abs().max()
    torch.testing.assert_close(conv.weight.grad.double() / scale, wd.grad / scale, rtol=0, atol=2e-6)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-5)
    # deterministic: the same bits on a repeat
    first = conv.weight.grad.clone()
    conv.weight.grad = None
    conv(x).backward(gy)
    assert torch.equal(conv.weight.grad, first)


def test_depthwise_conv_is_a_plain_conv_elsewhere():
    """Same parameters (state-dict keys) as nn.Conv2d; eval, no-grad and frozen weights run F.conv2d itself."""
    from rwkvunet.layers import ConvNormAct, DepthwiseConv2d

    block = ConvNormAct(8, 8, 5, groups=8)
    assert isinstance(block.conv, DepthwiseConv2d) and set(block.state_dict()) == {
        "conv.weight", "norm.weight", "norm.bias", "norm.running_mean", "norm.running_var", "norm.num_batches_tracked"}
    assert type(ConvNormAct(8, 16, 1).conv) is nn.Conv2d and type(ConvNormAct(8, 8, 3, groups=4).conv) is nn.Conv2d
    x = torch.randn(1, 8, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(block.conv(x), F.conv2d(x, block.conv.weight, None, 1, 2, 1, 8), rtol=0, atol=0)


def test_packed_linear_matches_float64_and_follows_weight_changes():
    """Inference matmuls of the spatial mix through a cached oneDNN weight: float32-exact against float64, the
    cache renewed when the weight changes in place and dropped with the weight; training keeps F.linear."""
    import gc

    import rwkvunet.layers as L

    if not L._HAVE_PACKED_LINEAR:
        pytest.skip("this torch has no oneDNN")
    lin = nn.Linear(96, 80, bias=True)
    x = torch.randn(2, 50, 96)
    with torch.no_grad():  # (references without autograd graphs: they would keep the weight alive)
        ref = F.linear(x.double(), lin.weight.double(), lin.bias.double())
        y = L.token_mixer_linear(lin, x)
        assert id(lin.weight) in L._PACKED_WEIGHTS
        assert ((y.double() - ref).abs().max() / ref.abs().max()) < 1e-6
        lin.weight.mul_(-2.0)  # in place, as load_state_dict does
        y2 = L.token_mixer_linear(lin, x)
        ref2 = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    assert ((y2.double() - ref2).abs().max() / ref2.abs().max()) < 1e-6
    y3 = L.token_mixer_linear(lin, x)  # with autograd: the plain matmul, differentiable
    same = torch.equal(y3, F.linear(x, lin.weight, lin.bias))
    assert y3.requires_grad and same
    key = id(lin.weight)
    del lin, y3  # y3's graph holds the weight too
    gc.collect()
    assert key not in L._PACKED_WEIGHTS


@pytest.mark.parametrize("mixer", [None, "rwkv"])
def test_inference_adds_residuals_in_place_with_the_same_values(mixer):
    """In inference an IR block adds each residual into its branch's fresh output: bit for bit the out-of-place
    sums of the training-mode graph, and under CPU autocast (bfloat16 branches, float32 residuals after the
    LayerNorm) the sums keep the out-of-place result's dtype."""
    torch.manual_seed(0)
    block = IRBlock(32, 32, 64, mixer=mixer, norm="ln" if mixer else "bn").eval().requires_grad_(False)
    x = torch.randn(2, 32, 8, 12).contiguous(memory_format=torch.channels_last)
    with torch.enable_grad():  # no parameter needs a gradient: the same kernels, out-of-place sums
        want = block(x)
    with torch.inference_mode():
        got = block(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = block(x)
    with torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low_want = block(x)
    assert torch.equal(got, want)
    assert low.dtype == low_want.dtype and torch.equal(low, low_want)
