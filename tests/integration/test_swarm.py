"""A real 3-stage x 2-peer swarm on 127.0.0.1: training, faults, joiners, bad input.

One swarm is shared by the module (start-up costs ~30 s on 2 cores); the tests
run in file order and each leaves at least one peer per stage alive.
"""

import asyncio
import collections
import signal
import time

import grpc
import pytest
import torch

from swarmrt.core.config import config_from_dict
from swarmrt.net.proto import swarmrt_pb2 as pb
from swarmrt.net.proto import swarmrt_pb2_grpc as pb_grpc
from swarmrt.net.tensors import to_proto
from swarmrt.testing.swarm import LocalSwarm, _wait_for

from .conftest import FAST

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    with LocalSwarm(config_from_dict(FAST), peers_per_stage=2, workdir=tmp_path_factory.mktemp("swarm")) as s:
        yield s
    assert s.leftover_processes() == []


def assert_exactly_once(swarm, summary):
    """Every microbatch the trainer applied shows up exactly once in each stage's ledgers."""
    assert summary["duplicates"] == 0
    assert summary["partially_applied"] == 0
    assert summary["applied"] == summary["microbatches"]
    for stage in range(swarm.config.num_stages):
        ids = swarm.ledger(stage)
        repeated = [mb for mb, n in collections.Counter(ids).items() if n > 1]
        assert repeated == [], f"stage {stage} applied {repeated[:5]} more than once"
    return {stage: set(swarm.ledger(stage)) for stage in range(swarm.config.num_stages)}


def wait_for_steps(swarm, trainer, n, timeout=120):
    _wait_for(lambda: len(swarm.metrics(trainer)) >= n, timeout, f"{n} training steps", [trainer])


@pytest.mark.timeout(300)
def test_bad_input_is_refused_by_name_and_the_peer_keeps_serving(swarm):
    peer = swarm.peers(stage=1)[0]

    async def probe():
        async with grpc.aio.insecure_channel(peer.address) as channel:
            stub = pb_grpc.StageStub(channel)

            async def forward(tensor_msg, stage=1, run_id="itest"):
                try:
                    await stub.Forward(pb.ForwardRequest(run_id=run_id, stage=stage, microbatch_id="probe",
                                                         input=tensor_msg), timeout=10)
                    return grpc.StatusCode.OK, ""
                except grpc.aio.AioRpcError as e:
                    return e.code(), e.details()

            good = torch.randn(2, 32, 32)
            results = {
                "dtype": await forward(to_proto(good.double())),
                "shape": await forward(to_proto(torch.randn(2, 32, 31))),
                "nan": await forward(to_proto(torch.full((2, 32, 32), float("nan")))),
                "stage": await forward(to_proto(good), stage=2),
                "run": await forward(to_proto(good), run_id="other"),
                "truncated": await forward(pb.Tensor(dtype="float32", shape=[2, 32, 32], codec="none",
                                                     data=b"\0" * 100)),
                "codec": await forward(pb.Tensor(dtype="float32", shape=[1], codec="zip9", data=b"\0" * 4)),
                "too_big": await forward(pb.Tensor(dtype="float32", shape=[300 * 2**20], codec="none")),
                "ok": await forward(to_proto(good)),
            }
            return results

    results = asyncio.run(probe())
    assert results["ok"] == (grpc.StatusCode.OK, "")
    expected = {"dtype": "float64", "shape": "shape", "nan": "NaN", "stage": "stage 2", "run": "other",
                "truncated": "bytes", "codec": "zip9", "too_big": "limit"}
    for name, needle in expected.items():
        code, details = results[name]
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, code, details)
        assert needle in details, (name, details)


@pytest.mark.timeout(300)
def test_swarm_trains_and_applies_every_microbatch_exactly_once(swarm):
    summary = swarm.train(steps=25)
    assert summary["final_loss"] < summary["first_loss"] - 0.5
    applied = assert_exactly_once(swarm, summary)
    assert all(len(ids) == summary["applied"] for ids in applied.values())
    # randomized routes: both peers of every stage got work
    for stage in range(3):
        used = [p for p in swarm.peers(stage) if p.ledger.exists() and p.ledger.read_text().strip()]
        assert len(used) == 2, f"stage {stage}: only {len(used)} peers got work"


@pytest.mark.timeout(300)
def test_joiner_downloads_stage_state_then_gets_work(swarm):
    trainer = swarm.start_trainer(steps=40)
    wait_for_steps(swarm, trainer, 5)
    joiner = swarm.add_peer(stage=1)
    log = joiner.log.read_text()
    assert "loaded state (version" in log and "from" in log, log
    version = int(log.split("loaded state (version ")[1].split(",")[0])
    assert version > 0  # it took over trained weights, not the initial ones
    assert_exactly_once(swarm, swarm.wait_trainer(trainer))
    summary = swarm.train(steps=8)  # a fresh trainer sees the joiner from its first step
    assert_exactly_once(swarm, summary)
    assert joiner.ledger.exists() and joiner.ledger.read_text().strip(), "the joiner never received work"


@pytest.mark.timeout(300)
def test_sigkilled_peer_mid_run_loses_no_microbatch(swarm):
    trainer = swarm.start_trainer(steps=40)
    wait_for_steps(swarm, trainer, 8)
    victim = swarm.peers(stage=1)[0]
    swarm.stop_role(victim, signal.SIGKILL)
    summary = swarm.wait_trainer(trainer)
    assert summary["steps"] == 40
    assert_exactly_once(swarm, summary)
    assert summary["final_loss"] < summary["first_loss"]


@pytest.mark.timeout(300)
def test_sigstopped_peer_is_routed_around_after_its_deadline(swarm):
    trainer = swarm.start_trainer(steps=30)
    wait_for_steps(swarm, trainer, 5)
    hung = swarm.peers(stage=2)[0]
    hung.signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        summary = swarm.wait_trainer(trainer)
    finally:
        swarm.stop_role(hung, signal.SIGKILL)  # never resumed: stale requests stay unapplied
    assert summary["steps"] == 30
    assert summary["hop_retries"] > 0
    assert_exactly_once(swarm, summary)
