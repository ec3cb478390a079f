"""The path schedulers on small hand-made swarms where the best route is obvious, and on random ones."""

from __future__ import annotations

import collections
import random
import time

import numpy as np
import pytest

from swarmrt.sim import scenarios
from swarmrt.routing.links import MatrixLinks
from swarmrt.routing.paths import PathRules, balance_violations, stage_counts, validate_route
from swarmrt.routing.peer_table import PeerTable
from swarmrt.sim.scenario import generate_scenario, load_scenario, peer_table
from swarmrt.routing.policies import (
    FullPipeline,
    RandomSkip,
    SchedulerConfig,
    SkipScheduler,
    SwarmWiring,
    make_policy,
)
from swarmrt.sim.planner import plan_iteration

pytestmark = pytest.mark.timeout(60)

GEO = scenarios.path("geo-aws18")


def geo():
    import os
    here = os.path.dirname(__file__)
    return load_scenario(os.path.join(here, "..", "..", GEO) if not os.path.exists(GEO) else GEO)


def hand_table(stages, nodes, latency=0.01, slow=(), bandwidth=1e9, activation=1e6):
    """nodes: list of (stage, forward_s, memory); slow: {(i, j): latency} overrides."""
    n = len(nodes)
    lat = np.full((n, n), latency)
    for (i, j), v in dict(slow).items():
        lat[i, j] = v
    links = MatrixLinks(lat, np.full((n, n), bandwidth), activation)
    table = PeerTable(stages, links)
    for i, (stage, fwd, mem) in enumerate(nodes):
        table.upsert(i, stage, fwd, 2 * fwd, mem, head_s=0.25 * fwd if stage == 0 else 0.0)
    return table


def legal(route, rules, table):
    return validate_route(route, rules, peer_stage={p.peer: p.stage for p in table})


def test_prefers_much_faster_peer():
    rules = PathRules(stages=3, skip_ratio=0.0)
    table = hand_table(3, [(0, 1.0, 3), (1, 10.0, 3), (1, 1.0, 3), (2, 1.0, 3)])
    sched = SkipScheduler(rules, table)
    route, why = sched.route(0, now=0.0, rng=random.Random(0))
    assert route.path == (0, 2, 3)
    assert legal(route, rules, table) == []
    # forecast: fwd 0-1 on 0; link 0.011 s; fwd 1.011-2.011 on 2; link; fwd 2.022-3.022 on 3 (loss);
    # bwd 3.022-5.022 on 3; link; bwd 5.033-7.033 on 2; link; bwd 7.044-9.044 on 0
    assert why.startswith("stages (1,) via 2, 3: forecast done 9.04 s")


def test_avoids_much_slower_link():
    rules = PathRules(stages=3, skip_ratio=0.0)
    table = hand_table(3, [(0, 1.0, 3), (1, 1.0, 3), (1, 1.0, 3), (2, 1.0, 3)], slow={(0, 1): 100.0})
    route, _ = SkipScheduler(rules, table).route(0, 0.0, random.Random(0))
    assert route.path == (0, 2, 3)


def test_skips_the_stage_behind_a_slow_link_until_balance_forbids_it():
    # stage 0 is also last; 3 stages; each microbatch visits 2 stages: stage 0 and one of stages 1, 2.
    rules = PathRules.from_visited(3, 2, first_stage_is_also_last=True)
    table = hand_table(3, [(0, 1.0, 4), (1, 1.0, 4), (2, 1.0, 4)], slow={(1, 0): 50.0})
    sched = SkipScheduler(rules, table)
    sched.begin_iteration({0: 2}, 0.0, random.Random(0))
    first, _ = sched.route(0, 0.0, random.Random(0))
    assert first.path == (0, 2, 0)  # the return link from stage 1 is 50 s
    second, _ = sched.route(0, 0.0, random.Random(0))
    assert second.path == (0, 1, 0)  # a window of 2: each middle stage must get 1
    assert stage_counts([first, second], rules) == {1: 1, 2: 1}


