"""The bootstrap role: a DHT node that others join through, and nothing else.

It prints its multiaddrs (and writes them to ``addr_file``, atomically, for
whoever waits on it: ``LocalSwarm``, deploy scripts), then holds the node until
SIGTERM/SIGINT; a second signal exits at once, reaping the DHT child and p2pd.

Before it starts, it takes the run key (``run_key``: a file, created when missing) or makes one,
and writes a join token (``join_token``) that peers, trainers and ``swarmrt status`` pass to
become members (:mod:`swarmrt.auth.token`). Its DHT node admits members only.

It also answers joining peers' dial-back requests (can this node reach your
gRPC address?), so even a run's first peer learns whether it is reachable, and
relays libp2p connections for peers behind NAT (libp2p's relay service is on).
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
from swarmrt.roles.reach import answer_dial_backs


async def serve_bootstrap(initial_peers: Sequence[str] = (), host: str = "127.0.0.1", port: int = 0,
                          addr_file: str | os.PathLike | None = None, *, join_token: str | os.PathLike = "join-token",
                          run_key: str | os.PathLike | None = None, token_valid_s: float = DEFAULT_VALID_S,
                          announce_host: str | None = None, identity: str | os.PathLike | None = None,
                          use_auto_relay: bool = False) -> int:
    """Write the join token, then run a DHT node until stopped; returns the exit code (0). With
    ``identity`` (a key file, created when missing) its peer id, and so its multiaddr, is the same at
    every start; ``announce_host`` (with a fixed ``port``) is the address it prints for others (a VM's
    public IP)."""
    stop = asyncio.Event()
    install_stop_handlers(asyncio.get_running_loop(), stop)
    token = issue_token(load_or_create_run_key(run_key), time.time(), token_valid_s)
    token.save(join_token)
    dht = await asyncio.to_thread(lambda: start_dht(
        list(initial_peers), host, port, announce_host=announce_host,
        identity_path=None if identity is None else str(identity), use_auto_relay=use_auto_relay,
        public=not use_auto_relay, **dht_security(token)))
    p2p = None
    try:
        p2p = await answer_dial_backs(dht, token)
        maddrs = visible_maddrs(dht)
        print("\n".join(maddrs), flush=True)
        if addr_file:
            write_atomically(addr_file, "\n".join(maddrs) + "\n")
        await stop.wait()
        return 0
    finally:
        if p2p is not None:
            await p2p.shutdown()  # this process's connection to the p2pd
        await asyncio.to_thread(stop_dht, dht)
