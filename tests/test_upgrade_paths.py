"""The upgrade paths people take, end to end on tiny fixtures with the real key names and the real
shape relations of both sides (README, "Upgrade paths"): a Musubi-style kohya LoRA on every
adaptable module of the old release, in the original naming of the authors' checkpoint (Tencent,
Wan, BFL, Stability's LDM UNet), ported onto the new release as diffusers' own model class names
it (a tiny config of HunyuanVideoTransformer3DModel, HunyuanVideoFramepackTransformer3DModel,
WanTransformer3DModel, FluxTransformer2DModel, UNet2DConditionModel), written as a diffusers LoRA
and loaded into that model with ``load_lora_adapter``: no key unexpected or missing. The source's
original names are checked first against diffusers' own single-file converter. Per path the
test asserts what happens to each module group: carried ("ported", ΔW unchanged), padded (new
input channels get zero columns), dropped and listed ("missing" rows), or refused (one line).

Shape relations, real -> tiny: HunyuanVideo-I2V img_in 16 -> 33 channels (2 · 16 + 1: latent,
image latent, mask) -> 4 -> 9; SkyReels-V1 I2V 16 -> 32 -> 4 -> 8; Flux Fill x_embedder 64 -> 384
-> 8 -> 48; Wan 2.1 1.3B (dim 1536, 12 heads) vs Wan 2.2 TI2V-5B (dim 3072, 24 heads, 48 latent
channels) -> width 16 vs 32; SSD-1B keeps 4 of SDXL's 10 transformer blocks in the innermost
attentions (ComfyUI comfy/supported_models.py, SSD1B.unet_config transformer_depth
[0, 0, 2, 2, 4, 4] against SDXL's [0, 0, 2, 2, 10, 10]) -> 2 -> 1; Wan 2.2 I2V A14B has no
image cross-attention (no CLIP image input: no attn2.add_k_proj/add_v_proj, no image embedder)."""

import logging
import os

import pytest
import torch
from clients import original_names
from conftest import WarningsCollector
from safetensors.torch import load_file, save_file

from loraport import formats
from loraport.cli import main
from loraport.errors import InputError
from loraport.pipeline import port
from loraport.testing import tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def diffusers():
    pytest.importorskip("peft")  # load_lora_adapter injects the LoRA layers with PEFT
    return pytest.importorskip("diffusers")


def hunyuan(model="HunyuanVideoTransformer3DModel", **kw):
    cfg = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
               num_single_layers=2, num_refiner_layers=1, text_embed_dim=16, pooled_projection_dim=8,
               rope_axes_dim=(2, 2, 4))  # fmt: skip
    return getattr(diffusers(), model)(**{**cfg, **kw})


def wan(**kw):
    cfg = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16,
               freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)  # fmt: skip
    return diffusers().WanTransformer3DModel(**{**cfg, **kw})


def flux(**kw):
    cfg = dict(in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
               joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(2, 2, 4))  # fmt: skip
    return diffusers().FluxTransformer2DModel(**{**cfg, **kw})


def sdxl_unet(transformer_layers=(1, 1, 2)):
    return diffusers().UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=transformer_layers, cross_attention_dim=16, attention_head_dim=(2, 4, 4),
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=32,
        use_linear_projection=True,
    )  # fmt: skip


def weights(model, seed=0) -> dict[str, torch.Tensor]:
    """Decaying-spectrum weights under the model's own (diffusers) names."""
    return tiny.random_weights({k: v.shape for k, v in model.state_dict().items()}, seed=seed)


def released(arch: str, model, seed=0) -> tuple[dict, dict]:
    """A release as its weights under ``model``'s diffusers names and under the original names of
    the authors' checkpoint (Tencent, Wan, BFL, LDM), the latter checked first against diffusers'
    own single-file converter (clients.check_original_names)."""
    w = weights(model, seed)
    return w, original_names(arch, model, w)


