"""Stage skipping in the trainer, without processes or sockets.

The trainer talks to in-process peers through
:class:`swarmrt.testing.inprocess.InProcessClient`, which runs the real
handler (StageServicer over StageWorkers), so its routed forward/backward,
re-planning, balance and exactly-once accounting are checked exactly; the
real swarm is tests/integration/test_skip_swarm.py.
"""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from torch import nn

from swarmrt.cli import main as cli_main
from swarmrt.config import ConfigError, config_from_dict
from swarmrt.routing.paths import Hop, PathRules, Route, validate_route
from swarmrt.models.build import check_skip, skip_compatibility
from swarmrt.discovery.dht import StageRecord
from swarmrt.routing.live import LiveRouting, balance_window, microbatch_seconds
from swarmrt.roles.trainer import Trainer, parse_stage_subset
from swarmrt.testing.inprocess import InProcessSwarm

pytestmark = pytest.mark.timeout(120)

SIX_STAGES = {
    "run": {"id": "skipunit", "seed": 1},
    "model": {"factory": "swarmrt.models:mlp", "kwargs": {"features": 8, "hidden": 16, "depth": 6},
              "layer_ranges": [[0, 2], [2, 4], [4, 6], [6, 8], [8, 10], [10, 11]]},
    "data": {"kind": "regression", "features": 8, "batch_size": 16, "microbatch_size": 4},
    "optimizer": {"name": "sgd", "lr": 0.05, "samples_per_step": 16},
    "network": {"max_retries": 4, "no_peers_timeout_s": 2.0},
    "routing": {"skip_ratio": 0.33},
}


def six_stage_config(**routing):
    raw = {**SIX_STAGES, "routing": {**SIX_STAGES["routing"], **routing}}
    return config_from_dict(raw)


def funnel(widths=(8, 32, 16, 8, 1)) -> nn.Module:
    """A model whose layers change width: its middle stages cannot be skipped."""
    return nn.Sequential(*[nn.Linear(a, b) for a, b in zip(widths, widths[1:])])


# -- the trainer over in-process peers (the real handler) ------------------------------------------
@pytest.fixture(autouse=True)
def _close_swarms():
    yield
    while SWARMS:
        SWARMS.pop().close()


SWARMS: list[InProcessSwarm] = []


def make_trainer(config, peers_per_stage=1, throughput=None):
    swarm = InProcessSwarm.build(config, peers_per_stage, throughput)
    SWARMS.append(swarm)
    trainer = Trainer(config, dht=None, client=swarm.client, trainer_id="t")
    trainer.view_peers(swarm.records)
    return trainer, swarm.workers


def train(trainer, steps):
    async def go():
        return [await trainer.train_step(step) for step in range(steps)]

    return asyncio.run(go())


def route_stages(trainer):
    return {mb: sorted(st) for mb, st in trainer.accounting.expected_stages.items()}


# -- pure helpers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("per_step, middle, visits, window", [
    (4, 4, 2, 4),    # 8 middle visits a step over 4 stages: every step is balanced
    (2, 4, 2, 2),
    (1, 4, 2, 2),    # one microbatch a step: a window of 2 steps
    (4, 6, 4, 12),   # 8 stages, 25% skip: 3 steps
    (3, 5, 1, 15),
])
def test_balance_window_is_the_smallest_whole_number_of_steps_that_balances_exactly(per_step, middle, visits, window):
    assert balance_window(per_step, middle, visits) == window
    assert window % per_step == 0 and (window * visits) % middle == 0


def test_microbatch_seconds_from_announced_throughput():
    assert microbatch_seconds(200.0, 4) == pytest.approx(0.02)
    assert microbatch_seconds(0.0, 4) is None and microbatch_seconds(float("nan"), 4) is None


@pytest.mark.parametrize("text, expected, needle", [
    (None, (0, 1, 2, 3, 4, 5), "all stages"),
    ("0,2,3,5", (0, 2, 3, 5), "skips stages 1, 4"),
    ("0,1,2,3,4,5", (0, 1, 2, 3, 4, 5), "all stages"),
    ("1,2,5", None, "start with stage 0"),
    ("0,2,4", None, "end with stage 5"),
    ("0,3,2,5", None, "increasing"),
    ("0,3,3,5", None, "increasing"),
    ("0,9", None, "outside 0..5"),
    ("0,x,5", None, "comma-separated"),
])
def test_parse_stage_subset(text, expected, needle):
    stages, why = parse_stage_subset(text, 6)
    assert stages == expected
    assert needle in why


# -- config validation -----------------------------------------------------------------------------
@pytest.mark.parametrize("raw, needle", [
    ({"model": {"stages": 2}, "routing": {"skip_ratio": 0.3}}, "at least 3 stages"),
    ({"model": {"stages": 3}, "routing": {"skip_ratio": 0.1}}, "skips no stage"),
    ({"model": {"stages": 3}, "routing": {"skip_ratio": 0.9}}, "never be skipped"),
])
def test_skip_ratio_the_stages_cannot_honour_is_a_config_error(raw, needle):
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    assert str(e.value).startswith("routing.skip_ratio:") and needle in str(e.value)


