"""The routing policies, by name: which stages and which peers each microbatch visits.

Every policy is a :class:`~swarmrt.routing.policy.Policy` (the interface and
its usage are in :mod:`swarmrt.routing.policy`), made by :func:`make_policy`
and used the same way by the trainer (real runtime) and by the simulator.

- :class:`FullPipeline` (``full``): GPipe / DT-FM style, no skipping. ``P``
  disjoint pipelines of one peer per stage (``P`` = the smallest stage),
  built by greedy cheapest-link matching between consecutive stages; the
  iteration's microbatches are dealt evenly to the pipeline heads
  (:meth:`Policy.deal`), as SkipPipe ran its DT-FM baseline. Load-blind.
- :class:`SwarmWiring` (``swarm``): SWARM's stochastic wiring without
  skipping: at each stage a peer is drawn by the trainer's own rule,
  :func:`swarmrt.routing.wiring.choose_peer` (probability proportional to
  ``throughput / (1 + in-flight load)``, an unmeasured peer getting the
  best measured throughput).
- :class:`RandomSkip` (``random-skip``): skipping with uniformly random
  middle stages (among those that keep the balance rule reachable) and
  uniformly random peers.
- :class:`~swarmrt.routing.skip_scheduler.SkipScheduler` (``swarmrt``):
  swarmrt's earliest-finish-time scheduler under the balance and memory limits.

Planning a whole iteration ahead (the simulator, ``swarmrt plan``) is not a
policy's job: :mod:`swarmrt.sim.planner` does it with these objects.

Pure: the clock (``now``) and the random generator (``rng``) are arguments.
"""

from __future__ import annotations

import random
from typing import Collection, Hashable, Mapping

from swarmrt.routing.paths import PathRules, Route
from swarmrt.routing.peer_table import PeerTable
from swarmrt.routing.policy import Balance, Policy, SchedulerConfig
from swarmrt.routing.skip_scheduler import SkipScheduler
from swarmrt.routing.wiring import PeerView, choose_peer

__all__ = ["Balance", "FullPipeline", "POLICIES", "Policy", "RandomSkip", "SchedulerConfig", "SkipScheduler",
           "SwarmWiring", "make_policy"]

PeerId = Hashable


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
                q, _ = self._pick_peer(i + 1, (), now, rng)
                if q is None:
                    return None, f"stage {i + 1} has no live peer"
                chain[i] = q
                note = " (dead members replaced by the least loaded peers)"
        stages = tuple(range(1, self.rules.stages))
        middle = tuple(s for s in stages if s in self.rules.middle_stages)
        r = self.make_route(origin, chain, stages, mb)
        return self._register(r, middle), f"fixed pipeline {j}: {', '.join(map(str, chain))}{note}"


