"""Positioned reads of a byte range of a file into a tensor's memory, the way a streaming port
reads base weights: where the caller asks (a port computing on the CPU), large ranges with
O_DIRECT; small ones, other callers and files that refuse O_DIRECT through the page cache.
O_DIRECT needs the file offset and the memory address aligned alike: where the destination's
address is congruent to the file offset modulo 4096 (`staging.StagingBuffers.take_aligned`
places the port's weights so), the disk writes the range's whole pages straight into the
destination and only the partial pages at its two ends pass through an aligned bounce buffer;
elsewhere every byte does, and one memcpy moves it into place.

Why not the page cache for the large ones: a buffered read of weights that are not cached costs
the reading thread the kernel's copy plus the page cache's own bookkeeping and reclaim (18 GB
on a 2-core VM: 27 s of CPU, against 3 s with O_DIRECT and the bounce copy and under 1 s
without the copy), and a port reads while the gate computes on every core: the reading thread
then waits for a core, and the gate's threads wait for each other while it has one (the reads
of a port's 18 GB took 14 s beside the gate with the bounce copy, 7 s alone). A range whose
pages are already cached (three probe pages, `_cached`) is copied from the page cache instead,
which is cheaper than the disk, or mapped where the caller can take a read-only weight
(`mapped_if_cached`). The default gate on a GPU reads the same way into its page-locked
slots (the disk's transfer lands where the copy to the GPU starts); a GPU port's projection
variants stack each chunk into one tensor, which would pass mostly through the bounce buffer,
so they read through the page cache. ``LORAPORT_DIRECT_IO=0`` turns O_DIRECT off."""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import warnings

import torch

DIRECT_MIN = 4 << 20  # ranges from this size are read with O_DIRECT
_BOUNCE = 64 << 20  # bytes per direct read: the block layer splits one into 16 requests in flight at once
ALIGN = 4096  # file offset, length and memory alignment of a direct read (a multiple of any logical block size)
_local = threading.local()  # each reading thread's bounce buffer


def direct_io_enabled() -> bool:
    return hasattr(os, "O_DIRECT") and os.environ.get("LORAPORT_DIRECT_IO", "1") != "0"


def _bounce() -> tuple[memoryview, int]:
    """This thread's page-aligned bounce buffer: a memoryview and its address."""
    if not hasattr(_local, "buffer"):
        m = mmap.mmap(-1, _BOUNCE)  # anonymous mappings are page aligned
        _local.buffer = (memoryview(m), ctypes.addressof(ctypes.c_char.from_buffer(m)))
    return _local.buffer


def read_range(path: str, offset: int, out: torch.Tensor, direct: bool = True) -> int:
    """Read ``out.nbytes`` bytes of ``path`` from ``offset`` into ``out`` (contiguous, CPU),
    with O_DIRECT where ``direct`` and the range is large; returns how many arrived (fewer only
    where the file ends early; the caller names the error)."""
    dest = out.view(torch.uint8).reshape(-1)  # [nbytes]
    if direct and dest.numel() >= DIRECT_MIN and direct_io_enabled() and not _cached(path, offset, dest.numel()):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:  # a file system without O_DIRECT (tmpfs, some network mounts)
            fd = None
        if fd is not None:
            try:
                return _read_direct(fd, offset, dest)
            except OSError:  # EINVAL: the mount refuses this alignment after all
                pass
            finally:
                os.close(fd)
    buffer = memoryview(dest.numpy()).cast("B")
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < len(buffer):
            n = os.preadv(fd, [buffer[done:]], offset + done)
            if n <= 0:
                break
            done += n
        return done
    finally:
        os.close(fd)


def mapped_if_cached(path: str, offset: int, nbytes: int) -> torch.Tensor | None:
    """The range [offset, offset + nbytes) of ``path`` as a uint8 tensor [nbytes] mapping the
    page cache, where it is cached (`_cached`), else None. No byte is copied: the mapping is
    shared and read-only (a private one would copy every page it populates), and its page
    tables are filled here (`_populate`), which costs the reading thread a small part of
    what a copy out of the page cache would (see the module's docstring: that thread's CPU comes
    out of the gate's share). It is unmapped when the tensor goes."""
    if nbytes < DIRECT_MIN or not direct_io_enabled() or not _cached(path, offset, nbytes):
        return None
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as f:
        try:
            view = mmap.mmap(f.fileno(), offset + nbytes - start, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=start)
        except (OSError, ValueError):  # a file shorter than the range, or one that cannot be mapped
            return None
    with warnings.catch_warnings():  # torch warns that the buffer is read-only: nothing writes to it
        warnings.simplefilter("ignore", UserWarning)
        out = torch.frombuffer(view, dtype=torch.uint8, count=nbytes, offset=offset - start)
    _populate(out)
    return out


