"""Baselines and bounds in the replay (swarmrt/sim/bounds.py): the best full pipeline is a bottleneck
assignment that beats greedy matching where greedy goes wrong; the one-origin floor is deterministic and
no plan beats it; stage-assignment swaps keep every stage's size."""

from __future__ import annotations

import random

import pytest

from swarmrt.routing.policies import make_policy
from swarmrt.sim import scenarios
from swarmrt.sim.bounds import best_full_pipelines, origin_alone_best, pipeline_routes
from swarmrt.sim.planner import plan_iteration
from swarmrt.sim.replay import replay
from swarmrt.sim.scenario import load_scenario, parse_scenario, peer_table

pytestmark = pytest.mark.timeout(120)

GEO = load_scenario(scenarios.path("geo-aws18"))


def greedy_trap():
    """Heads 0, 1 (stage 0), nodes 2, 3 (stage 1). 0-2 is the cheapest link, but taking it leaves 1-3 (10 s)."""
    lat = [[0, 9, 0.1, 1.0], [9, 0, 1.0, 10.0], [0.1, 1.0, 0, 9], [1.0, 10.0, 9, 0]]
    return parse_scenario({
        "name": "trap", "stages": 2, "stages_visited_per_microbatch": 2, "first_stage_is_also_last": True,
        "microbatches_per_origin": 2, "activation_bytes": 1.0, "backward_factor": 1.0,
        "nodes": [{"id": i, "stage": 0 if i < 2 else 1, "forward_s": 1.0, "memory_microbatches": 2} for i in range(4)],
        "latency_s": lat, "bandwidth_Bps": [[1e12] * 4 for _ in range(4)],
    })


def test_best_full_pipeline_beats_greedy_matching_where_greedy_is_trapped():
    sc = greedy_trap()
    best = best_full_pipelines(sc)
    assert sorted(best.pipelines) == [(0, 3), (1, 2)]
    assert best.combinations == 4  # 2 heads x 2 nodes, each timed alone with the 2 microbatches a head is dealt
    alone = [replay(sc, pipeline_routes(sc, [p], [2])).makespan_s for p in best.pipelines]
    assert best.makespan_s == pytest.approx(max(alone))  # disjoint pipelines share nothing in the replay
    full = make_policy("full", sc.rules, peer_table(sc))
    counts = full.deal({o: sc.microbatches_per_origin for o in sc.origins})
    greedy = plan_iteration(full, counts, 0.0, random.Random(0))
    assert {r.path[:2] for r in greedy.routes} == {(0, 2), (1, 3)}  # the policy falls into it
    assert best.makespan_s < replay(sc, greedy.routes).makespan_s - 10.0


def test_best_full_pipeline_on_geo_is_no_slower_than_the_policys_and_deals_nine_per_head():
    best = best_full_pipelines(GEO)
    assert len(best.pipelines) == 4 and len({p for pipe in best.pipelines for p in pipe}) == 16
    assert sorted(r.origin for r in best.routes).count(best.pipelines[0][0]) == 9
    full = make_policy("full", GEO.rules, peer_table(GEO))
    counts = full.deal({o: GEO.microbatches_per_origin for o in GEO.origins})
    policy_s = replay(GEO, plan_iteration(full, counts, 0.0, random.Random(0)).routes).makespan_s
    assert best.makespan_s <= policy_s
    assert best.makespan_s == pytest.approx(98.36, abs=0.01)  # docs/benchmarks-skip.md
    with pytest.raises(ValueError, match="max_combinations"):
        best_full_pipelines(GEO, max_combinations=100)


