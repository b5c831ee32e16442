"""The engine knobs' test hook (table: docs/engine-knobs.md). The op library reads its knobs from
the environment once, on first use (csrc/config.h); `override_for_testing` changes them for a
while through the op ``loraport::_testing_set_knob``, so tests and benchmarks can compare the
engine's paths in one process. Production code never calls it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from . import _ext  # noqa: F401  (loads the op library)


@contextlib.contextmanager
def override_for_testing(**knobs: str) -> Iterator[None]:
    """Set engine knobs by name (``rayleigh_ritz="eigh"``, ``gram_pass="0"``, ``cpu_policy="cuda"``,
    ...; "" = the default) for the ``with`` block, then put back the values they had. ValueError
    for an unknown knob or an invalid value."""
    previous: list[tuple[str, str]] = []
    try:
        for name, value in knobs.items():
            previous.append((name, torch.ops.loraport._testing_set_knob(name, str(value))))
        yield
    finally:
        for name, value in reversed(previous):
            torch.ops.loraport._testing_set_knob(name, value)
