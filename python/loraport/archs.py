"""Key maps of the model families loraport knows: which modules of each architecture carry LoRA
adapters, under which names, and how the two naming styles of a family relate.

A family has one or two naming *styles*: "original" (the names of the authors' checkpoint:
Tencent's Hunyuan Video, BFL's Flux, Wan's own code, Stability's LDM UNet; kohya/Musubi,
ComfyUI/diffusion-pipe and Tencent LoRAs use them, except kohya SD 1.x LoRAs, which use diffusers
names) and "diffusers" (the names of the diffusers/transformers classes; used by diffusers/PEFT
LoRAs and diffusers folders; Llama-style LLMs have only this one). Names that are the same in
both styles (SD's CLIP text encoders) translate to themselves. Module names are written as templates where ``#`` stands for a block index. A `Rule` ties an
original module to its diffusers counterpart: a rename, or a fused original weight (Hunyuan's
``img_attn_qkv``, ``linear1``) whose output rows are split into several diffusers modules
(``attn.to_q/to_k/to_v`` and ``proj_mlp``) in the proportions ``units``, or a rename whose two
halves of output rows trade places (``final_layer.adaLN_modulation.1`` <-> ``norm_out.linear``:
(shift, scale) vs (scale, shift)); `Piece.arrange` applies that swap to a weight or an ``up``.

How fused/split layouts are handled (`translate`): a LoRA module keeps its own layout. A split LoRA
module (``attn.to_q``) on a base with the fused weight (``img_attn_qkv``) uses the matching row
slice of the fused weight as its base weight; a fused LoRA module on a base with split weights uses
the row concatenation of the split weights. Converting a LoRA between styles (writing a kohya file
as diffusers, say) splits a fused LoRA exactly (row slices of ``up``, ``down`` shared) or fuses
split parts exactly (block-diagonal ``up``, stacked ``down``: rank = sum of the parts' ranks);
see formats.convert_style.

Kohya-style names replace every '.' by '_' (``double_blocks_0_img_attn_qkv``), which is ambiguous
for names that contain '_'; `resolve_underscored` maps them back by matching the family's templates,
never by guessing. `detect` picks the family whose templates match most of the given names."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache, cached_property

import torch

from .errors import InputError

STYLES = ("original", "diffusers")
# Components of a model that LoRA files address separately. "model" is the denoiser (UNet or
# transformer) or the LLM; "te1"/"te2" are SD's text encoders.
COMPONENTS = ("model", "te1", "te2")


@dataclass(frozen=True)
class Rule:
    """original template <-> diffusers template(s); several diffusers parts split the original's
    output rows in proportions ``units`` (e.g. qkv -> q, k, v with units (1, 1, 1))."""

    original: str
    diffusers: tuple[str, ...]
    units: tuple[int, ...] = (1,)
    swap_halves: bool = False  # the two halves of the output rows are swapped between the styles


@dataclass(frozen=True)
class Piece:
    """Part of a module's base weight: rows [start, start + units) of ``total`` equal row units
    of the base tensor ``name`` (start=0, units=total=1: the whole tensor), with the two halves
    of those rows swapped when ``swap_halves`` (see `arrange`)."""

    name: str
    start: int = 0
    units: int = 1
    total: int = 1
    swap_halves: bool = False

    def arrange(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` [rows, ...] (a weight or a LoRA up factor) with its row halves swapped when
        ``swap_halves``: [a; b] -> [b; a]. The swap is its own inverse, so the same call maps
        either style's layout to the other's."""
        if not self.swap_halves:
            return t
        self._half(t.shape[0])
        first, second = t.chunk(2, 0)
        return torch.cat([second, first], 0)

    def placements(self, first: int, stop: int) -> list[tuple[int, slice]]:
        """Where rows [first, stop) of the base tensor land in ``arrange``'s layout, for reading
        them straight into place: (destination row offset, source rows) pairs."""
        if not self.swap_halves:
            return [(0, slice(first, stop))]
        half = self._half(stop - first)
        return [(half, slice(first, first + half)), (0, slice(first + half, stop))]

    def _half(self, n_rows: int) -> int:
        if n_rows % 2:
            raise ValueError(f"loraport: {self.name} has {n_rows} rows; its layout swaps two equal halves")
        return n_rows // 2

    def rows(self, n_rows: int) -> slice:
        if n_rows % self.total:
            raise ValueError(
                f"loraport: base weight {self.name} has {n_rows} rows, not divisible into "
                f"{self.total} equal units as its fused layout requires"
            )
        unit = n_rows // self.total
        return slice(self.start * unit, (self.start + self.units) * unit)


