"""``rwkvunet predict MODEL INPUT... --out DIR``: label maps and overlays for images, folders and NIfTI volumes.

Per image: ``<name>_labels.png`` (uint8 class indices, the image's size) and ``<name>_overlay.png``; per volume:
``<name>_labels.nii.gz`` (``<name>_labels.nii`` for a ``.nii`` input; uint8, the input's shape, affine and header
geometry) and ``<name>_montage.png``. Folders keep their layout under ``--out``; ``labels.json`` there names each
label value and its colour.

No existing file is replaced without ``--overwrite``, and an input never is: every output path and ``--out``
itself are checked before the model is loaded. Exit status: 0 all done, 1 some files could not be segmented (the
others are written), 2 nothing done (bad arguments, model, inputs or outputs).
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .. import inference_io as io
from ..backends import BACKENDS, is_onnx_file
from ..errors import EXIT_NOTHING_DONE, EXIT_OK, EXIT_PARTIAL, UserError, device_name, print_error
from ..inference import (CT_AIR_THRESHOLD, CT_WINDOW, InputConversionWarning, Segmenter, choose_intensity,
                         match_channels, prepare_volume)
from ..pixels import clean_volume


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="model folder (save_pretrained), Hub id, or .onnx file "
                        "written by rwkvunet export")
    parser.add_argument("inputs", metavar="INPUT", nargs="+",
                        help="images (PNG, JPEG, TIFF, BMP), NIfTI volumes (.nii, .nii.gz) or folders of them")
    parser.add_argument("--out", "-o", required=True, type=Path,
                        help="output folder (created if needed): <name>_labels.png and <name>_overlay.png per "
                             "image; <name>_labels.nii.gz (<name>_labels.nii for a .nii input) and "
                             "<name>_montage.png per volume; labels.json. Existing files are kept unless "
                             "--overwrite")
    vol = parser.add_argument_group("volumes")
    vol.add_argument("--axis", type=int, default=2, help="slice axis of NIfTI volumes (default 2: axial for "
                     "RAS-stored scans)")
    intensity = vol.add_mutually_exclusive_group()
    intensity.add_argument("--window", nargs=2, type=float, metavar=("LOW", "HIGH"),
                           help="clip to [LOW, HIGH] (e.g. HU) and scale to [0, 1]")
    intensity.add_argument("--ct", action="store_true",
                           help=f"CT: the window [{CT_WINDOW[0]:g}, {CT_WINDOW[1]:g}] HU of the Synapse data")
    intensity.add_argument("--mri-minmax", action="store_true", help="MRI: per-volume min-max to [0, 1]")
    size = parser.add_argument_group("image size (default: resize to the training size when the model's "
                                     "preprocessor_config.json says so, else the whole image as it is)")
    mode = size.add_mutually_exclusive_group()
    mode.add_argument("--tile", type=int, metavar="N",
                      help="predict at native resolution in N x N tiles (memory bounded by N), e.g. 512")
    mode.add_argument("--native", action="store_true", help="predict the whole image at native resolution")
    size.add_argument("--overlap", type=int, default=None,
                      help="pixels shared by neighbouring tiles of --tile (default 64, at most a quarter of the "
                           "tile)")
    run = parser.add_argument_group("running")
    run.add_argument("--tta", action="store_true", help="average over left-right and up-down flips")
    run.add_argument("--device", default=None, type=device_name,
                     help="cpu, cuda, cuda:1, ... (default: CUDA when available)")
    run.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                     help="autocast precision (default: bf16 on CUDA, fp32 on CPU)")
    run.add_argument("--batch-size", type=int, default=8, help="slices or tiles per forward pass (default 8)")
    run.add_argument("--backend", choices=BACKENDS, default=None,
                     help="where the model runs: eager PyTorch (default), compile (torch.compile) or onnxruntime "
                          "(CPU, float32; a model folder is exported first, an .onnx file runs as it is)")
    out = parser.add_argument_group("outputs")
    out.add_argument("--color", action="store_true", help="also write <name>_labels_color.png for viewing")
    out.add_argument("--alpha", type=float, default=0.5, help="overlay opacity (default 0.5)")
    out.add_argument("--overwrite", action="store_true",
                     help="replace output files that already exist under --out (never an input file)")


PROG = "rwkvunet predict"
LEGEND = io.LEGEND
#: How many clashing paths an error message lists before giving the count.
SHOWN = 3


def _check_args(args) -> Optional[str]:
    """The first problem with the options, or None."""
    if args.window is not None and not args.window[0] < args.window[1]:
        return f"--window needs LOW < HIGH, got {args.window[0]:g} {args.window[1]:g}"
    if args.tile is not None and args.tile < 16:
        return f"--tile must be at least 16 pixels, got {args.tile}"
    if args.overlap is not None and args.tile is None:  # it was silently ignored
        return f"--overlap {args.overlap} sets how much tiles overlap, and there are no tiles; add --tile N or drop it"
    if args.tile is not None and not 0 <= args.overlap < args.tile:
        return f"--overlap must be between 0 and the tile size minus 1, got {args.overlap}"
    if not -3 <= args.axis <= 2:
        return f"--axis must be 0, 1 or 2 (a slice axis of a 3-D volume), got {args.axis}"
    if args.batch_size < 1:
        return f"--batch-size must be positive, got {args.batch_size}"
    if not 0 <= args.alpha <= 1:
        return f"--alpha must be between 0 and 1, got {args.alpha}"
    if args.device and args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            return "--device cuda asked but CUDA is not available here; use --device cpu"
    return None


class _Outputs:
    """Output names under --out that keep the input folders' layout and never collide."""

    def __init__(self, out: Path):
        self.out = out
        self.used: set = set()

    def base(self, file: Path, root: Path) -> Path:
        rel_parent = file.parent.relative_to(root) if file.parent != root else Path()
        stem = io.strip_extension(file)
        base = self.out / rel_parent / stem
        if base in self.used:  # e.g. img.png and img.jpg side by side
            base = self.out / rel_parent / f"{stem}_{file.name[len(stem):].lstrip('.').replace('.', '_')}"
        n = 2
        while base in self.used:
            base, n = self.out / rel_parent / f"{stem}_{n}", n + 1
        self.used.add(base)
        return base


