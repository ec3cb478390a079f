"""Codec round trips, error bounds, malformed payloads and error feedback.

Error bounds are the codecs' own guarantees (half an fp16/bf16 ulp, half an
int8 step), checked per element; the relative L2 errors on N(0, 1) data are
the measured values (seed 0, 100k values) with about 1.5x headroom:

    fp16 2.1e-4, bf16 1.7e-3, int8 1.0e-2 (range ~ +-4.3 sigma / 255 levels),
    int8_blockwise 8.7e-3 (block absmax ~ 3.5 sigma / 127 levels).
"""

import math

import msgpack
import pytest
import torch

from swarmrt.wire import codecs as compression
from swarmrt.wire.codecs import CODEC_NAMES, EncodedTensor, ErrorFeedback, decode, encode, get_codec

pytestmark = pytest.mark.timeout(60)

LOSSY = ("fp16", "bf16", "int8", "int8_blockwise", "topk")


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).to(dtype)


def rel_error(decoded, original):
    return float((decoded.double() - original.double()).norm() / original.double().norm())


def with_data(encoded, data):
    return EncodedTensor(encoded.codec, encoded.dtype, encoded.shape, data, encoded.meta)


def with_meta(encoded, **meta):
    return EncodedTensor(encoded.codec, encoded.dtype, encoded.shape, encoded.data, {**encoded.meta, **meta})


# ------------------------------------------------------------------------------------ lossless


@pytest.mark.parametrize(
    "tensor",
    [
        randn(7, 5),
        randn(3, dtype=torch.float64),
        randn(4, 4, dtype=torch.bfloat16),
        randn(9, dtype=torch.float16),
        torch.arange(-5, 1000, 7, dtype=torch.int64).reshape(-1, 1),
        torch.tensor([[True, False, True]]),
        torch.tensor([1, -2, 127], dtype=torch.int8),
        torch.tensor([1 + 2j, -3j], dtype=torch.complex64),
        torch.tensor(42, dtype=torch.int32),
        torch.tensor([float("nan"), float("inf"), -0.0]),
    ],
    ids=lambda t: f"{t.dtype}{list(t.shape)}",
)
def test_none_is_lossless_for_any_dtype(tensor):
    encoded = encode(tensor, "none")
    decoded = decode(encoded)
    assert encoded.dtype == str(tensor.dtype).removeprefix("torch.")
    assert encoded.nbytes == tensor.numel() * tensor.element_size()
    assert decoded.dtype == tensor.dtype and decoded.shape == tensor.shape
    # bit-for-bit, nan and -0.0 included
    assert torch.equal(decoded.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))


def test_none_decoded_tensor_owns_its_memory():
    payload = encode(torch.arange(6, dtype=torch.float32), "none")
    before = bytes(payload.data)
    decoded = decode(payload)
    decoded.add_(100.0)  # writable, and writing it must not touch the immutable payload
    assert payload.data == before
    assert torch.equal(decode(payload), torch.arange(6, dtype=torch.float32))


def test_noncontiguous_and_requires_grad_inputs():
    base = randn(6, 8, seed=1).requires_grad_()
    view = base.t()[1:5]  # non-contiguous view of a tensor that requires grad
    for codec in CODEC_NAMES:
        decoded = decode(encode(view, codec))
        assert decoded.shape == view.shape and not decoded.requires_grad
    assert torch.equal(decode(encode(view, "none")), view.detach())


# ------------------------------------------------------------------------------------ lossy bounds


def test_fp16_within_half_an_ulp():
    x = randn(100_000) * 100
    y = decode(encode(x, "fp16"))
    # fp16 keeps 11 significant bits: |error| <= 2**-11 |x| for normal values,
    # <= 2**-25 (half the smallest subnormal step) near zero
    assert bool(((y - x).abs() <= x.abs() * 2**-11 + 2**-25).all())
    assert rel_error(y, x) < 3e-4
    assert encode(x, "fp16").nbytes == 2 * x.numel()


def test_fp16_clamps_finite_values_and_keeps_nan_inf():
    x = torch.tensor([1e6, -1e6, float("inf"), float("-inf"), float("nan"), 1.5])
    y = decode(encode(x, "fp16"))
    assert y[:2].tolist() == [65504.0, -65504.0]
    assert y[2].item() == float("inf") and y[3].item() == float("-inf")
    assert math.isnan(y[4].item()) and y[5].item() == 1.5


def test_bf16_within_half_an_ulp():
    x = randn(100_000) * 1e20  # bf16 has float32's range
    y = decode(encode(x, "bf16"))
    assert bool(((y - x).abs() <= x.abs() * 2**-8).all())
    assert rel_error(y, x) < 2.5e-3


