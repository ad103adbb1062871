"""Segmenters as ONNX graphs, checked against PyTorch before anything is written.

:func:`export_onnx` takes a segmenter (an ``RWKVUNetForSemanticSegmentation``, or any module mapping pixels to
logits), folds its BatchNorms into the convolutions (``timm.utils.reparameterize_model``, on a copy), captures
the forward with ``torch.export`` for any batch and any height and width that are multiples of 16 from 48 up,
translates it to ONNX (opset 18, the dynamo exporter), runs the graph in ONNX Runtime beside the eager model
on two input shapes and only then moves the file into place. Under ``torch.export`` the model's layers take
the forms ONNX Runtime runs well (see ``torch.compiler.is_exporting()`` in :mod:`rwkvunet.layers`): the same
function, the same values to float rounding.

Exported graphs take inputs whose height and width are multiples of 16 (the encoder's stride) and at least 48
(the stage-IV grid must hold 3 tokens a side); :class:`rwkvunet.backends.OnnxRuntimeSegmenter` pads other
sizes the way the PyTorch model pads them. The file carries the model's config and pixel settings as
metadata, so ``rwkvunet predict model.onnx ... --backend onnxruntime`` needs nothing else.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .errors import UserError
from .file_modes import give_default_mode
from .ops.bi_wkv import exclusive_cumsum_as_one_op

__all__ = [
    "CHECK_RTOL", "INPUT_NAME", "METADATA_CONFIG", "METADATA_PIXELS", "MIN_SIZE", "OPSET", "OUTPUT_NAME",
    "SIZE_MULTIPLE", "ExportCheckError", "ExportReport", "LogitsOnly", "check_onnx", "export_onnx", "read_metadata",
    "require_onnx", "to_onnx",
]

OPSET = 18
SIZE_MULTIPLE = 16  # the encoder's total stride
MIN_SIZE = 48  # three stage-IV tokens a side: export treats sizes 0 and 1 specially
CHECK_RTOL = 1e-4  # largest |ONNX - eager| allowed, relative to the largest |eager logit|
INPUT_NAME, OUTPUT_NAME = "pixel_values", "logits"
METADATA_CONFIG = "rwkvunet.config"  # the model's config.json
METADATA_PIXELS = "rwkvunet.preprocessor_config"  # its image processor settings (rwkvunet.pixels.PixelConfig)
# batch 2, 64 x 80: every dimension the graph keeps symbolic differs from the others and is above 1
EXAMPLE_SHAPE = (2, 64, 80)
CHECK_SHAPES = ((2, 64, 80), (1, 48, 112))


class ExportCheckError(RuntimeError):
    """The exported graph does not compute what the PyTorch model computes (nothing was written)."""


class LogitsOnly(nn.Module):
    """``pixel_values -> logits`` of a transformers segmenter: the one input and output an exported graph has."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values, return_dict=False)[0]


def require_onnx() -> None:
    """UserError naming the extra to install when onnx, onnxscript or onnxruntime is missing."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"ONNX export and ONNX Runtime need {', '.join(missing)}; pip install 'rwkvunet[onnx]'")


def _logits_module(model: nn.Module) -> nn.Module:
    """A float32 CPU copy of the model in eval mode with BatchNorm folded, called with pixels only."""
    from timm.utils import reparameterize_model

    fused = reparameterize_model(model.eval())  # a copy: the caller's model is untouched
    fused = fused.to("cpu", torch.float32).eval()
    takes_pixel_values = hasattr(model, "config") and hasattr(model, "main_input_name")
    return LogitsOnly(fused) if takes_pixel_values else fused


def _eager_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    with torch.no_grad():
        if hasattr(model, "config") and hasattr(model, "main_input_name"):
            out = model(pixel_values=x.to(device), return_dict=False)[0]
        else:
            out = model(x.to(device))
    return out.float().cpu()


@contextlib.contextmanager
def _quiet():
    """The exporter reports its steps on stdout; keep them off a command's output."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _onnx_exclusive_cumsum(x, reverse: bool):
    """rwkvunet::exclusive_cumsum (sums along dim 1) as ONNX's CumSum with its exclusive and reverse attributes."""
    from onnxscript import opset18 as op

    return op.CumSum(x, op.Constant(value_int=1), exclusive=1, reverse=1 if reverse else 0)


#: the translations of this package's own operators for ``torch.onnx.export``
CUSTOM_TRANSLATIONS = {torch.ops.rwkvunet.exclusive_cumsum.default: _onnx_exclusive_cumsum}


