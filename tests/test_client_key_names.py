"""loraport's key maps against diffusers itself: the expected side of every check here comes from
diffusers' model classes at tiny configs and from its own converters, never from loraport's maps.

* Base weights: the original names loraport gives a model's weights (Tencent, BFL, Wan, LDM) are
  what diffusers' single-file converters (diffusers/loaders/single_file_utils.py) read back onto
  the model class's own keys, bit for bit, and loraport reads them the same way.
* LoRAs: a LoRA over every adaptable module, in the layout a trainer writes (kohya / Musubi for
  Flux and Wan, diffusion-pipe's ``diffusion_model.`` + Tencent names for Hunyuan Video, ComfyUI's
  ``diffusion_model.`` + Wan names), means to diffusers' own LoRA loader
  (``<Pipeline>.lora_state_dict``, diffusers/loaders/lora_conversion_utils.py) what it means to
  loraport: the same PEFT module names, which are the model class's Linear/Conv modules, and the
  same ΔW per module; and loraport's diffusers file converts back to the input exactly.

Where diffusers' converter itself gets a module wrong, the module is left out and the comment
says how (SDXL's kohya names are checked the same way in test_diffusers_consumer.py)."""

import pytest
import torch
from clients import (
    adaptable_modules,
    assert_same_deltas,
    check_original_names,
    flux,
    hunyuan_video,
    lora_deltas,
    random_weights,
    sd15_unet,
    sdxl_unet,
    wan,
)

from loraport import formats
from loraport.testing import tiny

pytestmark = pytest.mark.usefixtures("one_thread")
diffusers = pytest.importorskip("diffusers")

MODELS = {
    "hunyuan-video": hunyuan_video,
    "hunyuan-video (I2V, 33 channels)": lambda: hunyuan_video(in_channels=9, image_condition_type="latent_concat"),
    "flux": flux,
    "flux (schnell, no guidance)": lambda: flux(guidance_embeds=False),
    "wan": wan,
    "wan (I2V)": lambda: wan(in_channels=9, image_dim=16, added_kv_proj_dim=16),
    "sd15": sd15_unet,
    "sdxl": sdxl_unet,
}


@pytest.mark.parametrize("name", list(MODELS))
def test_original_names_are_what_diffusers_single_file_converters_read(name):
    model = MODELS[name]()
    check_original_names(name.split(" ")[0], model, random_weights(model))


def _kohya_to_diffusers_round_trip(lora_in: formats.LoraFile, arch: str) -> None:
    """loraport's diffusers file, read back and written as kohya, is the input exactly (fused
    layers rebuilt from their split parts)."""
    back = formats.read_lora(
        formats.state_dict(formats.read_lora(formats.state_dict(lora_in, "diffusers"), arch=arch), "kohya"), arch=arch
    )
    want = {m.name: m for m in lora_in.modules}
    assert sorted(m.name for m in back.modules) == sorted(want)
    for m in back.modules:
        (u1, d1), (u2, d2) = m.factors(), want[m.name].factors()
        torch.testing.assert_close(
            u1.double().flatten(1) @ d1.double().flatten(1), u2.double().flatten(1) @ d2.double().flatten(1)
        )


@pytest.mark.parametrize("guidance", [True, False])
def test_kohya_flux_lora_means_to_diffusers_what_it_means_to_loraport(guidance):
    """FluxPipeline.lora_state_dict on a kohya (sd-scripts) Flux LoRA over every module: fused
    qkv and linear1 split by rows, final_layer.adaLN_modulation.1's halves swapped."""
    model = flux(guidance_embeds=guidance)
    weights = tiny.to_original_names("flux", random_weights(model))  # names checked in the test above
    rank = 2
    final = [n for n in tiny.lora_targets("flux", weights) if n.startswith("final_layer.")]
    rest = [n for n in tiny.lora_targets("flux", weights) if n not in final]
    # diffusers drops the alpha of final_layer modules (assign_remaining_weights, "TODO: alphas"):
    # those get alpha = rank (scale 1); every other module a scale of 0.75
    sd = {
        **tiny.lora("flux", real_rows(weights), fmt="kohya", rank=rank, alpha=1.5, modules=rest),
        **tiny.lora("flux", real_rows(weights), fmt="kohya", rank=rank, alpha=float(rank), modules=final, seed=4),
    }
    theirs = lora_deltas(diffusers.FluxPipeline.lora_state_dict(dict(sd)), prefix="transformer.")
    lora_in = formats.read_lora(sd, arch="flux")
    ours = lora_deltas(formats.state_dict(lora_in, "diffusers"), prefix="transformer.")
    assert set(theirs) == adaptable_modules(model)
    assert_same_deltas(theirs, ours)
    _kohya_to_diffusers_round_trip(lora_in, "flux")


