"""LoRA files in, LoRA files out: reads the on-disk layouts people use (kohya/Musubi, Tencent's
Hunyuan I2V prefix, diffusers, PEFT, ComfyUI/diffusion-pipe) into one in-memory form, `LoraFile`
(a list of `LoraModule`: component, module name, up/down factors, alpha), and writes it back in
the input's format or another one, atomically.

Conventions. A module's update is ΔW = scale · up @ down with scale = alpha / rank, or 1 when the
file stores no alpha (diffusers/PEFT files without adapter metadata). PEFT's alpha comes from
``adapter_config.json`` beside the file or from the header's ``lora_adapter_metadata`` JSON
(``lora_alpha``, ``alpha_pattern``, ``use_rslora``). Conv layers keep their kernel dims
(down [r, in, *kernel], up [out, r, 1, ...]). Kohya-style names ('.' written as '_') are resolved
with the architecture's key map (archs.py). Writers: kohya/Tencent always store an alpha (rank
when the module has none, so scale = 1); diffusers/PEFT have no per-module alpha, so a scale != 1
is folded into ``up`` (and the header's ``lora_adapter_metadata``, if any, is set to scale 1);
ComfyUI stores ``.alpha`` when the module has one. Header metadata is kept, ``ss_network_dim`` and
``ss_network_alpha`` updated. Writes go to a temporary file in the output's folder, then
os.replace; an input is never overwritten. LoHa, LoKr, DoRA, Tucker (lora_mid) and full-weight
diffs are read into adapters.AdapterModule (loraport/adapters.py) and written back in their type."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace

import torch
from safetensors import safe_open

from . import adapters, archs
from .errors import InputError, brief
from .finite import all_finite
from .outfiles import atomic_write, check_not_input, check_output, save_safetensors  # noqa: F401  (formats.* API)

FORMATS = ("kohya", "tencent", "diffusers", "peft", "comfy")

# (format, key prefix, component, names written with '_'); longest prefixes first.
_PREFIXES = (
    ("tencent", "Hunyuan_video_I2V_lora_", "model", True),
    ("kohya", "lora_unet_", "model", True),
    ("kohya", "lora_te1_", "te1", True),
    ("kohya", "lora_te2_", "te2", True),
    ("kohya", "lora_te_", "te1", True),
    ("comfy", "diffusion_model.", "model", False),
    ("peft", "base_model.model.", "model", False),
    ("diffusers", "text_encoder_2.", "te2", False),
    ("diffusers", "text_encoder.", "te1", False),
    ("diffusers", "transformer.", "model", False),
    ("diffusers", "unet.", "model", False),
)
_FACTORS = {
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".alpha": "alpha",
}
ADAPTER_METADATA_KEY = "lora_adapter_metadata"


@dataclass
class LoraModule:
    """One adapted layer: ΔW = scale · up @ down (conv: over the flattened kernel)."""

    component: str  # "model" (denoiser / LLM), "te1", "te2"
    name: str  # dotted module name in the LoRA's naming style; the raw stem when not `known`
    up: torch.Tensor  # [out, r] or conv [out, r, 1, ...]
    down: torch.Tensor  # [r, in] or conv [r, in, *kernel]
    alpha: float | None  # None: scale 1
    key: str  # key stem in the file (for messages), e.g. "lora_unet_double_blocks_0_img_attn_qkv"
    known: bool = True  # name found in the architecture's key map

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.down.shape[2:])

    @property
    def shape(self) -> tuple[int, ...]:
        """(out, in, *kernel) of the adapted weight."""
        return (self.up.shape[0], *self.down.shape[1:])

    def fits(self, weight_shape) -> bool:
        """Whether this module adapts a weight of ``weight_shape`` [out, in, *kernel]."""
        return tuple(weight_shape) == self.shape

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(up [out, r], down [r, in·prod(kernel)]) in float32 with the scale folded into up."""
        return self.up.flatten(1).float() * self.scale, self.down.flatten(1).float()


