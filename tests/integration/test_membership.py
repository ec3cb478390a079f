"""Membership on a real swarm (2 stages x 1 peer on 127.0.0.1, its bootstrap's join token):
an intruder gets no traffic and none of its records lands; a call without the credential is
refused naming what is missing; a member's forged records are refused by the other nodes."""

import asyncio
import time

import grpc
import pytest
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from swarmrt.localswarm.swarm import _wait_for
from swarmrt import auth
from swarmrt.auth.dht_auth import MemberAuthorizer, OwnerSignatureValidator
from swarmrt.auth.token import issue_token, load_or_create_run_key
from swarmrt.config import config_from_dict
from swarmrt.discovery import dht as dht_io
from swarmrt.discovery.records import StageRecord, owner_subkey, stage_key
from swarmrt.roles.trainer import Trainer
from swarmrt.testing import LocalSwarm, assert_no_leftovers, read_intruder_report, start_intruder
from swarmrt.wire.client import StageClient

from .conftest import FAST

pytestmark = pytest.mark.integration
CONFIG = {**FAST, "run": {"id": "members", "seed": 0}, "model": {**FAST["model"], "stages": 2}}
RUN = CONFIG["run"]["id"]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    with LocalSwarm(config_from_dict(CONFIG), peers_per_stage=1, workdir=tmp_path_factory.mktemp("members")) as s:
        yield s
    assert_no_leftovers(s)


@pytest.fixture(scope="module")
def member(swarm):
    """A member's DHT node in this process (client mode): the trainer's and the readers'."""
    dht = dht_io.start_dht([swarm.maddr], client_mode=True, **auth.dht_kwargs(swarm.member_token(), RUN))
    yield dht
    dht_io.stop_dht(dht)


async def _call(client: StageClient, address: str, method: str):
    try:
        if method == "GetState":
            await client.get_state(address, RUN, 0, timeout=10)
        else:
            await client.info(address, timeout=10)
        return "OK", ""
    except grpc.aio.AioRpcError as e:
        return e.code().name, e.details()


@pytest.mark.timeout(240)  # includes starting the module swarm
def test_a_call_without_the_credential_gets_unauthenticated_naming_what_is_missing(swarm):
    address = swarm.peers(stage=0)[0].address
    other_run = issue_token(load_or_create_run_key(None), time.time())

    async def probe():
        token = swarm.member_token()
        clients = {"none": StageClient(8), "member": StageClient(8, credentials=auth.call_credentials(token)),
                   "member (interceptors)": StageClient(8, interceptors=auth.client_interceptors(token)),
                   "other run": StageClient(8, credentials=auth.call_credentials(other_run))}
        results = {}
        for name, client in clients.items():
            try:
                results[name] = [await _call(client, address, m) for m in ("Info", "GetState")]
            finally:
                await client.close()
        return results

    results = asyncio.run(probe())
    for code, details in results["none"]:
        assert code == "UNAUTHENTICATED" and "x-swarmrt-credential metadata is missing" in details
        assert "--join-token" in details
    assert results["member"] == results["member (interceptors)"] == [("OK", ""), ("OK", "")]  # streaming too
    assert all(code == "UNAUTHENTICATED" and "another run" in details for code, details in results["other run"])


@pytest.mark.timeout(240)
def test_an_intruder_gets_no_traffic_and_its_records_are_rejected(swarm, member):
    peers = swarm.peers()
    intruder = start_intruder(swarm, calls=[p.address for p in peers], victims=[p.peer_id for p in peers],
                              interval_s=0.5)
    report_path = swarm.workdir / "intruder.json"
    _wait_for(lambda: (read_intruder_report(report_path) or {}).get("rounds", 0) >= 1, 60, "the intruder's first round")

    async def train():  # a trainer in this process (a member), while the intruder keeps trying
        client = StageClient(8, credentials=auth.call_credentials(swarm.member_token()))
        try:
            return await Trainer(swarm.config, member, client=client, trainer_id="t").run(3)
        finally:
            await client.close()

    summary = asyncio.run(train())
    rounds = read_intruder_report(report_path)["rounds"]
    _wait_for(lambda: read_intruder_report(report_path)["rounds"] > rounds, 30, "an intruder round after training")
    swarm.stop_role(intruder)
    report = read_intruder_report(report_path)

    assert summary["steps"] == 3, summary
    assert report["joined"] is False and "none of the initial_peers responded" in report["join_error"]
    assert report["records_seen"] == 0 and report["served"] == 0  # it read nothing, and nobody called it
    assert report["calls"] and all(k.endswith(":UNAUTHENTICATED") for k in report["calls"]), report["calls"]
    assert "metadata is missing" in report["call_details"]["Forward"]
    records = [r for s in range(2) for r in dht_io.read_stage(member, RUN, s)]
    assert sorted((r.peer_id, r.address) for r in records) == sorted((p.peer_id, p.address) for p in peers)
    assert any("refused /swarmrt.Stage/Info: no run credential" in p.log.read_text() for p in peers)


@pytest.mark.timeout(240)
def test_a_members_forged_records_are_refused_by_the_other_nodes(swarm, member):
    """A member that runs its own code (no validators of its own, so nothing stops it locally)
    forges records; the swarm's nodes refuse every one and readers still see the honest peers."""
    token = swarm.member_token()
    forger = dht_io.start_dht([swarm.maddr], client_mode=True, authorizer=MemberAuthorizer(token),
                              record_validators=[OwnerSignatureValidator(RSAPrivateKey())])
    try:
        peer = swarm.peers(stage=0)[0]
        found = forger.get(stage_key(RUN, 0), latest=True)
        assert found is not None, "a member reads the stage"
        honest_subkey = next(k for k in found.value if isinstance(k, bytes) and k.startswith(peer.peer_id.encode()))
        mine = owner_subkey("forger", forger.owner_marker)  # signed with the forger's own key
        now = get_dht_time()
        fake = StageRecord(peer.peer_id, 0, "6.6.6.6:1", 1e6, 0, 10**6, "serving", time.time()).to_value()
        forgeries = {
            "another's subkey": (honest_subkey, fake, now + 4),
            # bytes, like the others: one hivemind node cannot hold str and bytes subkeys of a key
            # (sorting them raised TypeError in the forger's own process, once in CI)
            "bare subkey": (peer.peer_id.encode(), fake, now + 4),
            "wrong owner": (mine, fake, now + 4),
            "garbage owner key": (owner_subkey(peer.peer_id, b"[owner:ssh-rsa AAAA]"), fake, now + 4),
            "bad schema": (mine, {**fake, "peer_id": "forger", "load": "x"}, now + 4),
            "far expiry": (mine, {**fake, "peer_id": "forger"}, now + 3600),
            "plain value": (None, "gone", now + 3600),
        }
        stored = {name: forger.store(stage_key(RUN, 0), value, expires, subkey=subkey)
                  for name, (subkey, value, expires) in forgeries.items()}
        assert not any(stored.values()), stored
        records = dht_io.read_stage(member, RUN, 0)
        assert [(r.peer_id, r.address) for r in records] == [(peer.peer_id, peer.address)]
        # each refused for its own reason by the swarm's nodes (logged once per reason by each node)
        reasons = ["no owner", "wrong owner", "bad schema", "expiry too far", "a plain value"]
        logs = lambda: "".join(r.log.read_text() for r in swarm.roles if r.name.startswith(("bootstrap", "peer")))
        _wait_for(lambda: all(f"refused a DHT record (stage): {x}" in logs() for x in reasons), 30, "the refusals' logs")
    finally:
        dht_io.stop_dht(forger)
