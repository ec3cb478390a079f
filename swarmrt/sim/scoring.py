"""Scoring whole plans by simulating them: the planner's evaluator and what it tells the repair.

:class:`PlanEvaluator` scores a plan (one route per microbatch) by
simulating one iteration of exactly those routes (:class:`ReplayPolicy`, no
failures) in :mod:`swarmrt.sim.simulator`. Its score is the mean iteration
time over the exact run and ``draws`` runs under seeded compute noise
(every task takes its time x exp(N(0, ``jitter``)), seeds 1..draws): a plan
tuned to the exact order of simultaneous events loses that edge under a
little noise, so the planner prefers plans that hold up. The exact run also
gives what :mod:`swarmrt.sim.repair` needs (:class:`PlanTrace`): when each
microbatch of the plan finished, and every wait of one of its tasks at a
busy node (where, from when to when, behind which microbatch).

This module runs the simulator through a function it is handed
(:func:`swarmrt.sim.simulator.plan_evaluator` passes it), so it does not
import the simulator and the simulator can use it. Pure.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Hashable, Mapping, Sequence

from swarmrt.routing.paths import Route
from swarmrt.routing.peer_table import PeerTable
from swarmrt.routing.policy import Policy

PeerId = Hashable


class ReplayPolicy(Policy):
    """Serves given routes, origin by origin in their order (to score a plan by simulating it).

    ``plan_index[mb]``: the index in the given routes of the route served to the simulator's microbatch ``mb``.
    """

    name = "replay"
    skips = True
    reads_load = False  # it serves fixed routes: the simulator need not keep in-flight figures for it

    def __init__(self, rules, table: PeerTable, routes: Sequence[Route]) -> None:
        super().__init__(rules, table)
        self._queues: dict = collections.defaultdict(collections.deque)
        for i, r in enumerate(routes):
            self._queues[r.origin].append((i, r))
        self._counts = {o: len(q) for o, q in self._queues.items()}
        self.plan_index: dict[int, int] = {}

    def deal(self, microbatches):
        return dict(self._counts)

    def _route(self, origin, now, rng, mb):
        queue = self._queues.get(origin)
        if not queue:
            return None, f"no more routes for origin {origin!r}"
        i, planned = queue.popleft()
        r = dataclasses.replace(planned, microbatch=mb)
        self.plan_index[mb] = i
        return self._register(r, r.middle_stages(self.rules)), "replayed"


@dataclasses.dataclass(frozen=True)
class Wait:
    """A task of a microbatch that arrived at a busy node and waited there."""

    seconds: float
    """How long it waited."""
    node: PeerId
    """Where."""
    start: float
    """When it arrived (the window starts)."""
    end: float
    """When it started (the window ends)."""
    blocker: int | None
    """The plan index of the microbatch whose task held the node when it arrived (None: unknown)."""


@dataclasses.dataclass(frozen=True)
class PlanTrace:
    """What the exact replay of a plan showed, by plan index."""

    finish: Mapping[int, float]
    """When each microbatch's last backward ended (seconds from the plan's start)."""
    waits: Mapping[int, tuple[Wait, ...]]
    """Each microbatch's waits at busy nodes, longest first."""
    busy: Mapping[PeerId, tuple[tuple[float, float], ...]] = dataclasses.field(default_factory=dict)
    """Each node's compute intervals ``(start, end)``."""


NOISY_UP_TO = 400
"""Largest plan (microbatches) scored with noisy draws besides the exact run."""
ReplayOnce = Callable[[Sequence[Route], float, int, bool], tuple[float, dict, dict, dict, dict]]
"""``(routes, jitter, seed, trace)`` -> (seconds, finish_by_origin, finished, plan_index, busy): one simulated
iteration of ``routes`` (see :func:`swarmrt.sim.simulator.plan_evaluator`); ``finished``: the simulator's
microbatch id -> (completion time, waits) when ``trace``; ``plan_index``: microbatch id -> route index;
``busy``: node -> its compute intervals when ``trace``."""


class PlanEvaluator:
    """Scores a plan by simulating it: the mean seconds of the exact run and ``draws`` noisy runs.

    After each call: ``exact_s`` (the exact run's seconds: what the plan
    takes if every figure is right), ``finish_by_origin`` (origin -> when
    its last microbatch finished, exact run; see
    :data:`swarmrt.sim.planner.Evaluator`) and ``trace`` (a
    :class:`PlanTrace` of the exact run). ``runs`` is how many simulations
    :meth:`runs_for` says how many simulations one call makes (the planner
    counts its work with it): the noisy draws are made for plans of up to
    :data:`NOISY_UP_TO` microbatches (a larger plan averages over many
    microbatches already, and each run costs in proportion to its size).
    The trace is made only when asked for (:attr:`trace`, :meth:`trace_of`):
    recording waits costs a fifth of a run, and a planner needs the trace of
    few of the plans it scores.
    """

    def __init__(self, replay_once: ReplayOnce, jitter: float = 0.0, draws: int = 2, start_s: float = 0.0) -> None:
        if not jitter >= 0:
            raise ValueError(f"PlanEvaluator jitter must be >= 0, got {jitter!r}")
        if not isinstance(draws, int) or draws < 0:
            raise ValueError(f"PlanEvaluator draws must be an integer >= 0, got {draws!r}")
        self._replay_once = replay_once
        self.jitter = jitter
        self.draws = draws if jitter > 0 else 0
        self.start_s = start_s
        self.exact_s = 0.0
        self.finish_by_origin: dict = {}
        self._trace = PlanTrace({}, {})
        self._untraced: list[Route] | None = None

    def runs_for(self, microbatches: int) -> int:
        """Simulations one call makes for a plan of ``microbatches`` routes."""
        return 1 + (self.draws if microbatches <= NOISY_UP_TO else 0)

    def __call__(self, routes: Sequence[Route]) -> float:
        seconds, by_origin, _, _, _ = self._replay_once(routes, 0.0, 0, False)
        self.exact_s = seconds
        self.finish_by_origin = by_origin
        self._untraced = list(routes)
        total = seconds
        runs = self.runs_for(len(routes))
        for seed in range(1, runs):
            total += self._replay_once(routes, self.jitter, seed, False)[0]
        return total / runs

    @property
    def trace(self) -> PlanTrace:
        """The :class:`PlanTrace` of the exact run of the plan scored last (traced on first asking)."""
        if self._untraced is not None:
            self._trace = self.trace_of(self._untraced)
            self._untraced = None
        return self._trace

    def trace_of(self, routes: Sequence[Route]) -> PlanTrace:
        """A :class:`PlanTrace` of the exact run of ``routes`` (one more simulation, with waits recorded;
        the same run as the exact one :meth:`__call__` makes, so the same figures)."""
        _, _, finished, index, busy = self._replay_once(routes, 0.0, 0, True)
        finish, waits = {}, {}
        for mb, (t, mb_waits) in finished.items():
            i = index[mb]
            finish[i] = t - self.start_s
            waits[i] = tuple(sorted((Wait(w, node, a - self.start_s, s - self.start_s, index.get(b))
                                     for w, node, a, s, b in mb_waits), key=lambda w: (-w.seconds, w.start)))
        shift = self.start_s
        return PlanTrace(finish, waits, {n: tuple((a - shift, b - shift) for a, b in iv) for n, iv in busy.items()})
