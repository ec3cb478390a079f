"""Tensor codecs: what crosses the network, made smaller, as plain bytes.

Everything a swarm sends is a tensor: activations (forward), their gradients
(backward), pseudo-gradients (local SGD rounds) and state (joiners). This
module turns a tensor into an :class:`EncodedTensor` (codec name, original
dtype and shape, a ``bytes`` payload and a small msgpack-able ``meta`` dict)
and back. The tensor wire format (:mod:`swarmrt.wire.tensors`) puts those five fields into its
messages; nothing here knows about protobuf, gRPC or hivemind.

Codec names (``CODEC_NAMES``); a name may carry one parameter after a colon:

============================  ======================================================
``none``                      lossless raw bytes, any dtype (int64 token ids, bool,
                              bfloat16, ...); one copy each way
``fp16``                      IEEE half; finite values beyond +-65504 are clamped
                              (not turned into inf); nan/inf pass through
``bf16``                      bfloat16 (8-bit mantissa, float32 range)
``int8``                      uniform affine 8-bit over the whole tensor:
                              ``q = round((x - min) / scale)``, ``scale = (max - min) / 255``;
                              no clipping, so every value is within ``scale / 2``
``int8_blockwise[:B]``        symmetric 8-bit per block of ``B`` values (default 4096):
                              ``q = round(x / absmax_block * 127)``; one float32 scale
                              per block; every value within ``absmax_block / 254``
``topk[:F]``                  top-k sparsification: keeps the ``ceil(F * numel)``
                              values of largest magnitude (default ``F = 0.01``) as
                              int32 (int64 beyond 2**31 values) indices + values in the
                              original dtype; the rest decode as 0. Use it through
                              :class:`ErrorFeedback` so what was dropped is sent later.
============================  ======================================================

Lossy codecs refuse non-floating tensors (integer token ids go with
``none``) and the 8-bit codecs refuse nan/inf (a scale computed from them
would silently destroy the whole tensor). Decoding checks the payload length
and the meta against the dtype and shape and raises ``ValueError`` saying
what was expected and what arrived.

Why not ``hivemind.compression``: its codecs return protobuf messages,
importing it starts hivemind (1.6 s, and the core layer must import no
network code), its uniform 8-bit clips beyond 3 sigma, its blockwise 8-bit
needs bitsandbytes (not a dependency), and its 8-bit decoders break under
numpy >= 2.4. The math is a few torch lines, so it lives here; the
all-reduce in ``swarmrt.local_sgd.averaging`` still uses hivemind's own codecs,
because its protocol needs them.

Byte order is the machine's (little-endian on every platform torch ships).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
import warnings

import torch

__all__ = [
    "CODEC_NAMES",
    "Codec",
    "EncodedTensor",
    "ErrorFeedback",
    "decode",
    "encode",
    "get_codec",
]

CODEC_NAMES: tuple[str, ...] = ("none", "fp16", "bf16", "int8", "int8_blockwise", "topk")

_FP16_MAX = float(torch.finfo(torch.float16).max)
_DEFAULT_BLOCK = 4096
_DEFAULT_TOPK_FRACTION = 0.01


@dataclasses.dataclass(frozen=True)
class EncodedTensor:
    """A tensor as it travels: codec name, original dtype and shape, payload, codec metadata."""

    codec: str
    """Codec name as given to :func:`get_codec` (e.g. ``"int8"``, ``"topk:0.05"``)."""
    dtype: str
    """Original torch dtype without the ``torch.`` prefix, e.g. ``"float32"``, ``"int64"``."""
    shape: tuple[int, ...]
    """Original shape (a list from msgpack is accepted and turned into a tuple)."""
    data: bytes
    """The payload (``bytes``; ``bytearray``/``memoryview`` are accepted without a copy)."""
    meta: dict = dataclasses.field(default_factory=dict)
    """Small msgpack-able dict with ``str`` keys the codec needs to decode (scales, counts)."""

    def __post_init__(self) -> None:
        if not isinstance(self.codec, str):
            raise ValueError(f"EncodedTensor.codec must be a str, got {type(self.codec).__name__}")
        if not isinstance(self.dtype, str):
            raise ValueError(f"EncodedTensor.dtype must be a str, got {type(self.dtype).__name__}")
        try:
            shape = tuple(self.shape)
        except TypeError:
            raise ValueError(f"EncodedTensor.shape must be a sequence of ints, got {self.shape!r}") from None
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise ValueError(f"EncodedTensor.shape must hold non-negative ints, got {self.shape!r}")
        object.__setattr__(self, "shape", shape)
        if not isinstance(self.data, (bytes, bytearray, memoryview)):
            raise ValueError(f"EncodedTensor.data must be bytes, got {type(self.data).__name__}")
        if not isinstance(self.meta, dict) or not all(isinstance(k, str) for k in self.meta):
            raise ValueError(f"EncodedTensor.meta must be a dict with str keys, got {self.meta!r}")

    @property
    def numel(self) -> int:
        """Number of values of the original tensor."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size of the payload in bytes (what the codec saved is ``numel * itemsize - nbytes``)."""
        return memoryview(self.data).nbytes


