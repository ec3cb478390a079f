"""The run's membership in the hivemind DHT: who may talk to it, and what may be stored in it.

- :class:`MemberAuthorizer` (hivemind's ``TokenAuthorizerBase``): every DHT request and
  response is signed with the member key and carries an access token signed by the run key; a
  node drops requests without one. An outsider can neither read nor write the DHT.
- hivemind's ``RSASignatureValidator`` (:class:`OwnerSignatureValidator`): a record under an
  owner subkey (``[owner:<key>]``) must be signed with that key: only its owner can store or
  overwrite it.
- :class:`RunRecordValidator`: the run's stage records and join intents must sit under an owner
  subkey whose peer id is the record's own, hold a well-formed value
  (:mod:`swarmrt.discovery.records`) and expire within ``max_ttl_s``; a plain value at a stage key
  is refused. Applied on store (by the storing node) and on read (by the reader). A node guards
  the runs it is told of and every run announced in the ``swarmrt:runs`` index it validates, so a
  bootstrap, which knows no run, guards them too.

:func:`dht_security` builds all three for :func:`swarmrt.discovery.dht.start_dht`.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Iterable

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils import MSGPackSerializer
from hivemind.utils.auth import TokenAuthorizerBase
from hivemind.utils.crypto import RSAPrivateKey

from swarmrt.auth import DEFAULT_RECORD_TTL_S, record_ttl_cap
from swarmrt.auth.token import JoinToken, access_token_problem
from swarmrt.discovery.records import (MAX_ID_CHARS, MAX_STAGES, RUNS_KEY, JoinIntent, StageRecord, check_run_value, joining_key,
                                       stage_key, subkey_owner)

logger = logging.getLogger(__name__)

MAX_VALUE_BYTES = 4096
"""Largest record value (a stage record is about 250 bytes)."""
MAX_RUNS = 64
"""Most runs one node guards (each costs ``MAX_STAGES`` key hashes, about 1 ms and 100 KiB)."""


class MemberAuthorizer(TokenAuthorizerBase):
    """Signs this node's DHT requests with the join token's member key and access token, and checks
    that every request and response it gets carries a valid token of the same run."""

    def __init__(self, token: JoinToken, clock: Callable[[], float] = time.time):
        super().__init__(token.member_key)
        self._token, self._authority, self._clock = token.access_token, token.authority_key(), clock

    async def get_token(self) -> AccessToken:
        return self._token

    def is_token_valid(self, access_token: AccessToken) -> bool:
        return access_token_problem(access_token, self._authority, self._clock()) is None

    def does_token_need_refreshing(self, access_token: AccessToken) -> bool:
        return False  # a token cannot be renewed in place: a new one comes from the bootstrap


class RunRecordValidator(RecordValidatorBase):
    """Checks the records of the runs ``run_ids`` (and the ``swarmrt:runs`` index): see the module's
    docstring. Keys of other kinds (e.g. hivemind's averaging) pass untouched. A refusal is logged
    once per reason.

    ``max_ttl_s`` caps the expiry of the given runs' records. A run learned from the index gets the
    cap of the record lifetime its entry declares (``ttl``, :func:`swarmrt.auth.record_ttl_cap`),
    and an index entry may expire at most that far ahead itself."""

    def __init__(self, run_ids: Iterable[str], max_ttl_s: float, clock: Callable[[], float] = time.time):
        if not (math.isfinite(max_ttl_s) and max_ttl_s > 0):
            raise ValueError(f"max_ttl_s must be a positive number of seconds, got {max_ttl_s}")
        self.max_ttl_s, self.clock = max_ttl_s, clock
        self.refused: dict[str, int] = {}
        """How many records were refused, by reason."""
        self._kinds: dict[bytes, tuple[str, int | None, str | None]] = {
            DHTID.generate(source=RUNS_KEY).to_bytes(): ("runs", None, None)}
        self.caps: dict[str, float] = {}
        """The runs whose keys this validator guards (those it was given, and those it saw announced),
        with the expiry cap of their records."""
        for run in run_ids:
            self.guard(run, max_ttl_s)

    def guard(self, run_id: str, max_ttl_s: float) -> None:
        """Check the records of ``run_id`` from now on (at most :data:`MAX_RUNS` runs)."""
        if run_id in self.caps or len(self.caps) >= MAX_RUNS:
            return
        self.caps[run_id] = max_ttl_s
        self._kinds[DHTID.generate(source=joining_key(run_id)).to_bytes()] = ("joining", None, run_id)
        for s in range(MAX_STAGES):
            self._kinds[DHTID.generate(source=stage_key(run_id, s)).to_bytes()] = ("stage", s, run_id)

    def validate(self, record: DHTRecord) -> bool:
        kind = self._kinds.get(record.key)
        if kind is None:
            return True
        problem = self.problem(*kind, record)
        if problem is None:
            return True
        reason = problem.split(":")[0]
        if reason not in self.refused:
            logger.warning("refused a DHT record (%s): %s", kind[0], problem)
        self.refused[reason] = self.refused.get(reason, 0) + 1
        return False

    def problem(self, kind: str, stage: int | None, run: str | None, record: DHTRecord) -> str | None:
        """What is wrong with a record of ``kind`` ('stage' of ``stage``, 'joining', of ``run``; or
        'runs'), or None."""
        if record.subkey == DHTProtocol.IS_REGULAR_VALUE:
            return "a plain value: this key holds one record per peer (subkeys)"
        if len(record.value) > MAX_VALUE_BYTES:
            return f"value too large: {len(record.value)} bytes, at most {MAX_VALUE_BYTES}"
        try:
            subkey, value = MSGPackSerializer.loads(record.subkey), MSGPackSerializer.loads(record.value)
        except Exception:
            return "undecodable: not msgpack"
        if kind == "runs":
            problem = check_run_value(value)
            if problem is None and not (isinstance(subkey, str) and 0 < len(subkey) <= MAX_ID_CHARS):
                problem = f"run id {subkey!r:.40} is not a short string"
            if problem is not None:
                return f"bad run entry: {problem}"
            cap = record_ttl_cap(value.get("ttl", DEFAULT_RECORD_TTL_S))
        else:
            cap = self.caps[run]
        left = record.expiration_time - self.clock()
        if not (math.isfinite(left) and left <= cap):
            return f"expiry too far: {left:.0f} s ahead, at most {cap:.0f} s"
        if kind == "runs":
            self.guard(subkey, cap)  # a bootstrap or a status learns the runs it serves from this index
            return None
        return record_problem(kind, stage, subkey, value)


class OwnerSignatureValidator(RSASignatureValidator):
    """hivemind's owner-signature check, which refuses (instead of raising on) an owner subkey whose
    key does not parse: a member's garbage must not make a node's answer an error."""

    def validate(self, record: DHTRecord) -> bool:
        try:
            return super().validate(record)
        except Exception:  # a malformed public key or signature
            return False


def record_problem(kind: str, stage: int | None, subkey: Any, value: Any) -> str | None:
    """What is wrong with a stage record (``kind`` 'stage', of ``stage``) or a join intent ('joining')
    stored under ``subkey``: the subkey must be an owner subkey naming the record's peer."""
    owner = subkey_owner(subkey)
    if owner is None:
        return "no owner: the subkey is not '<peer id>[owner:<public key>]'"
    cls = StageRecord if kind == "stage" else JoinIntent
    problem = cls.problem(value)
    if problem is not None:
        return f"bad schema: {problem}"
    if value["peer_id"] != owner[0]:
        return f"wrong owner: a record of {value['peer_id']!r:.40} signed by {owner[0]!r:.40}"
    if stage is not None and value["stage"] != stage:
        return f"wrong stage: a record of stage {value['stage']} under stage {stage}"
    return None


def dht_security(token: JoinToken, run_ids: Iterable[str] = (), max_ttl_s: float = 60.0,
                 owner_key: RSAPrivateKey | None = None) -> dict[str, Any]:
    """Keyword arguments of :func:`swarmrt.discovery.dht.start_dht` for a member of the run of
    ``token``: its authorizer, an owner key of its own (records it stores are signed with it) and
    the record validators (:class:`RunRecordValidator` for ``run_ids``)."""
    signer = OwnerSignatureValidator(owner_key or RSAPrivateKey())
    return dict(authorizer=MemberAuthorizer(token),
                record_validators=[signer, RunRecordValidator(run_ids, max_ttl_s)])