def load_into(model, target: dict, path: str, prefix: str) -> None:
    """Load the target weights and the ported diffusers LoRA into ``model``; every key consumed
    (diffusers warns about unexpected or missing LoRA keys; its logger does not reach caplog)."""
    model.load_state_dict(target)
    from peft.tuners.lora import LoraLayer

    log, warnings = logging.getLogger("diffusers"), WarningsCollector()
    log.addHandler(warnings)
    try:
        model.load_lora_adapter(load_file(path), prefix=prefix, adapter_name="ported")
    finally:
        log.removeHandler(warnings)
    assert not [w for w in warnings.messages if "unexpected" in w or "missing" in w], warnings.messages
    injected = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert injected == {m.name for m in formats.read_lora(path).modules}


def diffusers_folder(path, model, weights: dict) -> str:
    """``weights`` saved as a diffusers folder of ``model``'s class: config.json and weights in
    transformer/ (unet/ for a UNet), as the release is downloaded."""
    sub = os.path.join(path, "unet" if type(model).__name__.startswith("UNet") else "transformer")
    os.makedirs(sub)
    model.save_config(sub)
    save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(sub, "diffusion_pytorch_model.safetensors"))
    return str(path)


def run(tmp_path, arch, source, target, model, name="out"):
    """Port a Musubi-style kohya LoRA (every adaptable module of ``source``, original names) to
    ``target`` (saved as a diffusers folder of ``model``'s class) as a diffusers LoRA: (report,
    {module: action}, input LoRA, output path). The port's own check of its output used
    diffusers' loader on the target's config and found every key consumed, every shape fitting."""
    lora_sd = tiny.lora(arch, source, fmt="kohya", rank=4, alpha=2.0)
    out = str(tmp_path / f"{name}.safetensors")
    folder = diffusers_folder(tmp_path / f"{name}_target", model, target)
    rep = port(lora_sd, source, folder, out, arch=arch, format="diffusers", quiet=True)
    assert rep.check["method"].startswith("diffusers"), rep.check["method"]
    assert (rep.check["unconsumed"], rep.check["misfits"], rep.check["error"]) == ([], [], None)
    assert rep.check["keys"] == len(load_file(out))
    return rep, {r.module: r.action for r in rep.rows}, formats.read_lora(lora_sd, arch=arch), out


def delta(m: formats.LoraModule) -> torch.Tensor:
    up, down = m.factors()
    return up.double() @ down.double()


def assert_carried(lora_in, out, arch, padded=()):
    """Every module of the output holds the input's ΔW (split into diffusers parts), padded
    modules with zero columns for the new input channels."""
    got = {m.name: m for m in formats.read_lora(out, arch=arch).modules}
    want = {m.name: m for m in formats.convert_style(lora_in, "diffusers")}
    for name, m in got.items():
        d_out, d_in = delta(m), delta(want[name])
        channels = want[name].down.shape[1]
        assert (m.down.shape[1] > channels) == (name in padded), name
        if name in padded:
            per_channel = d_out.unflatten(1, (m.down.shape[1], -1))  # [out, channels, kernel]
            assert per_channel[:, channels:].abs().max() == 0, name  # new channels: no update
            d_out = per_channel[:, :channels].flatten(1)
        assert torch.allclose(d_out, d_in, rtol=1e-6, atol=1e-7), name


# --- Hunyuan Video T2V -> HunyuanVideo-I2V, SkyReels-V1 I2V, FramePack --------------------------


@pytest.mark.parametrize("release, channels", [("hunyuanvideo-i2v", 9), ("skyreels-v1-i2v", 8)])
def test_hunyuan_t2v_to_i2v_pads_img_in(tmp_path, release, channels):
    t2v, source = released("hunyuan-video", hunyuan())  # source: Tencent's checkpoint names
    cfg = dict(image_condition_type="latent_concat") if release == "hunyuanvideo-i2v" else {}
    model = hunyuan(in_channels=channels, **cfg)
    target = tiny.widen_input(tiny.related(t2v), "x_embedder.proj.weight", channels)
    rep, actions, lora_in, out = run(tmp_path, "hunyuan-video", source, target, model)
    assert actions.pop("img_in.proj") == "padded"
    assert set(actions.values()) == {"ported"}
    assert_carried(lora_in, out, "hunyuan-video", padded={"x_embedder.proj"})
    load_into(model, target, out, "transformer")


