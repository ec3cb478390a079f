"""Stage announcements in the hivemind DHT: store and read :mod:`swarmrt.discovery.records`.

Every record expires by itself (``ttl``); a live peer re-announces on a
heartbeat, so a dead one vanishes from routing within ``ttl`` seconds.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Sequence

from hivemind import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time

from swarmrt.discovery.reachability import NetworkError
from swarmrt.discovery.records import (RUNS_KEY, JoinIntent, StageRecord, check_run_value, joining_key,
                                       owner_subkey, stage_key, subkey_owner)
from swarmrt.procs import descendants, die_with_parent, stop_child, stop_signals_blocked

__all__ = ["RUNS_KEY", "StageRecord", "JoinIntent", "stage_key", "announce", "announce_run", "announce_joining",
           "read_stage", "read_swarm", "read_runs", "start_dht", "stop_dht", "node_usable",
           "visible_maddrs", "dht_options", "DHTStartError"]

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


def dht_options(host: str = "127.0.0.1", port: int = 0, client_mode: bool = False, announce_host: str | None = None,
                identity_path: str | None = None, use_auto_relay: bool = False, use_relay: bool = True,
                initial_peers: list[str] | None = None, public: bool = False) -> dict[str, Any]:
    """hivemind ``DHT``/``P2P`` keyword arguments for a node listening on ``host:port`` (port 0: any free
    port) and announcing ``announce_host`` (default: what it listens on). Announcing needs a fixed
    port: libp2p cannot announce port 0."""
    kwargs: dict[str, Any] = dict(client_mode=client_mode, use_relay=use_relay, use_auto_relay=use_auto_relay)
    if use_auto_relay and initial_peers:  # behind NAT: reserve a slot on the peers it joins through (relays)
        kwargs.update(trusted_relays=list(initial_peers), force_reachability="private")
    elif public:  # libp2p relays only for a node that knows it is public; a bootstrap is, by definition
        kwargs["force_reachability"] = "public"
    if identity_path is not None:
        kwargs["identity_path"] = str(identity_path)
    if not client_mode:
        kwargs["host_maddrs"] = [f"/{ip_proto(host)}/{host}/tcp/{port}"]
        if announce_host and announce_host != host:
            if port == 0:
                raise ValueError(f"announcing {announce_host} needs a fixed DHT port (--dht-port), not 0")
            kwargs["announce_maddrs"] = [f"/{ip_proto(announce_host)}/{announce_host}/tcp/{port}"]
    return kwargs


def ip_proto(host: str) -> str:
    """The multiaddr protocol of an address: ip4, ip6 or dns (a name)."""
    if ":" in host:
        return "ip6"
    return "ip4" if all(part.isdigit() for part in host.split(".")) and host.count(".") == 3 else "dns"


class _ChildDHT(DHT):
    """hivemind's DHT, whose forked process (and its p2pd) dies with the process that started it."""

    def run(self) -> None:
        die_with_parent()
        super().run()


def start_dht(initial_peers: list[str] | None, host: str = "127.0.0.1", port: int = 0,
              client_mode: bool = False, *, announce_host: str | None = None, identity_path: str | None = None,
              use_auto_relay: bool = False, use_relay: bool = True, wait_timeout: float | None = None,
              public: bool = False, authorizer=None, record_validators: Sequence = ()) -> DHT:
    """A hivemind DHT node listening on ``host:port`` (loopback, any free port by default),
    announcing ``announce_host`` when given (a VM behind NAT: its public address; needs a fixed
    ``port``), with the stable peer id kept in ``identity_path`` (created when missing), looking for
    libp2p relays when ``use_auto_relay`` (a peer behind NAT; it reserves a slot on the
    ``initial_peers``), relaying for others when ``public`` (a bootstrap). It runs in a child process forked
    with SIGTERM/SIGINT blocked (:func:`swarmrt.procs.stop_signals_blocked`): a signal to the whole
    process group leaves it (and its p2pd) to the role, which drains and then stops it with
    :func:`stop_dht`. An unreachable ``initial_peers`` list raises :class:`DHTStartError` (one line).

    ``authorizer`` and ``record_validators`` make it a member of a run with a join token
    (:func:`swarmrt.auth.dht_auth.dht_security`); with an ``RSASignatureValidator`` among them,
    this node's records go under its owner subkey, signed (``dht.owner_marker``)."""
    kwargs = dht_options(host, port, client_mode, announce_host, identity_path, use_auto_relay, use_relay,
                         initial_peers, public)
    if authorizer is not None:
        kwargs["authorizer"] = authorizer
    dht = _ChildDHT(initial_peers=initial_peers or None, start=False, record_validators=list(record_validators), **kwargs)
    dht.owner_marker = next((v.local_public_key for v in record_validators if isinstance(v, RSASignatureValidator)),
                            None)
    with stop_signals_blocked():
        dht.start()
    try:
        dht.wait_until_ready(timeout=wait_timeout)
    except BaseException as e:
        procs_log = logging.getLogger("swarmrt.procs")
        level, procs_log.level = procs_log.level, logging.ERROR  # the failed node is killed: no news
        try:
            stop_dht(dht)
        finally:
            procs_log.setLevel(level)
        if isinstance(e, Exception):
            raise DHTStartError(_start_failure(e, initial_peers)) from e
        raise
    return dht


class DHTStartError(NetworkError):
    """The DHT node could not start; the message is one line saying why and what to check."""


def _start_failure(e: Exception, initial_peers: list[str] | None) -> str:
    why = " ".join((str(e) or type(e).__name__).split())
    why = re.sub(r"^Daemon failed to start: \d{4}/\d\d/\d\d \d\d:\d\d:\d\d ", "", why)
    if initial_peers and ("bootstrap" in why.lower() or "initial" in why.lower() or "connect" in why.lower()
                          or "timeout" in why.lower() or "timed out" in why.lower()):
        return (f"cannot join the DHT through {' '.join(initial_peers)}: {why[:200]} (is the bootstrap running, "
                f"and is the address it printed reachable from here?)")
    return f"cannot start the DHT node: {why[:300]}"


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