@dataclass
class LoraFile:
    """A LoRA in memory: its modules, where it came from and how it was stored."""

    modules: list[LoraModule]
    format: str  # one of FORMATS
    arch: archs.Arch
    style: str  # naming style of the module names ("original" / "diffusers")
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors header metadata
    path: str | None = None  # None for an in-memory state dict
    adapter_config: dict | None = None  # PEFT adapter_config.json, when one came with the file

    @property
    def label(self) -> str:
        return self.path or "<state dict>"


def _prefix_of(key: str):
    for entry in _PREFIXES:
        if key.startswith(entry[1]):
            return entry
    return None


def detect_format(keys, label: str = "<state dict>") -> str:
    """The format of a LoRA state dict from its key prefixes; InputError if none or mixed."""
    found = {}
    for key in keys:
        entry = _prefix_of(key)
        if entry is None:
            raise InputError(
                f"{label}: tensor '{key}' has no known LoRA key prefix ({', '.join(p[1] for p in _PREFIXES)})"
            )
        found.setdefault(entry[0], key)
    if not found:
        raise InputError(f"{label}: no tensors")
    if len(found) > 1:
        raise InputError(f"{label}: mixes LoRA formats: " + ", ".join(f"{f} ('{k}')" for f, k in found.items()))
    return next(iter(found))


def _load(src) -> tuple[dict[str, torch.Tensor], dict[str, str], str | None]:
    if isinstance(src, Mapping):
        return dict(src), {}, None
    path = os.fspath(src)
    if os.path.isdir(path):
        inside = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))[:3]
        hint = f" (it holds {', '.join(inside)})" if inside else ""
        raise InputError(f"{path}: is a folder; give the LoRA's .safetensors file{hint}")
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt / truncated files
        raise InputError(f"{path}: not a readable safetensors file ({brief(e)})") from None
    return tensors, metadata, path


def _peft_config(metadata: dict[str, str], path: str | None, prefix: str) -> dict | None:
    """The PEFT LoraConfig dict from adapter_config.json beside ``path`` or the header metadata
    (keys optionally prefixed with the diffusers component, e.g. "transformer.lora_alpha")."""
    if path is not None:
        cfg_path = os.path.join(os.path.dirname(os.path.abspath(path)), "adapter_config.json")
        if os.path.isfile(cfg_path):
            try:
                with open(cfg_path, "rb") as f:
                    cfg = json.loads(f.read())
            except (OSError, ValueError, RecursionError) as e:
                raise InputError(f"{cfg_path}: unreadable adapter config ({brief(e)})") from None
            return _checked_config(cfg, cfg_path)
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if raw is None:
        return None
    where = f"{path or '<state dict>'}: header metadata '{ADAPTER_METADATA_KEY}'"
    try:
        cfg = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise InputError(f"{where} is not JSON ({brief(e)})") from None
    cfg = _checked_config(cfg, where)
    return {k[len(prefix) + 1 :] if prefix and k.startswith(prefix + ".") else k: v for k, v in cfg.items()}


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _checked_config(cfg, where: str) -> dict:
    """``cfg`` after checking the fields the reader uses: an object, with a numeric lora_alpha
    and an alpha_pattern of numbers keyed by valid patterns (any of them may carry a diffusers
    component prefix); InputError naming ``where`` otherwise."""
    if not isinstance(cfg, dict):
        raise InputError(f"{where}: the adapter config is a JSON {type(cfg).__name__}, not an object")
    for key, value in cfg.items():
        field = key.rsplit(".", 1)[-1]
        if field == "lora_alpha" and not _is_number(value):
            raise InputError(f"{where}: '{key}' must be a finite number, got {value!r:.60}")
        if field == "alpha_pattern" and value is not None:
            if not isinstance(value, dict) or not all(_is_number(v) for v in value.values()):
                raise InputError(f"{where}: '{key}' must map module patterns to numbers, got {value!r:.60}")
            for pattern in value:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise InputError(f"{where}: '{key}' holds an invalid pattern {pattern!r:.60} ({e})") from None
    return cfg