def _expand(template: str) -> list[str]:
    """Expand one level of {a,b,c} alternatives (repeatedly): "x.{q,k}" -> ["x.q", "x.k"]."""
    m = re.search(r"\{([^{}]*)\}", template)
    if not m:
        return [template]
    out = []
    for alt in m.group(1).split(","):
        out += _expand(template[: m.start()] + alt + template[m.end() :])
    return out


@cache  # compiled when a name first needs it: most templates of most families never are
def _regex(template: str, underscored: bool) -> re.Pattern:
    text = template.replace(".", "_") if underscored else template
    return re.compile("^" + re.escape(text).replace("\\#", "#").replace("#", r"(\d+)") + "$")


def _first_segment(name: str, underscored: bool) -> str:
    """The text before the first separator ('_' for kohya-style names, else '.')."""
    return (name.replace(".", "_") if underscored else name).split("_" if underscored else ".", 1)[0]


def _fill(template: str, digits: tuple[str, ...]) -> str:
    parts = template.split("#")
    return parts[0] + "".join(d + p for d, p in zip(digits, parts[1:], strict=True))


@dataclass(frozen=True)
class Arch:
    """One model family: its LoRA-able module templates per style and component."""

    name: str
    rules: tuple[Rule, ...] = ()
    # Templates with no counterpart in the other style: {style: {component: [templates]}}.
    extra: dict = field(default_factory=dict)
    diffusers_prefix: str = "transformer"  # component "model" in diffusers LoRA keys
    kohya_style: str = "original"  # style of kohya / comfy / tencent LoRA names
    # Original names that ComfyUI's LoRA loader does not map, with the ComfyUI module names that
    # the comfy format writes instead ('original -> comfy' lines, as in `_pairs`).
    comfy_names: tuple[Rule, ...] = ()

    @cached_property
    def _comfy_index(self) -> list[tuple[re.Pattern, str, re.Pattern, str]]:
        return [(_regex(r.original, False), r.diffusers[0], _regex(r.diffusers[0], False), r.original)
                for r in self.comfy_names]  # fmt: skip

    def to_comfy(self, name: str) -> str:
        """The module name a comfy-format LoRA uses for original-style module ``name``."""
        return self._comfy_rename(name, back=False)

    def from_comfy(self, name: str) -> str:
        """The inverse of `to_comfy`."""
        return self._comfy_rename(name, back=True)

    def _comfy_rename(self, name: str, back: bool) -> str:
        """``name`` through `comfy_names`: original -> comfy, or comfy -> original with ``back``."""
        for rx_original, comfy, rx_comfy, original in self._comfy_index:
            rx, template = (rx_comfy, original) if back else (rx_original, comfy)
            m = rx.match(name)
            if m:
                return _fill(template, m.groups())
        return name

    @property
    def styles(self) -> tuple[str, ...]:
        return STYLES if self.rules else ("diffusers",)

    @cached_property
    def templates(self) -> dict[str, dict[str, list[str]]]:
        """{style: {component: [expanded templates]}}."""
        out: dict[str, dict[str, list[str]]] = {s: {} for s in self.styles}
        for rule in self.rules:
            out["original"].setdefault("model", []).append(rule.original)
            out["diffusers"].setdefault("model", []).extend(rule.diffusers)
        for style, comps in self.extra.items():
            for comp, temps in comps.items():
                out[style].setdefault(comp, []).extend(t for tt in temps for t in _expand(tt))
        return out

    @cached_property
    def _buckets(self) -> dict[tuple[str, str, bool], dict[str, list[str]]]:
        """{(style, component, underscored): {first name segment: [template]}}: a name is only
        tried against the templates that start like it (SD has ~300 templates)."""
        out: dict = {}
        for style, comps in self.templates.items():
            for comp, temps in comps.items():
                for u in (False, True):
                    buckets = out.setdefault((style, comp, u), {})
                    for t in temps:
                        buckets.setdefault(_first_segment(t, u), []).append(t)
        return out

    @cached_property
    def _rule_index(self) -> list[tuple[Rule, re.Pattern, list[re.Pattern]]]:
        return [(r, _regex(r.original, False), [_regex(d, False) for d in r.diffusers]) for r in self.rules]

    def match(self, style: str, component: str, name: str, underscored: bool = False):
        """(template, block digits) of the template ``name`` instantiates, or None."""
        buckets = self._buckets.get((style, component, underscored), {})
        for template in buckets.get(_first_segment(name, underscored), ()):
            m = _regex(template, underscored).match(name)
            if m:
                return template, m.groups()
        return None

    def style_of(self, component: str, name: str) -> str | None:
        """The naming style a dotted module name belongs to (None: not a known module)."""
        for style in self.styles:
            if self.match(style, component, name):
                return style
        return None

    def base_style(self, module_names) -> str | None:
        """The naming style most of a base model's module names follow (None: none of them is a
        module of this architecture)."""
        names = list(module_names)
        hits = {s: sum(1 for n in names if self.match(s, "model", n)) for s in self.styles}
        style = max(hits, key=hits.get)
        return style if hits[style] else None

    def resolve_underscored(self, component: str, stem: str, style: str | None = None) -> str | None:
        """The dotted module name of a kohya-style name ('.' written as '_'), or None."""
        found = set()
        for s in (style,) if style else self.styles:
            hit = self.match(s, component, stem, underscored=True)
            if hit:
                found.add(_fill(*hit))
        if len(found) > 1:
            raise ValueError(f"loraport: {self.name}: '{stem}' matches several modules: {sorted(found)}")
        return found.pop() if found else None

    def translate(self, name: str, from_style: str, to_style: str) -> list[Piece] | None:
        """The base-weight pieces (in ``to_style`` names) whose row concatenation is the weight
        of module ``name`` (a ``from_style`` name); None when it has no counterpart."""
        if from_style == to_style:
            return [Piece(name)]
        for rule, rx_orig, rx_diff in self._rule_index:
            if from_style == "original":
                m = rx_orig.match(name)
                if m:
                    return [Piece(_fill(d, m.groups()), swap_halves=rule.swap_halves) for d in rule.diffusers]
            else:
                for i, rx in enumerate(rx_diff):
                    m = rx.match(name)
                    if m:
                        total = sum(rule.units)
                        start, units = sum(rule.units[:i]), rule.units[i]
                        return [Piece(_fill(rule.original, m.groups()), start, units, total, rule.swap_halves)]
        if self._shared(name, from_style, to_style):  # e.g. SD's text encoders: same names in both styles
            return [Piece(name)]
        return None

    def _shared(self, name: str, *styles: str) -> bool:
        """Whether ``name`` is a module name of every one of ``styles`` (any component)."""
        return all(any(self.match(s, comp, name) for comp in COMPONENTS) for s in styles)

    def split_parts(self, name: str) -> list[Piece] | None:
        """For an original-style fused module (``img_attn_qkv``): its diffusers parts, each with
        the rows of the fused weight it takes (start, units of total); None if not fused."""
        for rule, rx_orig, _ in self._rule_index:
            m = rx_orig.match(name)
            if m and len(rule.diffusers) > 1:
                total = sum(rule.units)
                return [
                    Piece(_fill(d, m.groups()), sum(rule.units[:i]), rule.units[i], total)
                    for i, d in enumerate(rule.diffusers)
                ]
        return None

    def fused_parent(self, name: str) -> tuple[str, int, Rule, tuple[str, ...]] | None:
        """(original fused name, part index, rule, digits) for a diffusers split-part name."""
        for rule, _, rx_diff in self._rule_index:
            if len(rule.diffusers) < 2:
                continue
            for i, rx in enumerate(rx_diff):
                m = rx.match(name)
                if m:
                    return _fill(rule.original, m.groups()), i, rule, m.groups()
        return None


