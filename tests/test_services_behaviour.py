"""Service behaviour through real processes: concurrency, abort, deadlines, errors, crashes."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest

from moelens.v1 import (attention_pb2, attention_pb2_grpc, common_pb2, coordinator_pb2,
                        coordinator_pb2_grpc)
from services_fixture import running_services
from tiny_models import hf_greedy, load_reference

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def services(tiny_checkpoints):
    with running_services(tiny_checkpoints["mixtral"], max_num_seqs=4, max_waiting=4) as s:
        yield s


def _stub(address):
    return coordinator_pb2_grpc.CoordinatorStub(grpc.insecure_channel(address))


def _request(prompt, **sampling):
    sampling.setdefault("temperature", 0)
    return coordinator_pb2.GenerateRequest(token_ids=coordinator_pb2.TokenIds(ids=prompt),
                                           sampling=common_pb2.SamplingParams(**sampling))


def _collect(stream):
    tokens, complete = [], None
    for event in stream:
        if event.HasField("chunk"):
            tokens += event.chunk.token_ids
        else:
            complete = event.complete
    return tokens, complete


def _used_blocks(services) -> int:
    stub = attention_pb2_grpc.AttentionServiceStub(grpc.insecure_channel(services.attention_address))
    return stub.Info(attention_pb2.AttentionInfoRequest()).num_used_blocks


def _wait_blocks_freed(services, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while _used_blocks(services) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _used_blocks(services)


def test_two_concurrent_streams_complete_and_correct(services, tiny_checkpoints):
    reference = load_reference(tiny_checkpoints["mixtral"])
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], list(range(40, 61))]
    results = [None, None]

    def run(i):
        results[i] = _collect(_stub(services.coordinator_address).Generate(
            _request(prompts[i], max_tokens=33, ignore_eos=True), timeout=120))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for prompt, (tokens, complete) in zip(prompts, results):
        assert complete.finish_reason == "length" and complete.usage.completion_tokens == 33
        assert tokens == hf_greedy(reference, prompt, 33)


def test_final_only_stream_is_one_chunk_equal_to_the_deltas(services):
    stub = _stub(services.coordinator_address)
    sampling = dict(max_tokens=24, ignore_eos=True, logprobs=2)
    deltas = list(stub.Generate(_request(list(range(5, 17)), **sampling), timeout=120))
    request = _request(list(range(5, 17)), **sampling)
    request.final_only = True
    final = list(stub.Generate(request, timeout=120))
    assert len(deltas) > 2  # a chunk per iteration
    assert [e.WhichOneof("event") for e in final] == ["chunk", "complete"]
    merged = coordinator_pb2.GenerateChunk()
    for e in deltas[:-1]:
        merged.MergeFrom(e.chunk)  # repeated fields append
    assert final[0].chunk.token_ids == merged.token_ids and len(merged.token_ids) == 24
    assert final[0].chunk.top_token_ids == merged.top_token_ids
    assert final[0].chunk.logprobs == pytest.approx(merged.logprobs)
    assert final[1].complete.usage.completion_tokens == 24


def test_aborted_final_only_request_returns_its_tokens(services):
    stub = _stub(services.coordinator_address)
    request = _request(list(range(30)), max_tokens=400, ignore_eos=True)
    request.request_id, request.final_only = "final-to-abort", True
    stream = stub.Generate(request, timeout=120)
    deadline = time.monotonic() + 30
    while _used_blocks(services) == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # a few iterations
    assert stub.Abort(coordinator_pb2.AbortRequest(request_id="final-to-abort")).aborted
    events = list(stream)
    assert [e.WhichOneof("event") for e in events] == ["chunk", "complete"]
    assert events[1].complete.finish_reason == "abort"
    assert len(events[0].chunk.token_ids) == events[1].complete.usage.completion_tokens > 0
    assert _wait_blocks_freed(services) == 0


def test_abort_stops_request_and_frees_blocks(services):
    stub = _stub(services.coordinator_address)
    request = _request(list(range(30)), max_tokens=400, ignore_eos=True)
    request.request_id = "to-abort"
    stream = stub.Generate(request, timeout=120)
    first = next(stream)
    assert first.HasField("chunk")
    assert _used_blocks(services) > 0
    assert stub.Abort(coordinator_pb2.AbortRequest(request_id="to-abort")).aborted
    tokens, complete = _collect(stream)
    assert complete.finish_reason == "abort"
    assert _wait_blocks_freed(services) == 0
    assert not stub.Abort(coordinator_pb2.AbortRequest(request_id="to-abort")).aborted


def test_client_deadline_aborts_and_frees(services):
    stub = _stub(services.coordinator_address)
    with pytest.raises(grpc.RpcError) as err:
        _collect(stub.Generate(_request(list(range(20)), max_tokens=2000, ignore_eos=True),
                               timeout=1.0))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _wait_blocks_freed(services) == 0


@pytest.mark.parametrize("request_kwargs,field", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(top_k=-3), "top_k"),
])
def test_invalid_sampling_names_field(services, request_kwargs, field):
    with pytest.raises(grpc.RpcError) as err:
        _collect(_stub(services.coordinator_address).Generate(_request([1, 2, 3], **request_kwargs)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()


@pytest.mark.parametrize("prompt,needle", [([], "empty"), ([1, 10**6], "token_ids"),
                                           (list(range(5)) * 200, "context")])
def test_invalid_prompts(services, prompt, needle):
    with pytest.raises(grpc.RpcError) as err:
        _collect(_stub(services.coordinator_address).Generate(_request(prompt, max_tokens=4)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.value.details()


def test_overload_is_resource_exhausted(services):
    stub = _stub(services.coordinator_address)
    streams = [stub.Generate(_request([i + 1] * 4, max_tokens=200, ignore_eos=True), timeout=60)
               for i in range(16)]
    codes = []
    for s in streams:
        try:
            next(s)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as err:
            codes.append(err.code())
    for s in streams:
        s.cancel()
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert grpc.StatusCode.OK in codes
    assert _wait_blocks_freed(services) == 0


def _kill_mid_stream(services, victim: str) -> grpc.RpcError:
    """Kill one compute service while a request streams; return the error the client gets."""
    stub = _stub(services.coordinator_address)
    stream = stub.Generate(_request([5] * 10, max_tokens=5000 // 10, ignore_eos=True),
                           timeout=120)
    next(stream)
    os.kill(services.services[victim].process.pid, signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as err:
        _collect(stream)
    return err.value


def test_dead_expert_fails_requests_loudly_and_shm_is_removed(tiny_checkpoints):
    with running_services(tiny_checkpoints["mixtral"]) as services:
        err = _kill_mid_stream(services, "expert")
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert "expert" in err.details()
        attention_pid = services.services["attention"].process.pid
        os.kill(attention_pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _segments(attention_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _segments(attention_pid)


def test_dead_attention_fails_requests_loudly(tiny_checkpoints):
    """The layers travel through the shared-memory rings; the attention service's death still
    reaches the expert waiting on them (its gRPC session stream ends) and the request fails."""
    with running_services(tiny_checkpoints["mixtral"]) as services:
        err = _kill_mid_stream(services, "attention")
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert "attention" in err.details()


def _segments(pid: int) -> list[str]:
    return [p.name for p in Path("/dev/shm").glob(f"moelens-{pid}-*")]


def test_profile_from_running_services(services, tiny_checkpoints, tmp_path):
    from moelens.profile import load_profile
    from moelens_cli.main import main
    out = tmp_path / "p.json"
    rc = main(["profile", "--model", str(tiny_checkpoints["mixtral"]), "--out", str(out),
               "--expert", services.expert_address, "--attention", services.attention_address])
    profile = load_profile(out)
    assert rc == 0 and profile.gemm_slope_s_per_token > 0 and profile.exchange_fixed_s > 0
    assert profile.attention_kv_bytes_per_s > 0 and profile.host_memory_bandwidth_bytes_per_s > 0
    # the expert's warmup curve crosses the proto: every count from 1 token, each timed
    assert profile.gemm_curve_tokens[:2] == (1, 2) and len(profile.gemm_curve_s) == len(
        profile.gemm_curve_tokens) and min(profile.gemm_curve_s) > 0


def test_attention_serves_a_new_expert_after_one_dies(tiny_checkpoints):
    """An expert killed mid-session leaves its messages in the rings; the attention service
    ends that session when the stream drops and starts the next one on empty rings."""
    import torch

    from moelens.errors import Unavailable
    from services.expert_gpu.attention_client import AttentionClient
    with running_services(tiny_checkpoints["mixtral"]) as services:
        stub = _stub(services.coordinator_address)
        stream = stub.Generate(_request([5] * 10, max_tokens=500, ignore_eos=True), timeout=120)
        next(stream)
        os.kill(services.services["expert"].process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            try:
                client = AttentionClient(services.attention_address, "shm")
                break
            except Unavailable:  # the dead expert's session has not ended yet
                assert time.monotonic() < deadline
                time.sleep(0.2)
        info = client.info
        plan = attention_pb2.AttentionPlan(slots=[0])
        plan.sequences.add(seq_id=12345, block_ids=[0])
        request = attention_pb2.LayerRequest(step_id=7, layer=1, group=0, plan=plan)
        kv = torch.ones(1, info.num_kv_heads, info.head_dim)
        client.send_layer(request, {"k": kv, "v": kv, "q": torch.zeros(0, 1, info.head_dim)})
        response, out = client.recv_out()
        assert (response.step_id, response.layer) == (7, 1)
        assert out.shape[0] == 0
        client.free([12345])
        client.close()
