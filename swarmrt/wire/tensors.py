"""Tensors on the wire: protobuf ``Tensor`` headers, raw payloads beside them, and the data plane's framing.

A tensor travels as a header (a protobuf ``Tensor``: dtype, shape, codec, meta) and a payload
(the codec's bytes). On the unary RPCs the payload is inline (``Tensor.data``:
:func:`to_proto`, :func:`from_proto`). On the data plane (``StageData``, see
``proto/swarmrt.proto``) a call is a :class:`Framed` message: the stage message with its tensors'
headers only, and the payloads beside it, sent as the header then raw chunks (:func:`to_frames`)
and put back together by :func:`read_frames`, which checks every size before it trusts it.

Copies: a ``none`` tensor's payload is a view of the tensor's own memory (no copy until gRPC
takes each chunk as ``bytes``); a receiver writes each chunk once into one buffer and decodes
``none`` payloads with ``torch.frombuffer`` over it (no copy). The codec math lives in
``swarmrt.wire.codecs``.
"""

from __future__ import annotations

import math
from typing import AsyncIterable, Iterator

import msgpack
import torch
from google.protobuf.message import DecodeError

from swarmrt.wire.codecs import EncodedTensor, decode, encode
from swarmrt.wire.proto import swarmrt_pb2 as pb

CHUNK_BYTES = 1 << 20
"""A sender cuts each payload into chunks of this size (the last one of a payload may be shorter)."""
MAX_CHUNK_BYTES = 4 << 20
"""A receiver refuses a chunk larger than this."""
MIN_CHUNK_BYTES = 64 << 10
"""Chunks are counted against this size: a stream may hold at most ``total // MIN_CHUNK_BYTES`` chunks plus
one per payload, so a sender cannot keep a peer busy with millions of tiny chunks."""
MAX_HEADER_BYTES = 1 << 20
"""A receiver refuses a header (the first message of a stream) larger than this."""

TENSOR_FIELDS: dict[str, tuple[str, ...]] = {
    "ForwardRequest": ("input", "target"),
    "BackwardRequest": ("grad_output", "input"),
    "ForwardResponse": ("output",),
    "BackwardResponse": ("grad_input",),
}
"""The tensor fields of each stage message, in the order their payloads travel."""


class BadTensor(ValueError):
    """A tensor message (or a data-plane stream) that cannot be used; the message says why."""


def to_proto(tensor: torch.Tensor, codec: str = "none") -> pb.Tensor:
    """A tensor with its payload inline (the unary RPCs)."""
    header, payload = pack(tensor, codec)
    header.data = bytes(payload)
    return header


def from_proto(msg: pb.Tensor, what: str = "tensor", max_bytes: int | None = None) -> torch.Tensor:
    """Decode and check a tensor message with its payload inline; :class:`BadTensor` names what was wrong."""
    return unpack(msg, msg.data, what, max_bytes)


def pack(tensor: torch.Tensor, codec: str = "none") -> tuple[pb.Tensor, memoryview]:
    """A tensor's header (``data`` empty) and payload. With codec ``none`` the payload is a view of the
    tensor's own memory (a contiguous CPU copy first only if it is not one already)."""
    if codec != "none":
        enc = encode(tensor.detach(), codec)
        header = pb.Tensor(dtype=enc.dtype, shape=list(enc.shape), codec=enc.codec,
                           meta=msgpack.packb(enc.meta) if enc.meta else b"")
        return header, memoryview(enc.data).cast("B")
    t = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous()
    header = pb.Tensor(dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape), codec="none")
    if t.numel() == 0:
        return header, memoryview(b"")
    return header, memoryview(t.reshape(-1).view(torch.uint8).numpy())  # the array keeps ``t`` alive


