"""The catalog benchmark: port many LoRAs across one Hunyuan-Video-shaped model pair with
`loraport.port_many`, on the embedded process pool and on a local Ray instance, with 1 and 2
workers, and project the measured costs onto a large cluster.

    python -m benchmarks.port_many                     # 50 LoRAs, quarter-size pair (5 double + 10 single blocks)
    python -m benchmarks.port_many --quick             # 6 LoRAs, 1 + 1 blocks: a minute or two
    python -m benchmarks.port_many --dir D --keep --markdown benchmarks/runs/YYYY-MM-DD-port-many.md

The pair comes from benchmarks.port_stream's generator (full width 3072, bf16, one shard per
block, the target a related release of the source). The LoRAs are kohya/Musubi-style on the
pair's Musubi modules, ranks spread evenly over 16..64, alpha = rank / 2. Each configuration
runs in a fresh process with an empty output folder and an empty subspace cache, so its time
is a whole catalog: start (Ray), plan (read and map every LoRA), phase 1 (every base subspace
once), phase 2 (every LoRA from the cache). Per configuration the table gives LoRAs per minute
end to end and in phase 2 alone (the rate once the cache exists), and scaling efficiency is
time(1 worker) / (2 × time(2 workers)). The projection for 10,000 LoRAs on 100 nodes is
arithmetic on the measured single-worker costs, with its assumptions printed beside it."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import torch
from safetensors.torch import save_file

from loraport.startup import cli_child_environment
from loraport.testing import tiny

from .port_stream import generate, lora_modules, model_shapes
from .rsvd import machine_description

CONFIGS = (("pool", 1), ("pool", 2), ("ray", 1), ("ray", 2))


def make_loras(folder: str, double: int, single: int, count: int) -> list[int]:
    """``count`` kohya LoRAs lora_NNN.safetensors in ``folder`` (kept when already there);
    returns their ranks."""
    shapes = model_shapes(double, single)
    meta_shapes = {n: torch.empty(s, device="meta") for n, s in shapes.items()}
    ranks = [16 + (48 * i) // max(1, count - 1) for i in range(count)]
    os.makedirs(folder, exist_ok=True)
    for i, rank in enumerate(ranks):
        path = os.path.join(folder, f"lora_{i:03d}.safetensors")
        if os.path.exists(path):
            continue
        sd = tiny.lora("hunyuan-video", meta_shapes, fmt="kohya", rank=rank, alpha=rank / 2, modules=lora_modules(shapes),
                       seed=1000 + i, dtype=torch.bfloat16)  # fmt: skip
        save_file(sd, path, metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(rank / 2)})
    return ranks


def child(spec_json: str) -> None:
    """In a fresh process: one port_many run, then a JSON line with its numbers."""
    import loraport

    s = json.loads(spec_json)
    rep = loraport.port_many([s["loras"]], s["source"], s["target"], s["out"], cache_dir=s["cache"], workers=s["workers"],
                             ray="local" if s["runner"] == "ray" else None, quiet=True, subspace_rank=s["subspace_rank"])  # fmt: skip
    print(rep.table(), file=sys.stderr, flush=True)
    tasks = [r["seconds"] for r in rep.rows if r["status"] == "ported"]
    print(json.dumps({"seconds": rep.seconds, "counts": rep.counts(), "task_seconds": tasks, "layers": rep.layers,
                      "subspaces": rep.subspaces_computed, "recomputed": sum(r.get("subspaces_computed", 0) for r in rep.rows),
                      "cache_bytes": sum(os.path.getsize(os.path.join(s["cache"], f)) for f in os.listdir(s["cache"]))}))  # fmt: skip


def run_config(folder: str, runner: str, workers: int, args) -> dict:
    out, cache = os.path.join(folder, "out"), os.path.join(folder, "cache")
    for d in (out, cache):
        shutil.rmtree(d, ignore_errors=True)
    spec = {"loras": os.path.join(folder, f"catalog-{args.loras}"), "source": os.path.join(folder, "source"),
            "target": os.path.join(folder, "target"), "out": out, "cache": cache, "workers": workers,
            "runner": runner, "subspace_rank": args.subspace_rank}  # fmt: skip
    env = cli_child_environment()
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "benchmarks.port_many", "--child", json.dumps(spec)],
                         stdout=subprocess.PIPE, text=True, check=True, env=env)  # fmt: skip
    result = json.loads(res.stdout.strip().splitlines()[-1])
    result["wall"] = time.perf_counter() - t0  # with the process's own start
    print(f"  {runner} x{workers}: {result['seconds']['total']:.0f} s", flush=True)
    return result


def projection(results: dict, loras: int, layers: int) -> list[str]:
    """10,000 LoRAs on 100 nodes from the single-worker costs of the process pool."""
    one = results.get(("pool", 1))
    two = results.get(("pool", 2))
    if one is None:
        return []
    per_lora = one["seconds"]["phase2"] / loras  # worker-seconds per LoRA, warm cache
    phase1 = one["seconds"]["phase1"]  # worker-seconds for the pair's subspaces
    eff = min(1.0, one["seconds"]["phase2"] / (2 * two["seconds"]["phase2"])) if two else 1.0  # no superlinear claims
    nodes, cores, catalog = 100, 2, 10_000
    workers = nodes * cores
    p1 = phase1 / min(workers, layers)  # phase 1 splits at most into one task per layer
    p2 = catalog * per_lora / (workers * eff)
    gb = one["cache_bytes"] / 1e9
    return [
        f"- Projection, 10,000 LoRAs on 100 nodes like this one (2 cores, 2 workers each, 200 workers), "
        f"from the pool's 1-worker costs above: phase 1 {phase1:.0f} worker-s / min(200, {layers} layers) = "
        f"{p1:.1f} s (the pair's layers are the most tasks it splits into); then each node fetches "
        f"the {gb:.2f} GB cache once (object store; {gb / 1.0:.1f} s at 1 GB/s); phase 2 10,000 x "
        f"{per_lora:.2f} s / (200 x {eff:.2f}, the two-worker phase-2 efficiency capped at 1) = {p2 / 60:.1f} min. Total about "
        f"{(p1 + gb + p2) / 60:.1f} min, {catalog / ((p1 + gb + p2) / 60):.0f} LoRAs/minute, against "
        f"{catalog * per_lora / 3600 + phase1 / 3600:.1f} h on one worker. Not measured: the driver's own "
        f"per-task overhead at that scale, network contention. A full-size Hunyuan pair with Musubi's "
        f"240 LoRA modules has {240 / layers:.0f}x these {layers} layers: phase 1 and each port cost about "
        f"that much more (phase 1 then splits into up to 240 tasks).",
    ]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loras", type=int, default=50)
    p.add_argument("--blocks-double", type=int, default=5)
    p.add_argument("--blocks-single", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="6 LoRAs on a 1 + 1 block pair (docs checks, CI)")
    p.add_argument("--configs", default="pool:1,pool:2,ray:1,ray:2", help="runner:workers,... (runner pool or ray)")
    p.add_argument("--subspace-rank", type=int, default=None, help="default: loraport's (the default gate)")
    p.add_argument("--dir", default="/work/bench-tmp/port_many", help="where the pair and the LoRAs are generated")
    p.add_argument("--keep", action="store_true", help="keep the generated files (a rerun reuses them)")
    p.add_argument("--markdown", help="also write the section to this file (a run log: benchmarks/runs/DATE-port-many.md; "
                   "an existing file gets it at the top, below its title)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child)
    if args.quick:
        args.loras, args.blocks_double, args.blocks_single = 6, 1, 1
    configs = [(c.split(":")[0], int(c.split(":")[1])) for c in args.configs.split(",")]

    folder = os.path.abspath(args.dir)
    results = {}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_start = os.getloadavg()[0]
    try:
        generate(folder, args.blocks_double, args.blocks_single)
        ranks = make_loras(os.path.join(folder, f"catalog-{args.loras}"), args.blocks_double, args.blocks_single, args.loras)
        for runner, workers in configs:
            results[runner, workers] = run_config(folder, runner, workers, args)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)

    load_end = os.getloadavg()[0]
    any_result = next(iter(results.values()))
    layers = any_result["layers"]
    lines = [
        f"## port_many: {args.loras} LoRAs (ranks {min(ranks)}-{max(ranks)}) x a Hunyuan-shaped pair, "
        f"{args.blocks_double} double + {args.blocks_single} single blocks ({started})",
        "",
        f"{machine_description('cpu')}; the machine was shared with other jobs (load average "
        f"{load_start:.1f} at the start, {load_end:.1f} at the end, on 2 cores): compare rows within this run only. "
        f"`python -m benchmarks.port_many --loras {args.loras} --blocks-double "
        f"{args.blocks_double} --blocks-single {args.blocks_single} --configs {args.configs}`; {layers} base layers, "
        f"subspace rank {args.subspace_rank}, variant copy (the default), each configuration a fresh process "
        f"with an empty cache; Ray is a local instance started by the run (its start is the 'start' column).",
        "",
        "| runner x workers | start (s) | plan (s) | phase 1 (s) | phase 2 (s) | total (s) | LoRAs/min end to end | "
        "LoRAs/min phase 2 | median task (s) | subspaces phase 1 / phase 2 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (runner, workers), r in results.items():
        s = r["seconds"]
        done = r["counts"]["ported"]
        lines.append(
            f"| {runner} x{workers} | {s.get('start', 0):.1f} | {s['plan']:.1f} | {s['phase1']:.1f} | {s['phase2']:.1f} | "
            f"{s['total']:.1f} | {60 * done / s['total']:.1f} | {60 * done / s['phase2']:.1f} | "
            f"{statistics.median(r['task_seconds']):.2f} | {r['subspaces']} / {r['recomputed']} |"
        )
    lines.append("")
    for runner in ("pool", "ray"):
        one, two = results.get((runner, 1)), results.get((runner, 2))
        if one and two:
            e1 = one["seconds"]["phase1"] / (2 * two["seconds"]["phase1"])
            e2 = one["seconds"]["phase2"] / (2 * two["seconds"]["phase2"])
            et = one["seconds"]["total"] / (2 * two["seconds"]["total"])
            lines.append(f"- Scaling 1 -> 2 workers, {runner}: phase 1 {e1:.2f}, phase 2 {e2:.2f}, end to end {et:.2f} "
                         "(time(1) / (2 x time(2)); 1.00 = perfect)")  # fmt: skip
    lines += projection(results, args.loras, layers)
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        old = open(args.markdown).read() if os.path.exists(args.markdown) else ""
        head, sep, rest = old.partition("\n## ")
        with open(args.markdown, "w") as f:
            f.write((head.rstrip("\n") + "\n\n" if head.strip() else "") + text + "\n" + ("\n## " + rest if sep else ""))


if __name__ == "__main__":
    main()
