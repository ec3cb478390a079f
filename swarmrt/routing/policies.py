"""Online path schedulers: which stages and which peers each microbatch visits.

Every policy is the same kind of object, used the same way by the trainer
(real runtime) and by the simulator:

    table = PeerTable(stages, links)               # live peers, kept current by the caller
    sched = SkipScheduler(rules, table)            # or FullPipeline / SwarmWiring / RandomSkip
    sched.begin_iteration({origin: n_microbatches}, now, rng)   # opens a balance window
    route, why = sched.route(origin, now, rng, microbatch=i)    # one microbatch, online
    route, why = sched.replan(route, position, dead_peers, now, rng)  # next hop died
    sched.finished(route)  /  sched.aborted(route)            # it completed / will be redone

Decisions return ``(choice, reason)``; ``choice`` is None when no legal route
exists (e.g. every peer of a stage is gone), and the reason says why.

Policies
--------

- :class:`FullPipeline`: GPipe / DT-FM style, no skipping. ``P`` disjoint
  pipelines of one peer per stage (``P`` = the smallest stage), built by
  greedy cheapest-link matching between consecutive stages; the
  iteration's microbatches are dealt evenly to the pipeline heads
  (:meth:`Policy.deal`), as SkipPipe ran its DT-FM baseline. Load-blind.
- :class:`SwarmWiring`: SWARM's stochastic wiring without skipping: at each
  stage a peer is drawn with probability proportional to
  ``(1 / forward_s) / (1 + in-flight load)``.
- :class:`RandomSkip`: skipping with uniformly random middle stages (among
  those that keep the balance rule reachable) and uniformly random peers.
- :class:`SkipScheduler`: swarmrt's scheduler, below.

How :class:`SkipScheduler` chooses, one microbatch at a time (``route``)
------------------------------------------------------------------------

Greedy earliest-finish-time (EFT) list scheduling, with HEFT's insertion
policy, over a forecast :class:`~swarmrt.routing.timeline.Timeline` of what it
has already routed, and the path rules as hard limits:

1. Candidate stage sets: every set of ``k`` middle stages (all of them when
   ``C(m, k) <= max_subsets``, else a seeded sample plus the set most behind
   on balance), minus the sets after which the balance rule could no longer
   be met by the end of the window (:func:`~swarmrt.routing.paths.balance_feasible`).
   Balance is a hard limit, checked one microbatch at a time.
2. For each set, a beam search over the peers hop by hop: every peer of the
   next stage is scored at once (numpy) by a quick bound (arrival + booked
   load + forward + a cost for going past its speed-weighted share of the
   stage's visits), the best ``candidates_per_stage`` get an exact forecast
   (earliest free gap with a free memory slot, so memory is a hard limit
   too), and the ``beam_width`` earliest partial routes go on.
3. Each surviving route is forecast through its loss and whole backward
   pass; the one whose backward on the origin ends first wins (ties: the
   stage set most behind on balance, then ``rng``). Its steps are booked.

A route takes a few milliseconds even at 1,000 peers, and joins, deaths and
new measurements in the :class:`~swarmrt.routing.peer_table.PeerTable` count
from the next call. ``replan`` re-routes the rest of a microbatch whose next
hop died the same way (same stages if they still have live peers).

Planning a whole iteration (``plan_iteration``)
-----------------------------------------------

Measured on ``geo-aws18``, per-microbatch EFT is myopic: the first
microbatches take the best peers and the last ones queue behind them (the
origin's memory lanes make the last ones decide the iteration time). What
worked better is to give each origin *one route shape* for all its
microbatches ("chains": origins then rarely collide, and an origin's own
microbatches pipeline behind each other at a steady pace), chosen greedily
by link and compute cost with balance and each peer's share as limits. So
``plan_iteration`` builds several randomised chain plans and an EFT plan,
scores them with a caller-given evaluator (the simulator replaying the plan;
without one, the timeline forecast), and improves the best by local search
(move one microbatch to another peer or stage set, or swap two origins'
shapes; keep what is no worse) until a time budget, measured by a
caller-given clock, is spent. Later ``route`` calls serve the plan, origin by
origin, while its peers live (a planned route whose peer died keeps its
stages and gets other peers by EFT), and fall back to EFT otherwise. The
last plan is a candidate of the next ``plan_iteration`` while it still fits,
so a steady swarm's plan keeps improving.

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
import itertools
import math
import random
from typing import Callable, Collection, Hashable, Mapping, Sequence

import numpy as np

from swarmrt.routing.paths import Hop, PathRules, Route, balance_bounds, balance_feasible
from swarmrt.routing.peer_table import PeerTable
from swarmrt.routing.timeline import Timeline, forecast_route

PeerId = Hashable

Evaluator = Callable[[Sequence[Route]], float]
"""Scores a whole plan: seconds from its start until its last backward ends (lower is better).

An evaluator may also have an attribute ``finish_by_origin`` (origin -> when
its last microbatch finished, in the plan it scored last); the local search
of ``plan_iteration`` then works mostly on the origin that finishes last."""


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Knobs of the path schedulers (defaults suit 10 to 1,000 peers)."""

    beam_width: int = 4
    """Partial routes kept per hop in :class:`SkipScheduler`'s beam searches."""
    candidates_per_stage: int = 6
    """Peers of a stage given an exact forecast per partial route (the rest are cut by a quick bound)."""
    max_subsets: int = 32
    """Most stage sets tried per microbatch; above it, a seeded sample."""
    balance_window: int = 64
    """Microbatches per balance window when ``begin_iteration`` was not called."""
    peer_share_slack: float | None = 0.0
    """Cap on a peer's visits per window: its speed-weighted share of its stage's visits, rounded up,
    times (1 + this). None: no cap. A cap every peer has reached is ignored."""
    plan_constructions: int = 4
    """Randomised chain constructions of each kind ``plan_iteration`` builds (the first always; the others
    while its time budget lasts)."""
    max_search_moves: int = 100_000
    """Most local-search moves of ``plan_iteration`` (its time budget usually ends it first)."""

    def __post_init__(self) -> None:
        for name in ("beam_width", "candidates_per_stage", "max_subsets", "balance_window"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"SchedulerConfig.{name} must be an integer >= 1, got {v!r}")
        if self.peer_share_slack is not None and not self.peer_share_slack >= 0:
            raise ValueError(f"SchedulerConfig.peer_share_slack must be >= 0 or None, got {self.peer_share_slack!r}")
        if not isinstance(self.max_search_moves, int) or self.max_search_moves < 0:
            raise ValueError(f"SchedulerConfig.max_search_moves must be an integer >= 0, got {self.max_search_moves!r}")


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


