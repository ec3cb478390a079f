"""Planning a whole iteration ahead: the routes of every microbatch before the first one starts.

The simulator, ``swarmrt plan`` and the benchmarks plan iterations; the
trainer does not (it routes each microbatch online with the same policy
objects, :mod:`swarmrt.routing.policies`). :func:`plan_iteration` takes a
policy made by :func:`~swarmrt.routing.policies.make_policy` and returns an
:class:`IterationPlan`; a :class:`~swarmrt.routing.skip_scheduler.SkipScheduler`
is then handed the plan (:meth:`~swarmrt.routing.skip_scheduler.SkipScheduler.serve_plan`)
and serves it from its ``route`` calls.

Any policy: one pass, origins taking turns, each microbatch routed by the
policy's own ``route``.

swarmrt's scheduler
-------------------

Measured on ``geo-aws18``, per-microbatch EFT is myopic: the first
microbatches take the best peers and the last ones queue behind them (the
origin's memory lanes make the last ones decide the iteration time). What
worked better is to give each origin *one route shape* for all its
microbatches ("chains": origins then rarely collide, and an origin's own
microbatches pipeline behind each other at a steady pace), chosen greedily
by link and compute cost with balance and each peer's share as limits. So
the planner builds several randomised chain plans and an EFT plan, scores
them with a caller-given evaluator (the simulator replaying the plan;
without one, the timeline forecast), and improves the best by local search
(move one microbatch to another peer or stage set, or swap two origins'
shapes; keep what is no worse) until a time budget, measured by a
caller-given clock, is spent. The scheduler's later ``route`` calls serve
the plan, origin by origin, while its peers live (a planned route whose peer
died keeps its stages and gets other peers by EFT), and fall back to EFT
otherwise. The last plan is a candidate of the next ``plan_iteration`` while
it still fits, so a steady swarm's plan keeps improving.

On geo-aws18 in the simulator (docs/benchmarks-skip.md): about -45% time per
iteration against the DT-FM-style full pipeline (per-microbatch EFT alone:
about -37%; random skipping: -18%), planned in 0.8 s.

Pure: the clock (``now``, ``clock``) and the random generator (``rng``) are
arguments.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import random
from typing import Callable, Hashable, Mapping, Sequence

import numpy as np

from swarmrt.routing.paths import Hop, PathRules, Route, balance_bounds
from swarmrt.routing.peer_table import PeerTable
from swarmrt.routing.policy import Balance, Policy
from swarmrt.routing.skip_scheduler import SkipScheduler
from swarmrt.routing.timeline import Timeline, forecast_route

PeerId = Hashable

Evaluator = Callable[[Sequence[Route]], float]
"""Scores a whole plan: seconds from its start until its last backward ends (lower is better).

An evaluator may also have an attribute ``finish_by_origin`` (origin -> when
its last microbatch finished, in the plan it scored last); the local search
of :func:`plan_iteration` then works mostly on the origin that finishes last."""


@dataclasses.dataclass(frozen=True)
class IterationPlan:
    """Routes for one iteration, in the order they were planned."""

    routes: tuple[Route, ...]
    """One route per microbatch (``route.microbatch`` numbers them)."""
    reasons: tuple[str, ...]
    """Why each route was chosen."""
    predicted_iteration_s: float
    """Forecast time from the plan's start until the last backward ends."""
    passes: int = 1
    """How many whole plans were scored (constructions plus local-search moves)."""
    method: str = ""
    """Which construction won, and how many local-search moves improved it."""


