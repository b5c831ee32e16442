"""resize, merge and extract (loraport.toolbox) against float64 dense references: resize is the
best rank-k approximation of the dense ΔW (Eckart–Young) and exact at rank >= r; merge "concat"
is the exact weighted sum, "svd" its best rank-k approximation; extract comes within a tight
factor of the optimal rank-k error of W_tuned − W_base. Plus dynamic ranks, metadata, reports,
the CLI and bad input."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from loraport import extract, formats, merge, reference, resize
from loraport.cli import main
from loraport.errors import InputError
from loraport.testing import tiny

ARCH = "hunyuan-video"


def delta(m: formats.LoraModule) -> torch.Tensor:
    up, down = m.factors()
    return up.double() @ down.double()  # [out, in·kernel]


def dense(m: formats.LoraModule) -> torch.Tensor:
    """ΔW of the input in float64 from the stored factors (no float32 rounding)."""
    return m.scale * m.up.double().flatten(1) @ m.down.double().flatten(1)


def norm(a: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a))


def modules(path, arch=None) -> dict[str, formats.LoraModule]:
    return {m.name: m for m in formats.read_lora(path, arch=arch or "auto").modules}


@pytest.fixture(scope="module")
def bases():
    return {arch: tiny.base_model(arch, width=16, seed=0) for arch in (ARCH, "sd15")}


def lora_file(tmp_path, bases, arch=ARCH, name="lora.safetensors", **kw) -> str:
    sd = tiny.lora(arch, bases[arch], **{"rank": 6, "alpha": 3.0, "dtype": torch.float64, **kw})
    path = str(tmp_path / name)
    save_file(sd, path, metadata={"ss_network_dim": "6", "ss_network_alpha": "3.0"})
    return path


@pytest.mark.parametrize("arch,fmt", [(ARCH, "kohya"), ("sd15", "diffusers")])
def test_resize_is_the_best_rank_k_approximation(tmp_path, bases, arch, fmt):
    path = lora_file(tmp_path, bases, arch, fmt=fmt)
    out = str(tmp_path / "out.safetensors")
    rep = resize(path, out, rank=3, quiet=True)
    got, rows = modules(out), {r.module: r for r in rep.rows}
    lora_in = formats.read_lora(path).modules
    assert any(m.kernel for m in lora_in) and len(got) == len(lora_in)  # conv (LoCon) included
    for m in lora_in:
        d = dense(m)
        want = reference.best_rank(d, 3)
        optimal = float(reference.optimal_error(d, 3))
        assert got[m.name].rank == rows[m.name].rank_out == 3 and got[m.name].down.shape[1:] == m.down.shape[1:]
        assert norm(delta(got[m.name]) - want) < 1e-5 * norm(d), m.name
        assert norm(delta(got[m.name]) - d) <= optimal * (1 + 1e-5), m.name
        assert abs(rows[m.name].rel_error - optimal / norm(d)) < 1e-5
    if fmt == "kohya":
        lf = formats.read_lora(out)
        assert {m.alpha for m in lf.modules} == {3.0}  # scale folded: alpha = rank
        assert lf.metadata["ss_network_dim"] == "3" and lf.metadata["ss_network_alpha"] == "3"


def test_resize_to_rank_at_least_r_is_exact_in_any_format(tmp_path, bases):
    path = lora_file(tmp_path, bases)
    out = str(tmp_path / "out.safetensors")
    rep = resize(path, out, rank=10, format="diffusers", quiet=True)
    assert {r.rank_out for r in rep.rows} == {6} and rep.summary()["rel_error_max"] < 1e-6
    lora_in = {m.name: dense(m) for m in formats.read_lora(path).modules}
    lf = formats.read_lora(out, arch=ARCH)
    assert lf.format == "diffusers"
    fused = formats.convert_style(lf, "original")  # split q/k/v back to the fused layers (exact)
    assert len(fused) == len(lora_in)
    for m in fused:
        assert norm(delta(m) - lora_in[m.name]) < 1e-5 * norm(lora_in[m.name]), m.name


def test_dynamic_ranks_by_energy_and_sv_ratio(tmp_path, bases):
    sd = tiny.lora(ARCH, bases[ARCH], rank=6, alpha=3.0)
    for i, key in enumerate(k for k in sorted(sd) if k.endswith("lora_up.weight")):
        decay = torch.tensor([0.2, 0.5, 0.9][i % 3]) ** torch.arange(6.0)  # spectra that differ by layer
        sd[key] = sd[key] * decay.reshape(1, 6, *[1] * (sd[key].dim() - 2))
    path = str(tmp_path / "lora.safetensors")
    save_file(sd, path, metadata={"ss_network_dim": "6", "ss_network_alpha": "3.0"})
    lora_in = formats.read_lora(path).modules
    for option, rule in (
        (dict(energy=0.9), lambda s: int((torch.cumsum(s**2, 0) < 0.9 * (s**2).sum()).sum()) + 1),
        (dict(sv_ratio=4.0), lambda s: int((s >= s[0] / 4).sum())),
    ):
        out = str(tmp_path / "dyn.safetensors")
        rep = resize(path, out, rank=5, **option, quiet=True)
        got = modules(out)
        for m in lora_in:
            d = dense(m)
            k = min(5, rule(torch.linalg.svdvals(d)))
            assert got[m.name].rank == k, (option, m.name)
            assert norm(delta(got[m.name]) - reference.best_rank(d, k)) < 1e-5 * norm(d)
        assert len({r.rank_out for r in rep.rows}) > 1
        meta = formats.read_lora(out).metadata
        assert meta["ss_network_dim"] == meta["ss_network_alpha"] == "Dynamic"
        assert json.loads(meta["loraport.resize"]) == {"rank": 5, **option}


def test_merge_concat_is_exact_and_svd_is_optimal(tmp_path, bases):
    a = lora_file(tmp_path, bases, name="a.safetensors", alpha=2.0)
    # b: another LoRA in diffusers format (split q/k/v, no alpha), one module missing
    lf_b = formats.read_lora(lora_file(tmp_path, bases, name="b0.safetensors", rank=3, alpha=None, seed=9))
    lf_b.modules = [m for m in lf_b.modules if m.name != "single_blocks.1.linear2"]
    b = formats.write_lora(lf_b, str(tmp_path / "b.safetensors"), format="diffusers")
    da = {m.name: dense(m) for m in formats.read_lora(a).modules}
    # The reference for b is the fused LoRA it was written from, not a conversion of the file merge reads.
    db = {m.name: dense(m) for m in lf_b.modules}
    want = {n: 0.7 * d - 0.5 * db.get(n, torch.zeros_like(d)) for n, d in da.items()}

    rep = merge([f"{a}:0.7", f"{b}:-0.5"], str(tmp_path / "c.safetensors"), mode="concat", quiet=True)
    got = modules(str(tmp_path / "c.safetensors"))
    assert got.keys() == want.keys()
    for n, w in want.items():
        assert norm(delta(got[n]) - w) < 1e-6 * norm(w), n
    rows = {r.module: r for r in rep.rows}
    partial = rows["single_blocks.1.linear2"]
    assert partial.note == "in a.safetensors only" and partial.rank_out == 6
    assert rows["double_blocks.0.img_attn_qkv"].rank_out == 6 + 9  # b's q/k/v fused: 3 x rank 3

    rep = merge([f"{a}:0.7", f"{b}:-0.5"], str(tmp_path / "s.safetensors"), rank=4, report=str(tmp_path / "r.json"),
                quiet=True)  # fmt: skip
    got = modules(str(tmp_path / "s.safetensors"))
    for n, w in want.items():
        assert got[n].rank == 4
        assert norm(delta(got[n]) - reference.best_rank(w, 4)) < 1e-5 * norm(w), n
        assert norm(delta(got[n]) - w) <= float(reference.optimal_error(w, 4)) * (1 + 1e-5) + 1e-7 * norm(w)
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["job"] == "merge" and doc["summary"]["actions"] == {"merged": 29}  # the tiny Hunyuan LoRA: 29 modules
    meta = formats.read_lora(str(tmp_path / "s.safetensors")).metadata
    assert json.loads(meta["loraport.merge"]) == [["a.safetensors", 0.7], ["b.safetensors", -0.5]]
    # a LoRA merged with itself: rank-deficient stacked factors, still exact
    rep = merge([f"{a}:0.25", f"{a}:0.75"], str(tmp_path / "self.safetensors"), rank=6, quiet=True)
    merged_self = modules(str(tmp_path / "self.safetensors"))
    assert merged_self.keys() == da.keys()
    for n, m in merged_self.items():
        assert m.rank == 6 and norm(delta(m) - da[n]) < 1e-5 * norm(da[n]), n
    # default rank: the largest input rank of each module
    rep = merge([a, b], str(tmp_path / "d.safetensors"), quiet=True)
    assert {r.rank_out for r in rep.rows} == {6}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Tiny base / fine-tune pairs on disk (Hunyuan with its Conv3d img_in, SD 1.5 with 3x3
    convs); in the Hunyuan pair one layer is left unchanged."""
    folder = tmp_path_factory.mktemp("pair")
    out = {}
    for arch in (ARCH, "sd15"):
        base = tiny.base_model(arch, width=16, seed=0)
        tuned = tiny.finetuned(base)
        if arch == ARCH:
            tuned["double_blocks.0.txt_mod.linear.weight"] = base["double_blocks.0.txt_mod.linear.weight"]
        out[arch] = dict(
            base=tiny.save_base(base, str(folder / f"{arch}_base.safetensors")),
            tuned=tiny.save_base(tuned, str(folder / f"{arch}_tuned.safetensors")),
            weights={k: (tuned[k].double() - base[k].double()).flatten(1) for k in base if base[k].dim() >= 2},
        )
    return out


