"""What a router knows about the live peers: stage, measured speed, memory and load.

The path scheduler reads a :class:`PeerTable`; whoever sees the swarm keeps
it current. In the real runtime that is the trainer (peers announced in the
DHT: ``upsert``; a peer that dies or is banned: ``remove``; a measured
step: ``observe``; requests it has in flight and loads peers announce:
``set_in_flight``). In the simulator it is the simulator. The table is plain
mutable data and has no clock: it never expires anything by itself.

Per stage it keeps numpy arrays of the live peers' figures so a scheduler
can score all peers of a stage at once (1,000-peer swarms).
"""

from __future__ import annotations

import dataclasses
from typing import Hashable, Iterator

import numpy as np

from swarmrt.routing.links import Links

PeerId = Hashable


@dataclasses.dataclass(frozen=True)
class PeerInfo:
    """One live peer as the router sees it."""

    peer: PeerId
    """The peer's id (an int in scenarios, a DHT subkey string in the runtime)."""
    stage: int
    """The stage it serves."""
    forward_s: float
    """Seconds of one microbatch's forward pass (measured, smoothed)."""
    backward_s: float
    """Seconds of one microbatch's backward pass (measured, smoothed)."""
    memory_microbatches: int
    """Activations it can hold at once."""
    head_s: float = 0.0
    """Stage 0 when it is also the last stage: seconds of the loss head (forward and backward) at the end."""
    measured: bool = True
    """False while ``forward_s`` and ``backward_s`` are a stand-in (the peer has not measured itself yet):
    SWARM's wiring then gives the peer its optimistic prior instead (:func:`swarmrt.routing.wiring.choose_peer`)."""

    def __post_init__(self) -> None:
        if not isinstance(self.stage, int) or self.stage < 0:
            raise ValueError(f"peer {self.peer!r}: stage must be an integer >= 0, got {self.stage!r}")
        if not self.forward_s > 0:
            raise ValueError(f"peer {self.peer!r}: forward_s must be > 0, got {self.forward_s!r}")
        if not self.backward_s > 0:
            raise ValueError(f"peer {self.peer!r}: backward_s must be > 0, got {self.backward_s!r}")
        if not isinstance(self.memory_microbatches, int) or self.memory_microbatches < 1:
            raise ValueError(f"peer {self.peer!r}: memory_microbatches must be an integer >= 1, "
                             f"got {self.memory_microbatches!r}")
        if not self.head_s >= 0:
            raise ValueError(f"peer {self.peer!r}: head_s must be >= 0, got {self.head_s!r}")


@dataclasses.dataclass(frozen=True)
class StageArrays:
    """The live peers of one stage as parallel arrays (index i is ``ids[i]``)."""

    ids: tuple[PeerId, ...]
    """Peer ids, sorted by insertion order."""
    forward_s: np.ndarray
    """Forward seconds per peer."""
    backward_s: np.ndarray
    """Backward seconds per peer."""
    memory: np.ndarray
    """Memory (microbatches) per peer."""


class PeerTable:
    """Live peers per stage, their measured figures, in-flight load and the links between them."""

    def __init__(self, stages: int, links: Links) -> None:
        if stages < 1:
            raise ValueError(f"stages must be >= 1, got {stages}")
        self.stages = stages
        self.links = links
        self._peers: dict[PeerId, PeerInfo] = {}
        self._in_flight: dict[PeerId, int] = {}
        self._arrays: dict[int, StageArrays] = {}
        self.version = 0
        """Bumped on every change of membership or figures (caches key on it)."""

    # --- updates -------------------------------------------------------------------------

    def upsert(self, peer: PeerId, stage: int, forward_s: float, backward_s: float,
               memory_microbatches: int, head_s: float = 0.0, measured: bool = True) -> None:
        """Add a peer (joined, came back) or replace its figures (``measured`` False: they are a stand-in)."""
        if not (0 <= stage < self.stages):
            raise ValueError(f"peer {peer!r}: stage must be in [0, {self.stages}), got {stage}")
        self._peers[peer] = PeerInfo(peer, stage, float(forward_s), float(backward_s),
                                     int(memory_microbatches), float(head_s), bool(measured))
        self._in_flight.setdefault(peer, 0)
        self._changed()

    def remove(self, peer: PeerId) -> bool:
        """Forget a peer (died, left, banned). Returns whether it was there."""
        if self._peers.pop(peer, None) is None:
            return False
        self._in_flight.pop(peer, None)
        self._changed()
        return True

    def observe(self, peer: PeerId, forward_s: float | None = None, backward_s: float | None = None,
                weight: float = 0.3) -> None:
        """Blend a new measurement into a peer's figures (exponential moving average, ``weight`` on the new one);
        the figures then count as measured."""
        info = self._peers[peer]
        fwd = info.forward_s if forward_s is None else (1 - weight) * info.forward_s + weight * forward_s
        bwd = info.backward_s if backward_s is None else (1 - weight) * info.backward_s + weight * backward_s
        measured = info.measured or forward_s is not None or backward_s is not None
        self._peers[peer] = dataclasses.replace(info, forward_s=fwd, backward_s=bwd, measured=measured)
        self._changed()

    def set_in_flight(self, peer: PeerId, count: int) -> None:
        """Microbatches queued at or held by ``peer`` right now (as it announced, or as counted)."""
        if peer in self._peers:
            self._in_flight[peer] = max(0, int(count))

    def add_in_flight(self, peer: PeerId, delta: int) -> None:
        """Change a peer's in-flight count by ``delta``."""
        if peer in self._peers:
            self._in_flight[peer] = max(0, self._in_flight[peer] + delta)

    def _changed(self) -> None:
        self.version += 1
        self._arrays.clear()

    # --- queries -------------------------------------------------------------------------

    def __contains__(self, peer: PeerId) -> bool:
        return peer in self._peers

    def __len__(self) -> int:
        return len(self._peers)

    def __iter__(self) -> Iterator[PeerInfo]:
        return iter(self._peers.values())

    def get(self, peer: PeerId) -> PeerInfo:
        """The figures of a live peer (KeyError if it is not live)."""
        return self._peers[peer]

    def in_flight(self, peer: PeerId) -> int:
        """Microbatches in flight at ``peer`` (0 for an unknown peer)."""
        return self._in_flight.get(peer, 0)

    def peers_of(self, stage: int) -> tuple[PeerId, ...]:
        """Ids of the live peers of ``stage``."""
        return self.arrays(stage).ids

    def arrays(self, stage: int) -> StageArrays:
        """The live peers of ``stage`` as arrays (cached until the next change)."""
        cached = self._arrays.get(stage)
        if cached is None:
            infos = [p for p in self._peers.values() if p.stage == stage]
            cached = StageArrays(
                ids=tuple(p.peer for p in infos),
                forward_s=np.array([p.forward_s for p in infos], dtype=np.float64),
                backward_s=np.array([p.backward_s for p in infos], dtype=np.float64),
                memory=np.array([p.memory_microbatches for p in infos], dtype=np.int64),
            )
            self._arrays[stage] = cached
        return cached