def plan_iteration(policy: Policy, microbatches: Mapping[PeerId, int], now: float, rng: random.Random,
                   clock: Callable[[], float] | None = None, budget_s: float = 0.0,
                   evaluate: Evaluator | None = None) -> IterationPlan:
    """Route a whole iteration ahead with ``policy`` (``microbatches``: origin -> count) and forecast its time.

    A :class:`~swarmrt.routing.skip_scheduler.SkipScheduler` gets swarmrt's
    planner (module docstring; ``clock`` and ``budget_s`` bound its search)
    and serves the plan from its later ``route`` calls. Any other policy:
    one pass, origins taking turns, each microbatch routed by the policy's
    ``route``. The forecast is ``evaluate(routes)`` when an evaluator is
    given, else the timeline forecast (:func:`predict_iteration`).
    """
    if isinstance(policy, SkipScheduler):
        return _plan_skip(policy, microbatches, now, rng, clock, budget_s, evaluate)
    policy.begin_iteration(microbatches, now, rng)
    left = dict(microbatches)
    routes, reasons = [], []
    mb = 0
    while any(left.values()):
        for origin in list(left):
            if left[origin] <= 0:
                continue
            left[origin] -= 1
            r, why = policy.route(origin, now, rng, microbatch=mb)
            mb += 1
            if r is None:
                raise RuntimeError(f"{policy.name}: no route for a microbatch of {origin!r}: {why}")
            routes.append(r)
            reasons.append(why)
    predicted = evaluate(routes) if evaluate is not None else predict_iteration(routes, policy.table, policy.rules, now)
    return IterationPlan(tuple(routes), tuple(reasons), predicted, 1, policy.name)


def predict_iteration(routes: Sequence[Route], table: PeerTable, rules: PathRules, now: float) -> float:
    """Forecast makespan of ``routes`` booked one after another into an empty timeline."""
    timeline = Timeline()
    end = now
    for r in routes:
        f = forecast_route(timeline, table, table.links, r.path, rules.first_stage_is_also_last, now, now)
        timeline.book(r.microbatch, f)
        end = max(end, f.completion)
    return end - now


@dataclasses.dataclass(frozen=True)
class _Chain:
    """A route shape for one origin: middle stages (and the last stage) with one peer each."""

    stages: tuple[int, ...]
    """Stages after the origin, in visit order (middle ones, then the last stage if it is not stage 0)."""
    peers: tuple[PeerId, ...]
    """One peer per entry of ``stages``."""
    middle: tuple[int, ...]
    """The middle stages among ``stages`` (what the balance rule counts)."""
    cost: float
    """Links plus compute along the shape, seconds (with the penalties it was chosen by)."""


def _plan_skip(sched: SkipScheduler, microbatches: Mapping[PeerId, int], now: float, rng: random.Random,
               clock: Callable[[], float] | None, budget_s: float, evaluate: Evaluator | None) -> IterationPlan:
    """Plan a whole iteration (``microbatches``: origin -> count); ``sched``'s later ``route`` calls serve it.

    Two constructions, each a complete legal plan:

    - *chains*: every origin gets one route shape (stage set and peers)
      for all its microbatches, chosen greedily by link and compute cost
      with the balance rule and each peer's share of its stage as limits,
      so origins do not collide; an origin whose shape would break
      balance takes another for the rest. Cheap (one search per origin).
    - *eft*: per-microbatch earliest-finish-time list scheduling (the
      origin that can start soonest routes next, as ``route`` would).

    Both are scored by ``evaluate`` (e.g. the simulator replaying the
    plan) or, without one, by this scheduler's timeline forecast; the
    better one is then improved by local search (re-route one
    microbatch: another peer of a stage, or another stage set, keeping
    balance; keep the change unless the score gets worse) until
    ``budget_s`` of ``clock`` is spent. Without a clock, no local search
    and the result is deterministic for a given ``rng``.
    """
    sched.begin_iteration(microbatches, now, rng)
    t0 = clock() if clock is not None else 0.0

    def time_left() -> bool:
        return clock is None or clock() - t0 < budget_s

    base = sched.save_bookings()

    def score(routes: Sequence[Route]) -> float:
        if evaluate is not None:
            return evaluate(routes)
        return replay_forecast(routes, sched.table, sched.rules, base.timeline, now)

    built: list[tuple[str, list[Route]]] = []
    previous = _previous_plan(sched, microbatches)
    if previous is not None:
        built.append(("previous plan", previous))
    for attempt in range(sched.config.plan_constructions):
        if attempt and not time_left():
            break
        for lanes in (False, True):
            if lanes and not time_left():
                break
            chains = _chain_plan(sched, microbatches, rng, lanes)
            if chains is not None:
                built.append(("lane chains" if lanes else "origin chains", chains))
    if time_left() or not built:
        sched.restore_bookings(base)
        eft = _eft_plan(sched, microbatches, now, rng)
        if eft is not None:
            built.append(("eft", eft))
    sched.restore_bookings(base)
    if not built:
        raise RuntimeError("swarmrt: no legal plan for this iteration (a stage has no live peer?)")
    if previous is not None and not time_left():  # no time: keep improving the plan that ran last
        scored = [(score(previous), 0, "previous plan", previous)]
    elif len(built) == 1 and not time_left():  # no time to score: the forecast says how long it takes
        scored = [(replay_forecast(built[0][1], sched.table, sched.rules, base.timeline, now), 0,
                   built[0][0] + " (forecast)", built[0][1])]
    else:
        scored = []
        for i, (name, r) in enumerate(built):
            if scored and not time_left():
                break
            scored.append((score(r), i, name, r))
    best, _, method, routes = min(scored)
    passes = len(scored)
    improved = 0
    if clock is not None and budget_s > 0:
        if evaluate is not None and scored[-1][3] is not routes:
            score(routes)  # so that the evaluator's finish_by_origin describes the plan we start from
        routes, best, moves, improved = _local_search(sched, routes, best, score, rng, time_left, evaluate)
        passes += moves
    method = f"{method}, {improved} improving moves"
    reasons = sched.serve_plan(routes, now, method)
    return IterationPlan(tuple(routes), reasons, best, passes, method)


