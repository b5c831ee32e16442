"""Multi-expert targets (Wan 2.2 A14B: high-noise and low-noise transformers): one command ports a
Wan 2.1 LoRA onto both experts, one file per expert, each at its own strength; diffusers' own
WanPipeline loader (WanLoraLoaderMixin.load_lora_weights, the low-noise file with
load_into_transformer_2=True) consumes every key of both files, and each expert's weights change
by exactly its strength times the LoRA's ΔW. Also the CLI form and its bad input."""

import json
import logging
import os

import pytest
import torch
from safetensors import safe_open

from loraport import formats
from loraport.cli import main
from loraport.errors import InputError
from loraport.testing import tiny
from loraport.upgrade import expert_paths, port_experts

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_wan():
    diffusers = pytest.importorskip("diffusers")
    return diffusers.WanTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16, freq_dim=16,
        ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    ).eval()  # fmt: skip


@pytest.fixture(scope="module")
def wan22(tmp_path_factory):
    """(source original-named Wan 2.1 weights, {expert: diffusers-named Wan 2.2 weights}, kohya LoRA)."""
    w21 = tiny.random_weights({k: v.shape for k, v in tiny_wan().state_dict().items()}, seed=0)
    source = tiny.to_original_names("wan", w21)
    experts = {"high": tiny.related(w21, seed=1), "low": tiny.related(w21, seed=2)}
    return source, experts, tiny.lora("wan", source, fmt="kohya", rank=4, alpha=2.0)


def delta(m: formats.LoraModule) -> torch.Tensor:
    up, down = m.factors()
    return up.double() @ down.double()


def test_diffusers_wan_pipeline_loads_both_experts_at_their_strengths(wan22, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from peft.tuners.lora import LoraLayer

    source, experts, lora_sd = wan22
    out = str(tmp_path / "wan22_{expert}.safetensors")
    strengths = {"high": 3.0, "low": 1.5}  # as users set them for a distill LoRA
    reports = port_experts(lora_sd, source, experts, out, expert_strength=strengths, format="diffusers", quiet=True)
    paths = {e: str(tmp_path / f"wan22_{e}.safetensors") for e in experts}
    assert {e: r.out for e, r in reports.items()} == paths
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary file left
    for rep in reports.values():
        assert {r.action for r in rep.rows} == {"ported"}

    models = {e: tiny_wan() for e in experts}
    for e, m in models.items():
        m.load_state_dict(experts[e])
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None,
                                 transformer=models["high"], transformer_2=models["low"], boundary_ratio=0.9)  # fmt: skip
    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("diffusers").addHandler(handler)
    try:
        pipe.load_lora_weights(paths["high"], adapter_name="ported")
        pipe.load_lora_weights(paths["low"], adapter_name="ported", load_into_transformer_2=True)
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert not [m for m in messages if "unexpected" in m or "missing" in m], messages

    lora_in = {m.name: delta(m) for m in formats.convert_style(formats.read_lora(lora_sd, arch="wan"), "diffusers")}
    for e, model in models.items():
        layers = {n: mod for n, mod in model.named_modules() if isinstance(mod, LoraLayer)}
        assert set(layers) == set(lora_in)  # every module of the file landed in this expert
        model.fuse_lora(adapter_names=["ported"])
        for name, layer in layers.items():
            change = (layer.get_base_layer().weight.detach() - experts[e][name + ".weight"]).double().flatten(1)
            want = strengths[e] * lora_in[name]
            assert float((change - want).norm() / want.norm()) < 1e-5, (e, name)
        with safe_open(paths[e], "pt") as f:
            assert json.loads(f.metadata()["loraport.strength"])["default"] == strengths[e]


def test_cli_two_experts_comfy_files(wan22, tmp_path):
    source, experts, lora_sd = wan22
    p = {n: str(tmp_path / f"{n}.safetensors") for n in ("lora", "source", "high", "low")}
    tiny.save_base(lora_sd, p["lora"])
    tiny.save_base(source, p["source"])
    for e in experts:
        tiny.save_base(experts[e], p[e])
    out = str(tmp_path / "ported.safetensors")
    rc = main(["port", p["lora"], "--source", p["source"], "--target", f"high={p['high']}", "--target",
               f"low={p['low']}", "--expert-strength", "high=-2", "--strength", "0.5", "--format", "comfy",
               "-o", out, "--quiet", "--report", str(tmp_path / "report.json")])  # fmt: skip
    assert rc == 0
    lora_in = {m.name: delta(m) for m in formats.read_lora(lora_sd, arch="wan").modules}
    for e, s in (("high", -1.0), ("low", 0.5)):  # expert strength times --strength
        path = str(tmp_path / f"ported.{e}.safetensors")
        got = formats.read_lora(path, arch="wan")
        assert got.format == "comfy" and all(k.startswith("diffusion_model.") for k in safe_open(path, "pt").keys())
        for m in got.modules:
            want = s * lora_in[m.name]
            assert float((delta(m) - want).norm() / want.norm()) < 1e-6, (e, m.name)
        assert os.path.exists(tmp_path / f"report.{e}.json")


def test_expert_output_names():
    assert expert_paths("/x/wan22.safetensors", ["high", "low"]) == {
        "high": "/x/wan22.high.safetensors", "low": "/x/wan22.low.safetensors"}  # fmt: skip
    assert expert_paths("/x/{expert}/lora.safetensors", ["high"]) == {"high": "/x/high/lora.safetensors"}


def test_bad_expert_input_is_one_line_and_writes_nothing(wan22, tmp_path, capsys):
    source, experts, lora_sd = wan22
    with pytest.raises(InputError, match="strength given for expert"):
        port_experts(lora_sd, source, experts, str(tmp_path / "o.safetensors"), expert_strength={"mid": 2})
    # the second expert is of another model: the first expert's port must not be left behind
    bad = {"high": experts["high"], "low": tiny.base_model("flux", width=16)}
    with pytest.raises(InputError):
        port_experts(lora_sd, source, bad, str(tmp_path / "o.safetensors"), quiet=True)
    assert os.listdir(tmp_path) == []
    p = {n: str(tmp_path / f"{n}.safetensors") for n in ("lora", "source")}
    tiny.save_base(lora_sd, p["lora"])
    tiny.save_base(source, p["source"])
    rc = main(["port", p["lora"], "--source", p["source"], "--target", "high=x", "--target", "nonsense",
               "-o", str(tmp_path / "o.safetensors")])  # fmt: skip
    assert rc == 2 and capsys.readouterr().err.count("\n") == 1
