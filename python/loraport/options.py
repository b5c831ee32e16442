"""The options of a run, checked once: `PortOptions` (loraport.port, port-many, fill_cache) and
`ToolOptions` (resize, merge, extract, convert). Both are frozen dataclasses built by
``from_args``, which raises InputError on a bad value and resolves what the rest of the run
reads (the device, a byte count); a run's report keeps them as a dict (`PortOptions.to_dict`,
`ToolOptions.settings`), with the keys and values its JSON has always had."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from . import gate
from .adapters import DORA_MAGNITUDE
from .devices import resolve_device
from .errors import InputError
from .ops import krylov_blocks
from .strength import Strength

VARIANTS = ("copy", "target", "source-then-target")  # the first is the default: benchmarks/quality
ON_DISSIMILAR = ("skip", "copy")
DEFAULT_MIN_SIMILARITY = 0.5  # separates related (>= 0.855) from unrelated (<= 0.268) layers: benchmarks/quality
DEFAULT_MAX_MEMORY = 2 << 30
MERGE_MODES = ("svd", "concat")
DEFAULT_EXTRACT_MAX_RANK = 128  # rank cap of `extract` with ``energy`` when no ``rank`` is given
RSVD_METHODS = ("auto", "power", "krylov")


def parse_bytes(value) -> int:
    """2147483648, "2GB", "512MiB", "1.5G" -> bytes."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([\d.]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(value))
    if not m:
        raise InputError(f"loraport: cannot read a size from {value!r} (e.g. 2GB, 512MiB)")
    unit = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * unit)


