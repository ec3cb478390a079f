"""The trainer's side of stage skipping: the path scheduler fed with the live swarm.

With ``routing.skip_ratio > 0`` a trainer routes every microbatch with
:class:`swarmrt.routing.policies.SkipScheduler`, the same code the simulator
runs. This module keeps the scheduler's :class:`~swarmrt.routing.peer_table.PeerTable`
current from what the trainer sees:

- membership: the ``serving`` peers of the last DHT refresh, minus the peers
  the trainer has banned (a peer that leaves, dies or is banned is removed
  from the table and forgotten by the scheduler's forecast);
- compute times: each peer announces its measured throughput (samples/s of
  forward + backward, an EMA taken on the peer, queueing excluded). One
  microbatch then takes ``microbatch_size / throughput`` seconds, split 1:2
  between forward and backward (a backward costs about two forwards). A peer
  that has not measured itself yet gets the fastest figure of its stage (of
  the swarm, if its stage has none): optimistic, as SWARM's router is, so a
  new peer is tried at once;
- load: the requests in flight each peer announces;
- links: every activation goes peer -> trainer -> next peer (the trainer
  relays it), so every link costs the same: what one forward RPC takes
  beyond the peer's compute (the request in, the response out). The trainer
  measures it as the smallest such overhead of each step (the smallest
  leaves queueing at busy peers out), smoothed.

Balance: the scheduler keeps every middle stage within 10% of the mean over a
window of microbatches. The window is the smallest whole number of steps over
which the middle stages can be visited exactly equally
(:func:`balance_window`); a new window opens every that many steps.
"""

from __future__ import annotations

import math
import random
from typing import Collection, Iterable

from swarmrt.config import RunConfig
from swarmrt.routing.links import FunctionLinks
from swarmrt.routing.paths import PathRules, Route
from swarmrt.routing.peer_table import PeerTable
from swarmrt.routing.policies import Policy, make_policy
from swarmrt.discovery.records import StageRecord

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


class SkipRouting:
    """A path scheduler and the peer table it reads, kept in step with the trainer's view of the swarm."""

    def __init__(self, config: RunConfig, policy: str = "swarmrt"):
        self.config = config
        self.rules = PathRules(stages=config.num_stages, skip_ratio=config.routing.skip_ratio)
        self.transfer_s = INITIAL_TRANSFER_S
        self.table = PeerTable(config.num_stages, FunctionLinks(lambda src, dst: self.transfer_s))
        self.scheduler: Policy = make_policy(policy, self.rules, self.table)
        mps = config.data.microbatches_per_step
        self.window = balance_window(mps, len(self.rules.middle_stages), self.rules.middle_visits)
        self.window_steps = self.window // mps
        # Peers do not refuse work when their kept contexts are full (they evict the oldest and
        # recompute on backward), so memory is no hard limit here: room for a whole window.
        self.memory = max(1, self.window)
        self._step_overheads: list[float] = []

    # -- the live swarm ----------------------------------------------------------------------
    def sync(self, records: Iterable[StageRecord], banned: Collection[str]) -> None:
        """Make the table hold exactly the serving, unbanned peers of ``records`` with their figures."""
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
            if r.peer_id not in self.table or self._differs(r, forward, backward):
                self.table.upsert(r.peer_id, r.stage, forward, backward, self.memory)
            self.table.set_in_flight(r.peer_id, r.load)

    def _differs(self, r: StageRecord, forward: float, backward: float) -> bool:
        info = self.table.get(r.peer_id)
        return info.stage != r.stage or not (math.isclose(info.forward_s, forward, rel_tol=1e-6)
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
        """Open a new balance window on the first step of each window."""
        if step % self.window_steps == 0:
            self.scheduler.begin_iteration({None: self.window}, now, rng)

    def route(self, now: float, rng: random.Random, microbatch: int) -> tuple[Route | None, str]:
        """A route for a new microbatch (the scheduler picks the stage-0 peer too), and why."""
        return self.scheduler.route(None, now, rng, microbatch=microbatch)

    def replan(self, route: Route, position: int, dead: Collection[str], now: float,
               rng: random.Random) -> tuple[Route | None, str]:
        """The rest of ``route`` from hop ``position`` on, around ``dead`` peers (None: restart it)."""
        return self.scheduler.replan(route, position, dead, now, rng)

    def finished(self, route: Route) -> None:
        self.scheduler.finished(route)

    def aborted(self, route: Route) -> None:
        self.scheduler.aborted(route)
