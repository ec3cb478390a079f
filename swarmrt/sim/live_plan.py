"""The live swarm as a scenario: how the trainer plans through the simulator's planner.

A trainer with ``[routing] plan_ahead`` hands :func:`plan_window` to its
:class:`~swarmrt.routing.live.LiveRouting` (routing never imports the
simulator, so the function is handed in). At the start of each balance
window, :func:`live_scenario` turns the live peer table into a
:class:`~swarmrt.sim.scenario.Scenario` (the adapter: the same figures the
online scheduler reads, no separate forecast), :func:`plan_window` plans the
window there with :func:`~swarmrt.sim.planner.plan_iteration` scored by the
simulator, and gives the routes, in live peer ids, to the trainer's
scheduler (``serve_plan``). The window's microbatches are dealt evenly over
the stage-0 peers. Pure.
"""

from __future__ import annotations

import random

from swarmrt.routing.links import FunctionLinks
from swarmrt.routing.paths import Hop, PathRules, Route
from swarmrt.routing.peer_table import PeerTable
from swarmrt.routing.policies import SkipScheduler
from swarmrt.sim.planner import plan_iteration
from swarmrt.sim.scenario import NodeSpec, Scenario, peer_table
from swarmrt.sim.simulator import plan_evaluator

LIVE_PLAN_WORK = 1_000
"""Work budget of planning one window live (see :func:`swarmrt.sim.planner.plan_iteration`): a few
hundred scorings of a window of a few microbatches, tens of milliseconds."""


def live_scenario(table: PeerTable, rules: PathRules, microbatches_per_origin: int = 1) -> tuple[Scenario, list]:
    """The live peers of ``table`` as a :class:`~swarmrt.sim.scenario.Scenario`, and its node ids' live ids.

    Node ``i`` is live peer ``ids[i]`` (stage, forward seconds, memory as
    the table has them); links are the table's (``transfer_s`` between the
    live ids; no latency part); ``backward_factor`` is the median
    backward/forward ratio of the peers (the trainer's figures split each
    peer's time 1:2, so it is exact there).
    """
    ids = [info.peer for stage in range(table.stages) for info in sorted(
        (table.get(p) for p in table.peers_of(stage)), key=lambda i: str(i.peer))]
    if not ids:
        raise ValueError("live_scenario: the table has no peers")
    ratios = sorted(table.get(p).backward_s / table.get(p).forward_s for p in ids)
    nodes = tuple(NodeSpec(i, table.get(p).stage, table.get(p).forward_s, table.get(p).memory_microbatches)
                  for i, p in enumerate(ids))
    links = FunctionLinks(lambda a, b: table.links.transfer_s(ids[a], ids[b]))
    scenario = Scenario(stages=table.stages, stages_visited_per_microbatch=rules.stages - round(
        rules.skip_ratio * rules.stages), first_stage_is_also_last=rules.first_stage_is_also_last,
        microbatches_per_origin=microbatches_per_origin, activation_bytes=0.0,
        backward_factor=ratios[len(ratios) // 2], per_hop_overhead_s=0.0, nodes=nodes, links=links, name="live")
    return scenario, ids


def plan_window(scheduler: SkipScheduler, window: int, now: float, rng: random.Random,
                work: int = LIVE_PLAN_WORK) -> tuple[tuple[Route, ...], str]:
    """Plan ``window`` microbatches over ``scheduler``'s live table and hand them to it (``serve_plan``).

    Returns the planned routes (live ids) and how they were planned.
    """
    scenario, ids = live_scenario(scheduler.table, scheduler.rules)
    origins = [i for i, n in enumerate(scenario.nodes) if n.stage == 0]
    if not origins:
        raise ValueError("plan_window: stage 0 has no live peer")
    counts = {o: window // len(origins) + (1 if k < window % len(origins) else 0) for k, o in enumerate(origins)}
    counts = {o: c for o, c in counts.items() if c}
    planner = SkipScheduler(scenario.rules, peer_table(scenario, head_factor=0.0), scheduler.config)
    plan = plan_iteration(planner, counts, 0.0, rng, evaluate=plan_evaluator(scenario, head_factor=0.0), work=work)
    routes = tuple(Route(origin=ids[r.origin], hops=tuple(Hop(h.stage, ids[h.peer]) for h in r.hops),
                         microbatch=r.microbatch) for r in plan.routes)
    scheduler.serve_plan(routes, now, plan.method)
    return routes, plan.method
