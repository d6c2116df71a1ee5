"""gRPC edge of the attention service: protobuf <-> engine calls, nothing else."""

from __future__ import annotations

import logging
import threading

from moelens import exchange
from moelens.compute_loop import ComputeLoop
from moelens.errors import InvalidArgument, ResourceExhausted
from moelens.shm import ShmArena
from moelens.shm_ring import ShmRing
from moelens.v1 import attention_pb2, attention_pb2_grpc
from services.attention_cpu.engine import AttentionEngine, StepPlan

log = logging.getLogger(__name__)


class _RingSession:
    """An exchange over the shared-memory rings: the gRPC stream only says when it ends."""

    def __init__(self, requests: ShmRing):
        self.requests = requests
        self.is_closed = False
        self.error: Exception | None = None

    def watch(self, request_iterator) -> None:
        """On a thread of its own: wait for the stream to end (the expert closed it or died),
        then wake the compute thread's ring loop."""
        try:
            for _ in request_iterator:
                self.error = InvalidArgument("a LayerRequest came on the stream after use_ring")
                break
        except Exception:  # noqa: BLE001 - a cancelled stream: the expert is gone
            pass
        finally:
            self.is_closed = True
            self.requests.kick()


class AttentionServicer(attention_pb2_grpc.AttentionServiceServicer):
    def __init__(self, engine: AttentionEngine, arena: ShmArena | None, compute: ComputeLoop,
                 metrics=None, ring_arena: ShmArena | None = None):
        self.engine, self.arena, self.compute, self.metrics = engine, arena, compute, metrics
        self.ring_arena = ring_arena
        self.rings = None if ring_arena is None else exchange.rings(ring_arena)
        """(requests, responses) with the shm transport: the exchange's message rings."""
        self._exchange_busy = threading.Lock()  # one expert stream at a time owns the slots

    def _info(self) -> attention_pb2.AttentionInfo:
        e, m = self.engine, self.engine.model
        return attention_pb2.AttentionInfo(
            num_blocks=e.num_blocks, block_size=e.config.block_size,
            num_used_blocks=e.num_used_blocks, num_layers=m.num_layers,
            num_kv_heads=m.num_kv_heads, head_dim=m.head_dim, kv_dtype=e.config.kv_dtype,
            pool_bytes=e.pool_bytes, kernel_backend=e.kernel.backend(),
            num_threads=e.config.num_threads,
            shm_name=self.arena.name if self.arena else "",
            shm_num_slots=self.arena.num_slots if self.arena else 0,
            shm_slot_bytes=self.arena.slot_bytes if self.arena else 0,
            shm_ring_name=self.ring_arena.name if self.ring_arena else "",
            shm_ring_slot_bytes=self.ring_arena.slot_bytes if self.ring_arena else 0,
            kv_read_bytes_per_s=e.kv_read_bytes_per_s,
            host_read_bytes_per_s=e.host_read_bytes_per_s)

    def Info(self, request, context):
        self._report_capacity()
        return self._info()

    def Warmup(self, request, context):
        self.compute.call(self._measure)
        return self._info()

    def _measure(self) -> None:
        from services.attention_cpu.warmup import measure_kv_bandwidth
        self.engine.kv_read_bytes_per_s = measure_kv_bandwidth(self.engine)
        self.engine.host_read_bytes_per_s = self.engine.kernel.stream_read_gbps(
            num_threads=self.engine.config.num_threads) * 1e9

    def FreeSequences(self, request, context):
        freed = self.engine.free(list(request.seq_ids))
        self._report_capacity()
        return attention_pb2.FreeSequencesResponse(num_freed_blocks=freed,
                                                   num_used_blocks=self.engine.num_used_blocks)

    def Exchange(self, request_iterator, context):
        if not self._exchange_busy.acquire(blocking=False):
            raise ResourceExhausted("another expert service holds the activation exchange")
        try:
            yield from self._serve_exchange(request_iterator)
        finally:
            self._exchange_busy.release()

    def _serve_exchange(self, request_iterator):
        plans: dict[int, StepPlan] = {}  # by group: the plan of the step in flight
        for request in request_iterator:
            if request.is_hello and request.use_ring:
                yield from self._ring_session(request_iterator)
                return
            if request.is_hello:
                yield attention_pb2.LayerResponse()
                continue
            yield self.compute.call(self._handle, request, plans)  # on the compute thread

    def _ring_session(self, request_iterator):
        """Answer the hello, then serve the session on the rings until the stream ends."""
        if self.rings is None:
            raise InvalidArgument("use_ring: this attention service has no rings (start it with "
                                  "--transport shm)")
        for ring in self.rings:
            ring.reset()  # a new session: nothing a previous one left counts
        yield attention_pb2.LayerResponse()
        session = _RingSession(self.rings[0])
        threading.Thread(target=session.watch, args=(request_iterator,), name="exchange-session",
                         daemon=True).start()
        self.compute.call(self._serve_ring, session)

    def _serve_ring(self, session: _RingSession) -> None:
        """On the compute thread, for the whole session: answer each LayerRequest of the
        request ring on the response ring, and run the calls other RPCs queue meanwhile."""
        requests, responses = self.rings
        plans: dict[int, StepPlan] = {}
        self.compute.wake = requests.kick
        try:
            while True:
                payload = requests.wait(lambda: session.is_closed or self.compute.has_queued)
                self.compute.poll()
                if session.error is not None:
                    raise session.error
                if self.compute.is_stopping or (payload is None and session.is_closed):
                    return
                if payload is not None:
                    request = attention_pb2.LayerRequest.FromString(payload)
                    responses.post(self._handle(request, plans).SerializeToString())
        finally:
            self.compute.wake = None

    def _handle(self, request, plans: dict[int, StepPlan]) -> attention_pb2.LayerResponse:
        if request.HasField("plan"):
            p = request.plan
            sequences = {s.seq_id: list(s.block_ids) for s in p.sequences}
            plans[request.group] = self.engine.begin(list(p.slots), sequences,
                                                     list(p.row_sequence),
                                                     list(p.row_context_len))
        plan = plans.get(request.group)
        if plan is None:
            raise InvalidArgument(f"layer {request.layer} of group {request.group} "
                                  f"arrived before its plan")
        return self._layer(request, plan)

    def _layer(self, request, plan: StepPlan) -> attention_pb2.LayerResponse:
        tensors = exchange.get_tensors(request, ("k", "v", "q"), self.arena)
        result = self.engine.run_layer(plan, request.layer, tensors["k"], tensors["v"],
                                       tensors["q"])
        response = attention_pb2.LayerResponse(step_id=request.step_id, layer=request.layer,
                                               group=request.group, attention_s=result.seconds)
        arena = self.arena if request.shm_tensors else None
        exchange.put_tensors(response, {"out": result.out}, arena,
                             exchange.response_slot(request.group))
        if self.metrics:
            self.metrics.observe_layer(result.seconds, plan.num_rows,
                                       self.engine.kv_bytes_read(plan))
        return response

    def _report_capacity(self) -> None:
        if self.metrics:
            self.metrics.set_capacity(self.engine.num_blocks, self.engine.num_used_blocks,
                                      self.engine.config.block_size)
