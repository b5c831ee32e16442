"""The comfy and kohya outputs for Hunyuan Video, Wan and Flux, and the diffusers output for Flux,
use names ComfyUI's LoRA loader maps, onto every module of ComfyUI's own models. ComfyUI is not
installed here: what it maps is written out below as data, read from its source
(github.com/comfyanonymous/ComfyUI; no code taken), each table citing the file and function:

* COMFY_MODULES: the Linear / Conv modules of ComfyUI's models (what a LoRA patches), per block.
* comfy_key_names(): the LoRA key names comfy/lora.py, model_lora_keys_unet, gives a module.
* FLUX_FROM_DIFFUSERS: comfy/utils.py, flux_to_diffusers: which rows of which ComfyUI weight a
  diffusers-named Flux module is (model_lora_keys_unet maps ``transformer.`` + that name there).

A LoRA key is ``<name>`` + ``.lora_up.weight``/``.lora_down.weight`` or ``.lora_B.weight``/
``.lora_A.weight``, with an optional ``.alpha`` (comfy/lora.py, load_lora)."""

import functools
import re

import pytest
import torch
from clients import flux, hunyuan_video, original_names, random_weights, wan

from loraport import formats
from loraport.testing import tiny

pytestmark = pytest.mark.usefixtures("one_thread")
_SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".lora_A.weight", ".lora_B.weight", ".alpha")

# comfy/ldm/flux/layers.py: DoubleStreamBlock (img_mod / txt_mod: Modulation.lin; img_attn /
# txt_attn: SelfAttention.qkv, .proj; img_mlp / txt_mlp: Sequential(Linear, GELU, Linear)) and
# SingleStreamBlock (linear1, linear2, modulation: Modulation.lin).
_DOUBLE = [
    "img_mod.lin",
    "img_attn.qkv",
    "img_attn.proj",
    "img_mlp.0",
    "img_mlp.2",
    "txt_mod.lin",
    "txt_attn.qkv",
    "txt_attn.proj",
    "txt_mlp.0",
    "txt_mlp.2",
]
_SINGLE = ["linear1", "linear2", "modulation.lin"]
_EMBEDDERS = [
    "time_in.in_layer",
    "time_in.out_layer",
    "vector_in.in_layer",
    "vector_in.out_layer",
    "guidance_in.in_layer",
    "guidance_in.out_layer",
]  # MLPEmbedder: in_layer, out_layer
_LAST_LAYER = ["final_layer.linear", "final_layer.adaLN_modulation.1"]  # LastLayer: linear, adaLN_modulation[1]

# {block prefix ("" for the model's own modules): module names}; "{i}" is each block's index.
COMFY_MODULES = {
    # comfy/ldm/hunyuan_video/model.py: HunyuanVideo (img_in = PatchEmbed, whose conv is .proj
    # in comfy/ldm/modules/diffusionmodules/mmdit.py; time_in, vector_in, guidance_in =
    # MLPEmbedder; txt_in = TokenRefiner; double_blocks, single_blocks from flux; final_layer =
    # LastLayer); TokenRefiner (input_embedder; t_embedder, c_embedder = MLPEmbedder;
    # individual_token_refiner.blocks = TokenRefinerBlock: adaLN_modulation[1], self_attn =
    # SelfAttentionRef (qkv, proj), mlp = Sequential(Linear, SiLU, Linear)).
    "hunyuan-video": {
        "": [
            "img_in.proj",
            *_EMBEDDERS,
            "txt_in.input_embedder",
            "txt_in.t_embedder.in_layer",
            "txt_in.t_embedder.out_layer",
            "txt_in.c_embedder.in_layer",
            "txt_in.c_embedder.out_layer",
            *_LAST_LAYER,
        ],
        "txt_in.individual_token_refiner.blocks.{i}.": [
            "adaLN_modulation.1",
            "self_attn.qkv",
            "self_attn.proj",
            "mlp.0",
            "mlp.2",
        ],
        "double_blocks.{i}.": _DOUBLE,
        "single_blocks.{i}.": _SINGLE,
    },
    # comfy/ldm/flux/model.py: Flux (img_in, txt_in: Linear; time_in, vector_in, guidance_in:
    # MLPEmbedder; double_blocks, single_blocks; final_layer = LastLayer).
    "flux": {
        "": ["img_in", "txt_in", *_EMBEDDERS, *_LAST_LAYER],
        "double_blocks.{i}.": _DOUBLE,
        "single_blocks.{i}.": _SINGLE,
    },
    # comfy/ldm/wan/model.py: WanModel (patch_embedding: Conv3d; text_embedding, time_embedding:
    # Sequential(Linear, act, Linear); time_projection: Sequential(SiLU, Linear); head = Head
    # (.head); img_emb = MLPProj (.proj: LayerNorm, Linear, GELU, Linear, LayerNorm) for i2v);
    # WanAttentionBlock (self_attn: WanSelfAttention q, k, v, o; cross_attn: WanI2VCrossAttention,
    # which adds k_img, v_img; ffn: Sequential(Linear, GELU, Linear)).
    "wan": {
        "": [
            "patch_embedding",
            "text_embedding.0",
            "text_embedding.2",
            "time_embedding.0",
            "time_embedding.2",
            "time_projection.1",
            "head.head",
            "img_emb.proj.1",
            "img_emb.proj.3",
        ],
        "blocks.{i}.": [
            "self_attn.q",
            "self_attn.k",
            "self_attn.v",
            "self_attn.o",
            "cross_attn.q",
            "cross_attn.k",
            "cross_attn.v",
            "cross_attn.o",
            "cross_attn.k_img",
            "cross_attn.v_img",
            "ffn.0",
            "ffn.2",
        ],
    },
}
# The tiny diffusers models' block counts (below): {block prefix: blocks}.
BLOCKS = {
    "hunyuan-video": {
        "txt_in.individual_token_refiner.blocks.{i}.": 1,
        "double_blocks.{i}.": 1,
        "single_blocks.{i}.": 2,
    },
    "flux": {"double_blocks.{i}.": 1, "single_blocks.{i}.": 2},
    "wan": {"blocks.{i}.": 2},
}
MODELS = {"hunyuan-video": hunyuan_video, "flux": flux, "wan": lambda: wan(image_dim=16, added_kv_proj_dim=16)}


