"""A stage peer's libp2p side: the stage service over libp2p, answering others' dial-backs, and
checking at join that others can reach the gRPC address it is about to announce.

:meth:`PeerNetwork.checked_address` runs before a peer announces ``serving``
(:mod:`swarmrt.discovery.reachability` says who to ask and what the answers
mean). When nobody can dial the address it says so in one line with the fix,
then serves over libp2p (``network.reachability = "p2p"``: it announces a
``p2p:`` address, which trainers call through :class:`swarmrt.wire.p2p.RoutedClient`)
or raises :class:`~swarmrt.discovery.reachability.Unreachable` (``"fail"``).
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Callable, Sequence

from swarmrt.config import WILDCARDS, RunConfig
from swarmrt import auth
from swarmrt.discovery import dht as dht_records
from swarmrt.discovery.reachability import (REACHABLE, UNCHECKED, UNREACHABLE, Unreachable, choose_dialers, peer_id_of_maddr,
                                            verdict)
from swarmrt.wire.p2p import DialBack, P2PStageService, ask_dial_back, p2p_address

logger = logging.getLogger("swarmrt.peer")


async def answer_dial_backs(dht, token=None):
    """Let others ask this node to dial their gRPC address (a bootstrap does, so a run's first peer is
    checked); returns the P2P connection it made (shut it down when done)."""
    p2p = await dht.replicate_p2p()
    await DialBack(credentials=auth.call_credentials(token)).start(p2p)
    return p2p


class PeerNetwork:
    def __init__(self, dht, config: RunConfig, peer_id: str, initial_peers: Sequence[str],
                 say: Callable[[str], None], token=None):
        self.dht, self.config, self.peer_id, self.say, self.token = dht, config, peer_id, say, token
        self.bootstraps = [p for p in map(peer_id_of_maddr, initial_peers) if p]
        self.service = P2PStageService(config.network.max_tensor_mb, check=auth.p2p_check(token))
        self.rng = random.Random(peer_id)
        self.p2p = None

    async def start(self) -> None:
        """Serve the stage service and dial-backs on the DHT node's libp2p host."""
        self.p2p = await self.dht.replicate_p2p()
        await self.service.start(self.p2p)
        await DialBack(credentials=auth.call_credentials(self.token)).start(self.p2p)

    def listen_maddrs(self) -> list[str]:
        """Where the DHT node listens, when that differs from what it announces (a LAN peer may dial it)."""
        net = self.config.network
        if net.dht_port and net.host not in WILDCARDS and net.public_host != net.host:
            return [f"/{dht_records.ip_proto(net.host)}/{net.host}/tcp/{net.dht_port}/p2p/{self.peer_id}"]
        return []

    async def close(self) -> None:
        """Close this process's connection to the DHT's p2pd (the node itself is the caller's)."""
        if self.p2p is not None:
            await self.p2p.shutdown()
            self.p2p = None

    async def checked_address(self, address: str, servicer) -> str:
        """The address to announce for ``servicer`` (now also served over libp2p): ``address`` if
        someone in the run could dial it back (or nobody could be asked), else the libp2p one."""
        self.service.servicer = servicer
        mode = self.config.network.reachability
        if mode == "off":
            return address
        try:
            records, _ = await asyncio.to_thread(dht_records.read_swarm, self.dht, self.config.run.id,
                                                 self.config.num_stages)
        except Exception as e:  # a slow DHT read: the bootstraps are still there to ask
            logger.warning("could not read the run's peers for the reachability check: %s", e or type(e).__name__)
            records = []
        dialers = choose_dialers([r.peer_id for r in records if r.state == "serving"], self.bootstraps,
                                 self.peer_id, self.rng)
        peers = [d for d in dialers if d not in self.bootstraps]
        answers = await ask_dial_back(self.p2p, peers, address, expect=self.peer_id) if peers else {}
        if all("no_answer" in answers.get(p, {"no_answer": ""}) for p in peers):  # no peer of the run answered
            answers.update(await ask_dial_back(self.p2p, self.bootstraps, address, expect=self.peer_id))
            if peers:  # e.g. behind NAT, it reaches only the bootstrap: ask the run's peers through it
                forwarded = await ask_dial_back(self.p2p, self.bootstraps[:1], address, 10.0, via=peers)
                answers.update({p: a for p, a in forwarded.items() if p in peers})
        status, line = verdict(address, self.peer_id, answers, self.bootstraps)
        if status == REACHABLE:
            logger.info(line)
            return address
        if status == UNREACHABLE and mode == "fail":
            raise Unreachable(line)
        self.say(line)
        if status == UNCHECKED:
            return address
        p2p = p2p_address(self.peer_id, await asyncio.to_thread(dht_records.visible_maddrs, self.dht)
                          + self.listen_maddrs())
        self.say(f"serving over libp2p instead (slower than gRPC) at {p2p}")
        return p2p
