"""`port` on adapter types besides plain LoRA: every type carried in its own type through the gate
(copied tensors, skipped or copied where dissimilar), renamed/split for another format, padded on
widened inputs or refused and listed where the type cannot be padded exactly, DoRA magnitudes
kept or rescaled against float64 norms, and the combinations that would need a plain LoRA refused."""

import pytest
import torch
from test_adapters import ARCH, KINDS, adapter_file, dense_of, rel

from loraport import adapters, formats, reference
from loraport.errors import InputError
from loraport.pipeline import port
from loraport.testing import tiny

SVD = dict(subspace_rank=6, power_iters=4, quiet=True, arch=ARCH)
FEW = ["double_blocks.0.img_attn_qkv", "double_blocks.0.img_attn_proj", "img_in.proj"]


@pytest.fixture(scope="module")
def models():
    source = tiny.base_model(ARCH, width=16, seed=0)
    return {"source": source, "target": tiny.related(source), "unrelated": tiny.base_model(ARCH, width=16, seed=7)}


def paths(tmp_path, models, sd, target="target"):
    p = {
        "lora": tiny.save_base(sd, str(tmp_path / "lora.safetensors")),
        "source": tiny.save_base(models["source"], str(tmp_path / "source.safetensors")),
        "target": tiny.save_base(models[target], str(tmp_path / "target.safetensors")),
        "out": str(tmp_path / "out.safetensors"),
    }
    return p


def by_name(path):
    return {m.name: m for m in formats.read_lora(path, arch=ARCH).modules}


@pytest.mark.slow
@pytest.mark.parametrize("shift,conv", [(0, "LoCon (Tucker)"), (5, "LoHa (Tucker)"), (9, "LoKr (Tucker)")])
def test_every_type_is_carried_unchanged_through_the_gate(tmp_path, models, shift, conv):
    sd, _ = adapter_file(list(KINDS[shift:] + KINDS[:shift]), models["source"])  # one kind per module in turn
    p = paths(tmp_path, models, sd)
    rep = port(p["lora"], p["source"], p["target"], p["out"], **SVD)
    src, out = by_name(p["lora"]), by_name(p["out"])
    assert out.keys() == src.keys() and len(out) == 29
    assert src["img_in.proj"].type_name == conv  # the conv3d layer (module 26)
    assert {m.type_name for m in src.values() if adapters.is_adapter(m)} >= {"LoHa", "LoKr", "full difference", "DoRA LoCon"}
    for row in rep.rows:
        assert row.action == "ported" and row.similarity > 0.9 and row.rel_change == 0.0, row
    for name, m in src.items():
        got = out[name]
        assert type(got) is type(m)
        if adapters.is_adapter(m):
            assert got.kind == m.kind and got.alpha == m.alpha and got.magnitude_axis == m.magnitude_axis
            assert all(torch.equal(got.tensors[r], m.tensors[r]) for r in m.tensors), name


def test_dissimilar_layers_are_skipped_or_copied(tmp_path, models):
    sd, _ = adapter_file("loha", models["source"], modules=FEW)
    p = paths(tmp_path, models, sd, target="unrelated")
    rep = port(p["lora"], p["source"], p["target"], p["out"], **SVD, on_dissimilar="copy")
    assert {r.action for r in rep.rows} == {"copied"}
    assert all(adapters.is_adapter(m) and m.kind == "loha" for m in by_name(p["out"]).values())
    with pytest.raises(InputError, match="no module was ported"):
        port(p["lora"], p["source"], p["target"], p["out"], **SVD)


@pytest.mark.parametrize("kind", ["loha", "loha-tucker", "lokr", "dora"])
def test_renamed_and_split_for_a_diffusers_output(tmp_path, models, kind):
    """A kohya adapter (fused qkv) written as PEFT (diffusers names: to_q, to_k, to_v) rows exact."""
    modules = ["double_blocks.0.img_attn_qkv", "double_blocks.0.img_attn_proj"]
    sd, truth = adapter_file(kind, models["source"], modules=modules)
    p = paths(tmp_path, models, sd)
    port(p["lora"], p["source"], p["target"], p["out"], **SVD, format="peft")
    out = by_name(p["out"])
    assert set(out) == {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                        "transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.to_out.0"}  # fmt: skip
    qkv = next(m for m in formats.read_lora(p["lora"], arch=ARCH).modules if m.name == modules[0])
    t, scale, shape = truth[qkv.key]
    parts = [out[f"transformer_blocks.0.attn.to_{x}"] for x in "qkv"]
    if kind == "dora":
        want = dense_of(adapters.without_magnitude(qkv))
        assert torch.equal(torch.cat([m.tensors["magnitude"] for m in parts]), qkv.tensors["magnitude"])
        parts = [adapters.without_magnitude(m) for m in parts]
    else:
        want = reference.adapter_delta(t, scale, shape).flatten(1)
    assert rel(torch.cat([dense_of(m) for m in parts]), want) < 1e-5


