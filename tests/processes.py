"""The processes of a session (a command started with start_new_session=True, and everything it
started, Ray's processes included), found and killed by session id, as when the machine dies."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def session_pids(session_id: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # Fields 3 and 6 of /proc/PID/stat: the state (Z: dead, awaiting its parent) and session.
        if int(fields[3]) == session_id and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def kill_session(session_id: int) -> None:
    """SIGKILL to the command and every process it started (Ray workers get process groups of
    their own, so killpg alone would miss them)."""
    deadline = time.monotonic() + 30
    while (pids := session_pids(session_id)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    assert not session_pids(session_id), "processes of the killed command survived"
