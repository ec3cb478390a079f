"""Stage assignment as a lever: which node moved to which stage would make an iteration faster.

:func:`propose_moves` plans the scenario as it is and, for each candidate
move (one node of a stage other than 0 to another stage other than 0,
leaving its stage at least one node), the scenario with that node moved,
each with the same planner, seed and work budget, and returns the moves
that help, the largest gain first. Stage-0 nodes are not moved: they are
the origins, where the data is.

What a live swarm does is not decided here: a peer moves only when the
rebalancing policy (:func:`swarmrt.routing.rebalance.plan_moves`, the one
live peers run) says so. :func:`rebalance_moves` shows what that policy
would do on the scenario's nodes, so ``swarmrt plan --propose-moves`` can
print both.

:func:`improve_assignment` searches further, keeping every stage's node
count: it swaps the stages of two nodes (neither on stage 0) whenever the
planner predicts a faster iteration, until no swap helps. Pure.
"""

from __future__ import annotations

import dataclasses
import itertools
import random

from swarmrt.routing.policies import SkipScheduler
from swarmrt.routing.rebalance import PeerState, RebalanceRules, plan_moves
from swarmrt.sim.planner import plan_iteration
from swarmrt.sim.scenario import Scenario, peer_table
from swarmrt.sim.simulator import plan_evaluator

MOVE_WORK = 500
"""Work budget of each plan compared (see :func:`swarmrt.sim.planner.plan_iteration`)."""
ALL_NODES_UP_TO = 60
"""Up to this many nodes every node is a candidate; above, the slowest node of each stage."""


@dataclasses.dataclass(frozen=True)
class MoveProposal:
    """One node moved to another stage, and what the planner predicts for the result."""

    node: int
    """The node moved."""
    source: int
    """Its stage now."""
    target: int
    """The stage it would serve."""
    predicted_s: float
    """Predicted seconds per iteration after the move."""
    gain: float
    """Share of the iteration time saved (0.1: 10% faster); negative: slower."""


def plan_seconds(scenario: Scenario, seed: int, work: int, jitter: float = 0.02) -> float:
    """Predicted seconds of one iteration of ``scenario`` as swarmrt's planner plans it."""
    sched = SkipScheduler(scenario.rules, peer_table(scenario))
    counts = {o: scenario.microbatches_per_origin for o in scenario.origins}
    plan = plan_iteration(sched, counts, 0.0, random.Random(seed), evaluate=plan_evaluator(scenario, jitter=jitter),
                          work=work)
    return plan.predicted_iteration_s


def moved(scenario: Scenario, node: int, target: int) -> Scenario:
    """``scenario`` with ``node`` serving ``target``."""
    nodes = tuple(dataclasses.replace(n, stage=target) if n.id == node else n for n in scenario.nodes)
    return dataclasses.replace(scenario, nodes=nodes)


def swapped(scenario: Scenario, a: int, b: int) -> Scenario:
    """``scenario`` with nodes ``a`` and ``b`` serving each other's stage."""
    return moved(moved(scenario, a, scenario.nodes[b].stage), b, scenario.nodes[a].stage)


def improve_assignment(scenario: Scenario, seed: int = 0, work: int = MOVE_WORK, rounds: int = 10
                       ) -> tuple[Scenario, list[tuple[int, int, float]]]:
    """Hill-climb the stage assignment by swaps (module docstring): the scenario reached and each swap kept,
    ``(node a, node b, predicted seconds after it)``.

    A pass tries every pair of nodes on different stages other than 0, in
    id order, and keeps each swap that makes the planner's prediction
    (:func:`plan_seconds`) strictly faster; passes repeat until one keeps
    nothing or ``rounds`` passes ran.
    """
    current, seconds = scenario, plan_seconds(scenario, seed, work)
    kept: list[tuple[int, int, float]] = []
    movable = [n.id for n in scenario.nodes if n.stage != 0]
    for _ in range(rounds):
        changed = False
        for a, b in itertools.combinations(movable, 2):
            if current.nodes[a].stage == current.nodes[b].stage:
                continue
            trial = swapped(current, a, b)
            s = plan_seconds(trial, seed, work)
            if s < seconds:
                current, seconds, changed = trial, s, True
                kept.append((a, b, s))
        if not changed:
            break
    return current, kept


def candidates(scenario: Scenario) -> list[tuple[int, int]]:
    """(node, target stage) pairs worth planning (module docstring)."""
    pairs = []
    for stage in range(1, scenario.stages):
        members = scenario.nodes_of(stage)
        if len(members) < 2:
            continue
        if len(scenario.nodes) > ALL_NODES_UP_TO:
            members = (max(members, key=lambda i: (scenario.nodes[i].forward_s, i)),)
        pairs += [(n, t) for n in members for t in range(1, scenario.stages) if t != stage]
    return pairs


def propose_moves(scenario: Scenario, seed: int = 0, work: int = MOVE_WORK, top: int = 3
                  ) -> tuple[float, list[MoveProposal]]:
    """The predicted seconds as it is, and up to ``top`` moves that make it faster, the best first."""
    base = plan_seconds(scenario, seed, work)
    found = []
    for node, target in candidates(scenario):
        seconds = plan_seconds(moved(scenario, node, target), seed, work)
        found.append(MoveProposal(node, scenario.nodes[node].stage, target, seconds, 1.0 - seconds / base))
    found.sort(key=lambda m: (-m.gain, m.node, m.target))
    return base, [m for m in found if m.gain > 0][:top]


def rebalance_moves(scenario: Scenario, rules: RebalanceRules | None = None) -> tuple[list, str]:
    """What the live rebalancing policy would do with the scenario's nodes (stage 0 pinned: the origins).

    Each node's throughput is one microbatch per forward + backward; a
    middle stage's demand is the share of microbatches that visit it.
    """
    peers = [PeerState(peer_id=f"{n.id:06d}", stage=n.stage,
                       throughput=1.0 / (n.forward_s * (1.0 + scenario.backward_factor)), pinned=n.stage == 0)
             for n in scenario.nodes]
    visits = scenario.rules
    middle = visits.middle_stages
    share = visits.middle_visits / len(middle) if middle else 1.0
    demand = [share if s in middle else 1.0 for s in range(scenario.stages)]
    return plan_moves(peers, scenario.stages, 1e9, rules or RebalanceRules(), demand)
