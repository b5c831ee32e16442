"""The `convert` jobs of benchmarks/toolbox.py: a LoHa and a LoKr on Musubi's Hunyuan layer set
(full shapes by default) converted to a plain rank-k LoRA by
  * "loraport": loraport.convert end to end (reading and writing included): LoHa through its
    exact rank-r² face-splitting factors and the batched product SVD, LoKr through the SVD of
    the Kronecker product from its factors' SVDs; per-layer times are each layer's share;
  * "dense full SVD": ΔW formed densely from the LyCORIS formula (float32), torch.linalg.svd;
  * "dense svd_lowrank": the same dense ΔW through torch.svd_lowrank (q = k + 8, niter 2).
Errors ‖ΔW − ΔW_k‖_F are divided by the optimal one (the dense full SVD's tail, Eckart–Young).

Inputs (bf16, as trainers save them): LoHa rank 16 (alpha 8) on every layer; LoKr with
LyCORIS's factor 16 split (w1 [16, 16] full, w2 [out/16, in/16] = w2_a @ w2_b at rank 16, alpha 8),
so both have exact rank 256."""

from __future__ import annotations

import os
import time

import torch

import loraport
from loraport import adapters, archs, formats

LOHA_RANK = 16
LOKR_FACTOR = 16
LOKR_RANK = 16


def make_inputs(folder: str, layer_list) -> dict[str, str]:
    """loha.safetensors and lokr.safetensors (kohya/LyCORIS keys, bf16) on ``layer_list``."""
    g = torch.Generator().manual_seed(1)
    files = {"loha": [], "lokr": []}
    for name, _, (m, n) in layer_list:
        r = LOHA_RANK
        t = {"hada_w1_a": torch.randn(m, r, generator=g), "hada_w1_b": torch.randn(r, n, generator=g) / n**0.5,
             "hada_w2_a": torch.randn(m, r, generator=g), "hada_w2_b": torch.randn(r, n, generator=g) / n**0.5}  # fmt: skip
        files["loha"].append(adapters.AdapterModule("model", name, "loha", {k: v.bfloat16() for k, v in t.items()},
                                                    r / 2, name, flat_kernel=True))  # fmt: skip
        f, r = LOKR_FACTOR, LOKR_RANK
        t = {"lokr_w1": torch.randn(f, f, generator=g), "lokr_w2_a": torch.randn(m // f, r, generator=g),
             "lokr_w2_b": torch.randn(r, n // f, generator=g) / n**0.5}  # fmt: skip
        files["lokr"].append(adapters.AdapterModule("model", name, "lokr", {k: v.bfloat16() for k, v in t.items()},
                                                    r / 2, name))  # fmt: skip
    paths = {}
    for kind, mods in files.items():
        paths[kind] = os.path.join(folder, f"{kind}.safetensors")
        formats.write_lora(formats.LoraFile(mods, "kohya", archs.get("hunyuan-video"), "original"), paths[kind])
    return paths


def dense_delta(m: adapters.AdapterModule) -> torch.Tensor:
    """ΔW [m, n] float32 straight from the LyCORIS formula, as a dense converter forms it."""
    t = {k: v.float() for k, v in m.tensors.items()}
    if m.kind == "loha":
        return (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * m.scale
    return torch.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"]) * m.scale


def worker(args, paths, layer_list, dense_names, oversample: int) -> dict:
    """One method on the ``args.job`` ("convert-loha" / "convert-lokr") file: the fields of
    toolbox.worker's result, before the peak-memory reading."""
    path = paths[args.job.removeprefix("convert-")]
    rank = args.rank
    times, optimal, kept = {}, {}, {}
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
        return dict(times=times, optimal=optimal, wall=wall, kept=kept, lora_in=lora_in)
    start = time.perf_counter()
    for name, _, _ in layer_list:
        if args.method == "dense full SVD" and name not in dense_names:
            continue
        t0 = time.perf_counter()
        delta = dense_delta(lora_in[name])  # [m, n]
        if args.method == "dense full SVD":
            U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
            new_up, new_down = U[:, :rank] * S[:rank], Vh[:rank]
            optimal[name] = float(S[rank:].double().square().sum().sqrt())
        else:
            U, S, V = torch.svd_lowrank(delta, q=rank + oversample, niter=2)
            new_up, new_down = U[:, :rank] * S[:rank], V[:, :rank].mT
        times[name] = time.perf_counter() - t0
        if name in dense_names:
            kept[name] = (new_up, new_down)
        del delta
    if args.method == "dense svd_lowrank":
        wall = time.perf_counter() - start
    return dict(times=times, optimal=optimal, wall=wall, kept=kept, lora_in=lora_in)
