"""Tables (markdown) and plots (PNG) from the per-seed results of benchmarks.quality.experiment.
Retention = (candidate − v2 alone) / (retrained − v2 alone), computed per seed, then mean ± std
over seeds. matplotlib is imported inside `plots` only, so the rest needs no plotting library."""

from __future__ import annotations

import os
import statistics

from . import experiment as E

CANDIDATES = ["copied", *[f"{v}/{m}" for v, m in E.VARIANT_GRID], "default (CLI)"]


def _retention(acc: float, scores: dict) -> float:
    gap = scores["retrained"] - scores["alone"]
    return (acc - scores["alone"]) / gap if gap > 0 else float("nan")


def _ms(values, pct=False) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    f = 100 if pct else 1
    mean = statistics.fmean(values) * f
    sd = statistics.stdev(values) * f if len(values) > 1 else 0.0
    return f"{mean:.0f} ± {sd:.0f} %" if pct else f"{mean:.3f} ± {sd:.3f}"


def _stats(values):
    values = [v for v in values if v == v]
    mean = statistics.fmean(values) if values else float("nan")
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def _sweep(results, upgrade, knob, **match):
    """{value: [retention per seed]} for one upgrade's sweep rows matching ``match``."""
    out: dict = {}
    for r in results:
        sc = r.scores[upgrade]
        for row in r.sweeps:
            if row["upgrade"] == upgrade and row["knob"] == knob and all(row[k] == v for k, v in match.items()):
                out.setdefault(row["value"], []).append(_retention(row["accuracy"], sc))
    return out


def _sweep_rows(results, upgrade, knob, **match):
    return [row for r in results for row in r.sweeps if row["upgrade"] == upgrade and row["knob"] == knob
            and all(row[k] == v for k, v in match.items())]  # fmt: skip


