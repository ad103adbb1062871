"""Building blocks of RWKV-UNet, exactly as the released weights compute them.

Token tensors are (B, T, C) with T = H * W in row-major order; maps are (B, C, H, W). Nothing assumes a
square grid: every token module takes the grid size ``(H, W)`` it belongs to.
"""

import math
import weakref
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, register_notrace_function, register_notrace_module

from .ops.bi_wkv import bi_wkv
from .ops.bi_wkv_layer import BiWKV
from .ops.cpu_kernel import cpu_kernel, kernel_setting

register_notrace_module(BiWKV)  # opaque to FX, as bi_wkv_leaf is

__all__ = [
    "ConvNormAct", "SqueezeExcite", "q_shift", "SpatialMix", "AttentionMix", "ChannelMix", "IRBlock", "vrwkv_init_values",
    "CrossChannelMix", "map_to_tokens", "tokens_to_map", "resize_bilinear", "SPATIAL_MIXERS", "DECODER_BLOCKS",
    "DecoderBlock", "upsample2x", "fold_projection",
]

Grid = Tuple[int, int]


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C); a view without copying for channels-last maps."""
    return x.flatten(2).transpose(1, 2)


def tokens_to_map(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W); a channels-last view of contiguous tokens, no copy.

    Built as view + permute so that every stride, the batch's too, is that of a channels-last map (a
    transposed reshape gives batch-of-one maps a stride that convolutions do not recognise as channels-last).
    """
    return x.reshape(x.shape[0], grid[0], grid[1], x.shape[2]).permute(0, 3, 1, 2)