def test_booked_load_spreads_microbatches_over_equal_peers():
    rules = PathRules(stages=3, skip_ratio=0.0)
    table = hand_table(3, [(0, 0.1, 8), (1, 1.0, 8), (1, 1.0, 8), (2, 0.1, 8)])
    sched = SkipScheduler(rules, table)
    sched.begin_iteration({0: 8}, 0.0, random.Random(0))
    used = collections.Counter(sched.route(0, 0.0, random.Random(i))[0].path[1] for i in range(8))
    assert used == {1: 4, 2: 4}


def test_memory_is_a_hard_limit_in_the_forecast():
    # one stage-1 peer with memory 1: the second microbatch's forward there waits for the first's backward
    rules = PathRules(stages=3, skip_ratio=0.0)
    table = hand_table(3, [(0, 0.1, 8), (1, 1.0, 1), (2, 0.1, 8)], latency=0.0, activation=0.0)
    sched = SkipScheduler(rules, table)
    sched.route(0, 0.0, random.Random(0), microbatch=0)
    sched.route(0, 0.0, random.Random(0), microbatch=1)
    first = {p: (s, e) for p, s, e in sched.timeline.booked(0).compute if p == 1}
    second_fwd = next(s for p, s, e in sched.timeline.booked(1).compute if p == 1)
    first_bwd_end = max(e for p, s, e in sched.timeline.booked(0).compute if p == 1)
    assert first and second_fwd >= first_bwd_end


POLICY_NAMES = ("full", "swarm", "random-skip", "swarmrt")


def random_swarm(rng):
    stages = rng.randint(2, 6)
    ret = rng.random() < 0.5
    visited = rng.randint(1 if ret else 2, stages)
    if ret and visited == 1 and stages > 2:
        visited = 2
    rules = PathRules.from_visited(stages, visited, ret)
    nodes = [(s, rng.uniform(0.2, 5.0), rng.randint(1, 3)) for s in range(stages) for _ in range(rng.randint(1, 4))]
    n = len(nodes)
    lat = np.array([[rng.uniform(0.0, 0.5) for _ in range(n)] for _ in range(n)])
    bw = np.array([[rng.uniform(1e8, 1e9) for _ in range(n)] for _ in range(n)])
    table = PeerTable(stages, MatrixLinks(lat, bw, 1e7))
    for i, (s, fwd, mem) in enumerate(nodes):
        table.upsert(i, s, fwd, 1.5 * fwd, mem, head_s=0.25 * fwd if (ret and s == 0) else 0.0)
    counts = {p: rng.randint(1, 4) for p in table.peers_of(0)}
    return rules, table, counts


def test_never_returns_an_illegal_route_on_random_swarms():
    rng = random.Random(1234)
    checked = 0
    for trial in range(120):
        rules, table, counts = random_swarm(rng)
        stage_of = {p.peer: p.stage for p in table}
        for name in POLICY_NAMES:
            sched = make_policy(name, rules, table)
            dealt = sched.deal(counts)
            effective = rules if sched.skips else PathRules(rules.stages, 0.0, rules.first_stage_is_also_last)
            if name == "swarmrt" and trial % 2:
                routes = list(plan_iteration(sched, dealt, 0.0, random.Random(trial)).routes)
            else:
                sched.begin_iteration(dealt, 0.0, random.Random(trial))
                routes = []
                for origin, n in dealt.items():
                    for _ in range(n):
                        r, why = sched.route(origin, 0.0, rng)
                        assert r is not None, why
                        assert isinstance(why, str) and why
                        routes.append(r)
            assert len(routes) == sum(counts.values())
            for r in routes:
                assert validate_route(r, effective, peer_stage=stage_of) == [], (name, rules, r)
                checked += 1
            if sched.skips:
                assert balance_violations(stage_counts(routes, rules), rules) == [], (name, rules)
    assert checked > 1000


