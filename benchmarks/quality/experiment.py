"""One seed of the transfer-quality experiment: train base v1, derive the four upgrades, train a
LoRA on v1 for a skill no base has, write everything as real files (bases: safetensors with
Llama names; LoRA: kohya with alpha and PEFT), port the LoRA to each upgrade with loraport, and
score every candidate on the LoRA's task.

Upgrades of v1 (each a release pattern; strengths in `Setup`, measured as ‖W2 − W1‖_F / ‖W1‖_F
in the results):
  a  "continued": v1 trained further on shifted data (Zipf-skewed digits) plus a third base
     task (sort): the TinyLlama 2.5T -> 3T pattern.
  b  "finetuned": v1 fine-tuned for a different objective (sort only), the SD 1.5 -> fine-tune
     pattern (copy and reverse may be partly forgotten, as fine-tunes do).
  c  "reseeded": the v1 recipe from a different seed: same task, unrelated weights.
  d  "widened": v1 whose layer-0 gate_proj and up_proj gained input channels (zero-initialized,
     fed `model.extra_features`), then trained like (a): the HunyuanVideo T2V -> I2V (16 -> 33
     input channels) pattern.
Candidates scored on each upgrade v2: v2 alone; v2 + the v1 LoRA copied unchanged (zero-padded
where inputs grew, as diffusers loads it); v2 + the ported LoRA (every variant and method, at
the port() defaults otherwise; "copy" is loraport's gated copy);
v2 + a LoRA trained on v2 with the same recipe and seed (the ceiling).
Retention = (ported − alone) / (retrained − alone)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

import torch

import loraport
from loraport import errors, formats, gate, pipeline, reference
from loraport.testing import llama as M
from loraport.testing import tiny
from loraport.testing.llama import load_lora, lora_state_dict

UPGRADES = {"a": "continued", "b": "finetuned", "c": "reseeded", "d": "widened"}
LORA_TASK = "swap"
BASE_TASKS = ("copy", "reverse")


@dataclass(frozen=True)
class Setup:
    """Sizes and budgets; `QUICK` for the test suite, `FULL` for the benchmark."""

    cfg: M.Config = M.Config()  # width 128, MLP 256: the lower bound
    pretrain_steps: int = 300
    upgrade_steps: int = 150
    upgrade_lr: float = 1e-3  # continued training / fine-tuning at a third of the pre-training peak
    lora_steps: int = 150
    lora_rank: int = 8
    lora_lr: float = 5e-3
    batch: int = 32
    widen_channels: int = 16  # input channels layer 0's gate/up projections gain in upgrade (d)
    eval_sequences: int = 512


FULL = Setup()
QUICK = Setup(M.Config(width=32, layers=2, heads=4, ffn=64, length=6), 200, 100, 1e-3, 100, 4, 1e-2, 32, 8, 256)


def _recipe(s: Setup, tasks, steps, seed, **kw) -> M.Recipe:
    return M.Recipe(tuple(tasks), steps, batch=s.batch, seed=seed, **kw)


def widen(w: dict[str, torch.Tensor], channels: int) -> dict[str, torch.Tensor]:
    """A copy of ``w`` whose layer-0 gate/up projections take ``channels`` more inputs, with zero
    weights on them (so the widened model computes exactly what ``w`` does until trained)."""
    out = dict(w)
    for name in ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"):
        out[name] = torch.cat([w[name], w[name].new_zeros(w[name].shape[0], channels)], 1)  # [out, in + c]
    return out


def bases(s: Setup, seed: int, upgrades=tuple(UPGRADES)) -> dict[str, dict[str, torch.Tensor]]:
    """v1 and the ``upgrades`` of it ({"v1", "a", ...}), all trained here from ``seed``."""
    cfg = s.cfg
    v1 = M.train(M.init_weights(cfg, seed), cfg, _recipe(s, BASE_TASKS, s.pretrain_steps, seed))
    more = (*BASE_TASKS, "sort")
    recipes = {  # upgrade -> (starting weights, recipe)
        "a": (v1, _recipe(s, more, s.upgrade_steps, seed + 10, skew=1.0, lr=s.upgrade_lr)),
        "b": (v1, _recipe(s, ("sort",), s.upgrade_steps, seed + 20, lr=s.upgrade_lr)),
        "c": (M.init_weights(cfg, seed + 1000), _recipe(s, BASE_TASKS, s.pretrain_steps, seed + 1000)),
        "d": (widen(v1, s.widen_channels), _recipe(s, more, s.upgrade_steps, seed + 10, skew=1.0, lr=s.upgrade_lr)),
    }
    return {"v1": v1, **{u: M.train(*recipes[u][:1], cfg, recipes[u][1]) for u in upgrades}}


def rel_change(w1: dict[str, torch.Tensor], w2: dict[str, torch.Tensor], names) -> float:
    """‖W2 − W1‖_F / ‖W1‖_F over the given weights (widened columns compared with zero)."""
    num = den = 0.0
    for n in names:
        a, b = w1[n + ".weight"], w2[n + ".weight"]
        a = torch.cat([a, a.new_zeros(a.shape[0], b.shape[1] - a.shape[1])], 1)
        num += float((b - a).square().sum())
        den += float(a.square().sum())
    return (num / den) ** 0.5


@dataclass
class SeedResult:
    seed: int
    scores: dict = field(default_factory=dict)  # upgrade -> {candidate: accuracy}
    facts: dict = field(default_factory=dict)  # upgrade -> {rel_change, base accuracies}
    similarity: dict = field(default_factory=dict)  # upgrade -> [per-layer similarity at the default k]
    sweeps: list = field(default_factory=list)  # rows {upgrade, knob, value, variant, accuracy, ...}


def cli_port(lora: str, source: str, target: str, out: str, *args: str) -> dict:
    """``python -m loraport port`` in a subprocess (the real CLI); returns its JSON report, with
    "out" None when the similarity gate skipped every layer (exit status 3, no file)."""
    report = out + ".json"
    env = dict(os.environ)
    pkg = os.path.dirname(os.path.dirname(loraport.__file__))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # as many threads as the caller
    cmd = [sys.executable, "-m", "loraport", "port", lora, "--source", source, "--target", target,
           "-o", out, "--report", report, "--quiet", *args]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    skipped_all = proc.returncode == 3 and "no module was ported" in proc.stderr
    if proc.returncode != 0 and not skipped_all:
        raise RuntimeError(f"loraport port failed ({proc.returncode}): {proc.stderr.strip()}")
    with open(report) as f:
        doc = json.load(f)
    if skipped_all:
        doc["out"] = None  # the gate skipped every layer: no file written
    return doc


def gate_vs_exact(rep: dict, v1: dict, v2: dict, threshold: float = pipeline.DEFAULT_MIN_SIMILARITY) -> dict:
    """The CLI report's gate decisions against loraport.reference.gate_exact on the same weights:
    layers, how many decided alike, the smallest exact |margin| and the largest margin difference."""
    same, exact_margins, diffs = 0, [], []
    for row in rep["layers"]:
        if row["similarity"] is None:
            continue
        ws, wt = v1[row["module"] + ".weight"].double(), v2[row["module"] + ".weight"].double()
        if wt.shape[1] > ws.shape[1]:  # widened inputs: the source gets zero columns, as in the port
            ws = torch.cat([ws, ws.new_zeros(ws.shape[0], wt.shape[1] - ws.shape[1])], 1)
        left, right, _ = reference.gate_exact(ws, wt, gate.gate_rank(wt.shape[0], wt.shape[1]))
        exact = gate.margin(left, right, threshold)
        same += (exact >= 0) == (row["margin"] >= 0)
        exact_margins.append(abs(exact))
        diffs.append(abs(exact - row["margin"]))
    return {"layers": len(diffs), "same_decision": same, "min_abs_margin_exact": round(min(exact_margins), 3),
            "max_margin_difference": round(max(diffs), 3)}  # fmt: skip


PROJECTIONS = [v for v in pipeline.VARIANTS if v != "copy"]
# every variant at the port() defaults; "copy" uses the subspaces only for the gate, so one method
VARIANT_GRID = [("copy", "power"), *[(v, m) for v in PROJECTIONS for m in ("power", "krylov")]]


def run_seed(s: Setup, seed: int, folder: str, *, sweeps: bool = True, cli: bool = True, upgrades=tuple(UPGRADES)):
    """Everything for one seed, files in ``folder``; returns a SeedResult."""
    torch.manual_seed(seed)
    cfg = s.cfg
    models = bases(s, seed, upgrades)
    paths = {k: tiny.save_base(w, os.path.join(folder, f"{k}.safetensors")) for k, w in models.items()}
    lora_recipe = _recipe(s, (LORA_TASK,), s.lora_steps, seed + 7, lr=s.lora_lr)
    trained = M.train_lora(models["v1"], cfg, lora_recipe, s.lora_rank)
    lora = {}
    for fmt in ("kohya", "peft"):
        lora[fmt] = os.path.join(folder, f"lora_{fmt}.safetensors")
        formats.write_lora(formats.read_lora(lora_state_dict(trained, fmt), arch="llama"), lora[fmt])

    def score(w, lora_factors=None):
        return M.accuracy(w, cfg, LORA_TASK, lora_factors, n=s.eval_sequences)

    res = SeedResult(seed)
    v1 = models["v1"]
    res.scores["v1"] = {"alone": score(v1), "lora": score(v1, load_lora(lora["kohya"], v1))}
    modules = M.lora_modules(v1, cfg)
    for up in upgrades:
        v2 = models[up]

        def ported(lora_path, out, **options):  # a port that skips every layer leaves v2 alone
            try:
                loraport.port(lora_path, paths["v1"], paths[up], out, quiet=True, **options)
            except errors.InputError:
                return score(v2)
            return score(v2, load_lora(out, v2))

        ceiling = M.train_lora(v2, cfg, lora_recipe, s.lora_rank)
        sc = {"alone": score(v2), "copied": score(v2, load_lora(lora["kohya"], v2)), "retrained": score(v2, ceiling)}
        for variant, method in VARIANT_GRID:
            out = os.path.join(folder, f"port_{up}_{variant}_{method}.safetensors")
            sc[f"{variant}/{method}"] = ported(lora["kohya"], out, variant=variant, method=method)
        sc["default (peft file)"] = ported(lora["peft"], os.path.join(folder, f"port_{up}_peft.safetensors"))
        if cli:  # the main result through the real command line, with the CLI's defaults
            out = os.path.join(folder, f"cli_{up}.safetensors")
            rep = cli_port(lora["kohya"], paths["v1"], paths[up], out)
            sc["default (CLI)"] = score(v2, load_lora(out, v2)) if rep["out"] else sc["alone"]
            res.similarity[up] = [r["similarity"] for r in rep["layers"] if r["similarity"] is not None]
            res.facts.setdefault(up, {})["cli_actions"] = rep["summary"]["actions"]
            res.facts[up]["gate_vs_exact"] = gate_vs_exact(rep, v1, v2)
            print(f"  {up}: CLI gate vs exact float64 gate: {res.facts[up]['gate_vs_exact']}", flush=True)
        res.scores[up] = sc
        res.facts.setdefault(up, {}).update(
            rel_change=rel_change(models["v1"], v2, modules),
            **{f"v2 {t}": M.accuracy(v2, cfg, t, n=s.eval_sequences) for t in (*BASE_TASKS, "sort")},
        )
        if sweeps:
            res.sweeps += _sweeps(s, up, v2, lora["kohya"], paths, folder, score)
    return res


SWEEP_RANK_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 1)  # of min(width, ffn)
SWEEP_ENERGIES = (0.5, 0.8, 0.9, 0.95, 0.99)
SWEEP_THRESHOLDS = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
SWEEP_ITERS = (0, 1, 2, 4)


def _sweeps(s: Setup, up: str, v2, lora_path: str, paths, folder: str, score) -> list[dict]:
    """Accuracy of ported LoRAs as one knob moves (the others at the port() defaults, no gate):
    subspace rank and energy for each projection variant ("copy" does not depend on them); the
    threshold at subspace rank width/4, where the gate can tell subspaces apart, with the default
    variant; power iterations for the target projection at width/2, where it is neither
    trivial nor empty.
    Each row keeps the per-layer similarities the port reported."""
    rows = []
    out = os.path.join(folder, f"sweep_{up}.safetensors")
    width = min(s.cfg.width, s.cfg.ffn)

    def one(knob, value, **kw):
        try:
            rep = loraport.port(lora_path, paths["v1"], paths[up], out, quiet=True, **kw)
            acc = score(v2, load_lora(out, v2))
        except errors.InputError:  # nothing was ported: the LoRA has no effect
            rep, acc = None, score(v2)
        rows.append(dict(
            upgrade=up, knob=knob, value=value, accuracy=acc, variant=kw.get("variant", "default"),
            method=kw.get("method", "default"),
            ported=None if rep is None else sum(1 for r in rep.rows if r.action in ("ported", "padded")),
            similarity=None if rep is None else [r.similarity for r in rep.rows if r.similarity is not None],
        ))  # fmt: skip

    for variant in PROJECTIONS:
        for f in SWEEP_RANK_FRACTIONS:
            one("subspace_rank", f, subspace_rank=max(1, round(f * width)), variant=variant, min_similarity=0.0)
        for e in SWEEP_ENERGIES:
            one("energy", e, energy=e, variant=variant, min_similarity=0.0)
    for t in SWEEP_THRESHOLDS:
        one("min_similarity", t, min_similarity=t, subspace_rank=width // 4)
    for method in ("power", "krylov"):
        for q in SWEEP_ITERS:
            one("power_iters", q, power_iters=q, method=method, variant="target", min_similarity=0.0,
                subspace_rank=width // 2)  # fmt: skip
    return rows
