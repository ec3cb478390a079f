"""Peer-to-peer hops in a real 3-stage x 2-peer swarm on 127.0.0.1 (``network.chain_hops``).

Every hop after the first is a call from one peer process to the next, found in the run's DHT and
authenticated with the peer's own credential. A peer SIGKILLed mid-run and another frozen past the
deadlines must lose nothing and apply nothing twice, as when the trainer relays.
"""

import pytest

from swarmrt.config import config_from_dict
from swarmrt.testing import FaultPlan, LocalSwarm, RandomPeer, assert_no_leftovers

from .conftest import FAST

pytestmark = pytest.mark.integration

CHAINED = {**FAST, "network": {**FAST["network"], "chain_hops": True}}


@pytest.mark.timeout(300)
def test_a_chained_swarm_survives_a_killed_and_a_frozen_peer_exactly_once(tmp_path):
    with LocalSwarm(config_from_dict(CHAINED), peers_per_stage=2, workdir=tmp_path) as swarm:
        plan = FaultPlan(seed=1)
        hang = plan.hang(RandomPeer(stage=2), duration_s=5.0, at_step=4)  # > the 3 s deadlines
        crash = plan.crash(RandomPeer(stage=1), at_step=10)
        run = swarm.run_with_faults(plan, steps=24)  # raises if a fault never happened
        summary = run.summary
        assert summary["steps"] == 24
        assert not swarm.role(crash.resolved[0]).alive() and hang.ended
        # the peers passed the microbatches on themselves: two chained hops per forward, minus breaks
        assert summary["chained_hops"] >= 2 * summary["microbatches"] - 4 * summary["hop_retries"] > 0, summary
        swarm.assert_exactly_once(summary, run.trainer)
        assert summary["final_loss"] < summary["first_loss"]
    assert_no_leftovers(swarm)