def _previous_plan(sched: SkipScheduler, microbatches: Mapping[PeerId, int]) -> list[Route] | None:
    """The last plan ``sched`` served, if it still fits: the same microbatches per origin and every peer alive.

    Planning it again lets the local search go on from where it stopped,
    so a plan keeps improving over the iterations of a steady swarm.
    """
    last = sched.last_plan
    if not last:
        return None
    counts = collections.Counter(r.origin for r in last)
    if dict(counts) != {o: n for o, n in microbatches.items() if n > 0}:
        return None
    if any(p not in sched.table for r in last for p in r.path):
        return None
    return list(last)


def _eft_plan(sched: SkipScheduler, microbatches: Mapping[PeerId, int], now: float,
              rng: random.Random) -> list[Route] | None:
    """Per-microbatch EFT list scheduling; the origin that can start soonest goes next."""
    left = {o: n for o, n in microbatches.items() if n > 0}
    heap = []
    for o in left:
        info = sched.table.get(o)
        t = sched.timeline.forward_start(o, now, info.forward_s, info.memory_microbatches, now, info.backward_s)
        heap.append((t, rng.random(), o))
    heapq.heapify(heap)
    routes = []
    while heap:
        ready, _, origin = heapq.heappop(heap)
        r, _ = sched.route_online(origin, ready, now, rng, len(routes), key=("plan", len(routes)))
        if r is None:
            return None
        routes.append(r)
        left[origin] -= 1
        if left[origin]:
            info = sched.table.get(origin)
            t = sched.timeline.forward_start(origin, now, info.forward_s, info.memory_microbatches, now,
                                            info.backward_s)
            heapq.heappush(heap, (t, rng.random(), origin))
    return routes


