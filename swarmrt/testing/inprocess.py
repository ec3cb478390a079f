"""A stage client that runs the real server handler in this process: no sockets, no processes.

:class:`InProcessClient` has :class:`~swarmrt.wire.client.StageCalls`' methods
(what the trainer calls). Each call goes through the same
:class:`~swarmrt.pipeline.service.StageServicer` a peer serves, over a real
:class:`~swarmrt.pipeline.worker.StageWorker`:

- the request is serialized and parsed again (what reaches the handler is
  what would cross the wire): a :class:`~swarmrt.wire.tensors.Framed` one (what
  the trainer sends) through the data plane's framing and its checks, a plain
  protobuf one as the unary RPC would carry it;
- the handler gets a small :class:`FakeContext`: ``time_remaining()`` counts
  down the call's timeout, and ``abort(code, details)`` raises a real
  :class:`grpc.aio.AioRpcError` with that code and details, which the trainer
  sees exactly as it would from a remote peer;
- the call's ``timeout`` is enforced (DEADLINE_EXCEEDED), as gRPC does.

Fault hooks for tests, by peer address: :meth:`InProcessClient.kill` (every
call fails UNAVAILABLE, as a dead peer's), :meth:`InProcessClient.drop` (the
next ``n`` calls fail UNAVAILABLE), :meth:`InProcessClient.delay` (each call
waits first), :meth:`InProcessClient.evict` (the peer loses its kept
contexts, so a backward must be resent with its input).

    swarm = InProcessSwarm.build(config, peers_per_stage=2)
    trainer = Trainer(config, dht=None, client=swarm.client)
    trainer.view_peers(swarm.records)
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from typing import Callable

import grpc

from swarmrt.config import RunConfig
from swarmrt.discovery.records import StageRecord
from swarmrt.models.build import build_stage, stage_input_spec
from swarmrt.pipeline.chain import Relay
from swarmrt.pipeline.service import StageServicer
from swarmrt.pipeline.worker import StageWorker
from swarmrt.wire.context import CallContext, rpc_error
from swarmrt.wire.tensors import BadTensor, Framed, read_frames, to_frames


FakeContext = CallContext
"""The part of :class:`grpc.aio.ServicerContext` that :class:`StageServicer` uses (a
:class:`swarmrt.wire.context.CallContext`)."""


@dataclasses.dataclass
class Calls:
    """What reached the handlers, per microbatch id: addresses of successful forwards and backwards, in order."""

    forward: list[str] = dataclasses.field(default_factory=list)
    backward: list[str] = dataclasses.field(default_factory=list)


class InProcessClient:
    """Serves Forward/Backward with each address's :class:`StageServicer`, with fault hooks."""

    def __init__(self, servicers: dict[str, StageServicer]):
        self.servicers = servicers
        self.dead: set[str] = set()
        self.drops: collections.Counter = collections.Counter()
        self.delays: dict[str, float] = {}
        self.forwards: collections.Counter = collections.Counter()
        """Forward calls that reached each address's handler (failed ones included)."""
        self.calls: dict[str, Calls] = collections.defaultdict(Calls)
        self.closed = False

    # -- fault hooks ---------------------------------------------------------------------------
    def kill(self, address: str) -> None:
        """Every later call to ``address`` fails UNAVAILABLE, as a dead peer's would."""
        self.dead.add(address)

    def revive(self, address: str) -> None:
        self.dead.discard(address)

    def drop(self, address: str, calls: int = 1) -> None:
        """The next ``calls`` calls to ``address`` fail UNAVAILABLE (the peer never sees them)."""
        self.drops[address] += calls

    def delay(self, address: str, seconds: float) -> None:
        """Each later call to ``address`` waits ``seconds`` before reaching the handler."""
        self.delays[address] = seconds

    def evict(self, address: str) -> None:
        """``address`` forgets every kept forward context (as when they expire or memory runs out)."""
        self.servicers[address].worker.contexts.clear()

    # -- StageCalls ----------------------------------------------------------------------------
    async def _call(self, address: str, method: str, request, timeout: float | None):
        if address not in self.servicers:
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, f"no peer listens at {address}")
        if address in self.dead:
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, f"peer {address} is down")
        if self.drops[address] > 0:
            self.drops[address] -= 1
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, f"call to {address} dropped")
        framed = isinstance(request, Framed)
        if framed:
            request = await _over_the_wire(request)
            method = f"{method.lower()}_framed"
        else:
            request = type(request).FromString(request.SerializeToString())
        context = FakeContext(timeout)

        async def serve():
            if self.delays.get(address):
                await asyncio.sleep(self.delays[address])
            return await getattr(self.servicers[address], method)(request, context)

        try:
            response = await asyncio.wait_for(serve(), timeout)
        except asyncio.TimeoutError:
            raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        if framed:
            return await _over_the_wire(response)
        return type(response).FromString(response.SerializeToString())

    async def forward(self, address: str, request, timeout: float):
        self.forwards[address] += 1
        response = await self._call(address, "Forward", request, timeout)
        self.calls[request.microbatch_id].forward.append(address)
        return response

    async def backward(self, address: str, request, timeout: float):
        response = await self._call(address, "Backward", request, timeout)
        self.calls[request.microbatch_id].backward.append(address)
        return response

    async def close(self) -> None:
        self.closed = True


