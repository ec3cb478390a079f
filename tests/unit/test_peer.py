"""The stage peer's parts, driven with fakes: the heartbeat loop, draining, taking over a stage's state.

(The whole peer as a process, with signals and a real DHT, is tests/integration/test_preemption.py
and test_swarm.py.)
"""

import asyncio
import types

import pytest

from swarmrt.config import ConfigError, RunConfig, with_overrides
from swarmrt.roles.peer import PeerOptions, Peer, download_state, drain, heartbeat


class FakeAnnouncer:
    def __init__(self, serving=("me",), fail=0, usable=True, last_serving=()):
        self.announced, self.serving, self.fail = [], list(serving), fail
        self.usable, self.last_serving, self.reads = usable, list(last_serving), 0
        self.beat = asyncio.Event()

    async def announce(self, state, timeout=5.0):
        self.beat.set()
        if self.fail:
            self.fail -= 1
            raise OSError("dht unreachable")
        self.announced.append(state)

    async def serving_ids(self, timeout=5.0):
        self.reads += 1
        return list(self.serving)

    def dht_usable(self):
        return self.usable

    async def stage_records(self):
        return [types.SimpleNamespace(peer_id=p, state="serving", version=v, address=f"{p}:1")
                for p, v in self.records]


class FakeCheckpoints:
    def __init__(self, resumed=None):
        self.periodic, self.on_leave, self.resumed = [], [], resumed

    async def maybe_periodic(self, serving):
        self.periodic.append(serving)

    async def maybe_on_leave(self, serving):
        self.on_leave.append(serving)

    def resume(self):
        return self.resumed


class FakeServicer:
    def __init__(self):
        self.state, self.inflight, self.idle = "serving", 0, asyncio.Event()
        self.idle.set()


def test_heartbeat_announces_and_checkpoints_each_beat_survives_a_failed_one_and_stops_at_once(caplog):
    async def scenario():
        stop, announcer, checkpoints = asyncio.Event(), FakeAnnouncer(serving=("me", "other"), fail=1), FakeCheckpoints()
        task = asyncio.create_task(heartbeat(stop, 0.01, announcer, checkpoints))
        while len(announcer.announced) < 2:  # the first beat fails, two more pass
            announcer.beat.clear()
            await asyncio.wait_for(announcer.beat.wait(), timeout=5)
        stop.set()
        await asyncio.wait_for(task, timeout=1)
        return announcer, checkpoints

    with caplog.at_level("WARNING", logger="swarmrt.peer"):
        announcer, checkpoints = asyncio.run(scenario())
    assert set(announcer.announced) == {"serving"}
    assert checkpoints.periodic[:2] == [["me", "other"]] * 2
    assert "heartbeat failed: dht unreachable" in caplog.text


def test_heartbeat_returns_without_a_beat_when_already_stopped():
    async def scenario():
        stop, announcer = asyncio.Event(), FakeAnnouncer()
        stop.set()
        await asyncio.wait_for(heartbeat(stop, 3600, announcer, None), timeout=1)
        return announcer

    assert asyncio.run(scenario()).announced == []


def test_drain_announces_leaving_waits_for_in_flight_work_then_checkpoints_if_last():
    async def scenario():
        servicer, announcer, checkpoints = FakeServicer(), FakeAnnouncer(serving=("me",)), FakeCheckpoints()
        servicer.inflight = 1
        servicer.idle.clear()
        task = asyncio.create_task(drain(servicer, announcer, checkpoints, grace_s=30))
        await asyncio.wait_for(announcer.beat.wait(), timeout=5)  # set as `leaving` is announced
        assert announcer.announced == ["leaving"]
        assert servicer.state == "leaving" and not task.done() and checkpoints.on_leave == []
        servicer.inflight = 0
        servicer.idle.set()  # the last request finished
        await asyncio.wait_for(task, timeout=5)
        return checkpoints

    assert asyncio.run(scenario()).on_leave == [["me"]]


def test_drain_gives_up_on_in_flight_work_after_the_grace_period(caplog):
    async def scenario():
        servicer, checkpoints = FakeServicer(), FakeCheckpoints()
        servicer.inflight = 2
        servicer.idle.clear()  # never finishes
        await asyncio.wait_for(drain(servicer, FakeAnnouncer(fail=1), checkpoints, grace_s=0.05), timeout=5)
        return checkpoints

    with caplog.at_level("WARNING", logger="swarmrt.peer"):
        checkpoints = asyncio.run(scenario())
    assert "could not announce leaving: dht unreachable" in caplog.text
    assert "grace period over with 2 requests in flight" in caplog.text
    assert checkpoints.on_leave == [["me"]]  # still written: the state must not be lost


def fake_peer(options=None, records=(), checkpoints=None):
    dht = types.SimpleNamespace(peer_id="me")
    peer = Peer(RunConfig(), options or PeerOptions(initial_peers=()), dht)
    peer.stage, peer.announcer, peer.checkpoints = 1, FakeAnnouncer(), checkpoints
    peer.announcer.records = list(records)
    return peer


def test_a_joiner_takes_state_from_a_serving_peer_before_a_checkpoint(monkeypatch):
    loaded = []

    async def fake_download(worker, client, run_id, donors):
        loaded.append([d.peer_id for d in donors])
        return "loaded state (version 3, 10 bytes) from b"

    monkeypatch.setattr("swarmrt.roles.peer.download_state", fake_download)
    peer = fake_peer(records=[("me", 0), ("b", 3)], checkpoints=FakeCheckpoints(resumed="resumed from checkpoint x"))
    assert asyncio.run(peer.take_over_state()) == "loaded state (version 3, 10 bytes) from b"
    assert loaded == [["b"]]  # never itself


