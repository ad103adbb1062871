"""RWKV-UNet segmenter configuration."""
from __future__ import annotations

from transformers import PreTrainedConfig

from ...layers import DECODER_BLOCKS, SPATIAL_MIXERS
from ..encoder import ENCODER_VARIANTS, MODEL_PREFIX


#: Starts of the RWKV decay, bonus and token-shift mixes (``RWKVUNetConfig.rwkv_init``).
RWKV_INITS = ("vrwkv", "uniform")
#: Starts of the classification head (``RWKVUNetConfig.head_init``).
HEAD_INITS = ("xavier", "small")


class RWKVUNetConfig(PreTrainedConfig):
    r"""Configuration of [`RWKVUNetForSemanticSegmentation`]. Defaults build the paper's RWKV-UNet-B.

    Args:
        variant (`str`, defaults to `"b"`): encoder size, a registered encoder variant (`"t"`, `"s"`, `"b"`).
        encoder_name (`str`, *optional*): explicit timm encoder name (`rwkvunet_enc_<variant>`); overrides
            `variant`.
        in_channels (`int`, defaults to 3): channels of `pixel_values` (1 for CT/MRI slices).
        num_labels (`int`): output classes including background; 1 means binary with a sigmoid.
        ce_weight, dice_weight (`float`): loss = ce_weight * cross-entropy + dice_weight * Dice loss.
        semantic_loss_ignore_index (`int`, defaults to 255): label value that the loss ignores.
        drop_path_rate (`float`, defaults to 0.05): stochastic depth of the encoder (linear over blocks).
        ccm_drop_path_rate (`float`, defaults to 0.05): stochastic depth on the Cross-Channel Mix.
        spatial_mixer (`str`, defaults to `"rwkv"`): token mixer in stages III-IV: `"rwkv"`, `"attention"`
            (multi-head self-attention) or `"none"` (paper Table 2).
        mix_dw_conv (`bool`, defaults to True): depthwise conv after the spatial mix (paper Table A1).
        mix_channel_mix (`bool`, defaults to False): RWKV channel mix after the spatial mix (paper Table 8).
        decoder_block (`str`, defaults to `"c-d-c"`): `"c-d-c"` (1x1 -> depthwise -> 1x1), `"c-c-d"`
            (1x1 -> 1x1 -> depthwise) or `"conv"` (one dense conv), each followed by x2 upsampling (Table 7).
        decoder_kernel_size (`int`, defaults to 9): kernel of the decoder's depthwise (or dense) conv.
        num_skips (`int`, defaults to 3): skip connections kept, shallowest first (0-3, Table 9).
        use_ccm (`bool`, defaults to True): fuse the skips with the Cross-Channel Mix (Table 9).
        image_size (`int`, defaults to 224): training resolution (informational; any size runs).
        rwkv_init (`str`, defaults to `"vrwkv"`): start of the decay, bonus and token-shift mixes of a model
            built from scratch: `"vrwkv"` (Vision-RWKV's per-channel, per-depth ranges) or `"uniform"` (decay
            and bonus 0, mixes 0.5). Loaded weights replace it; it never changes what a checkpoint computes.
        zero_init_residual (`bool`, defaults to False): start every residual branch of the encoder at zero (its
            last 1x1 conv and the LayerNorm after the spatial mix), so each block starts as the identity.
        deep_supervision (`bool`, defaults to False): add a 1x1 head on each of the first three decoder stages
            whose loss (upsampled to the labels) is added with `deep_supervision_weight`; training only, the
            logits are unchanged. Off for the released checkpoints.
        deep_supervision_weight (`float`, defaults to 0.4): weight of the mean auxiliary loss.
        head_init (`str`, defaults to `"xavier"`): start of the 1x1 classification head(s) of a model built
            from scratch: `"xavier"` (Xavier uniform: logits of about unit scale, as a plain CNN head; trains
            markedly faster from scratch) or `"small"` (normal, std `initializer_range`: near-zero logits).
        head_bias (`float`, defaults to 0.0): start of the bias of a one-logit (binary, sigmoid) head built from
            scratch, the logit of the foreground probability every pixel starts at (`finetune.py` uses -2: about
            0.12, so the first steps are not spent pulling background down from 0.5). Heads of several labels
            start at 0. Loaded weights replace it.
    """

    model_type = "rwkv_unet"

    def __init__(
            self,
            variant: str = "b",
            encoder_name: str | None = None,
            in_channels: int = 3,
            ce_weight: float = 0.5,
            dice_weight: float = 0.5,
            semantic_loss_ignore_index: int = 255,
            drop_path_rate: float = 0.05,
            ccm_drop_path_rate: float = 0.05,
            spatial_mixer: str = "rwkv",
            mix_dw_conv: bool = True,
            mix_channel_mix: bool = False,
            decoder_block: str = "c-d-c",
            decoder_kernel_size: int = 9,
            num_skips: int = 3,
            use_ccm: bool = True,
            image_size: int = 224,
            initializer_range: float = 0.02,
            rwkv_init: str = "vrwkv",
            zero_init_residual: bool = False,
            deep_supervision: bool = False,
            deep_supervision_weight: float = 0.4,
            head_init: str = "xavier",
            head_bias: float = 0.0,
            **kwargs,
    ):
        if encoder_name is not None:
            names = tuple(MODEL_PREFIX + v for v in ENCODER_VARIANTS)
            if encoder_name not in names:
                raise ValueError(f"encoder_name must be one of {names}, got {encoder_name!r}")
            variant = encoder_name[len(MODEL_PREFIX):]
        if variant not in ENCODER_VARIANTS:
            raise ValueError(f"variant must be one of {tuple(ENCODER_VARIANTS)}, got {variant!r}")
        if spatial_mixer not in SPATIAL_MIXERS:
            raise ValueError(f"spatial_mixer must be one of {tuple(SPATIAL_MIXERS)}, got {spatial_mixer!r}")
        if decoder_block not in DECODER_BLOCKS:
            raise ValueError(f"decoder_block must be one of {DECODER_BLOCKS}, got {decoder_block!r}")
        if not 0 <= int(num_skips) <= 3:
            raise ValueError(f"num_skips must be between 0 and 3, got {num_skips}")
        if rwkv_init not in RWKV_INITS:
            raise ValueError(f"rwkv_init must be one of {RWKV_INITS}, got {rwkv_init!r}")
        if head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {HEAD_INITS}, got {head_init!r}")
        if int(in_channels) < 1:
            raise ValueError(f"in_channels must be positive, got {in_channels}")
        _check_settings(decoder_kernel_size=decoder_kernel_size, drop_path_rate=drop_path_rate,
                        ccm_drop_path_rate=ccm_drop_path_rate, ce_weight=ce_weight, dice_weight=dice_weight,
                        deep_supervision_weight=deep_supervision_weight, image_size=image_size,
                        initializer_range=initializer_range)
        self.variant = variant
        self.encoder_name = MODEL_PREFIX + variant
        self.in_channels = int(in_channels)
        self.ce_weight = float(ce_weight)
        self.dice_weight = float(dice_weight)
        self.semantic_loss_ignore_index = int(semantic_loss_ignore_index)
        self.drop_path_rate = float(drop_path_rate)
        self.ccm_drop_path_rate = float(ccm_drop_path_rate)
        self.spatial_mixer = spatial_mixer
        self.mix_dw_conv = bool(mix_dw_conv)
        self.mix_channel_mix = bool(mix_channel_mix)
        self.decoder_block = decoder_block
        self.decoder_kernel_size = int(decoder_kernel_size)
        self.num_skips = int(num_skips)
        self.use_ccm = bool(use_ccm)
        self.image_size = int(image_size)
        self.initializer_range = float(initializer_range)
        self.rwkv_init = rwkv_init
        self.zero_init_residual = bool(zero_init_residual)
        self.deep_supervision = bool(deep_supervision)
        self.deep_supervision_weight = float(deep_supervision_weight)
        self.head_init = head_init
        self.head_bias = float(head_bias)
        super().__init__(**kwargs)
        if self.num_labels < 1:
            given = kwargs.get("num_labels", self.num_labels)
            raise ValueError(f"num_labels must be at least 1 (1: binary, with a sigmoid; N: N classes with the "
                             f"background), got {given}")


