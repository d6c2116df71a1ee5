"""Tensor wire format: round trips, zero-copy behaviour, validation, protobuf mapping."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moelens import wire
from moelens.v1 import common_pb2

REPO_ROOT = Path(__file__).resolve().parents[1]


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=gen, dtype=dtype)


@pytest.mark.parametrize("dtype", list(wire.NAME_TO_DTYPE.values()), ids=str)
@pytest.mark.parametrize("shape", [(3, 5), (0, 4), (), (2, 0, 3)], ids=str)
def test_round_trip_every_dtype(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = _sample(dtype, shape)
    tb = wire.encode(t)
    assert tb.dtype == wire.DTYPE_TO_NAME[dtype]
    assert tb.shape == shape
    assert len(memoryview(tb.data).cast("B")) == t.numel() * t.element_size()
    for data in (tb.data, bytes(tb.data), bytearray(tb.data)):
        out = wire.decode(wire.TensorBytes(tb.dtype, tb.shape, data))
        assert out.dtype == dtype and out.shape == t.shape
        assert torch.equal(out, t)


def test_bfloat16_bytes_are_torch_bytes() -> None:
    # Independent of our numpy stand-in: the bytes must be what torch's own storage holds.
    t = torch.tensor([1.0, -2.5, 3.140625], dtype=torch.bfloat16)
    expected = bytes(t.untyped_storage())
    assert bytes(wire.encode(t).data) == expected


def test_encode_is_zero_copy_for_contiguous_cpu() -> None:
    t = torch.arange(8, dtype=torch.float32)
    tb = wire.encode(t)
    t[0] = 42.0
    assert wire.decode(tb, copy=True)[0].item() == 42.0


def test_encode_non_contiguous_and_grad() -> None:
    base = torch.randn(4, 6, requires_grad=True)
    t = base.t()[1:, ::2]
    assert not t.is_contiguous()
    out = wire.decode(wire.encode(t))
    assert torch.equal(out, t.detach())


def test_decode_is_zero_copy_over_writable_buffers() -> None:
    buf = bytearray(wire.encode(torch.zeros(4, dtype=torch.int32)).data)
    out = wire.decode(wire.TensorBytes("int32", (4,), buf))
    buf[0] = 7
    assert out[0].item() == 7
    copied = wire.decode(wire.TensorBytes("int32", (4,), buf), copy=True)
    buf[0] = 9
    assert copied[0].item() == 7


def test_decode_of_immutable_bytes_does_not_warn() -> None:
    # torch warns only once per process, so check in a fresh interpreter that turns warnings
    # into errors.
    code = (
        "import torch; from moelens import wire\n"
        "data = bytes(wire.encode(torch.ones(3)).data)\n"
        "assert torch.equal(wire.decode(wire.TensorBytes('float32', (3,), data)), torch.ones(3))\n"
    )
    proc = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr


@pytest.mark.parametrize(
    ("tb", "message"),
    [
        (wire.TensorBytes("float32", (2, 3), bytes(20)), "has 20 bytes but dtype float32"),
        (wire.TensorBytes("float32", (2, 3), bytes(28)), "needs 24"),
        (wire.TensorBytes("complex64", (1,), bytes(8)), "unknown tensor dtype 'complex64'"),
        (wire.TensorBytes("float16", (2, -1), bytes(0)), "negative dimension"),
        (wire.TensorBytes("int64", (0,), bytes(8)), "has 8 bytes"),
    ],
)
def test_decode_validation(tb: wire.TensorBytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        wire.decode(tb)


def test_encode_rejects_unsupported_dtype() -> None:
    with pytest.raises(ValueError, match="complex64 cannot be sent"):
        wire.encode(torch.zeros(2, dtype=torch.complex64))


def test_dict_helpers_name_the_bad_entry() -> None:
    tensors = {"q": _sample(torch.bfloat16, (2, 4, 8)), "pos": torch.arange(2)}
    encoded = wire.encode_dict(tensors)
    decoded = wire.decode_dict(encoded)
    assert list(decoded) == ["q", "pos"]
    assert all(torch.equal(decoded[k], tensors[k]) for k in tensors)
    encoded["pos"] = wire.TensorBytes("int64", (3,), encoded["pos"].data)
    with pytest.raises(ValueError, match="tensor 'pos'"):
        wire.decode_dict(encoded)


def test_protobuf_message_round_trip() -> None:
    tensor_cls = common_pb2.Tensor
    t = _sample(torch.bfloat16, (3, 2, 16))
    msg = wire.to_message(wire.encode(t), tensor_cls())
    received = tensor_cls.FromString(msg.SerializeToString())
    out = wire.decode(wire.from_message(received))
    assert received.dtype == "bfloat16" and list(received.shape) == [3, 2, 16]
    assert torch.equal(out, t)
    # Reusing a message must replace, not append to, the shape.
    wire.to_message(wire.encode(torch.zeros(5)), msg)
    assert list(msg.shape) == [5]


def test_grpc_message_options() -> None:
    opts = dict(wire.grpc_message_options(64 << 20))
    assert opts["grpc.max_receive_message_length"] == 64 << 20
    assert opts["grpc.max_send_message_length"] == 64 << 20
    with pytest.raises(ValueError, match="max_message_bytes"):
        wire.grpc_message_options(0)