def test_replan_around_a_dead_peer_keeps_the_done_hops():
    rules = PathRules.from_visited(4, 3, first_stage_is_also_last=True)
    nodes = [(0, 1.0, 3), (1, 1.0, 3), (1, 1.5, 3), (2, 1.0, 3), (2, 1.5, 3), (3, 1.0, 3), (3, 1.5, 3)]
    table = hand_table(4, nodes)
    sched = SkipScheduler(rules, table)
    sched.begin_iteration({0: 6}, 0.0, random.Random(0))
    route, _ = sched.route(0, 0.0, random.Random(0), microbatch=7)
    dead = route.path[2]
    table.remove(dead)
    sched.forget_peer(dead)
    new, why = sched.replan(route, 2, {dead}, 1.0, random.Random(0))
    assert new is not None, why
    assert new.hops[:2] == route.hops[:2]
    assert dead not in new.path
    assert new.stages == route.stages  # the other peer of that stage took over
    assert legal(new, rules, table) == []
    assert new.microbatch == 7
    assert "re-planned from hop 2" in why


def test_replan_takes_another_stage_when_a_stage_is_gone():
    rules = PathRules.from_visited(4, 3, first_stage_is_also_last=True)
    table = hand_table(4, [(0, 1.0, 3), (1, 1.0, 3), (2, 1.0, 3), (3, 1.0, 3)])
    sched = SkipScheduler(rules, table)
    sched.begin_iteration({0: 3}, 0.0, random.Random(0))
    route, _ = sched.route(0, 0.0, random.Random(0))
    gone_stage = route.stages[2]
    gone = route.path[2]
    table.remove(gone)
    new, why = sched.replan(route, 2, {gone}, 1.0, random.Random(0))
    assert new is not None, why
    assert gone_stage not in new.stages and legal(new, rules, table) == []
    assert sum(sched.balance.counts.values()) == 2  # the old stage's count moved to the new one
    assert sched.balance.counts[gone_stage] == 0


def test_replan_refuses_when_a_done_hop_is_dead():
    rules = PathRules.from_visited(4, 3, first_stage_is_also_last=True)
    table = hand_table(4, [(0, 1.0, 3), (1, 1.0, 3), (2, 1.0, 3), (3, 1.0, 3)])
    sched = SkipScheduler(rules, table)
    route, _ = sched.route(0, 0.0, random.Random(0))
    new, why = sched.replan(route, 2, {route.path[1]}, 1.0, random.Random(0))
    assert new is None and "restart" in why
    new, why = sched.replan(route, 2, {0}, 1.0, random.Random(0))
    assert new is None and "restart" in why


def test_route_refuses_a_dead_origin_and_a_dead_stage():
    rules = PathRules(stages=3, skip_ratio=0.0)
    table = hand_table(3, [(0, 1.0, 3), (1, 1.0, 3), (2, 1.0, 3)])
    sched = SkipScheduler(rules, table)
    assert sched.route(9, 0.0, random.Random(0)) == (None, "origin 9 is not a live stage-0 peer")
    table.remove(2)
    route, why = sched.route(0, 0.0, random.Random(0))
    assert route is None and why == "stage 2 (the last stage) has no live peer"


def test_balance_within_ten_percent_over_a_geo_iteration():
    scenario = geo()
    rules = scenario.rules
    counts = {o: scenario.microbatches_per_origin for o in scenario.origins}
    online = SkipScheduler(rules, peer_table(scenario))
    online.begin_iteration(counts, 0.0, random.Random(0))
    routes = [online.route(o, 0.0, random.Random(j))[0] for j in range(6) for o in scenario.origins]
    planned = plan_iteration(SkipScheduler(rules, peer_table(scenario)), counts, 0.0, random.Random(0)).routes
    for rs in (routes, planned):
        counts_by_stage = stage_counts(rs, rules)
        assert sum(counts_by_stage.values()) == 72
        assert balance_violations(counts_by_stage, rules) == []
        assert all(22 <= c <= 26 for c in counts_by_stage.values())