@dataclass(frozen=True)
class PortOptions:
    """`port`'s options (its docstring says what each does), checked and resolved: ``device``
    as "cpu" / "cuda:N", ``max_memory`` in bytes, ``cache_dir`` absolute, ``strength`` as
    Strength.to_dict. Build with `from_args`."""

    device: str = "cpu"
    subspace_rank: int | None = None
    energy: float | None = None
    min_similarity: float = DEFAULT_MIN_SIMILARITY
    on_dissimilar: str = "skip"
    rank: int | None = None
    variant: str = VARIANTS[0]
    power_iters: int = 2
    method: str = "power"
    block_size: int | None = None
    oversample: int = 8
    seed: int = 0
    max_memory: int = DEFAULT_MAX_MEMORY
    dry_run: bool = False
    cache_dir: str | None = None
    strength: dict = dataclasses.field(default_factory=lambda: Strength().to_dict())
    dora_magnitude: str = DORA_MAGNITUDE[0]

    @classmethod
    def from_args(
        cls, *, device="cpu", subspace_rank=None, energy=None, min_similarity=DEFAULT_MIN_SIMILARITY,
        on_dissimilar="skip", rank=None, variant=VARIANTS[0], power_iters=2, method="power", block_size=None,
        oversample=8, seed=0, max_memory=DEFAULT_MAX_MEMORY, dry_run=False, cache_dir=None, strength=None,
        dora_magnitude=DORA_MAGNITUDE[0],
    ) -> PortOptions:  # fmt: skip
        """The options checked (InputError); the device is resolved here, before anything is read."""
        if variant not in VARIANTS:
            raise InputError(f"loraport.port: variant must be one of {VARIANTS}, got {variant!r}")
        if on_dissimilar not in ON_DISSIMILAR:
            raise InputError(f"loraport.port: on_dissimilar must be one of {ON_DISSIMILAR}, got {on_dissimilar!r}")
        if energy is not None and not 0 < energy <= 1:
            raise InputError(f"loraport.port: energy must be in (0, 1], got {energy!r}")
        if not 0 <= min_similarity <= 1:  # a subspace similarity lies in [0, 1]; NaN fails too
            raise InputError(f"loraport.port: min_similarity must be in [0, 1], got {min_similarity!r}")
        for name, value in (("subspace_rank", subspace_rank), ("rank", rank), ("block_size", block_size)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InputError(f"loraport.port: {name} must be a positive integer, got {value!r}")
        if block_size is not None and method != "krylov":
            raise InputError(f'loraport.port: block_size is a setting of method="krylov", got method={method!r}')
        if dora_magnitude not in DORA_MAGNITUDE:
            raise InputError(f"loraport.port: dora_magnitude must be one of {DORA_MAGNITUDE}, got {dora_magnitude!r}")
        return cls(
            device=resolve_device(device), subspace_rank=subspace_rank, energy=energy, min_similarity=min_similarity,
            on_dissimilar=on_dissimilar, rank=rank, variant=variant, power_iters=power_iters,
            method=method, block_size=block_size, oversample=oversample, seed=seed,
            max_memory=parse_bytes(max_memory), dry_run=dry_run,
            cache_dir=None if cache_dir is None else os.path.abspath(os.fspath(cache_dir)),
            strength=Strength(strength).to_dict(), dora_magnitude=dora_magnitude,
        )  # fmt: skip

    def to_dict(self) -> dict:
        """The report's ``settings``."""
        return dataclasses.asdict(self)

    def svd(self) -> dict:
        """The rsvd settings: oversample, power_iters, method, seed."""
        return dict(oversample=self.oversample, power_iters=self.power_iters, method=self.method, seed=self.seed)

    @property
    def default_gate(self) -> bool:
        """The default gate (loraport.gate: spectrum-following k, iterations until settled) decides
        the copy variant when neither a subspace rank nor an energy is given; the projections and
        explicit ranks get subspaces from one rsvd at the options' iterations."""
        return self.variant == "copy" and self.subspace_rank is None and self.energy is None

    def subspace_rank_for(self, m: int, n: int) -> int:
        """The largest subspace rank computed for [m, n] weights: the given rank, else the default
        gate's cap (`gate.gate_rank`) or `gate.default_subspace_rank`. Energy searches below it:
        an energy rank is capped like the default, since on flat spectra (k = 128-271 at energy
        0.9 on 384-wide encoders) it let unrelated layers through."""
        if self.subspace_rank is not None:
            return min(self.subspace_rank, m, n)
        return gate.gate_rank(m, n) if self.default_gate else gate.default_subspace_rank(m, n)

    def krylov_block(self, k: int, m: int, n: int) -> int | None:
        """The Krylov block width rsvd gets for rank-k subspaces of [m, n] weights: block_size
        where its (power_iters + 1) blocks hold k columns, else None (rank + oversample)."""
        if self.method != "krylov" or self.block_size is None:
            return None
        short_side = min(m, n)
        width = min(self.block_size, short_side)
        return self.block_size if krylov_blocks(short_side, width, self.power_iters) * width >= min(k, short_side) else None


def energy_rank(S: torch.Tensor, total: torch.Tensor, energy: float) -> int:
    """Smallest k with sum(S[:k]²) >= energy · total (``total`` = ‖W‖_F²), at most len(S)."""
    kept = torch.cumsum(S.double().square(), 0)
    return min(int((kept < energy * total).sum()) + 1, S.numel())


@dataclass(frozen=True)
class ToolOptions:
    """The options of a toolbox job (``job``: resize, merge, extract, convert), checked and
    resolved. Every job has the rank rule (``rank``, ``energy``, ``sv_ratio``: `select`), a
    ``device`` and ``max_memory``; the other fields are one job's (`REPORTED` says which).
    Build with `from_args`."""

    job: str
    rank: int | None = None
    energy: float | None = None
    sv_ratio: float | None = None
    device: str = "cpu"
    max_memory: int = DEFAULT_MAX_MEMORY
    mode: str = "svd"  # merge
    loras: list | None = None  # merge: [[label, weight], ...], known once the inputs are read
    conv: bool = True  # extract
    include: str | None = None
    exclude: str | None = None
    min_rel_diff: float = 0.0
    method: str = "auto"
    power_iters: int = 2
    oversample: int = 8
    seed: int = 0
    base: str | None = None  # convert, resize: the base model's label
    dora_magnitude: str | None = None  # resize of a DoRA: "keep" (its magnitude as trained)

    REPORTED: ClassVar[dict] = {  # the report's settings per job, in the order they are written
        "resize": ("rank", "energy", "sv_ratio", "device", "max_memory", "base"),
        "merge": ("loras", "mode", "rank", "energy", "sv_ratio", "device", "max_memory"),
        "extract": ("rank", "energy", "conv", "include", "exclude", "min_rel_diff", "device", "method",
                    "power_iters", "oversample", "seed", "max_memory"),  # fmt: skip
        "convert": ("rank", "energy", "device", "max_memory", "base"),
    }

    @classmethod
    def from_args(cls, job: str, *, device="cpu", max_memory=DEFAULT_MAX_MEMORY, **kw) -> ToolOptions:
        """The job's options checked (InputError, in the order the jobs have always checked
        them); the device is resolved here, before anything is read."""
        rank, energy, sv_ratio = kw.get("rank"), kw.get("energy"), kw.get("sv_ratio")
        if job == "merge":
            mode = kw.get("mode", "svd")
            if mode not in MERGE_MODES:
                raise InputError(f"loraport.merge: mode must be one of {MERGE_MODES}, got {mode!r}")
            if mode == "concat" and (rank is not None or energy is not None or sv_ratio is not None):
                raise InputError("loraport.merge: rank, energy and sv_ratio apply to mode 'svd' only (concat is exact)")
        if job in ("extract", "convert") and rank is None and energy is None:
            raise InputError(f"loraport.{job}: give rank or energy")
        check_rank_rule((rank or DEFAULT_EXTRACT_MAX_RANK) if job == "extract" else rank, energy, sv_ratio, job)
        if job == "merge" and not kw.get("loras"):
            raise InputError("loraport.merge: give at least one LoRA")
        if job == "resize" and rank is None and energy is None and sv_ratio is None:
            raise InputError("loraport.resize: give rank, energy or sv_ratio")
        if job == "extract" and kw.get("method", "auto") not in RSVD_METHODS:
            raise InputError(f"loraport.extract: method must be auto, power or krylov, got {kw['method']!r}")
        return cls(job, device=resolve_device(device), max_memory=parse_bytes(max_memory), **kw)

    def settings(self) -> dict:
        """The report's ``settings``: this job's options."""
        out = {name: getattr(self, name) for name in self.REPORTED[self.job]}
        if self.dora_magnitude is not None:
            out["dora_magnitude"] = self.dora_magnitude
        return out

    def select(self, cap: int | None = None):
        """The rank rule as select(S, total) -> k, with S [p] descending (float64) and total =
        ‖ΔW‖_F²: ``energy`` / ``sv_ratio`` where given, at most ``rank`` (else ``cap``),
        never more than len(S) or less than 1."""
        return rank_rule(self.rank or cap, self.energy, self.sv_ratio)


def check_rank_rule(rank, energy, sv_ratio, job: str) -> None:
    """InputError naming ``job`` when a rank option is out of range."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise InputError(f"loraport.{job}: rank must be a positive integer, got {rank!r}")
    if energy is not None and sv_ratio is not None:
        raise InputError(f"loraport.{job}: give energy or sv_ratio, not both")
    if energy is not None and not 0 < energy <= 1:
        raise InputError(f"loraport.{job}: energy must be in (0, 1], got {energy!r}")
    if sv_ratio is not None and not sv_ratio >= 1:
        raise InputError(f"loraport.{job}: sv_ratio must be >= 1, got {sv_ratio!r}")


def rank_rule(rank, energy, sv_ratio):
    """select(S, total) -> k (see `ToolOptions.select`) for checked rank options."""

    def select(S: torch.Tensor, total: torch.Tensor) -> int:
        k = S.numel()
        if energy is not None and total > 0:
            k = energy_rank(S, total, energy)
        elif sv_ratio is not None and S[0] > 0:
            k = int((S >= S[0] / sv_ratio).sum())
        return max(1, min(k, rank or k))

    return select