# ---------------------------------------------------------------------------------------------
# helpers


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in encoded tensor")
    return dtype


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    return tensor.resolve_conj().resolve_neg().contiguous()


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    """The bytes of a contiguous CPU tensor, one copy."""
    if tensor.numel() == 0:
        return b""
    return tensor.reshape(-1).view(torch.uint8).numpy().tobytes()


def _view(data, dtype: torch.dtype, offset: int, count: int) -> torch.Tensor:
    """A 1-d tensor over ``data`` without a copy. Read-only buffers are shared too, so the
    result must only be read (callers convert or clone it before returning it)."""
    if count == 0:
        return torch.empty(0, dtype=dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(data, dtype=dtype, count=count, offset=offset)


def _check_nbytes(encoded: EncodedTensor, expected: int, layout: str) -> None:
    got = encoded.nbytes
    if got != expected:
        raise ValueError(
            f"codec {encoded.codec!r}: payload of {encoded.dtype}{list(encoded.shape)} should be "
            f"{expected} bytes ({layout}), got {got}"
        )


def _meta_number(encoded: EncodedTensor, key: str, kind: type) -> float | int:
    if key not in encoded.meta:
        raise ValueError(f"codec {encoded.codec!r}: meta lacks {key!r} (meta keys: {sorted(encoded.meta)})")
    value = encoded.meta[key]
    ok = isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        ok = ok or isinstance(value, float)
    if not ok:
        raise ValueError(f"codec {encoded.codec!r}: meta[{key!r}] must be {kind.__name__}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise ValueError(f"codec {encoded.codec!r}: meta[{key!r}] must be finite, got {value!r}")
    return kind(value)


def _floating_input(codec: str, tensor: torch.Tensor) -> torch.Tensor:
    tensor = _cpu(tensor)
    if not tensor.is_floating_point():
        raise ValueError(
            f"codec {codec!r} is lossy and encodes floating-point tensors only, got {tensor.dtype}; "
            f"send integer/bool tensors (e.g. token ids) with codec 'none'"
        )
    return tensor


def _floating_output(encoded: EncodedTensor) -> torch.dtype:
    dtype = _parse_dtype(encoded.dtype)
    if not dtype.is_floating_point:
        raise ValueError(f"codec {encoded.codec!r} decodes floating-point tensors only, got dtype {encoded.dtype}")
    return dtype


def _finite_or_raise(codec: str, *values: float) -> None:
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"codec {codec!r} cannot encode a tensor holding nan or inf values")


# ---------------------------------------------------------------------------------------------
# codecs


class Codec(abc.ABC):
    """Turns a tensor into an :class:`EncodedTensor` and back. Stateless; safe to share."""

    name: str
    """The name that travels on the wire (``EncodedTensor.codec``)."""
    lossless: bool = False
    """True if ``decode(encode(x))`` equals ``x`` bit for bit."""

    @abc.abstractmethod
    def encode(self, tensor: torch.Tensor) -> EncodedTensor:
        """Encode ``tensor`` (any device; it is moved to CPU)."""

    @abc.abstractmethod
    def decode(self, encoded: EncodedTensor) -> torch.Tensor:
        """A CPU tensor of the original dtype and shape; ``ValueError`` on a malformed payload."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class NoneCodec(Codec):
    """Lossless: the raw bytes of the tensor (one copy on encode, one on decode)."""

    name = "none"
    lossless = True

    def encode(self, tensor: torch.Tensor) -> EncodedTensor:
        tensor = _cpu(tensor)
        return EncodedTensor(self.name, _dtype_name(tensor.dtype), tuple(tensor.shape), _raw_bytes(tensor), {})

    def decode(self, encoded: EncodedTensor) -> torch.Tensor:
        dtype = _parse_dtype(encoded.dtype)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        numel = encoded.numel
        _check_nbytes(encoded, numel * itemsize, f"{numel} x {itemsize}-byte {encoded.dtype}")
        if numel == 0:
            return torch.empty(encoded.shape, dtype=dtype)
        # frombuffer over the payload, then clone: the result owns writable memory and never
        # aliases an immutable ``bytes`` object.
        return _view(encoded.data, torch.uint8, 0, numel * itemsize).clone().view(dtype).reshape(encoded.shape)


class _CastCodec(Codec):
    """Cast to a 16-bit float type and back."""

    wire_dtype: torch.dtype

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.wire_dtype)

    def encode(self, tensor: torch.Tensor) -> EncodedTensor:
        tensor = _floating_input(self.name, tensor)
        wire = self._cast(tensor)
        return EncodedTensor(self.name, _dtype_name(tensor.dtype), tuple(tensor.shape), _raw_bytes(wire), {})

    def decode(self, encoded: EncodedTensor) -> torch.Tensor:
        dtype = _floating_output(encoded)
        numel = encoded.numel
        _check_nbytes(encoded, 2 * numel, f"{numel} x 2-byte {_dtype_name(self.wire_dtype)}")
        wire = _view(encoded.data, self.wire_dtype, 0, numel)
        # .to(dtype, copy=True): never return a tensor that aliases the (read-only) payload
        return wire.to(dtype, copy=True).reshape(encoded.shape)


class Fp16Codec(_CastCodec):
    """IEEE half precision. Finite values beyond the fp16 range are clamped to +-65504
    (so a rare large activation does not become inf); nan and inf stay what they are."""

    name = "fp16"
    wire_dtype = torch.float16

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        wire = tensor.to(torch.float16)
        if tensor.dtype != torch.float16 and torch.isinf(wire).any():
            clamped = tensor.clamp(-_FP16_MAX, _FP16_MAX)
            wire = torch.where(torch.isinf(tensor), tensor, clamped).to(torch.float16)
        return wire


class Bf16Codec(_CastCodec):
    """bfloat16: float32's range with an 8-bit mantissa (relative error <= 2**-9)."""

    name = "bf16"
    wire_dtype = torch.bfloat16


class Int8Codec(Codec):
    """Uniform affine 8-bit over the whole tensor (min/max, 256 levels, no clipping).

    Payload: ``numel`` uint8 codes; meta ``{"min": float, "scale": float}``. Every decoded
    value is within ``scale / 2`` (plus float32 rounding) of the original.
    """

    name = "int8"

    def encode(self, tensor: torch.Tensor) -> EncodedTensor:
        tensor = _floating_input(self.name, tensor)
        shape, dtype = tuple(tensor.shape), _dtype_name(tensor.dtype)
        flat = tensor.reshape(-1).to(torch.float32)
        if flat.numel() == 0:
            return EncodedTensor(self.name, dtype, shape, b"", {"min": 0.0, "scale": 0.0})
        lo_t, hi_t = torch.aminmax(flat)
        scale_t = (hi_t - lo_t) / 255.0
        lo, scale = float(lo_t), float(scale_t)
        _finite_or_raise(self.name, lo, float(hi_t), scale)
        if scale > 0.0:
            codes = torch.sub(flat, lo_t).div_(scale_t).round_().clamp_(0, 255).to(torch.uint8)
        else:
            codes = torch.zeros(flat.shape, dtype=torch.uint8)
        return EncodedTensor(self.name, dtype, shape, _raw_bytes(codes), {"min": lo, "scale": scale})

    def decode(self, encoded: EncodedTensor) -> torch.Tensor:
        dtype = _floating_output(encoded)
        lo = _meta_number(encoded, "min", float)
        scale = _meta_number(encoded, "scale", float)
        numel = encoded.numel
        _check_nbytes(encoded, numel, f"{numel} x 1-byte code")
        codes = _view(encoded.data, torch.uint8, 0, numel)
        values = codes.to(torch.float32).mul_(scale).add_(lo)
        return values.to(dtype).reshape(encoded.shape)


class Int8BlockwiseCodec(Codec):
    """Symmetric 8-bit per block: each block of ``block`` consecutive values is scaled by its
    own absolute maximum, ``q = round(x / absmax * 127)`` in int8.

    Payload: ``nblocks`` float32 absmax values, then ``numel`` int8 codes; meta
    ``{"block": int}``, the codec's block size capped at ``numel`` (a decoder refuses any other
    value, so a message cannot make it allocate more than about twice its payload). Every decoded value is within ``absmax_of_its_block / 254`` of the
    original, so one outlier only coarsens its own block (unlike ``int8``).
    """

    def __init__(self, block: int = _DEFAULT_BLOCK):
        if not isinstance(block, int) or block < 1:
            raise ValueError(f"int8_blockwise block size must be a positive int, got {block!r}")
        self.block = block
        self.name = "int8_blockwise" if block == _DEFAULT_BLOCK else f"int8_blockwise:{block}"

    def block_for(self, numel: int) -> int:
        """The block size used for a tensor of ``numel`` values: the codec's, at most ``numel`` (at least 1)."""
        return max(1, min(self.block, numel))

    def encode(self, tensor: torch.Tensor) -> EncodedTensor:
        tensor = _floating_input(self.name, tensor)
        shape, dtype = tuple(tensor.shape), _dtype_name(tensor.dtype)
        flat = tensor.reshape(-1).to(torch.float32)
        numel, block = flat.numel(), self.block_for(flat.numel())
        nblocks = -(-numel // block)
        if numel % block:
            flat = torch.nn.functional.pad(flat, (0, nblocks * block - numel))
        blocks = flat.view(nblocks, block)
        absmax = blocks.abs().amax(dim=1) if nblocks else torch.empty(0)
        if nblocks and not bool(torch.isfinite(absmax).all()):
            raise ValueError(f"codec {self.name!r} cannot encode a tensor holding nan or inf values")
        inv = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
        codes = (blocks * inv.unsqueeze(1)).round_().clamp_(-127, 127).to(torch.int8).view(-1)[:numel]
        data = _raw_bytes(absmax) + _raw_bytes(codes.contiguous())
        return EncodedTensor(self.name, dtype, shape, data, {"block": block})

    def decode(self, encoded: EncodedTensor) -> torch.Tensor:
        dtype = _floating_output(encoded)
        block = _meta_number(encoded, "block", int)
        numel = encoded.numel
        # bounded by the tensor it describes: the decoder allocates nblocks * block values, so a
        # block larger than the tensor (2**27 in a 16 KiB message) would allocate for nothing
        expected = get_codec(encoded.codec).block_for(numel)
        if block != expected:
            raise ValueError(f"codec {encoded.codec!r}: meta['block'] = {block} but a {list(encoded.shape)} tensor "
                             f"is cut into blocks of {expected} (the codec's block, at most numel)")
        nblocks = -(-numel // block)
        _check_nbytes(
            encoded, 4 * nblocks + numel, f"{nblocks} float32 block scales + {numel} int8 codes, block {block}"
        )
        if numel == 0:
            return torch.empty(encoded.shape, dtype=dtype)
        absmax = _view(encoded.data, torch.float32, 0, nblocks)
        if not bool(torch.isfinite(absmax).all()) or bool((absmax < 0).any()):
            raise ValueError(f"codec {encoded.codec!r}: block scales must be finite and >= 0")
        codes = _view(encoded.data, torch.int8, 4 * nblocks, numel)
        values = torch.zeros(nblocks * block, dtype=torch.float32)
        values[:numel] = codes
        values.view(nblocks, block).mul_((absmax / 127.0).unsqueeze(1))
        return values[:numel].to(dtype).reshape(encoded.shape)


class TopKCodec(Codec):
    """Top-k sparsification: the ``ceil(fraction * numel)`` values of largest magnitude.

    Payload: ``k`` sorted indices (int32, or int64 for tensors over 2**31 - 1 values), then
    ``k`` values in the original dtype; meta ``{"k": int, "index_bits": 32 | 64}``. Decoding
    puts the values back and zeros elsewhere. Alone it is biased (small values are never
    sent); use it through :class:`ErrorFeedback`.

    Selection: a strided sample of ``|x|`` gives a threshold that keeps about ``2k``
    candidates, and ``torch.topk`` runs on those only (on 16M values: ~0.07 s instead of
    ~0.4-1 s). If the sample was unlucky and fewer than ``k`` values pass, it falls back to
    ``torch.topk`` over everything, so the result is always an exact top-k.
    """

    def __init__(self, fraction: float = _DEFAULT_TOPK_FRACTION):
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0.0 < fraction <= 1.0:
            raise ValueError(f"topk fraction must be in (0, 1], got {fraction!r}")
        self.fraction = float(fraction)
        self.name = "topk" if self.fraction == _DEFAULT_TOPK_FRACTION else f"topk:{self.fraction:g}"

    def count(self, numel: int) -> int:
        """How many values a tensor of ``numel`` values keeps: ``ceil(fraction * numel)``, at least 1."""
        return min(numel, max(1, math.ceil(self.fraction * numel))) if numel else 0

    def _select(self, magnitude: torch.Tensor, k: int) -> torch.Tensor:
        numel = magnitude.numel()
        if numel > 65536 and 4 * k < numel:
            stride = numel // 65536
            sample = magnitude[::stride]
            keep = min(sample.numel(), 2 * math.ceil(sample.numel() * k / numel) + 1)
            threshold = torch.topk(sample, keep, sorted=True).values[-1]
            candidates = (magnitude >= threshold).nonzero().squeeze(1)
            if candidates.numel() >= k:
                return candidates[torch.topk(magnitude[candidates], k, sorted=False).indices]
        return torch.topk(magnitude, k, sorted=False).indices

    def encode(self, tensor: torch.Tensor) -> EncodedTensor:
        tensor = _floating_input(self.name, tensor)
        shape, dtype = tuple(tensor.shape), _dtype_name(tensor.dtype)
        flat = tensor.reshape(-1)
        numel = flat.numel()
        k = self.count(numel)
        index_bits = 32 if numel <= 2**31 - 1 else 64
        if k == 0:
            return EncodedTensor(self.name, dtype, shape, b"", {"k": 0, "index_bits": index_bits})
        indices = self._select(flat.abs(), k).sort().values
        values = flat[indices]
        index_dtype = torch.int32 if index_bits == 32 else torch.int64
        data = _raw_bytes(indices.to(index_dtype)) + _raw_bytes(values)
        return EncodedTensor(self.name, dtype, shape, data, {"k": k, "index_bits": index_bits})

    def decode(self, encoded: EncodedTensor) -> torch.Tensor:
        dtype = _floating_output(encoded)
        k = _meta_number(encoded, "k", int)
        index_bits = _meta_number(encoded, "index_bits", int)
        numel = encoded.numel
        if index_bits not in (32, 64):
            raise ValueError(f"codec {encoded.codec!r}: meta['index_bits'] must be 32 or 64, got {index_bits}")
        if not 0 <= k <= numel:
            raise ValueError(f"codec {encoded.codec!r}: meta['k'] = {k} is outside [0, {numel}] for shape {list(encoded.shape)}")
        expected_k = get_codec(encoded.codec).count(numel)
        if k != expected_k:  # the payload (k values) bounds the tensor the decoder allocates (numel)
            raise ValueError(f"codec {encoded.codec!r}: meta['k'] = {k} but a {list(encoded.shape)} tensor "
                             f"keeps {expected_k} values at this codec's fraction")
        if index_bits != (32 if numel <= 2**31 - 1 else 64):
            raise ValueError(f"codec {encoded.codec!r}: meta['index_bits'] = {index_bits} does not fit numel {numel}")
        itemsize = torch.empty(0, dtype=dtype).element_size()
        _check_nbytes(encoded, k * (index_bits // 8 + itemsize), f"{k} int{index_bits} indices + {k} {encoded.dtype} values")
        out = torch.zeros(numel, dtype=dtype)
        if k:
            indices = _view(encoded.data, torch.int32 if index_bits == 32 else torch.int64, 0, k).long()
            if int(indices.min()) < 0 or int(indices.max()) >= numel:
                raise ValueError(f"codec {encoded.codec!r}: an index is outside [0, {numel})")
            out[indices] = _view(encoded.data, dtype, k * index_bits // 8, k)
        return out.reshape(encoded.shape)


_SIMPLE = {"none": NoneCodec, "fp16": Fp16Codec, "bf16": Bf16Codec, "int8": Int8Codec}


def get_codec(name: str) -> Codec:
    """The codec for ``name`` (``"int8"``, ``"topk:0.05"``, ``"int8_blockwise:1024"``...).

    Raises ``ValueError`` naming the known codecs for an unknown name or a bad parameter.
    """
    if not isinstance(name, str):
        raise ValueError(f"codec name must be a str, got {type(name).__name__}")
    return _make_codec(name)


@functools.lru_cache(maxsize=128)
def _make_codec(name: str) -> Codec:
    base, sep, param = name.partition(":")
    known = ", ".join(CODEC_NAMES)
    if base not in CODEC_NAMES:
        raise ValueError(f"unknown codec {name!r}; known: {known} (topk and int8_blockwise take ':param')")
    if base in _SIMPLE:
        if sep:
            raise ValueError(f"codec {base!r} takes no parameter, got {name!r}")
        return _SIMPLE[base]()
    if base == "int8_blockwise":
        if not sep:
            return Int8BlockwiseCodec()
        try:
            block = int(param)
        except ValueError:
            raise ValueError(f"codec {name!r}: block size must be an int, e.g. 'int8_blockwise:4096'") from None
        return Int8BlockwiseCodec(block)
    # topk
    if not sep:
        return TopKCodec()
    try:
        fraction = float(param)
    except ValueError:
        raise ValueError(f"codec {name!r}: fraction must be a number in (0, 1], e.g. 'topk:0.01'") from None
    return TopKCodec(fraction)


def encode(tensor: torch.Tensor, codec: str = "none") -> EncodedTensor:
    """Encode ``tensor`` with the codec named ``codec``."""
    return get_codec(codec).encode(tensor)


def decode(encoded: EncodedTensor) -> torch.Tensor:
    """Decode with the codec named in ``encoded.codec``; ``ValueError`` on anything malformed."""
    if not isinstance(encoded, EncodedTensor):
        raise ValueError(f"expected an EncodedTensor, got {type(encoded).__name__}")
    return get_codec(encoded.codec).decode(encoded)


# ---------------------------------------------------------------------------------------------
# error feedback


class ErrorFeedback:
    """Remembers, per key, what a lossy codec did not send, and sends it later.

    ``compress(key, x, codec)`` encodes ``x + residual[key]`` and keeps
    ``residual[key] = (x + residual[key]) - decode(encoded)``. Summed over calls, what was
    sent equals what was given minus the current residual, exactly up to float rounding:
    nothing is lost, only delayed (EF-SGD: Seide et al. 2014, Karimireddy et al. 2019).

    Residuals are kept in float32 (float64 for float64 inputs) on CPU, whatever the input
    dtype, so the rounding of a bf16 input is remembered too.
    """

    def __init__(self) -> None:
        self._residuals: dict[str, torch.Tensor] = {}

    def compress(self, key: str, tensor: torch.Tensor, codec: str) -> EncodedTensor:
        """Encode ``tensor`` plus the residual kept under ``key``; update that residual."""
        tensor = _floating_input(codec, tensor)
        acc_dtype = torch.promote_types(tensor.dtype, torch.float32)
        residual = self._residuals.get(key)
        if residual is not None and residual.shape != tensor.shape:
            raise ValueError(
                f"error feedback key {key!r}: tensor shape {list(tensor.shape)} differs from the residual's "
                f"{list(residual.shape)}; call reset({key!r}) when a tensor changes shape"
            )
        corrected = tensor.to(acc_dtype, copy=True)
        if residual is not None:
            corrected.add_(residual)
        encoded = encode(corrected.to(tensor.dtype), codec)
        self._residuals[key] = corrected.sub_(decode(encoded).to(acc_dtype))
        return encoded

    def residual(self, key: str) -> torch.Tensor | None:
        """The residual kept under ``key`` (a copy), or None."""
        residual = self._residuals.get(key)
        return None if residual is None else residual.clone()

    def reset(self, key: str | None = None) -> None:
        """Forget the residual of ``key``, or of every key."""
        if key is None:
            self._residuals.clear()
        else:
            self._residuals.pop(key, None)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Residuals by key (copies), for checkpoints."""
        return {key: value.clone() for key, value in self._residuals.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace every residual with those in ``state``."""
        for key, value in state.items():
            if not isinstance(key, str) or not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise ValueError(f"error feedback state: {key!r} must map a str to a floating tensor")
        self._residuals = {key: value.detach().cpu().clone() for key, value in state.items()}