def test_transformer_blocks_can_be_skipped():
    config = config_from_dict({"model": {"factory": "swarmrt.models:tiny_llama",
                                         "kwargs": {"hidden_size": 16, "layers": 4, "heads": 2}, "stages": 4},
                               "routing": {"skip_ratio": 0.25}})
    ok, why = skip_compatibility(config)
    assert ok, why
    assert "[B, T, 16] -> float32 [B, T, 16]" in why
    check_skip(config)  # no error


def test_a_model_whose_middle_stages_change_shape_cannot_skip_and_says_why():
    config = config_from_dict({"model": {"factory": "tests.unit.test_skip_runtime:funnel", "stages": 4},
                               "data": {"kind": "regression", "features": 8},
                               "routing": {"skip_ratio": 0.25}})
    ok, why = skip_compatibility(config)
    assert not ok
    assert "stage 1 (layers 1..1) maps float32 [B, 32] -> float32 [B, 16]" in why
    with pytest.raises(ConfigError) as e:
        check_skip(config)
    assert str(e.value).startswith("routing.skip_ratio: 0.25 needs middle stages that can be skipped")


@pytest.mark.parametrize("command", [["train", "--steps", "1"], ["peer"]])
def test_cli_refuses_a_model_that_cannot_skip_with_one_line_and_exit_2(command, tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text('[model]\nfactory = "tests.unit.test_skip_runtime:funnel"\nstages = 4\n'
                   '[data]\nkind = "regression"\nfeatures = 8\n[routing]\nskip_ratio = 0.25\n')
    code = cli_main([command[0], "--config", str(cfg), "--initial-peers", "/ip4/127.0.0.1/tcp/1", *command[1:]])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "routing.skip_ratio" in err and "stage 1" in err and len(err.splitlines()) == 1, err


def test_cli_eval_refuses_a_bad_stage_list(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text("[model]\nstages = 4\n")
    code = cli_main(["eval", "--config", str(cfg), "--initial-peers", "m", "--stages", "1,3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--stages" in err and "start with stage 0" in err and len(err.splitlines()) == 1


# -- the peer table the scheduler reads ------------------------------------------------------------
def record(peer, stage, throughput=100.0, load=0, state="serving"):
    return StageRecord(peer_id=peer, stage=stage, address=peer, throughput=throughput, load=load, version=0,
                       state=state, heartbeat=0.0)


def test_sync_keeps_exactly_the_serving_unbanned_peers_with_their_figures():
    routing = LiveRouting(six_stage_config())
    records = [record("a", 0, 200.0, load=3), record("b", 1, 0.0), record("c", 1, 50.0), record("d", 2, 0.0),
               record("e", 5, 100.0, state="leaving"), record("f", 5, 100.0)]
    routing.sync(records, banned={"f"})
    assert sorted(p.peer for p in routing.table) == ["a", "b", "c", "d"]
    a = routing.table.get("a")
    assert a.forward_s + a.backward_s == pytest.approx(4 / 200.0)  # microbatch_size / throughput
    assert a.backward_s == pytest.approx(2 * a.forward_s)
    assert routing.table.in_flight("a") == 3
    # unmeasured peers: the fastest of their stage, else of the swarm (optimistic, so they are tried)
    assert routing.table.get("b").forward_s == pytest.approx(routing.table.get("c").forward_s)
    assert routing.table.get("d").forward_s == pytest.approx(a.forward_s)
    routing.sync([record("a", 0, 100.0)], banned=set())
    assert [p.peer for p in routing.table] == ["a"]
    assert routing.table.get("a").forward_s == pytest.approx(4 / 100.0 / 3)


# -- the trainer over in-process workers -----------------------------------------------------------
def test_skipping_trainer_routes_balanced_four_stage_paths_exactly_once_and_learns():
    config = six_stage_config()
    trainer, workers = make_trainer(config)
    steps = 12
    losses = train(trainer, steps)
    acc = trainer.accounting
    n = steps * config.data.microbatches_per_step
    assert acc.started == acc.applied == n and acc.duplicates == 0 and acc.incomplete() == []
    rules = PathRules(stages=6, skip_ratio=0.33)
    assert rules.visited == 4
    assert acc.stages_visited() == {"4": n}
    per_stage = acc.per_stage(6)
    assert per_stage[0] == per_stage[5] == n  # first and last stages see every microbatch
    assert per_stage[1:5] == [n // 2] * 4  # each middle stage exactly its share (4 of them, 2 visited each)
    for stages in route_stages(trainer).values():
        assert stages[0] == 0 and stages[-1] == 5 and len(stages) == 4
    # each worker applied exactly the microbatches whose route went through its stage
    for peer, worker in workers.items():
        assert worker.microbatches_applied == per_stage[worker.stage], peer
    assert losses[-1] < losses[0]


def test_skipped_stages_see_the_output_of_any_earlier_stage():
    config = six_stage_config()
    trainer, workers = make_trainer(config)
    train(trainer, 6)
    pairs = set()
    for stages in route_stages(trainer).values():
        pairs |= set(zip(stages, stages[1:]))
    assert any(b - a > 1 for a, b in pairs), pairs  # some hop really jumped over a stage
    assert (0, 1) in pairs or (0, 2) in pairs or (0, 3) in pairs


def test_a_dead_peer_mid_route_is_replanned_onto_its_stage_sibling():
    config = six_stage_config()
    trainer, workers = make_trainer(config, peers_per_stage=2)
    trainer.client.kill("s2p0")
    train(trainer, 6)
    acc = trainer.accounting
    n = 6 * config.data.microbatches_per_step
    assert acc.applied == n and acc.duplicates == 0 and acc.incomplete() == []
    assert workers["s2p0"].microbatches_applied == 0
    assert acc.per_stage(6)[1:5] == [n // 2] * 4  # the sibling kept stage 2 at its share
    assert acc.stages_visited() == {"4": n}


def test_a_middle_stage_with_no_live_peer_is_skipped_by_every_route():
    config = six_stage_config()
    trainer, workers = make_trainer(config)
    trainer.client.kill("s3p0")  # the only peer of stage 3
    train(trainer, 6)
    acc = trainer.accounting
    n = 6 * config.data.microbatches_per_step
    assert acc.applied == n and acc.duplicates == 0 and acc.incomplete() == []
    assert acc.stages_visited() == {"4": n}
    assert workers["s3p0"].microbatches_applied == 0 and acc.per_stage(6)[3] == 0
    assert acc.replans + acc.forward_restarts >= 1
    # once banned, stage 3 is out of the table: later routes avoid it from the start
    assert "s3p0" not in trainer.routing.table


def test_routes_prefer_fast_peers_when_a_stage_has_a_slow_and_a_fast_one():
    config = six_stage_config()
    # the slow peers announce themselves as the fast ones: routing goes by what the trainer measures
    trainer, workers = make_trainer(config, peers_per_stage=2,
                                    throughput=lambda stage, j: 20.0 if j == 0 else 400.0)
    for s in range(6):
        workers[f"s{s}p1"].compute_delay_s = 0.02
    train(trainer, 4)
    fast = sum(trainer.client.forwards[f"s{s}p0"] for s in range(6))
    slow = sum(trainer.client.forwards[f"s{s}p1"] for s in range(6))
    assert fast > 2 * slow, (fast, slow)


def test_full_pipeline_accounting_is_unchanged_by_the_new_fields():
    config = six_stage_config(skip_ratio=0.0)
    trainer, workers = make_trainer(config)
    assert trainer.routing.policy == "swarm" and trainer.routing.pick_per_hop
    train(trainer, 3)
    acc = trainer.accounting
    n = 3 * config.data.microbatches_per_step
    assert acc.per_stage(6) == [n] * 6 and acc.incomplete() == [] and acc.stages_visited() == {"6": n}


def test_evaluate_with_a_subset_of_stages_reports_a_finite_loss():
    config = config_from_dict({**SIX_STAGES, "data": {**SIX_STAGES["data"]}})
    trainer, workers = make_trainer(config)
    full = asyncio.run(trainer.evaluate(None, batches=2))
    part = asyncio.run(trainer.evaluate((0, 2, 4, 5), batches=2))
    assert full["samples"] == part["samples"] == 32
    assert math.isfinite(full["loss"]) and math.isfinite(part["loss"]) and full["loss"] != part["loss"]
    assert part["skipped"] == [1, 3] and part["perplexity"] is None  # regression: no perplexity
    assert all(not w.contexts for w in workers.values())  # forward only: nothing kept for a backward
    assert all(w.microbatches_applied == 0 for w in workers.values())


def test_every_route_taken_is_legal_and_its_backward_retraces_it():
    config = six_stage_config()
    trainer, _ = make_trainer(config, peers_per_stage=2)
    trainer.client.kill("s4p1")
    train(trainer, 5)
    rules = trainer.routing.rules
    peer_stage = {f"s{s}p{j}": s for s in range(6) for j in range(2)}
    calls = trainer.client.calls
    done = [mb for mb in calls if calls[mb].backward]
    assert len(done) == 5 * config.data.microbatches_per_step
    for mb in done:
        forward = [Hop(peer_stage[a], a) for a in calls[mb].forward]
        route = Route(origin=forward[0].peer, hops=tuple(forward))
        backward = [Hop(peer_stage[a], a) for a in calls[mb].backward]
        assert validate_route(route, rules, peer_stage, backward=backward) == [], (mb, forward, backward)


def test_eval_has_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["eval", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: swarmrt eval" in out and "--stages" in out and "--batches" in out
