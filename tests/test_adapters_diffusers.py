"""Ported adapters in a real consumer, where diffusers supports the type. For loraport's
architectures diffusers loads DoRA in its PEFT form (`lora_magnitude_vector`, through
load_lora_adapter); it drops kohya's `dora_scale` with a warning and has LyCORIS LoHa/LoKr loaders
only for other models (Z-Image, Flux 2). So: a kohya DoRA (original Hunyuan names, fused qkv) is
ported to diffusers' tiny HunyuanVideoTransformer3DModel, written as diffusers, loaded with every
key consumed, and after fusing each weight is the DoRA formula m ⊙ (W + ΔW) / ‖W + ΔW‖ (per output
row) on the target's weight, against the float64 reference."""

import pytest
import torch
from safetensors.torch import load_file
from test_diffusers_consumer import _load_every_key, rel_err, tiny_hunyuan

from loraport import formats, reference
from loraport.pipeline import port
from loraport.testing import tiny

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")
ARCH = "hunyuan-video"


@pytest.mark.slow
def test_ported_dora_loads_in_diffusers_and_fuses_to_the_dora_formula(tmp_path):
    model = tiny_hunyuan().eval()
    model.load_state_dict(tiny.random_weights({k: v.shape for k, v in model.state_dict().items()}, seed=0))
    target = {k: v.detach().clone() for k, v in model.state_dict().items()}  # diffusers names
    source = tiny.to_original_names(ARCH, tiny.related(target, eps=0.05))
    sd = tiny.lora(ARCH, source, fmt="kohya", rank=4, alpha=2.0)
    g = torch.Generator().manual_seed(5)
    for m in formats.read_lora(sd, arch=ARCH).modules:  # LyCORIS wd_on_output: dora_scale [out, 1, ...]
        norms = source[m.name + ".weight"].flatten(1).norm(dim=1)
        sd[m.key + ".dora_scale"] = (norms * (1 + 0.1 * torch.rand(norms.shape, generator=g))).reshape(
            -1, *[1] * (len(m.shape) - 1))  # fmt: skip
    out = str(tmp_path / "dora_diffusers.safetensors")
    rep = port(sd, source, target, out, format="diffusers", arch=ARCH, quiet=True)
    assert {r.action for r in rep.rows} == {"ported"}
    file_sd = load_file(out)
    assert any(k.endswith(".lora_magnitude_vector") for k in file_sd)

    _load_every_key(model, file_sd, "transformer", "dora")
    from peft.tuners.lora import LoraLayer

    layers = {n: mod for n, mod in model.named_modules() if isinstance(mod, LoraLayer)}
    assert layers and all(mod.use_dora["dora"] for mod in layers.values())
    model.fuse_lora(adapter_names=["dora"])
    ported = {m.name: m for m in formats.read_lora(out, arch=ARCH).modules}
    assert set(ported) == set(layers)
    for name, m in ported.items():
        W = target[name + ".weight"].double()
        lora = {"up": m.tensors["up"], "down": m.tensors["down"]}
        want = reference.dora_weight(W, reference.adapter_delta(lora, m.scale, W.shape), m.tensors["magnitude"], "out")
        got = layers[name].get_base_layer().weight.detach().double()
        assert rel_err(got.flatten(1) - W.flatten(1), want.flatten(1) - W.flatten(1)) < 1e-4, name
