"""The client SDK against a fake Coordinator on a real port (real stubs, real interceptor)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import threading
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fake_coordinator import FakeCoordinator, serve_fake
from moelens.sampling import SamplingParams
from moelens.v1 import coordinator_pb2_grpc
from moelens_client import (AsyncClient, CancelledError, Client, DeadlineExceededError,
                            InternalError, InvalidArgumentError, MoeLensError, NotFoundError,
                            ResourceExhaustedError, UnavailableError)

CODE_TO_ERROR = {
    "INVALID_ARGUMENT": InvalidArgumentError, "RESOURCE_EXHAUSTED": ResourceExhaustedError,
    "UNAVAILABLE": UnavailableError, "NOT_FOUND": NotFoundError,
    "DEADLINE_EXCEEDED": DeadlineExceededError, "CANCELLED": CancelledError,
    "INTERNAL": InternalError, "UNKNOWN": InternalError, "PERMISSION_DENIED": MoeLensError,
}


@pytest.fixture(scope="module")
def server():
    fake, handle = serve_fake()
    yield fake, f"127.0.0.1:{handle.port}", handle
    handle.stop(0)


@pytest.fixture
def fake(server) -> FakeCoordinator:
    server[0].reset()
    return server[0]


@pytest.fixture
def client(server):
    with Client(server[1]) as c:
        yield c


def echo(base: int, n: int) -> list[int]:
    return [(base + i) % 1000 for i in range(n)]


def test_generate_text_and_ids(client, fake):
    result = client.generate("hello", max_tokens=5, temperature=0)
    assert result.token_ids == echo(5, 5)
    assert result.text == "".join(f"<{t}>" for t in echo(5, 5))  # detokenize on for text
    assert result.finish_reason == "length"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (5, 5)
    assert result.usage.ttft == pytest.approx(0.01) and result.logprobs is None
    by_ids = client.generate([3, 4], max_tokens=3)
    assert by_ids.token_ids == echo(7, 3) and by_ids.text == ""
    sent = fake.requests[-1]
    assert list(sent.token_ids.ids) == [3, 4] and not sent.detokenize


def test_only_given_sampling_fields_are_sent(client, fake):
    client.generate([1], max_tokens=2, temperature=0.5, stop="x", seed=3)
    sampling = fake.requests[-1].sampling
    assert sampling.max_tokens == 2 and sampling.temperature == 0.5 and sampling.seed == 3
    assert list(sampling.stop) == ["x"]
    assert not sampling.HasField("top_p") and not sampling.HasField("logprobs")
    assert not sampling.want_logprobs


def test_logprobs_unflattened(client):
    result = client.generate([1], max_tokens=3, logprobs=2)
    assert result.logprobs == [-0.5] * 3
    assert result.top_logprobs[1] == [(2, -0.5), (3, -1.5)]
    chosen_only = client.generate([1], max_tokens=3, logprobs=0)
    assert chosen_only.logprobs == [-0.5] * 3 and chosen_only.top_logprobs is None


def test_stream_yields_chunks_then_completion(client):
    chunks = list(client.generate_stream([2], max_tokens=5, request_id="mine"))
    assert [c.token_ids for c in chunks[:-1]] == [echo(2, 5)[0:2], echo(2, 5)[2:4], [6]]
    assert chunks[-1].is_final and chunks[-1].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 5
    assert {c.request_id for c in chunks} == {"mine"}


def test_abort_from_another_thread_ends_stream(client):
    stream = client.generate_stream("hold")
    first = next(stream)
    assert first.token_ids == [7]
    aborted: list[bool] = []
    thread = threading.Thread(target=lambda: aborted.append(client.abort(stream.request_id)))
    thread.start()
    rest = list(stream)
    thread.join()
    assert aborted == [True]
    assert rest[-1].finish_reason == "abort"
    assert client.abort("no-such-request") is False


def test_cancel_stops_the_call_on_the_server(client, fake):
    stream = client.generate_stream("hold")
    next(stream)
    stream.cancel()
    with pytest.raises(CancelledError):
        list(stream)
    assert fake.cancelled[stream.request_id].wait(5)


def test_leaving_stream_context_cancels(client, fake):
    with client.generate_stream("hold") as stream:
        next(stream)
    assert fake.cancelled[stream.request_id].wait(5)


def test_client_deadline(server):
    with Client(server[1], timeout=0.2) as client:
        with pytest.raises(DeadlineExceededError):
            client.generate("hold")


@pytest.mark.parametrize("code", sorted(CODE_TO_ERROR))
def test_status_codes_map_to_types(client, code):
    with pytest.raises(CODE_TO_ERROR[code]) as stream_err:
        client.generate(f"error:{code}")
    assert type(stream_err.value) is CODE_TO_ERROR[code]
    assert stream_err.value.code == grpc.StatusCode[code]
    assert f"fake error:{code}" in str(stream_err.value)
    with pytest.raises(CODE_TO_ERROR[code]):
        client.abort(f"error:{code}")


@pytest.mark.parametrize("name,error", [("InvalidArgument", InvalidArgumentError),
                                        ("ResourceExhausted", ResourceExhaustedError),
                                        ("Unavailable", UnavailableError),
                                        ("NotFound", NotFoundError)])
def test_server_exceptions_through_interceptor(client, name, error):
    with pytest.raises(error, match="raised by the fake"):
        client.generate(f"raise:{name}")


@pytest.mark.parametrize("sampling", [dict(temperature=-1), dict(top_p=0), dict(top_k=-2),
                                      dict(max_tokens=0), dict(min_tokens=20),
                                      dict(logprobs=21), dict(stop=[""])])
def test_client_side_validation_matches_server_messages(client, fake, sampling):
    with pytest.raises(ValueError) as expected:
        SamplingParams(**{k: tuple(v) if k == "stop" else v for k, v in sampling.items()})
    with pytest.raises(InvalidArgumentError) as got:
        client.generate([1], **sampling)
    assert str(got.value) == str(expected.value)
    assert fake.requests == []  # failed before sending


@pytest.mark.parametrize("prompt,sampling,match", [
    ([1], dict(temperature="hot"), "temperature must be a number"),
    ([1], dict(ignore_eos=1), "ignore_eos must be true or false"),
    ([1], dict(max_tokns=3), "unknown sampling parameter"),
    ("", {}, "prompt must be non-empty"),
    ([1, -2], {}, "prompt must be"),
    (3.5, {}, "prompt must be"),
])
def test_client_side_type_checks(client, fake, prompt, sampling, match):
    with pytest.raises(InvalidArgumentError, match=match):
        client.generate(prompt, **sampling)
    assert fake.requests == []


def test_batch_order_and_overrides(client):
    prompts = [[i] for i in range(12)]
    overrides = [dict(max_tokens=1 + i % 4) for i in range(12)]
    results = client.generate_batch(prompts, overrides=overrides, max_concurrency=4,
                                    progress=False, max_tokens=9)
    assert [r.token_ids for r in results] == [echo(i, 1 + i % 4) for i in range(12)]
    assert client.generate_batch([], progress=False) == []


def test_batch_concurrency_reaches_and_respects_bound(client, fake):
    fake.barrier = threading.Barrier(3, timeout=10)  # passes only with 3 in flight at once
    results = client.generate_batch(["barrier"] * 9, max_concurrency=3, progress=False,
                                    max_tokens=1)
    assert len(results) == 9 and fake.peak_active == 3


def test_batch_validates_everything_first(client, fake):
    with pytest.raises(InvalidArgumentError, match="^prompt 2: temperature must be >= 0"):
        client.generate_batch([[1], [2], [3]], overrides=[{}, {}, dict(temperature=-1)],
                              progress=False)
    assert fake.requests == []
    with pytest.raises(ValueError, match="max_concurrency"):
        client.generate_batch([[1]], max_concurrency=0)


def test_batch_failure_names_prompt_and_cancels_rest(client, fake):
    prompts = ["hold", "hold", "error:RESOURCE_EXHAUSTED"]
    fake.barrier = threading.Barrier(3, timeout=10)  # the error comes once both holds are in
    with pytest.raises(ResourceExhaustedError, match="^prompt 2: fake error"):
        client.generate_batch(prompts, max_concurrency=3, progress=False)
    held = [r.request_id for r in fake.requests if r.text == "hold"]
    assert len(held) == 2 and all(fake.cancelled[rid].wait(5) for rid in held)


def test_info_health_and_metadata(server, fake):
    _, address, handle = server
    with Client(address, metadata=[("authorization", "Bearer t0ken")]) as client:
        assert client.health() is True
        client.wait_ready(5)
        info = client.model_info()
        assert info.model_type == "mixtral" and info.eos_token_ids == [2] and info.has_tokenizer
        assert client.server_info().block_size == 16
        client.generate([1], max_tokens=1)
        assert fake.metadata[-1]["authorization"] == "Bearer t0ken"
        handle.set_serving(False)
        try:
            assert client.health() is False
        finally:
            handle.set_serving(True)


def test_health_false_when_unreachable():
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with Client(f"127.0.0.1:{port}") as client:
        assert client.health(timeout=2) is False
        with pytest.raises(UnavailableError):
            client.generate([1])


def test_async_generate_stream_abort_and_errors(server, fake):
    async def main():
        async with AsyncClient(server[1]) as client:
            result = await client.generate("hello", max_tokens=3)
            assert result.token_ids == echo(5, 3) and result.finish_reason == "length"
            chunks = [c async for c in client.generate_stream([2], max_tokens=3)]
            assert chunks[-1].is_final and [t for c in chunks for t in c.token_ids] == echo(2, 3)
            stream = client.generate_stream("hold")
            assert (await stream.__anext__()).token_ids == [7]
            assert await client.abort(stream.request_id) is True
            assert [c async for c in stream][-1].finish_reason == "abort"
            with pytest.raises(ResourceExhaustedError, match="fake"):
                await client.generate("error:RESOURCE_EXHAUSTED")
            with pytest.raises(NotFoundError):
                await client.abort("error:NOT_FOUND")
            with pytest.raises(InvalidArgumentError, match="top_p"):
                await client.generate([1], top_p=2)
            assert await client.health() is True
            assert (await client.model_info()).vocab_size == 1000
            assert (await client.server_info()).transport == "shm"
            await client.wait_ready(5)
    asyncio.run(main())


def test_async_cancel_and_task_cancellation(server, fake):
    async def main():
        async with AsyncClient(server[1]) as client:
            stream = client.generate_stream("hold")
            await stream.__anext__()
            stream.cancel()
            with pytest.raises(CancelledError):
                await stream.__anext__()
            task = asyncio.ensure_future(client.generate("hold"))
            while sum(r.text == "hold" for r in fake.requests) < 2:  # the call has started
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        return stream.request_id
    first = asyncio.run(main())
    assert fake.cancelled[first].wait(5)
    held = [r.request_id for r in fake.requests if r.text == "hold"]
    assert len(held) == 2 and fake.cancelled[held[1]].wait(5)


def test_async_batch_order_bound_and_failure(server, fake):
    async def main():
        async with AsyncClient(server[1]) as client:
            prompts = [[i] for i in range(10)]
            results = await client.generate_batch(
                prompts, overrides=[dict(max_tokens=1 + i % 3) for i in range(10)],
                max_concurrency=3, progress=False)
            assert [r.token_ids for r in results] == [echo(i, 1 + i % 3) for i in range(10)]
            fake.reset()
            fake.barrier = threading.Barrier(4, timeout=10)
            await client.generate_batch(["barrier"] * 8, max_concurrency=4, progress=False,
                                        max_tokens=1)
            assert fake.peak_active == 4
            fake.barrier = threading.Barrier(2, timeout=10)
            with pytest.raises(UnavailableError, match="^prompt 1: "):
                await client.generate_batch(["hold", "error:UNAVAILABLE"], progress=False)
    asyncio.run(main())
    held = [r.request_id for r in fake.requests if r.text == "hold"]
    assert fake.cancelled[held[0]].wait(5)


def _self_signed(tmp_path) -> tuple[bytes, bytes]:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem"),
                    "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return (tmp_path / "key.pem").read_bytes(), (tmp_path / "cert.pem").read_bytes()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_credentials(tmp_path):
    key, cert = _self_signed(tmp_path)
    server = grpc.server(futures.ThreadPoolExecutor(4))
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(FakeCoordinator(), server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, cert)]))
    server.start()
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert)
        with Client(f"127.0.0.1:{port}", credentials=credentials) as client:
            assert client.health() and client.generate([1], max_tokens=2).token_ids == [1, 2]
        with Client(f"127.0.0.1:{port}") as plain:  # no TLS: the handshake fails
            assert plain.health(timeout=2) is False

        async def main():
            async with AsyncClient(f"127.0.0.1:{port}", credentials=credentials) as client:
                return (await client.generate([1], max_tokens=2)).token_ids
        assert asyncio.run(main()) == [1, 2]
    finally:
        server.stop(0)
