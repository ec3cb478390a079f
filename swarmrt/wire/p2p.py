"""The stage service over hivemind's libp2p, for peers whose gRPC port nobody can dial.

A peer behind NAT (or a firewall) can still be reached through its DHT node's
libp2p host: directly when its DHT port is open, else through a libp2p relay
(``--use-auto-relay``). This module carries the *same* protobuf messages as the
gRPC service (:mod:`swarmrt.wire.proto`) over libp2p streams of the DHT's p2pd
(``dht.replicate_p2p()``), and runs the same
:class:`~swarmrt.pipeline.service.StageServicer` on the serving side, so a
trainer sees the same :class:`grpc.aio.AioRpcError` codes either way. Direct gRPC
stays the fast path; a peer announces a libp2p address (:func:`p2p_address`)
only when no peer could dial its gRPC address back at join.

One call is one libp2p stream of ``BytesValue`` messages (hivemind's unary
messages are capped at 4 MiB, tensors are not): a msgpack header
``{"timeout": seconds, "size": bytes}``, then the serialized request in chunks
of :data:`CHUNK`; the answer is the serialized response in chunks (``GetState``:
one ``StateChunk`` per message). Sizes are checked before anything is kept
(``max_tensor_mb``); a handler's abort travels as ``"CODE: details"`` and becomes
that gRPC status again on the caller's side.

The dial-back (:func:`ask_dial_back`, :class:`DialBack`): a joining peer asks
others, over libp2p, to call ``Info`` on its announced gRPC address; each answers
with the peer id that answered there, or why it could not reach it.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Sequence

import grpc
import msgpack
from google.protobuf.wrappers_pb2 import BytesValue
from hivemind.p2p import P2P, P2PContext, P2PHandlerError, PeerID
from hivemind.utils.multiaddr import Multiaddr

from swarmrt.wire.client import StageCalls, StageClient
from swarmrt.wire.tensors import Framed
from swarmrt.wire.context import CallContext, rpc_error
from swarmrt.wire.proto import swarmrt_pb2 as pb

logger = logging.getLogger(__name__)

PREFIX = "p2p:"
"""A stage address that starts with this is a libp2p one: ``p2p:PEER_ID@MADDR,MADDR``."""
HANDLER = "swarmrt.stage."
DIAL_HANDLER = "swarmrt.dialback"
CHUNK = 1 << 20
HEADER_MAX = 256
METHODS = {"Forward": (pb.ForwardRequest, pb.ForwardResponse), "Backward": (pb.BackwardRequest, pb.BackwardResponse),
           "Info": (pb.InfoRequest, pb.InfoResponse), "GetState": (pb.StateRequest, pb.StateChunk)}
_ADDRESS = re.compile(r"^[A-Za-z0-9.\-\[\]:]{1,253}:\d{1,5}$")


# -- addresses ----------------------------------------------------------------------------------
def is_p2p_address(address: str) -> bool:
    return address.startswith(PREFIX)


def p2p_address(peer_id: str, maddrs: Iterable[str] = ()) -> str:
    """The stage address of a peer served over libp2p: its peer id and the multiaddrs to dial."""
    maddrs = [m for m in maddrs if "," not in m and "@" not in m]
    return f"{PREFIX}{peer_id}" + (f"@{','.join(maddrs)}" if maddrs else "")


def parse_p2p_address(address: str) -> tuple[PeerID, list[Multiaddr]]:
    """``(peer id, multiaddrs)`` of a :func:`p2p_address`; ValueError naming the address if it is not one."""
    if not is_p2p_address(address):
        raise ValueError(f"not a libp2p stage address: {address!r}")
    peer, _, maddrs = address[len(PREFIX):].partition("@")
    try:
        peer_id = PeerID.from_base58(peer)
        raw = peer_id.to_bytes()
        if not (raw[:2] == b"\x12\x20" and len(raw) == 34 or raw[:1] == b"\x00" and len(raw) == raw[1] + 2):
            raise ValueError("not a libp2p peer id")
        return peer_id, [daemon_maddr(m) for m in maddrs.split(",") if m]
    except Exception as e:
        raise ValueError(f"bad libp2p stage address {address!r}: {e}") from None


def daemon_maddr(text: str) -> Multiaddr:
    """``text`` as a multiaddr p2pd can parse: hivemind's multiaddr library encodes a ``/p2p/ID``
    component as a CID, p2pd (go-multiaddr) wants the raw multihash, so those are re-encoded."""
    out, plain, parts = b"", [], text.strip("/").split("/")

    def flush() -> bytes:
        done = Multiaddr("/" + "/".join(plain)).to_bytes() if plain else b""
        plain.clear()
        return done

    i = 0
    while i < len(parts):
        if parts[i] in ("p2p", "ipfs") and i + 1 < len(parts):
            raw = PeerID.from_base58(parts[i + 1]).to_bytes()
            out += flush() + P2P_CODE + _varint(len(raw)) + raw
            i += 2
        else:
            plain.append(parts[i])
            i += 1
    return Multiaddr(out + flush())


P2P_CODE = b"\xa5\x03"  # multicodec 421 (p2p) as a varint


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


# -- framing ------------------------------------------------------------------------------------
def _chunks(data: bytes) -> list[BytesValue]:
    return [BytesValue(value=data[i:i + CHUNK]) for i in range(0, len(data), CHUNK)] or [BytesValue()]


async def _gather(stream: AsyncIterator[BytesValue], limit: int, what: str) -> bytes:
    parts, size = [], 0
    async for part in stream:
        size += len(part.value)
        if size > limit:
            raise rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{what} over {limit} bytes")
        parts.append(part.value)
    return b"".join(parts)


def _status(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status a failed libp2p call stands for."""
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code(), error.details() or ""
    text = str(error)
    if isinstance(error, P2PHandlerError):
        found = re.search(r": ([A-Z_]+): (.*)$", text, re.S)
        if found and found.group(1) in grpc.StatusCode.__members__:
            return grpc.StatusCode[found.group(1)], found.group(2)
        return grpc.StatusCode.INTERNAL, text
    return grpc.StatusCode.UNAVAILABLE, f"libp2p: {type(error).__name__}: {text}"


