"""Synchronous MoE-Lens client: one gRPC channel to the coordinator, typed results and errors.

    with Client("127.0.0.1:50051") as client:
        result = client.generate("The capital of France is", max_tokens=32, temperature=0)
        for chunk in client.generate_stream([1, 2, 3], max_tokens=8):
            print(chunk.token_ids)
"""

from __future__ import annotations

import threading
from concurrent import futures
from typing import Any, Iterator, Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tqdm import tqdm

from moelens.v1 import coordinator_pb2, coordinator_pb2_grpc
from moelens_client._requests import (CHANNEL_OPTIONS, Prompt, build_batch, build_request,
                                      check_concurrency)
from moelens_client.errors import MoeLensError, UnavailableError, from_rpc_error
from moelens_client.types import (GenerationChunk, GenerationResult, ModelInfo, ResultBuilder,
                                  ServerInfo, chunk_from_response, from_message)

_HEALTH_TIMEOUT_S = 5.0
_NOT_REACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class GenerationStream:
    """The chunks of one running request; iterate it, or `cancel()` it from any thread.

    The last chunk is the completion (`chunk.is_final`, with finish_reason and usage). Leaving
    the iteration early cancels the call, which the server treats as an abort."""

    def __init__(self, request_id: str, call: Any):
        self.request_id = request_id
        self._call = call
        self._done = False

    def __iter__(self) -> Iterator[GenerationChunk]:
        return self

    def __next__(self) -> GenerationChunk:
        if self._done:
            raise StopIteration
        try:
            response = next(self._call)
        except StopIteration:
            self._done = True
            raise
        except grpc.RpcError as err:
            self._done = True
            raise from_rpc_error(err) from err
        chunk = chunk_from_response(response)
        self._done = chunk.is_final
        return chunk

    def cancel(self) -> None:
        """Stop the call; iteration then raises CancelledError (abort() ends it cleanly)."""
        self._call.cancel()

    def result(self) -> GenerationResult:
        """Consume the rest of the stream into one result."""
        builder = ResultBuilder(self.request_id)
        for chunk in self:
            builder.add(chunk)
        return builder.result()

    def __enter__(self) -> "GenerationStream":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            self.cancel()

    def __del__(self) -> None:
        call = getattr(self, "_call", None)
        if call is not None and not self._done:
            call.cancel()


