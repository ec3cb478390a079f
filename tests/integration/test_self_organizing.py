"""A swarm that organizes itself, with real processes: peers started together without
``--stage`` serve every stage; a stage whose peers all die is refilled by a peer from
another stage, which loads the stage from its checkpoint, and the run finishes with
every microbatch applied exactly once."""

import signal
import time

import pytest

from swarmrt.config import config_from_dict
from swarmrt.localswarm.swarm import _wait_for
from swarmrt.testing import LocalSwarm, assert_exactly_once

from .conftest import FAST

pytestmark = pytest.mark.integration


def start_unpinned(swarm, n):
    """Start ``n`` peers without --stage, all at once (no waiting between them)."""
    return [swarm.add_peer(None, wait=False) for _ in range(n)]


def served_stages(swarm, roles):
    return {r.stage for r in roles if swarm.poll_ready(r)}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("seed", range(5))
def test_six_peers_started_together_without_stage_serve_every_stage_within_30_s(tmp_path, seed):
    config = config_from_dict({**FAST, "run": {"id": f"join{seed}", "seed": seed}})
    with LocalSwarm(config, peers_per_stage=[0, 0, 0], workdir=tmp_path) as swarm:
        started = time.monotonic()
        roles = start_unpinned(swarm, 6)
        launched = time.monotonic() - started
        assert launched < 1.0, f"starting six processes took {launched:.2f} s"
        _wait_for(lambda: served_stages(swarm, roles) == {0, 1, 2}, 30.0, "every stage to be served", roles)
        every_stage_after = time.monotonic() - started
        for role in roles:
            swarm.wait_ready(role)
        counts = [sum(1 for r in roles if r.stage == s) for s in range(3)]
        print(f"seed {seed}: every stage served {every_stage_after:.1f} s after the start; peers per stage {counts}")
        assert min(counts) >= 1
        for role in roles:
            assert "picked stage" in role.log.read_text()
    assert swarm.leftover_processes() == []


@pytest.mark.timeout(300)
def test_a_stage_whose_peers_all_die_is_refilled_from_its_checkpoint_and_nothing_is_lost(tmp_path):
    config = config_from_dict({**FAST, "run": {"id": "refill", "seed": 3},
                               "checkpoint": {"location": str(tmp_path / "ckpt"), "every_steps": 2},
                               "rebalance": {"cooldown_s": 600.0}})  # only refills may move peers here
    with LocalSwarm(config, peers_per_stage=[0, 0, 0], workdir=tmp_path / "swarm") as swarm:
        roles = start_unpinned(swarm, 6)
        for role in roles:
            swarm.wait_ready(role)
        trainer = swarm.start_trainer(steps=30)
        swarm.wait_for_steps(trainer, 8, timeout=120)
        victims = swarm.peers(stage=2)
        assert victims, "no peer on stage 2"
        survivors = [r for r in roles if r not in victims]
        logged = {r.name: len(r.log.read_text()) for r in survivors}  # only moves after the kill count
        killed_at = time.monotonic()
        for victim in victims:  # SIGKILL: no drain, no leaving checkpoint, no live donor left
            swarm.stop_role(victim, signal.SIGKILL, timeout=10)

        def moved_to_stage_2():
            for role in survivors:
                for line in role.log.read_text()[logged[role.name]:].splitlines():
                    if line.startswith("serving stage 2 ") and "(moved from stage" in line:
                        return role, line
            return None

        mover, moved_line = _wait_for(moved_to_stage_2, 60.0, "a peer to move to the emptied stage 2", survivors)
        refill_s = time.monotonic() - killed_at
        print(f"stage 2 refilled {refill_s:.1f} s after its {len(victims)} peers were killed, by {mover.name}")
        assert swarm.peers(stage=2) == [mover]
        assert "resumed from checkpoint" in moved_line, moved_line
        summary = swarm.wait_trainer(trainer, timeout=240)
        assert summary["steps"] == 30
        assert_exactly_once(swarm, summary, trainer)
    assert swarm.leftover_processes() == []
