"""The ``loraport`` command: ``loraport port LORA --source SRC --target TGT -o OUT [...]`` (a thin
shell over loraport.pipeline.port), ``loraport port-many INPUTS... -o OUTDIR`` (a catalog,
loraport.catalog.port_many), ``loraport inspect FILE`` (what a LoRA or base-model file is),
``loraport check`` and the toolbox (resize, extract, merge, convert). Exit statuses (errors.py):
0 done; 2 bad input or usage, one line on stderr naming the file and tensor, no output file left
behind; 3 nothing to write (the gate, the target or the filters left no module); 1 a bug in
loraport, with its traceback; 130 interrupted (Ctrl-C). ``--debug`` prints the traceback of an
input error too."""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import traceback
from collections import Counter

from . import __version__, adapters, archs, formats, upgrade
from . import toolbox as _tb
from .adapters import DORA_MAGNITUDE
from .basemodel import BaseModel
from .convert import convert
from .devices import DEVICE_HELP
from .errors import (
    EXIT_BROKEN_PIPE,
    EXIT_CHECK_FAILED,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_NOTHING,
    InputError,
    NothingToPort,
)
from .pipeline import DEFAULT_MIN_SIMILARITY, DEFAULT_SUBSPACE_RANK, ON_DISSIMILAR, VARIANTS, port
from .startup import interrupted_early
from .toolbox import MERGE_MODES, extract, merge, resize

