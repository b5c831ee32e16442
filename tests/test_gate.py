"""The similarity gate (loraport.gate) against its float64 oracle (reference.gate_exact) on
real-like spectra with known related/unrelated labels, its pieces (spectrum rank, settling,
identical weights), and what the pipeline does with it: margins and borderline layers in the
report, the subspace cache's gate-sketch entries, capped energy ranks."""

import os

import pytest
import torch
from safetensors import safe_open

from loraport import gate, reference
from loraport.options import PortOptions
from loraport.pipeline import port
from loraport.testing import tiny
from loraport.testing.spectra import gate_suite

ARCH = "hunyuan-video"
MODULES = [
    "double_blocks.0.img_attn_qkv",
    "double_blocks.0.img_mlp.fc1",
    "single_blocks.0.linear1",
]


@pytest.fixture
def bf16_gemms(monkeypatch):
    """The gate iterates on bf16 weights as read whatever this CPU has (the path port takes where
    loraport's AVX512-BF16 kernels run; elsewhere weight_times upcasts inside the op)."""
    monkeypatch.setattr(gate, "bf16_products", lambda dtype, device: dtype == torch.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1])
def test_default_gate_decides_as_the_exact_gate_on_real_like_spectra(seed, dtype, bf16_gemms):
    """Few dominant directions over a noise floor (16, 4, 2), a slow decay; related by drift or
    by a new noise floor; unrelated, also with a shared (residual-stream-like) input side. The
    exact gate separates the labels with |margin| >= 0.1 (none borderline), and the default gate decides every
    pair as it does, from float32 weights and from bf16 weights multiplied as read. A layer that
    took more than the first products has the exact k and a margin within 0.1 of the exact one
    (0.06 at most measured); one that passed on its first estimate has a margin of at least
    EARLY_PASS that does not overestimate the exact one (its errors run towards failing)."""
    rows = list(gate_suite(160, 320, seed, dtype=dtype))
    assert len(rows) == 15
    early = 0
    for name, related, (left, right, k), res, _ in rows:
        exact = gate.margin(left, right, 0.5)
        estimate = gate.margin(res.left, res.right, 0.5)
        assert (exact >= 0) == related and abs(exact) >= gate.BORDERLINE, (name, exact)
        assert (estimate >= 0) == related, name
        assert not res.unsure and res.products >= gate.FIRST_PRODUCTS, name
        if res.products == gate.FIRST_PRODUCTS:
            early += 1
            assert related and gate.EARLY_PASS <= estimate <= exact + 0.01, (name, estimate, exact)
        else:
            assert res.k == k and abs(estimate - exact) < 0.1, (name, estimate, exact)  # it stops once far from 0
    assert early >= 3  # the clearly related pairs stop early
    # the shared input side alone would pass an unrelated layer on the two-sided mean
    shared = [
        (left + right) / 2
        for name, _, (left, right, _), *_ in rows
        if "shared input side" in name
    ]
    assert max(shared) >= 0.5