def test_planned_routes_are_served_in_order_and_renumbered():
    scenario = geo()
    sched = SkipScheduler(scenario.rules, peer_table(scenario))
    counts = {o: 6 for o in scenario.origins}
    plan = plan_iteration(sched, counts, 0.0, random.Random(0))
    mine = [r for r in plan.routes if r.origin == 3]
    served = [sched.route(3, 0.0, random.Random(0), microbatch=100 + i) for i in range(6)]
    assert [r.path for r, _ in served] == [r.path for r in mine]
    assert [r.microbatch for r, _ in served] == list(range(100, 106))
    assert all(why.startswith("planned: ") for _, why in served)
    extra, why = sched.route(3, 0.0, random.Random(0))  # past the plan: online EFT
    assert extra is not None and not why.startswith("planned")


def test_full_pipeline_uses_fixed_disjoint_pipelines_dealt_evenly():
    scenario = geo()
    table = peer_table(scenario)
    full = FullPipeline(scenario.rules, table)
    dealt = full.deal({o: 6 for o in scenario.origins})
    assert sorted(dealt.values()) == [9, 9, 9, 9]
    assert len(full.pipelines) == 4
    members = [p for pipe in full.pipelines for p in pipe]
    assert len(members) == len(set(members)) == 16
    full.begin_iteration(dealt, 0.0, random.Random(0))
    for head, n in dealt.items():
        paths = {full.route(head, 0.0, random.Random(i))[0].path for i in range(n)}
        assert len(paths) == 1
        (path,) = paths
        assert path[0] == path[-1] == head and len(path) == 5


def test_swarm_wiring_draws_peers_by_throughput_over_load():
    rules = PathRules(stages=3, skip_ratio=0.0)
    table = hand_table(3, [(0, 1.0, 3), (1, 1.0, 3), (1, 3.0, 3), (2, 1.0, 3)])
    sched = SwarmWiring(rules, table)
    rng = random.Random(7)

    def share_of_fast(draws=4000):
        fast = 0
        for _ in range(draws):
            r, _ = sched.route(0, 0.0, rng)
            fast += r.path[1] == 1
            sched.finished(r)
        return fast / draws

    assert share_of_fast() == pytest.approx(0.75, abs=0.03)   # throughput 1 vs 1/3
    table.set_in_flight(1, 2)                                  # 1 / (1 + 2) vs (1/3) / 1
    assert share_of_fast() == pytest.approx(0.5, abs=0.03)


def test_random_skip_spreads_over_stage_sets():
    scenario = geo()
    sched = RandomSkip(scenario.rules, peer_table(scenario))
    sched.begin_iteration({o: 6 for o in scenario.origins}, 0.0, random.Random(0))
    sets = collections.Counter(sched.route(o, 0.0, random.Random(j * 10 + o))[0].middle_stages(scenario.rules)
                               for j in range(6) for o in scenario.origins)
    assert set(sets) == {(1, 2), (1, 3), (2, 3)}


def test_planning_geo_takes_under_a_second_and_a_route_milliseconds():
    scenario = geo()
    sched = SkipScheduler(scenario.rules, peer_table(scenario))
    start = time.perf_counter()
    plan = plan_iteration(sched, {o: 6 for o in scenario.origins}, 0.0, random.Random(0),
                                clock=time.perf_counter, budget_s=0.5)
    assert time.perf_counter() - start < 1.0
    assert len(plan.routes) == 36 and plan.passes >= 1
    big = generate_scenario(scenario, 1000, random.Random(0))
    table = peer_table(big)
    online = SkipScheduler(big.rules, table)
    online.begin_iteration({o: 6 for o in big.origins}, 0.0, random.Random(0))
    start = time.perf_counter()
    for i, o in enumerate(big.origins[:50]):
        r, why = online.route(o, 0.0, random.Random(i))
        assert r is not None, why
    assert (time.perf_counter() - start) / 50 < 0.05


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="beam_width"):
        SchedulerConfig(beam_width=0)
    with pytest.raises(ValueError, match="peer_share_slack"):
        SchedulerConfig(peer_share_slack=-1.0)
    with pytest.raises(ValueError, match="unknown policy 'gpipe'"):
        make_policy("gpipe", PathRules(3), hand_table(3, [(0, 1, 1), (1, 1, 1), (2, 1, 1)]))


