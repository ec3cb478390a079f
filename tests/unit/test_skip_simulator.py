"""The event-driven simulator: hand-computed timings, preemptions, and the path rules in execution."""

from __future__ import annotations

import os
import random

import pytest

from swarmrt.sim import scenarios
from swarmrt.routing.paths import balance_violations, memory_violations
from swarmrt.sim.scenario import generate_scenario, load_scenario, parse_scenario
from swarmrt.sim.simulator import SimConfig, plan_evaluator, simulate

pytestmark = pytest.mark.timeout(120)

GEO = scenarios.path("geo-aws18")


def two_node(forward=(1.0, 2.0), memory=(1, 1), per_origin=1, latency=0.5, bandwidth=100.0, nbytes=100.0,
             overhead=0.1, backward_factor=2.0, ret=False):
    """Stage 0 on node 0, stage 1 on node 1; one link each way."""
    return parse_scenario({
        "name": "two-node", "stages": 2, "stages_visited_per_microbatch": 2, "first_stage_is_also_last": ret,
        "microbatches_per_origin": per_origin, "activation_bytes": nbytes, "backward_factor": backward_factor,
        "per_hop_overhead_s": overhead,
        "nodes": [{"id": 0, "stage": 0, "forward_s": forward[0], "memory_microbatches": memory[0]},
                  {"id": 1, "stage": 1, "forward_s": forward[1], "memory_microbatches": memory[1]}],
        "latency_s": [[0, latency], [latency, 0]],
        "bandwidth_Bps": [[1, bandwidth], [bandwidth, 1]],
    })


@pytest.mark.parametrize("policy", ["full", "swarm", "random-skip", "swarmrt"])
def test_one_microbatch_two_nodes_matches_hand_arithmetic(policy):
    # transfer = 100 B / 100 B/s + 0.1 s overhead (uplink busy 1.1 s) + 0.5 s latency = 1.6 s
    # node 0 forward 0 -> 1; arrives 2.6; node 1 forward (with loss) 2.6 -> 4.6; backward 2 x 2 s -> 8.6
    # gradient arrives 10.2; node 0 backward 2 x 1 s -> 12.2
    report = simulate(two_node(), policy, SimConfig(iterations=1), random.Random(0))
    assert report.iteration_s == (pytest.approx(12.2),)
    assert report.completed == 1 and report.lost == 0
    # node 0 computed 1 + 2 s, node 1 computed 2 + 4 s, out of 12.2 s
    assert report.idle_fraction[0] == pytest.approx(1 - 3 / 12.2)
    assert report.idle_fraction[1] == pytest.approx(1 - 6 / 12.2)
    assert report.samples_per_s == pytest.approx(1 / 12.2)
    assert report.microbatches_per_stage == {0: 1, 1: 1}


def test_memory_of_one_serialises_microbatches():
    # origin memory 1: the second microbatch starts only when the first one's backward on node 0 ends (12.2)
    report = simulate(two_node(per_origin=2), "swarmrt", SimConfig(iterations=1), random.Random(0))
    assert report.iteration_s == (pytest.approx(24.4),)


def test_uplink_sends_one_transfer_at_a_time():
    # forward 0.1 s everywhere, backward 0.1 s, memory 2, transfer = 1 s of uplink + 0 latency.
    # mb1: fwd 0-0.1 on 0, sent 0.1-1.1; fwd 1.1-1.2 on 1, bwd 1.2-1.3; gradient sent 1.3-2.3; bwd 2.3-2.4 on 0
    # mb2: fwd 0.1-0.2 on 0, but node 0's uplink is busy until 1.1: sent 1.1-2.1; fwd 2.1-2.2, bwd 2.2-2.3 on 1;
    #      node 1's uplink is busy until 2.3: sent 2.3-3.3; bwd 3.3-3.4 on 0.   Iteration: 3.4 s
    # (with uplinks that send in parallel, mb2 would arrive at 1.2 and the iteration would take 2.6 s)
    scenario = two_node(forward=(0.1, 0.1), memory=(2, 2), per_origin=2, latency=0.0, overhead=0.0,
                        backward_factor=1.0)
    report = simulate(scenario, "full", SimConfig(iterations=1), random.Random(0))
    assert report.iteration_s == (pytest.approx(3.4),)


def test_route_back_to_origin_with_loss_head():
    # stage 0 is also last: 0 -> 1 -> 0. Transfers 1.6 s as above; head = 0.25 x 1 s on node 0.
    # fwd 0-1 on 0; arrive 2.6; fwd 2.6-4.6 on 1; arrive 6.2 at 0; head 6.2-6.45; arrive 8.05 at 1;
    # bwd 8.05-12.05 on 1; arrive 13.65; bwd 13.65-15.65 on 0
    report = simulate(two_node(ret=True), "swarmrt", SimConfig(iterations=1), random.Random(0))
    assert report.iteration_s == (pytest.approx(15.65),)
    assert report.microbatches_per_stage == {0: 1, 1: 1}