def _pairs(lines: str) -> tuple[Rule, ...]:
    """Rules from lines 'original -> diffusers' (braces pair up alternatives one to one),
    'original -> diffusers swap halves' (a rename whose output row halves trade places) or
    'original -> part | part | ... units a,b,...' (a fused weight split into parts)."""
    rules = []
    for line in lines.strip().splitlines():
        orig, rest = (s.strip() for s in line.split("->"))
        if rest.endswith(" swap halves"):
            rules.append(Rule(orig, (rest.removesuffix(" swap halves"),), swap_halves=True))
            continue
        if "|" in rest:
            rest, units = rest.split(" units ")
            parts = tuple(p.strip() for p in rest.split("|"))
            rules.append(Rule(orig, parts, tuple(int(u) for u in units.split(","))))
            continue
        origs, diffs = _expand(orig), _expand(rest)
        if len(origs) != len(diffs):
            raise AssertionError(f"key map line pairs {len(origs)} names with {len(diffs)}: {line}")
        rules += [Rule(o, (d,)) for o, d in zip(origs, diffs, strict=True)]
    return tuple(rules)


# final_layer.adaLN_modulation.1 (Hunyuan, Flux): the original splits its output as (shift, scale),
# diffusers' AdaLayerNormContinuous (norm_out.linear) as (scale, shift); diffusers' conversion
# scripts swap the halves, so the rule does too. Every other modulation keeps its order.
_HUNYUAN_TOKEN_REFINER = "txt_in.individual_token_refiner.blocks.#"
_HUNYUAN_REFINER_D = "context_embedder.token_refiner.refiner_blocks.#"
HUNYUAN_VIDEO = Arch(
    "hunyuan-video",
    rules=_pairs(
        f"""
double_blocks.#.img_attn_qkv -> transformer_blocks.#.attn.to_q | transformer_blocks.#.attn.to_k | transformer_blocks.#.attn.to_v units 1,1,1
double_blocks.#.txt_attn_qkv -> transformer_blocks.#.attn.add_q_proj | transformer_blocks.#.attn.add_k_proj | transformer_blocks.#.attn.add_v_proj units 1,1,1
double_blocks.#.img_attn_proj -> transformer_blocks.#.attn.to_out.0
double_blocks.#.txt_attn_proj -> transformer_blocks.#.attn.to_add_out
double_blocks.#.img_mlp.{{fc1,fc2}} -> transformer_blocks.#.ff.{{net.0.proj,net.2}}
double_blocks.#.txt_mlp.{{fc1,fc2}} -> transformer_blocks.#.ff_context.{{net.0.proj,net.2}}
double_blocks.#.img_mod.linear -> transformer_blocks.#.norm1.linear
double_blocks.#.txt_mod.linear -> transformer_blocks.#.norm1_context.linear
single_blocks.#.linear1 -> single_transformer_blocks.#.attn.to_q | single_transformer_blocks.#.attn.to_k | single_transformer_blocks.#.attn.to_v | single_transformer_blocks.#.proj_mlp units 1,1,1,4
single_blocks.#.linear2 -> single_transformer_blocks.#.proj_out
single_blocks.#.modulation.linear -> single_transformer_blocks.#.norm.linear
img_in.proj -> x_embedder.proj
txt_in.input_embedder -> context_embedder.proj_in
txt_in.t_embedder.mlp.{{0,2}} -> context_embedder.time_text_embed.timestep_embedder.{{linear_1,linear_2}}
txt_in.c_embedder.{{linear_1,linear_2}} -> context_embedder.time_text_embed.text_embedder.{{linear_1,linear_2}}
{_HUNYUAN_TOKEN_REFINER}.self_attn_qkv -> {_HUNYUAN_REFINER_D}.attn.to_q | {_HUNYUAN_REFINER_D}.attn.to_k | {_HUNYUAN_REFINER_D}.attn.to_v units 1,1,1
{_HUNYUAN_TOKEN_REFINER}.self_attn_proj -> {_HUNYUAN_REFINER_D}.attn.to_out.0
{_HUNYUAN_TOKEN_REFINER}.mlp.{{fc1,fc2}} -> {_HUNYUAN_REFINER_D}.ff.{{net.0.proj,net.2}}
{_HUNYUAN_TOKEN_REFINER}.adaLN_modulation.1 -> {_HUNYUAN_REFINER_D}.norm_out.linear
time_in.mlp.{{0,2}} -> time_text_embed.timestep_embedder.{{linear_1,linear_2}}
vector_in.{{in_layer,out_layer}} -> time_text_embed.text_embedder.{{linear_1,linear_2}}
guidance_in.mlp.{{0,2}} -> time_text_embed.guidance_embedder.{{linear_1,linear_2}}
final_layer.linear -> proj_out
final_layer.adaLN_modulation.1 -> norm_out.linear swap halves
"""
    ),
    # ComfyUI builds Hunyuan Video from Flux's layers (comfy/ldm/hunyuan_video/model.py: MLPEmbedder
    # in_layer/out_layer for time_in, guidance_in and the token refiner's t_embedder/c_embedder) and
    # maps diffusion-pipe's Tencent names onto them by a few replacements (comfy/lora.py,
    # model_lora_keys_unet) that do not reach these embedders; its generic rule maps its own names.
    comfy_names=_pairs(
        """
time_in.mlp.{0,2} -> time_in.{in_layer,out_layer}
guidance_in.mlp.{0,2} -> guidance_in.{in_layer,out_layer}
txt_in.t_embedder.mlp.{0,2} -> txt_in.t_embedder.{in_layer,out_layer}
txt_in.c_embedder.{linear_1,linear_2} -> txt_in.c_embedder.{in_layer,out_layer}
"""
    ),
)