class _Balance:
    """Counts of middle-stage visits in the current window (the balance rule's bookkeeping)."""

    def __init__(self, rules: PathRules, window: int) -> None:
        self.rules = rules
        self.start(window)

    def start(self, window: int) -> None:
        self.window = max(1, window)
        self.counts = {s: 0 for s in self.rules.middle_stages}
        self.peer_counts: dict = {}
        self.issued = 0
        self.epoch = getattr(self, "epoch", -1) + 1

    @property
    def remaining(self) -> int:
        return self.window - self.issued

    def roll(self) -> None:
        """Open a new window of the same size when the current one is used up."""
        if self.issued >= self.window:
            self.start(self.window)

    def allowed(self, stages: Sequence[int], times: int = 1) -> bool:
        """Would ``times`` more microbatches over ``stages`` keep the balance rule reachable?"""
        if times > self.remaining:
            return False
        counts = dict(self.counts)
        for s in stages:
            counts[s] += times
        return balance_feasible(counts, self.remaining - times, self.window, self.rules)

    def pressure(self, stages: Sequence[int]) -> int:
        """How far ahead the stages already are (lower: more behind, preferred)."""
        return sum(self.counts[s] for s in stages)

    def commit(self, stages: Sequence[int]) -> int:
        self.roll()
        for s in stages:
            self.counts[s] += 1
        self.issued += 1
        return self.epoch

    def undo(self, stages: Sequence[int], epoch: int) -> None:
        if epoch != self.epoch:
            return
        for s in stages:
            self.counts[s] = max(0, self.counts[s] - 1)
        self.issued = max(0, self.issued - 1)

    def snapshot(self) -> tuple:
        return (self.window, dict(self.counts), self.issued, self.epoch, dict(self.peer_counts))

    def restore(self, snap: tuple) -> None:
        self.window, counts, self.issued, self.epoch, peers = snap
        self.counts = dict(counts)
        self.peer_counts = dict(peers)

    def count_peers(self, route: Route, delta: int, epoch: int) -> None:
        if epoch != self.epoch:
            return
        for h in route.hops:
            if h.stage in self.counts:
                self.peer_counts[h.peer] = max(0, self.peer_counts.get(h.peer, 0) + delta)