def test_outer_sync_adds_its_cost_every_h_iterations():
    plain = simulate(two_node(), "full", SimConfig(iterations=4), random.Random(0))
    synced = simulate(two_node(), "full", SimConfig(iterations=4, outer_sync_s=5.0, outer_sync_every=2),
                      random.Random(0))
    assert plain.iteration_s == pytest.approx((12.2,) * 4)
    assert synced.iteration_s == pytest.approx((12.2, 17.2, 12.2, 17.2))


@pytest.mark.parametrize("policy", ["full", "swarm", "random-skip", "swarmrt"])
@pytest.mark.parametrize("mtbf", [0.0, 60.0])
def test_memory_backward_order_and_balance_hold_in_execution(policy, mtbf):
    scenario = load_scenario(GEO)
    report = simulate(scenario, policy, SimConfig(iterations=2, preempt_mtbf_s=mtbf, downtime_s=30.0,
                                                  max_retries=1000, record=True), random.Random(3))
    memory = {n.id: n.memory_microbatches for n in scenario.nodes}
    assert memory_violations(report.holds, memory) == []
    assert sum(len(v) for v in report.holds.values()) >= 36 * 3
    assert len(report.backward_orders) == report.completed == 72
    for route, backward in report.backward_orders:
        assert backward == route.backward()
    if mtbf == 0.0 and policy in ("random-skip", "swarmrt"):
        middle = {s: report.microbatches_per_stage[s] for s in scenario.rules.middle_stages}
        assert balance_violations(middle, scenario.rules) == []


def test_preemptions_retry_and_never_lose_silently():
    scenario = load_scenario(GEO)
    for policy in ("full", "swarm", "random-skip", "swarmrt"):
        report = simulate(scenario, policy, SimConfig(iterations=2, preempt_mtbf_s=40.0, downtime_s=20.0,
                                                      max_retries=1000), random.Random(5))
        assert report.preemptions > 5, policy
        assert report.retried + report.rerouted > 0, policy
        assert report.microbatches == 72
        assert report.completed == 72 and report.lost == 0, policy


def test_out_of_retries_is_counted_lost():
    scenario = load_scenario(GEO)
    report = simulate(scenario, "swarmrt", SimConfig(iterations=1, preempt_mtbf_s=10.0, downtime_s=5.0,
                                                     max_retries=0), random.Random(1))
    assert report.lost > 0
    assert report.completed + report.lost == report.microbatches == 36


def test_swarmrt_beats_full_pipeline_and_random_skip_on_geo():
    scenario = load_scenario(GEO)
    seconds = {p: simulate(scenario, p, SimConfig(iterations=1), random.Random(0)).mean_iteration_s
               for p in ("full", "random-skip", "swarmrt")}
    assert seconds["swarmrt"] < 0.7 * seconds["full"]
    assert seconds["swarmrt"] < 0.85 * seconds["random-skip"]


def test_plan_evaluator_replays_a_plan_exactly():
    scenario = load_scenario(GEO)
    report = simulate(scenario, "swarmrt", SimConfig(iterations=1), random.Random(0))
    assert report.forecast_s == pytest.approx(report.iteration_s[0])
    evaluate = plan_evaluator(scenario)
    assert evaluate([]) == 0.0


def test_generated_swarm_of_hundreds_runs_every_policy():
    scenario = generate_scenario(load_scenario(GEO), 200, random.Random(0))
    for policy in ("full", "swarm", "random-skip", "swarmrt"):
        report = simulate(scenario, policy, SimConfig(iterations=1), random.Random(0))
        assert report.completed == report.microbatches == len(scenario.origins) * 6, policy
        assert report.mean_iteration_s > 0


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="SimConfig.iterations"):
        SimConfig(iterations=0)
    with pytest.raises(ValueError, match="SimConfig.preempt_mtbf_s"):
        SimConfig(preempt_mtbf_s=-1)
    with pytest.raises(ValueError, match="SimConfig.downtime_s"):
        SimConfig(downtime_s=0)


def test_jitter_is_seeded_noise_on_compute():
    scenario = two_node()
    exact = simulate(scenario, "full", SimConfig(iterations=3), random.Random(0)).iteration_s
    a = simulate(scenario, "full", SimConfig(iterations=3, jitter=0.1), random.Random(4)).iteration_s
    b = simulate(scenario, "full", SimConfig(iterations=3, jitter=0.1), random.Random(4)).iteration_s
    assert a == b and a != exact
    assert all(abs(x - 12.2) < 12.2 * 0.5 for x in a)


def test_planned_iterations_run_exactly_as_predicted(monkeypatch):
    import itertools

    from swarmrt.sim import planner, simulator
    scenario = load_scenario(GEO)
    predicted = []

    def spy(*args, **kwargs):
        p = planner.plan_iteration(*args, **kwargs)
        predicted.append(p.predicted_iteration_s)
        return p
    monkeypatch.setattr(simulator, "plan_iteration", spy)

    ticks = itertools.count()
    report = simulate(scenario, "swarmrt", SimConfig(iterations=4, plan_budget_s=0.3), random.Random(2),
                      clock=lambda: next(ticks) * 0.002)
    assert len(predicted) == 4
    assert list(report.iteration_s) == pytest.approx(predicted)