FLUX = Arch(
    "flux",
    rules=_pairs(
        """
double_blocks.#.img_attn.qkv -> transformer_blocks.#.attn.to_q | transformer_blocks.#.attn.to_k | transformer_blocks.#.attn.to_v units 1,1,1
double_blocks.#.txt_attn.qkv -> transformer_blocks.#.attn.add_q_proj | transformer_blocks.#.attn.add_k_proj | transformer_blocks.#.attn.add_v_proj units 1,1,1
double_blocks.#.img_attn.proj -> transformer_blocks.#.attn.to_out.0
double_blocks.#.txt_attn.proj -> transformer_blocks.#.attn.to_add_out
double_blocks.#.img_mlp.{0,2} -> transformer_blocks.#.ff.{net.0.proj,net.2}
double_blocks.#.txt_mlp.{0,2} -> transformer_blocks.#.ff_context.{net.0.proj,net.2}
double_blocks.#.img_mod.lin -> transformer_blocks.#.norm1.linear
double_blocks.#.txt_mod.lin -> transformer_blocks.#.norm1_context.linear
single_blocks.#.linear1 -> single_transformer_blocks.#.attn.to_q | single_transformer_blocks.#.attn.to_k | single_transformer_blocks.#.attn.to_v | single_transformer_blocks.#.proj_mlp units 1,1,1,4
single_blocks.#.linear2 -> single_transformer_blocks.#.proj_out
single_blocks.#.modulation.lin -> single_transformer_blocks.#.norm.linear
img_in -> x_embedder
txt_in -> context_embedder
time_in.{in_layer,out_layer} -> time_text_embed.timestep_embedder.{linear_1,linear_2}
vector_in.{in_layer,out_layer} -> time_text_embed.text_embedder.{linear_1,linear_2}
guidance_in.{in_layer,out_layer} -> time_text_embed.guidance_embedder.{linear_1,linear_2}
final_layer.linear -> proj_out
final_layer.adaLN_modulation.1 -> norm_out.linear swap halves
"""
    ),
)