def test_int8_within_half_a_step():
    x = randn(100_000) * 3 + 1
    encoded = encode(x, "int8")
    y = decode(encoded)
    step = (float(x.max()) - float(x.min())) / 255
    assert encoded.meta["scale"] == pytest.approx(step, rel=1e-6)
    assert float((y - x).abs().max()) <= step / 2 * (1 + 1e-4)
    assert rel_error(y, x) < 1.5e-2
    assert encoded.nbytes == x.numel()
    # the extremes are representable: min exactly, max within float32 rounding
    assert float(y.min()) == float(x.min())
    assert float(y.max()) == pytest.approx(float(x.max()), rel=1e-6)


def test_int8_constant_tensor_is_exact():
    x = torch.full((5, 3), -2.25)
    assert torch.equal(decode(encode(x, "int8")), x)


@pytest.mark.parametrize("block", [4096, 100, 1])
def test_int8_blockwise_within_half_a_step_of_each_block(block):
    numel = 50_000  # not a multiple of 4096 or 100: the last block is partial
    x = randn(numel, seed=2)
    x[123] = 1000.0  # one outlier: it must coarsen its own block only
    name = "int8_blockwise" if block == 4096 else f"int8_blockwise:{block}"
    encoded = encode(x, name)
    y = decode(encoded)
    nblocks = -(-numel // block)
    assert encoded.nbytes == 4 * nblocks + numel
    padded = torch.nn.functional.pad(x, (0, nblocks * block - numel)).view(nblocks, block)
    bound = (padded.abs().amax(dim=1) / 254 * (1 + 1e-4)).repeat_interleave(block)[:numel]
    assert bool(((y - x).abs() <= bound + 1e-30).all())
    if block == 1:
        assert torch.allclose(y, x, rtol=1e-6, atol=0)
    else:
        outside = torch.ones(numel, dtype=torch.bool)
        outside[: block * (123 // block + 1)] = False  # exclude the outlier's block
        assert rel_error(y[outside], x[outside]) < 1.3e-2


def test_int8_codecs_refuse_nan_and_inf():
    for value in (float("nan"), float("inf")):
        x = randn(10)
        x[3] = value
        for codec in ("int8", "int8_blockwise"):
            with pytest.raises(ValueError, match="nan or inf"):
                encode(x, codec)


@pytest.mark.parametrize("numel", [1000, 300_000])  # small: plain topk; large: sampled threshold
def test_topk_keeps_exactly_the_largest_values(numel):
    x = randn(numel, seed=3)
    encoded = encode(x, "topk:0.02")
    y = decode(encoded)
    k = math.ceil(0.02 * numel)
    assert encoded.meta["k"] == k and encoded.nbytes == k * (4 + 4)
    kept = y != 0
    assert int(kept.sum()) == k
    assert torch.equal(y[kept], x[kept])  # values travel exactly
    expected = torch.zeros(numel, dtype=torch.bool)
    expected[torch.topk(x.abs(), k).indices] = True
    assert torch.equal(kept, expected)


def test_topk_default_fraction_and_names():
    x = randn(10_000)
    assert encode(x, "topk").meta["k"] == 100
    assert get_codec("topk").name == "topk"
    assert get_codec("topk:0.25").name == "topk:0.25"
    assert get_codec("int8_blockwise:512").name == "int8_blockwise:512"
    assert encode(x, "topk:1").meta["k"] == 10_000
    assert torch.equal(decode(encode(x, "topk:1")), x)


@pytest.mark.parametrize("codec", LOSSY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 4, 5), (), (0,), (2, 0, 3), (1,)])
def test_lossy_codecs_keep_dtype_and_shape(codec, dtype, shape):
    x = randn(*shape, seed=4, dtype=dtype)
    encoded = encode(x, codec)
    y = decode(encoded)
    assert encoded.dtype == str(dtype).removeprefix("torch.")
    assert encoded.shape == shape
    assert y.dtype == dtype and y.shape == x.shape and y.device.type == "cpu"
    if x.numel() == 1:  # a single value: int8 (scale 0), blockwise and topk are exact
        assert torch.equal(y, x) or codec in ("fp16", "bf16")


@pytest.mark.parametrize("codec", LOSSY)
def test_lossy_codecs_refuse_integer_tensors(codec):
    with pytest.raises(ValueError, match="codec 'none'"):
        encode(torch.arange(10), codec)
    with pytest.raises(ValueError, match="floating-point"):
        encode(torch.tensor([True]), codec)


def test_encoded_tensor_survives_msgpack():
    x = randn(33, 7)
    for codec in ("none", "fp16", "int8", "int8_blockwise:64", "topk:0.1"):
        encoded = encode(x, codec)
        wire = msgpack.packb(dataclass_dict(encoded), use_bin_type=True)
        back = EncodedTensor(**msgpack.unpackb(wire, raw=False))
        assert back.shape == encoded.shape  # list from msgpack became a tuple
        assert torch.equal(decode(back), decode(encoded))


def dataclass_dict(encoded):
    return {"codec": encoded.codec, "dtype": encoded.dtype, "shape": encoded.shape, "data": encoded.data, "meta": encoded.meta}


# ------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("name", ["gzip", "", "FP16", "fp16:2", "none:1", "topk:abc", "topk:0", "topk:1.5", "int8_blockwise:0", "int8_blockwise:x"])
def test_bad_codec_names_are_refused(name):
    with pytest.raises(ValueError) as info:
        get_codec(name)
    assert repr(name) in str(info.value) or "must be" in str(info.value)


def test_non_string_codec_name_is_refused():
    with pytest.raises(ValueError, match="codec name must be a str, got list"):
        get_codec(["fp16"])


def test_unknown_codec_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown codec 'zstd'; known: none, fp16, bf16, int8, int8_blockwise, topk"):
        encode(torch.zeros(3), "zstd")
    with pytest.raises(ValueError, match="unknown codec 'zstd'"):
        decode(EncodedTensor("zstd", "float32", (3,), bytes(12), {}))


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_truncated_and_oversized_payloads_are_refused(codec):
    encoded = encode(randn(10, 10), codec)
    size = encoded.nbytes
    with pytest.raises(ValueError, match=rf"should be {size} bytes .* got {size - 1}$"):
        decode(with_data(encoded, encoded.data[:-1]))
    with pytest.raises(ValueError, match=rf"should be {size} bytes .* got {size + 3}$"):
        decode(with_data(encoded, encoded.data + b"abc"))
    with pytest.raises(ValueError, match="got 0"):
        decode(with_data(encoded, b""))


def test_wrong_shape_for_payload_is_refused():
    encoded = encode(randn(10), "fp16")
    with pytest.raises(ValueError, match="should be 22 bytes"):
        decode(EncodedTensor("fp16", "float32", (11,), encoded.data, {}))


@pytest.mark.parametrize(
    "codec, meta, message",
    [
        ("int8", {"scale": None}, r"meta\['scale'\] must be float"),
        ("int8", {"min": float("nan")}, r"meta\['min'\] must be finite"),
        ("int8_blockwise", {"block": 0}, r"meta\['block'\] = 0 but a \[10, 10\] tensor is cut into blocks of 100"),
        ("int8_blockwise", {"block": 1.5}, r"meta\['block'\] must be int"),
        ("int8_blockwise", {"block": 64}, "cut into blocks of 100"),  # block size disagrees with the tensor
        ("topk", {"k": 11}, "keeps 1 values at this codec's fraction"),
        ("topk", {"k": 101}, r"meta\['k'\] = 101 is outside \[0, 100\]"),
        ("topk", {"index_bits": 16}, r"meta\['index_bits'\] must be 32 or 64"),
    ],
)
def test_bad_meta_is_refused(codec, meta, message):
    encoded = encode(randn(10, 10), codec)
    with pytest.raises(ValueError, match=message):
        decode(with_meta(encoded, **meta))


def test_missing_meta_key_is_named():
    encoded = encode(randn(10), "int8")
    with pytest.raises(ValueError, match=r"meta lacks 'scale'"):
        decode(EncodedTensor("int8", "float32", (10,), encoded.data, {"min": 0.0}))


def test_corrupt_topk_index_is_refused():
    encoded = encode(randn(100), "topk:0.05")
    data = bytearray(encoded.data)
    data[0:4] = (100).to_bytes(4, "little")  # index 100 in a tensor of 100 values
    with pytest.raises(ValueError, match=r"index is outside \[0, 100\)"):
        decode(with_data(encoded, bytes(data)))


def test_corrupt_block_scale_is_refused():
    encoded = encode(randn(100), "int8_blockwise")
    data = bytearray(encoded.data)
    data[0:4] = torch.tensor([float("nan")]).numpy().tobytes()
    with pytest.raises(ValueError, match="block scales must be finite"):
        decode(with_data(encoded, bytes(data)))


def test_bad_dtype_and_fields_are_refused():
    with pytest.raises(ValueError, match="unknown dtype 'float31'"):
        decode(EncodedTensor("none", "float31", (1,), bytes(4), {}))
    with pytest.raises(ValueError, match="decodes floating-point tensors only"):
        decode(EncodedTensor("fp16", "int64", (1,), bytes(2), {}))
    with pytest.raises(ValueError, match="non-negative ints"):
        EncodedTensor("none", "float32", (-1,), b"", {})
    with pytest.raises(ValueError, match="data must be bytes"):
        EncodedTensor("none", "float32", (1,), "abcd", {})
    with pytest.raises(ValueError, match="meta must be a dict"):
        EncodedTensor("none", "float32", (1,), bytes(4), {1: 2})
    with pytest.raises(ValueError, match="expected an EncodedTensor"):
        decode(b"abcd")


# ------------------------------------------------------------------------------------ error feedback


def run_error_feedback(codec, rounds, use_feedback=True):
    """Send `rounds` noisy updates with a common drift; return per-round sums and residual norms."""
    gen = torch.Generator().manual_seed(5)
    drift = torch.randn(2000, generator=gen) * 0.1
    feedback = ErrorFeedback()
    true_sum = torch.zeros(2000, dtype=torch.float64)
    sent_sum = torch.zeros(2000, dtype=torch.float64)
    history = []
    for _ in range(rounds):
        update = drift + torch.randn(2000, generator=gen)
        encoded = feedback.compress("w", update, codec) if use_feedback else encode(update, codec)
        true_sum += update.double()
        sent_sum += decode(encoded).double()
        residual = feedback.residual("w") if use_feedback else None
        history.append((true_sum.clone(), sent_sum.clone(), residual, float(update.norm())))
    return history


@pytest.mark.parametrize(
    "codec, final_gap, residual_ratio",
    [
        # measured: relative gap 0.040 after 400 rounds, residual <= 1.83 x the largest update
        ("topk:0.05", 0.06, 3.0),
        # measured: relative gap 1.7e-4 after 400 rounds, residual <= 0.009 x the largest update
        ("int8", 5e-4, 0.02),
    ],
)
def test_error_feedback_sum_of_sent_converges_to_sum_of_true(codec, final_gap, residual_ratio):
    history = run_error_feedback(codec, rounds=400)
    largest_update = max(h[3] for h in history)
    for true_sum, sent_sum, residual, _ in history:
        # nothing is lost: the gap between the sums is exactly the one residual still held
        assert torch.allclose(true_sum - sent_sum, residual.double(), atol=5e-5, rtol=0)
        # and that residual stays bounded (it does not grow with the number of rounds)
        assert float(residual.norm()) <= residual_ratio * largest_update

    def relative_gap(step):
        true_sum, sent_sum = history[step][0], history[step][1]
        return float((true_sum - sent_sum).norm() / true_sum.norm())

    assert relative_gap(399) < final_gap
    assert relative_gap(399) < relative_gap(49) / 4  # the relative gap shrinks like 1 / rounds

    # without error feedback, what top-k or int8 drops is lost for good
    plain = run_error_feedback(codec, rounds=400, use_feedback=False)
    true_sum, sent_sum = plain[-1][0], plain[-1][1]
    assert float((true_sum - sent_sum).norm() / true_sum.norm()) > 5 * relative_gap(399)


def test_error_feedback_keys_shapes_and_state():
    feedback = ErrorFeedback()
    a, b = randn(100, seed=6), randn(50, seed=7)
    feedback.compress("a", a, "topk:0.1")
    feedback.compress("b", b, "topk:0.1")
    assert feedback.residual("a").shape == a.shape and feedback.residual("b").shape == b.shape
    with pytest.raises(ValueError, match=r"key 'a'.*shape \[50\] differs from the residual's \[100\]"):
        feedback.compress("a", b, "topk:0.1")

    state = feedback.state_dict()
    clone = ErrorFeedback()
    clone.load_state_dict(state)
    update = randn(100, seed=8)
    assert torch.equal(decode(clone.compress("a", update, "int8")), decode(feedback.compress("a", update, "int8")))

    feedback.reset("a")
    assert feedback.residual("a") is None and feedback.residual("b") is not None
    feedback.reset()
    assert feedback.residual("b") is None


def test_error_feedback_with_lossless_codec_keeps_zero_residual_and_bf16_rounding():
    feedback = ErrorFeedback()
    x = randn(64, seed=9)
    assert torch.equal(decode(feedback.compress("x", x, "none")), x)
    assert float(feedback.residual("x").abs().max()) == 0.0
    # a bf16 input: the residual is kept in float32, so bf16 rounding is fed back too
    y = randn(64, seed=10, dtype=torch.bfloat16)
    sent = decode(feedback.compress("y", y, "int8"))
    assert feedback.residual("y").dtype == torch.float32
    assert torch.allclose(y.float() - sent.float(), feedback.residual("y"), atol=1e-6)


def test_error_feedback_refuses_integer_tensors():
    with pytest.raises(ValueError, match="floating-point"):
        ErrorFeedback().compress("ids", torch.arange(4), "topk")


def test_codec_names_are_all_reachable():
    assert compression.CODEC_NAMES == ("none", "fp16", "bf16", "int8", "int8_blockwise", "topk")
    for name in CODEC_NAMES:
        assert get_codec(name).name == name
