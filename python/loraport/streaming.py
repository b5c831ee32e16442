"""The streaming layer `port` and the toolbox share: same-shape layers grouped and cut into chunks
under a memory bound (`group`, `cut`; `group_bytes` and `staging_bytes` are port's bound), each
chunk read on one background thread into one of two reused host staging slots while the previous
chunk is computed (`Stream`, loraport.staging), a base weight read into its slot (`read_into`),
and the progress bar (`progress`)."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch

from . import gate as gate_module
from .finite import all_finite
from .staging import ALIGN, StagingBuffers, aligned_bytes


def group(items, key) -> dict:
    """``items`` by ``key(item)``, in order of first appearance."""
    groups: dict = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


def cut(items: list, budget: int, need) -> list[list]:
    """``items`` in consecutive chunks of the largest size whose ``need(size)`` (bytes) fits
    ``budget``; one item a chunk when not even one fits (the caller refuses that case first
    where it must)."""
    size = 1
    while size < len(items) and need(size + 1) <= budget:
        size += 1
    return [items[i : i + size] for i in range(0, len(items), size)]


class Stream:
    """Chunks read one ahead on a background thread: `each` calls ``load(chunk, slot)`` for chunk
    i + 1 (on the thread, into staging slot (i + 1) % 2) while the caller computes chunk i. The
    slots (`staging`: ``slot_bytes`` each, page-locked when ``device`` is a GPU) are allocated once
    and released, after the thread's last read, when the ``with`` block ends."""

    def __init__(self, slot_bytes: int = 0, device="cpu"):
        self.staging = StagingBuffers(slot_bytes, pin=str(device).startswith("cuda"))
        self._pool = ThreadPoolExecutor(1)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._pool.shutdown(wait=True)
        finally:
            self.staging.release()

    def each(self, chunks: list, load, release=None):
        """(chunk, load(chunk, slot)) for every chunk, in order, each loaded while the previous
        one is being computed. ``release(loaded)``, where given, runs on the reading thread once
        the caller has come back for the next chunk, so that freeing what ``load`` made (the
        unmapping of mapped weights) costs that thread rather than the caller's."""
        pending = self._pool.submit(load, chunks[0], 0) if chunks else None
        for i, chunk in enumerate(chunks):
            loaded = pending.result()
            # The other slot: chunk i - 1's, whose computation has returned (a copy out of it to a GPU is waited for).
            pending = self._pool.submit(load, chunks[i + 1], (i + 1) % 2) if i + 1 < len(chunks) else None
            yield chunk, loaded
            if release is not None:
                self._pool.submit(release, loaded)


