"""The 13B streaming benchmark: port a rank-32 Musubi-style LoRA across a Hunyuan-Video-shaped model
pair at full layer shapes, from disk, and compare with the time it takes to just read the files.

    python -m benchmarks.port_stream                       # 20 double + 40 single blocks, ~50 GB on disk
    python -m benchmarks.port_stream --blocks-double 2 --blocks-single 4    # minutes, a few GB
    python -m benchmarks.port_stream --dir D --keep --markdown benchmarks/runs/YYYY-MM-DD-port-stream.md

Steps, each timed and reported:
  1. generate: the source and target bases (hidden 3072, the original Hunyuan Video key names of
     loraport.testing.tiny / archs, bf16) written one shard per block with a model.safetensors.index.json,
     so no model is ever held in memory; every 2-d weight is 0.02·(N + L) with N Gaussian noise and
     L a rank-64 component with decaying singular values well above the noise (a spectrum with a
     well-defined top subspace); the target is the source plus 5 % of a different noise and a
     different rank-64 component (a related release). Two rank-32 kohya LoRAs (alpha 16) on
     Musubi's 240 modules (double-block img/txt attn_qkv, attn_proj, mlp fc1/fc2; single-block
     linear1/linear2).
  2. I/O floors, after dropping the page cache when this process may (root:
     /proc/sys/vm/drop_caches; otherwise the table says "warm" and the number is a page-cache
     rate, not a disk rate): every byte of both bases once (sequential 64 MiB reads), and the
     bytes the port needs, the adapted weights of both bases, the same way (the cold floor the
     port is compared with: it never reads the modulations, embedders and norms). Measured again
     after the cold port: the shared disk's rate drifts by 2-3x within minutes (--repeat N adds
     N - 1 more alternating cold-floor / cold-port pairs at the end and reports the median ratio).
  3. port LoRA 1 with an empty subspace cache, in a fresh process with the environment the
     loraport CLI sets for itself (loraport.startup.CLI_ENVIRONMENT; peak RSS is VmHWM of that
     process, peak VRAM torch.cuda.max_memory_allocated), page cache dropped first;
  4. port LoRA 2 with the cache that run 3 filled (no base weight is read, no rSVD runs).
  5. warm page cache: the adapted weights read once (run 4 dropped the cache), then a fresh
     process that imports loraport and reads and sums every adapted weight of both bases
     (safetensors, bf16 -> float32 sum), then port LoRA 1 with an empty subspace cache, then the
     read-and-sum again, page cache not dropped; ratio = port / mean of the two read-and-sums.
     (Whether the pages were still cached shows in the read-and-sum's GB/s: the pair may not
     fit in this machine's page cache.)
The generated files are deleted at the end unless --keep."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time

import torch
from safetensors.torch import save_file

from loraport.startup import cli_child_environment
from loraport.testing import tiny

from .rsvd import machine_description

HIDDEN = 3072
CHUNK = 64 << 20  # read size of the I/O floor
MUSUBI = ("img_attn_qkv", "img_attn_proj", "img_mlp.fc1", "img_mlp.fc2")


def model_shapes(double: int, single: int) -> dict[str, tuple[int, ...]]:
    """{name: shape} of a Hunyuan Video transformer with ``double`` and ``single`` blocks at full
    width (the subset of tensors that tiny.shapes knows: every adapted weight, the modulations,
    norms, qkv biases and the Conv3d img_in with 16 input channels)."""
    every = tiny.shapes("hunyuan-video", width=HIDDEN, blocks=max(double, single), in_channels=16)
    keep = {}
    for name, shape in every.items():
        kind, _, rest = name.partition(".")
        index = int(rest.split(".")[0]) if kind in ("double_blocks", "single_blocks") else -1
        if index < (double if kind == "double_blocks" else single if kind == "single_blocks" else 1):
            keep[name] = shape
    return keep


def shard_of(name: str) -> str:
    kind, _, rest = name.partition(".")
    if kind in ("double_blocks", "single_blocks"):
        return f"{kind}-{int(rest.split('.')[0]):02d}.safetensors"
    return "rest.safetensors"


def lora_modules(shapes) -> list[str]:
    """Musubi's Hunyuan Video LoRA modules present in ``shapes`` (original names)."""
    names = [n[: -len(".weight")] for n in shapes if n.endswith(".weight")]
    sides = [m.replace("img", side) for m in MUSUBI for side in ("img", "txt")]
    return [n for n in names if any(n.endswith("." + s) for s in sides) or n.endswith((".linear1", ".linear2"))]