P2P_METHOD = "/swarmrt.Stage.p2p/"
"""What a libp2p call's credential is made for, before the method name (not a gRPC method: a
credential made for one path is refused on the other)."""


# -- serving ------------------------------------------------------------------------------------
class P2PStageService:
    """Serves :data:`METHODS` of :attr:`servicer` (set and replaced by the peer as it moves between
    stages; None: UNAVAILABLE) on a libp2p host."""

    def __init__(self, max_tensor_mb: int, check: Callable[[str, Any], str | None] | None = None):
        self.limit = max_tensor_mb * 2**20 + 2**20  # + room for the message envelope
        self.check = check
        """``check(method, metadata)``: what is wrong with a call's credentials (None: good); the
        run's membership check (:func:`swarmrt.auth.p2p_check`), or None in an open run."""
        self.servicer = None
        self.calls = 0
        """Calls that reached a servicer (tests and benchmarks read it)."""

    async def start(self, p2p: P2P) -> None:
        for method in METHODS:
            async def handle(requests, context: P2PContext, method=method):
                async for item in self.serve(method, requests):
                    yield item
            await p2p.add_protobuf_handler(HANDLER + method, handle, BytesValue, stream_input=True,
                                           stream_output=True)

    async def serve(self, method: str, requests: AsyncIterator[BytesValue]) -> AsyncIterator[BytesValue]:
        request_type, _ = METHODS[method]
        try:
            header = await anext(requests)
            if len(header.value) > HEADER_MAX:
                raise rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "call header too large")
            meta = msgpack.unpackb(header.value)
            timeout = meta.get("timeout") if isinstance(meta, dict) else None
            if not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
                raise rpc_error(grpc.StatusCode.INVALID_ARGUMENT, f"bad call timeout {timeout!r}")
            if self.check is not None:  # before the request is read: an outsider's bytes are never parsed
                problem = self.check(P2P_METHOD + method, meta.get("metadata"))
                if problem is not None:
                    raise rpc_error(grpc.StatusCode.UNAUTHENTICATED, problem)
            request = request_type.FromString(await _gather(requests, self.limit, f"{method} request"))
            servicer = self.servicer
            if servicer is None:
                raise rpc_error(grpc.StatusCode.UNAVAILABLE, "this peer serves no stage now")
            self.calls += 1
            context = CallContext(float(timeout))
            if method == "GetState":
                async for chunk in servicer.GetState(request, context):
                    yield BytesValue(value=chunk.SerializeToString())
                return
            response = await asyncio.wait_for(getattr(servicer, method)(request, context), timeout)
            for part in _chunks(response.SerializeToString()):
                yield part
        except Exception as e:
            if isinstance(e, asyncio.TimeoutError):
                e = rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
            elif not isinstance(e, grpc.aio.AioRpcError):
                e = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, f"bad {method} call: {type(e).__name__}: {e}")
            code, details = _status(e)
            raise RuntimeError(f"{code.name}: {details}") from None  # hivemind sends the message to the caller


