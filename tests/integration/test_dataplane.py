"""The data plane (swarmrt.StageData) on a real grpc.aio server and client in this process (127.0.0.1):
byte-exact round trips for every dtype and codec, malformed streams refused while the peer keeps
serving, and network emulation rules applying to it."""

import itertools

import grpc
import pytest
import torch

from swarmrt.wire.client import StageClient
from swarmrt.wire.codecs import decode, encode
from swarmrt.wire.emulation import client_interceptors, events_path, read_effects, server_interceptors, write_rules
from swarmrt.wire.proto import swarmrt_pb2 as pb
from swarmrt.wire.proto import swarmrt_pb2_grpc as pb_grpc
from swarmrt.wire.server import DATA_SERVICE, start_server
from swarmrt.wire.tensors import CHUNK_BYTES, Framed, read_frames, to_frames
from tests.integration.test_emulation import mlp_stage

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

MIB = 2**20
LOSSLESS = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
            torch.int8, torch.uint8, torch.bool]
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LOSSY = ["fp16", "bf16", "int8", "int8_blockwise", "int8_blockwise:100", "topk:0.1"]


class Echo(pb_grpc.StageServicer):
    """Serves the data plane and answers every Forward with its input, re-encoded as it arrived."""

    async def ForwardStream(self, messages, context):
        request = await read_frames(messages, pb.ForwardRequest)
        response = Framed(pb.ForwardResponse(model_version=1), {"output": request.payloads["input"]})
        response.output.CopyFrom(request.input)
        for frame in to_frames(response):
            yield frame

    async def BackwardStream(self, messages, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "echo serves Forward only")


def sample(dtype: torch.dtype, shape=(3, 5, 7)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 3).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and \
        a.contiguous().view(torch.uint8).numpy().tobytes() == b.contiguous().view(torch.uint8).numpy().tobytes()


async def test_every_dtype_and_codec_round_trips_byte_exact_through_the_data_plane():
    server, port = await start_server(Echo(), "127.0.0.1", 0, max_tensor_mb=8)
    client = StageClient(8)
    cases = [(d, "none") for d in LOSSLESS] + list(itertools.product(FLOATS, LOSSY))
    try:
        for dtype, codec in cases:
            x = sample(dtype)
            request = Framed(pb.ForwardRequest(run_id="r", microbatch_id="m")).attach("input", x, codec)
            response = await client.forward(f"127.0.0.1:{port}", request, timeout=10)
            expected = x if codec == "none" else decode(encode(x, codec))  # the codec's loss, nothing more
            assert same_bits(response.tensor("output"), expected), (dtype, codec)
        big = torch.randn(3 * CHUNK_BYTES // 4 + 17)  # several chunks, the last one short
        request = Framed(pb.ForwardRequest()).attach("input", big)
        assert same_bits((await client.forward(f"127.0.0.1:{port}", request, timeout=10)).tensor("output"), big)
    finally:
        await client.close()
        await server.stop(None)


def header(x: torch.Tensor, sizes=None, codec="none", **fields) -> bytes:
    message = pb.ForwardRequest(run_id="emu", stage=1, microbatch_id="m", **fields)
    message.input.CopyFrom(pb.Tensor(dtype=str(x.dtype)[6:], shape=list(x.shape), codec=codec))
    message.payload_bytes.extend([x.numel() * x.element_size()] if sizes is None else sizes)
    return message.SerializeToString()


async def test_malformed_streams_are_refused_with_what_was_wrong_and_the_peer_keeps_serving():
    servicer, spec = mlp_stage()
    server, port = await start_server(servicer, "127.0.0.1", 0, max_tensor_mb=8)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    raw = channel.stream_stream(f"/{DATA_SERVICE}/Forward")
    client = StageClient(8)
    x = torch.randn(4, *spec.trailing)
    data = x.numpy().tobytes()
    n = len(data)
    bad = {
        "no header": ([], "empty stream"),
        "garbage header": ([b"\xff\xff\xff"], "malformed header"),
        "sizes for no tensor": ([header(x, sizes=[n, n])], "2 payload sizes for 1 tensors"),
        "over the limit": ([header(x, sizes=[16 * MIB])], "limit"),
        "more bytes": ([header(x), data + b"\x00" * 4], "more payload than announced"),
        "too many chunks": ([header(x)] + [data[i:i + 4] for i in range(0, 12, 4)] + [data[12:]], "too many chunks"),
        "empty chunk": ([header(x), b"", data], "chunk 1 of 0 bytes"),
        "truncated": ([header(x), data[:-3]], "truncated"),
        "size and shape disagree": ([header(x, sizes=[n - 4]), data[:-4]], f"should be {n} bytes"),
        "unknown codec": ([header(x, codec="zip9"), data], "unknown codec"),
        "NaN": ([header(x), torch.full_like(x, float("nan")).numpy().tobytes()], "NaN"),
    }
    try:
        for name, (messages, words) in bad.items():
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in raw(iter(messages), timeout=10):
                    pass
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in e.value.details(), \
                (name, e.value.code(), e.value.details())
            good = Framed(pb.ForwardRequest(run_id="emu", stage=1, microbatch_id=name)).attach("input", x)
            response = await client.forward(f"127.0.0.1:{port}", good, timeout=10)  # still serving
            assert response.tensor("output").shape[0] == 4
    finally:
        await channel.close()
        await client.close()
        await server.stop(None)
        servicer.close()


async def test_emulation_rules_apply_to_the_data_plane(tmp_path):
    rules, trainer_rules = tmp_path / "peer.rules.json", tmp_path / "trainer.rules.json"
    write_rules(trainer_rules, {"node": "trainer7"})
    servicer, spec = mlp_stage()
    server, port = await start_server(servicer, "127.0.0.1", 0, max_tensor_mb=8,
                                      interceptors=server_interceptors(rules, servicer.worker))
    client = StageClient(8, interceptors=client_interceptors(trainer_rules))
    address = f"127.0.0.1:{port}"

    async def outcome():
        request = Framed(pb.ForwardRequest(run_id="emu", stage=1, microbatch_id="m")).attach(
            "input", torch.randn(4, *spec.trailing))
        try:
            await client.forward(address, request, timeout=10)
            return "ok"
        except grpc.aio.AioRpcError as e:
            return f"{e.code().name}: {e.details()}"

    try:
        write_rules(rules, {"faults": [{"id": "f1", "method": "Forward", "action": "drop", "count": 1},
                                       {"id": "f2", "method": "Forward", "action": "corrupt", "mode": "nan"},
                                       {"id": "f3", "method": "Forward", "action": "corrupt", "mode": "truncate"}]})
        assert await outcome() == "UNAVAILABLE: emulated drop f1 (1/1) of Forward"
        assert "NaN" in await outcome()
        assert "truncated" in await outcome()
        assert await outcome() == "ok"
        write_rules(rules, {"partitions": [{"id": "f4", "deny": ["trainer7"]}]})  # the node name travels too
        assert await outcome() == "UNAVAILABLE: emulated partition f4: this peer is cut off from trainer7"
    finally:
        await client.close()
        await server.stop(None)
        servicer.close()
    assert read_effects(events_path(rules)) == {"f1": 1, "f2": 1, "f3": 1, "f4": 1}
