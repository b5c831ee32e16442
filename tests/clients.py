"""What the clients themselves say a key name means, for the tests that check loraport's key maps:
diffusers' model classes at tiny configs (their modules), diffusers' single-file converters
(an original-named checkpoint -> the model class's names) and its LoRA converters (a kohya /
Musubi / diffusion-pipe / ComfyUI LoRA -> PEFT names). Not collected by pytest (no test_ prefix);
tests import it as ``clients``. Nothing here derives an expected name from loraport's own maps.

Two hard-coded sizes in diffusers' converters shape the probes here: the Flux and HunyuanVideo
converters split a single block's fused ``linear1`` at the real models' width, 3072 rows for each
of q, k and v (single_file_utils.convert_flux_transformer_checkpoint_to_diffusers: inner_dim =
3072; convert_hunyuan_video_transformer_to_diffusers: hidden_size = 3072; and the same in
lora_conversion_utils._convert_kohya_flux_lora_to_diffusers, dims=[3072, 3072, 3072, 12288], and
_convert_hunyuan_video_lora_to_diffusers). The probes keep every name of the tiny model and give
those tensors the real row counts."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from loraport.testing import tiny

REAL_WIDTH = 3072  # Flux.1-dev's and HunyuanVideo's hidden size, hard-coded in diffusers' converters
_SINGLE_SPLIT = re.compile(r"single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp)\.(weight|bias)")


def diffusers():
    return pytest.importorskip("diffusers")


def adaptable_modules(model: nn.Module) -> set[str]:
    """The model's Linear and Conv modules: what a LoRA can adapt, named by the model class."""
    return {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d))}


def adaptable_keys(model: nn.Module, weights: dict) -> set[str]:
    """The weight and bias keys of the model's adaptable modules present in ``weights``."""
    return {k for n in adaptable_modules(model) for k in (f"{n}.weight", f"{n}.bias") if k in weights}