def unpack(header: pb.Tensor, payload, what: str = "tensor", max_bytes: int | None = None) -> torch.Tensor:
    """Decode and check a tensor from its header and payload; :class:`BadTensor` names what was wrong.
    A writable ``none`` payload is not copied: the tensor is a view of it."""
    if not header.dtype:
        raise BadTensor(f"{what}: missing (no dtype)")
    if any(d < 0 for d in header.shape):
        raise BadTensor(f"{what}: negative dimension in shape {list(header.shape)}")
    itemsize = _itemsize(header.dtype, what)
    numel = math.prod(header.shape)
    if max_bytes is not None and numel * itemsize > max_bytes:
        raise BadTensor(f"{what}: {numel * itemsize} bytes decoded exceeds the limit of {max_bytes} bytes")
    try:
        meta = msgpack.unpackb(header.meta) if header.meta else {}
    except Exception as e:
        raise BadTensor(f"{what}: malformed codec metadata: {e}") from None
    if not isinstance(meta, dict):
        raise BadTensor(f"{what}: codec metadata must be a map")
    view = memoryview(payload).cast("B")
    if header.codec == "none" and not view.readonly:
        if view.nbytes != numel * itemsize:
            raise BadTensor(f"{what}: codec 'none': payload of {header.dtype}{list(header.shape)} should be "
                            f"{numel * itemsize} bytes ({numel} x {itemsize}-byte {header.dtype}), got {view.nbytes}")
        dtype = getattr(torch, header.dtype)
        if numel == 0:
            return torch.empty(tuple(header.shape), dtype=dtype)
        return torch.frombuffer(view, dtype=dtype, count=numel).reshape(tuple(header.shape))
    try:
        return decode(EncodedTensor(codec=header.codec, dtype=header.dtype, shape=tuple(header.shape), data=view,
                                    meta=meta))
    except ValueError as e:
        raise BadTensor(f"{what}: {e}") from None


def _itemsize(dtype: str, what: str) -> int:
    dt = getattr(torch, dtype, None)
    if not isinstance(dt, torch.dtype):
        raise BadTensor(f"{what}: unknown dtype {dtype!r}")
    return torch.empty((), dtype=dt).element_size()


class Framed:
    """A stage message (``ForwardRequest``, ``BackwardRequest`` or their responses) whose tensors
    travel beside it: each tensor field set on :attr:`message` holds only its header, and
    :attr:`payloads` maps the field to its bytes. Attribute reads go to the message
    (``framed.microbatch_id``, ``framed.HasField("input")``)."""

    __slots__ = ("message", "payloads")

    def __init__(self, message, payloads: dict[str, memoryview] | None = None):
        if type(message).__name__ not in TENSOR_FIELDS:
            raise TypeError(f"Framed carries a stage message, not {type(message).__name__}")
        self.message = message
        self.payloads: dict[str, memoryview] = dict(payloads or {})

    def __getattr__(self, name: str):
        return getattr(self.message, name)

    def __repr__(self) -> str:
        sizes = {f: p.nbytes for f, p in self.payloads.items()}
        return f"Framed({type(self.message).__name__}, payload bytes {sizes})"

    def attach(self, field: str, tensor: torch.Tensor, codec: str = "none") -> "Framed":
        """Set tensor field ``field`` to ``tensor`` encoded with ``codec``; returns self."""
        header, payload = pack(tensor, codec)
        getattr(self.message, field).CopyFrom(header)
        self.payloads[field] = payload
        return self

    def pass_through(self, field: str, source: "Framed", source_field: str) -> "Framed":
        """Set tensor ``field`` to ``source``'s ``source_field`` as it is (header and encoded bytes, not
        decoded again: a chaining peer passes a tensor on); returns self."""
        getattr(self.message, field).CopyFrom(getattr(source.message, source_field))
        self.payloads[field] = source.payloads.get(source_field, memoryview(b""))
        return self

    def tensor(self, field: str, what: str | None = None, max_bytes: int | None = None) -> torch.Tensor:
        """Decode and check tensor field ``field`` (:class:`BadTensor` when it is missing or malformed)."""
        return unpack(getattr(self.message, field), self.payloads.get(field, b""), what or field, max_bytes)

    @property
    def nbytes(self) -> int:
        """Bytes this message puts on the wire: header and payloads."""
        return self.message.ByteSize() + sum(p.nbytes for p in self.payloads.values())

    @classmethod
    def from_message(cls, message) -> "Framed":
        """Take over a message with its payloads inline (unary RPCs): they move beside it."""
        framed = cls(message)
        for field in TENSOR_FIELDS[type(message).__name__]:
            if message.HasField(field):
                framed.payloads[field] = memoryview(getattr(message, field).data)
                getattr(message, field).ClearField("data")
        return framed

    def to_message(self):
        """The message with its payloads inline (unary RPCs)."""
        for field, payload in self.payloads.items():
            getattr(self.message, field).data = bytes(payload)
        self.payloads = {}
        return self.message


