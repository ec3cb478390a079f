"""Finding a local swarm's processes by a tag in their environment (reads ``/proc``, Linux).

Process groups miss a child that calls ``setsid``; an environment variable is
inherited by every descendant that does not scrub its environment (hivemind's
DHT child and p2pd keep it), so it is the surest way to find what a swarm left.
"""

from __future__ import annotations

import os
import pathlib

TAG_VAR = "SWARMRT_SWARM_ID"


def processes_with_env(var: str, value: str) -> list[int]:
    """Live processes of this user (this one excluded) whose environment has ``var=value``."""
    needle = f"{var}={value}".encode()
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                stat = (entry / "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z":  # a zombie is dead, only not yet reaped
                    found.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return found


def tagged_processes(tag: str) -> list[int]:
    """Live processes carrying ``SWARMRT_SWARM_ID=tag`` (one LocalSwarm's children and theirs)."""
    return processes_with_env(TAG_VAR, tag)