@pytest.mark.parametrize("shape", [(384, 160), (160, 384)])
def test_first_products_find_the_float64_subspaces_in_bf16_and_float32(shape, bf16_gemms):
    """A weight with 6 dominant directions over a noise floor, tall and wide: the first products
    find the top-6 subspaces on both sides of the float64 SVD of the same bf16 values to
    similarity >= 0.97, one more product to >= 0.999 with the spectrum within 1 %, whether the
    weight is multiplied in bf16 or as a float32 copy; the two agree with each other to 1e-3 at
    every estimate (the same Gaussian start, the basis rounded to bf16 or not)."""
    m, n = shape
    gen = torch.Generator().manual_seed(4)
    top = 6
    dominant = torch.linalg.qr(torch.randn(m, top, generator=gen, dtype=torch.float64))[0] * torch.linspace(30, 10, top, dtype=torch.float64)
    w = (dominant @ torch.linalg.qr(torch.randn(n, top, generator=gen, dtype=torch.float64))[0].T
         + torch.randn(m, n, generator=gen, dtype=torch.float64) / (m**0.5 + n**0.5)).bfloat16()  # fmt: skip
    U, S, Vh = torch.linalg.svd(w.double(), full_matrices=False)
    (fast,) = gate.first_products([w], 16, seed=0)
    (f32,) = gate.first_products([w.float()], 16, seed=0)
    sim = torch.ops.loraport.subspace_similarity
    for est in (fast, f32):
        assert est.products == gate.FIRST_PRODUCTS
        assert torch.equal(est.U[0], est.U[1]) and torch.equal(est.V[0], est.V[1])  # the one estimate yet
        assert float(sim(est.U[1][:, :top].double(), U[:, :top])) >= 0.97
        assert float(sim(est.V[1][:, :top].double(), Vh[:top].T)) >= 0.97
        third = gate.refine(w if est is fast else w.float(), est)
        assert float(sim(third.U[1][:, :top].double(), U[:, :top])) >= 0.999
        assert float(sim(third.V[1][:, :top].double(), Vh[:top].T)) >= 0.999
        torch.testing.assert_close(third.S[1][:top].double(), S[:top], rtol=0.01, atol=0)
        for X in (est.U[1], est.V[1], third.U[1], third.V[1]):  # orthonormal bases on both sides
            torch.testing.assert_close(X.T @ X, torch.eye(16), atol=1e-5, rtol=0)
    assert float(sim(fast.U[1][:, :top], f32.U[1][:, :top])) >= 1 - 1e-3
    assert float(sim(fast.V[1][:, :top], f32.V[1][:, :top])) >= 1 - 1e-3
    # one more product improves on the estimate it starts from (a contraction towards the exact subspaces)
    more = gate.refine(w, fast)
    assert more.products == gate.FIRST_PRODUCTS + 1
    assert torch.equal(more.U[0], fast.U[1]) and torch.equal(more.V[0], fast.V[1])
    err = lambda X, E: 1 - float(sim(X[:, :top].double(), E))  # noqa: E731
    assert err(more.U[1], U[:, :top]) + err(more.V[1], Vh[:top].T) <= err(fast.U[1], U[:, :top]) + err(fast.V[1], Vh[:top].T) + 1e-6


def test_bf16_products_only_for_bf16_weights_where_our_kernels_run(engine_knob):
    assert not gate.bf16_products(torch.float32, "cpu")
    assert not gate.bf16_products(torch.float16, "cpu")
    assert not gate.bf16_products(torch.bfloat16, "cuda")  # a GPU multiplies a float32 copy
    assert gate.bf16_products(torch.bfloat16, "cpu") == torch.ops.loraport.bf16_kernels()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = f.read().split()
        assert torch.ops.loraport.bf16_kernels() <= ("avx512_bf16" in flags)  # never claimed without the CPU flag
    engine_knob(bf16_kernels="0")
    assert not gate.bf16_products(torch.bfloat16, "cpu")


