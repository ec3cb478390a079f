"""The trainer's route source: a routing policy fed with the live swarm.

Every microbatch a trainer runs (training, evaluation, with or without stage
skipping) follows a route from a :class:`LiveRouting`: a policy of
:mod:`swarmrt.routing.policies`, the same objects the simulator runs, over a
:class:`~swarmrt.routing.peer_table.PeerTable` this module keeps current:

- ``routing.skip_ratio == 0``: the full SWARM pipeline, ``make_policy("swarm")``
  (every stage, each peer drawn by SWARM's weighted rule). SWARM picks a
  stage's peer when the activation for it is ready, with the load as it is
  then; so this source re-picks the rest of the route at every hop
  (:meth:`LiveRouting.repick`: ``replan`` with the current table), and the
  peer a hop uses is always drawn with current load, never the one guessed
  when the microbatch started.
- ``routing.skip_ratio > 0``: swarmrt's path scheduler,
  ``make_policy("swarmrt")`` (:class:`~swarmrt.routing.policies.SkipScheduler`).
  It forecasts whole routes (which stages, which peers) when a microbatch
  starts, so its routes are kept as planned; only a failed hop re-plans.
- evaluation (``stages``: a subset that starts with stage 0 and ends with the
  last): the SWARM policy over routes through those stages only
  (:meth:`LiveRouting.route`); re-picking keeps a route's stages.

What the table holds:

- membership: the ``serving`` peers of the last DHT refresh, minus the peers
  the trainer has banned (a peer that leaves, dies or is banned is removed
  from the table and forgotten by the scheduler's forecast);
- compute times: each peer's throughput (samples/s of forward + backward) as
  the trainer measured it from its own calls (``swarmrt.roles.checks``; what a
  peer announces about itself is not trusted) is what :meth:`LiveRouting.sync`
  is given in the records' ``throughput``. One
  microbatch then takes ``microbatch_size / throughput`` seconds, split 1:2
  between forward and backward (a backward costs about two forwards). A peer
  that has not measured itself yet gets the fastest figure of its stage (of
  the swarm, if its stage has none): optimistic, as SWARM's router is, so a
  new peer is tried at once;
- load: the requests in flight each peer announces, plus this trainer's own
  requests to it (``own_load`` of :meth:`LiveRouting.sync`; the announced
  figure lags by a heartbeat);
- links: every activation goes peer -> trainer -> next peer (the trainer
  relays it), so every link costs the same: what one forward RPC takes
  beyond the peer's compute (the request in, the response out). The trainer
  measures it as the smallest such overhead of each step (the smallest
  leaves queueing at busy peers out), smoothed.

Balance: the scheduler keeps every middle stage within 10% of the mean over a
window of microbatches. The window is the smallest whole number of steps over
which the middle stages can be visited exactly equally
(:func:`balance_window`); a new window opens every that many steps.

Planning (skip scheduler, given a ``plan_window``): at the start of each
window the whole window is planned ahead by the same planner ``swarmrt plan``
and the simulator use. Routing never imports the simulator, so the planning
function is handed in: the trainer passes
:func:`swarmrt.sim.live_plan.plan_window`, which turns the live table into a
scenario (the adapter; no separate forecast), plans it there and hands the
routes, in live peer ids, to the scheduler (``serve_plan``), whose ``route``
calls then serve them; a planned peer that died is routed around as usual,
and microbatches past the plan are routed online.
Off by default (``[routing] plan_ahead``): the planner's best plans give each origin one route shape
for a run of microbatches (what makes them fast), and with a single stage-0
peer that sends a window's first half through one set of middle stages and
its second half through another; on the 12-step unit test of a tiny model
(tests/unit/test_skip_runtime.py) that left the last step's loss above the
first's, where per-microbatch routing mixes the stage sets.
"""

from __future__ import annotations

import math
import random
from typing import Callable, Collection, Iterable, Mapping, Sequence

from swarmrt.config import RunConfig
from swarmrt.routing.links import FunctionLinks
from swarmrt.routing.paths import PathRules, Route
from swarmrt.routing.peer_table import PeerTable
from swarmrt.routing.policies import Policy, SchedulerConfig, make_policy

from swarmrt.discovery.records import StageRecord
from swarmrt.routing.policies import SkipScheduler

FORWARD_SHARE = 1.0 / 3.0
"""Share of a microbatch's forward + backward time spent in the forward pass."""
NOMINAL_MICROBATCH_S = 0.05
"""Seconds of forward + backward assumed when no peer of the swarm has measured itself yet."""
INITIAL_TRANSFER_S = 0.002
"""Seconds of one activation transfer assumed before the first measurement (loopback-class)."""


