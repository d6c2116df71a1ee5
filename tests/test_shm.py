"""Shared-memory channel: layout, permissions, a real peer process, and cleanup after crashes."""

from __future__ import annotations

import glob
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moelens import shm
from moelens.shm import ShmArena, SlotLayout, TensorSlice
from moelens.v1 import attention_pb2

REPO_ROOT = Path(__file__).resolve().parents[1]
# Liveness bound for the janitor (it reacts to the owner's death at once), not a speed check.
CLEANUP_DEADLINE_S = 5.0

# Shared by the child scripts: layouts travel as JSON, as the services will send them by gRPC.
_CHILD_PRELUDE = """
import json, sys, time
import torch
from moelens.shm import ShmArena, SlotLayout, TensorSlice

def layout_from_json(text):
    return SlotLayout(tuple(TensorSlice(n, d, tuple(s), o) for n, d, s, o in json.loads(text)))

def layout_to_json(layout):
    return json.dumps([[e.name, e.dtype, list(e.shape), e.offset] for e in layout.entries])
"""

# Peer: read slot 0, compute, write the result to slot 1, report its layout, exit normally.
_PEER_COMPUTE = _CHILD_PRELUDE + """
arena = ShmArena.attach(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
inputs = arena.read(0, layout_from_json(sys.argv[4]))
outputs = {"y": inputs["x"] * 2 + 1, "ids": inputs["ids"] + 1}
print(layout_to_json(arena.write(1, outputs)), flush=True)
arena.close()
"""

# Peer that attaches and then waits to be killed.
_PEER_IDLE = _CHILD_PRELUDE + """
arena = ShmArena.attach(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
arena.write(1, {"marker": torch.full((4,), 7.0)})
print("attached", flush=True)
time.sleep(120)
"""

# Owner in a child process: create, fill slot 0, report name + layout, then wait (or exit
# without close() when argv[1] == "exit").
_OWNER = _CHILD_PRELUDE + """
arena = ShmArena.create(2, 4096)
layout = arena.write(0, {"x": torch.arange(16, dtype=torch.float32)})
print(json.dumps({"name": arena.name, "layout": layout_to_json(layout)}), flush=True)
if sys.argv[1] == "exit":
    sys.exit(0)
time.sleep(120)
"""


def _layout_from_json(text: str) -> SlotLayout:
    return SlotLayout(tuple(TensorSlice(n, d, tuple(s), o) for n, d, s, o in json.loads(text)))


def _layout_to_json(layout: SlotLayout) -> str:
    return json.dumps([[e.name, e.dtype, list(e.shape), e.offset] for e in layout.entries])


def _spawn(script: str, *args: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)], cwd=REPO_ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _path(name: str) -> str:
    return os.path.join(shm.SHM_DIR, name)


def _wait_gone(path: str) -> bool:
    deadline = time.monotonic() + CLEANUP_DEADLINE_S
    while time.monotonic() < deadline:
        if not os.path.exists(path):
            return True
        time.sleep(0.02)
    return not os.path.exists(path)


def _assert_no_tracker_noise(stderr: str) -> None:
    assert "resource_tracker" not in stderr and "leaked" not in stderr, stderr


@pytest.fixture
def arena():
    a = ShmArena.create(num_slots=3, slot_bytes=16 * 1024)
    yield a
    a.close()


def test_create_is_private_and_close_removes_it(arena: ShmArena) -> None:
    path = _path(arena.name)
    assert arena.name.startswith(f"{shm.NAME_PREFIX}{os.getpid()}-")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.stat(path).st_size == 3 * 16 * 1024
    other = ShmArena.create(num_slots=1, slot_bytes=64)
    assert other.name != arena.name
    other.close()
    arena.close()
    arena.close()  # idempotent
    assert not os.path.exists(path)
    assert glob.glob(_path(f"{shm.NAME_PREFIX}{os.getpid()}-*")) == []


def test_round_trip_in_process(arena: ShmArena) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "q": torch.randn(5, 4, 8, generator=gen).to(torch.bfloat16),
        "k_strided": torch.randn(8, 6, generator=gen).t()[:, 1:],  # not contiguous
        "half": torch.randn(3, generator=gen).half(),
        "ids": torch.arange(7, dtype=torch.int64),
        "pos": torch.arange(3, dtype=torch.int32),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 8),
    }
    layout = arena.write(2, tensors)
    assert [e.name for e in layout.entries] == list(tensors)
    assert all(e.offset % shm.ALIGNMENT == 0 for e in layout.entries)
    out = arena.read(2, layout)
    for name, t in tensors.items():
        assert out[name].dtype == t.dtype and torch.equal(out[name], t), name
        if t.numel():
            assert out[name].data_ptr() % shm.ALIGNMENT == 0


