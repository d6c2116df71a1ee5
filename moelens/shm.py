"""Shared-memory channel: a segment of fixed-size slots that two processes on one host map.

The owner (the side that creates the arena, the attention service in the design) writes or
reads tensors in a slot; a small gRPC message names the slot and carries its `SlotLayout`; the
peer maps the same segment and reads or writes in place. No synchronisation lives in the
segment: the message exchange orders the accesses (a slot is touched by whoever last received
its name). Tensors start on 64-byte boundaries so vector loads and DMA see aligned rows.

Cleanup, including crashes:
- The segment is a file `/dev/shm/moelens-<pid>-<128 random bits>` created O_EXCL with mode
  0600 (the mode `multiprocessing.shared_memory` would also use). The random part makes names
  unguessable; the name is passed to the peer only over the service's own channel.
- Only the owner ever unlinks. The peer maps with os.open + mmap, not `SharedMemory(name=...)`,
  because on Python < 3.13 attaching registers the segment with `resource_tracker`, which
  unlinks it (and warns "leaked shared_memory") when the *peer* exits.
- A peer crash changes nothing: the owner still holds the segment and unlinks it in `close()`.
- An owner crash (even SIGKILL) is covered by a janitor: before creating the file the owner
  starts a tiny interpreter in its own session whose stdin is a pipe from the owner. Only the
  owner holds the write end, so the kernel closes it however the owner dies; the janitor sees
  EOF (no polling) and unlinks the name. A peer that still has the segment mapped keeps its
  memory: unlinking removes the name, the pages go when the last mapping does.
- `unlink()` drops the name early, once the peer has confirmed it mapped the segment. After
  that nothing can leak even if both the owner and janitor are killed together.
Known gap: a child forked (without exec) from the owner inherits the pipe's write end, so the
janitor waits for that child too; it still unlinks when the last holder exits.
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
import stat
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moelens.wire import dtype_from_name, dtype_name, nbytes_of

SHM_DIR = "/dev/shm"
NAME_PREFIX = "moelens-"
ALIGNMENT = 64
_NAME_RE = re.compile(r"moelens-[0-9]+-[0-9a-f]{32}")
_JANITOR_WAIT_S = 5.0

# Runs in the janitor process: block until the owner's end of stdin closes, then unlink.
_JANITOR_SRC = (
    "import os, sys\n"
    "while sys.stdin.buffer.read(4096):\n"
    "    pass\n"
    "try:\n"
    "    os.unlink(sys.argv[1])\n"
    "except FileNotFoundError:\n"
    "    pass\n"
)


@dataclass(frozen=True)
class TensorSlice:
    """Where one named tensor sits inside a slot."""

    name: str
    """Key the writer used, e.g. "q"."""
    dtype: str
    """Wire dtype name (see moelens.wire.NAME_TO_DTYPE)."""
    shape: tuple[int, ...]
    """Sizes per dimension."""
    offset: int
    """Bytes from the start of the slot; a multiple of ALIGNMENT."""

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape)


@dataclass(frozen=True)
class SlotLayout:
    """The tensors one `write` put in a slot; small enough to travel in a gRPC message."""

    entries: tuple[TensorSlice, ...]

    @property
    def nbytes(self) -> int:
        """Bytes used in the slot, up to the end of the last tensor."""
        return max((e.offset + e.nbytes for e in self.entries), default=0)


def align_up(nbytes: int, alignment: int = ALIGNMENT) -> int:
    return -(-nbytes // alignment) * alignment


def plan_layout(specs: Mapping[str, tuple[str, tuple[int, ...]]]) -> SlotLayout:
    """Place tensors given as name -> (dtype name, shape) back to back at aligned offsets.

    Use `plan_layout(...).nbytes` (rounded up with align_up) to size `slot_bytes` for the
    largest step a service will send.
    """
    entries, offset = [], 0
    for name, (dtype, shape) in specs.items():
        shape = tuple(int(size) for size in shape)
        entry = TensorSlice(name=name, dtype=dtype, shape=shape, offset=offset)
        entries.append(entry)
        offset = align_up(offset + entry.nbytes)
    return SlotLayout(entries=tuple(entries))


def layout_to_messages(layout: SlotLayout, field: Any) -> None:
    """Append one message per tensor to a repeated `ShmTensor {name; dtype; shape; offset}`."""
    for e in layout.entries:
        field.add(name=e.name, dtype=e.dtype, shape=e.shape, offset=e.offset)


def layout_from_messages(messages: Iterable[Any]) -> SlotLayout:
    """SlotLayout from received ShmTensor messages; `ShmArena.read` validates the bounds."""
    return SlotLayout(tuple(
        TensorSlice(name=m.name, dtype=m.dtype, shape=tuple(m.shape), offset=m.offset)
        for m in messages
    ))


class ShmArena:
    """`num_slots` slots of `slot_bytes` each in one shared segment. Build with create/attach."""

    def __init__(self, *, name: str, num_slots: int, slot_bytes: int, fd: int,
                 is_owner: bool, janitor: subprocess.Popen | None) -> None:
        self.name = name
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.is_owner = is_owner
        self._path = os.path.join(SHM_DIR, name)
        self._janitor = janitor
        try:
            # MAP_POPULATE: fault the pages in now, not during the first layer's exchange.
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            self._mmap: mmap.mmap | None = mmap.mmap(fd, num_slots * slot_bytes, flags=flags)
        finally:
            os.close(fd)  # the mapping keeps the segment alive; the fd is not needed
        # numpy holds a buffer export on the mmap, so the mapping cannot be unmapped under a
        # live tensor view (torch.frombuffer alone would not prevent that).
        self._base: torch.Tensor | None = torch.from_numpy(np.frombuffer(self._mmap, np.uint8))
        self._is_linked = is_owner
        # Per slot, the last layout written or read there and its views: a step's layers all
        # send tensors of the same shapes, so every layer after the first skips the bounds
        # checks and view making (~25 us a message per side).
        self._last: dict[int, tuple[SlotLayout, dict[str, torch.Tensor]]] = {}

    @classmethod
    def create(cls, num_slots: int, slot_bytes: int) -> ShmArena:
        """Create a fresh segment owned by this process (removed by close() or by the janitor)."""
        _validate_geometry(num_slots, slot_bytes)
        name = f"{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(16)}"
        path = os.path.join(SHM_DIR, name)
        janitor = _start_janitor(path)  # first, so no instant exists where a crash leaks the file
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, 0o600)
        except BaseException:
            _stop_janitor(janitor)
            raise
        try:
            os.fchmod(fd, 0o600)  # umask can only remove bits; this states the intent
            _reserve(fd, num_slots * slot_bytes)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            _stop_janitor(janitor)
            raise
        return cls(name=name, num_slots=num_slots, slot_bytes=slot_bytes, fd=fd,
                   is_owner=True, janitor=janitor)

    @classmethod
    def attach(cls, name: str, num_slots: int, slot_bytes: int) -> ShmArena:
        """Map a segment another process created. The peer never unlinks it."""
        _validate_geometry(num_slots, slot_bytes)
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"shared-memory name {name!r} is not one ShmArena.create made")
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_NOFOLLOW)
        try:
            _check_segment(os.fstat(fd), name, num_slots * slot_bytes)
        except BaseException:
            os.close(fd)
            raise
        return cls(name=name, num_slots=num_slots, slot_bytes=slot_bytes, fd=fd,
                   is_owner=False, janitor=None)

    def write(self, slot: int, tensors: Mapping[str, torch.Tensor]) -> SlotLayout:
        """Copy tensors (any device, any strides) into a slot; returns where each one went."""
        specs = {name: (dtype_name(t.dtype), tuple(t.shape)) for name, t in tensors.items()}
        layout = plan_layout(specs)
        if layout.nbytes > self.slot_bytes:
            raise ValueError(
                f"tensors need {layout.nbytes} bytes but a slot holds {self.slot_bytes}; "
                f"create the arena with slot_bytes >= {align_up(layout.nbytes)}"
            )
        for name, view in self._views(slot, layout).items():
            if view.numel():
                view.copy_(tensors[name])
        return layout

    def read(self, slot: int, layout: SlotLayout, *, copy: bool = False) -> dict[str, torch.Tensor]:
        """Tensors described by `layout`: views into the segment, or private copies if `copy`.

        Views see whatever the peer writes to the slot later; copy when the slot is reused
        before you are done with them.
        """
        views = self._views(slot, layout)
        return {name: view.clone() for name, view in views.items()} if copy else dict(views)

    def slot_array(self, slot: int) -> np.ndarray:
        """The whole slot as a uint8 array over the mapping (for moelens.shm_ring)."""
        base = self._slot_base(slot)
        return self._base[base:base + self.slot_bytes].numpy()

    def unlink(self) -> None:
        """Remove the segment's name now (owner only); mappings stay valid. Idempotent."""
        if not self.is_owner:
            raise ValueError("only the process that created the arena may unlink it; call close()")
        if self._is_linked:
            self._is_linked = False
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """Unlink (owner) and unmap. Views returned by read() keep their pages until dropped."""
        if self.is_owner:
            self.unlink()
            if self._janitor is not None:
                _stop_janitor(self._janitor)
                self._janitor = None
        self._base = None
        self._last = {}
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # live views hold the mapping; it is unmapped when the last one is freed
            self._mmap = None

    def __enter__(self) -> ShmArena:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _slot_base(self, slot: int) -> int:
        if self._base is None:
            raise ValueError(f"shared-memory arena {self.name} is closed")
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} out of range; the arena has {self.num_slots} slots")
        return slot * self.slot_bytes

    def _views(self, slot: int, layout: SlotLayout) -> dict[str, torch.Tensor]:
        """Views of the layout's tensors in `slot`, bounds checked (cached: see _last)."""
        base = self._slot_base(slot)
        last = self._last.get(slot)
        if last is not None and last[0] == layout:
            return last[1]
        for entry in layout.entries:
            self._check_entry(entry)
        views = {entry.name: self._view(base, entry) for entry in layout.entries}
        self._last[slot] = (layout, views)
        return views

    def _check_entry(self, entry: TensorSlice) -> None:
        # Layouts arrive from the peer over the network: never trust them to stay in bounds.
        nbytes = entry.nbytes  # validates dtype and shape
        if entry.offset < 0 or entry.offset % ALIGNMENT:
            raise ValueError(f"tensor {entry.name!r} offset {entry.offset} is not a "
                             f"non-negative multiple of {ALIGNMENT}")
        if entry.offset + nbytes > self.slot_bytes:
            raise ValueError(f"tensor {entry.name!r} ends at byte {entry.offset + nbytes}, "
                             f"past the slot size {self.slot_bytes}")

    def _view(self, slot_base: int, entry: TensorSlice) -> torch.Tensor:
        dtype = dtype_from_name(entry.dtype)
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=dtype)
        start = slot_base + entry.offset
        return self._base[start:start + entry.nbytes].view(dtype).view(entry.shape)


