"""`convert` (loraport.convert) and resize/merge on adapter types: every type to a plain LoRA whose
ΔW is the best rank-k approximation of the dense float64 reference ΔW (Eckart–Young; rsvd paths
within a tight factor of it), the reported energy and error, DoRA against the base weight, the
kernel of a conv LoHa from the base, the CLI and bad input."""

import importlib
import math

import pytest
import torch
from test_adapters import ARCH, adapter_file, dense_of, rel

from loraport import adapters, convert, formats, merge, reference, resize
from loraport.cli import main
from loraport.errors import InputError
from loraport.testing import tiny

EXACT = ["loha", "loha-tucker", "lokr", "lokr-full", "lokr-decomposed", "lokr-tucker", "locon-tucker"]


@pytest.fixture(scope="module")
def base():
    return tiny.base_model(ARCH, width=16, seed=0)


def save(tmp_path, sd, name="in.safetensors") -> str:
    return tiny.save_base(sd, str(tmp_path / name))


def delta_of(m: formats.LoraModule) -> torch.Tensor:
    up, down = m.factors()
    return up.double() @ down.double()


def truth_by_name(path, truth):
    return {m.name: truth[m.key] for m in formats.read_lora(path, arch=ARCH).modules}


@pytest.mark.parametrize("kind", EXACT + ["full"])
def test_convert_is_the_best_rank_k_approximation(tmp_path, base, kind):
    sd, truth = adapter_file(kind, base, rank=3)
    path = save(tmp_path, sd)
    out = str(tmp_path / "out.safetensors")
    rep = convert(path, out, rank=2, arch=ARCH, quiet=True)
    got = {m.name: m for m in formats.read_lora(out, arch=ARCH).modules}
    want_by_name = truth_by_name(path, truth)
    rows = {r.module: r for r in rep.rows}
    assert got.keys() == want_by_name.keys() and rep.job == "convert"
    for name, (t, scale, shape) in want_by_name.items():
        m = got[name]
        assert isinstance(m, formats.LoraModule) and m.rank <= 2
        # a conv LoHa without Tucker keeps in·kernel columns (no base given: see the kernel test)
        assert m.shape == tuple(shape) or (kind == "loha" and m.shape == (shape[0], math.prod(shape[1:])))
        dense = reference.adapter_delta(t, scale, shape).flatten(1)
        err = rel(delta_of(m), dense)
        best = float(reference.optimal_error(dense, 2) / torch.linalg.matrix_norm(dense))
        row = rows[name]
        assert abs(row.rel_error - err) < 1e-4 and abs(row.energy - (1 - err**2)) < 1e-4, name
        if kind == "full":  # rsvd on the dense difference: near-optimal
            assert err <= best * 1.05 + 1e-6, name
            assert "bias difference left out" in row.note
        else:  # from the factors: the exact truncated SVD
            assert rel(delta_of(m), reference.best_rank(dense, 2)) < 1e-4, name


def test_energy_picks_the_fewest_singular_values(tmp_path, base):
    sd, truth = adapter_file(["loha", "lokr"], base, rank=3)
    path = save(tmp_path, sd)
    out = str(tmp_path / "out.safetensors")
    rep = convert(path, out, energy=0.9, arch=ARCH, quiet=True)
    want_by_name = truth_by_name(path, truth)
    for row in rep.rows:
        t, scale, shape = want_by_name[row.module]
        S = torch.linalg.svdvals(reference.adapter_delta(t, scale, shape).flatten(1))
        share = torch.cumsum(S.square(), 0) / S.square().sum()
        assert row.rank_out == int((share < 0.9).sum()) + 1 and row.energy >= 0.9 - 1e-6


@pytest.mark.parametrize("kind", ["dora", "dora-in"])
def test_dora_converts_against_the_base_weight(tmp_path, base, kind):
    modules = ["double_blocks.0.img_attn_qkv", "double_blocks.0.img_attn_proj", "img_in.proj"]
    sd, truth = adapter_file(kind, base, modules=modules)
    path = save(tmp_path, sd)
    base_path = tiny.save_base(base, str(tmp_path / "base.safetensors"))
    out = str(tmp_path / "out.safetensors")
    with pytest.raises(InputError, match="DoRA.*depends on the base weight"):
        convert(path, out, rank=3, arch=ARCH, quiet=True)
    rep = convert(path, out, rank=3, base=base_path, arch=ARCH, quiet=True)
    got = {m.name: m for m in formats.read_lora(out, arch=ARCH).modules}
    for name, (t, _, shape) in truth_by_name(path, truth).items():
        W = base[name + ".weight"].double()
        lora = {r: v for r, v in t.items() if r != "magnitude"}
        delta = reference.adapter_delta(lora, 2.0 / 3, shape)
        axis = "out" if kind == "dora" else "in"
        effective = (reference.dora_weight(W, delta, t["magnitude"], axis) - W).flatten(1)
        best = float(reference.optimal_error(effective, 3) / torch.linalg.matrix_norm(effective))
        assert rel(delta_of(got[name]), effective) <= best * 1.05 + 1e-5, name
    assert all(r.rank_out == 3 for r in rep.rows)