@pytest.mark.parametrize("arch", [ARCH, "sd15"])
def test_extract_is_near_optimal(tmp_path, pair, arch):
    p = pair[arch]
    out = str(tmp_path / "x.safetensors")
    rep = extract(p["base"], p["tuned"], out, rank=4, quiet=True)
    lf = formats.read_lora(out)
    assert (lf.format, lf.arch.name) == ("kohya", arch)
    got = {m.name: m for m in lf.modules}
    rows = {r.module: r for r in rep.rows}
    assert any(m.kernel for m in lf.modules)
    for name, row in rows.items():
        d = p["weights"][name + ".weight"]
        if not d.any():
            assert row.action == "unchanged" and name not in got
            continue
        optimal = float(reference.optimal_error(d, 4))
        error = norm(delta(got[name]) - d)
        assert got[name].rank == 4
        assert error <= 1.01 * optimal, (name, error / optimal)
        assert abs(row.rel_error - error / norm(d)) < 1e-3 and abs(row.rel_diff - 0.05) < 1e-3
    if arch == ARCH:
        assert rows["double_blocks.0.txt_mod.linear"].action == "unchanged"
        assert got["img_in.proj"].down.shape == (4, 4, 1, 2, 2)


@pytest.mark.parametrize("method", ["auto", "power"])
def test_extract_on_wider_layers_krylov_or_power(tmp_path, method):
    base = tiny.base_model(ARCH, width=48, blocks=1, seed=5)  # wide enough for the whole Krylov space
    tuned = tiny.finetuned(base, decay=0.9)
    paths = [tiny.save_base(w, str(tmp_path / f"{n}.safetensors")) for n, w in (("b", base), ("t", tuned))]
    rep = extract(*paths, str(tmp_path / "x.safetensors"), rank=4, include=r"proj|fc1", method=method, quiet=True)
    assert rep.settings["method"] == method
    got = modules(str(tmp_path / "x.safetensors"))
    assert len(got) == 5  # img/txt attn_proj and fc1, img_in.proj
    for name, m in got.items():
        d = (tuned[name + ".weight"].double() - base[name + ".weight"].double()).flatten(1)
        assert norm(delta(m) - d) <= 1.01 * float(reference.optimal_error(d, 4)), name


