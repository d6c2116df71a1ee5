"""Python SDK for MoE-Lens: talk to the coordinator over gRPC.

`Client` (blocking, thread-safe) and `AsyncClient` (asyncio) have the same methods: generate,
generate_stream, generate_batch, abort, health, wait_ready, model_info, server_info, close.
Failed calls raise the typed exceptions of moelens_client.errors.
"""

from moelens_client.aio import AsyncClient, AsyncGenerationStream
from moelens_client.client import Client, GenerationStream
from moelens_client.errors import (CancelledError, DeadlineExceededError, InternalError,
                                   InvalidArgumentError, MoeLensError, NotFoundError,
                                   ResourceExhaustedError, UnavailableError)
from moelens_client.types import (GenerationChunk, GenerationResult, ModelInfo, ServerInfo,
                                  Usage)

__all__ = [
    "AsyncClient", "AsyncGenerationStream", "Client", "GenerationStream", "CancelledError",
    "DeadlineExceededError", "InternalError", "InvalidArgumentError", "MoeLensError",
    "NotFoundError", "ResourceExhaustedError", "UnavailableError", "GenerationChunk",
    "GenerationResult", "ModelInfo", "ServerInfo", "Usage",
]
