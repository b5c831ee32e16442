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


def _score(r, upgrade: str, candidate: str) -> float:
    return r.scores[upgrade].get(candidate, float("nan"))  # NaN: not measured in this run


def _kept(r, upgrade: str, candidate: str) -> float:
    return _retention(_score(r, upgrade, candidate), r.scores[upgrade])


def _sweep_rows(results, upgrade, knob, **match) -> list[dict]:
    match = {"upgrade": upgrade, "knob": knob, **match}
    return [row for r in results for row in r.sweeps if all(row[k] == v for k, v in match.items())]


def _sweep(results, upgrade, knob, **match) -> dict:
    """{value: [retention per seed]} for one upgrade's sweep rows matching ``match``."""
    out: dict = {}
    for r in results:
        for row in _sweep_rows([r], upgrade, knob, **match):
            out.setdefault(row["value"], []).append(_retention(row["accuracy"], r.scores[upgrade]))
    return out


def _sims(results, upgrades, knob, value, **match) -> list[float]:
    """Per-layer similarities of every seed's sweep row (knob = value) on ``upgrades``."""
    rows = [row for u in upgrades for row in _sweep_rows(results, u, knob, value=value, **match)]
    return [x for row in rows for x in row["similarity"] or []]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def markdown(results, facts, setup) -> str:
    ups = [u for u in E.UPGRADES if u in results[0].scores]
    related = [u for u in ups if u != "c"]
    name = {u: f"({u}) {E.UPGRADES[u]}" for u in ups}
    cfg = setup.cfg
    width = min(cfg.width, cfg.ffn)
    defaults = facts["loraport defaults"]
    L = [
        "# Transfer quality: does a ported LoRA keep its effect?",
        "",
        f"{facts['date']}; {facts['machine']}; torch {facts['torch']}, {facts['threads']} thread(s); "
        f"{len(results)} seed(s) ({', '.join(str(r.seed) for r in results)}); {facts['seconds_wall']} s wall, "
        f"{facts['seconds_cpu']} s CPU. Command: `python -m benchmarks.quality"
        + (" --quick" if setup == E.QUICK else "") + "`.",
        "",
        f"Model: Llama-style decoder, width {cfg.width}, {cfg.layers} layers, {cfg.heads} heads, MLP {cfg.ffn}; "
        f"LoRA rank {setup.lora_rank} on the 7 projections of every layer ({setup.lora_steps} steps), "
        f"task '{E.LORA_TASK}'. Accuracy = exact fraction of output digits right on {setup.eval_sequences} "
        "held-out sequences. loraport settings of the main table: the port() defaults "
        f"(subspace rank {defaults['subspace_rank']}, min similarity {defaults['min_similarity']}, "
        f"variant {defaults.get('variant', 'target')}) except the variant/method named; "
        "'copied' is the v1 LoRA loaded unchanged, 'copy/…' is loraport's variant \"copy\" "
        "(the same LoRA where the similarity gate passes, left out where it does not).",
        "",
        "## Accuracy on the LoRA's task (mean ± std over seeds)",
        "",
    ]  # fmt: skip
    L += _table(
        ["upgrade", "‖W2−W1‖/‖W1‖", "v2 alone", *CANDIDATES, "retrained on v2"],
        [[name[u], _ms([r.facts[u]["rel_change"] for r in results])]
         + [_ms([_score(r, u, c) for r in results]) for c in ["alone", *CANDIDATES, "retrained"]] for u in ups],
    )  # fmt: skip
    v1 = [r.scores["v1"] for r in results]
    L += ["", f"On v1 itself: alone {_ms([s['alone'] for s in v1])}, with the LoRA {_ms([s['lora'] for s in v1])}.", ""]
    L += ["## Retention = (candidate − v2 alone) / (retrained − v2 alone)", ""]
    L += _table(["upgrade", *CANDIDATES], [[name[u]] + [_ms([_kept(r, u, c) for r in results], pct=True)
                                                     for c in CANDIDATES] for u in ups])  # fmt: skip
    L += ["", "What v2 still does on the base tasks (accuracy):", ""]
    tasks = ("copy", "reverse", "sort")
    L += _table(["upgrade", *tasks], [[name[u]] + [_ms([r.facts[u][f"v2 {t}"] for r in results]) for t in tasks]
                                      for u in ups])  # fmt: skip

    def spread(xs):
        return f"{min(xs):.3f} / {statistics.fmean(xs):.3f} / {max(xs):.3f}" if xs else "n/a"

    L += ["", "## Per-layer subspace similarity (the gate)", ""]
    L += _table(
        ["upgrade", "CLI defaults: min / mean / max", "CLI actions (seed 0)", "k = full width: min / mean / max"],
        [[name[u], spread([x for r in results for x in r.similarity.get(u, [])]),
          str(results[0].facts[u].get("cli_actions")), spread(_sims(results, [u], "subspace_rank", 1, variant="target"))]
         for u in ups],
    )  # fmt: skip
    if not any(r.sweeps for r in results):
        return "\n".join(L) + "\n"

    L += ["", f"Worst cases over all seeds as the subspace rank moves (fraction of {width}): the gate can",
          "separate the bases wherever the related minimum is above the unrelated maximum.", ""]  # fmt: skip
    rows = []
    for f in E.SWEEP_RANK_FRACTIONS:
        rel = _sims(results, related, "subspace_rank", f, variant="target")
        unrel = _sims(results, ["c"], "subspace_rank", f, variant="target")
        rows.append([f"{f:.3g} [{max(1, round(f * width))}]", f"{min(rel):.3f}" if rel else "n/a",
                     f"{max(unrel):.3f}" if unrel else "n/a", f"{f:.3g}"])  # fmt: skip
    L += _table(["k / width [k]", "related (a, b, d): min", "unrelated (c): max", "chance k/n (square layers)"], rows)

    L += ["", "## Sweeps (retention, mean ± std over seeds; no similarity gate unless swept)", ""]
    variants = (("target", "target"), ("source-then-target", "s-then-t"))
    for knob, title in (("subspace_rank", f"subspace rank (fraction of min(width, MLP) = {width}; rank in brackets)"),
                        ("energy", "kept spectral energy")):  # fmt: skip
        values = sorted({row["value"] for r in results for row in r.sweeps if row["knob"] == knob})
        rows = []
        for val in values:
            label = f"{val:.3g}" + (f" [{max(1, round(val * width))}]" if knob == "subspace_rank" else "")
            cells = [_ms(_sweep(results, u, knob, variant=v).get(val, []), pct=True) for u in ups for v, _ in variants]
            rows.append([label, *cells])
        header = ["value", *[f"({u}) {short}" for u in ups for _, short in variants]]
        L += [f"### {title}", "", *_table(header, rows), ""]

    rows = []
    for t in E.SWEEP_THRESHOLDS:
        row = [str(t)]
        for u in ups:
            ported = [x["ported"] or 0 for x in _sweep_rows(results, u, "min_similarity", value=t)]
            kept = _ms(_sweep(results, u, "min_similarity").get(t, []), pct=True)
            row += [kept, f"{statistics.fmean(ported):.1f} / 14"]
        rows.append(row)
    L += [f"### min similarity (at subspace rank {width // 4} = width/4, default variant; layers under it skipped)", ""]
    L += _table(["threshold", *[f"({u}) {what}" for u in ups for what in ("retention", "layers ported")]], rows)

    rows = [[f"{m}, {q}"] + [_ms(_sweep(results, u, "power_iters", method=m).get(q, []), pct=True) for u in ups]
            for m in ("power", "krylov") for q in E.SWEEP_ITERS]  # fmt: skip
    L += ["", f"### power iterations (at subspace rank {width // 2} = width/2, variant target)", ""]
    L += _table(["method, q", *[f"({u})" for u in ups]], rows)
    return "\n".join(L) + "\n"