def _chain_plan(sched: SkipScheduler, microbatches: Mapping[PeerId, int], rng: random.Random,
                lanes_apart: bool = False) -> list[Route] | None:
    """Route shapes per origin (see the module docstring), dealt out round-robin.

    Origins are taken in a random order (``rng``); each gets the cheapest
    allowed shape by links and compute, with each peer's share of its
    stage as a cap. With ``lanes_apart``, an origin with memory ``m``
    has ``m`` lanes instead (its microbatch ``j`` takes lane ``j % m``,
    the slot the previous microbatch of that lane frees), each with its
    own shape, chosen lane by lane for all origins with a penalty (its
    backward time) for a peer the origin already uses in another lane
    (their backwards would queue behind each other) and one (its forward
    time) for a peer that already hosts the same lane of another origin
    (their forwards would arrive together).
    """
    total = sum(microbatches.values())
    balance = Balance(sched.rules, total)
    origins = [o for o in microbatches if microbatches[o] > 0]
    rng.shuffle(origins)
    lanes = {o: max(1, min(sched.table.get(o).memory_microbatches, microbatches[o])) if lanes_apart else 1
             for o in origins}
    n_lanes = max(lanes.values(), default=0)
    state = {}
    for stage in range(1, sched.rules.stages):
        arr = sched.table.arrays(stage)
        state[stage] = (arr, {p: i for i, p in enumerate(arr.ids)}, np.zeros(len(arr.ids)),
                        [np.zeros(len(arr.ids), dtype=bool) for _ in range(n_lanes)])
    shapes: dict[tuple[PeerId, int], list[_Chain]] = {}
    for lane in range(n_lanes):
        for o in origins:
            if lane >= lanes[o]:
                continue
            todo = len(range(lane, microbatches[o], lanes[o]))
            shape = None
            shapes[(o, lane)] = []
            mine = [(h.stage, h.peer) for key, chains in shapes.items() if key[0] == o
                    for c in chains[:1] for h in (Hop(s_, p_) for s_, p_ in zip(c.stages, c.peers))]
            while todo:
                if shape is None or not balance.allowed(shape.middle):
                    shape = _best_chain(sched, o, todo, balance, state, rng, mine if lanes_apart else (),
                                        lane if lanes_apart else -1)
                    if shape is None:
                        return None
                balance.commit(shape.middle)
                for stage, p in zip(shape.stages, shape.peers):
                    arr, index, visits, marks = state[stage]
                    visits[index[p]] += 1
                    marks[lane][index[p]] = True
                shapes[(o, lane)].append(shape)
                todo -= 1
    routes = []
    for j in range(max(microbatches.values(), default=0)):
        for o in origins:
            if j < microbatches[o]:
                shape = shapes[(o, j % lanes[o])][j // lanes[o]]
                routes.append(sched.make_route(o, shape.peers, shape.stages, len(routes)))
    return routes


def _best_chain(sched: SkipScheduler, origin: PeerId, n: int, balance: Balance, state: Mapping[int, tuple],
                rng: random.Random, mine: Sequence[tuple[int, PeerId]] = (), lane: int = -1) -> _Chain | None:
    """The cheapest allowed shape for ``n`` microbatches of ``origin`` (see :func:`_chain_plan`).

    ``state[stage]``: (arrays, peer -> index, visits so far, per-lane marks).
    """
    links = sched.table.links
    sets = sched.stage_sets(rng)[0]
    sets = [c for c in sets if balance.allowed(c, n)] or [c for c in sets if balance.allowed(c)]
    if not sets:
        return None
    best = None
    middle_quota = balance.window * sched.k / max(1, len(sched.rules.middle_stages))
    for middle in sets:
        stages = middle + sched.tail()
        beams = [(0.0, (origin,))]
        for stage in stages:
            arr, index, visits, marks = state[stage]
            quota = middle_quota if stage in balance.counts else float(balance.window)
            work = arr.forward_s + arr.backward_s
            penalty = sched.share_penalty(arr, visits, quota, extra=n)
            if penalty is not None:
                work = work + penalty
            if mine or lane >= 0:
                work = work.copy()
                for s_, p in mine:
                    if s_ == stage and p in index:
                        work[index[p]] += arr.backward_s[index[p]]
                if lane >= 0:
                    work += np.where(marks[lane], arr.forward_s, 0.0)
            grown = []
            for cost, peers in beams:
                total = cost + links.transfer_row(peers[-1], arr.ids) + work
                k = min(sched.config.beam_width, len(arr.ids))
                for i in np.argpartition(total, k - 1)[:k] if k < len(arr.ids) else range(len(arr.ids)):
                    if np.isfinite(total[i]):
                        grown.append((float(total[i]), rng.random(), peers + (arr.ids[i],)))
            grown.sort()
            beams = [(g[0], g[2]) for g in grown[:sched.config.beam_width]]
        for cost, peers in beams:
            if sched.rules.first_stage_is_also_last:
                cost += links.transfer_s(peers[-1], origin)
            key = (cost, balance.pressure(middle), rng.random())
            if best is None or key < best[0]:
                best = (key, _Chain(stages, peers[1:], middle, cost))
    return best[1] if best is not None else None


def _swap_origins(sched: SkipScheduler, routes: list[Route], rng: random.Random,
                  score: Callable[[Sequence[Route]], float], best: float) -> float | None:
    """Swap the route shapes of two origins with equal counts; keep it (and return the score) unless worse."""
    by_origin: dict[PeerId, list[int]] = collections.defaultdict(list)
    for i, r in enumerate(routes):
        by_origin[r.origin].append(i)
    origins = list(by_origin)
    if len(origins) < 2:
        return None
    a, b = rng.sample(origins, 2)
    if len(by_origin[a]) != len(by_origin[b]):
        return None
    old = list(routes)
    for i, j in zip(by_origin[a], by_origin[b]):
        ra, rb = routes[i], routes[j]
        routes[i] = sched.make_route(a, rb.path[1:len(rb.path) - (1 if sched.rules.first_stage_is_also_last else 0)],
                                     rb.stages[1:len(rb.stages) - (1 if sched.rules.first_stage_is_also_last else 0)],
                                     ra.microbatch)
        routes[j] = sched.make_route(b, ra.path[1:len(ra.path) - (1 if sched.rules.first_stage_is_also_last else 0)],
                                     ra.stages[1:len(ra.stages) - (1 if sched.rules.first_stage_is_also_last else 0)],
                                     rb.microbatch)
    value = score(routes)
    if value <= best:
        return value
    routes[:] = old
    return None


def _local_search(sched: SkipScheduler, routes: list[Route], best: float, score: Callable[[Sequence[Route]], float],
                  rng: random.Random, time_left: Callable[[], bool],
                  evaluate: Evaluator | None = None) -> tuple[list[Route], float, int, int]:
    """Re-route one microbatch at a time; keep changes that do not make the score worse.

    Four moves in five touch a microbatch of the origin that finishes last
    (when the evaluator says which); the others any microbatch.
    """
    finish = dict(getattr(evaluate, "finish_by_origin", None) or {})
    by_origin: dict[PeerId, list[int]] = collections.defaultdict(list)
    for i, r in enumerate(routes):
        by_origin[r.origin].append(i)
    counts = {s: 0 for s in sched.rules.middle_stages}
    for r in routes:
        for s in r.middle_stages(sched.rules):
            counts[s] += 1
    mean = sum(counts.values()) / max(1, len(counts))
    lo, hi = balance_bounds(mean, sched.rules.balance_tolerance)
    stage_ids = {s: sched.table.peers_of(s) for s in range(1, sched.rules.stages)}
    sets = sched.stage_sets(rng)[0] if sched.skips else []
    moves = improved = 0
    while moves < sched.config.max_search_moves and time_left():
        moves += 1
        if finish and rng.random() < 0.8:
            i = rng.choice(by_origin[max(finish, key=finish.get)])
        else:
            i = rng.randrange(len(routes))
        old = routes[i]
        stages = list(old.stages[1:-1] if sched.rules.first_stage_is_also_last else old.stages[1:])
        peers = list(old.path[1:-1] if sched.rules.first_stage_is_also_last else old.path[1:])
        if rng.random() < 0.2:
            value = _swap_origins(sched, routes, rng, score, best)
            if value is not None:
                improved += value < best
                best = value
                finish = dict(getattr(evaluate, "finish_by_origin", None) or {})
            continue
        if len(sets) > 1 and rng.random() < 0.5:
            middle = rng.choice(sets)
            new_stages = list(middle + sched.tail())
            peers = [peers[stages.index(s)] if s in stages else rng.choice(stage_ids[s]) for s in new_stages]
            stages = new_stages
        elif peers:
            j = rng.randrange(len(peers))
            peers[j] = rng.choice(stage_ids[stages[j]])
        new = sched.make_route(old.origin, peers, stages, old.microbatch)
        if new == old:
            continue
        delta = {s: 0 for s in counts}
        for s in old.middle_stages(sched.rules):
            delta[s] -= 1
        for s in new.middle_stages(sched.rules):
            delta[s] += 1
        if any(not (lo <= counts[s] + delta[s] <= hi) for s in counts):
            continue
        routes[i] = new
        value = score(routes)
        if value <= best:
            improved += value < best
            best = value
            finish = dict(getattr(evaluate, "finish_by_origin", None) or {})
            for s in counts:
                counts[s] += delta[s]
        else:
            routes[i] = old
    return routes, best, moves, improved


def replay_forecast(routes: Sequence[Route], table: PeerTable, rules: PathRules, timeline: Timeline,
                     now: float) -> float:
    """Forecast seconds from ``now`` until ``routes``, booked in order into a copy of ``timeline``, are done."""
    tl = timeline.copy()
    end = now
    for r in routes:
        f = forecast_route(tl, table, table.links, r.path, rules.first_stage_is_also_last, now, now)
        tl.book(("replay", r.microbatch), f)
        end = max(end, f.completion)
    return end - now

