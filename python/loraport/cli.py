"""The ``loraport`` command: ``loraport port LORA --source SRC --target TGT -o OUT [...]`` (a thin
shell over loraport.pipeline.port) and ``loraport inspect FILE`` (what a LoRA or base-model file is).
Bad input ends with exit status 2 and one line on stderr naming the file and tensor; no output
file is left behind."""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from . import archs, formats
from .basemodel import BaseModel
from .errors import InputError
from .pipeline import DEFAULT_MIN_SIMILARITY, DEFAULT_SUBSPACE_RANK, ON_DISSIMILAR, VARIANTS, port
from .toolbox import MERGE_MODES, extract, merge, resize


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="loraport",
        description="Port LoRA adapters across base-model releases (subspace similarity gate; copy or LoRA-X projection).",
    )
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("port", help="port a LoRA from a source base model to a target one")
    q.add_argument("lora", help="LoRA safetensors file")
    q.add_argument("--source", required=True, help="base model the LoRA was trained on (file, index.json or folder)")
    q.add_argument("--target", required=True, help="base model to port to")
    q.add_argument("-o", "--out", help="output LoRA path (required unless --dry-run)")
    q.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    q.add_argument(
        "--max-vram",
        default="2GB",
        help="bound on what one chunk of layers holds at once: weights, rsvd workspace, subspaces; "
        "VRAM with --device cuda, host memory on the CPU (default 2GB)",
    )
    q.add_argument("--cache-dir", help="subspace cache folder: a second LoRA for the same bases skips the SVDs")
    k = q.add_mutually_exclusive_group()
    k.add_argument(
        "--subspace-rank",
        type=int,
        help="singular vectors kept per base weight (default: for --variant copy the default gate's, from the "
        f"spectrum, at most min(16, a quarter of the shorter side); else min({DEFAULT_SUBSPACE_RANK}, a quarter))",
    )
    k.add_argument("--energy", type=float, help="keep the fewest singular vectors holding this fraction of ‖W‖² "
                   f"(at most min({DEFAULT_SUBSPACE_RANK}, a quarter of the weight's shorter side))")  # fmt: skip
    q.add_argument(
        "--min-similarity",
        type=float,
        default=DEFAULT_MIN_SIMILARITY,
        help=f"subspace similarity below which a layer is not ported (default {DEFAULT_MIN_SIMILARITY})",
    )
    q.add_argument("--on-dissimilar", choices=ON_DISSIMILAR, default="skip")
    q.add_argument("--rank", type=int, help="output rank (at most the input rank)")
    q.add_argument("--format", default="auto", choices=("auto", *formats.FORMATS))
    q.add_argument("--arch", default="auto", choices=("auto", *archs.ARCHS))
    q.add_argument(
        "--variant",
        default=VARIANTS[0],
        choices=VARIANTS,
        help="what a layer that passes the similarity gate gets: 'copy' (default) carries the LoRA over "
        "unchanged, the projections keep only its part in the target's subspaces (LoRA-X); "
        "the quality benchmark measured copy keeping the most, see README",
    )
    q.add_argument("--method", default="power", choices=("power", "krylov"))
    q.add_argument("--power-iters", type=int, default=2)
    q.add_argument(
        "--block-size",
        type=int,
        help="krylov only: width of each Krylov block (default subspace rank + oversample; "
        "e.g. 3/4 of the subspace rank with --power-iters 3, see benchmarks/RESULTS.md)",
    )
    q.add_argument("--report", help="write the per-layer JSON report here")
    q.add_argument("--dry-run", action="store_true", help="map and check every layer; compute and write nothing")
    q.add_argument("--quiet", action="store_true", help="no progress bar or summary")

    i = sub.add_parser("inspect", help="describe a LoRA or base-model file")
    i.add_argument("file")
    _toolbox_parsers(sub)
    return p


def _toolbox_parsers(sub) -> None:
    """resize, extract, merge (loraport.toolbox)."""

    def common(q, fmt_default="auto"):
        q.add_argument("-o", "--out", required=True, help="output LoRA path")
        q.add_argument("--format", default=fmt_default, choices=("auto", *formats.FORMATS))
        q.add_argument("--arch", default="auto", choices=("auto", *archs.ARCHS))
        q.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
        q.add_argument("--max-vram", default="2GB", help="bound on one batched layer group (default 2GB)")
        q.add_argument("--report", help="write the per-layer JSON report here")
        q.add_argument("--quiet", action="store_true", help="no progress bar or summary")

    def ranks(q, sv_ratio=True):
        q.add_argument("--rank", type=int, help="output rank (with --energy/--sv-ratio: the most per layer)")
        k = q.add_mutually_exclusive_group()
        k.add_argument("--energy", type=float, help="per layer, the fewest singular values holding this share of ‖ΔW‖²")
        if sv_ratio:
            k.add_argument("--sv-ratio", type=float, help="per layer, keep singular values >= the largest / X")

    r = sub.add_parser("resize", help="lower a LoRA's rank (Frobenius-optimal per layer)")
    r.add_argument("lora")
    ranks(r)
    common(r)
    e = sub.add_parser("extract", help="a LoRA from the difference of two checkpoints")
    e.add_argument("--base", required=True, help="the base model (file, index.json or folder)")
    e.add_argument("--tuned", required=True, help="the fine-tuned model")
    ranks(e, sv_ratio=False)
    e.add_argument("--include", help="regex: only modules whose name matches")
    e.add_argument("--exclude", help="regex: skip modules whose name matches")
    e.add_argument("--min-diff", type=float, default=0.0, help="skip layers with ‖ΔW‖/‖W‖ below this")
    e.add_argument("--no-conv", action="store_true", help="linear layers only")
    e.add_argument("--method", default="auto", choices=("auto", "power", "krylov"))
    e.add_argument("--power-iters", type=int, default=2)
    common(e, "kohya")
    m = sub.add_parser("merge", help="merge weighted LoRAs (A.safetensors:0.7 B.safetensors:0.5 ...) into one")
    m.add_argument("loras", nargs="+", help="LoRA files, each optionally :weight (default 1)")
    m.add_argument("--mode", default="svd", choices=MERGE_MODES, help="svd: best rank-R; concat: exact, ranks add")
    ranks(m)
    common(m)


