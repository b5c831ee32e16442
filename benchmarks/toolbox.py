"""Benchmark runner for `loraport resize` and `loraport extract` against the public tools' method,
measured in the same run on the same files:
  * "dense full SVD": form the dense ΔW per layer and run torch.linalg.svd on it (what kohya
    sd-scripts' resize_lora.py and extract_lora_from_models.py do; here with
    full_matrices=False, which is faster than their default, so the comparison favours them);
  * "dense svd_lowrank": the dense ΔW per layer through torch.svd_lowrank (q = rank + 8, niter 2;
    newer sd-scripts resize);
  * "loraport": loraport.resize (QR of the factors + core SVD, batched) and loraport.extract
    (streamed, batched loraport.rsvd, block Krylov, q = 2), end to end including reading and writing.

Jobs: (1) resize a Hunyuan-Video-shaped rank-128 kohya LoRA to rank 32; (2) extract a rank-64 LoRA
from a Hunyuan-shaped base / fine-tune pair (bf16 safetensors; ΔW = 5 % of ‖W‖ with a slowly
decaying spectrum, columns scaled by j^-1/2 in random order); (3) convert LoHa and LoKr files to a
rank-32 LoRA, one job per variant (``--jobs convert``: all of them; LoHa rank 8 and 16, LoKr
factor 8 and 16 with a full lokr_w2 or lokr_w2_a/b; benchmarks/convert.py). All over ``--blocks``
double and single blocks of Musubi's Hunyuan LoRA layers, ``--shapes hunyuan`` (the default: full
shapes, 3072 wide) or ``small`` (768 wide; ``--quick`` is the same): double-block img/txt attn qkv
[9216, 3072], proj [3072, 3072], mlp fc1 [12288, 3072], fc2 [3072, 12288]; single-block linear1
[21504, 3072], linear2 [3072, 15360].

The dense full SVD takes tens of seconds per layer on a small CPU, so it runs on the first
``--dense-layers`` layers of each type only; for resize and extract it also gives the exact
singular values, hence the optimal error (Eckart–Young) that every method's error is divided by,
on those layers. The convert jobs take the optimal error from the exact singular values of the
structure instead (benchmarks/convert.py), and time the dense full SVD, whose cost depends on the
shapes, on the first convert variant only (``--dense-svd all``: on every variant). Per-type
times are per layer (the decomposition, with forming ΔW for the dense methods; loraport: its
layer's share of the batched call). Totals: measured wall time for the --blocks model where a
method ran on every layer, else per-layer times x layer counts ("extrapolated"); and for the full
Hunyuan Video set (20 double + 40 single blocks, 240 layers) from the per-type times. Peak
memory: VmHWM of a fresh subprocess per method (includes torch itself, shown as the baseline).

    python -m benchmarks.toolbox                                  # full shapes, every job, 1 block each
    python -m benchmarks.toolbox --quick                          # 768 wide, every job
    python -m benchmarks.toolbox --jobs convert --shapes hunyuan  # the conversion at full shapes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

import loraport
from loraport import archs, formats
from loraport.basemodel import BaseModel

from . import convert as convert_bench
from .rsvd import machine_description, markdown_tee

TYPES = ("qkv", "proj", "fc1", "fc2", "linear1", "linear2")
FULL_COUNTS = {t: 40 for t in TYPES}  # Hunyuan Video: 20 double blocks x img/txt, 40 single blocks
METHODS = ("loraport", "dense full SVD", "dense svd_lowrank")
CONVERT_JOBS = tuple(f"convert-{v}" for v in convert_bench.VARIANTS)  # benchmarks/convert.py
JOBS = ("resize", "extract", *CONVERT_JOBS)
WIDTHS = {"hunyuan": 3072, "small": 768}
OVERSAMPLE = 8


def layers(width: int, blocks: int) -> list[tuple[str, str, tuple[int, int]]]:
    """(module name, type, [out, in]) of Musubi's Hunyuan LoRA set for ``blocks`` blocks."""
    w = width
    shape = {"qkv": (3 * w, w), "proj": (w, w), "fc1": (4 * w, w), "fc2": (w, 4 * w), "linear1": (7 * w, w),
             "linear2": (w, 5 * w)}  # fmt: skip
    out = []
    for i in range(blocks):
        for side in ("img", "txt"):
            for t, leaf in (("qkv", "attn_qkv"), ("proj", "attn_proj"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
                out.append((f"double_blocks.{i}.{side}_{leaf}", t, shape[t]))
    for i in range(blocks):
        out += [(f"single_blocks.{i}.linear1", "linear1", shape["linear1"])]
        out += [(f"single_blocks.{i}.linear2", "linear2", shape["linear2"])]
    return out


def checked(layer_list, per_type: int) -> set[str]:
    """The first ``per_type`` layers of each type: where the dense full SVD runs."""
    seen: dict[str, int] = {}
    names = set()
    for name, t, _ in layer_list:
        if seen.get(t, 0) < per_type:
            seen[t] = seen.get(t, 0) + 1
            names.add(name)
    return names


def make_inputs(folder: str, width: int, blocks: int, lora_rank: int) -> dict[str, str]:
    """lora.safetensors (kohya, bf16, rank ``lora_rank``, alpha rank/2), base.safetensors and
    tuned.safetensors (bf16)."""
    g = torch.Generator().manual_seed(0)
    mods, base, tuned = [], {}, {}
    decay = torch.arange(1, lora_rank + 1, dtype=torch.float32) ** -0.5  # a trained LoRA's spectrum decays
    for name, _, (m, n) in layers(width, blocks):
        up = torch.randn(m, lora_rank, generator=g) * decay  # [m, r]
        down = torch.randn(lora_rank, n, generator=g) / n**0.5  # [r, n]
        mods.append(formats.LoraModule("model", name, up.bfloat16(), down.bfloat16(), lora_rank / 2, name))
        w = torch.randn(m, n, generator=g) * 0.02  # [m, n]
        scale = torch.arange(1, n + 1, dtype=torch.float32) ** -0.5
        diff = torch.randn(m, n, generator=g) * scale[torch.randperm(n, generator=g)]
        diff *= 0.05 * w.norm() / diff.norm()
        base[name + ".weight"], tuned[name + ".weight"] = w.bfloat16(), (w + diff).bfloat16()
        del w, diff
    paths = {k: os.path.join(folder, f"{k}.safetensors") for k in ("lora", "base", "tuned")}
    meta = {"ss_network_dim": str(lora_rank), "ss_network_alpha": str(lora_rank / 2)}
    lf = formats.LoraFile(mods, "kohya", archs.get("hunyuan-video"), "original", meta)
    formats.write_lora(lf, paths["lora"])
    from safetensors.torch import save_file

    save_file(base, paths["base"])
    save_file(tuned, paths["tuned"])
    return paths


def vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def frob_error(target: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    """‖target − up @ down‖_F (float32 products, float64 norm)."""
    return float(torch.linalg.vector_norm(target - up.float() @ down.float(), dtype=torch.float64))


def worker(args) -> dict:
    """One method on one job, in this (fresh) process: per-layer times and errors, wall time,
    peak memory."""
    baseline = vm_kib("VmRSS")
    paths = json.loads(args.paths)
    layer_list = layers(args.width, args.blocks)
    kinds = {name: t for name, t, _ in layer_list}
    dense_names = checked(layer_list, args.dense_layers)
    rank = args.rank
    times: dict[str, float] = {}
    errors: dict[str, float] = {}
    optimal: dict[str, float] = {}
    kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # output factors of the checked layers
    wall = None
    if args.job.startswith("convert"):
        r = convert_bench.worker(args, paths, layer_list, dense_names, OVERSAMPLE)
        times, wall = r["times"], r["wall"]
        peak = vm_kib("VmHWM")  # before the error evaluation below
        for name, (new_up, new_down) in r["kept"].items():
            errors[name] = frob_error(convert_bench.dense_delta(r["lora_in"][name]), new_up, new_down)
        optimal = convert_bench.optimal_errors(r["lora_in"], dense_names, rank)
    elif args.job == "resize":
        if args.method == "loraport":
            start = time.perf_counter()
            rep = loraport.resize(paths["lora"], os.path.join(args.dir, "out.safetensors"), rank=rank, quiet=True)
            wall = time.perf_counter() - start
            times = {r.module: r.seconds for r in rep.rows}
            got = {m.name: m for m in formats.read_lora(os.path.join(args.dir, "out.safetensors")).modules}
        lora_in = {m.name: m for m in formats.read_lora(paths["lora"]).modules}
        start = time.perf_counter()
        for name, _, _ in layer_list:
            if args.method == "dense full SVD" and name not in dense_names:
                continue
            up, down = lora_in[name].factors()  # [m, r], [r, n] float32, alpha folded
            t0 = time.perf_counter()
            if args.method == "dense full SVD":
                delta = up @ down  # [m, n]
                U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
                new_up, new_down = U[:, :rank] * S[:rank], Vh[:rank]
                optimal[name] = float(S[rank:].double().square().sum().sqrt())
            elif args.method == "dense svd_lowrank":
                delta = up @ down
                U, S, V = torch.svd_lowrank(delta, q=rank + OVERSAMPLE, niter=2)
                new_up, new_down = U[:, :rank] * S[:rank], V[:, :rank].mT
            else:
                new_up, new_down = got[name].factors()
            if args.method != "loraport":
                times[name] = time.perf_counter() - t0
            if name in dense_names:
                kept[name] = (new_up, new_down)
        if args.method == "dense svd_lowrank":
            wall = time.perf_counter() - start
        peak = vm_kib("VmHWM")  # before the error evaluation below
        for name, (new_up, new_down) in kept.items():
            up, down = lora_in[name].factors()
            errors[name] = frob_error(up @ down, new_up, new_down)
    else:
        if args.method == "loraport":
            start = time.perf_counter()
            rep = loraport.extract(paths["base"], paths["tuned"], os.path.join(args.dir, "out.safetensors"),
                                   rank=rank, quiet=True)  # fmt: skip
            wall = time.perf_counter() - start
            times = {r.module: r.seconds for r in rep.rows}
            got = {m.name: m for m in formats.read_lora(os.path.join(args.dir, "out.safetensors")).modules}
        base, tuned = BaseModel(paths["base"]), BaseModel(paths["tuned"])
        start = time.perf_counter()
        for name, _, _ in layer_list:
            if args.method != "dense svd_lowrank" and name not in dense_names:
                continue
            if args.method == "loraport":
                kept[name] = got[name].factors()
                continue
            t_read = time.perf_counter()
            w_base = base.read("model", name + ".weight").float()
            delta = tuned.read("model", name + ".weight").float() - w_base  # [m, n]
            del w_base
            t0 = time.perf_counter()
            if args.method == "dense full SVD":
                U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
                new_up, new_down = U[:, :rank] * S[:rank], Vh[:rank]
                optimal[name] = float(S[rank:].double().square().sum().sqrt())
            elif args.method == "dense svd_lowrank":
                U, S, V = torch.svd_lowrank(delta, q=rank + OVERSAMPLE, niter=2)
                new_up, new_down = U[:, :rank] * S[:rank], V[:, :rank].mT
            times[name] = time.perf_counter() - t0
            times[name + "+read"] = time.perf_counter() - t_read
            if name in dense_names:
                kept[name] = (new_up, new_down)
            del delta
        if args.method == "dense svd_lowrank":
            wall = time.perf_counter() - start
        peak = vm_kib("VmHWM")  # before the error evaluation below
        for name, (new_up, new_down) in kept.items():
            delta = tuned.read("model", name + ".weight").float() - base.read("model", name + ".weight").float()
            errors[name] = frob_error(delta, new_up, new_down)
    return dict(times=times, errors=errors, optimal=optimal, wall=wall, kinds=kinds,
                peak_kib=peak, baseline_kib=baseline)  # fmt: skip


def run_method(args, job: str, method: str, paths: dict, folder: str) -> dict:
    rank = {"resize": args.resize_rank, "extract": args.extract_rank}.get(job, args.convert_rank)
    cmd = [sys.executable, "-m", "benchmarks.toolbox", "--worker", job, method, "--dir", folder,
           "--paths", json.dumps(paths), "--width", str(args.width), "--blocks", str(args.blocks),
           "--rank", str(rank),
           "--dense-layers", str(args.dense_layers)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{job} / {method} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def report(args, job: str, results: dict[str, dict], writer) -> dict:
    """Print the job's tables; returns {method: (full-Hunyuan seconds, (mean, max) error / optimal or None)}."""
    layer_list = layers(args.width, args.blocks)
    counts = {t: sum(1 for _, k, _ in layer_list if k == t) for t in TYPES}
    optimal = next((r["optimal"] for r in results.values() if r["optimal"] and not r.get("timed_on")), {})
    per_type: dict[str, dict[str, float]] = {}
    total_blocks: dict[str, tuple[float, str]] = {}
    for method, r in results.items():
        kinds, times = r["kinds"], r["times"]
        per_type[method] = {}
        for t in TYPES:
            vals = [v for k, v in times.items() if not k.endswith("+read") and kinds[k] == t]
            per_type[method][t] = sum(vals) / len(vals)
        if r["wall"] is not None:
            total_blocks[method] = (r["wall"], "measured")
        else:  # per-layer times (extract: with reading and the difference) x layer counts
            key = "+read" if job == "extract" else ""
            mean = {t: [times[n + key] for n in times if not n.endswith("+read") and kinds[n] == t] for t in TYPES}
            total_blocks[method] = (sum(counts[t] * sum(v) / len(v) for t, v in mean.items()), "extrapolated")
    full = {m: sum(FULL_COUNTS[t] * per_type[m][t] for t in TYPES) for m in results}
    rank = {"resize": args.resize_rank, "extract": args.extract_rank}.get(job, args.convert_rank)
    if job.startswith("convert-"):
        title = f"convert a {convert_bench.describe(job.removeprefix('convert-'))} to a rank-{rank} LoRA"
    else:
        title = {"resize": f"resize a rank-{args.lora_rank} LoRA to rank {rank}",
                 "extract": f"extract a rank-{rank} LoRA from a base / fine-tune pair"}[job]  # fmt: skip
    writer(f"\n### {title}: {args.blocks} double + {args.blocks} single blocks at width {args.width} "
           f"({len(layer_list)} layers)")  # fmt: skip
    writer("\nper layer, seconds (the decomposition; dense methods include forming ΔW):\n")
    writer("| method | " + " | ".join(f"{t} {layers_shape(args.width, t)}" for t in TYPES) + " |")
    writer("|---|" + "---:|" * len(TYPES))
    for m in results:
        writer(f"| {m} | " + " | ".join(f"{per_type[m][t]:.3f}" for t in TYPES) + " |")
    writer("\n| method | total, these layers (s) | full Hunyuan, 240 layers (s, from per-type) | speed-up vs dense "
           "full SVD (full) | error / optimal (mean, max) | peak RSS MiB (torch baseline) |")  # fmt: skip
    writer("|---|---:|---:|---:|---:|---:|")
    summary = {}
    for m, r in results.items():
        ratios = [r["errors"][n] / optimal[n] for n in optimal if optimal[n] > 0 and n in r["errors"]]
        secs, how = total_blocks[m]
        speedup = f"{full['dense full SVD'] / full[m]:.1f}x" if "dense full SVD" in full else "-"
        error = f"{sum(ratios) / len(ratios):.5f}, {max(ratios):.5f}" if ratios else "-"
        stats = (sum(ratios) / len(ratios), max(ratios)) if ratios else None
        if r.get("timed_on"):  # the shared dense full SVD: optimal up to float32 rounding by construction
            error, stats, how = "1 (exact SVD)", None, f"{how}; timed on {r['timed_on']}"
        summary[m] = (full[m], stats)
        writer(
            f"| {m} | {secs:.2f} ({how}) | {full[m]:.1f} | {speedup} | {error} | "
            f"{r['peak_kib'] / 1024:.0f} ({r['baseline_kib'] / 1024:.0f}) |"
        )
    return summary


def convert_summary(args, summaries: dict[str, dict], writer) -> None:
    """One row per convert variant (full Hunyuan set, from per-type times), then one markdown line
    for a headline table."""
    if not summaries:
        return
    methods = [m for m in METHODS if all(m in s for s in summaries.values())]
    writer(f"\n### convert to a rank-{args.convert_rank} LoRA: full Hunyuan Video set (240 layers at width "
           f"{args.width}, seconds from the per-type times)\n")  # fmt: skip
    head = " | ".join(f"{m} s" for m in methods)
    writer(f"| variant | {head} | loraport speed-up vs each | error / optimal, max: "
           + " / ".join(m for m in methods if m != "dense full SVD") + " |")  # fmt: skip
    writer("|---|" + "---:|" * len(methods) + "---:|---:|")
    speedups, worst = {m: [] for m in methods}, {m: 0.0 for m in methods}
    for variant, s in summaries.items():
        secs = " | ".join(f"{s[m][0]:.1f}" for m in methods)
        ups = []
        for m in methods:
            if m != "loraport":
                speedups[m].append(s[m][0] / s["loraport"][0])
                ups.append(f"{speedups[m][-1]:.1f}x")
            if s[m][1] is not None:
                worst[m] = max(worst[m], s[m][1][1])
        errs = " / ".join(f"{s[m][1][1]:.5f}" if s[m][1] else "-" for m in methods if m != "dense full SVD")
        writer(f"| {convert_bench.describe(variant.removeprefix('convert-'))} | {secs} | {' / '.join(ups)} | {errs} |")
    parts = [f"{min(v):.1f}x-{max(v):.1f}x faster than {m}" for m, v in speedups.items() if m != "loraport" and v]
    writer(f"\n| LoHa / LoKr → LoRA at width {args.width} ({len(summaries)} variants) vs dense ΔW | "
           f"{', '.join(parts)}; error / optimal ≤ {worst.get('loraport', 0):.4f} "
           f"(svd_lowrank ≤ {worst.get('dense svd_lowrank', 0):.4f}) | `benchmarks/RESULTS.md` |")  # fmt: skip


def layers_shape(width: int, t: str) -> str:
    return "x".join(str(s) for s in next(sh for _, k, sh in layers(width, 1) if k == t))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", choices=tuple(WIDTHS), default="hunyuan",
                   help="hunyuan: full layer shapes (3072 wide); small: 768 wide")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="the same as --shapes small")
    p.add_argument("--blocks", type=int, default=1, help="double and single blocks each (default 1)")
    p.add_argument("--dense-layers", type=int, default=1, help="layers per type for the dense full SVD (default 1)")
    p.add_argument("--dense-svd", choices=("first", "all"), default="first",
                   help="convert: time the dense full SVD on the first variant only (its cost depends on the "
                   "shapes), or on all")  # fmt: skip
    p.add_argument("--jobs", nargs="*", default=list(JOBS), choices=(*JOBS, "convert"),
                   help="convert: every convert variant")  # fmt: skip
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS,
                   help="a subset (without the dense full SVD: no error / speed-up columns)")
    p.add_argument("--lora-rank", type=int, default=128)
    p.add_argument("--resize-rank", type=int, default=32)
    p.add_argument("--extract-rank", type=int, default=64)
    p.add_argument("--convert-rank", type=int, default=32)
    p.add_argument("--markdown", help="also append the tables to this file")
    p.add_argument("--worker", nargs=2, metavar=("JOB", "METHOD"), help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--paths", help=argparse.SUPPRESS)
    p.add_argument("--width", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.job, args.method = args.worker
        print(json.dumps(worker(args)))
        return
    args.width = args.width or WIDTHS["small" if args.quick else args.shapes]
    jobs = [j for job in args.jobs for j in (CONVERT_JOBS if job == "convert" else (job,))]
    variants = [j.removeprefix("convert-") for j in jobs if j.startswith("convert-")]
    with markdown_tee(args.markdown) as writer:
        writer(f"\n## toolbox benchmark ({machine_description('cpu')})")
        with contextlib.suppress(OSError):
            writer(f"load average at start: {' '.join(open('/proc/loadavg').read().split()[:3])}")
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="loraport-bench-") as folder:
            paths = {}
            if any(job in ("resize", "extract") for job in jobs):
                paths.update(make_inputs(folder, args.width, args.blocks, args.lora_rank))
            paths.update(convert_bench.make_inputs(folder, layers(args.width, args.blocks), variants))
            writer(f"inputs written in {time.perf_counter() - started:.0f} s")
            shared, summaries = None, {}
            for job in jobs:
                results = {}
                for m in args.methods:
                    if m == "dense full SVD" and job in CONVERT_JOBS and shared and args.dense_svd == "first":
                        results[m] = shared  # the same dense shapes: its time, not its error, carries over
                        continue
                    results[m] = run_method(args, job, m, paths, folder)
                    if m == "dense full SVD" and job in CONVERT_JOBS and shared is None:
                        shared = dict(results[m], timed_on=job.removeprefix("convert-"))
                summary = report(args, job, results, writer)
                if job in CONVERT_JOBS and "loraport" in summary:
                    summaries[job] = summary
            convert_summary(args, summaries, writer)
        writer(f"\nbenchmark wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
