"""LoRA file formats: reading real key layouts, round trips through every writer, style
conversion (fused <-> split), alpha conventions, metadata, atomic writes and clean errors. The
fused -> split conversion is checked against diffusers' own LoRA converters in
test_client_key_names.py."""

import errno
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loraport import formats
from loraport.errors import InputError
from loraport.finite import all_finite
from loraport.testing import tiny


def delta(m: formats.LoraModule) -> torch.Tensor:
    """The module's dense ΔW = scale · up @ down, float64 [out, in·kernel]."""
    up, down = m.factors()
    return up.double() @ down.double()


def deltas(lf: formats.LoraFile) -> dict[str, torch.Tensor]:
    return {m.name: delta(m) for m in lf.modules}


@pytest.fixture(scope="module")
def hunyuan():
    return tiny.base_model("hunyuan-video", width=16)


def test_kohya_names_resolve_against_the_key_map():
    g = torch.Generator().manual_seed(0)
    sd = {}
    for stem in (
        "double_blocks_0_img_attn_qkv",
        "double_blocks_0_txt_mlp_fc1",
        "single_blocks_3_modulation_linear",
        "txt_in_individual_token_refiner_blocks_1_self_attn_qkv",
    ):
        sd[f"lora_unet_{stem}.lora_down.weight"] = torch.randn(4, 16, generator=g)
        sd[f"lora_unet_{stem}.lora_up.weight"] = torch.randn(48, 4, generator=g)
        sd[f"lora_unet_{stem}.alpha"] = torch.tensor(2.0)
    lf = formats.read_lora(sd)
    assert (lf.format, lf.arch.name, lf.style) == ("kohya", "hunyuan-video", "original")
    assert [m.name for m in lf.modules] == [
        "double_blocks.0.img_attn_qkv",
        "double_blocks.0.txt_mlp.fc1",
        "single_blocks.3.modulation.linear",
        "txt_in.individual_token_refiner.blocks.1.self_attn_qkv",
    ]
    assert all(m.known and m.scale == 0.5 for m in lf.modules)


def test_unknown_module_is_kept_and_flagged(hunyuan):
    sd = tiny.lora("hunyuan-video", hunyuan, fmt="kohya")
    sd["lora_unet_double_blocks_0_img_attn_foo.lora_down.weight"] = torch.ones(4, 16)
    sd["lora_unet_double_blocks_0_img_attn_foo.lora_up.weight"] = torch.ones(16, 4)
    lf = formats.read_lora(sd)
    unknown = [m for m in lf.modules if not m.known]
    assert [m.name for m in unknown] == ["double_blocks_0_img_attn_foo"]
    assert "lora_unet_double_blocks_0_img_attn_foo.lora_up.weight" in formats.state_dict(lf)


