"""Planning a whole iteration ahead: the routes of every microbatch before the first one starts.

The simulator, ``swarmrt plan``, the benchmarks and (with ``[routing]
plan_ahead``) the trainer plan iterations; by default the trainer routes
each microbatch online with the same policy objects
(:mod:`swarmrt.routing.policies`). :func:`plan_iteration` takes a policy made
by :func:`~swarmrt.routing.policies.make_policy` and returns an
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
the planner builds the previous plan (while it fits), several randomised
chain plans, SkipPipe's disjoint paths (small swarms) and an EFT plan,
scores each as soon as it exists with a caller-given evaluator (the
simulator replaying the plan, averaged with a few seeded noisy runs:
:mod:`swarmrt.sim.scoring`; without one, the timeline forecast), and repairs the best one's collisions
(:mod:`swarmrt.sim.repair`: where the latest microbatch waited longest,
one of the two colliding microbatches is re-routed around that node).

**Deterministic.** Every step is counted in a work budget (``work``, in
microbatch-steps: :class:`_Work`); the first construction is always built
and scored, every later step only if it fits. So the same scenario, seed
and budget give the same plan on any machine under any load; the wall
clock (``clock``, ``budget_s``) only caps the work, as a safety net.

The scheduler's later ``route`` calls serve the plan, origin by origin,
while its peers live (a planned route whose peer died keeps its stages and
gets other peers by EFT), and fall back to EFT otherwise.

Figures (docs/benchmarks-skip.md): on geo-aws18 about -42% time per
iteration against the DT-FM-style full pipeline in the simulator; in an
independent replay (:mod:`swarmrt.sim.replay`) -43% against the ``full``
policy's pipelines and -40% against the best full pipeline
(:func:`swarmrt.sim.bounds.best_full_pipelines`), planned with the default
budget in about 0.35 s (1,000 peers: 0.65 s).

Pure: the clock (``now``, ``clock``) and the random generator (``rng``) are
arguments.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import math
import random
from typing import Callable, Hashable, Mapping, Sequence

import numpy as np

from swarmrt.routing.paths import PathRules, Route, balance_violations, stage_counts
from swarmrt.routing.peer_table import PeerTable
from swarmrt.routing.policy import Balance, Policy
from swarmrt.routing.skip_scheduler import SkipScheduler
from swarmrt.routing.timeline import Timeline, forecast_route
from swarmrt.sim.bottleneck import bottleneck_assign
from swarmrt.sim.repair import repair

PeerId = Hashable

Evaluator = Callable[[Sequence[Route]], float]
"""Scores a whole plan: seconds from its start until its last backward ends (lower is better).

