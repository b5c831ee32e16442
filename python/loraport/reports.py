"""What a run tells its caller: one row per layer and the run's facts. `PortReport` (loraport.port)
and `ToolReport` (resize, extract, merge, convert) share `Report`: the action counts, the JSON
document (formats.report_json: the report's fields, ``summary`` and one ``layers`` entry per row)
and the per-layer lines of the table. A row's action is an `Action`, a str whose value is what
the JSON report and the table say."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from . import formats
from .gate import BORDERLINE


class Action(str, enum.Enum):
    """What happened to one layer; the value is the string in reports."""

    # port
    PLANNED = "planned"  # mapped onto both bases, not computed (yet, or in a dry run)
    PORTED = "ported"
    PADDED = "padded"  # ported onto a target weight with more input channels
    COPIED = "copied"  # failed the gate, carried unchanged (on_dissimilar="copy")
    SKIPPED = "skipped"  # failed the gate, left out
    REFUSED = "refused"  # an adapter type that cannot be padded exactly
    UNKNOWN = "unknown"  # not in the arch's key map
    # port and the toolbox
    MISSING = "missing"
    SHAPE_MISMATCH = "shape-mismatch"
    # the toolbox
    RESIZED = "resized"
    MERGED = "merged"
    CONCATENATED = "concatenated"
    EXTRACTED = "extracted"
    CONVERTED = "converted"
    UNCHANGED = "unchanged"  # extract: the tuned weight (nearly) equals the base's

    __str__ = str.__str__  # "ported", not "Action.PORTED", in messages and tables
    __format__ = str.__format__


@dataclass
class Report:
    """The parts every run report has: ``rows`` (each with ``module``, ``action``, ``note``) and,
    in subclasses, ``settings``, ``seconds`` and ``bytes_read``."""

    rows: list

    def counts(self) -> dict[str, int]:
        """Layers per action (plain strings, in order of first appearance)."""
        counts: dict[str, int] = {}
        for r in self.rows:
            counts[str(r.action)] = counts.get(str(r.action), 0) + 1
        return counts

    def summary(self) -> dict:
        """Totals: layers, actions, the subclass's `details`, GB read and the time split."""
        return {
            "layers": len(self.rows),
            "actions": self.counts(),
            **self.details(),
            "gb_read": self.bytes_read / 1e9,
            "seconds": self.seconds,
        }

    def details(self) -> dict:
        return {}

    def protected(self) -> list[str]:
        """The inputs the JSON report is never written over."""
        return []

    def to_json(self, path=None) -> str:
        """The report as JSON (written atomically to ``path`` when given, never over an input)."""
        return formats.report_json(self, path, protect=self.protected())

    @staticmethod
    def row_line(r, detail: str = "") -> str:
        """One layer in the table: its action, module, ``detail`` and note."""
        return f"  {r.action:<14} {r.module}{detail} {r.note}".rstrip()


@dataclass
class LayerRow:
    """What happened to one LoRA module."""

    name: str  # key stem in the LoRA file
    module: str  # module name (LoRA's naming style)
    action: Action | str  # ported | padded | copied | skipped | refused | shape-mismatch | missing | unknown | planned
    rank_in: int
    rank_out: int | None = None
    shape: list[int] | None = None  # source base weight [out, in, *kernel]
    target_shape: list[int] | None = None
    subspace_rank: list[int] | None = None  # [k_source, k_target]
    similarity: float | None = None  # mean of left and right subspace similarity (loraport.gate)
    similarity_left: float | None = None
    similarity_right: float | None = None
    margin: float | None = None  # the gate's margin, >= 0 passes: gate.margin
    gate_products: int | None = None  # the default gate's products over each weight (0: identical weights)
    rel_change: float | None = None  # ‖ΔW_out − ΔW_in‖_F / ‖ΔW_in‖_F
    note: str = ""
    subspaces_from_cache: int = 0  # 0, 1 or 2 of [source, target] read from the subspace cache