def real_rows(original: dict) -> dict:
    """Original-named Flux / Hunyuan weights whose single blocks' linear1 has the real row count
    (3 · 3072 + 4 · 3072), which diffusers' LoRA converters split at (clients.py)."""
    out = dict(original)
    for k, v in original.items():
        if k.startswith("single_blocks.") and ".linear1." in k:
            out[k] = torch.zeros((7 * 3072, *v.shape[1:]))
    return out


def test_diffusion_pipe_hunyuan_lora_means_to_diffusers_what_it_means_to_loraport():
    """HunyuanVideoPipeline.lora_state_dict on a diffusion-pipe LoRA (``diffusion_model.`` +
    Tencent names, PEFT factors) over every module of the T2V model, and loraport reading the same
    file: the same diffusers modules and ΔW."""
    model = hunyuan_video()
    weights = real_rows(tiny.to_original_names("hunyuan-video", random_weights(model)))
    kohya = formats.read_lora(tiny.lora("hunyuan-video", weights, fmt="kohya", rank=2, alpha=1.5), arch="hunyuan-video")
    # Left out, as diffusers' _convert_hunyuan_video_lora_to_diffusers mishandles them: the token
    # refiner's self_attn_qkv (remap_txt_in_ chunks lora_A into three like lora_B) and
    # final_layer.adaLN_modulation.1 (remap_norm_scale_shift_ swaps the halves of lora_A's rank
    # rows too, which changes ΔW). The halves swap of that layer is checked for Flux above.
    skip = ("self_attn_qkv", "final_layer.adaLN_modulation.1")
    sd = {}
    for m in kohya.modules:
        if not m.name.endswith(skip):
            up, down = m.factors()
            sd[f"diffusion_model.{m.name}.lora_A.weight"], sd[f"diffusion_model.{m.name}.lora_B.weight"] = down, up
    theirs = lora_deltas(diffusers.HunyuanVideoPipeline.lora_state_dict(dict(sd)), prefix="transformer.")
    lora_in = formats.read_lora(sd, arch="hunyuan-video")
    assert sorted(m.name for m in lora_in.modules) == sorted(m.name for m in kohya.modules if not m.name.endswith(skip))
    ours = lora_deltas(formats.state_dict(lora_in, "diffusers"), prefix="transformer.")
    left_out = {"norm_out.linear"} | {
        n for n in adaptable_modules(model) if ".refiner_blocks." in n and ".attn.to_" in n and "to_out" not in n
    }
    assert set(theirs) == adaptable_modules(model) - left_out
    assert_same_deltas(theirs, ours)
    _kohya_to_diffusers_round_trip(kohya, "hunyuan-video")


@pytest.mark.parametrize("fmt", ["kohya", "comfy"])
def test_wan_lora_means_to_diffusers_what_it_means_to_loraport(fmt):
    """WanPipeline.lora_state_dict on a Musubi Tuner LoRA (``lora_unet_`` + Wan names, with alpha)
    and on a ComfyUI one (``diffusion_model.`` + Wan names): the same diffusers modules and ΔW as
    loraport's. Musubi trains the blocks only (diffusers' _convert_musubi_wan_lora_to_diffusers
    refuses anything else); diffusers' _convert_non_diffusers_wan_lora_to_diffusers has no rule for
    patch_embedding and keeps alpha only for block modules, so the ComfyUI file is written
    without alpha and without patch_embedding."""
    model = wan(in_channels=9, image_dim=16, added_kv_proj_dim=16)
    weights = tiny.to_original_names("wan", random_weights(model))
    targets = tiny.lora_targets("wan", weights)
    if fmt == "kohya":
        sd = tiny.lora(
            "wan", weights, fmt="kohya", rank=2, alpha=1.5, modules=[n for n in targets if n.startswith("blocks.")]
        )
        want = {n for n in adaptable_modules(model) if n.startswith("blocks.")}
    else:
        sd = tiny.lora(
            "wan", weights, fmt="comfy", rank=2, alpha=None, modules=[n for n in targets if n != "patch_embedding"]
        )
        want = adaptable_modules(model) - {"patch_embedding"}
    theirs = lora_deltas(diffusers.WanPipeline.lora_state_dict(dict(sd)), prefix="transformer.")
    ours = lora_deltas(formats.state_dict(formats.read_lora(sd, arch="wan"), "diffusers"), prefix="transformer.")
    assert set(theirs) == want
    assert_same_deltas(theirs, ours)