class SwarmWiring(Policy):
    """SWARM's stochastic wiring, no skipping: every stage's peer is drawn by the trainer's own rule.

    Each draw is :func:`swarmrt.routing.wiring.choose_peer` over :meth:`view`
    of the stage's live peers: probability proportional to ``throughput / (1 +
    load)``, an unmeasured peer getting the best measured throughput of the
    stage as an optimistic prior. Banned peers are not in the table (the
    trainer removes them); peers given as dead to :meth:`replan` are left out.
    """

    name = "swarm"
    skips = False

    def __init__(self, rules: PathRules, table: PeerTable, config: SchedulerConfig | None = None) -> None:
        super().__init__(rules, table, config)
        self._routed: dict[PeerId, int] = {}
        """This policy's microbatches routed through each peer (origins included) and not finished or aborted yet."""

    def view(self, peer: PeerId) -> PeerView:
        """What the wiring rule sees of a live peer.

        Throughput: microbatches per second of forward + backward, ``1 /
        (forward_s + backward_s)`` (None when the table's figures are a
        stand-in, :attr:`~swarmrt.routing.peer_table.PeerInfo.measured`).
        Load: the in-flight count the table holds (the trainer's: what the
        peer announced plus its own requests to it; the simulator's: what is
        queued at or held by the node). When whole routes are drawn ahead
        (:attr:`SchedulerConfig.routes_ahead`), this policy's own unfinished
        routes through the peer count too, as the larger of the two figures:
        the table already counts those of them that have reached the peer.
        """
        info = self.table.get(peer)
        throughput = 1.0 / (info.forward_s + info.backward_s) if info.measured else None
        load = self.table.in_flight(peer)
        if self.config.routes_ahead:
            load = max(load, self._routed.get(peer, 0))
        return PeerView(peer, throughput, load)

    def _pick_peer(self, stage: int, dead: Collection[PeerId], now: float,
                   rng: random.Random) -> tuple[PeerId | None, str]:
        views = [self.view(p) for p in self.table.peers_of(stage) if p not in dead]
        if not views:
            return None, f"stage {stage} has no live peer"
        chosen, why = choose_peer(views, None, now, rng)
        return chosen.peer_id, why

    def choose_origin(self, now: float, rng: random.Random,
                      exclude: Collection[PeerId] = ()) -> tuple[PeerId | None, str]:
        """The stage-0 peer a new microbatch starts on, drawn by the same rule as the peers of every
        other stage; ``exclude``: stage-0 peers that already failed this microbatch."""
        peer, why = self._pick_peer(0, exclude, now, rng)
        return peer, (f"origin: {why}" if peer is not None else why)

    def _route(self, origin: PeerId, now: float, rng: random.Random, mb: int) -> tuple[Route | None, str]:
        stages = tuple(range(1, self.rules.stages))
        peers, why = [], []
        for s in stages:
            p, w = self._pick_peer(s, (), now, rng)
            if p is None:
                return None, w
            peers.append(p)
            why.append(f"stage {s}: {w}")
        middle = tuple(s for s in stages if s in self.rules.middle_stages)
        r = self.make_route(origin, peers, stages, mb)
        self._count(r, +1)
        return self._register(r, middle), "SWARM wiring: " + "; ".join(why)

    def _count(self, route: Route, delta: int) -> None:
        """Change this policy's in-flight count of every peer of ``route`` (its origin once) by ``delta``."""
        for p in set(route.path):
            self._routed[p] = max(0, self._routed.get(p, 0) + delta)

    def finished(self, route: Route) -> None:
        entry = self._live.get(route.microbatch)
        super().finished(route)
        if entry is not None:
            self._count(entry[0], -1)

    def aborted(self, route: Route) -> None:
        entry = self._live.get(route.microbatch)
        super().aborted(route)
        if entry is not None:
            self._count(entry[0], -1)

    def replan(self, route: Route, position: int, dead: Collection[PeerId], now: float,
               rng: random.Random) -> tuple[Route | None, str]:
        old = self._live.get(route.microbatch)
        new, why = super().replan(route, position, dead, now, rng)
        if new is not None:
            if old is not None:
                self._count(old[0], -1)
            self._count(new, +1)
        return new, why


class RandomSkip(Policy):
    """Skipping with random middle stages (keeping balance reachable) and random peers."""

    name = "random-skip"

    def _pick_peer(self, stage: int, dead: Collection[PeerId], now: float,
                   rng: random.Random) -> tuple[PeerId | None, str]:
        ids = [p for p in self.table.peers_of(stage) if p not in dead]
        if not ids:
            return None, f"stage {stage} has no live peer"
        return rng.choice(ids), "uniform"

    def _route(self, origin: PeerId, now: float, rng: random.Random, mb: int) -> tuple[Route | None, str]:
        sets, note = self.stage_sets(rng)
        if not sets:
            return None, note
        middle = rng.choice(sets)
        stages = middle + self.tail()
        peers = []
        for s in stages:
            p, why = self._pick_peer(s, (), now, rng)
            if p is None:
                return None, why
            peers.append(p)
        r = self.make_route(origin, peers, stages, mb)
        return self._register(r, middle), (f"random stages {middle} of {len(sets)} allowed sets, "
                                           f"random peers {', '.join(map(str, peers))}" + (f"; {note}" if note else ""))

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