def test_extract_energy_filters_and_threshold(tmp_path, pair):
    p = pair[ARCH]
    out = str(tmp_path / "x.safetensors")
    rep = extract(p["base"], p["tuned"], out, energy=0.9, rank=8, include=r"blocks", exclude=r"mod", quiet=True)
    names = {r.module for r in rep.rows}
    assert names and all("blocks" in n and "mod" not in n for n in names)
    got = modules(out)
    for r in rep.rows:
        s = torch.linalg.svdvals(p["weights"][r.module + ".weight"])
        k = min(8, int((torch.cumsum(s**2, 0) < 0.9 * (s**2).sum()).sum()) + 1)
        assert abs(got[r.module].rank - k) <= 1 and r.energy >= 0.9 - 1e-3, r.module
    os.remove(out)
    report = str(tmp_path / "r.json")
    with pytest.raises(InputError, match=r"extract produced no layer \({'unchanged': 28}\); nothing written"):
        extract(p["base"], p["tuned"], out, rank=2, min_rel_diff=0.06, conv=False, report=report, quiet=True)
    rows = json.loads(open(report).read())["layers"]  # every ‖ΔW‖/‖W‖ is 0.05; the conv img_in left out
    assert {r["action"] for r in rows} == {"unchanged"} and "img_in.proj" not in {r["module"] for r in rows}
    assert not os.path.exists(out)


