"""RWKV-UNet encoder as timm models: ``rwkvunet_enc_t``, ``rwkvunet_enc_s``, ``rwkvunet_enc_b``.

A stem block at full resolution, then four stages at strides 2, 4, 8, 16. Stages I-II are inverted
residual (IR) blocks, stages III-IV add Vision-RWKV spatial mixing (IR-RWKV blocks). The classifier
(ImageNet pretraining) is LayerNorm2d -> global average pool -> Linear.

Paper: RWKV-UNet: Improving UNet with Long-Range Cooperation for Effective Medical Image Segmentation
(arXiv 2501.08458).
"""

import re
from contextlib import nullcontext
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm2d, SelectAdaptivePool2d, register_notrace_function
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..hub import encoder_repo_id
from ..layers import IRBlock, fold_projection

__all__ = ["RWKVUNetEncoder", "ENCODER_VARIANTS", "PRETRAINED_TAGS", "checkpoint_filter_fn", "register_variant",
           "unregister_variant", "released_variants"]

#: ``name -> model_args`` of every registered ``rwkvunet_enc_<name>``; filled only by :func:`register_variant`
#: (the variants themselves are declared once, at the end of this module). The segmenter config, the command
#: line, training and the benchmark take their choices from here.
ENCODER_VARIANTS: Dict[str, Dict[str, Tuple]] = {}
#: ``name -> tags`` of the ImageNet weights the authors released for a variant (empty: none released).
PRETRAINED_TAGS: Dict[str, Tuple[str, ...]] = {}
STEM_CHS = 24
STEM_MID_CHS = 3  # the stem's expansion is 1 on 3 RGB channels; kept at 3 for any in_chans


class EncoderStage(nn.Sequential):
    """A stage's blocks, run on a channels-last map (optionally with gradient checkpointing)."""

    def __init__(self, *blocks: nn.Module):
        super().__init__(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels-last maps: 1x1 convs become plain matmuls, and the LayerNorm2d permutes and the
        # map <-> token conversions of the mixing blocks become views instead of copies
        x = x.contiguous(memory_format=torch.channels_last)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self, x)
        for block in self:
            x = block(x)
        return x


@register_notrace_function  # checks the input's shape and dtype: branches FX cannot trace
def prepare_input(x: torch.Tensor, in_chans: int, dtype: torch.dtype) -> torch.Tensor:
    """Checks the channel count and casts floating-point input (e.g. float64) to the weights' ``dtype``.

    Shape and dtype checks only, so tracing (torch.compile, torch.export) sees no data-dependent branch.
    """
    if x.ndim != 4 or x.shape[1] != in_chans:
        shape = "(" + ", ".join([str(n) for n in x.shape]) + ")"
        raise ValueError(f"expected input of shape (batch, {in_chans}, height, width) for in_chans={in_chans}, "
                         f"got {shape}")
    if not x.is_floating_point():
        raise TypeError(f"expected floating-point input, got {x.dtype}; convert with x.float() (and scale, "
                        "e.g. / 255)")
    if x.dtype != dtype:
        x = x.to(dtype)
    return x


def _make_stage(in_chs, out_chs, depth, expansion, norm, mixer, drop_path_rates, **block_kwargs) -> EncoderStage:
    """Block 0 downsamples (stride 2, twice the expansion, no mixer, no residual); the rest mix and add."""
    blocks = []
    for j in range(depth):
        first = j == 0
        cin = in_chs if first else out_chs
        blocks.append(IRBlock(
            cin, out_chs, int(cin * expansion * (2 if first else 1)),
            stride=2 if first else 1,
            norm=norm,
            mixer=None if first else mixer,
            residual=not first,
            drop_path=drop_path_rates[j],
            **(block_kwargs if not first else {}),
        ))
    return EncoderStage(*blocks)