def markdown(results, facts, setup) -> str:
    ups = [u for u in E.UPGRADES if u in results[0].scores]
    cfg = setup.cfg
    width = min(cfg.width, cfg.ffn)
    L = [
        "# Transfer quality: does a ported LoRA keep its effect?",
        "",
        f"{facts['date']}; {facts['machine']}; torch {facts['torch']}, {facts['threads']} thread(s); "
        f"{len(results)} seed(s) ({', '.join(str(r.seed) for r in results)}); {facts['seconds_wall']} s wall, "
        f"{facts['seconds_cpu']} s CPU. Command: `python -m benchmarks.quality"
        + (" --quick" if setup == E.QUICK else "")
        + "`.",
        "",
        f"Model: Llama-style decoder, width {cfg.width}, {cfg.layers} layers, {cfg.heads} heads, MLP {cfg.ffn}; "
        f"LoRA rank {setup.lora_rank} on the 7 projections of every layer ({setup.lora_steps} steps), "
        f"task '{E.LORA_TASK}'. Accuracy = exact fraction of output digits right on {setup.eval_sequences} "
        "held-out sequences. loraport settings of the main table: the port() defaults "
        f"(subspace rank {facts['loraport defaults']['subspace_rank']}, min similarity "
        f"{facts['loraport defaults']['min_similarity']}) except the variant/method named.",
        "",
        "## Accuracy on the LoRA's task (mean ± std over seeds)",
        "",
        "| upgrade | ‖W2−W1‖/‖W1‖ | v2 alone | copied | " + " | ".join(CANDIDATES[1:]) + " | retrained on v2 |",
        "|---" * (len(CANDIDATES) + 4) + "|",
    ]
    for u in ups:
        cells = [_ms([r.facts[u]["rel_change"] for r in results])]
        cells += [_ms([r.scores[u].get(c, float("nan")) for r in results]) for c in ["alone", *CANDIDATES, "retrained"]]
        L.append(f"| ({u}) {E.UPGRADES[u]} | " + " | ".join(cells) + " |")
    v1 = [r.scores["v1"] for r in results]
    L += [
        "",
        f"On v1 itself: alone {_ms([s['alone'] for s in v1])}, with the LoRA {_ms([s['lora'] for s in v1])}.",
        "",
        "## Retention = (candidate − v2 alone) / (retrained − v2 alone)",
        "",
        "| upgrade | " + " | ".join(CANDIDATES) + " |",
        "|---" * (len(CANDIDATES) + 1) + "|",
    ]
    for u in ups:
        cells = [_ms([_retention(r.scores[u].get(c, float("nan")), r.scores[u]) for r in results], pct=True) for c in CANDIDATES]
        L.append(f"| ({u}) {E.UPGRADES[u]} | " + " | ".join(cells) + " |")
    L += ["", "What v2 still does on the base tasks (accuracy):", "", "| upgrade | copy | reverse | sort |", "|---|---|---|---|"]
    for u in ups:
        L.append(f"| ({u}) | " + " | ".join(_ms([r.facts[u][f"v2 {t}"] for r in results]) for t in ("copy", "reverse", "sort")) + " |")

    L += ["", "## Per-layer subspace similarity (the gate)", ""]
    L += ["| upgrade | CLI defaults: min / mean / max | CLI actions (seed 0) | at k = width/4: min / mean / max |",
          "|---|---|---|---|"]  # fmt: skip
    for u in ups:
        sims = [x for r in results for x in r.similarity.get(u, [])]
        quarter = [x for row in _sweep_rows(results, u, "min_similarity", value=0.0) for x in row["similarity"]]
        cell = lambda xs: f"{min(xs):.3f} / {statistics.fmean(xs):.3f} / {max(xs):.3f}" if xs else "n/a"  # noqa: E731
        L.append(f"| ({u}) | {cell(sims)} | {results[0].facts[u].get('cli_actions')} | {cell(quarter)} |")

    if any(r.sweeps for r in results):
        L += ["", "## Sweeps (retention, mean ± std over seeds; no similarity gate unless swept)", ""]
        for knob, title in (("subspace_rank", "subspace rank (fraction of min(width, MLP) = "
                             f"{width}; rank in brackets)"), ("energy", "kept spectral energy")):  # fmt: skip
            L += [f"### {title}", "", "| value | " + " | ".join(f"({u}) {v}" for u in ups for v in ("target", "s-then-t")) + " | mean similarity (a) / (c) |",
                  "|---" * (2 * len(ups) + 2) + "|"]  # fmt: skip
            values = sorted({row["value"] for r in results for row in r.sweeps if row["knob"] == knob})
            for val in values:
                label = f"{val:.3g}" + (f" [{max(1, round(val * width))}]" if knob == "subspace_rank" else "")
                cells = []
                for u in ups:
                    for variant in ("target", "source-then-target"):
                        cells.append(_ms(_sweep(results, u, knob, variant=variant).get(val, []), pct=True))
                sims = []
                for u in ("a", "c"):
                    rows = [row for row in _sweep_rows(results, u, knob, variant="target") if row["value"] == val]
                    xs = [x for row in rows for x in row["similarity"]]
                    sims.append(f"{statistics.fmean(xs):.3f}" if xs else "n/a")
                L.append(f"| {label} | " + " | ".join(cells) + f" | {' / '.join(sims)} |")
            L.append("")
        L += [f"### min similarity (at subspace rank {width // 4} = width/4; layers under it skipped)", "",
              "| threshold | " + " | ".join(f"({u}) retention | ({u}) layers ported" for u in ups) + " |",
              "|---" * (2 * len(ups) + 1) + "|"]  # fmt: skip
        for t in E.SWEEP_THRESHOLDS:
            cells = []
            for u in ups:
                rows = [row for row in _sweep_rows(results, u, "min_similarity") if row["value"] == t]
                cells.append(_ms(_sweep(results, u, "min_similarity").get(t, []), pct=True))
                cells.append(f"{statistics.fmean(row['ported'] or 0 for row in rows):.1f} / 14")
            L.append(f"| {t} | " + " | ".join(cells) + " |")
        L += ["", f"### power iterations (at subspace rank {width // 2} = width/2, default variant)", "",
              "| method, q | " + " | ".join(f"({u})" for u in ups) + " |", "|---" * (len(ups) + 1) + "|"]  # fmt: skip
        for method in ("power", "krylov"):
            for q in E.SWEEP_ITERS:
                cells = [_ms(_sweep(results, u, "power_iters", method=method).get(q, []), pct=True) for u in ups]
                L.append(f"| {method}, {q} | " + " | ".join(cells) + " |")
    return "\n".join(L) + "\n"


