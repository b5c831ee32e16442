"""What `resize` should do with a DoRA's magnitude when it lowers the rank of the DoRA's low-rank
part: the quality benchmark's DoRA (dora.py: trained on v1, width 128, rank 8) cut to ranks 4, 2
and 1 (ΔW' = best rank-k of ΔW) with the magnitude
  * "keep": m as trained (what `loraport resize --base` writes), W' = m ⊙ (W + ΔW') / ‖W + ΔW'‖;
  * "row scale": m · ‖W + ΔW'‖ / ‖W + ΔW‖, i.e. the trained per-row scale m / ‖W + ΔW‖ kept;
  * "least squares": the per-row magnitude closest to the trained effective weight,
    m · cos∠(W + ΔW', W + ΔW) (needs the base weight and changes m).
Scores: the effective update's relative error ‖Δ' − Δ‖_F / ‖Δ‖_F over all layers (Δ = W' − W)
and the task accuracy on v1 with the resized DoRA applied.

    python -m benchmarks.quality.dora_resize [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from . import experiment as E
from . import model as M
from .dora import apply_dora, train_dora

CHOICES = ("keep", "row scale", "least squares")


def resized(w, dora: dict, k: int) -> tuple[dict, dict]:
    """({choice: DoRA cut to rank k}, {choice: relative error of the effective update})."""
    out = {c: {} for c in CHOICES}
    sums = {c: [0.0, 0.0] for c in CHOICES}
    for name, (up, down, mag) in dora.items():
        W = w[name + ".weight"].double()  # [out, in]
        delta = up.double() @ down.double()
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        V, Vk = W + delta, W + (U[:, :k] * S[:k]) @ Vh[:k]
        m = mag.double()
        before = m[:, None] * V / V.norm(dim=1, keepdim=True) - W
        cos = (V * Vk).sum(1) / (V.norm(dim=1) * Vk.norm(dim=1))
        mags = {"keep": m, "row scale": m * Vk.norm(dim=1) / V.norm(dim=1), "least squares": m * cos}
        for c, m2 in mags.items():
            after = m2[:, None] * Vk / Vk.norm(dim=1, keepdim=True) - W
            sums[c][0] += float((after - before).square().sum())
            sums[c][1] += float(before.square().sum())
            out[c][name] = ((U[:, :k] * S[:k]).float(), Vh[:k].float(), m2.float())
    return out, {c: (a / b) ** 0.5 for c, (a, b) in sums.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality.dora_resize")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    s = E.FULL
    rows = []
    t0 = time.perf_counter()
    for seed in args.seeds:
        torch.manual_seed(seed)
        w = E.bases(s, seed, upgrades=())["v1"]
        recipe = E._recipe(s, (E.LORA_TASK,), s.lora_steps, seed + 7, lr=s.lora_lr)
        dora = train_dora(w, s.cfg, recipe, s.lora_rank)

        def score(d):
            return M.accuracy(apply_dora(w, d) if d else w, s.cfg, E.LORA_TASK, n=s.eval_sequences)

        ratio = sum(float((u @ d).norm() / w[n + ".weight"].norm()) for n, (u, d, _) in dora.items()) / len(dora)
        alone, full = score(None), score(dora)
        for k in (s.lora_rank // 2, s.lora_rank // 4, 1):
            cut, errors = resized(w, dora, k)
            rows.append((seed, k, ratio, alone, full, errors, {c: score(cut[c]) for c in CHOICES}))
    print(f"DoRA resize, width {s.cfg.width}, rank {s.lora_rank}, seeds {args.seeds}, {time.perf_counter() - t0:.0f} s")
    print("| seed | rank | ‖ΔW‖/‖W‖ | v1 alone | DoRA | effective error: " + " / ".join(CHOICES)
          + " | accuracy: " + " / ".join(CHOICES) + " |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for seed, k, ratio, alone, full, errors, acc in rows:
        print(f"| {seed} | {k} | {ratio:.3f} | {alone:.3f} | {full:.3f} | "
              + " / ".join(f"{errors[c]:.4f}" for c in CHOICES) + " | "
              + " / ".join(f"{acc[c]:.3f}" for c in CHOICES) + " |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