def structured(shape, g: torch.Generator) -> torch.Tensor:
    """0.02·(N + L) in float32 (see the module docstring); 1-d tensors are plain noise."""
    if len(shape) == 1:
        return 0.02 * torch.randn(shape, generator=g)
    m, n = shape[0], int(torch.tensor(shape[1:]).prod())
    r = min(64, m, n)
    scale = 4.0 * (m**0.5 + n**0.5) * 0.93 ** torch.arange(r)  # top singular values of L, over the noise edge
    left = torch.randn(m, r, generator=g) * (scale / m**0.5)  # [m, r]
    right = torch.randn(r, n, generator=g) / n**0.5  # [r, n]
    w = torch.randn(m, n, generator=g)
    w.addmm_(left, right)
    return w.mul_(0.02).reshape(shape)


def generate(folder: str, double: int, single: int, seed: int = 0) -> dict:
    """Write source/, target/ (sharded safetensors) and lora1/2.safetensors into ``folder``."""
    shapes = model_shapes(double, single)
    marker = os.path.join(folder, "bench.json")
    config = {"double": double, "single": single, "seed": seed, "hidden": HIDDEN}
    if os.path.exists(marker) and json.load(open(marker)) == config:
        print(f"reusing the generated models in {folder}", flush=True)
        return {"seconds": None, "bytes": None}
    shutil.rmtree(folder, ignore_errors=True)
    need = 2 * sum(2 * int(torch.tensor(s).prod()) for s in shapes.values())
    os.makedirs(folder)
    free = shutil.disk_usage(folder).free
    if free < need * 1.1 + (2 << 30):
        raise SystemExit(f"port_stream: {folder} has {free / 1e9:.1f} GB free, the pair needs {need / 1e9:.1f} GB")
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    shards: dict[str, list[str]] = {}
    for name in shapes:
        shards.setdefault(shard_of(name), []).append(name)
    for side in ("source", "target"):
        os.makedirs(os.path.join(folder, side))
    for i, (shard, names) in enumerate(shards.items()):
        src, tgt = {}, {}
        for name in names:
            w = structured(shapes[name], g)  # float32
            src[name] = w.to(torch.bfloat16)
            if w.dim() > 1:  # + 5 % of the source with its rows rolled and 5 % of a new rank-64 component
                m, n = w.shape[0], w[0].numel()
                r = min(64, m, n)
                flat = w.view(m, n)
                flat.add_(torch.roll(flat, 1, 0), alpha=0.05)
                left = torch.randn(m, r, generator=g) * (0.05 * 0.02 * 4.0 * (m**0.5 + n**0.5) / m**0.5)
                flat.addmm_(left, torch.randn(r, n, generator=g) / n**0.5)
            else:
                w.add_(torch.randn(w.shape, generator=g), alpha=0.05 * 0.02)
            tgt[name] = w.to(torch.bfloat16)
            del w
        save_file(src, os.path.join(folder, "source", shard))
        save_file(tgt, os.path.join(folder, "target", shard))
        del src, tgt
        print(f"  generated shard {i + 1}/{len(shards)} ({shard}) at {time.perf_counter() - t0:.0f} s", flush=True)
    index = {"metadata": {}, "weight_map": {n: s for s, ns in shards.items() for n in ns}}
    for side in ("source", "target"):
        with open(os.path.join(folder, side, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f)
    meta_shapes = {n: torch.empty(s, device="meta") for n, s in shapes.items()}
    for i in (1, 2):
        sd = tiny.lora("hunyuan-video", meta_shapes, fmt="kohya", rank=32, alpha=16.0, modules=lora_modules(shapes),
                       seed=100 + i, dtype=torch.bfloat16)  # fmt: skip
        meta = {"ss_network_dim": "32", "ss_network_alpha": "16", "ss_network_module": "networks.lora"}
        save_file(sd, os.path.join(folder, f"lora{i}.safetensors"), metadata=meta)
    with open(marker, "w") as f:
        json.dump(config, f)
    return {"seconds": time.perf_counter() - t0, "bytes": need}


def drop_page_cache() -> bool:
    """True when the page cache could be dropped (needs root)."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _shards(folder: str) -> list[str]:
    return sorted(
        os.path.join(folder, side, f)
        for side in ("source", "target")
        for f in os.listdir(os.path.join(folder, side))
        if f.endswith(".safetensors")
    )


def _adapted_ranges(path: str, names: set) -> list[tuple[int, int]]:
    """[(file offset, length)] of the tensors ``names`` in one safetensors file, in file order."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    ranges = [(8 + length + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
              for k, v in header.items() if k in names]  # fmt: skip
    return sorted(ranges)


