"""``rwkvunet demo MODEL``: a web page on which to segment your own images and scans with a model.

Serves the page of :mod:`rwkvunet.demo` on 127.0.0.1 (``--port``) and prints its URL; ``--write-space DIR``
writes a Hugging Face Space running the same page instead, and ``--push SPACE_ID`` uploads it. Gradio is the
``demo`` extra (``pip install "rwkvunet[demo]"``); writing a Space does not need it.
"""
from __future__ import annotations

import argparse
import errno
import importlib.util
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from ..errors import UserError, device_name

DEFAULT_PORT = 7860


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="model folder (save_pretrained, e.g. a finetune.py "
                        "--output-dir), Hub id, or .onnx file from rwkvunet export")
    serve = parser.add_argument_group("serving")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT,
                       help=f"port of the page (default {DEFAULT_PORT}; 0: any free port)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 serves the "
                            "network, without any login)")
    run = parser.add_argument_group("running")
    run.add_argument("--device", default=None, type=device_name,
                     help="cpu, cuda, cuda:1, ... (default: CUDA when available)")
    run.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                     help="autocast precision (default: bf16 on CUDA, fp32 on CPU)")
    run.add_argument("--batch-size", type=int, default=8, help="slices or tiles per forward pass (default 8)")
    space = parser.add_argument_group("Hugging Face Space")
    space.add_argument("--write-space", type=Path, metavar="DIR",
                       help="write a Space running this page into DIR (new or empty): README.md with the "
                            "Space metadata, app.py, requirements.txt and, for a model folder, its files; "
                            "then exit")
    space.add_argument("--push", metavar="SPACE_ID",
                       help="upload the Space to the Hub as SPACE_ID (e.g. you/rwkvunet-demo), from "
                            "--write-space DIR or else a temporary folder; needs a token with write access")
    space.add_argument("--private", action="store_true", help="with --push: create the Space private")
    space.add_argument("--requirement", metavar="SPEC",
                       help="how the Space installs rwkvunet, the first line of its requirements.txt "
                            "(default: rwkvunet[demo,nifti]==<this version>; e.g. a git+https URL)")


def _check_args(args) -> None:
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {args.port}")
    if args.private and not args.push:
        raise UserError("--private applies to --push SPACE_ID; add --push or drop --private")
    if args.requirement is not None:
        check_requirement(args.requirement)
    if args.requirement is not None and not (args.write_space or args.push):  # it was silently ignored
        raise UserError("--requirement sets what a Space installs, and no Space is written; add --write-space DIR "
                        "or --push SPACE_ID, or drop it")
    if args.device and args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda asked but CUDA is not available here; use --device cpu")


def check_requirement(spec: str) -> None:
    """Refuse a --requirement the Space's pip would fail on at build time: a blank or multi-line one, or a
    malformed name specifier (URLs, paths and ``name @ URL`` pass as pip reads them)."""
    if not spec.strip() or "\n" in spec:
        raise UserError(f"--requirement {spec!r}: give one requirement line, e.g. 'rwkvunet[demo,nifti]==1.0'")
    if "://" in spec or spec.lstrip().startswith(("-", ".", "/")):
        return
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        Requirement(spec)
    except InvalidRequirement as err:
        reason = str(err).splitlines()[0]
        raise UserError(f"--requirement {spec!r} is not a valid requirement ({reason}); the Space's build would "
                        "fail on it. Give e.g. 'rwkvunet[demo,nifti]==1.0' or a git+https URL") from None


def free_port(host: str, port: int) -> int:
    """``port`` if nothing listens on it (any free port for 0); a port in use raises :class:`UserError`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} on {host} is in use; give another --port, or --port 0 for any free "
                                "one") from err
            raise UserError(f"cannot listen on {host} port {port}: {err.strerror}; check --host and --port") from err
        return sock.getsockname()[1]


def _space(args) -> int:
    from ..demo.callbacks import DemoModel
    from ..demo.space import check_space_folder, push_space, write_space

    if args.write_space is not None:
        check_space_folder(args.write_space)
    if args.push:
        from ..hub import check_hub_upload

        check_hub_upload(args.push, "--push")
    DemoModel.from_pretrained(args.model, device="cpu", batch_size=args.batch_size)  # it must load in the Space
    folder = args.write_space or Path(tempfile.mkdtemp(prefix="rwkvunet-space-")) / "space"
    write_space(args.model, folder, requirement=args.requirement)
    print(f"wrote a Space for {args.model} to {folder} (README.md, app.py, requirements.txt"
          f"{', model/' if (folder / 'model').is_dir() else ''}"
          f"{''.join(', ' + p.name for p in sorted(folder.glob('*.onnx')))}); try it with: python {folder / 'app.py'}",
          file=sys.stderr)
    if args.push:
        url = push_space(folder, args.push, private=args.private)  # on failure the folder stays, to upload later
        print(f"pushed the Space to {url}", file=sys.stderr)
        if args.write_space is None:  # a temporary folder of our own, uploaded: nothing to keep
            shutil.rmtree(folder.parent, ignore_errors=True)
    return 0


def run(args) -> int:
    _check_args(args)
    if args.write_space is not None or args.push:
        return _space(args)
    from ..demo.app import INSTALL_HINT, build_app
    from ..demo.callbacks import DemoModel

    if importlib.util.find_spec("gradio") is None:  # found before the model loads, imported after
        raise UserError(INSTALL_HINT)
    port = free_port(args.host, args.port)
    model = DemoModel.from_pretrained(args.model, device=args.device,
                                      dtype=None if args.dtype == "auto" else args.dtype, batch_size=args.batch_size)
    page = build_app(model)
    try:
        _, url, _ = page.launch(server_name=args.host, server_port=port, prevent_thread_lock=True, quiet=True,
                                ssr_mode=False, show_error=True)
    except OSError as err:  # taken between the check and the launch
        raise UserError(f"cannot serve on {args.host}:{port} ({err}); give another --port") from err
    print(f"rwkvunet demo: serving {args.model} at {url} (Ctrl-C to stop)", flush=True)
    page.block_thread()
    return 0