# -- calling ------------------------------------------------------------------------------------
class P2PStageClient:
    """:class:`~swarmrt.wire.client.StageCalls` over libp2p, to :func:`p2p_address` addresses.
    ``p2p`` is a :class:`hivemind.p2p.P2P` or an async function returning one (made on first use)."""

    def __init__(self, p2p: P2P | Callable[[], Awaitable[P2P]], max_tensor_mb: int = 256, credentials=None):
        self.limit = max_tensor_mb * 2**20 + 2**20
        self.credentials = credentials
        """As :class:`~swarmrt.wire.client.StageClient`'s: ``credentials(method)`` gives the metadata
        pairs a call carries (in its header here)."""
        made_here = not hasattr(p2p, "iterate_protobuf_handler")
        self._factory, self._p2p = (p2p, None) if made_here else (None, p2p)
        self._connected: set[str] = set()

    async def host(self) -> P2P:
        if self._p2p is None:
            self._p2p = await self._factory()
        return self._p2p

    async def _open(self, method: str, address: str, request, timeout: float) -> AsyncIterator[BytesValue]:
        peer_id, maddrs = parse_p2p_address(address)
        p2p = await self.host()
        if address not in self._connected and maddrs:
            await p2p._client.connect(peer_id, maddrs)  # hivemind has no public connect(); its daemon client does
            self._connected.add(address)
        header: dict[str, Any] = {"timeout": float(timeout)}
        if self.credentials is not None:
            header["metadata"] = [list(pair) for pair in self.credentials(P2P_METHOD + method)]
        frames = [BytesValue(value=msgpack.packb(header)), *_chunks(request.SerializeToString())]

        async def requests():
            for frame in frames:
                yield frame

        return await p2p.iterate_protobuf_handler(peer_id, HANDLER + method, requests(), BytesValue)

    async def _unary(self, method: str, address: str, request, timeout: float):
        async def call():
            data = await _gather(await self._open(method, address, request, timeout), self.limit, f"{method} response")
            return METHODS[method][1].FromString(data)

        return await self._guarded(call(), timeout)

    async def _guarded(self, call: Awaitable, timeout: float):
        try:
            return await asyncio.wait_for(call, timeout)
        except asyncio.TimeoutError:
            raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded (libp2p)") from None
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._connected.clear()
            raise rpc_error(*_status(e)) from None

    async def forward(self, address: str, request, timeout: float):
        return await self._framed("Forward", address, request, timeout)

    async def backward(self, address: str, request, timeout: float):
        return await self._framed("Backward", address, request, timeout)

    async def _framed(self, method: str, address: str, request, timeout: float):
        """A data-plane request (:class:`~swarmrt.wire.tensors.Framed`, as the trainer sends) travels
        here as one message with its payloads inline, and its reply comes back framed the same way."""
        if not isinstance(request, Framed):
            return await self._unary(method, address, request, timeout)
        message = type(request.message)()
        message.CopyFrom(request.message)  # the request stays as it was: a retry may send it elsewhere
        for field, payload in request.payloads.items():
            getattr(message, field).data = bytes(payload)
        return Framed.from_message(await self._unary(method, address, message, timeout))

    async def info(self, address: str, timeout: float = 5.0) -> pb.InfoResponse:
        return await self._unary("Info", address, pb.InfoRequest(), timeout)

    async def get_state(self, address: str, run_id: str, stage: int, timeout: float) -> bytes:
        async def call():
            stream = await self._open("GetState", address, pb.StateRequest(run_id=run_id, stage=stage), timeout)
            chunks = [pb.StateChunk.FromString(part.value).data async for part in stream]
            return b"".join(chunks)

        return await self._guarded(call(), timeout)

    async def close(self) -> None:
        self._connected.clear()
        if self._factory is not None and self._p2p is not None:  # made here: closed here
            await self._p2p.shutdown()  # this process's connection to the DHT's p2pd, not the daemon
            self._p2p = None


