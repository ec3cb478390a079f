"""Membership without processes: the per-call credential, join tokens, the DHT record validators
(records built and signed the way a DHT node does it) and readers that drop malformed records."""

import os
import time
import types

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.utils import MSGPackSerializer
from hivemind.utils.crypto import RSAPrivateKey

from swarmrt.auth.credential import METADATA_KEY, credential_problem, make_credential
from swarmrt.auth.dht_auth import MemberAuthorizer, RunRecordValidator
from swarmrt.auth.token import JoinToken, TokenError, issue_token, load_or_create_run_key, require_token
from swarmrt.discovery import dht as dht_io
from swarmrt.discovery.records import RUNS_KEY, StageRecord, joining_key, owner_subkey, stage_key
from swarmrt.roles import status

pytestmark = pytest.mark.timeout(60)
NOW = 1_800_000_000.0
RUN = "run1"


# -- the per-call credential -------------------------------------------------------------------
def test_a_good_credential_passes_and_each_bad_one_is_named():
    secret, method = b"s" * 32, "/swarmrt.Stage/Forward"
    good = make_credential(secret, method, NOW)
    assert credential_problem(good, secret, method, NOW + 5) is None
    missing = credential_problem(None, secret, method, NOW)
    assert f"{METADATA_KEY} metadata is missing" in missing and "--join-token" in missing
    assert "another run" in credential_problem(good, b"t" * 32, method, NOW)
    assert "another run" in credential_problem(good, secret, "/swarmrt.Stage/Backward", NOW)  # bound to the method
    assert "away from this peer's clock" in credential_problem(good, secret, method, NOW + 120)
    assert "malformed" in credential_problem("v1 12 zz extra", secret, method, NOW)
    assert "malformed" in credential_problem("x" * 1000, secret, method, NOW)


# -- join tokens -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_key():
    return load_or_create_run_key(None)


@pytest.fixture(scope="module")
def token(run_key):
    return issue_token(run_key, NOW)