def comfy_modules(arch: str) -> set[str]:
    table = COMFY_MODULES[arch]
    return {
        prefix.format(i=i) + m
        for prefix, mods in table.items()
        for i in range(BLOCKS[arch].get(prefix, 1))
        for m in mods
    }


# Hunyuan Video only (comfy/lora.py, model_lora_keys_unet, "diffusion-pipe lora format"): the
# replacements ComfyUI makes on a module's "diffusion_model.<name>.weight" key to get the
# diffusion-pipe name it also accepts, in this order.
DIFFUSION_PIPE_RENAMES = [
    ("_mod.lin.", "_mod.linear."),
    ("_attn.qkv.", "_attn_qkv."),
    ("_attn.proj.", "_attn_proj."),
    ("mlp.0.", "mlp.fc1."),
    ("mlp.2.", "mlp.fc2."),
    (".modulation.lin.", ".modulation.linear."),
]


def comfy_key_names(arch: str, module: str) -> set[str]:
    """The LoRA key names (without factor suffix) model_lora_keys_unet maps onto a ComfyUI module:
    for every weight "diffusion_model.<K>.weight", "lora_unet_" + K with '.' -> '_' and
    "diffusion_model." + K; for Hunyuan Video also the diffusion-pipe name K' (renames above) as
    "transformer." + K' and "diffusion_model." + K'."""
    names = {"lora_unet_" + module.replace(".", "_"), "diffusion_model." + module}
    if arch == "hunyuan-video":
        key = f"diffusion_model.{module}.weight"
        for old, new in DIFFUSION_PIPE_RENAMES:
            key = key.replace(old, new)
        stem = key.removeprefix("diffusion_model.").removesuffix(".weight")
        names |= {"transformer." + stem, "diffusion_model." + stem}
    return names


@functools.cache
def every_module(arch: str) -> tuple[dict, list[str]]:
    """(original-named weights of the tiny diffusers model, every module a LoRA can adapt)."""
    model = MODELS[arch]()
    weights = original_names(arch, model, random_weights(model))  # checked against diffusers' converter
    return weights, tiny.lora_targets(arch, weights)


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("fmt", ["comfy", "kohya"])
def test_every_module_name_is_one_comfyui_maps(arch, fmt):
    weights, modules = every_module(arch)
    key_map = {key: module for module in comfy_modules(arch) for key in comfy_key_names(arch, module)}
    sd = tiny.lora(arch, weights, fmt=fmt, rank=2)
    stems = {next(k[: -len(s)] for s in _SUFFIXES if k.endswith(s)) for k in sd}
    assert len(stems) == len(modules)
    unmapped = sorted(stems - key_map.keys())
    if arch == "hunyuan-video" and fmt == "kohya":
        # Musubi Tuner's names, kept for the tools that train and run them: ComfyUI maps only its
        # own names under lora_unet_, so these need --format comfy for ComfyUI (README).
        assert unmapped and all(
            re.search(r"(_mod_linear|_mlp_fc[12]|modulation_linear|mlp_[02]|linear_[12])$", s) for s in unmapped
        ), unmapped
    else:
        assert unmapped == []
        # one key per ComfyUI module, and every module of ComfyUI's model reached
        assert sorted(key_map[s] for s in stems) == sorted(comfy_modules(arch))
    # and loraport reads its own comfy names back as the same modules
    back = formats.read_lora(sd, arch=arch)
    assert back.format == fmt and sorted(m.name for m in back.modules) == sorted(modules)
    assert all(m.known for m in back.modules)