class RoutedClient:
    """:class:`~swarmrt.wire.client.StageCalls` that sends each call the way its address says:
    ``host:port`` over gRPC (the fast path), :func:`p2p_address` over libp2p."""

    def __init__(self, grpc_client: StageClient, p2p_client: P2PStageClient):
        self.grpc, self.p2p = grpc_client, p2p_client

    def _pick(self, address: str) -> StageCalls:
        return self.p2p if is_p2p_address(address) else self.grpc

    async def forward(self, address: str, request: pb.ForwardRequest, timeout: float) -> pb.ForwardResponse:
        return await self._pick(address).forward(address, request, timeout)

    async def backward(self, address: str, request: pb.BackwardRequest, timeout: float) -> pb.BackwardResponse:
        return await self._pick(address).backward(address, request, timeout)

    async def info(self, address: str, timeout: float = 5.0) -> pb.InfoResponse:
        return await self._pick(address).info(address, timeout)

    async def get_state(self, address: str, run_id: str, stage: int, timeout: float) -> bytes:
        return await self._pick(address).get_state(address, run_id, stage, timeout)

    async def close(self) -> None:
        await self.grpc.close()
        await self.p2p.close()


def routed_client(dht, max_tensor_mb: int, interceptors=(), credentials=None) -> RoutedClient:
    """gRPC for ``host:port`` addresses, libp2p (through ``dht``'s p2pd) for the others."""
    return RoutedClient(StageClient(max_tensor_mb, interceptors=interceptors, credentials=credentials),
                        P2PStageClient(lambda: dht.replicate_p2p(), max_tensor_mb, credentials=credentials))