def real_width_rows(weights: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """``weights`` with the single blocks' q, k, v (3072 rows each) and MLP input (4 x 3072 rows)
    at the real width the converters split at; every other tensor, and every name, unchanged."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in weights.items():
        m = _SINGLE_SPLIT.fullmatch(k)
        if m:
            rows = 4 * REAL_WIDTH if m.group(1) == "proj_mlp" else REAL_WIDTH
            v = torch.randn((rows, *v.shape[1:]), generator=g)
        out[k] = v
    return out


def _flux_qk_norms(weights: dict) -> dict[str, torch.Tensor]:
    """The qk-norm scales of a BFL Flux checkpoint (names of black-forest-labs/flux's
    DoubleStreamBlock / SingleStreamBlock), which diffusers' Flux converter pops by name and a
    LoRA never adapts (so loraport's key map leaves them out). Zeros; not compared."""
    double = {int(k.split(".")[1]) for k in weights if k.startswith("transformer_blocks.")}
    single = {int(k.split(".")[1]) for k in weights if k.startswith("single_transformer_blocks.")}
    out = {}
    for i in double:
        for side in ("img", "txt"):
            for n in ("query", "key"):
                out[f"double_blocks.{i}.{side}_attn.norm.{n}_norm.scale"] = torch.zeros(1)
    for i in single:
        for n in ("query", "key"):
            out[f"single_blocks.{i}.norm.{n}_norm.scale"] = torch.zeros(1)
    return out


def single_file_to_diffusers(arch: str, original: dict, model: nn.Module) -> dict[str, torch.Tensor]:
    """diffusers' own reading of an original-named checkpoint (BFL, Tencent, Wan, LDM names)."""
    sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
    original = dict(original)
    if arch == "flux":
        return sfu.convert_flux_transformer_checkpoint_to_diffusers({**original, **_flux_qk_norms(model.state_dict())})
    if arch == "hunyuan-video":
        return sfu.convert_hunyuan_video_transformer_to_diffusers(original)
    if arch == "wan":
        return sfu.convert_wan_transformer_to_diffusers(original)
    if arch in ("sd15", "sdxl"):
        return sfu.convert_ldm_unet_checkpoint(
            {"model.diffusion_model." + k: v for k, v in original.items()}, model.config
        )
    raise ValueError(arch)


def check_original_names(arch: str, model: nn.Module, weights: dict) -> None:
    """Assert that the names loraport gives ``weights`` (diffusers-named, of ``model``'s class) in
    the family's original layout are what diffusers' single-file converter reads back onto the
    model's own keys: every Linear/Conv weight and bias of the model, bit for bit (fused q/k/v and
    linear1 split by rows, final-layer halves swapped); and that loraport's reading of those
    original names (tiny.to_diffusers_names, what a port does with an original-named base) agrees
    with diffusers' on every one of them."""
    probe = real_width_rows(weights) if arch in ("flux", "hunyuan-video") else dict(weights)
    original = tiny.to_original_names(arch, probe)
    theirs = single_file_to_diffusers(arch, original, model)
    ours = tiny.to_diffusers_names(arch, original)
    keys = adaptable_keys(model, probe)
    assert keys, "the model has no adaptable module"
    missing = sorted(keys - theirs.keys())
    assert not missing, f"diffusers read no {missing[:5]} from loraport's original names"
    stray = sorted(k for k in theirs.keys() - probe.keys())
    assert not stray, f"diffusers read {stray[:5]}, which the model does not have, from loraport's original names"
    for k in sorted(keys):
        assert torch.equal(theirs[k], probe[k]), f"diffusers reads {k} otherwise from loraport's original names"
        assert torch.equal(ours[k], theirs[k]), f"loraport reads {k} otherwise than diffusers does"


def original_names(arch: str, model: nn.Module, weights: dict) -> dict[str, torch.Tensor]:
    """tiny.to_original_names(arch, weights), checked against diffusers first (check_original_names):
    the source of an upgrade-path test in the original layout of the authors' checkpoint."""
    check_original_names(arch, model, weights)
    return tiny.to_original_names(arch, weights)


def lora_deltas(state_dict: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """{module: ΔW = lora_B @ lora_A, float64 [out, in·kernel]} of a PEFT-keyed LoRA state dict
    (scales folded into the factors, as diffusers' converters and loraport's diffusers writer do),
    module names without ``prefix``."""
    out = {}
    for k, a in state_dict.items():
        if k.endswith(".lora_A.weight"):
            b = state_dict[k[: -len(".lora_A.weight")] + ".lora_B.weight"]
            out[k[: -len(".lora_A.weight")].removeprefix(prefix)] = b.double().flatten(1) @ a.double().flatten(1)
    return out


def assert_same_deltas(theirs: dict, ours: dict, rtol: float = 1e-6) -> None:
    assert sorted(theirs) == sorted(ours), (sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs)))
    for name, d in ours.items():
        err = float(torch.linalg.matrix_norm(theirs[name] - d) / torch.linalg.matrix_norm(d))
        assert err <= rtol, f"{name}: ΔW differs by {err:.2e} (relative)"


# Tiny configs of diffusers' model classes (the layouts of the real models at a width of 16).


def hunyuan_video(**kw):
    cfg = dict(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_single_layers=2,
        num_refiner_layers=1,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 2, 4),
    )
    return diffusers().HunyuanVideoTransformer3DModel(**{**cfg, **kw})


def flux(**kw):
    cfg = dict(
        in_channels=8,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    )
    return diffusers().FluxTransformer2DModel(**{**cfg, **kw})


def wan(**kw):
    """Wan 2.1 T2V at a tiny width; ``image_dim=16, added_kv_proj_dim=16`` make it an I2V one."""
    cfg = dict(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        rope_max_seq_len=32,
    )
    return diffusers().WanTransformer3DModel(**{**cfg, **kw})


def sdxl_unet(transformer_layers=(1, 1, 2)):
    """SDXL's UNet layout (no attention in the first down / last up block, more transformer blocks
    in the innermost attentions, text_time add_embedding) at a tiny width."""
    return diffusers().UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 16, 16),
        layers_per_block=2,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=transformer_layers,
        cross_attention_dim=16,
        attention_head_dim=(2, 4, 4),
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=32,
        use_linear_projection=True,
    )


def sd15_unet():
    """SD 1.5's UNet layout (four levels, attention in the first three down and last three up
    blocks, two resnets per level) at a tiny width."""
    return diffusers().UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=2,
        norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
    )


def random_weights(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Decaying-spectrum weights under the model's own (diffusers) names."""
    return tiny.random_weights({k: v.shape for k, v in model.state_dict().items()}, seed=seed)