def _peft_alpha(cfg: dict | None, name: str, rank: int, label: str) -> float | None:
    if not cfg or "lora_alpha" not in cfg:
        return None
    if cfg.get("use_dora"):
        raise InputError(f"{label}: unsupported adapter type DoRA (use_dora in the adapter config)")
    alpha = float(cfg["lora_alpha"])
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){re.escape(pattern)}$", name) or re.fullmatch(pattern, name):
            alpha = float(value)
    # rsLoRA scales by alpha / sqrt(r); express it as an alpha over r.
    return alpha * math.sqrt(rank) if cfg.get("use_rslora") else alpha


def read_lora(src, *, arch="auto", base_names=()) -> LoraFile:
    """Read a LoRA (a safetensors path or a state dict) into a LoraFile. ``arch``: "auto", a
    name or an archs.Arch; ``base_names``: weight names of the base model, used to break ties
    when detecting the architecture."""
    tensors, metadata, path = _load(src)
    label = path or "<state dict>"
    fmt = detect_format(tensors, label)

    factors = adapters.suffixes(fmt) if adapters.is_adapter_file(tensors) else _FACTORS
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        suffix = next((s for s in factors if key.endswith(s)), None)
        if suffix is None:
            raise InputError(f"{label}: tensor '{key}' is not a LoRA factor ({', '.join(factors)})")
        if not all_finite(t):
            raise InputError(f"{label}: tensor '{key}' contains NaN or Inf")
        group = groups.setdefault(key[: -len(suffix)], {})
        if factors[suffix] in group:  # e.g. both .lora_A and .lora_down: which one is meant?
            raise InputError(f"{label}: tensors '{group[factors[suffix]][0]}' and '{key}' are the same factor of one module")
        group[factors[suffix]] = (key, t)

    parsed = []  # (component, name-as-in-file, underscored, stem, parts)
    for stem, parts in groups.items():
        _, prefix, comp, underscored = _prefix_of(stem)
        for need in ("up", "down") if set(parts) <= {"up", "down", "alpha"} else ():
            if need not in parts:
                raise InputError(f"{label}: module '{stem}' has no {need} factor")
        parsed.append((comp, stem[len(prefix) :], underscored, stem, parts))

    forced = arch != "auto"
    arch = archs.resolve(arch, label, [(c, n, u) for c, n, u, *_ in parsed], base_names)
    if forced:
        _check_forced_arch(arch, parsed, base_names, label)

    if parsed[0][2]:  # kohya-style names: the style most of them resolve in, ties to the usual one
        hits = {s: sum(arch.match(s, c, n, u) is not None for c, n, u, *_ in parsed) for s in arch.styles}
        style = max(arch.styles, key=lambda s: (hits[s], s == arch.kohya_style))
    else:
        votes = [arch.style_of(c, n) for c, n, *_ in parsed]
        style = max(arch.styles, key=votes.count)
    cfg = _peft_config(metadata, path, arch.diffusers_prefix) if fmt in ("diffusers", "peft") else None

    modules = []
    for comp, name, u, stem, parts in parsed:
        if fmt == "comfy":  # ComfyUI's own names where they differ from the original ones
            name = arch.from_comfy(name)
        if not set(parts) <= {"up", "down", "alpha"}:  # LoHa, LoKr, Tucker, DoRA, full difference
            modules.append(_adapter_module(comp, name, u, stem, parts, arch, style, fmt, cfg, label))
            continue
        (_, up), (_, down) = parts["up"], parts["down"]
        if up.dim() < 2 or down.dim() < 2 or up.shape[1] != down.shape[0] or any(d != 1 for d in up.shape[2:]):
            raise InputError(
                f"{label}: module '{stem}': up {list(up.shape)} and down {list(down.shape)} are not "
                "LoRA factors (up [out, r, 1...], down [r, in, ...])"
            )
        if up.numel() == 0 or down.numel() == 0:  # rank 0 would divide alpha by zero; no layer is empty
            raise InputError(f"{label}: module '{stem}': up {list(up.shape)} and down {list(down.shape)} are empty")
        if not up.is_floating_point() or not down.is_floating_point():
            raise InputError(f"{label}: module '{stem}': factors must be floating point, got {up.dtype} and {down.dtype}")
        name, known = _module_name(arch, comp, name, u, style, label)
        alpha = _file_alpha(parts, label)
        if alpha is None:
            alpha = _peft_alpha(cfg, name, down.shape[0], label)
        modules.append(LoraModule(comp, name, up, down, alpha, stem, known))
    seen: dict[tuple[str, str], str] = {}
    for m in modules:  # one layer under two spellings would be ported (and written) twice
        other = seen.setdefault((m.component, m.name), m.key)
        if other != m.key:
            raise InputError(f"{label}: modules '{other}' and '{m.key}' are the same layer ({m.name}) under two names")
    return LoraFile(modules, fmt, arch, style, metadata, path, cfg if path else None)


