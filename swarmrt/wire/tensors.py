"""Tensors <-> protobuf ``Tensor`` messages. The codec math lives in ``swarmrt.wire.codecs``."""

from __future__ import annotations

import msgpack
import torch

from swarmrt.wire.codecs import EncodedTensor, decode, encode
from swarmrt.wire.proto import swarmrt_pb2 as pb


class BadTensor(ValueError):
    """A tensor message that cannot be used; the message says why."""


def to_proto(tensor: torch.Tensor, codec: str = "none") -> pb.Tensor:
    enc = encode(tensor.detach().cpu(), codec)
    return pb.Tensor(dtype=enc.dtype, shape=list(enc.shape), codec=enc.codec, data=enc.data,
                     meta=msgpack.packb(enc.meta) if enc.meta else b"")


def from_proto(msg: pb.Tensor, what: str = "tensor", max_bytes: int | None = None) -> torch.Tensor:
    """Decode and check a tensor message; :class:`BadTensor` names what was wrong."""
    if not msg.dtype:
        raise BadTensor(f"{what}: missing (no dtype)")
    if max_bytes is not None:
        numel = 1
        for d in msg.shape:
            numel *= max(int(d), 0)
        itemsize = _itemsize(msg.dtype, what)
        if numel * itemsize > max_bytes:
            raise BadTensor(f"{what}: {numel * itemsize} bytes decoded exceeds the limit of {max_bytes} bytes")
    if any(d < 0 for d in msg.shape):
        raise BadTensor(f"{what}: negative dimension in shape {list(msg.shape)}")
    try:
        meta = msgpack.unpackb(msg.meta) if msg.meta else {}
    except Exception as e:
        raise BadTensor(f"{what}: malformed codec metadata: {e}") from None
    if not isinstance(meta, dict):
        raise BadTensor(f"{what}: codec metadata must be a map")
    try:
        return decode(EncodedTensor(codec=msg.codec, dtype=msg.dtype, shape=tuple(msg.shape), data=msg.data, meta=meta))
    except ValueError as e:
        raise BadTensor(f"{what}: {e}") from None


def _itemsize(dtype: str, what: str) -> int:
    dt = getattr(torch, dtype, None)
    if not isinstance(dt, torch.dtype):
        raise BadTensor(f"{what}: unknown dtype {dtype!r}")
    return torch.empty((), dtype=dt).element_size()