def plots(results, setup, folder: str) -> list[str]:
    """retention.png, similarity.png and (with sweeps) sweeps.png in ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ups = [u for u in E.UPGRADES if u in results[0].scores]
    paths = []

    fig, ax = plt.subplots(figsize=(9, 4))
    bar = 0.8 / len(CANDIDATES)
    for i, c in enumerate(CANDIDATES):
        stats = [_stats([_retention(r.scores[u].get(c, float("nan")), r.scores[u]) for r in results]) for u in ups]
        xs = [j + (i - len(CANDIDATES) / 2 + 0.5) * bar for j in range(len(ups))]
        ax.bar(xs, [100 * m for m, _ in stats], bar, yerr=[100 * s for _, s in stats], label=c, capsize=2)
    ax.axhline(90, color="k", lw=0.8, ls=":")
    ax.set_xticks(range(len(ups)), [f"({u}) {E.UPGRADES[u]}" for u in ups])
    ax.set_ylabel("retention (%)")
    ax.set_title("LoRA effect kept on the upgraded base (100 % = retrained on v2)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    paths.append(os.path.join(folder, "retention.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    width = min(setup.cfg.width, setup.cfg.ffn)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    for ax, (title, get) in zip(axes, (
        ("CLI defaults", lambda r, u: r.similarity.get(u, [])),
        (f"subspace rank {width // 4} (width/4)", lambda r, u: [x for row in r.sweeps if row["upgrade"] == u
                                                                and row["knob"] == "min_similarity" and row["value"] == 0.0
                                                                for x in row["similarity"]]),
    )):  # fmt: skip
        for j, u in enumerate(ups):
            xs = [x for r in results for x in get(r, u)]
            ax.scatter([j + 0.15 * ((i % 7) / 7 - 0.5) for i in range(len(xs))], xs, s=8, alpha=0.6)
        ax.set_xticks(range(len(ups)), [f"({u})" for u in ups])
        ax.set_title(title, fontsize=9)
    axes[0].set_ylabel("per-layer subspace similarity")
    fig.tight_layout()
    paths.append(os.path.join(folder, "similarity.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    if any(r.sweeps for r in results):
        fig, axes = plt.subplots(2, 2, figsize=(10, 7))
        panels = (("subspace_rank", "subspace rank / min(width, MLP)"), ("energy", "kept energy"),
                  ("min_similarity", f"min similarity (k = {width // 4})"), ("power_iters", f"power iterations (k = {width // 2})"))  # fmt: skip
        for ax, (knob, xlabel) in zip(axes.flat, panels):
            for j, u in enumerate(ups):
                color = f"C{j}"
                lines = ((("target", "-"), ("source-then-target", "--")) if knob in ("subspace_rank", "energy")
                         else (("power", "-"), ("krylov", "--")) if knob == "power_iters" else ((None, "-"),))  # fmt: skip
                for which, ls in lines:
                    match = {} if which is None else ({"method": which} if knob == "power_iters" else {"variant": which})
                    data = _sweep(results, u, knob, **match)
                    xs = sorted(data)
                    ax.plot(xs, [100 * _stats(data[x])[0] for x in xs], ls, color=color, marker=".",
                            label=f"({u}) {which or ''}".strip())  # fmt: skip
                copied = _stats([_retention(r.scores[u]["copied"], r.scores[u]) for r in results])[0]
                ax.axhline(100 * copied, color=color, lw=0.8, ls=":")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("retention (%)")
        axes[0, 0].legend(fontsize=6, ncol=2)
        axes[1, 1].legend(fontsize=6, ncol=2)
        fig.suptitle("Retention as one setting moves (dotted: LoRA copied unchanged)", fontsize=10)
        fig.tight_layout()
        paths.append(os.path.join(folder, "sweeps.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