def _output_names(file: Path, base: Path, args) -> Dict[str, Path]:
    """The files one input gets, by role: the one place that names outputs (labels keep a volume's .nii or
    .nii.gz)."""
    if io.file_kind(file) == "volume":
        ext = ".nii.gz" if file.name.lower().endswith(".gz") else ".nii"
        return {"labels": Path(f"{base}_labels{ext}"), "montage": Path(f"{base}_montage.png")}
    names = {"labels": Path(f"{base}_labels.png"), "overlay": Path(f"{base}_overlay.png")}
    if args.color:
        names["color"] = Path(f"{base}_labels_color.png")
    return names


def _plan(files: List[Tuple[Path, Path]], args) -> List[Tuple[Path, Path, Dict[str, Path]]]:
    """``(file, base, output names)`` for every input, decided before anything runs."""
    outputs = _Outputs(args.out)
    plan = []
    for file, root in files:
        base = outputs.base(file, root)
        plan.append((file, base, _output_names(file, base, args)))
    return plan


def _listing(paths: List[str]) -> str:
    shown = ", ".join(paths[:SHOWN])
    return shown + (f" and {len(paths) - SHOWN} more" if len(paths) > SHOWN else "")


def _check_inputs_outside_out(args) -> None:
    """Files under --out are skipped as earlier outputs, so an input folder inside --out would be skipped."""
    out = args.out.resolve()
    for raw in args.inputs:
        folder = Path(raw)
        if folder.is_dir() and (folder.resolve() == out or out in folder.resolve().parents):
            raise UserError(f"--out {args.out} holds the input folder {folder}, whose files would be taken for "
                            "earlier outputs; give an --out outside the inputs (e.g. a new folder beside them)")


def _check_clashes(plan, files: List[Tuple[Path, Path]], args) -> None:
    """Refuse to replace an input (ever) or an existing file (without --overwrite), listing the first few."""
    inputs = {file.resolve(): file for file, _ in files}
    on_inputs = [f"{path} (an input; output of {file})" for file, _, names in plan for path in names.values()
                 if path.resolve() in inputs]
    if on_inputs:
        raise UserError(f"{len(on_inputs)} output(s) would replace input files: {_listing(on_inputs)}; give "
                        "another --out (--overwrite never replaces an input)")
    if args.overwrite:
        return
    existing = [str(path) for _, _, names in plan for path in names.values() if path.exists()]
    legend = args.out / LEGEND
    if legend.exists() and not io.is_legend(legend):
        existing.append(f"{legend} (not written by rwkvunet predict)")
    if existing:
        raise UserError(f"{len(existing)} output file(s) already exist: {_listing(existing)}; pass --overwrite to "
                        "replace them, or give another --out")