def to_onnx(model: nn.Module, in_channels: int, opset: int = OPSET):
    """The model as an in-memory ``onnx.ModelProto`` with dynamic batch, height and width (unchecked)."""
    from torch.export import Dim

    require_onnx()
    module = _logits_module(model)
    batch, height, width = EXAMPLE_SHAPE
    x = torch.randn(batch, in_channels, height, width)
    dynamic = {0: Dim("batch", min=1), 2: SIZE_MULTIPLE * Dim("height_16", min=MIN_SIZE // SIZE_MULTIPLE),
               3: SIZE_MULTIPLE * Dim("width_16", min=MIN_SIZE // SIZE_MULTIPLE)}
    with torch.no_grad(), _quiet(), exclusive_cumsum_as_one_op():
        program = torch.export.export(module, (x,), dynamic_shapes=({0: dynamic[0], 2: dynamic[2], 3: dynamic[3]},))
        onnx_program = torch.onnx.export(program, (x,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                                         output_names=[OUTPUT_NAME], verbose=False,
                                         custom_translation_table=CUSTOM_TRANSLATIONS)
    proto = onnx_program.model_proto
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:  # torch's exporter falls back to its own opset when it cannot convert
        raise ValueError(f"the exporter wrote opset {written} instead of the requested {opset}; request opset "
                         f"{OPSET} (or one it converts to)")
    return proto


def check_onnx(onnx_model, model: nn.Module, in_channels: int, shapes: Sequence[Tuple[int, int, int]] = CHECK_SHAPES,
               rtol: float = CHECK_RTOL) -> float:
    """Run the graph (a ``ModelProto``, bytes or a path) in ONNX Runtime and the model in PyTorch on random
    inputs of each (batch, height, width); returns the largest error relative to the largest logit and raises
    :class:`ExportCheckError` above ``rtol``."""
    from .backends import onnxruntime_session

    session = onnxruntime_session(onnx_model)
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for batch, height, width in shapes:
        x = torch.randn(batch, in_channels, height, width, generator=generator)
        want = _eager_logits(model, x)
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
        got = torch.from_numpy(got)
        if got.shape != want.shape:
            raise ExportCheckError(f"the exported graph gives logits of shape {tuple(got.shape)} for input "
                                   f"{tuple(x.shape)}, PyTorch {tuple(want.shape)}")
        scale = float(want.abs().max()) or 1.0
        error = float((got - want).abs().max()) / scale
        if not error <= rtol:  # NaN fails too
            raise ExportCheckError(f"the exported graph differs from PyTorch by {error:.2e} of the largest logit "
                                   f"for input {tuple(x.shape)} (allowed {rtol:g})")
        worst = max(worst, error)
    return worst


@dataclass
class ExportReport:
    path: Optional[Path]
    max_relative_error: float
    seconds: float
    bytes: int


def _model_metadata(model: nn.Module, pixels=None) -> Dict[str, str]:
    metadata = {}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        metadata[METADATA_CONFIG] = config.to_json_string(use_diff=False)
    if pixels is not None:
        metadata[METADATA_PIXELS] = json.dumps(pixels.to_processor_kwargs())
    return metadata


def _in_channels(model: nn.Module, in_channels: Optional[int]) -> int:
    if in_channels is not None:
        return int(in_channels)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "in_channels"):
        return int(config.in_channels)
    raise ValueError("in_channels is needed for a model without a config")


def export_onnx(model: nn.Module, path: Union[str, os.PathLike, None], *, in_channels: Optional[int] = None,
                pixels=None, overwrite: bool = False, check: bool = True, opset: int = OPSET) -> Tuple[bytes, ExportReport]:
    """Export ``model`` to ONNX, check it against PyTorch, and write it to ``path`` (None: keep it in memory).

    ``pixels`` (a :class:`rwkvunet.pixels.PixelConfig`) and the model's config go into the file's metadata.
    The file is written beside ``path`` under a temporary name and renamed into place once the check passed,
    so a failed export leaves nothing; an existing ``path`` is refused unless ``overwrite``. Returns the
    serialised model and an :class:`ExportReport`.
    """
    import onnx

    require_onnx()
    target = Path(path) if path is not None else None
    if target is not None:
        _check_target(target, overwrite)
    start = time.perf_counter()
    channels = _in_channels(model, in_channels)
    proto = to_onnx(model, channels, opset=opset)
    onnx.helper.set_model_props(proto, _model_metadata(model, pixels))
    data = proto.SerializeToString()
    error = check_onnx(data, model, channels) if check else float("nan")
    if target is not None:
        _write_atomically(target, data, overwrite)
    return data, ExportReport(target, error, time.perf_counter() - start, len(data))


def _check_target(target: Path, overwrite: bool) -> None:
    if target.is_dir():
        raise UserError(f"{target} is a folder; give the path of the .onnx file to write")
    if target.exists() and not overwrite:
        raise UserError(f"{target} already exists; pass --overwrite to replace it, or give another path")
    if not target.parent.exists():
        raise UserError(f"{target.parent} does not exist; create the folder first or give another path")
    if not os.access(target.parent, os.W_OK):
        raise UserError(f"{target.parent} is not writable; give another path")


def _write_atomically(target: Path, data: bytes, overwrite: bool) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        give_default_mode([tmp])  # mkstemp's 0600 would keep other users (a serving container) from reading it
        if not overwrite and target.exists():  # appeared while exporting
            raise UserError(f"{target} already exists; pass --overwrite to replace it, or give another path")
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def read_metadata(onnx_model) -> Dict[str, str]:
    """The metadata of an ONNX model (a path or bytes) as a dict."""
    import onnx

    if isinstance(onnx_model, (bytes, bytearray)):
        proto = onnx.load_model_from_string(bytes(onnx_model), load_external_data=False)
    else:
        proto = onnx.load(str(onnx_model), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}
