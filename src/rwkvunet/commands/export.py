"""``rwkvunet export MODEL OUT.onnx``: a trained segmenter as an ONNX graph for ONNX Runtime (and other runtimes).

The graph takes ``pixel_values`` (batch, channels, height, width) float32 with any batch and any height and width
that are multiples of 16 from 48 up, and gives ``logits`` at the input size; BatchNorm is folded into the
convolutions. Before the file is written the graph runs in ONNX Runtime beside the PyTorch model on two input
shapes and must agree to 1e-4 of the largest logit. The file is written under a temporary name and renamed into
place, so a failed export leaves nothing; an existing OUT is kept unless ``--overwrite``. Its metadata holds the
model's config and pixel settings: ``rwkvunet predict OUT.onnx ...`` runs it with nothing else.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UserError

PROG = "rwkvunet export"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="model folder (save_pretrained) or Hub id")
    parser.add_argument("out", metavar="OUT.onnx", type=Path, help="the ONNX file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")


def run(args) -> int:
    from ..onnx_export import OPSET, export_onnx, require_onnx

    out: Path = args.out
    if out.suffix.lower() != ".onnx":
        raise UserError(f"{out}: give a file name ending in .onnx")
    if out.exists() and not args.overwrite:  # checked before the model is loaded (export_onnx checks it again)
        raise UserError(f"{out} already exists; pass --overwrite to replace it, or give another path")
    if out.is_dir():
        raise UserError(f"{out} is a folder; give the path of the .onnx file to write")
    if not out.parent.exists():
        raise UserError(f"{out.parent} does not exist; create the folder first or give another path")
    opset = OPSET if args.opset is None else args.opset  # --opset 0 was taken as the default
    if opset < 17:
        raise UserError(f"--opset {opset} is too old: the graph needs LayerNormalization (opset 17 or later)")
    require_onnx()
    import onnx

    if opset > onnx.defs.onnx_opset_version():
        raise UserError(f"--opset {opset} is newer than the installed onnx {onnx.__version__} knows (opset "
                        f"{onnx.defs.onnx_opset_version()} at most); give 17 to {onnx.defs.onnx_opset_version()}")

    from ..hub import load_segmentation_model
    from ..inference import load_preprocessing

    model = load_segmentation_model(args.model)
    pixels = load_preprocessing(args.model, int(model.config.in_channels))
    print(f"exporting {args.model} ({model.config.variant}, {model.config.in_channels} input channel(s), "
          f"{model.config.num_labels} labels) to ONNX opset {opset} ...", file=sys.stderr)
    _, report = export_onnx(model.eval(), out, pixels=pixels, overwrite=args.overwrite, opset=opset)
    print(f"wrote {out} ({report.bytes / 2 ** 20:.1f} MiB, {report.seconds:.0f} s): dynamic batch, height and width "
          f"(multiples of 16, at least 48); agrees with PyTorch to {report.max_relative_error:.1e} of the largest "
          f"logit", file=sys.stderr)
    return 0