class Policy:
    """What every routing policy offers; subclasses choose stages and peers."""

    name = "policy"
    skips = True

    def __init__(self, rules: PathRules, table: PeerTable, config: SchedulerConfig | None = None) -> None:
        if table.stages != rules.stages:
            raise ValueError(f"PeerTable has {table.stages} stages, PathRules {rules.stages}")
        self.rules = rules
        self.table = table
        self.config = config or SchedulerConfig()
        self.balance = _Balance(rules, self.config.balance_window)
        self._live: dict[Hashable, tuple[Route, tuple[int, ...], int]] = {}
        """Routes issued and not finished, by microbatch: (route, middle stages, balance epoch)."""
        self._next_id = itertools.count()

    # --- shared helpers ------------------------------------------------------------------

    @property
    def k(self) -> int:
        """Middle stages each microbatch visits under this policy."""
        return self.rules.middle_visits if self.skips else len(self.rules.middle_stages)

    def _tail(self) -> tuple[int, ...]:
        """Stages after the middle ones that every route ends with."""
        return () if self.rules.first_stage_is_also_last else (self.rules.stages - 1,)

    def _live_stages(self, exclude: Collection[PeerId] = ()) -> set[int]:
        return {s for s in range(self.rules.stages)
                if any(p not in exclude for p in self.table.peers_of(s))}

    def stage_sets(self, rng: random.Random, after: int = 0, count: int | None = None,
                   exclude: Collection[PeerId] = ()) -> tuple[list[tuple[int, ...]], str]:
        """Middle-stage sets a new microbatch may take, with the balance rule as a hard limit.

        Returns ``(sets, note)``; ``note`` is empty unless the balance rule had
        to be relaxed (some stage has no live peer).
        """
        k = self.k if count is None else count
        live = self._live_stages(exclude)
        for s in self._tail():
            if s not in live:
                return [], f"stage {s} (the last stage) has no live peer"
        middle = [s for s in self.rules.middle_stages if s > after and s in live]
        if len(middle) < k:
            return [], (f"only {len(middle)} middle stages after stage {after} have live peers, "
                        f"{k} needed")
        if not self.skips:
            return [tuple(middle)], ""
        total = math.comb(len(middle), k)
        if total <= self.config.max_subsets:
            sets = list(itertools.combinations(middle, k))
        else:
            seen = {tuple(sorted(sorted(middle, key=lambda s: self.balance.counts[s])[:k]))}
            while len(seen) < self.config.max_subsets:
                seen.add(tuple(sorted(rng.sample(middle, k))))
            sets = sorted(seen)
        if after == 0:
            legal = [c for c in sets if self.balance.allowed(c)]
            if legal:
                return legal, ""
            behind = min(sets, key=self.balance.pressure)
            return [behind], "balance relaxed (no stage set keeps it reachable with the live peers)"
        return sets, ""

    def _register(self, route: Route, middle: tuple[int, ...], key: Hashable = None) -> Route:
        epoch = self.balance.commit(middle)
        self._live[route.microbatch if key is None else key] = (route, middle, epoch)
        return route

    def _new_id(self, microbatch: int) -> int:
        return next(self._next_id) if microbatch < 0 else microbatch

    def _make_route(self, origin: PeerId, peers: Sequence[PeerId], stages: Sequence[int],
                    microbatch: int) -> Route:
        hops = [Hop(0, origin)] + [Hop(s, p) for s, p in zip(stages, peers)]
        if self.rules.first_stage_is_also_last:
            hops.append(Hop(0, origin))
        return Route(origin=origin, hops=tuple(hops), microbatch=microbatch)

    # --- the interface -------------------------------------------------------------------

    def deal(self, microbatches: Mapping[PeerId, int]) -> dict[PeerId, int]:
        """Which stage-0 peers start how many microbatches (``microbatches``: where the data is).

        Default: where the data is. A policy may move data (DT-FM's pipelines).
        """
        return dict(microbatches)

    def begin_iteration(self, microbatches: Mapping[PeerId, int], now: float, rng: random.Random) -> None:
        """Open a balance window of ``sum(microbatches.values())`` microbatches."""
        self.balance.start(sum(microbatches.values()))

    def route(self, origin: PeerId | None, now: float, rng: random.Random,
              microbatch: int = -1) -> tuple[Route | None, str]:
        """A route for a new microbatch starting on ``origin`` now, and why.

        ``origin`` None: a trainer that holds the data itself lets the policy
        pick the stage-0 peer too (:meth:`choose_origin`).
        """
        if origin is None:
            origin, why = self.choose_origin(now, rng)
            if origin is None:
                return None, why
            route, reason = self._route(origin, now, rng, self._new_id(microbatch))
            return route, f"{why}; {reason}"
        if origin not in self.table or self.table.get(origin).stage != 0:
            return None, f"origin {origin!r} is not a live stage-0 peer"
        return self._route(origin, now, rng, self._new_id(microbatch))

    def choose_origin(self, now: float, rng: random.Random) -> tuple[PeerId | None, str]:
        """The stage-0 peer a new microbatch should start on (default: the least loaded)."""
        ids = self.table.peers_of(0)
        if not ids:
            return None, "stage 0 has no live peer"
        best = min(ids, key=lambda p: (self.table.in_flight(p), rng.random()))
        return best, f"origin {best} (least loaded of {len(ids)} stage-0 peers)"

    def _route(self, origin: PeerId, now: float, rng: random.Random, mb: int) -> tuple[Route | None, str]:
        raise NotImplementedError

    def replan(self, route: Route, position: int, dead: Collection[PeerId], now: float,
               rng: random.Random) -> tuple[Route | None, str]:
        """Re-route the rest of ``route`` from hop ``position`` on, avoiding ``dead`` peers.

        Hops before ``position`` have done their forward (the peer at
        ``position - 1`` resends its output). Keeps the same stages when they
        still have live peers, else picks other stages after the last done
        one. Returns None (and why) when the origin or a done hop is dead.
        """
        dead = set(dead)
        fwd = route.hops[:-1] if self.rules.first_stage_is_also_last else route.hops
        if not (1 <= position < len(fwd)):
            return None, f"position {position} is not a forward hop after the origin (1..{len(fwd) - 1})"
        gone = [h.peer for h in route.hops[:position] if h.peer in dead or h.peer not in self.table]
        if gone:
            return None, f"peer {gone[0]!r} already computed this microbatch and is gone: restart it"
        old = self._live.get(route.microbatch)
        todo = [h.stage for h in fwd[position:]]
        new_stages = None
        notes = ""
        if all(any(p not in dead for p in self.table.peers_of(s)) for s in todo):
            new_stages = tuple(todo)
        else:
            middle_todo = [s for s in todo if s in self.rules.middle_stages]
            sets, notes = self.stage_sets(rng, after=fwd[position - 1].stage, count=len(middle_todo),
                                          exclude=dead)
            if not sets:
                return None, f"cannot re-route microbatch {route.microbatch}: {notes}"
            new_stages = tuple(min(sets, key=self.balance.pressure)) + self._tail()
        peers, why = self._replan_peers(route, position, new_stages, dead, now, rng)
        if peers is None:
            return None, why
        done_middle = tuple(h.stage for h in fwd[1:position] if h.stage in self.rules.middle_stages)
        stages = tuple(h.stage for h in fwd[1:position]) + new_stages
        path = [h.peer for h in fwd[1:position]] + list(peers)
        new_route = self._make_route(route.origin, path, stages, route.microbatch)
        middle = done_middle + tuple(s for s in new_stages if s in self.rules.middle_stages)
        if old is not None:
            self.balance.undo(old[1], old[2])
        self._register(new_route, middle)
        return new_route, f"re-planned from hop {position} around {sorted(map(str, dead))}: {why}" + (
            f"; {notes}" if notes else "")

    def _replan_peers(self, route: Route, position: int, stages: Sequence[int], dead: set,
                      now: float, rng: random.Random) -> tuple[list | None, str]:
        """Peers for ``stages`` (the rest of a route); default: the policy's own per-stage choice."""
        peers = []
        for s in stages:
            p, why = self._pick_peer(s, dead, rng)
            if p is None:
                return None, why
            peers.append(p)
        return peers, "replacement peers " + ", ".join(map(str, peers))

    def _pick_peer(self, stage: int, dead: Collection[PeerId], rng: random.Random) -> tuple[PeerId | None, str]:
        ids = [p for p in self.table.peers_of(stage) if p not in dead]
        if not ids:
            return None, f"stage {stage} has no live peer"
        return min(ids, key=lambda p: (self.table.in_flight(p), str(p))), "least loaded"

    def finished(self, route: Route) -> None:
        """The microbatch completed its backward: forget its bookings."""
        self._live.pop(route.microbatch, None)

    def aborted(self, route: Route) -> None:
        """The microbatch will be started again from scratch: undo its balance count and bookings."""
        entry = self._live.pop(route.microbatch, None)
        if entry is not None:
            self.balance.undo(entry[1], entry[2])

    def forget_peer(self, peer: PeerId) -> None:
        """A peer is gone for good or for a while (the caller has removed it from the table)."""

    def plan_iteration(self, microbatches: Mapping[PeerId, int], now: float, rng: random.Random,
                       clock: Callable[[], float] | None = None, budget_s: float = 0.0,
                       evaluate: Evaluator | None = None) -> IterationPlan:
        """Route a whole iteration ahead (``microbatches``: origin -> count) and forecast its time.

        Base version: one pass, origins taking turns; the forecast replays the
        routes through a fresh :class:`Timeline` in that order.
        """
        self.begin_iteration(microbatches, now, rng)
        left = dict(microbatches)
        routes, reasons = [], []
        mb = 0
        while any(left.values()):
            for origin in list(left):
                if left[origin] <= 0:
                    continue
                left[origin] -= 1
                r, why = self.route(origin, now, rng, microbatch=mb)
                mb += 1
                if r is None:
                    raise RuntimeError(f"{self.name}: no route for a microbatch of {origin!r}: {why}")
                routes.append(r)
                reasons.append(why)
        predicted = evaluate(routes) if evaluate is not None else predict_iteration(routes, self.table, self.rules, now)
        return IterationPlan(tuple(routes), tuple(reasons), predicted, 1, self.name)