def _toolbox(args) -> int:
    common = dict(format=args.format, arch=args.arch, device=args.device, max_memory=args.max_vram,
                  report=args.report, quiet=args.quiet)  # fmt: skip
    if args.command == "resize":
        rep = resize(args.lora, args.out, rank=args.rank, energy=args.energy, sv_ratio=args.sv_ratio, **common)
    elif args.command == "extract":
        rep = extract(
            args.base, args.tuned, args.out, rank=args.rank, energy=args.energy, conv=not args.no_conv,
            include=args.include, exclude=args.exclude, min_rel_diff=args.min_diff, method=args.method,
            power_iters=args.power_iters, **common,
        )  # fmt: skip
    else:
        rep = merge(args.loras, args.out, rank=args.rank, energy=args.energy, sv_ratio=args.sv_ratio,
                    mode=args.mode, **common)  # fmt: skip
    if not args.quiet:
        print(rep.table())
        print(f"wrote {rep.out} ({rep.format_out})")
    return 0


def _port(args) -> int:
    if args.out is None and not args.dry_run:
        raise InputError(f"{args.lora}: give -o OUT (or --dry-run)")
    rep = port(
        args.lora, args.source, args.target, args.out, device=args.device, subspace_rank=args.subspace_rank,
        energy=args.energy, min_similarity=args.min_similarity, on_dissimilar=args.on_dissimilar,
        rank=args.rank, format=args.format, arch=args.arch, variant=args.variant, power_iters=args.power_iters,
        method=args.method, block_size=args.block_size, max_memory=args.max_vram, cache_dir=args.cache_dir,
        report=args.report, dry_run=args.dry_run, quiet=args.quiet,
    )  # fmt: skip
    if not args.quiet:
        print(rep.table())
        if rep.out:
            print(f"wrote {rep.out} ({rep.format_out})")
    return 0


def _is_lora(path: str) -> bool:
    if not path.endswith(".safetensors"):
        return False
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
    except Exception:
        return False
    return any(k.endswith(suffix) for k in keys for suffix in (".lora_down.weight", ".lora_A.weight", ".alpha"))


def _inspect(args) -> int:
    path = args.file
    if _is_lora(path):
        lf = formats.read_lora(path)
        ranks = Counter(m.rank for m in lf.modules)
        alphas = Counter(m.alpha for m in lf.modules)
        dtypes = Counter(str(m.up.dtype).replace("torch.", "") for m in lf.modules)
        unknown = [m.key for m in lf.modules if not m.known]
        print(f"{path}: LoRA, format {lf.format}, arch {lf.arch.name} ({lf.style} names)")
        print(f"  modules: {len(lf.modules)} ({sum(1 for m in lf.modules if m.kernel)} conv)")
        print(f"  ranks: {dict(ranks)}  alphas: {dict(alphas)}  dtypes: {dict(dtypes)}")
        for m in unknown:
            print(f"  unknown module (not in the {lf.arch.name} key map): {m}")
        for key in sorted(lf.metadata):
            if key.startswith(("ss_network", "modelspec.", "loraport.")):
                print(f"  {key}: {lf.metadata[key][:80]}")
        return 0
    base = BaseModel(path)
    for comp in base.components():
        names = base.names(comp)
        try:
            arch = archs.detect([], base.module_names(comp)).name if comp == "model" else "-"
        except ValueError:
            arch = "unknown"
        dtypes = Counter(str(base.dtype(comp, n)).replace("torch.", "") for n in names)
        print(f"{path}: base model component '{comp}', arch {arch}, {len(names)} tensors, dtypes {dict(dtypes)}")
    fp = base.fingerprint()
    if fp:
        print(f"  fingerprint: {fp}")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command in ("resize", "extract", "merge"):
            return _toolbox(args)
        return _port(args) if args.command == "port" else _inspect(args)
    except (InputError, ValueError, OSError) as e:
        print(f"loraport: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
