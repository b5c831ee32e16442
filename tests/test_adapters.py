"""Adapter types besides plain LoRA (loraport.adapters): LoHa, LoKr, Tucker LoCon, full
differences and DoRA read from kohya/LyCORIS, ComfyUI and PEFT keys, their ΔW against the float64
reference written from LyCORIS's formulas (reference.adapter_delta), written back in their type,
renamed and split exactly where the type allows, padded, and clear errors otherwise."""

import math

import pytest
import torch
from safetensors.torch import save_file

from loraport import adapters, formats, reference
from loraport.errors import InputError
from loraport.testing import tiny

ARCH = "hunyuan-video"
KINDS = ("loha", "loha-tucker", "lokr", "lokr-full", "lokr-decomposed", "lokr-tucker", "locon-tucker", "full", "dora",
         "dora-in")  # fmt: skip


@pytest.fixture(scope="module")
def hunyuan():
    return tiny.base_model(ARCH, width=16)


def _split(n: int) -> tuple[int, int]:
    """A Kronecker split n = first · second with a small first factor (LyCORIS' factor-like)."""
    for f in (3, 4, 2):
        if n % f == 0 and n > f:
            return f, n // f
    return 1, n


def adapter_tensors(kind: str, shape, g, rank=3) -> dict[str, torch.Tensor]:
    """Random tensors of one module of ``kind`` (roles as in loraport.adapters) for a weight of
    ``shape``, stored the way LyCORIS stores them; Tucker kinds fall back to the plain ones on
    linear layers (LyCORIS uses Tucker only where the kernel is larger than 1)."""
    out, channels, *kernel = shape
    conv = math.prod(kernel) > 1
    K = math.prod(kernel)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64) / 2

    if kind in ("loha", "loha-tucker"):
        if kind == "loha-tucker" and conv:
            return {f"hada_{w}": t for i in (1, 2) for w, t in (
                (f"w{i}_a", rnd(rank, out)), (f"w{i}_b", rnd(rank, channels)), (f"t{i}", rnd(rank, rank, *kernel)))}  # fmt: skip
        return {f"hada_w{i}_{ab}": rnd(out, rank) if ab == "a" else rnd(rank, channels * K) for i in (1, 2) for ab in "ab"}
    if kind.startswith("lokr"):
        (a, c), (b, d) = _split(out), _split(channels)
        t = {"lokr_w1": rnd(a, b)}
        if kind == "lokr-decomposed":
            t = {"lokr_w1_a": rnd(a, 1), "lokr_w1_b": rnd(1, b)}
        if kind == "lokr-full":
            t["lokr_w2"] = rnd(c, d, *kernel)
        elif kind == "lokr-tucker" and conv:
            t.update(lokr_t2=rnd(rank, rank, *kernel), lokr_w2_a=rnd(rank, c), lokr_w2_b=rnd(rank, d))
        else:
            t.update(lokr_w2_a=rnd(c, rank), lokr_w2_b=rnd(rank, d, *kernel))
        return t
    if kind == "locon-tucker":
        if not conv:
            return {"up": rnd(out, rank), "down": rnd(rank, channels)}
        ones = [1] * len(kernel)
        return {"up": rnd(out, rank, *ones), "mid": rnd(rank, rank, *kernel), "down": rnd(rank, channels, *ones)}
    if kind == "full":
        return {"diff": rnd(*shape), "diff_b": rnd(out)}
    ones = [1] * len(kernel)
    t = {"up": rnd(out, rank, *ones), "down": rnd(rank, channels, *kernel)}
    if kind == "dora":
        t["magnitude"] = rnd(out, 1, *ones).abs() + 1
    else:
        t["magnitude"] = rnd(1, channels, *ones).abs() + 1
    return t


def adapter_file(kind, hunyuan, *, fmt="kohya", alpha=2.0, rank=3, seed=0, modules=None):
    """(state dict, {key stem: (tensors, scale, weight shape)}) of a ``kind`` adapter (a list:
    one kind per module in turn) on every adaptable module of the tiny base (or ``modules``) in
    format ``fmt``."""
    g = torch.Generator().manual_seed(seed)
    plain = formats.read_lora(tiny.lora(ARCH, hunyuan, fmt=fmt, modules=modules), arch=ARCH)
    names = {role: suffix for suffix, role in adapters.suffixes(fmt).items()}
    sd, truth = {}, {}
    kinds = [kind] if isinstance(kind, str) else kind
    for i, m in enumerate(plain.modules):
        kind = kinds[i % len(kinds)]
        t = adapter_tensors(kind, m.shape, g, rank)
        if fmt in ("diffusers", "peft") and "magnitude" in t:
            t["magnitude"] = t["magnitude"].flatten()
        sd.update({m.key + names[role]: v.float() for role, v in t.items()})
        r = t["down"].shape[0] if "down" in t else t["hada_w1_b"].shape[0] if "hada_w1_b" in t else (
            t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else 0)  # fmt: skip
        has_alpha = alpha is not None and kind != "full" and fmt not in ("diffusers", "peft")
        if has_alpha:
            sd[m.key + ".alpha"] = torch.tensor(alpha)
        truth[m.key] = ({k: v.float() for k, v in t.items()}, alpha / r if has_alpha and r else 1.0, m.shape)
    return sd, truth