def to_frames(framed: Framed, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The data-plane messages of ``framed``: its header (with ``payload_bytes``), then raw chunks."""
    message = framed.message
    fields = [f for f in TENSOR_FIELDS[type(message).__name__] if message.HasField(f)]
    payloads = [framed.payloads.get(f, memoryview(b"")) for f in fields]
    del message.payload_bytes[:]
    message.payload_bytes.extend(p.nbytes for p in payloads)
    yield message.SerializeToString()
    for payload in payloads:
        for offset in range(0, payload.nbytes, chunk_bytes):
            yield bytes(payload[offset:offset + chunk_bytes])


class _Assembler:
    """Puts one data-plane stream back together, refusing anything that does not add up."""

    def __init__(self, message_type, what: str, max_bytes: int | None):
        self.message_type, self.what, self.max_bytes = message_type, what, max_bytes

    def header(self, data: bytes) -> None:
        what = self.what
        if len(data) > MAX_HEADER_BYTES:
            raise BadTensor(f"{what}: header of {len(data)} bytes exceeds the limit of {MAX_HEADER_BYTES}")
        self.message = self.message_type()
        try:
            self.message.ParseFromString(data)
        except DecodeError as e:
            raise BadTensor(f"{what}: malformed header ({self.message_type.__name__}): {e}") from None
        self.fields = [f for f in TENSOR_FIELDS[self.message_type.__name__] if self.message.HasField(f)]
        sizes = list(self.message.payload_bytes)
        if len(sizes) != len(self.fields):
            raise BadTensor(f"{what}: header lists {len(sizes)} payload sizes for {len(self.fields)} tensors "
                            f"({', '.join(self.fields) or 'none'})")
        for field, size in zip(self.fields, sizes):
            if getattr(self.message, field).data:
                raise BadTensor(f"{what}: tensor {field} carries inline data on the data plane")
            if size < 0 or (self.max_bytes is not None and size > self.max_bytes):
                raise BadTensor(f"{what}: payload of {field} announced as {size} bytes (limit {self.max_bytes})")
        self.sizes, self.total, self.got, self.chunks = sizes, sum(sizes), 0, 0
        self.max_chunks = self.total // MIN_CHUNK_BYTES + len(sizes)
        self.buffer = torch.empty(self.total, dtype=torch.uint8)  # no zero fill: every byte is written below
        self.view = memoryview(self.buffer.numpy()) if self.total else memoryview(bytearray())

    def chunk(self, data: bytes) -> None:
        n, what = len(data), self.what
        self.chunks += 1
        if n == 0 or n > MAX_CHUNK_BYTES:
            raise BadTensor(f"{what}: chunk {self.chunks} of {n} bytes (chunks hold 1 to {MAX_CHUNK_BYTES} bytes)")
        if self.chunks > self.max_chunks:
            raise BadTensor(f"{what}: too many chunks ({self.chunks}, at most {self.max_chunks} for "
                            f"{self.total} bytes)")
        if self.got + n > self.total:
            raise BadTensor(f"{what}: more payload than announced ({self.got + n} bytes, header says {self.total})")
        self.view[self.got:self.got + n] = data
        self.got += n

    def finish(self) -> Framed:
        if self.got != self.total:
            raise BadTensor(f"{self.what}: stream ended after {self.got} of {self.total} payload bytes (truncated)")
        framed, offset = Framed(self.message), 0
        for field, size in zip(self.fields, self.sizes):
            framed.payloads[field] = self.view[offset:offset + size]
            offset += size
        return framed


async def read_frames(messages: AsyncIterable[bytes], message_type, what: str = "stream",
                      max_bytes: int | None = None) -> Framed:
    """The :class:`Framed` message a data-plane stream carries (every size checked, nothing decoded yet);
    :class:`BadTensor` says what did not add up."""
    assembler, first = _Assembler(message_type, what, max_bytes), True
    async for data in messages:
        if not isinstance(data, (bytes, bytearray)):
            raise BadTensor(f"{what}: expected raw bytes, got {type(data).__name__}")
        if first:
            assembler.header(data)
            first = False
        else:
            assembler.chunk(data)
    if first:
        raise BadTensor(f"{what}: empty stream (no header)")
    return assembler.finish()