An evaluator may also have ``runs_for(n)`` (simulations one call makes for
``n`` microbatches: the planner counts that work), ``exact_s`` (the exact
run's seconds of the plan it scored last: the prediction) and ``trace`` (a
:class:`~swarmrt.sim.scoring.PlanTrace` of it: the repair needs one), and
``trace_of(routes)`` (a trace of any plan, made when asked), as
:class:`~swarmrt.sim.scoring.PlanEvaluator` has."""


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
    """How many whole plans were scored (constructions plus repair candidates)."""
    method: str = ""
    """Which construction won, how many repairs improved it, and the work spent."""
    work: int = 0
    """Work units spent (swarmrt's planner: see :class:`_Work`)."""


def plan_iteration(policy: Policy, microbatches: Mapping[PeerId, int], now: float, rng: random.Random,
                   clock: Callable[[], float] | None = None, budget_s: float | None = None,
                   evaluate: Evaluator | None = None, work: int | None = None) -> IterationPlan:
    """Route a whole iteration ahead with ``policy`` (``microbatches``: origin -> count) and forecast its time.

    A :class:`~swarmrt.routing.skip_scheduler.SkipScheduler` gets swarmrt's
    planner (module docstring; ``clock`` and ``budget_s`` bound its search)
    and serves the plan from its later ``route`` calls. Any other policy:
    one pass, origins taking turns, each microbatch routed by the policy's
    ``route``. The forecast is ``evaluate(routes)`` when an evaluator is
    given, else the timeline forecast (:func:`predict_iteration`).
    """
    if isinstance(policy, SkipScheduler):
        return _plan_skip(policy, microbatches, now, rng, clock, budget_s, evaluate, work)
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


PLAN_WORK = 8_000
"""Default work budget of :func:`plan_iteration`, in microbatch-steps (see :class:`_Work`): about 0.5 s
on geo-aws18 on one idle core of the machine docs/benchmarks-skip.md names."""
EFT_COST = 20
"""Work units per microbatch of the per-microbatch EFT construction (a beam search per microbatch costs
about 20 times what dealing a chain shape or simulating one microbatch does)."""


class _Work:
    """The planner's work budget: what it has done, counted, and what it may still do.

    Units are microbatch-steps: building a chain plan costs one per
    microbatch, an EFT plan :data:`EFT_COST` per microbatch, scoring a plan
    one per microbatch per simulated run (``evaluate.runs``). The plan
    depends only on this count, never on how fast the machine is; the wall
    clock (``clock``, ``cap_s``) only caps it, as a safety net.
    """

    def __init__(self, limit: int, clock: Callable[[], float] | None, cap_s: float | None) -> None:
        self.limit = limit
        self.used = 0
        self.clock = clock
        self.cap_s = cap_s
        self.t0 = clock() if clock is not None else 0.0
        self.capped = False

    def allows(self, cost: int) -> bool:
        """May ``cost`` more units be spent?"""
        if self.used + cost > self.limit:
            return False
        if self.clock is not None and self.cap_s is not None and self.clock() - self.t0 >= self.cap_s:
            self.capped = True
            return False
        return True

    def spend(self, cost: int) -> None:
        self.used += cost


def _plan_skip(sched: SkipScheduler, microbatches: Mapping[PeerId, int], now: float, rng: random.Random,
               clock: Callable[[], float] | None, budget_s: float | None, evaluate: Evaluator | None,
               work: int | None) -> IterationPlan:
    """Plan a whole iteration (``microbatches``: origin -> count); ``sched``'s later ``route`` calls serve it.

    Constructions, each a complete legal plan, scored as soon as it exists:

    - the previous plan, while it still fits;
    - *chains* (``plan_constructions`` of each kind): every origin gets
      one route shape (stage set and peers) for all its microbatches, or
      one per memory lane (*lane chains*), chosen greedily by link and
      compute cost with the balance rule and each peer's share of its
      stage as limits, so origins do not collide;
    - *disjoint paths* (SkipPipe's collision-aware shape, where the
      swarm is small enough): one path per origin for all its
      microbatches, no middle peer shared by two origins, the set whose
      costliest path (links both ways plus compute) is cheapest
      (:func:`_disjoint_plan`);
    - *eft*: per-microbatch earliest-finish-time list scheduling (the
      origin that can start soonest routes next, as ``route`` would).

    Scores come from ``evaluate`` (e.g. the simulator replaying the plan)
    or, without one, this scheduler's timeline forecast. The best plan is
    then repaired (:func:`swarmrt.sim.repair.repair`) when the evaluator
    traces its runs. Everything is counted in the work budget
    (:class:`_Work`): the first construction is always built and scored,
    each later step only if it fits, so the result depends on the scenario,
    ``rng`` and ``work``, not on the machine's load (unless ``budget_s`` of
    ``clock`` runs out first).
    """
    sched.begin_iteration(microbatches, now, rng)
    n = sum(microbatches.values())
    budget = _Work(PLAN_WORK if work is None else work, clock, budget_s)
    runs_for = getattr(evaluate, "runs_for", None)
    eval_cost = n * (runs_for(n) if runs_for is not None else 1)
    base = sched.save_bookings()
    best: list = []  # [score, exact seconds, trace, name, routes]
    scored = 0

    def consider(name: str, routes: list[Route]) -> None:
        nonlocal scored
        budget.spend(eval_cost)
        scored += 1
        if evaluate is not None:
            value = evaluate(routes)
            exact = getattr(evaluate, "exact_s", value)
            # an evaluator with trace_of traces the winner later, once; others hand their trace now
            trace = routes if hasattr(evaluate, "trace_of") else getattr(evaluate, "trace", None)
        else:
            value = exact = replay_forecast(routes, sched.table, sched.rules, base.timeline, now)
            trace = None
        if not best or value < best[0]:
            best[:] = [value, exact, trace, name, routes]

    previous = _previous_plan(sched, microbatches)
    if previous is not None:
        consider("previous plan", previous)
    for attempt in range(sched.config.plan_constructions):
        if best and not budget.allows(n + eval_cost):
            break
        for lanes in (False, True):
            if best and not budget.allows(n + eval_cost):
                break
            budget.spend(n)
            chains = _chain_plan(sched, microbatches, rng, lanes)
            if chains is not None:
                consider("lane chains" if lanes else "origin chains", chains)
    if not best or budget.allows(n + eval_cost):
        budget.spend(n)
        disjoint = _disjoint_plan(sched, microbatches)
        if disjoint is not None:
            consider("disjoint paths", disjoint)
    if not best or budget.allows(EFT_COST * n + eval_cost):
        sched.restore_bookings(base)
        budget.spend(EFT_COST * n)
        eft = _eft_plan(sched, microbatches, now, rng)
        if eft is not None:
            consider("eft", eft)
    sched.restore_bookings(base)
    if not best:
        raise RuntimeError("swarmrt: no legal plan for this iteration (a stage has no live peer?)")
    value, exact, trace, method, routes = best
    repaired = ""
    if trace is not None and budget.allows(eval_cost):
        if trace is routes:
            trace = evaluate.trace_of(routes)
        def evaluate_exact(candidate: Sequence[Route]) -> float:
            nonlocal exact, scored
            budget.spend(eval_cost)
            scored += 1
            score = evaluate(candidate)
            if score < value_now[0]:
                exact = getattr(evaluate, "exact_s", score)
                value_now[0] = score
            return score
        value_now = [value]
        fixed = repair(routes, value, trace, sched.table, sched.rules, evaluate_exact,
                       lambda: getattr(evaluate, "trace"), lambda: budget.allows(eval_cost))
        routes, value = list(fixed.routes), fixed.score
        repaired = f", {fixed.improved} repairs in {fixed.collisions} collisions"
    method = (f"{method}{repaired}; {scored} plans scored, work {budget.used}/{budget.limit}"
              + (" (capped by the wall clock)" if budget.capped else ""))
    reasons = sched.serve_plan(routes, now, method)
    return IterationPlan(tuple(routes), reasons, exact, scored, method, budget.used)


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


DISJOINT_MAX_SHAPES = 20_000
"""Most (origin, path) pairs :func:`_disjoint_plan` costs; larger swarms skip that construction."""
DISJOINT_MAX_STEPS = 50_000
"""Most search steps of one :func:`_disjoint_plan` assignment before it gives up (no plan)."""


def _disjoint_plan(sched: SkipScheduler, microbatches: Mapping[PeerId, int]) -> list[Route] | None:
    """One path per origin, no middle peer on two origins' paths, the costliest path as cheap as can be.

    This is the shape of SkipPipe's collision-aware plan: origins never
    meet on a middle peer, so they never wait for each other there. A
    path's cost is what one microbatch spends on it apart from queueing:
    each link twice (activation out, gradient back) plus the forward and
    backward of each peer. The set is a bottleneck assignment: the
    smallest threshold for which every origin has a path at or below it
    and the paths can be chosen disjoint (backtracking, origins with the
    fewest options first, each origin's cheapest paths first). None when
    the swarm has too few middle peers, too many (origin, path) pairs
    (:data:`DISJOINT_MAX_SHAPES`), the search runs past
    :data:`DISJOINT_MAX_STEPS`, or the plan would break the balance rule.
    Deterministic: no randomness.
    """
    rules = sched.rules
    table = sched.table
    links = table.links
    origins = [o for o in microbatches if microbatches[o] > 0]
    middle = rules.middle_stages
    if not origins or not rules.middle_visits:
        return None
    if len(origins) * rules.middle_visits > sum(len(table.peers_of(s)) for s in middle):
        return None
    tail = sched.tail()
    shapes = []
    for stages in itertools.combinations(middle, rules.middle_visits):
        count = math.prod(len(table.peers_of(s)) for s in stages + tail)
        if count * len(origins) + len(shapes) * len(origins) > DISJOINT_MAX_SHAPES:
            return None
        for peers in itertools.product(*(table.peers_of(s) for s in stages + tail)):
            shapes.append((stages + tail, peers))
    work = {p: table.get(p).forward_s + table.get(p).backward_s for _, peers in shapes for p in peers}
    cost = {}
    for o in origins:
        for i, (stages, peers) in enumerate(shapes):
            hops = (o,) + peers + ((o,) if rules.first_stage_is_also_last else ())
            cost[(o, i)] = (sum(2 * links.transfer_s(a, b) for a, b in zip(hops, hops[1:]))
                            + sum(work[p] for p in peers))
    tail_set = set(tail)
    found = bottleneck_assign(origins, {o: range(len(shapes)) for o in origins}, lambda o, i: cost[(o, i)],
                              lambda i: frozenset(p for s, p in zip(*shapes[i]) if s not in tail_set),
                              DISJOINT_MAX_STEPS)
    if found is None:
        return None
    chosen = found[1]
    routes = []
    for j in range(max(microbatches.values(), default=0)):
        for o in origins:
            if j < microbatches[o]:
                stages, peers = shapes[chosen[o]]
                routes.append(sched.make_route(o, peers, stages, len(routes)))
    if balance_violations(stage_counts(routes, rules), rules):
        return None
    return routes


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
        integer_ids = all(isinstance(p, (int, np.integer)) for p in arr.ids)
        state[stage] = (arr, {p: i for i, p in enumerate(arr.ids)}, np.zeros(len(arr.ids)),
                        [np.zeros(len(arr.ids), dtype=bool) for _ in range(n_lanes)],
                        np.asarray(arr.ids, dtype=np.int64) if integer_ids else arr.ids)
    shapes: dict[tuple[PeerId, int], list[_Chain]] = {}
    rows: dict = {}
    for lane in range(n_lanes):
        for o in origins:
            if lane >= lanes[o]:
                continue
            todo = len(range(lane, microbatches[o], lanes[o]))
            shape = None
            shapes[(o, lane)] = []
            mine = [(s_, p_) for other in range(lane) if (o, other) in shapes
                    for c in shapes[(o, other)][:1] for s_, p_ in zip(c.stages, c.peers)]  # its other lanes
            while todo:
                if shape is None or not balance.allowed(shape.middle):
                    shape = _best_chain(sched, o, todo, balance, state, rng, mine if lanes_apart else (),
                                        lane if lanes_apart else -1, rows)
                    if shape is None:
                        return None
                balance.commit(shape.middle)
                for stage, p in zip(shape.stages, shape.peers):
                    arr, index, visits, marks, _ = state[stage]
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
                rng: random.Random, mine: Sequence[tuple[int, PeerId]] = (), lane: int = -1,
                rows: dict | None = None) -> _Chain | None:
    """The cheapest allowed shape for ``n`` microbatches of ``origin`` (see :func:`_chain_plan`).

    ``state[stage]``: (arrays, peer -> index, visits so far, per-lane marks, the ids for ``transfer_row``).
    ``rows`` caches ``transfer_row`` results by (source peer, stage) across calls of one construction
    (links do not change while a plan is built).
    """
    links = sched.table.links
    rows = {} if rows is None else rows
    sets = sched.stage_sets(rng)[0]
    sets = [c for c in sets if balance.allowed(c, n)] or [c for c in sets if balance.allowed(c)]
    if not sets:
        return None
    best = None
    middle_quota = balance.window * sched.k / max(1, len(sched.rules.middle_stages))
    works: dict[int, np.ndarray] = {}
    width = sched.config.beam_width
    for middle in sets:
        stages = middle + sched.tail()
        beams = [(0.0, (origin,))]
        for stage in stages:
            arr, index, visits, marks, ids = state[stage]
            if stage not in works:  # a stage's cost per peer is the same in every stage set
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
                works[stage] = work
            work = works[stage]
            count = len(arr.ids)
            k = min(width, count)
            grown = []
            for cost, peers in beams:
                key = (peers[-1], stage)
                row = rows.get(key)
                if row is None:
                    row = rows[key] = links.transfer_row(peers[-1], ids)
                total = cost + row + work
                picks = np.argpartition(total, k - 1)[:k] if k < count else range(count)
                values = total[picks].tolist() if k < count else total.tolist()
                for i, v in zip(picks, values):
                    if v != float("inf") and v == v:  # finite (transfer rows may hold inf for no link)
                        grown.append((v, rng.random(), peers + (arr.ids[i],)))
            grown.sort()
            beams = [(g[0], g[2]) for g in grown[:width]]
        for cost, peers in beams:
            if sched.rules.first_stage_is_also_last:
                cost += links.transfer_s(peers[-1], origin)
            key = (cost, balance.pressure(middle), rng.random())
            if best is None or key < best[0]:
                best = (key, _Chain(stages, peers[1:], middle, cost))
    return best[1] if best is not None else None


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

