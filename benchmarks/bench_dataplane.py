"""Data plane: a 64 MiB float32 activation forward between two processes.

Side by side in one run, interleaved so all see the same machine load:
- swarmrt: the runtime's own path (tensor -> ``Framed`` -> StageClient -> the
  data plane, a header then raw 1 MiB chunks over a gRPC stream -> StageServicer
  -> an identity stage -> back -> tensor), codec ``none``: 64 MiB out, 64 MiB back;
- swarmrt unary: the unary ``Forward`` RPC with the tensors inside the protobuf
  messages (the transport before the data plane; still served);
- raw TCP: a socket echo server in another process: 64 MiB out, 64 MiB back;
- hivemind P2P: hivemind's own way of moving a tensor between peers (as its
  ``hivemind.moe`` servers do): ``serialize_torch_tensor``, ``split_for_streaming``
  into 4 MiB parts, a protobuf stream handler over libp2p (``P2P``), deserialized
  on the other side, and the same back.

Prints the median seconds of each and the ratios (swarmrt vs raw TCP: 1.0 = as fast
as raw TCP; swarmrt vs hivemind: how many times faster).

    python benchmarks/bench_dataplane.py [--mib 64] [--repeats 5] [--codec none] [--no-hivemind]
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


def _hivemind_server(maddr_queue, stop) -> None:
    from hivemind.p2p import P2P
    from hivemind.compression import deserialize_tensor_stream, serialize_torch_tensor
    from hivemind.p2p.p2p_daemon_bindings.control import DEFAULT_MAX_MSG_SIZE
    from hivemind.proto import runtime_pb2
    from hivemind.utils.streaming import split_for_streaming

    async def echo(requests, context):
        (tensor,) = await deserialize_tensor_stream(request.tensors async for request in requests)
        for part in split_for_streaming(serialize_torch_tensor(tensor), DEFAULT_MAX_MSG_SIZE):
            yield runtime_pb2.ExpertResponse(tensors=[part])

    async def serve():
        p2p = await P2P.create()
        try:
            await p2p.add_protobuf_handler("bench.echo", echo, runtime_pb2.ExpertRequest,
                                           stream_input=True, stream_output=True)
            maddr_queue.put([str(m) for m in await p2p.get_visible_maddrs()])
            await asyncio.to_thread(stop.wait)
        finally:
            await p2p.shutdown()  # stops its p2pd too

    asyncio.run(serve())


class HivemindEcho:
    def __init__(self, loop, maddrs: list[str]):
        from hivemind.p2p import P2P, PeerID

        self.loop = loop
        self.p2p = loop.run_until_complete(P2P.create(initial_peers=maddrs))
        self.peer = PeerID.from_base58(maddrs[0].rsplit("/p2p/", 1)[1])

    def round_trip(self, tensor: torch.Tensor) -> float:
        from hivemind.compression import deserialize_tensor_stream, serialize_torch_tensor
        from hivemind.p2p.p2p_daemon_bindings.control import DEFAULT_MAX_MSG_SIZE
        from hivemind.proto import runtime_pb2
        from hivemind.utils.streaming import split_for_streaming

        async def once():
            async def requests():
                for part in split_for_streaming(serialize_torch_tensor(tensor), DEFAULT_MAX_MSG_SIZE):
                    yield runtime_pb2.ExpertRequest(uid="echo", tensors=[part])

            responses = await self.p2p.iterate_protobuf_handler(self.peer, "bench.echo", requests(),
                                                                runtime_pb2.ExpertResponse)
            (out,) = await deserialize_tensor_stream(response.tensors async for response in responses)
            return out

        t0 = time.perf_counter()
        out = self.loop.run_until_complete(once())
        assert out.shape == tensor.shape
        return time.perf_counter() - t0

    def close(self) -> None:
        self.loop.run_until_complete(self.p2p.shutdown())


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
    def __init__(self, loop, port: int, mib: int, codec: str, unary: bool = False):
        from swarmrt.wire.client import StageClient

        self.loop, self.unary = loop, unary
        self.client = StageClient(mib * 2 + 16)
        self.address, self.codec = f"127.0.0.1:{port}", codec

    def round_trip(self, tensor: torch.Tensor) -> float:
        from swarmrt.wire.proto import swarmrt_pb2 as pb
        from swarmrt.wire.tensors import Framed, from_proto, to_proto

        async def once():
            if self.unary:  # the unary RPC, tensors inside the protobuf messages (the previous transport)
                request = pb.ForwardRequest(run_id="swarmrt", stage=0, microbatch_id="bench",
                                            input=to_proto(tensor, self.codec), output_codec=self.codec)
                return from_proto((await self.client.forward(self.address, request, timeout=60)).output)
            request = Framed(pb.ForwardRequest(run_id="swarmrt", stage=0, microbatch_id="bench",
                                               output_codec=self.codec)).attach("input", tensor, self.codec)
            response = await self.client.forward(self.address, request, timeout=60)
            return response.tensor("output")

        t0 = time.perf_counter()
        out = self.loop.run_until_complete(once())
        assert out.shape == tensor.shape
        return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--codec", default="none")
    parser.add_argument("--no-hivemind", action="store_true", help="skip hivemind's P2P (it needs p2pd)")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    tensor = torch.randn(1, args.mib * 2**20 // 4)
    q1, q2, q3, stop = ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_grpc_server, args=(q1, args.mib), daemon=True),
             ctx.Process(target=_tcp_echo, args=(q2,), daemon=True)]
    if not args.no_hivemind:
        procs.append(ctx.Process(target=_hivemind_server, args=(q3, stop)))
    for p in procs:
        p.start()
    loop = asyncio.new_event_loop()
    hive = None
    times: dict[str, list[float]] = {"tcp": [], "swarmrt": [], "unary": [], "hivemind": []}
    try:
        tcp, rpc = TcpEcho(q2.get(timeout=60)), GrpcForward(loop, q1.get(timeout=120), args.mib, args.codec)
        port = rpc.address.rsplit(":", 1)[1]
        unary = GrpcForward(loop, int(port), args.mib, args.codec, unary=True)
        paths = {"tcp": lambda: tcp.round_trip(payload), "swarmrt": lambda: rpc.round_trip(tensor),
                 "unary": lambda: unary.round_trip(tensor)}
        if not args.no_hivemind:
            hive = HivemindEcho(loop, q3.get(timeout=120))
            paths["hivemind"] = lambda: hive.round_trip(tensor)
        payload = tensor.numpy().tobytes()
        for run in paths.values():  # warm up every path
            run()
        for _ in range(args.repeats):
            for name, run in paths.items():
                times[name].append(run())
    finally:
        if hive is not None:
            hive.close()
        stop.set()
        for p in procs:
            if p.daemon:
                p.terminate()
            p.join(timeout=30)
    med = {k: statistics.median(v) for k, v in times.items() if v}
    moved = 2 * args.mib
    print(f"payload {args.mib} MiB each way, codec {args.codec}, median of {args.repeats}")
    print(f"raw TCP echo      : {med['tcp']:.3f} s  ({moved / med['tcp']:7.1f} MiB/s)")
    print(f"swarmrt Forward   : {med['swarmrt']:.3f} s  ({moved / med['swarmrt']:7.1f} MiB/s)")
    print(f"swarmrt unary     : {med['unary']:.3f} s  ({moved / med['unary']:7.1f} MiB/s)  "
          f"(the unary RPC, tensors inside protobuf)")
    if "hivemind" in med:
        print(f"hivemind P2P      : {med['hivemind']:.3f} s  ({moved / med['hivemind']:7.1f} MiB/s)")
    print(f"ratio swarmrt/raw : {med['tcp'] / med['swarmrt']:.2f}  (target >= 0.5)")
    if "hivemind" in med:
        print(f"swarmrt vs hivemind P2P: {med['hivemind'] / med['swarmrt']:.2f}x faster  (target >= 2)")


if __name__ == "__main__":
    main()