def test_conv_loha_without_tucker_takes_its_kernel_from_the_base(tmp_path, base):
    sd, _ = adapter_file("loha", base, modules=["img_in.proj", "double_blocks.0.img_attn_proj"])
    path = save(tmp_path, sd)
    base_path = tiny.save_base(base, str(tmp_path / "base.safetensors"))
    out = str(tmp_path / "out.safetensors")
    convert(path, out, rank=2, base=base_path, arch=ARCH, quiet=True)
    conv = next(m for m in formats.read_lora(out, arch=ARCH).modules if m.name == "img_in.proj")
    assert conv.down.shape == (2, 4, 1, 2, 2) and conv.up.shape == (16, 2, 1, 1, 1)
    convert(path, out, rank=2, arch=ARCH, quiet=True)  # no base: the file keeps only in·kernel
    conv = next(m for m in formats.read_lora(out, arch=ARCH).modules if m.name == "img_in.proj")
    assert conv.down.shape == (2, 16)


def test_resize_and_merge_take_adapters_through_the_same_path(tmp_path, base):
    sd, truth = adapter_file(["loha", "lokr", "locon-tucker", "full"], base, rank=3)
    path = save(tmp_path, sd)
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    convert(path, a, rank=2, arch=ARCH, quiet=True)
    rep = resize(path, b, rank=2, arch=ARCH, quiet=True)
    assert rep.job == "resize" and {r.action for r in rep.rows} == {"resized"}
    ma, mb = formats.read_lora(a, arch=ARCH).modules, formats.read_lora(b, arch=ARCH).modules
    assert all(torch.equal(x.up, y.up) and torch.equal(x.down, y.down) for x, y in zip(ma, mb, strict=True))
    # merge "concat" of the adapter with itself at weights 0.5 and 0.25: exactly 0.75 ΔW
    merge([f"{path}:0.5", f"{path}:0.25"], a, mode="concat", arch=ARCH, quiet=True)
    want = truth_by_name(path, truth)
    for m in formats.read_lora(a, arch=ARCH).modules:
        t, scale, shape = want[m.name]
        assert rel(delta_of(m), 0.75 * reference.adapter_delta(t, scale, shape).flatten(1)) < 1e-5, m.name


def test_merge_names_the_file_of_a_dora(tmp_path, base):
    sd, _ = adapter_file("dora", base, modules=["double_blocks.0.img_attn_proj"])
    path = save(tmp_path, sd)
    with pytest.raises(InputError, match=r"in\.safetensors: module '.*' is DoRA LoCon: .*convert it first"):
        merge([path, path], str(tmp_path / "m.safetensors"), arch=ARCH, quiet=True)


def test_cli_convert(tmp_path, base, capsys):
    sd, _ = adapter_file("lokr", base)
    path = save(tmp_path, sd)
    out = str(tmp_path / "out.safetensors")
    assert main(["convert", path, "-o", out, "--rank", "2", "--arch", ARCH, "--quiet"]) == 0
    assert all(m.rank <= 2 for m in formats.read_lora(out, arch=ARCH).modules)
    assert main(["convert", path, "-o", str(tmp_path / "x.safetensors"), "--arch", ARCH]) == 2
    assert "give --rank R or --energy E" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
    sd, _ = adapter_file(["lokr", "loha"], base, modules=["double_blocks.0.img_attn_proj", "double_blocks.0.img_mlp.fc1"])
    assert main(["inspect", save(tmp_path, sd, "two.safetensors")]) == 0
    assert "types: {'LoKr': 1, 'LoHa': 1}" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["dora", "dora-in"])
