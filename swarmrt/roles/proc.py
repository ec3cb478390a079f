"""Process plumbing shared by every role: the process table, signals, reaping, the event loop,
and the files roles leave for the processes that wait on them.

Everything that reads ``/proc`` (Linux) goes through :func:`process_table` (in
:mod:`swarmrt.procs`, re-exported here), so
"which processes are alive, who is whose child, what is in their environment"
has one answer across the peer's shutdown, ``LocalSwarm``'s reaper and the
tests that check nothing was left behind.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal

from swarmrt.procs import ProcessInfo, descendants, process_table, wait_for_exit

__all__ = ["TAG_VAR", "ProcessInfo", "descendants", "process_table", "wait_for_exit", "processes_with_env",
           "tagged_processes", "kill_descendants", "write_atomically", "install_stop_handlers", "new_event_loop", "run"]

TAG_VAR = "SWARMRT_SWARM_ID"
"""Environment variable that tags every process of one local swarm (inherited by
hivemind's DHT child and p2pd, which keep their environment)."""


def processes_with_env(var: str, value: str) -> list[int]:
    """Live processes of this user (this one and zombies excluded) whose environment has ``var=value``."""
    needle = f"{var}={value}".encode()
    found = []
    for pid, info in process_table().items():
        if pid == os.getpid() or info.state == "Z":
            continue
        try:
            if needle in pathlib.Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.append(pid)
        except OSError:
            continue
    return found


def tagged_processes(tag: str) -> list[int]:
    """Live processes carrying ``SWARMRT_SWARM_ID=tag`` (one LocalSwarm's children and theirs)."""
    return processes_with_env(TAG_VAR, tag)


def kill_descendants(sig: int = signal.SIGKILL) -> None:
    """Signal every descendant (hivemind's DHT child and its p2pd included)."""
    for pid in descendants():
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def write_atomically(path: str | os.PathLike, text: str) -> None:
    """Write a file another process waits for (a ready file, an address file) so that it never
    sees it half written: write ``PATH.tmp``, then rename."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")  # PATH.tmp: two files of one stem never share a temp file
    tmp.write_text(text)
    tmp.rename(path)


def install_stop_handlers(loop: asyncio.AbstractEventLoop, stop: asyncio.Event, on_first=None) -> None:
    """First SIGTERM/SIGINT sets ``stop`` (graceful drain); a second one exits at once, still
    reaping every child."""

    def handler(signum: int) -> None:
        if stop.is_set():
            kill_descendants()
            os._exit(128 + signum)
        stop.set()
        if on_first is not None:
            on_first(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handler, sig)


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return asyncio.new_event_loop()


def run(main) -> int:
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(main)
    finally:
        loop.close()