@register_notrace_function  # compares sizes: a branch on the input's shape
def resize_bilinear(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize (align_corners=False); a no-op when the size already matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _depthwise_weight_grad(x: torch.Tensor, grad: torch.Tensor, kernel_size: Tuple[int, int],
                           stride: Tuple[int, int], padding: Tuple[int, int]) -> torch.Tensor:
    """Weight gradient of a depthwise convolution (no dilation, zero padding), (C, 1, kh, kw).

    Tap (i, j) of channel c is the correlation of the padded input with the output gradient at offset (i, j),
    so all taps of all channels are one depthwise convolution of the input by the output gradient (batch
    folded into channels, then summed). With a stride the input is split into its stride x stride phases,
    each a stride-1 correlation giving the taps of that phase. oneDNN's own depthwise weight gradient is
    several times slower on the CPU. At a stride, in float32 with the CPU kernel built, the kernel's
    accumulation over the output pixels (:mod:`rwkvunet.ops.cpu_kernel`) computes the same sums, 3-4 times
    faster than oneDNN and the phases.
    """
    B, C, H, W = x.shape
    kh, kw = kernel_size
    (sh, sw), (ph, pw) = stride, padding
    Ho, Wo = grad.shape[-2:]
    kernels = cpu_kernel() if (sh, sw) != (1, 1) else None  # at stride 1 the correlation below is faster
    if kernels is not None and x.dtype == grad.dtype == torch.float32:
        # the CPU kernel, on the maps as channels-last stores them (no copy when they are channels-last)
        taps = kernels.depthwise_weight_grad(x.permute(0, 2, 3, 1).contiguous(), grad.permute(0, 2, 3, 1).contiguous(),
                                             kh, kw, sh, sw, ph, pw)
        return taps.t().reshape(C, 1, kh, kw)
    g = grad.reshape(B * C, 1, Ho, Wo)
    if (sh, sw) == (1, 1):  # one correlation; the convolution pads (rows used: y + i - p)
        taps = F.conv2d(x.reshape(1, B * C, H, W), g, padding=(ph, pw), groups=B * C)
        return taps[..., :kh, :kw].reshape(B, C, 1, kh, kw).sum(0)
    out = x.new_zeros(C, 1, kh, kw)
    for a in range(min(sh, kh)):
        for b in range(min(sw, kw)):
            th, tw = len(range(a, kh, sh)), len(range(b, kw, sw))  # taps i = a + sh * i' of this phase
            # tap i of output row y reads input row sh * (y + i') + a - ph: phase rows r0 + sh * j of the input
            r0, c0 = (a - ph) % sh, (b - pw) % sw
            top, left = (r0 - (a - ph)) // sh, (c0 - (b - pw)) // sw  # zero rows/columns before the phase
            phase = x[:, :, r0::sh, c0::sw]
            rows, cols = Ho + th - 1, Wo + tw - 1
            phase = F.pad(phase, (left, cols - left - phase.shape[-1], top, rows - top - phase.shape[-2]))
            taps = F.conv2d(phase.reshape(1, B * C, rows, cols), g, groups=B * C)
            out[:, :, a::sh, b::sw] = taps.reshape(B, C, 1, th, tw).sum(0)
    return out


class _DepthwiseConv(torch.autograd.Function):
    """Bias-free depthwise convolution whose backward computes the weight gradient by
    :func:`_depthwise_weight_grad` and, at stride 1, the input gradient as a convolution by the flipped kernel."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        return F.conv2d(x, weight, None, stride, padding, 1, weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0] and tuple(ctx.stride) == (1, 1):
            # a stride-1 convolution's input gradient is the convolution of the output gradient by the flipped
            # kernel (as fast as the forward; oneDNN's backward-data takes about twice as long)
            kh, kw = weight.shape[-2:]
            pad = (kh - 1 - ctx.padding[0], kw - 1 - ctx.padding[1])
            grad_x = F.conv2d(grad, weight.flip(-2, -1), None, 1, pad, 1, weight.shape[0])
        elif ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, list(ctx.stride), list(ctx.padding), [1, 1], False, [0, 0], weight.shape[0],
                [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = _depthwise_weight_grad(x, grad, weight.shape[-2:], ctx.stride, ctx.padding).to(weight.dtype)
        return grad_x, grad_w, None, None


@torch.jit.ignore
def _depthwise_conv_train(x: torch.Tensor, weight: torch.Tensor, stride: Tuple[int, int],
                          padding: Tuple[int, int]) -> torch.Tensor:
    return _DepthwiseConv.apply(x, weight, stride, padding)


@register_notrace_module  # chooses its backward by device and grad mode
class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d`` with ``groups == in == out channels`` (same parameters and forward), whose weight gradient on
    the CPU comes from :func:`_depthwise_weight_grad`: oneDNN's depthwise weight gradient takes several times
    longer, most of a CPU training step's convolution time. At a stride this applies only with the CPU kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if self._own_backward_applies(x):
                return _depthwise_conv_train(x, self.weight, self.stride, self.padding)
        return self._conv_forward(x, self.weight, self.bias)

    @torch.jit.ignore
    def _own_backward_applies(self, x: torch.Tensor) -> bool:
        if not (x.device.type == "cpu" and self.bias is None and self.dilation == (1, 1)
                and self.padding_mode == "zeros" and isinstance(self.padding, tuple) and torch.is_grad_enabled()
                and self.weight.requires_grad and x.dtype == self.weight.dtype and not cpu_autocast()
                and not compiling() and cpu_fast_paths()):
            return False
        # at a stride only with the CPU kernel (the phase-split correlation is no faster than oneDNN there); asked
        # last, never while compiling: finding or building the kernel touches the file system
        return self.stride == (1, 1) or (x.dtype == torch.float32 and cpu_kernel() is not None)


class ConvNormAct(nn.Sequential):
    """Conv2d (no bias, padding ceil((k - stride) / 2)) -> BatchNorm2d(eps=1e-6) -> activation.

    :meth:`reparameterize` (called by ``timm.utils.reparameterize_model``) folds the norm into the conv for
    inference; the forward itself always runs the modules as they are.
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
                 act_layer: Optional[type] = nn.ReLU):
        super().__init__()
        padding = math.ceil((kernel_size - stride) / 2)
        depthwise = groups > 1 and groups == in_chs == out_chs
        self.conv = (DepthwiseConv2d if depthwise else nn.Conv2d)(in_chs, out_chs, kernel_size, stride, padding,
                                                                  groups=groups, bias=False)
        self.norm = nn.BatchNorm2d(out_chs, eps=1e-6)
        self.act = act_layer(inplace=True) if act_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))

    @torch.no_grad()
    def reparameterize(self, pre_norm: Optional[nn.Module] = None) -> None:
        """Fold the BatchNorm after the conv (and ``pre_norm``, a BatchNorm before an unpadded, ungrouped,
        stride-1 1x1 conv) into one conv with bias, in place; the norm becomes an identity.

        Uses the running statistics, i.e. what eval mode computes. The fold is done in float64 and stored in
        the conv's dtype. A no-op once folded (the norm is no longer a BatchNorm).
        """
        if not _is_foldable_bn(self.norm):
            return
        if pre_norm is not None and not (_is_foldable_bn(pre_norm) and self.can_take_pre_norm()):
            raise ValueError("pre_norm can only be folded into an unpadded, ungrouped, stride-1 1x1 conv")
        conv = self.conv
        weight, bias = _fold_conv_bn(conv.weight, conv.bias, self.norm, pre_norm)
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                          device=conv.weight.device, dtype=conv.weight.dtype)
        fused.weight = nn.Parameter(torch.empty_like(conv.weight).copy_(weight),  # keeps the memory format
                                    requires_grad=conv.weight.requires_grad)
        fused.bias.copy_(bias)
        fused.train(conv.training)
        self.conv = fused
        self.norm = nn.Identity()

    def can_take_pre_norm(self) -> bool:
        """Whether a per-channel affine norm before this conv can be folded into it (an unpadded, ungrouped,
        stride-1 1x1 conv: every output pixel reads exactly one input pixel, never padding)."""
        c = self.conv
        return c.kernel_size == (1, 1) and c.groups == 1 and c.padding == (0, 0) and c.stride == (1, 1)


def _is_foldable_bn(m: nn.Module) -> bool:
    return (isinstance(m, nn.BatchNorm2d) and m.running_mean is not None and m.running_var is not None
            and m.affine)


