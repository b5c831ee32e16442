"""Lazy base-model readers: every on-disk layout gives the same tensors, reads only what is
asked, strips ComfyUI's packing prefix, fingerprints files and reports bad files cleanly."""

import json
import os

import pytest
import torch

from loraport.basemodel import BaseModel
from loraport.errors import InputError
from loraport.testing import tiny


@pytest.fixture(scope="module")
def weights():
    return tiny.base_model("wan", width=16, dtype=torch.bfloat16)


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "pt", "diffusers", "dict"])
def test_every_layout_reads_the_same_tensors(tmp_path, weights, layout):
    if layout == "dict":
        base = BaseModel(weights)
    else:
        name = "m.safetensors" if layout == "safetensors" else ("m.pt" if layout == "pt" else "m")
        base = BaseModel(tiny.save_base(weights, str(tmp_path / name), layout))
    assert sorted(base.names()) == sorted(weights)
    key = "blocks.1.ffn.0.weight"
    assert base.shape("model", key) == tuple(weights[key].shape)
    assert base.dtype("model", key) == torch.bfloat16
    assert base.bytes_read == 0
    rows = base.read("model", key, slice(8, 24))
    assert torch.equal(rows, weights[key][8:24])
    assert base.bytes_read == rows.numel() * 2
    assert torch.equal(base.read("model", "patch_embedding.weight"), weights["patch_embedding.weight"])


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "pt", "dict"])
def test_read_into_reads_straight_into_the_buffer_or_copies(tmp_path, weights, layout, monkeypatch):
    """read_into: one positioned read from a safetensors file into a contiguous buffer of the
    stored dtype (the port's loader); a copy through `read` for other dtypes, non-contiguous
    buffers (padded input channels) and the other layouts. Same bytes either way, and bytes_read
    counts them once."""
    name = {"safetensors": "m.safetensors", "pt": "m.pt"}.get(layout, "m")
    base = BaseModel(weights if layout == "dict" else tiny.save_base(weights, str(tmp_path / name), layout))
    direct = []
    real_preadv = os.preadv
    monkeypatch.setattr(os, "preadv", lambda *a: direct.append(a[2]) or real_preadv(*a))
    key = "blocks.1.ffn.0.weight"
    want = weights[key]
    rows = torch.full_like(want[8:24], float("nan"))  # poisoned: every element must be written
    base.read_into("model", key, rows, slice(8, 24))
    assert torch.equal(rows, want[8:24])
    assert bool(direct) == (layout in ("safetensors", "sharded"))
    assert base.bytes_read == rows.numel() * 2
    direct.clear()
    as_float = torch.full(want.shape, float("nan"))
    base.read_into("model", key, as_float)  # float32 buffer, bf16 file: read + copy
    padded = torch.full((want.shape[0], want.shape[1] + 3), float("nan"), dtype=want.dtype)
    base.read_into("model", key, padded[:, : want.shape[1]])  # non-contiguous: read + copy
    assert not direct
    assert torch.equal(as_float, want.float()) and torch.equal(padded[:, : want.shape[1]], want)
    assert padded[:, want.shape[1] :].isnan().all()
    assert base.bytes_read == rows.numel() * 2 + 2 * want.numel() * 2


def test_comfy_prefix_is_stripped_and_nan_reported(tmp_path, weights):
    packed = {"model.diffusion_model." + k: v for k, v in weights.items()}
    packed["model.diffusion_model.blocks.0.ffn.2.weight"] = packed[
        "model.diffusion_model.blocks.0.ffn.2.weight"
    ].clone()
    packed["model.diffusion_model.blocks.0.ffn.2.weight"][1, 1] = float("inf")
    path = tiny.save_base(packed, str(tmp_path / "c.safetensors"))
    base = BaseModel(path)
    assert "blocks.0.self_attn.q.weight" in base.names()
    with pytest.raises(InputError, match=r"c\.safetensors: tensor 'blocks\.0\.ffn\.2\.weight' contains NaN or Inf"):
        base.read("model", "blocks.0.ffn.2.weight")


def test_fingerprint_tracks_file_changes(tmp_path, weights):
    path = tiny.save_base(weights, str(tmp_path / "a.safetensors"))
    first = BaseModel(path).fingerprint()
    assert first == BaseModel(path).fingerprint()
    tiny.save_base(tiny.related(weights), path)
    os.utime(path, ns=(1, 1))
    assert BaseModel(path).fingerprint() != first
    assert BaseModel(weights).fingerprint() is None


def test_bad_base_files(tmp_path):
    with pytest.raises(InputError, match="missing.safetensors: no such file"):
        BaseModel(str(tmp_path / "missing.safetensors"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(InputError, match="junk.safetensors: not a readable safetensors file"):
        BaseModel(str(junk))
    pt = tmp_path / "junk.pt"
    pt.write_bytes(b"not a pickle")
    with pytest.raises(InputError, match="junk.pt: not a loadable torch checkpoint"):
        BaseModel(str(pt))


def test_index_names_only_shards_beside_it(tmp_path, weights):
    """A weight_map that is not a dict of plain file names (a path elsewhere, a list, a number)
    is one InputError line; nothing outside the folder is opened."""
    folder = tiny.save_base(weights, str(tmp_path / "sharded"), "sharded")
    index = os.path.join(folder, "model.safetensors.index.json")
    good = json.load(open(index))
    first = next(iter(good["weight_map"]))
    for weight_map, pattern in (({first: "../../etc/passwd"}, "not a file beside the index"),
                                ({first: ["a"]}, "not a file beside the index"),
                                ("shards", "'weight_map' must map tensor names"),
                                ({}, "'weight_map' must map tensor names")):  # fmt: skip
        with open(index, "w") as f:
            json.dump({"weight_map": weight_map}, f)
        with pytest.raises(InputError, match=pattern):
            BaseModel(index)
    with open(index, "w") as f:
        f.write('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(InputError, match="not a safetensors index"):
        BaseModel(index)