def dense_of(m) -> torch.Tensor:
    up, down = adapters.factors(m)
    return up.double() @ down.double()


def rel(a, b) -> float:
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


@pytest.mark.parametrize("kind", [k for k in KINDS if not k.startswith("dora")])
def test_every_type_reads_to_the_dense_reference(hunyuan, kind):
    sd, truth = adapter_file(kind, hunyuan)
    lf = formats.read_lora(sd)
    assert (lf.format, lf.arch.name) == ("kohya", ARCH) and len(lf.modules) == len(truth)
    conv = 0
    for m in lf.modules:
        t, scale, shape = truth[m.key]
        assert m.known and m.fits(shape)
        conv += len(shape) > 2
        want = reference.adapter_delta(t, scale, shape).flatten(1)
        assert rel(dense_of(m), want) < 1e-5, m.key
        if kind == "locon-tucker" and len(shape) == 2:
            assert isinstance(m, formats.LoraModule)  # a plain module stays a LoraModule
    assert conv == 1  # img_in's conv3d is among them


def test_loha_and_lokr_factor_ranks_follow_their_structure(hunyuan):
    loha = formats.read_lora(adapter_file("loha", hunyuan, rank=3)[0]).modules[0]
    assert adapters.factors(loha)[0].shape[1] == 9  # r1·r2
    lokr = formats.read_lora(adapter_file("lokr", hunyuan, rank=3)[0]).modules[0]
    assert adapters.factors(lokr)[0].shape[1] == 3 * 3  # rank(w1) · rank(w2): w1 [3, 4], w2 rank 3


@pytest.mark.parametrize("kind", ["dora", "dora-in"])
def test_dora_magnitude_axis_and_round_trip(tmp_path, hunyuan, kind):
    sd, truth = adapter_file(kind, hunyuan)
    lf = formats.read_lora(sd)
    for m in lf.modules:
        t, _, shape = truth[m.key]
        assert m.magnitude_axis == ("out" if kind == "dora" else "in") and m.type_name == "DoRA LoCon"
        assert torch.equal(m.tensors["magnitude"], t["magnitude"].flatten())
        with pytest.raises(InputError, match="DoRA"):
            adapters.factors(m)
    out = formats.write_lora(lf, tmp_path / "out.safetensors")
    back = formats.read_lora(out)
    for m in back.modules:
        t = truth[m.key][0]
        assert torch.equal(m.tensors["magnitude"].reshape(t["magnitude"].shape), t["magnitude"])


def test_peft_dora_magnitude_is_per_output_row_and_alpha_from_config(tmp_path, hunyuan):
    sd, truth = adapter_file("dora", hunyuan, fmt="peft", modules=["double_blocks.0.img_attn_proj"])
    path = tmp_path / "adapter_model.safetensors"
    save_file(sd, path)
    (tmp_path / "adapter_config.json").write_text('{"r": 3, "lora_alpha": 6, "use_dora": true}')
    [m] = formats.read_lora(path, arch=ARCH).modules
    assert m.magnitude_axis == "out" and m.scale == 2.0 and m.tensors["magnitude"].shape == (16,)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", ["kohya", "comfy"])
def test_round_trip_keeps_every_tensor(tmp_path, hunyuan, kind, fmt):
    sd, _ = adapter_file(kind, hunyuan)
    lf = formats.read_lora(sd)
    path = formats.write_lora(lf, tmp_path / "out.safetensors", format=fmt)
    back = {m.name: m for m in formats.read_lora(path).modules}
    assert back.keys() == {m.name for m in lf.modules}
    for m in lf.modules:
        b = back[m.name]
        assert type(b) is type(m) and b.alpha == m.alpha
        if isinstance(m, adapters.AdapterModule):
            assert b.kind == m.kind and b.tensors.keys() == m.tensors.keys()
            assert all(torch.equal(b.tensors[r], m.tensors[r]) for r in m.tensors)