def _check_settings(decoder_kernel_size, drop_path_rate, ccm_drop_path_rate, ce_weight, dice_weight,
                    deep_supervision_weight, image_size, initializer_range) -> None:
    """Refuse values the model would take and then fail on (or silently train wrong with) far from here."""
    if int(decoder_kernel_size) < 1 or int(decoder_kernel_size) % 2 == 0:
        raise ValueError(f"decoder_kernel_size must be a positive odd number (the released decoder uses 9), got "
                         f"{decoder_kernel_size}: an even kernel changes the size of the decoder's maps")
    for name, rate in (("drop_path_rate", drop_path_rate), ("ccm_drop_path_rate", ccm_drop_path_rate)):
        if not 0.0 <= float(rate) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {rate}")
    for name, weight in (("ce_weight", ce_weight), ("dice_weight", dice_weight),
                         ("deep_supervision_weight", deep_supervision_weight)):
        if not float(weight) >= 0.0:
            raise ValueError(f"{name} must be a weight of at least 0, got {weight}")
    if float(ce_weight) + float(dice_weight) <= 0.0:
        raise ValueError("ce_weight and dice_weight are both 0, so the loss would be 0 and nothing would train; "
                         "give either a positive weight (the paper: ce 0.5, dice 0.5)")
    if int(image_size) < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
    if not float(initializer_range) >= 0.0:
        raise ValueError(f"initializer_range must be a standard deviation of at least 0, got {initializer_range}")


__all__ = ["HEAD_INITS", "RWKV_INITS", "RWKVUNetConfig"]
