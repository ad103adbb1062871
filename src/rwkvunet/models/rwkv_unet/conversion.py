"""Key mapping from the authors' segmenter checkpoints to :class:`RWKVUNetForSemanticSegmentation`."""
from __future__ import annotations

import re
from typing import Dict, Tuple

import torch

from ...errors import UserError
from ..encoder import _unwrap, remap_authors_encoder_key

_UNUSED_ENCODER = re.compile(r"^encoder\.(norm|head)\.|\.(ln2)\.")


def convert_authors_state_dict(state_dict: Dict[str, torch.Tensor], model) -> Tuple[Dict[str, torch.Tensor], list]:
    """Rename the authors' segmenter keys to this model's and drop what their forward never reads.

    Returns the new state_dict and the dropped keys. 3-channel first-conv weights are summed over input
    channels for 1-channel models (the authors repeat a grey image to three channels).
    """
    state_dict = _unwrap(state_dict)
    state_dict = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    own = model.state_dict()
    out, dropped = {}, []
    for key, value in state_dict.items():
        if value.dtype in (torch.float16, torch.bfloat16):
            value = value.float()
        new = key
        if key.startswith("encoder."):
            new = "encoder." + remap_authors_encoder_key(key[len("encoder."):])
        else:
            new = re.sub(r"^decoder([1-4])\.", lambda m: f"decoder.{int(m.group(1)) - 1}.", new)
            new = new.replace(".conv_local.", ".conv_dw.")
            new = re.sub(r"^final_conv\.", "segmentation_head.", new)
        if new not in own:
            dropped.append(key)
            continue
        out[new] = value
    first = "encoder.stem.conv.conv.weight"
    if first in out and out[first].shape[1] != own[first].shape[1]:
        if own[first].shape[1] == 1:
            out[first] = out[first].sum(dim=1, keepdim=True)
        else:
            raise UserError(f"the checkpoint's first conv takes {out[first].shape[1]} channel(s), the model "
                            f"{own[first].shape[1]}; convert with {_channel_choices(out[first].shape[1])}")
    return out, dropped


def _channel_choices(checkpoint_channels: int) -> str:
    """The --in-channels values a checkpoint converts to: its own, or 1 (RGB weights summed for grey)."""
    if checkpoint_channels == 1:
        return "--in-channels 1"
    return f"--in-channels {checkpoint_channels} or 1"