def test_bad_input(tmp_path, bases, pair):
    path = lora_file(tmp_path, bases)
    out = str(tmp_path / "o.safetensors")
    with pytest.raises(InputError, match="missing.safetensors: no such file"):
        resize(str(tmp_path / "missing.safetensors"), out, rank=2, quiet=True)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(open(path, "rb").read()[:-40])
    with pytest.raises(InputError, match="corrupt.safetensors: not a readable safetensors file"):
        merge([path, f"{corrupt}:0.5"], out, quiet=True)
    with pytest.raises(InputError, match="the output path is an input file"):
        resize(path, path, rank=2, quiet=True)
    with pytest.raises(InputError, match="the output path is an input file"):
        extract(pair[ARCH]["base"], pair[ARCH]["tuned"], pair[ARCH]["tuned"], rank=2, quiet=True)
    with pytest.raises(InputError, match="a sd15 LoRA, but .*lora.safetensors is a hunyuan-video LoRA"):
        merge([path, lora_file(tmp_path, bases, "sd15", name="sd.safetensors")], out, quiet=True)
    with pytest.raises(ValueError, match="give rank, energy or sv_ratio"):
        resize(path, out, quiet=True)
    assert not os.path.exists(out) and not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_cli_round_trip(tmp_path, bases, pair, capsys):
    path = lora_file(tmp_path, bases)
    small, merged, extracted = (str(tmp_path / f) for f in ("small.safetensors", "m.safetensors", "x.safetensors"))
    assert main(["resize", path, "--rank", "2", "-o", small, "--report", str(tmp_path / "r.json")]) == 0
    text = capsys.readouterr().out
    assert "resize: 29 layers: 29 resized; rank 2" in text and f"wrote {small} (kohya)" in text
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["rank_max"] == 2
    assert main(["merge", f"{path}:0.5", f"{small}:0.5", "--rank", "3", "-o", merged, "--quiet"]) == 0
    assert {m.rank for m in formats.read_lora(merged).modules} == {3}
    p = pair["sd15"]
    assert main(["extract", "--base", p["base"], "--tuned", p["tuned"], "--rank", "3", "--no-conv",
                 "--format", "comfy", "-o", extracted, "--quiet"]) == 0  # fmt: skip
    assert capsys.readouterr().out == ""
    lf = formats.read_lora(extracted)
    assert lf.format == "comfy" and lf.arch.name == "sd15" and not any(m.kernel for m in lf.modules)
    rc = main(["resize", path, "--rank", "2", "-o", path])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "the output path is an input file" in err
    rc = main(["merge", str(tmp_path / "nope.safetensors"), "-o", str(tmp_path / "n.safetensors")])
    assert rc == 2 and "nope.safetensors: no such file" in capsys.readouterr().err
