"""Files we write get the permissions the user's umask gives any new file.

safetensors >= 0.8 writes through a temporary file that it creates with mode 0600 and renames into place, so a
saved ``model.safetensors`` is readable by its owner only (safetensors issue #782), unlike the ``config.json``
beside it: a colleague on a shared server, or a container running as another user, cannot load the model.
``tempfile.mkstemp`` (the atomic write of an ONNX file) does the same. :func:`give_default_mode` puts such files
back to the usual mode; files whose mode is not exactly 0600 are left as they are.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Union

__all__ = ["default_file_mode", "give_default_mode"]


def _umask() -> int:
    """The process umask, read without changing it where Linux says it (changing it is racy with threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0666 less the umask."""
    return 0o666 & ~_umask()


def give_default_mode(paths: Iterable[Union[str, os.PathLike]]) -> None:
    """Files (or every file under folders) at mode 0600 get :func:`default_file_mode` instead."""
    if os.name != "posix":
        return
    mode = default_file_mode()
    if mode == 0o600:
        return
    for path in map(Path, paths):
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        for file in files:
            if not file.is_symlink() and file.is_file() and file.stat().st_mode & 0o777 == 0o600:
                file.chmod(mode)
