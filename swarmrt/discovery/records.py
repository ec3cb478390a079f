"""What a stage peer announces in the DHT, and how a record is read back (pure).

Records (values are msgpack-serialised dicts, via hivemind's own serializer):

- ``swarmrt:runs`` / subkey ``<run_id>``: ``{"stages": S, "config": digest, "ttl": record_ttl_s}``
- ``<run_id>:stage:<n>`` / subkey ``<peer_id>``: :class:`StageRecord` fields
- ``<run_id>:joining`` / subkey ``<peer_id>``: :class:`JoinIntent` fields: the stage a peer is
  about to serve (while it chooses, loads the stage's state, or moves there)

Every record expires by itself (``ttl``); a live peer re-announces on a
heartbeat, so a dead one vanishes from routing within ``ttl`` seconds. Storing
and reading them is :mod:`swarmrt.discovery.dht`.

Every value read back is hostile until checked: :meth:`StageRecord.check`,
:meth:`JoinIntent.check` and :func:`check_run_value` say what is wrong with one
(types, ranges, finite numbers), and a reader drops it. In a run with a join
token each stage record and join intent sits under an *owner subkey*
(:func:`owner_subkey`: the peer id followed by ``[owner:<its RSA public key>]``)
and is signed with that key; :func:`subkey_owner` splits such a subkey so a
reader can check that the record names the peer that signed it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterable

from swarmrt.routing.rebalance import JOINING, STATES, PeerState

RUNS_KEY = "swarmrt:runs"
MAX_STAGES = 1024
"""The most stages a run may announce (a reader never loops over more)."""
MAX_ID_CHARS = 128
"""Longest peer id (and run id) a record may carry."""
MAX_ADDRESS_CHARS = 256
MAX_RECORD_TTL_S = 3600.0
"""Longest record lifetime a run may declare in ``swarmrt:runs``."""
MAX_COUNT = 2**53
"""Largest ``load``/``version`` a record may carry (an exactly representable integer)."""
_OWNER = re.compile(rb"(.+?)\[owner:(.+)\]", re.DOTALL)


def owner_subkey(peer_id: str, owner_marker: bytes) -> bytes:
    """The subkey a peer stores its records under: its id, then ``owner_marker`` (hivemind's
    ``RSASignatureValidator.local_public_key``, ``[owner:ssh-rsa ...]``): only the holder of that
    key can write it."""
    return peer_id.encode() + owner_marker


def subkey_owner(subkey: Any) -> tuple[str, bytes] | None:
    """``(peer id, public key)`` of an owner subkey, or None when ``subkey`` is not one."""
    match = _OWNER.fullmatch(subkey) if isinstance(subkey, bytes) else None
    if match is None:
        return None
    try:
        return match.group(1).decode(), match.group(2)
    except UnicodeDecodeError:
        return None


def _is_int(v: Any, low: int, high: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _is_finite(v: Any, low: float = -math.inf, high: float = math.inf) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and low <= v <= high


def _is_id(v: Any) -> bool:
    return isinstance(v, str) and 0 < len(v) <= MAX_ID_CHARS


def _first_problem(checks: Iterable[tuple[str, bool, Any]]) -> str | None:
    for name, ok, value in checks:
        if not ok:
            return f"bad {name}: {value!r:.60}"
    return None


def check_run_value(value: Any) -> str | None:
    """What is wrong with a ``swarmrt:runs`` value, or None."""
    if not isinstance(value, dict):
        return f"not a dict: {type(value).__name__}"
    return _first_problem([("stages", _is_int(value.get("stages"), 1, MAX_STAGES), value.get("stages")),
                           ("config", isinstance(value.get("config"), str) and len(value["config"]) <= MAX_ID_CHARS,
                            value.get("config")),
                           ("ttl", "ttl" not in value or _is_finite(value["ttl"], 1e-3, MAX_RECORD_TTL_S),
                            value.get("ttl"))])


def stage_key(run_id: str, stage: int) -> str:
    return f"{run_id}:stage:{stage}"


def _from_value(cls, value: Any):
    """``cls`` built from a DHT value's fields (those with a default may be missing), or None when
    the value is not one."""
    if not isinstance(value, dict):
        return None
    try:
        made = cls(**{f.name: value[f.name] for f in dataclasses.fields(cls)
                      if f.name in value or f.default is dataclasses.MISSING})
    except (KeyError, TypeError):
        return None
    return made if made.check() is None else None


def _problem(cls, value: Any) -> str | None:
    """What is wrong with a DHT value meant to hold a ``cls``: missing or unknown fields, or what
    ``cls.check`` finds; None when it is a good one."""
    if not isinstance(value, dict):
        return f"not a dict: {type(value).__name__}"
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(value) - names))
    if unknown:
        return f"unknown field(s) {', '.join(unknown)[:80]}"
    missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.name not in value]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    return cls(**value).check()


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
        """The intent in a DHT value, or None when it is not a good one (:meth:`check`)."""
        return _from_value(cls, value)

    @classmethod
    def problem(cls, value: Any) -> str | None:
        """What is wrong with a DHT value meant to hold an intent (unknown fields included), or None."""
        return _problem(cls, value)

    def check(self) -> str | None:
        """What is wrong with this intent's fields (types, ranges, finite numbers), or None."""
        return _first_problem([("peer_id", _is_id(self.peer_id), self.peer_id),
                               ("stage", _is_int(self.stage, 0, MAX_STAGES - 1), self.stage),
                               ("pinned", isinstance(self.pinned, bool), self.pinned),
                               ("settled", isinstance(self.settled, bool), self.settled),
                               ("heartbeat", _is_finite(self.heartbeat, 0.0), self.heartbeat)])


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
        """The record in a DHT value, or None when it is not a good one (:meth:`check`; fields added
        later may be missing, unknown ones are ignored)."""
        return _from_value(cls, value)

    @classmethod
    def problem(cls, value: Any) -> str | None:
        """What is wrong with a DHT value meant to hold a record (unknown fields included), or None."""
        return _problem(cls, value)

    def check(self) -> str | None:
        """What is wrong with this record's fields (types, ranges, finite numbers), or None."""
        return _first_problem([
            ("peer_id", _is_id(self.peer_id), self.peer_id),
            ("stage", _is_int(self.stage, 0, MAX_STAGES - 1), self.stage),
            ("address", isinstance(self.address, str) and 0 < len(self.address) <= MAX_ADDRESS_CHARS
             and ":" in self.address, self.address),
            ("throughput", _is_finite(self.throughput, 0.0, 1e12), self.throughput),
            ("load", _is_int(self.load, 0, MAX_COUNT), self.load),
            ("version", _is_int(self.version, 0, MAX_COUNT), self.version),
            ("state", isinstance(self.state, str) and self.state in STATES, self.state),
            ("heartbeat", _is_finite(self.heartbeat, 0.0), self.heartbeat),
            ("pinned", isinstance(self.pinned, bool), self.pinned),
            ("target", self.target is None or _is_int(self.target, 0, MAX_STAGES - 1), self.target),
            ("since", _is_finite(self.since, 0.0), self.since)])

    def policy_view(self) -> PeerState:
        """What :mod:`swarmrt.routing.rebalance` needs of this record."""
        return PeerState(peer_id=self.peer_id, stage=self.stage, state=self.state,
                         throughput=max(0.0, float(self.throughput)), pinned=bool(self.pinned), target=self.target,
                         since=float(self.since), load=max(0, int(self.load)))
