"""RWKV-UNet segmenter as a transformers model.

encoder (timm ``rwkvunet_enc_*``, stem + stages I-IV) -> Cross-Channel Mix over the skips of stages I-III
-> four upsampling decoder blocks -> 1x1 head. Logits come out at the input size for any H, W.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import SemanticSegmenterOutput

from ...file_modes import give_default_mode
from ...layers import ChannelMix, CrossChannelMix, DecoderBlock, IRBlock, SpatialMix, upsample2x, vrwkv_init_values
from ..encoder import ENCODER_VARIANTS, MODEL_PREFIX, STEM_CHS, RWKVUNetEncoder
from .configuration_rwkv_unet import RWKVUNetConfig

SIZE_DIVISOR = 16  # total stride of the encoder


class RWKVUNetPreTrainedModel(PreTrainedModel):
    config_class = RWKVUNetConfig
    config: RWKVUNetConfig
    base_model_prefix = "rwkv_unet"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = []
    _can_compile_fullgraph = True
    # a timm-saved encoder carries its classifier norm and head, which the segmenter does not use
    _keys_to_ignore_on_load_unexpected = [r"^encoder\.(norm|head)\."]

    def _init_weights(self, module: nn.Module) -> None:
        """Re-creatable initialisation of every parameter and buffer (models are built on the meta device)."""
        if getattr(module, "_zero_init", False):  # a residual branch's last layer (config.zero_init_residual)
            init.zeros_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif module is getattr(self, "segmentation_head", None) or module in (getattr(self, "aux_heads", None) or ()):
            if self.config.head_init == "xavier":  # logits of about unit scale, as a plain CNN head
                init.xavier_uniform_(module.weight)
            else:  # small logits at the start
                init.trunc_normal_(module.weight, std=self.config.initializer_range)
            # a one-logit head starts at the foreground prior config.head_bias; several labels at 0
            init.constant_(module.bias, self.config.head_bias if module.out_channels == 1 else 0.0)
        elif isinstance(module, nn.Conv2d):
            fan_out = module.out_channels * module.kernel_size[0] * module.kernel_size[1] // module.groups
            init.normal_(module.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
            if module.weight is not None:
                init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
            if getattr(module, "running_mean", None) is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, (SpatialMix, ChannelMix)):
            spatial = isinstance(module, SpatialMix)
            if self.config.rwkv_init == "vrwkv":
                values = vrwkv_init_values(module.spatial_mix_k.shape[-1], module.layer_id, module.num_layers,
                                           spatial=spatial)
                for name, value in values.items():
                    init.copy_(getattr(module, name), value)
                return
            if spatial:
                init.zeros_(module.spatial_decay)
                init.zeros_(module.spatial_first)
            for name in ("spatial_mix_k", "spatial_mix_v", "spatial_mix_r") if spatial else ("spatial_mix_k",
                                                                                          "spatial_mix_r"):
                init.constant_(getattr(module, name), 0.5)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save; then the weights get the mode of the files beside them (safetensors >= 0.8 makes
        them readable by their owner only, see :mod:`rwkvunet.file_modes`)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        give_default_mode(Path(save_directory).glob("*.safetensors"))

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=checkpoint,
                                    every_n_layers: int = 1):
        for module in self.modules():
            if isinstance(module, RWKVUNetEncoder):
                module.set_grad_checkpointing(enable)
            if isinstance(module, RWKVUNetForSemanticSegmentation):
                module.gradient_checkpointing = enable


class RWKVUNetForSemanticSegmentation(RWKVUNetPreTrainedModel):
    """RWKV-UNet with a per-pixel classification head.

    Inputs of any height and width are zero-padded at the bottom and right to a multiple of 16 and the
    logits are cropped back, so they always come out at the input size.
    """

    def __init__(self, config: RWKVUNetConfig):
        super().__init__(config)
        arch = ENCODER_VARIANTS[config.variant]
        self.encoder = RWKVUNetEncoder(
            **arch,
            in_chans=config.in_channels,
            num_classes=0,
            global_pool="",
            drop_path_rate=config.drop_path_rate,
            mixer=config.spatial_mixer,
            mix_dw_conv=config.mix_dw_conv,
            mix_channel_mix=config.mix_channel_mix,
        )
        self.encoder.norm = nn.Identity()  # the classifier's norm; the decoder reads the raw stage IV map
        self.encoder.fold_stem = True  # features 1-4 only: reparameterize may fold the stem into stage I
        dims: Sequence[int] = arch["dims"]
        skip_chs = list(dims[:config.num_skips])
        self.ccm = CrossChannelMix(skip_chs, drop_path=config.ccm_drop_path_rate) if (
            config.use_ccm and skip_chs) else None
        decoder = []
        outs = [dims[2], dims[1], dims[0], STEM_CHS]
        in_chs = dims[3]
        for j, out_chs in enumerate(outs):
            skip_level = 3 - j  # 1-based stage of the skip joined before this block (3, 2, 1), 0 for none
            has_skip = j > 0 and skip_level + 1 <= config.num_skips
            cin = in_chs + (dims[skip_level] if has_skip else 0)
            decoder.append(DecoderBlock(cin, out_chs, config.decoder_block, config.decoder_kernel_size))
            in_chs = out_chs
        self.decoder = nn.ModuleList(decoder)
        self.segmentation_head = nn.Conv2d(STEM_CHS, config.num_labels, 1, bias=True)
        # deep supervision: a head on each decoder stage but the last (only when the config asks for it, so the
        # released checkpoints hold none)
        self.aux_heads = nn.ModuleList([nn.Conv2d(c, config.num_labels, 1, bias=True) for c in outs[:-1]]) if (
            config.deep_supervision) else None
        if config.zero_init_residual:
            for block in self.encoder.modules():
                if isinstance(block, IRBlock) and block.residual:
                    block.proj._zero_init = True
                    if block.mix_norm is not None:
                        block.mix_norm._zero_init = True
                    if block.channel_mix_norm is not None:
                        block.channel_mix_norm._zero_init = True
        self.gradient_checkpointing = False
        self.post_init()

    @classmethod
    def from_encoder_pretrained(cls, encoder: str = "rwkvunet_enc_b", *, pretrained_cfg_overlay: Optional[dict] = None,
                                **config_kwargs) -> "RWKVUNetForSemanticSegmentation":
        """A new segmenter around a pretrained timm encoder (its ImageNet weights, or a file / Hub repo given by
        ``pretrained_cfg_overlay``); the CCM, decoder and head start from scratch."""
        import timm

        name = encoder if encoder.startswith(MODEL_PREFIX) else MODEL_PREFIX + encoder
        config = RWKVUNetConfig(encoder_name=name, **config_kwargs)
        model = cls(config)
        pretrained = timm.create_model(
            name, pretrained=True, num_classes=0, in_chans=config.in_channels,
            pretrained_cfg_overlay=pretrained_cfg_overlay or {},
            mixer=config.spatial_mixer, mix_dw_conv=config.mix_dw_conv, mix_channel_mix=config.mix_channel_mix,
        )
        state = {k: v for k, v in pretrained.state_dict().items() if not k.startswith(("norm.", "head."))}
        missing, unexpected = model.encoder.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"encoder weights do not fit: missing {missing}, unexpected {unexpected}")
        return model

    # --- input checks ------------------------------------------------------------------------------------
    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        if not torch.is_tensor(pixel_values) or pixel_values.ndim != 4:
            shape = tuple(pixel_values.shape) if torch.is_tensor(pixel_values) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be a (batch, channels, height, width) tensor, got {shape}; "
                             "add a batch dimension with x[None] or use RWKVUNetImageProcessor")
        if not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values must be floating point, got {pixel_values.dtype}; convert with "
                            "x.float() (and scale, e.g. / 255) or use RWKVUNetImageProcessor")
        if pixel_values.shape[1] != self.config.in_channels:
            raise ValueError(f"pixel_values has {pixel_values.shape[1]} channels but this model takes "
                             f"{self.config.in_channels} (config.in_channels); convert the images "
                             "(e.g. grey <-> RGB) or build the model with in_channels="
                             f"{pixel_values.shape[1]}")

    def _check_labels(self, labels: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        if labels.ndim == 4 and labels.shape[1] == 1:
            labels = labels[:, 0]
        expected = (pixel_values.shape[0],) + tuple(pixel_values.shape[-2:])
        if tuple(labels.shape) != expected:
            raise ValueError(f"labels must have shape (batch, height, width) = {expected}, got {tuple(labels.shape)}")
        if labels.is_floating_point() and self.config.num_labels > 1:
            raise TypeError(f"labels must hold integer class indices, got {labels.dtype}; use labels.long()")
        if not torch.compiler.is_compiling():
            limit = max(self.config.num_labels, 2)
            bad = ((labels < 0) | (labels >= limit)) & (labels != self.config.semantic_loss_ignore_index)
            msg = (f"labels must be class indices in [0, {limit}) or the ignore index "
                   f"{self.config.semantic_loss_ignore_index}; check config.num_labels and the masks")
            if labels.device.type == "cpu":
                if bool(bad.any()):
                    raise ValueError(msg + f"; found {sorted(set(labels[bad].unique().tolist()))[:8]}")
            else:
                torch._assert_async(~bad.any(), msg)
        return labels

    # --- forward -----------------------------------------------------------------------------------------
    def _decode(self, block: nn.Module, x: torch.Tensor, upsample: bool = True) -> torch.Tensor:
        if self.gradient_checkpointing and self.training:
            return checkpoint(block, x, upsample, use_reentrant=False)
        return block(x, upsample)

    def forward(
            self,
            pixel_values: torch.Tensor,
            labels: Optional[torch.Tensor] = None,
            output_hidden_states: Optional[bool] = None,
            return_dict: Optional[bool] = None,
            **kwargs,
    ):
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, in_channels, height, width)`): any height and width;
            any floating-point dtype (cast to the model's); a batch of 0 gives empty logits.
        labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*): class indices; with
            `num_labels == 1`, 0/1 foreground masks. Returns the loss ce_weight * CE + dice_weight * Dice.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        self._check_pixel_values(pixel_values)
        # any floating-point input (float64 from numpy, say) runs in the model's dtype
        pixel_values = pixel_values.to(self.segmentation_head.weight.dtype)
        height, width = pixel_values.shape[-2:]
        pad_h, pad_w = (-height) % SIZE_DIVISOR, (-width) % SIZE_DIVISOR
        x = F.pad(pixel_values, (0, pad_w, 0, pad_h)) if (pad_h or pad_w) else pixel_values

        features = self.encoder.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
        hidden_states = tuple(features) if output_hidden_states else None
        skips: List[Optional[torch.Tensor]] = list(features[:self.config.num_skips])
        d = features[-1]
        del features  # each feature map is freed once the decoder has used it (large inputs: most of the memory)
        if self.ccm is not None:
            skips = self.ccm(skips)
        last = len(self.decoder) - 1
        supervise = self.aux_heads is not None and labels is not None and self.training
        stages = []  # decoder stage outputs for deep supervision (kept only when it is on)
        for j, block in enumerate(self.decoder):
            level = 3 - j  # index into skips [e1', e2', e3'] joined before block j (none before block 0)
            if j > 0 and level < len(skips):
                d = torch.cat([d, skips[level]], dim=1)
                skips[level] = None
            d = self._decode(block, d, upsample=j < last)
            if supervise and j < last:
                stages.append(d)
        # the 1x1 head and the last block's bilinear x2 upsampling commute: upsampling the few class maps
        # instead of the block's channels saves a full-resolution pass
        logits = upsample2x(self.segmentation_head(d))
        if pad_h or pad_w:
            logits = logits[..., :height, :width]
        logits = logits.contiguous()  # the decoder runs channels-last; hand back a plain NCHW tensor

        loss = None
        if labels is not None:
            labels = self._check_labels(labels, pixel_values)
            loss = segmentation_loss(logits, labels, self.config)
            if supervise:
                aux = [F.interpolate(head(stage), size=x.shape[-2:], mode="bilinear", align_corners=False)
                       [..., :height, :width] for head, stage in zip(self.aux_heads, stages)]
                aux_loss = sum(segmentation_loss(a, labels, self.config) for a in aux) / len(aux)
                loss = loss + self.config.deep_supervision_weight * aux_loss

        if not return_dict:
            out = (logits,) + ((hidden_states,) if hidden_states is not None else ())
            return ((loss,) + out) if loss is not None else out
        return SemanticSegmenterOutput(loss=loss, logits=logits, hidden_states=hidden_states)


def _soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over classes of 1 - (2 sum(p t) + s) / (sum(p^2) + sum(t^2) + s), over the whole batch (as TransUNet)."""
    smooth = 1e-5
    probs, target = probs * valid, target * valid
    dims = (0, 2, 3)
    intersect = (probs * target).sum(dims)
    denom = (probs * probs).sum(dims) + (target * target).sum(dims)
    return (1 - (2 * intersect + smooth) / (denom + smooth)).mean()


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, config: RWKVUNetConfig) -> torch.Tensor:
    """ce_weight * CE + dice_weight * softmax Dice (num_labels > 1), or BCE + sigmoid Dice (num_labels == 1)."""
    ignore = config.semantic_loss_ignore_index
    logits = logits.float()
    valid = (labels != ignore).unsqueeze(1).to(logits.dtype)
    if config.num_labels == 1:
        target = torch.where(labels == ignore, torch.zeros_like(labels), labels).to(logits.dtype).unsqueeze(1)
        ce = F.binary_cross_entropy_with_logits(logits, target, weight=valid, reduction="sum") / valid.sum().clamp_min(1)
        dice = _soft_dice_loss(torch.sigmoid(logits), target, valid)
    else:
        # mean over the labelled pixels; a batch with none gives 0, not 0 / 0 (as the binary loss does)
        ce = F.cross_entropy(logits, labels.long(), ignore_index=ignore, reduction="sum") / valid.sum().clamp_min(1)
        safe = torch.where(labels == ignore, torch.zeros_like(labels), labels).long()
        # one-hot by comparison: F.one_hot checks the label range by reading it on the host (a sync)
        classes = torch.arange(config.num_labels, device=labels.device).view(1, -1, 1, 1)
        target = (safe.unsqueeze(1) == classes).to(logits.dtype)
        dice = _soft_dice_loss(logits.softmax(dim=1), target, valid)
    return config.ce_weight * ce + config.dice_weight * dice


__all__ = ["RWKVUNetPreTrainedModel", "RWKVUNetForSemanticSegmentation", "DecoderBlock", "segmentation_loss"]
