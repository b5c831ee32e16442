"""A real consumer of loraport's output: a Musubi-style LoRA (kohya format, original Hunyuan / BFL
module names, fused qkv and linear1) for a source base in original names is ported to a target
that is diffusers' own tiny HunyuanVideoTransformer3DModel / FluxTransformer2DModel (its state
dict, diffusers names: split to_q/to_k/to_v/proj_mlp, norm_out.linear with swapped halves),
written with --format diffusers, and loaded with the model's load_lora_adapter (PEFT). Checked:
no key unexpected or missing (diffusers' warnings and the injected PEFT layers, one per module,
holding exactly the file's tensors at scale 1), and after fusing, W_after − W_before equals the
file's ΔW and the float64 dense LoRA-X reference of the fused original layer (row slice for split
parts, halves swapped for norm_out.linear). Also: the ported kohya and diffusers files round-trip
(read -> write -> read) exactly."""

import logging

import pytest
import torch
from clients import original_names
from conftest import WarningsCollector
from safetensors.torch import load_file

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")  # load_lora_adapter injects the LoRA layers with PEFT

from loraport import archs, formats, reference  # noqa: E402
from loraport.pipeline import port  # noqa: E402
from loraport.testing import tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
K = 6  # subspace rank; LoRA rank 4 <= K
# 8 iterations: cheap at these sizes, and a fused weight of separately drawn parts decays slower
SVD = dict(subspace_rank=K, power_iters=8, quiet=True, variant="target")  # the projection (the default variant copies)


def tiny_hunyuan():
    return diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=2, num_refiner_layers=1, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4),
    )  # fmt: skip


def tiny_flux():
    return diffusers.FluxTransformer2DModel(
        in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip


def tiny_wan():  # an I2V one: cross-attention image keys (attn2.add_k_proj/add_v_proj) and image embedder
    return diffusers.WanTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16, freq_dim=16,
        ffn_dim=32, num_layers=2, image_dim=16, added_kv_proj_dim=16, rope_max_seq_len=32,
    )  # fmt: skip


MODELS = {"hunyuan-video": tiny_hunyuan, "flux": tiny_flux, "wan": tiny_wan}


def delta(m: formats.LoraModule) -> torch.Tensor:
    up, down = m.factors()
    return up.double() @ down.double()  # [out, in·kernel]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


def _load_every_key(model, sd: dict, prefix: str, adapter: str) -> None:
    """model.load_lora_adapter, failing on diffusers' warning about unexpected or missing LoRA keys
    (diffusers' logger does not propagate to pytest's caplog)."""
    log, warnings = logging.getLogger("diffusers"), WarningsCollector()
    log.addHandler(warnings)
    try:
        model.load_lora_adapter(sd, prefix=prefix, adapter_name=adapter)
    finally:
        log.removeHandler(warnings)
    assert not [w for w in warnings.messages if "unexpected" in w or "missing" in w], warnings.messages


def _fused_change(model, adapter: str, before: dict) -> dict[str, torch.Tensor]:
    """{module: W_after − W_before [out, in·kernel] float64} over the PEFT-injected layers."""
    from peft.tuners.lora import LoraLayer

    layers = {n: mod for n, mod in model.named_modules() if isinstance(mod, LoraLayer)}
    model.fuse_lora(adapter_names=[adapter])
    after = {n: mod.get_base_layer().weight.detach() for n, mod in layers.items()}
    return {n: (w - before[n + ".weight"]).double().flatten(1) for n, w in after.items()}


@pytest.fixture(scope="module", params=list(MODELS))
def ported(request, tmp_path_factory):
    """(arch, model, target weights, source weights, input LoRA, ported diffusers file, ported kohya file)."""
    arch, tmp = request.param, tmp_path_factory.mktemp(request.param)
    model = MODELS[arch]().eval()
    # decaying spectra (as trained weights have) so that the top-K subspaces are well defined
    model.load_state_dict(tiny.random_weights({k: v.shape for k, v in model.state_dict().items()}, seed=0))
    target = {k: v.detach().clone() for k, v in model.state_dict().items()}  # diffusers names
    source = original_names(arch, model, tiny.related(target, eps=0.05))  # the release before, original names
    lora_sd = tiny.lora(arch, source, fmt="kohya", rank=4, alpha=2.0)  # Musubi-style: every module
    out_d, out_k = str(tmp / "ported_diffusers.safetensors"), str(tmp / "ported_kohya.safetensors")
    for out, fmt in ((out_d, "diffusers"), (out_k, "kohya")):
        rep = port(lora_sd, source, target, out, format=fmt, arch=arch, **SVD)
        assert {r.action for r in rep.rows} == {"ported"}
    return arch, model, target, source, formats.read_lora(lora_sd, arch=arch), out_d, out_k


