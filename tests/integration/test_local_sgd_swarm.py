"""DiLoCo across real peer processes: stage groups average pseudo-gradients through
hivemind and end every successful round with identical global params (hash equality),
survive a peer killed mid-run, and let a joiner catch up to the group's hash. The groups
aggregate with CenteredClip (the robust path, end to end from the config key); among honest
peers it leaves nobody out."""

import re

import pytest

from swarmrt.config import config_from_dict
from swarmrt.local_sgd.averaging import RESULT_MARGIN_S
from swarmrt.testing import FaultPlan, LocalSwarm, Peer
from swarmrt.testing.asserts import OUTER_ROUND_OK, outer_rounds
from swarmrt.testing.asserts import assert_outer_rounds_agree as assert_group_hashes_agree

from .conftest import FAST

pytestmark = pytest.mark.integration

ANY_ROUND = re.compile(r"stage (\d+): outer round (\d+) (ok|rolled back|out of step[^:]*): .*?([\d.]+) s, hash")

CONFIG = {
    **FAST,
    "run": {"id": "diloco", "seed": 1},
    "model": {**FAST["model"], "stages": 2},
    "optimizer": {"lr": 3e-3, "samples_per_step": 4},
    "local_sgd": {"inner_steps": 4, "matchmaking_time_s": 3.0, "matchmaking_timeout_s": 8.0,
                  "next_chunk_timeout_s": 2.0, "allreduce_timeout_s": 10.0, "aggregation": "centered_clip"},
    "compression": {"pseudo_gradients": "fp16"},
}


def rounds(swarm, pattern=OUTER_ROUND_OK):
    return outer_rounds(swarm, pattern)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    config = config_from_dict(CONFIG)
    with LocalSwarm(config, peers_per_stage=[3, 2], workdir=tmp_path_factory.mktemp("diloco")) as s:
        yield s
    assert s.leftover_processes() == []


@pytest.mark.timeout(300)
def test_groups_of_two_and_three_reach_identical_global_params(swarm):
    summary = swarm.train(steps=40)
    assert summary["final_loss"] < summary["first_loss"]
    ok, shared = assert_group_hashes_agree(swarm)
    groups = {stage: max(int(m.group(3)) for (s, _, _), by in ok.items() if s == stage for m in by.values())
              for stage in (0, 1)}
    assert groups[0] == 3 and groups[1] == 2, groups  # a 3-peer and a 2-peer group both averaged
    assert shared >= 2
    for peer in swarm.peers(alive=False):  # honest peers are never left out (nor banned)
        assert "left out" not in peer.log.read_text(errors="replace"), peer.name


@pytest.mark.timeout(300)
def test_joiner_matches_the_group_hash_at_its_first_round(swarm):
    trainer = swarm.start_trainer(steps=30)
    swarm.wait_for_steps(trainer, 5, timeout=120)
    joiner = swarm.add_peer(stage=1)
    swarm.wait_trainer(trainer)

    def joined_a_group():
        ok, _ = assert_group_hashes_agree(swarm)
        return [key for key, by in ok.items() if joiner.name in by and len(by) >= 2]

    # keep training until the joiner has averaged with the group (a round it reaches alone is rolled back)
    for _ in range(6):
        if joined_a_group():
            break
        swarm.train(steps=15)
    assert joined_a_group(), f"the joiner never completed a round with the group:\n{joiner.tail()}"
    first_ok = min(joined_a_group(), key=lambda key: key[1])
    # at that round its hash equals its groupmates' (assert_group_hashes_agree checked every group)
    assert len(rounds(swarm)[first_ok]) >= 2


@pytest.mark.timeout(300)
def test_peer_killed_mid_run_does_not_stall_the_group(swarm):
    plan = FaultPlan(seed=0)
    plan.crash(Peer(stage=0, index=0), at_step=8)
    summary = swarm.run_with_faults(plan, steps=40).summary  # raises if the crash did not happen
    assert summary["steps"] == 40 and summary["duplicates"] == 0
    cfg = config_from_dict(CONFIG).local_sgd
    bound = cfg.matchmaking_timeout_s + cfg.allreduce_timeout_s + RESULT_MARGIN_S  # what StageAverager.average waits at most
    for (stage, rnd), by in rounds(swarm, ANY_ROUND).items():
        for name, m in by.items():
            assert float(m.group(4)) <= bound, f"{name} stage {stage} round {rnd} took {m.group(4)} s"
    assert_group_hashes_agree(swarm)
