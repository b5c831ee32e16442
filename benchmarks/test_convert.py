"""Fast checks of the convert benchmark's inputs and of the DoRA quality benchmark's DoRA."""

import torch

from benchmarks import convert as convert_bench
from benchmarks.quality import dora
from benchmarks.toolbox import layers
from loraport import adapters, formats, reference


def test_convert_inputs_have_the_stated_structure(tmp_path):
    layer_list = layers(32, 1)  # 32 wide: w2 of a factor-16 LoKr is [out/16, in/16]
    paths = convert_bench.make_inputs(str(tmp_path), layer_list, convert_bench.VARIANTS)
    for variant, (kind, size, w2_rank) in convert_bench.VARIANTS.items():
        for m in formats.read_lora(paths[variant]).modules:
            dense = convert_bench.dense_delta(m).double()
            truth = reference.adapter_delta(m.tensors, m.scale, m.shape).flatten(1)
            assert float(torch.linalg.matrix_norm(dense - truth) / torch.linalg.matrix_norm(truth)) < 1e-5
            # exact factor widths: LoHa r², LoKr rank(w1) · rank(w2)
            w2 = min(m.shape[0] // size, m.shape[1] // size, w2_rank or m.shape[0])
            assert adapters.factors(m)[0].shape[1] == (size**2 if kind == "loha" else size * w2), variant
            # the yardstick: the exact singular values from the structure
            S = torch.sort(convert_bench.singular_values(m), descending=True).values
            want = torch.linalg.svdvals(truth)
            torch.testing.assert_close(S[: want.numel()], want, rtol=1e-9, atol=1e-9 * float(want[0]))
            assert S.numel() == want.numel() or float(S[want.numel() :].abs().max()) <= 1e-9 * float(want[0])


def test_dora_starts_at_the_base_and_round_trips_through_a_peft_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = {"a.weight": torch.randn(6, 5, generator=g)}
    start = {"a": (torch.zeros(6, 2), torch.randn(2, 5, generator=g), w["a.weight"].norm(dim=1))}
    torch.testing.assert_close(dora.apply_dora(w, start)["a.weight"], w["a.weight"])
    trained = {"model.layers.0.mlp.up_proj": (torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g),
                                             torch.rand(6, generator=g) + 1)}  # fmt: skip
    back = dora.load_dora(dora.save_dora(trained, str(tmp_path / "d.safetensors")))
    for got, want in zip(back["model.layers.0.mlp.up_proj"], trained["model.layers.0.mlp.up_proj"], strict=True):
        assert torch.equal(got, want)
