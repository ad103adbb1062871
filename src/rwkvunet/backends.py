"""Where a segmenter's forward runs for inference: eager PyTorch, ``torch.compile``, or ONNX Runtime.

:func:`inference_model` turns a segmenter into the module predictions run, called as
``module(pixel_values=x).logits`` whatever the backend, so :class:`rwkvunet.Segmenter`, ``rwkvunet predict``
and ``rwkvunet bench`` choose a backend by name (:data:`BACKENDS`) and share everything else:

- ``eager``: the model with BatchNorm folded into its convolutions (``timm.utils.reparameterize_model``, a copy);
- ``compile``: the same, through ``torch.compile``;
- ``onnxruntime``: the model exported to ONNX and checked against PyTorch (:mod:`rwkvunet.onnx_export`), run by
  ONNX Runtime on the CPU in float32 (:class:`OnnxRuntimeSegmenter`); an ``.onnx`` file written by
  ``rwkvunet export`` loads without the PyTorch weights.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SemanticSegmenterOutput

from .errors import UserError

__all__ = ["BACKENDS", "OnnxRuntimeSegmenter", "check_backend", "inference_model", "is_onnx_file",
           "onnxruntime_session"]

#: Inference backends by name, in the order the benchmark reports them.
BACKENDS = ("eager", "compile", "onnxruntime")


def check_backend(backend: str) -> str:
    """The backend name, or a UserError listing :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    return backend


def is_onnx_file(path: Union[str, os.PathLike]) -> bool:
    return str(path).lower().endswith(".onnx") and Path(path).is_file()


def inference_model(model: nn.Module, backend: str = "eager") -> nn.Module:
    """The module a backend runs for ``model`` (eval mode; the model itself is not changed)."""
    from timm.utils import reparameterize_model

    check_backend(backend)
    if isinstance(model, OnnxRuntimeSegmenter):
        if backend != "onnxruntime":
            raise UserError(f"an exported ONNX model runs with the onnxruntime backend, not {backend}")
        return model
    if backend == "onnxruntime":
        return OnnxRuntimeSegmenter.from_model(model)
    fused = reparameterize_model(model.eval())  # a fused copy: the model stays loadable and trainable
    return torch.compile(fused, dynamic=None) if backend == "compile" else fused


def onnxruntime_session(onnx_model, threads: Optional[int] = None):
    """An ONNX Runtime CPU session with every graph optimisation, for a path, bytes or ``ModelProto``.

    ``threads`` (intra-op) defaults to ``torch.get_num_threads()``, so both runtimes use the same cores."""
    import onnxruntime as ort

    if hasattr(onnx_model, "SerializeToString"):
        onnx_model = onnx_model.SerializeToString()
    elif isinstance(onnx_model, os.PathLike):
        onnx_model = str(onnx_model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])


class OnnxRuntimeSegmenter(nn.Module):
    """An exported segmenter run by ONNX Runtime on the CPU in float32, called like the PyTorch model:
    ``model(pixel_values=x).logits``.

    Exported graphs take heights and widths that are multiples of 16 from 48 up; other sizes are zero-padded at
    the bottom and right to the next multiple of 16, exactly as the PyTorch model pads them, and the logits
    cropped back, so any image of at least 33 pixels a side gives the PyTorch model's logits. ``config`` (the
    model's, or the one stored in the file) and ``pixels`` (its :class:`rwkvunet.pixels.PixelConfig`, if the
    file records one) describe the model to :class:`rwkvunet.Segmenter`.
    """

    def __init__(self, onnx_model, config=None, pixels=None, threads: Optional[int] = None):
        super().__init__()
        self.session = onnxruntime_session(onnx_model, threads)
        self.config = config
        self.pixels = pixels

    @classmethod
    def from_model(cls, model: nn.Module, threads: Optional[int] = None) -> "OnnxRuntimeSegmenter":
        """Export ``model`` in memory (checked against PyTorch, see :func:`rwkvunet.onnx_export.export_onnx`)."""
        from .onnx_export import export_onnx

        data, _ = export_onnx(model, None)
        return cls(data, config=getattr(model, "config", None), threads=threads)

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike], threads: Optional[int] = None) -> "OnnxRuntimeSegmenter":
        """Load a file written by ``rwkvunet export`` (its metadata holds the config and pixel settings)."""
        from .models.rwkv_unet import RWKVUNetConfig
        from .onnx_export import METADATA_CONFIG, METADATA_PIXELS, read_metadata, require_onnx
        from .pixels import PixelConfig

        require_onnx()
        try:
            metadata = read_metadata(path)
        except Exception as err:  # onnx raises its own DecodeError / ValidationError types
            raise UserError(f"{path}: cannot read it as an ONNX model ({type(err).__name__}); export it again with "
                            "rwkvunet export") from err
        if METADATA_CONFIG not in metadata:
            raise UserError(f"{path} holds no RWKV-UNet config in its metadata; write it with rwkvunet export")
        config = RWKVUNetConfig.from_dict(json.loads(metadata[METADATA_CONFIG]))
        pixels = None
        if METADATA_PIXELS in metadata:
            pixels = PixelConfig.from_processor_dict(json.loads(metadata[METADATA_PIXELS]), config.in_channels,
                                                     source=f"{path} (metadata)")
        return cls(str(path), config=config, pixels=pixels, threads=threads)

    def forward(self, pixel_values: torch.Tensor, return_dict: bool = True, **kwargs):
        from .onnx_export import INPUT_NAME, MIN_SIZE, OUTPUT_NAME, SIZE_MULTIPLE

        x = pixel_values.detach().to("cpu", torch.float32)
        batch, _, height, width = x.shape
        pad_h, pad_w = (-height) % SIZE_MULTIPLE, (-width) % SIZE_MULTIPLE
        if min(height + pad_h, width + pad_w) < MIN_SIZE:
            raise UserError(f"the onnxruntime backend takes images of at least {MIN_SIZE - SIZE_MULTIPLE + 1} pixels "
                            f"a side, got {height}x{width}; use the eager backend for smaller ones")
        if batch == 0:
            channels = self.session.get_outputs()[0].shape[1]
            logits = x.new_zeros((0, channels if isinstance(channels, int) else 1, height, width))
        else:
            if pad_h or pad_w:
                x = F.pad(x, (0, pad_w, 0, pad_h))
            (out,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: x.contiguous().numpy()})
            logits = torch.from_numpy(out)[..., :height, :width]
        return SemanticSegmenterOutput(logits=logits) if return_dict else (logits,)