def _validate_geometry(num_slots: int, slot_bytes: int) -> None:
    if num_slots < 1:
        raise ValueError(f"num_slots must be >= 1, got {num_slots}")
    if slot_bytes < ALIGNMENT or slot_bytes % ALIGNMENT:
        raise ValueError(f"slot_bytes must be a positive multiple of {ALIGNMENT}, got "
                         f"{slot_bytes}; use {align_up(max(slot_bytes, 1))}")


def _reserve(fd: int, nbytes: int) -> None:
    """Allocate the tmpfs pages now; a sparse file on a full /dev/shm would SIGBUS on use."""
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as err:
        free = os.statvfs(SHM_DIR)
        raise ValueError(
            f"cannot reserve {nbytes} bytes in {SHM_DIR} ({free.f_bavail * free.f_frsize} free): "
            f"{err.strerror}; lower num_slots/slot_bytes or raise the shm size (docker shm_size)"
        ) from err


def _check_segment(st: os.stat_result, name: str, expected_bytes: int) -> None:
    # Refuse anything that is not the 0600 regular file our own user created.
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
        raise ValueError(f"{SHM_DIR}/{name} is not a segment created by this user")
    if stat.S_IMODE(st.st_mode) != 0o600:
        raise ValueError(f"{SHM_DIR}/{name} has mode {stat.S_IMODE(st.st_mode):o}, expected 600")
    if st.st_size != expected_bytes:
        raise ValueError(f"{SHM_DIR}/{name} holds {st.st_size} bytes but num_slots * slot_bytes "
                         f"= {expected_bytes}; pass the geometry the creator used")


def _start_janitor(path: str) -> subprocess.Popen:
    # start_new_session: a Ctrl-C or a signal to the owner's process group must not take the
    # janitor down before it has cleaned up. -I -S: isolated, no site import, fast start.
    return subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _JANITOR_SRC, path],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True,
    )


def _stop_janitor(janitor: subprocess.Popen) -> None:
    janitor.stdin.close()  # EOF: the janitor unlinks (already gone) and exits
    try:
        janitor.wait(timeout=_JANITOR_WAIT_S)
    except subprocess.TimeoutExpired:
        janitor.kill()
        janitor.wait()
