"""Architecture key maps: detection from key names, kohya name resolution, fused <-> split
translation of base weights, for every family. Whether the names and layouts are the clients'
is checked against diffusers' converters (test_client_key_names.py) and ComfyUI's key maps
(test_comfy_names.py)."""

import re

import pytest
import torch
from safetensors.torch import save_file

from loraport import archs, formats, reference
from loraport.errors import InputError
from loraport.pipeline import port
from loraport.testing import tiny

pytestmark = pytest.mark.usefixtures("one_thread")


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


def _delta(m: formats.LoraModule) -> torch.Tensor:
    up, down = m.factors()
    return up.double() @ down.double()  # [out, in·kernel]


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """By hand, independent of archs.Piece: [shift; scale] <-> [scale; shift]."""
    h = t.shape[0] // 2
    return torch.cat([t[h:], t[:h]], 0)


def _projected(d: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    U, _, V = reference.svd_truncated(w.double(), k)
    return reference.project_lora_dense(d, torch.eye(d.shape[1], dtype=torch.float64), U, V)


@pytest.mark.parametrize("arch", ["hunyuan-video", "flux"])
def test_final_modulation_halves_swap_between_styles(arch, tmp_path):
    """final_layer.adaLN_modulation.1 rows are (shift, scale); diffusers' norm_out.linear rows
    are (scale, shift). Base weights read across styles and LoRA up factors converted across
    styles swap the halves, in both directions, against a dense float64 reference."""
    name, d_name, k = "final_layer.adaLN_modulation.1", "norm_out.linear", 6
    source = tiny.base_model(arch, width=16)
    target = tiny.related(source)
    source_d, target_d = tiny.to_diffusers_names(arch, source), tiny.to_diffusers_names(arch, target)
    torch.testing.assert_close(target_d[d_name + ".weight"], _swap_halves(target[name + ".weight"]))
    torch.testing.assert_close(target_d[d_name + ".bias"], _swap_halves(target[name + ".bias"]))

    kohya = tiny.lora(arch, source, fmt="kohya", modules=[name], alpha=3.0)
    lora_o = formats.read_lora(kohya, arch=arch)
    lora_d = formats.read_lora(formats.state_dict(lora_o, "diffusers"), arch=arch)
    (mo,), (md,) = lora_o.modules, lora_d.modules
    assert md.name == d_name
    torch.testing.assert_close(_delta(md), _swap_halves(_delta(mo)))  # LoRA up converted
    (back,) = formats.read_lora(formats.state_dict(lora_d, "kohya"), arch=arch).modules
    assert back.name == name
    torch.testing.assert_close(_delta(back), _delta(mo))

    svd = dict(subspace_rank=k, power_iters=6, quiet=True, min_similarity=0.0, variant="target")
    out = str(tmp_path / "o.safetensors")
    # original-named LoRA, diffusers-named target: the target is read back in the LoRA's layout
    # (from a file: each half goes straight from disk to its swapped place)
    port(kohya, source, tiny.save_base(target_d, str(tmp_path / "target_d.safetensors")), out, **svd)
    (got,) = formats.read_lora(out, arch=arch).modules
    assert got.name == name
    want = _projected(_delta(mo), _swap_halves(target_d[d_name + ".weight"]), k)
    assert torch.linalg.matrix_norm(_delta(got) - want) < 1e-3 * torch.linalg.matrix_norm(want)
    # diffusers-named LoRA, original-named bases, written in diffusers names
    port(formats.state_dict(lora_d, "diffusers"), source_d, target, out, format="diffusers", **svd)
    (got,) = formats.read_lora(out, arch=arch).modules
    assert got.name == d_name
    want = _projected(_delta(md), _swap_halves(target[name + ".weight"]), k)
    assert torch.linalg.matrix_norm(_delta(got) - want) < 1e-3 * torch.linalg.matrix_norm(want)
    # the default variant carries the LoRA over: written in diffusers names, its halves swapped
    port(kohya, source, target_d, out, format="diffusers", quiet=True, min_similarity=0.0)
    (got,) = formats.read_lora(out, arch=arch).modules
    assert got.name == d_name
    torch.testing.assert_close(_delta(got), _swap_halves(_delta(mo)))


def test_sdxl_kohya_ldm_unet_and_both_text_encoders(tmp_path):
    """A kohya SDXL LoRA with its real key names (LDM UNet names as sd-scripts writes them,
    lora_te1_/lora_te2_ CLIP names): read, renamed to diffusers keys, round-tripped, and ported
    between diffusers folders (unet/, text_encoder/, text_encoder_2/) against a dense reference."""
    unet = tiny.base_model("sdxl", width=16)  # LDM names
    te1 = tiny.random_weights(tiny.clip_shapes(16), seed=1)
    te2 = tiny.random_weights(tiny.clip_shapes(24, projection=True), seed=2)
    sd = tiny.lora("sdxl", unet, fmt="kohya", alpha=2.0)
    sd.update(tiny.lora("sdxl", te1, fmt="kohya", alpha=2.0, component="te1"))
    sd.update(tiny.lora("sdxl", te2, fmt="kohya", alpha=2.0, component="te2"))
    for key in (
        "lora_unet_input_blocks_8_1_transformer_blocks_1_attn2_to_k.lora_down.weight",  # down 2, attention 1
        "lora_unet_middle_block_2_emb_layers_1.lora_up.weight",  # mid resnet 1 time_emb_proj
        "lora_unet_output_blocks_5_0_skip_connection.alpha",  # up 1, resnet 2 conv_shortcut
        "lora_unet_label_emb_0_0.alpha",  # add_embedding.linear_1
        "lora_te1_text_model_encoder_layers_1_self_attn_q_proj.lora_down.weight",
        "lora_te2_text_model_encoder_layers_0_mlp_fc2.lora_up.weight",
        "lora_te2_text_projection.alpha",
    ):
        assert key in sd, key
    lf = formats.read_lora(sd)
    assert (lf.arch.name, lf.style) == ("sdxl", "original") and all(m.known for m in lf.modules)
    comps = {m.component for m in lf.modules}
    assert comps == {"model", "te1", "te2"}

    dsd = formats.state_dict(lf, "diffusers")
    for key in (
        "unet.down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k.lora_A.weight",
        "unet.mid_block.resnets.1.time_emb_proj.lora_B.weight",
        "unet.up_blocks.1.resnets.2.conv_shortcut.lora_A.weight",
        "unet.add_embedding.linear_1.lora_A.weight",
        "text_encoder.text_model.encoder.layers.1.self_attn.q_proj.lora_A.weight",
        "text_encoder_2.text_model.encoder.layers.0.mlp.fc2.lora_B.weight",
        "text_encoder_2.text_projection.lora_A.weight",
    ):
        assert key in dsd, key
    as_d = formats.read_lora(dsd)
    assert (as_d.arch.name, as_d.style) == ("sdxl", "diffusers")
    # kohya SDXL files in diffusers UNet names exist too: read as such, written back as such
    kohya_d = formats.state_dict(formats.LoraFile(as_d.modules, "kohya", as_d.arch, "diffusers"))
    assert "lora_unet_down_blocks_2_attentions_1_transformer_blocks_1_attn2_to_k.alpha" in kohya_d
    assert formats.read_lora(kohya_d).style == "diffusers"
    assert formats.state_dict(formats.read_lora(kohya_d)).keys() == kohya_d.keys()
    again = formats.state_dict(formats.read_lora(formats.state_dict(as_d, "kohya")), "kohya")
    assert again.keys() == formats.state_dict(lf, "kohya").keys()
    ref = {(m.component, m.name): _delta(m) for m in lf.modules}
    for m in formats.read_lora(again).modules:
        torch.testing.assert_close(_delta(m), ref[(m.component, m.name)])

    def folder(path, unet_w, te1_w, te2_w):
        unet_d = tiny.to_diffusers_names("sdxl", unet_w)
        for sub, w in (("unet", unet_d), ("text_encoder", te1_w), ("text_encoder_2", te2_w)):
            (path / sub).mkdir(parents=True)
            save_file({k: v.contiguous() for k, v in w.items()}, str(path / sub / "model.safetensors"))
        return str(path)

    targets = {"model": tiny.related(unet), "te1": tiny.related(te1), "te2": tiny.related(te2)}
    src = folder(tmp_path / "src", unet, te1, te2)
    tgt = folder(tmp_path / "tgt", *targets.values())
    out = str(tmp_path / "ported.safetensors")
    k = 6
    rep = port(sd, src, tgt, out, subspace_rank=k, power_iters=6, quiet=True, min_similarity=0.0, variant="target")
    assert {r.action for r in rep.rows} == {"ported"} and len(rep.rows) == len(lf.modules)
    ported = formats.read_lora(out)
    assert (ported.format, ported.style) == ("kohya", "original")
    for m in ported.modules:
        w = targets[m.component][m.name + ".weight"].flatten(1)
        want = _projected(ref[(m.component, m.name)], w, k)
        assert torch.linalg.matrix_norm(_delta(m) - want) < 1e-3 * torch.linalg.matrix_norm(want), m.name


def test_llama_has_no_diffusers_format_only_peft():
    weights = tiny.base_model("llama", width=16)
    lf = formats.read_lora(tiny.lora("llama", weights, fmt="peft"))
    with pytest.raises(InputError, match="llama LoRAs have no diffusers format; write them as peft"):
        formats.state_dict(lf, "diffusers")
    keys = formats.state_dict(lf, "peft")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys


def _openclip(clip: dict) -> dict:
    """HF CLIP text-encoder weights under the OpenCLIP names of SDXL's single-file checkpoints
    (Stability's sgm layout, as ComfyUI's supported_models.SDXL writes them back): q, k, v
    fused by rows into attn.in_proj_weight, fc1/fc2 as mlp.c_fc/c_proj, text_projection [d, proj]."""
    out = {}
    for k, v in clip.items():
        m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.*)", k)
        if k == "text_projection.weight":
            out["text_projection"] = v.mT.contiguous()
        elif k == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = v
        elif m and m.group(2).startswith("self_attn.q_proj."):
            leaf = m.group(2).rsplit(".", 1)[1]
            parts = [clip[f"text_model.encoder.layers.{m.group(1)}.self_attn.{x}_proj.{leaf}"] for x in "qkv"]
            out[f"transformer.resblocks.{m.group(1)}.attn.in_proj_{leaf}"] = torch.cat(parts, 0)
        elif m:
            rest = m.group(2)
            for hf, oc in (("self_attn.out_proj.", "attn.out_proj."), ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."),
                           ("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2.")):  # fmt: skip
                if rest.startswith(hf):
                    out[f"transformer.resblocks.{m.group(1)}.{oc}{rest[len(hf):]}"] = v
    return out


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_single_file_ldm_checkpoints_with_packed_text_encoders(arch, tmp_path):
    """Stability's single-file layout: UNet under model.diffusion_model. (LDM names), the CLIP
    text encoder under cond_stage_model.transformer. (SD 1.x) or conditioner.embedders.0.transformer.
    (SDXL), SDXL's second one under conditioner.embedders.1.model. in OpenCLIP names (fused
    in_proj, c_fc/c_proj, text_projection stored transposed). A kohya LoRA (SD 1.5: diffusers
    names and lora_te_; SDXL: LDM names and lora_te1_, lora_te2_ in CLIP names) ports from one
    such file to another, every module of all three components included."""
    xl = arch == "sdxl"
    unet, te1 = tiny.base_model(arch, width=16), tiny.random_weights(tiny.clip_shapes(16), seed=1)
    sd = tiny.lora(arch, unet, fmt="kohya", alpha=2.0)
    sd.update(tiny.lora(arch, te1, fmt="kohya", alpha=2.0, component="te1"))
    te_prefix = "conditioner.embedders.0.transformer." if xl else "cond_stage_model.transformer."
    if xl:
        te2 = tiny.random_weights(tiny.clip_shapes(24, projection=True), seed=2)
        sd.update(tiny.lora(arch, te2, fmt="kohya", alpha=2.0, component="te2"))
        assert "lora_te2_text_model_encoder_layers_0_self_attn_k_proj.alpha" in sd and "lora_te2_text_projection.alpha" in sd
    assert any(k.startswith("lora_te1_" if xl else "lora_te_") for k in sd)
    assert any(k.startswith("lora_unet_input_blocks_" if xl else "lora_unet_down_blocks_") for k in sd)

    def checkpoint(path, unet_w, te_w, te2_w=None):
        w = {"model.diffusion_model." + k: v for k, v in unet_w.items()}
        w.update({te_prefix + k: v for k, v in te_w.items()})
        w.update({"conditioner.embedders.1.model." + k: v for k, v in _openclip(te2_w or {}).items()})
        w["first_stage_model.decoder.conv_in.weight"] = torch.randn(4, 4, 3, 3)  # the VAE, not adapted
        return tiny.save_base(w, str(path))

    targets = {"model": tiny.related(unet), "te1": tiny.related(te1)}
    if xl:
        targets["te2"] = tiny.related(te2)
    src = checkpoint(tmp_path / "src.safetensors", unet, te1, te2 if xl else None)
    tgt = checkpoint(tmp_path / "tgt.safetensors", *targets.values())
    out, k = str(tmp_path / "ported.safetensors"), 6
    rep = port(sd, src, tgt, out, subspace_rank=k, power_iters=6, quiet=True, min_similarity=0.0, variant="target")
    lf = formats.read_lora(sd)
    ref = {(m.component, m.name): _delta(m) for m in lf.modules}
    assert {r.action for r in rep.rows} == {"ported"}
    ported = formats.read_lora(out)
    assert ported.style == lf.style == ("original" if xl else "diffusers")
    assert {m.component for m in ported.modules} == ({"model", "te1", "te2"} if xl else {"model", "te1"})
    a = lf.arch
    for m in ported.modules:
        (piece,) = a.translate(m.name, lf.style, "original") if m.component == "model" else [archs.Piece(m.name)]
        w = targets[m.component][piece.name + ".weight"].flatten(1)
        want = _projected(ref[(m.component, m.name)], w, k)
        assert torch.linalg.matrix_norm(_delta(m) - want) < 1e-3 * torch.linalg.matrix_norm(want), m.name

    # ComfyUI files hold the UNet only: a LoRA whose text-encoder modules would be written is
    # refused before any SVD; between UNet-only checkpoints those modules are "missing" and the
    # UNet part is written.
    with pytest.raises(InputError, match="the comfy format has no key prefix for component 'te1'"):
        port(sd, src, tgt, out, format="comfy", quiet=True)
    src_unet = checkpoint(tmp_path / "src_unet.safetensors", unet, {})
    tgt_unet = checkpoint(tmp_path / "tgt_unet.safetensors", targets["model"], {})
    rep = port(sd, src_unet, tgt_unet, out, format="comfy", quiet=True)
    assert {r.action for r in rep.rows} == {"ported", "missing"}
    assert {m.component for m in formats.read_lora(out).modules} == {"model"}
