"""The runtime plans through the same planner: the live table as a scenario (sim/live_plan.py's adapter,
handed to routing/live.py), a window planned there and served by the trainer's scheduler."""

from __future__ import annotations

import random

import pytest

from swarmrt.config import config_from_dict
from swarmrt.discovery.records import StageRecord
from swarmrt.routing.live import LiveRouting
from swarmrt.sim.live_plan import live_scenario, plan_window
from swarmrt.routing.paths import balance_violations, stage_counts, validate_route

pytestmark = pytest.mark.timeout(60)

CONFIG = {
    "run": {"id": "liveplan", "seed": 1},
    "model": {"factory": "swarmrt.models:mlp", "kwargs": {"features": 8, "hidden": 16, "depth": 6},
              "layer_ranges": [[0, 2], [2, 4], [4, 6], [6, 8], [8, 10], [10, 11]]},
    "data": {"kind": "regression", "features": 8, "batch_size": 16, "microbatch_size": 4},
    "optimizer": {"name": "sgd", "lr": 0.05, "samples_per_step": 16},
    "routing": {"skip_ratio": 0.33},
}


def record(peer, stage, throughput):
    return StageRecord(peer_id=peer, stage=stage, address=peer, throughput=throughput, load=0, version=0,
                       state="serving", heartbeat=0.0)


def routing(plan_ahead=True):
    config = config_from_dict(CONFIG)
    r = LiveRouting(config, plan_window=plan_window if plan_ahead else None)
    # two peers per stage; the "slow" ones take four times as long
    r.sync([record(f"s{s}{k}", s, 100.0 if k == "f" else 25.0) for s in range(6) for k in "fs"], banned=set())
    return r


def test_the_live_table_becomes_a_scenario_with_the_same_figures():
    r = routing()
    scenario, ids = live_scenario(r.table, r.rules)
    assert sorted(ids) == sorted(p.peer for p in r.table) and len(scenario.nodes) == 12
    for node in scenario.nodes:
        info = r.table.get(ids[node.id])
        assert (node.stage, node.forward_s, node.memory_microbatches) == (info.stage, info.forward_s,
                                                                          info.memory_microbatches)
    assert scenario.backward_factor == pytest.approx(2.0)
    assert scenario.links.transfer_s(0, 1) == pytest.approx(r.table.links.transfer_s(ids[0], ids[1]))
    assert scenario.rules.visited == r.rules.visited and scenario.stages == 6


def test_a_window_is_planned_and_served_in_live_ids():
    r = routing()
    r.begin_step(0, 0.0, random.Random(0))
    assert "plans scored" in r.last_plan
    stage_of = {p.peer: p.stage for p in r.table}
    routes = []
    for i in range(r.window):
        route, why = r.route(0.0, random.Random(i), microbatch=i)
        assert route is not None and why.startswith("origin") and "planned: " in why, why
        assert validate_route(route, r.rules, peer_stage=stage_of) == []
        routes.append(route)
    assert balance_violations(stage_counts(routes, r.rules), r.rules) == []
    # the planner prefers the fast peer of each stage it can
    used = [p for route in routes for p in route.path]
    assert sum(p.endswith("f") for p in used) > sum(p.endswith("s") for p in used)


def test_without_plan_ahead_routes_are_made_online():
    r = routing(plan_ahead=False)
    r.begin_step(0, 0.0, random.Random(0))
    route, why = r.route(0.0, random.Random(0), microbatch=0)
    assert r.last_plan == "" and "planned" not in why


def test_plan_ahead_is_a_checked_config_field():
    from swarmrt.config import ConfigError

    assert config_from_dict({**CONFIG, "routing": {"skip_ratio": 0.33, "plan_ahead": True}}).routing.plan_ahead
    assert not config_from_dict(CONFIG).routing.plan_ahead
    with pytest.raises(ConfigError, match="routing.plan_ahead"):
        config_from_dict({**CONFIG, "routing": {"skip_ratio": 0.33, "plan_ahead": "yes"}})


def test_a_planning_trainer_applies_every_microbatch_exactly_once():
    from tests.unit.test_skip_runtime import SWARMS, make_trainer, six_stage_config, train

    trainer, workers = make_trainer(six_stage_config(plan_ahead=True), peers_per_stage=2)
    try:
        train(trainer, 4)
        acc = trainer.accounting
        assert acc.started == acc.applied == 16 and acc.duplicates == 0 and acc.incomplete() == []
        assert acc.stages_visited() == {"4": 16}
        assert "plans scored" in trainer.routing.last_plan and trainer.routing.plan_window is plan_window
    finally:
        while SWARMS:
            SWARMS.pop().close()