# comfy/utils.py, flux_to_diffusers: a diffusers Flux module -> (ComfyUI weight, first row and rows
# in units of the hidden size, None for the whole weight); "swap": swap_scale_shift, the halves
# exchanged. "{i}": the block index.
FLUX_FROM_DIFFUSERS = {
    "transformer_blocks.{i}.attn.to_q": ("double_blocks.{i}.img_attn.qkv", 0, 1),
    "transformer_blocks.{i}.attn.to_k": ("double_blocks.{i}.img_attn.qkv", 1, 1),
    "transformer_blocks.{i}.attn.to_v": ("double_blocks.{i}.img_attn.qkv", 2, 1),
    "transformer_blocks.{i}.attn.add_q_proj": ("double_blocks.{i}.txt_attn.qkv", 0, 1),
    "transformer_blocks.{i}.attn.add_k_proj": ("double_blocks.{i}.txt_attn.qkv", 1, 1),
    "transformer_blocks.{i}.attn.add_v_proj": ("double_blocks.{i}.txt_attn.qkv", 2, 1),
    "transformer_blocks.{i}.attn.to_out.0": ("double_blocks.{i}.img_attn.proj", None),
    "transformer_blocks.{i}.norm1.linear": ("double_blocks.{i}.img_mod.lin", None),
    "transformer_blocks.{i}.norm1_context.linear": ("double_blocks.{i}.txt_mod.lin", None),
    "transformer_blocks.{i}.attn.to_add_out": ("double_blocks.{i}.txt_attn.proj", None),
    "transformer_blocks.{i}.ff.net.0.proj": ("double_blocks.{i}.img_mlp.0", None),
    "transformer_blocks.{i}.ff.net.2": ("double_blocks.{i}.img_mlp.2", None),
    "transformer_blocks.{i}.ff_context.net.0.proj": ("double_blocks.{i}.txt_mlp.0", None),
    "transformer_blocks.{i}.ff_context.net.2": ("double_blocks.{i}.txt_mlp.2", None),
    "single_transformer_blocks.{i}.attn.to_q": ("single_blocks.{i}.linear1", 0, 1),
    "single_transformer_blocks.{i}.attn.to_k": ("single_blocks.{i}.linear1", 1, 1),
    "single_transformer_blocks.{i}.attn.to_v": ("single_blocks.{i}.linear1", 2, 1),
    "single_transformer_blocks.{i}.proj_mlp": ("single_blocks.{i}.linear1", 3, 4),
    "single_transformer_blocks.{i}.norm.linear": ("single_blocks.{i}.modulation.lin", None),
    "single_transformer_blocks.{i}.proj_out": ("single_blocks.{i}.linear2", None),
    "proj_out": ("final_layer.linear", None),
    "x_embedder": ("img_in", None),
    "context_embedder": ("txt_in", None),
    "time_text_embed.timestep_embedder.linear_1": ("time_in.in_layer", None),
    "time_text_embed.timestep_embedder.linear_2": ("time_in.out_layer", None),
    "time_text_embed.text_embedder.linear_1": ("vector_in.in_layer", None),
    "time_text_embed.text_embedder.linear_2": ("vector_in.out_layer", None),
    "time_text_embed.guidance_embedder.linear_1": ("guidance_in.in_layer", None),
    "time_text_embed.guidance_embedder.linear_2": ("guidance_in.out_layer", None),
    "norm_out.linear": ("final_layer.adaLN_modulation.1", "swap"),
}


def _flux_target(diffusers_module: str):
    for pattern, target in FLUX_FROM_DIFFUSERS.items():
        m = re.fullmatch(re.escape(pattern).replace(r"\{i\}", r"(\d+)"), diffusers_module)
        if m:
            return (target[0].replace("{i}", m.group(1)) if m.groups() else target[0]), target[1:]
    return None, None


def test_flux_diffusers_output_lands_where_comfyui_puts_it():
    """loraport's diffusers file of a kohya Flux LoRA, applied the way ComfyUI applies
    ``transformer.``-named Flux LoRAs (each module's ΔW added to its rows of the fused ComfyUI
    weight, norm_out.linear's halves swapped back), gives every BFL module the kohya LoRA's ΔW."""
    weights, _ = every_module("flux")
    hidden = weights["img_in.weight"].shape[0]
    lora_in = formats.read_lora(tiny.lora("flux", weights, fmt="kohya", rank=2, alpha=1.5), arch="flux")
    want = {m.name: m.factors()[0].double() @ m.factors()[1].double() for m in lora_in.modules}
    applied = {name: torch.zeros_like(d) for name, d in want.items()}
    for m in formats.read_lora(formats.state_dict(lora_in, "diffusers"), arch="flux").modules:
        target, where = _flux_target(m.name)
        assert target is not None, f"ComfyUI maps no transformer.{m.name}"
        up, down = m.factors()
        d = up.double() @ down.double()
        if where == ("swap",):
            applied[target] += torch.cat(d.chunk(2, 0)[::-1], 0)
        elif where[0] is None:
            applied[target] += d
        else:
            start, rows = where
            applied[target][start * hidden : (start + rows) * hidden] += d
    assert sorted(applied) == sorted(comfy_modules("flux"))
    for name, d in want.items():
        torch.testing.assert_close(applied[name], d, rtol=1e-6, atol=1e-9)
