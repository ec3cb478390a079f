"""Collision repair: improve a plan where its microbatches get in each other's way.

A plan's iteration ends when its latest microbatch finishes; that
microbatch finished late mostly because some task of it arrived at a node
that was busy with another microbatch and waited there. SkipPipe's path
search handles such a collision by forbidding the node to one of the two
microbatches for that time window and searching again; :func:`repair` does
the same on a whole plan:

1. Take the scorer's trace of the current plan (:class:`~swarmrt.sim.scoring.PlanTrace`).
   Walk the microbatches from the latest to finish; for each, its waits
   from the longest; the first (microbatch, node) pair not tried since the
   plan last changed is the collision: node ``n``, window ``[a, b]``, the
   late microbatch and the blocker (the microbatch that held ``n`` at ``a``).
2. Re-route one of the two around ``n``: the same stages with another peer
   of ``n``'s stage, or (a middle stage) another middle stage the balance
   rule still allows, with its best peer. Candidates are ranked by link and
   compute cost plus the time the candidate peer itself was busy in the
   window (the trace's compute intervals); the late microbatch's candidates
   and the blocker's take turns.
3. Score candidates in that order; the first that makes the plan strictly
   faster is kept (the plan changed: every pair may be tried again).
   Otherwise the pair stays tried. Repeat until the work budget is spent
   or no pair is left.

Never illegal: a candidate keeps the route's origin, its first and last
stage, stages in increasing order, each peer serving its own stage, and
every middle stage's count within the balance bounds of the plan it
started from (:func:`~swarmrt.routing.paths.balance_bounds`).

Pure: no clock, no global random generator; the work budget is counted in
scorings, so a given plan, scorer and budget always give the same repair.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Hashable, Iterator, Sequence

from swarmrt.routing.paths import Hop, PathRules, Route, balance_bounds
from swarmrt.routing.peer_table import PeerTable
from swarmrt.sim.scoring import PlanTrace

PeerId = Hashable

PEERS_PER_COLLISION = 3
"""Other peers of the colliding node's stage tried per microbatch (the cheapest by the ranking)."""
STAGES_PER_COLLISION = 2
"""Other middle stages tried per microbatch (each with its cheapest peer)."""


@dataclasses.dataclass(frozen=True)
class RepairResult:
    """What :func:`repair` did."""

    routes: tuple[Route, ...]
    """The repaired plan (same microbatches, same order)."""
    score: float
    """Its score."""
    scored: int
    """Candidate plans scored."""
    improved: int
    """Repairs kept."""
    collisions: int
    """Collisions looked at."""


class _Shape:
    """A route as the parts repair changes: the stages after the origin and their peers."""

    def __init__(self, route: Route, rules: PathRules) -> None:
        ret = rules.first_stage_is_also_last
        hops = route.hops[1:-1] if ret else route.hops[1:]
        self.stages = [h.stage for h in hops]
        self.peers = [h.peer for h in hops]
        self.origin = route.origin
        self.microbatch = route.microbatch
        self.ret = ret

    def neighbours(self, j: int) -> tuple[PeerId, PeerId | None]:
        """The peers before and after position ``j`` of the tail (the origin before the first; None after the
        last when the route does not return)."""
        before = self.peers[j - 1] if j > 0 else self.origin
        after = self.peers[j + 1] if j + 1 < len(self.peers) else (self.origin if self.ret else None)
        return before, after


def _route(origin: PeerId, stages: Sequence[int], peers: Sequence[PeerId], microbatch: int,
           rules: PathRules) -> Route:
    hops = [(0, origin)] + list(zip(stages, peers))
    if rules.first_stage_is_also_last:
        hops.append((0, origin))
    return Route(origin=origin, hops=tuple(Hop(s, p) for s, p in hops), microbatch=microbatch)


def busy_in(intervals: Sequence[tuple[float, float]], start: float, end: float) -> float:
    """Seconds of ``intervals`` (``(start, end)`` pairs) that fall inside ``[start, end]``."""
    return sum(max(0.0, min(e, end) - max(s, start)) for s, e in intervals)


def _peer_cost(table: PeerTable, before: PeerId, peer: PeerId, after: PeerId | None) -> float:
    links = table.links
    info = table.get(peer)
    cost = links.transfer_s(before, peer) * 2 + info.forward_s + info.backward_s
    if after is not None:
        cost += links.transfer_s(peer, after) * 2
    return cost


def _ranked_peers(table: PeerTable, stage: int, avoid: PeerId, before: PeerId, after: PeerId | None,
                  busy: dict, window: tuple[float, float], count: int) -> list[PeerId]:
    """The ``count`` best other peers of ``stage`` for one hop between ``before`` and ``after``."""
    ids = [p for p in table.peers_of(stage) if p != avoid]
    ranked = sorted(((_peer_cost(table, before, p, after) + busy_in(busy.get(p, ()), *window), i, p)
                     for i, p in enumerate(ids)), key=lambda c: c[:2])
    return [p for _, _, p in ranked[:count]]