def predict_iteration(routes: Sequence[Route], table: PeerTable, rules: PathRules, now: float) -> float:
    """Forecast makespan of ``routes`` booked one after another into an empty timeline."""
    timeline = Timeline()
    end = now
    for r in routes:
        f = forecast_route(timeline, table, table.links, r.path, rules.first_stage_is_also_last, now, now)
        timeline.book(r.microbatch, f)
        end = max(end, f.completion)
    return end - now


class FullPipeline(Policy):
    """No skipping; DT-FM style fixed pipelines of one peer per stage (GPipe within each).

    ``P`` = the smallest stage's peer count disjoint pipelines are built by
    greedy cheapest-link matching between consecutive stages (stage 0 ->
    1 -> ...). Each pipeline's stage-0 peer is its head; :meth:`deal` spreads
    the iteration's microbatches evenly over the heads (stage-0 peers that
    head no pipeline hand their data over), which is how SkipPipe ran its
    DT-FM baseline. Load-blind: a route is its pipeline, whatever the queues.
    """

    name = "full"
    skips = False

    def __init__(self, rules: PathRules, table: PeerTable, config: SchedulerConfig | None = None) -> None:
        super().__init__(rules, table, config)
        self.pipelines: list[tuple[PeerId, ...]] = []
        """The fixed pipelines, each ``(head, stage-1 peer, ..., stage-(S-1) peer)``."""
        self._version = -1

    def _build(self) -> None:
        links = self.table.links
        stage_peers = [list(self.table.peers_of(s)) for s in range(self.rules.stages)]
        width = min(len(p) for p in stage_peers)
        chains: list[list[PeerId]] = []
        if width:
            pairs = sorted((links.transfer_s(a, b), str(a), str(b), a, b)
                           for a in stage_peers[0] for b in stage_peers[1])
            used_a, used_b = set(), set()
            for *_, a, b in pairs:
                if a not in used_a and b not in used_b and len(chains) < width:
                    chains.append([a, b])
                    used_a.add(a)
                    used_b.add(b)
            for s in range(2, self.rules.stages):
                pairs = sorted((links.transfer_s(c[-1], b), j, str(b), b) for j, c in enumerate(chains)
                               for b in stage_peers[s])
                done, used = set(), set()
                for _, j, _, b in pairs:
                    if j not in done and b not in used:
                        chains[j].append(b)
                        done.add(j)
                        used.add(b)
        self.pipelines = [tuple(c) for c in chains]
        self._version = self.table.version

    def deal(self, microbatches: Mapping[PeerId, int]) -> dict[PeerId, int]:
        """All of the iteration's microbatches, spread evenly over the pipeline heads."""
        if self._version != self.table.version:
            self._build()
        if not self.pipelines:
            return dict(microbatches)
        total = sum(microbatches.values())
        heads = [p[0] for p in self.pipelines]
        return {h: total // len(heads) + (1 if i < total % len(heads) else 0) for i, h in enumerate(heads)}

    def begin_iteration(self, microbatches: Mapping[PeerId, int], now: float, rng: random.Random) -> None:
        super().begin_iteration(microbatches, now, rng)
        if self._version != self.table.version:
            self._build()

    def _route(self, origin: PeerId, now: float, rng: random.Random, mb: int) -> tuple[Route | None, str]:
        if not self.pipelines:
            self._build()
        if not self.pipelines:
            return None, "a stage has no live peer"
        heads = [p[0] for p in self.pipelines]
        j = heads.index(origin) if origin in heads else sorted(map(str, self.table.peers_of(0))).index(
            str(origin)) % len(self.pipelines)
        chain = list(self.pipelines[j][1:])
        note = ""
        for i, p in enumerate(chain):  # a member died since the pipelines were built
            if p not in self.table:
                q, _ = self._pick_peer(i + 1, (), rng)
                if q is None:
                    return None, f"stage {i + 1} has no live peer"
                chain[i] = q
                note = " (dead members replaced by the least loaded peers)"
        stages = tuple(range(1, self.rules.stages))
        middle = tuple(s for s in stages if s in self.rules.middle_stages)
        r = self._make_route(origin, chain, stages, mb)
        return self._register(r, middle), f"fixed pipeline {j}: {', '.join(map(str, chain))}{note}"


class SwarmWiring(Policy):
    """SWARM's stochastic wiring, no skipping: P(peer) ~ (1 / forward_s) / (1 + in-flight load)."""

    name = "swarm"
    skips = False

    def __init__(self, rules: PathRules, table: PeerTable, config: SchedulerConfig | None = None) -> None:
        super().__init__(rules, table, config)
        self._routed: dict[PeerId, int] = {}

    def _load(self, peer: PeerId) -> int:
        return max(self.table.in_flight(peer), self._routed.get(peer, 0))

    def _pick_peer(self, stage: int, dead: Collection[PeerId], rng: random.Random) -> tuple[PeerId | None, str]:
        ids = [p for p in self.table.peers_of(stage) if p not in dead]
        if not ids:
            return None, f"stage {stage} has no live peer"
        weights = [(1.0 / self.table.get(p).forward_s) / (1.0 + self._load(p)) for p in ids]
        pick = rng.random() * sum(weights)
        for p, w in zip(ids, weights):
            pick -= w
            if pick < 0:
                return p, f"p={w / sum(weights):.2f}"
        return ids[-1], f"p={weights[-1] / sum(weights):.2f}"

    def _route(self, origin: PeerId, now: float, rng: random.Random, mb: int) -> tuple[Route | None, str]:
        stages = tuple(range(1, self.rules.stages))
        peers, why = [], []
        for s in stages:
            p, w = self._pick_peer(s, (), rng)
            if p is None:
                return None, w
            peers.append(p)
            why.append(f"stage {s}: {p} ({w})")
        for p in peers:
            self._routed[p] = self._routed.get(p, 0) + 1
        middle = tuple(s for s in stages if s in self.rules.middle_stages)
        r = self._make_route(origin, peers, stages, mb)
        return self._register(r, middle), "weighted by throughput / (1 + load): " + "; ".join(why)

    def _forget_load(self, route: Route) -> None:
        for h in route.hops[1:]:
            if h.peer in self._routed and h.peer != route.origin:
                self._routed[h.peer] = max(0, self._routed[h.peer] - 1)

    def finished(self, route: Route) -> None:
        entry = self._live.get(route.microbatch)
        super().finished(route)
        if entry is not None:
            self._forget_load(entry[0])

    def aborted(self, route: Route) -> None:
        entry = self._live.get(route.microbatch)
        super().aborted(route)
        if entry is not None:
            self._forget_load(entry[0])

    def replan(self, route: Route, position: int, dead: Collection[PeerId], now: float,
               rng: random.Random) -> tuple[Route | None, str]:
        old = self._live.get(route.microbatch)
        new, why = super().replan(route, position, dead, now, rng)
        if new is not None:
            if old is not None:
                self._forget_load(old[0])
            for h in new.hops[1:]:
                if h.peer != new.origin:
                    self._routed[h.peer] = self._routed.get(h.peer, 0) + 1
        return new, why


class RandomSkip(Policy):
    """Skipping with random middle stages (keeping balance reachable) and random peers."""

    name = "random-skip"

    def _pick_peer(self, stage: int, dead: Collection[PeerId], rng: random.Random) -> tuple[PeerId | None, str]:
        ids = [p for p in self.table.peers_of(stage) if p not in dead]
        if not ids:
            return None, f"stage {stage} has no live peer"
        return rng.choice(ids), "uniform"

    def _route(self, origin: PeerId, now: float, rng: random.Random, mb: int) -> tuple[Route | None, str]:
        sets, note = self.stage_sets(rng)
        if not sets:
            return None, note
        middle = rng.choice(sets)
        stages = middle + self._tail()
        peers = []
        for s in stages:
            p, why = self._pick_peer(s, (), rng)
            if p is None:
                return None, why
            peers.append(p)
        r = self._make_route(origin, peers, stages, mb)
        return self._register(r, middle), (f"random stages {middle} of {len(sets)} allowed sets, "
                                           f"random peers {', '.join(map(str, peers))}" + (f"; {note}" if note else ""))


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


class SkipScheduler(Policy):
    """swarmrt's scheduler: earliest-finish-time routes under balance and memory limits (module docstring)."""

    name = "swarmrt"

    def __init__(self, rules: PathRules, table: PeerTable, config: SchedulerConfig | None = None) -> None:
        super().__init__(rules, table, config)
        self.timeline = Timeline()
        """What this scheduler has booked: the forecast it routes against."""
        self._planned: dict[PeerId, list[tuple[Route, str, Hashable]]] = {}

    # --- per-microbatch search -----------------------------------------------------------

    def _share_penalty(self, arr, used: np.ndarray, quota: float, extra: int = 1) -> np.ndarray | None:
        """A cost per peer of ``arr`` for going past its speed-weighted share of ``quota`` visits (None: none).

        ``used[i]``: visits peer ``i`` already has. Ten times the work of each
        visit beyond the share: a peer within its share always beats one past
        it, and when all are past it the least overloaded wins.
        """
        slack = self.config.peer_share_slack
        if slack is None or quota <= 0 or not len(arr.ids):
            return None
        speed = 1.0 / arr.forward_s
        cap = np.ceil(quota * speed / speed.sum() * (1.0 + slack) - 1e-9)
        over = np.maximum(0.0, used + extra - cap)
        if not over.any():
            return None
        return over * 10.0 * (arr.forward_s + arr.backward_s)

    def _stage_quota(self, stage: int) -> float:
        """Visits a stage gets per window."""
        if stage in self.balance.counts:
            return self.balance.window * self.k / max(1, len(self.rules.middle_stages))
        return float(self.balance.window)

    def _search(self, prefix: Sequence[PeerId], t: float, stages: Sequence[int], now: float,
                rng: random.Random, exclude: Collection[PeerId] = (),
                cache: dict | None = None) -> list[tuple[float, tuple[PeerId, ...]]]:
        """Beam search over peers for ``stages`` after ``prefix`` (whose forward is done at ``t``)."""
        cfg = self.config
        links = self.table.links
        beams = [(t, tuple(prefix))]
        cache = {} if cache is None else cache
        for stage in stages:
            arr = self.table.arrays(stage)
            ids = arr.ids
            if stage not in cache:
                load = np.fromiter((self.timeline.load_s.get(p, 0.0) for p in ids), dtype=np.float64,
                                   count=len(ids))
                penalty = np.zeros(len(ids))
                used = np.fromiter((self.balance.peer_counts.get(p, 0) for p in ids), dtype=np.float64,
                                   count=len(ids))
                capped = self._share_penalty(arr, used, self._stage_quota(stage))
                if capped is not None:
                    penalty += capped
                if exclude:
                    penalty += np.array([np.inf if p in exclude else 0.0 for p in ids])
                cache[stage] = (load, penalty)
            load, penalty = cache[stage]
            grown = []
            for t_prev, peers in beams:
                arrival = t_prev + links.transfer_row(peers[-1], ids)
                quick = np.maximum(arrival, now + load) + arr.forward_s + penalty
                finite = int(np.isfinite(quick).sum())
                if finite == 0:
                    continue
                n = min(cfg.candidates_per_stage, finite)
                order = np.argpartition(quick, n - 1)[:n] if n < len(ids) else np.argsort(quick)[:n]
                for i in order:
                    p = ids[i]
                    fwd = float(arr.forward_s[i])
                    start = self.timeline.forward_start(p, float(arrival[i]), fwd, int(arr.memory[i]), now,
                                                        float(arr.backward_s[i]))
                    grown.append((start + fwd, rng.random(), peers + (p,)))
            if not grown:
                return []
            grown.sort()
            beams = [(g[0], g[2]) for g in grown[:cfg.beam_width]]
        return beams

    def _route(self, origin: PeerId, now: float, rng: random.Random, mb: int) -> tuple[Route | None, str]:
        queue = self._planned.get(origin)
        while queue:
            planned, why, key = queue.pop(0)
            entry = self._live.pop(key, None)
            forecast = self.timeline.release(key)
            if entry is not None and all(h.peer in self.table for h in planned.hops):
                route = dataclasses.replace(planned, microbatch=mb)
                if forecast is not None:
                    self.timeline.book(mb, forecast)
                self._live[mb] = (route, entry[1], entry[2])
                return route, "planned: " + why
            if entry is not None:  # a planned peer is gone: same stages, other peers (EFT)
                self.balance.undo(entry[1], entry[2])
                self.balance.count_peers(planned, -1, entry[2])
                route, why = self._route_online(origin, now, now, rng, mb, only=entry[1])
                if route is not None:
                    return route, "re-planned around a dead peer: " + why
        return self._route_online(origin, now, now, rng, mb)

    def _route_online(self, origin: PeerId, ready: float, now: float, rng: random.Random,
                      mb: int, key: Hashable = None, only: tuple[int, ...] | None = None) -> tuple[Route | None, str]:
        """Book the earliest-finishing legal route from ``origin`` whose forward may start at ``ready``.

        ``only``: consider just this stage set (if it is still allowed).
        """
        key = mb if key is None else key
        sets, note = self.stage_sets(rng)
        if only is not None:
            sets = [c for c in sets if c == tuple(only)]
        if not sets:
            return None, note or f"stage set {only} no longer allowed"
        self._note_foreign_load(now)
        info = self.table.get(origin)
        start = self.timeline.forward_start(origin, ready, info.forward_s, info.memory_microbatches, now,
                                            info.backward_s)
        candidates = []
        cache: dict = {}
        for middle in sets:
            for _, peers in self._search((origin,), start + info.forward_s, middle + self._tail(), now, rng,
                                         cache=cache):
                path = peers + ((origin,) if self.rules.first_stage_is_also_last else ())
                f = forecast_route(self.timeline, self.table, self.table.links, path,
                                   self.rules.first_stage_is_also_last, ready, now)
                candidates.append((f.completion, self.balance.pressure(middle), rng.random(), f, middle, peers[1:]))
        if not candidates:
            return None, "no peer can take the microbatch"
        _, _, _, f, middle, peers = min(candidates, key=lambda c: c[:3])
        r = self._make_route(origin, peers, middle + self._tail(), mb)
        self.timeline.book(key, f)
        self._register(r, middle, key)
        self.balance.count_peers(r, +1, self.balance.epoch)
        why = (f"stages {middle} via {', '.join(map(str, peers))}: forecast done {f.completion - now:.2f} s "
               f"from now (best of {len(candidates)} routes over {len(sets)} stage sets)")
        return r, why + (f"; {note}" if note else "")

    def choose_origin(self, now: float, rng: random.Random) -> tuple[PeerId | None, str]:
        """The stage-0 peer whose forward of a new microbatch could start soonest (forecast)."""
        ids = self.table.arrays(0)
        if not ids.ids:
            return None, "stage 0 has no live peer"
        self._note_foreign_load(now)
        starts = [(self.timeline.forward_start(p, now, float(ids.forward_s[i]), int(ids.memory[i]), now,
                                               float(ids.backward_s[i])), rng.random(), p)
                  for i, p in enumerate(ids.ids)]
        t, _, best = min(starts)
        return best, f"origin {best} (its forward can start {t - now:.2f} s from now, soonest of {len(starts)})"

    def _note_foreign_load(self, now: float) -> None:
        """Peers whose announced in-flight load exceeds what this scheduler booked there are busy with
        other trainers' microbatches: each such microbatch is taken to need one backward there first."""
        busy = {}
        for info in self.table:
            extra = self.table.in_flight(info.peer) - self.timeline.holds(info.peer)
            if extra > 0:
                busy[info.peer] = now + extra * info.backward_s
        self.timeline.busy_until = busy

    def _replan_peers(self, route: Route, position: int, stages: Sequence[int], dead: set,
                      now: float, rng: random.Random) -> tuple[list | None, str]:
        fwd = route.hops[:-1] if self.rules.first_stage_is_also_last else route.hops
        prefix = tuple(h.peer for h in fwd[:position])
        self.timeline.release(route.microbatch)
        self._note_foreign_load(now)
        beams = self._search(prefix, now, stages, now, rng, exclude=dead)
        if not beams:
            return None, f"no live peers for stages {tuple(stages)}"
        best = None
        for _, peers in beams:
            path = peers + ((route.origin,) if self.rules.first_stage_is_also_last else ())
            f = forecast_route(self.timeline, self.table, self.table.links, path,
                               self.rules.first_stage_is_also_last, now, now, done=position, done_at=now)
            if best is None or f.completion < best[0].completion:
                best = (f, peers)
        self.timeline.book(route.microbatch, best[0])
        new = list(best[1][position:])
        return new, f"peers {', '.join(map(str, new))} forecast done {best[0].completion - now:.2f} s from now"

    def replan(self, route: Route, position: int, dead: Collection[PeerId], now: float,
               rng: random.Random) -> tuple[Route | None, str]:
        old = self._live.get(route.microbatch)
        new, why = super().replan(route, position, dead, now, rng)
        if new is not None and old is not None:
            self.balance.count_peers(old[0], -1, old[2])
            self.balance.count_peers(new, +1, self.balance.epoch)
        return new, why

    # --- lifecycle -----------------------------------------------------------------------

    def begin_iteration(self, microbatches: Mapping[PeerId, int], now: float, rng: random.Random) -> None:
        for queue in self._planned.values():  # planned routes nobody asked for
            for _, _, key in queue:
                self.timeline.release(key)
                self._live.pop(key, None)
        self._planned = {}
        super().begin_iteration(microbatches, now, rng)
        self.timeline.trim(now)

    def finished(self, route: Route) -> None:
        super().finished(route)
        self.timeline.release(route.microbatch)

    def aborted(self, route: Route) -> None:
        entry = self._live.get(route.microbatch)
        super().aborted(route)
        if entry is not None:
            self.balance.count_peers(entry[0], -1, entry[2])
        self.timeline.release(route.microbatch)

    def forget_peer(self, peer: PeerId) -> None:
        self.timeline.forget_peer(peer)

    # --- planning a whole iteration ------------------------------------------------------

    def plan_iteration(self, microbatches: Mapping[PeerId, int], now: float, rng: random.Random,
                       clock: Callable[[], float] | None = None, budget_s: float = 0.0,
                       evaluate: Evaluator | None = None) -> IterationPlan:
        """Plan a whole iteration (``microbatches``: origin -> count); later :meth:`route` calls serve it.

        Two constructions, each a complete legal plan:

        - *chains*: every origin gets one route shape (stage set and peers)
          for all its microbatches, chosen greedily by link and compute cost
          with the balance rule and each peer's share of its stage as limits,
          so origins do not collide; an origin whose shape would break
          balance takes another for the rest. Cheap (one search per origin).
        - *eft*: per-microbatch earliest-finish-time list scheduling (the
          origin that can start soonest routes next, as :meth:`route` would).

        Both are scored by ``evaluate`` (e.g. the simulator replaying the
        plan) or, without one, by this scheduler's timeline forecast; the
        better one is then improved by local search (re-route one
        microbatch: another peer of a stage, or another stage set, keeping
        balance; keep the change unless the score gets worse) until
        ``budget_s`` of ``clock`` is spent. Without a clock, no local search
        and the result is deterministic for a given ``rng``.
        """
        self.begin_iteration(microbatches, now, rng)
        t0 = clock() if clock is not None else 0.0

        def time_left() -> bool:
            return clock is None or clock() - t0 < budget_s

        base_timeline = self.timeline.copy()
        base_balance = self.balance.snapshot()
        base_live = dict(self._live)

        def score(routes: Sequence[Route]) -> float:
            if evaluate is not None:
                return evaluate(routes)
            return _replay_forecast(routes, self.table, self.rules, base_timeline, now)

        built: list[tuple[str, list[Route]]] = []
        previous = self._previous_plan(microbatches)
        if previous is not None:
            built.append(("previous plan", previous))
        for attempt in range(self.config.plan_constructions):
            if attempt and not time_left():
                break
            for lanes in (False, True):
                if lanes and not time_left():
                    break
                chains = self._chain_plan(microbatches, rng, lanes)
                if chains is not None:
                    built.append(("lane chains" if lanes else "origin chains", chains))
        if time_left() or not built:
            self.timeline = base_timeline.copy()
            self.balance.restore(base_balance)
            self._live = dict(base_live)
            eft = self._eft_plan(microbatches, now, rng)
            if eft is not None:
                built.append(("eft", eft))
        self.timeline, self._live = base_timeline, base_live
        self.balance.restore(base_balance)
        if not built:
            raise RuntimeError("swarmrt: no legal plan for this iteration (a stage has no live peer?)")
        if previous is not None and not time_left():  # no time: keep improving the plan that ran last
            scored = [(score(previous), 0, "previous plan", previous)]
        elif len(built) == 1 and not time_left():  # no time to score: the forecast says how long it takes
            scored = [(_replay_forecast(built[0][1], self.table, self.rules, base_timeline, now), 0,
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
            routes, best, moves, improved = self._local_search(routes, best, score, rng, time_left, evaluate)
            passes += moves
        return self._install(routes, best, now, passes,
                             f"{method}, {improved} improving moves")

    def _previous_plan(self, microbatches: Mapping[PeerId, int]) -> list[Route] | None:
        """The last installed plan, if it still fits: the same microbatches per origin and every peer alive.

        Planning it again lets the local search go on from where it stopped,
        so a plan keeps improving over the iterations of a steady swarm.
        """
        last = getattr(self, "_last_plan", None)
        if not last:
            return None
        counts = collections.Counter(r.origin for r in last)
        if dict(counts) != {o: n for o, n in microbatches.items() if n > 0}:
            return None
        if any(p not in self.table for r in last for p in r.path):
            return None
        return list(last)

    def _install(self, routes: Sequence[Route], predicted: float, now: float, passes: int,
                 method: str) -> IterationPlan:
        """Book ``routes`` (in order) into the timeline and balance, and queue them per origin."""
        self._last_plan = tuple(routes)
        self._planned = {}
        reasons = []
        for r in routes:
            key = ("plan", r.microbatch)
            f = forecast_route(self.timeline, self.table, self.table.links, r.path,
                               self.rules.first_stage_is_also_last, now, now)
            self.timeline.book(key, f)
            middle = r.middle_stages(self.rules)
            self._register(r, middle, key)
            self.balance.count_peers(r, +1, self.balance.epoch)
            why = f"{method}: stages {middle} via {', '.join(map(str, r.path[1:]))}"
            reasons.append(why)
            self._planned.setdefault(r.origin, []).append((r, why, key))
        return IterationPlan(tuple(routes), tuple(reasons), predicted, passes, method)

    def _eft_plan(self, microbatches: Mapping[PeerId, int], now: float,
                  rng: random.Random) -> list[Route] | None:
        """Per-microbatch EFT list scheduling; the origin that can start soonest goes next."""
        left = {o: n for o, n in microbatches.items() if n > 0}
        heap = []
        for o in left:
            info = self.table.get(o)
            t = self.timeline.forward_start(o, now, info.forward_s, info.memory_microbatches, now, info.backward_s)
            heap.append((t, rng.random(), o))
        heapq.heapify(heap)
        routes = []
        while heap:
            ready, _, origin = heapq.heappop(heap)
            r, _ = self._route_online(origin, ready, now, rng, len(routes), key=("plan", len(routes)))
            if r is None:
                return None
            routes.append(r)
            left[origin] -= 1
            if left[origin]:
                info = self.table.get(origin)
                t = self.timeline.forward_start(origin, now, info.forward_s, info.memory_microbatches, now,
                                                info.backward_s)
                heapq.heappush(heap, (t, rng.random(), origin))
        return routes

    def _chain_plan(self, microbatches: Mapping[PeerId, int], rng: random.Random,
                    lanes_apart: bool = False) -> list[Route] | None:
        """Route shapes per origin (see :meth:`plan_iteration`), dealt out round-robin.

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
        balance = _Balance(self.rules, total)
        origins = [o for o in microbatches if microbatches[o] > 0]
        rng.shuffle(origins)
        lanes = {o: max(1, min(self.table.get(o).memory_microbatches, microbatches[o])) if lanes_apart else 1
                 for o in origins}
        n_lanes = max(lanes.values(), default=0)
        state = {}
        for stage in range(1, self.rules.stages):
            arr = self.table.arrays(stage)
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
                        shape = self._best_chain(o, todo, balance, state, rng, mine if lanes_apart else (),
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
                    routes.append(self._make_route(o, shape.peers, shape.stages, len(routes)))
        return routes

    def _best_chain(self, origin: PeerId, n: int, balance: _Balance, state: Mapping[int, tuple],
                    rng: random.Random, mine: Sequence[tuple[int, PeerId]] = (), lane: int = -1) -> _Chain | None:
        """The cheapest allowed shape for ``n`` microbatches of ``origin`` (see :meth:`_chain_plan`).

        ``state[stage]``: (arrays, peer -> index, visits so far, per-lane marks).
        """
        links = self.table.links
        sets = self.stage_sets(rng)[0]
        sets = [c for c in sets if balance.allowed(c, n)] or [c for c in sets if balance.allowed(c)]
        if not sets:
            return None
        best = None
        middle_quota = balance.window * self.k / max(1, len(self.rules.middle_stages))
        for middle in sets:
            stages = middle + self._tail()
            beams = [(0.0, (origin,))]
            for stage in stages:
                arr, index, visits, marks = state[stage]
                quota = middle_quota if stage in balance.counts else float(balance.window)
                work = arr.forward_s + arr.backward_s
                penalty = self._share_penalty(arr, visits, quota, extra=n)
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
                    k = min(self.config.beam_width, len(arr.ids))
                    for i in np.argpartition(total, k - 1)[:k] if k < len(arr.ids) else range(len(arr.ids)):
                        if np.isfinite(total[i]):
                            grown.append((float(total[i]), rng.random(), peers + (arr.ids[i],)))
                grown.sort()
                beams = [(g[0], g[2]) for g in grown[:self.config.beam_width]]
            for cost, peers in beams:
                if self.rules.first_stage_is_also_last:
                    cost += links.transfer_s(peers[-1], origin)
                key = (cost, balance.pressure(middle), rng.random())
                if best is None or key < best[0]:
                    best = (key, _Chain(stages, peers[1:], middle, cost))
        return best[1] if best is not None else None

    def _swap_origins(self, routes: list[Route], rng: random.Random, score: Callable[[Sequence[Route]], float],
                      best: float) -> float | None:
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
            routes[i] = self._make_route(a, rb.path[1:len(rb.path) - (1 if self.rules.first_stage_is_also_last else 0)],
                                         rb.stages[1:len(rb.stages) - (1 if self.rules.first_stage_is_also_last else 0)],
                                         ra.microbatch)
            routes[j] = self._make_route(b, ra.path[1:len(ra.path) - (1 if self.rules.first_stage_is_also_last else 0)],
                                         ra.stages[1:len(ra.stages) - (1 if self.rules.first_stage_is_also_last else 0)],
                                         rb.microbatch)
        value = score(routes)
        if value <= best:
            return value
        routes[:] = old
        return None

    def _local_search(self, routes: list[Route], best: float, score: Callable[[Sequence[Route]], float],
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
        counts = {s: 0 for s in self.rules.middle_stages}
        for r in routes:
            for s in r.middle_stages(self.rules):
                counts[s] += 1
        mean = sum(counts.values()) / max(1, len(counts))
        lo, hi = balance_bounds(mean, self.rules.balance_tolerance)
        stage_ids = {s: self.table.peers_of(s) for s in range(1, self.rules.stages)}
        sets = self.stage_sets(rng)[0] if self.skips else []
        moves = improved = 0
        while moves < self.config.max_search_moves and time_left():
            moves += 1
            if finish and rng.random() < 0.8:
                i = rng.choice(by_origin[max(finish, key=finish.get)])
            else:
                i = rng.randrange(len(routes))
            old = routes[i]
            stages = list(old.stages[1:-1] if self.rules.first_stage_is_also_last else old.stages[1:])
            peers = list(old.path[1:-1] if self.rules.first_stage_is_also_last else old.path[1:])
            if rng.random() < 0.2:
                value = self._swap_origins(routes, rng, score, best)
                if value is not None:
                    improved += value < best
                    best = value
                    finish = dict(getattr(evaluate, "finish_by_origin", None) or {})
                continue
            if len(sets) > 1 and rng.random() < 0.5:
                middle = rng.choice(sets)
                new_stages = list(middle + self._tail())
                peers = [peers[stages.index(s)] if s in stages else rng.choice(stage_ids[s]) for s in new_stages]
                stages = new_stages
            elif peers:
                j = rng.randrange(len(peers))
                peers[j] = rng.choice(stage_ids[stages[j]])
            new = self._make_route(old.origin, peers, stages, old.microbatch)
            if new == old:
                continue
            delta = {s: 0 for s in counts}
            for s in old.middle_stages(self.rules):
                delta[s] -= 1
            for s in new.middle_stages(self.rules):
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


def _replay_forecast(routes: Sequence[Route], table: PeerTable, rules: PathRules, timeline: Timeline,
                     now: float) -> float:
    """Forecast seconds from ``now`` until ``routes``, booked in order into a copy of ``timeline``, are done."""
    tl = timeline.copy()
    end = now
    for r in routes:
        f = forecast_route(tl, table, table.links, r.path, rules.first_stage_is_also_last, now, now)
        tl.book(("replay", r.microbatch), f)
        end = max(end, f.completion)
    return end - now


POLICIES: dict[str, type[Policy]] = {
    FullPipeline.name: FullPipeline,
    SwarmWiring.name: SwarmWiring,
    RandomSkip.name: RandomSkip,
    SkipScheduler.name: SkipScheduler,
}
"""Policies by the name the CLI and the simulator use."""


def make_policy(name: str, rules: PathRules, table: PeerTable, config: SchedulerConfig | None = None) -> Policy:
    """A policy by name (``full``, ``swarm``, ``random-skip``, ``swarmrt``)."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r} (known: {', '.join(POLICIES)})") from None
    return cls(rules, table, config)