@pytest.mark.parametrize("kind", ["loha", "lokr", "lokr-decomposed", "dora"])
def test_peft_writer_folds_the_scale(tmp_path, hunyuan, kind):
    """kohya -> peft renames double_blocks.0.img_attn_proj to transformer_blocks.0.attn.to_out.0."""
    lf = formats.read_lora(adapter_file(kind, hunyuan, alpha=6.0, modules=["double_blocks.0.img_attn_proj"])[0], arch=ARCH)
    path = formats.write_lora(lf, tmp_path / "out.safetensors", format="peft")
    back = formats.read_lora(path, arch=ARCH).modules
    assert [b.name for b in back] == ["transformer_blocks.0.attn.to_out.0"]
    for m, b in zip(lf.modules, back, strict=True):
        assert b.scale == 1.0 and b.kind == m.kind
        if m.magnitude_axis:
            assert torch.equal(b.tensors["magnitude"], m.tensors["magnitude"])
            m, b = adapters.without_magnitude(m), adapters.without_magnitude(b)
        assert rel(dense_of(b), dense_of(m)) < 1e-6


@pytest.mark.parametrize("kind", ["full", "locon-tucker", "dora-in"])
def test_types_peft_cannot_hold_are_refused_there(tmp_path, hunyuan, kind):
    lf = formats.read_lora(adapter_file(kind, hunyuan)[0])
    with pytest.raises(InputError, match="no peft form"):
        formats.write_lora(lf, tmp_path / "out.safetensors", format="peft")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("kind", ["loha", "loha-tucker", "lokr", "full", "dora"])
def test_split_and_renamed_layers_are_exact(hunyuan, kind):
    """kohya (fused qkv, original names) -> diffusers names (split q, k, v): rows sliced exactly."""
    sd, truth = adapter_file(kind, hunyuan, modules=["double_blocks.0.img_attn_qkv", "double_blocks.0.img_attn_proj"])
    lf = formats.read_lora(sd, arch=ARCH)
    split = formats.convert_style(lf, "diffusers")
    assert len(split) > len(lf.modules)
    by_name = {m.name: m for m in split}
    src = next(m for m in lf.modules if m.name == "double_blocks.0.img_attn_qkv")
    t, scale, shape = truth[src.key]
    want = reference.adapter_delta(t, scale, shape).flatten(1)  # [48, 16]: q, k, v rows
    parts = [by_name[f"transformer_blocks.0.attn.to_{p}"] for p in "qkv"]
    if kind == "dora":
        assert torch.equal(torch.cat([p.tensors["magnitude"] for p in parts]), src.tensors["magnitude"])
        parts, want = [adapters.without_magnitude(p) for p in parts], dense_of(adapters.without_magnitude(src))
    got = torch.cat([dense_of(p) for p in parts])
    assert rel(got, want) < 1e-5


def test_lokr_rows_across_kronecker_blocks_are_refused(hunyuan):
    lf = formats.read_lora(adapter_file("lokr", hunyuan)[0])
    m = next(m for m in lf.modules if m.name == "double_blocks.0.img_attn_qkv")  # w1 3 rows x w2 16 rows
    with pytest.raises(InputError, match="Kronecker blocks.*convert"):
        adapters.select_rows(m, torch.arange(8), "splitting qkv")
    rows = torch.cat([torch.arange(32, 48), torch.arange(16)])  # whole blocks of 16 rows, reordered
    assert rel(dense_of(adapters.select_rows(m, rows, "splitting")), dense_of(m)[rows]) < 1e-6


def test_split_parts_cannot_be_fused_into_an_adapter(hunyuan):
    lf = formats.read_lora(adapter_file("loha", hunyuan)[0])
    diffusers = formats.LoraFile(formats.convert_style(lf, "diffusers"), "diffusers", lf.arch, "diffusers")
    with pytest.raises(InputError, match="fused.*convert it to a plain LoRA"):
        formats.convert_style(diffusers, "original")


@pytest.mark.parametrize("kind", ["loha", "loha-tucker", "lokr", "lokr-full", "lokr-tucker", "locon-tucker", "full", "dora"])
def test_padding_input_channels_is_exact(hunyuan, kind):
    lf = formats.read_lora(adapter_file(kind, hunyuan)[0])
    m = next(m for m in lf.modules if m.name == "img_in.proj")  # conv3d [16, 4, 1, 2, 2]
    src, tgt = (16, 4, 1, 2, 2), (16, 8, 1, 2, 2)
    assert adapters.pad_refusal(m, src, tgt) is None
    padded = adapters.pad_inputs(m, src, tgt)
    assert padded.fits(tgt)
    if kind == "dora":
        m, padded = adapters.without_magnitude(m), adapters.without_magnitude(padded)
    want = torch.cat([dense_of(m).reshape(16, 4, 4), torch.zeros(16, 4, 4, dtype=torch.float64)], 1).flatten(1)
    assert rel(dense_of(padded), want) < 1e-6


