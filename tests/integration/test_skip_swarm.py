"""Stage skipping on a real swarm: 6 stages x 1 peer on 127.0.0.1, skip ratio 0.33.

Every microbatch visits exactly round((1 - 0.33) x 6) = 4 stages: stage 0, two
of the four middle stages, and stage 5. One swarm for the module (start-up is
most of the time on 2 cores); the trained run is shared by both tests.
"""

import collections
import math

import pytest

from swarmrt.config import config_from_dict
from swarmrt.routing.paths import balance_bounds
from swarmrt.localswarm.swarm import LocalSwarm

from .conftest import FAST

pytestmark = pytest.mark.integration

SKIP = {
    **FAST,
    "run": {"id": "skiptest", "seed": 0},
    # tiny_llama with 8 blocks: [embedding, 8 blocks, head] cut into 6 stages; the middle ones hold blocks only
    "model": {"factory": "swarmrt.models:tiny_llama", "kwargs": {"hidden_size": 32, "layers": 8, "heads": 4},
              "layer_ranges": [[0, 2], [2, 3], [3, 5], [5, 6], [6, 8], [8, 10]]},
    "routing": {"skip_ratio": 0.33},
}
STEPS = 30


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    with LocalSwarm(config_from_dict(SKIP), peers_per_stage=1, workdir=tmp_path_factory.mktemp("skip")) as s:
        yield s
    assert s.leftover_processes() == []


@pytest.fixture(scope="module")
def trained(swarm):
    trainer = swarm.start_trainer(STEPS)
    summary = swarm.wait_trainer(trainer, timeout=240)
    return summary, swarm.metrics(trainer)


@pytest.mark.timeout(300)
def test_skipping_swarm_trains_balanced_four_stage_routes_exactly_once(swarm, trained):
    summary, metrics = trained
    n = STEPS * swarm.config.data.microbatches_per_step
    assert summary["steps"] == STEPS
    assert summary["microbatches"] == summary["applied"] == n
    assert summary["duplicates"] == 0 and summary["partially_applied"] == 0
    assert summary["stages_visited"] == {"4": n}, summary["stages_visited"]

    # the peers' own ledgers: nothing applied twice; first and last stage saw every microbatch;
    # every microbatch was applied by exactly 2 of the 4 middle stages
    ledgers = {stage: swarm.ledger(stage) for stage in range(6)}
    for stage, ids in ledgers.items():
        repeated = [mb for mb, c in collections.Counter(ids).items() if c > 1]
        assert repeated == [], f"stage {stage} applied {repeated[:5]} more than once"
    assert len(ledgers[0]) == len(ledgers[5]) == n and set(ledgers[0]) == set(ledgers[5])
    middle_visits = collections.Counter(mb for stage in (1, 2, 3, 4) for mb in ledgers[stage])
    assert set(middle_visits) == set(ledgers[0]) and set(middle_visits.values()) == {2}
    assert [len(ledgers[s]) for s in range(6)] == summary["microbatches_per_stage"]

    # every middle stage got its share: within 10% of the mean over the run
    middle = summary["microbatches_per_stage"][1:5]
    lo, hi = balance_bounds(sum(middle) / 4, 0.10)
    assert all(lo <= c <= hi for c in middle), (middle, lo, hi)

    losses = [m["loss"] for m in metrics]
    assert len(losses) == STEPS
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses


@pytest.mark.timeout(300)
def test_eval_with_half_the_middle_stages_reports_a_finite_loss(swarm, trained):
    summary, _ = trained
    half = swarm.evaluate(stages=[0, 1, 3, 5], batches=2)
    full = swarm.evaluate(batches=2)
    assert half["stages"] == [0, 1, 3, 5] and half["skipped"] == [2, 4] and full["skipped"] == []
    for result in (half, full):
        assert math.isfinite(result["loss"]) and result["perplexity"] == pytest.approx(math.exp(result["loss"]))
        assert result["samples"] == 2 * swarm.config.data.batch_size
    # trained with skips, the model degrades gracefully without half its middle stages:
    # still far better than where training started
    assert half["loss"] < summary["first_loss"] - 0.5, (half, summary["first_loss"])