def test_one_origin_alone_is_deterministic_and_no_planned_origin_beats_it():
    a = origin_alone_best(GEO, 2, random.Random(0), iterations=1500, restarts=1)
    b = origin_alone_best(GEO, 2, random.Random(0), iterations=1500, restarts=1)
    assert a == b
    seconds, routes = a
    assert replay(GEO, routes).makespan_s == pytest.approx(seconds)
    assert len(routes) == GEO.microbatches_per_origin and {r.origin for r in routes} == {2}
    # the planner's whole-iteration plan: origin 2's microbatches finish no sooner than they could alone
    sched = make_policy("swarmrt", GEO.rules, peer_table(GEO))
    plan = plan_iteration(sched, {o: GEO.microbatches_per_origin for o in GEO.origins}, 0.0, random.Random(0),
                          work=500)
    finish = replay(GEO, plan.routes).finish_s
    mine = max(f for r, f in zip(plan.routes, finish) if r.origin == 2)
    assert mine >= seconds - 1.0  # the search's floor is within a second of anything a plan reached
    with pytest.raises(ValueError, match="not a stage-0 node"):
        origin_alone_best(GEO, 6, random.Random(0), iterations=1)


def test_stage_swaps_keep_every_stage_size_and_only_keep_faster_assignments():
    from swarmrt.sim.moves import improve_assignment, plan_seconds

    reached, kept = improve_assignment(GEO, 0, 300, rounds=1)
    assert [len(reached.nodes_of(s)) for s in range(GEO.stages)] == [6, 4, 4, 4]
    assert reached.nodes_of(0) == GEO.nodes_of(0)
    before = plan_seconds(GEO, 0, 300)
    assert kept, "geo-aws18's shipped assignment has a swap the planner predicts faster"
    seconds = [before] + [s for _, _, s in kept]
    assert all(b < a for a, b in zip(seconds, seconds[1:]))
    assert plan_seconds(reached, 0, 300) == pytest.approx(seconds[-1])


def test_any_middle_shapes_cover_every_order_and_stage():
    from swarmrt.sim.bounds import _shapes

    legal, free = _shapes(GEO), _shapes(GEO, any_middle=True)
    assert len(legal) == 3 * 16 and len(free) == 12 * 11  # stage pairs x peers; ordered pairs of middle nodes
    assert set(legal) < set(free)
    assert ((2, 10), (1, 6)) in free and ((2, 10), (2, 11)) in free  # swapped stages; two nodes of one stage


def test_disjoint_paths_share_no_middle_node_and_take_their_slowest_origin():
    from swarmrt.routing.paths import Hop, Route
    from swarmrt.sim.bounds import best_disjoint_paths

    seconds, paths = best_disjoint_paths(GEO)
    assert sorted(paths) == list(GEO.origins)
    used = [p for nodes in paths.values() for p in nodes]
    assert len(used) == len(set(used)) == 12  # every middle node once
    assert all(GEO.nodes[a].stage < GEO.nodes[b].stage for a, b in paths.values())
    routes = [Route(o, (Hop(0, o),) + tuple(Hop(GEO.nodes[p].stage, p) for p in paths[o]) + (Hop(0, o),), i)
              for i, o in enumerate(o for _ in range(6) for o in paths)]
    assert replay(GEO, routes).makespan_s == pytest.approx(seconds)  # they never meet
    assert seconds == pytest.approx(57.76, abs=0.01)  # docs/benchmarks-skip.md


def test_bottleneck_assign_minimises_the_worst_slot_not_the_first():
    from swarmrt.sim.bottleneck import bottleneck_assign

    cost = {("a", "x"): 1.0, ("a", "y"): 3.0, ("b", "x"): 2.0, ("b", "y"): 9.0}
    options = {"a": ["x", "y"], "b": ["x", "y"]}
    seconds, chosen = bottleneck_assign(["a", "b"], options, lambda s, o: cost[(s, o)], lambda o: frozenset([o]))
    assert (seconds, chosen) == (3.0, {"a": "y", "b": "x"})  # greedy "a takes x" would leave b at 9
    assert bottleneck_assign(["a", "b"], {"a": ["x"], "b": ["x"]}, lambda s, o: 1.0, lambda o: frozenset([o])) is None
    assert bottleneck_assign(["a", "b"], options, lambda s, o: cost[(s, o)], lambda o: frozenset([o]),
                             max_steps=1) is None  # gave up
