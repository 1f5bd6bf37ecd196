"""Worker processes that do not outlive the command that started them."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Make this (worker) process end when process ``parent`` ends, however it ends (``kill -9`` too).

    On Linux the kernel sends SIGKILL on the parent's death (``prctl(PR_SET_PDEATHSIG)``); elsewhere
    (or when a fork server started the worker) a daemon thread checks every second that ``parent``
    still runs.  SIGTERM gets its default action (not the command
    line's Ctrl-C handler) and SIGINT is left to the parent, which ends its workers itself.
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    armed = False
    if os.getppid() == parent and sys.platform.startswith("linux"):  # forked by it (not by a fork server)
        try:
            armed = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
        if armed and os.getppid() != parent:  # it died before the signal was armed
            os._exit(1)
    if not armed:
        threading.Thread(target=_watch, args=(parent,), daemon=True, name="lavise-parent-watch").start()


def proc_stat(pid: int) -> tuple[str, str] | None:
    """``(state, start time)`` of ``pid`` from /proc (Linux), or None when it is not there."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            raw = fh.read()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()
    return fields[0], fields[19]


def process_alive(pid: int, start: str | None = None) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not); with ``start`` (its start
    time from /proc, "0" for unknown), whether it is still that same process and not a reused pid."""
    if os.path.exists("/proc/self/stat"):
        st = proc_stat(pid)
        return st is not None and st[0] not in ("Z", "X") and (start in (None, "0") or st[1] == start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _watch(parent: int, every: float = 1.0) -> None:
    while process_alive(parent):
        time.sleep(every)
    os._exit(1)
