"""Peer-to-peer hops: a stage peer passes its result straight to the next peer of the route.

Without it the trainer relays every activation (trainer -> peer -> trainer -> next peer), so every
byte crosses the trainer's link twice per hop. With ``[network] chain_hops`` a request carries the rest
of its route (``ForwardRequest.next``, ``BackwardRequest.next``: stage and peer id of each later hop).
A peer computes its part, then calls the next peer itself and answers its caller with what came back:

- **forward**: the last hop's output comes back up the chain to the trainer, with the hops that
  served it (``done``). When a later hop fails, the peer before it answers with its *own* output and
  ``broken`` naming the failed hop: the trainer holds that hop's input and re-plans from there.
- **backward** retraces the route peer to peer. A peer computes its gradients, sends ``grad_input``
  on, and applies its own gradients only after that call came back (and only within its own
  deadline), so a peer killed mid-chain has applied nothing. ``done`` lists the hops that applied;
  on a break, ``grad_input`` is the gradient the failed hop was to be given.

Who may be called: a peer forwards only to a peer that the run's DHT says serves that stage now
(:class:`Directory`); the request names peer ids, never addresses. A hop the DHT does not vouch for
is never called: the chain is reported broken there (NOT_FOUND, naming the hop; a trainer whose view
is a heartbeat old re-plans around it). A route that cannot be one of this run (too long, a stage out
of range) is refused before any compute (INVALID_ARGUMENT). The callee checks its input exactly as it
checks a trainer's (dtype, shape, finiteness, sequence length), so a peer gains nothing by
chaining that it could not send directly.

Deadlines: a peer gives the next hop what is left of its own deadline minus :data:`RESERVE_S`, so it
always has time to apply and to answer its own caller with the break.

The trainer's side (building the chain, re-planning, the fallback after a broken backward) lives in
:mod:`swarmrt.roles.chaining`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, Protocol, Sequence

import grpc

from swarmrt.pipeline.worker import StageError
from swarmrt.wire.client import StageCalls
from swarmrt.wire.proto import swarmrt_pb2 as pb
from swarmrt.wire.tensors import BadTensor, Framed

HEAD = "/head"
"""Suffix of the microbatch key of a tied head's pass on stage 0."""
RESERVE_S = 0.5
"""A chaining peer keeps this much of its own deadline to apply its gradients and answer its caller."""
MIN_HOP_TIMEOUT_S = 0.1
"""A next hop with less time than this left is not called (reported broken: DEADLINE_EXCEEDED)."""


class Directory(Protocol):
    """Who serves what, as the run's DHT says (a peer's own view; refreshed as it sees fit)."""

    async def address(self, stage: int, peer_id: str) -> str | None:
        """``peer_id``'s address if it serves ``stage`` in this run now; else None."""


class Relay:
    """What a peer needs to pass work on: the :class:`Directory` and a client (with this peer's own
    credential and node name) to call the next peer."""

    def __init__(self, directory: Directory, client: StageCalls, num_stages: int):
        self.directory, self.client, self.num_stages = directory, client, num_stages

    def check_route(self, hops: Sequence[pb.ChainHop], what: str) -> None:
        """Refuse a route that cannot be one: too long, a stage out of range, no peer id."""
        if len(hops) > self.num_stages:  # at most every other stage, plus a tied head
            raise StageError(f"{what}: {len(hops)} later hops, a route of this run has at most {self.num_stages}")
        for i, hop in enumerate(hops):
            if not 0 <= hop.stage < self.num_stages:
                raise StageError(f"{what}[{i}]: stage {hop.stage} is not a stage of this run "
                                 f"(0..{self.num_stages - 1})")
            if not hop.peer_id or len(hop.peer_id) > 128:
                raise StageError(f"{what}[{i}]: peer id must be 1..128 characters")

    async def resolve(self, hop: pb.ChainHop, run_id: str) -> str:
        """The next hop's address, from the directory; :class:`_Broken` (the hop is never called) when the
        run's DHT does not vouch for it."""
        address = await self.directory.address(hop.stage, hop.peer_id)
        if address is None:
            raise _Broken(_break(hop, grpc.StatusCode.NOT_FOUND,
                                 f"peer {hop.peer_id} does not serve stage {hop.stage} of run {run_id!r} (the run's "
                                 "DHT does not vouch for it); not called"))
        return address

    # -- forward -----------------------------------------------------------------------------
    async def forward_on(self, request: Framed, response: Framed, own: pb.HopDone, time_left: float | None) -> Framed:
        """Send this peer's ``response`` output on as the next hop's input (its bytes passed through,
        not decoded again); what the chain answered, this hop first in ``done``."""
        hop = request.next[0]
        down = Framed(pb.ForwardRequest(run_id=request.run_id, stage=hop.stage,
                                        microbatch_id=hop_key(request.microbatch_id, hop),
                                        keep_context=request.keep_context, output_codec=request.output_codec,
                                        next=request.next[1:]))
        down.pass_through("input", response, "output")
        if request.HasField("target"):  # for the last hop's loss
            down.pass_through("target", request, "target")
        try:
            reply = await self._call(self.client.forward, request.run_id, down, time_left, hop)
        except _Broken as e:
            return _answer(response, [own], e.broken)
        return _answer(reply, [own, *reply.done], reply.broken if reply.HasField("broken") else None,
                       model_version=own.model_version)

    # -- backward ----------------------------------------------------------------------------
    async def backward_on(self, request: Framed, grad_input: Framed,
                          time_left: float | None) -> tuple[list[pb.HopDone], pb.ChainBreak | None, Framed | None]:
        """Send ``grad_input`` (a BackwardResponse framing this peer's input gradient) on to the next hop.
        Returns the hops below that applied, where the chain broke (None: it did not), and the framed
        gradient the broken hop was to be given."""
        hop = request.next[0]
        down = Framed(pb.BackwardRequest(run_id=request.run_id, stage=hop.stage,
                                         microbatch_id=hop_key(request.microbatch_id, hop), samples=request.samples,
                                         grad_codec=request.grad_codec, need_grad_input=hop.need_grad_input,
                                         deadline_unix=0.0, next=request.next[1:]))
        down.pass_through("grad_output", grad_input, "grad_input")
        if time_left is not None:
            down.message.deadline_unix = time.time() + max(0.0, time_left - RESERVE_S)
        try:
            reply = await self._call(self.client.backward, request.run_id, down, time_left, hop)
        except _Broken as e:
            return [], e.broken, grad_input
        if reply.HasField("broken"):
            return list(reply.done), reply.broken, reply
        return list(reply.done), None, None

    async def _call(self, method: Callable[..., Awaitable[Framed]], run_id: str, request: Framed,
                    time_left: float | None, hop: pb.ChainHop) -> Framed:
        address = await self.resolve(hop, run_id)
        timeout = 60.0 if time_left is None else time_left - RESERVE_S
        if timeout < MIN_HOP_TIMEOUT_S:
            raise _Broken(_break(hop, grpc.StatusCode.DEADLINE_EXCEEDED, "no time left to call it"))
        try:
            reply = await method(address, request, timeout)
        except grpc.aio.AioRpcError as e:
            raise _Broken(_break(hop, e.code(), e.details() or "")) from None
        except (BadTensor, asyncio.TimeoutError, OSError) as e:
            raise _Broken(_break(hop, grpc.StatusCode.UNAVAILABLE, f"{type(e).__name__}: {e}")) from None
        if type(reply.message) is pb.ForwardResponse:  # a forward reply names the hop that served it first
            first = reply.done[0] if len(reply.done) else None
            if first is None or first.stage != hop.stage or first.peer_id != hop.peer_id:
                raise _Broken(_break(hop, grpc.StatusCode.INTERNAL, "its reply does not name it as the hop served"))
        return reply