def test_read_views_alias_the_slot_and_copies_do_not(arena: ShmArena) -> None:
    layout = arena.write(0, {"x": torch.zeros(4)})
    view = arena.read(0, layout)["x"]
    copy = arena.read(0, layout, copy=True)["x"]
    arena.write(0, {"x": torch.ones(4)})
    assert torch.equal(view, torch.ones(4))
    assert torch.equal(copy, torch.zeros(4))


def test_a_new_layout_on_a_slot_gets_new_views_and_checks(arena: ShmArena) -> None:
    """Each slot remembers its last layout's views: the same layout again reuses them, another
    one (the next step's shapes) gets its own, and a bad one is still refused."""
    first = arena.write(1, {"k": torch.arange(6.0).view(2, 3)})
    again = arena.write(1, {"k": torch.ones(2, 3)})
    assert again == first and torch.equal(arena.read(1, first)["k"], torch.ones(2, 3))
    assert arena.read(1, first)["k"].data_ptr() == arena.read(1, again)["k"].data_ptr()
    wider = arena.write(1, {"k": torch.arange(8.0).view(2, 4), "q": torch.full((3,), 7.0)})
    out = arena.read(1, wider)
    assert torch.equal(out["k"], torch.arange(8.0).view(2, 4))
    assert torch.equal(out["q"], torch.full((3,), 7.0))
    with pytest.raises(ValueError, match="past the slot size"):
        arena.read(1, SlotLayout((TensorSlice("k", "float32", (32,), 16 * 1024 - 64),)))


def test_layout_travels_in_the_layer_request_message(arena: ShmArena) -> None:
    tensors = {"k": torch.randn(3, 2, 8).bfloat16(), "q": torch.randn(1, 4, 8)}
    request = attention_pb2.LayerRequest(shm_slot=1)
    shm.layout_to_messages(arena.write(1, tensors), request.shm_tensors)
    received = attention_pb2.LayerRequest.FromString(request.SerializeToString())
    out = arena.read(received.shm_slot, shm.layout_from_messages(received.shm_tensors))
    assert all(torch.equal(out[name], t) for name, t in tensors.items())


def test_slots_do_not_overlap(arena: ShmArena) -> None:
    full = arena.slot_bytes // 4
    layouts = [arena.write(s, {"x": torch.full((full,), float(s))}) for s in range(3)]
    for s, layout in enumerate(layouts):
        assert torch.equal(arena.read(s, layout)["x"], torch.full((full,), float(s)))