def balance_window(microbatches_per_step: int, middle_stages: int, middle_visits: int) -> int:
    """The smallest multiple of ``microbatches_per_step`` over which ``middle_stages`` stages can each
    get exactly the same number of the ``window x middle_visits`` middle visits."""
    if middle_stages <= 0 or middle_visits <= 0:
        return microbatches_per_step
    steps = middle_stages // math.gcd(microbatches_per_step * middle_visits, middle_stages)
    return microbatches_per_step * steps


def microbatch_seconds(throughput: float, microbatch_size: int) -> float | None:
    """Forward + backward seconds of one microbatch at ``throughput`` samples/s (None: not measured)."""
    if not throughput or throughput <= 0 or not math.isfinite(throughput):
        return None
    return microbatch_size / throughput


PICK_PER_HOP = frozenset({"swarm"})
"""Policies whose peers are drawn when each hop's activation is ready (re-picked at every hop)."""


def default_policy(config: RunConfig) -> str:
    """The policy a trainer routes with: the skip scheduler when skipping, else SWARM's wiring."""
    return "swarmrt" if config.routing.skip_ratio > 0 else "swarm"


class _OneStage:
    """The route source of a one-stage "pipeline" (no PathRules: they need 2 stages): each
    microbatch goes to the least loaded peer of stage 0, ties broken by ``rng``."""

    name = "one-stage"

    def __init__(self, table: PeerTable):
        self.table = table

    def begin_iteration(self, microbatches, now: float, rng: random.Random) -> None:
        pass

    def route(self, origin, now: float, rng: random.Random, microbatch: int = -1) -> tuple[Route | None, str]:
        ids = self.table.peers_of(0) if origin is None else [origin]
        if not ids:
            return None, "stage 0 has no live peer"
        best = min(ids, key=lambda p: (self.table.in_flight(p), rng.random()))
        return Route(origin=best, hops=((0, best),), microbatch=microbatch), f"least loaded of {len(ids)}"

    def replan(self, route: Route, position: int, dead, now: float, rng: random.Random) -> tuple[Route | None, str]:
        return None, "a one-stage route has no hop after its origin"

    def finished(self, route: Route) -> None:
        pass

    def aborted(self, route: Route) -> None:
        pass

    def forget_peer(self, peer) -> None:
        pass


