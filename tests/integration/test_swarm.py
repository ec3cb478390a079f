"""A real 3-stage x 2-peer swarm on 127.0.0.1: training, faults, joiners, bad input.

One swarm is shared by the module (start-up costs ~30 s on 2 cores); the tests
run in file order and each leaves at least one peer per stage alive. Faults are
declared as fault plans (``swarmrt.testing``) and every planned fault must fire.
"""

import asyncio
import math

import grpc
import pytest
import torch

from swarmrt.config import config_from_dict
from swarmrt.wire.proto import swarmrt_pb2 as pb
from swarmrt.wire.proto import swarmrt_pb2_grpc as pb_grpc
from swarmrt.wire.tensors import to_proto
from swarmrt.testing import FaultPlan, LocalSwarm, Peer, RandomPeer, assert_no_leftovers

from swarmrt.auth import client_interceptors

from .conftest import FAST

pytestmark = pytest.mark.integration


def assert_not_set_back(run, window: int = 10, tolerance: float = 0.05) -> None:
    """The fault did not set training back: the loss averaged over the run's last ``window`` steps
    is finite and no higher than over its first ``window`` (plus ``tolerance``). The module's swarm
    is shared, so by the later tests its model sits near its plateau, where one step's loss against
    another's is noise (a CI run once saw 2.9589 after 2.9542)."""
    losses = [r["loss"] for r in sorted(run.metrics, key=lambda r: r["step"])]
    assert len(losses) >= 2 * window, run.report()
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    assert math.isfinite(last) and last <= first + tolerance, (first, last)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    with LocalSwarm(config_from_dict(FAST), peers_per_stage=2, workdir=tmp_path_factory.mktemp("swarm")) as s:
        yield s
    assert_no_leftovers(s)


@pytest.mark.timeout(300)
def test_bad_input_is_refused_by_name_and_the_peer_keeps_serving(swarm):
    peer = swarm.peers(stage=1)[0]

    async def probe():
        async with grpc.aio.insecure_channel(peer.address,
                                             interceptors=client_interceptors(swarm.member_token())) as channel:
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
    trainer = swarm.start_trainer(steps=25)
    summary = swarm.wait_trainer(trainer)
    assert summary["final_loss"] < summary["first_loss"] - 0.5
    applied = swarm.assert_exactly_once(summary, trainer)
    assert all(len(ids) == summary["applied"] for ids in applied.values())
    # randomized routes: both peers of every stage got work
    for stage in range(3):
        used = [p for p in swarm.peers(stage) if p.ledger.exists() and p.ledger.read_text().strip()]
        assert len(used) == 2, f"stage {stage}: only {len(used)} peers got work"


@pytest.mark.timeout(300)
def test_rpc_faults_partition_and_preemption_lose_no_microbatch(swarm):
    plan = FaultPlan(seed=0)
    plan.drop_rpc(Peer(0, 0), "Forward", count=2, at_step=2)
    plan.delay_rpc(Peer(1, 1), "Backward", delay_s=5.0, count=1, at_step=3)  # past the 3 s deadline
    plan.slow(Peer(2, 1), factor=4, duration_s=3.0, at_step=5)
    cut = plan.partition([Peer(2, 0)], duration_s=3.0, at_step=8)
    leaver = plan.preempt(Peer(1, 0), at_step=12)
    back = plan.revive(leaver, at_step=14)
    run = swarm.run_with_faults(plan, steps=30)  # raises if any of them did not happen
    assert run.summary["steps"] == 30
    assert run.summary["hop_retries"] >= 4, run.report()  # 2 drops, 1 expired backward, >= 1 refused by the cut
    assert cut.effects >= 1
    swarm.assert_exactly_once(run.summary, run.trainer)
    preempted = swarm.role(leaver.resolved[0])
    assert preempted.proc.returncode == 0 and "left after applying" in preempted.log.read_text()
    revived = swarm.role(back.resolved[0])
    assert revived.alive() and revived.stage == 1 and "loaded state (version" in revived.log.read_text()
    assert_not_set_back(run)


@pytest.mark.timeout(300)
def test_joiner_downloads_stage_state_then_gets_work(swarm):
    trainer = swarm.start_trainer(steps=40)
    swarm.wait_for_steps(trainer, 5)
    joiner = swarm.add_peer(stage=1)
    log = joiner.log.read_text()
    assert "loaded state (version" in log and "from" in log, log
    version = int(log.split("loaded state (version ")[1].split(",")[0])
    assert version > 0  # it took over trained weights, not the initial ones
    swarm.assert_exactly_once(swarm.wait_trainer(trainer), trainer)
    second = swarm.start_trainer(steps=8)  # a fresh trainer sees the joiner from its first step
    swarm.assert_exactly_once(swarm.wait_trainer(second), second)
    assert joiner.ledger.exists() and joiner.ledger.read_text().strip(), "the joiner never received work"


@pytest.mark.timeout(300)
def test_sigkilled_peer_mid_run_loses_no_microbatch(swarm):
    plan = FaultPlan(seed=0)
    plan.crash(RandomPeer(stage=1), at_step=8)
    run = swarm.run_with_faults(plan, steps=40)  # raises if the crash never happened
    assert not swarm.role(plan.faults[0].resolved[0]).alive()
    assert run.summary["steps"] == 40
    swarm.assert_exactly_once(run.summary, run.trainer)
    assert_not_set_back(run)


@pytest.mark.timeout(300)
def test_sigstopped_peer_is_routed_around_and_its_stale_work_is_not_applied_when_it_resumes(swarm):
    plan = FaultPlan(seed=0)
    hang = plan.hang(RandomPeer(stage=2), duration_s=8.0, at_step=5)  # > the 3 s deadlines
    run = swarm.run_with_faults(plan, steps=30)
    assert hang.ended and hang.ended_time - hang.fired_time >= 8.0
    assert swarm.role(hang.resolved[0]).alive()  # resumed mid-run, and served on
    assert run.summary["steps"] == 30
    assert run.summary["hop_retries"] > 0
    swarm.assert_exactly_once(run.summary, run.trainer)
