"""Tensor wire format: raw bytes plus dtype name and shape.

This is what crosses the expert_gpu <-> attention_cpu boundary when the two services do not share
a host (the gRPC transport); the shared-memory channel (`moelens.shm`) reuses the dtype table.
The bytes are the tensor's row-major contents in the host's native byte order (little-endian on
every platform we target), so no per-element conversion happens on either side.

Protobuf mapping (the lead's `Tensor {string dtype; repeated int64 shape; bytes data;}`):
`to_message` / `from_message` fill and read any message with those three fields.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

# Wire name -> torch dtype. Names are torch's own (`str(torch.float32)` minus the prefix), so
# logs and messages read the same on both sides.
NAME_TO_DTYPE: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_TO_NAME: dict[torch.dtype, str] = {dtype: name for name, dtype in NAME_TO_DTYPE.items()}

# numpy has no bfloat16; its bytes are exported through a same-width integer view.
_NUMPY_STANDIN = {torch.bfloat16: torch.int16}


@dataclass(frozen=True)
class TensorBytes:
    """A tensor as it travels: dtype name, shape and the raw row-major bytes."""

    dtype: str
    """Key of NAME_TO_DTYPE, e.g. "float32" or "bfloat16"."""
    shape: tuple[int, ...]
    """Sizes per dimension; () for a scalar."""
    data: bytes | bytearray | memoryview
    """Exactly numel * itemsize bytes. A memoryview from `encode` aliases the source tensor."""


def dtype_from_name(name: str) -> torch.dtype:
    """Torch dtype for a wire name; ValueError listing the known names otherwise."""
    dtype = NAME_TO_DTYPE.get(name)
    if dtype is None:
        raise ValueError(f"unknown tensor dtype {name!r}; expected one of {sorted(NAME_TO_DTYPE)}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """Wire name of a torch dtype; ValueError for dtypes the wire format does not carry."""
    name = DTYPE_TO_NAME.get(dtype)
    if name is None:
        raise ValueError(f"tensor dtype {dtype} cannot be sent; use one of {sorted(NAME_TO_DTYPE)}")
    return name


def nbytes_of(dtype: str, shape: tuple[int, ...]) -> int:
    """Byte size of a tensor with this wire dtype and shape, validating both."""
    torch_dtype = dtype_from_name(dtype)
    if any(int(size) < 0 for size in shape):
        raise ValueError(f"tensor shape {tuple(shape)} has a negative dimension")
    return math.prod(shape) * torch_dtype.itemsize


def encode(tensor: torch.Tensor) -> TensorBytes:
    """Wrap a tensor's bytes without copying when it is already a contiguous CPU tensor.

    A device or non-contiguous tensor is copied once into a contiguous host tensor. The returned
    memoryview aliases that host memory: writing the tensor afterwards changes `data`.
    """
    name = dtype_name(tensor.dtype)
    host = tensor.detach().to("cpu").contiguous()  # no-op for contiguous CPU tensors
    # Flattened first: memoryview cannot cast a multi-dimensional view with a zero in its shape.
    exported = host.view(_NUMPY_STANDIN.get(host.dtype, host.dtype)).reshape(-1)
    # The memoryview holds the numpy array, which holds the tensor: the bytes stay valid.
    data = memoryview(exported.numpy()).cast("B")
    return TensorBytes(dtype=name, shape=tuple(host.shape), data=data)


def decode(tb: TensorBytes, *, copy: bool = False) -> torch.Tensor:
    """Tensor over `tb.data`, zero-copy unless `copy` is set.

    With copy=False the tensor aliases the buffer. For an immutable `bytes` (what gRPC hands
    over) torch cannot mark the tensor read-only, so treat it as read-only or pass copy=True.
    """
    dtype = dtype_from_name(tb.dtype)
    shape = tuple(int(size) for size in tb.shape)
    expected = nbytes_of(tb.dtype, shape)
    view = memoryview(tb.data).cast("B")
    if view.nbytes != expected:
        raise ValueError(
            f"tensor data has {view.nbytes} bytes but dtype {tb.dtype} with shape {shape} "
            f"needs {expected}"
        )
    if expected == 0:
        return torch.empty(shape, dtype=dtype)  # frombuffer rejects empty buffers
    if view.readonly:
        with warnings.catch_warnings():
            # torch warns once that it cannot make the tensor read-only; the docstring says so.
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            flat = torch.frombuffer(view, dtype=dtype)
    else:
        flat = torch.frombuffer(view, dtype=dtype)
    tensor = flat.view(shape)
    return tensor.clone() if copy else tensor


def encode_dict(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorBytes]:
    """encode() for each named tensor, keeping the mapping's order."""
    return {name: encode(tensor) for name, tensor in tensors.items()}


def decode_dict(
    encoded: Mapping[str, TensorBytes], *, copy: bool = False
) -> dict[str, torch.Tensor]:
    """decode() for each named entry; the error names the entry that failed."""
    out: dict[str, torch.Tensor] = {}
    for name, tb in encoded.items():
        try:
            out[name] = decode(tb, copy=copy)
        except ValueError as err:
            raise ValueError(f"tensor {name!r}: {err}") from err
    return out


def to_message(tb: TensorBytes, message: Any) -> Any:
    """Fill a protobuf `Tensor {string dtype; repeated int64 shape; bytes data;}` in place.

    Protobuf copies into its own `bytes`, the one copy the gRPC transport cannot avoid.
    """
    message.dtype = tb.dtype
    del message.shape[:]
    message.shape.extend(tb.shape)
    message.data = tb.data if isinstance(tb.data, bytes) else bytes(tb.data)
    return message


def from_message(message: Any) -> TensorBytes:
    """TensorBytes over a received protobuf Tensor message (no copy of the data)."""
    return TensorBytes(dtype=message.dtype, shape=tuple(message.shape), data=message.data)


def grpc_message_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Channel/server options raising gRPC's 4 MiB default limit to fit activation messages."""
    if max_message_bytes <= 0:
        raise ValueError(
            f"max_message_bytes must be positive, got {max_message_bytes}; "
            "size it as the largest step's activations plus a margin"
        )
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
