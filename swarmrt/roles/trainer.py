"""The trainer: feeds data and drives every microbatch along a route from a route source.

One loop (:meth:`Trainer.run_microbatch`) runs every microbatch, for
training and for evaluation, with or without stage skipping:

1. a route from a :class:`~swarmrt.routing.live.LiveRouting` (the one
   wait-for-peers loop, :meth:`Trainer._wait_for`, waits while there is none);
2. forward hop by hop along it. Under SWARM's policy (``skip_ratio == 0``) the
   peer of each hop is drawn when its input is ready, with current load; the
   skip scheduler's routes (``skip_ratio > 0``) are kept as planned. A hop that
   fails (timeout, refused, reset, peer gone) is re-planned around the peers
   that failed this microbatch: the same stage on another peer when it has
   one (stage 0: another origin), else other stages (skipping); a peer that
   keeps failing is banned for a while;
3. the loss and its gradient here, then backward hop by hop in reverse along
   the peers the forward used (training; evaluation stops after the forward
   and keeps no context on the peers).

Exactly-once: a forward failure only restarts the forward pass (forwards have
no side effects). A backward hop is retried with the stage input attached, so
any peer of the stage can recompute and apply it; each stage that a
microbatch's route visited must acknowledge exactly one backward. The trainer
counts this (``Accounting``) and the run fails loudly if a stage was applied
twice.

The trainer is handed its collaborators: the stage client (anything with
:class:`~swarmrt.wire.client.StageCalls`' methods; tests pass
:class:`swarmrt.testing.inprocess.InProcessClient`), the clock, the random
generator and the DHT it reads the swarm from (None: the view given to
:meth:`Trainer.view_peers` is kept).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import math
import random
import sys
import time
import uuid
from typing import Callable, Collection, Sequence, TypeVar

import grpc
import torch

from swarmrt.config import RunConfig
from swarmrt.routing.paths import Route
from swarmrt.routing.wiring import BanList, PeerView, choose_peer
from swarmrt.data import Batches, loss_sum
from swarmrt.discovery import dht as dht_records
from swarmrt.wire.client import StageCalls
from swarmrt.wire.context import unanswered
from swarmrt.wire.proto import swarmrt_pb2 as pb
from swarmrt.wire.tensors import Framed
from swarmrt.checkpoint.store import save_data_position
from swarmrt.routing.live import LiveRouting
from swarmrt.sim.live_plan import plan_window
from swarmrt.roles.stepping import run_steps
from swarmrt.routing.rebalance import JOINING, MOVING, can_serve_everything
from swarmrt.roles.checks import ReplyChecks
from swarmrt.roles.chaining import Chaining, Hop as _Hop, PeerGone as _PeerGone, PeerLoss
from swarmrt.routing.verify import BadReply
from swarmrt.pipeline.chain import HEAD

logger = logging.getLogger("swarmrt.trainer")

T = TypeVar("T")

HEAL_FACTOR = 3.0
"""A stage the swarm could fill (peers move or join there, or could) but that stays empty fails the run
after this many ``network.no_peers_timeout_s``."""
STATUS_EVERY_S = 5.0
"""Seconds between two waiting lines the trainer prints (``say``)."""
QUIET_S = 2.0
"""A wait shorter than this prints nothing (the first view of the swarm, a peer replaced at once)."""


class NoPeers(RuntimeError):
    """A stage had no usable peer for too long (``network.no_peers_timeout_s``); the message is one line
    that names the stage, why, and what to do."""


def _seconds(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.2g}"


async def gather_all(coros):
    """``asyncio.gather`` that cancels (and awaits) the other coroutines when one fails, so a failing
    step leaves no task running (nor a "Task was destroyed but it is pending" at exit)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class HopFailed(RuntimeError):
    """One hop failed on every peer it was tried on."""


