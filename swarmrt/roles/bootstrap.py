"""The bootstrap role: a DHT node that others join through, and nothing else.

It prints its multiaddrs (and writes them to ``addr_file``, atomically, for
whoever waits on it: ``LocalSwarm``, deploy scripts), then holds the node until
SIGTERM/SIGINT; a second signal exits at once, reaping the DHT child and p2pd.

Before it starts, it takes the run key (``run_key``: a file, created when missing) or makes one,
and writes a join token (``join_token``) that peers, trainers and ``swarmrt status`` pass to
become members (:mod:`swarmrt.auth.token`). Its DHT node admits members only.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Sequence

from swarmrt.auth.dht_auth import dht_security
from swarmrt.auth.token import DEFAULT_VALID_S, issue_token, load_or_create_run_key
from swarmrt.discovery.dht import start_dht, stop_dht, visible_maddrs
from swarmrt.roles.proc import install_stop_handlers, write_atomically


async def serve_bootstrap(initial_peers: Sequence[str] = (), host: str = "127.0.0.1", port: int = 0,
                          addr_file: str | os.PathLike | None = None, *, join_token: str | os.PathLike = "join-token",
                          run_key: str | os.PathLike | None = None, token_valid_s: float = DEFAULT_VALID_S) -> int:
    """Write the join token, then run a DHT node until stopped; returns the exit code (0)."""
    stop = asyncio.Event()
    install_stop_handlers(asyncio.get_running_loop(), stop)
    token = issue_token(load_or_create_run_key(run_key), time.time(), token_valid_s)
    token.save(join_token)
    dht = await asyncio.to_thread(lambda: start_dht(list(initial_peers), host, port, **dht_security(token)))
    try:
        maddrs = visible_maddrs(dht)
        print("\n".join(maddrs), flush=True)
        if addr_file:
            write_atomically(addr_file, "\n".join(maddrs) + "\n")
        await stop.wait()
        return 0
    finally:
        await asyncio.to_thread(stop_dht, dht)