WAN = Arch(
    "wan",
    rules=_pairs(
        """
blocks.#.self_attn.{q,k,v,o} -> blocks.#.attn1.{to_q,to_k,to_v,to_out.0}
blocks.#.cross_attn.{q,k,v,o} -> blocks.#.attn2.{to_q,to_k,to_v,to_out.0}
blocks.#.cross_attn.{k_img,v_img} -> blocks.#.attn2.{add_k_proj,add_v_proj}
blocks.#.ffn.{0,2} -> blocks.#.ffn.{net.0.proj,net.2}
patch_embedding -> patch_embedding
text_embedding.{0,2} -> condition_embedder.text_embedder.{linear_1,linear_2}
time_embedding.{0,2} -> condition_embedder.time_embedder.{linear_1,linear_2}
time_projection.1 -> condition_embedder.time_proj
head.head -> proj_out
img_emb.proj.{1,3} -> condition_embedder.image_embedder.ff.{net.0.proj,net.2}
"""
    ),
)

# SD 1.5 / SDXL UNets. "diffusers": UNet2DConditionModel names (kohya SD 1.x LoRAs use them too);
# "original": the LDM names of Stability's single-file checkpoints (under model.diffusion_model.),
# which kohya SDXL LoRAs use (sd-scripts' SDXL UNet keeps them). Down block i, layer j is
# input_blocks.{3i+j+1} (.0 resnet, .1 attention), its downsampler input_blocks.{3i+3}.0.op;
# up block i, layer j is output_blocks.{3i+j}, its upsampler output_blocks.{3i+2}.{1 or 2}.conv
# (2 when the block has attentions); middle_block.{0,1,2} = resnet 0, attention, resnet 1.
# Text encoders: Hugging Face CLIP names in both styles (kohya lora_te1_/lora_te2_ included).
_SD_ATTN = (
    "{proj_in,proj_out,transformer_blocks.#.attn1.to_q,transformer_blocks.#.attn1.to_k,"
    "transformer_blocks.#.attn1.to_v,transformer_blocks.#.attn1.to_out.0,transformer_blocks.#.attn2.to_q,"
    "transformer_blocks.#.attn2.to_k,transformer_blocks.#.attn2.to_v,transformer_blocks.#.attn2.to_out.0,"
    "transformer_blocks.#.ff.net.0.proj,transformer_blocks.#.ff.net.2}"
)
_SD_RES = "{in_layers.2,out_layers.3,emb_layers.1,skip_connection} -> {conv1,conv2,time_emb_proj,conv_shortcut}"


