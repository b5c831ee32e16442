"""The subspace cache: what the pipeline computed from one base weight, stored as one safetensors
file per base weight in a cache folder, so that porting a second LoRA for the same model pair
skips both the decomposition and the reading of that weight. Two kinds of entry, told apart by
the key: "subspaces" (the truncated SVD U, S, V and ‖W‖_F², for projections and explicit ranks)
and "gate-sketch" (the default gate's first estimate of both sides, U, S, V after its first products,
from which loraport.gate.Sketch.first rebuilds the sketch; not accurate subspaces, and never served
for a "subspaces" request).

An entry is identified by everything its value depends on: the base files' fingerprint
(BaseModel.fingerprint: sizes, mtimes and a hash of each file's first MiB), the component, the
weight's tensor names and row slices (fused/split layouts), the zero-padded input channels, the
kind, the subspace rank and the settings the value depends on (subspaces: method, power_iters,
oversample, seed; gate-sketch: the sketch width, seed, the number of products and the first product). That key is hashed into
the file name and also stored in the file's header; a file whose stored key, shapes or values
do not check out (truncated, corrupt, a hash collision) is ignored with a warning and recomputed.
Files are written to a temporary name and renamed (outfiles.atomic_write), so a crash never leaves
a half entry under an entry's name, and two processes filling one folder at once each rename a
complete file (the same bytes for the same key); temporary files of killed processes are removed
when the folder is next opened. An entry that cannot be stored (a full disk) is reported with a
warning and the port goes on without it.

Inside `writing_behind` (a port's stream of chunks), a put writes the entry under its temporary
name and returns; a background thread syncs and renames the entries, in order, at most
`WRITE_BEHIND` waiting, and every one is in place when the block ends. Why: while a port reads the
bases at the disk's full rate a sync waits behind those reads: on a GPU, where the gate is quick,
those waits were most of a cold port (benchmarks/RESULTS.md). A block left by an exception (Ctrl-C)
does not wait for them: the entries not yet renamed are removed."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from safetensors import safe_open

from .errors import InputError, brief
from .finite import all_finite
from .outfiles import atomic_write, commit_temp, remove_stale_temps, remove_temp, save_safetensors, write_temp

FORMAT_VERSION = 3  # bump when the meaning of an entry changes (2: entries say their kind; 3: a sketch's one estimate once)
WRITE_BEHIND = 64  # entries written but not yet synced and renamed, at most
_KEY = "loraport.subspace_key"


class SubspaceCache:
    """Get and put (U [m, k], S [k], V [n, k], ‖W‖_F² []) entries in ``folder`` (created if needed)."""

    def __init__(self, folder):
        self.folder = os.path.abspath(os.fspath(folder))
        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as e:
            raise InputError(f"{self.folder}: cannot use it as the subspace cache folder ({e.strerror or e})") from None
        remove_stale_temps(self.folder)
        self._behind: _WriteBehind | None = None  # inside `writing_behind`

    @contextlib.contextmanager
    def writing_behind(self):
        """Within the block, `put` and `put_tensors` write the entry under a temporary name and
        return; a background thread syncs and renames it. The block ends once every entry is in
        place, or, left by an exception, at once, removing those not yet renamed."""
        behind = self._behind = _WriteBehind()
        try:
            yield self
        except BaseException:
            self._behind = None
            behind.abandon()
            raise
        self._behind = None
        behind.finish()

    @staticmethod
    def key(fingerprint: str, component: str, pieces, channels: int, rank: int, svd: dict,
            kept_channels: int | None = None, kind: str = "subspaces") -> str:  # fmt: skip
        """The entry key as canonical JSON. pieces: [(tensor name, row slice or None, archs.Piece)]
        (a piece read with its row halves swapped has other left singular vectors, so the swap is
        part of the key); svd: the rsvd settings (method, power_iters, oversample, seed, and the
        Krylov block_size where one is set); kept_channels: the input channels kept of a widened
        target weight (the rest zeroed), where that applies; kind "gate-sketch": the default gate's
        sketch, keyed by its width (gate.SKETCH_WIDTH), seed, products and the first product."""
        doc = {
            "kind": kind,
            "version": FORMAT_VERSION,
            "base": fingerprint,
            "component": component,
            "pieces": [
                [name, None if rows is None else [rows.start, rows.stop], piece.swap_halves] for name, rows, piece in pieces
            ],
            "channels": channels,
            "rank": rank,
            "svd": {k: svd[k] for k in ("method", "power_iters", "oversample", "seed")},
        }
        if kept_channels is not None:  # input channels beyond it zeroed (plans.Plan.gated_channels)
            doc["kept_channels"] = kept_channels
        if kind == "gate-sketch":
            doc["svd"] = {k: svd[k] for k in ("width", "seed", "products", "start")}
        if svd.get("block_size") is not None:
            doc["svd"]["block_size"] = svd["block_size"]
        return json.dumps(doc, sort_keys=True)

    def path(self, key: str) -> str:
        return os.path.join(self.folder, hashlib.sha256(key.encode()).hexdigest()[:40] + ".safetensors")

    def get(self, key: str, m: int, n: int, k: int):
        """(U [m, k], S [k], V [n, k], frob2 [] float64) on the CPU, or None when there is no
        valid entry (a broken one is reported with a warning)."""
        got = self.get_tensors(key, {"U": [m, k], "S": [k], "V": [n, k], "frob2": []})
        return None if got is None else (got["U"], got["S"], got["V"], got["frob2"])

    def get_tensors(self, key: str, shapes: dict) -> dict | None:
        """{name: tensor} with exactly ``shapes`` ({name: [dims]}), on the CPU, or None when there
        is no valid entry (a broken one is reported with a warning)."""
        path = self.path(key)
        if not os.path.exists(path):
            return None
        try:
            with safe_open(path, framework="pt") as f:
                if (f.metadata() or {}).get(_KEY) != key:
                    raise ValueError("its stored key differs (another entry under the same hash?)")
                got = {name: f.get_tensor(name) for name in shapes}
            found = {name: list(t.shape) for name, t in got.items()}
            if found != {name: list(s) for name, s in shapes.items()}:
                raise ValueError(f"shapes {found}, expected {shapes}")
            if not all(all_finite(t) for t in got.values()):
                raise ValueError("it holds NaN or Inf")
        except Exception as e:  # any unreadable entry is recomputed, never trusted
            warnings.warn(f"loraport: ignoring the broken subspace cache entry {path} ({brief(e)})")
            return None
        return got

    def put(self, key: str, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, frob2: torch.Tensor) -> None:
        tensors = {
            "U": U.detach().to("cpu", torch.float32).contiguous(),  # [m, k]
            "S": S.detach().to("cpu", torch.float32).contiguous(),  # [k]
            "V": V.detach().to("cpu", torch.float32).contiguous(),  # [n, k]
            "frob2": frob2.detach().to("cpu", torch.float64).reshape(()),  # ‖W‖_F²
        }
        self.put_tensors(key, tensors)

    def put_tensors(self, key: str, tensors: dict) -> None:
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        path = self.path(key)
        write = lambda tmp: save_safetensors(tensors, tmp, {_KEY: key})  # noqa: E731
        try:
            if self._behind is None:
                atomic_write(path, write, sweep=False)  # the folder was swept when opened
                return
            tmp = write_temp(path, write, sweep=False)
        except InputError as e:  # the cache only saves time: a port goes on without the entry
            warnings.warn(f"loraport: subspace cache entry not stored: {e}")
            return
        self._behind.queue(tmp, path)


class _WriteBehind:
    """The writer thread of one `SubspaceCache.writing_behind` block and the entries it has yet to
    sync and rename, in order."""

    def __init__(self):
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="loraport-cache")
        self.queued: deque[tuple[Future, str]] = deque()  # (its sync and rename, the temporary file)
        self.abandoned = False

    def queue(self, tmp: str, path: str) -> None:
        while len(self.queued) >= WRITE_BEHIND:
            self.queued.popleft()[0].result()
        self.queued.append((self.writer.submit(self._commit, tmp, path), tmp))

    def _commit(self, tmp: str, path: str) -> None:
        try:
            commit_temp(tmp, path)
        except OSError as e:
            remove_temp(tmp)
            if not self.abandoned:  # abandoned: `abandon` removed it, and the caller is on its way out
                warnings.warn(f"loraport: subspace cache entry not stored: {path}: cannot write it ({e.strerror or e})")

    def finish(self) -> None:
        """Wait until every entry is in place; an internal error of the writer is raised here."""
        self.writer.shutdown(wait=True)
        for future, _ in self.queued:
            future.result()

    def abandon(self) -> None:
        """Stop without waiting: the entries not yet renamed are removed (the one rename under
        way may still land, a whole entry)."""
        self.abandoned = True
        self.writer.shutdown(wait=False, cancel_futures=True)
        for _, tmp in self.queued:
            remove_temp(tmp)  # unless renamed meanwhile