def test_a_token_round_trips_through_its_file_readable_by_its_owner_only(tmp_path, token, run_key):
    path = tmp_path / "join-token"
    token.save(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    loaded = JoinToken.load(path, NOW + 1)
    assert loaded.call_secret == token.call_secret and loaded.access_token == token.access_token
    assert loaded.member_key.get_public_key().to_bytes() == token.member_key.get_public_key().to_bytes()
    assert issue_token(run_key, NOW).call_secret == token.call_secret  # one call secret per run
    key_file = tmp_path / "run.key"
    first = load_or_create_run_key(key_file)
    assert load_or_create_run_key(key_file).to_bytes() == first.to_bytes()  # taken, not made again


def test_expired_forged_damaged_or_missing_tokens_are_refused_naming_what_is_wrong(tmp_path, token, monkeypatch):
    path = tmp_path / "join-token"
    token.save(path)
    with pytest.raises(TokenError, match="expired"):
        JoinToken.load(path, NOW + 31 * 86400)
    other_run = load_or_create_run_key(None)
    forged = JoinToken(authority=other_run.get_public_key().to_bytes(), member_key=token.member_key,
                       access_token=token.access_token, call_secret=token.call_secret)
    forged.save(path)
    with pytest.raises(TokenError, match="not signed by this run's key"):
        JoinToken.load(path, NOW)
    path.write_text("{not json")
    with pytest.raises(TokenError, match=f"{path}: not JSON"):
        JoinToken.load(path, NOW)
    monkeypatch.delenv("SWARMRT_JOIN_TOKEN", raising=False)
    with pytest.raises(TokenError, match="--join-token FILE or set SWARMRT_JOIN_TOKEN"):
        require_token(None, NOW)
    with pytest.raises(TokenError, match="cannot read it"):
        require_token(str(tmp_path / "nope"), NOW)


def test_the_dht_authorizer_accepts_its_run_s_tokens_only(token, run_key):
    assert MemberAuthorizer(token, clock=lambda: NOW).is_token_valid(token.access_token)
    stranger = issue_token(load_or_create_run_key(None), NOW)
    assert not MemberAuthorizer(token, clock=lambda: NOW).is_token_valid(stranger.access_token)
    assert not MemberAuthorizer(token, clock=lambda: NOW + 40 * 86400).is_token_valid(token.access_token)


# -- DHT records, signed and checked as a DHT node does it ---------------------------------------
class Node:
    """One member's record signing and checking: hivemind's composite of the owner signature and
    the run's record validator, as a DHT node builds it."""

    def __init__(self, run_ids=(RUN,)):
        self.key = RSAPrivateKey()
        self.signer = RSASignatureValidator(self.key)
        self.run = RunRecordValidator(run_ids, max_ttl_s=60.0, clock=lambda: NOW)
        self.validator = CompositeValidator([self.signer, self.run])

    def subkey(self, peer_id):
        return owner_subkey(peer_id, self.signer.local_public_key)

    def record(self, key, subkey, value, expires=NOW + 4):
        raw = DHTRecord(DHTID.generate(source=key).to_bytes(), MSGPackSerializer.dumps(subkey),
                        MSGPackSerializer.dumps(value), expires)
        return DHTRecord(raw.key, raw.subkey, self.validator.sign_value(raw), expires)


def stage_value(peer_id="peerA", stage=0, **fields):
    return {**StageRecord(peer_id, stage, "127.0.0.1:5000", 10.0, 0, 3, "serving", NOW).to_value(), **fields}


def test_an_owner_signed_well_formed_record_is_accepted():
    node = Node()
    assert node.validator.validate(node.record(stage_key(RUN, 1), node.subkey("peerA"), stage_value(stage=1)))
    intent = {"peer_id": "peerA", "stage": 2, "pinned": False, "settled": True, "heartbeat": NOW}
    assert node.validator.validate(node.record(joining_key(RUN), node.subkey("peerA"), intent))


@pytest.mark.parametrize("forgery, reason", [
    ("wrong owner", "wrong owner"), ("another's subkey", None), ("bare subkey", "no owner"),
    ("load='x'", "bad schema"), ("nan throughput", "bad schema"), ("unknown field", "bad schema"),
    ("far expiry", "expiry too far"), ("plain value", "a plain value"), ("wrong stage", "wrong stage")])
def test_forged_records_are_rejected(forgery, reason):
    honest, attacker, checker = Node(), Node(), Node()
    key = stage_key(RUN, 0)
    record = {
        "wrong owner": lambda: attacker.record(key, attacker.subkey("attacker"), stage_value(peer_id="peerA")),
        "another's subkey": lambda: attacker.record(key, honest.subkey("peerA"), stage_value(address="6.6.6.6:1")),
        "bare subkey": lambda: attacker.record(key, "peerA", stage_value()),
        "load='x'": lambda: attacker.record(key, attacker.subkey("peerA"), stage_value(load="x")),
        "nan throughput": lambda: attacker.record(key, attacker.subkey("peerA"), stage_value(throughput=float("nan"))),
        "unknown field": lambda: attacker.record(key, attacker.subkey("peerA"), stage_value(evil=1)),
        "far expiry": lambda: attacker.record(key, attacker.subkey("peerA"), stage_value(), expires=NOW + 3600),
        "plain value": lambda: DHTRecord(DHTID.generate(source=key).to_bytes(), DHTProtocol.IS_REGULAR_VALUE,
                                         MSGPackSerializer.dumps("gone"), NOW + 4),
        "wrong stage": lambda: attacker.record(stage_key(RUN, 1), attacker.subkey("peerA"), stage_value(stage=0)),
    }[forgery]()
    assert not checker.validator.validate(record)
    if reason is not None:
        assert any(r.startswith(reason) for r in checker.run.refused), checker.run.refused
    else:  # refused by the owner signature check before the run's validator sees it
        assert not checker.run.refused


def test_other_keys_pass_and_a_node_guards_the_runs_it_sees_announced():
    node, other = Node(run_ids=()), Node()
    averaging = DHTRecord(DHTID.generate(source="run1_stage0.0b01").to_bytes(), MSGPackSerializer.dumps(b"peer"),
                          MSGPackSerializer.dumps([1, 2]), NOW + 3600)
    assert node.validator.validate(averaging)
    bad = other.record(stage_key(RUN, 0), "peerA", stage_value())
    assert node.validator.validate(bad)  # a bootstrap knows no run yet ...
    assert node.validator.validate(other.record(RUNS_KEY, RUN, {"stages": 2, "config": "abc"}))
    assert not node.validator.validate(bad)  # ... until the run is announced
    assert not node.validator.validate(other.record(RUNS_KEY, "r2", {"stages": 10**9, "config": "abc"}))
    # a run that declares longer-lived records gets a cap to match (4x, at least 60 s) ...
    assert node.validator.validate(other.record(RUNS_KEY, "slow", {"stages": 1, "config": "abc", "ttl": 100.0},
                                                expires=NOW + 100))
    slow = other.record(stage_key("slow", 0), other.subkey("peerA"), stage_value(), expires=NOW + 300)
    assert node.validator.validate(slow) and not Node(run_ids=("slow",)).validator.validate(slow)
    # ... within bounds
    assert not node.validator.validate(other.record(RUNS_KEY, "r3", {"stages": 1, "config": "abc", "ttl": 1e9}))


# -- readers drop what is malformed ------------------------------------------------------------
class FakeDHT:
    """``get`` answers from ``{key: {subkey: value}}`` as hivemind does (one value per subkey)."""

    def __init__(self, entries, owner_marker=None):
        self.entries, self.owner_marker = entries, owner_marker

    def get(self, key, latest=True, return_future=True):
        items = self.entries.get(key)
        value = None if items is None else types.SimpleNamespace(
            value={sub: types.SimpleNamespace(value=v) for sub, v in items.items()})
        return types.SimpleNamespace(result=lambda timeout=None: value)


def test_a_record_with_load_x_is_dropped_by_train_and_status_readers():
    entries = {RUNS_KEY: {RUN: {"stages": 1, "config": "abc"}, "huge": {"stages": 10**9, "config": "x"}},
               stage_key(RUN, 0): {"peerA": stage_value(), "peerB": stage_value("peerB", load="x"),
                                   "peerC": stage_value("peerC", stage=0, throughput=float("inf"))},
               joining_key(RUN): {"peerD": {"peer_id": "peerD", "stage": "x", "pinned": False, "settled": True,
                                            "heartbeat": NOW}}}
    records, intents = dht_io.read_swarm(FakeDHT(entries), RUN, 1)
    assert [r.peer_id for r in records] == ["peerA"] and intents == []
    report = status.read_status(FakeDHT(entries), clock=lambda: NOW)
    assert list(report) == [RUN] and [p["peer_id"] for p in report[RUN]["stages"][0]] == ["peerA"]


def test_in_a_run_with_a_token_readers_keep_records_under_their_own_owner_subkey_only():
    marker = b"[owner:ssh-rsa AAAA]"
    entries = {stage_key(RUN, 0): {owner_subkey("peerA", marker): stage_value(),
                                   owner_subkey("peerX", marker): stage_value("peerB"), "peerC": stage_value("peerC")}}
    assert [r.peer_id for r in dht_io.read_stage(FakeDHT(entries, owner_marker=marker), RUN, 0)] == ["peerA"]
    assert len(dht_io.read_stage(FakeDHT(entries), RUN, 0)) == 3  # an open run (no token) reads them all