def candidates(route: Route, node: PeerId, window: tuple[float, float], table: PeerTable, rules: PathRules,
               counts: dict[int, int], bounds: tuple[int, int], busy: dict) -> Iterator[Route]:
    """Legal re-routings of ``route`` around ``node`` (see the module docstring), best first."""
    shape = _Shape(route, rules)
    if node not in shape.peers:
        return
    j = shape.peers.index(node)
    stage = shape.stages[j]
    before, after = shape.neighbours(j)
    for p in _ranked_peers(table, stage, node, before, after, busy, window, PEERS_PER_COLLISION):
        peers = list(shape.peers)
        peers[j] = p
        yield _route(shape.origin, shape.stages, peers, shape.microbatch, rules)
    lo, hi = bounds
    if stage not in counts or counts[stage] - 1 < lo:
        return
    options = []
    for s2 in sorted(counts):
        if s2 in shape.stages or counts[s2] + 1 > hi or not table.peers_of(s2):
            continue
        stages = sorted(shape.stages[:j] + shape.stages[j + 1:] + [s2])
        k = stages.index(s2)
        rest = shape.peers[:j] + shape.peers[j + 1:]
        b = rest[k - 1] if k > 0 else shape.origin
        a = rest[k] if k < len(rest) else (shape.origin if shape.ret else None)
        best = _ranked_peers(table, s2, None, b, a, busy, window, 1)
        if best:
            cost = _peer_cost(table, b, best[0], a) + busy_in(busy.get(best[0], ()), *window)
            options.append((cost, s2, stages, rest[:k] + [best[0]] + rest[k:]))
    options.sort(key=lambda o: o[:2])
    for _, _, stages, peers in options[:STAGES_PER_COLLISION]:
        yield _route(shape.origin, stages, peers, shape.microbatch, rules)


def _collisions(trace: PlanTrace, routes: Sequence[Route]) -> Iterator[tuple[int, object]]:
    """(late microbatch, wait) pairs, the latest microbatch and the longest wait first; waits at the
    microbatch's own origin are left out (the origin is fixed)."""
    for i in sorted(trace.finish, key=lambda i: (-trace.finish[i], i)):
        for w in trace.waits.get(i, ()):
            if w.node != routes[i].origin:
                yield i, w


def repair(routes: Sequence[Route], score: float, trace: PlanTrace, table: PeerTable, rules: PathRules,
           evaluate: Callable[[Sequence[Route]], float], get_trace: Callable[[], PlanTrace],
           can_score: Callable[[], bool]) -> RepairResult:
    """Repair collisions of ``routes`` (scored ``score``, traced ``trace``) while ``can_score()`` allows.

    ``evaluate`` scores a plan (lower is better) and ``get_trace`` returns
    the trace of the plan it scored last; ``can_score`` says whether one
    more scoring fits the budget (the caller counts it).
    """
    routes = list(routes)
    counts = {s: 0 for s in rules.middle_stages}
    for r in routes:
        for s in r.middle_stages(rules):
            counts[s] += 1
    mean = sum(counts.values()) / max(1, len(counts))
    bounds = balance_bounds(mean, rules.balance_tolerance)
    tried: set = set()
    scored = improved = collisions = 0
    while True:
        pick = next(((i, w) for i, w in _collisions(trace, routes) if (i, w.node) not in tried), None)
        if pick is None or not can_score():
            break
        i, wait = pick
        tried.add((i, wait.node))
        collisions += 1
        busy = trace.busy
        window = (wait.start, wait.end)
        movers = [i] + ([wait.blocker] if wait.blocker is not None and wait.blocker != i else [])
        streams = [candidates(routes[m], wait.node, window, table, rules, counts, bounds, busy) for m in movers]
        kept = False
        for m, new in _interleave(movers, streams):
            if not can_score():
                break
            old = routes[m]
            routes[m] = new
            value = evaluate(routes)
            scored += 1
            if value < score:
                score, trace = value, get_trace()
                for s in old.middle_stages(rules):
                    counts[s] -= 1
                for s in new.middle_stages(rules):
                    counts[s] += 1
                improved += 1
                tried.clear()
                kept = True
                break
            routes[m] = old
        if not kept and not can_score():
            break
    return RepairResult(tuple(routes), score, scored, improved, collisions)


def _interleave(movers: Sequence[int], streams: Sequence[Iterator[Route]]) -> Iterator[tuple[int, Route]]:
    """The candidates of each mover, taking turns."""
    live = list(zip(movers, streams))
    while live:
        nxt = []
        for m, it in live:
            r = next(it, None)
            if r is not None:
                yield m, r
                nxt.append((m, it))
        live = nxt
