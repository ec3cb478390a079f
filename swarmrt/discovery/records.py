"""What a stage peer announces in the DHT, and how a record is read back (pure).

Records (values are msgpack-serialised dicts, via hivemind's own serializer):

- ``swarmrt:runs`` / subkey ``<run_id>``: ``{"stages": S, "config": digest}``
- ``<run_id>:stage:<n>`` / subkey ``<peer_id>``: :class:`StageRecord` fields

Every record expires by itself (``ttl``); a live peer re-announces on a
heartbeat, so a dead one vanishes from routing within ``ttl`` seconds. Storing
and reading them is :mod:`swarmrt.discovery.dht`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from swarmrt.routing.rebalance import PeerState

RUNS_KEY = "swarmrt:runs"


def stage_key(run_id: str, stage: int) -> str:
    return f"{run_id}:stage:{stage}"


@dataclasses.dataclass(frozen=True)
class StageRecord:
    """What one stage peer announces."""

    peer_id: str
    stage: int
    address: str
    """host:port of its gRPC stage service."""
    throughput: float
    """Measured samples/s of forward+backward; 0 until measured."""
    load: int
    """Requests in flight."""
    version: int
    """Optimizer steps taken."""
    state: str
    """'joining' (choosing or loading this stage), 'serving', 'moving' (draining here on its way to
    ``target``) or 'leaving' (draining before it exits)."""
    heartbeat: float
    """DHT time of this announcement."""
    pinned: bool = False
    """Started with ``--stage``: the rebalancing policy never moves it."""
    target: int | None = None
    """For a 'moving' peer: the stage it moves to."""
    since: float = 0.0
    """DHT time at which it took this stage (joined or moved here): its move cooldown starts there."""

    def to_value(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_value(cls, value: Any) -> "StageRecord | None":
        """The record in a DHT value, or None when it is not one (fields added later may be missing)."""
        if not isinstance(value, dict):
            return None
        fields = {f.name: f for f in dataclasses.fields(cls)}
        try:
            return cls(**{name: value[name] for name, f in fields.items()
                          if name in value or f.default is dataclasses.MISSING})
        except (KeyError, TypeError):
            return None

    def policy_view(self) -> PeerState:
        """What :mod:`swarmrt.routing.rebalance` needs of this record."""
        return PeerState(peer_id=self.peer_id, stage=self.stage, state=self.state,
                         throughput=max(0.0, float(self.throughput)), pinned=bool(self.pinned), target=self.target,
                         since=float(self.since), load=max(0, int(self.load)))