def test_slot_too_small_names_the_size(arena: ShmArena) -> None:
    tensors = {"a": torch.zeros(10), "b": torch.zeros(4096)}  # 40 -> 64, + 16384
    with pytest.raises(ValueError, match=r"need 16448 bytes .* slot_bytes >= 16448"):
        arena.write(0, tensors)
    assert shm.plan_layout({"a": ("float32", (10,)), "b": ("float32", (4096,))}).nbytes == 16448


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (TensorSlice("x", "float32", (32,), 16 * 1024 - 64), "past the slot size"),
        (TensorSlice("x", "float32", (4,), 32), "not a non-negative multiple of 64"),
        (TensorSlice("x", "float32", (4,), -64), "not a non-negative multiple of 64"),
        (TensorSlice("x", "complex64", (4,), 0), "unknown tensor dtype"),
        (TensorSlice("x", "float32", (-4,), 0), "negative dimension"),
    ],
)
def test_read_rejects_bad_layouts(arena: ShmArena, entry: TensorSlice, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        arena.read(0, SlotLayout((entry,)))


def test_bad_slot_and_geometry(arena: ShmArena) -> None:
    with pytest.raises(ValueError, match="slot 3 out of range"):
        arena.write(3, {"x": torch.zeros(1)})
    with pytest.raises(ValueError, match="slot_bytes must be a positive multiple of 64.*use 128"):
        ShmArena.create(num_slots=1, slot_bytes=100)
    with pytest.raises(ValueError, match="num_slots"):
        ShmArena.create(num_slots=0, slot_bytes=64)
    with pytest.raises(ValueError, match="pass the geometry the creator used"):
        ShmArena.attach(arena.name, num_slots=2, slot_bytes=16 * 1024)
    for bad_name in ("../../etc/passwd", arena.name + "\n", "/" + arena.name):
        with pytest.raises(ValueError, match="not one ShmArena.create made"):
            ShmArena.attach(bad_name, num_slots=1, slot_bytes=64)
    with pytest.raises(FileNotFoundError):
        ShmArena.attach(f"{shm.NAME_PREFIX}1-{'0' * 32}", num_slots=1, slot_bytes=64)
    arena.close()
    with pytest.raises(ValueError, match="closed"):
        arena.read(0, SlotLayout(()))


def test_create_larger_than_dev_shm_fails_up_front() -> None:
    # Twice the whole tmpfs: tmpfs refuses the fallocate before touching any page, so this
    # costs nothing, and the arena must not hand out a sparse file that SIGBUSes later.
    st = os.statvfs(shm.SHM_DIR)
    if st.f_blocks == 0:
        pytest.skip(f"{shm.SHM_DIR} has no size limit")
    with pytest.raises(ValueError, match="cannot reserve .* raise the shm size"):
        ShmArena.create(num_slots=2, slot_bytes=shm.align_up(st.f_blocks * st.f_frsize))
    assert glob.glob(_path(f"{shm.NAME_PREFIX}{os.getpid()}-*")) == []


def test_attach_refuses_a_segment_others_can_read(arena: ShmArena) -> None:
    os.chmod(_path(arena.name), 0o644)
    with pytest.raises(ValueError, match="has mode 644, expected 600"):
        ShmArena.attach(arena.name, arena.num_slots, arena.slot_bytes)


def test_views_outlive_close_and_early_unlink(arena: ShmArena) -> None:
    peer = ShmArena.attach(arena.name, arena.num_slots, arena.slot_bytes)
    arena.unlink()  # both sides mapped: the name can go, nothing is left to leak
    assert not os.path.exists(_path(arena.name))
    with pytest.raises(ValueError, match="only the process that created"):
        peer.unlink()
    layout = peer.write(1, {"x": torch.arange(6.0)})
    view = arena.read(1, layout)["x"]
    peer.close()
    arena.close()
    assert torch.equal(view, torch.arange(6.0))  # the mapping lives as long as the view


@pytest.mark.timeout(120)
def test_peer_process_reads_computes_and_writes_back(arena: ShmArena) -> None:
    x = torch.randn(6, 2, 16, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ids = torch.arange(6, dtype=torch.int64)
    layout = arena.write(0, {"x": x, "ids": ids})
    peer = _spawn(_PEER_COMPUTE, arena.name, arena.num_slots, arena.slot_bytes,
                  _layout_to_json(layout))
    stdout, stderr = peer.communicate(timeout=100)
    assert peer.returncode == 0, stderr
    _assert_no_tracker_noise(stderr)
    out = arena.read(1, _layout_from_json(stdout.strip()))
    assert out["y"].dtype == torch.bfloat16
    assert torch.equal(out["y"], x * 2 + 1)
    assert torch.equal(out["ids"], ids + 1)
    assert os.path.exists(_path(arena.name))  # the peer's exit did not unlink it


@pytest.mark.timeout(120)
def test_segment_survives_peer_sigkill_and_goes_at_owner_close(arena: ShmArena) -> None:
    peer = _spawn(_PEER_IDLE, arena.name, arena.num_slots, arena.slot_bytes)
    try:
        assert peer.stdout.readline().strip() == "attached", peer.stderr.read()
    finally:
        peer.send_signal(signal.SIGKILL)
        _, stderr = peer.communicate(timeout=60)
    _assert_no_tracker_noise(stderr)
    path = _path(arena.name)
    assert os.path.exists(path)
    layout = SlotLayout((TensorSlice("marker", "float32", (4,), 0),))
    assert torch.equal(arena.read(1, layout)["marker"], torch.full((4,), 7.0))
    arena.write(0, {"x": torch.ones(2)})  # still usable
    arena.close()
    assert not os.path.exists(path)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["sigkill", "exit"])
def test_owner_death_removes_the_segment(how: str) -> None:
    owner = _spawn(_OWNER, how)
    try:
        info = json.loads(owner.stdout.readline() or "null")
        assert info is not None, owner.stderr.read()
        path = _path(info["name"])
        peer = ShmArena.attach(info["name"], num_slots=2, slot_bytes=4096)
        x = peer.read(0, _layout_from_json(info["layout"]))["x"]
        if how == "sigkill":
            owner.send_signal(signal.SIGKILL)
        _, stderr = owner.communicate(timeout=60)
        _assert_no_tracker_noise(stderr)
        assert _wait_gone(path), f"{path} still exists {CLEANUP_DEADLINE_S}s after the owner died"
        assert torch.equal(x, torch.arange(16, dtype=torch.float32))  # peer's mapping intact
        peer.close()
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.communicate()
