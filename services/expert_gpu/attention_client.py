"""Client side of the per-layer exchange: one long-lived bidirectional stream to attention_cpu."""

from __future__ import annotations

import queue

import grpc
import torch

from moelens import exchange
from moelens.errors import Unavailable
from moelens.grpc_server import CHANNEL_OPTIONS
from moelens.shm import ShmArena
from moelens.v1 import attention_pb2, attention_pb2_grpc

_END = object()


class AttentionClient:
    """Sends LayerRequests and receives LayerResponses in order on one stream."""

    def __init__(self, address: str, transport: str):
        self.address = address
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = attention_pb2_grpc.AttentionServiceStub(self.channel)
        self.info = self._call(self.stub.Info, attention_pb2.AttentionInfoRequest())
        self.arena: ShmArena | None = None
        if transport == "shm":
            if not self.info.shm_name:
                raise ValueError(f"--transport shm: the attention service at {address} offers "
                                 f"no shared memory (start it with --transport shm, or use grpc)")
            self.arena = ShmArena.attach(self.info.shm_name, self.info.shm_num_slots,
                                         self.info.shm_slot_bytes)
        self._outbox: queue.Queue = queue.Queue()
        self._responses = self.stub.Exchange(iter(self._outbox.get, _END))
        self.send(attention_pb2.LayerRequest(is_hello=True))
        self.recv()

    def _call(self, method, request, timeout: float = 30.0):
        try:
            return method(request, timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as err:
            raise Unavailable(f"attention service at {self.address}: {err.details()}") from None

    def warmup(self) -> attention_pb2.AttentionInfo:
        self.info = self._call(self.stub.Warmup, attention_pb2.AttentionInfoRequest(), 600.0)
        return self.info

    def send(self, request: attention_pb2.LayerRequest) -> None:
        self._outbox.put(request)

    def send_layer(self, request: attention_pb2.LayerRequest, tensors: dict) -> None:
        exchange.put_tensors(request, tensors, self.arena, exchange.request_slot(request.group))
        self.send(request)

    def recv(self) -> attention_pb2.LayerResponse:
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
        if self.arena is not None:
            self.arena.close()
        self.channel.close()
