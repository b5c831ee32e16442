"""Upgrade-path plumbing around `pipeline.port`: telling a new release of the same model from a
model of another size (Wan 2.1 1.3B -> Wan 2.2 TI2V-5B: every layer's shape differs, so there is
nothing to carry; refused in one line naming both widths, rather than a table of mismatches)."""

from __future__ import annotations

from collections import Counter

from .errors import InputError


def _width(shapes) -> int:
    """A model's hidden size from its layers' shapes: the most common input width."""
    return Counter(s[1] for s in shapes).most_common(1)[0][0]


def refuse_other_size(rows, lora_label: str, source_label: str, target_label: str) -> None:
    """InputError when every module found in both bases has another shape in the target (other
    than input channels added to a layer, which is padded): the bases are different models."""
    located = [r for r in rows if r.shape is not None and r.target_shape is not None]
    if not located or any(r.action != "shape-mismatch" for r in located):
        return
    first = located[0]
    ws, wt = _width([r.shape for r in located]), _width([r.target_shape for r in located])
    raise InputError(
        f"{lora_label}: the source base {source_label} has width {ws} and the target {target_label} width {wt} "
        f"(every layer's shape differs, e.g. {first.module} {first.shape} vs {first.target_shape}): "
        "a model of another size, not a release of the same one; nothing can be carried"
    )