def read_floor(folder: str, adapted_only: bool = False, drop: bool = True) -> dict:
    """Seconds to read every byte of both bases once (or, with ``adapted_only``, the bytes of the
    weights the LoRA adapts), sequentially in 64 MiB reads, after dropping the page cache."""
    cold = drop_page_cache() if drop else False
    names = {n + ".weight" for n in lora_modules(_names(folder))}
    buf = bytearray(CHUNK)
    total, t0 = 0, time.perf_counter()
    for path in _shards(folder):
        with open(path, "rb", buffering=0) as f:
            if not adapted_only:
                while n := f.readinto(buf):
                    total += n
                continue
            for offset, size in _adapted_ranges(path, names):
                f.seek(offset)
                while size > 0:
                    n = f.readinto(memoryview(buf)[: min(size, CHUNK)])
                    total, size = total + n, size - n
    return {"seconds": time.perf_counter() - t0, "bytes": total, "cold": cold}


def _names(folder: str) -> dict:
    """{name: shape} of the generated pair in ``folder``."""
    config = json.load(open(os.path.join(folder, "bench.json")))
    return model_shapes(config["double"], config["single"])


def read_and_sum_child(folder: str) -> None:
    """Run in a fresh process: import loraport, read every adapted weight of both bases with
    safetensors and sum it in float32; prints a JSON line with the seconds and bytes."""
    from safetensors import safe_open

    import loraport  # noqa: F401  (the same imports a port has)

    names = {n + ".weight" for n in lora_modules(_names(folder))}
    t0, total, checksum = time.perf_counter(), 0, 0.0
    for path in _shards(folder):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                if name in names:
                    t = f.get_tensor(name)
                    checksum += float(t.float().sum())
                    total += t.numel() * t.element_size()
    print(json.dumps({"seconds": time.perf_counter() - t0, "bytes": total, "checksum": checksum}))


def read_and_sum(folder: str) -> dict:
    env = cli_child_environment()  # the port's peer runs as the port does
    res = subprocess.run([sys.executable, "-m", "benchmarks.port_stream", "--read-and-sum", folder],
                         stdout=subprocess.PIPE, text=True, check=True, env=env)  # fmt: skip
    return json.loads(res.stdout.strip().splitlines()[-1])


def port_child(args_json: str) -> None:
    """Run in a fresh process: one port, then a JSON line with the report's numbers, VmHWM and VRAM."""
    import loraport

    a = json.loads(args_json)
    t0 = time.perf_counter()
    rep = loraport.port(a["lora"], a["source"], a["target"], a["out"], device=a["device"], cache_dir=a["cache"] or None,
                        max_memory=a["max_vram"], subspace_rank=a["subspace_rank"], variant=a["variant"])  # fmt: skip
    wall = time.perf_counter() - t0
    print(rep.table(), file=sys.stderr, flush=True)
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    vram = torch.cuda.max_memory_allocated() if a["device"].startswith("cuda") else None
    s = rep.summary()
    print(json.dumps({"wall": wall, "seconds": rep.seconds, "bytes_read": rep.bytes_read, "peak_rss": hwm,
                      "peak_vram": vram, "actions": s["actions"], "layers_from_cache": s["layers_from_cache"],
                      "similarity_median": s["similarity_median"], "borderline": len(s["borderline"]),
                      "margin_min": min((abs(r.margin) for r in rep.rows if r.margin is not None), default=None),
                      "gate_products": sorted({r.gate_products for r in rep.rows if r.gate_products is not None})}))  # fmt: skip


