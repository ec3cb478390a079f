"""The bootstrap role: a DHT node that others join through, and nothing else.

It prints its multiaddrs (and writes them to ``addr_file``, atomically, for
whoever waits on it: ``LocalSwarm``, deploy scripts), then holds the node until
SIGTERM/SIGINT; a second signal exits at once, reaping the DHT child and p2pd.
"""

from __future__ import annotations

import asyncio
import os
from typing import Sequence

from swarmrt.discovery.dht import start_dht, stop_dht, visible_maddrs
from swarmrt.roles.proc import install_stop_handlers, write_atomically


async def serve_bootstrap(initial_peers: Sequence[str] = (), host: str = "127.0.0.1", port: int = 0,
                          addr_file: str | os.PathLike | None = None) -> int:
    """Run a DHT node until stopped; returns the exit code (0)."""
    stop = asyncio.Event()
    install_stop_handlers(asyncio.get_running_loop(), stop)
    dht = await asyncio.to_thread(start_dht, list(initial_peers), host, port)
    try:
        maddrs = visible_maddrs(dht)
        print("\n".join(maddrs), flush=True)
        if addr_file:
            write_atomically(addr_file, "\n".join(maddrs) + "\n")
        await stop.wait()
        return 0
    finally:
        await asyncio.to_thread(stop_dht, dht)