def progress(total: int, desc: str, quiet: bool):
    """The progress bar of a run over ``total`` layers (none when ``quiet``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="layer", disable=quiet, desc=desc)


def read_into(
    out: torch.Tensor, base, component: str, pieces, keep: int | None = None, sums: bool = True
) -> torch.Tensor | None:
    """Copy the module's weight into ``out`` ([out, channels, *kernel], stacking dtype), input
    channels beyond the stored ones (or beyond ``keep``) zero; returns ‖W‖_F² (float64 scalar,
    for energy ranks), checking for NaN/Inf in the same pass. ``sums=False`` (the default gate,
    whose first product A·Ω finds any NaN/Inf): neither, None."""
    row, read = 0, []
    for name, rows, piece in pieces:
        shape = base.shape(component, name)  # [rows, in, *kernel]
        first, stop, _ = (rows or slice(None)).indices(shape[0])
        n, channels = stop - first, shape[1]
        dest = out[row : row + n, :channels]
        for offset, source in piece.placements(first, stop):  # row halves swapped where the layouts differ
            base.read_into(component, name, dest[offset : offset + source.stop - source.start], source)
        read.append((name, dest))
        row += n
    out[:, channels if keep is None else keep :].zero_()
    if not sums:
        return None
    frob2 = torch.zeros((), dtype=torch.float64)
    for i in range(0, out.shape[0], 1024):  # row blocks: no full-size float copy
        frob2 += out[i : i + 1024].float().square().sum(dtype=torch.float64)
    if not all_finite(frob2):  # read_into leaves the NaN/Inf scan to this pass
        for name, dest in read:
            base.check_finite(component, name, dest)
    return frob2


def mapped_weight(out: torch.Tensor, base, component: str, pieces, keep: int | None = None) -> torch.Tensor | None:
    """The module's weight as `read_into` would copy it into ``out`` (a meta stand-in of its
    shape and dtype), but mapping the page cache without a copy (`BaseModel.mapped`): where it
    is one whole base tensor in place, nothing zeroed, and cached. Else None."""
    if len(pieces) != 1:
        return None
    name, rows, piece = pieces[0]
    shape = base.shape(component, name)
    whole = (rows or slice(None)).indices(shape[0])[:2] == (0, shape[0]) and not piece.swap_halves
    if not whole or shape[0] != out.shape[0] or shape[1] != out.shape[1] or keep not in (None, shape[1]):
        return None
    return base.mapped(component, name, out)


def file_residue(out: torch.Tensor, base, component: str, pieces) -> int | None:
    """(file offset − offset in ``out``) modulo `staging.ALIGN` of the largest range `read_into`
    reads straight from a file into ``out`` (a tensor or a meta stand-in of its shape and
    dtype): the residue ``out``'s address needs for that range's direct read to skip the
    bounce buffer (`positioned`); None where nothing is read straight in."""
    row_bytes = math.prod(out.shape[1:]) * out.element_size()
    row, best = 0, (0, None)
    for name, rows, piece in pieces:
        shape = base.shape(component, name)
        first, stop, _ = (rows or slice(None)).indices(shape[0])
        if shape[1] == out.shape[1]:  # else a column slice of out: not contiguous, read and copied
            for offset, source in piece.placements(first, stop):
                dest = out[row + offset : row + offset + source.stop - source.start]
                where = base.file_offset(component, name, dest, source)
                if where is not None and dest.numel() * dest.element_size() > best[0]:
                    best = (dest.numel() * dest.element_size(), (where - (row + offset) * row_bytes) % ALIGN)
        row += stop - first
    return best[1]


def stack_dtype(dtypes) -> torch.dtype:
    """bf16 (or fp16) weights stay in their dtype: rsvd upcasts them exactly, a chunk at a time,
    so the host holds half the bytes. Anything else (or a mix) is stacked as float32."""
    dtypes = set(dtypes)
    if len(dtypes) == 1 and dtypes <= {torch.bfloat16, torch.float16}:
        return dtypes.pop()
    return torch.float32


def group_bytes(
    layers: int, m: int, n: int, *, k: int, oversample: int, power_iters: int, method: str,
    elem: int, lora_rank: int, device: str = "cpu", block_size: int | None = None, gate: bool = False,
) -> int:  # fmt: skip
    """Bytes that one chunk of ``layers`` same-shape layers (weights [m, n], ``elem`` bytes per
    stacked element: 2 for float16/bfloat16, 4 for float32, 8 for float64) holds at once on
    ``device``:

      weights    2G·m·n·elem             G sources then G targets, stacked [2G, m, n] (the
                                         default gate on the CPU: 4 KiB more each, `take_aligned`);
                                         on the CPU twice that plus one tensor being read
                                         (the next chunk is read meanwhile, into host memory)
      rsvd       the op's own bound       for one rsvd call on the 2G weights at subspace rank k
                                         and width l = k + oversample (or the Krylov block_size):
                                         loraport::rsvd_workspace_bytes (csrc/linalg/rsvd.cpp),
                                         its workspace, float32 upcast chunk and outputs, checked
                                         against measured allocations (tests/test_memory_model.py)
      factors    4·2·(m + n)·r           one layer's LoRA factors in and out, float32

    The default gate (``gate``: loraport.gate) instead copies one layer's two weights at a time
    to float32 (2·m·n·4, any dtype) and runs rsvd on those two at its sketch width
    (gate.sketch_width), one power step at a time. The budget is an estimate, not an allocator cap."""
    width = gate_module.sketch_width(m, n) if gate else min(k + oversample if block_size is None else block_size, m, n)
    matrices = 2 * layers
    weights = matrices * m * n * elem
    if not str(device).startswith("cuda"):
        if gate:  # each weight placed for a direct read (`StagingBuffers.take_aligned`)
            weights = aligned_bytes(matrices, m * n * elem)
        weights = 2 * weights + m * n * elem  # + the tensor being read
    dtype = {8: torch.float64, 4: torch.float32}.get(elem, torch.bfloat16)  # 2 bytes: upcast like bf16
    if gate:
        rsvd_bytes = 2 * m * n * 4 + torch.ops.loraport.rsvd_workspace_bytes(2, m, n, torch.float32, k, width, 0, "power")
    else:
        rsvd_bytes = torch.ops.loraport.rsvd_workspace_bytes(matrices, m, n, dtype, k, width, power_iters, method)
    factors = 4 * 2 * (m + n) * lora_rank
    return weights + rsvd_bytes + factors


def staging_bytes(layers: int, m: int, n: int, *, elem: int, aligned: bool = False) -> int:
    """Host bytes of the reader's two staging slots (`loraport.staging`) for chunks of ``layers``
    [m, n] layers: the chunk being computed and the next one being read, 2G weights each
    (``aligned``: each placed for a direct read, `StagingBuffers.take_aligned`). On the CPU
    `group_bytes` counts them already; on a GPU they are host memory (page-locked), and the
    chunks are cut to keep them within ``max_memory`` too, so that ``--max-vram`` bounds both sides."""
    return 2 * (aligned_bytes(2 * layers, m * n * elem) if aligned else 2 * layers * m * n * elem)
