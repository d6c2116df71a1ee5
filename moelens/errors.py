"""Exceptions that carry their gRPC status; one interceptor per server maps them."""

from __future__ import annotations


class InvalidArgument(ValueError):
    """Bad input from the caller; the message names the field."""


class ResourceExhausted(RuntimeError):
    """Overload or capacity: retry later or with a smaller request."""


class Unavailable(RuntimeError):
    """A service this one depends on cannot be reached; the message names it."""


class NotFound(LookupError):
    """No such request / sequence."""
