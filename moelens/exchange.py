"""The per-layer activation exchange on the wire, for both transports.

shm: tensors go into a slot of the attention service's shared-memory arena; the message names the
slot and the layout. grpc: the message carries the raw tensor bytes. Slots are fixed per
pipeline group: group g writes its request into slot 2g and reads its response from slot 2g+1,
and a group never has two layers in flight, so no slot is reused before it has been read. With
shm the messages themselves go through two rings in a second segment (moelens.shm_ring), one
per direction, RING_DEPTH deep for the same reason.
"""

from __future__ import annotations

from moelens import wire
from moelens.shm import ShmArena, layout_from_messages, layout_to_messages
from moelens.shm_ring import ShmRing

NUM_GROUPS = 2
NUM_SLOTS = 2 * NUM_GROUPS
RING_DEPTH = NUM_GROUPS
REQUEST_RING, RESPONSE_RING = 0, 1
"""Slots of the ring segment: LayerRequests to the attention service, LayerResponses back."""


def rings(arena: ShmArena) -> tuple[ShmRing, ShmRing]:
    """(requests, responses): the message rings of a ring segment."""
    return (ShmRing(arena, REQUEST_RING, RING_DEPTH), ShmRing(arena, RESPONSE_RING, RING_DEPTH))


def request_slot(group: int) -> int:
    return 2 * group


def response_slot(group: int) -> int:
    return 2 * group + 1


def put_tensors(msg, tensors: dict, arena: ShmArena | None, slot: int) -> None:
    """Attach tensors to a LayerRequest/LayerResponse: into `arena` slot, or inline bytes."""
    if arena is not None:
        msg.shm_slot = slot
        layout_to_messages(arena.write(slot, tensors), msg.shm_tensors)
        return
    for name, tensor in tensors.items():
        wire.to_message(wire.encode(tensor), getattr(msg, name))


def get_tensors(msg, names: tuple[str, ...], arena: ShmArena | None) -> dict:
    """The named tensors of a message: views into the arena slot, or over the message bytes."""
    if arena is not None and msg.shm_tensors:
        return arena.read(msg.shm_slot, layout_from_messages(msg.shm_tensors))
    return {name: wire.decode(wire.from_message(getattr(msg, name))) for name in names}


def shm_slot_bytes(max_num_tokens: int, q_size: int, kv_size: int, itemsize: int = 4) -> int:
    """Slot size for a step of up to `max_num_tokens` new tokens (q, k, v of each, 64-B aligned)."""
    per_token = (q_size + 2 * kv_size) * itemsize
    return max_num_tokens * per_token + 4 * 64


def ring_message_bytes(max_num_tokens: int, num_blocks: int) -> int:
    """Most bytes a serialized LayerRequest can take on a ring (its responses are smaller): the
    plan of a step of `max_num_tokens` tokens over a pool of `num_blocks` blocks, counting the
    protobuf varints generously (a slot, its row's sequence and context length, and a
    sequence entry per token: 40 bytes; a block id: 5), plus 4 KiB of fields and layouts."""
    return 4096 + 40 * max_num_tokens + 5 * num_blocks