def test_network_dim_metadata_follows_kohya_convention(tmp_path, hunyuan):
    """ss_network_dim/alpha: the rank and alpha when every module shares them, "Dynamic" when
    the ranks or the alphas differ (as kohya's resize writes)."""
    lf = formats.read_lora(tiny.lora("hunyuan-video", hunyuan, fmt="kohya", rank=4, alpha=3.0))

    def written_meta(lora):
        out = tmp_path / "meta.safetensors"
        formats.write_lora(lora, out)
        with safe_open(out, "pt") as f:
            return f.metadata()

    meta = written_meta(lf)
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "3")
    first = lf.modules[0]
    first.alpha = 2.0
    meta = written_meta(lf)
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "Dynamic")
    first.up, first.down = first.up[:, :2], first.down[:2]
    meta = written_meta(lf)
    assert meta["ss_network_dim"] == meta["ss_network_alpha"] == "Dynamic"


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_round_trip_every_format(tmp_path, hunyuan, fmt):
    sd = tiny.lora("hunyuan-video", hunyuan, fmt=fmt, alpha=3.0, dtype=torch.bfloat16)
    src = tmp_path / "in.safetensors"
    save_file(sd, src, metadata={"ss_network_dim": "4", "modelspec.title": "x"})
    lf = formats.read_lora(src)
    assert lf.format == fmt
    out = tmp_path / "out.safetensors"
    formats.write_lora(lf, out)
    with safe_open(out, "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    if fmt in ("kohya", "tencent", "comfy"):  # alphas stored: the very same keys come back
        assert keys == set(sd)
    else:  # diffusers / PEFT fold alpha / r into up
        assert keys == {k for k in sd if not k.endswith(".alpha")}
    assert meta["modelspec.title"] == "x" and meta["ss_network_dim"] == "4"
    back = formats.read_lora(out)
    assert back.format == fmt and len(back.modules) == len(lf.modules)
    for name, d in deltas(lf).items():
        torch.testing.assert_close(deltas(back)[name], d, rtol=1e-2, atol=1e-4)  # bf16 fold
    assert all(m.up.dtype == torch.bfloat16 for m in back.modules)


def test_split_to_fused_zero_fills_absent_parts(hunyuan):
    lf = formats.read_lora(
        tiny.lora("hunyuan-video", hunyuan, fmt="kohya", modules=["single_blocks.0.linear1"]), arch="hunyuan-video"
    )
    d = formats.state_dict(lf, "diffusers")
    only_q = {k: v for k, v in d.items() if ".attn.to_q." in k}
    fused = formats.read_lora(
        formats.state_dict(formats.read_lora(only_q, arch="hunyuan-video"), "kohya"), arch="hunyuan-video"
    )
    (m,) = fused.modules
    full = delta(lf.modules[0])
    q = delta(m)
    torch.testing.assert_close(q[:16], full[:16])
    assert q[16:].abs().max() == 0


def test_peft_alpha_from_adapter_config(tmp_path):
    weights = tiny.base_model("llama", width=16)
    sd = tiny.lora("llama", weights, fmt="peft", alpha=None, rank=4)
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file(sd, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(
        json.dumps({"r": 4, "lora_alpha": 8, "alpha_pattern": {"model.layers.1.mlp.up_proj": 2}})
    )
    lf = formats.read_lora(folder / "adapter_model.safetensors")
    scales = {m.name: m.scale for m in lf.modules}
    assert scales["model.layers.0.self_attn.q_proj"] == 2.0
    assert scales["model.layers.1.mlp.up_proj"] == 0.5
    out = tmp_path / "out"
    out.mkdir()
    formats.write_lora(lf, out / "adapter_model.safetensors")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == cfg["r"] == 4 and cfg["alpha_pattern"] == {}
    back = formats.read_lora(out / "adapter_model.safetensors")  # reads the new config: scale 1
    for name, d in deltas(lf).items():
        torch.testing.assert_close(deltas(back)[name], d)


def test_diffusers_alpha_from_header_metadata_and_rslora(tmp_path):
    weights = tiny.base_model("flux", width=16)
    sd = tiny.lora("flux", weights, fmt="diffusers", alpha=None, rank=4)
    path = tmp_path / "l.safetensors"
    cfg = {"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.use_rslora": True}
    save_file(sd, path, metadata={formats.ADAPTER_METADATA_KEY: json.dumps(cfg)})
    lf = formats.read_lora(path)
    assert all(abs(m.scale - 8 / 4**0.5) < 1e-12 for m in lf.modules)
    out = tmp_path / "o.safetensors"
    formats.write_lora(lf, out)
    with safe_open(out, "pt") as f:
        new_cfg = json.loads(f.metadata()[formats.ADAPTER_METADATA_KEY])
    assert new_cfg["transformer.lora_alpha"] == 4 and new_cfg["transformer.use_rslora"] is False
    back = formats.read_lora(out)
    for name, d in deltas(lf).items():
        torch.testing.assert_close(deltas(back)[name], d, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_finds_one_bad_element_anywhere(dtype, bad):
    """The one NaN/Inf check every reader uses (loraport.finite): any position, any float dtype,
    strided views, and no false alarm on large finite values."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    t = (torch.randn(257, 129, generator=g) * 100).to(dtype)
    t[0, 0] = torch.finfo(dtype).max  # large but finite
    t[1, 1] = torch.finfo(dtype).min
    assert all_finite(t) and all_finite(t.T) and all_finite(t[::3, 1::2])
    i, j = (int(x) for x in torch.randint(0, 129, (2,), generator=g))
    t[i, j] = bad
    assert not all_finite(t) and not all_finite(t.T) and not all_finite(t[i : i + 1])
    assert not all_finite(torch.tensor(bad, dtype=dtype))  # 0-dim


def test_all_finite_of_empty_and_integer_tensors_is_true():
    assert all_finite(torch.empty(0, 5)) and all_finite(torch.arange(10)) and all_finite(torch.tensor(True))


def test_bad_files_raise_one_clear_error(tmp_path, hunyuan):
    sd = tiny.lora("hunyuan-video", hunyuan, fmt="kohya")
    good = tmp_path / "good.safetensors"
    save_file(sd, good)
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(InputError, match="trunc.safetensors: not a readable safetensors file"):
        formats.read_lora(truncated)
    with pytest.raises(InputError, match="nope.safetensors: no such file"):
        formats.read_lora(tmp_path / "nope.safetensors")
    key = "lora_unet_single_blocks_1_linear2.lora_up.weight"
    nan = dict(sd)
    nan[key] = sd[key].clone()
    nan[key][0, 0] = float("nan")
    with pytest.raises(InputError, match=rf"'{key}' contains NaN or Inf"):
        formats.read_lora(nan)
    mixed = {**sd, "transformer.x.lora_A.weight": torch.ones(4, 4)}
    with pytest.raises(InputError, match="mixes LoRA formats"):
        formats.read_lora(mixed)
    no_up = {k: v for k, v in sd.items() if not k.startswith("lora_unet_single_blocks_1_linear2.lora_up")}
    with pytest.raises(InputError, match="'lora_unet_single_blocks_1_linear2' has no up factor"):
        formats.read_lora(no_up)


def test_writes_are_atomic_and_never_overwrite_an_input(tmp_path, hunyuan, monkeypatch):
    path = tmp_path / "in.safetensors"
    save_file(tiny.lora("hunyuan-video", hunyuan, fmt="kohya"), path)
    before = path.read_bytes()
    lf = formats.read_lora(path)
    with pytest.raises(InputError, match="is an input file"):
        formats.write_lora(lf, path)
    assert path.read_bytes() == before

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(formats, "save_safetensors", failing_save)
    with pytest.raises(InputError, match="out.safetensors: cannot write the output .No space left on device.; nothing written"):
        formats.write_lora(lf, tmp_path / "out.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors"]


def test_reader_rejects_what_the_fuzzer_found(tmp_path, hunyuan):
    """Each one InputError line: rank-0 factors (alpha / 0), integer factors, one factor under two
    suffixes, an adapter config whose alpha fields are not numbers or valid patterns."""
    sd = tiny.lora("hunyuan-video", hunyuan, fmt="kohya")
    stem = next(k for k in sd if k.endswith(".lora_down.weight")).removesuffix(".lora_down.weight")
    cases = [
        ({stem + ".lora_down.weight": sd[stem + ".lora_down.weight"][:0],
          stem + ".lora_up.weight": sd[stem + ".lora_up.weight"][:, :0]}, "are empty"),  # fmt: skip
        ({stem + ".lora_down.weight": sd[stem + ".lora_down.weight"].to(torch.int8)}, "must be floating point"),
        ({stem + ".lora_A.weight": sd[stem + ".lora_down.weight"]}, "are the same factor of one module"),
    ]
    for change, pattern in cases:
        with pytest.raises(InputError, match=pattern):
            formats.read_lora({**sd, **change})
    with pytest.raises(InputError) as e:  # a newline in a tensor name stays one line, shown escaped
        formats.read_lora({"lora_unet_\nx.lora_down.weight": torch.ones(1, 1), "\n": torch.ones(1)})
    assert "\n" not in str(e.value) and "'\\n'" in str(e.value)
    peft = tiny.lora("flux", tiny.base_model("flux", width=16), fmt="peft", alpha=None)
    save_file(peft, tmp_path / "adapter_model.safetensors")
    for cfg, pattern in (([1], "is a JSON list, not an object"), ({"lora_alpha": "8"}, "'lora_alpha' must be a finite number"),
                         ({"lora_alpha": 8, "alpha_pattern": {"(": 4}}, "invalid pattern"),
                         ({"lora_alpha": 8, "alpha_pattern": [1]}, "must map module patterns to numbers")):  # fmt: skip
        (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
        with pytest.raises(InputError, match=pattern):
            formats.read_lora(tmp_path / "adapter_model.safetensors", arch="flux")
