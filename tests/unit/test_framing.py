"""The data plane's framing without sockets: a header plus raw chunks, checked on the way in, and no
copies where none are needed."""

import asyncio

import pytest
import torch

from swarmrt.wire.proto import swarmrt_pb2 as pb
from swarmrt.wire.tensors import (CHUNK_BYTES, MAX_CHUNK_BYTES, BadTensor, Framed, read_frames, to_frames,
                                  to_proto)

pytestmark = pytest.mark.timeout(30)


def read(frames, message_type=pb.BackwardRequest, max_bytes=None):
    async def messages():
        for frame in frames:
            yield frame

    return asyncio.run(read_frames(messages(), message_type, "test", max_bytes))


def test_a_backward_with_two_tensors_is_cut_into_chunks_and_put_back_together():
    grad = torch.randn(2 * CHUNK_BYTES // 4 + 3)
    x = torch.arange(10)
    framed = Framed(pb.BackwardRequest(microbatch_id="m", samples=4)).attach("grad_output", grad, "none")
    framed.attach("input", x)
    frames = list(to_frames(framed))
    sizes = [len(f) for f in frames[1:]]
    assert sizes == [CHUNK_BYTES, CHUNK_BYTES, 12, 80]  # chunks never span two payloads
    back = read(frames)
    assert list(back.payload_bytes) == [grad.numel() * 4, 80] and back.microbatch_id == "m"
    assert torch.equal(back.tensor("grad_output"), grad) and torch.equal(back.tensor("input"), x)


def test_none_payloads_are_views_not_copies_on_both_sides():
    x = torch.zeros(1000)
    framed = Framed(pb.ForwardRequest()).attach("input", x)
    x[0] = 7.0  # the payload is the tensor's own memory
    assert framed.payloads["input"][:4].tobytes() == torch.tensor([7.0]).numpy().tobytes()
    back = read(to_frames(framed), pb.ForwardRequest)
    decoded = back.tensor("input")
    back.payloads["input"][4:8] = torch.tensor([5.0]).numpy().tobytes()  # decoded over the receive buffer
    assert decoded[0] == 7.0 and decoded[1] == 5.0


def test_unary_messages_and_framed_ones_carry_the_same_tensors():
    message = pb.ForwardRequest(microbatch_id="u", input=to_proto(torch.ones(3, 2, dtype=torch.bfloat16), "none"))
    framed = Framed.from_message(message)
    assert framed.input.data == b"" and framed.payloads["input"].nbytes == 12
    assert torch.equal(framed.tensor("input"), torch.ones(3, 2, dtype=torch.bfloat16))
    again = framed.to_message()
    assert len(again.input.data) == 12 and framed.payloads == {}


@pytest.mark.parametrize("frames, words", [
    ([pb.ForwardRequest(input=pb.Tensor(dtype="float32", shape=[1], data=b"abcd"), payload_bytes=[4]
                        ).SerializeToString(), b"abcd"], "inline data"),
    ([pb.ForwardRequest(input=pb.Tensor(dtype="float32", shape=[2**21]), payload_bytes=[2**23]).SerializeToString(),
      b"\x00" * (MAX_CHUNK_BYTES + 1)], "chunk 1 of 4194305 bytes"),
    ([pb.ForwardRequest(input=pb.Tensor(dtype="float32", shape=[1]), payload_bytes=[-4]).SerializeToString()],
     "announced as -4 bytes"),
    ([pb.ForwardRequest(payload_bytes=[4]).SerializeToString(), b"abcd"], "1 payload sizes for 0 tensors"),
    ([b"\x00" * (2**20 + 1)], "header of 1048577 bytes"),
])
def test_streams_that_do_not_add_up_are_refused_with_what_was_wrong(frames, words):
    with pytest.raises(BadTensor, match=words):
        read(frames, pb.ForwardRequest)


def test_a_payload_over_the_callers_limit_is_refused_before_anything_is_allocated():
    header = pb.ForwardRequest(input=pb.Tensor(dtype="float32", shape=[2**28]), payload_bytes=[2**30])
    with pytest.raises(BadTensor, match=r"announced as 1073741824 bytes \(limit 1048576\)"):
        read([header.SerializeToString()], pb.ForwardRequest, max_bytes=2**20)
