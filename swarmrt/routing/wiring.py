"""SWARM's stochastic wiring: which peer of a stage gets the next microbatch.

Pure: the clock (``now``) and the random generator (``rng``) are arguments.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class PeerView:
    """What a trainer knows about one stage peer when it routes."""

    peer_id: str
    """Stable id of the peer (its DHT subkey)."""
    throughput: float | None
    """Measured samples/s the peer announced; None until it has measured itself."""
    load: int = 0
    """Requests in flight at this peer (as announced, plus this trainer's own)."""


def peer_weight(peer: PeerView, prior: float) -> float:
    """Routing weight: throughput / (1 + in-flight load). Unmeasured peers get ``prior``."""
    throughput = peer.throughput if peer.throughput and peer.throughput > 0 else prior
    return throughput / (1.0 + max(0, peer.load))


def choose_peer(peers: Sequence[PeerView], banned: Mapping[str, float] | None, now: float,
                rng: random.Random) -> tuple[PeerView | None, str]:
    """Pick one peer with probability proportional to :func:`peer_weight`.

    ``banned`` maps peer id -> time until which it is banned; banned peers are
    never chosen. A new peer (no measured throughput) gets the largest measured
    throughput of the others as its prior, so it is tried at once and gets a
    fair share until it reports its own figure. Returns ``(peer, reason)``;
    ``peer`` is None when no peer is eligible.
    """
    banned = banned or {}
    eligible = [p for p in peers if banned.get(p.peer_id, float("-inf")) <= now]
    if not eligible:
        if peers:
            return None, f"all {len(peers)} peers are banned"
        return None, "no peers"
    measured = [p.throughput for p in eligible if p.throughput and p.throughput > 0]
    prior = max(measured) if measured else 1.0
    weights = [peer_weight(p, prior) for p in eligible]
    total = sum(weights)
    pick = rng.random() * total
    acc = 0.0
    chosen = eligible[-1]
    for peer, weight in zip(eligible, weights):
        acc += weight
        if pick < acc:
            chosen = peer
            break
    share = weights[eligible.index(chosen)] / total
    new = " (new peer, optimistic prior)" if not (chosen.throughput and chosen.throughput > 0) else ""
    return chosen, f"weighted pick {chosen.peer_id}: share {share:.2f} of {len(eligible)} eligible{new}"


@dataclasses.dataclass
class BanList:
    """Consecutive-failure counter per peer; bans a peer for ``ban_s`` after ``after`` failures.

    A ban expires by itself; the peer is then tried again, and one more failure
    bans it again at once (its failure count is kept until a success).
    """

    after: int = 2
    ban_s: float = 10.0
    failures: dict[str, int] = dataclasses.field(default_factory=dict)
    until: dict[str, float] = dataclasses.field(default_factory=dict)
    bad: dict[str, tuple[float, str]] = dataclasses.field(default_factory=dict)
    """Peers banned for what they sent (a bad reply, a failed check): until when, and why. A later
    success does not lift such a ban."""

    def ban(self, peer_id: str, now: float, seconds: float, reason: str) -> None:
        """Ban ``peer_id`` at once for ``seconds``, for ``reason`` (kept for logs and summaries)."""
        self.bad[peer_id] = (now + seconds, reason)

    def failure(self, peer_id: str, now: float) -> bool:
        """Record a failure; returns True when this failure bans the peer."""
        count = self.failures.get(peer_id, 0) + 1
        self.failures[peer_id] = count
        if count >= self.after:
            self.until[peer_id] = now + self.ban_s
            return True
        return False

    def success(self, peer_id: str) -> None:
        self.failures.pop(peer_id, None)
        self.until.pop(peer_id, None)

    def banned(self, now: float) -> dict[str, float]:
        out = {p: t for p, t in self.until.items() if t > now}
        for p, (t, _) in self.bad.items():
            if t > now:
                out[p] = max(t, out.get(p, t))
        return out
