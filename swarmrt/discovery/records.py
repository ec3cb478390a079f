"""What a stage peer announces in the DHT, and how a record is read back (pure).

Records (values are msgpack-serialised dicts, via hivemind's own serializer):

- ``swarmrt:runs`` / subkey ``<run_id>``: ``{"stages": S, "config": digest}``
- ``<run_id>:stage:<n>`` / subkey ``<peer_id>``: :class:`StageRecord` fields
- ``<run_id>:joining`` / subkey ``<peer_id>``: :class:`JoinIntent` fields: the stage a peer is
  about to serve (while it chooses, loads the stage's state, or moves there)

Every record expires by itself (``ttl``); a live peer re-announces on a
heartbeat, so a dead one vanishes from routing within ``ttl`` seconds. Storing
and reading them is :mod:`swarmrt.discovery.dht`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from swarmrt.routing.rebalance import JOINING, PeerState

RUNS_KEY = "swarmrt:runs"


def stage_key(run_id: str, stage: int) -> str:
    return f"{run_id}:stage:{stage}"


def _from_value(cls, value: Any):
    """``cls`` built from a DHT value's fields (those with a default may be missing), or None when
    the value is not one."""
    if not isinstance(value, dict):
        return None
    try:
        return cls(**{f.name: value[f.name] for f in dataclasses.fields(cls)
                      if f.name in value or f.default is dataclasses.MISSING})
    except (KeyError, TypeError):
        return None


def joining_key(run_id: str) -> str:
    return f"{run_id}:joining"


@dataclasses.dataclass(frozen=True)
class JoinIntent:
    """A peer on its way to a stage: joining the swarm, or moving from another stage."""

    peer_id: str
    stage: int
    pinned: bool
    settled: bool
    """It has made its choice (pinned, settled by the join protocol, or moving): joiners place around it."""
    heartbeat: float
    """DHT time of this announcement (a newer stage record of the same peer supersedes it)."""

    def to_value(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_value(cls, value: Any) -> "JoinIntent | None":
        intent = _from_value(cls, value)
        if intent is None:
            return None
        ok = (isinstance(intent.peer_id, str) and isinstance(intent.stage, int) and isinstance(intent.pinned, bool)
              and isinstance(intent.settled, bool)
              and isinstance(intent.heartbeat, (int, float)))
        return intent if ok else None


def swarm_view(records: Iterable[StageRecord], intents: Iterable[JoinIntent], num_stages: int) -> list[PeerState]:
    """One :class:`PeerState` per peer, from its newest announcement: a stage record, or a join
    intent that is newer than any stage record of that peer (a peer on its way to a stage).
    Records of stages outside ``0..num_stages-1`` are dropped."""
    newest: dict[str, tuple[float, PeerState]] = {}

    def offer(peer_id: str, heartbeat: float, state: PeerState) -> None:
        if 0 <= state.stage < num_stages and (peer_id not in newest or heartbeat > newest[peer_id][0]):
            newest[peer_id] = (heartbeat, state)

    for r in records:
        try:
            offer(r.peer_id, float(r.heartbeat), r.policy_view())
        except (TypeError, ValueError):  # a malformed record counts nowhere
            continue
    for j in intents:
        offer(j.peer_id, float(j.heartbeat), PeerState(peer_id=j.peer_id, stage=j.stage, state=JOINING,
                                                      pinned=j.pinned, settled=j.settled,
                                                      since=float(j.heartbeat)))
    return [newest[p][1] for p in sorted(newest)]


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
    """'serving', 'moving' (draining here on its way to ``target``) or 'leaving' (draining before it
    exits). A peer choosing or loading a stage announces a :class:`JoinIntent` instead."""
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
        return _from_value(cls, value)

    def policy_view(self) -> PeerState:
        """What :mod:`swarmrt.routing.rebalance` needs of this record."""
        return PeerState(peer_id=self.peer_id, stage=self.stage, state=self.state,
                         throughput=max(0.0, float(self.throughput)), pinned=bool(self.pinned), target=self.target,
                         since=float(self.since), load=max(0, int(self.load)))