def _check_legend(path: Path, names: dict, overwrite: bool) -> None:
    """An earlier run's labels.json for other labels describes the files it wrote: keep it without --overwrite."""
    if overwrite or not path.exists() or json.loads(path.read_text(encoding="utf-8")) == io.legend(names):
        return
    raise UserError(f"{path} names other labels than this model's (it describes an earlier run's outputs); pass "
                    "--overwrite to replace it, or give another --out")


def _intensity(args, volume: np.ndarray) -> Tuple[object, str]:
    """The intensity preparation asked for, or the one chosen from the values, and why."""
    if args.window is not None:
        return (args.window[0], args.window[1]), "--window"
    if args.ct:
        return "ct", "--ct"
    if args.mri_minmax:
        return "minmax", "--mri-minmax"
    if choose_intensity(volume) == "ct":
        return "ct", f"chosen because it holds values below {CT_AIR_THRESHOLD:g} (CT in HU); " \
                     "give --mri-minmax or --window to change"
    return "minmax", f"chosen because it holds no values below {CT_AIR_THRESHOLD:g} (not CT in HU); " \
                     "give --ct or --window to change"


def _segment_image(seg: Segmenter, args, file: Path, base: Path, notes: Counter, say) -> List[Path]:
    image = io.read_image(file)
    with warnings.catch_warnings(record=True) as caught:  # the pixel path's channel note, said here once
        warnings.simplefilter("always", InputConversionWarning)
        labels = seg.predict_image(image, tile=args.tile, overlap=args.overlap, native=args.native)
    for note in {str(w.message) for w in caught if issubclass(w.category, InputConversionWarning)}:
        if not notes[note]:
            say(f"note: {file}: {note}")
        notes[note] += 1
    names = _output_names(file, base, args)
    written = [io.save_png(names["labels"], labels),
               io.save_png(names["overlay"], io.overlay(image, labels, args.alpha))]
    if args.color:
        written.append(io.save_png(names["color"], io.colorize(labels)))
    return written


def _segment_volume(seg: Segmenter, args, file: Path, base: Path, notes: Counter, say) -> List[Path]:
    data, img = io.read_volume(file)
    data, cleaned = clean_volume(data)
    axis = args.axis
    intensity, why = _intensity(args, data)
    prepared, how = prepare_volume(data, intensity)
    say(f"{file}: shape {data.shape}, {data.shape[axis]} slices along axis {axis % 3}; intensity: {how} ({why})"
        + (f"; note: {cleaned}" if cleaned else ""))
    if seg.in_channels != 1:
        note = match_channels(np.zeros((1, 1), np.float32), seg.in_channels)[1]
        if not notes[note]:
            say(f"note: {file}: volume slices: {note}")
        notes[note] += 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputConversionWarning)
        labels = seg.predict_volume(prepared, axis=axis, batch_size=args.batch_size, intensity=None,
                                    native=args.native, tile=args.tile, overlap=args.overlap, progress=True)
    names = _output_names(file, base, args)
    written = [io.save_nifti_labels(names["labels"], labels, img)]
    picks = io.montage_slices(labels, axis)
    grid = io.montage([np.take(prepared, k, axis=axis) for k in picks],
                      [np.take(labels, k, axis=axis) for k in picks], alpha=args.alpha)
    written.append(io.save_png(names["montage"], grid))
    return written


def _load(args) -> Segmenter:
    if args.backend == "onnxruntime" and not is_onnx_file(args.model):
        print(f"exporting {args.model} to ONNX and checking it against PyTorch (a minute or more; "
              "rwkvunet export writes a file to reuse)", file=sys.stderr)
    try:
        return Segmenter.from_pretrained(args.model, device=args.device,
                                         dtype=None if args.dtype == "auto" else args.dtype,
                                         tta=args.tta, batch_size=args.batch_size, backend=args.backend)
    except UserError:
        raise
    except (OSError, ValueError) as err:  # e.g. a preprocessor_config.json that does not fit the model
        raise UserError(f"cannot load the model {args.model}: {err}") from err


