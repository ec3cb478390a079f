"""Kills a LocalSwarm's processes when the process that owns it dies, however it dies.

``LocalSwarm`` starts this as a small separate process and keeps a pipe to its
stdin. A normal ``stop()`` reaps everything itself and then writes ``done``.
If the owner dies first (SIGKILL, ``os._exit`` from pytest-timeout's thread
method, a crashed interpreter), atexit handlers and fixture teardowns never
run, and the roles would live on in their own sessions; the pipe then closes
without ``done`` and this process SIGKILLs every process group it was told
about (``+PGID`` lines) and every process whose environment carries the
swarm's tag (``SWARMRT_SWARM_ID``), which also catches a child that left its
group.

Usage (internal): ``python -m swarmrt.localswarm.reaper SWARM_ID``.
"""

from __future__ import annotations

import os
import signal
import sys

from swarmrt.roles.proc import tagged_processes


def kill_all(pgids: set[int], tag: str | None) -> None:
    for pgid in pgids:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if tag:
        for pid in tagged_processes(tag):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def main(argv: list[str]) -> int:
    tag = argv[0] if argv else None
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C to the test run is the owner's to handle
    pgids: set[int] = set()
    for line in sys.stdin:
        line = line.strip()
        if line == "done":
            return 0
        if line[:1] in "+-" and line[1:].isdigit():
            (pgids.add if line[0] == "+" else pgids.discard)(int(line[1:]))
    kill_all(pgids, tag)  # the owner is gone without saying done
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
