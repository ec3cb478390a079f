"""The run credential on gRPC: a client interceptor that adds it to every call, and a server
interceptor that refuses a call without a good one (``UNAUTHENTICATED``, naming what is wrong).

The server interceptor answers before the request is decoded: an outsider's payload is never
parsed. The credential itself is :mod:`swarmrt.auth.credential`.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import grpc

from swarmrt.auth.credential import METADATA_KEY, credential_problem, make_credential

logger = logging.getLogger(__name__)


def _method(details) -> str:
    method = details.method
    return method.decode() if isinstance(method, bytes) else method


class _Credential:
    def __init__(self, secret: bytes, clock: Callable[[], float] = time.time):
        self.secret, self.clock = secret, clock

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        value = make_credential(self.secret, _method(details), self.clock())
        metadata = list(details.metadata or ()) + [(METADATA_KEY, value)]
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                          details.wait_for_ready)


class UnaryCredential(_Credential, grpc.aio.UnaryUnaryClientInterceptor):
    """Adds the run credential (:data:`~swarmrt.auth.credential.METADATA_KEY`) to every unary call."""

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class StreamCredential(_Credential, grpc.aio.UnaryStreamClientInterceptor):
    """The same for server-streaming calls (GetState). A separate class: a ``grpc.aio`` channel files
    an interceptor under the first kind it is an instance of, so one class of both kinds would
    leave streaming calls without the credential."""

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


def credential_interceptors(secret: bytes, clock: Callable[[], float] = time.time) -> tuple:
    """The client interceptors that put the run credential on every call."""
    return UnaryCredential(secret, clock), StreamCredential(secret, clock)


class CredentialServerInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call whose credential :func:`~swarmrt.auth.credential.credential_problem`
    finds wrong, with ``UNAUTHENTICATED`` and that problem as the details. ``refused`` counts them."""

    def __init__(self, secret: bytes, clock: Callable[[], float] = time.time):
        self.secret, self.clock = secret, clock
        self.refused = 0
        self._logged: set[str] = set()

    async def intercept_service(self, continuation, handler_call_details):
        method = _method(handler_call_details)
        value = next((v for k, v in (handler_call_details.invocation_metadata or ()) if k == METADATA_KEY), None)
        problem = credential_problem(value, self.secret, method, self.clock())
        handler = await continuation(handler_call_details)
        if problem is None or handler is None:
            return handler
        self.refused += 1
        kind = problem.split(" (")[0]
        if kind not in self._logged:  # once per kind of problem: an intruder must not flood the log
            self._logged.add(kind)
            logger.warning("refused %s: %s", method, problem)

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

        async def deny_stream(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)
            yield  # pragma: no cover (abort raises)

        # request_deserializer None: the raw bytes are never parsed
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(deny_stream, None, handler.response_serializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(deny, None, handler.response_serializer)
        return grpc.stream_unary_rpc_method_handler(deny, None, handler.response_serializer) \
            if handler.stream_unary is not None else \
            grpc.stream_stream_rpc_method_handler(deny_stream, None, handler.response_serializer)
