"""Process plumbing shared by every role: signals, reaping descendants, the event loop."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal


def descendants(pid: int | None = None) -> list[int]:
    """Every live descendant of ``pid`` (default: this process), read from /proc."""
    root = os.getpid() if pid is None else pid
    children: dict[int, list[int]] = {}
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_descendants(sig: int = signal.SIGKILL) -> None:
    """Signal every descendant (hivemind's DHT child and its p2pd included)."""
    for pid in descendants():
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


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