class RWKVUNetEncoder(nn.Module):
    """RWKV-UNet encoder / ImageNet classifier.

    Args:
        depths, dims, expansions: per stage I-IV.
        in_chans: input channels; only the stem's first 1x1 conv depends on it.
        num_classes: classifier outputs (0 for none).
        global_pool: 'avg' (default), 'max', 'avgmax' or '' (no pooling).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, linearly increasing over the blocks of stages I-IV.
        mixer: spatial mixer in stages III-IV: 'rwkv' (default), 'attention' or 'none'.
        mix_dw_conv: keep the depthwise conv after the mixer (stages III-IV).
        mix_channel_mix: add an RWKV channel mix after the spatial mix (stages III-IV).
    """
    __jit_unused_properties__ = ["stages"]

    def __init__(
            self,
            depths: Sequence[int] = (3, 3, 6, 3),
            dims: Sequence[int] = (48, 72, 144, 240),
            expansions: Sequence[float] = (2, 2.5, 4, 4),
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.05,
            mixer: str = "rwkv",
            mix_dw_conv: bool = True,
            mix_channel_mix: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f"in_chans must be a positive number of input channels (1 grey, 3 RGB), got {in_chans!r}")
        if not len(depths) == len(dims) == len(expansions) == 4:
            raise ValueError(f"depths, dims and expansions give one value per stage I-IV (four each), got "
                             f"{tuple(depths)}, {tuple(dims)}, {tuple(expansions)}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.depths, self.dims, self.expansions = tuple(depths), tuple(dims), tuple(expansions)
        self.grad_checkpointing = False
        # Set by a model that never reads feature 0 (the segmenter): reparameterize may then fold the stem's
        # projection into stage I, and the stem's output stops being a feature.
        self.fold_stem = False
        self.stem_folded = False

        # timm factory kwargs: parameters are created on `device` (e.g. "meta" for a free structural check)
        with torch.device(device) if device is not None else nullcontext():
            self.stem = IRBlock(in_chans, STEM_CHS, STEM_MID_CHS, norm=None, residual=False, se=True)
            self.feature_info = [dict(num_chs=STEM_CHS, reduction=1, module="stem")]
            dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
            in_chs, start = STEM_CHS, 0
            for i, (depth, dim, exp) in enumerate(zip(depths, dims, expansions)):
                mixes = i >= 2
                stage = _make_stage(
                    in_chs, dim, depth, exp,
                    norm="ln" if mixes else "bn",
                    mixer=mixer if mixes else None,
                    drop_path_rates=dpr[start:start + depth],
                    **(dict(dw_conv=mix_dw_conv, channel_mix=mix_channel_mix) if mixes else {}),
                )
                self.add_module(f"stage{i + 1}", stage)
                self.feature_info.append(dict(num_chs=dim, reduction=2 ** (i + 1), module=f"stage{i + 1}"))
                in_chs, start = dim, start + depth
            mixing = [b for b in self.modules() if isinstance(b, IRBlock) and b.mix is not None]
            for layer_id, block in enumerate(mixing):  # the depth of each mixing block, for vrwkv_init_values
                for token_mixer in (block.mix, block.channel_mix):
                    if token_mixer is not None:
                        token_mixer.layer_id, token_mixer.num_layers = layer_id, len(mixing)
            self.num_features = self.head_hidden_size = dims[-1]
            self.norm = LayerNorm2d(self.num_features, eps=1e-6)
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
            self.head_drop = nn.Dropout(drop_rate)
            self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if dtype is not None:
            self.to(dtype=dtype)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """With ``fold_stem``: the stem's last 1x1 conv and stage I's first one become one conv (see
        :func:`rwkvunet.layers.fold_projection`), so the 24-channel map at full resolution is never computed.
        Called by ``timm.utils.reparameterize_model`` before it folds the BatchNorms of the children."""
        stage1 = getattr(self, "stage1", None)
        if self.fold_stem and not self.stem_folded and isinstance(stage1, EncoderStage) and len(stage1) > 0:
            self.stem_folded = fold_projection(self.stem, stage1[0])

    # --- timm model contract -------------------------------------------------------------------------
    @property
    def stages(self) -> List[nn.Module]:
        return [getattr(self, f"stage{i + 1}") for i in range(len(self.depths))]

    @torch.jit.ignore
    def no_weight_decay(self):
        keys = ("spatial_decay", "spatial_first", "spatial_mix_")
        return {n for n, _ in self.named_parameters() if any(k in n for k in keys)}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(
            stem=r"^stem",
            blocks=r"^stage(\d+)" if coarse else [(r"^stage(\d+)\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable
        for stage in self.stages:
            if isinstance(stage, EncoderStage):
                stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.num_classes = num_classes
        ref = self.stem.conv.conv.weight  # a new head follows the model's device and dtype
        self.head = (nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
                     if num_classes > 0 else nn.Identity())
        self.global_pool.train(self.training)  # new modules follow the model's train/eval mode
        self.head.train(self.training)

    def _prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return prepare_input(x, self.in_chans, self.stem.conv.conv.weight.dtype)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Outputs of the stem (index 0) and stages I-IV (1-4); ``norm`` applies the final norm to the last."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        x = self._prepare_input(x).contiguous(memory_format=torch.channels_last)
        modules = [self.stem] + self.stages
        take_indices, max_index = feature_take_indices(len(modules), indices)
        if self.stem_folded and 0 in take_indices:
            raise ValueError("feature 0 (the stem's output) no longer exists: reparameterize folded the stem's "
                             "projection into stage I; take it from a model that was not reparameterized")
        if stop_early:
            modules = modules[:max_index + 1]
        intermediates = []
        for i, module in enumerate(modules):
            x = module(x)
            if i in take_indices:
                y = self.norm(x) if (norm and i == len(self.depths)) else x
                intermediates.append(y.permute(0, 2, 3, 1) if output_fmt == "NHWC" else y)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ):
        """Drop the stages after the last index taken (and the head); returns the indices kept."""
        take_indices, max_index = feature_take_indices(1 + len(self.depths), indices)
        for i in range(max_index + 1, 1 + len(self.depths)):
            setattr(self, f"stage{i}", nn.Identity())
        if prune_norm or max_index < len(self.depths):
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._prepare_input(x).contiguous(memory_format=torch.channels_last)
        x = self.stem(x)
        # the stages one by one, not in a loop: TorchScript cannot iterate over a list of modules
        x = self.stage1(x)
        x = self.stage2(x)
        x = self.stage3(x)
        x = self.stage4(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(x))
        if pre_logits:
            return x
        if self.global_pool.is_identity():  # unpooled: the classifier runs at every position, as a 1x1 conv would
            return self.head(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --- the authors' checkpoints ---------------------------------------------------------------------------
_RENAMES = (
    (r"^stage0\.0\.", "stem."),
    (r"\.att\.", ".mix."),
    (r"\.ln1\.", ".mix_norm."),
    (r"\.conv_local\.", ".conv_dw."),
    (r"\.proj\.conv\.weight$", ".proj.weight"),
    (r"(^|\.)norm\.norm\.", r"\1norm."),
)
_UNUSED = re.compile(r"\.(ln2|ln1|att)\.|^(stage0\.0\.(norm|ln1|ln2|att)\.)")


def _unwrap(state_dict: dict) -> dict:
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state_dict.get(key), dict):
            return state_dict[key]
    return state_dict


def remap_authors_encoder_key(key: str) -> str:
    """Map one key of the authors' encoder state_dict to this model's name for the same tensor."""
    for pattern, repl in _RENAMES:
        key = re.sub(pattern, repl, key)
    return key


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> Dict[str, torch.Tensor]:
    """Accept the authors' encoder checkpoint (or this model's own), drop the weights their forward never
    uses, and rename the rest to this model's names."""
    state_dict = _unwrap(state_dict)
    if any(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    if any(k.startswith("encoder.") for k in state_dict):
        state_dict = {k[len("encoder."):]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    # half-precision releases are widened first, so that adapting the first conv (summing its input
    # channels for in_chans=1) does not round the sum back to half precision
    state_dict = {k: v.float() if v.dtype in (torch.float16, torch.bfloat16) else v for k, v in state_dict.items()}
    if "stem.conv.conv.weight" in state_dict:  # already in this model's layout
        return state_dict
    own = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        new = remap_authors_encoder_key(key)
        if new not in own and (_UNUSED.search(key) or key.startswith("stage0.0.")):
            continue  # spatial-mix weights and norms their forward never reads
        out[new] = value
    return out


# --- registration ---------------------------------------------------------------------------------------
def _create_encoder(variant: str, pretrained: bool = False, **kwargs) -> RWKVUNetEncoder:
    size = variant[len(MODEL_PREFIX):]
    out_indices = _check_out_indices(kwargs.pop("out_indices", (0, 1, 2, 3, 4)))
    model_args = dict(ENCODER_VARIANTS[size], **kwargs)
    return build_model_with_cfg(
        RWKVUNetEncoder,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, flatten_sequential=False),
        **model_args,
    )


def _check_out_indices(out_indices):
    """Feature indices are 0 (stem) to 4 (stage IV), or -5 to -1 from the end; refused at creation, not later."""
    n = 1 + len(next(iter(ENCODER_VARIANTS.values()))["depths"])
    indices = (out_indices,) if isinstance(out_indices, int) else tuple(out_indices)
    bad = [i for i in indices if not isinstance(i, int) or not -n <= i < n]
    if bad or not indices:
        raise ValueError(f"out_indices must be feature indices 0 (stem) to {n - 1} (stage IV), or -{n} to -1; "
                         f"got {out_indices!r}")
    return out_indices


#: The authors' repository publishes no licence for their weights, so none is claimed for them (timm's
#: 'unknown', as for other weights without published terms); the code's Apache-2.0 does not cover them.
WEIGHTS_LICENSE_NOTE = ("The RWKV-UNet authors' repository publishes no licence for these weights; the "
                        "rwkvunet code's Apache-2.0 licence does not cover them.")


def _cfg(**kwargs):
    return {
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (14, 14),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv.conv",
        "classifier": "head",
        "license": "unknown",
        "notes": (WEIGHTS_LICENSE_NOTE,),
        "paper_ids": "arXiv:2501.08458",
        "paper_name": "RWKV-UNet: Improving UNet with Long-Range Cooperation for Effective Medical Image Segmentation",
        "origin_url": "https://github.com/juntaoJianggavin/RWKV-UNet",
        **kwargs,
    }


MODEL_PREFIX = "rwkvunet_enc_"
default_cfgs: Dict[str, object] = {}  # timm's register_model reads a variant's pretrained cfgs from here


def register_variant(name: str, *, pretrained: Sequence[str] = (), doc: Optional[str] = None,
                     **model_args) -> Callable[..., RWKVUNetEncoder]:
    """Register the timm model ``rwkvunet_enc_<name>`` built from ``model_args`` (``depths``, ``dims``,
    ``expansions``, and any other :class:`RWKVUNetEncoder` argument).

    ``pretrained`` names the tags of released ImageNet weights (Hub repo ``<org>/rwkvunet_enc_<name>.<tag>``);
    a variant without them is created from scratch and ``rwkvunet convert`` refuses its checkpoints.
    """
    if not name or not re.fullmatch(r"[a-z0-9_]+", name):
        raise ValueError(f"a variant name is lower-case letters, digits and '_', got {name!r}")
    if name in ENCODER_VARIANTS:
        raise ValueError(f"variant {name!r} is already registered; unregister_variant({name!r}) first")
    shapes = [model_args.get(k) for k in ("depths", "dims", "expansions")]
    if any(v is None or len(v) != 4 for v in shapes):
        raise ValueError(f"variant {name!r} needs depths, dims and expansions with one value per stage I-IV "
                         f"(four each), got {shapes}")
    model_name = MODEL_PREFIX + name
    cfgs = {f"{model_name}.{tag}": _cfg(hf_hub_id=encoder_repo_id(name, tag)) for tag in pretrained}
    default_cfgs.update(generate_default_cfgs(cfgs or {model_name: _cfg()}))

    def entrypoint(pretrained: bool = False, **kwargs) -> RWKVUNetEncoder:
        return _create_encoder(model_name, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = model_name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = doc or f"RWKV-UNet encoder variant {name!r}."
    ENCODER_VARIANTS[name] = dict(model_args)
    PRETRAINED_TAGS[name] = tuple(pretrained)
    globals()[model_name] = register_model(entrypoint)
    return entrypoint


def unregister_variant(name: str) -> None:
    """Remove a variant added by :func:`register_variant` (from this table and from timm's registry)."""
    from timm.models import _registry

    if name not in ENCODER_VARIANTS:
        raise ValueError(f"variant {name!r} is not registered; registered: {', '.join(ENCODER_VARIANTS)}")
    model_name = MODEL_PREFIX + name
    del ENCODER_VARIANTS[name], PRETRAINED_TAGS[name]
    default_cfgs.pop(model_name, None)
    globals().pop(model_name, None)
    if model_name in __all__:
        __all__.remove(model_name)
    _registry._model_entrypoints.pop(model_name, None)
    _registry._clear_model_entries(model_name)


def released_variants() -> Tuple[str, ...]:
    """The variants whose weights the authors released (the ones ``rwkvunet convert`` reads)."""
    return tuple(name for name, tags in PRETRAINED_TAGS.items() if tags)


# --- the variants ---------------------------------------------------------------------------------------
register_variant(
    "t", pretrained=("in1k",), doc="RWKV-UNet-T encoder (2.94M parameters used; ImageNet-1k top-1 76.5).",
    depths=(2, 2, 4, 2), dims=(32, 48, 96, 160), expansions=(2, 2.5, 3, 3.5),
)
register_variant(
    "s", pretrained=("in1k",), doc="RWKV-UNet-S encoder (9.42M parameters used; ImageNet-1k top-1 80.5).",
    depths=(3, 3, 6, 3), dims=(32, 64, 128, 192), expansions=(2, 2.5, 3, 4),
)
register_variant(
    "b", pretrained=("in1k",), doc="RWKV-UNet-B encoder (16.69M parameters used; ImageNet-1k top-1 81.3).",
    depths=(3, 3, 6, 3), dims=(48, 72, 144, 240), expansions=(2, 2.5, 4, 4),
)
