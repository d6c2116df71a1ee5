"""A Coordinator servicer with scripted behaviour, served on a real port for client tests.

Prompt text picks the behaviour: "error:CODE" aborts with that status, "raise:NAME" raises
moelens.errors.NAME (mapped by the real interceptor), "hold" streams one chunk then waits for
Abort (ending with finish_reason "abort") or cancellation. While `barrier` is set, every request
first waits until its parties are all in flight. Anything else echoes: token i = (base + i) % 1000, where base is the
text's length or the sum of the prompt ids, in chunks of two.
"""

from __future__ import annotations

import threading
import time

import grpc

from moelens import errors
from moelens.grpc_server import ServerHandle, start_server
from moelens.v1 import coordinator_pb2, coordinator_pb2_grpc

SERVICE_NAME = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name
HOLD_LIMIT_S = 30.0  # a hold never outlives a broken test by much


class FakeCoordinator(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[coordinator_pb2.GenerateRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.num_active = 0
        self.peak_active = 0
        self.holds: dict[str, threading.Event] = {}
        self.cancelled: dict[str, threading.Event] = {}
        self.barrier: threading.Barrier | None = None

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.metadata.clear()
            self.peak_active = 0
            self.barrier = None

    def Generate(self, request, context):
        rid = request.request_id
        with self.lock:
            self.requests.append(request)
            self.metadata.append(dict(context.invocation_metadata()))
            self.num_active += 1
            self.peak_active = max(self.peak_active, self.num_active)
            self.cancelled[rid] = threading.Event()
        if not context.add_callback(self.cancelled[rid].set):
            self.cancelled[rid].set()  # the client cancelled before the callback was registered
        try:
            yield from self._generate(request, context)
        finally:
            with self.lock:
                self.num_active -= 1

    def _generate(self, request, context):
        text = request.text if request.WhichOneof("input") == "text" else ""
        if self.barrier is not None:
            self.barrier.wait()
        if text.startswith("error:"):
            context.abort(grpc.StatusCode[text.split(":", 1)[1]], f"fake {text}")
        if text.startswith("raise:"):
            raise getattr(errors, text.split(":", 1)[1])("raised by the fake")
        if text == "hold":
            yield from self._hold(request)
            return
        ids = list(request.token_ids.ids)
        time.sleep(0.002 * (sum(ids) % 5))  # finish out of order
        yield from self._echo(request, len(text) if text else sum(ids))

    def _hold(self, request):
        rid = request.request_id
        abort = threading.Event()
        with self.lock:
            self.holds[rid] = abort
        yield _chunk(rid, [7], request)
        for _ in range(int(HOLD_LIMIT_S / 0.01)):
            if abort.wait(0.01) or self.cancelled[rid].is_set():
                break
        if abort.is_set():
            yield _complete(rid, "abort", 1, 1)

    def _echo(self, request, base: int):
        sampling = request.sampling
        max_tokens = sampling.max_tokens if sampling.HasField("max_tokens") else 16
        tokens = [(base + i) % 1000 for i in range(max_tokens)]
        for start in range(0, len(tokens), 2):
            yield _chunk(request.request_id, tokens[start:start + 2], request)
        num_prompt = len(request.token_ids.ids) or len(request.text)
        yield _complete(request.request_id, "length", num_prompt, len(tokens))

    def Abort(self, request, context):
        if request.request_id.startswith("error:"):
            context.abort(grpc.StatusCode[request.request_id.split(":", 1)[1]], "fake abort")
        with self.lock:
            event = self.holds.pop(request.request_id, None)
        if event is not None:
            event.set()
        return coordinator_pb2.AbortResponse(aborted=event is not None)

    def GetModelInfo(self, request, context):
        return coordinator_pb2.ModelInfo(model_path="/fake", model_type="mixtral",
                                         vocab_size=1000, num_layers=2, has_tokenizer=True,
                                         eos_token_ids=[2])

    def GetServerInfo(self, request, context):
        return coordinator_pb2.ServerInfo(num_running=self.num_active, block_size=16,
                                          transport="shm", pipeline=True)


def _chunk(rid: str, tokens: list[int], request) -> coordinator_pb2.GenerateResponse:
    chunk = coordinator_pb2.GenerateChunk(token_ids=tokens)
    if request.detokenize:
        chunk.text = "".join(f"<{t}>" for t in tokens)
    if request.sampling.want_logprobs:
        chunk.logprobs.extend(-0.5 for _ in tokens)
        k = request.sampling.logprobs
        for t in tokens:
            chunk.top_token_ids.extend(t + j for j in range(k))
            chunk.top_logprobs.extend(-0.5 - j for j in range(k))
    return coordinator_pb2.GenerateResponse(request_id=rid, chunk=chunk)


def _complete(rid: str, reason: str, num_prompt: int, num_gen: int):
    usage = coordinator_pb2.Usage(prompt_tokens=num_prompt, completion_tokens=num_gen,
                                  time_to_first_token_s=0.01, e2e_latency_s=0.02)
    return coordinator_pb2.GenerateResponse(
        request_id=rid, complete=coordinator_pb2.GenerateComplete(finish_reason=reason,
                                                                  usage=usage))


def serve_fake(host: str = "127.0.0.1") -> tuple[FakeCoordinator, ServerHandle]:
    """The fake on a free port, reporting SERVING, behind the real status interceptor."""
    fake = FakeCoordinator()
    handle = start_server(lambda s: coordinator_pb2_grpc.add_CoordinatorServicer_to_server(
        fake, s), [SERVICE_NAME], host, 0)
    handle.set_serving(True)
    return fake, handle