class CountingClient:
    """A trainer's client that passes every call on to ``inner``, counting the calls and the bytes each
    way (:attr:`Framed.nbytes <swarmrt.wire.tensors.Framed.nbytes>`): what crosses the trainer's own link."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: collections.Counter = collections.Counter()
        self.bytes = 0

    async def _count(self, method: str, address: str, request, timeout: float):
        self.calls[method] += 1
        self.bytes += request.nbytes
        response = await getattr(self.inner, method)(address, request, timeout)
        self.bytes += response.nbytes
        return response

    async def forward(self, address: str, request, timeout: float):
        return await self._count("forward", address, request, timeout)

    async def backward(self, address: str, request, timeout: float):
        return await self._count("backward", address, request, timeout)

    async def close(self) -> None:
        await self.inner.close()


async def _over_the_wire(framed: Framed) -> Framed:
    """``framed`` as the receiver reads it off the data plane: framed into bytes, then put back
    together with every check (:class:`~swarmrt.wire.tensors.BadTensor` on the way back in)."""
    async def frames():
        for frame in to_frames(framed):
            yield frame

    try:
        return await read_frames(frames(), type(framed.message), type(framed.message).__name__)
    except BadTensor as e:
        raise rpc_error(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None


@dataclasses.dataclass
class InProcessSwarm:
    """Stage peers in this process: workers, their servicers, the records a trainer would read from
    the DHT, and an :class:`InProcessClient` over them. A peer's id and address are ``s{stage}p{j}``."""

    workers: dict[str, StageWorker]
    servicers: dict[str, StageServicer]
    records: list[StageRecord]
    client: InProcessClient

    @classmethod
    def build(cls, config: RunConfig, peers_per_stage: int = 1,
              throughput: Callable[[int, int], float] | None = None) -> "InProcessSwarm":
        """``peers_per_stage`` peers of every stage, each with freshly built (seeded) layers;
        ``throughput(stage, j)``: the samples/s its record announces (default 100)."""
        workers, servicers, records = {}, {}, []
        for stage in range(config.num_stages):
            for j in range(peers_per_stage):
                peer = f"s{stage}p{j}"
                workers[peer] = StageWorker(build_stage(config, stage), config, stage, stage_input_spec(config, stage))
                servicers[peer] = StageServicer(workers[peer], config.run.id, peer,
                                                config.network.max_tensor_mb << 20)
                servicers[peer].state = "serving"
                rate = throughput(stage, j) if throughput else 100.0
                records.append(StageRecord(peer_id=peer, stage=stage, address=peer, throughput=rate, load=0,
                                           version=0, state="serving", heartbeat=0.0))
        swarm = cls(workers, servicers, records, InProcessClient(servicers))
        relay = Relay(swarm, swarm.client, config.num_stages)  # peer-to-peer hops go through the same client
        for servicer in servicers.values():
            servicer.relay = relay
        return swarm

    async def address(self, stage: int, peer_id: str) -> str | None:
        """The :class:`~swarmrt.pipeline.chain.Directory` the peers chain through: :attr:`records`."""
        return next((r.address for r in self.records if r.peer_id == peer_id and r.stage == stage
                     and r.state == "serving"), None)

    def close(self) -> None:
        for servicer in self.servicers.values():
            servicer.close()
