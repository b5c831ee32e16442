"""The `convert` jobs of benchmarks/toolbox.py: LoHa and LoKr files on Musubi's Hunyuan layer set
(``--shapes hunyuan``: full shapes; ``small``: 768 wide) converted to a plain rank-k LoRA by
  * "loraport": loraport.convert end to end (reading and writing included): LoHa through its
    exact rank-r² face-splitting factors and the batched product SVD (or, where r² is
    above the crossover `convert.loha_is_dense` estimates, its dense ΔW and rsvd), LoKr through the SVD of the Kronecker
    product from its factors' SVDs; per-layer times are each layer's share;
  * "dense full SVD": ΔW formed densely from the LyCORIS formula (float32), torch.linalg.svd;
  * "dense svd_lowrank": the same dense ΔW through torch.svd_lowrank (q = k + 8, niter 2).
Errors ‖ΔW − ΔW_k‖_F are divided by the optimal one, sqrt(Σ_{i>k} σ_i²), with the exact singular
values σ of ΔW from its structure in float64 (`optimal_errors`: LoHa from the Householder QRs of
its face-splitting factors, LoKr as the products of its factors' singular values), so no method
is its own yardstick and every variant has the reference, whether the dense full SVD ran on it
or not.

Variants (bf16, as trainers save them; typical LyCORIS settings): LoHa at rank 8 and 16 (alpha
r/2; exact rank r²); LoKr with LyCORIS's factor 8 or 16 (w1 [f, f] full, w2 [out/f, in/f]),
either a full lokr_w2 (what LyCORIS writes when the rank is at least half of w2's side; exact
rank min(out, in)) or lokr_w2_a @ lokr_w2_b at rank 16 (alpha 8; exact rank 16·f)."""

from __future__ import annotations

import os
import time

import torch

import loraport
from loraport import adapters, archs, formats

# name: (type, LoHa rank r or LoKr factor f, LoKr w2 rank: None for a full lokr_w2). The first one
# run is where the dense full SVD is timed by default (toolbox --dense-svd first): a full-rank ΔW,
# since LAPACK's divide and conquer finishes a rank-deficient one early.
VARIANTS = {
    "lokr-f8": ("lokr", 8, None),
    "lokr-f8-r16": ("lokr", 8, 16),
    "lokr-f16": ("lokr", 16, None),
    "lokr-f16-r16": ("lokr", 16, 16),
    "loha-r8": ("loha", 8, None),
    "loha-r16": ("loha", 16, None),
}


def describe(variant: str) -> str:
    kind, size, w2_rank = VARIANTS[variant]
    if kind == "loha":
        return f"LoHa rank {size} (exact rank {size * size})"
    w2 = "a full lokr_w2" if w2_rank is None else f"lokr_w2_a/b at rank {w2_rank}"
    exact = "min(out, in)" if w2_rank is None else str(size * w2_rank)
    return f"LoKr factor {size}, {w2} (exact rank {exact})"