EXIT_CODES = """exit status:
  0    done
  2    bad input or usage (one line on stderr naming the file and tensor; nothing written)
  3    nothing to write: the similarity gate, the target or the filters left no module
  4    check: keys the base's loader would not consume, or modules that do not fit
  1    an internal error (a bug in loraport), with its traceback
  130  interrupted (Ctrl-C); no output left behind
  141  stdout was closed early (e.g. `loraport inspect X | head`); said nothing more
--debug prints the traceback of an input error too."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="loraport",
        description="Port LoRA adapters across base-model releases (subspace similarity gate; copy or LoRA-X projection).",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"loraport {__version__}")
    p.add_argument("--debug", action="store_true", help="print the traceback of an input error too")
    # accepted after the subcommand as well; SUPPRESS keeps a subcommand from resetting it
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_subparser(debug))

    q = sub.add_parser("port", help="port a LoRA from a source base model to a target one")
    q.add_argument("lora", help="LoRA safetensors file")
    q.add_argument("--source", required=True, help="base model the LoRA was trained on (file, index.json or folder)")
    q.add_argument(
        "--target",
        required=True,
        action="append",
        help="base model to port to; for a multi-expert release (Wan 2.2 A14B) one EXPERT=PATH each "
        "(--target high=H --target low=L): one output per expert, -o's '{expert}' or OUT.EXPERT.safetensors",
    )
    q.add_argument(
        "--expert-strength",
        action="append",
        metavar="EXPERT=S",
        help="with several --target experts: scale that expert's ΔW by S (on top of --strength)",
    )
    q.add_argument("-o", "--out", help="output LoRA path (required unless --dry-run)")
    _port_options(q)
    q.add_argument(
        "--strength",
        action="append",
        metavar="S|REGEX=S",
        help="scale the ported ΔW by S (negative too), folded into the factors; 'REGEX=S' (repeatable) "
        "scales the modules whose name matches (re.search; the last matching rule wins)",
    )
    q.add_argument("--report", help="write the per-layer JSON report here")
    q.add_argument("--dry-run", action="store_true", help="map and check every layer; compute and write nothing")
    q.add_argument("--quiet", action="store_true", help="no progress bar or summary")

    c = sub.add_parser("port-many", help="port a catalog of LoRAs (files, folders, MANIFEST.jsonl) to a target base")
    c.add_argument("inputs", nargs="+", help="LoRA files, folders of them, or MANIFEST.jsonl files")
    c.add_argument("--source", required=True, help="base model the LoRAs were trained on")
    c.add_argument("--target", required=True, help="base model to port to")
    c.add_argument("-o", "--outdir", required=True, help="output folder: OUTDIR/<input stem>.safetensors")
    c.add_argument("--results", help="write one JSON line per input here (status, message, seconds, output)")
    c.add_argument("--ray", help="'local' (start Ray here) or a Ray cluster address; default: a process pool here")
    c.add_argument("--workers", type=int, help="tasks at once (default: this machine's CPUs, or the cluster's)")
    c.add_argument(
        "--transfer",
        choices=("files", "object-store"),
        help="how workers reach the subspace cache: 'files' (one machine or a shared file system; the default "
        "except with a --ray address) or 'object-store' (through Ray; LoRAs and outputs too)",
    )
    _port_options(c)
    c.add_argument("--quiet", action="store_true", help="no progress bar or summary")

    c = sub.add_parser(
        "check",
        help="list the LoRA keys a base's loader would not consume and the modules whose shape does not fit "
        "(exit 4 if any)",
    )
    c.add_argument("lora")
    c.add_argument("--base", required=True, help="base model (a diffusers folder with config.json: diffusers' loader)")
    c.add_argument("--arch", default="auto", choices=("auto", *archs.ARCHS))
    c.add_argument("--key-maps", action="store_true", help="use loraport's key maps even where diffusers could load it")
    c.add_argument("--report", help="write the result as JSON here")

    i = sub.add_parser("inspect", help="describe a LoRA or base-model file")
    i.add_argument("file")
    _toolbox_parsers(sub)
    return p


def _port_options(q) -> None:
    """The options `port` and `port-many` share."""
    q.add_argument("--device", default="auto", help=DEVICE_HELP)
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
    q.add_argument(
        "--dora-magnitude",
        default=DORA_MAGNITUDE[0],
        choices=DORA_MAGNITUDE,
        help="DoRA adapters: keep the trained magnitude, or rescale it by the target's / source's weight norms "
        "(default keep, see README 'Adapter types')",
    )
    q.add_argument("--method", default="power", choices=("power", "krylov"))
    q.add_argument("--power-iters", type=int, default=2)
    q.add_argument(
        "--block-size",
        type=int,
        help="krylov only: width of each Krylov block (default subspace rank + oversample; "
        "e.g. 3/4 of the subspace rank with --power-iters 3, see benchmarks/RESULTS.md)",
    )


def _subparser(debug: argparse.ArgumentParser):
    class Sub(argparse.ArgumentParser):
        def __init__(self, **kw):
            super().__init__(parents=[debug], epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter, **kw)

    return Sub


def _toolbox_parsers(sub) -> None:
    """resize, extract, merge (loraport.toolbox), convert (loraport.convert)."""

    def common(q, fmt_default="auto"):
        q.add_argument("-o", "--out", required=True, help="output LoRA path")
        q.add_argument("--format", default=fmt_default, choices=("auto", *formats.FORMATS))
        q.add_argument("--arch", default="auto", choices=("auto", *archs.ARCHS))
        q.add_argument("--device", default="auto", help=DEVICE_HELP)
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
    r.add_argument("--base", help="base model: needed for DoRA (its magnitude is kept; the error is the effective weight's)")
    common(r)
    c = sub.add_parser("convert", help="LoHa, LoKr, Tucker LoCon, DoRA or full-diff adapter -> plain LoRA (best rank-R)")
    c.add_argument("adapter")
    ranks(c, sv_ratio=False)
    c.add_argument("--base", help="base model: needed for DoRA and for conv LoHa without Tucker factors")
    common(c)
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
    inputs = {"resize": lambda: [args.lora, *([args.base] if args.base else [])], "extract": lambda: [args.base, args.tuned],
              "convert": lambda: [args.adapter, *([args.base] if args.base else [])],
              "merge": lambda: [_tb.parse_weighted(e)[0] for e in args.loras]}[args.command]()  # fmt: skip
    formats.check_output(args.out, inputs)
    common = dict(format=args.format, arch=args.arch, device=args.device, max_memory=args.max_vram,
                  report=args.report, quiet=args.quiet)  # fmt: skip
    if args.command == "resize":
        rep = resize(args.lora, args.out, rank=args.rank, energy=args.energy, sv_ratio=args.sv_ratio, base=args.base,
                     **common)  # fmt: skip
    elif args.command == "convert":
        if args.rank is None and args.energy is None:
            raise InputError(f"{args.adapter}: give --rank R or --energy E")
        rep = convert(args.adapter, args.out, rank=args.rank, energy=args.energy, base=args.base, **common)
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
    if args.out is not None and not args.dry_run:
        formats.check_output(args.out, [args.lora, args.source, *args.target])
    options = dict(
        device=args.device, subspace_rank=args.subspace_rank,
        energy=args.energy, min_similarity=args.min_similarity, on_dissimilar=args.on_dissimilar,
        rank=args.rank, format=args.format, arch=args.arch, variant=args.variant, power_iters=args.power_iters,
        method=args.method, block_size=args.block_size, max_memory=args.max_vram, cache_dir=args.cache_dir,
        report=args.report, dry_run=args.dry_run, quiet=args.quiet, strength=args.strength,
        dora_magnitude=args.dora_magnitude,
    )  # fmt: skip
    targets = upgrade.parse_targets(args.target)
    if isinstance(targets, dict):
        strengths = upgrade.parse_expert_strengths(args.expert_strength)
        reports = upgrade.port_experts(args.lora, args.source, targets, args.out, expert_strength=strengths, **options)
    else:
        if args.expert_strength:
            raise InputError("loraport: --expert-strength needs several --target EXPERT=PATH")
        reports = {None: port(args.lora, args.source, targets, args.out, **options)}
    if not args.quiet:
        for expert, rep in reports.items():
            if expert is not None:
                print(f"expert {expert} ({rep.target}):")
            print(rep.table())
            if rep.out:
                print(f"wrote {rep.out} ({rep.format_out})")
    return 0


def _check(args) -> int:
    from .check import check

    rep = check(args.lora, args.base, arch=args.arch, use_diffusers=not args.key_maps)
    print(rep.table())
    if args.report:
        import json

        def dump(tmp):
            with open(tmp, "w") as f:
                json.dump(rep.to_dict(), f, indent=2)

        formats.atomic_write(args.report, dump, protect=(args.lora,))
    return 0 if rep.ok else EXIT_CHECK_FAILED


def _port_many(args) -> int:
    from .catalog import port_many

    rep = port_many(
        args.inputs, args.source, args.target, args.outdir, results=args.results, ray=args.ray,
        workers=args.workers, cache_dir=args.cache_dir, transfer=args.transfer, quiet=args.quiet,
        device=args.device, subspace_rank=args.subspace_rank, energy=args.energy,
        min_similarity=args.min_similarity, on_dissimilar=args.on_dissimilar, rank=args.rank, format=args.format,
        arch=args.arch, variant=args.variant, power_iters=args.power_iters, method=args.method,
        block_size=args.block_size, max_memory=args.max_vram, dora_magnitude=args.dora_magnitude,
    )  # fmt: skip
    if not args.quiet:
        print(rep.table())
    return rep.exit_status


def _is_lora(path: str) -> bool:
    if not path.endswith(".safetensors"):
        return False
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
    except Exception:
        return False
    plain = any(k.endswith(suffix) for k in keys for suffix in (".lora_down.weight", ".lora_A.weight", ".alpha"))
    return plain or adapters.is_adapter_file(keys)


def _inspect(args) -> int:
    path = args.file
    if _is_lora(path):
        lf = formats.read_lora(path)
        ranks = Counter(m.rank for m in lf.modules)
        alphas = Counter(m.alpha for m in lf.modules)
        dtypes = Counter(str(adapters.dtype_of(m)).replace("torch.", "") for m in lf.modules)
        types = Counter(m.type_name if adapters.is_adapter(m) else "LoRA" for m in lf.modules)
        unknown = [m.key for m in lf.modules if not m.known]
        print(f"{path}: LoRA, format {lf.format}, arch {lf.arch.name} ({lf.style} names)")
        print(f"  modules: {len(lf.modules)} ({sum(1 for m in lf.modules if len(m.shape) > 2)} conv)")
        print(f"  types: {dict(types)}")
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
        arch = (archs.base_arch(base.module_names(comp)) or "unknown") if comp == "model" else "-"
        dtypes = Counter(str(base.dtype(comp, n)).replace("torch.", "") for n in names)
        print(f"{path}: base model component '{comp}', arch {arch}, {len(names)} tensors, dtypes {dict(dtypes)}")
    fp = base.fingerprint()
    if fp:
        print(f"  fingerprint: {fp}")
    return 0


def _one_line(e: InputError) -> str:
    """The error's message without a "loraport: " / "loraport.port: " prefix of its own (the CLI
    adds "loraport: error: ")."""
    return re.sub(r"^loraport(\.\w+)?: ", "", str(e)).replace("\n", " ")


def main(argv=None) -> int:
    if signal.getsignal(signal.SIGINT) is interrupted_early:  # loraport.startup's import-time one
        signal.signal(signal.SIGINT, signal.default_int_handler)
    args = parser().parse_args(argv)  # a usage error exits 2 here
    try:
        if args.command in ("resize", "extract", "merge", "convert"):
            return _toolbox(args)
        if args.command == "check":
            return _check(args)
        if args.command == "port-many":
            return _port_many(args)
        return _port(args) if args.command == "port" else _inspect(args)
    except InputError as e:  # NothingToPort included; any other exception is a bug: traceback, exit 1
        if args.debug:
            traceback.print_exc()
        print(f"loraport: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_NOTHING if isinstance(e, NothingToPort) else EXIT_INPUT
    except KeyboardInterrupt:  # temporary files were removed on the way out (outfiles.atomic_write)
        print("loraport: interrupted; nothing written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `loraport ... | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail too
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
