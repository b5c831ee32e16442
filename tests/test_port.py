"""The porting pipeline against a dense float64 reference of the same formula (exact SVD
subspaces of the base weights, loraport.reference.project_lora_dense), for every variant (copy
and the two projections), conv and fused/split layers, widened inputs, the similarity threshold, energy-chosen
ranks, streaming in groups, the report, and bad input."""

import json
import os

import pytest
import torch

from loraport import formats, reference
from loraport.errors import InputError
from loraport.gate import gate_rank
from loraport.pipeline import VARIANTS, default_subspace_rank, port
from loraport.testing import tiny

ARCH = "hunyuan-video"
K = 6  # subspace rank; the LoRA rank 4 <= K keeps every projection exact
SVD = dict(subspace_rank=K, power_iters=4, quiet=True, variant="target")  # the projection (the default variant copies)


def delta(m: formats.LoraModule) -> torch.Tensor:
    up, down = m.factors()
    return up.double() @ down.double()  # [out, in·kernel]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


def projected(d: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    """U Uᵀ d V Vᵀ with the exact top-k subspaces of w (float64)."""
    U, _, V = reference.svd_truncated(w.flatten(1), k)
    return reference.project_lora_dense(d, torch.eye(d.shape[1], dtype=torch.float64), U, V)


def similarity(ws: torch.Tensor, wt: torch.Tensor, k: int) -> float:
    Us, _, Vs = reference.svd_truncated(ws.flatten(1), k)
    Ut, _, Vt = reference.svd_truncated(wt.flatten(1), k)
    return float(reference.subspace_similarity(Us, Ut) + reference.subspace_similarity(Vs, Vt)) / 2


@pytest.fixture(scope="module")
def models():
    source = tiny.base_model(ARCH, width=16, seed=0)
    return {"source": source, "target": tiny.related(source), "unrelated": tiny.base_model(ARCH, width=16, seed=7)}


@pytest.fixture(scope="module")
def lora_sd(models):
    return tiny.lora(ARCH, models["source"], fmt="kohya", rank=4, alpha=3.0)


def files(tmp_path, models, lora_sd, target="target"):
    paths = {
        "lora": str(tmp_path / "lora.safetensors"),
        "source": tiny.save_base(models["source"], str(tmp_path / "source.safetensors")),
        "target": tiny.save_base(models[target], str(tmp_path / "target.safetensors")),
        "out": str(tmp_path / "out.safetensors"),
    }
    tiny.save_base(lora_sd, paths["lora"])
    return paths


@pytest.mark.parametrize("variant", VARIANTS)
def test_port_matches_dense_reference(tmp_path, models, lora_sd, variant):
    p = files(tmp_path, models, lora_sd)
    rep = port(p["lora"], p["source"], p["target"], p["out"], **{**SVD, "variant": variant})
    lora_in = formats.read_lora(p["lora"], arch=ARCH)
    lora_out = formats.read_lora(p["out"], arch=ARCH)
    assert lora_out.format == "kohya"
    out = {m.name: m for m in lora_out.modules}
    rows = {r.module: r for r in rep.rows}
    assert len(out) == len(lora_in.modules) == 29
    assert any(m.kernel for m in lora_in.modules)  # the Conv3d img_in is among them
    for m in lora_in.modules:
        ws, wt = models["source"][m.name + ".weight"].double(), models["target"][m.name + ".weight"].double()
        d = delta(m)
        if variant == "source-then-target":
            d = projected(d, ws, K)
        want = d if variant == "copy" else projected(d, wt, K)
        got = delta(out[m.name])
        assert rel_err(got, want) < 1e-3, m.name
        assert out[m.name].alpha == out[m.name].rank == 4  # scale folded: alpha = rank
        row = rows[m.name]
        assert row.action == "ported" and row.rank_in == row.rank_out == 4
        assert abs(row.similarity - similarity(ws, wt, K)) < 1e-3
        assert abs(row.rel_change - rel_err(want, delta(m))) < 1e-3
        assert row.similarity > 0.9  # a related release
    changes = [r.rel_change for r in rep.rows]
    if variant == "copy":
        assert max(changes) == 0.0 and "ΔW changed by" not in rep.table()
    else:  # the table says how much of ΔW the projection changed
        assert f"ΔW changed by   mean {sum(changes) / len(changes):.3f}  max {max(changes):.3f}" in rep.table()


def test_fused_lora_on_split_bases_and_split_lora_on_fused_bases(tmp_path, models, lora_sd):
    p = files(tmp_path, models, lora_sd)
    # kohya (fused qkv / linear1) LoRA on diffusers folders (split to_q/to_k/to_v/proj_mlp), from a
    # .pt source; written as diffusers
    src = tiny.save_base(tiny.to_diffusers_names(ARCH, models["source"]), str(tmp_path / "src_d"), "diffusers")
    tgt = tiny.save_base(tiny.to_diffusers_names(ARCH, models["target"]), str(tmp_path / "tgt_d"), "diffusers")
    out_d = str(tmp_path / "split.safetensors")
    port(p["lora"], src, tgt, out_d, format="diffusers", **SVD)
    split = {m.name: delta(m) for m in formats.read_lora(out_d, arch=ARCH).modules}
    # the same LoRA converted to diffusers names, on the original (fused) bases
    diff_lora = str(tmp_path / "lora_d.safetensors")
    formats.write_lora(formats.read_lora(p["lora"], arch=ARCH), diff_lora, format="diffusers")
    out_s = str(tmp_path / "slices.safetensors")
    port(diff_lora, tiny.save_base(models["source"], str(tmp_path / "s.pt"), "pt"), p["target"], out_s, **SVD)
    sliced = {m.name: m for m in formats.read_lora(out_s, arch=ARCH).modules}

    lora_in = formats.read_lora(p["lora"], arch=ARCH)
    split_in = {m.name: m for m in formats.read_lora(diff_lora, arch=ARCH).modules}
    a = lora_in.arch
    for m in lora_in.modules:
        want = projected(delta(m), models["target"][m.name + ".weight"].double(), K)
        parts = a.split_parts(m.name) or [None]
        for part in parts:
            renamed = part or a.translate(m.name, "original", "diffusers")[0]  # norm_out.linear: halves swapped
            name, rows = renamed.name, part.rows(want.shape[0]) if part else slice(None)
            assert rel_err(split[name], renamed.arrange(want[rows])) < 1e-3, name  # fused projection, then split
            if part:  # split module projected on its row slice of the fused weight
                wt = models["target"][m.name + ".weight"].double()[rows]
                assert rel_err(delta(sliced[name]), projected(delta(split_in[name]), wt, K)) < 1e-3, name


def test_dissimilar_layers_are_skipped_or_copied(tmp_path, models, lora_sd):
    p = files(tmp_path, models, lora_sd, target="unrelated")
    with pytest.raises(InputError, match="no module was ported or copied"):
        port(p["lora"], p["source"], p["target"], p["out"], min_similarity=0.95, report=str(tmp_path / "r.json"), **SVD)
    assert not os.path.exists(p["out"])
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["summary"]["actions"] == {"skipped": 29}
    rep = port(p["lora"], p["source"], p["target"], p["out"], min_similarity=0.95, on_dissimilar="copy", **SVD)
    assert {r.action for r in rep.rows} == {"copied"}
    lora_in = {m.name: delta(m) for m in formats.read_lora(p["lora"], arch=ARCH).modules}
    for m in formats.read_lora(p["out"], arch=ARCH).modules:
        torch.testing.assert_close(delta(m), lora_in[m.name])
    for r in rep.rows:  # similarity of unrelated weights is far below that of related ones
        assert r.similarity < 0.9


def test_widened_input_channels_and_shape_mismatch(tmp_path, models, lora_sd):
    target = tiny.widen_input(models["target"], "img_in.proj.weight", 9)  # 4 -> 9 input channels
    narrower = target["single_blocks.0.linear2.weight"][:, :-8].contiguous()
    target = {**target, "single_blocks.0.linear2.weight": narrower}
    models = {**models, "wide": target}
    p = files(tmp_path, models, lora_sd, target="wide")
    rep = port(p["lora"], p["source"], p["target"], p["out"], **SVD)
    rows = {r.module: r for r in rep.rows}
    assert rows["img_in.proj"].action == "padded" and rows["img_in.proj"].target_shape == [16, 9, 1, 2, 2]
    assert rows["single_blocks.0.linear2"].action == "shape-mismatch"
    out = {m.name: m for m in formats.read_lora(p["out"], arch=ARCH).modules}
    assert "single_blocks.0.linear2" not in out
    conv = [m for m in formats.read_lora(p["lora"], arch=ARCH).modules if m.name == "img_in.proj"][0]
    up, down = conv.factors()
    down_pad = torch.cat([conv.down.double(), torch.zeros(4, 5, 1, 2, 2, dtype=torch.float64)], 1).flatten(1)
    # the target's subspaces come from its old channels (new ones zeroed): the part the LoRA acts on
    wt_old = target["img_in.proj.weight"].double().clone()
    wt_old[:, 4:] = 0
    want = projected(up.double() @ down_pad, wt_old, K)
    assert out["img_in.proj"].down.shape == (4, 9, 1, 2, 2)
    assert rel_err(delta(out["img_in.proj"]), want) < 1e-3
    assert out["img_in.proj"].down[:, 4:].abs().max() == 0  # the new channels get no update
    ws = torch.cat(
        [models["source"]["img_in.proj.weight"].double(), torch.zeros(16, 5, 1, 2, 2, dtype=torch.float64)], 1
    )
    assert abs(rows["img_in.proj"].similarity - similarity(ws, wt_old, K)) < 1e-3
    # the default variant: the same LoRA, its down factor zero-padded on the new channels
    rep = port(p["lora"], p["source"], p["target"], p["out"], **{**SVD, "variant": "copy"})
    assert {r.module: r.action for r in rep.rows}["img_in.proj"] == "padded"
    (got,) = [m for m in formats.read_lora(p["out"], arch=ARCH).modules if m.name == "img_in.proj"]
    assert got.down.shape == (4, 9, 1, 2, 2)
    torch.testing.assert_close(delta(got), up.double() @ down_pad)


def test_energy_rank_and_output_rank(tmp_path, models, lora_sd):
    p = files(tmp_path, models, lora_sd)
    # energy searches below the subspace rank: the given one here, else default_subspace_rank
    rep = port(p["lora"], p["source"], p["target"], p["out"], energy=0.9, rank=2, power_iters=4, quiet=True,
               variant="target", subspace_rank=12)  # fmt: skip
    out = {m.name: m for m in formats.read_lora(p["out"], arch=ARCH).modules}
    for m in formats.read_lora(p["lora"], arch=ARCH).modules:
        row = next(r for r in rep.rows if r.module == m.name)
        wt = models["target"][m.name + ".weight"].double().flatten(1)
        s2 = torch.linalg.svdvals(wt).square()
        k_ref = min(int((torch.cumsum(s2, 0) < 0.9 * s2.sum()).sum()) + 1, 12, *wt.shape)
        assert abs(row.subspace_rank[1] - k_ref) <= 1, m.name
        assert out[m.name].rank == row.rank_out == min(2, row.subspace_rank[1])
        want = reference.best_rank(projected(delta(m), wt, row.subspace_rank[1]), row.rank_out)
        assert rel_err(delta(out[m.name]), want) < 1e-3, m.name


def test_defaults_copy_where_the_gate_passes_at_a_quarter_of_the_width(tmp_path, models, lora_sd):
    """No variant, no subspace rank: the default gate (k from the spectrum, at most
    min(16, min(m, n) // 4)) decides each layer as the exact float64 gate does, and the layer is
    carried over unchanged; rank= truncates optimally."""
    p = files(tmp_path, models, lora_sd)
    rep = port(p["lora"], p["source"], p["target"], p["out"], power_iters=4, quiet=True)
    assert rep.settings["variant"] == "copy"
    assert "copy: the LoRA's ΔW kept where similarity >= 0.5 and each side >= 0.25, else skipped" in rep.table()
    lora_in = {m.name: m for m in formats.read_lora(p["lora"], arch=ARCH).modules}
    out = {m.name: m for m in formats.read_lora(p["out"], arch=ARCH).modules}
    assert out.keys() == lora_in.keys()
    for r in rep.rows:
        ws, wt = (models[side][r.module + ".weight"].double() for side in ("source", "target"))
        left, right, k = reference.gate_exact(ws, wt, gate_rank(wt.shape[0], wt[0].numel()))
        assert r.subspace_rank == [k, k] and k <= default_subspace_rank(wt.shape[0], wt[0].numel())
        assert abs(r.similarity - (left + right) / 2) < 1e-2, r.module
        assert r.action == "ported" and r.rel_change == 0.0 and r.rank_out == 4
        torch.testing.assert_close(delta(out[r.module]), delta(lora_in[r.module]))
    assert default_subspace_rank(3072, 21504) == 64 and default_subspace_rank(64, 3072) == 16
    assert default_subspace_rank(3, 3) == 1
    # rank=2: the best rank-2 factors of each ΔW (Eckart–Young), scale folded
    rep = port(p["lora"], p["source"], p["target"], p["out"], rank=2, power_iters=4, quiet=True)
    assert "its best rank-2 factors where r > 2" in rep.table()
    for m in formats.read_lora(p["out"], arch=ARCH).modules:
        assert m.rank == m.alpha == 2
        want = reference.best_rank(delta(lora_in[m.name]), 2)
        assert rel_err(delta(m), want) < 1e-5, m.name
    # a LoRA of rank 20 on 16-wide layers ([48, 16], [96, 16], ...): truncated to 10 all the same
    wide = tiny.lora(ARCH, models["source"], fmt="kohya", rank=20, alpha=5.0)
    rep = port(wide, p["source"], p["target"], p["out"], rank=10, power_iters=4, quiet=True)
    for m in formats.read_lora(wide, arch=ARCH).modules:
        got = next(x for x in formats.read_lora(p["out"], arch=ARCH).modules if x.name == m.name)
        assert got.rank == 10 and rel_err(delta(got), reference.best_rank(delta(m), 10)) < 1e-5, m.name
    # the unrelated release is told apart at this k: every layer under the default gate
    p = files(tmp_path, models, lora_sd, target="unrelated")
    with pytest.raises(InputError, match="no module was ported or copied"):
        port(p["lora"], p["source"], p["target"], p["out"], power_iters=4, quiet=True)


def test_krylov_block_size_reaches_rsvd_and_falls_back_where_too_narrow(tmp_path, models, lora_sd, monkeypatch):
    """block_size goes to every rsvd call whose rank fits (power_iters + 1) blocks, the default
    width elsewhere; the result still matches the dense reference."""
    from loraport import pipeline

    blocks = []
    real = pipeline.rsvd

    def spy(A, rank, **kw):
        blocks.append((min(A.shape[-2:]), rank, kw["block_size"]))
        return real(A, rank, **kw)

    monkeypatch.setattr(pipeline, "rsvd", spy)
    p = files(tmp_path, models, lora_sd)
    # 4 blocks of 4 span a 16-wide matrix: exact subspaces, as in test_port_matches_dense_reference
    rep = port(p["lora"], p["source"], p["target"], p["out"], method="krylov", block_size=4, **SVD)
    assert rep.settings["block_size"] == 4 and {b for *_, b in blocks} == {4}
    out = {m.name: m for m in formats.read_lora(p["out"], arch=ARCH).modules}
    for m in formats.read_lora(p["lora"], arch=ARCH).modules:
        want = projected(delta(m), models["target"][m.name + ".weight"].double(), K)
        assert rel_err(delta(out[m.name]), want) < 1e-3, m.name
    # 5 blocks of 1 column cannot hold rank 6: the default width is used instead of an error
    blocks.clear()
    port(p["lora"], p["source"], p["target"], p["out"], method="krylov", block_size=1, **SVD)
    assert blocks and {b for *_, b in blocks} == {None}
    with pytest.raises(ValueError, match='block_size is a setting of method="krylov"'):
        port(p["lora"], p["source"], p["target"], p["out"], block_size=4, **SVD)


def test_streaming_in_small_groups_gives_the_same_result(tmp_path, models, lora_sd):
    p = files(tmp_path, models, lora_sd)
    port(p["lora"], p["source"], p["target"], p["out"], **SVD)
    one = str(tmp_path / "one.safetensors")
    rep = port(p["lora"], p["source"], p["target"], one, max_memory=160_000, **SVD)  # 1-2 layers a chunk
    assert rep.settings["max_memory"] == 160_000
    big = {m.name: delta(m) for m in formats.read_lora(p["out"], arch=ARCH).modules}
    small = formats.read_lora(one, arch=ARCH).modules
    assert {m.name for m in small} == big.keys()
    for m in small:
        torch.testing.assert_close(delta(m), big[m.name], rtol=1e-4, atol=1e-6)



@pytest.mark.cuda
def test_port_on_cuda_matches_the_dense_reference_like_the_cpu(tmp_path, models, lora_sd):
    """The same port on the GPU (page-locked reads, rsvd's CUDA kernels, projections on the
    device): the same actions and ranks as on the CPU, and the same LoRA within the accuracy of
    the randomized subspaces (each device draws its own sketch from the seed)."""
    p = files(tmp_path, models, lora_sd)
    cpu_rep = port(p["lora"], p["source"], p["target"], p["out"], **SVD)
    gpu_out = str(tmp_path / "gpu.safetensors")
    gpu_rep = port(p["lora"], p["source"], p["target"], gpu_out, device="cuda", **SVD)
    assert [(r.module, r.action, r.rank_out) for r in gpu_rep.rows] == [(r.module, r.action, r.rank_out) for r in cpu_rep.rows]
    for g, c in zip(gpu_rep.rows, cpu_rep.rows):
        assert abs(g.similarity - c.similarity) < 1e-3, g.module
    lora_in = {m.name: delta(m) for m in formats.read_lora(p["lora"], arch=ARCH).modules}
    cpu = {m.name: delta(m) for m in formats.read_lora(p["out"], arch=ARCH).modules}
    for m in formats.read_lora(gpu_out, arch=ARCH).modules:
        want = projected(lora_in[m.name], models["target"][m.name + ".weight"].double(), K)
        assert rel_err(delta(m), want) < 1e-3, m.name
        assert rel_err(delta(m), cpu[m.name]) < 2e-3, m.name


@pytest.mark.cuda
@pytest.mark.parametrize("target", ["target", "unrelated"])
def test_default_gate_on_cuda_decides_as_the_exact_gate(tmp_path, models, lora_sd, target):
    """The default gate on the GPU (each chunk copied to the device in its own dtype, the products
    there): every layer's k and decision those of the exact float64 gate, as on the CPU; then
    again from the sketch cache, where a layer that does not settle on the cached estimate
    refines it from a weight read on the host now. The unrelated release iterates past the
    first estimate and fails every layer."""
    p = files(tmp_path, models, lora_sd, target=target)
    cache = str(tmp_path / "cache")
    runs = []
    for i in range(2):  # empty cache, then every sketch from it
        report = str(tmp_path / f"report{i}.json")
        try:
            port(p["lora"], p["source"], p["target"], p["out"], device="cuda", cache_dir=cache, report=report, power_iters=4, quiet=True)
        except InputError:  # nothing passed, nothing written: the report says why
            assert target == "unrelated"
        runs.append(json.load(open(report))["layers"])
    for rows in runs:
        for r in rows:
            ws, wt = (models[side][r["module"] + ".weight"].double() for side in ("source", target))
            left, right, k = reference.gate_exact(ws, wt, gate_rank(wt.shape[0], wt[0].numel()))
            assert r["subspace_rank"] == [k, k], r["module"]
            assert abs(r["similarity"] - (left + right) / 2) < 1e-2, r["module"]
            assert r["action"] == ("ported" if target == "target" else "skipped"), r["module"]
    assert all(r["subspaces_from_cache"] == 2 for r in runs[1])


def test_dry_run_and_report(tmp_path, models, lora_sd):
    p = files(tmp_path, models, lora_sd)
    rep = port(p["lora"], p["source"], p["target"], dry_run=True, report=str(tmp_path / "r.json"), quiet=True)
    assert {r.action for r in rep.rows} == {"planned"} and rep.bytes_read == 0
    assert sorted(os.listdir(tmp_path)) == ["lora.safetensors", "r.json", "source.safetensors", "target.safetensors"]
    rep = port(p["lora"], p["source"], p["target"], p["out"], report=str(tmp_path / "r.json"), **SVD)
    doc = json.loads((tmp_path / "r.json").read_text())
    assert len(doc["layers"]) == 29 and doc["summary"]["actions"] == {"ported": 29}
    assert doc["arch"] == ARCH and doc["format_out"] == "kohya" and doc["bytes_read"] == rep.bytes_read > 0
    assert json.loads(rep.to_json())["summary"] == doc["summary"]
    assert "29 layers: 29 ported" in rep.table()


def test_bad_input(tmp_path, models, lora_sd):
    p = files(tmp_path, models, lora_sd)
    before = sorted(os.listdir(tmp_path))
    wan = tiny.base_model("wan", width=16)
    wan_lora = tiny.save_base(tiny.lora("wan", wan, fmt="kohya"), str(tmp_path / "wan.safetensors"))
    with pytest.raises(
        InputError,
        match=r"wan\.safetensors: a wan LoRA, but the source base .*source\.safetensors is a hunyuan-video model",
    ):
        port(wan_lora, p["source"], p["target"], p["out"], **SVD)
    with pytest.raises(InputError, match="the output path is an input file"):
        port(p["lora"], p["source"], p["target"], p["target"], **SVD)
    bad = dict(models["target"])
    bad["single_blocks.1.linear1.weight"] = bad["single_blocks.1.linear1.weight"].clone()
    bad["single_blocks.1.linear1.weight"][3, 3] = float("nan")
    nan_target = tiny.save_base(bad, str(tmp_path / "nan.safetensors"))
    with pytest.raises(
        InputError, match=r"nan\.safetensors: tensor 'single_blocks\.1\.linear1\.weight' contains NaN or Inf"
    ):
        port(p["lora"], p["source"], nan_target, p["out"], **SVD)
    # a LoRA that does not fit its source
    wrong = tiny.save_base(
        tiny.lora(ARCH, tiny.base_model(ARCH, width=8), fmt="kohya"), str(tmp_path / "w8.safetensors")
    )
    with pytest.raises(
        InputError, match=r"w8\.safetensors: module 'lora_unet_\w+' is \[\d+, 8\] .* source weight is \[\d+, 16\]"
    ):
        port(wrong, p["source"], p["target"], p["out"], **SVD)
    assert sorted(os.listdir(tmp_path)) == sorted(before + ["wan.safetensors", "nan.safetensors", "w8.safetensors"])


def test_unknown_and_missing_modules_are_reported_not_dropped_silently(tmp_path, models, lora_sd):
    sd = dict(lora_sd)
    sd["lora_unet_double_blocks_0_img_attn_foo.lora_down.weight"] = torch.ones(4, 16)
    sd["lora_unet_double_blocks_0_img_attn_foo.lora_up.weight"] = torch.ones(16, 4)
    target = {k: v for k, v in models["target"].items() if not k.startswith("single_blocks.1.linear2")}
    p = files(tmp_path, {**models, "cut": target}, sd, target="cut")
    rep = port(p["lora"], p["source"], p["target"], p["out"], **SVD)
    rows = {r.module: r for r in rep.rows}
    assert rows["double_blocks_0_img_attn_foo"].action == "unknown"
    assert rows["single_blocks.1.linear2"].action == "missing"
    assert "has no 'single_blocks.1.linear2.weight'" in rows["single_blocks.1.linear2"].note
    assert rep.summary()["actions"] == {"ported": 28, "unknown": 1, "missing": 1}
    assert "unknown        double_blocks_0_img_attn_foo" in rep.table()
    assert len(formats.read_lora(p["out"], arch=ARCH).modules) == 28


def test_an_unwritable_output_format_is_refused_before_any_work(tmp_path, monkeypatch):
    """Llama LoRAs have no diffusers format: port, resize and extract say so up front instead of
    after the SVDs (no rsvd call, no output file)."""
    from loraport import pipeline, toolbox

    def no_rsvd(*args, **kw):
        raise AssertionError("rsvd ran before the format was checked")

    monkeypatch.setattr(pipeline, "rsvd", no_rsvd)
    monkeypatch.setattr(toolbox, "rsvd", no_rsvd)
    source = tiny.base_model("llama", width=16, seed=0)
    src = tiny.save_base(source, str(tmp_path / "s.safetensors"))
    tgt = tiny.save_base(tiny.related(source), str(tmp_path / "t.safetensors"))
    lora = tiny.save_base(tiny.lora("llama", source, fmt="peft", rank=2), str(tmp_path / "l.safetensors"))
    out = str(tmp_path / "o.safetensors")
    with pytest.raises(InputError, match="llama LoRAs have no diffusers format; write them as peft"):
        port(lora, src, tgt, out, format="diffusers", quiet=True)
    with pytest.raises(InputError, match="llama LoRAs have no diffusers format"):
        toolbox.resize(lora, out, rank=1, format="diffusers", quiet=True)
    with pytest.raises(InputError, match="llama LoRAs have no diffusers format"):
        toolbox.extract(src, tgt, out, rank=2, format="diffusers", quiet=True)
    assert not os.path.exists(out)