_FAULT_AROUND = 64 << 10  # Linux's default fault_around_bytes: a read fault maps the cached pages of its 64 KB window


def _populate(mapped: torch.Tensor) -> None:
    """Fill the page tables of ``mapped`` (uint8, a mapping of the page cache) on the calling
    thread, without the GIL: one read in every 64 KB, each fault mapping the cached pages of its
    window (the kernel's fault-around), and the last byte. A torch reduction of fewer than 32768
    elements (a 2 GB range) runs on the calling thread alone and releases the GIL. Cheaper than
    MADV_POPULATE_READ, which walks the range a page at a time (benchmarks/RESULTS.md); not
    MAP_POPULATE, since CPython's mmap holds the GIL through the mmap call and the gate's thread
    stalled for the whole of every mapping. Pages a kernel leaves unmapped (a smaller
    fault_around_bytes) fault in when the gate first reads them."""
    mapped[::_FAULT_AROUND].amax()
    mapped[-1:].amax()


def _cached(path: str, offset: int, nbytes: int) -> bool:
    """Whether the first, middle and last page of the range are in the page cache: a one-byte
    read of each with RWF_NOWAIT, which fails rather than wait for the disk. POSIX_FADV_RANDOM
    on the probing descriptor keeps the kernel's readahead for a missing page to that page."""
    if not hasattr(os, "RWF_NOWAIT"):
        return False
    probe = bytearray(1)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for pos in (offset, offset + nbytes // 2, offset + nbytes - 1):
            if os.preadv(fd, [probe], pos, os.RWF_NOWAIT) != 1:
                return False
        return True
    except OSError:  # EAGAIN: not cached; EOPNOTSUPP: no RWF_NOWAIT on this file system
        return False
    finally:
        os.close(fd)


def _read_direct(fd: int, offset: int, dest: torch.Tensor) -> int:
    """The range [offset, offset + dest.numel()) with O_DIRECT: its whole pages straight into
    ``dest`` where ``dest``'s address is congruent to ``offset`` modulo ALIGN, the rest through
    the bounce buffer. Returns how many bytes arrived."""
    base, end = dest.data_ptr(), offset + dest.numel()
    lo, hi = -(-offset // ALIGN) * ALIGN, end - end % ALIGN  # the whole pages inside the range
    if (base - offset) % ALIGN or hi <= lo:
        return _bounced(fd, offset, end, base)
    for start, stop, read in ((offset, lo, _bounced), (lo, hi, _in_place), (hi, end, _bounced)):
        if start < stop:
            got = read(fd, start, stop, base + start - offset)
            if got < stop - start:  # the file ends before the range does
                return start - offset + got
    return dest.numel()


def _in_place(fd: int, start: int, stop: int, address: int) -> int:
    """File bytes [start, stop) (both aligned, ``address`` aligned) read by the disk straight
    to ``address``; returns how many arrived."""
    done = 0
    while start + done < stop:
        want = min(_BOUNCE, stop - start - done)
        n = os.preadv(fd, [memoryview((ctypes.c_char * want).from_address(address + done)).cast("B")], start + done)
        if n <= 0:
            break
        done += n
        if n < want:  # end of file
            break
    return done


def _bounced(fd: int, start: int, stop: int, address: int) -> int:
    """File bytes [start, stop) to ``address`` through the bounce buffer, in aligned reads;
    returns how many arrived."""
    view, bounce = _bounce()
    pos = start - start % ALIGN  # aligned start at or before the range
    while pos < stop:
        want = min(_BOUNCE, -(-(stop - pos) // ALIGN) * ALIGN)
        n = os.preadv(fd, [view[:want]], pos)
        lo, hi = max(start, pos), min(stop, pos + n)
        if hi <= lo:  # the file ends before the range does
            return max(0, lo - start)
        # one thread's memcpy, without the GIL (ctypes releases it), not torch's copy_: that would
        # start an OpenMP team on this reading thread beside the gate's
        ctypes.memmove(address + lo - start, bounce + lo - pos, hi - lo)
        pos += n
        if n < want:  # end of file
            return hi - start
    return stop - start