@dataclasses.dataclass
class Accounting:
    """What happened to microbatches; ``duplicates`` must stay 0."""

    started: int = 0
    applied: int = 0
    forward_restarts: int = 0
    hop_retries: int = 0
    bans: int = 0
    replans: int = 0
    duplicates: int = 0
    chained_hops: int = 0
    """Forward hops one peer passed straight to the next (``network.chain_hops``)."""
    applied_stages: dict[str, set[int]] = dataclasses.field(default_factory=dict)
    expected_stages: dict[str, frozenset[int]] = dataclasses.field(default_factory=dict)
    """Stages each microbatch's backward must reach: all S, or the stages of its route."""

    def expect(self, microbatch: str, stages) -> None:
        """``microbatch`` finished its forward through ``stages``; each now owes one backward."""
        self.expected_stages[microbatch] = frozenset(stages)

    def record_backward(self, microbatch: str, stage: int) -> None:
        stages = self.applied_stages.setdefault(microbatch, set())
        if stage in stages:
            self.duplicates += 1
        stages.add(stage)

    def incomplete(self) -> list[str]:
        """Microbatches whose backward reached other stages than their forward went through."""
        return [mb for mb in self.expected_stages.keys() | self.applied_stages.keys()
                if self.applied_stages.get(mb, set()) != self.expected_stages.get(mb)]

    def per_stage(self, num_stages: int) -> list[int]:
        """Microbatches whose backward each stage acknowledged."""
        counts = [0] * num_stages
        for stages in self.applied_stages.values():
            for s in stages:
                counts[s] += 1
        return counts

    def stages_visited(self) -> dict[str, int]:
        """How many microbatches visited how many stages (JSON-friendly keys)."""
        hist: dict[str, int] = {}
        for stages in self.expected_stages.values():
            hist[str(len(stages))] = hist.get(str(len(stages)), 0) + 1
        return dict(sorted(hist.items()))


def parse_stage_subset(text: str | None, num_stages: int) -> tuple[tuple[int, ...] | None, str]:
    """Stages to evaluate with, from ``"0,2,5"`` (None or empty: all of them), and why they are (not) usable.

    The first and the last stage are needed (they hold the input and the loss);
    stages must be distinct and in increasing order.
    """
    if not text:
        return tuple(range(num_stages)), "all stages"
    try:
        stages = tuple(int(part) for part in text.split(","))
    except ValueError:
        return None, f"{text!r} is not a comma-separated list of stage numbers"
    last = num_stages - 1
    if any(not 0 <= s <= last for s in stages):
        return None, f"{text!r} names a stage outside 0..{last}"
    if any(a >= b for a, b in zip(stages, stages[1:])):
        return None, f"{text!r} must list distinct stages in increasing order"
    if stages[0] != 0 or stages[-1] != last:
        return None, f"{text!r} must start with stage 0 and end with stage {last} (never skipped)"
    skipped = sorted(set(range(num_stages)) - set(stages))
    return stages, f"skips stages {', '.join(map(str, skipped))}" if skipped else "all stages"