# -- dial-back ----------------------------------------------------------------------------------
class DialBack:
    """Answers "can you reach my gRPC address?": calls ``Info`` there (one dial at a time, each at
    most ``timeout`` seconds) and answers ``{its peer id: {"peer_id": who answered}}`` or
    ``{its peer id: {"error": why not}}``. It only ever dials ``host:port`` addresses, and only the
    stage service's ``Info``. Asked with ``via`` (up to :data:`MAX_VIA` peer ids), it passes the
    question on to those peers instead and returns their answers: a joiner behind NAT may reach
    only its bootstrap, which reaches everyone."""

    def __init__(self, timeout: float = 3.0, credentials=None):
        self.timeout = timeout
        self.credentials = credentials  # a member dials a member's stage service with the run credential
        self._one_at_a_time = asyncio.Semaphore(1)
        self.waiting = 0
        self.p2p: P2P | None = None

    async def start(self, p2p: P2P) -> None:
        self.p2p = p2p
        await p2p.add_protobuf_handler(DIAL_HANDLER, self.handle, BytesValue)

    async def handle(self, request: BytesValue, context: P2PContext) -> BytesValue:
        question = msgpack.unpackb(request.value) if len(request.value) <= HEADER_MAX * 4 else None
        if not isinstance(question, dict) or not isinstance(question.get("address"), str):
            return BytesValue(value=msgpack.packb({"answers": {}}))
        via = question.get("via") or []
        if isinstance(via, list) and via and all(isinstance(v, str) for v in via):
            answers = await ask_dial_back(self.p2p, via[:MAX_VIA], question["address"], self.timeout + 1)
        else:
            answers = {self.p2p.peer_id.to_base58(): await self.dial(question["address"])}
        return BytesValue(value=msgpack.packb({"answers": answers}))

    async def dial(self, address: str) -> dict[str, str]:
        if not _ADDRESS.match(address):
            return {"error": f"not a host:port address: {address[:80]!r}"}
        if self.waiting >= MAX_WAITING:  # a flood of questions gets answers, not a queue
            return {"error": "busy: too many dial-back requests"}
        self.waiting += 1
        try:
            async with self._one_at_a_time:
                return await self._dial(address)
        finally:
            self.waiting -= 1

    async def _dial(self, address: str) -> dict[str, str]:
        client = StageClient(1, credentials=self.credentials)
        try:
            info = await client.info(address, timeout=self.timeout)
            return {"peer_id": info.peer_id}
        except grpc.aio.AioRpcError as e:
            return {"error": f"{e.code().name}: {' '.join((e.details() or '').split())[:200]}"}
        finally:
            await client.close()


MAX_VIA = 3
MAX_WAITING = 8


def _answers(value: bytes) -> dict[str, dict[str, str]] | None:
    reply = msgpack.unpackb(value)
    answers = reply.get("answers") if isinstance(reply, dict) else None
    if not isinstance(answers, dict):
        return None
    return {k: v for k, v in answers.items() if isinstance(k, str) and isinstance(v, dict)
            and all(isinstance(a, str) and isinstance(b, str) for a, b in v.items())}


async def ask_dial_back(p2p: P2P, dialers: Sequence[str], address: str, timeout: float = 5.0,
                        via: Sequence[str] = (), expect: str | None = None) -> dict[str, dict[str, str]]:
    """Ask each peer in ``dialers`` (peer ids, all at once) to dial ``address`` (with ``via``: to pass
    the question on to those peers); ``{peer id: answer}``, the answer ``{"peer_id": ...}``,
    ``{"error": ...}``, or ``{"no_answer": why}`` for a peer that could not be asked. With ``expect``
    (a peer id), stop at the first ``{"peer_id": expect}`` (a frozen dialer costs nothing then)."""
    question = BytesValue(value=msgpack.packb({"address": address, "via": list(via)}))

    async def ask(dialer: str) -> dict[str, dict[str, str]]:
        try:
            call = p2p.call_protobuf_handler(PeerID.from_base58(dialer), DIAL_HANDLER, question, BytesValue)
            answers = _answers((await asyncio.wait_for(call, timeout)).value)
            if answers is None:
                return {dialer: {"no_answer": "malformed answer"}}
            return {k: v for k, v in answers.items() if k in via} if via else {dialer: answers.get(dialer, {
                "no_answer": "it did not answer for itself"})}
        except Exception as e:
            return {dialer: {"no_answer": f"{type(e).__name__}: {e}"[:160]}}

    found: dict[str, dict[str, str]] = {}
    tasks = [asyncio.ensure_future(ask(d)) for d in dialers]
    try:
        for next_done in asyncio.as_completed(tasks):
            for peer, answer in (await next_done).items():
                if peer not in found or "no_answer" in found[peer]:
                    found[peer] = answer
            if expect is not None and any(a.get("peer_id") == expect for a in found.values()):
                break
    finally:
        for task in tasks:
            task.cancel()
    return found