class _Broken(Exception):
    def __init__(self, broken: pb.ChainBreak):
        super().__init__(broken.details)
        self.broken = broken


def _break(hop: pb.ChainHop, code: grpc.StatusCode, details: str) -> pb.ChainBreak:
    return pb.ChainBreak(stage=hop.stage, peer_id=hop.peer_id, code=code.name, details=details[:500])


def _answer(reply: Framed, done: list[pb.HopDone], broken: pb.ChainBreak | None,
            model_version: int | None = None) -> Framed:
    del reply.message.done[:]
    reply.message.done.extend(done)
    if broken is not None:
        reply.message.broken.CopyFrom(broken)
    if model_version is not None:
        reply.message.model_version = model_version
    return reply


def hop_key(microbatch_id: str, hop: pb.ChainHop) -> str:
    """The microbatch id a hop is called with: the route's, with :data:`HEAD` for a tied head's pass."""
    base = microbatch_id.removesuffix(HEAD)
    return base + HEAD if hop.head else base


class DhtDirectory:
    """A :class:`Directory` over the run's DHT. A peer it knows is answered from memory at once; a stage
    last read more than ``fresh_s`` ago is re-read in the background (a chained call never waits for the
    DHT for a peer it knows; one that has died or moved since fails or refuses, and the chain reports the
    break). An unknown peer waits for a read, at most one per stage every ``min_refresh_s``, so requests
    naming made-up peers cannot make this peer hammer the DHT."""

    def __init__(self, read_stage: Callable[[int], list], fresh_s: float, min_refresh_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic):
        self.read_stage, self.fresh_s, self.min_refresh_s, self.clock = read_stage, fresh_s, min_refresh_s, clock
        self._stages: dict[int, tuple[float, dict[str, str]]] = {}
        self._reads: dict[int, asyncio.Task] = {}

    async def address(self, stage: int, peer_id: str) -> str | None:
        read_at, peers = self._stages.get(stage, (-float("inf"), {}))
        age = self.clock() - read_at
        if peer_id in peers:
            if age > self.fresh_s:
                self._read(stage)  # in the background
            return peers[peer_id]
        if age < self.min_refresh_s:
            return None
        await asyncio.shield(self._read(stage))
        return self._stages.get(stage, (0.0, {}))[1].get(peer_id)

    def _read(self, stage: int) -> asyncio.Task:
        task = self._reads.get(stage)
        if task is None or task.done():
            task = self._reads[stage] = asyncio.ensure_future(self._refresh(stage))
        return task

    async def _refresh(self, stage: int) -> None:
        try:
            records = await asyncio.to_thread(self.read_stage, stage)
        except Exception:  # a failed read keeps what was known; the next lookup tries again
            self._stages[stage] = (self.clock(), self._stages.get(stage, (0.0, {}))[1])
            return
        self._stages[stage] = (self.clock(), {r.peer_id: r.address for r in records
                                              if r.state == "serving" and r.stage == stage})
