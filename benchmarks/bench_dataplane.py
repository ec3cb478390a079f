"""Data plane: a 64 MiB float32 activation forward between two processes.

Side by side in one run, interleaved so both see the same machine load:
- swarmrt: the runtime's own path (tensor -> protobuf -> StageClient -> gRPC ->
  StageServicer -> an identity stage -> back -> tensor), codec ``none``:
  64 MiB out, 64 MiB back;
- raw TCP: a socket echo server in another process: 64 MiB out, 64 MiB back.

Prints the median seconds of each and the ratio raw/swarmrt (1.0 = as fast as raw TCP).

    python benchmarks/bench_dataplane.py [--mib 64] [--repeats 5] [--codec none]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import socket
import statistics
import struct
import time

import torch


def _grpc_server(port_queue, mib: int) -> None:
    from swarmrt.config import config_from_dict
    from swarmrt.pipeline.service import StageServicer
    from swarmrt.wire.server import start_server
    from swarmrt.roles.proc import new_event_loop
    from swarmrt.pipeline.worker import InputSpec, StageWorker

    limit_mb = mib * 2 + 16
    config = config_from_dict({"network": {"max_tensor_mb": limit_mb}})
    worker = StageWorker(torch.nn.Sequential(torch.nn.Identity()), config, 0,
                         InputSpec(torch.float32, 1, (mib * 2**20 // 4,)))

    async def serve():
        servicer = StageServicer(worker, config.run.id, "bench", limit_mb * 2**20)
        servicer.state = "serving"
        server, port = await start_server(servicer, "127.0.0.1", 0, limit_mb)
        port_queue.put(port)
        await server.wait_for_termination()

    new_event_loop().run_until_complete(serve())


def _recv_exact(conn: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = conn.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("peer closed")
        got += k
    return buf


def _tcp_echo(port_queue) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port_queue.put(srv.getsockname()[1])
    conn, _ = srv.accept()
    try:
        while True:
            header = _recv_exact(conn, 8)
            (n,) = struct.unpack("!Q", header)
            data = _recv_exact(conn, n)
            conn.sendall(header)
            conn.sendall(data)
    except ConnectionError:
        return


class TcpEcho:
    def __init__(self, port: int):
        self.conn = socket.create_connection(("127.0.0.1", port))

    def round_trip(self, payload: bytes) -> float:
        t0 = time.perf_counter()
        self.conn.sendall(struct.pack("!Q", len(payload)))
        self.conn.sendall(payload)
        (n,) = struct.unpack("!Q", _recv_exact(self.conn, 8))
        back = _recv_exact(self.conn, n)
        assert len(back) == len(payload)
        return time.perf_counter() - t0


class GrpcForward:
    def __init__(self, port: int, mib: int, codec: str):
        from swarmrt.wire.client import StageClient

        self.loop = asyncio.new_event_loop()
        self.client = StageClient(mib * 2 + 16)
        self.address, self.codec = f"127.0.0.1:{port}", codec

    def round_trip(self, tensor: torch.Tensor) -> float:
        from swarmrt.wire.proto import swarmrt_pb2 as pb
        from swarmrt.wire.tensors import from_proto, to_proto

        async def once():
            request = pb.ForwardRequest(run_id="swarmrt", stage=0, microbatch_id="bench",
                                        input=to_proto(tensor, self.codec), output_codec=self.codec)
            response = await self.client.forward(self.address, request, timeout=60)
            return from_proto(response.output)

        t0 = time.perf_counter()
        out = self.loop.run_until_complete(once())
        assert out.shape == tensor.shape
        return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--codec", default="none")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    tensor = torch.randn(1, args.mib * 2**20 // 4)
    q1, q2 = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_grpc_server, args=(q1, args.mib), daemon=True),
             ctx.Process(target=_tcp_echo, args=(q2,), daemon=True)]
    for p in procs:
        p.start()
    try:
        tcp, rpc = TcpEcho(q2.get(timeout=60)), GrpcForward(q1.get(timeout=120), args.mib, args.codec)
        payload = tensor.numpy().tobytes()
        tcp.round_trip(payload), rpc.round_trip(tensor)  # warm up both paths
        tcp_times, grpc_times = [], []
        for _ in range(args.repeats):
            tcp_times.append(tcp.round_trip(payload))
            grpc_times.append(rpc.round_trip(tensor))
    finally:
        for p in procs:
            p.terminate()
    t_tcp, t_grpc = statistics.median(tcp_times), statistics.median(grpc_times)
    moved = 2 * args.mib
    print(f"payload {args.mib} MiB each way, codec {args.codec}, median of {args.repeats}")
    print(f"raw TCP echo      : {t_tcp:.3f} s  ({moved / t_tcp:7.1f} MiB/s)")
    print(f"swarmrt Forward   : {t_grpc:.3f} s  ({moved / t_grpc:7.1f} MiB/s)")
    print(f"ratio swarmrt/raw : {t_tcp / t_grpc:.2f}  (target >= 0.5)")


if __name__ == "__main__":
    main()
