"""How a live peer takes part in organizing the swarm: where it joins, and when it moves.

The decisions are :mod:`swarmrt.routing.rebalance` (pure, the same code as
``swarmrt simulate --rebalance``); this module reads the swarm from the DHT,
hands the policy what it read, and announces what this peer is about to do, so
that other peers deciding at the same moment take it into account.

Joining (:meth:`Organizer.choose_stage`): a peer started without ``--stage``
reads every stage and every join intent, asks :func:`plan_joins` where it
belongs, announces that intent, waits a seeded random time (up to
``rebalance.join_settle_s``), reads again and re-plans, until two reads in a
row give the same placement from the same picture of the other peers; it then
marks its intent settled, and later joiners place themselves around it. Every
joiner places all the unsettled joiners it sees in the same order (by peer
id), so peers started in the same second spread over the stages instead of
all taking the emptiest one. A pinned peer (``--stage``)
announces its intent too, so that the others count it.

Moving (:meth:`Organizer.check`): on every heartbeat when some stage has no
peer, else every ``rebalance.period_s``, the peer plans the swarm's moves with
:func:`plan_moves`. If it is named, it announces ``moving`` and, after a seeded
settle time, re-reads the swarm: when another peer claims a move from the same
stage or to the same stage, the lower peer id keeps its move and the other
withdraws (:func:`move_conflicts`). The peer role then drains, loads the new
stage's state and serves it (:meth:`swarmrt.roles.peer.Peer.move`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from typing import Awaitable, Callable, Sequence

from hivemind.utils import get_dht_time

from swarmrt.config import RunConfig
from swarmrt.discovery import dht as dht_records
from swarmrt.discovery.records import JoinIntent, swarm_view
from swarmrt.routing.paths import PathRules
from swarmrt.routing.rebalance import MOVING, SERVING, Move, PeerState, plan_joins, plan_moves, stage_capacity

logger = logging.getLogger("swarmrt.organizer")

MAX_JOIN_ROUNDS = 8
"""A joiner stops re-planning after this many reads, and goes where the last plan put it
(the rebalancer corrects what a join got wrong)."""


def stage_demand(config: RunConfig) -> list[float]:
    """Share of microbatches that visit each stage: 1 for a full pipeline; with SkipPipe, a middle
    stage is visited by (visited - 2) of its (S - 2) middle stages' worth of routes."""
    S = config.num_stages
    if config.routing.skip_ratio <= 0 or S < 3:
        return [1.0] * S
    visited = PathRules(stages=S, skip_ratio=config.routing.skip_ratio).visited
    middle = max(visited - 2, 1) / (S - 2)
    return [1.0] + [middle] * (S - 2) + [1.0]


def move_conflicts(view: Sequence[PeerState], move: Move) -> list[str]:
    """Peers other than the mover that are moving from ``move.source`` or to ``move.target``, with
    a lower peer id: each of them wins over this move."""
    return sorted(p.peer_id for p in view
                  if p.state == MOVING and p.peer_id != move.peer_id and p.peer_id < move.peer_id
                  and (p.stage == move.source or p.target == move.target))


