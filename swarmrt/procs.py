"""Processes below a role: the ``/proc`` table, exit waits, and hivemind's forked children
(the DHT node, the averager) that must survive a signal to the whole process group and still
stop for sure.

Lives outside :mod:`swarmrt.roles` so that :mod:`swarmrt.discovery` and
:mod:`swarmrt.local_sgd` (which fork those children) can use it; :mod:`swarmrt.roles.proc`
re-exports the table functions.

Why the children need care: ``kill -TERM -- -PGID`` (systemd ``KillMode=control-group``,
Slurm's ``scancel``, ``tini -g``) or Ctrl-C reaches every process of the group at once. A
child forked after the role installed its loop's SIGTERM/SIGINT handlers inherits them, so it
catches and swallows SIGTERM (hivemind's own ``terminate()`` included), and multiprocessing's
atexit hook then joins it forever. So: fork with both signals blocked
(:func:`stop_signals_blocked`; the role drains and stops its children itself), and stop a
child with :func:`stop_child`: ask, wait a bounded time, then SIGKILL it and what it started
(its p2pd), and reap it. A role killed by SIGKILL stops nothing, so each child also runs
:func:`die_with_parent`: it takes its p2pd down and exits when the role is gone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pathlib
import select
import signal
import threading
import time
from typing import Callable

logger = logging.getLogger("swarmrt.procs")

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


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


def wait_for_exit(pids, timeout: float | None) -> list[int]:
    """Block until every process in ``pids`` has exited (a zombie counts as exited) or ``timeout``
    seconds pass (None: however long it takes); returns the pids still running. Works for any
    process, not only children: the kernel signals each exit on a pidfd (Linux 5.3+), so nothing
    is polled."""
    deadline = None if timeout is None else time.monotonic() + timeout
    fds: dict[int, int] = {}
    try:
        for pid in pids:
            try:
                fds[os.pidfd_open(pid)] = pid
            except ProcessLookupError:
                pass  # already gone
        while fds and (deadline is None or (left := deadline - time.monotonic()) > 0):
            ready, _, _ = select.select(list(fds), [], [], None if deadline is None else left)
            for fd in ready:
                os.close(fd)
                del fds[fd]
        return sorted(fds.values())
    finally:
        for fd in fds:
            os.close(fd)


@contextlib.contextmanager
def stop_signals_blocked():
    """Block SIGTERM and SIGINT in the calling thread while the block runs: a process forked in it
    inherits the mask (and so do its exec'd children, e.g. p2pd), so a signal to the whole process
    group never reaches its Python; the mask is restored on exit, and a signal that arrived in
    between is then delivered to this process as usual. Stop such a child with :func:`stop_child`."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def die_with_parent() -> None:
    """Call first thing in a forked child (hivemind's DHT node, the averager): when the process that
    forked it exits, by SIGKILL too (which runs no cleanup), this child SIGKILLs what it started (its
    p2pd) and exits at once. Without it, ``kill -9`` of a role's pid alone leaves its DHT node and
    p2pd running (they block SIGTERM, see :func:`stop_signals_blocked`), holding the node's port and
    identity. A daemon thread waits on the parent's pidfd: nothing is polled."""
    parent = os.getppid()

    def watch() -> None:
        wait_for_exit([parent], None)
        _kill(descendants(live_only=True))
        os._exit(1)

    if parent > 1:
        threading.Thread(target=watch, name="die with parent", daemon=True).start()


def _kill(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop_child(child, ask: Callable[[], object], timeout: float, name: str = "child") -> bool:
    """Stop a forked ``multiprocessing.Process`` for sure: call ``ask()`` (e.g. hivemind's
    ``shutdown``, which joins the child itself) on a helper thread and give it ``timeout``
    seconds; if the child or anything it started (its p2pd) is still alive then, SIGKILL them
    all. The child is reaped before this returns, so multiprocessing's atexit join never blocks.
    Returns whether it stopped without being killed. Never raises for a failed ``ask``."""
    pid = child.pid
    if pid is None:  # never started
        return True
    tree = [pid, *descendants(pid)]  # before it exits: an orphaned p2pd is reparented and lost
    failure: list[BaseException] = []

    def asking() -> None:
        try:
            ask()
        except BaseException as e:  # noqa: BLE001 - reported below; the kill still happens
            failure.append(e)

    helper = threading.Thread(target=asking, name=f"stop {name}", daemon=True)
    helper.start()
    helper.join(timeout)
    left = wait_for_exit(tree, 0.0 if helper.is_alive() else 0.5)
    if failure:
        logger.warning("%s: shutdown request failed: %r", name, failure[0])
    clean = not left
    if left:
        if pid in left:  # its current descendants too (a late p2pd), before it dies
            left = sorted(set(left) | set(descendants(pid)))
        logger.warning("%s did not stop %s; killing pids %s", name,
                       f"within {timeout:.1f} s" if timeout > 0 else "by itself", left)
        _kill(left)
        wait_for_exit(left, 5.0)
    helper.join(5.0)  # hivemind's shutdown returns once the child is gone
    if not helper.is_alive():  # never two waitpid()s on one child at once
        child.join(1.0)
    return clean