class LiveRouting:
    """A routing policy and the peer table it reads, kept in step with the trainer's view of the swarm.

    ``policy``: a name for :func:`~swarmrt.routing.policies.make_policy`
    (default :func:`default_policy`); ``plan_window``: plans each balance
    window ahead (module docstring). Pure: ``now`` and ``rng`` are arguments.
    """

    def __init__(self, config: RunConfig, policy: str | None = None,
                 plan_window: Callable[[SkipScheduler, int, float, random.Random], tuple] | None = None):
        self.config = config
        self.plan_window = plan_window
        """Plans a balance window ahead (skip scheduler only; module docstring): ``plan_window(scheduler,
        window, now, rng) -> (routes, how)``, e.g. :func:`swarmrt.sim.live_plan.plan_window`."""
        self.policy = policy or default_policy(config)
        self.pick_per_hop = self.policy in PICK_PER_HOP
        """True: peers are re-drawn at every hop (:meth:`repick`); False: routes are kept as planned."""
        self.transfer_s = INITIAL_TRANSFER_S
        self.table = PeerTable(config.num_stages, FunctionLinks(lambda src, dst: self.transfer_s))
        if config.num_stages == 1:
            self.rules = None
            self.scheduler = _OneStage(self.table)
            self.window = config.data.microbatches_per_step
        else:
            self.rules = PathRules(stages=config.num_stages, skip_ratio=config.routing.skip_ratio)
            # the trainer re-draws each hop's peer with current in-flight figures (see repick)
            self.scheduler: Policy = make_policy(self.policy, self.rules, self.table,
                                                 SchedulerConfig(routes_ahead=not self.pick_per_hop))
            self.window = balance_window(config.data.microbatches_per_step, len(self.rules.middle_stages),
                                         self.rules.middle_visits)
        mps = config.data.microbatches_per_step
        self.window_steps = self.window // mps
        # Peers do not refuse work when their kept contexts are full (they evict the oldest and
        # recompute on backward), so memory is no hard limit here: room for a whole window.
        self.memory = max(1, self.window)
        self._step_overheads: list[float] = []
        self._announced: dict[str, int] = {}
        """The load each peer of the table announced, as of the last :meth:`sync`."""
        self.last_plan = ""
        """How the last window was planned (skip scheduler), or why it was not."""

    # -- the live swarm ----------------------------------------------------------------------
    def sync(self, records: Iterable[StageRecord], banned: Collection[str],
             own_load: Mapping[str, int] | None = None) -> None:
        """Make the table hold exactly the serving, unbanned peers of ``records`` with their figures.

        A peer's load is what it announced plus ``own_load`` (this trainer's requests in flight to it).
        """
        own_load = own_load or {}
        live = {r.peer_id: r for r in records if r.state == "serving" and r.peer_id not in banned}
        for info in list(self.table):
            if info.peer not in live:
                self.table.remove(info.peer)
                self.scheduler.forget_peer(info.peer)
        size = self.config.data.microbatch_size
        measured: dict[int, list[float]] = {}
        for r in live.values():
            seconds = microbatch_seconds(r.throughput, size)
            if seconds is not None:
                measured.setdefault(r.stage, []).append(seconds)
        everyone = [s for per_stage in measured.values() for s in per_stage]
        fallback = min(everyone) if everyone else NOMINAL_MICROBATCH_S
        for r in live.values():
            seconds = microbatch_seconds(r.throughput, size) or min(measured.get(r.stage, [fallback]))
            forward, backward = seconds * FORWARD_SHARE, seconds * (1.0 - FORWARD_SHARE)
            own_figure = microbatch_seconds(r.throughput, size) is not None  # else a stand-in
            if r.peer_id not in self.table or self._differs(r, forward, backward, own_figure):
                self.table.upsert(r.peer_id, r.stage, forward, backward, self.memory, measured=own_figure)
            self.table.set_in_flight(r.peer_id, r.load + own_load.get(r.peer_id, 0))
        self._announced = {r.peer_id: r.load for r in live.values()}

    def set_own_load(self, own_load: Mapping[str, int]) -> None:
        """This trainer's requests in flight changed (nothing else did): each peer's in-flight figure
        becomes its announced load (as of the last :meth:`sync`) plus ``own_load``. What a hop
        re-draw needs, without re-reading the whole view."""
        for peer, own in own_load.items():
            if peer in self.table:
                self.table.set_in_flight(peer, self._announced.get(peer, 0) + own)

    def _differs(self, r: StageRecord, forward: float, backward: float, measured: bool) -> bool:
        info = self.table.get(r.peer_id)
        return info.stage != r.stage or info.measured != measured or not (math.isclose(info.forward_s, forward, rel_tol=1e-6)
                                             and math.isclose(info.backward_s, backward, rel_tol=1e-6))

    def observe_hop(self, peer: str, rpc_s: float) -> None:
        """A forward RPC to ``peer`` took ``rpc_s`` seconds, from request to response."""
        if peer in self.table:
            self._step_overheads.append(max(0.0, rpc_s - self.table.get(peer).forward_s))

    def end_step(self) -> None:
        """Fold the step's smallest transfer estimate into the link model (EMA)."""
        if self._step_overheads:
            self.transfer_s = 0.7 * self.transfer_s + 0.3 * min(self._step_overheads)
            self._step_overheads.clear()

    # -- routing -----------------------------------------------------------------------------
    def begin_step(self, step: int, now: float, rng: random.Random) -> None:
        """Open a new balance window on the first step of each window (given a ``plan_window``, and plan it
        with it; if planning fails the window is routed online)."""
        if step % self.window_steps == 0:
            self.scheduler.begin_iteration({None: self.window}, now, rng)
            if self.plan_window is not None and isinstance(self.scheduler, SkipScheduler) and self.table.peers_of(0):
                try:
                    _, self.last_plan = self.plan_window(self.scheduler, self.window, now, rng)
                except (RuntimeError, ValueError) as e:  # e.g. a stage has no live peer: route online
                    self.scheduler.begin_iteration({None: self.window}, now, rng)
                    self.last_plan = f"not planned ({e})"

    def route(self, now: float, rng: random.Random, microbatch: int, avoid: Collection[str] = (),
              stages: Sequence[int] | None = None) -> tuple[Route | None, str]:
        """A route for a new microbatch, its stage-0 peer included, and why.

        ``avoid``: stage-0 peers that already failed this microbatch, not
        chosen as origin while stage 0 has another peer (:meth:`_origin`;
        every stage-0 peer failed: they are tried again). Under SWARM's
        policy the origin is drawn by SWARM's weighted rule, like every other
        hop's peer. ``stages``: visit only these (a subset that
        starts with stage 0 and ends with the last: evaluation), see
        :meth:`_subset_route`.
        """
        if stages is not None and tuple(stages) != tuple(range(self.config.num_stages)):
            return self._subset_route(tuple(stages), now, rng, microbatch, avoid)
        if self.pick_per_hop:  # SWARM: the origin too is drawn by the weighted rule
            origin, why = self._origin(avoid, now, rng)
            if origin is None:
                return None, why
            route, reason = self.scheduler.route(origin, now, rng, microbatch=microbatch)
            return route, f"origin {origin} ({why}); {reason}"
        route, why = self.scheduler.route(None, now, rng, microbatch=microbatch)
        if route is not None and route.origin in avoid:
            origin, reason = self._origin(avoid, now, rng)
            if origin is not None and origin not in avoid:
                self.scheduler.aborted(route)
                route, why = self.scheduler.route(origin, now, rng, microbatch=microbatch)
                why = f"origin {origin} ({reason}); {why}"
        return route, why

    def _origin(self, avoid: Collection[str], now: float, rng: random.Random) -> tuple[str | None, str]:
        """A stage-0 peer not in ``avoid`` (every one in it: any), and why: drawn by SWARM's rule
        (:func:`~swarmrt.routing.wiring.choose_peer`, throughput / (1 + load)) for a
        :data:`PICK_PER_HOP` policy, else the least loaded (ties by ``rng``)."""
        peers = [p for p in self.table.peers_of(0) if p not in avoid] or list(self.table.peers_of(0))
        if not peers:
            return None, "stage 0 has no live peer"
        if not self.pick_per_hop:
            best = min(peers, key=lambda p: (self.table.in_flight(p), rng.random()))
            return best, f"least loaded of {len(peers)} stage-0 peers not yet failed"
        exclude = set(self.table.peers_of(0)) - set(peers)
        return self.scheduler.choose_origin(now, rng, exclude=exclude)

    def _subset_route(self, stages: tuple[int, ...], now: float, rng: random.Random, microbatch: int,
                      avoid: Collection[str]) -> tuple[Route | None, str]:
        """A route through ``stages`` only: an origin by :meth:`_origin`, the peers of the other stages
        chosen by the policy (its ``replan`` from hop 1 keeps a route's stages). Stages left out need
        no live peer."""
        missing = [s for s in stages if not self.table.peers_of(s)]
        if missing:
            return None, f"stage {missing[0]} has no live peer"
        origin, _ = self._origin(avoid, now, rng)
        sketch = Route(origin=origin, hops=tuple((s, origin) for s in stages), microbatch=microbatch)
        route, why = self.scheduler.replan(sketch, 1, (), now, rng)
        return route, f"stages {', '.join(map(str, stages))} from origin {origin}: {why}"

    def repick(self, route: Route, position: int, dead: Collection[str], now: float,
               rng: random.Random) -> tuple[Route, str]:
        """``route`` with the peers of hops ``position..`` drawn again now (a :data:`PICK_PER_HOP` policy), else
        unchanged. Keeps the route when no re-pick is possible (e.g. a done hop's peer has left: its
        forward is done, the trainer holds the activation)."""
        if not self.pick_per_hop or position == 0:
            return route, "kept"
        new, why = self.scheduler.replan(route, position, dead, now, rng)
        return (new, why) if new is not None else (route, f"kept ({why})")

    def replan(self, route: Route, position: int, dead: Collection[str], now: float,
               rng: random.Random) -> tuple[Route | None, str]:
        """The rest of ``route`` from hop ``position`` on, around ``dead`` peers (None: restart it).

        When that is impossible because every live peer of the stage at
        ``position`` is dead (failed this microbatch once), they are tried
        again: a stage's only peer may have failed for a moment.
        """
        new, why = self.scheduler.replan(route, position, dead, now, rng)
        stage_peers = set(self.table.peers_of(route.hops[position].stage)) if position < len(route.hops) else set()
        if new is None and stage_peers and stage_peers <= set(dead):
            new, why = self.scheduler.replan(route, position, set(dead) - stage_peers, now, rng)
            why = f"every peer of stage {route.hops[position].stage} failed once, trying them again: {why}"
        return new, why

    def finished(self, route: Route) -> None:
        self.scheduler.finished(route)

    def aborted(self, route: Route) -> None:
        self.scheduler.aborted(route)
