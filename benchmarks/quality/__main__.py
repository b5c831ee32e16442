"""Run the transfer-quality benchmark and write its results next to this file:

    python -m benchmarks.quality               # 3 seeds, full sweeps (minutes on 2 CPU cores)
    python -m benchmarks.quality --quick       # 1 seed, a smaller model, no sweeps -> quick/
    python -m benchmarks.quality --seeds 5 --out /tmp/q
    python -m benchmarks.quality --render      # tables and plots again from results.json

Writes results.md (tables), results.json (every measurement) and retention.png,
similarity.png, sweeps.png to --out (default: this folder; with --quick, the folder quick/ in
it, which git ignores, so a quick run never replaces the recorded results). The plots need
matplotlib (`pip install loraport[bench]`); without it the run says so and still writes the
tables. See benchmarks/quality/README.md for what is measured and why."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict

import torch

import loraport
from loraport import gate, pipeline

from . import experiment as E
from . import report

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one seed, tiny model, no sweeps (seconds to a minute)")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, or 1 with --quick)")
    ap.add_argument("--out", help="folder for results.md, results.json and the PNGs (default: this folder; "
                    "with --quick, its quick/ subfolder)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    ap.add_argument("--render", action="store_true", help="no run: rewrite results.md and the PNGs from results.json")
    args = ap.parse_args(argv)
    if args.render:
        return _render(args.out or HERE)
    torch.set_num_threads(args.threads)
    setup = E.QUICK if args.quick else E.FULL
    seeds = range(args.seeds or (1 if args.quick else 3))

    t_wall, t_cpu = time.perf_counter(), time.process_time()
    results = []
    for seed in seeds:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            results.append(E.run_seed(setup, seed, folder, sweeps=not args.quick))
        print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    facts = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
        + " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "torch": torch.__version__,
        "threads": args.threads,
        "loraport defaults": dict(
            subspace_rank=f"the default gate: from the spectrum, at most min({gate.GATE_RANK}, width/4) = "
            f"{gate.gate_rank(setup.cfg.width, setup.cfg.width)}",
            min_similarity=pipeline.DEFAULT_MIN_SIMILARITY,
            variant=pipeline.VARIANTS[0],
        ),
        "setup": asdict(setup),
        "seconds_wall": round(time.perf_counter() - t_wall),
        "seconds_cpu": round(time.process_time() - t_cpu),
        "loraport": loraport.__version__,
    }
    text = report.markdown(results, facts, setup)
    print(text)
    out = args.out or (os.path.join(HERE, "quick") if args.quick else HERE)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(_rounded({"facts": facts, "seeds": [asdict(r) for r in results]}), f, separators=(",", ":"))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    _write_plots(results, setup, out, "results.md, results.json")
    return 0


def _write_plots(results, setup, folder: str, also: str) -> None:
    """The PNGs, or one line saying why not: the tables are the result, the plots a view of them."""
    try:
        paths = report.plots(results, setup, folder)
    except ModuleNotFoundError as missing:
        if missing.name != "matplotlib" and not str(missing.name).startswith("matplotlib."):
            raise
        print(f"no plots: matplotlib is not installed (pip install 'loraport[bench]'); wrote {also} in {folder}")
        return
    print("wrote", ", ".join(paths), f"and {also} in", folder)


def _rounded(obj):
    """``obj`` with every float rounded to 6 decimals (accuracies are multiples of 1/3072)."""
    if isinstance(obj, float):
        return round(obj, 6)
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v) for v in obj]
    return obj


def _render(folder: str) -> int:
    with open(os.path.join(folder, "results.json")) as f:
        doc = json.load(f)
    facts = doc["facts"]
    setup = E.Setup(**{**facts["setup"], "cfg": E.M.Config(**facts["setup"]["cfg"])})
    results = [E.SeedResult(**r) for r in doc["seeds"]]
    with open(os.path.join(folder, "results.md"), "w") as f:
        f.write(report.markdown(results, facts, setup))
    _write_plots(results, setup, folder, "results.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
