"""Where each layer's weights live: resident on the device, or streamed through a double buffer.

Every layer is packed once into one flat host buffer (pinned on CUDA), so a streamed layer is one
contiguous copy split into ~100 MB packets. Resident layers are copied to the device at start.
Streamed layers rotate through two device buffers: a data-mover thread copies layer L+1 while
layer L computes, on its own CUDA stream; compute waits only for the layer it needs, and a buffer
is overwritten only after compute has released the layer it held. On the CPU device the same path
runs with real copies into separate buffers, so streaming is exercised by every test.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import torch

from moelens import panel_gemm
from moelens.model.weights import GATED_FIELDS, GEMM_FIELDS, LayerWeights

PACKET_BYTES = 100 * 2**20
ALIGN = 16  # elements: every tensor starts on a 64-byte boundary (fp32)


@dataclass(frozen=True)
class PackedLayout:
    """Where each tensor of a layer sits in its flat buffer: (name, offset, stored shape, N).

    N > 0 marks a GEMM weight stored as panels [..., P, K, 16] with N output features."""

    entries: tuple[tuple[str, int, tuple[int, ...], int], ...]
    numel: int

    @classmethod
    def of(cls, layer: LayerWeights, panels: bool = False) -> "PackedLayout":
        entries, offset = [], 0
        for name, t in layer.tensors().items():
            out_features = (t.shape[-2] if panels and name in GEMM_FIELDS and panel_gemm.packable(t)
                            else 0)
            shape = panel_gemm.packed_shape(t.shape) if out_features else tuple(t.shape)
            entries.append((name, offset, shape, out_features))
            offset += -(-math.prod(shape) // ALIGN) * ALIGN
        return cls(tuple(entries), offset)

    def pack(self, layer: LayerWeights, out: torch.Tensor) -> torch.Tensor:
        tensors = layer.tensors()
        for name, offset, shape, out_features in self.entries:
            stored = (panel_gemm.pack(tensors[name], name in GATED_FIELDS).panels if out_features
                      else tensors[name])
            out[offset:offset + stored.numel()].copy_(stored.reshape(-1))
        return out

    def unpack(self, flat: torch.Tensor) -> LayerWeights:
        views = {}
        for name, offset, shape, out_features in self.entries:
            view = flat[offset:offset + math.prod(shape)].view(shape)
            views[name] = (panel_gemm.PanelWeight(view, out_features, name in GATED_FIELDS)
                           if out_features else view)
        return LayerWeights(**views)


class _Slot:
    """One device buffer of the double buffer and its hand-off signals."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device):
        self.buffer = torch.empty(numel, dtype=dtype, device=device)
        self.free = threading.Semaphore(1)  # compute released what the buffer held
        self.ready = threading.Semaphore(0)  # the mover finished filling it
        self.copy_done: torch.cuda.Event | None = None
        self.compute_done: torch.cuda.Event | None = None


