"""The ``rwkvunet`` command. Each subcommand lives in ``rwkvunet.commands.<name>`` and is imported only when used.

Errors follow :mod:`rwkvunet.errors`: one line ``rwkvunet <command>: error: ...`` and exit status 2 for a mistake
the user can fix, 1 when only some inputs failed, 3 for a bug; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import run_main

# name -> (module, one-line help)
COMMANDS = {
    "convert": ("rwkvunet.commands.convert", "convert an authors' checkpoint into a transformers or timm folder"),
    "predict": ("rwkvunet.commands.predict", "segment images, folders and NIfTI volumes with a trained model"),
    "data": ("rwkvunet.commands.data", "turn a medical data set layout into a datasets.DatasetDict on disk"),
    "bench": ("rwkvunet.commands.bench", "measure training and inference speed and memory"),
    "finetune": ("rwkvunet.commands.finetune", "fine-tune RWKV-UNet with Accelerate (needs rwkvunet[train])"),
    "evaluate": ("rwkvunet.commands.evaluate", "score a trained segmenter with the paper's metrics"),
    "export": ("rwkvunet.commands.export", "export a trained segmenter to ONNX, checked against PyTorch"),
    "demo": ("rwkvunet.commands.demo", "a web page to segment your own images and scans; a Hugging Face Space"),
    "compare": ("rwkvunet.commands.compare", "fine-tune RWKV-UNet and a reference model alike; one table, one plot"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="rwkvunet", description="RWKV-UNet medical image segmentation")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    parser.add_argument("--version", action="store_true", help="the versions of rwkvunet and what it runs on")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    if argv[0] in ("--version", "-V"):
        print(versions())
        return 0
    name = argv[0]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        parser.error(f"unknown command {name!r}{hint}; choose from {', '.join(COMMANDS)}")
    module = importlib.import_module(COMMANDS[name][0])
    prog = f"rwkvunet {name}"
    sub_parser = argparse.ArgumentParser(prog=prog, description=COMMANDS[name][1])
    module.add_arguments(sub_parser)
    sub_parser.add_argument("--debug", action="store_true",
                            help="show the full traceback of an error (also RWKVUNET_DEBUG=1)")
    args = sub_parser.parse_args(argv[1:])
    return run_main(prog, lambda: _run(module, args), debug=args.debug)


def versions() -> str:
    """``rwkvunet X (torch Y, transformers Z, timm W, CUDA ...)``: the line a bug report starts with."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    import torch

    cuda = f"CUDA {torch.version.cuda}, {'a GPU' if torch.cuda.is_available() else 'no GPU'} here" \
        if torch.version.cuda else "CPU build"
    parts = ", ".join(f"{name} {installed(name)}" for name in ("torch", "transformers", "timm", "accelerate"))
    from . import __version__

    return f"rwkvunet {__version__} ({parts}; {cuda})"


def _run(module, args) -> int:
    from .ops.cpu_memory import keep_freed_cpu_memory

    keep_freed_cpu_memory()  # the process is ours: freed CPU activations are kept for reuse (ops.cpu_memory)
    return module.run(args)


if __name__ == "__main__":
    sys.exit(main())
