"""Client side of the per-layer exchange: one long-lived bidirectional stream to attention_cpu,
and with the shm transport the shared-memory rings that then carry its messages."""

from __future__ import annotations

import queue
import threading

import grpc
import torch

from moelens import exchange, shm_ring
from moelens.errors import Unavailable
from moelens.grpc_server import CHANNEL_OPTIONS
from moelens.shm import ShmArena
from moelens.shm_ring import ShmRing
from moelens.v1 import attention_pb2, attention_pb2_grpc

_END = object()


class AttentionClient:
    """Sends LayerRequests and receives LayerResponses in order: on the rings when the attention
    service offers them (shm transport), else on the stream."""

    def __init__(self, address: str, transport: str):
        self.address = address
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = attention_pb2_grpc.AttentionServiceStub(self.channel)
        self.info = self._call(self.stub.Info, attention_pb2.AttentionInfoRequest())
        self.arena: ShmArena | None = None
        self.ring_arena: ShmArena | None = None
        if transport == "shm":
            if not self.info.shm_name:
                raise ValueError(f"--transport shm: the attention service at {address} offers "
                                 f"no shared memory (start it with --transport shm, or use grpc)")
            self.arena = ShmArena.attach(self.info.shm_name, self.info.shm_num_slots,
                                         self.info.shm_slot_bytes)
        self._rings = self._attach_rings() if self.arena is not None else None
        self._outbox: queue.Queue = queue.Queue()
        self._responses = self.stub.Exchange(iter(self._outbox.get, _END))
        self._outbox.put(attention_pb2.LayerRequest(is_hello=True,
                                                    use_ring=self._rings is not None))
        self._next_on_stream()
        self._failure: Unavailable | None = None
        if self._rings is not None:
            threading.Thread(target=self._watch_stream, name="exchange-session",
                             daemon=True).start()

    def _attach_rings(self) -> tuple[ShmRing, ShmRing] | None:
        if not (self.info.shm_ring_name and shm_ring.is_supported()):
            return None
        self.ring_arena = ShmArena.attach(self.info.shm_ring_name, 2,
                                          self.info.shm_ring_slot_bytes)
        return exchange.rings(self.ring_arena)

    def _watch_stream(self) -> None:
        """With rings the stream is silent until it ends: when it does (the attention service
        stopped, failed or died), make the compute thread's recv raise."""
        try:
            self._next_on_stream()
            failure = Unavailable(f"attention service at {self.address} sent a message on the "
                                  f"stream after use_ring")
        except Unavailable as err:
            failure = err
        self._failure = failure
        self._rings[1].kick()

    def _call(self, method, request, timeout: float = 30.0):
        try:
            return method(request, timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as err:
            raise Unavailable(f"attention service at {self.address}: {err.details()}") from None

    def warmup(self) -> attention_pb2.AttentionInfo:
        self.info = self._call(self.stub.Warmup, attention_pb2.AttentionInfoRequest(), 600.0)
        return self.info

    def send(self, request: attention_pb2.LayerRequest) -> None:
        if self._rings is None:
            self._outbox.put(request)
        elif self._failure is not None:
            raise self._failure
        else:
            self._rings[0].post(request.SerializeToString())

    def send_layer(self, request: attention_pb2.LayerRequest, tensors: dict) -> None:
        exchange.put_tensors(request, tensors, self.arena, exchange.request_slot(request.group))
        self.send(request)

    def recv(self) -> attention_pb2.LayerResponse:
        if self._rings is None:
            return self._next_on_stream()
        payload = self._rings[1].wait(lambda: self._failure is not None)
        if payload is None:
            raise self._failure
        return attention_pb2.LayerResponse.FromString(payload)

    def _next_on_stream(self) -> attention_pb2.LayerResponse:
        try:
            return next(self._responses)
        except grpc.RpcError as err:
            raise Unavailable(f"attention service at {self.address}: {err.details()}") from None
        except StopIteration:
            raise Unavailable(f"attention service at {self.address} closed the stream") from None

    def recv_out(self) -> tuple[attention_pb2.LayerResponse, torch.Tensor]:
        response = self.recv()
        return response, exchange.get_tensors(response, ("out",), self.arena)["out"]

    def free(self, seq_ids: list[int]) -> None:
        if seq_ids:
            self._call(self.stub.FreeSequences, attention_pb2.FreeSequencesRequest(seq_ids=seq_ids))

    def close(self) -> None:
        self._outbox.put(_END)
        for segment in (self.arena, self.ring_arena):
            if segment is not None:
                segment.close()
        self.channel.close()
