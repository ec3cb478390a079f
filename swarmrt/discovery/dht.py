"""Stage announcements in the hivemind DHT: store and read :mod:`swarmrt.discovery.records`.

Every record expires by itself (``ttl``); a live peer re-announces on a
heartbeat, so a dead one vanishes from routing within ``ttl`` seconds.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from hivemind import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time

from swarmrt.discovery.records import (RUNS_KEY, JoinIntent, StageRecord, check_run_value, joining_key,
                                       owner_subkey, stage_key, subkey_owner)
from swarmrt.procs import descendants, stop_child, stop_signals_blocked

__all__ = ["RUNS_KEY", "StageRecord", "JoinIntent", "stage_key", "announce", "announce_run", "announce_joining",
           "read_stage", "read_swarm", "read_runs", "start_dht", "stop_dht", "node_usable",
           "visible_maddrs"]

logger = logging.getLogger(__name__)
_logged: set[str] = set()


def _subkey(dht: DHT, peer_id: str):
    """Where ``peer_id`` stores its records: its owner subkey (signed on store) in a run with a join
    token, its bare id in an open run."""
    marker = getattr(dht, "owner_marker", None)
    return peer_id if marker is None else owner_subkey(peer_id, marker)


def _drop(why: str) -> None:
    if why not in _logged:  # once per kind: a hostile member must not flood the log
        _logged.add(why)
        logger.warning("dropped a DHT record: %s", why)


def announce(dht: DHT, run_id: str, record: StageRecord, ttl: float, timeout: float = 5.0) -> bool:
    ok = dht.store(stage_key(run_id, record.stage), subkey=_subkey(dht, record.peer_id), value=record.to_value(),
                   expiration_time=get_dht_time() + ttl, return_future=True)
    return bool(ok.result(timeout=timeout))


def announce_run(dht: DHT, run_id: str, stages: int, digest: str, ttl: float, timeout: float = 5.0) -> bool:
    ok = dht.store(RUNS_KEY, subkey=run_id, value={"stages": stages, "config": digest, "ttl": ttl},
                   expiration_time=get_dht_time() + ttl, return_future=True)
    return bool(ok.result(timeout=timeout))


def announce_joining(dht: DHT, run_id: str, intent: JoinIntent, ttl: float, timeout: float = 5.0) -> bool:
    ok = dht.store(joining_key(run_id), subkey=_subkey(dht, intent.peer_id), value=intent.to_value(),
                   expiration_time=get_dht_time() + ttl, return_future=True)
    return bool(ok.result(timeout=timeout))


def _values(found) -> dict[str, Any]:
    """``{subkey: value}`` of what ``dht.get`` found under a key with subkeys (empty if nothing)."""
    if found is None or not isinstance(found.value, dict):
        return {}
    return {sub: item.value for sub, item in found.value.items()}


def _subkey_values(dht: DHT, key: str, timeout: float) -> dict[str, Any]:
    return _values(dht.get(key, latest=True, return_future=True).result(timeout=timeout))


def _checked(dht: DHT, cls, values: dict[Any, Any]) -> list:
    """The good ``cls`` records among ``{subkey: value}``; in a run with a join token, only those
    under their own peer's owner subkey (hivemind checked the signature). The rest are dropped."""
    found = []
    for subkey, value in values.items():
        record = cls.from_value(value)
        if record is None:
            _drop(f"bad {cls.__name__}: {cls.problem(value)}")
            continue
        owner = subkey_owner(subkey)
        if getattr(dht, "owner_marker", None) is not None and (owner is None or owner[0] != record.peer_id):
            _drop(f"{cls.__name__} of {record.peer_id!r:.40} not under its owner's subkey")
            continue
        found.append(record)
    return found


def read_stage(dht: DHT, run_id: str, stage: int, timeout: float = 5.0) -> list[StageRecord]:
    """Live, well-formed records of one stage (expired ones are already gone), sorted by peer id."""
    records = _checked(dht, StageRecord, _subkey_values(dht, stage_key(run_id, stage), timeout))
    return sorted((r for r in records if r.stage == stage), key=lambda r: r.peer_id)


def read_swarm(dht: DHT, run_id: str, num_stages: int, timeout: float = 5.0
               ) -> tuple[list[StageRecord], list[JoinIntent]]:
    """Every stage's records and the run's join intents, all fetched at once."""
    futures = [dht.get(stage_key(run_id, s), latest=True, return_future=True) for s in range(num_stages)]
    futures.append(dht.get(joining_key(run_id), latest=True, return_future=True))
    values = [_values(future.result(timeout=timeout)) for future in futures]
    records = [r for s, v in enumerate(values[:-1]) for r in _checked(dht, StageRecord, v) if r.stage == s]
    intents = _checked(dht, JoinIntent, values[-1])
    return sorted(records, key=lambda r: (r.stage, r.peer_id)), sorted(intents, key=lambda j: j.peer_id)


def read_runs(dht: DHT, timeout: float = 5.0) -> dict[str, dict[str, Any]]:
    return {run: v for run, v in _subkey_values(dht, RUNS_KEY, timeout).items()
            if isinstance(run, str) and check_run_value(v) is None}


def start_dht(initial_peers: list[str] | None, host: str = "127.0.0.1", port: int = 0,
              client_mode: bool = False, *, authorizer=None, record_validators: Sequence = ()) -> DHT:
    """A hivemind DHT node listening on ``host`` (loopback by default), in a child process forked
    with SIGTERM/SIGINT blocked (:func:`swarmrt.procs.stop_signals_blocked`): a signal to the whole
    process group leaves it (and its p2pd) to the role, which drains and then stops it with
    :func:`stop_dht`.

    ``authorizer`` and ``record_validators`` make it a member of a run with a join token
    (:func:`swarmrt.auth.dht_auth.dht_security`); with an ``RSASignatureValidator`` among them,
    this node's records go under its owner subkey, signed (``dht.owner_marker``)."""
    kwargs: dict[str, Any] = dict(initial_peers=initial_peers or None, start=False, client_mode=client_mode,
                                  record_validators=list(record_validators))
    if authorizer is not None:
        kwargs["authorizer"] = authorizer
    if not client_mode:
        kwargs["host_maddrs"] = [f"/ip4/{host}/tcp/{port}"]
    dht = DHT(**kwargs)
    dht.owner_marker = next((v.local_public_key for v in record_validators if isinstance(v, RSASignatureValidator)),
                            None)
    with stop_signals_blocked():
        dht.start()
    try:
        dht.wait_until_ready()
    except BaseException:
        stop_dht(dht)
        raise
    return dht


def node_usable(dht: DHT) -> bool:
    """Whether the node's process and its p2pd (the node's only child) are alive: a signal to the
    whole process group kills p2pd at once (it handles SIGTERM itself), after which every DHT
    call only times out and the node cannot shut down by itself."""
    pid = getattr(dht, "pid", None)
    if pid is None:
        return True  # not a process (a test's fake)
    return dht.is_alive() and bool(descendants(pid, live_only=True))


def stop_dht(dht: DHT, timeout: float = 3.0) -> bool:
    """Shut the node down; if it (or its p2pd) is still alive after ``timeout`` seconds, SIGKILL
    them; the child is reaped either way. A node whose p2pd is gone is killed at once (its
    shutdown would hang). Returns whether it stopped by itself."""
    if dht.is_alive() and not node_usable(dht):
        timeout = 0.0
    return stop_child(dht, dht.shutdown, timeout, name="DHT")


def visible_maddrs(dht: DHT) -> list[str]:
    return [str(a) for a in dht.get_visible_maddrs()]
