"""Upgrade-path plumbing around `pipeline.port`: telling a new release of the same model from a
model of another size (Wan 2.1 1.3B -> Wan 2.2 TI2V-5B: every layer's shape differs, so there is
nothing to carry; refused in one line naming both widths, rather than a table of mismatches), and
porting onto every expert of a multi-expert release (Wan 2.2 A14B) with a strength per expert."""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Mapping

from .errors import InputError
from .reports import Action
from .strength import Strength


def _width(shapes) -> int:
    """A model's hidden size from its layers' shapes: the most common input width."""
    return Counter(s[1] for s in shapes).most_common(1)[0][0]


def refuse_other_size(rows, lora_label: str, source_label: str, target_label: str) -> None:
    """InputError when every module found in both bases has another shape in the target (other
    than input channels added to a layer, which is padded): the bases are different models."""
    located = [r for r in rows if r.shape is not None and r.target_shape is not None]
    if not located or any(r.action != Action.SHAPE_MISMATCH for r in located):
        return
    first = located[0]
    ws, wt = _width([r.shape for r in located]), _width([r.target_shape for r in located])
    raise InputError(
        f"{lora_label}: the source base {source_label} has width {ws} and the target {target_label} width {wt} "
        f"(every layer's shape differs, e.g. {first.module} {first.shape} vs {first.target_shape}): "
        "a model of another size, not a release of the same one; nothing can be carried"
    )


def expert_paths(out, experts) -> dict[str, str]:
    """{expert: output path}: ``out`` with ``{expert}`` replaced, or else with ``.expert`` before
    its suffix (``wan22.safetensors`` -> ``wan22.high.safetensors``, ``wan22.low.safetensors``)."""
    out = os.fspath(out)
    if "{expert}" in out:
        return {e: out.replace("{expert}", e) for e in experts}
    stem, suffix = os.path.splitext(out)
    return {e: f"{stem}.{e}{suffix or '.safetensors'}" for e in experts}


def port_experts(lora, source, targets, out=None, *, expert_strength=None, strength=None, report=None, **kw):
    """Port ``lora`` from ``source`` onto each expert of a multi-expert release (Wan 2.2 A14B:
    ``{"high": high-noise transformer, "low": low-noise transformer}``), one LoRA file per
    expert (`expert_paths`), each expert's ΔW scaled by ``expert_strength[expert]`` (default 1)
    on top of ``strength``. Returns {expert: PortReport}; ``report``: the JSON reports, named like
    the outputs. Nothing is renamed into place until every expert is ported (temporary files in
    the output folder), so a failure leaves no output. Other keywords: as `pipeline.port`.

    What loads the files: diffusers' Wan pipelines take each with ``load_lora_weights`` (written
    with ``format="diffusers"``, keys ``transformer.``): the high-noise expert's file as usual
    (``transformer``), the low-noise one's with ``load_into_transformer_2=True``, which loads
    ``transformer.`` keys into ``transformer_2``, so one file holding both experts' keys could
    not be loaded by it. ComfyUI: each file in a LoRA loader after its expert's model loader."""
    from .pipeline import port  # pipeline imports this module

    if not isinstance(targets, Mapping) or len(targets) < 1:
        raise InputError(f"loraport: targets must map expert names to base models, got {targets!r}")
    names = list(targets)
    strengths = dict(expert_strength or {})
    unknown = sorted(set(strengths) - set(names))
    if unknown:
        raise InputError(f"loraport: strength given for expert(s) {unknown}, but the experts are {names}")
    dry_run = kw.get("dry_run", False)
    if out is None and not dry_run:
        raise InputError("loraport: give out= (the output path; '{expert}' in it is replaced by the expert name)")
    finals = expert_paths(out, names) if out is not None else {}
    reports_at = expert_paths(report, names) if report is not None else {}
    base = Strength(strength)
    temps, reports = {}, {}
    try:
        for name in names:
            factor = Strength(strengths.get(name, 1.0)).default
            spec = [base.default * factor, *((p, v * factor) for p, v in base.rules)]
            tmp = None
            if not dry_run:
                final = os.path.abspath(finals[name])
                folder, filename = os.path.split(final)
                fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{filename}.", suffix=".safetensors")
                os.close(fd)
                temps[name] = tmp
            reports[name] = port(lora, source, targets[name], tmp, strength=spec, **kw)
        for name, tmp in temps.items():
            os.replace(tmp, finals[name])
            reports[name].out = os.path.abspath(finals[name])
            if reports[name].check is not None:  # checked under its temporary name
                reports[name].check["lora"] = reports[name].out
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.remove(tmp)
    for name, path in reports_at.items():
        reports[name].to_json(path)
    return reports


def parse_targets(values: list[str]):
    """The CLI's ``--target`` values: one plain path (a single target), or NAME=PATH for each
    expert ({name: path}); InputError for a mix, a repeated name or several plain paths."""
    if len(values) == 1 and (os.path.exists(values[0]) or "=" not in values[0]):
        return values[0]
    experts = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path or os.path.exists(v):
            raise InputError(
                f"loraport: --target {v!r}: with several targets, write each as EXPERT=PATH (e.g. high=...)"
            )
        if name in experts:
            raise InputError(f"loraport: --target: expert {name!r} given twice")
        experts[name] = path
    return experts


def parse_expert_strengths(values) -> dict[str, float]:
    """``--expert-strength NAME=S`` values -> {name: S}."""
    out = {}
    for v in values or ():
        name, sep, value = v.partition("=")
        if not sep or not name:
            raise InputError(f"loraport: --expert-strength {v!r}: write EXPERT=S (e.g. high=3)")
        out[name] = Strength(value).default
    return out