def _sd_unet_rules(down: tuple, up: tuple, sdxl: bool) -> tuple[Rule, ...]:
    """LDM <-> diffusers rules of a UNet whose down/up blocks are (has attentions, has a
    down/upsampler), with 2 layers per down block and 3 per up block."""
    ldm_res, diff_res = (t.strip() for t in _SD_RES.split("->"))
    lines = [
        "input_blocks.0.0 -> conv_in",
        "out.2 -> conv_out",
        "time_embed.{0,2} -> time_embedding.{linear_1,linear_2}",
    ]
    if sdxl:
        lines.append("label_emb.0.{0,2} -> add_embedding.{linear_1,linear_2}")
    for i, (attn, sampler) in enumerate(down):
        for j in range(2):
            lines.append(f"input_blocks.{3 * i + j + 1}.0.{ldm_res} -> down_blocks.{i}.resnets.{j}.{diff_res}")
            if attn:
                lines.append(f"input_blocks.{3 * i + j + 1}.1.{_SD_ATTN} -> down_blocks.{i}.attentions.{j}.{_SD_ATTN}")
        if sampler:
            lines.append(f"input_blocks.{3 * i + 3}.0.op -> down_blocks.{i}.downsamplers.0.conv")
    lines.append(f"middle_block.{{0,2}}.{ldm_res} -> mid_block.resnets.{{0,1}}.{diff_res}")
    lines.append(f"middle_block.1.{_SD_ATTN} -> mid_block.attentions.0.{_SD_ATTN}")
    for i, (attn, sampler) in enumerate(up):
        for j in range(3):
            lines.append(f"output_blocks.{3 * i + j}.0.{ldm_res} -> up_blocks.{i}.resnets.{j}.{diff_res}")
            if attn:
                lines.append(f"output_blocks.{3 * i + j}.1.{_SD_ATTN} -> up_blocks.{i}.attentions.{j}.{_SD_ATTN}")
        if sampler:
            lines.append(f"output_blocks.{3 * i + 2}.{2 if attn else 1}.conv -> up_blocks.{i}.upsamplers.0.conv")
    return _pairs("\n".join(lines))


