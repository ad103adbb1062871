"""Work that one process does before the others, without leaving them waiting when it fails."""
from __future__ import annotations

from typing import Callable, TypeVar

from ..errors import UserError, describe

T = TypeVar("T")


def main_process_first(accelerator, work: Callable[[], T]) -> T:
    """Run ``work`` on the main process, then on the others (e.g. the main one builds the datasets cache and the
    others read it). Accelerate's ``main_process_first`` leaves the other processes at the barrier for good when
    the main one raises; here they are told, and stop with the same message."""
    from accelerate.utils import broadcast_object_list

    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = work()
        except Exception as err:  # noqa: BLE001 - re-raised below, once the others were told
            error = err
    accelerator.wait_for_everyone()
    message = [None if error is None else describe(error) or f"{type(error).__name__}: {error}"]
    if accelerator.num_processes > 1:
        broadcast_object_list(message)
    if error is not None:
        raise error
    if message[0] is not None:
        raise UserError(message[0])
    return result if accelerator.is_main_process else work()