def test_load_announced_by_other_trainers_steers_routes_away():
    rules = PathRules(stages=3, skip_ratio=0.0)
    table = hand_table(3, [(0, 1.0, 3), (1, 1.0, 3), (1, 1.0, 3), (2, 1.0, 3)])
    sched = SkipScheduler(rules, table)
    assert sched.route(0, 0.0, random.Random(0))[0].path[1] in (1, 2)
    table.set_in_flight(1, 6)  # six microbatches of someone else queued at peer 1
    sched2 = SkipScheduler(rules, table)
    for i in range(3):
        route, _ = sched2.route(0, 0.0, random.Random(i), microbatch=i)
        assert route.path[1] == 2


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_policy_picks_the_origin_when_the_trainer_holds_the_data(policy):
    rules = PathRules(stages=3, skip_ratio=0.0)
    table = hand_table(3, [(0, 1.0, 1), (0, 1.0, 1), (1, 0.5, 4), (2, 0.5, 4)])
    sched = make_policy(policy, rules, table)
    sched.begin_iteration({0: 1, 1: 1}, 0.0, random.Random(0))
    first, why = sched.route(None, 0.0, random.Random(0), microbatch=0)
    assert first is not None and first.origin in (0, 1) and "origin" in why
    table.set_in_flight(first.origin, 1)  # it holds the first microbatch now (memory 1)
    if policy == "swarm":
        # SWARM draws the origin by the trainer's rule too (wiring.choose_peer): the busy origin's load is
        # 1 (the table's 1, which counts the microbatch this policy routed there), so it gets
        # (1 / 2) / (1 / 2 + 1) of the draws
        rng = random.Random(1)
        picks = collections.Counter(sched.choose_origin(0.0, rng)[0] for _ in range(4000))
        assert picks[first.origin] / 4000 == pytest.approx(1 / 3, abs=0.03)
        return
    second, _ = sched.route(None, 0.0, random.Random(0), microbatch=1)
    assert second.origin != first.origin


def test_the_previous_plan_is_improved_not_forgotten():
    scenario = geo()
    from swarmrt.sim.simulator import plan_evaluator
    evaluate = plan_evaluator(scenario)
    sched = SkipScheduler(scenario.rules, peer_table(scenario))
    counts = {o: 6 for o in scenario.origins}
    ticks = iter(range(10_000))
    clock = lambda: next(ticks) * 0.001  # a fake clock: 1 ms per reading, so the search is deterministic
    first = plan_iteration(sched, counts, 0.0, random.Random(0), clock=clock, budget_s=0.2, evaluate=evaluate)
    second = plan_iteration(sched, counts, 100.0, random.Random(1), clock=clock, budget_s=0.2, evaluate=evaluate)
    assert second.predicted_iteration_s <= first.predicted_iteration_s
    assert evaluate(second.routes) == pytest.approx(second.predicted_iteration_s)
    table_peer = first.routes[0].path[1]
    sched.table.remove(table_peer)  # the old plan no longer fits: planned afresh
    third = plan_iteration(sched, counts, 200.0, random.Random(2), clock=clock, budget_s=0.0, evaluate=evaluate)
    assert all(table_peer not in r.path for r in third.routes)
