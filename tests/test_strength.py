"""--strength / strength=: ΔW of every ported module scaled exactly by its strength (a float for
all, 'REGEX=S' rules by module name, the last matching rule winning), for negative strengths
too, recorded in the output's metadata; bad specifications are one-line errors."""

import json

import pytest
import torch
from safetensors import safe_open

from loraport import formats
from loraport.cli import main
from loraport.errors import InputError
from loraport.pipeline import port
from loraport.strength import Strength
from loraport.testing import tiny

pytestmark = pytest.mark.usefixtures("one_thread")
ARCH = "hunyuan-video"


@pytest.fixture(scope="module")
def pair():
    source = tiny.base_model(ARCH, width=16, seed=0)
    target = tiny.related(source)
    return source, target, tiny.lora(ARCH, source, fmt="kohya", rank=4, alpha=3.0, seed=11)


def deltas(path) -> dict[str, torch.Tensor]:
    """{module: ΔW [out, in·kernel] float64} of a LoRA file."""
    out = {}
    for m in formats.read_lora(path, arch=ARCH).modules:
        up, down = m.up.flatten(1).double() * m.scale, m.down.flatten(1).double()
        out[m.name] = up @ down
    return out


def assert_scaled(got: torch.Tensor, d: torch.Tensor, s: float, name: str) -> None:
    """got == s·d up to one float32 rounding of each up entry (exactly for powers of two)."""
    want = s * d
    if s in (2.0, -0.5, 0.5, 0.25, -2.0, 1.0):
        assert torch.equal(got, want), name
    else:
        err = float((got - want).norm() / want.norm())
        assert err < 2e-7, (name, err)


def test_strength_scales_every_delta_exactly(pair, tmp_path):
    source, target, lora_sd = pair
    plain = str(tmp_path / "plain.safetensors")
    port(lora_sd, source, target, plain, quiet=True)
    reference = deltas(plain)
    for s in (2.0, -0.5, 0.37, -1.7):
        out = str(tmp_path / f"s{s}.safetensors")
        port(lora_sd, source, target, out, quiet=True, strength=s)
        got = deltas(out)
        assert set(got) == set(reference)
        for name, d in reference.items():
            assert_scaled(got[name], d, s, name)


def test_regex_rules_pick_modules_last_rule_wins(pair, tmp_path):
    source, target, lora_sd = pair
    plain, out = str(tmp_path / "plain.safetensors"), str(tmp_path / "ruled.safetensors")
    port(lora_sd, source, target, plain, quiet=True)
    spec = [0.5, (r"^single_blocks\.", 3.0), (r"single_blocks\.1\.linear2", -2.0)]
    rep = port(lora_sd, source, target, out, quiet=True, strength=spec)
    assert r"ΔW × 0.5, 3 where /^single_blocks\./ matches, -2 where" in rep.table()
    ref, got = deltas(plain), deltas(out)
    for name, d in ref.items():
        s = -2.0 if name == "single_blocks.1.linear2" else 3.0 if name.startswith("single_blocks.") else 0.5
        assert_scaled(got[name], d, s, name)
    with safe_open(out, "pt") as f:
        recorded = json.loads(f.metadata()["loraport.strength"])
    assert recorded == {"default": 0.5, "rules": [[r"^single_blocks\.", 3.0], [r"single_blocks\.1\.linear2", -2.0]]}


def test_cli_strength_repeatable(pair, tmp_path):
    source, target, lora_sd = pair
    paths = {n: str(tmp_path / f"{n}.safetensors") for n in ("lora", "source", "target", "plain", "out")}
    for n, sd in (("lora", lora_sd), ("source", source), ("target", target)):
        tiny.save_base(sd, paths[n])
    base = ["port", paths["lora"], "--source", paths["source"], "--target", paths["target"], "--quiet"]
    assert main(base + ["-o", paths["plain"]]) == 0
    assert main(base + ["-o", paths["out"], "--strength", "-1.5", "--strength", r"img_mlp=0.25"]) == 0
    ref, got = deltas(paths["plain"]), deltas(paths["out"])
    for name, d in ref.items():
        s = 0.25 if "img_mlp" in name else -1.5
        assert_scaled(got[name], d, s, name)
    with safe_open(paths["out"], "pt") as f:
        assert json.loads(f.metadata()["loraport.strength"]) == {"default": -1.5, "rules": [["img_mlp", 0.25]]}


@pytest.mark.parametrize("spec, message", [("x=abc", "is not a number"), ("(=1", "not a regular expression"),
                                           ("inf", "not finite"), ([object()], "not a number")])  # fmt: skip
def test_bad_strength_is_one_line(spec, message):
    with pytest.raises(InputError, match=message):
        Strength(spec)


def test_cli_bad_strength_exits_2(pair, tmp_path, capsys):
    source, target, lora_sd = pair
    paths = {n: str(tmp_path / f"{n}.safetensors") for n in ("lora", "source", "target")}
    for n, sd in (("lora", lora_sd), ("source", source), ("target", target)):
        tiny.save_base(sd, paths[n])
    out = tmp_path / "out.safetensors"
    rc = main(["port", paths["lora"], "--source", paths["source"], "--target", paths["target"], "-o", str(out),
               "--quiet", "--strength", "blocks=x"])  # fmt: skip
    assert rc == 2 and not out.exists()
    assert capsys.readouterr().err.count("\n") == 1