def _module_name(arch, comp, name, underscored, style, label) -> tuple[str, bool]:
    """(the dotted name if in the key map, else the name as in the file; known)."""
    try:
        dotted = arch.resolve_underscored(comp, name, style) if underscored else name
    except ValueError as e:
        raise InputError(f"{label}: {str(e).removeprefix('loraport: ')}") from None
    known = dotted is not None and arch.match(style, comp, dotted) is not None
    return (dotted if known else name), known


def _file_alpha(parts, label) -> float | None:
    """The module's ``.alpha`` tensor as a number, None when the file has none."""
    if "alpha" not in parts:
        return None
    alpha_key, a = parts["alpha"]
    if a.numel() != 1:
        raise InputError(f"{label}: tensor '{alpha_key}' must hold one number, has shape {list(a.shape)}")
    alpha = float(a.float().item())
    if not math.isfinite(alpha):
        raise InputError(f"{label}: tensor '{alpha_key}' is not finite")
    return alpha


def _adapter_module(comp, name, underscored, stem, parts, arch, style, fmt, cfg, label):
    """An adapters.AdapterModule; its alpha from the file's ``.alpha`` or the PEFT config
    (``lora_alpha`` for LoRA/DoRA factors, ``alpha`` for PEFT's LoHa/LoKr)."""
    name, known = _module_name(arch, comp, name, underscored, style, label)
    alpha = _file_alpha(parts, label)
    m = adapters.make_module(comp, name, stem, known, parts, alpha, fmt, label)
    if alpha is None and cfg and m.kind == "locon":
        alpha = _peft_alpha({**cfg, "use_dora": False}, name, m.rank, label)
    elif alpha is None and cfg and "alpha" in cfg and m.kind in ("loha", "lokr") and m.rank:
        alpha = float(cfg["alpha"])
    m.alpha = alpha
    return m


def _check_forced_arch(arch: archs.Arch, parsed, base_names, label: str) -> None:
    """InputError when a LoRA read as ``arch`` (forced, not detected) has no module of its key
    map in any naming style: the message says what the names look like instead, rather than
    calling the file an ``arch`` LoRA further on."""
    if any(arch.match(s, c, n, u) is not None for s in arch.styles for c, n, u, *_ in parsed):
        return
    try:
        detected = f"its names look like a {archs.detect([(c, n, u) for c, n, u, *_ in parsed], list(base_names)).name} LoRA"
    except ValueError:
        detected = "its names match no known architecture"
    raise InputError(
        f"{label}: none of its {len(parsed)} modules is in the {arch.name} key map (--arch {arch.name}); {detected}"
    )


def format_style(fmt: str, arch: archs.Arch) -> str:
    """The naming style a format writes module names in for ``arch``."""
    return "diffusers" if fmt in ("diffusers", "peft") else arch.kohya_style