def test_the_first_peer_of_a_stage_resumes_from_a_checkpoint_or_starts_fresh():
    assert asyncio.run(fake_peer(checkpoints=FakeCheckpoints("resumed from checkpoint x")).take_over_state()) \
        == "resumed from checkpoint x"
    assert asyncio.run(fake_peer(checkpoints=FakeCheckpoints(None)).take_over_state()) \
        == "first peer of its stage: starts from the initial weights"
    assert asyncio.run(fake_peer().take_over_state()) == "first peer of its stage: starts from the initial weights"


def test_resume_prefers_the_checkpoint_and_fails_without_one():
    options = PeerOptions(initial_peers=(), resume=True)
    peer = fake_peer(options, records=[("b", 3)], checkpoints=FakeCheckpoints("resumed from checkpoint x"))
    assert asyncio.run(peer.take_over_state()) == "resumed from checkpoint x"
    from swarmrt.checkpoint.store import CheckpointError

    with pytest.raises(CheckpointError, match="--resume: no checkpoint of stage 1"):
        asyncio.run(fake_peer(options, records=[("b", 3)], checkpoints=FakeCheckpoints(None)).take_over_state())


def test_download_tries_donors_newest_first_and_moves_on_after_a_failure():
    class Client:
        def __init__(self):
            self.asked = []

        async def get_state(self, address, run_id, stage, timeout):
            self.asked.append(address)
            if address == "new:1":
                raise ConnectionError("refused")
            return b"0123456789"

    worker = types.SimpleNamespace(stage=1, version=0, load_state_bytes=lambda data: None)
    donors = [types.SimpleNamespace(peer_id=p, address=f"{p}:1", version=v) for p, v in (("old", 1), ("new", 5))]
    client = Client()
    assert asyncio.run(download_state(worker, client, "run", donors)) == "loaded state (version 0, 10 bytes) from old"
    assert client.asked == ["new:1", "old:1"]
    assert asyncio.run(download_state(worker, Client(), "run", donors[1:])) is None


def test_options_name_the_flag_that_cannot_work():
    config = with_overrides(RunConfig(), model={"stages": 2})
    with pytest.raises(ConfigError, match=r"--stage 2: the run has stages 0\.\.1"):
        PeerOptions(initial_peers=(), stage=2).check(config)
    with pytest.raises(ConfigError, match=r"--resume needs \[checkpoint\] location"):
        PeerOptions(initial_peers=(), resume=True).check(config)
    PeerOptions(initial_peers=(), stage=1, resume=True).check(with_overrides(config, checkpoint={"location": "/x"}))


def test_drain_without_a_dht_skips_it_and_decides_on_the_last_heartbeats_read(caplog):
    """A signal to the whole process group killed p2pd: no announce, no read (each would only
    time out), in-flight work still finishes, and "am I the last peer?" uses the heartbeat's list."""
    async def scenario(last_serving):
        servicer, checkpoints = FakeServicer(), FakeCheckpoints()
        announcer = FakeAnnouncer(serving=("never read",), usable=False, last_serving=last_serving)
        await asyncio.wait_for(drain(servicer, announcer, checkpoints, grace_s=30), timeout=5)
        return announcer, checkpoints

    with caplog.at_level("WARNING", logger="swarmrt.peer"):
        announcer, checkpoints = asyncio.run(scenario(["me", "other"]))
    assert announcer.announced == [] and announcer.reads == 0
    assert checkpoints.on_leave == [["me", "other"]]
    assert "could not announce leaving: the DHT node's p2pd is gone" in caplog.text
    assert "deciding on the last heartbeat's read" in caplog.text
    assert asyncio.run(scenario([]))[1].on_leave == [[]]  # never read: decide as the last peer


def test_drain_bounds_a_dht_call_that_hangs():
    class HangingAnnouncer(FakeAnnouncer):
        async def announce(self, state, timeout=5.0):
            await asyncio.Event().wait()

        async def serving_ids(self, timeout=5.0):
            await asyncio.Event().wait()

    async def scenario():
        servicer, checkpoints = FakeServicer(), FakeCheckpoints()
        announcer = HangingAnnouncer(last_serving=["me"])
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(drain(servicer, announcer, checkpoints, grace_s=2), timeout=10)
        return asyncio.get_running_loop().time() - started, checkpoints

    took, checkpoints = asyncio.run(scenario())
    assert took < 5, took  # 1.5 s for the announce, 1 s for the read at grace 2 s (was 5 s per store/read)
    assert checkpoints.on_leave == [["me"]]


def test_drain_gives_up_a_dht_call_as_soon_as_p2pd_dies_during_it(caplog):
    class DyingAnnouncer(FakeAnnouncer):
        async def announce(self, state, timeout=5.0):
            self.usable = False  # the group signal's p2pd death lands while the store waits
            await asyncio.Event().wait()

    async def scenario():
        servicer, checkpoints = FakeServicer(), FakeCheckpoints()
        announcer = DyingAnnouncer(last_serving=["me", "other"])
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(drain(servicer, announcer, checkpoints, grace_s=30), timeout=10)
        return asyncio.get_running_loop().time() - started, announcer, checkpoints

    with caplog.at_level("WARNING", logger="swarmrt.peer"):
        took, announcer, checkpoints = asyncio.run(scenario())
    assert took < 1, took  # not the 2 s call timeout at grace 30 s
    assert announcer.reads == 0 and checkpoints.on_leave == [["me", "other"]]
    assert "could not announce leaving: the DHT node's p2pd is gone" in caplog.text