def test_nan_in_a_bf16_weight_is_a_value_error_not_a_linalg_failure(bf16_gemms):
    w = torch.randn(64, 48).bfloat16()
    w[3, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        gate.first_products([w], 12, seed=0)


def test_spectrum_rank_cuts_at_a_clear_drop_or_takes_the_cap():
    flat = torch.linspace(1.0, 0.8, 20)
    assert gate.spectrum_rank(flat, flat, 16) == 16
    three = torch.cat([torch.tensor([9.0, 8.0, 7.0]), torch.full((17,), 1.0)])
    assert gate.spectrum_rank(three, three, 16) == 3
    one = torch.cat(
        [torch.tensor([9.0]), torch.full((19,), 1.0)]
    )  # never below MIN_RANK
    assert gate.spectrum_rank(one, one, 16) == 16
    assert (
        gate.spectrum_rank(three, flat, 16) == 16
    )  # the drop must hold for the pair's mean spectrum
    assert (
        gate.spectrum_rank(three, three, 2) == 2
    )  # a cap at or under MIN_RANK is taken as is


def test_spectrum_rank_looks_for_a_drop_only_where_the_sketch_estimates_the_spectrum():
    """A 16-column sketch's last two Ritz values underestimate the spectrum, so the default gate
    and its oracle look at the first 14 (all of them where the sketch spans the short side)."""
    assert gate.seen_values(3072, 1024) == gate.seen_values(64, 64) == 14
    assert gate.seen_values(16, 16) == 16 and gate.seen_values(12, 40) == 12
    fifteen = torch.cat([torch.linspace(9.0, 8.0, 15), torch.full((2,), 1.0)])  # a drop after σ_15
    assert gate.spectrum_rank(fifteen, fifteen, 16) == 15
    assert gate.spectrum_rank(fifteen, fifteen, 16, seen=14) == 16  # not seen: the cap
    thirteen = torch.cat([torch.linspace(9.0, 8.0, 13), torch.full((4,), 1.0)])  # after σ_13: seen
    assert gate.spectrum_rank(thirteen, thirteen, 16, seen=14) == 13
    # the oracle looks where the default gate does
    gen = torch.Generator().manual_seed(2)
    q = lambda rows: torch.linalg.qr(torch.randn(rows, 15, generator=gen, dtype=torch.float64))[0]  # noqa: E731
    w = q(256) * torch.linspace(30, 20, 15, dtype=torch.float64) @ q(192).T
    w += torch.randn(256, 192, generator=gen, dtype=torch.float64) / 30
    assert reference.gate_exact(w, w, 16)[2] == 16


def test_margin_and_settling():
    assert gate.margin(0.9, 0.8, 0.5) == pytest.approx(0.35)
    assert gate.margin(1.0, 0.1, 0.5) == pytest.approx(
        -0.15
    )  # one side at chance: fails despite mean 0.55
    assert (
        gate.settled(0.30, 0.31)
        and not gate.settled(0.20, 0.31)
        and not gate.settled(0.04, 0.04)
    )


def test_a_layer_near_the_threshold_iterates_and_is_marked_unsure_when_it_never_settles():
    gen = torch.Generator().manual_seed(3)
    ws = torch.randn(96, 128, generator=gen, dtype=torch.float64)
    wt = ws + 1.2 * torch.randn(96, 128, generator=gen, dtype=torch.float64)  # flat spectrum, half related
    cap = gate.gate_rank(96, 128)
    left, right, _ = reference.gate_exact(ws, wt, cap)
    on_the_edge = (left + right) / 2  # the exact similarity as the threshold: exact margin 0
    A = torch.stack([ws, wt]).float()
    index = {(0, "source"): 0, (0, "target"): 1}
    args = dict(cap=cap, seed=0, device="cpu")
    for threshold in (0.05, on_the_edge, 0.95):
        (res,) = gate.gate_layers(1, 96, 128, A, index, {}, None, None, {}, threshold=threshold, **args)
        est = gate.margin(res.left, res.right, threshold)
        if threshold == on_the_edge:  # never far enough from 0 to stop after the first products
            assert res.products > gate.FIRST_PRODUCTS + 1 and abs(est) < 0.1
        elif threshold < on_the_edge:  # a clear pass: the first estimate decides
            assert res.products == gate.FIRST_PRODUCTS and est >= gate.EARLY_PASS
        else:  # a clear fail: one more product, for a second estimate to compare with
            assert res.products == gate.FIRST_PRODUCTS + 1 and est < 0
        assert res.unsure <= (res.products == gate.MAX_PRODUCTS)


def test_identical_weights_pass_without_any_product():
    w = torch.randn(64, 48, dtype=torch.bfloat16)
    (res,) = gate.gate_layers(1, 64, 48, torch.stack([w, w.clone()]), {(0, "source"): 0, (0, "target"): 1}, {},
                              None, None, {}, cap=8, seed=0, threshold=0.5, device="cpu")  # fmt: skip
    assert (res.left, res.right, res.products) == (1.0, 1.0, 0)
    w2 = w.clone()
    w2[-1, -1] += 1
    assert not gate.identical(w, w2) and gate.identical(w, w.clone())


@pytest.fixture(scope="module")
def models():
    source = tiny.base_model(ARCH, width=16, seed=0)
    target = tiny.related(source, seed=5)
    target["single_blocks.0.linear1.weight"] = source[
        "single_blocks.0.linear1.weight"
    ].clone()  # unchanged layer
    return {
        "source": source,
        "target": target,
        "unrelated": tiny.base_model(ARCH, width=16, seed=7),
    }


def _files(tmp_path, models, target="target"):
    lora = tiny.lora(
        ARCH, models["source"], fmt="kohya", rank=4, alpha=3.0, seed=11, modules=MODULES
    )
    return (
        tiny.save_base(lora, str(tmp_path / "lora.safetensors")),
        tiny.save_base(models["source"], str(tmp_path / "source.safetensors")),
        tiny.save_base(models[target], str(tmp_path / f"{target}.safetensors")),
    )


def test_report_rows_give_the_margin_and_the_summary_lists_borderline_layers(
    tmp_path, models
):
    lora, source, target = _files(tmp_path, models)
    rep = port(lora, source, target, str(tmp_path / "out.safetensors"), quiet=True)
    rows = {r.module: r for r in rep.rows}
    for r in rep.rows:
        assert r.margin == pytest.approx(
            gate.margin(r.similarity_left, r.similarity_right, 0.5)
        )
        assert r.similarity == pytest.approx(
            (r.similarity_left + r.similarity_right) / 2
        )
    same = rows["single_blocks.0.linear1"]
    assert (same.similarity, same.gate_products, same.note) == (
        1.0,
        0,
        "identical in both bases",
    )
    # a threshold just under a layer's similarity makes it borderline, and the table says so
    near = rows["double_blocks.0.img_attn_qkv"]
    rep = port(lora, source, target, str(tmp_path / "out.safetensors"), quiet=True,
               min_similarity=near.similarity - 0.02)  # fmt: skip
    assert "double_blocks.0.img_attn_qkv" in rep.summary()["borderline"]
    assert "borderline" in rep.table() and "double_blocks.0.img_attn_qkv" in rep.table()


def test_gate_sketches_are_cached_and_never_served_as_subspaces(tmp_path, models):
    lora, source, target = _files(tmp_path, models)
    cache, out = str(tmp_path / "cache"), str(tmp_path / "out.safetensors")
    first = port(lora, source, target, out, cache_dir=cache, quiet=True)
    second = port(lora, source, target, out, cache_dir=cache, quiet=True)
    changed = [
        r for r in second.rows if r.gate_products != 0
    ]  # the identical layer is compared, not cached
    assert changed and all(r.subspaces_from_cache == 2 for r in changed)
    entries = [f for f in os.listdir(cache) if f.endswith(".safetensors")]
    assert len(entries) == 2 * len(changed)
    for name in entries:  # each holds its first estimate once: U [m, l], S [l], V [n, l]
        with safe_open(os.path.join(cache, name), framework="pt") as f:
            U, S, V = (f.get_tensor(k) for k in "USV")
            assert U.dim() == V.dim() == 2 and S.dim() == 1 and U.shape[1] == V.shape[1] == S.shape[0]
            assert S.shape[0] == gate.sketch_width(U.shape[0], V.shape[0])
    assert [(r.similarity, r.margin, r.action) for r in first.rows] == [
        (r.similarity, r.margin, r.action) for r in second.rows
    ]
    # the sketch has the gate's own width: the rsvd's oversample does not apply, the entries serve
    again = port(lora, source, target, out, cache_dir=cache, quiet=True, oversample=4)
    assert all(r.subspaces_from_cache == 2 for r in again.rows if r.gate_products != 0)
    # a projection needs real subspaces: the gate's sketches in the same folder are not used for it
    projected = port(
        lora, source, target, out, cache_dir=cache, quiet=True, variant="target"
    )
    assert all(r.subspaces_from_cache == 0 for r in projected.rows)


def test_energy_ranks_are_capped_and_do_not_pass_unrelated_layers(tmp_path, models):
    options = PortOptions.from_args(energy=0.9, variant="target")
    assert options.subspace_rank_for(384, 384) == 64 and options.subspace_rank_for(3072, 12288) == 64
    lora, source, target = _files(tmp_path, models, target="unrelated")
    for variant in ("copy", "target"):
        rep = port(lora, source, target, str(tmp_path / "out.safetensors"), energy=0.9, variant=variant,
                   quiet=True, dry_run=False, on_dissimilar="copy")  # fmt: skip
        for r in rep.rows:
            assert max(r.subspace_rank) <= 4  # min(64, 16 // 4)
            assert r.action == "copied" and r.margin < 0, r.module


def test_nan_in_a_base_weight_is_named_by_the_default_gate(tmp_path, models):
    from loraport.errors import InputError

    bad = dict(models["target"])
    bad["double_blocks.0.img_mlp.fc1.weight"] = bad[
        "double_blocks.0.img_mlp.fc1.weight"
    ].clone()
    bad["double_blocks.0.img_mlp.fc1.weight"][2, 5] = float("inf")
    lora, source, _ = _files(tmp_path, models)
    target = tiny.save_base(bad, str(tmp_path / "inf.safetensors"))
    with pytest.raises(
        InputError,
        match=r"inf\.safetensors: tensor 'double_blocks\.0\.img_mlp\.fc1\.weight' contains NaN",
    ):
        port(lora, source, target, str(tmp_path / "out.safetensors"), quiet=True)
    assert not (tmp_path / "out.safetensors").exists()
