"""Client side of the stage service: one ``grpc.aio`` channel per peer address."""

from __future__ import annotations

from typing import Protocol

import grpc

from swarmrt.wire.proto import swarmrt_pb2 as pb
from swarmrt.wire.proto import swarmrt_pb2_grpc as pb_grpc
from swarmrt.wire.server import grpc_options


class StageCalls(Protocol):
    """What a trainer calls on stage peers. Failures raise :class:`grpc.aio.AioRpcError` with the
    peer's status code (:class:`StageClient` over gRPC; in tests, ``swarmrt.testing.inprocess``)."""

    async def forward(self, address: str, request: pb.ForwardRequest, timeout: float) -> pb.ForwardResponse: ...

    async def backward(self, address: str, request: pb.BackwardRequest, timeout: float) -> pb.BackwardResponse: ...

    async def close(self) -> None: ...


class StageClient:
    def __init__(self, max_tensor_mb: int = 256, interceptors=(), max_state_mb: int | None = None):
        self.max_tensor_mb = max_tensor_mb
        self.max_state_bytes = None if max_state_mb is None else max_state_mb << 20
        """Largest state :meth:`get_state` accepts by default (None: no limit)."""
        self.interceptors = list(interceptors)
        self._stubs: dict[str, tuple[grpc.aio.Channel, pb_grpc.StageStub]] = {}

    def stub(self, address: str) -> pb_grpc.StageStub:
        entry = self._stubs.get(address)
        if entry is None:
            channel = grpc.aio.insecure_channel(address, options=grpc_options(self.max_tensor_mb),
                                                interceptors=self.interceptors or None)
            entry = self._stubs[address] = (channel, pb_grpc.StageStub(channel))
        return entry[1]

    async def forward(self, address: str, request: pb.ForwardRequest, timeout: float) -> pb.ForwardResponse:
        return await self.stub(address).Forward(request, timeout=timeout)

    async def backward(self, address: str, request: pb.BackwardRequest, timeout: float) -> pb.BackwardResponse:
        return await self.stub(address).Backward(request, timeout=timeout)

    async def info(self, address: str, timeout: float = 5.0) -> pb.InfoResponse:
        return await self.stub(address).Info(pb.InfoRequest(), timeout=timeout)

    async def get_state(self, address: str, run_id: str, stage: int, timeout: float,
                        max_bytes: int | None = None) -> bytes:
        """The stage's state from ``address``; ``ValueError`` as soon as it declares or sends more than
        ``max_bytes`` (default: the client's ``max_state_mb``; a donor cannot make a joiner buffer
        without bound)."""
        max_bytes = self.max_state_bytes if max_bytes is None else max_bytes
        chunks, size = [], 0
        async for chunk in self.stub(address).GetState(pb.StateRequest(run_id=run_id, stage=stage), timeout=timeout):
            size += len(chunk.data)
            if max_bytes is not None and max(size, chunk.total_bytes) > max_bytes:
                raise ValueError(f"state from {address} is over the {max_bytes}-byte limit "
                                 f"(declares {chunk.total_bytes}, sent {size} so far)")
            chunks.append(chunk.data)
        return b"".join(chunks)

    async def close(self) -> None:
        for channel, _ in self._stubs.values():
            await channel.close()
        self._stubs.clear()
