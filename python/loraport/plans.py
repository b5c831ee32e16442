"""A LoRA's modules mapped onto two bases, before anything is computed: each module's weight
located in each base (`locate`: the key map's pieces, row slices and shape), the bases' naming
styles (`base_styles`, InputError for a base of another architecture) and, per module, a `Plan`
with the action its shapes allow (`plan_module`). port, port-many (loraport.catalog), check and
convert build on these."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import adapters, archs, formats, gate
from .basemodel import BaseModel
from .cache import SubspaceCache
from .errors import InputError
from .options import PortOptions
from .reports import Action, LayerRow


@dataclass
class Plan:
    """One LoRA module mapped onto both bases."""

    module: formats.LoraModule | None  # None: a layer whose subspaces are only cached (`fill_cache`)
    row: LayerRow
    component: str = "model"  # the module's component: "model", "te1", "te2"
    src_pieces: list = field(default_factory=list)  # [(base name, row slice, archs.Piece)]
    tgt_pieces: list = field(default_factory=list)
    src_shape: tuple = ()
    tgt_shape: tuple = ()
    result: formats.LoraModule | None = None  # the ported or copied module

    def pieces(self, side: str) -> list:
        """[(base name, row slice, archs.Piece)] of the ``side`` ("source" / "target") weight."""
        return self.src_pieces if side == "source" else self.tgt_pieces

    def gated_channels(self, side: str) -> int | None:
        """For the target weight of a layer that gained input channels: the old channel count, the
        part its subspaces are taken from (the LoRA acts on those channels only; a target whose new
        channels dominate its spectrum, as Flux Fill's x_embedder with 320 new of 384, would
        otherwise fail the gate for a layer whose old channels barely moved). None: all channels."""
        if side == "target" and self.src_shape[1] < self.tgt_shape[1]:
            return self.src_shape[1]
        return None

    def cache_key(self, side: str, fingerprint: str, options: PortOptions) -> str:
        """The subspace cache key of one side ("source" / "target") of a planned layer."""
        shape = self.tgt_shape
        m, n = shape[0], math.prod(shape[1:])
        k = options.subspace_rank_for(m, n)
        svd = {**options.svd(), "block_size": options.krylov_block(k, m, n), "products": gate.FIRST_PRODUCTS,
               "start": gate.START, "width": gate.SKETCH_WIDTH}  # fmt: skip
        return SubspaceCache.key(
            fingerprint, self.component, self.pieces(side), shape[1], k, svd, kept_channels=self.gated_channels(side),
            kind="gate-sketch" if options.default_gate else "subspaces",
        )  # fmt: skip


def locate(arch, m: formats.LoraModule, style: str, base: BaseModel, base_style: str):
    """([(name, rows, archs.Piece)], shape) of the module's weight in ``base``, or (None, why)."""
    pieces = arch.translate(m.name, style, base_style)
    if pieces is None:
        return None, f"no {base_style}-style counterpart in the key map"
    out, rows_total, rest = [], 0, None
    for p in pieces:
        name = p.name + ".weight"
        if not base.has(m.component, name):
            return None, f"{base.label} has no '{name}'"
        shape = base.shape(m.component, name)
        try:
            rows = p.rows(shape[0])
        except ValueError as e:
            return None, str(e)
        if rest is not None and tuple(shape[1:]) != rest:
            return None, f"split weights of {m.name} differ in input shape"
        rest = tuple(shape[1:])
        out.append((name, rows if p.total > 1 else None, p))
        rows_total += rows.stop - rows.start
    return out, (rows_total, *rest)


def base_styles(lf: formats.LoraFile, src: BaseModel, tgt: BaseModel, forced: bool = False) -> dict[str, str]:
    """The naming style of each base; InputError when a base is of another architecture (with
    ``forced``, the arch was the caller's --arch, and the message says so rather than call the
    LoRA by it)."""
    a, styles = lf.arch, {}
    for which, base in (("source", src), ("target", tgt)):
        base_arch = archs.base_arch(base.module_names()) or a.name  # else judged by the template match below
        if base_arch != a.name and {base_arch, a.name} != {"sd15", "sdxl"}:
            if forced:
                raise InputError(
                    f"{lf.label}: read with --arch {a.name}, but the {which} base {base.label} is a {base_arch} "
                    "model; leave --arch out to detect the LoRA's architecture"
                )
            raise InputError(f"{lf.label}: a {a.name} LoRA, but the {which} base {base.label} is a {base_arch} model")
        styles[which] = a.base_style(base.module_names())
        if styles[which] is None:
            example = next(iter(base.names()), "(no tensors)")
            raise InputError(
                f"{base.label}: the {which} base has no {a.name} weights (first tensor '{example}') "
                f"but {lf.label} is a {a.name} LoRA"
            )
    return styles


def plan_module(m: formats.LoraModule, lf: formats.LoraFile, src: BaseModel, tgt: BaseModel, styles) -> Plan:
    """Map one module onto both bases and decide from the shapes what can be done with it."""
    row = LayerRow(m.key, m.name, Action.PLANNED, m.rank)
    plan = Plan(m, row, m.component)
    if not m.known:
        row.action, row.note = Action.UNKNOWN, f"not a module of the {lf.arch.name} key map"
        return plan
    sp, sshape = locate(lf.arch, m, lf.style, src, styles["source"])
    tp, tshape = locate(lf.arch, m, lf.style, tgt, styles["target"])
    if sp is None or tp is None:
        row.action, row.note = Action.MISSING, (sshape if sp is None else tshape)
        return plan
    plan.src_pieces, plan.tgt_pieces, plan.src_shape, plan.tgt_shape = sp, tp, sshape, tshape
    row.shape, row.target_shape = list(sshape), list(tshape)
    if not m.fits(sshape):
        raise InputError(
            f"{lf.label}: module '{m.key}' is {list(m.shape)} (up rows, down input dims) but "
            f"the source weight is {list(sshape)} in {src.label}: LoRA and source base do not match"
        )
    if tshape != sshape:
        widened = tshape[0] == sshape[0] and tshape[2:] == sshape[2:] and tshape[1] > sshape[1]
        refusal = adapters.pad_refusal(m, sshape, tshape) if widened and adapters.is_adapter(m) else None
        if not widened:
            row.action, row.note = Action.SHAPE_MISMATCH, f"source {list(sshape)} vs target {list(tshape)}"
        elif refusal:
            row.action, row.note = Action.REFUSED, f"input channels {sshape[1]} -> {tshape[1]}: {refusal}"
        else:
            row.note = f"input channels {sshape[1]} -> {tshape[1]}: new channels zero in the input LoRA"
    return plan