def test_hunyuan_t2v_to_i2v_token_replace_and_framepack_carry_everything(tmp_path):
    """HunyuanVideo-I2V "fixed" (token_replace: T2V shapes) and FramePack (T2V's transformer
    plus clean_x_embedder and image_projection, which the T2V LoRA has nothing for)."""
    t2v, source = released("hunyuan-video", hunyuan())
    for name, model in (
        ("token-replace", hunyuan(image_condition_type="token_replace")),
        ("framepack", hunyuan("HunyuanVideoFramepackTransformer3DModel", image_proj_dim=16, has_image_proj=True,
                              has_clean_x_embedder=True)),
    ):  # fmt: skip
        own = weights(model, seed=5)
        target = {**own, **tiny.related(t2v)}  # FramePack's new modules: weights of their own
        rep, actions, lora_in, out = run(tmp_path, "hunyuan-video", source, target, model, name)
        assert set(actions.values()) == {"ported"}, name
        assert_carried(lora_in, out, "hunyuan-video")
        load_into(model, target, out, "transformer")


# --- Wan ----------------------------------------------------------------------------------------


def test_wan21_t2v_to_wan22_t2v_a14b_both_experts(tmp_path):
    """Wan 2.2 A14B: two experts (high-noise, low-noise), each with Wan 2.1 14B's shapes."""
    w21, source = released("wan", wan())
    for seed in (1, 2):  # the high-noise and the low-noise expert
        target = tiny.related(w21, seed=seed)
        rep, actions, lora_in, out = run(tmp_path, "wan", source, target, wan(), f"expert{seed}")
        assert set(actions.values()) == {"ported"}
        assert_carried(lora_in, out, "wan")
        load_into(wan(), target, out, "transformer")


def test_wan21_i2v_to_wan22_i2v_drops_and_lists_image_cross_attention(tmp_path):
    w21, source = released("wan", wan(in_channels=9, image_dim=16, added_kv_proj_dim=16))
    assert "blocks.0.cross_attn.k_img.weight" in source and "img_emb.proj.1.weight" in source
    model = wan(in_channels=9)  # Wan 2.2 I2V A14B: same 36 input channels, no image cross-attention
    target = tiny.related({k: v for k, v in w21.items() if k in model.state_dict()})
    rep, actions, lora_in, out = run(tmp_path, "wan", source, target, model)
    dropped = {m for m, a in actions.items() if a == "missing"}
    assert dropped == {f"blocks.{i}.cross_attn.{x}" for i in range(2) for x in ("k_img", "v_img")} | {
        "img_emb.proj.1", "img_emb.proj.3"}  # fmt: skip
    assert {a for m, a in actions.items() if m not in dropped} == {"ported"}
    table = rep.table()
    for name in dropped:  # listed, with the reason
        assert f"missing        {name}" in table
    assert_carried(lora_in, out, "wan")
    load_into(model, target, out, "transformer")


