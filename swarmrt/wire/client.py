"""Client side of the stage service: one ``grpc.aio`` channel per peer address.

``forward`` and ``backward`` take either a :class:`~swarmrt.wire.tensors.Framed` message (its
tensors beside it), which goes over the data plane (``StageData``: a header, then raw
chunks, each way) and comes back framed, or a plain protobuf request with its tensors inline,
which goes over the unary RPC and comes back as a protobuf response.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import grpc

from swarmrt.wire.proto import swarmrt_pb2 as pb
from swarmrt.wire.proto import swarmrt_pb2_grpc as pb_grpc
from swarmrt.wire.server import DATA_SERVICE, grpc_options
from swarmrt.wire.tensors import Framed, read_frames, to_frames


class StageCalls(Protocol):
    """What a trainer calls on stage peers: a :class:`Framed` request in, a :class:`Framed` response
    out. Failures raise :class:`grpc.aio.AioRpcError` with the peer's status code; a response that
    does not add up raises :class:`~swarmrt.wire.tensors.BadTensor` (:class:`StageClient` over gRPC;
    in tests, ``swarmrt.testing.inprocess``)."""

    async def forward(self, address: str, request: Framed, timeout: float) -> Framed: ...

    async def backward(self, address: str, request: Framed, timeout: float) -> Framed: ...

    async def close(self) -> None: ...


class StageClient:
    """``credentials(method)``: metadata to send with each call of ``method`` (the run's credential,
    :func:`swarmrt.auth.call_credentials`); passed per call, cheaper than a client interceptor."""

    def __init__(self, max_tensor_mb: int = 256, interceptors=(),
                 credentials: Callable[[str], Sequence[tuple[str, str]]] | None = None,
                 max_state_mb: int | None = None):
        self.max_tensor_mb = max_tensor_mb
        self.max_state_bytes = None if max_state_mb is None else max_state_mb << 20
        """Largest state :meth:`get_state` accepts by default (None: no limit)."""
        self.interceptors = list(interceptors)
        self._credentials = credentials
        self._stubs: dict[str, tuple[grpc.aio.Channel, pb_grpc.StageStub, dict]] = {}

    def _metadata(self, method: str, service: str = "swarmrt.Stage"):
        return self._credentials(f"/{service}/{method}") if self._credentials else None

    def _entry(self, address: str):
        entry = self._stubs.get(address)
        if entry is None:
            channel = grpc.aio.insecure_channel(address, options=grpc_options(self.max_tensor_mb),
                                                interceptors=self.interceptors or None)
            streams = {m: channel.stream_stream(f"/{DATA_SERVICE}/{m}") for m in ("Forward", "Backward")}
            entry = self._stubs[address] = (channel, pb_grpc.StageStub(channel), streams)
        return entry

    def stub(self, address: str) -> pb_grpc.StageStub:
        return self._entry(address)[1]

    async def _stream(self, address: str, method: str, request: Framed, response_type, timeout: float) -> Framed:
        call = self._entry(address)[2][method](to_frames(request), timeout=timeout,
                                               metadata=self._metadata(method, DATA_SERVICE))
        try:
            return await read_frames(call, response_type, f"{method} response from {address}",
                                     self.max_tensor_mb << 20)
        except BaseException:
            call.cancel()
            raise

    async def forward(self, address: str, request, timeout: float):
        if isinstance(request, Framed):
            return await self._stream(address, "Forward", request, pb.ForwardResponse, timeout)
        return await self.stub(address).Forward(request, timeout=timeout, metadata=self._metadata("Forward"))

    async def backward(self, address: str, request, timeout: float):
        if isinstance(request, Framed):
            return await self._stream(address, "Backward", request, pb.BackwardResponse, timeout)
        return await self.stub(address).Backward(request, timeout=timeout, metadata=self._metadata("Backward"))

    async def info(self, address: str, timeout: float = 5.0) -> pb.InfoResponse:
        return await self.stub(address).Info(pb.InfoRequest(), timeout=timeout, metadata=self._metadata("Info"))

    async def get_state(self, address: str, run_id: str, stage: int, timeout: float,
                        max_bytes: int | None = None) -> bytes:
        """The stage's state from ``address``; ``ValueError`` as soon as it declares or sends more than
        ``max_bytes`` (default: the client's ``max_state_mb``; a donor cannot make a joiner buffer
        without bound)."""
        max_bytes = self.max_state_bytes if max_bytes is None else max_bytes
        chunks, size = [], 0
        async for chunk in self.stub(address).GetState(pb.StateRequest(run_id=run_id, stage=stage), timeout=timeout,
                                                       metadata=self._metadata("GetState")):
            size += len(chunk.data)
            if max_bytes is not None and max(size, chunk.total_bytes) > max_bytes:
                raise ValueError(f"state from {address} is over the {max_bytes}-byte limit "
                                 f"(declares {chunk.total_bytes}, sent {size} so far)")
            chunks.append(chunk.data)
        return b"".join(chunks)

    async def close(self) -> None:
        for channel, _, _ in self._stubs.values():
            await channel.close()
        self._stubs.clear()
