"""What `port` should do with a DoRA magnitude (issue 27): keep it, or rescale it by the ratio of
the target's to the source's weight norms. Same bases, upgrades and task as the transfer-quality
benchmark (experiment.py); the adapter is a DoRA instead of a LoRA.

DoRA (arXiv 2402.09353, PEFT's form): W' = m ⊙ (W + up @ down) / ‖W + up @ down‖ with the norm per
output row, m [out] initialised to ‖W‖ per row, up to zero (training starts at W' = W). It is
trained on v1 with the LoRA recipe (rank, steps, learning rate), saved as a PEFT file
(`lora_magnitude_vector`), ported to each upgrade v2 with `loraport.port` (defaults, copy
variant) once per `dora_magnitude` choice, and scored on v2 with the DoRA formula applied to
v2's weights. Retention = (ported − v2 alone) / (DoRA retrained on v2 − v2 alone).

    python -m benchmarks.quality.dora [--seeds 0 1 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

import torch

import loraport
from loraport import adapters, archs, errors, formats
from loraport.testing import llama as M
from loraport.testing import tiny

from . import experiment as E


def apply_dora(w: dict[str, torch.Tensor], dora: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """A copy of ``w`` with each adapted weight replaced by m ⊙ (W + up @ down) / ‖·‖ (per output
    row); down is zero-padded to a widened weight's input columns."""
    out = dict(w)
    for name, (up, down, mag) in dora.items():
        W = w[name + ".weight"]  # [out, in]
        if W.shape[1] > down.shape[1]:
            down = torch.cat([down, down.new_zeros(down.shape[0], W.shape[1] - down.shape[1])], 1)
        V = W + up @ down
        out[name + ".weight"] = mag[:, None] * V / V.norm(dim=1, keepdim=True)
    return out


def train_dora(w: dict[str, torch.Tensor], cfg: M.Config, recipe: M.Recipe, rank: int) -> dict[str, tuple]:
    """A DoRA of ``rank`` on base ``w`` (frozen): {module: (up [out, r], down [r, in], m [out])},
    trained like loraport.testing.llama.train_lora (same initialization of up and down, AdamW,
    schedule)."""
    g = torch.Generator().manual_seed(recipe.seed + 1)
    params = {}
    for name in M.lora_modules(w, cfg):
        W = w[name + ".weight"]
        out, inp = W.shape
        params[name] = (
            torch.zeros(out, rank, requires_grad=True),
            (torch.randn(rank, inp, generator=g) / math.sqrt(inp)).requires_grad_(True),
            W.norm(dim=1).clone().requires_grad_(True),
        )
    opt = torch.optim.AdamW([t for p in params.values() for t in p], lr=recipe.lr, weight_decay=0.0, betas=(0.9, 0.98))
    for step in range(recipe.steps):
        for group in opt.param_groups:
            group["lr"] = recipe.lr * M.schedule(step, recipe.steps)
        task = recipe.tasks[step % len(recipe.tasks)]
        tokens = M.make_batch(task, recipe.batch, cfg.length, g, recipe.skew)
        loss, _ = M.loss_and_accuracy(M.forward(apply_dora(w, params), tokens, cfg), tokens, cfg.length)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {k: tuple(t.detach() for t in p) for k, p in params.items()}


def save_dora(dora: dict[str, tuple], path: str) -> str:
    """The DoRA as a PEFT file (lora_A, lora_B, lora_magnitude_vector; scale 1)."""
    mods = [
        adapters.AdapterModule("model", name, "locon", {"up": up, "down": down, "magnitude": mag}, None, name,
                               magnitude_axis="out")  # fmt: skip
        for name, (up, down, mag) in dora.items()
    ]
    formats.write_lora(formats.LoraFile(mods, "peft", archs.get("llama"), "diffusers"), path)
    return path


def load_dora(path: str) -> dict[str, tuple]:
    """A DoRA file as {module: (up with the scale folded, down, magnitude)}."""
    out = {}
    for m in formats.read_lora(path, arch="llama").modules:
        t = m.tensors
        out[m.name] = (t["up"].float() * m.scale, t["down"].float(), t["magnitude"].float())
    return out


def run_seed(s: E.Setup, seed: int, folder: str) -> dict:
    torch.manual_seed(seed)
    cfg = s.cfg
    models = E.bases(s, seed)
    paths = {k: tiny.save_base(w, os.path.join(folder, f"{k}.safetensors")) for k, w in models.items()}
    recipe = E._recipe(s, (E.LORA_TASK,), s.lora_steps, seed + 7, lr=s.lora_lr)
    dora = train_dora(models["v1"], cfg, recipe, s.lora_rank)
    src = save_dora(dora, os.path.join(folder, "dora_v1.safetensors"))

    def score(w, d=None):
        return M.accuracy(apply_dora(w, d) if d else w, cfg, E.LORA_TASK, n=s.eval_sequences)

    result = {"v1": {"alone": score(models["v1"]), "dora": score(models["v1"], dora)}}
    for up in E.UPGRADES:
        v2 = models[up]
        sc = {"alone": score(v2), "retrained": score(v2, train_dora(v2, cfg, recipe, s.lora_rank))}
        for choice in adapters.DORA_MAGNITUDE:
            out = os.path.join(folder, f"port_{up}_{choice}.safetensors")
            try:
                loraport.port(src, paths["v1"], paths[up], out, quiet=True, dora_magnitude=choice)
                sc[choice] = score(v2, load_dora(out))
            except errors.InputError:  # every layer below the gate: v2 alone
                sc[choice] = sc["alone"]
        ratios = [float((v2[n + ".weight"].norm(dim=1) / models["v1"][n + ".weight"].norm(dim=1) - 1).abs().mean())
                  for n in dora]  # fmt: skip
        sc["mean |norm ratio - 1|"] = sum(ratios) / len(ratios)
        result[up] = sc
    return result


def retention(sc: dict, choice: str) -> float:
    gap = sc["retrained"] - sc["alone"]
    return (sc[choice] - sc["alone"]) / gap if gap > 0 else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality.dora")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--quick", action="store_true", help="the test suite's small setup")
    p.add_argument("--json", help="write every score here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    s = E.QUICK if args.quick else E.FULL
    t0 = time.perf_counter()
    runs = {}
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as folder:
            runs[seed] = run_seed(s, seed, folder)
    print(f"DoRA magnitude on port, width {s.cfg.width}, seeds {args.seeds}, {time.perf_counter() - t0:.0f} s")
    print("| upgrade | ‖W2‖/‖W1‖ per row, mean abs change | keep | rescale | v2 alone | retrained |")
    print("|---|---|---|---|---|---|")
    for up, label in E.UPGRADES.items():
        rows = [runs[sd][up] for sd in args.seeds]

        def ms(values, pct=True):
            mean = sum(values) / len(values)
            std = (sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5
            return f"{100 * mean:.1f} ± {100 * std:.1f} %" if pct else f"{mean:.3f}"

        print(
            f"| {up} {label} | {ms([r['mean |norm ratio - 1|'] for r in rows])} | "
            f"{ms([retention(r, 'keep') for r in rows])} | {ms([retention(r, 'rescale') for r in rows])} | "
            f"{ms([r['alone'] for r in rows], False)} | {ms([r['retrained'] for r in rows], False)} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
