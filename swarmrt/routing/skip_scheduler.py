"""swarmrt's path scheduler: earliest-finish-time routes under the balance and memory limits.

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

Serving a plan
--------------

A whole iteration may be planned ahead (:mod:`swarmrt.sim.planner`, used by
the simulator and ``swarmrt plan``) and handed over with :meth:`SkipScheduler.serve_plan`.
``route`` then serves the plan, origin by origin, while its peers live (a
planned route whose peer died keeps its stages and gets other peers by EFT),
and falls back to EFT otherwise. The trainer does not plan: it routes online.

Pure: the clock (``now``) and the random generator (``rng``) are arguments.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Collection, Hashable, Mapping, Sequence

import numpy as np

from swarmrt.routing.paths import PathRules, Route
from swarmrt.routing.peer_table import PeerTable, StageArrays
from swarmrt.routing.policy import Policy, SchedulerConfig
from swarmrt.routing.timeline import Timeline, forecast_route

PeerId = Hashable


@dataclasses.dataclass(frozen=True)
class Bookings:
    """A copy of a :class:`SkipScheduler`'s bookings (:meth:`SkipScheduler.save_bookings`)."""

    timeline: Timeline
    """The forecast of what was booked."""
    balance: tuple
    """The balance window's counts (:meth:`~swarmrt.routing.policy.Balance.snapshot`)."""
    live: Mapping[Hashable, tuple]
    """Routes issued and not finished, by booking key."""


class SkipScheduler(Policy):
    """swarmrt's scheduler: earliest-finish-time routes under balance and memory limits (module docstring)."""

    name = "swarmrt"

    def __init__(self, rules: PathRules, table: PeerTable, config: SchedulerConfig | None = None) -> None:
        super().__init__(rules, table, config)
        self.timeline = Timeline()
        """What this scheduler has booked: the forecast it routes against."""
        self._planned: dict[PeerId, list[tuple[Route, str, Hashable]]] = {}
        """Planned routes not served yet, per origin: (route, why, booking key), in plan order."""
        self.last_plan: tuple[Route, ...] = ()
        """The routes of the last plan handed to :meth:`serve_plan` (a planner may start from them)."""

    # --- per-microbatch search -----------------------------------------------------------

    def share_penalty(self, arr: StageArrays, used: np.ndarray, quota: float, extra: int = 1) -> np.ndarray | None:
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
                capped = self.share_penalty(arr, used, self._stage_quota(stage))
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
                route, why = self.route_online(origin, now, now, rng, mb, only=entry[1])
                if route is not None:
                    return route, "re-planned around a dead peer: " + why
        return self.route_online(origin, now, now, rng, mb)

    def route_online(self, origin: PeerId, ready: float, now: float, rng: random.Random,
                     mb: int, key: Hashable = None, only: tuple[int, ...] | None = None) -> tuple[Route | None, str]:
        """Book the earliest-finishing legal route from ``origin`` whose forward may start at ``ready``.

        ``key``: what to book it under (default ``mb``). ``only``: consider
        just this stage set (if it is still allowed).
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
            for _, peers in self._search((origin,), start + info.forward_s, middle + self.tail(), now, rng,
                                         cache=cache):
                path = peers + ((origin,) if self.rules.first_stage_is_also_last else ())
                f = forecast_route(self.timeline, self.table, self.table.links, path,
                                   self.rules.first_stage_is_also_last, ready, now)
                candidates.append((f.completion, self.balance.pressure(middle), rng.random(), f, middle, peers[1:]))
        if not candidates:
            return None, "no peer can take the microbatch"
        _, _, _, f, middle, peers = min(candidates, key=lambda c: c[:3])
        r = self.make_route(origin, peers, middle + self.tail(), mb)
        self.timeline.book(key, f)
        self._register(r, middle, key)
        self.balance.count_peers(r, +1, self.balance.epoch)
        why = (f"stages {middle} via {', '.join(map(str, peers))}: forecast done {f.completion - now:.2f} s "
               f"from now (best of {len(candidates)} routes over {len(sets)} stage sets)")
        return r, why + (f"; {note}" if note else "")

    def choose_origin(self, now: float, rng: random.Random) -> tuple[PeerId | None, str]:
        """The stage-0 peer whose forward of a new microbatch could start soonest (forecast); while a plan
        is being served, among the live origins it still has routes for."""
        ids = self.table.arrays(0)
        if not ids.ids:
            return None, "stage 0 has no live peer"
        self._note_foreign_load(now)
        planned = {o for o, queue in self._planned.items() if queue}
        starts = [(p not in planned if planned else False,
                   self.timeline.forward_start(p, now, float(ids.forward_s[i]), int(ids.memory[i]), now,
                                               float(ids.backward_s[i])), rng.random(), p)
                  for i, p in enumerate(ids.ids)]
        _, t, _, best = min(starts)
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

    # --- serving a plan ------------------------------------------------------------------

    def save_bookings(self) -> Bookings:
        """A copy of what the scheduler has booked, for :meth:`restore_bookings`.

        A planner books trial plans (:meth:`route_online`) and then puts the
        scheduler back as it was.
        """
        return Bookings(self.timeline.copy(), self.balance.snapshot(), dict(self._live))

    def restore_bookings(self, saved: Bookings) -> None:
        """Book exactly what was booked when ``saved`` was taken (``saved`` stays as it is)."""
        self.timeline = saved.timeline.copy()
        self.balance.restore(saved.balance)
        self._live = dict(saved.live)

    def serve_plan(self, routes: Sequence[Route], now: float, method: str) -> tuple[str, ...]:
        """Book ``routes`` (in order) into the timeline and balance, and queue them per origin for :meth:`route`.

        ``method`` says how they were planned (it heads each route's reason).
        Returns why each route was chosen, in order.
        """
        self.last_plan = tuple(routes)
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
        return tuple(reasons)