@pytest.mark.parametrize("kind", ["loha", "loha-tucker", "lokr", "lokr-full", "locon-tucker", "full", "dora", "dora-in"])
def test_widened_inputs_are_padded_exactly_or_refused_and_listed(tmp_path, models, kind):
    """img_in [16, 4, 1, 2, 2] -> 8 input channels (LoKr: w1 [4, 2] x w2 [4, 2, 1, 2, 2]: 8 = 4
    whole blocks of 2) and -> 9 (not whole blocks: LoKr refused)."""
    sd, _ = adapter_file(kind, models["source"], modules=["img_in.proj", "double_blocks.0.img_attn_proj"])
    src_conv = by_name(tiny.save_base(sd, str(tmp_path / "in.safetensors")))["img_in.proj"]
    for channels in (8, 9):
        wide = tiny.widen_input(models["target"], "img_in.proj.weight", channels)
        p = paths(tmp_path, {**models, "wide": wide}, sd, target="wide")
        rep = port(p["lora"], p["source"], p["target"], p["out"], **SVD)
        row = next(r for r in rep.rows if r.module == "img_in.proj")
        out = by_name(p["out"])
        refused = kind == "dora-in" or (kind.startswith("lokr") and channels == 9)
        if refused:
            assert row.action == "refused" and "img_in.proj" not in out
            assert "refused" in rep.table() and "img_in.proj" in rep.table()
            continue
        assert row.action == "padded" and out["img_in.proj"].fits((16, channels, 1, 2, 2))
        got, m = out["img_in.proj"], src_conv
        if kind == "dora":
            got, m = adapters.without_magnitude(got), adapters.without_magnitude(m)
        want = torch.zeros(16, channels, 4, dtype=torch.float64)
        want[:, :4] = dense_of(m).reshape(16, 4, 4)
        assert rel(dense_of(got), want.flatten(1)) < 1e-6


def test_dora_magnitude_kept_or_rescaled_by_the_norm_ratio(tmp_path, models):
    sd, _ = adapter_file("dora", models["source"], modules=FEW)
    p = paths(tmp_path, models, sd)
    src = by_name(p["lora"])
    port(p["lora"], p["source"], p["target"], p["out"], **SVD)
    kept = by_name(p["out"])
    port(p["lora"], p["source"], p["target"], p["out"], **SVD, dora_magnitude="rescale", cache_dir=tmp_path / "c")
    scaled = by_name(p["out"])
    for name, m in src.items():
        assert torch.equal(kept[name].tensors["magnitude"], m.tensors["magnitude"])
        ws, wt = models["source"][name + ".weight"].double(), models["target"][name + ".weight"].double()
        ratio = wt.flatten(1).norm(dim=1) / ws.flatten(1).norm(dim=1)
        want = m.tensors["magnitude"].double() * ratio
        torch.testing.assert_close(scaled[name].tensors["magnitude"].double(), want, rtol=1e-6, atol=0)
    # a second run takes the subspaces from the cache but still reads the weights for their norms
    port(p["lora"], p["source"], p["target"], p["out"], **SVD, dora_magnitude="rescale", cache_dir=tmp_path / "c")
    again = by_name(p["out"])
    assert all(torch.equal(again[n].tensors["magnitude"], scaled[n].tensors["magnitude"]) for n in src)


def test_what_would_need_a_plain_lora_is_refused_before_any_work(tmp_path, models):
    sd, _ = adapter_file("loha", models["source"], modules=FEW)
    p = paths(tmp_path, models, sd)
    for kw in (dict(variant="target"), dict(rank=2)):
        with pytest.raises(InputError, match="LoHa.*loraport convert"):
            port(p["lora"], p["source"], p["target"], p["out"], **SVD, **kw)
    sd, _ = adapter_file("full", models["source"], modules=FEW)
    p = paths(tmp_path, models, sd)
    with pytest.raises(InputError, match="full difference.*no peft form"):
        port(p["lora"], p["source"], p["target"], p["out"], **SVD, format="peft")
    assert not (tmp_path / "out.safetensors").exists()
