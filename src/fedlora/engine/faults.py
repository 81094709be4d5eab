"""Fault injection for the crash-and-resume tests: ``FEDLORA_FAULT=event:round[:client_index]``
SIGKILLs the process at that point (``after_client``: a client finished local training;
``after_checkpoint``: a round's checkpoint is on disk). Unset, it does nothing."""

from __future__ import annotations

import os
import signal
import sys

FAULT_ENV = "FEDLORA_FAULT"


def fault(event: str, round_: int, client_index: int | None = None) -> None:
    """SIGKILL this process if ``FEDLORA_FAULT`` names this point."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] != event or int(parts[1]) != round_:
        return
    if len(parts) > 2 and (client_index is None or int(parts[2]) != client_index):
        return  # a client's point: only that client's (``event:round`` alone: any client's)
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
