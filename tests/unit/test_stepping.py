"""Stepping without a per-step barrier (optimizer.staleness): bounded overlap, steps reported in order,
exactly-once unchanged, and staleness 0 identical to the unsplit model."""

import asyncio
import json

import pytest

from swarmrt.config import config_from_dict
from swarmrt.roles.stepping import run_steps
from swarmrt.roles.trainer import Trainer
from swarmrt.testing.inprocess import InProcessSwarm
from tests.unit.test_trainer import MLP, assert_exactly_once, assert_matches_reference, swarms  # noqa: F401

pytestmark = pytest.mark.timeout(120)


def test_steps_overlap_by_at_most_staleness_and_are_reported_in_order():
    async def go(staleness):
        release = {s: asyncio.Event() for s in range(5)}
        started, done, reported = [], [], []
        changed = asyncio.Condition()

        async def note(log, s):
            log.append(s)
            async with changed:
                changed.notify_all()

        async def step(s):
            await note(started, s)
            await release[s].wait()
            await note(done, s)
            return float(s)

        async def finished(s, loss):
            reported.append((s, loss))

        async def until(predicate):
            async with changed:
                await asyncio.wait_for(changed.wait_for(predicate), timeout=10)

        runner = asyncio.ensure_future(run_steps(step, 0, 5, staleness, finished))
        await until(lambda: len(started) == staleness + 1)
        at_first = list(started)
        release[1].set()  # a later step finishing first is held until the oldest is reported
        await until(lambda: 1 in done or 1 not in started)  # step 1 returned, if it was running
        held = list(reported)
        for s in (0, 2, 3, 4):
            release[s].set()
        assert await runner == 5
        return at_first, held, reported

    at_first, held, reported = asyncio.run(go(0))
    assert at_first == [0] and held == [] and reported == [(s, float(s)) for s in range(5)]
    at_first, held, reported = asyncio.run(go(2))
    assert at_first == [0, 1, 2] and held == [] and reported == [(s, float(s)) for s in range(5)]


def test_a_failing_step_cancels_the_others_and_raises():
    async def go():
        cancelled = []

        async def step(s):
            if s == 1:
                raise RuntimeError("hop failed")
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(s)
                raise

        async def finished(s, loss):
            pass

        with pytest.raises(RuntimeError, match="hop failed"):
            await run_steps(step, 0, 4, 1, finished)
        return cancelled

    assert asyncio.run(go()) == [0]


def train(swarms, tmp_path, staleness, steps):
    config = config_from_dict({**MLP, "optimizer": {**MLP["optimizer"], "staleness": staleness}})
    swarm = InProcessSwarm.build(config)
    swarms.append(swarm)
    trainer = Trainer(config, dht=None, client=swarm.client, trainer_id="t", metrics_path=str(tmp_path / "m.jsonl"))
    trainer.view_peers(swarm.records)
    in_flight, most = set(), [0]
    train_step = trainer.train_step

    async def counted(step):
        in_flight.add(step)
        most[0] = max(most[0], len(in_flight))
        assert min(in_flight) >= step - staleness, (step, sorted(in_flight))  # never beyond the bound
        try:
            return await train_step(step)
        finally:
            in_flight.discard(step)

    trainer.train_step = counted
    summary = asyncio.run(trainer.run(steps))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    return config, swarm, trainer, summary, losses, most[0]


def test_staleness_0_keeps_parity_with_the_unsplit_model(swarms, tmp_path):
    config, swarm, trainer, summary, losses, most = train(swarms, tmp_path, 0, 4)
    assert most == 1 and summary["steps"] == 4
    assert_exactly_once(trainer, 4 * config.data.microbatches_per_step, 3)
    assert_matches_reference(config, swarm, losses, 4)


def test_staleness_1_overlaps_two_steps_and_applies_every_microbatch_exactly_once(swarms, tmp_path):
    config, swarm, trainer, summary, losses, most = train(swarms, tmp_path, 1, 6)
    assert most == 2 and [json.loads(line)["step"] for line in (tmp_path / "m.jsonl").read_text().splitlines()] \
        == list(range(6))
    assert_exactly_once(trainer, 6 * config.data.microbatches_per_step, 3)
    assert min(losses[3:]) < losses[0]  # still learns (which microbatch lands first varies: compare the later steps)


@pytest.mark.parametrize("bad", [-1, 9, 1.5, True])
def test_a_bad_staleness_is_refused_naming_the_field(bad):
    from swarmrt.config import ConfigError

    with pytest.raises(ConfigError, match="optimizer.staleness"):
        config_from_dict({**MLP, "optimizer": {**MLP["optimizer"], "staleness": bad}})
