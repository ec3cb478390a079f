"""Baselines and bounds in the independent replay: the best full pipeline, and one origin alone.

A cut "against the full pipeline" is only as honest as the full pipeline
it is measured against. The ``full`` policy
(:class:`~swarmrt.routing.policies.FullPipeline`) builds its DT-FM-style
pipelines by greedy cheapest-link matching, stage after stage, blind to
the link back to the head; that is a reasonable live policy but not the
best full pipeline a swarm could run. :func:`best_full_pipelines` finds
the best one by exhaustive search: in the replay
(:mod:`swarmrt.sim.replay`) disjoint pipelines share no node and no link,
so the iteration takes as long as its slowest pipeline alone, and the best
set of pipelines is a bottleneck assignment over every (head, stage-1 peer,
..., last-stage peer) combination, each timed alone in the replay. SkipPipe
measures its cut against a baseline whose pipelines its own partitioner
(GCMA, DT-FM's) optimised for the network; this is the replay's equivalent.

:func:`origin_alone_best` asks how fast one origin's microbatches can be
at all, with every other origin idle (nothing to share): a seeded
simulated-annealing search over the origin's route sets in the replay. No
plan of the whole iteration can finish before its slowest origin would
alone (sharing middle nodes only adds waits), so the largest of these is a
floor for the iteration, up to how well the search finds each origin's
optimum.

Pure: randomness comes in as ``rng``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from typing import Sequence

from swarmrt.routing.paths import Hop, Route
from swarmrt.sim.bottleneck import bottleneck_assign
from swarmrt.sim.replay import replay
from swarmrt.sim.scenario import Scenario

MAX_COMBINATIONS = 50_000
"""Most (head, peer per stage) combinations :func:`best_full_pipelines` times one by one."""


@dataclasses.dataclass(frozen=True)
class FullBaseline:
    """The best full pipeline found, and what it takes in the replay."""

    pipelines: tuple[tuple[int, ...], ...]
    """Each ``(head, stage-1 node, ..., stage-(S-1) node)``; disjoint."""
    routes: tuple[Route, ...]
    """The iteration's routes: the microbatches dealt evenly over the heads, heads taking turns."""
    makespan_s: float
    """Seconds of the iteration in the replay (its slowest pipeline's, since they share nothing)."""
    combinations: int
    """Combinations timed."""


def pipeline_routes(scenario: Scenario, pipelines: Sequence[Sequence[int]], counts: Sequence[int]) -> list[Route]:
    """``counts[i]`` microbatches through ``pipelines[i]`` (no skipping), heads taking turns."""
    routes: list[Route] = []
    ret = scenario.first_stage_is_also_last
    for j in range(max(counts, default=0)):
        for pipe, n in zip(pipelines, counts):
            if j < n:
                hops = tuple(Hop(s, p) for s, p in enumerate(pipe)) + ((Hop(0, pipe[0]),) if ret else ())
                routes.append(Route(pipe[0], hops, len(routes)))
    return routes