class LayerStore:
    def __init__(self, host_layers: list[LayerWeights], device: torch.device,
                 num_resident: int, panels: bool = False):
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.layouts = [PackedLayout.of(layer, panels) for layer in host_layers]
        self.host_flat = [self._pack_host(l, lay) for l, lay in zip(host_layers, self.layouts)]
        self.num_resident = num_resident
        self.resident = [lay.unpack(flat.to(device))
                         for lay, flat in zip(self.layouts[:num_resident],
                                              self.host_flat[:num_resident])]
        self.streamed = list(range(num_resident, len(host_layers)))
        self.weight_wait_s = 0.0
        self.bytes_streamed = 0
        self._slots: list[_Slot] = []
        self._consume_turn = 0  # streamed layers handed to compute so far (mirrors the mover)
        self._held: dict[int, _Slot] = {}
        self._stop = threading.Event()
        if self.streamed:
            numel = max(self.layouts[i].numel for i in self.streamed)
            dtype = self.host_flat[0].dtype
            self._slots = [_Slot(numel, dtype, device) for _ in range(2)]
            self._mover = threading.Thread(target=self._move_forever, name="data-mover",
                                           daemon=True)
            self._mover.start()

    def _pack_host(self, layer: LayerWeights, layout: PackedLayout) -> torch.Tensor:
        dtype = next(iter(layer.tensors().values())).dtype
        flat = layout.pack(layer, torch.zeros(layout.numel, dtype=dtype))
        return flat.pin_memory() if self.is_cuda else flat

    @property
    def num_streamed(self) -> int:
        return len(self.streamed)

    def layer_bytes(self, index: int) -> int:
        return self.host_flat[index].numel() * self.host_flat[index].element_size()

    @property
    def streamed_bytes_per_step(self) -> int:
        return sum(self.layer_bytes(i) for i in self.streamed)

    # Compute side ------------------------------------------------------------------------------
    def layer(self, index: int) -> LayerWeights:
        """The weights of layer `index` on the device; blocks until a streamed layer is in."""
        if index < self.num_resident:
            return self.resident[index]
        slot = self._slots[self._consume_turn % 2]
        self._consume_turn += 1
        self._held[index] = slot
        start = time.perf_counter()
        slot.ready.acquire()
        self.weight_wait_s += time.perf_counter() - start
        self.bytes_streamed += self.layer_bytes(index)
        if slot.copy_done is not None:
            torch.cuda.current_stream(self.device).wait_event(slot.copy_done)
        return self.layouts[index].unpack(slot.buffer)

    def release(self, index: int) -> None:
        """Compute is done with layer `index` (call exactly once per layer per step, in order)."""
        if index < self.num_resident:
            return
        slot = self._held.pop(index)
        if self.is_cuda:
            slot.compute_done = torch.cuda.Event()
            slot.compute_done.record(torch.cuda.current_stream(self.device))
        slot.free.release()

    def take_counters(self) -> tuple[float, int]:
        """(weight wait seconds, bytes of streamed layers handed to compute) since the last call
        (counted on use, not on copy: the mover runs ahead into the next step)."""
        out = (self.weight_wait_s, self.bytes_streamed)
        self.weight_wait_s, self.bytes_streamed = 0.0, 0
        return out

    # Mover side --------------------------------------------------------------------------------
    def _move_forever(self) -> None:
        """Copy streamed layers in consumption order, forever, one buffer ahead of compute."""
        stream = torch.cuda.Stream(self.device) if self.is_cuda else None
        turn = 0
        while not self._stop.is_set():
            index = self.streamed[turn % len(self.streamed)]
            slot = self._slots[turn % 2]
            slot.free.acquire()
            if self._stop.is_set():
                return
            self._copy(index, slot, stream)
            slot.ready.release()
            turn += 1

    def _copy(self, index: int, slot: _Slot, stream) -> None:
        src = self.host_flat[index]
        dst = slot.buffer[:src.numel()]
        step = max(1, PACKET_BYTES // src.element_size())
        if stream is None:
            for i in range(0, src.numel(), step):
                dst[i:i + step].copy_(src[i:i + step])
        else:
            with torch.cuda.stream(stream):
                if slot.compute_done is not None:
                    stream.wait_event(slot.compute_done)
                for i in range(0, src.numel(), step):
                    dst[i:i + step].copy_(src[i:i + step], non_blocking=True)
                slot.copy_done = torch.cuda.Event()
                slot.copy_done.record(stream)

    def close(self) -> None:
        self._stop.set()
        for slot in self._slots:
            slot.free.release()


def plan_residency(layer_bytes: list[int], fixed_bytes: int, workspace_bytes: int,
                   budget_bytes: int | None) -> int:
    """How many leading layers stay resident under a device budget (the rest stream).

    fixed_bytes: embeddings, final norm, lm_head (always resident); workspace_bytes: activations
    for the largest step. Streaming needs two buffers of the largest streamed layer.
    """
    if budget_bytes is None:
        return len(layer_bytes)
    available = budget_bytes - fixed_bytes - workspace_bytes
    if available >= sum(layer_bytes):
        return len(layer_bytes)
    double_buffer = 2 * max(layer_bytes)
    minimum = fixed_bytes + workspace_bytes + double_buffer
    if budget_bytes < minimum:
        raise ValueError(
            f"--device-memory-gb {budget_bytes / 2**30:.3f} cannot hold the double buffer: the "
            f"minimum is {minimum / 2**30:.3f} GiB (embeddings/lm_head {fixed_bytes / 2**30:.3f}, "
            f"workspace {workspace_bytes / 2**30:.3f}, 2 x layer {max(layer_bytes) / 2**30:.3f})")
    resident, used = 0, double_buffer
    for size in layer_bytes:
        if used + size > available:
            break
        resident, used = resident + 1, used + size
    return resident