_CLIP = [
    "text_model.encoder.layers.#.{self_attn.q_proj,self_attn.k_proj,self_attn.v_proj,self_attn.out_proj,mlp.fc1,mlp.fc2}"
]
_SD15_TE = {"te1": _CLIP}
SD15 = Arch(
    "sd15",
    rules=_sd_unet_rules(
        down=((True, True), (True, True), (True, True), (False, False)),
        up=((False, True), (True, True), (True, True), (True, False)),
        sdxl=False,
    ),
    extra={"original": _SD15_TE, "diffusers": _SD15_TE},
    diffusers_prefix="unet",
    kohya_style="diffusers",
)
_SDXL_TE = {"te1": _CLIP, "te2": _CLIP + ["text_projection"]}
SDXL = Arch(
    "sdxl",
    rules=_sd_unet_rules(
        down=((False, True), (True, True), (True, False)),
        up=((True, True), (True, True), (False, False)),
        sdxl=True,
    ),
    extra={"original": _SDXL_TE, "diffusers": _SDXL_TE},
    diffusers_prefix="unet",
    kohya_style="original",
)
LLAMA = Arch(
    "llama",
    extra={
        "diffusers": {
            "model": [
                "model.layers.#.self_attn.{q_proj,k_proj,v_proj,o_proj}",
                "model.layers.#.mlp.{gate_proj,up_proj,down_proj}",
                "lm_head",
            ]
        }
    },
    diffusers_prefix="",
    kohya_style="diffusers",
)

ARCHS: dict[str, Arch] = {a.name: a for a in (HUNYUAN_VIDEO, WAN, FLUX, SD15, SDXL, LLAMA)}


def get(name: str) -> Arch:
    try:
        return ARCHS[name]
    except KeyError:
        raise ValueError(f"loraport: unknown architecture {name!r}; known: {', '.join(ARCHS)}") from None


def _score(arch: Arch, names: list[tuple[str, str, bool]]) -> int:
    """How many (component, name, underscored) entries are modules of ``arch``."""
    hits = 0
    for comp, name, underscored in names:
        if any(arch.match(s, comp, name, underscored) for s in arch.styles):
            hits += 1
    return hits


def _sdxl_hint(names: list[tuple[str, str, bool]]) -> bool:
    """SDXL vs SD 1.5 share module names; SDXL has a second text encoder, add_embedding and
    more than one transformer block per attention."""
    for comp, name, _ in names:
        if comp == "te2" or "add_embedding" in name or re.search(r"transformer_blocks[._][1-9]", name):
            return True
    return False


def detect(lora_names: list[tuple[str, str, bool]], base_names: list[str] = ()) -> Arch:
    """The family whose templates match the most LoRA module names (component, name,
    underscored?) plus base-model weight names (component "model"); ties are broken by the base
    model's names, else reported as ambiguous."""
    base = [("model", n, False) for n in base_names]
    scores = {a.name: (_score(a, lora_names), _score(a, base)) for a in ARCHS.values()}
    if scores["sd15"] == scores["sdxl"]:  # same templates but SDXL's extras
        del scores["sdxl" if not _sdxl_hint(lora_names + base) else "sd15"]
    ranked = sorted(scores.items(), key=lambda kv: kv[1], reverse=True)
    (best, (lora_hits, base_hits)), rest = ranked[0], ranked[1:]
    if lora_hits == 0 and base_hits == 0:
        example = lora_names[0][1] if lora_names else (base_names[0] if base_names else "(no names)")
        raise ValueError(
            f"loraport: no known architecture has modules named like '{example}' "
            f"(known: {', '.join(ARCHS)}); pass arch= / --arch if it is one of them"
        )
    ties = [name for name, s in rest if s == (lora_hits, base_hits)]
    if ties:
        raise ValueError(
            f"loraport: cannot tell {best} from {', '.join(ties)} by the key names alone; "
            "pass arch= / --arch (or give the base model)"
        )
    return ARCHS[best]


def resolve(arch, label: str, lora_names=(), base_names=()) -> Arch:
    """``arch`` ("auto", a name or an Arch) as an Arch. "auto": `detect` from the LoRA's module
    names (component, name, underscored?) and the base model's weight names, and an InputError
    naming ``label`` (the file being read) when they match no family or several."""
    if isinstance(arch, Arch):
        return arch
    if arch != "auto":
        return get(arch)
    try:
        return detect(list(lora_names), list(base_names))
    except ValueError as e:
        raise InputError(f"{label}: {str(e).removeprefix('loraport: ')}") from None


def base_arch(base_names) -> str | None:
    """The family of a base model from its weight names alone, or None when they match no family
    or several (the caller then judges by its own key map)."""
    try:
        return detect([], list(base_names)).name
    except ValueError:
        return None
