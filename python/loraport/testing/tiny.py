"""Tiny stand-ins for the real thing, for tests and the README example: base models of each family
with the real weight names and layouts at a small width (fused layers, conv patch embeddings,
norms and biases included), a "related" target (the source plus a small perturbation, as a new
release of the same model is), an "unrelated" one (fresh weights), and LoRAs in every format.
Weights get a decaying spectrum so that their top singular subspaces are well defined. Writers
put them on disk in each base-model layout (safetensors, sharded, Tencent .pt, diffusers folder)."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from .. import archs, formats
from ..reference import matrix_with_spectrum


def shapes(arch: str, width: int = 32, blocks: int = 2, in_channels: int = 4) -> dict[str, tuple[int, ...]]:
    """{weight name: shape} of a tiny ``arch`` model in its base layout (original names where
    the family has them) with hidden size ``width``; includes some non-adapted tensors."""
    h, f = width, 4 * width
    s: dict[str, tuple[int, ...]] = {}
    if arch in ("hunyuan-video", "flux"):
        bfl = arch == "flux"
        qkv, proj = ("img_attn.qkv", "img_attn.proj") if bfl else ("img_attn_qkv", "img_attn_proj")
        mlp = ("img_mlp.0", "img_mlp.2") if bfl else ("img_mlp.fc1", "img_mlp.fc2")
        mod, smod = ("img_mod.lin", "modulation.lin") if bfl else ("img_mod.linear", "modulation.linear")
        for i in range(blocks):
            for side in ("img", "txt"):
                p = f"double_blocks.{i}."
                s[p + qkv.replace("img", side) + ".weight"] = (3 * h, h)
                s[p + qkv.replace("img", side) + ".bias"] = (3 * h,)
                s[p + proj.replace("img", side) + ".weight"] = (h, h)
                s[p + mlp[0].replace("img", side) + ".weight"] = (f, h)
                s[p + mlp[1].replace("img", side) + ".weight"] = (h, f)
                s[p + mod.replace("img", side) + ".weight"] = (6 * h, h)
            s[
                f"double_blocks.{i}.img_attn_q_norm.weight"
                if not bfl
                else f"double_blocks.{i}.img_attn.norm.query_norm.scale"
            ] = (h // 4,)
            s[f"single_blocks.{i}.linear1.weight"] = (3 * h + f, h)
            s[f"single_blocks.{i}.linear2.weight"] = (h, h + f)
            s[f"single_blocks.{i}.{smod}.weight"] = (3 * h, h)
        if bfl:
            s["img_in.weight"] = (h, 4 * in_channels)
        else:
            s["img_in.proj.weight"] = (h, in_channels, 1, 2, 2)  # Conv3d, patch 1x2x2
            s["img_in.proj.bias"] = (h,)
        s["final_layer.linear.weight"] = (4 * in_channels, h)
        s["final_layer.adaLN_modulation.1.weight"] = (2 * h, h)  # rows: shift, scale
        s["final_layer.adaLN_modulation.1.bias"] = (2 * h,)
    elif arch == "wan":
        for i in range(blocks):
            for att in ("self_attn", "cross_attn"):
                for x in "qkvo":
                    s[f"blocks.{i}.{att}.{x}.weight"] = (h, h)
            s[f"blocks.{i}.ffn.0.weight"] = (f, h)
            s[f"blocks.{i}.ffn.2.weight"] = (h, f)
            s[f"blocks.{i}.norm3.weight"] = (h,)
        s["patch_embedding.weight"] = (h, in_channels, 1, 2, 2)
    elif arch in ("sd15", "sdxl"):
        # LDM names (Stability's checkpoints, without the model.diffusion_model. prefix); where
        # they sit in diffusers' UNet is in the comments (see archs._sd_unet_rules).
        c, ctx, xl = width, width + 8, arch == "sdxl"
        attentions = (
            ("input_blocks.8.1", "middle_block.1", "output_blocks.2.1")  # down 2 / attn 1, mid, up 0 / attn 2
            if xl
            else ("input_blocks.2.1", "middle_block.1", "output_blocks.3.1")  # down 0 / attn 1, mid, up 1 / attn 0
        )
        for blk in attentions:
            for t in range(blocks if xl else 1):
                p = f"{blk}.transformer_blocks.{t}."
                for x in ("to_q", "to_k", "to_v", "to_out.0"):
                    s[p + "attn1." + x + ".weight"] = (c, c)
                s[p + "attn2.to_q.weight"] = (c, c)
                s[p + "attn2.to_k.weight"] = (c, ctx)
                s[p + "attn2.to_v.weight"] = (c, ctx)
                s[p + "ff.net.0.proj.weight"] = (8 * c, c)
                s[p + "ff.net.2.weight"] = (c, 4 * c)
                s[p + "norm1.weight"] = (c,)
            s[f"{blk}.proj_in.weight"] = (c, c)
        s["input_blocks.0.0.weight"] = (c, in_channels, 3, 3)  # conv_in
        for res in ("input_blocks.1.0", "middle_block.2", "output_blocks.5.0"):  # down 0/0, mid 1, up 1/2
            s[f"{res}.in_layers.0.weight"] = (c,)  # GroupNorm
            s[f"{res}.in_layers.2.weight"] = (c, c, 3, 3)  # conv1
            s[f"{res}.emb_layers.1.weight"] = (c, 4 * c)  # time_emb_proj
            s[f"{res}.out_layers.3.weight"] = (c, c, 3, 3)  # conv2
        s["output_blocks.5.0.skip_connection.weight"] = (c, 2 * c, 1, 1)  # conv_shortcut
        s["input_blocks.3.0.op.weight"] = (c, c, 3, 3)  # down 0 downsampler
        s[f"output_blocks.2.{2 if xl else 1}.conv.weight"] = (c, c, 3, 3)  # up 0 upsampler
        s["time_embed.0.weight"] = (4 * c, c)
        if xl:
            s["label_emb.0.0.weight"] = (4 * c, 2 * c)  # add_embedding.linear_1
    elif arch == "llama":
        for i in range(blocks):
            p = f"model.layers.{i}."
            s[p + "self_attn.q_proj.weight"] = (h, h)
            s[p + "self_attn.k_proj.weight"] = (h // 4, h)
            s[p + "self_attn.v_proj.weight"] = (h // 4, h)
            s[p + "self_attn.o_proj.weight"] = (h, h)
            s[p + "mlp.gate_proj.weight"] = (f, h)
            s[p + "mlp.up_proj.weight"] = (f, h)
            s[p + "mlp.down_proj.weight"] = (h, f)
            s[p + "input_layernorm.weight"] = (h,)
        s["model.embed_tokens.weight"] = (64, h)
    else:
        raise ValueError(f"loraport.testing.tiny: no tiny model for {arch!r}")
    return s


def clip_shapes(width: int = 16, layers: int = 2, projection: bool = False) -> dict[str, tuple[int, ...]]:
    """{weight name: shape} of a tiny CLIP text encoder with Hugging Face names (SD's text
    encoders; ``projection``: SDXL's second one, CLIPTextModelWithProjection)."""
    s: dict[str, tuple[int, ...]] = {"text_model.embeddings.token_embedding.weight": (64, width)}
    for i in range(layers):
        p = f"text_model.encoder.layers.{i}."
        for x in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s[p + f"self_attn.{x}.weight"] = (width, width)
        s[p + "mlp.fc1.weight"] = (4 * width, width)
        s[p + "mlp.fc2.weight"] = (width, 4 * width)
        s[p + "layer_norm1.weight"] = (width,)
    if projection:
        s["text_projection.weight"] = (width, width)
    return s


def _weight(shape, generator) -> torch.Tensor:
    if len(shape) == 1:
        return torch.randn(shape, generator=generator)
    m, n = shape[0], int(torch.tensor(shape[1:]).prod())
    k = min(m, n)
    spectrum = 0.8 ** torch.arange(k, dtype=torch.float64)  # decaying, like trained weights
    return matrix_with_spectrum(m, n, spectrum, generator=generator).float().reshape(shape)


def random_weights(
    shapes: dict[str, tuple[int, ...]], *, seed: int = 0, dtype=torch.float32
) -> dict[str, torch.Tensor]:
    """Random weights of the given shapes: matrices (and conv kernels, flattened) with a decaying
    spectrum, vectors Gaussian. Also fills a real model's state dict (diffusers' tiny models)."""
    g = torch.Generator().manual_seed(seed)
    return {name: _weight(tuple(shape), g).to(dtype) for name, shape in shapes.items()}


def base_model(arch: str, *, seed: int = 0, dtype=torch.float32, **kw) -> dict[str, torch.Tensor]:
    """A tiny ``arch`` base model (see `shapes`) with random decaying-spectrum weights."""
    return random_weights(shapes(arch, **kw), seed=seed, dtype=dtype)


def related(weights: dict[str, torch.Tensor], *, eps: float = 0.05, seed: int = 1) -> dict[str, torch.Tensor]:
    """A "new release": every tensor plus ``eps`` times its RMS in Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in weights.items():
        noise = torch.randn(w.shape, generator=g) * w.float().pow(2).mean().sqrt()
        out[name] = (w.float() + eps * noise).to(w.dtype)
    return out


def finetuned(
    weights: dict[str, torch.Tensor], *, rel_diff: float = 0.05, decay: float = 0.7, seed: int = 4
) -> dict[str, torch.Tensor]:
    """A "fine-tune": every matrix or conv weight plus an update with singular values decaying
    like ``decay``**j and norm ``rel_diff`` · ‖W‖_F (what `loraport extract` recovers); other
    tensors unchanged."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in weights.items():
        if w.dim() < 2:
            out[name] = w
            continue
        m, n = w.shape[0], w[0].numel()
        spectrum = decay ** torch.arange(min(m, n), dtype=torch.float64)
        spectrum *= rel_diff * float(w.double().norm()) / float(spectrum.norm())
        update = matrix_with_spectrum(m, n, spectrum, generator=g).reshape(w.shape)
        out[name] = (w.double() + update).to(w.dtype)
    return out


def widen_input(
    weights: dict[str, torch.Tensor], name: str, channels: int, *, seed: int = 2
) -> dict[str, torch.Tensor]:
    """A copy with tensor ``name``'s input channels (dim 1) extended to ``channels`` by new random
    ones, like HunyuanVideo-I2V v1's img_in (16 -> 33 channels)."""
    w = weights[name]
    g = torch.Generator().manual_seed(seed)
    extra = torch.randn((w.shape[0], channels - w.shape[1], *w.shape[2:]), generator=g) * w.float().std()
    return {**weights, name: torch.cat([w.float(), extra], 1).to(w.dtype)}


def to_diffusers_names(arch: str, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights under the family's diffusers names (fused weights split by rows).
    Tensors with no diffusers counterpart in the key map are dropped."""
    a = archs.get(arch)
    if a.styles == ("diffusers",):
        return dict(weights)
    out = {}
    for key, w in weights.items():
        name, _, leaf = key.rpartition(".")
        parts = a.split_parts(name)
        if parts is not None:
            for p in parts:
                out[f"{p.name}.{leaf}"] = w[p.rows(w.shape[0])].clone()
            continue
        pieces = a.translate(name, "original", "diffusers") if a.style_of("model", name) else None
        if pieces is not None:
            out[f"{pieces[0].name}.{leaf}"] = pieces[0].arrange(w)
    return out


def to_original_names(arch: str, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `to_diffusers_names`: diffusers-named weights under the family's original
    names (split weights concatenated by rows into the fused one). Tensors with no original
    counterpart in the key map, or fused weights with a part absent, are dropped."""
    a = archs.get(arch)
    out, fused = {}, {}
    for key, w in weights.items():
        name, _, leaf = key.rpartition(".")
        parent = a.fused_parent(name)
        if parent is not None:
            fused_name, index, rule, _ = parent
            fused.setdefault((fused_name, leaf), [None] * len(rule.diffusers))[index] = w
            continue
        pieces = a.translate(name, "diffusers", "original") if a.style_of("model", name) else None
        if pieces is not None:
            out[f"{pieces[0].name}.{leaf}"] = pieces[0].arrange(w)
    for (name, leaf), parts in fused.items():
        if all(p is not None for p in parts):
            out[f"{name}.{leaf}"] = torch.cat(parts, 0)
    return out


def lora_targets(
    arch: str, weights: dict[str, torch.Tensor], style: str | None = None, component: str = "model"
) -> list[str]:
    """Module names of ``weights`` (a ``component``'s) that a LoRA of ``arch`` can adapt (2-d
    or conv weights in the key map), in the order of ``weights``."""
    a = archs.get(arch)
    style = style or a.styles[0]
    out = []
    for key, w in weights.items():
        name, _, leaf = key.rpartition(".")
        if leaf == "weight" and w.dim() >= 2 and a.match(style, component, name):
            out.append(name)
    return out


def lora(
    arch: str,
    weights: dict[str, torch.Tensor],
    *,
    fmt: str = "kohya",
    rank: int = 4,
    alpha: float | None = 2.0,
    modules: list[str] | None = None,
    seed: int = 3,
    dtype=torch.float32,
    component: str = "model",
) -> dict[str, torch.Tensor]:
    """A random LoRA state dict in format ``fmt`` for the modules ``modules`` (default: every
    adaptable one) of base ``weights`` (named in the family's first style; a ``component``'s:
    "te1"/"te2" for SD's text encoders). Conv weights get a LoCon (down [r, in, *kernel],
    up [out, r, 1, ...])."""
    a = archs.get(arch)
    style = a.styles[0]
    g = torch.Generator().manual_seed(seed)
    mods = []
    for name in modules or lora_targets(arch, weights, style, component):
        w = weights[name + ".weight"]
        down = torch.randn((rank, *w.shape[1:]), generator=g) / w[0].numel() ** 0.5
        up = torch.randn((w.shape[0], rank, *([1] * (w.dim() - 2))), generator=g)
        mods.append(formats.LoraModule(component, name, up.to(dtype), down.to(dtype), alpha, name))
    # in the naming the format has for this family (SD 1.5 kohya: diffusers names; SDXL kohya: LDM)
    to_style = formats.format_style(fmt, a)
    lf = formats.LoraFile(formats.convert_style(formats.LoraFile(mods, fmt, a, style), to_style), fmt, a, to_style)
    return formats.state_dict(lf, fmt)


def save_base(weights: dict[str, torch.Tensor], path: str, layout: str = "safetensors") -> str:
    """Write a base model as ``layout``: "safetensors" (one file), "sharded" (two shards plus
    model.safetensors.index.json in folder ``path``), "pt" (Tencent's pickled {"module": ...}),
    or "diffusers" (folder with transformer/diffusion_pytorch_model.safetensors). Returns the
    path to hand to loraport."""
    weights = {k: v.contiguous() for k, v in weights.items()}
    if layout == "safetensors":
        save_file(weights, path)
    elif layout == "pt":
        torch.save({"module": weights}, path)
    elif layout == "sharded":
        os.makedirs(path, exist_ok=True)
        keys = list(weights)
        half = len(keys) // 2
        shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
        for fname, ks in shards.items():
            save_file({k: weights[k] for k in ks}, os.path.join(path, fname))
        index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f)
    elif layout == "diffusers":
        os.makedirs(os.path.join(path, "transformer"), exist_ok=True)
        save_file(weights, os.path.join(path, "transformer", "diffusion_pytorch_model.safetensors"))
    else:
        raise ValueError(f"loraport.testing.tiny: unknown layout {layout!r}")
    return path


def write_example(folder: str, arch: str = "hunyuan-video") -> dict[str, str]:
    """A tiny porting example in ``folder``: source.safetensors, target.safetensors (a related
    release) and lora.safetensors (a kohya/Musubi-style LoRA with alpha). Returns their paths."""
    os.makedirs(folder, exist_ok=True)
    source = base_model(arch, seed=0, dtype=torch.bfloat16)
    target = related(source)
    paths = {
        "source": save_base(source, os.path.join(folder, "source.safetensors")),
        "target": save_base(target, os.path.join(folder, "target.safetensors")),
        "lora": os.path.join(folder, "lora.safetensors"),
    }
    sd = lora(arch, source, fmt="kohya", rank=4, alpha=2.0, dtype=torch.bfloat16)
    save_file(
        sd,
        paths["lora"],
        metadata={"ss_network_dim": "4", "ss_network_alpha": "2.0", "modelspec.title": "tiny example"},
    )
    return paths


def subprocess_env() -> dict[str, str]:
    """The environment for a ``python -m loraport`` subprocess that imports the same loraport as
    this process: the folder holding this package goes first on PYTHONPATH (a source tree with
    its compiled library, or the installed package), never a source tree without one."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../loraport (this is loraport/testing/)
    package_parent = os.path.dirname(package)
    rest = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": package_parent + (os.pathsep + rest if rest else "")}