def plots(results, setup, folder: str) -> list[str]:
    """retention.png, similarity.png and (with sweeps) sweeps.png in ``folder``; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ups = [u for u in E.UPGRADES if u in results[0].scores]
    width = min(setup.cfg.width, setup.cfg.ffn)
    paths = []

    def save(fig, name):
        fig.tight_layout()
        paths.append(os.path.join(folder, name))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4))
    bar = 0.8 / len(CANDIDATES)
    for i, c in enumerate(CANDIDATES):
        stats = [_stats([_kept(r, u, c) for r in results]) for u in ups]
        xs = [j + (i - len(CANDIDATES) / 2 + 0.5) * bar for j in range(len(ups))]
        ax.bar(xs, [100 * m for m, _ in stats], bar, yerr=[100 * sd for _, sd in stats], label=c, capsize=2)
    ax.axhline(90, color="k", lw=0.8, ls=":")
    ax.set_xticks(range(len(ups)), [f"({u}) {E.UPGRADES[u]}" for u in ups])
    ax.set_ylabel("retention (%)")
    ax.set_title("LoRA effect kept on the upgraded base (100 % = retrained on v2; dotted: 90 %)")
    ax.legend(fontsize=7, ncol=3)
    save(fig, "retention.png")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    panels = (
        (f"CLI defaults (the default gate, subspace rank <= {E.gate.gate_rank(width, width)})",
         lambda u: [x for r in results for x in r.similarity.get(u, [])]),
        (f"subspace rank {width} (full width: square layers always score 1)",
         lambda u: _sims(results, [u], "subspace_rank", 1, variant="target")),
    )
    for ax, (title, sims) in zip(axes, panels):
        for j, u in enumerate(ups):
            ys = sims(u)
            ax.scatter([j + 0.3 * ((i % 7) / 6 - 0.5) for i in range(len(ys))], ys, s=8, alpha=0.6)
        ax.set_xticks(range(len(ups)), [f"({u})" for u in ups])
        ax.set_title(title, fontsize=9)
    axes[0].set_ylabel("per-layer subspace similarity")
    save(fig, "similarity.png")

    if not any(r.sweeps for r in results):
        return paths
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    variants = {"variant": (("target", "-"), ("source-then-target", "--"))}
    panels = (
        ("subspace_rank", "subspace rank / min(width, MLP)", variants),
        ("energy", "kept energy", variants),
        ("min_similarity", f"min similarity (k = {width // 4})", {}),
        ("power_iters", f"power iterations (k = {width // 2})", {"method": (("power", "-"), ("krylov", "--"))}),
    )
    for ax, (knob, xlabel, lines) in zip(axes.flat, panels):
        (field_name, styles), = lines.items() or [(None, ((None, "-"),))]
        for j, u in enumerate(ups):
            for which, ls in styles:
                data = _sweep(results, u, knob, **({field_name: which} if field_name else {}))
                xs = sorted(data)
                ys = [100 * _stats(data[x])[0] for x in xs]
                ax.plot(xs, ys, ls, color=f"C{j}", marker=".", label=f"({u}) {which or ''}".strip())
            ax.axhline(100 * _stats([_kept(r, u, "copied") for r in results])[0], color=f"C{j}", lw=0.8, ls=":")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("retention (%)")
    axes[0, 0].legend(fontsize=6, ncol=2)
    axes[1, 1].legend(fontsize=6, ncol=2)
    fig.suptitle("Retention as one setting moves (dotted: LoRA copied unchanged)", fontsize=10)
    save(fig, "sweeps.png")
    return paths