@dataclass
class PortReport(Report):
    """`port`'s rows (LayerRow) plus run facts; `summary()` for totals, `to_json()` for files."""

    arch: str
    format_in: str
    format_out: str | None
    lora: str
    source: str
    target: str
    out: str | None
    settings: dict  # the port's options (options.PortOptions, as a dict)
    seconds: dict = field(default_factory=dict)  # read, svd, project, write, total
    bytes_read: int = 0
    check: dict | None = None  # the output checked against the target's loader (loraport.check)

    def protected(self) -> list[str]:
        return [self.lora, self.source, self.target]

    def details(self) -> dict:
        sims = sorted(r.similarity for r in self.rows if r.similarity is not None)
        changes = [r.rel_change for r in self.rows if r.rel_change is not None]
        ranks: dict[str, int] = {}  # "r_in -> r_out" -> layers
        for r in self.rows:
            if r.rank_out is not None:
                ranks[f"{r.rank_in} -> {r.rank_out}"] = ranks.get(f"{r.rank_in} -> {r.rank_out}", 0) + 1
        return {
            "similarity_mean": sum(sims) / len(sims) if sims else None,
            "similarity_median": (sims[(len(sims) - 1) // 2] + sims[len(sims) // 2]) / 2 if sims else None,
            "similarity_min": sims[0] if sims else None,
            "rel_change_mean": sum(changes) / len(changes) if changes else None,
            "rel_change_max": max(changes) if changes else None,
            "ranks": ranks,
            "borderline": [r.module for r in self.rows if r.margin is not None and abs(r.margin) < BORDERLINE],
            "layers_from_cache": sum(1 for r in self.rows if r.subspaces_from_cache == 2),
            "subspaces_from_cache": sum(r.subspaces_from_cache for r in self.rows),
        }

    def table(self) -> str:
        """The human-readable summary: a totals line, a table (actions, similarity, ranks, time
        split, read throughput, cache use), then every layer that was not ported."""
        s, sec = self.summary(), self.seconds
        acts = ", ".join(f"{n} {a}" for a, n in sorted(s["actions"].items(), key=lambda x: -x[1]))
        lines = [f"{s['layers']} layers: {acts}"]
        rows = [(a, f"{n} layers") for a, n in sorted(s["actions"].items(), key=lambda x: -x[1])]
        if "variant" in self.settings:
            rows.append(("variant", variant_line(self.settings)))
        strength = self.settings.get("strength")
        if strength and (strength["default"] != 1.0 or strength["rules"]):
            rules = "".join(f", {v:g} where /{p}/ matches" for p, v in strength["rules"])
            rows.append(("strength", f"ΔW × {strength['default']:g}{rules} (the last matching rule wins)"))
        if s["similarity_mean"] is not None:
            rows.append(
                ("similarity", f"min {s['similarity_min']:.3f}  median {s['similarity_median']:.3f}  "
                 f"mean {s['similarity_mean']:.3f}")
            )  # fmt: skip
        if s["borderline"]:
            rows.append(("borderline", f"{len(s['borderline'])} layers within {BORDERLINE} of the threshold: "
                         + ", ".join(s["borderline"])))  # fmt: skip
        if s["rel_change_max"]:  # a projection or truncation changed ΔW: say by how much
            rows.append(("ΔW changed by", f"mean {s['rel_change_mean']:.3f}  max {s['rel_change_max']:.3f} "
                         "(‖ΔW_out − ΔW_in‖_F / ‖ΔW_in‖_F per layer)"))  # fmt: skip
        if s["ranks"]:
            rows.append(("rank in -> out", ", ".join(f"{k} ({n})" for k, n in sorted(s["ranks"].items()))))
        ks = [r.subspace_rank for r in self.rows if r.subspace_rank]
        if ks:
            spans = [sorted({k[i] for k in ks}) for i in (0, 1)]
            rows.append(("subspace rank", ", ".join(
                f"{side} {v[0]}" + (f"..{v[-1]}" if len(v) > 1 else "") for side, v in zip(("source", "target"), spans)
            )))  # fmt: skip
        if "total" in sec:
            parts = "  ".join(f"{name} {sec.get(name, 0.0):.2f}" for name in ("read", "svd", "project", "write", "cache"))
            rows.append(("seconds", f"total {sec['total']:.2f} = {parts} (reading overlaps compute)"))
        gb = s["gb_read"]
        rate = f", {gb / sec['read']:.3g} GB/s while reading" if gb and sec.get("read") else ""
        overall = f", {gb / sec['total']:.3g} GB/s over the port" if gb and sec.get("total") else ""
        amount = f"{gb:.2f} GB" if gb >= 1 else f"{gb * 1e3:.3g} MB"
        rows.append(("base weights", f"{amount} read{rate}{overall}"))
        if self.settings.get("cache_dir"):
            rows.append(("subspace cache", f"{s['layers_from_cache']} layers from the cache "
                         f"({s['subspaces_from_cache']} subspaces) in {self.settings['cache_dir']}"))  # fmt: skip
        width = max(len(name) for name, _ in rows)
        lines += [f"  {name:<{width}}  {value}" for name, value in rows]
        if self.check is not None:
            c = self.check
            lines.append(f"  loads: {c['keys'] - len(c['unconsumed'])} of {c['keys']} keys consumed, "
                         f"{len(c['misfits'])} misfits ({c['method']})" + (f"; {c['error']}" if c["error"] else ""))  # fmt: skip
            lines += [f"  unconsumed  {k}" for k in c["unconsumed"]]
        others = [r for r in self.rows if r.action not in (Action.PORTED, Action.PLANNED)]
        if others:
            lines.append(f"not ported or changed ({len(others)}):")
        for r in others:
            sim = f" similarity {r.similarity:.3f}" if r.similarity is not None else ""
            sim += f" (margin {r.margin:+.3f})" if r.margin is not None else ""
            lines.append(self.row_line(r, sim))
        return "\n".join(lines)


def variant_line(settings: dict) -> str:
    """What a ported layer gets, in words, for the summary table."""
    variant, rank = settings["variant"], settings["rank"]
    if variant == "copy":
        what = "the LoRA's ΔW kept" + (f" (its best rank-{rank} factors where r > {rank})" if rank else "")
    else:
        what = "ΔW projected onto the subspaces" + (f" (at most rank {rank})" if rank else "")
    other = "skipped" if settings["on_dissimilar"] == "skip" else "copied unchanged"
    t = settings["min_similarity"]
    return f"{variant}: {what} where similarity >= {t} and each side >= {t / 2:g}, else {other}"


@dataclass
class ToolRow:
    """What happened to one layer in a toolbox job."""

    module: str  # module name (the output's naming style)
    action: Action | str  # resized | merged | concatenated | extracted | converted | unchanged | missing | shape-mismatch
    rank_in: int | None = None  # input rank (merge: sum of the inputs' ranks)
    rank_out: int | None = None
    shape: list[int] | None = None  # the layer's weight [out, in, *kernel]
    energy: float | None = None  # fraction of ‖ΔW_in‖_F² the output keeps
    rel_error: float | None = None  # ‖ΔW_out − ΔW_in‖_F / ‖ΔW_in‖_F
    rel_diff: float | None = None  # extract: ‖W_tuned − W_base‖_F / ‖W_base‖_F
    seconds: float = 0.0  # this layer's share of its batch's decomposition time
    note: str = ""


@dataclass
class ToolReport(Report):
    """A toolbox job's rows (ToolRow) plus run facts; `summary()` for totals, `to_json()` for
    files, `table()` for people."""

    job: str  # resize | extract | merge | convert
    arch: str
    format_out: str
    inputs: list[str]
    out: str
    settings: dict  # the job's options (options.ToolOptions.settings())
    seconds: dict = field(default_factory=dict)
    bytes_read: int = 0

    def protected(self) -> list[str]:
        return list(self.inputs)

    def details(self) -> dict:
        ranks = [r.rank_out for r in self.rows if r.rank_out is not None]
        errors = [r.rel_error for r in self.rows if r.rel_error is not None]
        energies = [r.energy for r in self.rows if r.energy is not None]
        return {
            "rank_min": min(ranks) if ranks else None,
            "rank_max": max(ranks) if ranks else None,
            "rel_error_mean": sum(errors) / len(errors) if errors else None,
            "rel_error_max": max(errors) if errors else None,
            "energy_min": min(energies) if energies else None,
        }

    def table(self) -> str:
        """One line per layer that was not processed normally, then the totals."""
        unusual = (Action.UNCHANGED, Action.MISSING, Action.SHAPE_MISMATCH)
        lines = [self.row_line(r) for r in self.rows if r.note or r.action in unusual]
        s = self.summary()
        acts = ", ".join(f"{n} {a}" for a, n in sorted(s["actions"].items()))
        ranks = "" if s["rank_min"] is None else f"; rank {s['rank_min']}" + (
            f"-{s['rank_max']}" if s["rank_max"] != s["rank_min"] else ""
        )
        err = "" if s["rel_error_max"] is None else (
            f"; relative error mean {s['rel_error_mean']:.4g}, max {s['rel_error_max']:.4g}"
        )
        secs = self.seconds.get("total")
        read = f"; {s['gb_read']:.3f} GB read" if self.bytes_read else ""
        tail = f" in {secs:.1f} s" if secs is not None else ""
        lines.append(f"{self.job}: {s['layers']} layers: {acts}{ranks}{err}{read}{tail}")
        return "\n".join(lines)