def test_padding_refused_where_the_type_cannot_express_it(hunyuan):
    lokr = formats.read_lora(adapter_file("lokr", hunyuan)[0])
    m = next(m for m in lokr.modules if m.name == "double_blocks.0.img_attn_proj")  # w1 [4, 4], w2 [4, 4]
    assert _split(16) == (4, 4)
    assert adapters.pad_refusal(m, (16, 16), (16, 18)) is not None  # 18 channels: not whole blocks of 4
    assert adapters.pad_refusal(m, (16, 16), (16, 20)) is None  # 5 blocks of 4: zero block in w1
    with pytest.raises(InputError, match="cannot pad"):
        adapters.pad_inputs(m, (16, 16), (16, 18))
    dora_in = formats.read_lora(adapter_file("dora-in", hunyuan)[0]).modules[0]
    assert "input channel" in adapters.pad_refusal(dora_in, (48, 16), (48, 20))


@pytest.mark.parametrize(
    "key,match",
    [
        ("lora_unet_double_blocks_0_img_attn_qkv.hada_w1_a", "LoHa|loha.*has no hada_w1_b"),
        ("lora_unet_double_blocks_0_img_attn_qkv.lokr_w1", "LoKr.*neither lokr_w2"),
        ("lora_unet_double_blocks_0_img_attn_qkv.dora_scale", "has only"),
    ],
)
def test_incomplete_adapters_name_file_and_module(tmp_path, key, match):
    sd = {key: torch.ones(4, 4)}
    path = tmp_path / "bad.safetensors"
    save_file(sd, path)
    with pytest.raises(InputError, match=rf"bad\.safetensors.*({match})"):
        formats.read_lora(path, arch=ARCH)


def test_factors_that_do_not_multiply_are_refused(tmp_path, hunyuan):
    sd, _ = adapter_file("loha", hunyuan, modules=["double_blocks.0.img_attn_proj"])
    key = next(k for k in sd if k.endswith("hada_w2_b"))
    sd[key] = torch.ones(5, 16)
    with pytest.raises(InputError, match="img_attn_proj.*do not fit together.*hada_w2_b"):
        formats.read_lora(sd, arch=ARCH)
    sd, _ = adapter_file("dora", hunyuan, modules=["double_blocks.0.img_attn_proj"])
    key = next(k for k in sd if k.endswith("dora_scale"))
    sd[key] = torch.ones(7, 1)
    with pytest.raises(InputError, match="DoRA magnitude.*\\[7, 1\\]"):
        formats.read_lora(sd, arch=ARCH)


@pytest.mark.parametrize(
    "kind,suffix,value,match",
    [
        ("loha", "hada_w1_a", torch.ones(16, 3, dtype=torch.int64), "must be floating point, got torch.int64"),
        ("lokr", "lokr_w1", torch.ones(4, 4, dtype=torch.bool), "must be floating point"),
        ("dora", "dora_scale", torch.tensor(1.0), r"is \[\]: needs at least 1 dimensions"),
        ("full", "diff", torch.ones(16), r"is \[16\]: needs at least 2 dimensions"),
        ("full", "diff", torch.ones(0, 16), r"is \[0, 16\]: empty"),
        ("locon-tucker", "lora_mid.weight", torch.ones(3, 3, 0), "empty"),
        ("full", "diff_b", torch.ones(3), "diff_b must hold one bias per output row"),
        ("lokr", "lokr_w2_a", torch.ones(1, 4, 3), "lokr_w2 must be"),  # would broadcast in w2_a @ w2_b
    ],
)
def test_adapter_tensors_of_the_wrong_kind_name_file_and_tensor(tmp_path, hunyuan, kind, suffix, value, match):
    module = "img_in.proj" if kind == "locon-tucker" else "double_blocks.0.img_attn_proj"
    sd, _ = adapter_file(kind, hunyuan, modules=[module])
    key = next(k for k in sd if k.endswith("." + suffix))
    sd[key] = value
    path = tmp_path / "bad.safetensors"
    save_file(sd, path)
    with pytest.raises(InputError, match=rf"bad\.safetensors: .*({match})") as e:
        formats.read_lora(path, arch=ARCH)
    assert "\n" not in str(e.value) and (key in str(e.value) or "img_attn_proj" in str(e.value))


def test_peft_loha_and_lokr_alpha_from_their_config(tmp_path, hunyuan):
    """PEFT's LoHa/LoKr configs call it ``alpha`` (scale alpha / r); a LoKr with both factors
    full has no rank and stays at scale 1."""
    for kind, scale in (("loha", 2.0), ("lokr", 2.0), ("lokr-full", 1.0)):
        sd, _ = adapter_file(kind, hunyuan, fmt="peft", modules=["double_blocks.0.img_attn_proj"])
        folder = tmp_path / kind
        folder.mkdir()
        save_file(sd, folder / "adapter_model.safetensors")
        (folder / "adapter_config.json").write_text('{"r": 3, "alpha": 6, "peft_type": "LOHA"}')
        [m] = formats.read_lora(folder / "adapter_model.safetensors", arch=ARCH).modules
        assert m.kind == kind.split("-")[0] and m.scale == scale