def _prepare(args) -> Tuple[List[Tuple[Path, Path]], list]:
    """The inputs and the output plan, with every check that needs no model; raises UserError."""
    if args.tile is not None and args.overlap is None:
        from ..inference import default_overlap

        args.overlap = default_overlap(args.tile)  # --tile 64 alone was refused (overlap 64 >= 64)
    problem = _check_args(args)
    if problem:
        raise UserError(problem)
    io.check_output_folder(args.out, "--out")
    _check_inputs_outside_out(args)
    earlier_outputs: List[Path] = []
    files = io.find_inputs(args.inputs, exclude=args.out, skipped=earlier_outputs)
    for folder in earlier_outputs:
        print(f"note: skipped {folder}: it holds an earlier rwkvunet predict output ({LEGEND}), not inputs",
              file=sys.stderr)
    if not files:
        raise UserError(f"no images or NIfTI volumes found in {' '.join(map(str, args.inputs))} "
                        f"(formats: {io.supported_formats()})")
    if any(io.file_kind(f) == "volume" for f, _ in files):
        try:
            io.require_nibabel()
        except ImportError as err:
            raise UserError(str(err)) from err
    plan = _plan(files, args)
    _check_clashes(plan, files, args)
    return files, plan


def run(args) -> int:
    files, plan = _prepare(args)
    seg = _load(args)
    _check_legend(args.out / LEGEND, seg.label_names, args.overwrite)

    from tqdm.auto import tqdm

    pre = seg.preprocessing
    mode = (f"tiles of {args.tile} px overlapping by {args.overlap}" if args.tile else
            "native resolution" if args.native or pre.size is None else f"resized to {pre.size[0]}x{pre.size[1]}")
    print(f"model: {args.model} ({seg.in_channels} input channel(s), {seg.num_classes} classes); "
          f"{seg.device.type} {str(seg.dtype).replace('torch.', '')} ({seg.backend}); {mode}; "
          f"TTA {'on' if seg.tta else 'off'}; "
          f"preprocessing from {pre.source}", file=sys.stderr)
    notes: Counter = Counter()
    failed: Dict[Path, str] = {}
    written: List[Path] = []

    def say(message: str) -> None:
        tqdm.write(message, file=sys.stderr)

    bar = tqdm(plan, unit="file", desc="predict", file=sys.stderr, disable=None)
    for file, base, _ in bar:
        segment = _segment_volume if io.file_kind(file) == "volume" else _segment_image
        try:
            written += segment(seg, args, file, base, notes, say)
        except (UserError, OSError) as err:
            failed[file] = str(err) if str(file) in str(err) else f"{file}: {err}"
            say(f"{PROG}: error: {failed[file]}")
        except torch.cuda.OutOfMemoryError:
            failed[file] = f"{file}: out of device memory"
            say(f"{PROG}: error: {file}: out of device memory; use --tile 512 (or smaller), a smaller "
                "--batch-size or --device cpu")
            torch.cuda.empty_cache()
    return _summary(args, seg, files, failed, written, notes)


def _summary(args, seg, files, failed: Dict[Path, str], written: List[Path], notes: Counter) -> int:
    """Write the legend when something was written, say what was done, and return the exit status."""
    for note, count in notes.items():
        if count > 1:
            print(f"note: {note} ({count} files)", file=sys.stderr)
    if not written:
        print_error(PROG, f"nothing written: none of the {len(files)} input(s) could be segmented (see above); "
                          "fix or remove them and run again")
        return EXIT_NOTHING_DONE
    io.save_legend(args.out / LEGEND, seg.label_names)
    print(f"wrote {len(written)} files for {len(files) - len(failed)} of {len(files)} inputs to {args.out} "
          f"(label values, names and overlay colours in {LEGEND})", file=sys.stderr)
    if failed:
        print_error(PROG, f"{len(failed)} input(s) could not be segmented: {_listing([str(f) for f in failed])}; "
                          "the others were written")
        return EXIT_PARTIAL
    return EXIT_OK
