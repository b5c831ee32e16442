"""Writing output files safely: every file loraport writes (LoRAs, reports, adapter configs,
subspace cache entries) goes through `atomic_write` (or its two halves, `write_temp` and
`commit_temp`, which the cache runs on two threads during a port), and safetensors files through
`save_safetensors`.

- A file is written under a temporary name in its own folder (``.NAME.PID.XXXXXXXX.tmp``), synced
  to disk and renamed over NAME, so the path holds either nothing, the old file or the complete
  new one, even when the process is killed (SIGKILL) or the machine stops. A run that finds
  temporary files of NAME (or, for a cache folder, of any entry) left by a process that no longer
  exists removes them.
- The file gets the mode a plain ``open()`` would give it (0666 less the umask), not mkstemp's
  0600, so a service running as another user can read what loraport wrote.
- `save_safetensors` writes the same bytes for the same tensors and metadata: the header lists
  the metadata keys sorted and the tensors in a fixed order (safetensors' own writer keeps its
  metadata in a hash map whose order changes from one process to the next).
- A write that fails for a reason of the place (no space left, permission, read-only file
  system) ends as one InputError line naming the output; nothing is left behind."""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import sys
import tempfile
import threading

import torch

from .errors import InputError

_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip
_umask_lock = threading.Lock()


def _file_mode() -> int:
    """0666 less the process's umask: the mode open() gives a new file."""
    try:
        with open("/proc/self/status") as f:  # Linux >= 4.7: read without changing it
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    with _umask_lock:  # elsewhere: os.umask only reads by setting, so set it back at once
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def _temp_pattern(base: str | None) -> re.Pattern:
    name = re.escape(base) if base is not None else r".+"
    return re.compile(rf"^\.{name}\.(\d+)\.[A-Za-z0-9_]+\.tmp$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(folder: str, base: str | None = None) -> list[str]:
    """Remove the temporary files of ``base`` (or of any name) in ``folder`` whose writing process
    no longer exists (killed mid-write); returns their paths. Temporary files of live processes
    (another loraport writing the same output or cache entry right now) are left alone."""
    pattern, removed = _temp_pattern(base), []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = pattern.match(name)
        if m and not _alive(int(m.group(1))):
            try:
                os.remove(os.path.join(folder, name))
                removed.append(os.path.join(folder, name))
            except OSError:  # another process cleaned it first
                pass
    return removed


def check_not_input(path, inputs) -> None:
    """InputError when ``path`` is (a link to) one of the ``inputs`` files."""
    path = os.path.abspath(os.fspath(path))
    for p in inputs:
        if p is None:
            continue
        same = os.path.realpath(p) == os.path.realpath(path)
        if same or (os.path.exists(p) and os.path.exists(path) and os.path.samefile(p, path)):
            raise InputError(f"{path}: the output path is an input file; refusing to overwrite it")


def check_output(out, inputs=()) -> str:
    """The absolute output path, after checking that it is none of the ``inputs``, not a folder,
    and that its folder exists and takes a new file (InputError otherwise): jobs call it before
    their work, so a bad ``-o`` costs one line, not a finished computation."""
    out = os.path.abspath(os.fspath(out))
    check_not_input(out, inputs)
    folder = os.path.dirname(out)
    if os.path.isdir(out):
        raise InputError(f"{out}: is a folder; give the output file's path (e.g. {os.path.join(out, 'out.safetensors')})")
    if not os.path.isdir(folder):
        raise InputError(f"{out}: output folder {folder} does not exist")
    try:  # the one test that covers permissions, read-only mounts and ACLs alike (also for root)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(out)}.{os.getpid()}.", suffix=".tmp")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise InputError(f"{out}: cannot write in {folder} ({e.strerror or e})") from None
    return out


def atomic_write(path, write, *, protect=(), sweep: bool = True) -> None:
    """Run ``write(tmp_path)`` on a temporary file beside ``path``, sync it, give it the umask's
    mode and rename it to ``path``. Refuses a ``path`` that is one of the ``protect`` files (the
    inputs); removes the temporary file on any error or interrupt; turns an OSError of the
    write (ENOSPC, EACCES, EROFS...) into a one-line InputError. ``sweep``: first remove the
    temporary files of ``path`` that dead processes left (`remove_stale_temps`: a listing of the
    folder; the subspace cache, which sweeps its whole folder when it opens it, skips it)."""
    tmp = write_temp(path, write, protect=protect, sweep=sweep)
    with _removed_on_failure(os.path.abspath(os.fspath(path))) as made:
        made.append(tmp)
        commit_temp(tmp, path)


def write_temp(path, write, *, protect=(), sweep: bool = True) -> str:
    """The first half of `atomic_write`: ``write(tmp_path)`` on a new temporary file beside
    ``path`` (the umask's mode), not yet synced or renamed; returns its path. The same checks,
    and the same cleanup and InputError on failure."""
    check_not_input(path, protect)
    path = os.path.abspath(os.fspath(path))
    folder, base = os.path.split(path)
    if os.path.isdir(path):
        raise InputError(f"{path}: is a folder; give the output file's path")
    if not os.path.isdir(folder):
        raise InputError(f"{path}: output folder {folder} does not exist")
    if sweep:
        remove_stale_temps(folder, base)
    with _removed_on_failure(path) as made:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{base}.{os.getpid()}.", suffix=".tmp")
        made.append(tmp)
        try:
            os.fchmod(fd, _file_mode())
        finally:
            os.close(fd)
        write(tmp)
    return tmp


def commit_temp(tmp: str, path) -> None:
    """The second half of `atomic_write`: sync the temporary file ``tmp`` (its bytes on disk
    before the name points at them) and rename it to ``path``. OSError as it comes."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, os.path.abspath(os.fspath(path)))


@contextlib.contextmanager
def _removed_on_failure(path: str):
    """The block's temporary file (appended to the yielded list once made) removed if the block
    fails; an OSError there becomes the one-line InputError naming ``path``."""
    made: list[str] = []
    try:
        yield made
    except BaseException as e:
        for tmp in made:
            remove_temp(tmp)
        if isinstance(e, OSError):
            raise InputError(f"{path}: cannot write the output ({e.strerror or e}); nothing written") from e
        raise


def remove_temp(tmp: str) -> None:
    """Remove the temporary file ``tmp``; nothing if it is gone (renamed or removed meanwhile)."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (and string ``metadata``) as a safetensors file at ``path``, byte for
    byte the same for the same input: metadata keys sorted; tensors ordered by element size (largest
    first, so every tensor starts aligned to its size after the 8-byte-padded header) then name."""
    if sys.byteorder != "little":  # safetensors stores little-endian; torch's bytes are native
        raise RuntimeError("loraport.save_safetensors: only little-endian machines are supported")
    header: dict = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"loraport.save_safetensors: metadata must map str to str, not at {bad[:3]}")
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    offset = 0
    for key in order:
        t = tensors[key]
        size = t.numel() * t.element_size()
        header[key] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for key in order:
            flat = tensors[key].detach().to("cpu").contiguous().reshape(-1)  # [numel]
            if flat.numel():
                f.write(memoryview(flat.view(torch.uint8).numpy()))
