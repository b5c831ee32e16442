"""Fast checks of the streaming benchmark's model layout (the benchmark itself writes ~50 GB)."""

import torch

from benchmarks.port_stream import lora_modules, model_shapes, shard_of, structured
from loraport import formats
from loraport.testing import tiny


def test_full_size_layout_is_hunyuan_video():
    shapes = model_shapes(20, 40)
    assert sum(2 * torch.Size(s).numel() for s in shapes.values()) / 1e9 > 24.5  # bf16 bytes per base
    assert shapes["single_blocks.39.linear1.weight"] == (21504, 3072)
    assert shapes["double_blocks.19.txt_mlp.fc2.weight"] == (3072, 12288)
    assert "double_blocks.20.img_attn_qkv.weight" not in shapes
    assert len(lora_modules(shapes)) == 240 and len({shard_of(n) for n in shapes}) == 61


def test_lora_is_a_musubi_hunyuan_lora():
    shapes = model_shapes(1, 2)
    meta = {n: torch.empty(s, device="meta") for n, s in shapes.items()}
    sd = tiny.lora("hunyuan-video", meta, fmt="kohya", rank=32, alpha=16.0, modules=lora_modules(shapes))
    lf = formats.read_lora(sd)
    assert (lf.format, lf.arch.name, len(lf.modules)) == ("kohya", "hunyuan-video", 12)
    assert all(m.known and m.rank == 32 for m in lf.modules)


def test_structured_weights_have_a_dominant_top_subspace():
    w = structured((96, 160), torch.Generator().manual_seed(0)).double()
    s = torch.linalg.svdvals(w)
    noise_edge = 0.02 * (96**0.5 + 160**0.5)
    assert s[0] > 3 * noise_edge and s[-1] < 1.5 * noise_edge


def test_cold_floor_reads_only_the_adapted_weights(tmp_path):
    import json

    from safetensors.torch import save_file

    from benchmarks.port_stream import read_floor

    for side in ("source", "target"):
        (tmp_path / side).mkdir()
        save_file({"double_blocks.0.img_attn_qkv.weight": torch.ones(8, 4, dtype=torch.bfloat16),  # adapted: 64 B
                   "double_blocks.0.img_mod.linear.weight": torch.ones(16, 4, dtype=torch.bfloat16)},  # not: 128 B
                  str(tmp_path / side / "double_blocks-00.safetensors"))  # fmt: skip
    (tmp_path / "bench.json").write_text(json.dumps({"double": 1, "single": 0, "seed": 0, "hidden": 3072}))
    assert read_floor(str(tmp_path), adapted_only=True, drop=False)["bytes"] == 2 * 64
    assert read_floor(str(tmp_path), drop=False)["bytes"] > 2 * (64 + 128)  # whole files, headers included