def test_every_key_is_consumed_and_the_weights_change_as_ported(ported):
    arch, model, target, source, lora_in, out_d, _ = ported
    a = archs.get(arch)
    sd = load_file(out_d)
    assert all(k.startswith("transformer.") for k in sd)
    file_modules = {m.name: m for m in formats.read_lora(out_d, arch=arch).modules}
    # the LoRA covered every adaptable module, so the output names every LoRA-able layer of the model
    assert set(file_modules) == set(tiny.lora_targets(arch, target, "diffusers"))

    _load_every_key(model, sd, "transformer", "ported")

    from peft.tuners.lora import LoraLayer

    injected = {n: mod for n, mod in model.named_modules() if isinstance(mod, LoraLayer)}
    assert set(injected) == set(file_modules)  # one PEFT layer per module, none extra
    for name, layer in injected.items():  # every tensor landed, unchanged, at scale 1
        for factor, peft_layer in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B)):
            torch.testing.assert_close(peft_layer["ported"].weight, sd[f"transformer.{name}.{factor}.weight"], rtol=0, atol=0)
        assert layer.scaling["ported"] == 1.0

    change = _fused_change(model, "ported", target)
    for name, m in file_modules.items():
        assert rel_err(change[name], delta(m)) < 1e-5, name  # fp32 fuse of the file's ΔW

    # ... and that ΔW is the dense LoRA-X reference of the fused original layer, in diffusers' layout
    target_original = tiny.to_original_names(arch, target)
    for m in lora_in.modules:
        U, _, V = reference.svd_truncated(target_original[m.name + ".weight"].flatten(1), K)
        want = reference.project_lora_dense(delta(m), torch.eye(delta(m).shape[1], dtype=torch.float64), U, V)
        for part in a.split_parts(m.name) or a.translate(m.name, "original", "diffusers"):
            expected = part.arrange(want[part.rows(want.shape[0])])  # row slice / norm_out.linear halves
            assert rel_err(change[part.name], expected) < 1e-3, part.name


def test_ported_files_round_trip(ported, tmp_path):
    arch, *_, out_d, out_k = ported
    for out in (out_d, out_k):
        first = formats.read_lora(out, arch=arch)
        again = str(tmp_path / ("again_" + out.rsplit("/", 1)[1]))
        formats.write_lora(first, again)
        second = formats.read_lora(again, arch=arch)
        assert (second.format, second.style) == (first.format, first.style)
        assert load_file(again).keys() == load_file(out).keys()
        for m1, m2 in zip(first.modules, second.modules, strict=True):
            assert (m1.name, m1.alpha, m1.key) == (m2.name, m2.alpha, m2.key)
            torch.testing.assert_close(m2.up, m1.up, rtol=0, atol=0)
            torch.testing.assert_close(m2.down, m1.down, rtol=0, atol=0)
    assert formats.read_lora(out_k, arch=arch).style == "original"  # Musubi names stay original


def tiny_sdxl_unet():
    """SDXL's UNet layout (no attention in the first down / last up block, a second transformer
    block in the innermost attentions, text_time add_embedding) at a tiny width."""
    return diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), cross_attention_dim=16, attention_head_dim=(2, 4, 4),
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=32,
        use_linear_projection=True,
    ).eval()  # fmt: skip


def test_sdxl_kohya_ldm_names_mean_to_diffusers_what_they_mean_to_loraport(tmp_path):
    """A kohya SDXL LoRA in LDM names (lora_unet_input_blocks_4_1_...): diffusers' own kohya
    loader puts each module's ΔW on the same UNet layer that loraport's key map names; and the
    LoRA ported from an LDM single-file base to the diffusers UNet loads with every key consumed."""
    unet = tiny_sdxl_unet()
    unet.load_state_dict(tiny.random_weights({k: v.shape for k, v in unet.state_dict().items()}, seed=0))
    target = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    ldm = original_names("sdxl", unet, tiny.related(target))
    lora_sd = tiny.lora("sdxl", ldm, fmt="kohya", rank=4, alpha=2.0)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha" in lora_sd  # down block 1, attention 0
    assert "lora_unet_output_blocks_2_2_conv.alpha" in lora_sd  # up block 0's upsampler
    lora_in = formats.read_lora(lora_sd)
    assert (lora_in.arch.name, lora_in.style) == ("sdxl", "original")
    ours = {m.name: delta(m) for m in formats.convert_style(lora_in, "diffusers")}
    assert set(ours) == set(tiny.lora_targets("sdxl", target, "diffusers"))

    state, alphas = diffusers.StableDiffusionXLPipeline.lora_state_dict(dict(lora_sd), unet_config=unet.config)
    diffusers.StableDiffusionXLPipeline.load_lora_into_unet(state, alphas, unet, adapter_name="kohya")
    change = _fused_change(unet, "kohya", target)
    assert set(change) == set(ours)
    for name, d in ours.items():
        assert rel_err(change[name], d) < 1e-5, name

    # ported from the LDM checkpoint layout (model.diffusion_model. prefix) to the diffusers UNet
    unet = tiny_sdxl_unet()
    unet.load_state_dict(target)
    source = {"model.diffusion_model." + k: v for k, v in ldm.items()}
    out = str(tmp_path / "ported.safetensors")
    rep = port(lora_sd, source, target, out, format="diffusers", **SVD)
    assert {r.action for r in rep.rows} == {"ported"}
    sd = load_file(out)
    assert all(k.startswith("unet.") for k in sd)
    _load_every_key(unet, sd, "unet", "ported")
    change = _fused_change(unet, "ported", target)
    ported = {m.name: delta(m) for m in formats.read_lora(out).modules}
    assert set(change) == set(ported) == set(ours)
    for name, d in ported.items():
        assert rel_err(change[name], d) < 1e-5, name