def run_port(folder: str, lora: int, args, *, drop: bool = True, cache: bool = True) -> dict:
    cold = drop_page_cache() if drop else False
    spec = {
        "lora": os.path.join(folder, f"lora{lora}.safetensors"), "source": os.path.join(folder, "source"),
        "target": os.path.join(folder, "target"), "out": os.path.join(folder, f"ported{lora}.safetensors"),
        "cache": os.path.join(folder, "cache") if cache else "", "device": args.device, "max_vram": args.max_vram,
        "subspace_rank": args.subspace_rank, "variant": args.variant,
    }  # fmt: skip
    env = cli_child_environment()
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.port_stream", "--child", json.dumps(spec)],
        stdout=subprocess.PIPE, text=True, check=True, env=env,
    )  # fmt: skip
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["cold"] = cold
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks-double", type=int, default=20)
    p.add_argument("--blocks-single", type=int, default=40)
    p.add_argument("--dir", default="/work/bench-tmp/port_stream", help="where the model pair is generated")
    p.add_argument("--keep", action="store_true", help="keep the generated files (a rerun reuses them)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-vram", default="2GB")
    p.add_argument("--subspace-rank", type=int, default=None, help="default: loraport's (the default gate for copy)")
    p.add_argument("--variant", default="copy", help="port variant (default copy, loraport's; runs recorded before "
                   "2026-12-04 used target, the projection, at --subspace-rank 64)")  # fmt: skip
    p.add_argument("--no-warm", action="store_true", help="skip step 5 (the warm-page-cache ratio)")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="N - 1 more (cold floor, cold port) pairs after step 5, alternating, for the median ratio "
                        "(the shared disk's rate drifts between runs)")  # fmt: skip
    p.add_argument("--markdown", help="also append the table to this file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--read-and-sum", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return port_child(args.child)
    if args.read_and_sum:
        return read_and_sum_child(args.read_and_sum)

    folder = os.path.abspath(args.dir)
    shutil.rmtree(os.path.join(folder, "cache"), ignore_errors=True)
    try:
        gen = generate(folder, args.blocks_double, args.blocks_single)
        whole = read_floor(folder)
        print(f"I/O floor, both bases: {whole['bytes'] / 1e9:.1f} GB in {whole['seconds']:.1f} s", flush=True)
        floor = read_floor(folder, adapted_only=True)
        print(f"I/O floor, adapted weights: {floor['bytes'] / 1e9:.1f} GB in {floor['seconds']:.1f} s", flush=True)
        first = run_port(folder, 1, args)
        print(f"port LoRA 1: {first['wall']:.1f} s", flush=True)
        floor_after = read_floor(folder, adapted_only=True)
        print(f"I/O floor again: {floor_after['seconds']:.1f} s", flush=True)
        second = run_port(folder, 2, args)
        warm = None
        if not args.no_warm:
            read_floor(folder, adapted_only=True, drop=False)  # into the page cache, which port LoRA 2 dropped
            sums = [read_and_sum(folder)]
            port_warm = run_port(folder, 1, args, drop=False, cache=False)
            sums.append(read_and_sum(folder))
            warm = (sums, port_warm)
            print(f"warm: read-and-sum {sums[0]['seconds']:.1f} / {sums[1]['seconds']:.1f} s, port {port_warm['wall']:.1f} s",
                  flush=True)  # fmt: skip
        pairs = [(floor, first)]
        for _ in range(args.repeat - 1):
            f = read_floor(folder, adapted_only=True)
            r = run_port(folder, 1, args, cache=False)
            pairs.append((f, r))
            print(f"again: cold floor {f['seconds']:.1f} s, cold port {r['wall']:.1f} s", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)

    gb = lambda b: f"{b / 1e9:.2f}"  # noqa: E731
    state = lambda cold: "cold (page cache dropped)" if cold else "warm (page cache not dropped)"  # noqa: E731
    lines = [
        f"\n## port_stream: Hunyuan Video shapes, {args.blocks_double} double + {args.blocks_single} single blocks, "
        f"bf16, rank-32 LoRA on {len(lora_modules(model_shapes(args.blocks_double, args.blocks_single)))} modules "
        f"(Musubi's layout), subspace rank {args.subspace_rank}, --max-vram {args.max_vram}, "
        f"device {args.device}",
        f"({machine_description(args.device)})",
        "",
        "| step | wall (s) | GB | GB/s | read / svd / project / write / cache (s) | peak RSS (GB) | peak VRAM (GB) | ×floor | notes |",
        "|---|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    if gen["seconds"] is not None:
        lines.append(f"| generate both bases + LoRAs | {gen['seconds']:.0f} | {gb(gen['bytes'])} | "
                     f"{gen['bytes'] / gen['seconds'] / 1e9:.2f} | | | | | written, not counted below |")  # fmt: skip
    lines.append(f"| I/O floor: read both bases once | {whole['seconds']:.1f} | {gb(whole['bytes'])} | "
                 f"{whole['bytes'] / whole['seconds'] / 1e9:.2f} | | | | {whole['seconds'] / floor['seconds']:.2f} | "
                 f"{state(whole['cold'])} |")  # fmt: skip
    for label, f in (("**cold floor**: read the adapted weights of both bases", floor), ("the same after port LoRA 1", floor_after)):
        lines.append(f"| {label} | {f['seconds']:.1f} | {gb(f['bytes'])} | {f['bytes'] / f['seconds'] / 1e9:.2f} | | | | "
                     f"{f['seconds'] / floor['seconds']:.2f} | {state(f['cold'])} |")  # fmt: skip
    runs = [("port LoRA 1, empty cache", first), ("port LoRA 2, warm cache", second)]
    if warm is not None:
        sums, port_warm = warm
        for i, r in enumerate(sums):
            lines.append(f"| read-and-sum of the adapted weights ({'before' if i == 0 else 'after'} the warm port) | "
                         f"{r['seconds']:.1f} | {gb(r['bytes'])} | {r['bytes'] / r['seconds'] / 1e9:.2f} | | | | "
                         f"{r['seconds'] / floor['seconds']:.2f} | fresh process, page cache not dropped |")  # fmt: skip
        runs.append(("port LoRA 1 again, empty subspace cache, page cache not dropped", port_warm))
    for label, r in runs:
        s = r["seconds"]
        split = " / ".join(f"{s[k]:.1f}" for k in ("read", "svd", "project", "write", "cache"))
        vram = "-" if r["peak_vram"] is None else f"{r['peak_vram'] / 1e9:.2f}"
        rate = f"{r['bytes_read'] / r['wall'] / 1e9:.2f}" if r["bytes_read"] else "-"
        acts = ", ".join(f"{n} {a}" for a, n in r["actions"].items())
        lines.append(
            f"| {label} | {r['wall']:.1f} | {gb(r['bytes_read'])} | {rate} | {split} | {r['peak_rss'] / 1e9:.2f} | "
            f"{vram} | {r['wall'] / floor['seconds']:.2f} | {acts}; {r['layers_from_cache']} layers from cache; "
            f"median similarity {r['similarity_median']:.3f}; {r['borderline']} borderline; smallest |margin| "
            f"{r['margin_min']:.3f}; gate products {r['gate_products']}; {state(r['cold'])} |"
        )
    lines.append("")
    lines.append(f"- port LoRA 1 (empty cache, cold) / cold floor (adapted weights, before the port): "
                 f"**{first['wall'] / floor['seconds']:.2f}x** (against the floor measured after it: "
                 f"{first['wall'] / floor_after['seconds']:.2f}x; against reading both whole bases: "
                 f"{first['wall'] / whole['seconds']:.2f}x)")  # fmt: skip
    if len(pairs) > 1:
        ratios = sorted(r["wall"] / f["seconds"] for f, r in pairs)
        each = ", ".join(f"{r['wall']:.1f} / {f['seconds']:.1f} s" for f, r in pairs)
        lines.append(f"- cold port / the cold floor just before it, {len(pairs)} alternating pairs ({each}): median "
                     f"**{ratios[len(ratios) // 2]:.2f}x** (range {ratios[0]:.2f}-{ratios[-1]:.2f})")  # fmt: skip
    if warm is not None:
        sums, port_warm = warm
        mean = sum(r["seconds"] for r in sums) / len(sums)
        lines.append(f"- warm page cache: port / read-and-sum (mean of the two) = **{port_warm['wall'] / mean:.2f}x** "
                     f"(against the faster one alone: {port_warm['wall'] / min(r['seconds'] for r in sums):.2f}x)")  # fmt: skip
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
