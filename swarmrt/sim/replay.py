"""An independent replay of a plan: a second, simpler model that checks the simulator's figures.

The planner chooses plans by what :mod:`swarmrt.sim.simulator` says they
take. A plan tuned to one model's quirks can look better there than it is,
so plans are also checked in this replay, written apart from the simulator
(it shares no code with it beyond the scenario and the route format) and
simpler on purpose:

- every node runs one task at a time, **first come, first served**: tasks
  start in the order they become ready at the node (ties: the plan's
  microbatch order, then the route's earlier task); no priorities (the
  simulator runs backwards first, 1F1B-style);
- a task is ready when the previous task of its microbatch has ended and
  its activation (or gradient) has crossed the link: ``links.transfer_s``
  on an idle link, **no link contention** (the simulator queues each
  uplink's transfers);
- memory: a forward may start on a node only while it holds fewer than
  ``memory_microbatches`` activations (held from the start of the forward
  to the end of that node's backward); a forward that must wait for memory
  lets the tasks behind it pass (else nothing could free memory);
- every microbatch of the plan is ready at its origin at time 0, in plan
  order; per route: the forwards
  along ``path``, then (stage 0 also last) the loss head on the origin
  (``head_factor x forward_s``), then the backwards in reverse
  (``backward_factor x forward_s`` each).

Events (a task arrives at a node, a task ends) are taken from one heap in
time order (ties: the order they were made). Pure.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
from typing import Sequence

from swarmrt.routing.paths import Route
from swarmrt.sim.scenario import HEAD_FACTOR, Scenario


@dataclasses.dataclass(frozen=True)
class Replay:
    """What a plan took in the replay."""

    makespan_s: float
    """Seconds from the start until the last backward ended."""
    finish_s: tuple[float, ...]
    """When each microbatch's last backward ended, in plan order."""
    busy_s: dict[int, float]
    """Seconds each node computed."""


def _tasks(route: Route, scenario: Scenario, head_factor: float) -> list[tuple[int, float]]:
    """``(node, seconds)`` of every task of ``route``, in order."""
    ret = scenario.first_stage_is_also_last
    fwd = list(route.path[:-1] if ret else route.path)
    for p in fwd:
        if not (isinstance(p, int) and 0 <= p < len(scenario.nodes)):
            raise ValueError(f"route {route.path}: {p!r} is not a node of the scenario")
    speed = {p: scenario.nodes[p].forward_s for p in fwd}
    tasks = [(p, speed[p]) for p in fwd]
    if ret:
        tasks.append((route.origin, head_factor * speed[route.origin]))
    tasks += [(p, scenario.backward_factor * speed[p]) for p in reversed(fwd)]
    return tasks


def replay(scenario: Scenario, routes: Sequence[Route], head_factor: float = HEAD_FACTOR) -> Replay:
    """Play ``routes`` (one per microbatch, all ready at 0) in the first-come-first-served model."""
    if not routes:
        return Replay(0.0, (), {})
    links = scenario.links
    plans = [_tasks(r, scenario, head_factor) for r in routes]
    forwards = [len(r.path) - 1 if scenario.first_stage_is_also_last else len(r.path) for r in routes]
    queue: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)  # node -> ready tasks, in arrival order
    running: set[int] = set()
    held: dict[int, int] = collections.defaultdict(int)
    busy: dict[int, float] = collections.defaultdict(float)
    finish = [0.0] * len(plans)
    events: list = []
    seq = itertools.count()

    def start_next(node: int, now: float) -> None:
        if node in running:
            return
        for k, (i, j) in enumerate(queue[node]):
            if j < forwards[i]:  # a forward needs a free memory slot; a blocked one lets others pass
                if held[node] >= scenario.nodes[node].memory_microbatches:
                    continue
                held[node] += 1
            del queue[node][k]
            running.add(node)
            seconds = plans[i][j][1]
            busy[node] += seconds
            heapq.heappush(events, (now + seconds, next(seq), node, i, j, True))
            return

    for i in range(len(plans)):
        heapq.heappush(events, (0.0, next(seq), plans[i][0][0], i, 0, False))
    while events:
        now, _, node, i, j, done = heapq.heappop(events)
        if not done:
            queue[node].append((i, j))
            start_next(node, now)
            continue
        running.discard(node)
        if j > len(plans[i]) - 1 - forwards[i]:  # a backward: its activation is freed here
            held[node] -= 1
        if j + 1 < len(plans[i]):
            nxt = plans[i][j + 1][0]
            arrive = now + (0.0 if nxt == node else links.transfer_s(node, nxt))
            heapq.heappush(events, (arrive, next(seq), nxt, i, j + 1, False))
        else:
            finish[i] = now
        start_next(node, now)
    return Replay(max(finish), tuple(finish), dict(busy))