def test_wan21_1_3b_to_wan22_ti2v_5b_is_refused_naming_the_widths(tmp_path, capsys):
    _, small = released("wan", wan())  # 2 heads x 8 = 16 (1.3B: 12 x 128 = 1536)
    big = weights(wan(num_attention_heads=4, in_channels=12, out_channels=12, ffn_dim=64), seed=1)  # 5B: 24 x 128
    lora_sd = tiny.lora("wan", small, fmt="kohya", rank=4)
    with pytest.raises(InputError, match="width 16 and the target .* width 32") as e:
        port(lora_sd, small, big, str(tmp_path / "out.safetensors"), quiet=True)
    assert "\n" not in str(e.value)
    paths = {n: str(tmp_path / f"{n}.safetensors") for n in ("lora", "small", "big")}
    for n, sd in (("lora", lora_sd), ("small", small), ("big", big)):
        tiny.save_base(sd, paths[n])
    out = tmp_path / "cli.safetensors"
    assert main(["port", paths["lora"], "--source", paths["small"], "--target", paths["big"], "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "width 16" in err and "width 32" in err and not out.exists()


# --- Flux ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("release", ["kontext", "krea", "schnell", "fill"])
def test_flux_dev_to(tmp_path, release):
    dev, source = released("flux", flux())  # source: BFL names
    if release == "fill":  # x_embedder 64 -> 384 input channels (image, mask latents concatenated)
        model = flux(in_channels=48, out_channels=8)
        target = tiny.widen_input(tiny.related(dev), "x_embedder.weight", 48)
    elif release == "schnell":  # no guidance embedder
        model = flux(guidance_embeds=False)
        target = {k: v for k, v in tiny.related(dev).items() if "guidance_embedder" not in k}
    else:  # Kontext and Krea: dev's shapes
        model, target = flux(), tiny.related(dev, seed=3 if release == "krea" else 1)
    rep, actions, lora_in, out = run(tmp_path, "flux", source, target, model)
    if release == "fill":
        assert actions.pop("img_in") == "padded"
    if release == "schnell":
        assert {m: actions.pop(m) for m in ("guidance_in.in_layer", "guidance_in.out_layer")} == {
            "guidance_in.in_layer": "missing", "guidance_in.out_layer": "missing"}  # fmt: skip
    assert set(actions.values()) == {"ported"}
    assert_carried(lora_in, out, "flux", padded={"x_embedder"} if release == "fill" else ())
    load_into(model, target, out, "transformer")


# --- SDXL ---------------------------------------------------------------------------------------


@pytest.mark.slow  # two ports of a 3-level UNet: ~10 s on the 2-core VM
def test_sdxl_to_ssd1b_lists_the_removed_blocks_and_to_a_finetune_carries_all(tmp_path):
    sdxl, source = released("sdxl", sdxl_unet())  # source: LDM names, as kohya SDXL LoRAs use
    ssd = sdxl_unet((1, 1, 1))  # the innermost attentions keep fewer transformer blocks
    target = tiny.related({k: v for k, v in sdxl.items() if k in ssd.state_dict()})
    rep, actions, lora_in, out = run(tmp_path, "sdxl", source, target, ssd, "ssd1b")
    removed = {m for m, a in actions.items() if a == "missing"}
    assert removed and all(".transformer_blocks.1." in m for m in removed)
    assert {m for m in actions if ".transformer_blocks.1." in m} == removed
    assert {a for m, a in actions.items() if m not in removed} == {"ported"}
    assert_carried(lora_in, out, "sdxl")
    load_into(ssd, target, out, "unet")

    finetune = tiny.finetuned(sdxl, rel_diff=0.05)
    rep, actions, lora_in, out = run(tmp_path, "sdxl", source, finetune, sdxl_unet(), "finetune")
    assert set(actions.values()) == {"ported"}
    assert_carried(lora_in, out, "sdxl")
    load_into(sdxl_unet(), finetune, out, "unet")


# --- Llama --------------------------------------------------------------------------------------


def test_llama3_to_llama31_carries_everything(tmp_path):
    """Llama 3 -> 3.1: same shapes (3.1 changed the RoPE scaling and the training); grouped
    k/v projections a quarter of q's rows as in Llama 3 8B (1024 vs 4096)."""
    source = tiny.base_model("llama", width=16)
    target = tiny.finetuned(source, rel_diff=0.05)
    lora_sd = tiny.lora("llama", source, fmt="peft", rank=4, alpha=8.0)
    out = str(tmp_path / "out.safetensors")
    rep = port(lora_sd, source, target, out, quiet=True)
    assert {r.action for r in rep.rows} == {"ported"}
    assert len(rep.rows) == len(tiny.lora_targets("llama", source))
    lora_in = formats.read_lora(lora_sd)
    got = {m.name: delta(m) for m in formats.read_lora(out).modules}
    for m in lora_in.modules:
        assert torch.allclose(got[m.name], delta(m), rtol=1e-6, atol=1e-7), m.name