def _bn_scale_shift(norm: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``x * scale + shift``, in float64."""
    scale = norm.weight.double() * torch.rsqrt(norm.running_var.double() + norm.eps)
    return scale, norm.bias.double() - norm.running_mean.double() * scale


def _fold_conv_bn(weight: torch.Tensor, bias: Optional[torch.Tensor], norm: nn.BatchNorm2d,
                  pre_norm: Optional[nn.BatchNorm2d] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """[pre_norm ->] conv(weight, bias) -> norm as one conv's weight and bias, in float64."""
    w = weight.double()
    b = bias.double() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    if pre_norm is not None:  # 1x1 conv: conv(x * s + t) = conv_{w * s}(x) + w @ t
        pre_scale, pre_shift = _bn_scale_shift(pre_norm)
        b = b + w.flatten(1) @ pre_shift
        w = w * pre_scale.reshape(1, -1, 1, 1)
    scale, shift = _bn_scale_shift(norm)
    return w * scale.reshape(-1, 1, 1, 1), b * scale + shift


class SqueezeExcite(nn.Module):
    """Channel gate on the spatial mean (used in the stem only)."""

    def __init__(self, chs: int, rd_chs: int, act_layer: type = nn.SiLU):
        super().__init__()
        self.conv_reduce = nn.Conv2d(chs, rd_chs, 1, bias=True)
        self.act = act_layer(inplace=True)
        self.conv_expand = nn.Conv2d(rd_chs, chs, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.conv_expand(self.act(self.conv_reduce(s))))


def cpu_fast_paths() -> bool:
    """Whether the CPU fast paths may run (the Bi-WKV kernel, the depthwise backward, the packed matmuls):
    ``RWKVUNET_CPU_KERNEL=off`` leaves every operation to PyTorch's own implementation."""
    return kernel_setting() != "off"


def cpu_autocast() -> bool:
    """Whether CPU autocast is on (its casts apply to PyTorch's own operators only)."""
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def exporting() -> bool:
    """``torch.compiler.is_exporting()``: exported graphs take forms of some operations that ONNX Runtime runs
    well (same values). False in TorchScript, which cannot compile the check (and never exports)."""
    if torch.jit.is_scripting():
        return False
    return torch.compiler.is_exporting()


def compiling() -> bool:
    """``torch.compiler.is_compiling()`` (export included); False in TorchScript, which cannot compile it."""
    if torch.jit.is_scripting():
        return False
    return torch.compiler.is_compiling()


@register_notrace_function  # slices at positions computed from the shape
def q_shift(x: torch.Tensor, grid: Grid, shift: int = 1) -> torch.Tensor:
    """Quad-directional token shift on (B, T, C) tokens of an (H, W) grid, zero filled.

    Channel quarters move right, left, down and up by ``shift`` pixels; the split points are int(C * g)
    for g in 1/4, 2/4, 3/4, 1, as in Vision-RWKV.
    """
    B, T, C = x.shape
    H, W = grid
    x = x.reshape(B, H, W, C)
    c1, c2, c3, c4 = int(C * 0.25), int(C * 0.5), int(C * 0.75), int(C * 1.0)
    s = shift
    if exporting():
        # exported graphs: padded slices joined once; in-place slice writes would export as scatters between
        # transposes, which ONNX Runtime runs at a fraction of the speed (same values)
        q = x.split([c1, c2 - c1, c3 - c2, c4 - c3, C - c4], dim=-1)  # right, left, down, up, rest
        parts = [F.pad(q[0][:, :, : W - s], (0, 0, s, 0)), F.pad(q[1][:, :, s:], (0, 0, 0, s)),
                 F.pad(q[2][:, : H - s], (0, 0, 0, 0, s, 0)), F.pad(q[3][:, s:], (0, 0, 0, 0, 0, s)), q[4]]
        return torch.cat(parts, dim=-1).reshape(B, T, C)
    if not torch.jit.is_scripting() and x.requires_grad and torch.is_grad_enabled() and not compiling():
        return _q_shift_with_grad(x, s).reshape(B, T, C)
    return _shift_quarters(x, s, False).reshape(B, T, C)


def _shift_quarters(x: torch.Tensor, s: int, reverse: bool) -> torch.Tensor:
    """The shift of (B, H, W, C) maps into one output written once: each quarter is copied to its shifted place
    and only its uncovered border row or column is zeroed. ``reverse`` moves every quarter the other way (left,
    right, up, down), which is the shift's adjoint: its backward."""
    B, H, W, C = x.shape
    c1, c2, c3, c4 = int(C * 0.25), int(C * 0.5), int(C * 0.75), int(C * 1.0)
    out = torch.empty_like(x)
    # quarter 0 moves right (reverse: left), quarter 1 left (right), quarter 2 down (up), quarter 3 up (down)
    plus_w, minus_w = (c1, c2) if reverse else (0, c1), (0, c1) if reverse else (c1, c2)
    plus_h, minus_h = (c3, c4) if reverse else (c2, c3), (c2, c3) if reverse else (c3, c4)
    out[:, :, s:, plus_w[0]:plus_w[1]] = x[:, :, : W - s, plus_w[0]:plus_w[1]]
    out[:, :, :s, plus_w[0]:plus_w[1]].zero_()
    out[:, :, : W - s, minus_w[0]:minus_w[1]] = x[:, :, s:, minus_w[0]:minus_w[1]]
    out[:, :, W - s:, minus_w[0]:minus_w[1]].zero_()
    out[:, s:, :, plus_h[0]:plus_h[1]] = x[:, : H - s, :, plus_h[0]:plus_h[1]]
    out[:, :s, :, plus_h[0]:plus_h[1]].zero_()
    out[:, : H - s, :, minus_h[0]:minus_h[1]] = x[:, s:, :, minus_h[0]:minus_h[1]]
    out[:, H - s:, :, minus_h[0]:minus_h[1]].zero_()
    if c4 < C:
        out[..., c4:] = x[..., c4:]
    return out


class _QShift(torch.autograd.Function):
    """The token shift as one autograd node whose backward is the reverse shift: the in-place slice writes
    recorded one by one would each clone the whole gradient in the backward (the same values either way: every
    gradient element is one output gradient element or zero)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, s: int) -> torch.Tensor:
        ctx.s = s
        return _shift_quarters(x, s, False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _shift_quarters(grad.contiguous(), ctx.s, True), None


@torch.jit.ignore
def _q_shift_with_grad(x: torch.Tensor, s: int) -> torch.Tensor:
    return _QShift.apply(x, s)


@register_notrace_function
@torch.jit.ignore
def bi_wkv_leaf(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """:func:`bi_wkv` as one opaque call: its dispatch (kernel or PyTorch, exactness checks) reads devices,
    dtypes and values, which TorchScript cannot compile and FX cannot trace."""
    return bi_wkv(w, u, k, v)


def vrwkv_init_values(dim: int, layer_id: int, num_layers: int, spatial: bool = True) -> Dict[str, torch.Tensor]:
    """Vision-RWKV's "fancy" start of a mixer's decay, bonus and token-shift mixes, by parameter name, for the
    layer ``layer_id`` of ``num_layers`` (``spatial=False``: a channel mix, which has only the k and r mixes).

    The decay grows over the channels from -5 to 3 (with a steeper curve in deeper layers), so channels range
    from almost global to local attention; the bonus is log(0.3) with a -0.5/0/0.5 zigzag; the token-shift
    mixes grow over the channels as (i / C) ** (1 - layer_id / num_layers), so some channels take the shifted
    neighbours and others the token itself (mix_v is raised by 0.3 * depth, the spatial mix_r uses half the
    exponent). The uniform start (decay and bonus 0, mixes 0.5) makes every channel the same global average.
    """
    ratio_0_to_1 = layer_id / max(num_layers - 1, 1)
    ratio_1_to_almost0 = 1.0 - layer_id / num_layers
    position = torch.arange(dim, dtype=torch.float32)
    share = (position / dim).view(1, 1, dim)
    if not spatial:
        return {"spatial_mix_k": share ** ratio_1_to_almost0, "spatial_mix_r": share ** ratio_1_to_almost0}
    return {
        "spatial_decay": -5 + 8 * (position / max(dim - 1, 1)) ** (0.7 + 1.3 * ratio_0_to_1),
        "spatial_first": math.log(0.3) + ((position + 1) % 3 - 1) * 0.5,
        "spatial_mix_k": share ** ratio_1_to_almost0,
        "spatial_mix_v": share ** ratio_1_to_almost0 + 0.3 * ratio_0_to_1,
        "spatial_mix_r": share ** (0.5 * ratio_1_to_almost0),
    }


@register_notrace_module  # a leaf for FX: its matmuls take the same form traced and untraced
class SpatialMix(nn.Module):
    """Vision-RWKV spatial mixing: token shift, then Bi-WKV gated by the receptance.

    ``layer_id`` / ``num_layers`` (set by the encoder) place the layer for :func:`vrwkv_init_values`.
    """

    layer_id: int = 0
    num_layers: int = 1

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.spatial_decay = nn.Parameter(torch.zeros(dim))
        self.spatial_first = nn.Parameter(torch.zeros(dim))
        self.spatial_mix_k = nn.Parameter(torch.full((1, 1, dim), 0.5))
        self.spatial_mix_v = nn.Parameter(torch.full((1, 1, dim), 0.5))
        self.spatial_mix_r = nn.Parameter(torch.full((1, 1, dim), 0.5))
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.key_norm = nn.LayerNorm(dim)
        self.output = nn.Linear(dim, dim, bias=False)
        self.bi_wkv = BiWKV()  # kernels.kernelize can swap its forward for the Hub kernel's layer

    def reset_parameters(self, mode: str = "uniform") -> None:
        """``uniform``: decay and bonus 0, mixes 0.5; ``vrwkv``: :func:`vrwkv_init_values`."""
        if mode == "vrwkv":
            with torch.no_grad():
                for name, value in vrwkv_init_values(self.dim, self.layer_id, self.num_layers).items():
                    getattr(self, name).copy_(value)
            return
        nn.init.zeros_(self.spatial_decay)
        nn.init.zeros_(self.spatial_first)
        for p in (self.spatial_mix_k, self.spatial_mix_v, self.spatial_mix_r):
            nn.init.constant_(p, 0.5)

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        T = x.shape[1]
        xx = q_shift(x, grid)
        # the three token-shift mixes in one pass; then one matmul each (faster on the CPU than a batched
        # matmul over stacked weights, which also copies the weights on every call)
        if exporting():
            xk, xv, xr = mix_tokens(xx, x, [self.spatial_mix_k, self.spatial_mix_v, self.spatial_mix_r])
        else:
            mix = torch.cat([self.spatial_mix_k, self.spatial_mix_v, self.spatial_mix_r]).to(x.dtype)
            xk, xv, xr = torch.lerp(xx.unsqueeze(0), x.unsqueeze(0), mix.unsqueeze(1)).unbind(0)  # (3, B, T, C)
        if torch.jit.is_scripting():
            k, v, r = self.key(xk), self.value(xv), self.receptance(xr)
            y = self.bi_wkv(self.spatial_decay / T, self.spatial_first / T, k, v)
            return self.output(torch.sigmoid(r) * self.key_norm(y))
        k, v, r = (token_mixer_linear(self.key, xk), token_mixer_linear(self.value, xv),
                   token_mixer_linear(self.receptance, xr))
        y = self.bi_wkv(self.spatial_decay / T, self.spatial_first / T, k, v)
        if exporting():
            # ONNX Runtime fuses an Add that feeds a LayerNormalization into one SkipLayerNormalization, whose CPU
            # kernel runs ~8x slower than the two ops it replaces (1.32); Bi-WKV ends in an Add, so the norm
            # and gate run on the free (B, H, W, C) view of the tokens, which keeps the two apart
            B = y.shape[0]
            gate = torch.sigmoid(r.reshape(B, grid[0], grid[1], -1))
            return self.output(gate * self.key_norm(y.reshape(B, grid[0], grid[1], -1))).reshape(B, T, -1)
        if torch.is_grad_enabled() or compiling():
            return token_mixer_linear(self.output, torch.sigmoid(r) * self.key_norm(y))
        # inference: the gate in the receptance's fresh buffer (large new allocations cost page faults on the CPU)
        return token_mixer_linear(self.output, torch.sigmoid_(r).mul_(self.key_norm(y)))


class AttentionMix(nn.Module):
    """Multi-head self-attention over all tokens (the paper's attention ablation), through SDPA."""

    def __init__(self, dim: int, head_dim: int = 32):
        super().__init__()
        # about head_dim channels per head, and a head count that divides dim (e.g. 560 -> 16 heads of 35)
        num_heads = max(1, dim // head_dim)
        while dim % num_heads:
            num_heads -= 1
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


# id(weight) -> (weakref to the weight, its version, row count, packed weight); an entry leaves with its weight
_PACKED_WEIGHTS: Dict[int, Tuple["weakref.ref", int, int, torch.Tensor]] = {}


def _packed_linear_applies(x: torch.Tensor, linear: nn.Linear) -> bool:
    if torch.is_grad_enabled() or cpu_autocast() or not cpu_fast_paths():  # autograd, autocast: the plain matmul
        return False
    return (x.device.type == "cpu" and x.dtype == torch.float32 and linear.weight.dtype == torch.float32
            and not compiling() and not torch.jit.is_tracing() and _HAVE_PACKED_LINEAR)


@torch.jit.ignore
def _packed_linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` through oneDNN with the weight reordered once into its blocked layout (cached per weight
    version and row count): 8-30% faster than ``F.linear`` for the token mixers' matmuls on the CPU. Inference
    only; same values up to float32 rounding."""
    global _HAVE_PACKED_LINEAR
    weight = linear.weight
    rows = x.numel() // x.shape[-1]
    key = id(weight)
    cached = _PACKED_WEIGHTS.get(key)
    try:
        if cached is None or cached[0]() is not weight or cached[1:3] != (weight._version, rows):
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
            cached = (weakref.ref(weight, lambda _, k=key: _PACKED_WEIGHTS.pop(k, None)), weight._version, rows, packed)
            _PACKED_WEIGHTS[key] = cached
        return torch.ops.mkldnn._linear_pointwise(x, cached[3], linear.bias, "none", [], "")
    except (RuntimeError, AttributeError):  # a torch without these oneDNN ops: the plain matmul from now on
        _HAVE_PACKED_LINEAR = False
        return F.linear(x, weight, linear.bias)


_HAVE_PACKED_LINEAR = torch.backends.mkldnn.is_available()


def token_mixer_linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)``; eager float32 CPU inference takes :func:`_packed_linear` (not for TorchScript)."""
    if _packed_linear_applies(x, linear):
        return _packed_linear(linear, x)
    return linear(x)


def mix_tokens(shifted: torch.Tensor, x: torch.Tensor, weights: List[torch.Tensor]) -> List[torch.Tensor]:
    """``torch.lerp(shifted, x, w)`` for each token-shift mixing weight ``w``, as ``shifted + w * (x - shifted)``
    with the difference taken once: the form exported graphs use (ONNX decomposes lerp into two branches and a
    select per element). Equal to lerp up to the rounding of its last operation."""
    diff = x - shifted
    return [torch.addcmul(shifted, diff, w.to(x.dtype)) for w in weights]


@register_notrace_function  # chooses its form by the input's device and layout
def token_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], grid: Grid) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` on (B, T, C) tokens of an (H, W) grid.

    On the CPU it runs as a 1x1 convolution over the channels-last map view of the tokens (no copy), which
    oneDNN computes markedly faster than a matmul with so few input channels; elsewhere it is the matmul.
    """
    if x.device.type != "cpu" or not x.is_contiguous() or exporting():
        return F.linear(x, weight, bias)  # exported graphs keep tokens in rows: a plain matmul, no transposes
    B, T, C = x.shape
    maps = x.view(B, grid[0], grid[1], C).permute(0, 3, 1, 2)
    y = F.conv2d(maps, weight[:, :, None, None], bias)
    return y.permute(0, 2, 3, 1).reshape(B, T, weight.shape[0])


class ChannelMix(nn.Module):
    """RWKV channel mixing (squared-ReLU MLP gated by the receptance), hidden size ``hidden_ratio * dim``."""

    layer_id: int = 0
    num_layers: int = 1

    def __init__(self, dim: int, hidden_ratio: int = 2):
        super().__init__()
        hidden = hidden_ratio * dim
        self.spatial_mix_k = nn.Parameter(torch.full((1, 1, dim), 0.5))
        self.spatial_mix_r = nn.Parameter(torch.full((1, 1, dim), 0.5))
        self.key = nn.Linear(dim, hidden, bias=False)
        self.key_norm = nn.LayerNorm(hidden)
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(hidden, dim, bias=False)
        # eager inference mixes large maps in slices of about this many hidden values (see _inference)
        self.hidden_chunk_elements = HIDDEN_CHUNK_ELEMENTS
        # exported graphs mix in this many slices of rows, which must divide the rows of every exported size (see
        # _exported); the Cross-Channel Mix, at stage I's resolution, sets EXPORT_ROW_SLICES
        self.export_row_slices = 1

    def reset_parameters(self, mode: str = "uniform") -> None:
        """``uniform``: mixes 0.5; ``vrwkv``: :func:`vrwkv_init_values`."""
        if mode == "vrwkv":
            with torch.no_grad():
                dim = self.spatial_mix_k.shape[-1]
                for name, value in vrwkv_init_values(dim, self.layer_id, self.num_layers, spatial=False).items():
                    getattr(self, name).copy_(value)
            return
        for p in (self.spatial_mix_k, self.spatial_mix_r):
            nn.init.constant_(p, 0.5)

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        xx = q_shift(x, grid)
        if not (torch.is_grad_enabled() or compiling()):
            return self._inference(x, xx, grid)
        if exporting() and not torch.is_grad_enabled() and self.export_row_slices > 1:
            return self._exported(x, xx, grid)
        if exporting():
            xk, xr = mix_tokens(xx, x, [self.spatial_mix_k, self.spatial_mix_r])
        else:  # two plain lerps: on the CPU a lerp with a stacked, broadcast weight runs at half their speed
            xk = torch.lerp(xx, x, self.spatial_mix_k.to(x.dtype))
            xr = torch.lerp(xx, x, self.spatial_mix_r.to(x.dtype))
        # not in place: the matmul's output is a view of the 1x1 convolution's (see token_linear), and an in-place
        # op on a view makes the backward clone the whole gradient
        k = torch.relu(token_linear(xk, self.key.weight, self.key.bias, grid))
        r = token_linear(xr, self.receptance.weight, self.receptance.bias, grid)
        if torch.is_grad_enabled():
            k = k * k  # squared ReLU; a multiply is several times faster than pow on the CPU
            return torch.sigmoid(r) * token_linear(self.key_norm(k), self.value.weight, self.value.bias, grid)
        # inference: reuse the fresh buffers (large new allocations cost page faults on the CPU)
        return torch.sigmoid_(r).mul_(token_linear(self.key_norm(k.mul_(k)), self.value.weight, self.value.bias,
                                                   grid))

    def _exported(self, x: torch.Tensor, xx: torch.Tensor, grid: Grid) -> torch.Tensor:
        """The mix in exported inference graphs, in ``export_row_slices`` slices of rows (after the shift every
        token is mixed on its own, so the values are those of one pass). At stage I's resolution the matmuls of one
        pass run at two thirds of their speed in ONNX Runtime, whose GEMM streams a 16k-token input from memory
        once per block of output columns; a slice stays in the cache."""
        B, T, C = x.shape
        H, W = grid
        n = self.export_row_slices
        x5, xx5 = x.reshape(B, n, H // n, W, C), xx.reshape(B, n, H // n, W, C)
        out = []
        for i in range(n):
            xs, xxs = x5[:, i], xx5[:, i]
            xk, xr = mix_tokens(xxs, xs, [self.spatial_mix_k, self.spatial_mix_r])
            k = torch.relu(F.linear(xk, self.key.weight, self.key.bias))
            r = F.linear(xr, self.receptance.weight, self.receptance.bias)
            out.append(torch.sigmoid(r) * F.linear(self.key_norm(k * k), self.value.weight, self.value.bias))
        return torch.stack(out, dim=1).reshape(B, T, C)

    def _inference(self, x: torch.Tensor, xx: torch.Tensor, grid: Grid) -> torch.Tensor:
        """Eager inference, with the same operations as the forward. After the shift every token is mixed on its
        own, so large maps go through in slices of rows of one image, and the hidden (2C) tensors of one slice
        are all that exists at a time: the Cross-Channel Mix at stage I's resolution otherwise holds about ten
        copies of its input at once, most of a large image's peak memory."""
        B, T, C = x.shape
        H, W = grid
        rows = max(1, self.hidden_chunk_elements // (W * self.key.out_features))
        if B == 1 and rows >= H:
            return self._mix(x, xx, grid)
        rows = -(-H // -(-H // rows))  # slices of equal height (a thin last slice runs its matmuls slowly)
        x4, xx4 = x.contiguous().view(B, H, W, C), xx.contiguous().view(B, H, W, C)
        out4 = torch.empty_like(x4)
        for b in range(B):
            for top in range(0, H, rows):
                n = min(rows, H - top)
                mixed = self._mix(x4[b:b + 1, top:top + n].reshape(1, n * W, C),
                                  xx4[b:b + 1, top:top + n].reshape(1, n * W, C), (n, W))
                out4[b:b + 1, top:top + n] = mixed.view(1, n, W, C)
        return out4.view(B, T, C)

    def _mix(self, x: torch.Tensor, xx: torch.Tensor, grid: Grid) -> torch.Tensor:
        """The mix of (1, n, C) tokens in inference: each intermediate freed once used, the shifted tokens
        (not needed afterwards) mixed in place into the receptance's input."""
        # token_linear's 1x1 convolutions: at stage I's resolution they ran faster inside the model than the
        # packed matmuls the spatial mix uses
        k = torch.relu_(token_linear(torch.lerp(xx, x, self.spatial_mix_k.to(x.dtype)), self.key.weight,
                                     self.key.bias, grid))
        r = token_linear(xx.lerp_(x, self.spatial_mix_r.to(x.dtype)), self.receptance.weight, self.receptance.bias,
                         grid)
        hidden = self.key_norm(k.mul_(k))
        del k
        value = token_linear(hidden, self.value.weight, self.value.bias, grid)
        del hidden
        return torch.sigmoid_(r).mul_(value)


#: The Cross-Channel Mix's channel mix runs in this many slices of rows in exported graphs (see
#: ChannelMix._exported). It must divide 8: exported sizes are multiples of 16, so stage I's rows are multiples of
#: 8. At 256 x 256 a slice holds 2048 tokens.
EXPORT_ROW_SLICES = 8

#: Eager inference mixes channels in slices of about this many hidden values (16 MiB of float32), see
#: ChannelMix._inference; a 256 x 256 input's Cross-Channel Mix fits in one slice.
HIDDEN_CHUNK_ELEMENTS = 1 << 22


#: Spatial mixers of the IR-RWKV blocks (stages III-IV), by name; "none" keeps the block without one.
SPATIAL_MIXERS: Dict[str, Optional[Callable[[int], nn.Module]]] = {
    "rwkv": SpatialMix,
    "attention": AttentionMix,
    "none": None,
}


def _make_mixer(kind: Optional[str], dim: int) -> Optional[nn.Module]:
    if kind is None:
        return None
    if kind not in SPATIAL_MIXERS:
        raise ValueError(f"unknown spatial mixer {kind!r}; use one of {tuple(SPATIAL_MIXERS)}")
    factory = SPATIAL_MIXERS[kind]
    return None if factory is None else factory(dim)


@register_notrace_function  # chooses by dtype and shape
def add_residual(branch: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + branch`` for inference, written into the branch's fresh output where that holds the sum's
    dtype and shape (addition commutes exactly, so the values are those of the out-of-place sum)."""
    if branch.dtype == torch.promote_types(branch.dtype, residual.dtype) and branch.shape == residual.shape:
        return branch.add_(residual)
    return residual + branch


class IRBlock(nn.Module):
    """Inverted residual block; with a spatial mixer it is the IR-RWKV block.

    norm -> 1x1 expand (BN, ReLU) -> [tokens + LN(mix(tokens))] -> [+] depthwise 5x5 (BN, SiLU) [-> SE]
    -> 1x1 project -> [+ shortcut]. ``norm`` is BN, LN2d or absent; brackets are optional parts.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            mid_chs: int,
            stride: int = 1,
            norm: Optional[str] = "bn",
            mixer: Optional[str] = None,
            residual: bool = True,
            se: bool = False,
            dw_conv: bool = True,
            channel_mix: bool = False,
            dw_kernel_size: int = 5,
            drop_path: float = 0.0,
    ):
        super().__init__()
        if norm == "bn":
            self.norm = nn.BatchNorm2d(in_chs, eps=1e-6)
        elif norm == "ln":
            self.norm = LayerNorm2d(in_chs, eps=1e-6)
        elif norm is None:
            self.norm = nn.Identity()
        else:
            raise ValueError(f"unknown block norm {norm!r}")
        self.conv = ConvNormAct(in_chs, mid_chs, 1, act_layer=nn.ReLU)
        self.mix = _make_mixer(mixer, mid_chs)
        self.mix_norm = nn.LayerNorm(mid_chs) if self.mix is not None else None
        self.channel_mix = ChannelMix(mid_chs) if (channel_mix and self.mix is not None) else None
        self.channel_mix_norm = nn.LayerNorm(mid_chs) if self.channel_mix is not None else None
        if not dw_conv and stride != 1:
            raise ValueError("the depthwise conv carries the stride; it can only be left out of stride-1 blocks")
        self.conv_dw = ConvNormAct(mid_chs, mid_chs, dw_kernel_size, stride, groups=mid_chs,
                                   act_layer=nn.SiLU) if dw_conv else None
        self.se = SqueezeExcite(mid_chs, mid_chs) if se else None
        self.proj = nn.Conv2d(mid_chs, out_chs, 1, bias=False)
        self.residual = residual and stride == 1 and in_chs == out_chs
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold a BatchNorm ``norm`` (and the 1x1 conv's own norm) into the 1x1 conv, in place, for inference.

        Called by ``timm.utils.reparameterize_model`` before it visits the block's children, which then fold
        the remaining conv-BatchNorm pairs.
        """
        if _is_foldable_bn(self.norm) and _is_foldable_bn(self.conv.norm) and self.conv.can_take_pre_norm():
            self.conv.reparameterize(pre_norm=self.norm)
            self.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # inference adds each residual into the branch's fresh output (addition commutes exactly): fewer large
        # allocations, the same values
        in_place = not (self.training or torch.is_grad_enabled() or compiling())
        shortcut = x
        x = self.conv(self.norm(x))
        if self.mix is not None:
            grid = (x.shape[2], x.shape[3])
            t = map_to_tokens(x)
            if in_place:
                t = add_residual(self.mix_norm(self.mix(t, grid)), t)
            else:
                t = t + self.drop_path(self.mix_norm(self.mix(t, grid)))
            if self.channel_mix is not None:
                t = t + self.drop_path(self.channel_mix_norm(self.channel_mix(t, grid)))
            x = tokens_to_map(t, grid)
        if self.conv_dw is not None:
            y = self.conv_dw(x)
            if self.se is not None:
                y = self.se(y)
            if not self.residual:
                x = y
            elif in_place:
                x = add_residual(y, x)
            else:
                x = x + y
        x = self.proj(x)
        if self.residual:
            x = add_residual(x, shortcut) if in_place else shortcut + self.drop_path(x)
        return x


@torch.no_grad()
def fold_projection(block: IRBlock, next_block: IRBlock) -> bool:
    """Fold ``block``'s 1x1 projection (linear: no norm, no activation) into ``next_block``'s 1x1 expansion, in
    place, when ``block`` has no shortcut (its output feeds nothing else) and ``next_block`` no norm left before
    its conv: two linear maps in a row become one, with the narrower input, and the map between them (wide and,
    after the stem, at full resolution) is never written. ``block.proj`` becomes an identity, so ``block``'s own
    output changes: callers fold only where nobody reads it. Returns whether it folded."""
    next_block.reparameterize()  # BatchNorms first (no-ops once folded)
    next_block.conv.reparameterize()
    proj, conv = block.proj, next_block.conv.conv
    if block.residual or not isinstance(proj, nn.Conv2d) or not isinstance(next_block.norm, nn.Identity):
        return False
    if not isinstance(next_block.conv.norm, nn.Identity) or not next_block.conv.can_take_pre_norm():
        return False
    if proj.kernel_size != (1, 1) or proj.groups != 1 or proj.stride != (1, 1) or proj.padding != (0, 0):
        return False
    w1, w0 = conv.weight.double().flatten(1), proj.weight.double().flatten(1)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=torch.float64,
                                                                        device=w1.device)
    if proj.bias is not None:
        bias = bias + w1 @ proj.bias.double()
    fused = nn.Conv2d(proj.in_channels, conv.out_channels, 1, bias=True, device=conv.weight.device,
                      dtype=conv.weight.dtype)
    fused.weight = nn.Parameter((w1 @ w0).view_as(fused.weight).to(conv.weight.dtype),
                                requires_grad=conv.weight.requires_grad)
    fused.bias.copy_(bias)
    fused.train(conv.training)
    next_block.conv.conv = fused
    block.proj = nn.Identity()
    return True


class CrossChannelMix(nn.Module):
    """Cross-Channel Mix: fuse the skips of stages I-III through an RWKV channel mix at stage I's resolution.

    Skips are given shallow-to-deep (e1, e2, ...) and returned in the same order and shapes.
    """

    def __init__(self, skip_chs, drop_path: float = 0.0):
        super().__init__()
        skip_chs = list(skip_chs)
        c1 = skip_chs[0]
        self.skip_chs = skip_chs
        deep_first = skip_chs[::-1]
        self.projections = nn.ModuleList([nn.Conv2d(c, c1, 1, bias=True) for c in deep_first])
        dim = c1 * len(skip_chs)
        self.channel = ChannelMix(dim)
        self.channel.export_row_slices = EXPORT_ROW_SLICES  # stage I's rows are multiples of 8 in exported graphs
        self.ln1 = nn.LayerNorm(dim)
        self.final_projections = nn.ModuleList([nn.Conv2d(c1, c, 1, bias=True) for c in deep_first])
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, skips):
        deep_first = list(skips)[::-1]
        size = skips[0].shape[-2:]
        grid = (size[0], size[1])  # no int(): symbolic sizes stay symbolic under torch.export
        # A 1x1 conv (with bias) and a bilinear resize commute (the resize mixes pixels with weights that sum to
        # one, the conv mixes channels), so each conv runs at the lower of its two resolutions: project, then
        # upsample on the way in; downsample, then project on the way out. Same function, a fraction of the work.
        p = [resize_bilinear(proj(e), size) for proj, e in zip(self.projections, deep_first)]
        t = map_to_tokens(torch.cat(p, dim=1))
        del p  # at stage I's resolution: each projection is as large as a skip
        if self.training or torch.is_grad_enabled() or compiling():
            t = t + self.drop_path(self.ln1(self.channel(t, grid)))
        else:  # inference: the sum written over the normalised mix (addition commutes exactly)
            t = self.ln1(self.channel(t, grid)).add_(t)
        chunks = tokens_to_map(t, grid).chunk(len(deep_first), dim=1)
        out = [fp(resize_bilinear(c, e.shape[-2:])) for fp, c, e in zip(self.final_projections, chunks, deep_first)]
        return out[::-1]


#: Decoder block designs (paper Table 7), by the name :class:`DecoderBlock` takes.
DECODER_BLOCKS = ("c-d-c", "c-c-d", "conv")


class DecoderBlock(nn.Module):
    """Decoder block followed by x2 bilinear upsampling.

    ``c-d-c``: 1x1 (ReLU) -> k x k depthwise (SiLU) -> 1x1 (ReLU), the released design;
    ``c-c-d``: 1x1 (ReLU) -> 1x1 (ReLU) -> k x k depthwise (SiLU); ``conv``: one dense k x k conv (ReLU).
    """

    def __init__(self, in_chs: int, out_chs: int, kind: str = "c-d-c", kernel_size: int = 9):
        if kind not in DECODER_BLOCKS:
            raise ValueError(f"unknown decoder block {kind!r}; use one of {DECODER_BLOCKS}")
        super().__init__()
        if kind == "c-d-c":
            self.conv = ConvNormAct(in_chs, in_chs, 1, act_layer=nn.ReLU)
            self.conv_dw = ConvNormAct(in_chs, in_chs, kernel_size, groups=in_chs, act_layer=nn.SiLU)
            self.proj = ConvNormAct(in_chs, out_chs, 1, act_layer=nn.ReLU)
        elif kind == "c-c-d":
            self.conv = ConvNormAct(in_chs, in_chs, 1, act_layer=nn.ReLU)
            self.proj = ConvNormAct(in_chs, out_chs, 1, act_layer=nn.ReLU)
            self.conv_dw = ConvNormAct(out_chs, out_chs, kernel_size, groups=out_chs, act_layer=nn.SiLU)
        else:
            self.proj = ConvNormAct(in_chs, out_chs, kernel_size, act_layer=nn.ReLU)
        self.kind = kind

    def forward(self, x: torch.Tensor, upsample: bool = True) -> torch.Tensor:
        if self.kind == "c-d-c":
            x = self.proj(self.conv_dw(self.conv(x)))
        elif self.kind == "c-c-d":
            x = self.conv_dw(self.proj(self.conv(x)))
        else:
            x = self.proj(x)
        return upsample2x(x) if upsample else x


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
