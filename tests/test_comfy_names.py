"""The comfy and kohya outputs for Hunyuan Video, Wan and Flux use names ComfyUI's LoRA loader
maps. The expected names are built here from facts read in ComfyUI's source (no code taken):

* Module names of ComfyUI's own models. Wan (comfy/ldm/wan/model.py, "original version" of
  Wan2.1's wan/modules/model.py): the official names. Flux (comfy/ldm/flux): BFL's names.
  Hunyuan Video (comfy/ldm/hunyuan_video/model.py, "based on Flux code"): Flux's
  DoubleStreamBlock/SingleStreamBlock (img_attn.qkv, img_attn.proj, img_mlp.0/.2, img_mod.lin,
  modulation.lin), MLPEmbedder (in_layer/out_layer) for time_in, vector_in, guidance_in and the
  token refiner's t_embedder/c_embedder, TokenRefinerBlock with self_attn.qkv, self_attn.proj,
  mlp.0/.2, adaLN_modulation.1; img_in.proj; final_layer.linear and adaLN_modulation.1.
* comfy/lora.py, model_lora_keys_unet: for every weight ``diffusion_model.K.weight`` of the
  model, keys ``lora_unet_`` + K with '.' -> '_' and ``diffusion_model.`` + K; for Hunyuan
  Video also diffusion-pipe's names: K with "_mod.lin." -> "_mod.linear.", "_attn.qkv." ->
  "_attn_qkv.", "_attn.proj." -> "_attn_proj.", "mlp.0." -> "mlp.fc1.", "mlp.2." -> "mlp.fc2.",
  ".modulation.lin." -> ".modulation.linear." (applied to the key with its ".weight"), as
  ``transformer.`` + K' and ``diffusion_model.`` + K'.
* comfy/weight_adapter/lora.py: a module's factors are ``.lora_up.weight``/``.lora_down.weight``
  or ``.lora_B.weight``/``.lora_A.weight``, with an optional ``.alpha``.
"""

import re

import pytest

from loraport import formats
from loraport.testing import tiny

_SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".lora_A.weight", ".lora_B.weight", ".alpha")


def comfy_hunyuan_name(tencent: str) -> str:
    """ComfyUI's module name for a Tencent Hunyuan Video module name (facts above)."""
    rules = [
        (r"^(time_in|guidance_in|txt_in\.t_embedder)\.mlp\.0$", r"\1.in_layer"),
        (r"^(time_in|guidance_in|txt_in\.t_embedder)\.mlp\.2$", r"\1.out_layer"),
        (r"^txt_in\.c_embedder\.linear_1$", "txt_in.c_embedder.in_layer"),
        (r"^txt_in\.c_embedder\.linear_2$", "txt_in.c_embedder.out_layer"),
        (r"_attn_qkv$", "_attn.qkv"),
        (r"_attn_proj$", "_attn.proj"),
        (r"mlp\.fc1$", "mlp.0"),
        (r"mlp\.fc2$", "mlp.2"),
        (r"_mod\.linear$", "_mod.lin"),
        (r"\.modulation\.linear$", ".modulation.lin"),
    ]
    for pattern, repl in rules:
        name, n = re.subn(pattern, repl, tencent)
        if n:
            return name
    return tencent


def comfy_key_map(arch: str, comfy_modules: list[str]) -> set[str]:
    """The LoRA module keys model_lora_keys_unet builds for a model with these module names."""
    keys = set()
    for k in comfy_modules:
        keys |= {"lora_unet_" + k.replace(".", "_"), "diffusion_model." + k}
        if arch == "hunyuan-video":
            full = "diffusion_model." + k + ".weight"
            for old, new in (("_mod.lin.", "_mod.linear."), ("_attn.qkv.", "_attn_qkv."), ("_attn.proj.", "_attn_proj."),
                             ("mlp.0.", "mlp.fc1."), ("mlp.2.", "mlp.fc2."), (".modulation.lin.", ".modulation.linear.")):  # fmt: skip
                full = full.replace(old, new)
            stem = full[len("diffusion_model.") : -len(".weight")]
            keys |= {"transformer." + stem, "diffusion_model." + stem}
    return keys


def original_modules(arch: str) -> list[str]:
    """Every adaptable module of the family, original names, embedders included (diffusers' tiny
    models give the full set; the Hunyuan one is I2V-free T2V with a guidance embedder)."""
    diffusers = pytest.importorskip("diffusers")
    if arch == "hunyuan-video":
        model = diffusers.HunyuanVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
            num_single_layers=1, num_refiner_layers=1, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4),
        )  # fmt: skip
    elif arch == "wan":
        model = diffusers.WanTransformer3DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16, freq_dim=16,
            ffn_dim=32, num_layers=1, image_dim=16, added_kv_proj_dim=16, rope_max_seq_len=32,
        )  # fmt: skip
    else:
        model = diffusers.FluxTransformer2DModel(
            in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
        )  # fmt: skip
    weights = tiny.to_original_names(arch, {k: v.detach() for k, v in model.state_dict().items()})
    return weights, tiny.lora_targets(arch, weights)


@pytest.mark.parametrize("arch", ["hunyuan-video", "wan", "flux"])
@pytest.mark.parametrize("fmt", ["comfy", "kohya"])
def test_every_module_name_is_one_comfyui_maps(arch, fmt):
    weights, modules = original_modules(arch)
    comfy_modules = [comfy_hunyuan_name(m) for m in modules] if arch == "hunyuan-video" else modules
    key_map = comfy_key_map(arch, comfy_modules)
    sd = tiny.lora(arch, weights, fmt=fmt, rank=2)
    stems = {next(k[: -len(s)] for s in _SUFFIXES if k.endswith(s)) for k in sd}
    assert len(stems) == len(modules)
    unmapped = sorted(stems - key_map)
    if arch == "hunyuan-video" and fmt == "kohya":
        # Musubi Tuner's names, kept for the tools that train and run them: ComfyUI maps only its
        # own names under lora_unet_, so these need --format comfy for ComfyUI (README).
        assert unmapped and all(re.search(r"(_mod_linear|_mlp_fc[12]|modulation_linear|mlp_[02]|linear_[12])$", s)
                                for s in unmapped), unmapped  # fmt: skip
    else:
        assert unmapped == []
    # and loraport reads its own comfy names back as the same modules
    back = formats.read_lora(sd, arch=arch)
    assert back.format == fmt and sorted(m.name for m in back.modules) == sorted(modules)
    assert all(m.known for m in back.modules)
