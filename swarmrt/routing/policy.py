"""The routing-policy interface and what every policy shares.

A policy decides which stages and which peers each microbatch visits. Every
policy (:mod:`swarmrt.routing.policies` lists them) is the same kind of
object, used the same way by the trainer (real runtime) and by the simulator:

    table = PeerTable(stages, links)               # live peers, kept current by the caller
    sched = make_policy(name, rules, table)        # FullPipeline / SwarmWiring / RandomSkip / SkipScheduler
    sched.begin_iteration({origin: n_microbatches}, now, rng)   # opens a balance window
    route, why = sched.route(origin, now, rng, microbatch=i)    # one microbatch, online
    route, why = sched.replan(route, position, dead_peers, now, rng)  # next hop died
    sched.finished(route)  /  sched.aborted(route)            # it completed / will be redone

Decisions return ``(choice, reason)``; ``choice`` is None when no legal route
exists (e.g. every peer of a stage is gone), and the reason says why.

This module holds :class:`Policy` (the interface, with the stage-set choice
under the balance rule and re-routing around dead peers that all policies
share), :class:`Balance` (the balance rule's bookkeeping) and
:class:`SchedulerConfig` (the knobs).

Pure: the clock (``now``) and the random generator (``rng``) are arguments.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from typing import Collection, Hashable, Mapping, Sequence

from swarmrt.routing.paths import Hop, PathRules, Route, balance_feasible
from swarmrt.routing.peer_table import PeerTable

PeerId = Hashable


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Knobs of the path schedulers (defaults suit 10 to 1,000 peers)."""

    beam_width: int = 4
    """Partial routes kept per hop in :class:`~swarmrt.routing.skip_scheduler.SkipScheduler`'s beam searches."""
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
    """Randomised chain constructions of each kind the whole-iteration planner
    (:func:`swarmrt.sim.planner.plan_iteration`) builds (the first always; the others while its time budget lasts)."""
    max_search_moves: int = 100_000
    """Most local-search moves of the whole-iteration planner (its time budget usually ends it first)."""
    routes_ahead: bool = True
    """How the caller uses :class:`~swarmrt.routing.policies.SwarmWiring`'s routes. True (the
    simulator): a whole route is drawn when the microbatch starts, so the policy counts its own
    unfinished routes as load on their peers (the table cannot know of microbatches that have not
    reached a peer yet). False (the trainer): each hop's peer is drawn again when its input is
    ready (``replan`` from that hop), and the table's in-flight figure (announced load plus the
    trainer's own requests) is already current, so nothing is added to it."""

    def __post_init__(self) -> None:
        for name in ("beam_width", "candidates_per_stage", "max_subsets", "balance_window"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"SchedulerConfig.{name} must be an integer >= 1, got {v!r}")
        if self.peer_share_slack is not None and not self.peer_share_slack >= 0:
            raise ValueError(f"SchedulerConfig.peer_share_slack must be >= 0 or None, got {self.peer_share_slack!r}")
        if not isinstance(self.max_search_moves, int) or self.max_search_moves < 0:
            raise ValueError(f"SchedulerConfig.max_search_moves must be an integer >= 0, got {self.max_search_moves!r}")



class Balance:
    """Counts of middle-stage visits in the current window (the balance rule's bookkeeping)."""

    def __init__(self, rules: PathRules, window: int) -> None:
        self.rules = rules
        self.window = max(1, window)
        """Microbatches in the current window."""
        self.counts: dict[int, int] = {s: 0 for s in rules.middle_stages}
        """Visits of each middle stage in the current window."""
        self.peer_counts: dict[PeerId, int] = {}
        """Middle-stage visits of each peer in the current window (SkipScheduler's per-peer share)."""
        self.issued = 0
        """Microbatches counted in the current window."""
        self.epoch = 0
        """Number of the current window; a count made in an older window is never undone in this one."""

    def start(self, window: int) -> None:
        """Open a new window of ``window`` microbatches, with nothing counted."""
        self.window = max(1, window)
        self.counts = {s: 0 for s in self.rules.middle_stages}
        self.peer_counts = {}
        self.issued = 0
        self.epoch += 1

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
        self.balance = Balance(rules, self.config.balance_window)
        self._live: dict[Hashable, tuple[Route, tuple[int, ...], int]] = {}
        """Routes issued and not finished, by microbatch: (route, middle stages, balance epoch)."""
        self._next_id = itertools.count()

    # --- shared helpers ------------------------------------------------------------------

    @property
    def k(self) -> int:
        """Middle stages each microbatch visits under this policy."""
        return self.rules.middle_visits if self.skips else len(self.rules.middle_stages)

    def tail(self) -> tuple[int, ...]:
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
        for s in self.tail():
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

    def make_route(self, origin: PeerId, peers: Sequence[PeerId], stages: Sequence[int],
                   microbatch: int) -> Route:
        """The route from ``origin`` through ``peers`` (one per entry of ``stages``), back to the origin
        when stage 0 is also the last."""
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
            new_stages = tuple(min(sets, key=self.balance.pressure)) + self.tail()
        peers, why = self._replan_peers(route, position, new_stages, dead, now, rng)
        if peers is None:
            return None, why
        done_middle = tuple(h.stage for h in fwd[1:position] if h.stage in self.rules.middle_stages)
        stages = tuple(h.stage for h in fwd[1:position]) + new_stages
        path = [h.peer for h in fwd[1:position]] + list(peers)
        new_route = self.make_route(route.origin, path, stages, route.microbatch)
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
            p, why = self._pick_peer(s, dead, now, rng)
            if p is None:
                return None, why
            peers.append(p)
        return peers, "replacement peers " + ", ".join(map(str, peers))

    def _pick_peer(self, stage: int, dead: Collection[PeerId], now: float,
                   rng: random.Random) -> tuple[PeerId | None, str]:
        """A live peer of ``stage`` not in ``dead``, and why; default: the least loaded."""
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