def test_resize_keeps_a_dora_magnitude_and_reports_the_effective_error(tmp_path, base, kind):
    modules = ["double_blocks.0.img_attn_qkv", "double_blocks.0.img_attn_proj", "img_in.proj"]
    sd, truth = adapter_file(kind, base, modules=modules, rank=3)
    path = save(tmp_path, sd)
    base_path = tiny.save_base(base, str(tmp_path / "base.safetensors"))
    out = str(tmp_path / "out.safetensors")
    with pytest.raises(InputError, match=r"in\.safetensors: module '.*' is DoRA LoCon: .* give --base BASE"):
        resize(path, out, rank=2, arch=ARCH, quiet=True)
    rep = resize(path, out, rank=2, base=base_path, arch=ARCH, quiet=True)
    assert rep.settings["dora_magnitude"] == "keep" and base_path in rep.inputs
    rows = {r.module: r for r in rep.rows}
    got = {m.name: m for m in formats.read_lora(out, arch=ARCH).modules}
    axis = "out" if kind == "dora" else "in"
    for name, (t, scale, shape) in truth_by_name(path, truth).items():
        m = got[name]
        assert m.magnitude_axis == axis and m.rank == 2
        assert torch.equal(m.tensors["magnitude"], t["magnitude"].flatten())  # as trained
        W = base[name + ".weight"].double()
        delta = reference.adapter_delta({r: v for r, v in t.items() if r != "magnitude"}, scale, shape)
        low = reference.best_rank(delta.flatten(1), 2).reshape(shape)  # Eckart–Young of the low-rank part
        written = dense_of(adapters.without_magnitude(m)).reshape(shape)
        assert rel(written.flatten(1), low.flatten(1)) < 1e-5, name
        # what the file applies: m ⊙ (W + ΔW') / ‖W + ΔW'‖, against the float64 reference
        want = reference.dora_weight(W, low, t["magnitude"], axis)
        applied = reference.dora_weight(W, written, m.tensors["magnitude"], axis) - W
        assert rel(applied.flatten(1), (want - W).flatten(1)) < 1e-5, name
        before = reference.dora_weight(W, delta, t["magnitude"], axis) - W
        assert abs(rows[name].rel_error - rel((want - W).flatten(1), before.flatten(1))) < 1e-5, name
        assert abs(rows[name].energy - (1 - rel(low.flatten(1), delta.flatten(1)) ** 2)) < 1e-5, name


def test_resize_cli_refuses_a_dora_without_its_base(tmp_path, base, capsys):
    sd, _ = adapter_file("dora", base, modules=["double_blocks.0.img_attn_proj"])
    path = save(tmp_path, sd)
    out = str(tmp_path / "out.safetensors")
    assert main(["resize", path, "-o", out, "--rank", "2", "--arch", ARCH, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and path in err[0] and "--base" in err[0] and not (tmp_path / "out.safetensors").exists()
    base_path = tiny.save_base(base, str(tmp_path / "base.safetensors"))
    assert main(["resize", path, "-o", out, "--rank", "2", "--base", base_path, "--arch", ARCH, "--quiet"]) == 0
    (m,) = formats.read_lora(out, arch=ARCH).modules
    assert m.magnitude_axis == "out" and m.rank == 2


@pytest.mark.parametrize("r", [4, 8])
def test_loha_paths_give_the_best_rank_k_error(tmp_path, monkeypatch, r):
    """LoHa rank 4 (p = 16) takes its exact factors, rank 8 (p = 64) the dense ΔW and rsvd
    (above convert.LOHA_DENSE_MULTIPLE x sqrt(out·in·36 / (out + in)), 36 the rsvd's columns at rank 4
    on these layers: 25 for 64 x 64, 32 for 256 x 64); either
    path, chosen or forced, reaches the Eckart–Young error of the float64 reference."""
    wide = tiny.base_model(ARCH, width=64, seed=0)
    sd, truth = adapter_file("loha", wide, rank=r, modules=["double_blocks.0.img_attn_proj", "double_blocks.0.img_mlp.fc1"])
    path = save(tmp_path, sd)
    module = importlib.import_module("loraport.convert")
    formed = []
    real = module._loha_delta
    monkeypatch.setattr(module, "_loha_delta", lambda m: formed.append(m.name) or real(m))
    want = truth_by_name(path, truth)
    chosen = r == 8
    for forced, multiple in enumerate((module.LOHA_DENSE_MULTIPLE, 0.0 if not chosen else math.inf)):
        monkeypatch.setattr(module, "LOHA_DENSE_MULTIPLE", multiple)  # as chosen, then the other path
        formed.clear()
        out = str(tmp_path / f"out{forced}.safetensors")
        rep = convert(path, out, rank=4, arch=ARCH, quiet=True)
        dense = bool(formed)
        assert sorted(formed) in ([], sorted(want))  # every layer on the one path
        assert dense == (chosen != bool(forced))
        rows = {row.module: row for row in rep.rows}
        for m in formats.read_lora(out, arch=ARCH).modules:
            t, scale, shape = want[m.name]
            reference_delta = reference.adapter_delta(t, scale, shape).flatten(1)
            best = float(reference.optimal_error(reference_delta, 4) / torch.linalg.matrix_norm(reference_delta))
            err = rel(delta_of(m), reference_delta)
            assert err <= best * (1.01 if dense else 1 + 1e-5), (m.name, dense, err, best)
            assert abs(rows[m.name].rel_error - err) < 1e-4, m.name
