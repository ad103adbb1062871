"""One convention for every command's errors: one line naming the problem and the fix, a documented exit status.

Every entry point (``rwkvunet <command>``, ``training/finetune.py``, ``training/evaluate.py``, ...) runs its body
through :func:`run_main`, so the user sees

    rwkvunet predict: error: --out runs/x is a file; give a folder (it is created if missing)

on stderr, and a traceback only with ``--debug`` (or ``RWKVUNET_DEBUG=1``) or for a real bug.

Exit status, for all commands:

- ``0`` done;
- ``1`` partly done: some inputs failed, the others were written (``predict``);
- ``2`` nothing done: bad arguments, paths, files, model or data (argparse's usage errors are 2 as well);
- ``3`` an unexpected internal error (a bug: the traceback is printed, please report it);
- ``130`` interrupted (Ctrl-C).
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable

EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_NOTHING_DONE = 2
EXIT_BUG = 3
EXIT_INTERRUPTED = 130


def whole_number(minimum: int, maximum: int | None = None, unit: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number from ``minimum`` (to ``maximum``), so that a count or seed out of range is a
    usage error naming the option (``must be at least 1, got 0``) instead of a failure deep inside (numpy's seeding,
    a median of no steps)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if maximum is not None and not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"must be from {minimum} to {maximum}, got {value}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}{unit}, got {value}")
        return value
    return parse


def device_name(text: str) -> str:
    """An argparse type for ``--device``: ``cpu``, ``cuda`` or ``cuda:N``, so that ``--device tpu`` or ``cuda:x`` is
    a usage error instead of torch's failure when the model moves; a GPU index the machine lacks is refused too."""
    import torch

    try:
        device = torch.device(text.strip().lower())
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device this command runs on; use cpu, cuda or cuda:N")
    if device.type == "cuda" and device.index is not None and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if device.index >= count:
            raise argparse.ArgumentTypeError(
                f"{text!r}: this machine has {count} CUDA device(s), numbered from 0 to {count - 1}")
    return str(device)


def near_miss_folder(source: str) -> str | None:
    """A folder beside the missing path ``source`` whose name is close to it (``runs/rwkvunet-t-synthtic`` ->
    ``runs/rwkvunet-t-synthetic``), for a did-you-mean; None when there is none."""
    import difflib
    from pathlib import Path

    path = Path(source)
    parent = path.parent
    try:
        names = [p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError:
        return None
    close = difflib.get_close_matches(path.name, names, n=1)
    return str(parent / close[0]) if close else None


class UserError(ValueError):
    """A mistake in arguments, paths, files or data that the user can fix; the message names the problem and
    the fix. Commands print it as one line and exit with status 2."""


class PartlyDone(UserError):
    """The main work is done and written, a later step (an upload, say) failed; one line and exit status 1."""


def debug_enabled(argv_debug: bool = False) -> bool:
    return bool(argv_debug) or os.environ.get("RWKVUNET_DEBUG", "").lower() in ("1", "true", "yes")


def print_error(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)


def fail(prog: str, message: str, status: int = EXIT_NOTHING_DONE) -> int:
    """Print ``prog: error: message`` and return ``status`` (for ``return fail(...)`` in a command)."""
    print_error(prog, message)
    return status


def describe(err: BaseException) -> str | None:
    """The one-line message for an error a user can fix, or None for a bug."""
    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                        FileExistsError)):
        what = {FileNotFoundError: "no such file or folder", NotADirectoryError: "not a folder",
                IsADirectoryError: "is a folder, not a file", PermissionError: "permission denied",
                FileExistsError: "already exists"}
        kind = next((text for cls, text in what.items() if isinstance(err, cls)), err.strerror)
        name = err.filename if err.filename is not None else ""
        if err.args and isinstance(err.args[0], str) and err.filename is None:
            return err.args[0]  # raised with a message of our own
        return f"{name}: {kind}; check the path" if name else f"{kind}: {err}"
    memory = _host_memory_message(err)
    if memory is not None:
        return memory
    try:
        import torch

        if isinstance(err, torch.cuda.OutOfMemoryError):
            return ("out of device memory; use a smaller --batch-size, --tile 512 (predict), "
                    "--mixed-precision bf16 (training) or --device cpu")
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return None


def _host_memory_message(err: BaseException) -> str | None:
    """The one-line message for running out of host memory (PyTorch's CPU allocator, numpy), else None."""
    text = str(err)
    if not (isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and "can't allocate memory" in text)):
        return None
    import re

    size = re.search(r"allocate (\d+) bytes", text)
    asked = f" (an allocation of {int(size.group(1)) / 2 ** 30:.1f} GiB failed)" if size else ""
    return (f"out of memory{asked}; use a smaller --img-size or --batch-size, --tile 512 (predict) or a machine "
            "with more memory")


def run_main(prog: str, body: Callable[[], int], debug: bool = False) -> int:
    """Run a command's body and turn user mistakes into one-line errors (status 2), Ctrl-C into status 130 and
    anything else into a traceback plus a request to report it (status 3); ``debug`` re-raises everything."""
    debug = debug_enabled(debug)
    try:
        return int(body() or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit:
        raise
    except BaseException as err:  # noqa: BLE001 - the one place that decides how errors are shown
        if debug:
            raise
        message = describe(err)
        if message is not None:
            return fail(prog, message, EXIT_PARTIAL if isinstance(err, PartlyDone) else EXIT_NOTHING_DONE)
        traceback.print_exc()
        print_error(prog, f"unexpected {type(err).__name__}: this is a bug in rwkvunet; please report it with the "
                          "traceback above and the command you ran")
        return EXIT_BUG


__all__ = ["EXIT_BUG", "EXIT_INTERRUPTED", "EXIT_NOTHING_DONE", "EXIT_OK", "EXIT_PARTIAL", "PartlyDone", "UserError",
           "debug_enabled", "describe", "fail", "print_error", "run_main"]
