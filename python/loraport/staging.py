"""The host buffers the pipeline's reader thread fills with a chunk's weights: two slots (the
chunk being computed and the next one being read), allocated once per run at the size of the
largest chunk and reused, page-locked when the chunk goes to a GPU.

Why not a fresh pinned tensor per chunk (as before): torch's caching host allocator rounds each
pinned allocation up to a power of two and keeps every freed block for a later request of the
same rounded size, for the life of the process. Chunks of a few layer shapes and sizes each left
their own block behind, two of them live at a time, so pinned host memory grew to a multiple of
``--max-vram`` (8.17 GB host RSS on the quarter-size GPU port under a 2 GB budget;
benchmarks/RESULTS.md). Here the slots are plain host memory pinned in place
(cudaHostRegister), outside that allocator: their total is exactly `total_bytes`, and it goes
back to the system when the run ends (`release`)."""

from __future__ import annotations

import torch

from .positioned import ALIGN  # the alignment `take_aligned` matches: a direct read's


def aligned_bytes(count: int, nbytes: int) -> int:
    """Slot bytes `StagingBuffers.take_aligned` needs for ``count`` tensors of ``nbytes`` each."""
    return count * (nbytes + ALIGN)


class StagingBuffers:
    """``slots`` reusable byte buffers of ``slot_bytes`` each (rounded up to 64); ``pin`` page-locks them so that
    copies to a GPU are asynchronous. Slot i is filled by one thread while a chunk from another
    slot is computed; `to_device` records when the copy out of a slot is done, and `take` waits
    for it before the slot is written again."""

    def __init__(self, slot_bytes: int, *, slots: int = 2, pin: bool = False):
        self.slot_bytes = -(-slot_bytes // 64) * 64  # each slot aligned for any dtype
        self.pinned = pin and slot_bytes > 0
        self._memory = torch.empty(slots * self.slot_bytes, dtype=torch.uint8)  # [slots · slot_bytes] bytes
        if self.pinned:
            _register(self._memory)
        self._copied = [None] * slots  # per slot: a CUDA event recorded after its last copy to the GPU

    @property
    def total_bytes(self) -> int:
        """Host bytes the slots hold, pinned or not."""
        return self._memory.numel()

    def take(self, slot: int, shape, dtype: torch.dtype) -> torch.Tensor:
        """Slot ``slot`` as an uninitialized tensor of ``shape`` and ``dtype``, once the last copy
        out of it has finished."""
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if nbytes > self.slot_bytes:
            raise AssertionError(f"staging: {nbytes} bytes asked of a {self.slot_bytes}-byte slot")
        if self._copied[slot] is not None:
            self._copied[slot].synchronize()
            self._copied[slot] = None
        start = slot * self.slot_bytes
        return self._memory[start : start + nbytes].view(dtype).view(shape)

    def take_aligned(self, slot: int, shape, dtype: torch.dtype, residues: list) -> list[torch.Tensor]:
        """Slot ``slot`` as one uninitialized tensor of ``shape`` and ``dtype`` per residue, each
        placed where its address modulo ``ALIGN`` equals the residue (None: anywhere), so that a
        direct read of a file range at an offset with that residue lands in it without a bounce
        copy (`positioned`). Needs ``aligned_bytes`` of the slot. Same wait as `take`."""
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        memory = self.take(slot, (self.slot_bytes,), torch.uint8)
        base, pos, out = memory.data_ptr(), 0, []
        for residue in residues:
            if residue is not None and residue % dtype.itemsize == 0:
                pos += (residue - base - pos) % ALIGN
            pos = -(-pos // dtype.itemsize) * dtype.itemsize
            if pos + nbytes > self.slot_bytes:
                raise AssertionError(f"staging: {len(residues)} aligned {nbytes}-byte tensors overflow a {self.slot_bytes}-byte slot")
            out.append(memory[pos : pos + nbytes].view(dtype).view(shape))
            pos += nbytes
        return out

    def to_device(self, slot: int, tensor: torch.Tensor, device) -> torch.Tensor:
        """``tensor`` (a view of slot ``slot``) on ``device``: asynchronous from pinned memory, the
        slot free again once the copy has run."""
        moved = tensor.to(device, non_blocking=self.pinned)
        if self.pinned and moved.is_cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(moved.device))
            self._copied[slot] = event
        return moved

    def release(self) -> None:
        """Unpin (after every copy has run) and drop the memory."""
        for event in self._copied:
            if event is not None:
                event.synchronize()
        if self.pinned:
            _unregister(self._memory)
            self.pinned = False
        self._memory = torch.empty(0, dtype=torch.uint8)
        self.slot_bytes = 0


def _register(memory: torch.Tensor) -> None:
    cudart = torch.cuda.cudart()
    status = cudart.cudaHostRegister(memory.data_ptr(), memory.numel(), 0)
    if int(status) != 0:
        why = cudart.cudaGetErrorString(status)
        raise RuntimeError(f"loraport: cudaHostRegister of {memory.numel()} bytes failed: {why}")


def _unregister(memory: torch.Tensor) -> None:
    cudart = torch.cuda.cudart()
    status = cudart.cudaHostUnregister(memory.data_ptr())
    if int(status) != 0:
        raise RuntimeError(f"loraport: cudaHostUnregister failed: {cudart.cudaGetErrorString(status)}")
