"""Architecture key maps: detection from key names, kohya name resolution, fused <-> split
translation of base weights, for every family."""

import pytest
import torch

from loraport import archs, formats, tiny


@pytest.mark.parametrize("arch", list(archs.ARCHS))
def test_detect_every_family_from_its_lora(arch):
    weights = tiny.base_model(arch, width=16)
    fmt = "peft" if arch == "llama" else "kohya"
    sd = tiny.lora(arch, weights, fmt=fmt)
    base_names = [k[: -len(".weight")] for k in weights if k.endswith(".weight")]
    lf = formats.read_lora(sd, base_names=base_names)
    assert lf.arch.name == arch
    assert all(m.known for m in lf.modules)
    assert archs.detect([], base_names).name == arch


def test_hunyuan_and_flux_share_kohya_names_until_the_base_decides():
    names = [("model", "double_blocks_0_img_attn_qkv", True), ("model", "single_blocks_0_linear1", True)]
    with pytest.raises(ValueError, match="cannot tell hunyuan-video from flux"):
        archs.detect(names)
    flux_base = [k[: -len(".weight")] for k in tiny.shapes("flux") if k.endswith(".weight")]
    assert archs.detect(names, flux_base).name == "flux"
    assert archs.FLUX.resolve_underscored("model", "double_blocks_0_img_attn_qkv") == "double_blocks.0.img_attn.qkv"
    assert (
        archs.HUNYUAN_VIDEO.resolve_underscored("model", "double_blocks_0_img_attn_qkv")
        == "double_blocks.0.img_attn_qkv"
    )


def test_unknown_names_are_not_guessed():
    assert archs.HUNYUAN_VIDEO.resolve_underscored("model", "double_blocks_0_img_attn_qkvx") is None
    assert archs.SD15.resolve_underscored(
        "model", "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    ) == ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0")
    with pytest.raises(ValueError, match="no known architecture"):
        archs.detect([("model", "encoder.block.0.layer.0.SelfAttention.q", False)])


def test_translate_fused_and_split_both_ways():
    a = archs.HUNYUAN_VIDEO
    pieces = a.translate("single_blocks.3.linear1", "original", "diffusers")
    assert [p.name for p in pieces] == [
        "single_transformer_blocks.3.attn.to_q",
        "single_transformer_blocks.3.attn.to_k",
        "single_transformer_blocks.3.attn.to_v",
        "single_transformer_blocks.3.proj_mlp",
    ]
    (slice_,) = a.translate("single_transformer_blocks.3.proj_mlp", "diffusers", "original")
    assert slice_.name == "single_blocks.3.linear1"
    assert slice_.rows(7 * 16) == slice(48, 112)  # q, k, v: 16 rows each; mlp: 64
    (final,) = a.translate("final_layer.adaLN_modulation.1", "original", "diffusers")
    assert final.name == "norm_out.linear" and final.swap_halves
    (back,) = a.translate("norm_out.linear", "diffusers", "original")
    assert back.name == "final_layer.adaLN_modulation.1" and back.swap_halves
    assert (
        archs.WAN.translate("blocks.2.cross_attn.k_img", "original", "diffusers")[0].name == "blocks.2.attn2.add_k_proj"
    )


@pytest.mark.parametrize("arch", ["hunyuan-video", "flux", "wan", "sd15", "sdxl"])
def test_diffusers_names_cover_the_original_weights(arch):
    """Every adaptable original weight is the row concatenation of its diffusers pieces."""
    original = tiny.base_model(arch, width=16)
    diffusers = tiny.to_diffusers_names(arch, original)
    a = archs.get(arch)
    for name in tiny.lora_targets(arch, original):
        pieces = a.translate(name, "original", "diffusers")
        rebuilt = torch.cat([p.arrange(diffusers[p.name + ".weight"]) for p in pieces], 0)
        torch.testing.assert_close(rebuilt, original[name + ".weight"])
    back = tiny.to_original_names(arch, diffusers)
    for key, w in back.items():  # and back again, exactly
        torch.testing.assert_close(w, original[key], rtol=0, atol=0)