def convert_style(lora: LoraFile, to_style: str) -> list[LoraModule]:
    """The modules of ``lora`` renamed to ``to_style``: renames (up's row halves swapped where
    the key map says the layouts differ so); fused -> split (rows of up sliced by the rule's
    units, down shared: exact); split -> fused (up block-diagonal, downs stacked, scales folded:
    exact, rank = sum of parts, absent parts zero)."""
    if lora.style == to_style:
        return list(lora.modules)
    arch = lora.arch
    out: list[LoraModule] = []
    fused: dict[str, tuple] = {}  # fused name -> (rule, {part index: module}, first part)
    for m in lora.modules:
        if not m.known:
            raise InputError(
                f"{lora.label}: module '{m.key}' is not in the {arch.name} key map; cannot rename it to {to_style} names"
            )
        parent = arch.fused_parent(m.name) if to_style == "original" else None
        adapter = isinstance(m, adapters.AdapterModule)
        if parent is not None and adapter:
            raise InputError(
                f"{lora.label}: module '{m.key}' ({m.type_name}) is one part of the fused {parent[0]}, which "
                f"a {m.type_name} cannot express; convert it to a plain LoRA first (loraport convert)"
            )
        if parent is not None:
            fused_name, index, rule, _ = parent
            fused.setdefault(fused_name, (rule, {}, m))[1][index] = m
            continue
        split = arch.split_parts(m.name) if to_style == "diffusers" else None
        if split is not None:
            try:
                rows = [torch.arange(m.shape[0])[p.rows(m.shape[0])] for p in split]
                if adapter:
                    out += [replace(adapters.select_rows(m, r, f"splitting {m.name}"), name=p.name)
                            for p, r in zip(split, rows, strict=True)]  # fmt: skip
                    continue
                out += [
                    replace(m, name=p.name, up=m.up[p.rows(m.up.shape[0])].clone(), down=m.down.clone()) for p in split
                ]
            except ValueError as e:
                raise InputError(f"{lora.label}: module '{m.key}': {e}") from None
            continue
        pieces = arch.translate(m.name, lora.style, to_style)
        if pieces is None:
            raise InputError(
                f"{lora.label}: module '{m.key}' has no {to_style}-style counterpart in the {arch.name} key map"
            )
        if adapter:
            rows = pieces[0].arrange(torch.arange(m.shape[0]))  # rows in to_style's order
            try:
                out.append(replace(adapters.select_rows(m, rows, f"renaming {m.name}"), name=pieces[0].name))
            except ValueError as e:
                raise InputError(f"{lora.label}: module '{m.key}': {e}") from None
            continue
        out.append(replace(m, name=pieces[0].name, up=pieces[0].arrange(m.up)))  # rows in to_style's order
    for fused_name, (rule, parts, first) in fused.items():
        unit = next(p.up.shape[0] // rule.units[i] for i, p in parts.items())
        ups, downs = [], []
        for i, units in enumerate(rule.units):
            if i not in parts:
                continue
            up, down = parts[i].factors()
            start = unit * sum(rule.units[:i])
            block = up.new_zeros(unit * sum(rule.units), up.shape[1])  # [fused rows, r_i]
            block[start : start + unit * units] = up
            ups.append(block)
            downs.append(down)
        dtype = first.up.dtype
        up = torch.cat(ups, 1).to(dtype)  # [fused rows, sum r_i]
        down = torch.cat(downs, 0).to(dtype)  # [sum r_i, in]
        out.append(LoraModule(first.component, fused_name, up, down, None, fused_name))
    return out


def check_format(fmt: str, arch: archs.Arch, components, label: str) -> None:
    """InputError when modules of ``arch`` and these ``components`` cannot be written as
    ``fmt``: jobs call it before their work, not after it."""
    for comp in sorted(set(components)):
        _component_prefix(fmt, comp, arch, label)


def _component_prefix(fmt: str, comp: str, arch: archs.Arch, label: str) -> str:
    if fmt in ("kohya", "tencent"):
        if fmt == "tencent":
            prefixes = {"model": "Hunyuan_video_I2V_lora_"}
        else:
            prefixes = {
                "model": "lora_unet_",
                "te1": "lora_te1_" if arch.name == "sdxl" else "lora_te_",
                "te2": "lora_te2_",
            }
    elif fmt == "diffusers":
        if not arch.diffusers_prefix:  # unprefixed keys would be unreadable (no known LoRA prefix)
            raise InputError(f"{label}: {arch.name} LoRAs have no diffusers format; write them as peft")
        prefixes = {"model": arch.diffusers_prefix + ".", "te1": "text_encoder.", "te2": "text_encoder_2."}
    elif fmt == "peft":
        prefixes = {"model": "base_model.model."}
    elif fmt == "comfy":
        prefixes = {"model": "diffusion_model."}
    else:
        raise InputError(f"loraport: unknown LoRA format {fmt!r}; known: {', '.join(FORMATS)}")
    if comp not in prefixes:
        raise InputError(f"{label}: the {fmt} format has no key prefix for component '{comp}'")
    return prefixes[comp]


def state_dict(lora: LoraFile, fmt: str | None = None) -> dict[str, torch.Tensor]:
    """The LoRA's tensors keyed as format ``fmt`` (default: the format it was read in)."""
    fmt = fmt or lora.format
    # the input's own format keeps its naming style (an SDXL kohya LoRA in diffusers names stays so)
    modules = convert_style(lora, lora.style if fmt == lora.format else format_style(fmt, lora.arch))
    underscored = fmt in ("kohya", "tencent")
    out: dict[str, torch.Tensor] = {}
    for m in modules:
        prefix = _component_prefix(fmt, m.component, lora.arch, lora.label)
        stem = m.name.replace(".", "_") if underscored and m.known else m.name
        if fmt == "comfy" and m.known:
            stem = lora.arch.to_comfy(stem)
        key = prefix + stem
        if key + ".alpha" in out or key + ".lora_A.weight" in out:
            raise InputError(f"{lora.label}: two modules map to the same key '{key}' in the {fmt} format")
        if isinstance(m, adapters.AdapterModule):
            out.update(adapters.tensors_for(m, key, fmt, lora.label))
            continue
        if fmt in ("kohya", "tencent"):
            up, alpha = m.up, (m.alpha if m.alpha is not None else float(m.rank))
            out[key + ".lora_down.weight"], out[key + ".lora_up.weight"] = m.down, up
            out[key + ".alpha"] = torch.tensor(alpha, dtype=torch.float32)
            continue
        up = m.up
        if fmt in ("diffusers", "peft") and m.scale != 1.0:
            up = (m.up.float() * m.scale).to(m.up.dtype)
        out[key + ".lora_A.weight"], out[key + ".lora_B.weight"] = m.down, up
        if fmt == "comfy" and m.alpha is not None:
            out[key + ".alpha"] = torch.tensor(m.alpha, dtype=torch.float32)
    return {k: v.contiguous() for k, v in out.items()}


def _peft_scale_one(tensors: dict[str, torch.Tensor]) -> dict:
    """PEFT config fields giving every module scale 1 (lora_alpha = r, per-module patterns for
    modules whose rank differs from the largest)."""
    ranks = {_peft_name(k): t.shape[0] for k, t in tensors.items() if k.endswith(".lora_A.weight")}
    top = max(ranks.values())
    pattern = {name: r for name, r in ranks.items() if r != top}
    return {"r": top, "lora_alpha": top, "rank_pattern": pattern, "alpha_pattern": dict(pattern), "use_rslora": False}


def _peft_name(key: str) -> str:
    stem = key[: -len(".lora_A.weight")]
    entry = _prefix_of(stem)
    return stem[len(entry[1]) :] if entry else stem


def _updated_metadata(lora: LoraFile, fmt: str, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    meta = dict(lora.metadata)
    ranks = sorted({t.shape[0] for k, t in tensors.items() if k.endswith((".lora_down.weight", ".lora_A.weight"))})
    if ranks and ("ss_network_dim" in meta or fmt in ("kohya", "tencent")):
        # kohya's convention: "Dynamic" when the ranks (or the alphas) differ between modules
        alphas = sorted({float(t) for k, t in tensors.items() if k.endswith(".alpha")})
        meta["ss_network_dim"] = str(ranks[0]) if len(ranks) == 1 else "Dynamic"
        if len(ranks) > 1 or len(alphas) > 1:
            meta["ss_network_alpha"] = "Dynamic"
        else:
            meta["ss_network_alpha"] = f"{alphas[0]:g}" if alphas else str(ranks[0])
    if ADAPTER_METADATA_KEY in meta and fmt in ("diffusers", "peft") and ranks:
        cfg = json.loads(meta[ADAPTER_METADATA_KEY])
        fields = _peft_scale_one(tensors)
        for k in list(cfg):
            for f, value in fields.items():
                if k == f or k.endswith("." + f):
                    cfg[k] = value
        meta[ADAPTER_METADATA_KEY] = json.dumps(cfg, sort_keys=True)
    return meta


def module_from_factors(component, name, key, up, down, in_shape, dtype, known=True) -> LoraModule:
    """A scale-1 LoraModule on the CPU in ``dtype`` from factors up [out, k] and down
    [k, in·kernel] (device, float32), laid out for a weight of input shape ``in_shape`` =
    (in, *kernel): up [out, k, 1...], down [k, in, *kernel]. The inverse of LoraModule.factors."""
    k, (channels, *kernel) = up.shape[1], in_shape
    return LoraModule(
        component,
        name,
        up.reshape(up.shape[0], k, *([1] * len(kernel))).to("cpu", dtype),  # [out, k, 1...]
        down.reshape(k, channels, *kernel).to("cpu", dtype),  # [k, in, *kernel]
        None,
        key,
        known,
    )


def report_json(report, path=None, *, protect=()) -> str:
    """A run report (a dataclass with ``rows`` and ``summary()``: pipeline.PortReport,
    toolbox.ToolReport) as JSON: its fields, the summary and one entry per layer; written
    atomically to ``path`` when given, never over a file in ``protect``."""
    doc = {k: v for k, v in asdict(report).items() if k != "rows"}
    doc["summary"] = report.summary()
    doc["layers"] = [asdict(r) for r in report.rows]
    text = json.dumps(doc, indent=2)
    if path is not None:

        def dump(tmp):
            with open(tmp, "w") as f:
                f.write(text)

        atomic_write(path, dump, protect=protect)
    return text


def output_format(fmt: str | None, default: str) -> str:
    """The format to write: ``fmt``, or ``default`` (the input's) for None and "auto"."""
    return default if fmt in (None, "auto") else fmt


def write_lora(lora: LoraFile, path, *, format: str | None = None, metadata=None, protect=()) -> str:
    """Write ``lora`` as safetensors at ``path`` in ``format`` (default: the input's), with the
    input's header metadata updated (ss_network_dim/alpha) plus ``metadata``; returns the path.
    A PEFT output named adapter_model.safetensors gets an adapter_config.json beside it when the
    input came with one (scale 1: lora_alpha = r)."""
    fmt = output_format(format, lora.format)
    if fmt not in FORMATS:
        raise InputError(f"loraport: unknown LoRA format {fmt!r}; known: {', '.join(FORMATS)}")
    tensors = state_dict(lora, fmt)
    meta = _updated_metadata(lora, fmt, tensors)
    meta.update(metadata or {})
    path = os.path.abspath(os.fspath(path))
    protect = tuple(protect) + (lora.path,)
    atomic_write(path, lambda tmp: save_safetensors(tensors, tmp, meta), protect=protect)
    if lora.adapter_config is not None and fmt == "peft" and os.path.basename(path) == "adapter_model.safetensors":
        cfg = dict(lora.adapter_config)
        cfg.update(_peft_scale_one(tensors))
        cfg_path = os.path.join(os.path.dirname(path), "adapter_config.json")

        def dump(tmp):
            with open(tmp, "w") as f:
                json.dump(cfg, f, indent=2)

        atomic_write(cfg_path, dump, protect=protect)
    return path
