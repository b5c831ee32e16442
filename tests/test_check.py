"""loraport check: the LoRA keys a base's loader would not consume and the modules whose shape
does not fit, by diffusers' own loader (a diffusers folder with config.json; the model built on
the meta device) or by loraport's key maps (anything else), each saying which it used. The
positive case (zero unconsumed keys on every upgrade path diffusers supports) is asserted on
every port's own check in tests/test_upgrade_paths.py."""

import json
import os

import pytest
from safetensors.torch import save_file

from loraport.check import check
from loraport.cli import main
from loraport.testing import tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def folder(path, model, weights) -> str:
    sub = os.path.join(path, "transformer")
    os.makedirs(sub)
    model.save_config(sub)
    save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(sub, "diffusion_pytorch_model.safetensors"))
    return str(path)


def wan(**kw):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    cfg = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16,
               freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)  # fmt: skip
    return diffusers.WanTransformer3DModel(**{**cfg, **kw})


@pytest.fixture(scope="module")
def wan_i2v():
    """(Wan 2.1 I2V weights, diffusers names; Wan 2.2 I2V model and weights: no image cross-attention)."""
    w21 = tiny.random_weights({k: v.shape for k, v in wan(image_dim=16, added_kv_proj_dim=16).state_dict().items()})
    model = wan()
    return w21, model, {k: v for k, v in w21.items() if k in model.state_dict()}


def test_diffusers_lists_the_image_cross_attention_keys_wan22_does_not_consume(wan_i2v, tmp_path, capsys):
    w21, model, w22 = wan_i2v
    lora = str(tmp_path / "lora.safetensors")
    lora_sd = tiny.lora("wan", tiny.to_original_names("wan", w21), fmt="diffusers", rank=4)  # every module
    save_file(lora_sd, lora)
    base = folder(tmp_path / "wan22", model, w22)
    rep = check(lora, base)
    assert rep.method.startswith("diffusers") and "WanPipeline" in rep.method and rep.error is None
    image = [k for k in lora_sd if "add_k_proj" in k or "add_v_proj" in k or "image_embedder" in k]
    assert image and rep.unconsumed == sorted(image) and rep.misfits == []
    # the same by loraport's key maps, asked for
    by_maps = check(lora, base, use_diffusers=False)
    assert by_maps.method == "loraport key maps" and by_maps.unconsumed == rep.unconsumed
    assert main(["check", lora, "--base", base, "--report", str(tmp_path / "check.json")]) == 4
    out = capsys.readouterr().out
    assert "checked with diffusers" in out and all(f"unconsumed  {k}" in out for k in image)
    assert json.load(open(tmp_path / "check.json"))["unconsumed"] == rep.unconsumed
    # the Wan 2.1 I2V base consumes every key
    assert check(lora, folder(tmp_path / "wan21", wan(image_dim=16, added_kv_proj_dim=16), w21)).ok
    assert main(["check", lora, "--base", str(tmp_path / "wan21")]) == 0


def test_shapes_that_do_not_fit_are_listed(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    cfg = dict(in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
               joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(2, 2, 4))  # fmt: skip
    dev = tiny.random_weights({k: v.shape for k, v in diffusers.FluxTransformer2DModel(**cfg).state_dict().items()})
    fill = diffusers.FluxTransformer2DModel(**{**cfg, "in_channels": 48, "out_channels": 8})
    lora = tiny.lora("flux", tiny.to_original_names("flux", dev), fmt="diffusers", rank=4)
    base = folder(tmp_path / "fill", fill, tiny.widen_input(dev, "x_embedder.weight", 48))
    rep = check(lora, base)
    assert rep.method.startswith("diffusers") and rep.unconsumed == []
    assert rep.misfits == [{"module": "x_embedder", "lora": [16, 8], "base": [16, 48]}]
    by_maps = check(lora, base, use_diffusers=False)
    assert by_maps.misfits == rep.misfits


def test_a_loader_that_fails_is_reported_not_raised(wan_i2v, tmp_path, capsys):
    """diffusers' Musubi Wan converter expects every module inside a block: a kohya Wan LoRA
    that also adapts patch_embedding makes it raise; check reports that as the finding."""
    w21, model, w22 = wan_i2v
    source = tiny.to_original_names("wan", w21)
    lora = str(tmp_path / "musubi.safetensors")
    save_file(tiny.lora("wan", source, fmt="kohya", rank=4), lora)
    base = folder(tmp_path / "wan21", wan(image_dim=16, added_kv_proj_dim=16), w21)
    rep = check(lora, base)
    assert rep.error and "lora_state_dict raised" in rep.error and not rep.ok
    assert main(["check", lora, "--base", base]) == 4
    assert "the loader failed" in capsys.readouterr().out
    assert check(lora, base, use_diffusers=False).ok  # loraport's key maps place every module


def test_key_maps_on_a_single_file_base_say_so(wan_i2v, tmp_path):
    w21, _, w22 = wan_i2v
    source = tiny.to_original_names("wan", w21)
    lora_sd = tiny.lora("wan", source, fmt="kohya", rank=4)
    target = tiny.to_original_names("wan", w22)
    rep = check(lora_sd, target)
    assert rep.method == "loraport key maps"
    want = sorted(k for k in lora_sd if "_k_img." in k or "_v_img." in k or "img_emb" in k)
    assert want and rep.unconsumed == want


def test_a_transformers_folder_is_checked_by_key_maps(tmp_path):
    """A Hugging Face LLM folder has a config.json too, but no diffusers model class in it."""
    weights = tiny.base_model("llama", width=16)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    save_file(weights, str(tmp_path / "model.safetensors"))
    lora_sd = tiny.lora("llama", weights, fmt="peft", rank=2)
    rep = check(lora_sd, str(tmp_path))
    assert rep.method == "loraport key maps" and rep.ok
