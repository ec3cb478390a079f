"""Byzantine peers in a real swarm: members that answer, but lie. Stage 0 has an honest peer and one
that returns NaN; stage 1 has two honest peers and one that returns zeros and announces 1e11
samples/s (absurd, but under the records' 1e12 cap, so it stays visible). Every hop is checked
(verify_fraction 1), so both liars are banned within a few microbatches, no reply of theirs reaches
the next stage, and the loss still falls."""

import re

import pytest

from swarmrt.config import config_from_dict
from swarmrt.testing import Peer, assert_no_leftovers

pytestmark = pytest.mark.integration

CONFIG = {
    "run": {"id": "byzantine", "seed": 0},
    "model": {"factory": "swarmrt.models:mlp", "kwargs": {"features": 8, "hidden": 32, "depth": 4}, "stages": 2},
    "data": {"kind": "regression", "features": 8, "batch_size": 8, "microbatch_size": 4},
    "optimizer": {"name": "adamw", "lr": 3e-3, "samples_per_step": 8},
    "network": {"heartbeat_s": 0.5, "record_ttl_s": 2.0, "forward_timeout_s": 3.0, "backward_timeout_s": 3.0,
                "ban_s": 5.0, "no_peers_timeout_s": 60.0, "verify_fraction": 1.0, "verify_tolerance": 0.3},
}
STEPS = 16
BANNED_BY_STEP = 8
"""Both liars are banned before this many steps (16 microbatches) are done."""


def peer_id(role) -> str:
    """The DHT id a peer serves under (its "serving stage ... as ID; ..." line)."""
    line = next(line for line in role.log.read_text().splitlines() if line.startswith("serving stage"))
    return line.split(" as ", 1)[1].split(";", 1)[0]


@pytest.mark.timeout(180)
def test_byzantine_peers_are_banned_and_the_loss_still_falls(local_swarm, fault_plan):
    swarm = local_swarm(config_from_dict(CONFIG), peers_per_stage=[2, 3])
    plan = fault_plan(seed=0)
    nan = plan.byzantine(Peer(0, 1), mode="nan", at_step=0)
    zeros = plan.byzantine(Peer(1, 2), mode="zeros", at_step=0)
    plan.lie_throughput(Peer(1, 2), value=1e11, at_step=0)
    run = swarm.run_with_faults(plan, steps=STEPS, timeout=150)

    summary, metrics = run.summary, run.metrics
    assert summary["steps"] == STEPS and summary["applied"] == summary["microbatches"], run.report()
    swarm.assert_exactly_once(summary, run.trainer)
    assert summary["bad_replies"] >= 1 and summary["check_bans"] >= 1, summary
    assert summary["bans"] == 2, summary  # the two liars, once each; no honest peer
    assert metrics[BANNED_BY_STEP - 1]["bans"] == 2, [m["bans"] for m in metrics]
    banned = set(re.findall(r"banned stage \d peer (\S+)", run.trainer.log.read_text()))
    assert banned == {peer_id(swarm.role(f.resolved[0])) for f in (nan, zeros)}, run.report()
    losses = [m["loss"] for m in metrics]
    assert sum(losses[-4:]) < 0.7 * sum(losses[:4]), losses
    swarm.stop()
    assert_no_leftovers(swarm)
