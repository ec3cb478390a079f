"""The stage service: turns wire messages into :class:`StageWorker` calls.

Both ways of calling it, the unary ``Forward``/``Backward`` (tensors inline) and the data
plane's streams (``StageData``: a header, then raw chunks; see
:mod:`swarmrt.wire.tensors`), end in the same :meth:`StageServicer.forward_framed` and
:meth:`StageServicer.backward_framed`, so every check below holds on both.

Every failure becomes a gRPC status whose details say what was wrong, and the
peer keeps serving the others:

- a data-plane stream that does not add up (header, sizes, chunks): INVALID_ARGUMENT
- bad tensor, wrong dtype/shape, NaN/Inf, wrong run or stage, a sequence over
  ``network.max_sequence_length``, parameter gradients that are not finite (dropped, not
  applied): INVALID_ARGUMENT
- more than ``network.max_concurrent_rpcs`` calls at once: RESOURCE_EXHAUSTED (gRPC's own check)
- a message over the size limit: RESOURCE_EXHAUSTED (gRPC's own check)
- backward with no kept context and no input: FAILED_PRECONDITION (resend with input)
- deadline passed before the gradients could be applied: DEADLINE_EXCEEDED, its details ending in
  ``; not applied`` (:data:`swarmrt.wire.context.NOT_APPLIED`), which tells it from the caller's own
  timeout. A backward asked again after its answer was lost is answered (its input gradient), never
  applied twice, whatever its deadline.
- the peer is draining, or its weights are not finite (it serves nothing more): UNAVAILABLE
- a chained request (peer-to-peer hops, :mod:`swarmrt.pipeline.chain`) whose route cannot be one of
  this run, or to a peer that passes nothing on: INVALID_ARGUMENT, before any compute. A chained call
  whose later hop fails, or names a peer the run's DHT does not vouch for (never called), is not an
  error: the reply says where the chain broke.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from typing import Callable

import grpc

from swarmrt.pipeline.chain import HEAD, Relay
from swarmrt.pipeline.worker import ContextMissing, DeadlineExpired, StageError, StageWorker, Unhealthy
from swarmrt.wire.proto import swarmrt_pb2 as pb
from swarmrt.wire.proto import swarmrt_pb2_grpc as pb_grpc
from swarmrt.wire.context import NOT_APPLIED
from swarmrt.wire.tensors import BadTensor, Framed, read_frames, to_frames

logger = logging.getLogger(__name__)

STATE_CHUNK = 1 << 20
# Gradients are applied only if at least this much of the caller's deadline is left, so a
# trainer that times out and retries elsewhere never sees its microbatch applied twice.
APPLY_MARGIN_S = 0.25
# A Backward whose caller's wall-clock deadline (BackwardRequest.deadline_unix) passed more than
# this long ago on this peer's clock is stale: refused, never applied. The allowance absorbs clock
# differences between hosts (NTP keeps them in milliseconds); a request read after a freeze is
# seconds late.
STALE_ALLOWANCE_S = 1.0


class StageServicer(pb_grpc.StageServicer):
    def __init__(self, worker: StageWorker, run_id: str, peer_id: str, max_tensor_bytes: int,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time):
        self.worker = worker
        self.run_id = run_id
        self.peer_id = peer_id
        self.max_tensor_bytes = max_tensor_bytes
        self.clock, self.wall_clock = clock, wall_clock
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage-compute")
        self.inflight = 0
        self.state = "joining"
        self.idle = asyncio.Event()
        self.idle.set()
        self.relay: Relay | None = None
        """How this peer passes chained work on (peer-to-peer hops); None: it refuses chained requests."""

    def _check_target(self, run_id: str, stage: int) -> None:
        if run_id != self.run_id:
            raise StageError(f"run {run_id!r} is not served here (this peer serves run {self.run_id!r})")
        if stage != self.worker.stage:
            raise StageError(f"stage {stage} is not served here (this peer serves stage {self.worker.stage})")

    @contextlib.contextmanager
    def _in_flight(self):
        """Count a call in flight while it lasts (the drain waits until none is)."""
        self.inflight += 1
        self.idle.clear()
        try:
            yield
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self.idle.set()

    async def _run(self, fn, *args):
        """``fn(*args)`` on the compute thread, counted in flight."""
        with self._in_flight():
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _call(self, context: grpc.aio.ServicerContext, fn, *args):
        try:
            return await self._run(fn, *args)
        except Exception as e:
            status = self._status(e)
            if status is None:
                raise
            await context.abort(*status)

    def _status(self, e: Exception) -> tuple[grpc.StatusCode, str] | None:
        """The gRPC status a failed call answers with (None: not one of ours; it propagates)."""
        if isinstance(e, (StageError, BadTensor)):
            return grpc.StatusCode.INVALID_ARGUMENT, str(e)
        if isinstance(e, ContextMissing):
            return grpc.StatusCode.FAILED_PRECONDITION, str(e)
        if isinstance(e, DeadlineExpired):  # marked, so the caller knows this is no lost answer
            return grpc.StatusCode.DEADLINE_EXCEEDED, f"{e}{NOT_APPLIED}"
        if isinstance(e, Unhealthy):  # non-finite weights: serve nothing, callers go elsewhere
            return grpc.StatusCode.UNAVAILABLE, str(e)
        if isinstance(e, (IndexError, RuntimeError)):  # e.g. token id out of the vocabulary
            logger.warning("stage %s: request failed: %s", self.worker.stage, e)
            return grpc.StatusCode.INVALID_ARGUMENT, f"{type(e).__name__}: {e}"
        return None

    async def _chained(self, request: Framed, context: grpc.aio.ServicerContext) -> bool:
        """Whether ``request`` is chained (its route goes on); refused before any compute when this peer
        passes nothing on or the route cannot be one of this run."""
        if not len(request.next):
            return False
        try:
            if self.relay is None:
                raise StageError("this peer does not pass work on to other peers (no peer-to-peer hops here)")
            self.relay.check_route(request.next, "next")
        except StageError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return True

    def _done(self, **fields) -> pb.HopDone:
        return pb.HopDone(stage=self.worker.stage, peer_id=self.peer_id, model_version=self.worker.version, **fields)

    def _check_length(self, msg: pb.Tensor, what: str) -> None:
        """Refuse a sequence longer than ``network.max_sequence_length`` before decoding it."""
        cap = self.worker.config.network.max_sequence_length
        if self.worker.spec.batch_dims >= 2 and len(msg.shape) >= 2 and msg.shape[1] > cap:
            raise StageError(f"{what}: sequence length {msg.shape[1]} exceeds network.max_sequence_length = {cap}")

    def _deadline(self, context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else self.clock() + remaining - APPLY_MARGIN_S

    # -- the calls, whatever carried them (unary with inline payloads, or the data plane) ------------
    async def forward_framed(self, request: Framed, context: grpc.aio.ServicerContext) -> Framed:
        """Forward ``request`` (its tensors beside it); the response, framed the same way."""
        if self.state == "leaving":
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"peer {self.peer_id} is leaving")
        chained = await self._chained(request, context)

        def run() -> Framed:
            self._check_target(request.run_id, request.stage)
            self._check_length(request.input, "input")
            x = request.tensor("input", "input", self.max_tensor_bytes)
            response = Framed(pb.ForwardResponse(model_version=self.worker.version, done=[self._done()]))
            if request.HasField("target") and not chained:  # the route's last hop: the loss, here
                self._check_length(request.target, "target")
                target = request.tensor("target", "target", self.max_tensor_bytes)
                response.message.loss = self.worker.forward_loss(request.microbatch_id, x, target, request.keep_context)
                response.message.has_loss = True
                return response
            out = self.worker.forward(request.microbatch_id, x, request.keep_context)
            return response.attach("output", out, request.output_codec or "none")

        response = await self._call(context, run)
        if not chained:
            return response
        with self._in_flight():  # a draining peer answers its chain before it leaves
            return await self.relay.forward_on(request, response, response.done[0], context.time_remaining())

    async def backward_framed(self, request: Framed, context: grpc.aio.ServicerContext) -> Framed:
        """Backward ``request`` (its tensors beside it); the response, framed the same way."""
        deadline = self._deadline(context)
        if request.deadline_unix > 0:  # the caller's own deadline, for a request read late
            stale_at = self.clock() + (request.deadline_unix + STALE_ALLOWANCE_S - self.wall_clock())
            deadline = stale_at if deadline is None else min(deadline, stale_at)

        chained = await self._chained(request, context)

        def gradients():
            self._check_target(request.run_id, request.stage)
            self._check_length(request.grad_output, "grad_output")
            self._check_length(request.input, "input")
            grad = None if request.from_loss else request.tensor("grad_output", "grad_output", self.max_tensor_bytes)
            x = request.tensor("input", "input", self.max_tensor_bytes) if request.HasField("input") else None
            pending = self.worker.gradients(request.microbatch_id, grad, x, request.need_grad_input or chained)
            if chained and pending.grad_input is None:
                raise StageError("next: this hop has no input gradient to pass on (its input is token ids)")
            return pending

        def respond(stepped: bool, done: list) -> Framed:
            return Framed(pb.BackwardResponse(model_version=self.worker.version, stepped=stepped, done=done))

        if not chained:
            def run() -> Framed:
                pending = gradients()
                stepped = self.worker.apply(pending, deadline)
                response = respond(stepped, [self._done(stepped=stepped)])
                if pending.grad_input is not None and request.need_grad_input:
                    response.attach("grad_input", pending.grad_input, request.grad_codec or "none")
                return response

            return await self._call(context, run)
        head = request.microbatch_id.endswith(HEAD)  # a tied head's gradient must join its microbatch's step

        def gradients_and_head():  # on this same peer, so it applies first (a dead peer applies nothing anyway)
            pending = gradients()
            return pending, (self.worker.apply(pending, deadline) if head else None)

        pending, stepped = await self._call(context, gradients_and_head)
        grad_input = Framed(pb.BackwardResponse()).attach("grad_input", pending.grad_input, request.grad_codec or "none")
        with self._in_flight():  # a draining peer answers its chain (and applies) before it leaves
            below, broken, given = await self.relay.backward_on(request, grad_input, context.time_remaining())
        try:  # only now, so a peer that dies while the hops below run has applied nothing
            if stepped is None:
                stepped = await self._run(self.worker.apply, pending, deadline)
        except Exception as e:
            status = self._status(e)
            if status is None:
                raise
            # the hops below applied; this one must be redone, from the gradient it was given
            response = respond(False, below)
            response.message.broken.CopyFrom(pb.ChainBreak(stage=self.worker.stage, peer_id=self.peer_id,
                                                           code=status[0].name, details=status[1]))
            return response if request.from_loss else response.pass_through("grad_input", request, "grad_output")
        response = respond(stepped, [self._done(stepped=stepped), *below])
        if broken is None:
            return response
        response.message.broken.CopyFrom(broken)
        return response.pass_through("grad_input", given, "grad_input")

    # -- unary RPCs: payloads inline -------------------------------------------------------------
    async def Forward(self, request: pb.ForwardRequest, context: grpc.aio.ServicerContext) -> pb.ForwardResponse:
        return (await self.forward_framed(Framed.from_message(request), context)).to_message()

    async def Backward(self, request: pb.BackwardRequest, context: grpc.aio.ServicerContext) -> pb.BackwardResponse:
        return (await self.backward_framed(Framed.from_message(request), context)).to_message()

    # -- the data plane (StageData): header, then raw chunks, each way ----------------------
    @staticmethod
    async def _refuse(messages, context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str):
        async for _ in messages:  # let the caller finish sending (bounded by its deadline), else its
            pass  # grpc reports a failed write (INTERNAL) instead of this status
        await context.abort(code, details)

    async def _stream(self, messages, context: grpc.aio.ServicerContext, message_type, call):
        if self.state == "leaving":  # nothing of the payload is kept
            await self._refuse(messages, context, grpc.StatusCode.UNAVAILABLE, f"peer {self.peer_id} is leaving")
        try:
            request = await read_frames(messages, message_type, message_type.__name__, self.max_tensor_bytes)
        except BadTensor as e:
            await self._refuse(messages, context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        for frame in to_frames(await call(request, context)):
            yield frame

    async def ForwardStream(self, messages, context: grpc.aio.ServicerContext):
        async for frame in self._stream(messages, context, pb.ForwardRequest, self.forward_framed):
            yield frame

    async def BackwardStream(self, messages, context: grpc.aio.ServicerContext):
        async for frame in self._stream(messages, context, pb.BackwardRequest, self.backward_framed):
            yield frame

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        stats = self.worker.stats()
        return pb.InfoResponse(run_id=self.run_id, stage=self.worker.stage, peer_id=self.peer_id,
                               throughput=stats["throughput"], load=self.inflight, model_version=stats["version"],
                               samples_applied=stats["samples_applied"],
                               microbatches_applied=stats["microbatches_applied"], state=self.state)

    async def GetState(self, request: pb.StateRequest, context: grpc.aio.ServicerContext):
        if request.run_id != self.run_id or request.stage != self.worker.stage:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"state of run {request.run_id!r} stage {request.stage} is not served here")
        try:
            data = await asyncio.get_running_loop().run_in_executor(self.executor, self.worker.state_bytes)
        except Unhealthy as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        for offset in range(0, len(data), STATE_CHUNK):
            yield pb.StateChunk(data=data[offset:offset + STATE_CHUNK], total_bytes=len(data))

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
