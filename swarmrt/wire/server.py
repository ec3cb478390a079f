"""The gRPC server and channel options of the stage service (``grpc.aio``).

What a request *means* lives in :mod:`swarmrt.pipeline.service`; this module
only knows how to listen, how large a message may be, and where the data plane
(``StageData``: raw-bytes streams, see ``proto/swarmrt.proto``) is registered.
"""

from __future__ import annotations

import grpc

from swarmrt.wire.proto import swarmrt_pb2_grpc as pb_grpc

DATA_SERVICE = "swarmrt.StageData"
"""The data plane's gRPC service name; its methods are ``Forward`` and ``Backward`` (the same names as the
unary calls, so network emulation rules that name a method apply to both)."""


def grpc_options(max_tensor_mb: int) -> list[tuple[str, int]]:
    """Message limits raised deliberately from gRPC's 4 MiB default to the configured tensor cap."""
    limit = max_tensor_mb * 2**20 + 2**20  # + room for the message envelope
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]


def data_plane_handler(servicer) -> grpc.GenericRpcHandler:
    """The data plane's methods over ``servicer.ForwardStream`` and ``servicer.BackwardStream``; no
    (de)serializer: every message of these streams is raw bytes (a protobuf header, then payload chunks)."""
    return grpc.method_handlers_generic_handler(DATA_SERVICE, {
        "Forward": grpc.stream_stream_rpc_method_handler(servicer.ForwardStream),
        "Backward": grpc.stream_stream_rpc_method_handler(servicer.BackwardStream),
    })


async def start_server(servicer: pb_grpc.StageServicer, host: str, port: int, max_tensor_mb: int,
                       interceptors=(), max_concurrent_rpcs: int | None = None) -> tuple[grpc.aio.Server, int]:
    """Serve the unary stage service, and the data plane when ``servicer`` has its stream methods.
    ``max_concurrent_rpcs``: calls served at once; gRPC refuses more with RESOURCE_EXHAUSTED."""
    server = grpc.aio.server(options=grpc_options(max_tensor_mb), interceptors=list(interceptors),
                             maximum_concurrent_rpcs=max_concurrent_rpcs)
    pb_grpc.add_StageServicer_to_server(servicer, server)
    if hasattr(servicer, "ForwardStream") and hasattr(servicer, "BackwardStream"):
        server.add_generic_rpc_handlers((data_plane_handler(servicer),))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    await server.start()
    return server, bound
