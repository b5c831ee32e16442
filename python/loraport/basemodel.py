"""Lazy, read-only access to a base model's weights, whatever its layout on disk: one safetensors
file, a sharded one (``*.safetensors.index.json``), a Tencent-style pickled checkpoint (``.pt``,
weights possibly under "module", opened with torch.load(weights_only=True, mmap=True)), a
diffusers folder (``transformer/`` or ``unet/``, ``text_encoder/``, ``text_encoder_2/``), or an
in-memory state dict. Nothing is read until asked: `BaseModel.shape` reads headers only, and
`BaseModel.read` reads one tensor (or a row slice of it). Keys packed under ComfyUI's
``model.diffusion_model.`` prefix are seen without it; an LDM checkpoint's CLIP text encoder
(``cond_stage_model.transformer.``, ``conditioner.embedders.0.transformer.``) is component
"te1", SDXL's OpenCLIP one (``conditioner.embedders.1.model.``) "te2" under CLIP names. `fingerprint` (sizes, mtimes and a hash of each file's first MiB) identifies the files
cheaply, for a cache of subspaces."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import struct
from collections.abc import Mapping

import torch
from safetensors import safe_open

from .errors import InputError, brief
from .finite import all_finite
from .openclip import OpenClipView, is_openclip
from .positioned import mapped_if_cached, read_range

_STRIPPED_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# Text encoders packed in a single-file SD checkpoint (LDM layout): SD 1.x's and SDXL's first one
# under Hugging Face CLIP names; SDXL's second one under OpenCLIP names (read through
# openclip.OpenClipView, which shows them under the CLIP names).
_PACKED_COMPONENTS = {
    "te1": ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer."),
    "te2": ("conditioner.embedders.1.model.",),
}
# diffusers folder: component -> candidate subfolders
_SUBFOLDERS = {"model": ("transformer", "unet"), "te1": ("text_encoder",), "te2": ("text_encoder_2",)}
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


class _Store:
    """Tensors of one component: name -> (file, key in file)."""

    def __init__(self, label: str):
        self.label = label
        self.files: list[str] = []
        self._names: dict[str, str] = {}  # name -> key in the file

    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, name: str) -> torch.dtype:
        raise NotImplementedError

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        raise NotImplementedError

    def read_into(self, name: str, rows: slice | None, out: torch.Tensor, direct: bool = False) -> bool:
        """Read straight into ``out``'s memory (``direct``: large tensors with O_DIRECT); False
        where this store cannot (then the caller reads and copies)."""
        return False

    def file_offset(self, name: str, rows: slice | None, out: torch.Tensor) -> int | None:
        """Where in its file `read_into` would start reading ``rows`` of ``name`` into ``out``
        (a tensor or its meta stand-in), None where it would not read straight into it."""
        return None

    def mapped(self, name: str, out: torch.Tensor) -> torch.Tensor | None:
        """All of ``name`` as a tensor shaped and typed like ``out`` (a meta stand-in) that maps
        the page cache, without a copy, where the store can and the bytes are cached; else None."""
        return None


def _strip(keys, prefix: str | None = None) -> dict[str, str]:
    """name -> key, without a ComfyUI packing prefix that most keys share (or, given
    ``prefix``, only the keys under it, without it)."""
    keys = list(keys)
    if prefix is not None:
        return {k[len(prefix) :]: k for k in keys if k.startswith(prefix)}
    for prefix in _STRIPPED_PREFIXES:
        inside = [k for k in keys if k.startswith(prefix)]
        if inside and len(inside) * 2 > len(keys):
            return {k[len(prefix) :]: k for k in inside}
    return {k: k for k in keys}


class _SafetensorsStore(_Store):
    def __init__(self, files: list[str], label: str, prefix: str | None = None):
        super().__init__(label)
        self.files = files
        self._handles = {}
        self._layouts: dict[str, dict] = {}
        key_file = {}
        for path in files:
            f = self._open(path)
            for k in f.keys():
                key_file[k] = path
        self._names = _strip(key_file, prefix)
        self._file_of = key_file

    def _open(self, path):
        if path not in self._handles:
            if not os.path.isfile(path):
                raise InputError(f"{path}: no such file")
            try:
                self._handles[path] = safe_open(path, framework="pt")
            except Exception as e:
                raise InputError(f"{path}: not a readable safetensors file ({brief(e)})") from None
        return self._handles[path]

    def _slice(self, name):
        key = self._names[name]
        return self._open(self._file_of[key]).get_slice(key), key

    def shape(self, name):
        return tuple(self._slice(name)[0].get_shape())

    def dtype(self, name):
        return _ST_DTYPES.get(self._slice(name)[0].get_dtype(), torch.float32)

    def _layout(self, path: str) -> dict:
        """key -> (dtype, shape, first byte, end byte) from the file's header (8-byte length, JSON)."""
        if path not in self._layouts:
            size = os.path.getsize(path)
            try:
                with open(path, "rb") as f:
                    (length,) = struct.unpack("<Q", f.read(8))
                    if length > size - 8:  # checked before reading: a forged length allocates nothing
                        raise ValueError(f"header length {length} exceeds the file's {size} bytes")
                    header = json.loads(f.read(length))
                start, layout = 8 + length, {}
                for key, info in header.items():
                    if key == "__metadata__":
                        continue
                    begin, end = (start + int(o) for o in info["data_offsets"])
                    if not start <= begin <= end <= size:
                        raise InputError(f"{path}: tensor '{key}' lies outside the file (a truncated download?)")
                    layout[key] = (_ST_DTYPES.get(info["dtype"]), tuple(int(d) for d in info["shape"]), begin, end)
            except (struct.error, ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
                if isinstance(e, InputError):
                    raise
                raise InputError(f"{path}: not a readable safetensors header ({brief(e)})") from None
            self._layouts[path] = layout
        return self._layouts[path]

    def read_into(self, name, rows, out, direct=False):
        """One positioned read of the tensor's bytes (or its rows') into ``out``, when the
        tensor is stored in ``out``'s dtype and ``out`` is contiguous (`positioned.read_range`;
        ``direct``: large tensors with O_DIRECT). Through a memory map the same bytes arrive page fault by
        page fault: reading the Hunyuan-shaped weights of a 5 GB pair (cold page cache, 2-core VM)
        ran at 0.23-0.28 GB/s that way and 0.39-0.52 GB/s with read()s, the whole files
        sequentially at 0.91 GB/s."""
        offset = self.file_offset(name, rows, out)
        if offset is None or out.device.type != "cpu":
            return False
        path = self._file_of[self._names[name]]
        if read_range(path, offset, out, direct) < out.numel() * out.element_size():
            raise InputError(f"{path}: tensor '{self._names[name]}' ends early (the file is truncated)")
        return True

    def mapped(self, name, out):
        offset = self.file_offset(name, None, out)
        if offset is None:
            return None
        got = mapped_if_cached(self._file_of[self._names[name]], offset, out.numel() * out.element_size())
        return None if got is None else got.view(out.dtype).view(out.shape)

    def file_offset(self, name, rows, out):
        key = self._names[name]
        path = self._file_of[key]
        dtype, shape, begin, end = self._layout(path)[key]
        if dtype != out.dtype or not out.is_contiguous() or not shape or not hasattr(os, "preadv"):
            return None
        row_bytes = (end - begin) // shape[0]
        first, stop, step = (rows or slice(None)).indices(shape[0])
        if step != 1 or out.numel() * out.element_size() != (stop - first) * row_bytes:
            return None
        return begin + first * row_bytes

    def read(self, name, rows=None):
        key = self._names[name]
        self._open(self._file_of[key])  # errors as for the headers
        try:
            # A fresh handle, not the cached one: the tensor is a view of the file's memory map,
            # and a mapping that lived as long as the cached handle would keep every page ever
            # read in the process's RSS (tens of GB for a 13B pair). This one goes with the tensor.
            sl = safe_open(self._file_of[key], framework="pt").get_slice(key)
            return sl[rows] if rows is not None else sl[:]
        except Exception as e:
            raise InputError(f"{self._file_of[key]}: cannot read tensor '{key}' ({brief(e)})") from None


class _DictStore(_Store):
    def __init__(self, tensors: Mapping[str, torch.Tensor], label: str, prefix: str | None = None):
        super().__init__(label)
        self._tensors = tensors
        self._names = _strip((k for k, v in tensors.items() if isinstance(v, torch.Tensor)), prefix)

    def shape(self, name):
        return tuple(self._tensors[self._names[name]].shape)

    def dtype(self, name):
        return self._tensors[self._names[name]].dtype

    def read(self, name, rows=None):
        t = self._tensors[self._names[name]]
        return t[rows] if rows is not None else t


def _load_pickle(path: str) -> Mapping[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise InputError(f"{path}: not a loadable torch checkpoint ({brief(e)})") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("module"), Mapping):
        obj = obj["module"]
    if not isinstance(obj, Mapping):
        raise InputError(f"{path}: the checkpoint holds a {type(obj).__name__}, not a dict of tensors")
    return obj


def _model_files(folder: str) -> list[str] | None:
    """The safetensors files of a model folder (index.json shards or single files), or None."""
    for index in sorted(glob.glob(os.path.join(folder, "*.safetensors.index.json"))):
        return _index_files(index)
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    return files or None


def _index_files(index: str) -> list[str]:
    try:
        with open(index, "rb") as f:
            weight_map = json.loads(f.read())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise InputError(f"{index}: not a safetensors index (needs a 'weight_map'): {brief(e)}") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{index}: 'weight_map' must map tensor names to shard files, got {weight_map!r:.60}")
    for name in weight_map.values():  # a shard is a plain file name beside the index, not a path elsewhere
        if not isinstance(name, str) or not name or os.path.basename(name) != name or name in (".", ".."):
            raise InputError(f"{index}: 'weight_map' names a shard {name!r:.60}, not a file beside the index")
    folder = os.path.dirname(index)
    return [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]


class BaseModel:
    """A base model's weights by component ("model", "te1", "te2") and name, read lazily."""

    def __init__(self, src, label: str | None = None):
        self.label = label or (os.fspath(src) if not isinstance(src, Mapping) else "<state dict>")
        self.bytes_read = 0
        self.direct_io = False  # read_into's large tensors with O_DIRECT (a port computing on the CPU sets it)
        self._stores: dict[str, _Store] = {}
        if isinstance(src, Mapping):
            self._stores["model"] = _DictStore(src, self.label)
            self._add_packed(lambda prefix: _DictStore(src, self.label, prefix))
            return
        path = os.fspath(src)
        if os.path.isdir(path):
            files = _model_files(path)
            if files:
                self._stores["model"] = _SafetensorsStore(files, self.label)
            for comp, subs in _SUBFOLDERS.items():
                for sub in subs:
                    files = _model_files(os.path.join(path, sub))
                    if files and comp not in self._stores:
                        self._stores[comp] = _SafetensorsStore(files, f"{path}/{sub}")
            if not self._stores:
                raise InputError(
                    f"{path}: folder holds no safetensors model (nor transformer/, unet/, text_encoder/ ones)"
                )
        elif not os.path.isfile(path):
            raise InputError(f"{path}: no such file or folder")
        elif path.endswith((".index.json", ".safetensors")):
            files = _index_files(path) if path.endswith(".index.json") else [path]
            self._stores["model"] = _SafetensorsStore(files, self.label)
            self._add_packed(lambda prefix: _SafetensorsStore(files, self.label, prefix))
        else:
            tensors = _load_pickle(path)
            store = _DictStore(tensors, self.label)
            store.files = [path]
            self._stores["model"] = store
            self._add_packed(lambda prefix: _DictStore(tensors, self.label, prefix))

    def _add_packed(self, view) -> None:
        """Components packed into the model's own file(s) (SD's text encoders in LDM
        checkpoints): ``view(prefix)`` is a store of the keys under ``prefix``."""
        for comp, prefixes in _PACKED_COMPONENTS.items():
            for prefix in prefixes:
                store = view(prefix)
                if store.names() and comp not in self._stores:
                    self._stores[comp] = OpenClipView(store) if is_openclip(store.names()) else store

    def components(self) -> list[str]:
        return list(self._stores)

    def names(self, component: str = "model") -> list[str]:
        store = self._stores.get(component)
        return store.names() if store else []

    def module_names(self, component: str = "model") -> list[str]:
        """Names of the ``*.weight`` tensors without the suffix: the modules a LoRA can adapt."""
        return [n[: -len(".weight")] for n in self.names(component) if n.endswith(".weight")]

    def has(self, component: str, name: str) -> bool:
        store = self._stores.get(component)
        return store is not None and name in store._names

    def shape(self, component: str, name: str) -> tuple[int, ...]:
        return self._stores[component].shape(name)

    def dtype(self, component: str, name: str) -> torch.dtype:
        return self._stores[component].dtype(name)

    def read(self, component: str, name: str, rows: slice | None = None) -> torch.Tensor:
        """Tensor ``name`` (rows ``rows`` only, when given) in its stored dtype; InputError when
        it holds NaN or Inf."""
        t = self._stores[component].read(name, rows)
        self.bytes_read += t.numel() * t.element_size()
        self.check_finite(component, name, t)
        return t

    def read_into(self, component: str, name: str, out: torch.Tensor, rows: slice | None = None) -> None:
        """Tensor ``name`` (rows ``rows``) copied into ``out`` (same shape, any dtype): read from
        the file straight into ``out`` where the store can (safetensors stored in ``out``'s
        dtype, contiguous ``out``), else read and copied. Unlike `read` it does not scan for NaN
        and Inf: the caller checks ``out`` (the port does so in the pass that sums its squares).
        Large tensors are read with O_DIRECT where ``direct_io`` is set (`positioned`)."""
        if self._stores[component].read_into(name, rows, out, self.direct_io):
            self.bytes_read += out.numel() * out.element_size()
        else:
            out.copy_(self.read(component, name, rows))

    def file_offset(self, component: str, name: str, out: torch.Tensor, rows: slice | None = None) -> int | None:
        """Where in its file `read_into` would read ``rows`` of ``name`` straight into ``out`` (a
        tensor or its meta stand-in), None where it would read and copy."""
        return self._stores[component].file_offset(name, rows, out)

    def mapped(self, component: str, name: str, out: torch.Tensor) -> torch.Tensor | None:
        """Tensor ``name`` shaped and typed like ``out`` (a meta stand-in), mapping the page cache
        without a copy, where it is a safetensors tensor of that dtype and shape whose bytes are all
        cached (`positioned.mapped_if_cached`); else None. Like `read_into` it does not scan for
        NaN and Inf."""
        t = self._stores[component].mapped(name, out)
        if t is not None:
            self.bytes_read += t.numel() * t.element_size()
        return t

    def check_finite(self, component: str, name: str, t: torch.Tensor) -> None:
        """InputError naming the file and tensor when ``t`` (read from ``name``) holds NaN or Inf."""
        if not all_finite(t):
            raise InputError(f"{self._stores[component].label}: tensor '{name}' contains NaN or Inf")

    def files(self) -> list[str]:
        return sorted({f for s in self._stores.values() for f in s.files})

    def fingerprint(self) -> str | None:
        """A cheap identity of the files: size, mtime and sha256 of the first MiB of each (None
        for an in-memory state dict)."""
        files = self.files()
        if not files:
            return None
        h = hashlib.sha256()
        for path in files:
            st = os.stat(path)
            h.update(f"{os.path.basename(path)}:{st.st_size}:{st.st_mtime_ns}:".encode())
            with open(path, "rb") as f:
                h.update(f.read(1 << 20))
        return h.hexdigest()[:32]
