"""Process plumbing shared by every role: the process table, signals, reaping, the event loop,
and the files roles leave for the processes that wait on them.

Everything that reads ``/proc`` (Linux) goes through :func:`process_table`, so
"which processes are alive, who is whose child, what is in their environment"
has one answer across the peer's shutdown, ``LocalSwarm``'s reaper and the
tests that check nothing was left behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pathlib
import select
import signal
import time

TAG_VAR = "SWARMRT_SWARM_ID"
"""Environment variable that tags every process of one local swarm (inherited by
hivemind's DHT child and p2pd, which keep their environment)."""


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    pid: int
    ppid: int
    state: str
    """One letter from ``/proc/PID/stat``: ``Z`` is a zombie (dead, not yet reaped)."""
    program: str
    """Base name of ``argv[0]`` ('' when unreadable, e.g. a kernel thread)."""


def _read_info(entry: pathlib.Path) -> ProcessInfo | None:
    try:
        fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    try:
        argv0 = (entry / "cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        argv0 = b""
    return ProcessInfo(int(entry.name), int(fields[1]), fields[0], os.path.basename(argv0).decode(errors="replace"))


def process_table() -> dict[int, ProcessInfo]:
    """Every process visible in ``/proc`` now, by pid."""
    table = {}
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            info = _read_info(entry)
            if info is not None:
                table[info.pid] = info
    return table


def descendants(pid: int | None = None, live_only: bool = False, ignore_programs: frozenset[str] = frozenset()
                ) -> list[int]:
    """Every descendant of ``pid`` (default: this process). ``live_only`` leaves zombies out;
    ``ignore_programs`` leaves out processes (and what hangs below them) by program name."""
    root = os.getpid() if pid is None else pid
    children: dict[int, list[int]] = {}
    for info in process_table().values():
        if live_only and info.state == "Z":
            continue
        if info.program in ignore_programs:
            continue
        children.setdefault(info.ppid, []).append(info.pid)
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


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


def wait_for_exit(pids, timeout: float) -> list[int]:
    """Block until every process in ``pids`` has exited (a zombie counts as exited) or ``timeout``
    seconds pass; returns the pids still running. Works for any process, not only children: the
    kernel signals each exit on a pidfd (Linux 5.3+), so nothing is polled."""
    deadline = time.monotonic() + timeout
    fds: dict[int, int] = {}
    try:
        for pid in pids:
            try:
                fds[os.pidfd_open(pid)] = pid
            except ProcessLookupError:
                pass  # already gone
        while fds and (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select(list(fds), [], [], left)
            for fd in ready:
                os.close(fd)
                del fds[fd]
        return sorted(fds.values())
    finally:
        for fd in fds:
            os.close(fd)


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
