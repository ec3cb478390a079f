"""Stage announcements in the hivemind DHT.

Records (values are msgpack-serialised dicts, via hivemind's own serializer):

- ``swarmrt:runs`` / subkey ``<run_id>``: ``{"stages": S, "config": digest}``
- ``<run_id>:stage:<n>`` / subkey ``<peer_id>``: :class:`StageRecord` fields

Every record expires by itself (``ttl``); a live peer re-announces on a
heartbeat, so a dead one vanishes from routing within ``ttl`` seconds.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hivemind import DHT
from hivemind.utils import get_dht_time

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


def announce(dht: DHT, run_id: str, record: StageRecord, ttl: float, timeout: float = 5.0) -> bool:
    ok = dht.store(stage_key(run_id, record.stage), subkey=record.peer_id, value=record.to_value(),
                   expiration_time=get_dht_time() + ttl, return_future=True)
    return bool(ok.result(timeout=timeout))


def announce_run(dht: DHT, run_id: str, stages: int, digest: str, ttl: float, timeout: float = 5.0) -> bool:
    ok = dht.store(RUNS_KEY, subkey=run_id, value={"stages": stages, "config": digest},
                   expiration_time=get_dht_time() + ttl, return_future=True)
    return bool(ok.result(timeout=timeout))


def _subkey_values(dht: DHT, key: str, timeout: float) -> dict[str, Any]:
    found = dht.get(key, latest=True, return_future=True).result(timeout=timeout)
    if found is None or not isinstance(found.value, dict):
        return {}
    return {sub: item.value for sub, item in found.value.items()}


def read_stage(dht: DHT, run_id: str, stage: int, timeout: float = 5.0) -> list[StageRecord]:
    """Live records of one stage (expired ones are already gone), sorted by peer id."""
    records = [StageRecord.from_value(v) for v in _subkey_values(dht, stage_key(run_id, stage), timeout).values()]
    return sorted((r for r in records if r is not None), key=lambda r: r.peer_id)


def read_runs(dht: DHT, timeout: float = 5.0) -> dict[str, dict[str, Any]]:
    return {run: v for run, v in _subkey_values(dht, RUNS_KEY, timeout).items() if isinstance(v, dict)}


def start_dht(initial_peers: list[str] | None, host: str = "127.0.0.1", port: int = 0,
              client_mode: bool = False) -> DHT:
    """A hivemind DHT node listening on ``host`` (loopback by default)."""
    kwargs: dict[str, Any] = dict(initial_peers=initial_peers or None, start=True, client_mode=client_mode)
    if not client_mode:
        kwargs["host_maddrs"] = [f"/ip4/{host}/tcp/{port}"]
    return DHT(**kwargs)


def visible_maddrs(dht: DHT) -> list[str]:
    return [str(a) for a in dht.get_visible_maddrs()]
