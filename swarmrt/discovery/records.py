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
    """'joining', 'serving' or 'leaving'."""
    heartbeat: float
    """DHT time of this announcement."""

    def to_value(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_value(cls, value: Any) -> "StageRecord | None":
        if not isinstance(value, dict):
            return None
        try:
            return cls(**{f.name: value[f.name] for f in dataclasses.fields(cls)})
        except (KeyError, TypeError):
            return None
