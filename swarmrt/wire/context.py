"""A gRPC call's status outside gRPC: the error a ``grpc.aio`` client raises, and the part of a
server context the stage handler uses. The libp2p transport (:mod:`swarmrt.wire.p2p`) and the
in-process test client run the real :class:`~swarmrt.pipeline.service.StageServicer` with them, so
a trainer sees the same :class:`grpc.aio.AioRpcError` codes whichever way a call went."""

from __future__ import annotations

import time
from typing import Callable

import grpc


NOT_APPLIED = "; not applied"
"""How a peer's own DEADLINE_EXCEEDED ends: the work reached it too late and it applied nothing. A
DEADLINE_EXCEEDED without it is the caller's own timeout, which says nothing of what the peer did."""


def unanswered(e: grpc.aio.AioRpcError) -> bool:
    """Whether a failed call leaves unknown what the peer did with it: no answer came in time (the
    peer may have applied the work and frozen before replying), as opposed to the peer's refusal."""
    return e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and not (e.details() or "").endswith(NOT_APPLIED)


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """The error a ``grpc.aio`` client raises for a call that ended with ``code``."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class CallContext:
    """The part of :class:`grpc.aio.ServicerContext` that :class:`StageServicer` uses:
    ``time_remaining()`` counts down the call's timeout, ``abort(code, details)`` raises
    :func:`rpc_error`."""

    def __init__(self, timeout: float | None, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.deadline = None if timeout is None else clock() + timeout

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - self.clock())

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise rpc_error(code, details)
