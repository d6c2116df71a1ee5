"""Typed exceptions of the client SDK, one per gRPC status a caller may want to handle.

Every RPC error goes through `from_rpc_error`, the one place a status code becomes a type, so
sync, async and batch calls raise the same classes with the server's message.
"""

from __future__ import annotations

import grpc


class MoeLensError(Exception):
    """Base of every error the SDK raises for a failed call; `code` is the gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def with_prefix(self, prefix: str) -> "MoeLensError":
        """The same error type and code with `prefix` in front of the message (batch context)."""
        return type(self)(f"{prefix}{self.message}", code=self.code)


class InvalidArgumentError(MoeLensError, ValueError):
    """The request is malformed (bad sampling value, prompt too long...); the message names the
    field. Raised before sending when client-side validation catches it."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhaustedError(MoeLensError):
    """The server is overloaded (waiting queue full) or the request exceeds its capacity."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(MoeLensError):
    """The server (or a service behind it) cannot be reached."""

    code = grpc.StatusCode.UNAVAILABLE


class NotFoundError(MoeLensError):
    """No live request has that id."""

    code = grpc.StatusCode.NOT_FOUND


class DeadlineExceededError(MoeLensError):
    """The call's timeout passed before it finished."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class CancelledError(MoeLensError):
    """The call was cancelled (by this client or the server)."""

    code = grpc.StatusCode.CANCELLED


class InternalError(MoeLensError):
    """The server failed; its logs have the traceback."""

    code = grpc.StatusCode.INTERNAL


_CLASS_OF_CODE: dict[grpc.StatusCode, type[MoeLensError]] = {
    cls.code: cls for cls in (InvalidArgumentError, ResourceExhaustedError, UnavailableError,
                              NotFoundError, DeadlineExceededError, CancelledError, InternalError)
}
_CLASS_OF_CODE[grpc.StatusCode.UNKNOWN] = InternalError  # an uncaught servicer exception


def from_rpc_error(err: grpc.RpcError) -> MoeLensError:
    """The typed exception for a failed call (MoeLensError itself for unmapped codes)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else None
    message = details or (code.name.lower() if code else str(err))
    cls = _CLASS_OF_CODE.get(code, MoeLensError)
    mapped = cls(message, code=code)
    mapped.__cause__ = err
    return mapped