def make_module(variant: str, name: str, m: int, n: int, g: torch.Generator) -> adapters.AdapterModule:
    """One module of ``variant`` on a [m, n] weight, bf16."""
    kind, size, w2_rank = VARIANTS[variant]
    if kind == "loha":
        r = size
        t = {"hada_w1_a": torch.randn(m, r, generator=g), "hada_w1_b": torch.randn(r, n, generator=g) / n**0.5,
             "hada_w2_a": torch.randn(m, r, generator=g), "hada_w2_b": torch.randn(r, n, generator=g) / n**0.5}  # fmt: skip
        return adapters.AdapterModule("model", name, "loha", {k: v.bfloat16() for k, v in t.items()}, r / 2, name,
                                      flat_kernel=True)  # fmt: skip
    f = size
    t = {"lokr_w1": torch.randn(f, f, generator=g)}
    if w2_rank is None:
        t["lokr_w2"] = torch.randn(m // f, n // f, generator=g) / (n // f) ** 0.5
    else:
        t["lokr_w2_a"] = torch.randn(m // f, w2_rank, generator=g)
        t["lokr_w2_b"] = torch.randn(w2_rank, n // f, generator=g) / n**0.5
    return adapters.AdapterModule("model", name, "lokr", {k: v.bfloat16() for k, v in t.items()},
                                  None if w2_rank is None else 8.0, name)  # fmt: skip


def make_inputs(folder: str, layer_list, variants) -> dict[str, str]:
    """<variant>.safetensors (kohya/LyCORIS keys, bf16) on ``layer_list`` for each variant."""
    paths = {}
    for variant in variants:
        g = torch.Generator().manual_seed(1)
        mods = [make_module(variant, name, m, n, g) for name, _, (m, n) in layer_list]
        paths[variant] = os.path.join(folder, f"{variant}.safetensors")
        formats.write_lora(formats.LoraFile(mods, "kohya", archs.get("hunyuan-video"), "original"), paths[variant])
    return paths


def dense_delta(m: adapters.AdapterModule) -> torch.Tensor:
    """ΔW [m, n] float32 straight from the LyCORIS formula, as a dense converter forms it."""
    t = {k: v.float() for k, v in m.tensors.items()}
    if m.kind == "loha":
        return (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * m.scale
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    return torch.kron(t["lokr_w1"], w2) * m.scale


def singular_values(m: adapters.AdapterModule) -> torch.Tensor:
    """Every nonzero singular value of ΔW, float64, from the structure: LoHa's face-splitting
    factors (A1 • A2)(B1 ∗ B2) through their Householder QRs, LoKr's as s1_i · s2_j."""
    t = {k: v.double() for k, v in m.tensors.items()}
    if m.kind == "loha":
        a1, a2, b1, b2 = t["hada_w1_a"], t["hada_w2_a"], t["hada_w1_b"], t["hada_w2_b"]
        up = (a1[:, :, None] * a2[:, None, :]).flatten(1)  # [m, r1·r2]
        down = (b1[:, None, :] * b2[None, :, :]).flatten(0, 1)  # [r1·r2, n]
        core = torch.linalg.qr(up).R @ torch.linalg.qr(down.mT).R.mT
        return torch.linalg.svdvals(core) * abs(m.scale)
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    return torch.outer(torch.linalg.svdvals(t["lokr_w1"]), torch.linalg.svdvals(w2)).flatten() * abs(m.scale)


def optimal_errors(lora_in: dict, names, rank: int) -> dict[str, float]:
    """Eckart–Young: the least ‖ΔW − X‖_F over rank-``rank`` X, per layer of ``names``."""
    out = {}
    for name in names:
        S = torch.sort(singular_values(lora_in[name]), descending=True).values
        out[name] = float(S[rank:].square().sum().sqrt())
    return out


def worker(args, paths, layer_list, dense_names, oversample: int) -> dict:
    """One method on the ``args.job`` ("convert-<variant>") file: the fields of toolbox.worker's
    result, before the peak-memory reading."""
    path = paths[args.job.removeprefix("convert-")]
    rank = args.rank
    times, kept = {}, {}
    wall = None
    lora_in = {m.name: m for m in formats.read_lora(path).modules}
    if args.method == "loraport":
        out = os.path.join(args.dir, "out.safetensors")
        start = time.perf_counter()
        rep = loraport.convert(path, out, rank=rank, quiet=True)
        wall = time.perf_counter() - start
        times = {r.module: r.seconds for r in rep.rows}
        got = {m.name: m for m in formats.read_lora(out).modules}
        kept = {name: got[name].factors() for name in dense_names}
        return dict(times=times, wall=wall, kept=kept, lora_in=lora_in)
    start = time.perf_counter()
    for name, _, _ in layer_list:
        if args.method == "dense full SVD" and name not in dense_names:
            continue
        t0 = time.perf_counter()
        delta = dense_delta(lora_in[name])  # [m, n]
        if args.method == "dense full SVD":
            U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
            new_up, new_down = U[:, :rank] * S[:rank], Vh[:rank]
        else:
            U, S, V = torch.svd_lowrank(delta, q=rank + oversample, niter=2)
            new_up, new_down = U[:, :rank] * S[:rank], V[:, :rank].mT
        times[name] = time.perf_counter() - t0
        if name in dense_names:
            kept[name] = (new_up, new_down)
        del delta
    if args.method == "dense svd_lowrank":
        wall = time.perf_counter() - start
    return dict(times=times, wall=wall, kept=kept, lora_in=lora_in)
