"""Preemption with real processes: SIGTERM drains a peer with nothing lost; the last peer
of a stage leaves a checkpoint the next peer resumes from; a whole swarm restarted from
checkpoints continues its step counter and loss curve."""

import json
import math
import subprocess
import sys
import signal
import time

import pytest

from swarmrt.config import config_from_dict
from swarmrt.checkpoint.store import latest_checkpoint, read_checkpoint_meta
from swarmrt.testing import LocalSwarm, assert_exactly_once
from swarmrt.localswarm.swarm import _wait_for

from .conftest import FAST

pytestmark = pytest.mark.integration


def make_config(root, run_id, **checkpoint):
    return config_from_dict({**FAST, "run": {"id": run_id, "seed": 2},
                             "checkpoint": {"location": str(root), **checkpoint}})


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    config = make_config(root, "preempt")
    with LocalSwarm(config, peers_per_stage=[2, 2, 1], workdir=tmp_path_factory.mktemp("preempt")) as s:
        yield s
    assert s.leftover_processes() == []


@pytest.mark.timeout(300)  # includes starting the module swarm
def test_status_shows_stages_peers_and_heartbeats(swarm):
    swarm.train(steps=3)  # so peers have measured their throughput
    out = subprocess.run([sys.executable, "-m", "swarmrt", "status", "--initial-peers", swarm.maddr, "--json"],
                         capture_output=True, text=True, timeout=90, env=swarm.env)  # env: the join token
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)["preempt"]
    assert [len(stage) for stage in report["stages"]] == [2, 2, 1]
    addresses = {p.address for p in swarm.peers()}
    for stage, peers in enumerate(report["stages"]):
        for peer in peers:
            assert peer["stage"] == stage and peer["state"] == "serving" and peer["address"] in addresses
            assert peer["throughput"] > 0 and 0 <= peer["heartbeat_age_s"] < 10
    text = subprocess.run([sys.executable, "-m", "swarmrt", "status", "--initial-peers", swarm.maddr],
                          capture_output=True, text=True, timeout=90, env=swarm.env).stdout
    assert "run preempt" in text and "stage 2:" in text and "samples/s" in text


@pytest.mark.timeout(300)
def test_sigterm_drains_a_peer_with_no_microbatch_lost(swarm):
    trainer = swarm.start_trainer(steps=40)
    swarm.wait_for_steps(trainer, 8, timeout=120)
    leaving = swarm.peers(stage=1)[0]
    started = time.monotonic()
    code = swarm.stop_role(leaving, signal.SIGTERM, timeout=30)
    took = time.monotonic() - started
    assert code == 0, leaving.tail()
    assert took < 20 + 10, f"drain took {took:.1f} s"  # the default grace is 20 s
    assert not leaving.stragglers, "its DHT child or p2pd outlived it"
    assert "left after applying" in leaving.log.read_text()
    summary = swarm.wait_trainer(trainer)
    assert summary["steps"] == 40
    assert_exactly_once(swarm, summary, trainer)


@pytest.mark.timeout(300)
def test_last_peer_of_a_stage_leaves_a_checkpoint_and_a_new_peer_resumes(swarm):
    root, run_id = swarm.config.checkpoint.location, swarm.config.run.id
    trainer = swarm.start_trainer(steps=45)
    swarm.wait_for_steps(trainer, 15, timeout=180)
    last = swarm.peers(stage=2)[0]
    assert swarm.stop_role(last, signal.SIGTERM, timeout=30) == 0, last.tail()
    path = latest_checkpoint(root, run_id, 2)
    assert path is not None, last.tail()
    meta = read_checkpoint_meta(path)
    assert meta.stage == 2 and meta.step > 0 and meta.writer == last.peer_id
    before = [m["loss"] for m in swarm.metrics(trainer)]
    newcomer = swarm.add_peer(stage=2)
    assert f"resumed from checkpoint {path}" in newcomer.log.read_text()
    summary = swarm.wait_trainer(trainer)
    assert summary["steps"] == 45
    losses = [m["loss"] for m in swarm.metrics(trainer)]
    # the curve goes on from where it was (within noise), far below an untrained model's ln(256)
    after = losses[len(before):]
    tail_before, head_after = sum(before[-5:]) / 5, sum(after[:5]) / 5
    assert head_after < tail_before + 0.35, (before[-5:], after[:5])
    assert head_after < math.log(256) - 1.0
    assert_exactly_once(swarm, summary, trainer)


@pytest.mark.timeout(420)
def test_whole_swarm_restarts_from_checkpoints(tmp_path):
    root = tmp_path / "ckpt"
    config = make_config(root, "restart", every_steps=10)
    with LocalSwarm(config, peers_per_stage=1, workdir=tmp_path / "a") as first:
        one = first.train(steps=20)
        # every stage's heartbeat writes the step-20 checkpoint (poll, with a deadline)
        _wait_for(lambda: all((p := latest_checkpoint(str(root), "restart", s)) and
                              read_checkpoint_meta(p).step == 20 for s in range(3)), 60, "step-20 checkpoints")
        before = [m["loss"] for m in first.metrics(first.roles[-1])]
    assert first.leftover_processes() == []
    assert one["next_step"] == 20
    with LocalSwarm(config, peers_per_stage=1, workdir=tmp_path / "b") as second:
        for role in second.peers():
            assert "resumed from checkpoint" in role.log.read_text(), role.tail()
        two = second.train(steps=30, extra_args=["--resume"])
        after = [m["loss"] for m in second.metrics(second.roles[-1])]
    assert two["start_step"] == 20 and two["steps"] == 10
    assert two["next_step"] == 30
    # the loss right after the restart does not jump back up (it may keep falling: the curve is
    # still steep at step 20), and stays far below the untrained start
    tail_before = sum(before[-5:]) / 5
    head_after = sum(after[:5]) / 5
    assert head_after < tail_before + 0.35, (before[-5:], after[:5])
    assert head_after < before[0] - 0.5


@pytest.mark.timeout(300)
def test_sigterm_to_a_trainer_finishes_its_step_and_saves_its_position(swarm):
    from swarmrt.checkpoint.store import load_data_position

    trainer = swarm.start_trainer(steps=500, extra_args=["--stream", "7"])
    _wait_for(lambda: len(swarm.metrics(trainer)) >= 4, 120, "4 steps", [trainer])
    trainer.signal(signal.SIGTERM)
    summary = swarm.wait_trainer(trainer, timeout=60)  # raises unless it exits 0
    assert summary["stopped_early"] and 4 <= summary["next_step"] < 500
    assert summary["next_step"] == len(swarm.metrics(trainer))  # the step in flight was finished, not dropped
    assert load_data_position(swarm.config.checkpoint.location, swarm.config.run.id, 7) == summary["next_step"]
    assert summary["duplicates"] == 0 and summary["partially_applied"] == 0