def best_full_pipelines(scenario: Scenario, max_combinations: int = MAX_COMBINATIONS) -> FullBaseline:
    """The set of disjoint pipelines whose slowest pipeline is fastest in the replay (module docstring).

    As many pipelines as the smallest stage has nodes; the scenario's
    microbatches are dealt evenly over their heads, the first heads taking
    one more when they do not divide (as the ``full`` policy deals them).
    Raises ValueError when there are more than ``max_combinations``
    combinations to time.
    """
    stage_nodes = [scenario.nodes_of(s) for s in range(scenario.stages)]
    width = min(len(n) for n in stage_nodes)
    total = scenario.microbatches_per_iteration
    counts = [total // width + (1 if i < total % width else 0) for i in range(width)]
    combos = math.prod(len(n) for n in stage_nodes)
    if combos > max_combinations:
        raise ValueError(f"best_full_pipelines: {combos} combinations of one node per stage, more than "
                         f"max_combinations={max_combinations}")
    cost: dict[tuple[tuple[int, ...], int], float] = {}
    for pipe in itertools.product(*stage_nodes):
        for n in set(counts):
            cost[(pipe, n)] = replay(scenario, pipeline_routes(scenario, [pipe], [n])).makespan_s
    pipes = list(itertools.product(*stage_nodes))
    found = bottleneck_assign(list(range(width)), {slot: pipes for slot in range(width)},
                              lambda slot, pipe: cost[(pipe, counts[slot])], frozenset)
    assert found is not None  # one node per stage for each of ``width`` pipelines always exists
    pipelines = [found[1][slot] for slot in range(width)]
    routes = pipeline_routes(scenario, pipelines, counts)
    return FullBaseline(tuple(pipelines), tuple(routes), replay(scenario, routes).makespan_s, len(cost))


def _shapes(scenario: Scenario, any_middle: bool = False) -> list[tuple[tuple[int, int], ...]]:
    """Every legal (stage, node) sequence after the origin: the middle stages in order, then the last stage.

    ``any_middle``: instead, any distinct middle nodes in any order, whatever stage they serve (what
    every stage assignment of the middle nodes and every reordering of stages would allow at once).
    """
    rules = scenario.rules
    tail = () if rules.first_stage_is_also_last else (rules.last_stage,)
    shapes = []
    if any_middle:
        middle_nodes = [p for s in rules.middle_stages for p in scenario.nodes_of(s)]
        for nodes in itertools.permutations(middle_nodes, rules.middle_visits):
            for last in itertools.product(*(scenario.nodes_of(s) for s in tail)):
                shapes.append(tuple((scenario.nodes[p].stage, p) for p in nodes) + tuple(zip(tail, last)))
        return shapes
    for middle in itertools.combinations(rules.middle_stages, rules.middle_visits):
        stages = middle + tail
        for nodes in itertools.product(*(scenario.nodes_of(s) for s in stages)):
            shapes.append(tuple(zip(stages, nodes)))
    return shapes


def _routes(scenario: Scenario, origin: int, shapes: Sequence[tuple[tuple[int, int], ...]]) -> list[Route]:
    back = (Hop(0, origin),) if scenario.first_stage_is_also_last else ()
    return [Route(origin, (Hop(0, origin),) + tuple(Hop(s, p) for s, p in shape) + back, i)
            for i, shape in enumerate(shapes)]


def origin_alone_best(scenario: Scenario, origin: int, rng: random.Random, iterations: int = 15_000,
                      restarts: int = 4, any_middle: bool = False) -> tuple[float, tuple[Route, ...]]:
    """The fastest set of ``origin``'s routes found with every other origin idle: (replay seconds, routes).

    Simulated annealing: from a random route set, change one
    microbatch's route at a time, accept a slower set with probability
    ``exp(-delta / T)`` (T from 2 s down to 0.02 s); ``restarts``
    independent runs of ``iterations`` steps. The balance rule is not
    imposed (one origin alone could not meet it), which can only make
    the floor lower. ``any_middle``: routes through any distinct middle
    nodes in any order (the floor over every stage assignment of the
    middle nodes and every swap of stages; the routes need not be legal
    under the scenario's own assignment).
    """
    if origin not in scenario.origins:
        raise ValueError(f"origin_alone_best: node {origin} is not a stage-0 node of the scenario")
    shapes = _shapes(scenario, any_middle)
    n = scenario.microbatches_per_origin
    best: tuple[float, list] | None = None
    for _ in range(restarts):
        current = [rng.choice(shapes) for _ in range(n)]
        value = replay(scenario, _routes(scenario, origin, current)).makespan_s
        temperature = 2.0
        for _ in range(iterations):
            candidate = list(current)
            candidate[rng.randrange(n)] = rng.choice(shapes)
            v = replay(scenario, _routes(scenario, origin, candidate)).makespan_s
            if v <= value or rng.random() < math.exp(-(v - value) / temperature):
                current, value = candidate, v
                if best is None or value < best[0]:
                    best = (value, list(current))
            temperature = max(0.02, temperature * 0.9995)
        if best is None or value < best[0]:
            best = (value, list(current))
    assert best is not None
    return best[0], tuple(_routes(scenario, origin, best[1]))


def anneal_plan(scenario: Scenario, routes: Sequence[Route], rng: random.Random, iterations: int = 40_000
                ) -> tuple[float, tuple[Route, ...]]:
    """Search a whole plan directly in the replay: (its replay seconds, routes), from ``routes``.

    Simulated annealing over legal plans: a step gives one microbatch
    another legal shape, or swaps the shapes of two microbatches (of any
    origins); a step that breaks the balance rule is skipped; a slower plan
    is accepted with probability ``exp(-delta / T)``, T from 1 s down to
    0.01 s. Not a planner (it tunes to the replay's own model, so its
    plans are no longer checked independently): it shows how far the
    replay lets a whole iteration go, with every origin sharing the middle
    nodes.
    """
    from swarmrt.routing.paths import balance_violations, stage_counts

    rules = scenario.rules
    shapes = _shapes(scenario)
    back = (Hop(0, 0),) if scenario.first_stage_is_also_last else ()

    def with_shape(r: Route, hops: Sequence[Hop]) -> Route:
        ret = tuple(Hop(0, r.origin) for _ in back)
        return Route(r.origin, (Hop(0, r.origin),) + tuple(hops) + ret, r.microbatch)

    def tail(r: Route) -> tuple[Hop, ...]:
        return r.hops[1:-1] if back else r.hops[1:]

    current = list(routes)
    value = replay(scenario, current).makespan_s
    best = (value, list(current))
    temperature = 1.0
    for _ in range(iterations):
        candidate = list(current)
        i = rng.randrange(len(candidate))
        if rng.random() < 0.5:
            candidate[i] = with_shape(candidate[i], [Hop(s, p) for s, p in rng.choice(shapes)])
        else:
            j = rng.randrange(len(candidate))
            candidate[i], candidate[j] = (with_shape(current[i], tail(current[j])),
                                          with_shape(current[j], tail(current[i])))
        if balance_violations(stage_counts(candidate, rules), rules):
            continue
        v = replay(scenario, candidate).makespan_s
        if v <= value or rng.random() < math.exp(-(v - value) / temperature):
            current, value = candidate, v
            if value < best[0]:
                best = (value, list(current))
        temperature = max(0.01, temperature * 0.9998)
    return best[0], tuple(best[1])


def best_disjoint_paths(scenario: Scenario) -> tuple[float, dict[int, tuple[int, ...]]]:
    """SkipPipe's collision-aware shape, solved exactly in the replay: (seconds, origin -> middle nodes).

    Every origin sends all its microbatches along one path, and no two
    origins share a middle node (SkipPipe's plan with a path per origin
    and one path per middle node). Disjoint origins do not meet in the
    replay, so the iteration is its slowest origin alone, and the best set
    is a bottleneck assignment over each origin's legal shapes, each timed
    alone. Needs enough middle nodes for every origin (ValueError if not).
    """
    shapes = _shapes(scenario)
    origins = scenario.origins
    n = scenario.microbatches_per_origin
    middle_nodes = {p for s in scenario.rules.middle_stages for p in scenario.nodes_of(s)}
    if len(origins) * scenario.rules.middle_visits > len(middle_nodes):
        raise ValueError(f"best_disjoint_paths: {len(origins)} origins need {scenario.rules.middle_visits} middle "
                         f"nodes each, the scenario has {len(middle_nodes)}")
    cost = {(o, shape): replay(scenario, _routes(scenario, o, [shape] * n)).makespan_s
            for o in origins for shape in shapes}
    middle = set(scenario.rules.middle_stages)
    found = bottleneck_assign(list(origins), {o: shapes for o in origins}, lambda o, shape: cost[(o, shape)],
                              lambda shape: frozenset(p for s, p in shape if s in middle))
    if found is None:
        raise ValueError("best_disjoint_paths: no set of disjoint paths exists")
    seconds, chosen = found
    return seconds, {o: tuple(p for _, p in chosen[o]) for o in sorted(chosen)}