class Client:
    """Blocking client for the coordinator. Thread-safe: share one across threads.

    credentials: grpc.ChannelCredentials for TLS (e.g. grpc.ssl_channel_credentials(ca)).
    metadata: (key, value) pairs sent with every call (auth tokens for a proxy).
    timeout: default deadline in seconds for every call (None = none)."""

    def __init__(self, address: str, *, credentials: grpc.ChannelCredentials | None = None,
                 metadata: Sequence[tuple[str, str]] | None = None, timeout: float | None = None,
                 options: Sequence[tuple[str, Any]] = ()):
        self.address = address
        self.timeout = timeout
        self._metadata = tuple(metadata or ())
        channel_options = [*CHANNEL_OPTIONS, *options]
        if credentials is not None:
            self._channel = grpc.secure_channel(address, credentials, options=channel_options)
        else:
            self._channel = grpc.insecure_channel(address, options=channel_options)
        self._stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    def generate_stream(self, prompt: Prompt, *, request_id: str | None = None,
                        detokenize: bool | None = None, timeout: float | None = None,
                        **sampling: Any) -> GenerationStream:
        """Start one request; the returned stream yields chunks as tokens are produced."""
        request = build_request(prompt, request_id=request_id, detokenize=detokenize, **sampling)
        return self._start(request, timeout)

    def _start(self, request: coordinator_pb2.GenerateRequest,
               timeout: float | None) -> GenerationStream:
        call = self._stub.Generate(request, timeout=self._timeout(timeout),
                                   metadata=self._metadata)
        return GenerationStream(request.request_id, call)

    def generate(self, prompt: Prompt, *, request_id: str | None = None,
                 detokenize: bool | None = None, timeout: float | None = None,
                 **sampling: Any) -> GenerationResult:
        """Run one request to completion. Sampling keywords: max_tokens, min_tokens, temperature,
        top_p, top_k, seed, stop, stop_token_ids, ignore_eos, logprobs (None = not returned)."""
        request = build_request(prompt, request_id=request_id, detokenize=detokenize,
                                final_only=True, **sampling)
        return self._start(request, timeout).result()

    def generate_batch(self, prompts: Sequence[Prompt], *,
                       overrides: Sequence[Mapping[str, Any]] | None = None,
                       max_concurrency: int = 64, progress: bool = True,
                       detokenize: bool | None = None, timeout: float | None = None,
                       **sampling: Any) -> list[GenerationResult]:
        """Run many requests, at most max_concurrency in flight; results in input order.

        overrides[i] (a dict of sampling keywords) replaces the shared keywords for prompt i.
        Every request is validated before the first is sent. The first failure cancels the
        rest and is raised with "prompt i: " in front of its message."""
        check_concurrency(max_concurrency)
        requests = build_batch(prompts, overrides, sampling, detokenize)
        return _SyncBatch(self, requests, timeout).run(max_concurrency, progress)

    def abort(self, request_id: str, *, timeout: float | None = None) -> bool:
        """Stop a request (its stream ends with finish_reason "abort"); False if none was live."""
        request = coordinator_pb2.AbortRequest(request_id=request_id)
        return self._unary(self._stub.Abort, request, timeout).aborted

    def health(self, *, timeout: float | None = None) -> bool:
        """True when the coordinator reports SERVING; False when it is not (yet) or unreachable."""
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(),
                                       timeout=self._timeout(timeout) or _HEALTH_TIMEOUT_S,
                                       metadata=self._metadata)
        except grpc.RpcError as err:
            if err.code() in _NOT_REACHABLE:
                return False
            raise from_rpc_error(err) from err
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def wait_ready(self, timeout: float) -> None:
        """Block until health() is True; UnavailableError after `timeout` seconds."""
        ready = self._channel_ready(timeout)
        if not ready or not self.health(timeout=timeout):
            raise UnavailableError(f"{self.address} not SERVING after {timeout:g} s")

    def _channel_ready(self, timeout: float) -> bool:
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            return False
        return True

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        reply = self._unary(self._stub.GetModelInfo, coordinator_pb2.ModelInfoRequest(), timeout)
        return from_message(ModelInfo, reply)

    def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        reply = self._unary(self._stub.GetServerInfo, coordinator_pb2.ServerInfoRequest(),
                            timeout)
        return from_message(ServerInfo, reply)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _SyncBatch:
    """Threads, each running one stream at a time; the first failure cancels the live calls."""

    def __init__(self, client: Client, requests: list[coordinator_pb2.GenerateRequest],
                 timeout: float | None):
        self.client = client
        self.requests = requests
        self.timeout = timeout
        self.results: list[GenerationResult | None] = [None] * len(requests)
        self.lock = threading.Lock()
        self.live: dict[int, GenerationStream] = {}
        self.failure: tuple[int, MoeLensError] | None = None
        self.is_stopped = False
        self.bar: tqdm | None = None

    def run(self, max_concurrency: int, progress: bool) -> list[GenerationResult]:
        if not self.requests:
            return []
        workers = min(max_concurrency, len(self.requests))
        with tqdm(total=len(self.requests), disable=not progress, unit="req") as self.bar:
            pool = futures.ThreadPoolExecutor(workers, thread_name_prefix="moelens-batch")
            try:
                futures.wait([pool.submit(self._one, i) for i in range(len(self.requests))])
            except BaseException:  # Ctrl-C: stop the calls so the threads return at once
                self._stop()
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        if self.failure is not None:
            index, err = self.failure
            raise err.with_prefix(f"prompt {index}: ") from err
        return self.results  # type: ignore[return-value]

    def _one(self, index: int) -> None:
        with self.lock:
            if self.is_stopped:
                return
            stream = self.client._start(self.requests[index], self.timeout)
            self.live[index] = stream
        try:
            self.results[index] = stream.result()
        except MoeLensError as err:
            with self.lock:
                if self.failure is None:
                    self.failure = (index, err)
            self._stop()
            return
        finally:
            with self.lock:
                self.live.pop(index, None)
        self.bar.update(1)

    def _stop(self) -> None:
        with self.lock:
            self.is_stopped = True
            streams = list(self.live.values())
        for stream in streams:
            stream.cancel()
