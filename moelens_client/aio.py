"""Asynchronous MoE-Lens client (grpc.aio), mirroring moelens_client.Client method for method.

    async with AsyncClient("127.0.0.1:50051") as client:
        result = await client.generate("Hello", max_tokens=16)
        async for chunk in client.generate_stream("Hello", max_tokens=16):
            ...
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tqdm import tqdm

from moelens.v1 import coordinator_pb2, coordinator_pb2_grpc
from moelens_client._requests import (CHANNEL_OPTIONS, Prompt, build_batch, build_request,
                                      check_concurrency)
from moelens_client.errors import CancelledError, MoeLensError, UnavailableError, from_rpc_error
from moelens_client.types import (GenerationChunk, GenerationResult, ModelInfo, ResultBuilder,
                                  ServerInfo, chunk_from_response, from_message)

_HEALTH_TIMEOUT_S = 5.0
_NOT_REACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class AsyncGenerationStream:
    """The chunks of one running request, as an async iterator; the last one `is_final`."""

    def __init__(self, request_id: str, call: grpc.aio.UnaryStreamCall):
        self.request_id = request_id
        self._call = call
        self._done = False
        self._is_cancelled_here = False

    def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        return self

    async def __anext__(self) -> GenerationChunk:
        if self._done:
            raise StopAsyncIteration
        try:
            response = await self._call.read()
        except grpc.RpcError as err:
            self._done = True
            raise from_rpc_error(err) from err
        except asyncio.CancelledError:
            # grpc.aio reports a call cancelled through cancel() as task cancellation; only
            # that case becomes the SDK's CancelledError, a cancelled task stays cancelled.
            if not self._is_cancelled_here:
                raise
            self._done = True
            raise CancelledError("cancelled by the client") from None
        if response is grpc.aio.EOF:
            self._done = True
            raise StopAsyncIteration
        chunk = chunk_from_response(response)
        self._done = chunk.is_final
        return chunk

    def cancel(self) -> None:
        """Stop the call; iteration then raises CancelledError (abort() ends it cleanly)."""
        self._is_cancelled_here = True
        self._call.cancel()

    async def result(self) -> GenerationResult:
        """Consume the rest of the stream into one result."""
        builder = ResultBuilder(self.request_id)
        try:
            async for chunk in self:
                builder.add(chunk)
        finally:
            if not self._done:  # the awaiting task was cancelled: stop the server's work too
                self._call.cancel()
        return builder.result()


class AsyncClient:
    """Client for asyncio code; same arguments and methods as Client, awaited."""

    def __init__(self, address: str, *, credentials: grpc.ChannelCredentials | None = None,
                 metadata: Sequence[tuple[str, str]] | None = None, timeout: float | None = None,
                 options: Sequence[tuple[str, Any]] = ()):
        self.address = address
        self.timeout = timeout
        self._metadata = tuple(metadata or ())
        channel_options = [*CHANNEL_OPTIONS, *options]
        if credentials is not None:
            self._channel = grpc.aio.secure_channel(address, credentials, options=channel_options)
        else:
            self._channel = grpc.aio.insecure_channel(address, options=channel_options)
        self._stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    async def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    def generate_stream(self, prompt: Prompt, *, request_id: str | None = None,
                        detokenize: bool | None = None, timeout: float | None = None,
                        **sampling: Any) -> AsyncGenerationStream:
        """Start one request (validated here); `async for` over the result for its chunks."""
        request = build_request(prompt, request_id=request_id, detokenize=detokenize, **sampling)
        return self._start(request, timeout)

    def _start(self, request: coordinator_pb2.GenerateRequest,
               timeout: float | None) -> AsyncGenerationStream:
        call = self._stub.Generate(request, timeout=self._timeout(timeout),
                                   metadata=self._metadata)
        return AsyncGenerationStream(request.request_id, call)

    async def generate(self, prompt: Prompt, *, request_id: str | None = None,
                       detokenize: bool | None = None, timeout: float | None = None,
                       **sampling: Any) -> GenerationResult:
        """Run one request to completion (sampling keywords as in Client.generate)."""
        request = build_request(prompt, request_id=request_id, detokenize=detokenize,
                                final_only=True, **sampling)
        return await self._start(request, timeout).result()

    async def generate_batch(self, prompts: Sequence[Prompt], *,
                             overrides: Sequence[Mapping[str, Any]] | None = None,
                             max_concurrency: int = 64, progress: bool = True,
                             detokenize: bool | None = None, timeout: float | None = None,
                             **sampling: Any) -> list[GenerationResult]:
        """As Client.generate_batch: input order, bounded concurrency, first failure raised."""
        check_concurrency(max_concurrency)
        requests = build_batch(prompts, overrides, sampling, detokenize)
        limit = asyncio.Semaphore(max_concurrency)
        with tqdm(total=len(requests), disable=not progress, unit="req") as bar:
            async def one(index: int) -> GenerationResult:
                async with limit:
                    try:
                        result = await self._start(requests[index], timeout).result()
                    except MoeLensError as err:
                        raise err.with_prefix(f"prompt {index}: ") from err
                bar.update(1)
                return result
            return await _gather_or_cancel([one(i) for i in range(len(requests))])

    async def abort(self, request_id: str, *, timeout: float | None = None) -> bool:
        """Stop a request (its stream ends with finish_reason "abort"); False if none was live."""
        request = coordinator_pb2.AbortRequest(request_id=request_id)
        return (await self._unary(self._stub.Abort, request, timeout)).aborted

    async def health(self, *, timeout: float | None = None) -> bool:
        """True when the coordinator reports SERVING; False when it is not (yet) or unreachable."""
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(),
                                             timeout=self._timeout(timeout) or _HEALTH_TIMEOUT_S,
                                             metadata=self._metadata)
        except grpc.RpcError as err:
            if err.code() in _NOT_REACHABLE:
                return False
            raise from_rpc_error(err) from err
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def wait_ready(self, timeout: float) -> None:
        """Wait until health() is True; UnavailableError after `timeout` seconds."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except asyncio.TimeoutError:
            raise UnavailableError(f"{self.address} not reachable after {timeout:g} s") from None
        if not await self.health(timeout=timeout):
            raise UnavailableError(f"{self.address} not SERVING after {timeout:g} s")

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        request = coordinator_pb2.ModelInfoRequest()
        return from_message(ModelInfo, await self._unary(self._stub.GetModelInfo, request, timeout))

    async def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        request = coordinator_pb2.ServerInfoRequest()
        reply = await self._unary(self._stub.GetServerInfo, request, timeout)
        return from_message(ServerInfo, reply)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _gather_or_cancel(coroutines: list) -> list:
    """Results in order; the first exception cancels the other tasks and is raised."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