class Trainer:
    def __init__(self, config: RunConfig, dht, *, client: StageCalls, stream: int = 0,
                 metrics_path: str | None = None, progress: bool = False,
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None,
                 trainer_id: str | None = None, say: Callable[[str], None] | None = None):
        self.config = config
        self.dht = dht
        self.client = client
        self.stream = stream
        self.metrics_path = metrics_path
        self.progress = progress
        self.clock = clock
        self.trainer_id = trainer_id or uuid.uuid4().hex[:8]
        self.rng = rng if rng is not None else random.Random(config.run.seed * 1000 + stream)
        self.bans = BanList(after=config.network.ban_after_failures, ban_s=config.network.ban_s)
        self.peers: dict[int, list[dht_records.StageRecord]] = {s: [] for s in range(config.num_stages)}
        self.records: dict[str, dht_records.StageRecord] = {}
        """Every serving peer of the last refresh, by peer id."""
        self.swarm: list[dht_records.StageRecord] = []
        """Every record of the last refresh, whatever its state (joining and moving peers too)."""
        self.say = say
        """Where the trainer's waiting lines go (one line each, at most every :data:`STATUS_EVERY_S`)."""
        self._said_at = -math.inf
        self._said_waiting = False
        self._bar = None
        if config.routing.skip_ratio > 0:
            from swarmrt.models.build import check_skip

            check_skip(config)
        from swarmrt.models.build import tied_ends

        self.tied = tied_ends(config)
        """The head shares stage 0's weights and runs there: a microbatch starts and ends on stage 0's peer."""
        self.routing = LiveRouting(config, plan_window=plan_window if config.routing.plan_ahead else None)
        """The training route source: SWARM's wiring, or the skip scheduler when ``skip_ratio > 0``."""
        self._route_ids = itertools.count()
        self.inflight: dict[str, int] = {}
        self.accounting = Accounting()
        self.batches = Batches(config.data, config.run.seed, stream)
        self.checks = ReplyChecks(config, self)
        """Reply checks, checked work and the throughput this trainer measured (:mod:`swarmrt.roles.checks`)."""
        self.chaining = Chaining(self)
        """Peer-to-peer hops (``network.chain_hops``; :mod:`swarmrt.roles.chaining`)."""
        self.peers_changed = asyncio.Event()
        self.status = ""
        self.waiting = asyncio.Event()
        """Set when a microbatch starts waiting for peers (:attr:`status` says why); cleared by
        the next view of the swarm. For progress displays and tests that act while a trainer waits."""

    # -- discovery ---------------------------------------------------------------------------
    async def refresh_peers(self) -> None:
        records, _ = await asyncio.to_thread(dht_records.read_swarm, self.dht, self.config.run.id,
                                             self.config.num_stages)  # every stage fetched at once
        self.view_peers(records)

    def view_peers(self, records: list[dht_records.StageRecord]) -> None:
        """Take a new view of the swarm: the stage records of every peer (as read from the DHT)."""
        self.swarm = list(records)
        for stage in range(self.config.num_stages):
            self.peers[stage] = [r for r in records if r.stage == stage and r.state == "serving"]
        self.records = {r.peer_id: r for stage in self.peers.values() for r in stage}
        self._sync(self.routing, self.clock())
        self.waiting.clear()
        self.peers_changed.set()

    async def _refresh_loop(self) -> None:
        if self.dht is None:  # no DHT: the view given to view_peers stands
            return
        while True:
            try:
                await self.refresh_peers()
            except Exception as e:  # a failed DHT read keeps the last view
                logger.warning("peer refresh failed: %s", e)
            await asyncio.sleep(self.config.network.heartbeat_s / 2)

    def live_peers(self) -> list[int]:
        return [len(self.peers[s]) for s in range(self.config.num_stages)]

    def _sync(self, routes: LiveRouting, now: float) -> None:
        """Bring a route source's peer table up to the latest view, bans and this trainer's own load."""
        routes.sync(self.checks.measured(self.records.values()), self.bans.banned(now), self.inflight)

    def _stage_without_peers(self, stages: Sequence[int], now: float) -> tuple[int, str] | None:
        """The first of ``stages`` with no eligible peer in the view, and why (None: they all have one)."""
        banned = self.bans.banned(now)
        for stage in stages:
            peers = self.peers[stage]
            if not peers:
                return stage, "no peers"
            if all(r.peer_id in banned for r in peers):
                return stage, f"all {len(peers)} peers are banned"
        return None

    def _outlook(self, stage: int) -> tuple[bool, str]:
        """Can the swarm fill the empty ``stage`` (:func:`~swarmrt.routing.rebalance.can_serve_everything`
        on every record of the last view), and what is on its way there, in words."""
        views = [r.policy_view() for r in self.swarm]
        healable, _ = can_serve_everything(views, self.config.num_stages)
        moving = sum(1 for v in views if v.state == MOVING and v.target == stage)
        joining = sum(1 for v in views if v.state == JOINING and v.stage == stage)
        parts = ([f"{moving} peer{' is' if moving == 1 else 's are'} moving there"] if moving else []) + \
                ([f"{joining} peer{' is' if joining == 1 else 's are'} joining it"] if joining else [])
        if parts:
            return healable, ", ".join(parts)
        if healable:
            return True, "peers elsewhere can move there"
        others = len(self.swarm)
        if not others:
            return False, "no peer is announced"
        if others == 1:
            return False, "the only other peer is pinned, leaving or the last of its stage"
        return False, f"the other {others} peers are pinned, leaving or the last of their stage"

    def _announce(self, line: str, now: float, waited: float) -> None:
        """Print a waiting line through :attr:`say`, at most every :data:`STATUS_EVERY_S`, once a wait
        lasted :data:`QUIET_S`."""
        self._said_waiting = True
        if self.say is None or waited < QUIET_S or now - self._said_at < STATUS_EVERY_S:
            return
        self._said_at = now
        self._emit(line)

    def _emit(self, line: str) -> None:
        if self.say is None:
            return
        if self._bar is not None:  # above the progress bar, not through it
            with type(self._bar).external_write_mode(file=sys.stderr):
                self.say(line)
        else:
            self.say(line)

    async def _wait_for(self, decide: Callable[[float], tuple[T | None, str]], stages: Sequence[int]) -> T:
        """The one wait-for-peers loop: ``decide(now)`` until it chooses something.

        While it cannot, :attr:`status` says why (``"waiting for stage N (...)"`` when one of ``stages``
        has no eligible peer), :attr:`say` prints it now and then, and the loop waits for the next view of
        the swarm. It raises :class:`NoPeers` (one line: the stage, why, what to do):

        - when the empty stage cannot be filled (no peer serves, joins or moves to it, and no peer
          elsewhere can move there: ``can_serve_everything`` is False) for ``network.no_peers_timeout_s``
          in a row;
        - when it stays empty for :data:`HEAL_FACTOR` x that although the swarm could fill it (moves
          take seconds; an empty stage that long means its peers do not rebalance);
        - when there is no route for another reason (every peer of a stage banned, ...) for
          ``network.no_peers_timeout_s``.
        """
        timeout = self.config.network.no_peers_timeout_s
        started = self.clock()
        hopeless_since = None
        while True:
            now = self.clock()
            choice, why = decide(now)
            if choice is not None:
                if self._said_waiting:
                    self._said_waiting = False
                    if self._said_at > -math.inf:
                        self._emit(f"trainer: resuming (waited {_seconds(now - started)} s for peers)")
                        self._said_at = -math.inf
                return choice
            missing = self._stage_without_peers(stages, now)
            waited = now - started
            if missing is not None and missing[1] == "no peers":
                stage = missing[0]
                healable, outlook = self._outlook(stage)
                hopeless_since = None if healable else (now if hopeless_since is None else hopeless_since)
                fail_at = started + HEAL_FACTOR * timeout
                if hopeless_since is not None:
                    fail_at = min(fail_at, hopeless_since + timeout)
                if now > fail_at:
                    if healable:
                        raise NoPeers(f"stage {stage} has had no peer for {_seconds(waited)} s although {outlook} "
                                      "(do its peers rebalance? [rebalance] enabled); start a peer with "
                                      f"--stage {stage}")
                    raise NoPeers(f"stage {stage} has no peer and no peer elsewhere can move there ({outlook}; "
                                  f"waited {_seconds(waited)} s); start a peer with --stage {stage}")
                self.status = (f"waiting for stage {stage} (no peer serves it; {outlook})" if healable else
                               f"waiting for stage {stage} (no peer serves it and no peer elsewhere can move "
                               f"there: {outlook}; giving up in {_seconds(fail_at - now)} s)")
            else:
                what = (f"stage {missing[0]} has no usable peer ({missing[1]})" if missing is not None
                        else f"no route ({why})")
                fail_at = started + timeout
                if now > fail_at:
                    raise NoPeers(f"{what} for {_seconds(waited)} s")
                self.status = f"waiting: {what}"
            self._announce(f"trainer: {self.status}", now, waited)
            self.waiting.set()
            self.peers_changed.clear()
            try:
                await asyncio.wait_for(self.peers_changed.wait(), timeout=max(0.0, min(1.0, fail_at - now)))
            except asyncio.TimeoutError:
                pass

    async def _start_route(self, routes: LiveRouting, stages: Sequence[int] | None = None,
                           avoid: Collection[str] = ()) -> Route:
        """A route for a new microbatch (over ``stages`` when given), its origin not in ``avoid`` if possible."""

        def decide(now: float) -> tuple[Route | None, str]:
            self._sync(routes, now)
            route, why = routes.route(now, self.rng, next(self._route_ids), avoid=avoid, stages=stages)
            if route is not None:
                logger.debug("route %d: %s", route.microbatch, why)
            return route, why

        return await self._wait_for(decide, range(self.config.num_stages) if stages is None else stages)

    async def _peer_for(self, stage: int, tried: set[str]) -> dht_records.StageRecord:
        """Any peer of ``stage`` by SWARM's weighted rule, not in ``tried`` unless every live one is."""

        def decide(now: float) -> tuple[dht_records.StageRecord | None, str]:
            if tried and all(r.peer_id in tried for r in self.peers[stage]):
                tried.clear()  # every live peer was tried once: allow them again
            candidates = [r for r in self.peers[stage] if r.peer_id not in tried]
            views = [PeerView(r.peer_id, self.checks.meter.get(r.peer_id), r.load + self.inflight.get(r.peer_id, 0))
                     for r in candidates]
            choice, reason = choose_peer(views, self.bans.banned(now), now, self.rng)
            return (None if choice is None else next(r for r in candidates if r.peer_id == choice.peer_id)), reason

        return await self._wait_for(decide, (stage,))

    # -- hops --------------------------------------------------------------------------------
    async def _with_peer(self, peer: dht_records.StageRecord, coro_fn):
        self.inflight[peer.peer_id] = self.inflight.get(peer.peer_id, 0) + 1
        try:
            result = await coro_fn()
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise RuntimeError(f"stage {peer.stage} peer {peer.peer_id} refused the request: {e.details()}") from None
            if self.bans.failure(peer.peer_id, self.clock()):
                self.accounting.bans += 1
                logger.warning("banned stage %d peer %s for %g s after %s", peer.stage, peer.peer_id,
                               self.bans.ban_s, e.code())
            raise
        finally:
            self.inflight[peer.peer_id] -= 1
        self.bans.success(peer.peer_id)
        return result

    def _forward_request(self, stage: int, mb_id: str, x: torch.Tensor, keep_context: bool) -> Framed:
        codec = "none" if not x.is_floating_point() else self.config.compression.activations
        return Framed(pb.ForwardRequest(run_id=self.config.run.id, stage=stage, microbatch_id=mb_id,
                                        keep_context=keep_context, output_codec=self.config.compression.activations)
                      ).attach("input", x, codec)

    async def _forward_on(self, routes: LiveRouting, peer_id: str, stage: int, mb_id: str, x: torch.Tensor,
                          keep_context: bool) -> tuple[dht_records.StageRecord, torch.Tensor]:
        """One forward RPC on the peer a route names (no retry: the caller re-plans)."""
        peer = self.records.get(peer_id)
        if peer is None or peer.stage != stage:
            raise _PeerGone(f"peer {peer_id} no longer serves stage {stage}")
        request = self._forward_request(stage, mb_id, x, keep_context)
        started = self.clock()
        response = await self._with_peer(peer, lambda: self.client.forward(peer.address, request,
                                                                           self.config.network.forward_timeout_s))
        routes.observe_hop(peer_id, self.clock() - started)
        self.checks.observe_forward(peer_id, int(x.shape[0]), self.clock() - started)
        try:
            head = mb_id.endswith(HEAD)
            out = self.checks.decode(response, "output", f"stage {stage} {'head ' if head else ''}output",
                                     *self.checks.output_spec(stage, x, head))
            if not head:  # checked work compares a stage's outputs; the head's are another kind
                await self.checks.verify(stage, peer, mb_id, x, out)
        except BadReply as e:
            self.checks.ban(peer, str(e))
            raise
        return peer, out

    async def _forward(self, routes: LiveRouting, route: Route, mb_id: str, x: torch.Tensor, keep_context: bool,
                       stages: Sequence[int] | None, y: torch.Tensor) -> tuple[Route, list[_Hop], torch.Tensor | PeerLoss]:
        """Forward ``x`` along ``route``, re-planning around failed hops; the route taken, its hops and
        the last stage's output. :class:`HopFailed` (the route aborted): restart the forward."""
        net, hops, failed, failures = self.config.network, [], set(), 0
        h, position, chosen_now = x, 0, True
        chained = self.chaining.enabled
        try:
            while position < len(route.hops):
                if not chosen_now and not chained:  # SWARM: this hop's peer is drawn now that its input is ready
                    routes.set_own_load(self.inflight)  # the view and bans change only by sync
                    route, _ = routes.repick(route, position, failed, self.clock(), self.rng)
                chosen_now = False
                stage, peer_id = route.hops[position]
                try:
                    if chained:  # the rest of the route, peer to peer (and the tied head at its end)
                        head = (hops[0].peer.peer_id if hops else route.hops[0][1]) if self.tied else None
                        served, h, broken = await self.chaining.forward(route, position, mb_id, h, keep_context, head,
                                                                        y)
                        hops.extend(served)
                        position += sum(1 for hop in served if not hop.head)
                        if broken is None:
                            continue
                        stage, peer_id, what = broken.stage, broken.peer_id, f"{broken.code}: {broken.details}"
                    else:
                        peer, out = await self._forward_on(routes, peer_id, stage, mb_id, h, keep_context)
                        hops.append(_Hop(stage, peer, h))
                        h, position = out, position + 1
                        continue
                except (grpc.aio.AioRpcError, _PeerGone, BadReply) as e:
                    what = e.code() if isinstance(e, grpc.aio.AioRpcError) else e
                self.accounting.hop_retries += 1
                failed.add(peer_id)
                failures += 1
                if failures >= net.max_retries:
                    raise HopFailed(f"{failures} forward hops failed (last: stage {stage} on {peer_id}: "
                                    f"{what})") from None
                if position >= len(route.hops):  # only the chained head failed: run_microbatch runs it
                    break
                if position == 0:  # nothing done yet: a new route, from another origin if there is one
                    routes.aborted(route)
                    route = await self._start_route(routes, stages, avoid=failed)
                    why = f"new route from {route.origin}"
                else:
                    now = self.clock()
                    self._sync(routes, now)
                    new, why = routes.replan(route, position, failed, now, self.rng)
                    if new is None:
                        raise HopFailed(f"forward of stage {stage} on {peer_id} failed ({what}); {why}") from None
                    self.accounting.replans += 1
                    route = new
                logger.info("microbatch %s: forward of stage %d on %s failed (%s); %s", mb_id, stage,
                            peer_id, what, why)
                chosen_now = True
        except BaseException:
            routes.aborted(route)
            raise
        return route, hops, h

    async def _backward_hop(self, hop: _Hop, mb_id: str, grad: torch.Tensor, samples: int,
                            again: bool = False) -> torch.Tensor | None:
        """Backward of one hop, retried (with its input) on other peers of the stage until one applies it;
        its grad_input. ``again``: the hop's peer applied it already (a chained backward said so): ask that
        peer alone, for its grad_input (it never applies a microbatch twice); nothing is counted."""
        net, tried, asked_again = self.config.network, set(), set()
        need_grad_input = hop.need_grad_input
        peer, attach_input = hop.peer, False
        deadline = self.clock() + net.no_peers_timeout_s
        while True:
            request = Framed(pb.BackwardRequest(run_id=self.config.run.id, stage=hop.stage,
                                                microbatch_id=mb_id + HEAD if hop.head else mb_id,
                                                samples=samples, grad_codec=self.config.compression.gradients,
                                                need_grad_input=need_grad_input,
                                                deadline_unix=time.time() + net.backward_timeout_s)
                             ).attach("grad_output", grad, self.config.compression.gradients)
            if attach_input:
                codec = "none" if not hop.input.is_floating_point() else self.config.compression.activations
                request.attach("input", hop.input, codec)
            try:
                response = await self._with_peer(peer, lambda: self.client.backward(peer.address, request,
                                                                                    net.backward_timeout_s))
                grad_input = None if not need_grad_input else self.checks.decode(
                    response, "grad_input", f"stage {hop.stage} grad_input", tuple(hop.input.shape), hop.input.dtype)
                if not hop.head and not again:  # the head's pass on stage 0 is not one of the route's stages
                    self.accounting.record_backward(mb_id, hop.stage)
                hop.peer = peer  # the peer whose grad_input goes on (blamed if the next hop refuses it)
                return grad_input
            except BadReply as e:  # its sender is banned; another peer of the stage recomputes and applies
                self.checks.ban(peer, str(e))
                if again:
                    raise HopFailed(f"backward of stage {hop.stage} for {mb_id}: {e}") from None
                self.accounting.hop_retries += 1
                tried.add(peer.peer_id)
                attach_input = True
                peer = await self._peer_for(hop.stage, tried)
            except grpc.aio.AioRpcError as e:
                self.accounting.hop_retries += 1
                tried.add(peer.peer_id)
                if e.code() == grpc.StatusCode.FAILED_PRECONDITION and not attach_input:
                    attach_input = True  # context evicted: same peer recomputes from the input
                    continue
                if unanswered(e) and peer.peer_id not in asked_again:
                    # no answer in time: the peer may have applied it and frozen before replying. Ask it
                    # again first (with the input, should its context be gone): a peer never applies a
                    # microbatch twice, and one that has not applied it refuses the late first call.
                    asked_again.add(peer.peer_id)
                    attach_input = True
                    logger.info("backward %s stage %d on %s: no answer in time; asking it again", mb_id,
                                hop.stage, peer.peer_id)
                    continue
                if again:  # another peer would apply it a second time
                    raise HopFailed(f"backward of stage {hop.stage} for {mb_id} on {peer.peer_id}, which applied "
                                    f"it, failed: {e.code()} {e.details()}") from None
                if self.clock() > deadline:
                    raise HopFailed(f"backward of stage {hop.stage} for {mb_id} kept failing: {e.code()} {e.details()}")
                logger.info("backward %s stage %d on %s failed (%s); retrying elsewhere", mb_id, hop.stage,
                            peer.peer_id, e.code())
                attach_input = True
                peer = await self._peer_for(hop.stage, tried)

    # -- one microbatch: the one loop --------------------------------------------------------
    async def run_microbatch(self, routes: LiveRouting, key: str, x: torch.Tensor, y: torch.Tensor, *,
                             train: bool = True, stages: Sequence[int] | None = None) -> float:
        """Run one microbatch along a route from ``routes``; its summed loss.

        ``train``: forward keeping contexts, loss, backward in reverse along
        the peers the forward used, counted in :attr:`accounting`. Else
        forward only (no context kept, nothing counted): evaluation, over
        ``stages`` when given. A forward that fails for good restarts on a
        new route, up to ``network.max_retries`` times.
        """
        net = self.config.network
        if train:
            self.accounting.started += 1
        for attempt in range(net.max_retries):
            mb_id = f"{key}:{attempt}"
            route = await self._start_route(routes, stages)
            try:
                route, hops, h = await self._forward(routes, route, mb_id, x, keep_context=train, stages=stages, y=y)
            except HopFailed as e:
                if train:
                    self.accounting.forward_restarts += 1
                logger.warning("microbatch %s: %s; restarting it on a new route", mb_id, e)
                continue
            if self.tied and not hops[-1].head:  # the tied head: back to the stage-0 peer that embedded it
                try:
                    peer, out = await self._forward_on(routes, hops[0].peer.peer_id, 0, mb_id + HEAD, h, train)
                except (grpc.aio.AioRpcError, _PeerGone) as e:
                    routes.aborted(route)
                    logger.warning("microbatch %s: head on stage 0 failed (%s); restarting it", mb_id, e)
                    continue
                hops.append(_Hop(0, peer, h, head=True))
                h = out
            if not train:
                routes.finished(route)
                return h.value if isinstance(h, PeerLoss) else float(loss_sum(self.config.data, h, y))
            if isinstance(h, PeerLoss):  # computed by the route's last peer, which keeps its gradient
                loss, grad = torch.tensor(h.value), None
            else:
                output = h.detach().requires_grad_(True)
                with torch.enable_grad():
                    loss = loss_sum(self.config.data, output, y)
                    (grad,) = torch.autograd.grad(loss, output)
            self.accounting.expect(mb_id, [hop.stage for hop in hops if not hop.head])
            if self.chaining.enabled:
                await self.chaining.backward(hops, mb_id, grad, x.shape[0], y)
                routes.finished(route)
                self.accounting.applied += 1
                return float(loss.detach())
            for i, hop in enumerate(reversed(hops)):
                try:
                    grad = await self._backward_hop(hop, mb_id, grad, samples=x.shape[0])
                except RuntimeError as e:  # a finite grad_input that overflows this stage: its sender lied
                    if i == 0 or "parameter gradients are not finite" not in str(e):
                        raise
                    self.checks.ban(hops[len(hops) - i].peer, f"its grad_input was refused by stage {hop.stage}: {e}")
                    break  # the microbatch is dropped from here on (partially applied)
            routes.finished(route)
            self.accounting.applied += 1
            return float(loss.detach())
        raise HopFailed(f"microbatch {key} could not complete a forward pass in {net.max_retries} attempts")

    async def train_step(self, step: int) -> float:
        x, y = self.batches.batch(step)
        m = self.config.data.microbatch_size
        self.routing.begin_step(step, self.clock(), self.rng)
        losses = await gather_all([self.run_microbatch(self.routing, f"{self.trainer_id}:{step}:{i}",
                                                            x[i * m:(i + 1) * m], y[i * m:(i + 1) * m])
                                        for i in range(self.config.data.microbatches_per_step)])
        self.routing.end_step()
        return sum(losses) / x.shape[0]

    # -- evaluation --------------------------------------------------------------------------
    async def evaluate(self, stages: tuple[int, ...] | None = None, batches: int = 1) -> dict:
        """Loss (and perplexity, for text) on ``batches`` held-out batches, forward only through ``stages``.

        ``stages`` (default: all) must start with stage 0 and end with the last
        stage (:func:`parse_stage_subset`); leaving middle stages out shows how
        a model trained with skips degrades when layers are dropped.
        """
        stages = tuple(range(self.config.num_stages)) if stages is None else tuple(stages)
        routes = LiveRouting(self.config, policy="swarm")  # every peer by SWARM's rule, over ``stages``
        self._sync(routes, self.clock())
        refresher = asyncio.create_task(self._refresh_loop())
        started, total, samples = time.time(), 0.0, 0
        m = self.config.data.microbatch_size
        try:
            for b in range(batches):
                x, y = self.batches.eval_batch(self.config.data.batch_size, index=b)
                parts = range(0, x.shape[0], m)
                losses = await gather_all([self.run_microbatch(routes, f"eval:{self.trainer_id}:{b}:{i // m}",
                                                                    x[i:i + m], y[i:i + m], train=False,
                                                                    stages=stages) for i in parts])
                total += sum(losses)
                samples += x.shape[0]
        finally:
            refresher.cancel()
            await self.client.close()
        loss = total / samples
        return {"stages": list(stages),
                "skipped": sorted(set(range(self.config.num_stages)) - set(stages)),
                "batches": batches, "samples": samples, "loss": loss,
                "perplexity": math.exp(min(loss, 700.0)) if self.config.data.kind == "text" else None,
                "seconds": time.time() - started}

    # -- the loop ----------------------------------------------------------------------------
    async def run(self, steps: int, start_step: int = 0, stop: asyncio.Event | None = None) -> dict:
        """Train steps ``start_step .. steps-1``, up to ``optimizer.staleness + 1`` of them in flight
        (:mod:`swarmrt.roles.stepping`). When ``stop`` is set (SIGTERM), the steps in
        flight finish and the loop ends there; with ``[checkpoint] location`` the data
        position (next step) is written after every step, for ``swarmrt train --resume``."""
        refresher = asyncio.create_task(self._refresh_loop())
        position_root = self.config.checkpoint.location
        metrics = open(self.metrics_path, "a", buffering=1) if self.metrics_path else None
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self._bar = bar
        started, samples, losses, done = time.time(), 0, [], start_step
        try:
            async def finished(step: int, loss: float) -> None:  # in step order, see swarmrt.roles.stepping
                nonlocal done, samples
                done = step + 1
                if position_root is not None:
                    await asyncio.to_thread(save_data_position, position_root, self.config.run.id, self.stream, done)
                samples += self.config.data.batch_size
                losses.append(loss)
                elapsed = max(time.time() - started, 1e-9)
                record = {"step": step, "loss": loss, "samples": samples, "time": time.time(),
                          "samples_per_s": samples / elapsed, "peers": self.live_peers(),
                          "hop_retries": self.accounting.hop_retries, "applied": self.accounting.applied,
                          "bans": self.accounting.bans}
                if metrics is not None:
                    metrics.write(json.dumps(record) + "\n")
                if bar is not None:
                    bar.set_postfix_str(f"loss {loss:.3f} | {samples / elapsed:.1f} samples/s | peers "
                                        f"{'/'.join(map(str, self.live_peers()))}")
                    bar.update(1)

            await run_steps(self.train_step, start_step, steps, self.config.optimizer.staleness, finished, stop)
        finally:
            refresher.cancel()
            self._bar = None
            if bar is not None:
                bar.close()
            if metrics is not None:
                metrics.close()
            await self.client.close()
        acc = self.accounting
        if acc.duplicates:
            raise RuntimeError(f"{acc.duplicates} stage backwards were applied twice")
        return {"steps": done - start_step, "start_step": start_step, "next_step": done,
                "stopped_early": done < steps, "samples": samples, "first_loss": losses[0] if losses else None,
                "final_loss": losses[-1] if losses else None, "seconds": time.time() - started,
                "microbatches": acc.started, "applied": acc.applied, "duplicates": acc.duplicates,
                "partially_applied": len(acc.incomplete()), "hop_retries": acc.hop_retries, "bans": acc.bans,
                "forward_restarts": acc.forward_restarts, "peers": self.live_peers(),
                "skip_ratio": self.config.routing.skip_ratio, "replans": acc.replans, "chained_hops": acc.chained_hops,
                "microbatches_per_stage": acc.per_stage(self.config.num_stages),
                "stages_visited": acc.stages_visited(), **self.checks.summary()}