class Organizer:
    """This peer's side of joining and rebalancing; one per peer process."""

    def __init__(self, dht, config: RunConfig, peer_id: str, pinned: bool,
                 clock: Callable[[], float] = get_dht_time, rng: random.Random | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self.dht, self.config, self.peer_id, self.pinned = dht, config, peer_id, pinned
        self.section = config.rebalance
        self.rules = config.rebalance.rules()
        self.demand = stage_demand(config)
        self.clock, self.sleep = clock, sleep
        self.rng = rng or random.Random(peer_id)
        self._intent: int | None = None
        self._settled = False
        self._keepalive: asyncio.Task | None = None
        self._last_plan = float("-inf")
        self._empty_since: dict[int, float] = {}
        self.last_view: list[PeerState] = []

    # -- reading and announcing ------------------------------------------------------------------
    async def read_view(self) -> list[PeerState]:
        """Every peer of the run as the policy sees it (newest announcement of each)."""
        records, intents = await asyncio.to_thread(dht_records.read_swarm, self.dht, self.config.run.id,
                                                   self.config.num_stages)
        self.last_view = swarm_view(records, intents, self.config.num_stages)
        return self.last_view

    async def announce_intent(self, stage: int, settled: bool = True) -> None:
        """Announce that this peer is on its way to ``stage`` (``settled``: its choice is made), and
        keep announcing it (every heartbeat) until :meth:`arrived`."""
        self._intent, self._settled = stage, settled
        try:
            await self._announce_intent()
        except Exception as e:  # a slow DHT store: the keepalive below announces it again
            logger.warning("could not announce the join intent: %s", e or type(e).__name__)
        if self._keepalive is None:
            self._keepalive = asyncio.create_task(self._keep_announcing())

    async def _announce_intent(self) -> None:
        if self._intent is None:
            return
        intent = JoinIntent(self.peer_id, self._intent, self.pinned, self._settled, self.clock())
        await asyncio.to_thread(dht_records.announce_joining, self.dht, self.config.run.id, intent,
                                self.config.network.record_ttl_s)

    async def _keep_announcing(self) -> None:
        while self._intent is not None:
            await self.sleep(self.config.network.heartbeat_s)
            try:
                await self._announce_intent()
            except Exception as e:  # the next beat may pass
                logger.warning("could not announce the join intent: %s", e)

    def arrived(self) -> None:
        """Stop announcing the intent: the peer serves (its stage record supersedes the intent)."""
        self._intent = None
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None

    # -- joining ---------------------------------------------------------------------------------
    async def choose_stage(self) -> tuple[int, str]:
        """Where this (unpinned) peer joins: ``(stage, reason)``. See the module docstring."""
        me = PeerState(self.peer_id, 0, "joining")
        placed, reason, seen = None, "", None
        for round_ in range(MAX_JOIN_ROUNDS):
            view = [p for p in await self.read_view() if p.peer_id != self.peer_id]
            if placed is not None:
                me = PeerState(self.peer_id, placed, "joining")
            stage, reason = plan_joins([*view, me], self.config.num_stages, self.demand)[self.peer_id]
            # settled: the same place from the same picture of the others, twice in a row (a joiner
            # whose intent had not reached us yet changes the picture)
            picture = sorted((p.peer_id, p.serving_stage) for p in view)
            if stage == placed and picture == seen:
                await self.announce_intent(stage, settled=True)
                return stage, f"{reason} (settled after {round_ + 1} reads)"
            placed, seen = stage, picture
            await self.announce_intent(stage, settled=False)
            await self.sleep(self.section.join_settle_s * (0.5 + 0.5 * self.rng.random()))
        await self.announce_intent(placed, settled=True)
        return placed, f"{reason} (not settled after {MAX_JOIN_ROUNDS} reads)"

    # -- moving ----------------------------------------------------------------------------------
    async def check(self) -> Move | None:
        """The move this peer should make now, if the policy names it; None otherwise.

        Plans on every call while some stage has no peer, else at most every ``period_s``. A stage
        must look empty for ``network.record_ttl_s`` before it is refilled: a peer whose heartbeat
        is late, or whose record has not reached this node yet, is not a departure.
        """
        if self.pinned or not self.section.enabled:
            return None
        now = self.clock()
        view = await self.read_view()
        caps = stage_capacity(view, self.config.num_stages)
        empty = {s for s, c in enumerate(caps) if c <= 0}
        self._empty_since = {s: self._empty_since.get(s, now) for s in empty}
        if empty:
            if now - min(self._empty_since.values()) < self.config.network.record_ttl_s:
                return None
        elif now - self._last_plan < self.section.period_s:
            return None
        self._last_plan = now
        moves, why = plan_moves(view, self.config.num_stages, now, self.rules, self.demand)
        logger.info("rebalance plan: %s", why)
        return next((m for m in moves if m.peer_id == self.peer_id), None)

    async def confirm(self, move: Move) -> tuple[bool, str]:
        """After announcing ``moving``: wait a seeded settle time, re-read, and keep the move only if
        no peer with a lower id claims a move from the same stage or to the same stage, and the
        plan on the fresh read (this peer counted as serving where it is) still names it."""
        await self.sleep(self.section.join_settle_s * (0.5 + 0.5 * self.rng.random()))
        view = await self.read_view()
        rivals = move_conflicts(view, move)
        if rivals:
            return False, f"withdrawn: {rivals[0]} moves from stage {move.source} or to stage {move.target} first"
        as_before = [dataclasses.replace(p, state=SERVING, target=None) if p.peer_id == self.peer_id else p
                     for p in view]
        moves, why = plan_moves(as_before, self.config.num_stages, self.clock(), self.rules, self.demand)
        if not any(m.peer_id == self.peer_id and m.target == move.target for m in moves):
            return False, f"withdrawn: a fresh read no longer calls for it ({why})"
        return True, "confirmed"
