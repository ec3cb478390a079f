"""Throughput of the stage service's two paths: direct gRPC and hivemind libp2p (swarmrt.wire.p2p).

Two DHT nodes on 127.0.0.1 (each a child process with its own p2pd): the
serving one runs an echo stage handler (Forward returns its input as output,
so the transport is what is measured) over gRPC and over libp2p; the calling
one sends Forward requests carrying one float32 tensor of each size, first over
gRPC, then over libp2p (``swarmrt.wire.p2p.P2PStageClient``, a ``p2p:``
address). Prints the median round trip and MiB/s (request + response bytes) per
path and size.

    python benchmarks/bench_p2p.py [--sizes-mb 1 4 16] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch

from swarmrt.discovery.dht import start_dht, stop_dht, visible_maddrs
from swarmrt.wire.client import StageClient
from swarmrt.wire.p2p import P2PStageClient, P2PStageService, p2p_address
from swarmrt.wire.proto import swarmrt_pb2 as pb
from swarmrt.wire.proto import swarmrt_pb2_grpc as pb_grpc
from swarmrt.wire.server import start_server
from swarmrt.wire.tensors import to_proto


class Echo(pb_grpc.StageServicer):
    """Forward: the input back as the output (no compute)."""

    async def Forward(self, request: pb.ForwardRequest, context) -> pb.ForwardResponse:
        return pb.ForwardResponse(output=request.input, model_version=0)


async def timed(call, repeat: int) -> float:
    await call()  # warm-up: connections, channels
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        await call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


async def main(sizes_mb: list[float], repeat: int) -> None:
    server_dht = await asyncio.to_thread(start_dht, None)
    client_dht = await asyncio.to_thread(start_dht, visible_maddrs(server_dht), client_mode=True)
    server = None
    try:
        service = P2PStageService(max_tensor_mb=256)
        service.servicer = Echo()
        server_p2p = await server_dht.replicate_p2p()
        await service.start(server_p2p)
        server, port = await start_server(Echo(), "127.0.0.1", 0, 256)
        grpc_client = StageClient(256)
        client_p2p = await client_dht.replicate_p2p()
        p2p_client = P2PStageClient(client_p2p, 256)
        paths = {"grpc": (grpc_client, f"127.0.0.1:{port}"),
                 "libp2p": (p2p_client, p2p_address(str(server_dht.peer_id), visible_maddrs(server_dht)))}
        print(f"{'path':8} {'MiB':>6} {'median s':>9} {'MiB/s':>8}")
        for size in sizes_mb:
            tensor = torch.randn(int(size * 2**20) // 4)
            request = pb.ForwardRequest(run_id="bench", stage=0, microbatch_id="m", input=to_proto(tensor))
            for name, (client, address) in paths.items():
                seconds = await timed(lambda: client.forward(address, request, timeout=120.0), repeat)
                print(f"{name:8} {size:6g} {seconds:9.4f} {2 * size / seconds:8.1f}", flush=True)
        await grpc_client.close()
        await server_p2p.shutdown()
        await client_p2p.shutdown()
    finally:
        if server is not None:
            await server.stop(grace=None)
        await asyncio.to_thread(stop_dht, client_dht)
        await asyncio.to_thread(stop_dht, server_dht)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.sizes_mb, args.repeat))
